//! An artifact's file index as deploys send it to nodes, and the last ones kept in memory:
//! made ready once (the stored JSON decoded, the skeleton checked, the wire form encoded:
//! ~12 ms for 10,000 files), then shared by every deploy, promotion and rollback of the
//! artifact, and by the first deploy after its upload.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{FileIndex, Frame, IndexError, Skeleton};
use crate::digest::Digest;

/// An index ready to send: what a deploy needs of it, and no more (not its files' paths).
#[derive(Debug, PartialEq)]
pub struct SentIndex {
    /// The artifact it describes.
    pub artifact: Digest,
    /// Its wire form ([`FileIndex::encode_wire`]), sent to every node that fetches.
    pub wire: Vec<u8>,
    /// Where its frames lie in the artifact: what a node may ask for.
    pub frames: Arc<[Frame]>,
    /// Whether a node may unpack from frames: the index has a skeleton that fits it.
    pub sparse: bool,
    /// How many files it lists.
    pub files: usize,
}

impl SentIndex {
    /// The stored index `bytes` of `artifact`, read and made ready to send.
    pub fn read(bytes: &[u8], artifact: Digest) -> Result<SentIndex, IndexError> {
        SentIndex::of(FileIndex::decode(bytes, artifact)?)
    }

    /// `index` made ready to send, its skeleton checked in a few MiB whatever its size. A
    /// skeleton that does not fit its index, or that takes the wire form past
    /// [`MAX_WIRE_BYTES`], would fail (or never reach) every sparse prepare: the index is sent
    /// without one (nodes share files and fetch the artifact whole). Refused when even its
    /// files take it past that.
    pub fn of(index: FileIndex) -> Result<SentIndex, IndexError> {
        SentIndex::within(index, MAX_WIRE_BYTES)
    }

    fn within(mut index: FileIndex, limit: usize) -> Result<SentIndex, IndexError> {
        SentIndex::check_skeleton(&mut index);
        let wire = match index.encode_wire_within(limit) {
            Some(wire) => wire,
            None if index.skeleton.is_some() => {
                let artifact = index.artifact;
                tracing::warn!(%artifact, "the index's skeleton is too large to send: nodes fetch the whole artifact");
                index.skeleton = None;
                index.encode_wire_within(limit).ok_or(IndexError::TooLargeToSend)?
            }
            None => return Err(IndexError::TooLargeToSend),
        };
        Ok(SentIndex::with_wire(index, wire))
    }

    /// What an upload keeps of its index for the deploy that usually follows: [`of`]'s form
    /// when it is small enough to keep ([`SentIndexes::keep`]); a larger one is not made (a
    /// deploy reads it from the store). An upload's index is made ready only when
    /// [`FileIndex::decode`] would read its stored form back (its
    /// [`FileIndex::encode_checked`]), so that a deploy finds the same in memory as in the
    /// store.
    ///
    /// [`of`]: SentIndex::of
    pub fn to_keep(mut index: FileIndex) -> Option<SentIndex> {
        SentIndex::check_skeleton(&mut index);
        // As small as that, it is what `of` makes of it: `of` drops a skeleton only past
        // MAX_WIRE_BYTES.
        let wire = index.encode_wire_within(KEPT_BYTES / 4)?;
        Some(SentIndex::with_wire(index, wire))
    }

    fn check_skeleton(index: &mut FileIndex) {
        if let Err(e) = Skeleton::check(index) {
            let artifact = index.artifact;
            tracing::warn!(%artifact, error = %e, "the index's skeleton does not fit it: nodes fetch the whole artifact");
            index.skeleton = None;
        }
    }

    fn with_wire(mut index: FileIndex, mut wire: Vec<u8>) -> SentIndex {
        // The streamed output grew by doubling.
        wire.shrink_to_fit();
        SentIndex {
            artifact: index.artifact,
            wire,
            sparse: index.skeleton.is_some(),
            files: index.files.len(),
            frames: std::mem::take(&mut index.frames).into(),
        }
    }

    /// The memory it holds, about.
    fn weight(&self) -> usize {
        self.wire.capacity() + self.frames.len() * size_of::<Frame>() + size_of::<SentIndex>()
    }
}

