//! Where an index's JSON goes on its way to zstd: cut at what a reader takes, and held whole
//! while it is small so that its compressed bytes, and so its name, stay what they were.

use std::io;

use super::index::{FileIndex, IndexError};
use crate::digest::Digest;

/// Up to this much, an index's JSON is held whole and compressed at once: every index of a
/// tree of up to about 60,000 files (~200 bytes of JSON each, and the skeleton's base64).
pub(super) const WHOLE_JSON: usize = 16 << 20;

/// The stored JSON on its way to zstd. Held whole up to [`WHOLE_JSON`] and compressed at
/// once, as every build before db92d95 did for every index (db92d95 to 4f1a706, which never
/// landed, streamed them all): zstd's one-shot and streamed
/// forms of the same bytes differ past about a MiB, and an index keeps its name only if its
/// bytes do (a registry row names its index's object for good; an upload of the same bytes
/// writes it again to that key, also after a purge). Past it, compressed as it is written, so
/// that the largest index is never held whole, but when an earlier build stored it under its
/// one-shot name ([`FileIndex::into_readable_as`]).
#[derive(Default)]
pub(super) enum Spilling {
    #[default]
    Empty,
    Whole(Vec<u8>),
    /// Buffered: serde_json writes a few bytes at a time.
    Streamed(io::BufWriter<zstd::stream::write::Encoder<'static, Vec<u8>>>),
}

impl Spilling {
    /// The compressed form of everything written.
    pub(super) fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Spilling::Empty => zstd::bulk::compress(&[], 3),
            Spilling::Whole(json) => zstd::bulk::compress(&json, 3),
            Spilling::Streamed(buffered) => buffered.into_inner().map_err(|e| e.into_error())?.finish(),
        }
    }
}

impl io::Write for Spilling {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Spilling::Empty => *self = Spilling::Whole(Vec::new()),
            Spilling::Whole(json) if json.len() + buf.len() > WHOLE_JSON => {
                // Before the buffer grows past the threshold (a Vec doubles): what is held goes
                // to the encoder, and the buffer is dropped.
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
                encoder.write_all(json)?;
                *self = Spilling::Streamed(io::BufWriter::with_capacity(64 << 10, encoder));
            }
            _ => {}
        }
        match self {
            Spilling::Whole(json) => json.extend_from_slice(buf),
            Spilling::Streamed(encoder) => encoder.write_all(buf)?,
            Spilling::Empty => unreachable!("set to Whole above"),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FileIndex {
    /// [`into_readable`](FileIndex::into_readable)'s index and stored form; when an earlier
    /// upload of the artifact named its index's object `named` and the one-shot form of a JSON
    /// past [`WHOLE_JSON`] has that name, that form: the registry row names the object for
    /// good, and an upload after a purge is to write it again under that name. Only then is
    /// the largest JSON held whole (up to what a reader takes).
    pub fn into_readable_as(self, named: Option<Digest>) -> Result<(FileIndex, Vec<u8>), IndexError> {
        let (index, stored) = self.into_readable()?;
        let Some(named) = named.filter(|named| *named != Digest::of(&stored)) else { return Ok((index, stored)) };
        let json = serde_json::to_vec(&index).expect("an index serializes");
        if json.len() <= WHOLE_JSON {
            return Ok((index, stored)); // compressed at once already
        }
        let whole = zstd::bulk::compress(&json, 3).expect("compressing into memory does not fail");
        Ok((index, if Digest::of(&whole) == named { whole } else { stored }))
    }
}

/// A writer that passes on `room` bytes at most; past it, a write fails.
pub(super) struct Capped<W> {
    pub(super) inner: W,
    pub(super) written: u64,
    room: u64,
}

impl<W> Capped<W> {
    pub(super) fn new(inner: W, room: u64) -> Capped<W> {
        Capped { inner, written: 0, room }
    }
}

impl<W: io::Write> io::Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min((self.room - self.written) as usize);
        self.inner.write_all(&buf[..take])?;
        self.written += take as u64;
        match take < buf.len() {
            true => Err(io::Error::other("larger than an index is read")),
            false => Ok(take),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::{Capped, Spilling, WHOLE_JSON};
    use crate::archive::index::{FileIndex, IndexedFile};
    use crate::digest::Digest;

    fn through_spilling(json: &[u8], piece: usize) -> (Vec<u8>, bool) {
        let mut spilling = Spilling::default();
        json.chunks(piece).for_each(|p| spilling.write_all(p).unwrap());
        let streamed = matches!(spilling, Spilling::Streamed(_));
        (spilling.finish().unwrap(), streamed)
    }

    #[test]
    fn up_to_the_threshold_the_bytes_are_the_one_shot_form_and_past_it_they_still_read_back() {
        let noise = crate::archive::tests::noise(7, WHOLE_JSON + 1);
        for len in [0, 1, 5_000, 3 << 20, WHOLE_JSON] {
            let (stored, streamed) = through_spilling(&noise[..len], 4_096);
            assert!(!streamed, "{len} bytes were streamed");
            assert_eq!(stored, zstd::bulk::compress(&noise[..len], 3).unwrap(), "{len} bytes");
        }
        let (stored, streamed) = through_spilling(&noise, 4_096);
        assert!(streamed, "one byte past the threshold is streamed");
        assert_eq!(zstd::decode_all(&stored[..]).unwrap(), noise);
    }

    #[test]
    fn a_write_past_the_room_passes_on_what_fits_and_fails() {
        let mut capped = Capped::new(Vec::new(), 10);
        capped.write_all(b"0123456").unwrap();
        assert!(capped.write_all(b"789ab").is_err());
        assert_eq!((capped.inner, capped.written), (b"0123456789".to_vec(), 10));
    }

    /// A JSON index past the threshold first stored by an earlier build (compressed at once,
    /// under that name) is written again under that name; any other keeps its own form.
    #[test]
    fn an_index_named_by_an_earlier_build_keeps_that_name() {
        let file = |i: u64| IndexedFile {
            path: format!("vendor/{}/{i}.php", "p".repeat(200)),
            executable: false,
            size: 0,
            offset: 512 * i,
            sha256: Digest::of(&i.to_le_bytes()),
        };
        let index = || FileIndex::new(Digest::of(b"artifact"), (0..80_000).map(file).collect());
        let json = serde_json::to_vec(&index()).unwrap();
        assert!(json.len() > WHOLE_JSON, "{} bytes of JSON", json.len());
        let earlier = zstd::bulk::compress(&json, 3).unwrap();
        let (_, own) = index().into_readable_as(None).unwrap();
        assert_ne!(Digest::of(&own), Digest::of(&earlier), "the streamed form is another");

        let (_, again) = index().into_readable_as(Some(Digest::of(&earlier))).unwrap();
        assert_eq!(again, earlier);
        for named in [Digest::of(&own), Digest::of(b"another")] {
            assert_eq!(index().into_readable_as(Some(named)).unwrap().1, own);
        }
    }
}
