//! Frames: where `release package` cuts them, that they read alone and together, that the
//! bytes do not depend on the threads, and that ingest's scan finds them (or takes the whole
//! artifact as one frame) whatever the bytes.

use std::fs;
use std::io::Read;
use std::path::Path;

use super::*;
use crate::digest::Digest;

fn options() -> CheckOptions {
    CheckOptions { max_unpacked_bytes: 1 << 32, max_files: 100_000, shared: vec![], record_migrations: false }
}

/// Text that compresses like source code, the same for the same seed.
fn text(seed: u64, len: usize) -> Vec<u8> {
    let words = ["function", "return", "$this->", "array(", "=>", "public", "static", "null", "new", "class"];
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(words[(state % words.len() as u64) as usize].as_bytes());
        out.push(if state % 11 == 0 { b'\n' } else { b' ' });
        out.extend_from_slice(format!("{}", state % 1000).as_bytes());
    }
    out.truncate(len);
    out
}

/// 400 small files (~3 MiB of tar stream) and, when `large`, one file of 3.5 MiB among them.
fn tree(root: &Path, large: bool) {
    for i in 0..400u64 {
        let path = root.join(format!("vendor/pkg{}/src/C{i}.php", i % 17));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text(i, 2000 + (i as usize * 37) % 12_000)).unwrap();
    }
    if large {
        fs::create_dir_all(root.join("public")).unwrap();
        fs::write(root.join("public/app.js"), text(7, 3 * (1 << 20) + (1 << 19))).unwrap();
    }
}

fn scan(bytes: &[u8], piece: usize) -> Vec<Frame> {
    let mut scanner = FrameScanner::new();
    bytes.chunks(piece).for_each(|chunk| scanner.feed(chunk));
    let raw = zstd::decode_all(bytes).unwrap().len() as u64;
    scanner.finish(bytes.len() as u64, raw, Digest::of(bytes))
}

/// Where each tar header starts (long-name headers included).
fn header_offsets(tar: &[u8]) -> Vec<u64> {
    let mut archive = tar::Archive::new(tar);
    archive.entries().unwrap().raw(true).map(|e| e.unwrap().raw_header_position()).collect()
}

/// Every frame decompresses alone to its part of the tar stream, hashes to its sha256, and
/// the frames cover the artifact end to end.
fn assert_frames_describe(bytes: &[u8], frames: &[Frame]) {
    let tar = zstd::decode_all(bytes).unwrap();
    let (mut offset, mut raw) = (0, 0);
    for frame in frames {
        assert_eq!((frame.offset, frame.raw_offset), (offset, raw), "{frame:?}");
        let compressed = &bytes[frame.offset as usize..(frame.offset + frame.length) as usize];
        assert_eq!(Digest::of(compressed), frame.sha256, "{frame:?}");
        let alone = zstd::decode_all(compressed).unwrap();
        assert_eq!(alone, &tar[raw as usize..(raw + frame.raw_length) as usize], "{frame:?}");
        (offset, raw) = (offset + frame.length, raw + frame.raw_length);
    }
    assert_eq!((offset, raw), (bytes.len() as u64, tar.len() as u64));
}

#[test]
fn frames_end_at_the_first_entry_boundary_past_the_target() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), false);
    let (packed, bytes) = pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let frames = scan(&bytes, 64 << 10);
    assert_frames_describe(&bytes, &frames);
    assert_eq!(frames.len() as u64, packed.frames);
    assert!(frames.len() >= 3, "{} frames", frames.len());

    let tar = zstd::decode_all(&bytes[..]).unwrap();
    let headers = header_offsets(&tar);
    let largest_file = 14_000 + 1024;
    for (n, frame) in frames.iter().enumerate() {
        assert!(headers.contains(&frame.raw_offset), "frame {n} starts at a tar header");
        if n + 1 < frames.len() {
            assert!(frame.raw_length >= FRAME_TARGET, "frame {n} holds at least the target: {frame:?}");
            assert!(frame.raw_length < FRAME_TARGET + largest_file, "frame {n} ends at the next boundary: {frame:?}");
        }
    }
    check(&bytes[..], &options()).unwrap();
}