/// The indexes sent or uploaded last, by the SHA-256 of their stored form (what the registry
/// names), the least recently used dropped first: at most [`KEPT`] of them and
/// [`KEPT_BYTES`] together (a 10,000-file index weighs ~0.7 MiB, its wire form being
/// compressed). One larger than a quarter of that (some 100,000 files) is not kept: every
/// deploy of it reads it from the store.
#[derive(Debug, Default)]
pub struct SentIndexes {
    kept: Mutex<VecDeque<(Digest, Arc<SentIndex>)>>,
}

const KEPT: usize = 16;
const KEPT_BYTES: usize = 32 << 20;

/// The most an index's wire form may take: a prepare's request line carries its base64, at
/// most 64 MiB, which a node reads whole and the server writes for every node at once
/// (`parallel`). A larger skeleton is useless: the ingest stops building it there.
pub const MAX_WIRE_BYTES: usize = 48 << 20;
const _: () = assert!(MAX_WIRE_BYTES.div_ceil(3) * 4 == 64 << 20, "64 MiB of base64");

impl SentIndexes {
    /// The index stored as `stored`, if kept; it becomes the most recently used.
    pub fn get(&self, stored: Digest) -> Option<Arc<SentIndex>> {
        let mut kept = self.kept.lock().expect("no code panics holding the kept indexes");
        let at = kept.iter().position(|(key, _)| *key == stored)?;
        let entry = kept.remove(at).expect("found just now");
        let sent = Arc::clone(&entry.1);
        kept.push_front(entry);
        Some(sent)
    }

