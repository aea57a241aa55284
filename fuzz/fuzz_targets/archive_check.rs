//! The ingest check (`release::archive::check`) on any bytes: it must answer, never panic,
//! keep its limits, and give the same verdict however the bytes arrive (an upload streams
//! in pieces of any size). Ingest's frame scan of the same bytes: never a panic, the same
//! table however the bytes arrive, and for an accepted archive frames that cover it end to end.
#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use release::archive::{FrameScanner, check};
use release::digest::Digest;
use release_fuzz::{archive_bytes, options};

fuzz_target!(|data: &[u8]| {
    let bytes = archive_bytes(data);
    let options = options();
    let whole = check(&bytes[..], &options);
    if let Ok(summary) = &whole {
        assert!(summary.file_count <= options.max_files, "{summary:?}");
        assert!(summary.unpacked_bytes <= options.max_unpacked_bytes, "{summary:?}");
        assert!(summary.migrations.is_sorted(), "{summary:?}");
        assert!(summary.migrations.iter().all(|m| m.ends_with(".php") && !m.contains('/')), "{summary:?}");
    }
    // The same bytes through a 7-byte buffer: the same verdict. (Not always the same reason:
    // a stream with two faults, a corrupt frame and data after the end marker, is refused for
    // whichever the reader meets first, which depends on how the bytes arrive.)
    let trickled = check(BufReader::with_capacity(7, &bytes[..]), &options);
    match (&whole, &trickled) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("{whole:?} whole, {trickled:?} trickled"),
    }
    let scanned = |piece: usize, raw: u64| {
        let mut scanner = FrameScanner::new();
        bytes.chunks(piece).for_each(|chunk| scanner.feed(chunk));
        scanner.finish(bytes.len() as u64, raw, Digest::of(&bytes))
    };
    let raw = whole.as_ref().map_or(0, |summary| summary.unpacked_bytes);
    let frames = scanned(bytes.len().max(1), raw);
    assert_eq!(frames, scanned(7, raw), "the frame table depends on how the bytes arrive");
    assert!(!frames.is_empty());
    let (mut offset, mut unpacked) = (0u64, 0u64);
    for frame in &frames {
        assert_eq!((frame.offset, frame.raw_offset), (offset, unpacked), "{frames:?}");
        (offset, unpacked) = (offset + frame.length, unpacked + frame.raw_length);
    }
    assert_eq!((offset, unpacked), (bytes.len() as u64, raw), "{frames:?}");
});
