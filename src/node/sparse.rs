//! Unpacking a release from only the frames a node lacks (issue 15, part 2): the frames it
//! fetched, each checked against the artifact's index, and for the rest the tar headers the
//! index keeps, the files' data linked from the releases already here.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::mpsc;

use super::unpack::{Linking, Seen, index_by_path, unpack_into, walk_error};
use super::{Looked, Modes, Sharing, UnpackError, Unpacked};
use crate::archive::{self, CheckOptions, FileIndex, Frame, Skeleton, Visitor};
use crate::digest::Digest;

/// Where a sparse unpack gets the compressed bytes of the frames it needs: asked for each in
/// artifact order, once, by the thread that checks them.
pub trait FrameSource: Send {
    /// The compressed bytes of frame `number` (`frame` says where it lies in the artifact and
    /// how long it is), into `bytes` (what it held is dropped; its memory is reused). The
    /// caller checks them against the index.
    fn frame(&mut self, number: usize, frame: &Frame, bytes: &mut Vec<u8>) -> io::Result<()>;
}

/// [`unpack_sharing`](super::unpack_sharing) from only the frames `sparse` fetches: the others are made from the
/// index's skeleton, and every file with data in them must be linked (it was found linkable
/// by [`frames_to_fetch`]; one that no longer is fails the unpack, naming it), and so is every
/// file of a fetched frame found linkable then. Each frame fetched is checked against the
/// index's SHA-256 before a byte of it is used; the files in them it writes are hashed and
/// compared with the index as in a whole fetch.
pub fn unpack_sparse(
    dest: &Path,
    options: &CheckOptions,
    modes: Modes<'_>,
    sharing: Sharing<'_>,
    sparse: Sparse<'_>,
) -> Result<(Unpacked, u64), UnpackError> {
    let Sparse { skeleton, needed, source } = sparse;
    let index = sharing.index;
    let mut wanted = vec![false; index.frames.len()];
    if needed.windows(2).any(|w| w[0] >= w[1]) {
        return Err(UnpackError::Frames("the frames to fetch are not in artifact order".into()));
    }
    for n in needed {
        *wanted.get_mut(*n).ok_or_else(|| UnpackError::Frames(format!("no frame {n} in the index")))? = true;
        let frame = &index.frames[*n];
        if frame.length > MAX_MADE_FRAME || frame.raw_length > MAX_MADE_FRAME {
            return Err(UnpackError::Frames(format!(
                "frame {n} is too large to fetch alone ({} bytes, {} unpacked; at most {MAX_MADE_FRAME})",
                frame.length, frame.raw_length
            )));
        }
    }
    // Linked, never read: a file with data in a frame not fetched (made from the skeleton,
    // zeros), and one in a fetched frame that an older release holds (found when the frames
    // were told: it is there only for a neighbour's sake). Its bytes are passed over, not
    // hashed or compared with the older file's: a tenth of a 1%-changed prepare went to that.
    let looked = sharing.looked.map_or(&[][..], |looked| &looked.seen[..]);
    let unread: Vec<bool> = (index.files.iter().enumerate())
        .map(|(at, f)| {
            f.size > 0 && (index.frames_of(f).any(|n| !wanted[n]) || looked.get(at).is_some_and(Option::is_some))
        })
        .collect();
    let used = used_prefixes(index, &wanted, &unread);
    // The frames are fetched, checked and decompressed by a thread of their own, a few ahead
    // of the walk, which meanwhile goes through the frames before them.
    std::thread::scope(|scope| {
        let (answer, results) = mpsc::sync_channel(AHEAD);
        let (give_back, spares) = mpsc::channel();
        let fetching = scope.spawn(move || fetch_and_check(&index.frames, needed, &used, source, answer, spares));
        let mut reader = SparseTar::new(index, skeleton, wanted, results, give_back);
        let walk = |visitor: &mut dyn Visitor| {
            let walked = archive::walk_tar_seeking(&mut reader, options, visitor);
            if let Some(trouble) = reader.trouble.take() {
                return Err(trouble);
            }
            let summary = walked.map_err(walk_error)?;
            if reader.next != index.frames.len() {
                return Err(UnpackError::Frames(format!(
                    "the tar stream ended in frame {} of {}",
                    reader.next,
                    index.frames.len()
                )));
            }
            Ok(summary)
        };
        let unpacked = unpack_into(dest, modes, Some(sharing), &unread, walk);
        // Hung up: the thread stops once the frame it is fetching, if any, is in (a refusal of
        // the walk waits for that: the server's sending of it, or the ranged GET's timeouts).
        drop(reader);
        let fetched = fetching.join();
        // The walk's refusal first: an older release found changed must be named (unmarked).
        let unpacked = unpacked?;
        let fetched = fetched.map_err(|_| UnpackError::Frames(FETCHER_STOPPED.into()))?;
        Ok((unpacked, fetched))
    })
}

