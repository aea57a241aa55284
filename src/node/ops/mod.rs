//! What the node agent does to `<base>`: the dispatch of a request to its operation, one
//! file per kind of work (layout and lock, prepare, hooks and health, switch and adopt,
//! status and clean-up), and the small helpers they share.

mod cleanup;
mod finalized;
mod hooks;
mod layout;
mod prepare;
mod ranges;
mod share;
#[cfg(test)]
mod sparse_tests;
mod switch;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::protocol::{
    Adopted, Answer, Asking, Chunk, Cleaned, ErrorCode, Fenced, Healthy, Lacking, Legacy, Pm2Checked, Prepared, Ran,
    SharedEntry, SharedKind, Status, Switched,
};
use super::{
    Exec, Health, Modes, NodeError, Prepare, Request, RunAs, Sharing, Source, Sparse, UnpackError, drain,
    frames_to_fetch, is_writable, pages, remove_tree, unpack_sharing, unpack_sparse,
};
use crate::archive::{CheckOptions, FileIndex, Frame, Skeleton};
use crate::digest::Digest;
use crate::node::sparse::FrameSource;

use cleanup::{cleanup, status};
use finalized::shared_fingerprints;
pub(super) use hooks::{agent_user, user_ids};
use hooks::{exec, health, pm2_cwd, release_env, run_commands, share_writable};
use layout::Layout;
use prepare::prepare;
pub(super) use ranges::fetch_frames;
use share::{
    after_finalize, candidates, check_links, files_of_several_links, forget_index, fs_clock, store_index,
    unmark_changed,
};
use switch::{adopt, read_adopted, switch};

/// The last bytes of a hook's output kept in the answer (and in the registry).
const OUTPUT_TAIL: usize = 4000;

/// Shared files larger than this are not hashed at a switch (recorded as unreadable).
const SHARED_HASH_LIMIT: u64 = 64 << 20;

/// How long a deploy waits for another one holding the base's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Does what `request` asks; its answer as it goes on the wire.
/// `output`: where a prepare asks for frames before it reads `input` (see
/// [`Prepare::ask_frames`]); the answer is the caller's to write.
pub fn handle(request: Request, input: &mut (dyn BufRead + Send), output: &mut dyn Write) -> Result<Value, NodeError> {
    fn wire(answer: Result<impl Answer, NodeError>) -> Result<Value, NodeError> {
        answer.map(|a| serde_json::to_value(a).expect("answers serialize"))
    }
    match request {
        Request::Prepare(p) => wire(prepare(&p, input, output)),
        Request::Switch { base, digest, shared, adopt, fence } => wire(switch(&base, digest, &shared, adopt, fence)),
        Request::Fence { base, fence } => {
            let layout = Layout { base };
            layout.create()?;
            let _lock = layout.lock()?;
            layout.fence(fence)?;
            wire(Ok(Fenced { fence }))
        }
        Request::Adopt { base, shared } => wire(adopt(&base, &shared)),
        Request::ReadAdopted { base, offset, len } => wire(read_adopted(&base, offset, len)),
        Request::Status { base } => wire(status(&base)),
        Request::Cleanup { base, keep, fence } => wire(cleanup(&base, &keep, fence)),
        Request::Exec(e) => wire(exec(&e)),
        Request::Health(h) => wire(health(&h)),
        Request::Pm2Cwd { base, digest, app, env } => wire(pm2_cwd(&base, digest, &app, &env)),
        Request::Check(c) => wire(Ok(super::check::check(&c))),
    }
}

fn io_error(path: &Path, e: io::Error) -> NodeError {
    let code = if e.kind() == io::ErrorKind::StorageFull { ErrorCode::DiskFull } else { ErrorCode::Io };
    NodeError::new(code, format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Flushes the whole filesystem holding `path` (syncfs(2)): a release's many files at once.
fn sync_fs(path: &Path) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fs::File::open(path)?)?)
}

/// Visits the directory and everything under it (not following symlinks), directories last.
fn walk_modes(dir: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata) -> io::Result<()>) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        // Make sure the directory can be listed and entered before it is walked.
        fs::set_permissions(dir, fs::Permissions::from_mode(meta.permissions().mode() | 0o500))?;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path)?;
            if meta.file_type().is_symlink() {
                continue;
            }
            if meta.is_dir() {
                walk_modes(&path, f)?;
            } else {
                f(&path, &meta)?;
            }
        }
    }
    f(dir, &fs::symlink_metadata(dir)?)
}
