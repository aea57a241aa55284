//! Sparse prepares on real directories: a node asked which frames it lacks gets only those on
//! stdin and makes the same release a whole fetch makes; a frame that is not what the index
//! says, frames cut short, or a file to link gone since the question: refused, nothing left.

use std::os::unix::fs::MetadataExt;

use super::share::read_kept;
use super::*;
use crate::archive::{self, CheckOptions, FrameScanner};

/// A tree to package: relative path → content (`bin/*` executable).
type Tree = BTreeMap<String, Vec<u8>>;

/// Bytes that do not compress, the same for the same seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// 120 files of 9 KiB (about 9 frames), one executable, a symlink and an empty file.
fn first() -> Tree {
    let mut tree: Tree = (0..120u64).map(|i| (format!("vendor/p{}/f{i}.php", i % 7), noise(i, 9000))).collect();
    tree.insert("bin/run".into(), b"#!/bin/sh\necho run".to_vec());
    tree.insert("storage/.gitkeep".into(), Vec::new());
    tree
}

/// The artifact's bytes, digest and index as ingest makes it (frames, skeleton).
fn package(tree: &Tree) -> (Vec<u8>, Digest, FileIndex) {
    let src = tempfile::tempdir().unwrap();
    for (path, content) in tree {
        let full = src.path().join(path);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(&full, content).unwrap();
        let mode = if path.starts_with("bin/") { 0o755 } else { 0o644 };
        fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::symlink("bin/run", src.path().join("run")).unwrap();
    let (packed, bytes) = archive::pack_to_writer(src.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let listing = archive::index(&bytes[..], &options()).unwrap();
    let mut scanner = FrameScanner::new();
    scanner.feed(&bytes);
    let frames = scanner.finish(bytes.len() as u64, listing.summary.unpacked_bytes, packed.digest);
    let index = FileIndex::new(packed.digest, listing.files).with_frames(frames).with_skeleton(listing.skeleton);
    (bytes, packed.digest, index)
}

fn options() -> CheckOptions {
    CheckOptions { max_unpacked_bytes: 1 << 30, max_files: 100_000, shared: vec![], record_migrations: false }
}

fn request(base: &Path, digest: Digest, index: &FileIndex, frames: Option<Vec<usize>>) -> Prepare {
    Prepare {
        max_unpacked_bytes: 1 << 30,
        max_files: 100_000,
        index: Some(index.encode()),
        frames,
        ..super::tests::prepare_stdin(base, digest)
    }
}

/// The bytes of `frames` of an artifact, in order: what the server sends.
fn frames_of(bytes: &[u8], index: &FileIndex, frames: &[usize]) -> Vec<u8> {
    let frame = |n: &usize| &index.frames[*n];
    frames
        .iter()
        .flat_map(|n| &bytes[frame(n).offset as usize..(frame(n).offset + frame(n).length) as usize])
        .copied()
        .collect()
}

/// Every entry under `dir`: path → (kind, content or target, executable).
fn listing(dir: &Path) -> BTreeMap<String, (char, Vec<u8>, bool)> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(next) = stack.pop() {
        for entry in fs::read_dir(&next).unwrap().flatten() {
            let path = entry.path();
            let relative = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&path).unwrap();
            let item = if meta.is_dir() {
                stack.push(path.clone());
                ('d', Vec::new(), false)
            } else if meta.file_type().is_symlink() {
                ('l', fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes(), false)
            } else {
                ('f', fs::read(&path).unwrap(), meta.mode() & 0o111 != 0)
            };
            found.insert(relative, item);
        }
    }
    found
}

/// A base holding `first()` prepared (with its index): the release to link from.
fn base_with_first() -> (tempfile::TempDir, Digest) {
    let base = tempfile::tempdir().unwrap();
    let (bytes, digest, index) = package(&first());
    prepare(&request(base.path(), digest, &index, None), &mut &bytes[..]).unwrap();
    (base, digest)
}

