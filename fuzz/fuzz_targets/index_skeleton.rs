//! A node's reading of an artifact index it is sent (issue 15 part 2): any index, a real one
//! bent by the input (file offsets and sizes, frame offsets and lengths, the skeleton's bytes),
//! is refused by `FileIndex::decode` or `Skeleton::of`, or makes every frame's tar stream
//! without a panic, with no more bytes than the frame says, and walks by the archive rules
//! without a panic. The index goes over the wire form (`encode_wire`/`decode_wire`), which must
//! refuse what `decode` refuses and read the same index otherwise; the input itself is also read
//! as a sent index, as it is and as the decompressed form.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use release::archive::{self, FileIndex, FrameScanner, Skeleton, walk_tar};
use release::digest::Digest;
use release_fuzz::options;

/// A real index: a packed tree of a few frames (files, a long name, a symlink).
static INDEX: LazyLock<FileIndex> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    for i in 0..40u64 {
        let path = dir.path().join(format!("vendor/p{}/f{i}.php", i % 4));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body: Vec<u8> = (0..20_000u64).map(|n| (n.wrapping_mul(2654435761).wrapping_add(i) >> 7) as u8).collect();
        std::fs::write(path, body).unwrap();
    }
    let long = dir.path().join(format!("deep/{}/{}.txt", "d".repeat(120), "n".repeat(110)));
    std::fs::create_dir_all(long.parent().unwrap()).unwrap();
    std::fs::write(long, b"long").unwrap();
    std::os::unix::fs::symlink("vendor", dir.path().join("link")).unwrap();
    let (packed, bytes) = archive::pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let listing = archive::index(&bytes[..], &options()).unwrap();
    let mut scanner = FrameScanner::new();
    scanner.feed(&bytes);
    let frames = scanner.finish(bytes.len() as u64, listing.summary.unpacked_bytes, packed.digest);
    assert!(frames.len() > 3);
    FileIndex::new(packed.digest, listing.files.unwrap()).with_frames(frames).with_skeleton(listing.skeleton)
});

/// The most tar stream made per input: a bent size may say terabytes.
const MAX_MADE: u64 = 32 << 20;

/// The input as a sent index: as it is (the zstd decoder and the size bound fuzzed), and as
/// the decompressed form, compressed here (so that mutations reach the parser), of the
/// artifact it names (so that they pass that check). One read back is the only form of its
/// index: encoded again, the same bytes.
fn sent_as_is(data: &[u8]) {
    let _ = FileIndex::decode_wire(data, INDEX.artifact);
    let artifact = data.get(8..40).map_or(INDEX.artifact, |b| Digest::from_bytes(b.try_into().unwrap()));
    let Ok(index) = FileIndex::decode_wire(&zstd::bulk::compress(data, 1).unwrap(), artifact) else { return };
    let again = index.encode_wire();
    assert!(zstd::decode_all(&again[..]).unwrap() == data, "read back and encoded again, other bytes");
    assert!(FileIndex::decode_wire(&again, artifact).unwrap() == index, "read back twice, another index");
}

fuzz_target!(|data: &[u8]| {
    sent_as_is(data);
    let mut index = INDEX.clone();
    // Each 11 bytes: what to bend (1), which one (2), the value (8).
    let mut rest = data;
    while let Some((op, after)) = rest.split_first() {
        let Some((which, after)) = after.split_first_chunk::<2>() else { break };
        let Some((value, after)) = after.split_first_chunk::<8>() else {
            // A tail too short for a value: the skeleton's own bytes instead.
            index.skeleton = Some(zstd::bulk::compress(after, 1).unwrap());
            break;
        };
        rest = after;
        let (which, value) = (u16::from_le_bytes(*which) as usize, u64::from_le_bytes(*value));
        let files = index.files.len().max(1);
        let frames = index.frames.len().max(1);
        match op % 6 {
            0 => index.files.get_mut(which % files).map(|f| f.offset = value),
            1 => index.files.get_mut(which % files).map(|f| f.size = value),
            2 => index.frames.get_mut(which % frames).map(|f| f.raw_length = value),
            3 => index.frames.get_mut(which % frames).map(|f| f.raw_offset = value),
            4 => index.frames.get_mut(which % frames).map(|f| f.length = value),
            _ => {
                if which % files < index.files.len() {
                    index.files.remove(which % files);
                }
                None
            }
        };
    }
    let stored = FileIndex::decode(&index.encode(), index.artifact);
    let sent = FileIndex::decode_wire(&index.encode_wire(), index.artifact);
    match (&stored, &sent) {
        (Ok(stored), Ok(sent)) => assert!(stored == sent, "the sent form read another index"),
        (Err(stored), Err(sent)) => assert_eq!(stored.to_string(), sent.to_string(), "refused for another reason"),
        _ => panic!("the stored form: {:?}; the sent form: {:?}", stored.map(|_| ()), sent.map(|_| ())),
    }
    let Ok(index) = sent else { return };
    let Ok(Some(skeleton)) = Skeleton::of(&index) else { return };
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 4093];
    for frame in &index.frames {
        let (start, end) = (frame.raw_offset, frame.raw_offset + frame.raw_length);
        let (mut pos, mut next) = (start, skeleton.file_at(start));
        while pos < end && (stream.len() as u64) < MAX_MADE {
            let n = skeleton.read_at(pos, end, &mut next, &mut buf);
            assert!(n > 0 && n <= buf.len(), "a read of the frame's stream made {n} bytes");
            stream.extend_from_slice(&buf[..n]);
            pos += n as u64;
        }
        assert!(pos <= end, "made past the frame's end");
    }
    // The rules hold whatever was made (a refusal is fine; a panic is not).
    struct Nothing;
    impl archive::Visitor for Nothing {
        fn entry(&mut self, _: archive::Entry<'_>, _: &mut dyn std::io::Read) -> std::io::Result<()> {
            Ok(())
        }
    }
    let _ = walk_tar(&stream[..], &options(), &mut Nothing);
});
