//! The node protocol, both sides of it: the request `release node` reads on the first line of
//! its stdin, one answer type per request that it writes on stdout, the error codes it
//! refuses with, and the protocol's version. The server writes requests and reads answers
//! through these same types, so a renamed field is a compile error, not a check that
//! silently became true.
//!
//! Long on purpose (~640 lines with its tests): the whole contract between server and agent
//! in one file, so that a change to it is seen whole.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::model::vocabulary::vocabulary;

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
    /// `release check`: what a deploy will need, looked at without changing anything.
    Check(Check),
    /// Every PM2 process of `app` runs from the release (its working directory is inside it).
    Pm2Cwd {
        base: PathBuf,
        digest: Digest,
        app: String,
        env: BTreeMap<String, String>,
    },
}

/// What `release check` asks a node to look at (see `check.rs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub base: PathBuf,
    /// The service's shared paths: each must be in `<base>/shared`.
    pub shared: Vec<String>,
    /// A Laravel service: `php artisan` runs, the web server's DocumentRoot.
    #[serde(default)]
    pub laravel: bool,
    /// A Node service: its PM2 app, running from `<base>/current`.
    #[serde(default)]
    pub pm2_app: Option<String>,
    /// The reload commands: those run with `sudo` must be allowed without a password.
    #[serde(default)]
    pub reload: Vec<String>,
    /// The health check's URL (the digest placeholder left in).
    #[serde(default)]
    pub health_url: Option<String>,
    /// The user the web server (or the hooks) write as: `shared/` must be writable by it.
    #[serde(default)]
    pub web_user: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Room one more release needs (the largest one unpacked so far), in bytes.
    #[serde(default)]
    pub needed_bytes: u64,
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
    /// The artifact's file index in its wire form (`FileIndex::encode_wire`: binary, zstd;
    /// base64 on the line), issue 15: with it,
    /// a file a ready release on the node holds already is hard-linked instead of written, and
    /// only the frames holding the others are fetched. Absent from the wire when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::archive::base64_bytes")]
    pub index: Option<Vec<u8>>,
    /// With [`Source::Stdin`] and an index: before reading stdin, the agent says on a line of
    /// its own which frames it lacks ([`Asking`]: those holding data of a file no ready
    /// release here holds), and reads only those from stdin (the whole artifact when it says
    /// `None`); the rest it makes from the index's skeleton and the releases here. One call,
    /// where asking first was another (an agent started, the index read twice).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ask_frames: bool,
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

    /// A prepare of `digest` into `base` from stdin, with nothing shared, linked or run and small
    /// limits (1 MiB unpacked, 100 files): what the unit and integration tests start from.
    #[doc(hidden)]
    pub fn from_stdin(base: &std::path::Path, digest: Digest) -> Prepare {
        Prepare {
            base: base.to_owned(),
            digest,
            source: Source::Stdin,
            shared: vec![],
            writable: vec![],
            finalize: vec![],
            env: BTreeMap::new(),
            max_unpacked_bytes: 1 << 20,
            max_files: 100,
            adopt: false,
            hook_timeout_ms: None,
            fence: 0,
            fetch_stall_ms: None,
            finalize_if_shared_changed: false,
            run_as: RunAs::default(),
            index: None,
            ask_frames: false,
        }
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

/// The protocol's version: the server sends it (`release node --protocol N`) and the agent
/// refuses another; the agent puts it in every answer and the server refuses an answer
/// without it. The agent is the server's own binary, shipped by checksum, so they differ only
/// by mistake (a binary put on the node by hand, an old agent left on a path).
pub const VERSION: u32 = 3;

vocabulary! {
    /// Why a node refused or failed, as the server tells the cases apart. A code a newer
    /// agent sends and this server does not know reads as `Other`, keeping its name.
    pub enum ErrorCode(other Other) {
        /// Not a request this agent understands (or of another protocol version).
        BadRequest = "bad_request",
        /// Another deploy holds the base's lock, or a hook an earlier run started still runs.
        Locked = "locked",
        /// A newer deploy run took the base: this one's change is refused.
        Fenced = "fenced",
        /// The release to switch to or run in is not prepared here.
        NotReady = "not_ready",
        /// `current` holds an application deployed another way (deploy with `--adopt`).
        NotAdopted = "not_adopted",
        /// `current` points at something other than the server believes.
        Drift = "drift",
        /// A rollback's release is no longer on the node (removed since the status was read).
        Missing = "missing",
        /// The live release is here without its ready marker.
        LiveUnready = "live_unready",
        Io = "io",
        DiskFull = "disk_full",
        Fetch = "fetch",
        DigestMismatch = "digest_mismatch",
        /// The file index sent with a prepare does not describe the artifact.
        IndexMismatch = "index_mismatch",
        UnsafeArchive = "unsafe_archive",
        SharedMissing = "shared_missing",
        SharedInArtifact = "shared_in_artifact",
        SharedThroughLink = "shared_through_link",
        HookFailed = "hook_failed",
        HookTimeout = "hook_timeout",
        HookUser = "hook_user",
        HealthFailed = "health_failed",
        Pm2 = "pm2",
        Pm2Cwd = "pm2_cwd",
        Adopt = "adopt",
        Unadoptable = "unadoptable",
        /// An answer the server could not read as a refusal (of no known shape).
        Unknown = "unknown",
    }
}

impl ErrorCode {
    /// A switch refused with this code changed nothing: the node still serves what it did.
    pub fn refused_before_switch(self) -> bool {
        matches!(
            self,
            ErrorCode::NotReady | ErrorCode::Locked | ErrorCode::NotAdopted | ErrorCode::Drift | ErrorCode::Fenced
        )
    }
}

/// A refusal or failure on the node: a code for the server, a message for people, and the
/// tail of what a hook printed.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl NodeError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> NodeError {
        NodeError { code, message: message.into(), output: None }
    }
}

