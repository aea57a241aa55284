//! The per-file index of an artifact: every regular file's path, mode, size, place in the tar
//! stream and SHA-256, computed once at ingest from the bytes just verified, stored beside the
//! artifact and handed to the nodes, so a node learns which files of a new release it already
//! holds without reading them (issue 15: shared files, fewer bytes fetched).
//!
//! The stored form is `zstd`-compressed JSON; the index is named by the SHA-256 of those bytes
//! (content-addressed, like the artifact it describes, which it names). What a server sends a
//! node is a binary form of the same index ([`FileIndex::encode_wire`]), read at every prepare;
//! what a node keeps, another of its files only ([`FileIndex::encode_kept`]).
//!
//! Format 2 adds the artifact's frame table ([`Frame`], found by [`FrameScanner`](super::FrameScanner)
//! at ingest): where each independent zstd frame lies in the artifact and in the tar stream, and
//! the SHA-256 of its bytes, so that a node may fetch and check frames alone. A file's frames are
//! not stored but derived from the offsets ([`FileIndex::frames_of`]).
//!
//! Format 3 adds the tar stream's skeleton ([`Skeleton`](super::Skeleton)): with it, a node
//! makes the tar stream of a frame it did not fetch.

use std::io::{self, Read, Write as _};

use serde::{Deserialize, Serialize};

use super::frames::Frame;
use super::spill::{Capped, Spilling};
use crate::digest::Digest;

/// The format written today. 1: files only; 2: with the frame table; 3: with the skeleton.
pub const INDEX_VERSION: u32 = 3;

/// The oldest format read: a format-2 index is a format-3 one without a skeleton (its artifact
/// is shared on the nodes, but fetched whole). Format 1 is refused.
pub const OLDEST_INDEX_VERSION: u32 = 2;

/// The largest decompressed index read back (an index of the largest archive `limits.max_files`
/// allows is far below it with paths of usual lengths; one of long paths is not made at all,
/// see `listing::Indexing::within`): bounds what a corrupt or hostile stored index can make a reader
/// allocate.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

/// The first bytes of a kept index's compact form ([`FileIndex::encode_kept`]).
const KEPT_MAGIC: &[u8; 4] = b"RLI1";

/// The first bytes of the sent index's binary form, decompressed ([`FileIndex::encode_wire`]).
const WIRE_MAGIC: &[u8; 4] = b"RLW1";

/// The zstd level of the sent index's form. Measured on the bench's Laravel-like tree's index
/// (10,229 files, 839 frames, a 201 KB skeleton; 1.24 MB decompressed): 684 KB compressed in
/// 2.3 ms and read in 1.4 ms at level 1; 691 KB, 3.9 ms and 1.6 ms at level 3. Most of it is
/// hashes and the skeleton (compressed already), which no level shrinks.
const WIRE_LEVEL: i32 = 1;

/// A file's bytes in the compact forms, but its path.
const FILE_FIXED: usize = 1 + 8 + 8 + 32 + 4;

/// A frame's bytes in the sent form.
const FRAME_BYTES: usize = 4 * 8 + 32;

/// Every regular file of one artifact, in archive order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    pub version: u32,
    /// The artifact it describes.
    pub artifact: Digest,
    /// The artifact's frames, in order, end to end from its first byte to its last (and so
    /// over its whole tar stream): at least one in an index made at ingest (one for the whole
    /// artifact when it could not be laid out in frames, as a plain `tar --zstd` archive);
    /// none in the index a node keeps for a release (only its files matter there).
    pub frames: Vec<Frame>,
    pub files: Vec<IndexedFile>,
    /// The tar stream but the files' data, zstd-compressed (base64 in the JSON): absent when
    /// it could not be made, and from the index a node keeps for a release.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "base64_bytes")]
    pub skeleton: Option<Vec<u8>>,
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
    #[error("the index is larger than {MAX_INDEX_BYTES} bytes decompressed")]
    TooLarge,
    #[error("the stored index does not read: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "the stored index is of format {found}; this build reads formats {OLDEST_INDEX_VERSION} to {INDEX_VERSION}"
    )]
    Version { found: u32 },
    #[error("the stored index describes {found}, not {expected}")]
    OtherArtifact { expected: Digest, found: Digest },
    #[error("the stored index's frame table does not hold together: {0}")]
    Frames(String),
    #[error("the sent index does not read: {0}")]
    Wire(String),
    #[error("the index is larger than a prepare sends ({} bytes in its wire form)", super::sent::MAX_WIRE_BYTES)]
    TooLargeToSend,
}