/// Frames checked and waiting for the walk, at most (and one more, done, waiting to be handed
/// over): each holds the part of its tar stream the walk uses.
const AHEAD: usize = 2;

/// For each frame fetched, how much of its tar stream the walk uses (the rest is made from the
/// skeleton): up to the end of the last file in it that is written, not linked unread. Of a
/// 1%-changed release's frames, about one file each: the zstd of what follows it was a third
/// of the work of the thread that checks them.
fn used_prefixes(index: &FileIndex, wanted: &[bool], unread: &[bool]) -> Vec<u64> {
    let mut used = vec![0; index.frames.len()];
    for (file, _) in index.files.iter().zip(unread).filter(|(f, unread)| f.size > 0 && !**unread) {
        let end = file.offset + file.size;
        for n in index.frames_of(file).filter(|n| wanted[*n]) {
            let frame = &index.frames[n];
            used[n] = used[n].max(end.min(frame.raw_offset + frame.raw_length) - frame.raw_offset);
        }
    }
    used
}

/// Frame `number` checked: the part of its tar stream the walk uses, or why not.
type Checked = (usize, Result<Vec<u8>, UnpackError>);

/// The fetching thread: fetches the frames `needed`, in order, from `source`, checks each
/// against the index and decompresses the part of it `used`, and hands it to the walk; stops
/// after a frame that failed (told to the walk when it reaches it) or when the walk hangs up.
/// Buffers the walk is done with come back on `spares` (fresh pages for every frame cost a
/// twentieth of a 1%-changed prepare, zeroed by the kernel). The compressed bytes fetched.
fn fetch_and_check(
    frames: &[Frame],
    needed: &[usize],
    used: &[u64],
    source: &mut dyn FrameSource,
    answer: mpsc::SyncSender<Checked>,
    spares: mpsc::Receiver<Vec<u8>>,
) -> u64 {
    let mut decompressors = Decompressors::default();
    let (mut bytes, mut fetched) = (Vec::new(), 0);
    for &n in needed {
        let mut buf = spares.try_recv().unwrap_or_default();
        let checked = match source.frame(n, &frames[n], &mut bytes) {
            Ok(()) => {
                fetched += bytes.len() as u64;
                check_frame(n, &frames[n], &bytes, used[n], &mut buf, &mut decompressors).map(|()| buf)
            }
            Err(e) => Err(UnpackError::Frames(format!("frame {n}: {e}"))),
        };
        let failed = checked.is_err();
        if answer.send((n, checked)).is_err() || failed {
            break;
        }
    }
    fetched
}

/// The fetching thread's zstd contexts, made when first needed: one for whole frames, one for
/// the first part of a frame.
#[derive(Default)]
struct Decompressors {
    whole: Option<zstd::bulk::Decompressor<'static>>,
    part: Option<zstd::stream::raw::Decoder<'static>>,
}