fn lacking(base: &Path, digest: Digest, index: &FileIndex) -> Lacking {
    lacks(base, digest, Some(&index.encode()), &[]).unwrap()
}

#[test]
fn a_node_asked_what_it_lacks_makes_the_same_release_from_those_frames_alone() {
    let (base, _) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(999, 9000));
    second.insert("vendor/new.php".into(), b"<?php new".to_vec());
    let (bytes, digest, index) = package(&second);
    assert!(index.frames.len() >= 8, "{} frames", index.frames.len());

    let asked = lacking(base.path(), digest, &index);
    let frames = asked.frames.expect("some frames are not needed");
    assert_eq!(asked.of, index.frames.len());
    assert!(!frames.is_empty() && frames.len() <= 3, "the frames of two changed files: {frames:?}");
    let sent = frames_of(&bytes, &index, &frames);
    let answer = prepare(&request(base.path(), digest, &index, Some(frames.clone())), &mut &sent[..]).unwrap();
    assert!(
        answer.output.contains(&format!(
            "fetched {} of its {} frames, {} of {} bytes",
            frames.len(),
            index.frames.len(),
            sent.len(),
            bytes.len()
        )),
        "{}",
        answer.output
    );

    // The same tree a whole fetch makes, on another node.
    let other = tempfile::tempdir().unwrap();
    let whole = prepare(&request(other.path(), digest, &index, None), &mut &bytes[..]).unwrap();
    assert_eq!(listing(&answer.dir), listing(&whole.dir));
    // Unchanged files are the older release's inodes; the changed one is not.
    let older = base.path().join("releases").join(base_with_first().1.hex());
    assert_eq!(
        fs::metadata(answer.dir.join("vendor/p0/f0.php")).unwrap().ino(),
        fs::metadata(older.join("vendor/p0/f0.php")).unwrap().ino()
    );
    assert_eq!(fs::metadata(answer.dir.join("vendor/p3/f10.php")).unwrap().nlink(), 1);
    assert!(base.path().join(".release/ready").join(digest.hex()).exists());
    // It keeps the index's files only: the frame table and skeleton are the artifact's.
    let kept = read_kept(&base.path().join(".release/index").join(digest.hex()), digest).unwrap();
    assert_eq!((kept.files, kept.frames.len(), kept.skeleton), (index.files.clone(), 0, None));
    super::prepare::set_writable(base.path()).ok();
    super::prepare::set_writable(other.path()).ok();
}

#[test]
fn a_frame_not_as_the_index_says_or_cut_short_leaves_nothing() {
    let (base, _) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(998, 9000));
    let (bytes, digest, index) = package(&second);
    let frames = lacking(base.path(), digest, &index).frames.unwrap();
    let sent = frames_of(&bytes, &index, &frames);

    let mut flipped = sent.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    let err = prepare(&request(base.path(), digest, &index, Some(frames.clone())), &mut &flipped[..]).unwrap_err();
    assert_eq!(err.code, ErrorCode::DigestMismatch, "{}", err.message);
    assert!(
        err.message.contains(&format!("frame {} of the artifact is not what its index says", frames[0])),
        "{}",
        err.message
    );

    let err = prepare(&request(base.path(), digest, &index, Some(frames.clone())), &mut &sent[..sent.len() - 10][..])
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Fetch, "{}", err.message);
    assert!(err.message.contains("stdin ended"), "{}", err.message);

    // Frames sent without an index that lays them out.
    let mut bare = request(base.path(), digest, &index, Some(frames.clone()));
    bare.index = Some(index.clone().with_skeleton(None).encode());
    let err = prepare(&bare, &mut &sent[..]).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest, "{}", err.message);

    // Nothing of it was left: no directory, no marker, no temporary tree.
    let releases: Vec<_> =
        fs::read_dir(base.path().join("releases")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert!(!base.path().join(".release/ready").join(digest.hex()).exists());
    super::prepare::set_writable(base.path()).ok();
}