/// The answer on the wire: `{"ok": true, "protocol": 3, ...}` (the answer's own fields) or
/// `{"ok": false, "protocol": 3, "code", "message", "output"}`.
pub fn answer(result: Result<serde_json::Value, NodeError>) -> serde_json::Value {
    let (mut value, ok) = match result {
        Ok(value) => (value, true),
        Err(e) => (serde_json::to_value(&e).expect("serializes"), false),
    };
    if let Some(map) = value.as_object_mut() {
        map.insert("ok".into(), ok.into());
        map.insert("protocol".into(), VERSION.into());
    }
    value
}

/// What an answer may say besides its own fields, for the deploy's record of the phase.
pub trait Answer: Serialize + serde::de::DeserializeOwned {
    /// What the phase printed (hooks' output, what prepare did), kept as the phase's tail.
    fn output(&self) -> Option<&str> {
        None
    }
    /// The shared files as the release found them (a switch).
    fn shared(&self) -> &[SharedEntry] {
        &[]
    }
}

/// The answer to [`Request::Fence`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fenced {
    pub fence: u64,
}

/// The answer to [`Request::Prepare`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prepared {
    pub dir: PathBuf,
    /// The release was here already (ready).
    pub reused: bool,
    /// Its finalize hooks ran again, the shared files having changed (a rollback).
    #[serde(default)]
    pub refinalized: bool,
    pub output: String,
}

/// The line a prepare asked for frames ([`Prepare::ask_frames`]) writes before it reads stdin:
/// `{"protocol": 3, "lacking": {"frames": [..], "of": N}}`. Not an answer: the prepare's
/// answer follows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asking {
    pub protocol: u32,
    pub lacking: Lacking,
}

/// Which frames of the artifact a node lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lacking {
    /// The frames to send, in order; `None`: the whole artifact (the index has no skeleton or
    /// frames too large, or the node holds no release with an index).
    pub frames: Option<Vec<usize>>,
    /// The artifact's frames.
    pub of: usize,
}

