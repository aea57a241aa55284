//! The index's sent form (`encode_wire`/`decode_wire`): it reads back as the same index, with
//! or without frames and skeleton, and a node refuses what `decode` refuses and any form cut
//! short, with bytes after its end or not its own, naming what is wrong, never panicking.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::frames_tests::broken_frame_tables;
use super::*;
use crate::digest::Digest;

fn options() -> CheckOptions {
    CheckOptions { max_unpacked_bytes: 1 << 32, max_files: 100_000, shared: vec![], record_migrations: false }
}

/// A real index as ingest makes it: 120 files, one over several frames, an executable, a
/// long path; frames and skeleton.
fn ingested() -> FileIndex {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..120u64 {
        let path = root.join(format!("vendor/pkg{}/src/Ünï{i}.php", i % 7));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body: Vec<u8> = (0..(300 + i * 97 % 7000)).map(|n| (n.wrapping_mul(2654435761) >> (i % 9)) as u8).collect();
        fs::write(path, body).unwrap();
    }
    fs::create_dir_all(root.join("public")).unwrap();
    fs::write(root.join("public/app.js"), vec![b'x'; 2 * FRAME_TARGET as usize + 99]).unwrap();
    fs::write(root.join(format!("{}.txt", "n".repeat(150))), b"long").unwrap();
    fs::write(root.join("artisan"), b"#!/usr/bin/env php").unwrap();
    fs::set_permissions(root.join("artisan"), fs::Permissions::from_mode(0o755)).unwrap();
    let (packed, bytes) = pack_to_writer(root, &[], Vec::new(), &mut |_| {}).unwrap();
    let listing = index(&bytes[..], &options()).unwrap();
    let mut scanner = FrameScanner::new();
    scanner.feed(&bytes);
    let frames = scanner.finish(bytes.len() as u64, listing.summary.unpacked_bytes, packed.digest);
    let index =
        FileIndex::new(packed.digest, listing.files.unwrap()).with_frames(frames).with_skeleton(listing.skeleton);
    assert!(index.frames.len() > 2 && index.skeleton.is_some() && index.files.iter().any(|f| f.executable));
    index
}

/// A small index of files only.
fn small(artifact: Digest) -> FileIndex {
    let file = |i: u64| IndexedFile {
        path: format!("app/ä{i}.php"),
        executable: i == 1,
        size: i * 10,
        offset: 512 + i * 1024,
        sha256: Digest::of(&i.to_le_bytes()),
    };
    FileIndex::new(artifact, (0..3).map(file).collect())
}

/// The sent form decompressed, and compressed again.
fn raw(index: &FileIndex) -> Vec<u8> {
    zstd::decode_all(&index.encode_wire()[..]).unwrap()
}

fn sent(raw: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(raw, 1).unwrap()
}

#[test]
fn the_sent_form_reads_back_as_the_same_index_with_frames_and_skeleton_or_without() {
    let index = ingested();
    let wire = index.encode_wire();
    assert_eq!(wire, index.clone().encode_wire(), "the same index, the same bytes");
    assert_eq!(FileIndex::decode_wire(&wire, index.artifact).unwrap(), index);
    assert!(wire.len() < index.encode().len(), "{} bytes sent, {} stored", wire.len(), index.encode().len());
    // The stored form is what every build before made of it: the same name in the store.
    let json = serde_json::to_vec(&index).unwrap();
    assert_eq!(index.encode(), zstd::bulk::compress(&json, 3).unwrap());
    // Its frame says how large it is, so a node reads it into a buffer of that size at once.
    let claimed = zstd::zstd_safe::get_frame_content_size(&wire).unwrap();
    assert_eq!(claimed, Some(raw(&index).len() as u64));

    let files_only = FileIndex::new(index.artifact, index.files.clone());
    assert_eq!(FileIndex::decode_wire(&files_only.encode_wire(), index.artifact).unwrap(), files_only);
    let frames_only = files_only.clone().with_frames(index.frames.clone());
    assert_eq!(FileIndex::decode_wire(&frames_only.encode_wire(), index.artifact).unwrap(), frames_only);
    let empty = FileIndex::new(index.artifact, vec![]).with_skeleton(Some(vec![]));
    assert_eq!(FileIndex::decode_wire(&empty.encode_wire(), index.artifact).unwrap(), empty);
    // Format 2 is read, as `decode` reads it.
    let mut second = index.clone().with_skeleton(None);
    second.version = 2;
    assert_eq!(FileIndex::decode_wire(&second.encode_wire(), index.artifact).unwrap(), second);
}

#[test]
fn a_sent_index_is_refused_for_whatever_the_stored_one_is() {
    let index = ingested();
    let (a, b) = (index.artifact, Digest::of(b"b"));
    let refusal = FileIndex::decode_wire(&index.encode_wire(), b).unwrap_err();
    assert!(matches!(refusal, IndexError::OtherArtifact { expected, found } if expected == b && found == a));
    assert!(refusal.to_string().contains(&format!("describes {a}, not {b}")), "{refusal}");

    let mut bent: Vec<(String, FileIndex)> = Vec::new();
    for version in [0, 1, INDEX_VERSION + 1, u32::MAX] {
        let mut other = index.clone();
        other.version = version;
        bent.push((format!("format {version}"), other));
    }
    for (what, breaking) in broken_frame_tables() {
        let mut broken = index.clone();
        breaking(&mut broken);
        bent.push((what.into(), broken));
    }
    let mut overflowing = index.clone();
    overflowing.frames[0].raw_length = u64::MAX;
    bent.push(("a frame ending past 2^64".into(), overflowing));
    for (what, index) in bent {
        let stored = FileIndex::decode(&index.encode(), a).unwrap_err().to_string();
        let sent = FileIndex::decode_wire(&index.encode_wire(), a).unwrap_err().to_string();
        assert_eq!(sent, stored, "{what}: the same refusal");
    }
}

