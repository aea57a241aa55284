//! Typed configuration: defaults, then the TOML file, then `RELEASE_*` variables and flags.
//!
//! The file is parsed whole (SPEC 8a), even the parts that later subsystems act on, so that a
//! typo anywhere is caught at start. Every error names the file and the key. Secrets are held in
//! [`Secret`], whose `Debug` never shows them.

mod file;
mod net;
mod node;
mod units;
mod webhook;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::digest::Digest;

pub use file::is_valid_name;
use file::*;
pub use net::{IpRange, mask, source};
pub use node::{Node, check_host, check_user};
pub use units::{ByteSize, HumanDuration};
pub use webhook::{Format, Webhook};

/// The commented example that `release init` writes; a test keeps it parseable.
pub const EXAMPLE: &str = include_str!("example.toml");

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "./release-data";

/// What went wrong loading the configuration. Always names the file and, where there is one,
/// the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}{line}: {key}{message}", line = line.map(|l| format!(":{l}")).unwrap_or_default(),
        key = if key.is_empty() { String::new() } else { format!("key `{key}`: ") })]
    Parse { path: PathBuf, line: Option<usize>, key: String, message: String },
    #[error("{path}: key `{key}`: {message}")]
    Invalid { path: String, key: String, message: String },
}

/// A secret from the configuration: printed and debugged as `"<redacted>"`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// The resolved configuration the server runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from, if any (for messages).
    pub source: Option<PathBuf>,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: Option<TlsConfig>,
    /// Where nodes reach this server (`[server] node_url`): with the local store they fetch
    /// artifacts from it by signed URL instead of through SSH.
    pub node_url: Option<String>,
    /// Where people reach the pages (`[server] public_url`), for links in notifications;
    /// without a trailing `/`.
    pub public_url: Option<String>,
    /// Proxies whose `X-Forwarded-For` names the client (`[server] trusted_proxies`); empty:
    /// the client is always the peer of the connection.
    pub trusted_proxies: Vec<IpRange>,
    pub storage: StorageConfig,
    pub limits: Limits,
    pub ssh: SshConfig,
    pub audit: AuditConfig,
    pub backup: BackupConfig,
    /// In lifecycle order.
    pub environments: Vec<Environment>,
    pub services: BTreeMap<String, Service>,
    /// Receivers of release events (`[[webhook]]`), in the file's order.
    pub webhooks: Vec<Webhook>,
}

/// Values from flags and `RELEASE_*` variables, which win over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where artifact bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageConfig {
    /// A directory on this machine (the embedded default: `<data_dir>/objects`).
    Local {
        path: PathBuf,
    },
    S3(S3Config),
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Prepended to every key, e.g. `"release/"`.
    #[serde(default)]
    pub prefix: String,
    /// Virtual-hosted-style addressing (`bucket.endpoint`); path-style when false.
    #[serde(default)]
    pub virtual_hosted: bool,
    /// Falls back to `AWS_ACCESS_KEY_ID` when absent.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Falls back to `AWS_SECRET_ACCESS_KEY` when absent.
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
}

/// What one client may make the server hold or do: upload sizes (checked while an upload
/// streams in), other bodies, connections and their timeouts, and how often the requests that
/// make the server work hard are served fresh. README's "Limits" section states each.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The archive as sent.
    pub max_upload_bytes: ByteSize,
    /// What the archive would unpack to (tar stream bytes, headers included).
    pub max_unpacked_bytes: ByteSize,
    /// Entries in the archive.
    pub max_files: u64,
    /// Uploads received at once; more wait for a turn. Each may hold up to ~64 MiB.
    pub max_concurrent_uploads: u32,
    /// The body of any request but an upload (forms and JSON); larger ones get 413.
    pub max_body_bytes: ByteSize,
    /// Connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: u32,
    /// Connections open at once from one source (an IPv4 address or an IPv6 /64; trusted
    /// proxies aside); more are closed as soon as they are accepted.
    pub max_connections_per_source: u32,
    /// A request's line and headers must arrive within this, counted from the connection's
    /// opening or the end of the previous answer on it (so it is also the keep-alive idle limit).
    pub header_timeout: HumanDuration,
    /// Every request but an upload: its body read and its answer begun within this.
    pub request_timeout: HumanDuration,
    /// A client that takes no byte of an answer for this long is disconnected (streams:
    /// exports, artifact downloads).
    pub send_timeout: HumanDuration,
    /// An upload that sends no byte for this long is aborted (408), its turn freed.
    pub upload_stall_timeout: HumanDuration,
    /// An upload slower than this many bytes a second, averaged over `upload_rate_window`
    /// (time spent waiting for the client only), is aborted (408). 0: no minimum.
    pub min_upload_rate: ByteSize,
    pub upload_rate_window: HumanDuration,
    /// `status --nodes` asks a cell's nodes at most once in this long; answers this fresh are
    /// shared by every caller, with the time they were asked.
    pub node_status_max_age: HumanDuration,
    /// A node's fetch of an artifact (by signed or presigned URL) that brings no byte for this
    /// long fails its prepare (and the deploy), instead of waiting for the command timeout.
    pub node_fetch_stall_timeout: HumanDuration,
    /// `audit verify`: each token gets at most one fresh walk of the chain in this long (429
    /// otherwise); an answer this fresh is reused while the chain's head has not moved.
    pub verify_interval: HumanDuration,
}