/// What a shared path holds, as a switch found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedKind {
    File,
    /// Its contents are data, not configuration: not hashed.
    Directory,
    Missing,
    /// A FIFO, a device, a file too large to hash at a switch, or one the agent cannot read.
    Unreadable,
}

impl SharedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SharedKind::File => "file",
            SharedKind::Directory => "directory",
            SharedKind::Missing => "missing",
            SharedKind::Unreadable => "unreadable",
        }
    }
}

/// One shared path: a file's SHA-256, never its contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedEntry {
    pub path: String,
    pub kind: SharedKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
}

/// The answer to [`Request::Switch`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Switched {
    /// What `current` pointed at before.
    pub previous: Option<Digest>,
    /// With `adopt`: where the plain directory that was `current` is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<PathBuf>,
    #[serde(default)]
    pub shared: Vec<SharedEntry>,
}

/// A legacy tree packaged by [`Request::Adopt`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Legacy {
    pub digest: Digest,
    pub size: u64,
    pub files: u64,
}

/// The answer to [`Request::Adopt`]: `legacy` is `None` when `current` is no plain directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Adopted {
    pub legacy: Option<Legacy>,
    /// Shared paths copied into `shared/` from the tree.
    #[serde(default)]
    pub seeded: Vec<String>,
}

/// The answer to [`Request::ReadAdopted`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Chunk {
    /// The bytes, hex-encoded.
    pub data: String,
    /// The package ends with these bytes.
    pub eof: bool,
}

/// The answer to [`Request::Status`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub current: Option<Digest>,
    /// `current` is a plain directory: an application deployed another way.
    #[serde(default)]
    pub plain: bool,
    pub ready: Vec<Digest>,
    /// Directories under `releases/` that are not ready (an unpack cut short).
    pub unready: Vec<String>,
}

/// The answer to [`Request::Cleanup`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cleaned {
    pub removed: Vec<String>,
    /// Kept: a process works in them.
    pub in_use: Vec<String>,
    /// Processes whose working directory the agent could not read.
    pub unseen_processes: u64,
    pub output: String,
}

/// The answer to [`Request::Exec`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ran {
    pub output: String,
}

/// The answer to [`Request::Health`]: the good answer that made the release healthy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Healthy {
    pub status: u16,
    pub body: String,
    /// How many times the URL was asked.
    pub asked: u32,
    pub ms: u64,
}

/// The answer to [`Request::Pm2Cwd`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pm2Checked {
    /// The OS pids of the app's processes, each running from the release.
    pub processes: Vec<u64>,
    /// `cluster`, `fork`, … (each once).
    pub exec_mode: Vec<String>,
    pub output: String,
}

vocabulary! {
    /// How one check of `release check` came out. A status of another build (a newer
    /// server's, read by an older CLI) reads as `Unknown` and is shown as written.
    pub enum CheckStatus(other Unknown) {
        Pass = "pass",
        /// A deploy may still work; worth a look.
        Warn = "warn",
        /// A deploy would fail: `release check` exits 1.
        Fail = "fail",
    }
}

/// One row of `release check` on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRow {
    pub name: String,
    pub status: CheckStatus,
    pub message: String,
}

/// The answer to [`Request::Check`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checked {
    pub checks: Vec<CheckRow>,
}

impl Answer for Fenced {}
impl Answer for Adopted {}
impl Answer for Chunk {}
impl Answer for Status {}
impl Answer for Healthy {}
impl Answer for Checked {}

impl Answer for Prepared {
    fn output(&self) -> Option<&str> {
        Some(&self.output)
    }
}

impl Answer for Switched {
    fn shared(&self) -> &[SharedEntry] {
        &self.shared
    }
}

impl Answer for Cleaned {
    fn output(&self) -> Option<&str> {
        Some(&self.output)
    }
}

