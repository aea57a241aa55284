//! Switch `current` (one rename), and adopt a tree deployed another way.

use super::*;

/// Points `current` at the release with one rename(2) of a fresh relative symlink, then
/// makes the directory entry durable. Without a digest, removes `current`. The shared files
/// are hashed after the rename, so that hashing never widens the gap between nodes.
pub(super) fn switch(
    base: &Path,
    digest: Option<Digest>,
    shared: &[String],
    adopt: bool,
    fence: u64,
) -> Result<Switched, NodeError> {
    let layout = Layout { base: base.to_owned() };
    layout.create()?;
    let _lock = layout.lock()?;
    layout.fence(fence)?;
    let Some(digest) = digest else {
        let previous = layout.current_digest()?;
        if previous.is_some() {
            fs::remove_file(layout.current()).map_err(|e| io_error(&layout.current(), e))?;
            sync_dir(base).map_err(|e| io_error(base, e))?;
        }
        return Ok(Switched { previous, adopted: None, shared: vec![] });
    };
    if !layout.ready(digest).exists() || !layout.release(digest).is_dir() {
        return Err(NodeError::new(ErrorCode::NotReady, format!("{digest} is not prepared on this node")));
    }
    let target = format!("releases/{}", digest.hex());
    if adopt && layout.current_is_plain_dir() {
        let kept = exchange_for_symlink(&layout, &target)?;
        let shared = shared_fingerprints(&layout, shared);
        return Ok(Switched { previous: None, adopted: Some(kept), shared });
    }
    let previous = layout.current_digest()?;
    let tmp = layout.base.join(format!(".release/current-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(|e| io_error(&tmp, e))?;
    fs::rename(&tmp, layout.current()).map_err(|e| io_error(&layout.current(), e))?;
    sync_dir(base).map_err(|e| io_error(base, e))?;
    let shared = shared_fingerprints(&layout, shared);
    Ok(Switched { previous, adopted: None, shared })
}

/// Swaps the plain directory at `current` for a symlink to `target` in one renameat2(2)
/// (RENAME_EXCHANGE): there is no moment without `current`. The old tree ends up at
/// `<base>/.release/adopted-<time>`, where the symlink was made; that path is returned.
pub(super) fn exchange_for_symlink(layout: &Layout, target: &str) -> Result<PathBuf, NodeError> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    let kept = layout.base.join(format!(".release/adopted-{}", crate::utc::now_text().replace([':', '.'], "")));
    std::os::unix::fs::symlink(target, &kept).map_err(|e| io_error(&kept, e))?;
    if let Err(e) = renameat_with(CWD, &kept, CWD, layout.current(), RenameFlags::EXCHANGE) {
        let _ = fs::remove_file(&kept);
        return Err(io_error(&layout.current(), e.into()));
    }
    sync_dir(&layout.base).map_err(|e| io_error(&layout.base, e))?;
    let dot = layout.base.join(".release");
    sync_dir(&dot).map_err(|e| io_error(&dot, e))?;
    Ok(kept)
}

/// Packages the plain directory at `current` (shared paths left out) for the server to keep
/// as an artifact, after copying the shared paths `shared/` lacks from it.
pub(super) fn adopt(base: &Path, shared: &[String]) -> Result<Adopted, NodeError> {
    let layout = Layout { base: base.to_owned() };
    layout.create()?;
    let _lock = layout.lock()?;
    if !layout.current_is_plain_dir() {
        return Ok(Adopted { legacy: None, seeded: vec![] });
    }
    let current = layout.current();
    let mut seeded = Vec::new();
    for path in shared {
        let (from, to) = (current.join(path), layout.shared().join(path));
        if fs::symlink_metadata(&to).is_ok() || fs::symlink_metadata(&from).is_err() {
            continue;
        }
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        }
        let copied = pages::output(Command::new("cp").arg("-a").arg("--").arg(&from).arg(&to));
        match copied {
            Ok(out) if out.status.success() => seeded.push(path.clone()),
            Ok(out) => {
                return Err(NodeError::new(
                    ErrorCode::Adopt,
                    format!(
                        "copying {} to {}: {}",
                        from.display(),
                        to.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
            Err(e) => return Err(NodeError::new(ErrorCode::Adopt, format!("cannot run cp: {e}"))),
        }
    }
    let package = layout.adopted_package();
    let packed = crate::archive::pack_to_file(&current, shared, &package, &mut |_| {}).map_err(|e| {
        NodeError::new(
            ErrorCode::Unadoptable,
            format!("{} cannot be kept as a release as it is: {e}", current.display()),
        )
    })?;
    Ok(Adopted { legacy: Some(Legacy { digest: packed.digest, size: packed.size, files: packed.file_count }), seeded })
}

/// A chunk of the adopted package, hex-encoded; `eof` once the end is reached.
pub(super) fn read_adopted(base: &Path, offset: u64, len: u64) -> Result<Chunk, NodeError> {
    use std::io::{Seek, SeekFrom};
    let path = Layout { base: base.to_owned() }.adopted_package();
    let mut file = fs::File::open(&path).map_err(|e| io_error(&path, e))?;
    let size = file.metadata().map_err(|e| io_error(&path, e))?.len();
    file.seek(SeekFrom::Start(offset)).map_err(|e| io_error(&path, e))?;
    let mut data = Vec::new();
    file.take(len).read_to_end(&mut data).map_err(|e| io_error(&path, e))?;
    Ok(Chunk { data: hex::encode(&data), eof: offset + data.len() as u64 >= size })
}