/// Frame `n`'s compressed `bytes` checked against the index (`frame`: length, SHA-256) before a
/// byte of them is used, and decompressed into `buf`: the first `used` bytes of its tar stream,
/// or all of them (then to exactly its raw length).
fn check_frame(
    n: usize,
    frame: &Frame,
    bytes: &[u8],
    used: u64,
    buf: &mut Vec<u8>,
    decompressors: &mut Decompressors,
) -> Result<(), UnpackError> {
    let mismatch = |why: String| UnpackError::FrameMismatch { frame: n, why };
    if bytes.len() as u64 != frame.length {
        return Err(mismatch(format!("{} bytes, not {}", bytes.len(), frame.length)));
    }
    let actual = Digest::of(bytes);
    if actual != frame.sha256 {
        return Err(mismatch(format!("its SHA-256 is {actual}, not {}", frame.sha256)));
    }
    if used < frame.raw_length {
        return decompress_part(bytes, used as usize, buf, &mut decompressors.part).map_err(mismatch);
    }
    let decompressor = &mut decompressors.whole;
    let decompressor = match decompressor {
        Some(d) => d,
        None => decompressor.insert(zstd::bulk::Decompressor::new().map_err(|e| mismatch(format!("zstd: {e}")))?),
    };
    // Bounded by the caller: no frame over `MAX_MADE_FRAME` is unpacked this way.
    buf.clear();
    buf.reserve(frame.raw_length as usize);
    decompressor
        .decompress_to_buffer(bytes, buf)
        .map_err(|e| mismatch(format!("it does not decompress to {} bytes: {e}", frame.raw_length)))?;
    if buf.len() as u64 != frame.raw_length {
        return Err(mismatch(format!("it decompresses to {} bytes, not {}", buf.len(), frame.raw_length)));
    }
    Ok(())
}

/// The first `used` bytes that the zstd frame `bytes` decompresses to, into `buf`: the
/// decoder stops once it has made them. A skippable frame among the bytes makes nothing and is
/// passed over (a frame's own follow its zstd frame, so the first part never reaches them; an
/// artifact beginning with one is refused at ingest, but the decoder does not rely on that).
fn decompress_part(
    bytes: &[u8],
    used: usize,
    buf: &mut Vec<u8>,
    decoder: &mut Option<zstd::stream::raw::Decoder<'static>>,
) -> Result<(), String> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let decoder = match decoder {
        Some(d) => {
            d.reinit().map_err(|e| format!("zstd: {e}"))?;
            d
        }
        None => decoder.insert(zstd::stream::raw::Decoder::new().map_err(|e| format!("zstd: {e}"))?),
    };
    buf.clear();
    buf.resize(used, 0);
    let mut input = InBuffer::around(bytes);
    let mut output = OutBuffer::around(&mut buf[..]);
    while output.pos() < used {
        let before = (input.pos(), output.pos());
        // A frame's end (skippable or not) is no reason to stop while bytes are left: only a
        // call that reads and makes nothing.
        decoder.run(&mut input, &mut output).map_err(|e| format!("it does not decompress: {e}"))?;
        if (input.pos(), output.pos()) == before {
            break;
        }
    }
    match output.pos() {
        made if made < used => Err(format!("it decompresses to {made} bytes, not the {used} its files need")),
        _ => Ok(()),
    }
}

/// Why a frame was not checked, or the fetched bytes are not known: the fetching thread is
/// gone (it panicked).
const FETCHER_STOPPED: &str = "the thread fetching and checking the frames stopped";

fn fetcher_stopped(n: usize) -> UnpackError {
    UnpackError::Frames(format!("frame {n}: {FETCHER_STOPPED}"))
}