impl FileIndex {
    /// An index without a frame table (see [`with_frames`](Self::with_frames)).
    pub fn new(artifact: Digest, files: Vec<IndexedFile>) -> FileIndex {
        FileIndex { version: INDEX_VERSION, artifact, frames: Vec::new(), files, skeleton: None }
    }

    pub fn with_frames(mut self, frames: Vec<Frame>) -> FileIndex {
        self.frames = frames;
        self
    }

    pub fn with_skeleton(mut self, skeleton: Option<Vec<u8>>) -> FileIndex {
        self.skeleton = skeleton;
        self
    }

    /// The frames that hold `file`'s data (its header lies in the first of them, or before);
    /// an empty file's, the frame its data would start in. Empty without a frame table.
    pub fn frames_of(&self, file: &IndexedFile) -> std::ops::Range<usize> {
        let first = self.frames.partition_point(|f| f.raw_offset.saturating_add(f.raw_length) <= file.offset);
        let end = file.offset.saturating_add(file.size.max(1));
        let last = self.frames.partition_point(|f| f.raw_offset < end);
        first..last.max(first)
    }

    /// Frames end to end from the start, in the artifact and in the tar stream, none empty;
    /// every file's data within the tar stream they cover.
    fn check_frames(&self) -> Result<(), IndexError> {
        if self.frames.is_empty() {
            return Ok(());
        }
        let (mut offset, mut raw) = (0u64, 0u64);
        for (n, frame) in self.frames.iter().enumerate() {
            if frame.offset != offset || frame.raw_offset != raw || frame.length == 0 {
                return Err(IndexError::Frames(format!("frame {n} does not follow the one before it")));
            }
            let next = frame.offset.checked_add(frame.length).zip(frame.raw_offset.checked_add(frame.raw_length));
            (offset, raw) = next.ok_or_else(|| IndexError::Frames(format!("frame {n} ends past 2^64")))?;
        }
        if let Some(file) = self.files.iter().find(|f| f.offset.checked_add(f.size).is_none_or(|end| end > raw)) {
            return Err(IndexError::Frames(format!("{:?} lies past the last frame", file.path)));
        }
        Ok(())
    }

