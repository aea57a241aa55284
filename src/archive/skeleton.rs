//! The skeleton of an artifact's tar stream: every byte of it but the regular files' data
//! (headers, long names, PAX records, padding, the end-of-archive marker), kept zstd-compressed
//! in the artifact's index, so that a node can make the tar stream of a frame it did not fetch:
//! the skeleton's bytes, and zeros where files' data lies (files it never reads: it links them
//! from releases it holds). The node's unpacker then walks the whole tar stream, fetched and
//! made alike, by the same rules as ingest.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

use super::frames::Frame;
use super::index::{FileIndex, IndexError, IndexedFile, MAX_INDEX_BYTES};

/// Built as the ingest walk reads the tar stream: every byte it reads but the data of the
/// regular files (cut out by [`cut`](Self::cut) before the walk reads them).
pub(super) struct SkeletonBuilder {
    encoder: Option<zstd::stream::write::Encoder<'static, Vec<u8>>>,
    /// Tar stream bytes fed so far.
    pos: u64,
    /// The data being cut out: bytes fed before this are dropped.
    cut_until: u64,
    /// Bytes kept so far, and the most kept: a skeleton larger than a node reads
    /// ([`MAX_INDEX_BYTES`], hundreds of thousands of long-named entries) is not kept at all.
    kept: u64,
    limit: u64,
    /// The most compressed bytes kept. The skeleton goes into its index's JSON as base64 (4/3
    /// of it) beside the files listed, within one budget: the listing narrows the room as it
    /// grows ([`set_room`](Self::set_room)). Global PAX headers of random bytes, which the
    /// walk passes over and zstd cannot shrink, held hundreds of MiB here after the listing
    /// had given up.
    room: u64,
}

pub(super) type SharedBuilder = Rc<RefCell<SkeletonBuilder>>;

impl SkeletonBuilder {
    pub(super) fn shared() -> SharedBuilder {
        SkeletonBuilder::shared_with_limit(MAX_INDEX_BYTES)
    }

    pub(super) fn shared_with_limit(limit: u64) -> SharedBuilder {
        let encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).ok();
        let room = MAX_INDEX_BYTES / 4 * 3;
        Rc::new(RefCell::new(SkeletonBuilder { encoder, pos: 0, cut_until: 0, kept: 0, limit, room }))
    }

    /// The most compressed bytes the skeleton may take from now on; past it, none is kept.
    pub(super) fn set_room(&mut self, room: u64) {
        self.room = room;
        self.drop_past_room();
    }

    /// What zstd has handed out so far is checked (it holds a block or so more, counted by
    /// [`finish`](Self::finish)).
    fn drop_past_room(&mut self) {
        if self.encoder.as_ref().is_some_and(|encoder| encoder.get_ref().len() as u64 > self.room) {
            self.encoder = None;
        }
    }

    /// The next bytes of the tar stream.
    pub(super) fn feed(&mut self, data: &[u8]) {
        let start = self.pos;
        self.pos += data.len() as u64;
        let skip = self.cut_until.saturating_sub(start).min(data.len() as u64) as usize;
        self.kept += (data.len() - skip) as u64;
        if self.kept > self.limit {
            self.encoder = None;
        }
        if skip < data.len()
            && let Some(encoder) = &mut self.encoder
            && encoder.write_all(&data[skip..]).is_err()
        {
            self.encoder = None;
        }
        self.drop_past_room();
    }

    /// A regular file's data, at `offset` for `size` bytes: not kept. The walk cuts before it
    /// reads the data; a cut behind what was fed already (never, with the tar reader, which
    /// reads a header exactly) leaves the artifact without a skeleton.
    pub(super) fn cut(&mut self, offset: u64, size: u64) {
        if offset < self.pos {
            self.encoder = None;
        }
        self.cut_until = offset.saturating_add(size);
    }

    /// The compressed skeleton; `None` when it could not be made (the artifact is then
    /// fetched whole by every node).
    pub(super) fn finish(&mut self) -> Option<Vec<u8>> {
        self.encoder.take()?.finish().ok().filter(|skeleton| skeleton.len() as u64 <= self.room)
    }

    /// Whether a skeleton is still being kept.
    #[cfg(test)]
    pub(super) fn keeping(&self) -> bool {
        self.encoder.is_some()
    }
}

/// Where an index's skeleton fits: its files laid out one after the other, and the bytes the
/// tar stream leaves beside their data, which the skeleton must decompress to.
struct Layout<'i> {
    stored: &'i [u8],
    /// `data_before[i]`: the data bytes of the index's first `i` files.
    data_before: Vec<u64>,
    /// The tar stream's length, its files' data, and the difference.
    stream: u64,
    total: u64,
    expected: u64,
}

