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
//! ```
//!
//! Architecture invariant: the node trusts nothing it receives. It checks the archive by the
//! same rules as ingest and its digest while unpacking, and never writes outside `<base>`.

mod ops;
mod unpack;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use unpack::{Modes, UnpackError, Unpacked, is_writable, remove_tree, unpack};

use crate::digest::Digest;

/// A request to the node agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Prepare(Prepare),
    /// Points `current` at the release; `None` removes `current` (putting back a first deploy).
    /// The answer names the SHA-256 of each `shared` file as the release found it. With
    /// `adopt`, a plain directory at `current` is swapped for the symlink in one
    /// rename(2) and kept as `<base>/.release/adopted-<time>`.
    Switch {
        base: PathBuf,
        digest: Option<Digest>,
        #[serde(default)]
        shared: Vec<String>,
        #[serde(default)]
        adopt: bool,
        #[serde(default)]
        fence: u64,
    },
    /// A plain directory at `current` (an application deployed another way) is packaged as it
    /// is, `shared` paths left out, into `<base>/.release/adopted.tar.zst`; shared paths that
    /// `shared/` lacks are copied there from it. Nothing that serves traffic changes.
    Adopt {
        base: PathBuf,
        shared: Vec<String>,
    },
    /// Up to `len` bytes of the adopted package from `offset`, hex-encoded (the server reads
    /// it in chunks over the same calls as everything else).
    ReadAdopted {
        base: PathBuf,
        offset: u64,
        len: u64,
    },
    Status {
        base: PathBuf,
    },
    Cleanup {
        base: PathBuf,
        keep: Vec<Digest>,
        #[serde(default)]
        fence: u64,
    },
    /// Takes the base for a newer deploy run: from now on, changes asked with an older fence
    /// (an agent of a server that died, still waiting for the lock) are refused.
    Fence {
        base: PathBuf,
        fence: u64,
    },
    Exec(Exec),
    Health(Health),
    /// Every PM2 process of `app` runs from the release (its working directory is inside it).
    Pm2Cwd {
        base: PathBuf,
        digest: Digest,
        app: String,
        env: BTreeMap<String, String>,
    },
}

/// Where prepare gets the artifact's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// They follow the request on stdin.
    Stdin,
    /// A (presigned) URL of the object store to fetch them from.
    Url(String),
    /// A signed URL of the release server to fetch them from (`[server] node_url`).
    Server(String),
    /// None sent: the release must already be on the node.
    Present,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepare {
    pub base: PathBuf,
    pub digest: Digest,
    pub source: Source,
    /// Relative paths linked from `<base>/shared`.
    pub shared: Vec<String>,
    /// Relative paths left writable when the release is made read-only.
    pub writable: Vec<String>,
    /// Shell commands run in the release directory, at its final path.
    pub finalize: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub max_unpacked_bytes: u64,
    pub max_files: u64,
    /// A plain directory at `current` is being adopted: prepare beside it.
    #[serde(default)]
    pub adopt: bool,
    /// How long the finalize commands may run, all together, before they are killed.
    #[serde(default)]
    pub hook_timeout_ms: Option<u64>,
    /// The deploy run's fence (see [`Request::Fence`]); 0: none.
    #[serde(default)]
    pub fence: u64,
    /// A fetch by URL that brings no byte for this long fails (60 s when absent).
    #[serde(default)]
    pub fetch_stall_ms: Option<u64>,
    /// A rollback to a release already here: run `finalize` only when the shared files
    /// differ from those it was last finalized with (a rotated `.env` the cached
    /// configuration would otherwise keep out), and then write only its writable paths.
    #[serde(default)]
    pub finalize_if_shared_changed: bool,
    /// Who runs the finalize commands, and with which umask.
    #[serde(default)]
    pub run_as: RunAs,
}

/// The user application hooks run as (`sudo -n -u`), and the umask of every hook. With a
/// user, the release's writable paths are given to that user's group first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunAs {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub umask: Option<u32>,
    /// Only commands that start with `php ` run as `user` (a reload: `apachectl` stays the
    /// SSH user's, `php artisan queue:restart` is the application's).
    #[serde(default)]
    pub php_only: bool,
}

impl Prepare {
    pub fn hook_timeout(&self) -> Option<std::time::Duration> {
        self.hook_timeout_ms.map(std::time::Duration::from_millis)
    }

