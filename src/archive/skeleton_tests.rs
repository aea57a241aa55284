//! The skeleton: what ingest keeps of the tar stream, and that a frame made from it is the
//! frame's real tar stream with every file's data zeroed (long names, links and a file cut
//! over several frames included), and a skeleton that does not fit its index is refused.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::digest::Digest;

fn options() -> CheckOptions {
    CheckOptions { max_unpacked_bytes: 1 << 32, max_files: 100_000, shared: vec![], record_migrations: false }
}

/// A tree of every kind of entry: small files, one over several frames, empty ones, a long
/// path (a PAX or GNU long-name header), a symlink, an executable.
fn packed() -> (Vec<u8>, FileIndex) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..300u64 {
        let path = root.join(format!("vendor/pkg{}/src/C{i}.php", i % 13));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body: Vec<u8> =
            (0..(500 + i * 53 % 9000)).map(|n| b"abcdefgh <?php\n"[((n * 7 + i) % 15) as usize]).collect();
        fs::write(path, body).unwrap();
    }
    fs::create_dir_all(root.join("public")).unwrap();
    fs::write(root.join("public/app.js"), vec![b'x'; 3 * FRAME_TARGET as usize + 777]).unwrap();
    fs::write(root.join("public/empty"), b"").unwrap();
    let long = format!("deep/{}/{}.txt", "d".repeat(120), "n".repeat(90));
    fs::create_dir_all(root.join(&long).parent().unwrap()).unwrap();
    fs::write(root.join(&long), b"long").unwrap();
    std::os::unix::fs::symlink("public/app.js", root.join("entry")).unwrap();
    fs::write(root.join("artisan"), b"#!/usr/bin/env php").unwrap();
    fs::set_permissions(root.join("artisan"), fs::Permissions::from_mode(0o755)).unwrap();
    let (_, bytes) = pack_to_writer(root, &[], Vec::new(), &mut |_| {}).unwrap();
    let listing = index(&bytes[..], &options()).unwrap();
    let mut scanner = FrameScanner::new();
    scanner.feed(&bytes);
    let digest = Digest::of(&bytes);
    let frames = scanner.finish(bytes.len() as u64, listing.summary.unpacked_bytes, digest);
    let index = FileIndex::new(digest, listing.files.unwrap()).with_frames(frames).with_skeleton(listing.skeleton);
    (bytes, index)
}

/// The tar stream with every indexed file's data zeroed.
fn zeroed(bytes: &[u8], index: &FileIndex) -> Vec<u8> {
    let mut tar = zstd::decode_all(bytes).unwrap();
    for file in &index.files {
        tar[file.offset as usize..(file.offset + file.size) as usize].fill(0);
    }
    tar
}

#[test]
fn each_frame_made_from_the_skeleton_is_the_tar_stream_less_the_files_data() {
    let (bytes, index) = packed();
    assert!(index.frames.len() > 5, "{} frames", index.frames.len());
    let index = FileIndex::decode(&index.encode(), index.artifact).unwrap();
    let skeleton = Skeleton::of(&index).unwrap().expect("ingest keeps a skeleton");
    let tar = zeroed(&bytes, &index);
    let mut made = Vec::new();
    for (n, frame) in index.frames.iter().enumerate() {
        skeleton.frame(frame, &mut made);
        let want = &tar[frame.raw_offset as usize..(frame.raw_offset + frame.raw_length) as usize];
        assert!(made == want, "frame {n} ({frame:?}) differs from the real one");
    }
    // Read in pieces of any size from anywhere, it is the same stream.
    for piece in [1usize, 7, 512, 4093, 1 << 20] {
        let mut read = Vec::new();
        let end = tar.len() as u64;
        let (mut pos, mut next) = (0u64, skeleton.file_at(0));
        let mut buf = vec![0xAAu8; piece];
        while pos < end {
            let n = skeleton.read_at(pos, end, &mut next, &mut buf);
            assert!(n > 0 && n <= piece);
            read.extend_from_slice(&buf[..n]);
            pos += n as u64;
        }
        assert!(read == tar, "read in pieces of {piece}");
    }
    // Made end to end, the stream walks like the artifact: same entries, same summary.
    let whole: Vec<u8> = index
        .frames
        .iter()
        .flat_map(|f| {
            skeleton.frame(f, &mut made);
            made.clone()
        })
        .collect();
    assert_eq!(
        walk_tar(&whole[..], &options(), &mut Listed(Vec::new())).unwrap(),
        check(&bytes[..], &options()).unwrap()
    );
    // Headers, not data: what the files hold is not in it.
    let raw = zstd::decode_all(&index.skeleton.clone().unwrap()[..]).unwrap();
    let data: u64 = index.files.iter().map(|f| f.size).sum();
    assert_eq!(raw.len() as u64 + data, tar.len() as u64);
}

struct Listed(Vec<String>);

impl Visitor for Listed {
    fn entry(&mut self, entry: Entry<'_>, _: &mut dyn std::io::Read) -> std::io::Result<()> {
        self.0.push(format!("{entry:?}"));
        Ok(())
    }
}

