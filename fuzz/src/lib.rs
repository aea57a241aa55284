//! What the fuzz targets share: how an input becomes an archive, and the options every
//! archive target checks with.

use release::archive::{ArchiveError, CheckOptions, ZSTD_MAGIC};

/// The archive a fuzz input stands for. An input that starts with the zstd magic is taken
/// as it is (so the zstd decoder is fuzzed too); any other is a tar stream, compressed here
/// first (so mutations reach the tar headers and the rules instead of dying in zstd's
/// checksums).
pub fn archive_bytes(data: &[u8]) -> Vec<u8> {
    if data.starts_with(&ZSTD_MAGIC) { data.to_vec() } else { zstd::bulk::compress(data, 1).expect("zstd compresses") }
}

/// Small limits, so a bomb costs milliseconds; a shared file and directory, and migrations
/// recorded, so every rule is live.
pub fn options() -> CheckOptions {
    CheckOptions {
        max_unpacked_bytes: 16 << 20,
        max_files: 2000,
        shared: vec![".env".into(), "storage".into()],
        record_migrations: true,
    }
}

/// Whether two refusals of the same bytes must be the same refusal. A stream with more than
/// one fault (a corrupt frame that also inflates past the limit) is refused for whichever the
/// reader meets first, and that depends on how the bytes arrive; any other refusal names the
/// entry at fault and must not.
pub fn same_refusal(a: &ArchiveError, b: &ArchiveError) -> bool {
    let stream = |e: &ArchiveError| {
        matches!(e, ArchiveError::Zstd(_) | ArchiveError::Truncated(_) | ArchiveError::TooLarge { .. })
    };
    a == b || (stream(a) && stream(b))
}
