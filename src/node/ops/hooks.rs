//! Hooks: the commands of a phase (finalize, migrate, reload) run in a release as the SSH
//! user or the hook user, their output's tail; the health check; PM2's working directories.

use super::*;

pub(super) fn release_env(
    layout: &Layout,
    digest: Digest,
    extra: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = extra.clone();
    env.insert("RELEASE_DIGEST".into(), digest.to_string());
    env.insert("RELEASE_DIR".into(), layout.release(digest).display().to_string());
    env.insert("RELEASE_BASE".into(), layout.base.display().to_string());
    env
}

/// Whether a reload command is the application's PHP (`php artisan queue:restart`, also as
/// `php8.2 …` or `/usr/bin/php …`), which runs as the hook user; the web server's own
/// commands (`apachectl`, `systemctl reload php8.2-fpm`) stay the SSH user's.
pub(super) fn runs_php(command: &str) -> bool {
    let program = command.split_whitespace().next().unwrap_or("");
    let name = program.rsplit('/').next().unwrap_or(program);
    name.strip_prefix("php").is_some_and(|version| version.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// Runs shell commands in `dir`, one after the other; the tail of their output, or the
/// failing command with its tail. A command still running at `deadline` is killed with its
/// whole process group, so a hung hook never holds the base's lock past the server's wait.
/// Runs the hook `commands` in `dir`, one after the other, each in a process group of its own
/// (recorded in `<base>/.release/hook` while it runs: see [`Layout::wait_for_earlier_hook`]).
/// Called under the base's lock.
pub(super) fn run_commands(
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
        let user = run_as.user.as_deref().filter(|_| !run_as.php_only || runs_php(command));
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
        shell
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // sudo's own complaints ("a password is required") come on its stderr, before the
            // hook's `exec 2>&1`: kept, to be shown and told apart from the hook's failures.
            .stderr(if user.is_some() { Stdio::piped() } else { Stdio::inherit() })
            .process_group(0);
        let mut child = pages::spawn(&mut shell).map_err(|e| match user {
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
pub(super) fn sudo_refusal(said: &str, user: &str) -> Option<String> {
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
pub(in crate::node) fn agent_user() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => uid.to_string(),
    }
}

/// With a hook user, gives the release's writable paths (Laravel's `bootstrap/cache`) to that
/// user's group, group-writable and set-group-ID, so that finalize run as that user can write
/// there. The SSH user must be in that group (or root); the refusal says so.
pub(super) fn share_writable(dir: &Path, writable: &[String], run_as: &RunAs) -> Result<(), NodeError> {
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
pub(in crate::node) fn user_ids(user: &str) -> Option<(u32, u32)> {
    let found = nix::unistd::User::from_name(user).ok().flatten()?;
    Some((found.uid.as_raw(), found.gid.as_raw()))
}

/// Reads `from` to its end, keeping only its last `OUTPUT_TAIL` bytes: a hook may print
/// without bound (300 MB once took the agent to ~700 MiB of memory), only the tail is answered.
pub(super) fn read_tail(from: &mut impl Read) -> Vec<u8> {
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
pub(super) fn keep_tail(bytes: &mut Vec<u8>) {
    if bytes.len() > OUTPUT_TAIL {
        bytes.drain(..bytes.len() - OUTPUT_TAIL);
    }
}

pub(super) fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Runs hooks (migrate, reload) in a release or `current`, under the base's lock and fenced
/// like every change: a migrate of a run that a newer one outranked never starts, and no
/// hook starts while one an earlier run started (whose agent is gone) still runs.
pub(super) fn exec(e: &Exec) -> Result<Ran, NodeError> {
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
    // A migration runs only in a release ready here (a tree without its marker may be one a
    // crash left half unpacked), checked under the lock that a clean-up takes too.
    if e.digest.is_some() && !layout.ready(digest).exists() {
        return Err(NodeError::new(
            ErrorCode::NotReady,
            format!("{} is not marked ready on this node: no hook runs in it", dir.display()),
        ));
    }
    let deadline = e.hook_timeout_ms.map(Duration::from_millis);
    let env = release_env(&layout, digest, &e.env);
    let output = run_commands(&layout, &dir, &e.commands, &env, deadline, &e.run_as)?;
    Ok(Ran { output })
}

/// What one ask of the health URL said.
pub(super) enum Said {
    /// 2xx, with `expect` in the body when set.
    Good(u16, String),
    /// No connection, a timeout, 502/503/504: workers still (re)starting.
    NotUp(String),
    /// Up, and not what the release should answer: another status, or a 2xx without `expect`.
    Wrong(String),
}

/// How much of a health answer's body is read: `expect` must be in it.
pub(super) const HEALTH_BODY_LIMIT: u64 = 64 << 10;

pub(super) fn ask_health(client: &reqwest::blocking::Client, h: &Health, ask_timeout: Duration) -> Said {
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
pub(super) fn health(h: &Health) -> Result<Healthy, NodeError> {
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
pub(super) fn pm2_cwd(
    base: &Path,
    digest: Digest,
    app: &str,
    env: &BTreeMap<String, String>,
) -> Result<Pm2Checked, NodeError> {
    let layout = Layout { base: base.to_owned() };
    let release = fs::canonicalize(layout.release(digest)).map_err(|e| io_error(&layout.release(digest), e))?;
    let run = pages::output(Command::new("sh").args(["-c", "pm2 jlist"]).envs(env))
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
