//! The SSH transport: one multiplexed session per node (the `openssh` crate driving the system
//! `ssh`), key authentication, host keys always checked against the configured known_hosts,
//! timeouts on connecting and on every command. The node agent is this very binary, shipped
//! to `~/.release/bin/release-<sha256 prefix>` when the node lacks it (checksum compared), or
//! over what is there when that answers as another build, so a node needs nothing but sshd
//! and a user.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::transport::{CallError, Input, MAX_STDERR, Transport, exchange, parse_answer, read_capped};
use crate::config::{Node, SshConfig};
use crate::node::Request;

/// Agent binaries (of different builds) kept on a node: this server's and the newest others
/// (another server, or the build before an upgrade).
const KEEP_BINARIES: usize = 3;
/// How long connecting may take unless `ssh.connect_timeout` says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an SSH master with nothing to do stays up: kept sessions spare a rollback the
/// handshake, and a master whose server was killed ends by itself after this.
const IDLE_PERSIST: usize = 3600;
/// The longest control directory the master's socket still fits in: OpenSSH binds it first
/// as `<dir>/.ssh-connectionXXXXXX/master.<16 random>` (46 bytes after the directory), and a
/// unix socket path holds 107.
const MAX_CONTROL_DIR: usize = 107 - 46;

/// This binary and its SHA-256, computed once.
fn this_binary() -> Result<&'static (PathBuf, String), String> {
    static BINARY: OnceLock<Result<(PathBuf, String), String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            // /proc/self/exe: still this binary after an upgrade replaced the file on disk.
            let path = PathBuf::from("/proc/self/exe");
            let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Ok((path, hex::encode(Sha256::digest(&bytes))))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// SSH sessions kept open between deploys, one per node (`user@host:port`): a rollback then
/// needs no new handshake (~0.1 s per node here, and the binary check). A session that no
/// longer answers a check is replaced by a new connection.
#[derive(Default)]
pub struct Pool {
    sessions: tokio::sync::Mutex<HashMap<String, Arc<Ssh>>>,
    /// Where the masters' control sockets are (else the `openssh` crate's default).
    control_dir: Option<PathBuf>,
}

impl Pool {
    /// A pool whose masters keep their control sockets in `dir` (the server's own, under its
    /// data directory), or in the crate's default place when `dir` cannot hold them.
    pub fn new(dir: &Path) -> Pool {
        let usable = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)))
            .and_then(|()| dir.canonicalize());
        let control_dir = match usable {
            Ok(dir) if dir.as_os_str().len() <= MAX_CONTROL_DIR => Some(dir),
            Ok(dir) => {
                tracing::warn!(dir = %dir.display(), "path too long for SSH control sockets; using the default place");
                None
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot use it for SSH control sockets");
                None
            }
        };
        Pool { sessions: Default::default(), control_dir }
    }

    /// Ends the masters a killed server left in the control directory: they would otherwise
    /// hold their connections open for as long as the nodes answer. Only once the server
    /// holds the data directory's lock (a server refused by the lock must not end the masters
    /// of the one running), and before it connects anywhere.
    pub fn end_masters_left_behind(&self) {
        if let Some(dir) = &self.control_dir {
            end_masters_left_in(dir);
        }
    }

    pub async fn get(&self, node: &Node, config: &SshConfig, timeout: Duration) -> Result<Arc<Ssh>, String> {
        let key = format!("{}@{}:{}", node.user.as_deref().unwrap_or(""), node.host, node.port);
        let kept = self.sessions.lock().await.get(&key).cloned();
        if let Some(ssh) = kept {
            let check = config.connect_timeout.map_or(CONNECT_TIMEOUT, |d| d.0);
            if matches!(tokio::time::timeout(check, ssh.session.check()).await, Ok(Ok(()))) {
                return Ok(ssh);
            }
        }
        let ssh = Arc::new(Ssh::connect(node, config, timeout, self.control_dir.as_deref()).await?);
        self.sessions.lock().await.insert(key, Arc::clone(&ssh));
        Ok(ssh)
    }
}

pub struct Ssh {
    session: Arc<Session>,
    /// The agent's path on the node, relative to the login directory.
    program: String,
    timeout: Duration,
    node: String,
}