    /// Keeps `sent`, stored as `stored`, as the most recently used.
    pub fn keep(&self, stored: Digest, sent: Arc<SentIndex>) {
        if sent.weight() > KEPT_BYTES / 4 {
            return;
        }
        let mut kept = self.kept.lock().expect("no code panics holding the kept indexes");
        kept.retain(|(key, _)| *key != stored);
        kept.push_front((stored, sent));
        let mut bytes = 0;
        let within = kept.iter().take(KEPT).take_while(|(_, s)| {
            bytes += s.weight();
            bytes <= KEPT_BYTES
        });
        let keep = within.count();
        kept.truncate(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len(indexes: &SentIndexes) -> usize {
        indexes.kept.lock().unwrap().len()
    }

    fn sent(files: usize, wire: usize) -> Arc<SentIndex> {
        Arc::new(SentIndex {
            artifact: Digest::of(b"a"),
            wire: vec![0; wire],
            frames: Arc::from([]),
            sparse: true,
            files,
        })
    }

    /// What an upload keeps is what a deploy would read back from the store; and it keeps
    /// nothing where that read would refuse.
    #[test]
    fn an_index_made_ready_at_upload_is_the_one_read_back_from_its_stored_form() {
        let index = sparse_index();
        let artifact = index.artifact;
        let (stored, readable) = index.encode_checked();
        assert!(readable.is_ok());
        let kept = SentIndex::of(index.clone()).unwrap();
        assert_eq!(Some(&kept), SentIndex::to_keep(index.clone()).as_ref());
        assert!(kept.sparse);
        assert_eq!(kept, SentIndex::read(&stored, artifact).unwrap());
        assert_eq!(kept.wire.capacity(), kept.wire.len(), "no room for the uncompressed form kept");

        // A frame table with a gap: refused read back, so not made ready either.
        let mut gap = index.clone();
        gap.frames[3].offset += 1;
        let (stored, readable) = gap.encode_checked();
        assert!(readable.is_err());
        assert!(SentIndex::read(&stored, artifact).is_err());
        assert!(matches!(gap.into_readable(), Err(IndexError::Frames(_))));

        // A skeleton whose base64 alone passes what a reader takes: the index is kept
        // without it (its files shared on the nodes, the artifact fetched whole).
        let (kept, stored) = index.clone().into_readable().unwrap();
        assert_eq!(kept, index, "one that fits is kept whole");
        assert_eq!(FileIndex::decode(&stored, artifact).unwrap(), index);
        let large = vec![0u8; (super::super::MAX_INDEX_BYTES / 4 * 3) as usize + 1];
        let (kept, stored) = index.clone().with_skeleton(Some(large)).into_readable().unwrap();
        assert_eq!(kept, index.clone().with_skeleton(None));
        assert_eq!(FileIndex::decode(&stored, artifact).unwrap(), kept);
        assert!(!SentIndex::of(kept).unwrap().sparse);
    }

    /// An index whose skeleton fits it: ten frames of a tar stream of 10,000 zero bytes.
    fn sparse_index() -> FileIndex {
        let frame = |n: u64| Frame {
            offset: n * 100,
            length: 100,
            raw_offset: n * 1000,
            raw_length: 1000,
            sha256: Digest::of(&n.to_le_bytes()),
        };
        FileIndex::new(Digest::of(b"a"), vec![])
            .with_frames((0..10).map(frame).collect())
            .with_skeleton(Some(zstd::bulk::compress(&[0u8; 10_000], 3).unwrap()))
    }

    /// A wire form is given up as soon as it passes its limit; one that passes what a prepare
    /// sends goes without its skeleton (the files still go), and an upload keeps no sent form
    /// larger than it would keep.
    #[test]
    fn a_skeleton_too_large_to_send_is_dropped_and_an_index_too_large_to_keep_is_not_made() {
        let index = sparse_index();
        let made = index.encode_wire();
        assert_eq!(index.encode_wire_within(made.len()), Some(made.clone()), "a limit of its very size");
        assert_eq!(index.encode_wire_within(made.len() - 1), None, "one byte less");

        let whole = SentIndex::within(index.clone(), made.len()).unwrap();
        assert!(whole.sparse);
        let bare = SentIndex::within(index.clone(), made.len() - 1).unwrap();
        assert!(!bare.sparse, "the skeleton dropped");
        assert_eq!(bare.wire, index.clone().with_skeleton(None).encode_wire());
        assert_eq!(bare.frames, whole.frames, "the frames still sent");
        let frames_only = index.clone().with_skeleton(None).encode_wire().len();
        assert!(matches!(SentIndex::within(index.clone(), frames_only - 1), Err(IndexError::TooLargeToSend)));

        // Long paths that compress to half: past a quarter of what is kept, not made.
        let noise = crate::archive::tests::noise(3, 9 << 20);
        let files: Vec<_> = noise
            .chunks(1500)
            .enumerate()
            .map(|(n, bytes)| super::super::IndexedFile {
                path: bytes.iter().map(|b| format!("{b:02x}")).collect(),
                executable: false,
                size: 0,
                offset: 512 * n as u64,
                sha256: Digest::of(b""),
            })
            .collect();
        let long = FileIndex::new(index.artifact, files);
        assert!(long.encode_wire().len() > KEPT_BYTES / 4);
        assert_eq!(SentIndex::to_keep(long.clone()), None);
        assert_eq!(SentIndex::to_keep(index.clone()), Some(whole));
    }

    #[test]
    fn the_least_recently_used_go_first_within_the_count_and_the_bytes() {
        let indexes = SentIndexes::default();
        let key = |n: usize| Digest::of(&n.to_le_bytes());
        for n in 0..KEPT {
            indexes.keep(key(n), sent(n, 1000));
        }
        assert_eq!(len(&indexes), KEPT);
        // Used now: 0 is kept when the next one comes, 1 (the oldest unused) goes.
        assert_eq!(indexes.get(key(0)).unwrap().files, 0);
        indexes.keep(key(KEPT), sent(KEPT, 1000));
        assert_eq!(len(&indexes), KEPT);
        assert!(indexes.get(key(0)).is_some());
        assert!(indexes.get(key(1)).is_none());
        assert!(indexes.get(key(2)).is_some());

        // Kept again under the same name: one entry, the newer.
        indexes.keep(key(2), sent(99, 1000));
        assert_eq!(len(&indexes), KEPT);
        assert_eq!(indexes.get(key(2)).unwrap().files, 99);

        // Bytes: four of nearly a quarter of the budget fill it; a fifth pushes out the oldest.
        let big = KEPT_BYTES / 4 - 1000;
        for n in 100..105 {
            indexes.keep(key(n), sent(n, big));
        }
        assert!(indexes.get(key(100)).is_none(), "the oldest big one made room");
        assert!((101..105).all(|n| indexes.get(key(n)).is_some()));
        let weight: usize = indexes.kept.lock().unwrap().iter().map(|(_, s)| s.weight()).sum();
        assert!(weight <= KEPT_BYTES, "{weight} bytes kept");

        // Larger than a quarter: never kept, and nothing dropped for it.
        let before = len(&indexes);
        indexes.keep(key(200), sent(200, KEPT_BYTES / 4 + 1));
        assert!(indexes.get(key(200)).is_none());
        assert_eq!(len(&indexes), before);
    }
}