/// The frames of `sharing.index` a node must fetch to unpack it: those holding data of a file
/// it cannot link (none of its ready releases holds it, or it is empty, or in a writable path);
/// and the files it found linkable, for the unpack ([`Sharing::looked`]). `None` when the
/// index cannot be unpacked from frames (no skeleton, or a frame too large to make in memory):
/// then the whole artifact is fetched.
pub fn frames_to_fetch<'a>(
    sharing: &Sharing<'a>,
    has_skeleton: bool,
) -> Result<Option<(Vec<usize>, Looked<'a>)>, UnpackError> {
    let index = sharing.index;
    if !has_skeleton || index.frames.iter().any(|f| f.raw_length > MAX_MADE_FRAME || f.length > MAX_MADE_FRAME) {
        return Ok(None);
    }
    let by_path = index_by_path(index)?;
    let mut wanted = vec![false; index.frames.len()];
    let mut seen = vec![None; index.files.len()];
    // In two halves at once, each with its directory kept open: 10,000 stats are a sixth of
    // a 1%-changed prepare.
    let half = index.files.len().div_ceil(2).max(1);
    let look = |first: usize, seen: &mut [Option<Seen<'a>>]| {
        let linking = Linking {
            candidates: sharing.candidates,
            files: &index.files,
            by_path: &by_path,
            writable: sharing.writable,
            looked: None,
            sources: Default::default(),
        };
        for (at, slot) in (first..).zip(seen.iter_mut()) {
            let file = &index.files[at];
            if file.size > 0 {
                *slot = linking.usable(Path::new(&file.path), at, file.executable);
            }
        }
    };
    std::thread::scope(|scope| {
        let mut halves = seen.chunks_mut(half);
        let (first, second) = (halves.next(), halves.next());
        let other = second.map(|second| scope.spawn(|| look(half, second)));
        if let Some(first) = first {
            look(0, first);
        }
        if let Some(other) = other {
            other.join().expect("looking at the older files panicked");
        }
    });
    for (file, found) in index.files.iter().zip(&seen) {
        if file.size > 0 && found.is_none() {
            index.frames_of(file).for_each(|n| wanted[n] = true);
        }
    }
    let frames = wanted.iter().enumerate().filter(|(_, w)| **w).map(|(n, _)| n).collect();
    Ok(Some((frames, Looked { by_path, seen })))
}

/// The largest frame a sparse unpack makes or decompresses in memory (`release package` writes
/// frames of at most about twice [`archive::FRAME_TARGET`]; a larger one is fetched whole).
const MAX_MADE_FRAME: u64 = 8 << 20;

/// What [`unpack_sparse`] reads: the skeleton, which frames to fetch (their numbers, in
/// order) and where from.
pub struct Sparse<'a> {
    pub skeleton: &'a Skeleton<'a>,
    pub needed: &'a [usize],
    pub source: &'a mut dyn FrameSource,
}

/// The tar stream of the whole artifact, frame by frame: a frame fetched, checked against the
/// index and decompressed (by the fetching thread); any other made from the skeleton. A
/// failure is kept in `trouble` (the walk sees only that the stream broke).
struct SparseTar<'a> {
    frames: &'a [Frame],
    skeleton: &'a Skeleton<'a>,
    wanted: Vec<bool>,
    /// The frames fetched and checked, in order, from the fetching thread; and the buffers
    /// given back to it.
    results: mpsc::Receiver<Checked>,
    give_back: mpsc::Sender<Vec<u8>>,
    /// The part of the frame being read that was not decompressed, made from the skeleton once
    /// the part decompressed is read: where it starts and ends in the tar stream.
    rest: Option<(u64, u64)>,
    /// The frame to read next.
    next: usize,
    buf: Vec<u8>,
    at: usize,
    /// A frame being made from the skeleton, straight into the reader's buffer: where in the
    /// tar stream, where the frame ends, and the next file (`Skeleton::read_at`).
    made: Option<(u64, u64, usize)>,
    /// Where in the tar stream the next byte read is.
    position: u64,
    trouble: Option<UnpackError>,
}

