//! Counting what a check reads: the decompressed bytes against the unpacked-size limit, and
//! against the compressed bytes read for them (so a bomb is stopped, not inflated).

use std::cell::Cell;
use std::io::{self, BufRead, Read, Seek};
use std::rc::Rc;

/// An upload's tar stream may unpack to this much whatever it weighs, and past it to at most
/// [`MAX_EXPANSION`] times the compressed bytes read so far (the ingest's check only: a node
/// reads what passed it). A 534 KiB archive of 15 GiB of zeros took 11 CPU-seconds to check
/// within `max_unpacked_bytes`; application trees unpack to a few to a few hundred times.
pub const FREE_UNPACKED: u64 = 1 << 30;
/// See [`FREE_UNPACKED`].
pub const MAX_EXPANSION: u64 = 1000;

pub(super) enum Trouble {
    /// The decompressed stream ended; a tar error after this means it was cut short.
    Eof,
    Limit,
    Dense {
        unpacked: u64,
        sent: u64,
    },
    Zstd(io::ErrorKind, String),
}

/// Counts decompressed bytes and enforces the unpacked-size limit as they flow (so a bomb is
/// stopped, not inflated).
pub(super) struct Counted<R> {
    pub(super) inner: R,
    pub(super) pos: u64,
    pub(super) limit: u64,
    /// The compressed bytes read so far, when the unpacked ones are held to a ratio of them.
    pub(super) sent: Option<Rc<Cell<u64>>>,
    pub(super) trouble: Rc<Cell<Option<Trouble>>>,
}

impl<R> Counted<R> {
    /// Past the limit, or too dense: the trouble set, and the error to stop the read with.
    fn over(&self) -> Option<io::Error> {
        if self.pos > self.limit {
            self.trouble.set(Some(Trouble::Limit));
            return Some(io::Error::other("unpacked size limit reached"));
        }
        let sent = self.sent.as_ref().map_or(u64::MAX, |s| s.get());
        if self.pos > FREE_UNPACKED.saturating_add(sent.saturating_mul(MAX_EXPANSION)) {
            self.trouble.set(Some(Trouble::Dense { unpacked: self.pos, sent }));
            return Some(io::Error::other("unpacked too much for what was sent"));
        }
        None
    }
}

/// Counts the compressed bytes the decoder takes.
pub(super) struct Sent<R> {
    pub(super) inner: R,
    pub(super) count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Sent<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Sent<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        self.count.set(self.count.get() + amount as u64);
        self.inner.consume(amount);
    }
}

/// Forward from where it is (the tar reader's seeking entries skip data so), to the position
/// `inner` says it reached: counted against the limit as if read.
impl<R: Read + Seek> Seek for Counted<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.pos = self.inner.seek(pos).inspect_err(|e| {
            self.trouble.set(Some(Trouble::Zstd(e.kind(), e.to_string())));
        })?;
        self.over().map_or(Ok(self.pos), Err)
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|e| {
            self.trouble.set(Some(Trouble::Zstd(e.kind(), e.to_string())));
        })?;
        if n == 0 && !buf.is_empty() {
            self.trouble.set(Some(Trouble::Eof));
        }
        self.pos += n as u64;
        self.over().map_or(Ok(n), Err)
    }
}
