//! What the node agent does to `<base>`: prepare, switch, status, cleanup, exec, health.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::protocol::{
    Adopted, Answer, Chunk, Cleaned, ErrorCode, Fenced, Healthy, Legacy, Pm2Checked, Prepared, Ran, SharedEntry,
    SharedKind, Status, Switched,
};
use super::{Exec, Health, Modes, NodeError, Prepare, Request, RunAs, Source, drain, is_writable, remove_tree, unpack};
use crate::archive::CheckOptions;
use crate::digest::Digest;

/// The last bytes of a hook's output kept in the answer (and in the registry).
const OUTPUT_TAIL: usize = 4000;
/// Shared files larger than this are not hashed at a switch (recorded as unreadable).
const SHARED_HASH_LIMIT: u64 = 64 << 20;
/// How long a deploy waits for another one holding the base's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Does what `request` asks; its answer as it goes on the wire.
pub fn handle(request: Request, input: &mut dyn BufRead) -> Result<Value, NodeError> {
    fn wire(answer: Result<impl Answer, NodeError>) -> Result<Value, NodeError> {
        answer.map(|a| serde_json::to_value(a).expect("answers serialize"))
    }
    match request {
        Request::Prepare(p) => wire(prepare(&p, input)),
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

/// The paths of one base.
struct Layout {
    base: PathBuf,
}

impl Layout {
    fn releases(&self) -> PathBuf {
        self.base.join("releases")
    }
    fn release(&self, digest: Digest) -> PathBuf {
        self.releases().join(digest.hex())
    }
    fn ready(&self, digest: Digest) -> PathBuf {
        self.base.join(".release/ready").join(digest.hex())
    }
    /// The shared files a release's finalize hooks last ran with (JSON, as `shared_file`).
    fn finalized_with(&self, digest: Digest) -> PathBuf {
        self.base.join(".release/finalized").join(digest.hex())
    }
    fn current(&self) -> PathBuf {
        self.base.join("current")
    }
    fn shared(&self) -> PathBuf {
        self.base.join("shared")
    }
    fn adopted_package(&self) -> PathBuf {
        self.base.join(".release/adopted.tar.zst")
    }

    /// Whether `current` is a plain directory: an application deployed another way.
    fn current_is_plain_dir(&self) -> bool {
        fs::symlink_metadata(self.current()).is_ok_and(|m| m.is_dir())
    }

    fn create(&self) -> Result<(), NodeError> {
        for dir in [self.releases(), self.shared(), self.base.join(".release/ready")] {
            fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        }
        Ok(())
    }

    /// The digest `current` points at; an error if `current` is not a symlink into releases/.
    fn current_digest(&self) -> Result<Option<Digest>, NodeError> {
        let current = self.current();
        match fs::symlink_metadata(&current) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&current, e)),
            Ok(meta) if !meta.file_type().is_symlink() => Err(NodeError::new(
                ErrorCode::NotAdopted,
                format!(
                    "{} is a plain directory, not a release (an application deployed another way?): \
                     deploy with --adopt to keep it as the release to roll back to",
                    current.display()
                ),
            )),
            Ok(_) => {
                let target = fs::read_link(&current).map_err(|e| io_error(&current, e))?;
                let hex = target.strip_prefix("releases").ok().and_then(|t| t.to_str()).unwrap_or_default();
                hex.parse::<Digest>().map(Some).map_err(|_| {
                    NodeError::new(
                        ErrorCode::Drift,
                        format!("{} points at {}, not a release", current.display(), target.display()),
                    )
                })
            }
        }
    }

    /// Refuses a change from a deploy run older than the newest that took this base (call
    /// under the lock); records `fence` when it is the newest. 0 asks nothing.
    fn fence(&self, fence: u64) -> Result<(), NodeError> {
        if fence == 0 {
            return Ok(());
        }
        let path = self.base.join(".release/fence");
        let newest: u64 = fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        if fence < newest {
            return Err(NodeError::new(
                ErrorCode::Fenced,
                format!(
                    "a newer deploy run (fence {newest}) has taken {}; this one ({fence}) is stale",
                    self.base.display()
                ),
            ));
        }
        if fence > newest {
            // Durable before anything it guards happens: a fence lost to a power cut would let
            // the older run's late calls through again.
            let tmp = self.base.join(format!(".release/fence.tmp-{}", std::process::id()));
            let mut file = fs::File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
            io::Write::write_all(&mut file, fence.to_string().as_bytes()).map_err(|e| io_error(&tmp, e))?;
            file.sync_all().map_err(|e| io_error(&tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
            let dir = self.base.join(".release");
            sync_dir(&dir).map_err(|e| io_error(&dir, e))?;
        }
        Ok(())
    }

    fn hook_record(&self) -> PathBuf {
        self.base.join(".release/hook")
    }

    /// Notes the process group of a hook as it starts (`<pgid> <command>`), so that a hook
    /// outliving its agent (the server was killed, its SSH session cut) is still seen. Best
    /// effort: a hook runs even when the note cannot be written.
    fn record_hook(&self, pgid: u32, command: &str) -> io::Result<()> {
        let path = self.hook_record();
        let command: String = command.chars().take(200).collect();
        fs::write(&path, format!("{pgid} {command}"))
    }

    fn end_hook(&self) {
        let _ = fs::remove_file(self.hook_record());
    }

    /// Waits (up to the lock's wait) while a hook that an earlier agent started still runs:
    /// the lock dies with the agent, the hook may not. The hook runs while its shell, the
    /// leader of its process group, does: background processes it left (`worker &`) are not
    /// waited for, nor daemons it started. A note whose hook is gone is removed.
    fn wait_for_earlier_hook(&self) -> Result<(), NodeError> {
        let path = self.hook_record();
        let started = Instant::now();
        loop {
            let Ok(note) = fs::read_to_string(&path) else { return Ok(()) };
            let (pgid, command) = note.split_once(' ').unwrap_or((note.as_str(), ""));
            // The leader still leads its group: a pid reused since by an unrelated process is
            // not mistaken for it (unless it leads a group of the same id, which only delays
            // the hook by the wait).
            let leader = pgid.parse::<i32>().ok().filter(|p| *p > 1).and_then(rustix::process::Pid::from_raw);
            let alive = leader.is_some_and(|p| rustix::process::getpgid(Some(p)).is_ok_and(|group| group == p));
            if !alive {
                let _ = fs::remove_file(&path);
                return Ok(());
            }
            if started.elapsed() > LOCK_WAIT {
                return Err(NodeError::new(
                    ErrorCode::Locked,
                    format!(
                        "a hook an earlier deploy run started is still running on this node (process group {pgid}: \
                         `{command}`; waited {} s)",
                        LOCK_WAIT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Takes `<base>/.release/lock`, waiting a little for another deploy to finish.
    fn lock(&self) -> Result<fs::File, NodeError> {
        let path = self.base.join(".release/lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        let started = Instant::now();
        while rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            if started.elapsed() > LOCK_WAIT {
                return Err(NodeError::new(
                    ErrorCode::Locked,
                    format!("another deploy holds {} (waited {} s)", path.display(), LOCK_WAIT.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(file)
    }
}

fn io_error(path: &Path, e: io::Error) -> NodeError {
    let code = if e.kind() == io::ErrorKind::StorageFull { ErrorCode::DiskFull } else { ErrorCode::Io };
    NodeError::new(code, format!("{}: {e}", path.display()))
}

fn prepare(p: &Prepare, input: &mut dyn BufRead) -> Result<Prepared, NodeError> {
    let layout = Layout { base: p.base.clone() };
    layout.create()?;
    let _lock = layout.lock()?;
    layout.fence(p.fence)?;
    let live = if p.adopt && layout.current_is_plain_dir() {
        None
    } else {
        layout.current_digest()? // refuses a base that holds an application deployed another way
    };
    let dir = layout.release(p.digest);
    let ready = layout.ready(p.digest);
    let reused = dir.is_dir() && ready.exists();
    if reused {
        if p.source == Source::Stdin {
            drain(input);
        }
        if p.finalize.is_empty() {
            // Nothing to run (a rollback): prepare is only this check.
            return Ok(Prepared {
                dir,
                reused: true,
                refinalized: false,
                output: "artifact: already here, ready".into(),
            });
        }
        let shared_now = shared_fingerprints(&layout, &p.shared);
        if p.finalize_if_shared_changed {
            let recorded = fs::read(layout.finalized_with(p.digest)).ok();
            let then: Option<Vec<SharedEntry>> = recorded.and_then(|r| serde_json::from_slice(&r).ok());
            if then.as_ref() == Some(&shared_now) {
                let output = format!(
                    "artifact: already here, ready; finalized with the shared files as they are: {}",
                    describe_shared(&shared_now)
                );
                return Ok(Prepared { dir, reused: true, refinalized: false, output });
            }
            // Changed since (or never noted): finalize again, writing only where the kind
            // writes (its writable paths, and shared/ through its links).
            let env = release_env(&layout, p.digest, &p.env);
            share_writable(&dir, &p.writable, &p.run_as)?;
            let finalized = run_commands(&layout, &dir, &p.finalize, &env, p.hook_timeout(), &p.run_as)?;
            note_finalized(&layout, p.digest, &shared_now)?;
            sync_fs(&dir).map_err(|e| io_error(&dir, e))?;
            let changed = match &then {
                Some(then) => format!("shared files changed since it was finalized (was: {})", describe_shared(then)),
                None => "no note of the shared files it was finalized with".to_owned(),
            };
            let output = format!(
                "artifact: already here; {changed}: finalized again with {}\n{finalized}",
                describe_shared(&shared_now)
            );
            return Ok(Prepared { dir, reused: true, refinalized: true, output });
        }
        set_writable(&dir).map_err(|e| io_error(&dir, e))?;
        // Finalize runs again (a changed shared/.env is picked up); the release stays ready
        // whatever it does, so a failure never strands a node that can switch back to it.
        let env = release_env(&layout, p.digest, &p.env);
        let finalized = share_writable(&dir, &p.writable, &p.run_as)
            .and_then(|()| run_commands(&layout, &dir, &p.finalize, &env, p.hook_timeout(), &p.run_as));
        set_read_only(&dir, &p.writable).map_err(|e| io_error(&dir, e))?;
        if finalized.is_ok() {
            note_finalized(&layout, p.digest, &shared_now)?;
        }
        sync_fs(&dir).map_err(|e| io_error(&dir, e))?;
        let output = format!("artifact: already here, finalized again\n{}", finalized?);
        return Ok(Prepared { dir, reused: true, refinalized: false, output });
    } else {
        if p.source == Source::Present {
            return Err(NodeError::new(ErrorCode::Missing, format!("{} is not on this node", p.digest)));
        }
        if live == Some(p.digest) {
            return Err(NodeError::new(
                ErrorCode::LiveUnready,
                format!("{} is what current points at, but it is not marked ready: not touched", dir.display()),
            ));
        }
        if dir.exists() {
            // Left unready by a crash: redone.
            remove_tree(&dir).map_err(|e| io_error(&dir, e))?;
        }
        let tmp = layout.releases().join(format!(".tmp-{}", p.digest.hex()));
        remove_tree(&tmp).map_err(|e| io_error(&tmp, e))?;
        let options = CheckOptions {
            max_unpacked_bytes: p.max_unpacked_bytes,
            max_files: p.max_files,
            shared: p.shared.clone(),
            record_migrations: false,
        };
        // Without finalize hooks nothing runs in the tree before it is sealed, so its files
        // are written read-only at once and only its directories are sealed afterwards.
        let modes = if p.finalize.is_empty() { Modes::Sealed(&p.writable) } else { Modes::Writable };
        let stalled = std::rc::Rc::new(std::cell::Cell::new(None));
        let unpacked = match &p.source {
            Source::Stdin => unpack(input, &tmp, &options, p.digest, modes),
            Source::Url(url) | Source::Server(url) => {
                let stall = p.fetch_stall_timeout();
                let response = Fetched { inner: fetch(url, stall)?, stall, failed: stalled.clone() };
                unpack(io::BufReader::with_capacity(1 << 20, response), &tmp, &options, p.digest, modes)
            }
            Source::Present => unreachable!("answered above"),
        };
        // A fetch that failed mid-way is the cause, whatever the unpacker made of the cut.
        if unpacked.is_err()
            && let Some(why) = stalled.take()
        {
            let _ = remove_tree(&tmp);
            return Err(NodeError::new(ErrorCode::Fetch, why));
        }
        let unpacked = unpacked.map_err(|e| match e {
            super::UnpackError::DigestMismatch { .. } => NodeError::new(ErrorCode::DigestMismatch, e.to_string()),
            super::UnpackError::Unsafe(_) => NodeError::new(ErrorCode::UnsafeArchive, e.to_string()),
            super::UnpackError::Write { ref source, .. } if source.kind() == io::ErrorKind::StorageFull => {
                NodeError::new(ErrorCode::DiskFull, e.to_string())
            }
            super::UnpackError::Write { .. } => NodeError::new(ErrorCode::Io, e.to_string()),
        })?;
        fs::rename(&tmp, &dir).map_err(|e| io_error(&dir, e))?;
        sync_dir(&layout.releases()).map_err(|e| io_error(&layout.releases(), e))?;
        let mut dirs = unpacked.dirs;
        link_shared(&layout, &dir, &p.shared, &mut dirs)?;
        if let Modes::Sealed(writable) = modes {
            seal_dirs(&dir, &dirs, writable).map_err(|e| io_error(&dir, e))?;
        }
    }
    let env = release_env(&layout, p.digest, &p.env);
    let shared_now = shared_fingerprints(&layout, &p.shared);
    if !p.finalize.is_empty() {
        share_writable(&dir, &p.writable, &p.run_as)?;
    }
    let output = run_commands(&layout, &dir, &p.finalize, &env, p.hook_timeout(), &p.run_as)?;
    if !p.finalize.is_empty() {
        note_finalized(&layout, p.digest, &shared_now)?;
    }
    if !p.finalize.is_empty() {
        set_read_only(&dir, &p.writable).map_err(|e| io_error(&dir, e))?;
    }
    // What finalize wrote, the links and the modes are on disk before the marker says ready.
    sync_fs(&dir).map_err(|e| io_error(&dir, e))?;
    fs::write(&ready, b"").map_err(|e| io_error(&ready, e))?;
    sync_dir(ready.parent().expect("ready has a parent")).map_err(|e| io_error(&ready, e))?;
    let how = match p.source {
        Source::Url(_) => "fetched from the object store (presigned URL)",
        Source::Server(_) => "fetched from the release server (signed URL)",
        _ => "streamed from the server",
    };
    Ok(Prepared { dir, reused: false, refinalized: false, output: format!("artifact: {how}\n{output}") })
}

/// GETs the artifact. `stall` bounds the wait for the answer's head and, in reqwest's blocking
/// client, each read of its body after that: a transfer that stops bringing bytes fails
/// after `stall` instead of holding the deploy until the server's command timeout.
fn fetch(url: &str, stall: Duration) -> Result<reqwest::blocking::Response, NodeError> {
    let response = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(stall)
        .build()
        .map_err(|e| NodeError::new(ErrorCode::Fetch, e.to_string()))?
        .get(url)
        .send()
        // Without the URL: it carries the signature, and this text is stored with the phase.
        .map_err(|e| NodeError::new(ErrorCode::Fetch, format!("cannot fetch the artifact: {}", e.without_url())))?;
    if !response.status().is_success() {
        return Err(NodeError::new(ErrorCode::Fetch, format!("fetching the artifact: HTTP {}", response.status())));
    }
    Ok(response)
}

/// The body of a fetch, remembering why it failed (a read that timed out: it stalled), so that
/// the answer names the fetch rather than what the unpacker made of the cut-off stream.
struct Fetched {
    inner: reqwest::blocking::Response,
    stall: Duration,
    failed: std::rc::Rc<std::cell::Cell<Option<String>>>,
}

impl Read for Fetched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let started = Instant::now();
        self.inner.read(buf).inspect_err(|e| {
            let why = if started.elapsed() >= self.stall {
                format!(
                    "the artifact fetch stalled: no byte for {} s (limits.node_fetch_stall_timeout)",
                    self.stall.as_secs()
                )
            } else {
                format!("the artifact fetch failed: {e}")
            };
            self.failed.set(Some(why));
        })
    }
}

/// Links each shared path of the release to `<base>/shared/<path>` with a relative symlink;
/// the directories it has to make for them are added to `dirs` (relative to `dir`).
fn link_shared(layout: &Layout, dir: &Path, shared: &[String], dirs: &mut Vec<PathBuf>) -> Result<(), NodeError> {
    for path in shared {
        let target = layout.shared().join(path);
        if fs::symlink_metadata(&target).is_err() {
            return Err(NodeError::new(
                ErrorCode::SharedMissing,
                format!(
                    "{} does not exist: create it (file or directory) on this node before deploying",
                    target.display()
                ),
            ));
        }
        let link = dir.join(path);
        // A link placed through a symlinked parent would land somewhere else.
        let mut parent = dir.to_path_buf();
        for component in Path::new(path).parent().into_iter().flat_map(Path::components) {
            parent.push(component);
            if fs::symlink_metadata(&parent).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(NodeError::new(
                    ErrorCode::SharedThroughLink,
                    format!(
                        "the artifact makes {} a symbolic link, so shared {path} cannot be linked there",
                        parent.display()
                    ),
                ));
            }
        }
        if fs::symlink_metadata(&link).is_ok() {
            return Err(NodeError::new(
                ErrorCode::SharedInArtifact,
                format!(
                    "the artifact contains {path}, which the service keeps in shared/: leave it out of the package"
                ),
            ));
        }
        for parent in Path::new(path).ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
            let absolute = dir.join(parent);
            if fs::symlink_metadata(&absolute).is_err() {
                dirs.push(parent.to_owned());
            }
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        }
        // From <base>/releases/<hex>/<parents of path> up to <base>, then down to shared/.
        let depth = 2 + Path::new(path).components().count() - 1;
        let relative = format!("{}shared/{path}", "../".repeat(depth));
        std::os::unix::fs::symlink(&relative, &link).map_err(|e| io_error(&link, e))?;
    }
    Ok(())
}

fn release_env(layout: &Layout, digest: Digest, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = extra.clone();
    env.insert("RELEASE_DIGEST".into(), digest.to_string());
    env.insert("RELEASE_DIR".into(), layout.release(digest).display().to_string());
    env.insert("RELEASE_BASE".into(), layout.base.display().to_string());
    env
}

/// Runs shell commands in `dir`, one after the other; the tail of their output, or the
/// failing command with its tail. A command still running at `deadline` is killed with its
/// whole process group, so a hung hook never holds the base's lock past the server's wait.
/// Runs the hook `commands` in `dir`, one after the other, each in a process group of its own
/// (recorded in `<base>/.release/hook` while it runs: see [`Layout::wait_for_earlier_hook`]).
/// Called under the base's lock.
fn run_commands(
    layout: &Layout,
    dir: &Path,
    commands: &[String],
    env: &BTreeMap<String, String>,
    deadline: Option<Duration>,
    run_as: &RunAs,
) -> Result<String, NodeError> {
    use std::os::unix::process::CommandExt;
    if commands.is_empty() {
        return Ok(String::new());
    }
    layout.wait_for_earlier_hook()?;
    let started = Instant::now();
    let mut output = Vec::new();
    for command in commands {
        let script = match run_as.umask {
            Some(mask) => format!("umask {mask:04o}; exec 2>&1; {command}"),
            None => format!("exec 2>&1; {command}"),
        };
        let user = run_as.user.as_deref().filter(|_| !run_as.php_only || command.trim_start().starts_with("php "));
        let mut shell = match user {
            // sudo resets the environment: the hook's variables go through env(1).
            Some(user) => {
                let mut c = Command::new("sudo");
                c.args(["-n", "-u", user, "--", "env"]).args(env.iter().map(|(k, v)| format!("{k}={v}")));
                c.args(["sh", "-c", &script]);
                c
            }
            None => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(&script).envs(env);
                c
            }
        };
        let mut child = shell
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // sudo's own complaints ("a password is required") come on its stderr, before the
            // hook's `exec 2>&1`: kept, to be shown and told apart from the hook's failures.
            .stderr(if user.is_some() { Stdio::piped() } else { Stdio::inherit() })
            .process_group(0)
            .spawn()
            .map_err(|e| match user {
                Some(user) if e.kind() == io::ErrorKind::NotFound => NodeError::new(
                    ErrorCode::HookFailed,
                    format!(
                        "cannot run `{command}` as hook_user {user}: sudo is not installed on this node \
                         (hooks run as hook_user through `sudo -n -u {user}`)"
                    ),
                ),
                _ => NodeError::new(ErrorCode::HookFailed, format!("cannot run `{command}`: {e}")),
            })?;
        let sudo_said = child.stderr.take().map(|mut stderr| {
            std::thread::spawn(move || {
                let mut said = Vec::new();
                let _ = io::Read::take(&mut stderr, OUTPUT_TAIL as u64).read_to_end(&mut said);
                said
            })
        });
        let record = layout.record_hook(child.id(), command);
        let mut stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read_tail(&mut stdout));
        });
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| NodeError::new(ErrorCode::HookFailed, e.to_string()))? {
                break Some(status);
            }
            if deadline.is_some_and(|d| started.elapsed() > d) {
                // The hook's whole process group (it leads one of its own).
                if let Some(group) = rustix::process::Pid::from_raw(child.id() as i32) {
                    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                }
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if record.is_ok() {
            layout.end_hook();
        }
        // A daemon the hook started may keep the pipe open: wait a little, not for ever.
        let wait = if status.is_some() { Duration::from_secs(30) } else { Duration::from_secs(1) };
        output.extend_from_slice(format!("$ {command}\n").as_bytes());
        let said = sudo_said.and_then(|t| t.join().ok()).unwrap_or_default();
        output.extend_from_slice(&said);
        output.extend_from_slice(&rx.recv_timeout(wait).unwrap_or_default());
        keep_tail(&mut output);
        let failure = match status {
            Some(status) if status.success() => continue,
            Some(status)
                if let Some(user) = user
                    && let Some(why) = sudo_refusal(&String::from_utf8_lossy(&said), user) =>
            {
                NodeError::new(
                    ErrorCode::HookFailed,
                    format!("`{command}` failed ({status}) as hook_user {user}: {why}"),
                )
            }
            Some(status) => NodeError::new(ErrorCode::HookFailed, format!("`{command}` failed ({status})")),
            None => NodeError::new(
                ErrorCode::HookTimeout,
                format!(
                    "`{command}` was still running after {} s and was killed (with its process group)",
                    deadline.unwrap_or_default().as_secs()
                ),
            ),
        };
        let mut e = failure;
        e.output = Some(tail(&output));
        return Err(e);
    }
    Ok(tail(&output))
}

/// What sudo's own stderr means when it refused to run a hook as `user`, with the fix; `None`
/// when it said nothing of the kind (the hook ran, and failed on its own).
fn sudo_refusal(said: &str, user: &str) -> Option<String> {
    let line = said.lines().find(|l| l.starts_with("sudo:"))?.trim();
    if line.contains("unknown user") {
        return Some(format!("{line}: hook_user {user} is not a user on this node"));
    }
    let me = agent_user();
    Some(format!(
        "sudo refused ({line}); the SSH user {me} needs a sudoers line such as `{me} ALL=({user}) NOPASSWD: ALL` \
         (visudo -f /etc/sudoers.d/release)"
    ))
}

/// The name of the user this agent runs as (the SSH user), or its uid when it has none.
pub(super) fn agent_user() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

/// With a hook user, gives the release's writable paths (Laravel's `bootstrap/cache`) to that
/// user's group, group-writable and set-group-ID, so that finalize run as that user can write
/// there. The SSH user must be in that group (or root); the refusal says so.
fn share_writable(dir: &Path, writable: &[String], run_as: &RunAs) -> Result<(), NodeError> {
    let Some(user) = run_as.user.as_deref().filter(|_| !run_as.php_only) else { return Ok(()) };
    let Some((_, gid)) = user_ids(user) else {
        return Err(NodeError::new(ErrorCode::HookUser, format!("hook_user {user} is not a user on this node")));
    };
    for path in writable.iter().map(|w| dir.join(w)).filter(|p| p.exists()) {
        walk_modes(&path, &mut |path, meta| {
            std::os::unix::fs::lchown(path, None, Some(gid))?;
            if meta.is_dir() || meta.is_file() {
                let extra = if meta.is_dir() { 0o2070 } else { 0o060 };
                fs::set_permissions(path, fs::Permissions::from_mode(meta.permissions().mode() | extra))?;
            }
            Ok(())
        })
        .map_err(|e| {
            NodeError::new(
                ErrorCode::HookUser,
                format!(
                    "cannot give {} to the group of hook_user {user} (gid {gid}): {e}; make the SSH user a member \
                     of that group (usermod -aG <group> <ssh user>)",
                    path.display()
                ),
            )
        })?;
    }
    Ok(())
}

/// The uid and primary gid of `user`, from the password database.
pub(super) fn user_ids(user: &str) -> Option<(u32, u32)> {
    let found = nix::unistd::User::from_name(user).ok().flatten()?;
    Some((found.uid.as_raw(), found.gid.as_raw()))
}

/// Reads `from` to its end, keeping only its last `OUTPUT_TAIL` bytes: a hook may print
/// without bound (300 MB once took the agent to ~700 MiB of memory), only the tail is answered.
fn read_tail(from: &mut impl Read) -> Vec<u8> {
    let mut kept = Vec::with_capacity(2 * OUTPUT_TAIL);
    let mut buf = vec![0; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                keep_tail(&mut kept);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    kept
}

/// Drops all but the last `OUTPUT_TAIL` bytes.
fn keep_tail(bytes: &mut Vec<u8>) {
    if bytes.len() > OUTPUT_TAIL {
        bytes.drain(..bytes.len() - OUTPUT_TAIL);
    }
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Removes every write bit in the release, except under `writable` paths.
fn set_read_only(dir: &Path, writable: &[String]) -> io::Result<()> {
    walk_modes(dir, &mut |path, meta| {
        if is_writable(path.strip_prefix(dir).expect("walked under dir"), writable) {
            return Ok(());
        }
        let mode = meta.permissions().mode();
        fs::set_permissions(path, fs::Permissions::from_mode(mode & !0o222))
    })
}

/// Seals the directories of a release whose files were written read-only already: the same
/// modes as [`set_read_only`] gives, without walking every file.
fn seal_dirs(dir: &Path, dirs: &[PathBuf], writable: &[String]) -> io::Result<()> {
    for relative in dirs {
        if is_writable(relative, writable) {
            continue;
        }
        let path = dir.join(relative);
        let meta = fs::symlink_metadata(&path)?;
        // A directory entry at the path of an earlier symlink made nothing of its own: as the
        // walk does, never seal through a link.
        if !meta.is_dir() {
            continue;
        }
        let mode = meta.permissions().mode();
        fs::set_permissions(&path, fs::Permissions::from_mode((mode | 0o500) & !0o222))?;
    }
    Ok(())
}

/// Gives the owner write permission back (before finalize runs again on a reused release).
fn set_writable(dir: &Path) -> io::Result<()> {
    walk_modes(dir, &mut |path, meta| {
        let mode = meta.permissions().mode();
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200))
    })
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

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Flushes the whole filesystem holding `path` (syncfs(2)): a release's many files at once.
fn sync_fs(path: &Path) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fs::File::open(path)?)?)
}

/// Points `current` at the release with one rename(2) of a fresh relative symlink, then
/// makes the directory entry durable. Without a digest, removes `current`. The shared files
/// are hashed after the rename, so that hashing never widens the gap between nodes.
fn switch(
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
fn exchange_for_symlink(layout: &Layout, target: &str) -> Result<PathBuf, NodeError> {
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
fn adopt(base: &Path, shared: &[String]) -> Result<Adopted, NodeError> {
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
        let copied = Command::new("cp").arg("-a").arg("--").arg(&from).arg(&to).output();
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
fn read_adopted(base: &Path, offset: u64, len: u64) -> Result<Chunk, NodeError> {
    use std::io::{Seek, SeekFrom};
    let path = Layout { base: base.to_owned() }.adopted_package();
    let mut file = fs::File::open(&path).map_err(|e| io_error(&path, e))?;
    let size = file.metadata().map_err(|e| io_error(&path, e))?.len();
    file.seek(SeekFrom::Start(offset)).map_err(|e| io_error(&path, e))?;
    let mut data = Vec::new();
    file.take(len).read_to_end(&mut data).map_err(|e| io_error(&path, e))?;
    Ok(Chunk { data: hex::encode(&data), eof: offset + data.len() as u64 >= size })
}

/// What each shared path holds now, as [`shared_file`] says.
fn shared_fingerprints(layout: &Layout, shared: &[String]) -> Vec<SharedEntry> {
    shared.iter().map(|path| shared_file(&layout.shared(), path)).collect()
}

/// `.env sha256:0123456789ab, storage (directory)`, for a phase's output.
fn describe_shared(fingerprints: &[SharedEntry]) -> String {
    let described: Vec<String> = fingerprints
        .iter()
        .map(|f| match f.sha256 {
            Some(sha) => format!("{} {}", f.path, &sha.to_string()[..19]),
            None => format!("{} ({})", f.path, f.kind.as_str()),
        })
        .collect();
    if described.is_empty() { "none".to_owned() } else { described.join(", ") }
}

/// Notes which shared files a release's finalize hooks ran with (temp name, rename).
fn note_finalized(layout: &Layout, digest: Digest, fingerprints: &[SharedEntry]) -> Result<(), NodeError> {
    let path = layout.finalized_with(digest);
    let dir = path.parent().expect("under .release");
    fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let tmp = dir.join(format!(".tmp-{}", digest.hex()));
    fs::write(&tmp, serde_json::to_vec(fingerprints).expect("serializes")).map_err(|e| io_error(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))
}

/// What a shared path holds: a file's SHA-256 (never its contents), or only that it is a
/// directory (data, not configuration) or missing.
fn shared_file(shared: &Path, path: &str) -> SharedEntry {
    let full = shared.join(path);
    let entry = |kind, sha256| SharedEntry { path: path.to_owned(), kind, sha256 };
    match fs::metadata(&full) {
        Ok(meta) if meta.is_dir() => entry(SharedKind::Directory, None),
        Ok(meta) if meta.is_file() && meta.len() <= SHARED_HASH_LIMIT => {
            match fs::File::open(&full).and_then(Digest::of_reader) {
                Ok(digest) => entry(SharedKind::File, Some(digest)),
                Err(_) => entry(SharedKind::Unreadable, None),
            }
        }
        // A FIFO or a device would block the switch; a huge file would slow it.
        Ok(_) => entry(SharedKind::Unreadable, None),
        Err(_) => entry(SharedKind::Missing, None),
    }
}

fn status(base: &Path) -> Result<Status, NodeError> {
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
fn cleanup(base: &Path, keep: &[Digest], fence: u64) -> Result<Cleaned, NodeError> {
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
                let _ = fs::remove_file(layout.ready(d));
                let _ = fs::remove_file(layout.finalized_with(d));
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
fn move_to_trash(path: &Path, to: &Path) -> Result<(), NodeError> {
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
fn working_directories() -> (Vec<PathBuf>, usize) {
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

/// Runs hooks (migrate, reload) in a release or `current`, under the base's lock and fenced
/// like every change: a migrate of a run that a newer one outranked never starts, and no
/// hook starts while one an earlier run started (whose agent is gone) still runs.
fn exec(e: &Exec) -> Result<Ran, NodeError> {
    let layout = Layout { base: e.base.clone() };
    let (dir, digest) = match e.digest {
        Some(d) => (layout.release(d), d),
        None => match layout.current_digest()? {
            Some(d) => (layout.current(), d),
            None => {
                return Err(NodeError::new(
                    ErrorCode::NotReady,
                    format!("{} has no current release", e.base.display()),
                ));
            }
        },
    };
    layout.create()?;
    let _lock = layout.lock()?;
    layout.fence(e.fence)?;
    let deadline = e.hook_timeout_ms.map(Duration::from_millis);
    let env = release_env(&layout, digest, &e.env);
    let output = run_commands(&layout, &dir, &e.commands, &env, deadline, &e.run_as)?;
    Ok(Ran { output })
}

/// What one ask of the health URL said.
enum Said {
    /// 2xx, with `expect` in the body when set.
    Good(u16, String),
    /// No connection, a timeout, 502/503/504: workers still (re)starting.
    NotUp(String),
    /// Up, and not what the release should answer: another status, or a 2xx without `expect`.
    Wrong(String),
}

/// How much of a health answer's body is read: `expect` must be in it.
const HEALTH_BODY_LIMIT: u64 = 64 << 10;

fn ask_health(client: &reqwest::blocking::Client, h: &Health, ask_timeout: Duration) -> Said {
    let response = match client.get(&h.url).timeout(ask_timeout).send() {
        Ok(response) => response,
        Err(e) => return Said::NotUp(crate::error_chain(&e)),
    };
    let status = response.status();
    let mut body = Vec::new();
    let _ = io::Read::read_to_end(&mut io::Read::take(response, HEALTH_BODY_LIMIT), &mut body);
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() && h.expect.as_ref().is_none_or(|e| body.contains(e.as_str())) {
        return Said::Good(status.as_u16(), tail(body.as_bytes()));
    }
    let said = format!("HTTP {status}: {}", tail(body.as_bytes()).trim());
    match status.as_u16() {
        502..=504 => Said::NotUp(said),
        _ if status.is_success() => {
            let expect = h.expect.as_deref().unwrap_or_default();
            Said::Wrong(format!("{said} (without {expect:?})"))
        }
        _ => Said::Wrong(said),
    }
}

/// Asks the URL from the node itself, `interval_ms` apart: healthy after `healthy_after`
/// good answers in a row; failed after `unhealthy_after` wrong ones in a row (the release is
/// up and wrong: no need to wait), or when `timeout_ms` has passed (it never came up right).
fn health(h: &Health) -> Result<Healthy, NodeError> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| NodeError::new(ErrorCode::HealthFailed, e.to_string()))?;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(h.timeout_ms);
    let interval = Duration::from_millis(h.interval_ms);
    let (mut good, mut wrong, mut asked) = (0u32, 0u32, 0u32);
    loop {
        // One slow answer may not outlast the check.
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        asked += 1;
        let last = match ask_health(&client, h, left.min(Duration::from_secs(5))) {
            Said::Good(status, body) => {
                (good, wrong) = (good + 1, 0);
                if good >= h.healthy_after {
                    return Ok(Healthy { status, body, asked, ms: started.elapsed().as_millis() as u64 });
                }
                None
            }
            Said::Wrong(said) => {
                (good, wrong) = (0, wrong + 1);
                if wrong >= h.unhealthy_after {
                    let mut error = NodeError::new(
                        ErrorCode::HealthFailed,
                        format!(
                            "{} answered wrong {wrong} times in a row ({} ms after the check began)",
                            h.url,
                            started.elapsed().as_millis()
                        ),
                    );
                    error.output = Some(said);
                    return Err(error);
                }
                Some(said)
            }
            Said::NotUp(why) => {
                (good, wrong) = (0, 0);
                Some(why)
            }
        };
        if Instant::now() + interval > deadline {
            let expect = h.expect.as_ref().map(|e| format!(" containing {e:?}")).unwrap_or_default();
            let mut error = NodeError::new(
                ErrorCode::HealthFailed,
                format!("{} did not answer 2xx{expect} within {} ms", h.url, h.timeout_ms),
            );
            error.output = last;
            return Err(error);
        }
        std::thread::sleep(interval);
    }
}

/// Asks PM2 for the app's processes and checks each one's working directory (from /proc, so
/// resolved) lies inside the release: a process started from a resolved release path keeps
/// its old directory across `pm2 reload`, and this is how that trap is caught.
fn pm2_cwd(base: &Path, digest: Digest, app: &str, env: &BTreeMap<String, String>) -> Result<Pm2Checked, NodeError> {
    let layout = Layout { base: base.to_owned() };
    let release = fs::canonicalize(layout.release(digest)).map_err(|e| io_error(&layout.release(digest), e))?;
    let run = Command::new("sh")
        .args(["-c", "pm2 jlist"])
        .envs(env)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NodeError::new(ErrorCode::Pm2, format!("cannot run pm2: {e}")))?;
    if !run.status.success() {
        let mut e = NodeError::new(ErrorCode::Pm2, format!("`pm2 jlist` failed ({})", run.status));
        e.output = Some(tail(&run.stderr));
        return Err(e);
    }
    let text = String::from_utf8_lossy(&run.stdout);
    // pm2 may print notices before the JSON: take from the first '['.
    let list: Vec<Value> = serde_json::from_str(text.get(text.find('[').unwrap_or(0)..).unwrap_or("[]"))
        .map_err(|e| NodeError::new(ErrorCode::Pm2, format!("`pm2 jlist` is not JSON: {e}")))?;
    let (mut checked, mut modes) = (Vec::new(), Vec::new());
    for process in list.iter().filter(|p| p["name"] == app) {
        let pid = process["pid"].as_u64().unwrap_or(0);
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        if pid == 0 || !cwd.starts_with(&release) {
            return Err(NodeError::new(
                ErrorCode::Pm2Cwd,
                format!(
                    "PM2 process {pid} of {app} runs from {}, not from the new release {}",
                    cwd.display(),
                    release.display()
                ),
            ));
        }
        checked.push(pid);
        modes.push(process["pm2_env"]["exec_mode"].as_str().unwrap_or("unknown").trim_end_matches("_mode").to_owned());
    }
    if checked.is_empty() {
        return Err(NodeError::new(ErrorCode::Pm2Cwd, format!("PM2 runs no process named {app}")));
    }
    modes.sort();
    modes.dedup();
    let mut output = format!(
        "{} processes of {app} run from {} (exec mode: {})",
        checked.len(),
        release.display(),
        modes.join(", ")
    );
    if modes.iter().any(|m| m == "fork") {
        // Measured: 7–16 refused connections and a 180–470 ms gap at each reload in fork
        // mode; none in cluster mode.
        output.push_str(&format!(
            "\nwarning: {app} runs in fork mode: `pm2 reload` restarts it, refusing connections meanwhile; \
             start it in cluster mode (`pm2 start … -i 2`, with NODE_CLUSTER_SCHED_POLICY=none) for reloads without a gap"
        ));
    }
    Ok(Pm2Checked { processes: checked, exec_mode: modes, output })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modes_of(root: &Path) -> Vec<(PathBuf, u32)> {
        let mut found = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            found.push((
                dir.strip_prefix(root).unwrap().to_owned(),
                fs::symlink_metadata(&dir).unwrap().permissions().mode(),
            ));
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    stack.push(path);
                } else if !meta.file_type().is_symlink() {
                    found.push((path.strip_prefix(root).unwrap().to_owned(), meta.permissions().mode()));
                }
            }
        }
        found.sort();
        found
    }

    /// Files written read-only at once (no finalize hook) end with exactly the modes that the
    /// walk after a finalize hook gives: writable paths left alone, shared links' new parents
    /// sealed too.
    #[test]
    fn a_release_sealed_while_unpacking_has_the_modes_of_one_sealed_after_finalize() {
        // Built by hand: the packer never writes hard links, other tools do.
        let mut tar = tar::Builder::new(Vec::new());
        for (path, body, mode) in [
            ("public/index.php", "<?php", 0o644),
            ("vendor/a/b/C.php", "<?php", 0o644),
            ("cache/views/x", "x", 0o644),
            ("cache/data/y", "y", 0o644),
            ("artisan", "#!", 0o755),
        ] {
            let mut header = tar::Header::new_ustar();
            header.set_size(body.len() as u64);
            header.set_mode(mode);
            tar.append_data(&mut header, path, body.as_bytes()).unwrap();
        }
        // One inode at a writable and at a sealed path: read-only, by either way.
        let mut link = tar::Header::new_ustar();
        link.set_entry_type(tar::EntryType::Link);
        link.set_size(0);
        link.set_mode(0o644);
        tar.append_link(&mut link, "public/y", "cache/data/y").unwrap();
        let bytes = zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap();
        let digest = Digest::of(&bytes);

        let mut trees = Vec::new();
        for finalize in [vec!["true".to_owned()], vec![]] {
            let base = tempfile::tempdir().unwrap();
            fs::create_dir_all(base.path().join("shared/data/uploads")).unwrap();
            fs::write(base.path().join("shared/.env"), "A=1").unwrap();
            let request = Prepare {
                base: base.path().to_owned(),
                digest,
                source: Source::Stdin,
                shared: vec![".env".into(), "data/uploads".into()],
                writable: vec!["cache".into()],
                finalize,
                env: BTreeMap::new(),
                max_unpacked_bytes: 1 << 20,
                max_files: 100,
                adopt: false,
                hook_timeout_ms: None,
                fence: 0,
                fetch_stall_ms: None,
                finalize_if_shared_changed: false,
                run_as: RunAs::default(),
            };
            let answer = prepare(&request, &mut &bytes[..]).unwrap();
            let dir = answer.dir;
            trees.push(modes_of(&dir));
            set_writable(&dir).unwrap(); // so that the temporary directory can be removed
        }
        assert_eq!(trees[0], trees[1]);
        let mode = |path: &str| trees[1].iter().find(|(p, _)| p == Path::new(path)).unwrap().1 & 0o777;
        assert_eq!(mode(""), 0o555);
        assert_eq!(mode("data"), 0o555, "made for a shared link, sealed too");
        assert_eq!(mode("public/index.php"), 0o444);
        assert_eq!(mode("artisan"), 0o555);
        assert_eq!(mode("cache/views/x") & 0o200, 0o200, "writable path left writable");
        assert_eq!(mode("cache/views") & 0o200, 0o200);
        assert_eq!(mode("public/y") & 0o222, 0, "a hard link at a sealed path seals its inode");
    }

    #[test]
    fn a_hook_users_group_gets_the_writable_paths_or_the_refusal_says_how() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("cache/views")).unwrap();
        fs::write(dir.path().join("cache/views/x"), "x").unwrap();
        fs::create_dir_all(dir.path().join("app")).unwrap();
        let (_, nogroup) = user_ids("nobody").expect("Debian has nobody");
        let run_as = RunAs { user: Some("nobody".into()), umask: None, php_only: false };
        let shared = share_writable(dir.path(), &["cache".into()], &run_as);
        if rustix::process::geteuid().is_root() {
            shared.unwrap();
            for path in ["cache", "cache/views", "cache/views/x"] {
                let meta = fs::metadata(dir.path().join(path)).unwrap();
                assert_eq!(meta.gid(), nogroup, "{path}");
                let want = if meta.is_dir() { 0o2070 } else { 0o060 };
                assert_eq!(meta.permissions().mode() & want, want, "{path}: {:o}", meta.permissions().mode());
            }
            assert_ne!(fs::metadata(dir.path().join("app")).unwrap().gid(), nogroup, "only writable paths");
        } else {
            let err = shared.unwrap_err().to_string();
            assert!(err.contains("make the SSH user a member"), "{err}");
        }
        // Without a user (or for a reload's php commands only), nothing is touched.
        let plain = RunAs { user: Some("nobody".into()), umask: None, php_only: true };
        share_writable(dir.path(), &["app".into()], &plain).unwrap();
        assert_ne!(fs::metadata(dir.path().join("app")).unwrap().gid(), nogroup);
    }

    fn exec_in(base: &Path, digest: Digest, command: &str, fence: u64) -> Result<Ran, NodeError> {
        exec(&Exec {
            base: base.to_owned(),
            digest: Some(digest),
            commands: vec![command.to_owned()],
            env: BTreeMap::new(),
            hook_timeout_ms: None,
            fence,
            run_as: RunAs::default(),
        })
    }

    #[test]
    fn hooks_are_fenced_like_every_change() {
        let base = tempfile::tempdir().unwrap();
        let layout = Layout { base: base.path().to_owned() };
        layout.create().unwrap();
        let digest = Digest::of(b"release");
        fs::create_dir_all(layout.release(digest)).unwrap();
        layout.fence(100).unwrap();
        let refused = exec_in(base.path(), digest, "echo ran > ran", 50).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Fenced, "{}", refused.message);
        assert!(!layout.release(digest).join("ran").exists(), "a stale run's hook never starts");
        exec_in(base.path(), digest, "echo ran > ran", 100).unwrap();
        assert!(layout.release(digest).join("ran").exists());
    }

    /// The lock dies with the agent that held it; a hook it started may live on, in its own
    /// process group. The next hook waits for that group, and gives up after the lock's wait.
    #[test]
    fn a_hook_whose_agent_died_is_waited_for_and_refused_after_the_wait() {
        use std::os::unix::process::CommandExt;
        let base = tempfile::tempdir().unwrap();
        let layout = Layout { base: base.path().to_owned() };
        layout.create().unwrap();
        let digest = Digest::of(b"release");
        fs::create_dir_all(layout.release(digest)).unwrap();
        let started = |seconds: u64| {
            let child = Command::new("sleep").arg(seconds.to_string()).process_group(0).spawn().unwrap();
            layout.record_hook(child.id(), &format!("php artisan migrate # {seconds} s")).unwrap();
            let pid = child.id();
            // Reaped as soon as it ends (a zombie still counts as a member of its group).
            let reaper = std::thread::spawn(move || {
                let mut child = child;
                child.wait().unwrap()
            });
            (pid, reaper)
        };
        let overlap = |pid: u32| format!("if kill -0 {pid} 2>/dev/null; then echo overlap; else echo after; fi");

        let (pid, reaper) = started(1);
        let output = exec_in(base.path(), digest, &overlap(pid), 0).unwrap();
        assert!(output.output.contains("after"), "{}", output.output);
        reaper.join().unwrap();
        assert!(!layout.hook_record().exists(), "the note of a hook that ended is removed");

        let (pid, reaper) = started(LOCK_WAIT.as_secs() + 3);
        let refused = exec_in(base.path(), digest, &overlap(pid), 0).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Locked);
        assert!(
            refused.message.contains("php artisan migrate") && refused.message.contains(&pid.to_string()),
            "{}",
            refused.message
        );
        reaper.join().unwrap();
    }

    /// sudo's complaints on its stderr are told apart from a hook's own failure, and say what
    /// to do: the sudoers line for the SSH user, or that the user does not exist.
    #[test]
    fn sudos_refusals_are_told_apart_and_name_the_fix() {
        let me = agent_user();
        let refused = sudo_refusal("sudo: a password is required\n", "www-data").unwrap();
        assert!(refused.contains("sudo refused (sudo: a password is required)"), "{refused}");
        assert!(refused.contains(&format!("`{me} ALL=(www-data) NOPASSWD: ALL`")), "{refused}");
        let unknown =
            sudo_refusal("sudo: unknown user wwwdata\nsudo: error initializing audit plugin\n", "wwwdata").unwrap();
        assert!(unknown.contains("not a user on this node") && !unknown.contains("NOPASSWD"), "{unknown}");
        assert_eq!(sudo_refusal("", "www-data"), None, "the hook ran: its failure is its own");
    }
}