impl Limits {
    /// Tokio's blocking pool, capped (its default, 512, let ~250 threads pile up under 64
    /// readers, each with its own allocator heap and stack). Registry work has its own fixed
    /// threads ([`crate::registry::run`]); this pool keeps the rest: every upload being received
    /// holds two threads for its whole length (hasher and archive checker), and file I/O (the
    /// local store, `tokio::fs`), DNS lookups for webhooks and the like take one for a moment.
    /// Derived from `max_concurrent_uploads` so that uploads can never take every thread and
    /// leave their own file writes waiting.
    pub fn blocking_threads(&self) -> usize {
        const SPARE: usize = 32;
        2 * self.max_concurrent_uploads as usize + SPARE
    }
}

impl Default for Limits {
    fn default() -> Self {
        let secs = |s| HumanDuration(Duration::from_secs(s));
        Limits {
            max_upload_bytes: ByteSize(4 << 30),
            max_unpacked_bytes: ByteSize(16 << 30),
            max_files: 500_000,
            max_concurrent_uploads: 4,
            max_body_bytes: ByteSize(64 << 10),
            max_connections: 1024,
            max_connections_per_source: 256,
            header_timeout: secs(10),
            request_timeout: secs(60),
            send_timeout: secs(60),
            upload_stall_timeout: secs(30),
            min_upload_rate: ByteSize(64 << 10),
            upload_rate_window: secs(60),
            node_status_max_age: secs(30),
            node_fetch_stall_timeout: secs(60),
            verify_interval: secs(30),
        }
    }
}

/// The audit log: its checkpoints in the object store, and how refusals are counted.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often the chain's head is checkpointed to the object store (when it moved).
    pub checkpoint_interval: HumanDuration,
    /// The window over which refusals without a valid token are counted into one event per
    /// source (and a token's refusals past its budget into one per token).
    pub refusal_window: HumanDuration,
}

/// The server's own registry backups to the object store (`[backup]`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// How often the server backs up the registry; `"0s"` turns it off.
    pub interval: HumanDuration,
    /// How many backups to keep (older ones are deleted, never the newest).
    pub keep: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig { interval: HumanDuration(Duration::from_secs(24 * 3600)), keep: 30 }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_interval: HumanDuration(Duration::from_secs(60)),
            refusal_window: HumanDuration(Duration::from_secs(60)),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub connect_timeout: Option<HumanDuration>,
    pub command_timeout: Option<HumanDuration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Environment {
    pub name: String,
    pub promote_from: Option<String>,
    pub requires_approval: bool,
    pub approval_ttl: Duration,
    pub parallel: u32,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Laravel,
    Node,
    Generic,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub kind: ServiceKind,
    /// Paths (relative to a release) linked from `<base>/shared`; never allowed inside an artifact.
    pub shared: Vec<String>,
    pub keep: u32,
    pub health: Option<HealthCheck>,
    pub hooks: Hooks,
    /// Environment variables for the service's hooks and checks on its nodes (PATH, PM2_HOME…).
    pub env: BTreeMap<String, String>,
    pub nodes: Vec<Node>,
    /// `node` services: the PM2 app the default reload reloads and verify checks (`pm2_app`,
    /// default the service's name). `None` for other kinds.
    pub pm2_app: Option<String>,
    /// The user the application's hooks run as, through `sudo -n -u` (`hook_user`, e.g.
    /// `www-data`): finalize, migrate, and the reload commands that start with `php `.
    pub hook_user: Option<String>,
    /// The umask of every hook (`umask = "0002"`): files and directories they make in
    /// `shared/` stay writable by the group (the web server's).
    pub umask: Option<u32>,
}

