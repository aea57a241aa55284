//! Unpacking a release from only the frames a node lacks (issue 15, part 2): the frames it
//! fetched, each checked against the artifact's index, and for the rest the tar headers the
//! index keeps, the files' data linked from the releases already here.

use std::io::{self, Read};

use crate::archive::{FileIndex, Frame, Skeleton};
use crate::digest::Digest;
use crate::node::UnpackError;

/// Where a sparse unpack gets the compressed bytes of the frames it needs: asked for each in
/// artifact order, once.
pub trait FrameSource {
    /// The compressed bytes of frame `number` (`frame` says where it lies in the artifact and
    /// how long it is). The caller checks them against the index.
    fn frame(&mut self, number: usize, frame: &Frame) -> io::Result<Vec<u8>>;
}

/// The tar stream of the whole artifact, frame by frame: a frame to fetch from its source,
/// checked against the index and decompressed; any other made from the skeleton. A failure
/// is kept in `trouble` (the walk sees only that the stream broke).
pub(crate) struct SparseTar<'a> {
    frames: &'a [Frame],
    skeleton: &'a Skeleton<'a>,
    wanted: Vec<bool>,
    source: &'a mut dyn FrameSource,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// The frame to read next.
    pub(crate) next: usize,
    buf: Vec<u8>,
    at: usize,
    /// Compressed bytes fetched.
    pub(crate) fetched: u64,
    pub(crate) trouble: Option<UnpackError>,
}

impl<'a> SparseTar<'a> {
    pub(crate) fn new(
        index: &'a FileIndex,
        skeleton: &'a Skeleton<'a>,
        wanted: Vec<bool>,
        source: &'a mut dyn FrameSource,
    ) -> SparseTar<'a> {
        SparseTar {
            frames: &index.frames,
            skeleton,
            wanted,
            source,
            decompressor: None,
            next: 0,
            buf: Vec::new(),
            at: 0,
            fetched: 0,
            trouble: None,
        }
    }

    /// The next frame's tar stream into `buf`; false after the last.
    fn advance(&mut self) -> Result<bool, UnpackError> {
        let Some(frame) = self.frames.get(self.next) else { return Ok(false) };
        let n = self.next;
        self.next += 1;
        self.at = 0;
        if !self.wanted[n] {
            self.skeleton.frame(frame, &mut self.buf);
            return Ok(true);
        }
        let bytes = self.source.frame(n, frame).map_err(|e| UnpackError::Frames(format!("frame {n}: {e}")))?;
        self.fetched += bytes.len() as u64;
        let mismatch = |why: String| UnpackError::FrameMismatch { frame: n, why };
        if bytes.len() as u64 != frame.length {
            return Err(mismatch(format!("{} bytes, not {}", bytes.len(), frame.length)));
        }
        let actual = Digest::of(&bytes);
        if actual != frame.sha256 {
            return Err(mismatch(format!("its SHA-256 is {actual}, not {}", frame.sha256)));
        }
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            None => {
                self.decompressor.insert(zstd::bulk::Decompressor::new().map_err(|e| mismatch(format!("zstd: {e}")))?)
            }
        };
        // Bounded by the caller: no frame over `MAX_MADE_FRAME` is unpacked this way.
        self.buf = decompressor
            .decompress(&bytes, frame.raw_length as usize)
            .map_err(|e| mismatch(format!("it does not decompress: {e}")))?;
        if self.buf.len() as u64 != frame.raw_length {
            return Err(mismatch(format!("it decompresses to {} bytes, not {}", self.buf.len(), frame.raw_length)));
        }
        Ok(true)
    }
}

impl Read for SparseTar<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            match self.advance() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    let shown = e.to_string();
                    self.trouble = Some(e);
                    return Err(io::Error::other(shown));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
