//! Shared files: which files of the ready releases a new release may hard-link (from their
//! stored indexes), the index a release keeps once prepared with one, and the check that its
//! finalize hooks did not write through a link into an older release.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::time::SystemTime;

use super::*;
use crate::archive::{FileIndex, IndexedFile};
use crate::node::{Candidate, Linked};

/// How many ready releases offer their files: `current`, then the newest others. Files
/// unchanged for several releases are in all of them; each index read costs a few ms.
const SOURCES: usize = 3;

/// A file of a ready release for each (SHA-256, executable) those releases hold.
pub(super) type Candidates = HashMap<(Digest, bool), Candidate>;

/// The ready releases with a stored index (but `except`), `current` first, then the newest
/// (by their ready markers).
fn indexed_releases(layout: &Layout, except: Digest) -> Vec<Digest> {
    let current = layout.current_digest().ok().flatten();
    let mut found: Vec<(bool, SystemTime, Digest)> = fs::read_dir(layout.base.join(".release/index"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<Digest>().ok())
        .filter(|d| *d != except && layout.release(*d).is_dir())
        .filter_map(|d| {
            let ready = fs::metadata(layout.ready(d)).ok()?;
            Some((current == Some(d), ready.modified().ok()?, d))
        })
        .collect();
    found.sort_by_key(|(live, ready_at, _)| std::cmp::Reverse((*live, *ready_at)));
    found.into_iter().map(|(_, _, d)| d).collect()
}

/// What the ready releases of this base offer to a release with the `writable` paths: every
/// non-empty file outside them (on the older side, the unpacker also takes only read-only
/// files, so an older release's own writable paths are never linked either) whose content
/// has not changed since its index was stored.
pub(super) fn candidates(layout: &Layout, digest: Digest, writable: &[String]) -> Candidates {
    let mut candidates = Candidates::new();
    for release in indexed_releases(layout, digest).into_iter().take(SOURCES) {
        let path = layout.index(release);
        let Some(index) = read_kept(&path, release) else { continue };
        let Ok(indexed_at_ns) = fs::metadata(&path).map(|m| mtime_ns(&m)) else { continue };
        let dir = layout.release(release);
        candidates.reserve(index.files.len());
        for file in index.files {
            if file.size == 0 || is_writable(Path::new(&file.path), writable) {
                continue;
            }
            candidates.entry((file.sha256, file.executable)).or_insert_with(|| Candidate {
                path: dir.join(&file.path),
                size: file.size,
                indexed_at_ns,
                release,
            });
        }
    }
    candidates
}

/// Keeps `index` as the release's (temp name, rename).
pub(super) fn store_index(layout: &Layout, digest: Digest, index: &FileIndex) -> Result<(), NodeError> {
    let path = layout.index(digest);
    let dir = path.parent().expect("under .release");
    fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let tmp = dir.join(format!(".tmp-{}", digest.hex()));
    fs::write(&tmp, index.encode_kept()).map_err(|e| io_error(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))
}

/// The index kept for `release` (compact, or the zstd JSON kept before 2026-12-04's second
/// build); `None` when there is none or it does not read.
pub(super) fn read_kept(path: &Path, release: Digest) -> Option<FileIndex> {
    let stored = fs::read(path).ok()?;
    FileIndex::decode_kept(&stored, release).or_else(|_| FileIndex::decode(&stored, release)).ok()
}

/// Forgets the index of a release (removed, redone, or about to be written by its hooks).
pub(super) fn forget_index(layout: &Layout, digest: Digest) {
    let _ = fs::remove_file(layout.index(digest));
}

/// A reading of the filesystem's clock (the coarse one that stamps files) later than the
/// ctime of every file written before the call: a file whose ctime is not before it was
/// changed after it (a ctime cannot be set by a hook). Waits for the clock's next tick (a
/// few ms) so that a file written in the same tick is not taken for one changed later.
pub(super) fn fs_clock(layout: &Layout, digest: Digest) -> Result<i128, NodeError> {
    let path = layout.base.join(format!(".release/clock-{}", digest.hex()));
    let stamp = || {
        fs::write(&path, b"").and_then(|()| fs::metadata(&path)).map(|m| ctime_ns(&m)).map_err(|e| io_error(&path, e))
    };
    let before = stamp()?;
    let started = Instant::now();
    let mut now = stamp()?;
    while now <= before && started.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(1));
        now = stamp()?;
    }
    let _ = fs::remove_file(&path);
    Ok(now)
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

fn ctime_ns(meta: &fs::Metadata) -> i128 {
    i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec())
}