impl Ssh {
    /// Connects (checking the host key) and makes sure the node has this binary.
    pub async fn connect(
        node: &Node,
        config: &SshConfig,
        timeout: Duration,
        control_dir: Option<&Path>,
    ) -> Result<Ssh, String> {
        let name = node.display_name();
        // Checked at load already; again here because the `openssh` crate passes the host as
        // ssh's last argument with no `--` before it, where one beginning with `-` is an option.
        crate::config::check_host(&node.host)?;
        if let Some(user) = &node.user {
            crate::config::check_user(user)?;
        }
        let mut builder = SessionBuilder::default();
        if let Some(dir) = control_dir {
            builder.control_directory(dir);
        }
        builder
            .control_persist(ControlPersist::IdleFor(IDLE_PERSIST.try_into().expect("not zero")))
            .known_hosts_check(KnownHosts::Strict)
            .port(node.port)
            .connect_timeout(config.connect_timeout.map_or(CONNECT_TIMEOUT, |d| d.0))
            .server_alive_interval(Duration::from_secs(15));
        if let Some(user) = &node.user {
            builder.user(user.clone());
        }
        if let Some(identity) = &config.identity {
            builder.keyfile(identity);
        }
        if let Some(known_hosts) = &config.known_hosts {
            builder.user_known_hosts_file(known_hosts);
        }
        let session =
            builder.connect_mux(&node.host).await.map_err(|e| format!("cannot connect: {}", crate::error_chain(&e)))?;
        let (path, sum) = this_binary()?;
        let ssh = Ssh {
            session: Arc::new(session),
            program: format!(".release/bin/release-{}", &sum[..16]),
            timeout,
            node: name,
        };
        ssh.ship(path, sum, false).await?;
        Ok(ssh)
    }

    /// Copies this binary to the node unless it is there already; written under a temporary
    /// name, checked, then renamed, so a cut-off copy is never run. Sessions shipping to the
    /// same home at once (several nodes of one machine, several servers) take turns under a
    /// lock (`flock`, where the node has it) and look again before copying: one copy crosses,
    /// the others stop after the first window of bytes. In the same round trip, binaries of
    /// other builds are pruned: the newest `KEEP_BINARIES` stay (this one is touched first,
    /// so it is always among them). With `replace`, the binary at this build's path is
    /// replaced even though it is there (it answered as another build: see [`Ssh::call`]);
    /// the rename keeps the path runnable throughout.
    async fn ship(&self, path: &Path, sum: &str, replace: bool) -> Result<(), String> {
        let prune = format!(
            "(cd .release/bin && ls -t | grep -E '^release-[0-9a-f]{{16}}$' | tail -n +{} | xargs -r rm -f --)",
            KEEP_BINARIES + 1
        );
        let present = format!("test -x {program} || exit 1; touch {program}; {prune}", program = self.program);
        if !replace && self.shell(&present, None).await.is_ok() {
            return Ok(());
        }
        let already_there = if replace {
            String::new()
        } else {
            format!(
                "if test -x {program}; then touch {program}; {prune}; exit {ALREADY_THERE}; fi; ",
                program = self.program
            )
        };
        let bytes = tokio::fs::read(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let tmp = format!("{}.tmp-$$", self.program);
        let script = format!(
            "set -e; mkdir -p .release/bin; \
             if command -v flock >/dev/null; then exec 9>.release/bin/.ship-lock; flock 9 || true; fi; \
             {already_there}cat > {tmp}; \
             test \"$(sha256sum {tmp} | cut -d' ' -f1)\" = {sum} || {{ rm -f {tmp}; echo 'checksum mismatch' >&2; exit 3; }}; \
             chmod 755 {tmp}; mv {tmp} {program}; {prune}",
            program = self.program
        );
        match self.shell(&script, Some(bytes)).await {
            Ok(()) | Err(Shell::Exit(ALREADY_THERE, _)) => Ok(()),
            Err(e) => Err(format!("cannot ship the release binary: {e}")),
        }
    }

    /// Runs a shell script on the node, with `input` on its stdin. An exit status is the
    /// script's answer even when it stopped reading its input early.
    async fn shell(&self, script: &str, input: Option<Vec<u8>>) -> Result<(), Shell> {
        let run = async {
            let mut child = self
                .session
                .raw_command(format!("sh -c '{}'", script.replace('\'', "'\\''")))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .await
                .map_err(|e| Shell::Failed(e.to_string()))?;
            let mut stdin = child.stdin().take().expect("piped");
            let mut stderr = child.stderr().take().expect("piped");
            let writing = async {
                let written = match input {
                    Some(input) => stdin.write_all(&input).await,
                    None => Ok(()),
                };
                drop(stdin);
                written
            };
            let reading = async { read_capped(&mut stderr, MAX_STDERR, false).await.0 };
            let (written, err) = tokio::join!(writing, reading);
            let status = child.wait().await.map_err(|e| Shell::Failed(e.to_string()))?;
            let err = String::from_utf8_lossy(&err).trim().to_owned();
            match status.code() {
                Some(0) => written.map_err(|e| Shell::Failed(format!("sending the input: {e}"))),
                Some(code) => Err(Shell::Exit(code, err)),
                None => Err(Shell::Failed(format!("{status}: {err}"))),
            }
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| Shell::Failed(format!("no answer within {:?}", self.timeout)))?
    }
}

/// The exit status by which the shipping script says another session shipped the binary.
const ALREADY_THERE: i32 = 10;

/// How a shell script on the node ended, when not well.
#[derive(Debug)]
enum Shell {
    Exit(i32, String),
    Failed(String),
}

impl std::fmt::Display for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shell::Exit(code, err) => write!(f, "exit status {code}: {err}"),
            Shell::Failed(why) => f.write_str(why),
        }
    }
}