/// A service's health check, asked from each node after its reload. Answers are sorted into
/// three: *good* (2xx, with `expect` in the body when set), *not up yet* (no connection, a
/// timeout, 502/503/504: workers restarting), *wrong* (any other status, or a 2xx without
/// `expect`). The release is healthy after `healthy_after` good answers in a row; it fails
/// at once after `unhealthy_after` wrong ones in a row, and after `timeout` otherwise.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub url: String,
    #[serde(default)]
    pub expect: Option<String>,
    #[serde(default = "health_defaults::timeout")]
    pub timeout: HumanDuration,
    /// The pause between two asks.
    #[serde(default = "health_defaults::interval")]
    pub interval: HumanDuration,
    #[serde(default = "health_defaults::healthy_after")]
    pub healthy_after: u32,
    #[serde(default = "health_defaults::unhealthy_after")]
    pub unhealthy_after: u32,
}

/// The health check's defaults: a release answering 500 is switched back about a second
/// after its reload (5 wrong answers 200 ms apart); one still starting has 15 s.
pub mod health_defaults {
    use super::HumanDuration;
    use std::time::Duration;

    pub fn timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(15))
    }
    pub fn interval() -> HumanDuration {
        HumanDuration(Duration::from_millis(200))
    }
    pub fn healthy_after() -> u32 {
        1
    }
    pub fn unhealthy_after() -> u32 {
        5
    }
}

/// Shell commands per phase; `None` means the kind's default.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    pub finalize: Option<Vec<String>>,
    pub migrate: Option<Vec<String>>,
    pub reload: Option<Vec<String>>,
}

impl Service {
    /// Whether the health check proves the new code answers: `{digest}` in its URL or in the
    /// text it expects. A release live without that proof is *unverified* (SPEC 7).
    pub fn health_proves_digest(&self) -> bool {
        self.health
            .as_ref()
            .is_some_and(|h| h.url.contains("{digest}") || h.expect.as_deref().is_some_and(|e| e.contains("{digest}")))
    }

    /// The digest of what this service's deploys to `environment` run with (its hooks run as
    /// shell on production): kind, shared paths, hooks, health check, hook environment, keep,
    /// the PM2 app, the environment's nodes and parallelism, and this binary's version (whose kind
    /// defaults fill the hooks left unset). Canonical JSON (sorted keys), hashed.
    pub fn config_digest(&self, environment: &Environment) -> Digest {
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .filter(|n| n.environment == environment.name)
            .map(|n| {
                serde_json::json!({
                    "name": n.display_name(), "host": n.host, "port": n.port, "user": n.user,
                    "base": n.base, "migrate": n.migrate,
                })
            })
            .collect();
        let canonical = serde_json::json!({
            "release": env!("CARGO_PKG_VERSION"),
            "service": self.name,
            "kind": self.kind,
            "shared": self.shared,
            "keep": self.keep,
            "health": self.health.as_ref().map(|h| serde_json::json!({
                "url": h.url, "expect": h.expect, "timeout_ms": h.timeout.0.as_millis() as u64,
                "interval_ms": h.interval.0.as_millis() as u64, "healthy_after": h.healthy_after,
                "unhealthy_after": h.unhealthy_after,
            })),
            "hooks": {"finalize": self.hooks.finalize, "migrate": self.hooks.migrate, "reload": self.hooks.reload},
            "env": self.env,
            "pm2_app": self.pm2_app,
            "hook_user": self.hook_user,
            "umask": self.umask,
            "environment": environment.name,
            "parallel": environment.parallel,
            "nodes": nodes,
        });
        Digest::of(canonical.to_string().as_bytes())
    }
}

impl Config {
    /// Loads the file (if any), applies the overrides and checks the whole.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let parsed = match file {
            None => File::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                parse_file(path, &text)?
            }
        };
        resolve(file, parsed, overrides, &|var| std::env::var(var).ok())
    }

    /// The configuration a file holding `text` gives, without overrides, reading nothing but
    /// `text`: no file and no environment (a webhook's `secret_env` is refused as unset).
    /// Pure, so the fuzz target can parse through it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let origin = Path::new("(TOML text)");
        let config = resolve(Some(origin), parse_file(origin, text)?, &Overrides::default(), &|_| None)?;
        Ok(Config { source: None, ..config })
    }

    /// The embedded default (SPEC 8): no file, no overrides.
    pub fn embedded_default() -> Config {
        Config::load(None, &Overrides::default()).expect("the embedded default is valid")
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn registry_path(&self) -> PathBuf {
        self.data_dir.join("registry.db")
    }
}

#[cfg(test)]
mod tests;
