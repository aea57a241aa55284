//! The ingest check (`release::archive::check`) on any bytes: it must answer, never panic,
//! keep its limits, and give the same verdict however the bytes arrive (an upload streams
//! in pieces of any size).
#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use release::archive::check;
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
});