/// Ends every SSH master whose control socket a previous server left in `dir` (`ssh -O exit`),
/// and removes its directory. The data directory's lock says that server is gone.
fn end_masters_left_in(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with(".ssh-connection") {
            continue;
        }
        let socket = path.join("master");
        if socket.exists() {
            let ended = std::process::Command::new("ssh")
                .arg("-S")
                .arg(&socket)
                .args(["-O", "exit", "--", "left-behind"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .and_then(|mut child| wait_briefly(&mut child));
            tracing::warn!(socket = %socket.display(), ended = ?ended, "ended an SSH master a stopped server left");
        }
        let _ = std::fs::remove_dir_all(&path);
    }
}

/// Waits up to 5 s for `child`, then kills it.
fn wait_briefly(child: &mut std::process::Child) -> std::io::Result<bool> {
    for _ in 0..100 {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    Ok(false)
}

impl Transport for Ssh {
    fn call<'a>(&'a self, request: &'a Request, input: Input) -> BoxFuture<'a, Result<serde_json::Value, CallError>> {
        Box::pin(async move {
            let exchange = async {
                let mut child = self
                    .session
                    .raw_command(format!("{} node --protocol {}", self.program, crate::node::VERSION))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .await
                    .map_err(|e| format!("cannot run the node agent: {e}"))?;
                let (stdin, stdout, stderr) = (
                    child.stdin().take().expect("piped"),
                    child.stdout().take().expect("piped"),
                    child.stderr().take().expect("piped"),
                );
                let (sent, out, err) = exchange(request, input, stdin, stdout, stderr).await?;
                let status = child.wait().await.map_err(|e| format!("lost the connection: {e}"))?;
                Ok::<_, String>((sent, out, err, status.success()))
            };
            let (sent, out, err, ok) = tokio::time::timeout(self.timeout, exchange)
                .await
                .map_err(|_| CallError::Transport(format!("{}: no answer within {:?}", self.node, self.timeout)))?
                .map_err(CallError::Transport)?;
            match parse_answer(&out, &err, ok, sent) {
                // The path names this build's checksum, yet what runs there is another build
                // (put there by hand, or an old agent copied over it): replaced by this
                // server's binary, so the next call finds the right agent.
                Err(e @ CallError::Foreign(_)) => {
                    let replaced = match this_binary() {
                        Ok((path, sum)) => self.ship(path, sum, true).await,
                        Err(e) => Err(e),
                    };
                    let done = match replaced {
                        Ok(()) => "it was replaced by this server's binary: deploy again".to_owned(),
                        Err(why) => format!("replacing it failed: {why}"),
                    };
                    Err(CallError::Transport(format!("{e} (at ~/{} on {}); {done}", self.program, self.node)))
                }
                answer => answer,
            }
        })
    }
}