/// After finalize: refuses the release when a hook wrote through one of its links into the
/// older releases' file (root ignores the read-only modes), and otherwise answers the index
/// to keep: the artifact's, minus the files the hooks changed (they no longer hold what the
/// index says).
pub(super) fn after_finalize(
    layout: &Layout,
    digest: Digest,
    dir: &Path,
    index: &FileIndex,
    linked: &[Linked],
    hooks_started: i128,
) -> Result<FileIndex, NodeError> {
    check_links(layout, digest, Some(index), linked)?;
    // Written in place with its size and mtime put back (`touch -r`): its ctime moved (a hook
    // cannot set it), and its bytes are not what the index says. Hashed only then.
    for link in linked {
        let Ok(meta) = fs::symlink_metadata(&link.source) else { continue };
        if meta.ino() != link.ino || ctime_ns(&meta) < hooks_started {
            continue;
        }
        let said = index.files.iter().find(|f| f.path == link.path).map(|f| f.sha256);
        let now = fs::File::open(&link.source).and_then(Digest::of_reader).ok();
        if said.is_none() || now != said {
            return Err(written_through(layout, digest, Some(index), link));
        }
    }
    let files = index
        .files
        .iter()
        // A linked file's ctime is its link's, before the hooks (and it was not written: above).
        .filter(|file| {
            fs::symlink_metadata(dir.join(&file.path))
                .is_ok_and(|m| m.is_file() && m.size() == file.size && ctime_ns(&m) < hooks_started)
        })
        .cloned()
        .collect();
    Ok(FileIndex::new(index.artifact, files))
}

/// Refuses when a hook wrote into one of `linked` (through any of its paths).
pub(super) fn check_links(
    layout: &Layout,
    digest: Digest,
    index: Option<&FileIndex>,
    linked: &[Linked],
) -> Result<(), NodeError> {
    for link in linked {
        let Ok(meta) = fs::symlink_metadata(&link.source) else { continue };
        if link.changed(&meta) {
            return Err(written_through(layout, digest, index, link));
        }
    }
    Ok(())
}

/// The files of a release that have other links (shared with other releases, or hard links
/// of its own archive), as they are now: finalize run again on it must not change them.
pub(super) fn files_of_several_links(dir: &Path) -> Vec<Linked> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(next) = stack.pop() {
        for entry in fs::read_dir(&next).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && meta.nlink() > 1 {
                let path = entry.path();
                found.push(Linked {
                    path: path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().into_owned(),
                    source: path,
                    ino: meta.ino(),
                    size: meta.size(),
                    mtime_ns: mtime_ns(&meta),
                    mode: meta.mode(),
                });
            }
        }
    }
    found
}

/// Releases whose files no longer hold what their artifact does offer them no more, and are
/// unmarked (unpacked again from their artifact when next needed), except the live one,
/// which is named: what to add to the refusal that found them.
pub(super) fn unmark_changed(layout: &Layout, releases: &[Digest]) -> String {
    let current = layout.current_digest().ok().flatten();
    let mut message = String::new();
    let mut unmarked = Vec::new();
    for release in releases {
        forget_index(layout, *release);
        if current == Some(*release) {
            message.push_str(&format!(
                "; the live release {} (current) has the changed file: deploy it again to restore it",
                &release.hex()[..12]
            ));
        } else {
            let _ = layout.unmark(*release);
            unmarked.push(release.hex()[..12].to_owned());
        }
    }
    if !unmarked.is_empty() {
        // Unmarked for good (failing that, they are unmarked again when a prepare next finds
        // them changed).
        let _ = layout.flush_markers();
        message.push_str(&format!(
            "; no longer ready, unpacked again from their artifact when next needed: {}",
            unmarked.join(", ")
        ));
    }
    message
}

/// The refusal of a release whose finalize changed a file it shares with older releases: those
/// releases are unmarked (unpacked again from their artifact when next needed), except the
/// live one, which is named; none of them offers its files again.
fn written_through(layout: &Layout, digest: Digest, index: Option<&FileIndex>, link: &Linked) -> NodeError {
    let said: Option<&IndexedFile> = index.and_then(|index| index.files.iter().find(|f| f.path == link.path));
    let mut sharing = Vec::new();
    for release in indexed_releases(layout, digest) {
        let Some(older) = read_kept(&layout.index(release), release) else { continue };
        let holds = older.files.iter().any(|f| {
            said.is_none_or(|s| (s.sha256, s.executable) == (f.sha256, f.executable))
                && fs::symlink_metadata(layout.release(release).join(&f.path)).is_ok_and(|m| m.ino() == link.ino)
        });
        if holds {
            sharing.push(release);
        }
    }
    let mut message = format!(
        "finalize wrote into {}, a file this release shares (hard-linked) with {}: their copy changed with it",
        link.path,
        if sharing.is_empty() {
            "an older release".to_owned()
        } else {
            sharing.iter().map(|d| d.hex()[..12].to_owned()).collect::<Vec<_>>().join(", ")
        }
    );
    message.push_str(&unmark_changed(layout, &sharing));
    message.push_str(
        "; a finalize hook must write only in the kind's writable paths (or replace files, never rewrite them in place)",
    );
    NodeError::new(ErrorCode::HookFailed, message)
}

#[cfg(test)]
#[path = "share_tests.rs"]
mod tests;
