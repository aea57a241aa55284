//! Independent zstd frames: `release package` writes the tar stream as frames of about
//! [`FRAME_TARGET`] uncompressed bytes, cut at entry boundaries ([`FrameWriter`]); ingest finds
//! them again in the bytes of any upload as it hashes them ([`FrameScanner`](super::FrameScanner),
//! `scan.rs`): the frame table of the artifact's index, so that a node can fetch and check one
//! frame alone.
//!
//! The artifact stays one valid zstd stream (`zstd -dc` and `tar --zstd` read it): a sequence of
//! frames is what zstd itself writes when asked to. Each frame records its content size, which
//! is how ingest learns where each frame's content lies in the tar stream without decompressing.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// A frame ends at the first entry boundary once it holds this many uncompressed bytes; a
/// file's data longer than this is cut at each multiple of it (from its first data byte).
///
/// Small, because a node fetches whole frames: a release that changes 1% of a 10,000-file tree
/// at random touches ~11% of its 128 KiB frames, but ~60% of 1 MiB ones. What it costs: the
/// bench's Laravel-like tree compresses to 69.2 MB in 128 KiB frames, 64.7 MB in 1 MiB ones
/// (+6.9%; measured with `split -b` and `zstd -3` of its tar stream).
pub const FRAME_TARGET: u64 = 128 << 10;

/// The most frames an artifact's table lists (32 GiB of tar stream at [`FRAME_TARGET`], twice
/// `limits.max_unpacked_bytes`' default): an upload of more frames, such as a hostile
/// one of millions of tiny frames, is taken as one frame (fetched whole), so its table costs
/// at most a few MiB.
pub const MAX_FRAMES: usize = 1 << 18;

/// The zstd level `release package` writes.
const LEVEL: i32 = 3;

/// One frame of an artifact: a zstd frame and any skippable frames that follow it (whatever
/// precedes the first zstd frame belongs to the first), so that the frames cover the artifact
/// end to end, each decompressible alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// Where the frame starts in the artifact (its compressed bytes).
    pub offset: u64,
    /// Its compressed bytes.
    pub length: u64,
    /// Where its content starts in the decompressed tar stream.
    pub raw_offset: u64,
    /// The bytes of tar stream it decompresses to.
    pub raw_length: u64,
    /// SHA-256 of its compressed bytes (`offset..offset + length` of the artifact).
    pub sha256: Digest,
}

/// Needed frames that follow each other in the index and in the artifact's bytes: read by one
/// ranged read (the server's store read, a node's ranged GET).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Their numbers in the index.
    pub frames: std::ops::Range<usize>,
    /// Where their compressed bytes lie in the artifact.
    pub bytes: std::ops::Range<u64>,
}

/// Why a list of needed frames has no runs.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunsError {
    #[error("frame {frame} is needed, but the index has {of} frames")]
    OutOfRange { frame: usize, of: usize },
    #[error("frame {frame} is needed after frame {after}: not in artifact order")]
    OutOfOrder { frame: usize, after: usize },
    #[error("frame {frame} of the index is {shown}: no bytes of an artifact")]
    NoBytes { frame: usize, shown: String },
}

/// The runs of `needed`, frame numbers of `frames` in strictly increasing order: a frame joins
/// the run before it when it is the next frame of the index and starts where that run ends (an
/// index that leaves a gap between two frames gets two reads, never bytes read as the wrong
/// frame). Refuses a number not in `frames`, out of order, and a frame of no byte or one that
/// ends past 2^64.
pub fn runs(frames: &[Frame], needed: &[usize]) -> Result<Vec<Run>, RunsError> {
    let mut runs: Vec<Run> = Vec::new();
    let mut previous: Option<usize> = None;
    for &number in needed {
        let frame = frames.get(number).ok_or(RunsError::OutOfRange { frame: number, of: frames.len() })?;
        if let Some(after) = previous.filter(|&p| number <= p) {
            return Err(RunsError::OutOfOrder { frame: number, after });
        }
        let end = frame
            .offset
            .checked_add(frame.length)
            .filter(|_| frame.length > 0)
            .ok_or_else(|| RunsError::NoBytes { frame: number, shown: format!("{frame:?}") })?;
        match runs.last_mut() {
            Some(run) if run.frames.end == number && run.bytes.end == frame.offset => {
                (run.frames.end, run.bytes.end) = (number + 1, end);
            }
            _ => runs.push(Run { frames: number..number + 1, bytes: frame.offset..end }),
        }
        previous = Some(number);
    }
    Ok(runs)
}

/// A `Write` of the tar stream that compresses it as independent frames, on `workers` threads
/// (each frame alone, so the bytes do not depend on how many), written in order.
///
/// Cuts: [`boundary`](Self::boundary) before each entry ends the frame once it holds
/// [`FRAME_TARGET`] bytes; [`large_file`](Self::large_file) before the entry of a file longer
/// than that makes its data cut at each multiple of [`FRAME_TARGET`] from its first byte
/// (which the caller marks by setting the flag it is given once the data starts to flow).
pub(super) struct FrameWriter<W: Write> {
    out: W,
    /// The frame being filled (uncompressed).
    buf: Vec<u8>,
    /// Uncompressed bytes before `buf`.
    done: u64,
    large: Option<Large>,
    pool: Pool,
    frames: u64,
}

struct Large {
    size: u64,
    started: Arc<std::sync::atomic::AtomicBool>,
    /// The next cut, once the data's start is known.
    next: Option<u64>,
    end: u64,
}

impl<W: Write> FrameWriter<W> {
    pub(super) fn new(out: W, workers: u32) -> io::Result<FrameWriter<W>> {
        Ok(FrameWriter {
            out,
            buf: Vec::with_capacity(2 * FRAME_TARGET as usize),
            done: 0,
            large: None,
            pool: Pool::new(workers)?,
            frames: 0,
        })
    }