#[test]
fn a_large_file_is_cut_at_each_multiple_of_the_target_inside_its_data() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), true);
    let (_, bytes) = pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let frames = scan(&bytes, 1 << 20);
    assert_frames_describe(&bytes, &frames);
    let files = index(&bytes[..], &options()).unwrap().files.unwrap();
    let large = files.iter().find(|f| f.path == "public/app.js").unwrap();
    let starts: Vec<u64> = frames.iter().map(|f| f.raw_offset).collect();
    for k in 1..=3 {
        assert!(starts.contains(&(large.offset + k * FRAME_TARGET)), "a frame starts {k} targets into its data");
    }
    // No frame is much larger than the target: the large file's data did not make one.
    assert!(frames.iter().all(|f| f.raw_length < 2 * FRAME_TARGET + 1024), "{frames:?}");

    // The index names its frames: one per target's worth of data, the first holding its
    // header too.
    let index = FileIndex::new(Digest::of(&bytes), files.clone()).with_frames(frames.clone());
    let held = index.frames_of(large);
    assert_eq!(held.len() as u64, large.size.div_ceil(FRAME_TARGET), "{held:?}");
    assert!(frames[held.start].raw_offset <= large.offset - 512);
    for file in &files {
        let held = index.frames_of(file);
        let (first, last) = (&frames[held.start], &frames[held.end - 1]);
        assert!(first.raw_offset <= file.offset && file.offset + file.size <= last.raw_offset + last.raw_length);
        if file.size <= FRAME_TARGET {
            assert_eq!(held.len(), 1, "a file up to the target lies in one frame: {}", file.path);
        }
    }
}

#[test]
fn the_bytes_do_not_depend_on_the_number_of_threads() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), true);
    let with = |workers| pack_with_workers(dir.path(), &[], Vec::new(), &mut |_| {}, workers).unwrap();
    let (one, one_bytes) = with(1);
    assert!(one.frames >= 6, "{} frames", one.frames);
    for workers in [2, 3, 8] {
        let (packed, bytes) = with(workers);
        assert_eq!(packed, one, "{workers} threads");
        assert!(bytes == one_bytes, "{workers} threads: other bytes");
    }
}

#[test]
fn tar_and_zstd_read_the_framed_archive_as_one_stream() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), true);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("a.tar.zst");
    let packed = pack_to_file(dir.path(), &[], &archive, &mut |_| {}).unwrap();
    assert!(packed.frames > 1);
    let out = work.path().join("out");
    fs::create_dir(&out).unwrap();
    let status = std::process::Command::new("tar")
        .arg("--zstd")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&out)
        .status()
        .expect("tar runs");
    assert!(status.success());
    for name in ["public/app.js", "vendor/pkg3/src/C3.php"] {
        assert_eq!(fs::read(out.join(name)).unwrap(), fs::read(dir.path().join(name)).unwrap(), "{name}");
    }
}

#[test]
fn a_plain_zstd_stream_is_one_frame() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), false);
    let tar = zstd::decode_all(&pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap().1[..]).unwrap();
    // As `tar --zstd` writes it: streamed in pieces, so without its content size; single- and
    // multi-threaded.
    let streamed = |threads: u32, tar: &[u8]| {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        encoder.multithread(threads).unwrap();
        tar.chunks(10_240).for_each(|piece| std::io::Write::write_all(&mut encoder, piece).unwrap());
        encoder.finish().unwrap()
    };
    // Two frames, the second without its content size: not laid out, so one.
    let mut mixed = zstd::bulk::compress(&tar[..1024], 3).unwrap();
    mixed.extend(streamed(0, &tar[1024..]));
    for bytes in [streamed(0, &tar), streamed(2, &tar), mixed] {
        check(&bytes[..], &options()).unwrap();
        let mut scanner = FrameScanner::new();
        scanner.feed(&bytes);
        assert_eq!(scanner.given_up(), Some("a frame without its content size"));
        let frames = scan(&bytes, 4096);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_frames_describe(&bytes, &frames);
        assert_eq!(frames[0].sha256, Digest::of(&bytes), "the one frame is the artifact");
    }
    // One frame with its content size (`zstd FILE`) is one frame all the same, laid out.
    let sized = zstd::bulk::compress(&tar, 3).unwrap();
    let frames = scan(&sized, 100);
    assert_eq!(frames.len(), 1);
    assert_frames_describe(&sized, &frames);
}