#[test]
fn a_sent_index_cut_short_with_bytes_after_its_end_or_not_one_is_refused_naming_what() {
    let a = Digest::of(b"a");
    let index = small(a).with_frames(vec![Frame { offset: 0, length: 9, raw_offset: 0, raw_length: 9000, sha256: a }]);
    let index = index.with_skeleton(Some(b"skeleton".to_vec()));
    let wire = index.encode_wire();
    for cut in 0..wire.len() {
        let refusal = FileIndex::decode_wire(&wire[..cut], a).unwrap_err().to_string();
        assert!(refusal.starts_with("the sent index does not read: it does not decompress"), "cut at {cut}: {refusal}");
    }
    // Cut in its decompressed bytes (a zstd frame that is whole): each cut named.
    let raw = raw(&index);
    for cut in 0..raw.len() {
        let refusal = FileIndex::decode_wire(&sent(&raw[..cut]), a).unwrap_err().to_string();
        let named = ["does not start with RLW1", "cut short in its header", "cut short in frame 0 of 1"];
        let named = named.into_iter().chain(["cut short after its 1 frames", "of 3 is cut short", "in its skeleton"]);
        assert!(refusal.starts_with("the sent index does not read: "), "cut at {cut}: {refusal}");
        assert!(named.into_iter().any(|n| refusal.contains(n)), "cut at {cut}: {refusal}");
    }
    let refusal = FileIndex::decode_wire(&sent(&raw[..raw.len() - 20]), a).unwrap_err().to_string();
    assert!(refusal.ends_with("file 2 of 3 is cut short"), "{refusal}");

    let mut after = raw.clone();
    after.push(0);
    let refusal = FileIndex::decode_wire(&sent(&after), a).unwrap_err().to_string();
    assert!(refusal.ends_with("it has 1 bytes after its end"), "{refusal}");
    let mut after = index.encode_wire();
    after.extend_from_slice(b"garbage");
    let refusal = FileIndex::decode_wire(&after, a).unwrap_err().to_string();
    assert!(refusal.starts_with("the sent index does not read: it does not decompress"), "{refusal}");

    let mut latin1 = raw.clone();
    let at = raw.windows(3).position(|w| w == "/ä".as_bytes()).unwrap() + 1;
    latin1[at..at + 2].copy_from_slice(&[0xe4, b'x']);
    let refusal = FileIndex::decode_wire(&sent(&latin1), a).unwrap_err().to_string();
    assert!(refusal.ends_with("file 0 of 3 has a path that is not UTF-8"), "{refusal}");
    let mut marked = raw.clone();
    let files_at = 4 + 4 + 32 + 8 + 64 + 8;
    marked[files_at] = 2;
    let refusal = FileIndex::decode_wire(&sent(&marked), a).unwrap_err().to_string();
    assert!(refusal.ends_with("file 0 of 3 has an executable mark neither 0 nor 1"), "{refusal}");
    let mut marked = raw.clone();
    marked[raw.len() - 8 - 8 - 1] = 2;
    let refusal = FileIndex::decode_wire(&sent(&marked), a).unwrap_err().to_string();
    assert!(refusal.ends_with("its skeleton's mark is 2, not 0 or 1"), "{refusal}");
    // A count that says more than the bytes hold is cut short, not an allocation of it.
    let mut counted = raw.clone();
    counted[4 + 4 + 32..][..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let refusal = FileIndex::decode_wire(&sent(&counted), a).unwrap_err().to_string();
    assert!(refusal.contains("cut short in frame ") && refusal.ends_with(&format!(" of {}", u64::MAX)), "{refusal}");

    // The other forms are not this one.
    let refusal = FileIndex::decode_wire(&index.encode(), a).unwrap_err().to_string();
    assert!(refusal.ends_with("it does not start with RLW1"), "{refusal}");
    let refusal = FileIndex::decode_wire(&sent(&index.encode_kept()), a).unwrap_err().to_string();
    assert!(refusal.ends_with("it does not start with RLW1"), "{refusal}");
    let refusal = FileIndex::decode_wire(b"RLW1", a).unwrap_err().to_string();
    assert!(refusal.starts_with("the sent index does not read: it does not decompress"), "{refusal}");
}

#[test]
fn a_sent_index_larger_than_the_bound_decompressed_is_refused() {
    let mut huge = Vec::with_capacity(MAX_INDEX_BYTES as usize + 1);
    huge.extend_from_slice(b"RLW1");
    huge.resize(MAX_INDEX_BYTES as usize + 1, 0);
    let bomb = zstd::bulk::compress(&huge, 1).unwrap();
    drop(huge);
    let refusal = FileIndex::decode_wire(&bomb, Digest::of(b"a")).unwrap_err();
    assert!(matches!(refusal, IndexError::TooLarge), "{refusal}");
}
