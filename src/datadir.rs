//! The data directory's lock: one process at a time owns the registry in it (the server, or
//! `release restore`), and a crash releases it.

use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot use data directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("another release server is using the data directory {0} (it holds {0}/lock)")]
    Held(PathBuf),
}

/// Takes `<dir>/lock` (flock, released when the process ends, even by a crash), creating the
/// directory if needed; the lock lasts as long as the returned file is open.
pub fn lock(dir: &Path) -> Result<File, LockError> {
    let err = |source| LockError::Io { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock")).map_err(err)?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(LockError::Held(dir.to_owned()));
    }
    Ok(file)
}