fn sample() -> std::path::PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    fs::write(dir.join("a.txt"), "hello").unwrap();
    fs::create_dir(dir.join("d")).unwrap();
    fs::write(dir.join("d/b.txt"), text(1, 5000)).unwrap();
    dir
}

#[test]
fn skippable_frames_belong_to_the_frame_before_them() {
    let tar = zstd::decode_all(&pack_to_writer(&sample(), &[], Vec::new(), &mut |_| {}).unwrap().1[..]).unwrap();
    let skippable = |n: u8, len: u32| {
        let mut frame = vec![0x50 + n, 0x2a, 0x4d, 0x18];
        frame.extend(len.to_le_bytes());
        frame.extend(vec![n; len as usize]);
        frame
    };
    let mut bytes = zstd::bulk::compress(&tar[..2048], 3).unwrap();
    let first = bytes.len() as u64;
    bytes.extend(skippable(3, 100));
    bytes.extend(skippable(15, 0));
    let second = bytes.len() as u64;
    bytes.extend(zstd::bulk::compress(&tar[2048..], 3).unwrap());
    bytes.extend(skippable(0, 7));
    check(&bytes[..], &options()).unwrap();
    for piece in [1, 5, 4096] {
        let frames = scan(&bytes, piece);
        assert_eq!(frames.len(), 2, "{piece}: {frames:?}");
        assert_eq!((frames[0].length, frames[1].offset), (second, second), "{first}");
        assert_frames_describe(&bytes, &frames);
    }
}

#[test]
fn the_scan_is_the_same_however_the_bytes_arrive() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), true);
    let (_, bytes) = pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let whole = scan(&bytes, bytes.len());
    assert!(whole.len() > 1);
    for piece in [1, 3, 7, 4096, 1 << 20] {
        assert_eq!(scan(&bytes[..], piece), whole, "pieces of {piece}");
    }
}

#[test]
fn more_frames_than_the_table_holds_make_one_frame() {
    // A valid archive, then zero padding (which the check accepts after the end marker) in
    // tiny frames, one more than the table holds: a few bytes each.
    let tar = zstd::decode_all(&pack_to_writer(&sample(), &[], Vec::new(), &mut |_| {}).unwrap().1[..]).unwrap();
    let mut bytes = zstd::bulk::compress(&tar, 3).unwrap();
    let zeros = zstd::bulk::compress(&[0u8; 512], 3).unwrap();
    let padding = MAX_FRAMES;
    bytes.reserve(zeros.len() * padding);
    for _ in 0..padding {
        bytes.extend_from_slice(&zeros);
    }
    let raw = (tar.len() + 512 * padding) as u64;
    assert_eq!(check(&bytes[..], &options()).unwrap().unpacked_bytes, raw, "the check accepts it");
    // More still: the scan gives up as it reads, and stops hashing.
    let mut more = FrameScanner::new();
    more.feed(&bytes);
    more.feed(&zeros);
    more.feed(&zeros);
    assert_eq!(more.given_up(), Some("more frames than the table holds"));
    let frames = scan(&bytes, 1 << 20);
    assert_eq!(frames.len(), 1, "the whole artifact, not {} frames", MAX_FRAMES + 1);
    assert_frames_describe(&bytes, &frames);

    // One frame fewer: every frame is listed.
    let fewer = &bytes[..bytes.len() - zeros.len()];
    let mut scanner = FrameScanner::new();
    scanner.feed(fewer);
    assert_eq!(scanner.finish(fewer.len() as u64, raw - 512, Digest::of(fewer)).len(), MAX_FRAMES);
}