impl<'a> SparseTar<'a> {
    fn new(
        index: &'a FileIndex,
        skeleton: &'a Skeleton<'a>,
        wanted: Vec<bool>,
        results: mpsc::Receiver<Checked>,
        give_back: mpsc::Sender<Vec<u8>>,
    ) -> SparseTar<'a> {
        SparseTar {
            frames: &index.frames,
            skeleton,
            wanted,
            results,
            give_back,
            rest: None,
            next: 0,
            buf: Vec::new(),
            at: 0,
            made: None,
            position: 0,
            trouble: None,
        }
    }

    /// The next frame's tar stream into `buf`; false after the last.
    fn advance(&mut self) -> Result<bool, UnpackError> {
        if let Some((start, end)) = self.rest.take() {
            self.made = Some((start, end, self.skeleton.file_at(start)));
            return Ok(true);
        }
        let Some(frame) = self.frames.get(self.next) else { return Ok(false) };
        let n = self.next;
        self.next += 1;
        self.at = 0;
        if !self.wanted[n] {
            self.buf.clear();
            let start = frame.raw_offset;
            self.made = Some((start, start + frame.raw_length, self.skeleton.file_at(start)));
            return Ok(true);
        }
        let checked = match self.results.recv() {
            Ok((fetched, checked)) if fetched == n => checked?,
            Ok(_) => return Err(UnpackError::Frames(format!("frame {n} was not fetched in its turn"))),
            Err(_) => return Err(fetcher_stopped(n)),
        };
        // A thread that is gone takes no buffers back.
        let _ = self.give_back.send(std::mem::replace(&mut self.buf, checked));
        let used = frame.raw_offset + self.buf.len() as u64;
        self.rest = ((self.buf.len() as u64) < frame.raw_length).then_some((used, frame.raw_offset + frame.raw_length));
        Ok(true)
    }

    /// The next frame, or why not (kept in `trouble`).
    fn next_frame(&mut self) -> io::Result<bool> {
        self.advance().map_err(|e| {
            let shown = e.to_string();
            self.trouble = Some(e);
            io::Error::other(shown)
        })
    }
}

/// Forward only, from where it is (`SeekFrom::Current`): the walk passes over the data of the
/// files it links. A frame passed over wholly is still fetched and checked (they come in
/// order); one made is not made. Stops at the end of the stream.
impl Seek for SparseTar<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let SeekFrom::Current(mut left @ 0..) = to else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "the sparse tar stream only seeks forward"));
        };
        while left > 0 {
            match &mut self.made {
                Some((pos, end, next)) if *pos < *end => {
                    let step = (left as u64).min(*end - *pos);
                    *pos += step;
                    self.position += step;
                    self.skeleton.catch_up(*pos, next);
                    left -= step as i64;
                    continue;
                }
                Some(_) => self.made = None,
                None if self.at < self.buf.len() => {
                    let step = (left as usize).min(self.buf.len() - self.at);
                    self.at += step;
                    self.position += step as u64;
                    left -= step as i64;
                    continue;
                }
                None => {}
            }
            if !self.next_frame()? {
                break;
            }
        }
        Ok(self.position)
    }
}

impl Read for SparseTar<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut self.made {
                Some((pos, end, _)) if *pos == *end => self.made = None,
                Some((pos, end, next)) => {
                    let n = self.skeleton.read_at(*pos, *end, next, out);
                    *pos += n as u64;
                    self.position += n as u64;
                    return Ok(n);
                }
                None if self.at < self.buf.len() => break,
                None => {}
            }
            if !self.next_frame()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        self.position += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_part_of_a_frame_is_what_the_whole_begins_with_and_no_more_than_it_holds() {
        let tar: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let frame = zstd::bulk::compress(&tar, 3).unwrap();
        let (mut buf, mut decoder) = (Vec::new(), None);
        // One decoder for frame after frame, as the fetching thread reuses it, stopped early each time.
        for used in [0, 1, 4096, 131_072 + 5, tar.len()] {
            decompress_part(&frame, used, &mut buf, &mut decoder).unwrap();
            assert_eq!(buf, tar[..used], "the first {used} bytes");
        }
        let err = decompress_part(&frame, tar.len() + 1, &mut buf, &mut decoder).unwrap_err();
        assert!(err.contains(&format!("decompresses to {} bytes, not the {}", tar.len(), tar.len() + 1)), "{err}");
        let err = decompress_part(&frame[..frame.len() / 2], tar.len(), &mut buf, &mut decoder).unwrap_err();
        assert!(err.contains("not the 300000 its files need"), "{err}");
        // Led by a skippable frame: passed over, not taken for the end.
        let mut led = vec![0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3];
        led.extend_from_slice(&frame);
        decompress_part(&led, 4096, &mut buf, &mut decoder).unwrap();
        assert_eq!(buf, tar[..4096], "past the skippable frame");
        let err = decompress_part(b"not zstd at all", 10, &mut buf, &mut decoder).unwrap_err();
        assert!(err.contains("does not decompress"), "{err}");
    }
}