    /// The stored form: deterministic (the same index, the same bytes, the same name).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_checked().0
    }

    /// [`encode`](Self::encode)'s form, and whether [`decode`](Self::decode) reads it back: it
    /// refuses more than [`MAX_INDEX_BYTES`] of JSON and a frame table that does not hold
    /// together (an upload keeps in memory only an index a deploy could read from the store).
    /// The JSON is held whole up to 16 MiB (see [`Spilling`]), past it goes to zstd as it is
    /// written, and it stops one byte past what a reader takes: an index larger than that
    /// (escaped paths, a skeleton's base64, a long frame table) is refused without being made,
    /// and its stored form is that first part, which no reader takes either.
    pub fn encode_checked(&self) -> (Vec<u8>, Result<(), IndexError>) {
        let mut json = Capped::new(Spilling::default(), MAX_INDEX_BYTES + 1);
        let whole = serde_json::to_writer(&mut json, self).is_ok();
        let readable = match whole && json.written <= MAX_INDEX_BYTES {
            true => self.check_frames(),
            false => Err(IndexError::TooLarge),
        };
        let compressed = json.inner.finish();
        (compressed.expect("compressing into memory does not fail"), readable)
    }

    /// The index and its stored form, when a reader takes it. The ingest's listing budget is
    /// estimated from below, so the skeleton's base64 may be what takes the JSON past the
    /// limit: then the index goes without it (its files are still shared, fetched whole).
    pub fn into_readable(self) -> Result<(FileIndex, Vec<u8>), IndexError> {
        match self.encode_checked() {
            (_, Err(IndexError::TooLarge)) if self.skeleton.is_some() => self.with_skeleton(None).into_readable(),
            (stored, readable) => readable.map(|()| (self, stored)),
        }
    }

    /// The compact form a node keeps for a release (`.release/index/<hex>`; files only): read
    /// at every prepare, several at a time, so binary rather than JSON (a tenth of the time
    /// to read). `RLI1`, the artifact's 32 bytes, then per file: executable (1 byte, 0 or 1),
    /// size and offset (8 each, little-endian), SHA-256 (32), the path's length (4) and the path.
    pub fn encode_kept(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(36 + self.files.iter().map(|f| FILE_FIXED + f.path.len()).sum::<usize>());
        out.extend_from_slice(KEPT_MAGIC);
        out.extend_from_slice(self.artifact.as_bytes());
        for file in &self.files {
            put_file(&mut out, file);
        }
        out
    }

    /// Reads [`encode_kept`](Self::encode_kept)'s form back, refusing one of another artifact
    /// or one cut short.
    pub fn decode_kept(bytes: &[u8], artifact: Digest) -> Result<FileIndex, IndexError> {
        let cut = || IndexError::Frames("the kept index is cut short or not one".into());
        let rest = bytes.strip_prefix(KEPT_MAGIC).ok_or_else(cut)?;
        let mut rest = Reader(rest);
        let found = rest.digest().ok_or_else(cut)?;
        if found != artifact {
            return Err(IndexError::OtherArtifact { expected: artifact, found });
        }
        // At most one file per FILE_FIXED bytes: room for all at once (growing by doubling
        // copies the list into fresh pages, which a node pays for by the megabyte).
        let mut files = Vec::with_capacity(rest.0.len() / FILE_FIXED);
        while !rest.0.is_empty() {
            files.push(rest.file().map_err(|_| cut())?);
        }
        Ok(FileIndex::new(artifact, files))
    }

    /// The form sent to the nodes with each prepare: the whole index, binary rather than JSON
    /// (a node reads it at every prepare: 1.4 ms for a 10,000-file index, where `decode`'s
    /// JSON parse and hex digests take 10–14 ms), zstd-compressed, deterministic.
    ///
    /// Decompressed: `RLW1`, the format (4 bytes, little-endian), the artifact's 32 bytes; the
    /// number of frames (8), then per frame its offset, length, raw offset and raw length (8
    /// each) and SHA-256 (32); the number of files (8), then each file as in the kept form
    /// ([`encode_kept`](Self::encode_kept)); then the skeleton: 0, or 1, its length (8) and its
    /// bytes. Nothing after.
    pub fn encode_wire(&self) -> Vec<u8> {
        self.encode_wire_within(usize::MAX).expect("no limit")
    }

    /// [`encode_wire`](Self::encode_wire)'s form if it takes at most `limit` bytes; given up
    /// as soon as what is compressed passes it (a skeleton of random bytes does not shrink).
    pub fn encode_wire_within(&self, limit: usize) -> Option<Vec<u8>> {
        let files = self.files.iter().map(|f| FILE_FIXED + f.path.len()).sum::<usize>();
        let skeleton = self.skeleton.as_ref().map_or(0, |s| 8 + s.len());
        let size = 57 + FRAME_BYTES * self.frames.len() + files + skeleton;
        // Compressed as it is laid out, a piece at a time: laid out whole first (and zstd's
        // room for as much again), an index of long paths took twice its size in memory. The
        // size is known, so the frame says it (a node sets that much aside to read it into).
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), WIRE_LEVEL).expect("a zstd encoder");
        encoder.set_pledged_src_size(Some(size as u64)).expect("a size before any byte");
        let mut out = Vec::with_capacity(WIRE_PIECE + FILE_FIXED + 4096);
        out.extend_from_slice(WIRE_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(self.artifact.as_bytes());
        out.extend_from_slice(&(self.frames.len() as u64).to_le_bytes());
        for frame in &self.frames {
            for n in [frame.offset, frame.length, frame.raw_offset, frame.raw_length] {
                out.extend_from_slice(&n.to_le_bytes());
            }
            out.extend_from_slice(frame.sha256.as_bytes());
            spill(&mut out, &mut encoder, WIRE_PIECE, limit)?;
        }
        out.extend_from_slice(&(self.files.len() as u64).to_le_bytes());
        for file in &self.files {
            put_file(&mut out, file);
            spill(&mut out, &mut encoder, WIRE_PIECE, limit)?;
        }
        match &self.skeleton {
            None => out.push(0),
            Some(skeleton) => {
                out.push(1);
                out.extend_from_slice(&(skeleton.len() as u64).to_le_bytes());
                spill(&mut out, &mut encoder, 0, limit)?;
                for piece in skeleton.chunks(WIRE_PIECE) {
                    out.extend_from_slice(piece);
                    spill(&mut out, &mut encoder, 0, limit)?;
                }
            }
        }
        spill(&mut out, &mut encoder, 0, limit)?;
        let wire = encoder.finish().expect("compressing into memory does not fail");
        (wire.len() <= limit).then_some(wire)
    }

    /// Reads [`encode_wire`](Self::encode_wire)'s form back (bytes from the network: nothing
    /// in them is trusted), with the checks [`decode`](Self::decode) makes: refuses one larger
    /// than [`MAX_INDEX_BYTES`] decompressed, of another format or artifact, or whose frame
    /// table does not hold together; and one cut short, with bytes after its end, or a path
    /// not UTF-8, naming where.
    pub fn decode_wire(bytes: &[u8], artifact: Digest) -> Result<FileIndex, IndexError> {
        let raw = decompress_wire(bytes)?;
        let bad = |why: String| IndexError::Wire(why);
        let rest = raw.strip_prefix(WIRE_MAGIC).ok_or_else(|| bad("it does not start with RLW1".into()))?;
        let mut rest = Reader(rest);
        let header = || bad("it is cut short in its header".into());
        let version = u32::from_le_bytes(*rest.take::<4>().ok_or_else(header)?);
        if !(OLDEST_INDEX_VERSION..=INDEX_VERSION).contains(&version) {
            return Err(IndexError::Version { found: version });
        }
        let found = rest.digest().ok_or_else(header)?;
        if found != artifact {
            return Err(IndexError::OtherArtifact { expected: artifact, found });
        }

        let count = rest.u64().ok_or_else(header)?;
        let mut frames = Vec::with_capacity(rest.room(count, FRAME_BYTES));
        for n in 0..count {
            let cut = || bad(format!("it is cut short in frame {n} of {count}"));
            let offset = rest.u64().ok_or_else(cut)?;
            let length = rest.u64().ok_or_else(cut)?;
            let raw_offset = rest.u64().ok_or_else(cut)?;
            let raw_length = rest.u64().ok_or_else(cut)?;
            let sha256 = rest.digest().ok_or_else(cut)?;
            frames.push(Frame { offset, length, raw_offset, raw_length, sha256 });
        }

        let count = rest.u64().ok_or_else(|| bad(format!("it is cut short after its {} frames", frames.len())))?;
        let mut files = Vec::with_capacity(rest.room(count, FILE_FIXED));
        for n in 0..count {
            files.push(rest.file().map_err(|why| bad(format!("file {n} of {count} {why}")))?);
        }

        let cut = || bad("it is cut short in its skeleton".into());
        let skeleton = match rest.take::<1>().ok_or_else(cut)? {
            [0] => None,
            [1] => {
                let len = rest.u64().ok_or_else(cut)?;
                Some(rest.slice(len).ok_or_else(cut)?.to_vec())
            }
            [other] => return Err(bad(format!("its skeleton's mark is {other}, not 0 or 1"))),
        };
        if !rest.0.is_empty() {
            return Err(bad(format!("it has {} bytes after its end", rest.0.len())));
        }
        let index = FileIndex { version, artifact, frames, files, skeleton };
        index.check_frames()?;
        Ok(index)
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
        if !(OLDEST_INDEX_VERSION..=INDEX_VERSION).contains(&version) {
            return Err(IndexError::Version { found: version });
        }
        let index: FileIndex = serde_json::from_slice(&json)?;
        if index.artifact != artifact {
            return Err(IndexError::OtherArtifact { expected: artifact, found: index.artifact });
        }
        index.check_frames()?;
        Ok(index)
    }
}