impl Answer for Ran {
    fn output(&self) -> Option<&str> {
        Some(&self.output)
    }
}

impl Answer for Pm2Checked {
    fn output(&self) -> Option<&str> {
        Some(&self.output)
    }
}

/// The request on the first line of `input` (what follows the newline, an artifact's bytes,
/// is not looked at). Pure: what `release node` makes of its stdin before acting on it.
pub fn decode_request(input: &[u8]) -> Result<Request, NodeError> {
    let line = input.split(|b| *b == b'\n').next().unwrap_or_default();
    if input.is_empty() {
        return Err(NodeError::new(ErrorCode::BadRequest, "no request on stdin"));
    }
    serde_json::from_slice(line).map_err(|e| NodeError::new(ErrorCode::BadRequest, format!("not a node request: {e}")))
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
            assert_eq!(err.code, ErrorCode::BadRequest);
            assert!(err.message.contains(says), "{input:?}: {}", err.message);
        }
    }

    #[test]
    fn error_codes_go_on_the_wire_as_they_are_named() {
        use ErrorCode::*;
        let all = [
            BadRequest,
            Locked,
            Fenced,
            NotReady,
            NotAdopted,
            Drift,
            Missing,
            LiveUnready,
            Io,
            DiskFull,
            Fetch,
            DigestMismatch,
            IndexMismatch,
            UnsafeArchive,
            SharedMissing,
            SharedInArtifact,
            SharedThroughLink,
            HookFailed,
            HookTimeout,
            HookUser,
            HealthFailed,
            Pm2,
            Pm2Cwd,
            Adopt,
            Unadoptable,
            Unknown,
        ];
        assert_eq!(all, ErrorCode::ALL, "every code, in order");
        let newer: ErrorCode = serde_json::from_value("format_disk".into()).unwrap();
        assert_eq!((newer.is_known(), serde_json::to_value(newer).unwrap()), (false, "format_disk".into()));
        for code in all {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str(), "{code:?}");
            assert_eq!(serde_json::from_value::<ErrorCode>(code.as_str().into()).unwrap(), code);
        }
        let refused: Vec<&str> = all.iter().filter(|c| c.refused_before_switch()).map(|c| c.as_str()).collect();
        assert_eq!(refused, ["locked", "fenced", "not_ready", "not_adopted", "drift"]);
    }

    /// `release check`'s rows keep their wire names (`pass`, `warn`, `fail`); a status of
    /// another build reads, shown as written, and does not count as a failure.
    #[test]
    fn check_rows_go_on_the_wire_by_their_status_names() {
        for (status, wire) in [(CheckStatus::Pass, "pass"), (CheckStatus::Warn, "warn"), (CheckStatus::Fail, "fail")] {
            let row = CheckRow { name: "base".into(), status, message: "m".into() };
            let value = serde_json::to_value(&row).unwrap();
            assert_eq!(value, serde_json::json!({"name": "base", "status": wire, "message": "m"}));
            assert_eq!(serde_json::from_value::<CheckRow>(value).unwrap(), row);
        }
        let newer: CheckRow =
            serde_json::from_value(serde_json::json!({"name": "cpu", "status": "skip", "message": "m"})).unwrap();
        assert_eq!((newer.status.as_str(), newer.status.is_known()), ("skip", false));
        assert_ne!(newer.status, CheckStatus::Fail);
    }

    #[test]
    fn every_answer_names_its_protocol_and_whether_it_is_a_refusal() {
        let ok = answer(Ok(serde_json::to_value(Fenced { fence: 7 }).unwrap()));
        assert_eq!(ok, serde_json::json!({"ok": true, "protocol": VERSION, "fence": 7}));
        let refused = answer(Err(NodeError::new(ErrorCode::Locked, "another deploy")));
        assert_eq!(
            refused,
            serde_json::json!({"ok": false, "protocol": VERSION, "code": "locked", "message": "another deploy"})
        );
    }
}
