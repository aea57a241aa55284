//! Listing an archive's regular files with the SHA-256 of their data as the walk hands them
//! over: the files of an artifact's [`FileIndex`](super::FileIndex), at ingest within a budget.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use super::check::{Entry, Visitor};
use super::index::IndexedFile;
use super::skeleton::SharedBuilder;
use crate::digest::Digest;

/// What a listed file adds to its index's JSON beside its path, at the least: the field names,
/// `false`, two one-digit numbers and a digest's 71 characters come to 132 bytes.
pub(super) const LISTED_FILE_BYTES: u64 = 128;

/// A file's place in an index, by its path; `None` for a file to hash.
pub type PlaceOf<'a> = dyn Fn(&str) -> Option<usize> + 'a;

/// A [`Visitor`] that lists every regular file with the SHA-256 of its data (but those
/// [`unhashed`](Self::unhashed), listed apart), handing each entry on to `inner` (which reads
/// what it wants of the data; the rest is hashed here).
pub struct Indexing<'a> {
    pub inner: &'a mut dyn Visitor,
    pub files: Vec<IndexedFile>,
    /// Which files' data is not hashed (nor read here): their place in the index the caller
    /// holds, by path. A node's sparse unpack links them unread (their data made, zeros, or
    /// passed over).
    pub unhashed: Option<&'a PlaceOf<'a>>,
    /// The files not hashed, not in `files`: their place, size and mode (no path copied: they
    /// are nearly all the entries of a sparse unpack).
    pub unhashed_files: Vec<(usize, u64, bool)>,
    /// The most the index of the files listed may take, as JSON (estimated from below; an
    /// index past [`MAX_INDEX_BYTES`](super::MAX_INDEX_BYTES) is not read anyway). Past it,
    /// `files` is emptied and nothing more is listed or hashed: an upload of 500,000 files
    /// with 4 KiB paths (a few MiB of zstd) held 2 GiB of paths before it was refused at the
    /// end.
    budget: Option<u64>,
    /// Set once the files listed passed the budget.
    pub over_budget: bool,
    /// The skeleton being built beside the listing, in what of the budget the listing leaves.
    skeleton: Option<SharedBuilder>,
    listed: u64,
    buffer: Vec<u8>,
}

impl<'a> Indexing<'a> {
    pub fn new(inner: &'a mut dyn Visitor) -> Indexing<'a> {
        Indexing {
            inner,
            files: Vec::new(),
            unhashed: None,
            unhashed_files: Vec::new(),
            budget: None,
            over_budget: false,
            skeleton: None,
            listed: 0,
            buffer: vec![0; 256 << 10],
        }
    }

    /// Lists files while their index takes at most `budget` bytes of JSON, beside `skeleton`
    /// (base64, 4/3 of its compressed bytes) in what they leave of it.
    pub(super) fn within(&mut self, budget: u64, skeleton: SharedBuilder) {
        skeleton.borrow_mut().set_room(skeleton_room(budget));
        self.budget = Some(budget);
        self.skeleton = Some(skeleton);
    }
}

/// What a skeleton may take of `left` bytes of JSON (its base64 is 4/3 of it), and never more
/// than a prepare sends: a larger one is useless, since no node would get it.
fn skeleton_room(left: u64) -> u64 {
    (left / 4 * 3).min(super::MAX_WIRE_BYTES as u64)
}

impl Visitor for Indexing<'_> {
    fn paths_hint(&self) -> usize {
        self.inner.paths_hint()
    }

    fn entry(&mut self, entry: Entry<'_>, data: &mut dyn Read) -> io::Result<()> {
        let Entry::File { path, executable, offset, size } = entry else {
            return self.inner.entry(entry, data);
        };
        if let Some(at) = self.unhashed.and_then(|unhashed| unhashed(path.as_str())) {
            self.inner.entry(entry, data)?;
            self.unhashed_files.push((at, size, executable));
            return Ok(());
        }
        if let Some(budget) = self.budget {
            self.listed += LISTED_FILE_BYTES + json_len(path.as_str());
            self.over_budget |= self.listed > budget;
            if let Some(skeleton) = &self.skeleton {
                skeleton.borrow_mut().set_room(skeleton_room(budget.saturating_sub(self.listed)));
            }
        }
        if self.over_budget {
            self.files = Vec::new();
            return self.inner.entry(entry, data);
        }
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

/// The length of `text` in JSON, quotes aside, as serde_json writes it: `"` and `\` and the
/// five controls with a short escape take two bytes, the other controls six (`\u00XX`).
/// A path may hold any byte but NUL: counted as written, one of 4,095 controls is 24 KiB.
pub(super) fn json_len(text: &str) -> u64 {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x09 | 0x0a | 0x0c | 0x0d => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_paths_json_length_is_what_serde_json_writes() {
        let every: String = (1u8..=0x7f).map(char::from).chain(['é', '☃']).collect();
        for text in [every.as_str(), "app/Http/Kernel.php", "\"\\", "\u{1}\u{1f}\t\n\r\u{8}\u{c}\u{7f}"] {
            let written = serde_json::to_string(text).unwrap().len() as u64;
            assert_eq!(super::json_len(text) + 2, written, "{text:?}");
        }
    }
}
