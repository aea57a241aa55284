//! The shared files' fingerprints a release's finalize hooks ran with: noted beside the
//! release, compared when it is prepared again, and described in a phase's output.

use super::*;

/// What each shared path holds now, as [`shared_file`] says.
pub(super) fn shared_fingerprints(layout: &Layout, shared: &[String]) -> Vec<SharedEntry> {
    shared.iter().map(|path| shared_file(&layout.shared(), path)).collect()
}

/// `.env sha256:0123456789ab, storage (directory)`, for a phase's output.
pub(super) fn describe_shared(fingerprints: &[SharedEntry]) -> String {
    let described: Vec<String> = fingerprints
        .iter()
        .map(|f| match f.sha256 {
            Some(sha) => format!("{} {}", f.path, &sha.to_string()[..19]),
            None => format!("{} ({})", f.path, f.kind.as_str()),
        })
        .collect();
    if described.is_empty() { "none".to_owned() } else { described.join(", ") }
}

/// Notes which shared files a release's finalize hooks ran with (temp name, rename).
pub(super) fn note_finalized(layout: &Layout, digest: Digest, fingerprints: &[SharedEntry]) -> Result<(), NodeError> {
    let path = layout.finalized_with(digest);
    let dir = path.parent().expect("under .release");
    fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let tmp = dir.join(format!(".tmp-{}", digest.hex()));
    fs::write(&tmp, serde_json::to_vec(fingerprints).expect("serializes")).map_err(|e| io_error(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))
}

/// What a shared path holds: a file's SHA-256 (never its contents), or only that it is a
/// directory (data, not configuration) or missing.
pub(super) fn shared_file(shared: &Path, path: &str) -> SharedEntry {
    let full = shared.join(path);
    let entry = |kind, sha256| SharedEntry { path: path.to_owned(), kind, sha256 };
    match fs::metadata(&full) {
        Ok(meta) if meta.is_dir() => entry(SharedKind::Directory, None),
        Ok(meta) if meta.is_file() && meta.len() <= SHARED_HASH_LIMIT => {
            match fs::File::open(&full).and_then(Digest::of_reader) {
                Ok(digest) => entry(SharedKind::File, Some(digest)),
                Err(_) => entry(SharedKind::Unreadable, None),
            }
        }
        // A FIFO or a device would block the switch; a huge file would slow it.
        Ok(_) => entry(SharedKind::Unreadable, None),
        Err(_) => entry(SharedKind::Missing, None),
    }
}
