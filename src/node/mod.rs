//! The node side: `release node`, run on each node by the server (over SSH, or as a local
//! process). One JSON request on the first line of stdin (an artifact's bytes may follow),
//! one JSON answer on stdout. Everything it does to `<base>` is here:
//!
//! ```text
//! <base>/releases/<64 hex>/     one directory per artifact, read-only once ready
//! <base>/current -> releases/…  relative symlink, switched by one rename(2)
//! <base>/shared/                persistent: .env, storage/, uploads
//! <base>/.release/lock          flock: one deploy at a time on this base
//! <base>/.release/ready/<hex>   marker: that release is unpacked, linked and finalized
//! <base>/.release/fence         the newest deploy run's fence: older runs are refused
//! <base>/.release/index/<hex>   the file index a release was prepared with: its files are
//!                               offered to newer releases (hard links, shared inodes)
//! ```
//!
//! Architecture invariant: the node trusts nothing it receives. It checks the archive by the
//! same rules as ingest and its digest while unpacking, and never writes outside `<base>`.

mod ahead;
mod check;
mod dirfd;
mod ops;
mod pages;
pub mod protocol;
pub mod sparse;
mod unpack;

use std::io::{BufRead, Write};

pub use protocol::{
    Check, ErrorCode, Exec, Health, NodeError, Prepare, Request, RunAs, Source, VERSION, answer, decode_request,
};
pub use sparse::{Sparse, frames_to_fetch, unpack_sparse};
pub use unpack::{
    Candidate, Linked, Looked, Modes, Sharing, UnpackError, Unpacked, is_writable, remove_tree, unpack, unpack_sharing,
};

/// `release node [--protocol N]`: reads one request from stdin, answers on stdout. The
/// server always names its protocol version; another than this agent's is refused before
/// stdin is read at all (a person trying the agent by hand may leave it out): the server's
/// writes then meet a closed pipe, which it takes as "read the answer", never a full one.
pub fn main(protocol: Option<u32>) -> std::process::ExitCode {
    let result = match protocol {
        Some(asked) if asked != VERSION => Err(NodeError::new(
            ErrorCode::BadRequest,
            format!("this node agent speaks protocol {VERSION}, the server {asked}: ship the server's own binary"),
        )),
        _ => {
            pages::small_pages();
            // A sparse prepare reads ~100 frames from the server on stdin: in a pipe of 1 MiB,
            // not the default 64 KiB, the server's side is woken a sixteenth as often (where
            // stdin is no pipe, or the system allows less, it stays as it is).
            let _ = rustix::pipe::fcntl_setpipe_size(std::io::stdin(), 1 << 20);
            // Not locked for good: a sparse prepare reads the frames on a thread of its own.
            let mut input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin());
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line) {
                Ok(_) => decode_request(&line)
                    .and_then(|request| ops::handle(request, &mut input, &mut std::io::stdout().lock())),
                Err(e) => Err(NodeError::new(ErrorCode::BadRequest, format!("cannot read stdin: {e}"))),
            }
        }
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{}", answer(result));
    let _ = stdout.flush();
    std::process::ExitCode::SUCCESS
}

/// Reads the frames `needed` (strictly increasing numbers in `frames`, the artifact's index)
/// from `url` as a sparse prepare does, one ranged GET per run of frames back to back; their
/// bytes and the bytes fetched. Not an API: the integration tests reach the ranged fetch
/// against the real S3 server and this server's signed route through it.
#[doc(hidden)]
pub fn fetch_frames(
    url: &str,
    frames: &[crate::archive::Frame],
    needed: &[usize],
    stall: std::time::Duration,
) -> Result<(Vec<Vec<u8>>, u64), NodeError> {
    ops::fetch_frames(url, frames, needed, stall)
}

/// Drains stdin (bytes the server sent that were not needed).
fn drain(input: &mut dyn BufRead) {
    let _ = std::io::copy(input, &mut std::io::sink());
}
