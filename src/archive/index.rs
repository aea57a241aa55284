//! The per-file index of an artifact: every regular file's path, mode, size, place in the tar
//! stream and SHA-256, computed once at ingest from the bytes just verified, stored beside the
//! artifact and handed to the nodes, so a node learns which files of a new release it already
//! holds without reading them (issue 15: shared files, fewer bytes fetched).
//!
//! The stored form is `zstd`-compressed JSON; the index is named by the SHA-256 of those bytes
//! (content-addressed, like the artifact it describes, which it names).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::check::{Entry, Visitor};
use crate::digest::Digest;

/// The format written today. A reader refuses any other.
pub const INDEX_VERSION: u32 = 1;

/// The largest decompressed index read back (an index of the largest archive `limits.max_files`
/// allows is far below it): bounds what a corrupt or hostile stored index can make a reader
/// allocate.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

/// Every regular file of one artifact, in archive order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    pub version: u32,
    /// The artifact it describes.
    pub artifact: Digest,
    pub files: Vec<IndexedFile>,
}

/// One regular file of an artifact. Directories, symbolic links and hard links are not listed:
/// they cost nothing to make again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedFile {
    pub path: String,
    /// Any execute bit set (a file is unpacked `0755` then, `0644` otherwise).
    pub executable: bool,
    pub size: u64,
    /// Where the file's data starts in the decompressed tar stream.
    pub offset: u64,
    pub sha256: Digest,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("the stored index does not decompress: {0}")]
    Zstd(io::Error),
    #[error("the stored index is larger than {MAX_INDEX_BYTES} bytes decompressed")]
    TooLarge,
    #[error("the stored index does not read: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the stored index is of format {found}; this build reads format {INDEX_VERSION}")]
    Version { found: u32 },
    #[error("the stored index describes {found}, not {expected}")]
    OtherArtifact { expected: Digest, found: Digest },
}

impl FileIndex {
    pub fn new(artifact: Digest, files: Vec<IndexedFile>) -> FileIndex {
        FileIndex { version: INDEX_VERSION, artifact, files }
    }

    /// The stored form: deterministic (the same index, the same bytes, the same name).
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("an index serializes");
        zstd::bulk::compress(&json, 3).expect("compressing into memory does not fail")
    }

    /// Reads a stored index back, refusing one of another format or of another artifact.
    pub fn decode(stored: &[u8], artifact: Digest) -> Result<FileIndex, IndexError> {
        let mut json = Vec::new();
        zstd::stream::read::Decoder::new(stored)
            .map_err(IndexError::Zstd)?
            .take(MAX_INDEX_BYTES + 1)
            .read_to_end(&mut json)
            .map_err(IndexError::Zstd)?;
        if json.len() as u64 > MAX_INDEX_BYTES {
            return Err(IndexError::TooLarge);
        }
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let Version { version } = serde_json::from_slice(&json)?;
        if version != INDEX_VERSION {
            return Err(IndexError::Version { found: version });
        }
        let index: FileIndex = serde_json::from_slice(&json)?;
        if index.artifact != artifact {
            return Err(IndexError::OtherArtifact { expected: artifact, found: index.artifact });
        }
        Ok(index)
    }
}

/// A [`Visitor`] that lists every regular file with the SHA-256 of its data, handing each
/// entry on to `inner` (which reads what it wants of the data; the rest is hashed here).
pub struct Indexing<'a> {
    pub inner: &'a mut dyn Visitor,
    pub files: Vec<IndexedFile>,
    buffer: Vec<u8>,
}

impl<'a> Indexing<'a> {
    pub fn new(inner: &'a mut dyn Visitor) -> Indexing<'a> {
        Indexing { inner, files: Vec::new(), buffer: vec![0; 256 << 10] }
    }
}

impl Visitor for Indexing<'_> {
    fn entry(&mut self, entry: Entry<'_>, data: &mut dyn Read) -> io::Result<()> {
        let Entry::File { path, executable, offset } = entry else {
            return self.inner.entry(entry, data);
        };
        let path = path.as_str().to_owned();
        let mut hashing = Hashing { inner: data, hasher: Sha256::new(), size: 0 };
        self.inner.entry(entry, &mut hashing)?;
        loop {
            let n = hashing.read(&mut self.buffer)?;
            if n == 0 {
                break;
            }
        }
        let sha256 = Digest::from_hasher(hashing.hasher);
        self.files.push(IndexedFile { path, executable, size: hashing.size, offset, sha256 });
        Ok(())
    }
}

/// Reads through, hashing and counting what passes.
struct Hashing<'a> {
    inner: &'a mut dyn Read,
    hasher: Sha256,
    size: u64,
}

impl Read for Hashing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}