impl<'i> Layout<'i> {
    fn of(index: &'i FileIndex) -> Result<Option<Layout<'i>>, IndexError> {
        let (Some(stored), Some(last)) = (&index.skeleton, index.frames.last()) else { return Ok(None) };
        let mut data_before = Vec::with_capacity(index.files.len() + 1);
        let (mut total, mut end) = (0u64, 0u64);
        for file in &index.files {
            if file.offset < end {
                return Err(bad(format!("cannot be laid out: {:?} overlaps the file before it", file.path)));
            }
            data_before.push(total);
            total += file.size;
            end = file.offset + file.size; // within the frames: checked by decode
        }
        data_before.push(total);
        let stream = last.raw_offset + last.raw_length;
        let expected = stream.saturating_sub(total);
        if expected > MAX_INDEX_BYTES {
            return Err(IndexError::TooLarge);
        }
        Ok(Some(Layout { stored, data_before, stream, total, expected }))
    }

    fn undone(&self, e: io::Error) -> IndexError {
        let Layout { expected, stream, total, .. } = self;
        bad(format!(
            "does not decompress into the {expected} bytes a tar stream of {stream} bytes leaves beside its files' \
             {total}: {e}"
        ))
    }

    /// Whether `decompressed` bytes are what the skeleton must hold.
    fn holds(&self, decompressed: u64) -> Result<(), IndexError> {
        if decompressed + self.total != self.stream {
            return Err(bad(format!(
                "holds {decompressed} bytes, and the files {}, of a tar stream of {} bytes",
                self.total, self.stream
            )));
        }
        Ok(())
    }
}

fn bad(why: String) -> IndexError {
    IndexError::Frames(format!("the skeleton {why}"))
}

/// An index's skeleton, decompressed and checked against its frames and files, ready to make
/// the tar stream of any frame.
pub struct Skeleton<'a> {
    raw: Vec<u8>,
    /// The index's files, in stream order.
    files: &'a [IndexedFile],
    /// `data_before[i]`: the data bytes of `files[..i]`.
    data_before: Vec<u64>,
}

impl<'a> Skeleton<'a> {
    /// The skeleton of `index`; `None` when it has none (or no frame table).
    pub fn of(index: &'a FileIndex) -> Result<Option<Skeleton<'a>>, IndexError> {
        let Some(layout) = Layout::of(index)? else { return Ok(None) };
        // What it must decompress to, known before: decompressed straight into a buffer of
        // that size (read to its end, grown and copied, it cost a tenth of a sparse prepare).
        let mut raw = Vec::with_capacity(layout.expected as usize);
        let decompressed =
            zstd::bulk::Decompressor::new().and_then(|mut d| d.decompress_to_buffer(layout.stored, &mut raw));
        if let Err(e) = decompressed {
            return Err(layout.undone(e));
        }
        layout.holds(raw.len() as u64)?;
        Ok(Some(Skeleton { raw, files: &index.files, data_before: layout.data_before }))
    }

    /// Whether [`of`](Self::of) would make the skeleton of `index`, checked in a few MiB
    /// whatever its size (decompressed piece by piece and counted, not kept).
    pub fn check(index: &FileIndex) -> Result<(), IndexError> {
        let Some(layout) = Layout::of(index)? else { return Ok(()) };
        let counted = zstd::stream::read::Decoder::new(layout.stored)
            .and_then(|decoder| io::copy(&mut decoder.take(layout.expected + 1), &mut io::sink()));
        match counted {
            Ok(n) => layout.holds(n),
            Err(e) => Err(layout.undone(e)),
        }
    }

    /// The tar stream `frame` decompresses to, but zeros for every file's data, into `out`.
    pub fn frame(&self, frame: &Frame, out: &mut Vec<u8>) {
        out.clear();
        out.resize(frame.raw_length as usize, 0);
        let mut next = self.file_at(frame.raw_offset);
        self.read_at(frame.raw_offset, frame.raw_offset + frame.raw_length, &mut next, out);
    }

    /// The first file whose data ends after `pos`: where [`read_at`](Self::read_at) starts.
    pub fn file_at(&self, pos: u64) -> usize {
        self.files.partition_point(|f| f.offset + f.size <= pos)
    }

    /// `next` ([`file_at`](Self::file_at) of a position before `pos`) moved on to `file_at(pos)`.
    pub fn catch_up(&self, pos: u64, next: &mut usize) {
        while self.files.get(*next).is_some_and(|f| f.offset + f.size <= pos) {
            *next += 1;
        }
    }

    /// Fills `out` with the tar stream from `pos` (to `end` at most), zeros for every file's
    /// data; how many bytes. `next`: [`file_at`](Self::file_at)`(pos)`, kept between calls.
    pub fn read_at(&self, pos: u64, end: u64, next: &mut usize, out: &mut [u8]) -> usize {
        let stop = end.min(pos + out.len() as u64);
        let (mut p, mut written) = (pos, 0);
        while p < stop {
            let n = match self.files.get(*next) {
                Some(file) if file.size == 0 => {
                    *next += 1;
                    continue;
                }
                Some(file) if file.offset <= p => {
                    let until = (file.offset + file.size).min(stop);
                    let n = (until - p) as usize;
                    out[written..written + n].fill(0);
                    if until == file.offset + file.size {
                        *next += 1;
                    }
                    n
                }
                following => {
                    let until = following.map_or(stop, |f| f.offset.min(stop));
                    let n = (until - p) as usize;
                    // Every file before `next` ends at or before `p` (and the lengths were
                    // checked against the stream's in `of`): the skeleton holds these bytes.
                    let at = (p - self.data_before[*next]) as usize;
                    out[written..written + n].copy_from_slice(&self.raw[at..at + n]);
                    n
                }
            };
            p += n as u64;
            written += n;
        }
        written
    }
}

/// Reads through, feeding what passes to a skeleton being built.
pub(super) struct Tapped<R> {
    pub(super) inner: R,
    pub(super) skeleton: Option<SharedBuilder>,
}

/// Only without a skeleton to build: what is passed over would be missing from it.
impl<R: Read + io::Seek> io::Seek for Tapped<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        match self.skeleton {
            Some(_) => Err(io::Error::new(io::ErrorKind::Unsupported, "a skeleton is being built: no seeking")),
            None => self.inner.seek(pos),
        }
    }
}

impl<R: Read> Read for Tapped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(skeleton) = &self.skeleton {
            skeleton.borrow_mut().feed(&buf[..n]);
        }
        Ok(n)
    }
}