#[test]
fn a_file_to_link_gone_since_the_question_fails_the_prepare_naming_it() {
    let (base, first_digest) = base_with_first();
    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(997, 9000));
    let (bytes, digest, index) = package(&second);
    let frames = lacking(base.path(), digest, &index).frames.unwrap();
    // The older release's copy of a file in a frame not sent changes (its index kept).
    let older = base.path().join("releases").join(first_digest.hex());
    let victim = index
        .files
        .iter()
        .find(|f| f.size > 0 && index.frames_of(f).all(|n| !frames.contains(&n)))
        .expect("a file in a frame not sent");
    let parent = older.join(&victim.path).parent().unwrap().to_owned();
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();
    fs::remove_file(older.join(&victim.path)).unwrap();
    let sent = frames_of(&bytes, &index, &frames);
    let err = prepare(&request(base.path(), digest, &index, Some(frames)), &mut &sent[..]).unwrap_err();
    assert!(err.message.contains(&victim.path) && err.message.contains("deploy again"), "{}", err.message);
    assert!(!base.path().join("releases").join(digest.hex()).exists());
    // Asked again, the node now lacks that file's frame too, and the prepare goes through.
    let frames = lacking(base.path(), digest, &index).frames.unwrap();
    assert!(index.frames_of(victim).all(|n| frames.contains(&n)));
    let sent = frames_of(&bytes, &index, &frames);
    prepare(&request(base.path(), digest, &index, Some(frames)), &mut &sent[..]).unwrap();
    super::prepare::set_writable(base.path()).ok();
}

#[test]
fn a_node_without_releases_or_an_index_without_skeleton_lacks_everything() {
    let (_, digest, index) = package(&first());
    let empty = tempfile::tempdir().unwrap();
    let asked = lacking(empty.path(), digest, &index);
    assert_eq!(asked.frames, None, "nothing to link: the whole artifact");
    let (base, _) = base_with_first();
    let without = index.clone().with_skeleton(None);
    assert_eq!(lacks(base.path(), digest, Some(&without.encode()), &[]).unwrap().frames, None);
    // Another artifact holding the same files (a rebuild): nothing lacking at all.
    let mut rebuilt = first();
    rebuilt.insert("vendor/p0/f0.php".into(), rebuilt["vendor/p1/f1.php"].clone());
    let (_, digest, index) = package(&rebuilt);
    assert_eq!(lacking(base.path(), digest, &index).frames, Some(vec![]), "every file is held");
    super::prepare::set_writable(base.path()).ok();
}

/// Frames cut anywhere (another tool's layout): inside tar headers, long-name records and file
/// data. A frame made from the skeleton is the real one with zeros for data, wherever it is cut,
/// so the sparse release is still exactly the artifact's.
#[test]
fn frames_cut_inside_headers_and_data_still_make_the_same_release() {
    /// Re-frames `bytes` (a `release package` artifact) into frames of `every` tar bytes.
    fn reframed(tree: &Tree, every: usize) -> (Vec<u8>, Digest, FileIndex) {
        let (bytes, _, _) = package(tree);
        let tar = zstd::decode_all(&bytes[..]).unwrap();
        let bytes: Vec<u8> = tar.chunks(every).flat_map(|chunk| zstd::bulk::compress(chunk, 3).unwrap()).collect();
        let digest = Digest::of(&bytes);
        let listing = archive::index(&bytes[..], &options()).unwrap();
        let mut scanner = FrameScanner::new();
        scanner.feed(&bytes);
        let frames = scanner.finish(bytes.len() as u64, listing.summary.unpacked_bytes, digest);
        assert!(frames.len() >= 10, "{} frames", frames.len());
        (bytes, digest, FileIndex::new(digest, listing.files).with_frames(frames).with_skeleton(listing.skeleton))
    }
    let mut one = first();
    let long = format!("deep/{}/{}.php", "d".repeat(150), "n".repeat(120));
    one.insert(long.clone(), noise(5, 700));
    for every in [7_777usize, 512 * 3 + 100, 100_003] {
        let base = tempfile::tempdir().unwrap();
        let (bytes, digest, index) = reframed(&one, every);
        prepare(&request(base.path(), digest, &index, None), &mut &bytes[..]).unwrap();
        let mut two = one.clone();
        two.insert("vendor/p3/f10.php".into(), noise(996, 9000));
        two.insert(long.clone(), noise(6, 700));
        let (bytes, digest, index) = reframed(&two, every);
        let frames = lacking(base.path(), digest, &index).frames.expect("some frames not needed");
        assert!(frames.len() < index.frames.len() / 2, "{} of {}", frames.len(), index.frames.len());
        let sent = frames_of(&bytes, &index, &frames);
        let sparse = prepare(&request(base.path(), digest, &index, Some(frames)), &mut &sent[..]).unwrap();
        let other = tempfile::tempdir().unwrap();
        let whole = prepare(&request(other.path(), digest, &index, None), &mut &bytes[..]).unwrap();
        assert_eq!(listing(&sparse.dir), listing(&whole.dir), "frames of {every} tar bytes");
        super::prepare::set_writable(base.path()).ok();
        super::prepare::set_writable(other.path()).ok();
    }
}