    /// Before an entry: ends the frame if it holds [`FRAME_TARGET`] bytes.
    pub(super) fn boundary(&mut self) -> io::Result<()> {
        self.large = None;
        if self.buf.len() as u64 >= FRAME_TARGET { self.cut() } else { Ok(()) }
    }

    /// Before the entry of a file of `size` bytes (longer than [`FRAME_TARGET`]): the flag
    /// returned is to be set when its data starts to flow (its header is written by then).
    pub(super) fn large_file(&mut self, size: u64) -> Arc<std::sync::atomic::AtomicBool> {
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.large = Some(Large { size, started: Arc::clone(&started), next: None, end: 0 });
        started
    }

    /// Compresses what is left and answers the writer and the number of frames written.
    pub(super) fn finish(mut self) -> io::Result<(W, u64)> {
        if !self.buf.is_empty() {
            self.cut()?;
        }
        self.pool.drain(&mut self.out)?;
        Ok((self.out, self.frames))
    }

    fn cut(&mut self) -> io::Result<()> {
        let next = self.pool.spare.pop().unwrap_or_else(|| Vec::with_capacity(2 * FRAME_TARGET as usize));
        let raw = std::mem::replace(&mut self.buf, next);
        self.done += raw.len() as u64;
        self.frames += 1;
        self.pool.submit(raw, &mut self.out)
    }

    /// The position of the next cut inside a large file's data, if any.
    fn next_cut(&mut self) -> Option<u64> {
        let pos = self.done + self.buf.len() as u64;
        let large = self.large.as_mut()?;
        if large.next.is_none() && large.started.load(std::sync::atomic::Ordering::Relaxed) {
            (large.next, large.end) = (Some(pos + FRAME_TARGET), pos + large.size);
        }
        large.next.filter(|&next| next < large.end)
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let pos = self.done + self.buf.len() as u64;
        let Some(cut) = self.next_cut() else {
            self.buf.extend_from_slice(data);
            return Ok(data.len());
        };
        let n = data.len().min(usize::try_from(cut - pos).unwrap_or(usize::MAX));
        self.buf.extend_from_slice(&data[..n]);
        if pos + n as u64 == cut {
            self.cut()?;
            let large = self.large.as_mut().expect("a cut inside a large file");
            large.next = Some(cut + FRAME_TARGET);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compression threads: frames go in, compressed frames come out in the order they went in.
/// At most two per thread are in flight, so memory stays a few MiB per thread.
struct Pool {
    jobs: Option<mpsc::SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    /// The answers to come, oldest first.
    pending: VecDeque<mpsc::Receiver<Compressed>>,
    /// One thread: compressed here, no thread at all.
    inline: Option<zstd::bulk::Compressor<'static>>,
    in_flight: usize,
    /// Frame buffers to use again.
    spare: Vec<Vec<u8>>,
}

struct Job {
    raw: Vec<u8>,
    answer: mpsc::SyncSender<Compressed>,
}

/// A frame compressed, and its uncompressed buffer to use again.
type Compressed = io::Result<(Vec<u8>, Vec<u8>)>;

fn compressor() -> io::Result<zstd::bulk::Compressor<'static>> {
    let mut compressor = zstd::bulk::Compressor::new(LEVEL)?;
    compressor.include_checksum(true)?;
    compressor.include_contentsize(true)?;
    Ok(compressor)
}

impl Pool {
    fn new(workers: u32) -> io::Result<Pool> {
        let mut pool = Pool {
            jobs: None,
            threads: Vec::new(),
            pending: VecDeque::new(),
            inline: None,
            in_flight: 2 * workers.max(1) as usize,
            spare: Vec::new(),
        };
        if workers <= 1 {
            pool.inline = Some(compressor()?);
            return Ok(pool);
        }
        let (tx, rx) = mpsc::sync_channel::<Job>(workers as usize);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers {
            let rx = Arc::clone(&rx);
            let mut compressor = compressor()?;
            pool.threads.push(std::thread::Builder::new().name("zstd-frames".into()).spawn(move || {
                loop {
                    let job = rx.lock().expect("a compression thread does not panic").recv();
                    let Ok(Job { raw, answer }) = job else { return };
                    let compressed = compressor.compress(&raw).map(|c| (c, raw));
                    // The writer may be gone (its pack failed): nothing to answer then.
                    let _ = answer.send(compressed);
                }
            })?);
        }
        pool.jobs = Some(tx);
        Ok(pool)
    }

    fn submit<W: Write>(&mut self, mut raw: Vec<u8>, out: &mut W) -> io::Result<()> {
        if let Some(compressor) = &mut self.inline {
            out.write_all(&compressor.compress(&raw)?)?;
            raw.clear();
            self.spare.push(raw);
            return Ok(());
        }
        let (answer, rx) = mpsc::sync_channel(1);
        let jobs = self.jobs.as_ref().expect("threads while no inline compressor");
        jobs.send(Job { raw, answer }).map_err(|_| io::Error::other("a compression thread stopped"))?;
        self.pending.push_back(rx);
        while self.pending.len() > self.in_flight {
            self.write_oldest(out)?;
        }
        Ok(())
    }

    fn drain<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.write_oldest(out)?;
        }
        Ok(())
    }

    fn write_oldest<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        let rx = self.pending.pop_front().expect("an answer pending");
        let (compressed, mut raw) = rx.recv().map_err(|_| io::Error::other("a compression thread stopped"))??;
        out.write_all(&compressed)?;
        raw.clear();
        self.spare.push(raw);
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        self.pending.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