#[test]
fn garbage_still_gets_the_checks_refusals_and_one_frame() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), false);
    let (_, bytes) = pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let one_frame = |bytes: &[u8], raw: u64| {
        let mut scanner = FrameScanner::new();
        scanner.feed(bytes);
        let frames = scanner.finish(bytes.len() as u64, raw, Digest::of(bytes));
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].length, bytes.len() as u64);
    };
    // Not zstd at all.
    assert_eq!(check(&b"PK\x03\x04 a zip"[..], &options()), Err(ArchiveError::NotZstd));
    one_frame(b"PK\x03\x04 a zip", 0);
    // Cut inside a frame.
    let cut = &bytes[..bytes.len() / 2];
    assert!(matches!(check(cut, &options()), Err(ArchiveError::Truncated(_) | ArchiveError::Zstd(_))));
    one_frame(cut, 0);
    // Bytes after the last frame that are no frame.
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"trailing garbage");
    assert!(check(&trailing[..], &options()).is_err());
    one_frame(&trailing, 0);
    // Content sizes that lie: the scan lists them, the sum disagrees with the stream, so one.
    one_frame(&bytes, zstd::decode_all(&bytes[..]).unwrap().len() as u64 + 1);
    // A reserved bit in the second frame's header.
    let frames = scan(&bytes, bytes.len());
    let mut reserved = bytes.clone();
    reserved[frames[1].offset as usize + 4] |= 0x08;
    assert!(check(&reserved[..], &options()).is_err());
    one_frame(&reserved, 0);
    // Random bytes behind a zstd magic number: never a panic.
    let mut state = 1u64;
    for _ in 0..2000 {
        let mut junk = ZSTD_MAGIC.to_vec();
        for _ in 0..(state % 64) {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            junk.push((state >> 33) as u8);
        }
        let mut scanner = FrameScanner::new();
        scanner.feed(&junk);
        let _ = scanner.finish(junk.len() as u64, 0, Digest::of(&junk));
    }
}

pub(super) type Break = fn(&mut FileIndex);

/// Ways to break an index's frame table (of two frames or more, and a file), each named.
pub(super) fn broken_frame_tables() -> [(&'static str, Break); 3] {
    [
        ("a gap", |i| i.frames[1].offset += 1),
        ("an empty frame", |i| i.frames[0].length = 0),
        ("a file past the end", |i| i.files[0].offset = i.frames.iter().map(|f| f.raw_length).sum()),
    ]
}

#[test]
fn the_index_keeps_its_frame_table_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    tree(dir.path(), true);
    let (packed, bytes) = pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let files = index(&bytes[..], &options()).unwrap().files.unwrap();
    let frames = scan(&bytes, 1 << 16);
    let stored = FileIndex::new(packed.digest, files).with_frames(frames);
    assert_eq!(FileIndex::decode(&stored.encode(), packed.digest).unwrap(), stored);
    let mut json = Vec::new();
    zstd::stream::read::Decoder::new(&stored.encode()[..]).unwrap().read_to_end(&mut json).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json["version"], INDEX_VERSION);
    let frame = &json["frames"][1];
    for field in ["offset", "length", "raw_offset", "raw_length", "sha256"] {
        assert!(frame.get(field).is_some(), "{field} in {frame}");
    }

    for (what, breaking) in broken_frame_tables() {
        let mut index = stored.clone();
        breaking(&mut index);
        let refusal = FileIndex::decode(&index.encode(), packed.digest).unwrap_err().to_string();
        assert!(refusal.starts_with("the stored index's frame table does not hold together"), "{what}: {refusal}");
    }
}