/// What a node refuses to be asked or sent, each naming what was wrong, leaving nothing: a
/// Lacks question without an index or with another artifact's, a frame number the index does
/// not have, a frame too large to fetch alone (a plain `zstd` stream is one frame).
#[test]
fn a_question_or_frames_a_node_cannot_take_are_refused_naming_why() {
    let (base, first_digest) = base_with_first();
    let err = lacks(base.path(), first_digest, None, &[]).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest, "{}", err.message);
    assert!(err.message.contains("without an index"), "{}", err.message);
    let (_, digest, index) = package(&first());
    let other = Digest::of(b"another artifact");
    let err = lacks(base.path(), other, Some(&index.encode()), &[]).unwrap_err();
    assert_eq!(err.code, ErrorCode::IndexMismatch, "{}", err.message);
    assert!(err.message.contains(&format!("describes {digest}, not {other}")), "{}", err.message);

    let mut second = first();
    second.insert("vendor/p3/f10.php".into(), noise(995, 9000));
    let (bytes, digest, index) = package(&second);
    let beyond = index.frames.len();
    let err = prepare(&request(base.path(), digest, &index, Some(vec![beyond])), &mut &bytes[..]).unwrap_err();
    assert_eq!(err.code, ErrorCode::Fetch, "{}", err.message);
    assert!(err.message.contains(&format!("no frame {beyond} in the index")), "{}", err.message);

    // One frame of 9 MiB of tar stream: never fetched alone.
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("big.bin"), noise(7, 9 << 20)).unwrap();
    let (_, packed) = archive::pack_to_writer(src.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let bytes = zstd::stream::encode_all(&zstd::decode_all(&packed[..]).unwrap()[..], 3).unwrap();
    let digest = Digest::of(&bytes);
    let listing = archive::index(&bytes[..], &options()).unwrap();
    let mut scanner = FrameScanner::new();
    scanner.feed(&bytes);
    let frames = scanner.finish(bytes.len() as u64, listing.summary.unpacked_bytes, digest);
    assert_eq!(frames.len(), 1, "a plain zstd stream is one frame");
    let index = FileIndex::new(digest, listing.files).with_frames(frames).with_skeleton(listing.skeleton);
    let err = prepare(&request(base.path(), digest, &index, Some(vec![0])), &mut &bytes[..]).unwrap_err();
    assert!(err.message.contains("frame 0 is too large to fetch alone"), "{}", err.message);
    for digest in [digest, other] {
        assert!(!base.path().join("releases").join(digest.hex()).exists());
    }
    super::prepare::set_writable(base.path()).ok();
}