/// `Skeleton::of` and its check in bounded memory, `Skeleton::check`, refuse alike.
#[test]
fn a_skeleton_that_does_not_fit_its_index_is_refused() {
    let (_, index) = packed();
    let refusals = |index: &FileIndex| {
        let made = Skeleton::of(index).err().expect("refused").to_string();
        let checked = Skeleton::check(index).expect_err("refused by the check too").to_string();
        (made, checked)
    };
    assert!(Skeleton::check(&index).is_ok());
    // Bytes missing (or added): it cannot be the stream but its files' data.
    let raw = zstd::decode_all(&index.skeleton.clone().unwrap()[..]).unwrap();
    for changed in [raw[..raw.len() - 512].to_vec(), [raw.clone(), vec![0; 512]].concat()] {
        let broken = index.clone().with_skeleton(Some(zstd::encode_all(&changed[..], 3).unwrap()));
        for shown in <[String; 2]>::from(refusals(&broken)) {
            assert!(
                shown.contains("the skeleton holds") || shown.contains("the skeleton does not decompress"),
                "{shown}"
            );
        }
    }
    // Not zstd at all.
    let broken = index.clone().with_skeleton(Some(b"not zstd".to_vec()));
    for shown in <[String; 2]>::from(refusals(&broken)) {
        assert!(shown.contains("the skeleton does not decompress"), "{shown}");
    }
    // Two files overlapping.
    let mut overlapping = index.clone();
    overlapping.files[3].offset = overlapping.files[2].offset + 1;
    for shown in <[String; 2]>::from(refusals(&overlapping)) {
        assert!(shown.contains("overlaps"), "{shown}");
    }
    // No skeleton (an index made before format 3, or none could be made): no sparse fetch.
    assert!(Skeleton::of(&index.clone().with_skeleton(None)).unwrap().is_none());
    assert!(Skeleton::check(&index.clone().with_skeleton(None)).is_ok());
}

#[test]
fn a_skeleton_larger_than_a_node_reads_is_not_kept_and_the_artifact_is_fetched_whole() {
    let (bytes, index) = packed();
    let raw = zstd::decode_all(&index.skeleton.clone().unwrap()[..]).unwrap().len() as u64;
    let keeping = |limit| {
        let builder = super::skeleton::SkeletonBuilder::shared_with_limit(limit);
        super::check::index_keeping(&bytes[..], &options(), builder, MAX_INDEX_BYTES).unwrap()
    };
    assert!(keeping(raw).skeleton.is_some(), "{raw} bytes: at the limit");
    let over = keeping(raw - 1);
    assert_eq!(over.skeleton, None, "one byte over: none (the check and the files are as before)");
    assert_eq!(over.files, Some(index.files));
}

/// An index larger than a reader takes is not made: the listing stops at its budget (the
/// skeleton goes with it: it is of use only beside the files), and the check is as before.
/// The budget is estimated from below: past it, the index's JSON would be too. The skeleton's
/// base64 shares the budget: what the listing leaves, or none is kept.
#[test]
fn files_past_the_index_budget_are_not_listed_and_the_artifact_gets_no_index() {
    let (bytes, index) = packed();
    let needed: u64 = index.files.iter().map(|f| super::listing::LISTED_FILE_BYTES + f.path.len() as u64).sum();
    let skeleton = index.skeleton.as_ref().unwrap().len() as u64;
    let listing = |budget| {
        super::check::index_keeping(&bytes[..], &options(), super::skeleton::SkeletonBuilder::shared(), budget).unwrap()
    };
    let whole = listing(needed + skeleton.div_ceil(3) * 4);
    assert_eq!(whole.files.as_ref(), Some(&index.files), "room for both: every file listed");
    assert_eq!(whole.skeleton, index.skeleton, "and the skeleton kept");
    let at = listing(needed + skeleton.div_ceil(3) * 4 - 8);
    assert_eq!((at.files.as_ref(), &at.skeleton), (Some(&index.files), &None), "less room: files only");
    assert_eq!(listing(needed).files.as_ref(), Some(&index.files), "at the budget: every file listed");
    let over = listing(needed - 1);
    assert_eq!((over.files, over.skeleton), (None, None), "one byte over: no index");
    assert_eq!(over.summary, at.summary, "checked all the same");
    for file in &index.files {
        let json = serde_json::to_vec(file).unwrap().len() as u64;
        assert!(
            super::listing::LISTED_FILE_BYTES + file.path.len() as u64 <= json,
            "{json} bytes of JSON for {}",
            file.path
        );
    }
}

/// What zstd cannot shrink (global PAX headers of random bytes, which the walk passes over)
/// is dropped as soon as it passes the skeleton's room, not held to the end of the upload.
#[test]
fn a_skeleton_past_its_room_is_dropped_as_it_is_fed() {
    let data = super::tests::noise(1, 4 << 20);
    let builder = super::skeleton::SkeletonBuilder::shared();
    builder.borrow_mut().set_room(256 << 10);
    let mut fed = 0;
    while builder.borrow().keeping() && fed < data.len() {
        builder.borrow_mut().feed(&data[fed..fed + (64 << 10)]);
        fed += 64 << 10;
    }
    assert!(fed <= 1 << 20, "dropped only after {fed} bytes, with room for 256 KiB");
    assert_eq!(builder.borrow_mut().finish(), None);

    let builder = super::skeleton::SkeletonBuilder::shared();
    builder.borrow_mut().feed(&data[..1 << 20]);
    builder.borrow_mut().set_room(1 << 20);
    assert!(builder.borrow().keeping(), "1 MiB fed, room for 1 MiB compressed");
    builder.borrow_mut().set_room(512 << 10);
    assert!(!builder.borrow().keeping(), "the room narrowed below what is kept: dropped at once");
}