    pub fn fetch_stall_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.fetch_stall_ms.unwrap_or(60_000))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub base: PathBuf,
    /// Where to run: a release's directory, or `current` when `None`.
    pub digest: Option<Digest>,
    pub commands: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// How long the commands may run, all together, before they are killed.
    #[serde(default)]
    pub hook_timeout_ms: Option<u64>,
    /// The deploy run's fence (see `Request::Fence`); 0 asks nothing.
    #[serde(default)]
    pub fence: u64,
    /// Who runs the commands, and with which umask.
    #[serde(default)]
    pub run_as: RunAs,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub url: String,
    /// Text the answer must contain (the server has put the digest in already).
    pub expect: Option<String>,
    pub timeout_ms: u64,
    /// The pause between two asks.
    #[serde(default = "Health::default_interval_ms")]
    pub interval_ms: u64,
    /// Good answers in a row that make the release healthy.
    #[serde(default = "Health::one")]
    pub healthy_after: u32,
    /// Wrong answers in a row that fail it at once (see `config::HealthCheck`).
    #[serde(default = "Health::default_unhealthy_after")]
    pub unhealthy_after: u32,
}

impl Health {
    fn default_interval_ms() -> u64 {
        200
    }
    fn one() -> u32 {
        1
    }
    fn default_unhealthy_after() -> u32 {
        5
    }
}

/// A refusal or failure on the node: a code for the server, a message for people, and the
/// tail of what a hook printed.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl NodeError {
    pub fn new(code: &str, message: impl Into<String>) -> NodeError {
        NodeError { code: code.to_owned(), message: message.into(), output: None }
    }
}

/// The answer: `{"ok": true, ...}` or `{"ok": false, "code", "message", "output"}`.
pub fn answer(result: Result<serde_json::Value, NodeError>) -> serde_json::Value {
    match result {
        Ok(mut value) => {
            if let Some(map) = value.as_object_mut() {
                map.insert("ok".into(), true.into());
            }
            value
        }
        Err(e) => {
            let mut value = serde_json::to_value(&e).expect("serializes");
            value["ok"] = false.into();
            value
        }
    }
}

/// The request on the first line of `input` (what follows the newline, an artifact's bytes,
/// is not looked at). Pure: what `release node` makes of its stdin before acting on it.
pub fn decode_request(input: &[u8]) -> Result<Request, NodeError> {
    let line = input.split(|b| *b == b'\n').next().unwrap_or_default();
    if input.is_empty() {
        return Err(NodeError::new("bad_request", "no request on stdin"));
    }
    serde_json::from_slice(line).map_err(|e| NodeError::new("bad_request", format!("not a node request: {e}")))
}

/// `release node`: reads one request from stdin, answers on stdout.
pub fn main() -> std::process::ExitCode {
    let stdin = std::io::stdin();
    let mut input = std::io::BufReader::with_capacity(1 << 20, stdin.lock());
    let mut line = Vec::new();
    let result = match input.read_until(b'\n', &mut line) {
        Ok(_) => decode_request(&line).and_then(|request| ops::handle(request, &mut input)),
        Err(e) => Err(NodeError::new("bad_request", format!("cannot read stdin: {e}"))),
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{}", answer(result));
    let _ = stdout.flush();
    std::process::ExitCode::SUCCESS
}

/// Drains stdin (bytes the server sent that were not needed).
fn drain(input: &mut dyn BufRead) {
    let _ = std::io::copy(input, &mut std::io::sink());
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn decode_request_reads_the_first_line_only() {
        let request = Request::Status { base: "/srv/api".into() };
        let mut input = serde_json::to_vec(&request).unwrap();
        input.extend_from_slice(b"\n\x28\xb5\x2f\xfd artifact bytes, not JSON");
        assert!(matches!(decode_request(&input), Ok(Request::Status { base }) if base == Path::new("/srv/api")));
    }

    #[test]
    fn decode_request_refuses_what_is_not_a_request() {
        for (input, says) in [
            (&b""[..], "no request on stdin"),
            (b"\n{\"op\":\"status\",\"base\":\"/srv\"}", "not a node request"),
            (b"{\"op\":\"status\",\"base\":\"/srv\",\"extra\":1}", "unknown field"),
            (b"{\"op\":\"format_disk\"}", "unknown variant"),
            (b"{\"op\":\"status\",\"base\":\"/srv\xff\"}", "not a node request"),
        ] {
            let err = decode_request(input).unwrap_err();
            assert_eq!(err.code, "bad_request");
            assert!(err.message.contains(says), "{input:?}: {}", err.message);
        }
    }
}
