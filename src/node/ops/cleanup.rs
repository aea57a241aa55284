//! What a node holds (status), and retention: old releases moved to the trash and deleted.

use super::*;

pub(super) fn status(base: &Path) -> Result<Status, NodeError> {
    let layout = Layout { base: base.to_owned() };
    if !base.exists() {
        return Ok(Status::default());
    }
    // A plain directory at `current` is an application deployed another way (see Adopt).
    let plain = layout.current_is_plain_dir();
    let current = if plain { None } else { layout.current_digest()? };
    let (mut ready, mut unready) = (Vec::new(), Vec::new());
    if let Ok(entries) = fs::read_dir(layout.releases()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match name.parse::<Digest>() {
                Ok(d) if layout.ready(d).exists() => ready.push(d),
                _ => unready.push(name),
            }
        }
    }
    ready.sort();
    unready.sort();
    Ok(Status { current, plain, ready, unready })
}

/// Removes releases not in `keep`, never the current one, never one a running process has as
/// its working directory. Under the lock they are only unmarked and moved, one rename each,
/// into `.release/trash/<pid>-<µs>/`; the trees are deleted after the lock is released, so
/// deleting a big tree on a slow disk never holds up the next deploy's prepare or switch.
/// Trash a clean-up left behind (its process is gone) is deleted too.
pub(super) fn cleanup(base: &Path, keep: &[Digest], fence: u64) -> Result<Cleaned, NodeError> {
    let layout = Layout { base: base.to_owned() };
    layout.create()?;
    let trash_root = base.join(".release/trash");
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let trash = trash_root.join(format!("{}-{}", std::process::id(), started.as_micros()));
    let (mut removed, mut busy) = (Vec::new(), Vec::new());
    let unseen;
    {
        let _lock = layout.lock()?;
        layout.fence(fence)?;
        let current = layout.current_digest()?;
        let (in_use, unreadable) = working_directories();
        unseen = unreadable;
        for entry in fs::read_dir(layout.releases()).map_err(|e| io_error(&layout.releases(), e))?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = name.parse::<Digest>().ok();
            if digest.is_some_and(|d| keep.contains(&d) || current == Some(d)) {
                continue;
            }
            // /proc answers resolved paths: compare with the resolved release directory.
            let resolved = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if in_use.iter().any(|cwd| cwd.starts_with(&resolved)) {
                busy.push(name);
                continue;
            }
            if let Some(d) = digest {
                let _ = layout.unmark(d);
                forget_index(&layout, d);
                // Unmarked for good before the tree moves.
                layout.flush_markers()?;
            }
            move_to_trash(&path, &trash.join(&name))?;
            removed.push(name);
        }
        // What a clean-up whose process is gone left in the trash (a crash while deleting).
        for entry in fs::read_dir(&trash_root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name.split('-').next().and_then(|pid| pid.parse::<u32>().ok());
            if entry.path() != trash && !owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
                move_to_trash(&entry.path(), &trash.join(&name))?;
            }
        }
    }
    remove_tree(&trash).map_err(|e| io_error(&trash, e))?;
    removed.sort();
    let mut output = format!("removed: {}", if removed.is_empty() { "nothing".to_owned() } else { removed.join(", ") });
    if !busy.is_empty() {
        output.push_str(&format!("; kept, a process works in it: {}", busy.join(", ")));
    }
    if unseen > 0 {
        let advice = if rustix::process::geteuid().is_root() { "" } else { ": run the agent as root to see them" };
        output.push_str(&format!(
            "; {unseen} processes could not be checked (their working directories are not readable by this \
             agent){advice}"
        ));
    }
    Ok(Cleaned { removed, in_use: busy, unseen_processes: unseen as u64, output })
}

/// Moves a directory (a release, read-only; or an old trash directory) to `to`, in the same
/// filesystem; where a rename cannot do it, deletes it in place.
pub(super) fn move_to_trash(path: &Path, to: &Path) -> Result<(), NodeError> {
    let parent = to.parent().expect("trash entries have a parent");
    fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    // Moving a directory to another parent rewrites its `..`: it must be writable (a release
    // is read-only once ready).
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.is_dir()
    {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(meta.permissions().mode() | 0o700));
    }
    if fs::rename(path, to).is_err() {
        remove_tree(path).map_err(|e| io_error(path, e))?;
    }
    Ok(())
}

/// The working directories of this machine's processes that we can see, and how many
/// processes we may not look at (another user's, when the agent is not root: Apache's or
/// PHP-FPM's workers under `www-data`, say).
pub(super) fn working_directories() -> (Vec<PathBuf>, usize) {
    let Ok(procs) = fs::read_dir("/proc") else { return (vec![], 0) };
    let (mut seen, mut unseen) = (Vec::new(), 0);
    for entry in procs.flatten().filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit())) {
        match fs::read_link(entry.path().join("cwd")) {
            Ok(cwd) => seen.push(cwd),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => unseen += 1,
            // Gone meanwhile, or a kernel thread.
            Err(_) => {}
        }
    }
    (seen, unseen)
}