/// How much of the sent form is laid out before it goes to zstd.
const WIRE_PIECE: usize = 64 << 10;

/// `out`, once it holds `at_least` bytes, handed to `encoder` and emptied; `None` once what
/// `encoder` has made passes `limit`.
fn spill(
    out: &mut Vec<u8>,
    encoder: &mut zstd::stream::write::Encoder<Vec<u8>>,
    at_least: usize,
    limit: usize,
) -> Option<()> {
    if out.len() >= at_least {
        encoder.write_all(out).expect("compressing into memory does not fail");
        out.clear();
    }
    (encoder.get_ref().len() <= limit).then_some(())
}

/// One file in the compact forms ([`FileIndex::encode_kept`]).
fn put_file(out: &mut Vec<u8>, file: &IndexedFile) {
    out.push(u8::from(file.executable));
    out.extend_from_slice(&file.size.to_le_bytes());
    out.extend_from_slice(&file.offset.to_le_bytes());
    out.extend_from_slice(file.sha256.as_bytes());
    out.extend_from_slice(&(file.path.len() as u32).to_le_bytes());
    out.extend_from_slice(file.path.as_bytes());
}

/// The sent form's bytes, decompressed: at most [`MAX_INDEX_BYTES`], and never more memory
/// set aside than a few times the bytes sent before the bytes are there (a frame header may
/// claim any size).
fn decompress_wire(bytes: &[u8]) -> Result<Vec<u8>, IndexError> {
    let claimed = zstd::zstd_safe::get_frame_content_size(bytes).ok().flatten().unwrap_or(0);
    let room = claimed.min(MAX_INDEX_BYTES + 1).min(64 * bytes.len() as u64 + 4096);
    let mut raw = Vec::with_capacity(room as usize);
    let unreadable = |e: io::Error| IndexError::Wire(format!("it does not decompress: {e}"));
    zstd::stream::read::Decoder::with_buffer(bytes)
        .map_err(unreadable)?
        .take(MAX_INDEX_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(unreadable)?;
    if raw.len() as u64 > MAX_INDEX_BYTES {
        return Err(IndexError::TooLarge);
    }
    Ok(raw)
}

/// The compact forms read front to back: each read takes its bytes off the front, or none
/// (`None`) when fewer are left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        let (taken, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(taken)
    }

    fn slice(&mut self, len: u64) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok().filter(|&len| len <= self.0.len())?;
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(taken)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(|b| u64::from_le_bytes(*b))
    }

    fn digest(&mut self) -> Option<Digest> {
        self.take::<32>().map(|b| Digest::from_bytes(*b))
    }

    /// Room for `count` items of at least `each` bytes, but no more than the bytes left hold.
    fn room(&self, count: u64, each: usize) -> usize {
        usize::try_from(count).unwrap_or(usize::MAX).min(self.0.len() / each)
    }

    /// One file in the compact forms ([`put_file`]), or what is wrong with it.
    fn file(&mut self) -> Result<IndexedFile, &'static str> {
        let cut = "is cut short";
        let executable = match self.take::<1>().ok_or(cut)? {
            [0] => false,
            [1] => true,
            _ => return Err("has an executable mark neither 0 nor 1"),
        };
        let size = self.u64().ok_or(cut)?;
        let offset = self.u64().ok_or(cut)?;
        let sha256 = self.digest().ok_or(cut)?;
        let len = u32::from_le_bytes(*self.take::<4>().ok_or(cut)?);
        let path = self.slice(len.into()).ok_or(cut)?;
        let path = std::str::from_utf8(path).map_err(|_| "has a path that is not UTF-8")?.to_owned();
        Ok(IndexedFile { path, executable, size, offset, sha256 })
    }
}

/// `Option<Vec<u8>>` as base64 text in JSON.
pub mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
        match bytes {
            // Written as it is encoded, not made whole first: a skeleton's base64 is up to
            // 4/3 of 192 MiB.
            Some(bytes) => serializer.collect_str(&base64::display::Base64Display::new(bytes, &STANDARD)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|t| STANDARD.decode(t).map_err(serde::de::Error::custom)).transpose()
    }
}
