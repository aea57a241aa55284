//! `release check` on the node: what a deploy will need, looked at without changing anything
//! (no file written, no lock taken), each finding a row: pass, warn or fail, and what to do.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::Check;
use super::protocol::{CheckRow, CheckStatus, Checked};

/// One finding.
struct Row {
    name: &'static str,
    status: CheckStatus,
    message: String,
}

fn pass(name: &'static str, message: impl Into<String>) -> Row {
    Row { name, status: CheckStatus::Pass, message: message.into() }
}

fn warn(name: &'static str, message: impl Into<String>) -> Row {
    Row { name, status: CheckStatus::Warn, message: message.into() }
}

fn fail(name: &'static str, message: impl Into<String>) -> Row {
    Row { name, status: CheckStatus::Fail, message: message.into() }
}

/// The node's findings, as `{"checks": [{name, status, message}]}`.
pub fn check(c: &Check) -> Checked {
    let mut rows = vec![base(&c.base)];
    let current = c.base.join("current");
    let deployed = current.exists();
    rows.extend(c.shared.iter().map(|path| shared(&c.base, path)));
    rows.push(room(&c.base, c.needed_bytes));
    if c.laravel {
        rows.push(artisan(&current, deployed, &c.env));
        rows.push(document_root(&c.base));
    }
    rows.extend(c.reload.iter().filter(|r| r.trim_start().starts_with("sudo ")).map(|r| sudo_allowed(r, &c.env)));
    if let Some(app) = &c.pm2_app {
        rows.push(pm2(app, &c.base, deployed, &c.env));
    }
    if let Some(url) = &c.health_url {
        rows.push(health(url, deployed));
    }
    if let Some(user) = &c.web_user {
        rows.push(ownership(&c.base, &c.shared, user));
    }
    let checks =
        rows.into_iter().map(|r| CheckRow { name: r.name.to_owned(), status: r.status, message: r.message }).collect();
    Checked { checks }
}

fn writable(path: &Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::WRITE_OK).is_ok()
}

fn base(base: &Path) -> Row {
    match std::fs::metadata(base) {
        Ok(m) if m.is_dir() && writable(base) => pass("base", format!("{} is a writable directory", base.display())),
        Ok(m) if m.is_dir() => {
            fail("base", format!("{} is not writable by this user: chown it to the SSH user", base.display()))
        }
        Ok(_) => fail("base", format!("{} is not a directory", base.display())),
        Err(_) => match base.parent() {
            Some(parent) if parent.is_dir() && writable(parent) => {
                warn("base", format!("{} does not exist yet: the first deploy makes it", base.display()))
            }
            _ => fail(
                "base",
                format!(
                    "{} does not exist and cannot be made here: mkdir -p it and chown it to the SSH user",
                    base.display()
                ),
            ),
        },
    }
}

fn shared(base: &Path, path: &str) -> Row {
    let at = base.join("shared").join(path);
    if std::fs::symlink_metadata(&at).is_ok() {
        pass("shared", format!("shared/{path} is there"))
    } else {
        fail("shared", format!("{} does not exist: create it (file or directory) before deploying", at.display()))
    }
}

fn room(base: &Path, needed: u64) -> Row {
    let probe = std::iter::successors(Some(base), |p| p.parent()).find(|p| p.exists()).unwrap_or(Path::new("/"));
    let Ok(st) = rustix::fs::statvfs(probe) else {
        return warn("room", format!("cannot tell the free space of {}", probe.display()));
    };
    let free = st.f_bavail * st.f_frsize;
    let gib = |b: u64| b as f64 / f64::from(1 << 30);
    if needed > 0 && free < needed + needed / 10 {
        fail("room", format!("{:.2} GiB free, one more release needs about {:.2} GiB", gib(free), gib(needed)))
    } else {
        pass("room", format!("{:.2} GiB free (one more release: about {:.2} GiB)", gib(free), gib(needed)))
    }
}

/// Runs a command with a time limit; its status and output (stdout and stderr, trimmed, the
/// first 2,000 characters: what a message shows).
fn run(
    program: &str,
    args: &[&str],
    dir: Option<&Path>,
    env: &std::collections::BTreeMap<String, String>,
) -> Option<(bool, String)> {
    let (ok, stdout, stderr) = run_whole(program, args, dir, env)?;
    let text = format!("{stdout}{stderr}");
    Some((ok, text.trim().chars().take(2_000).collect()))
}

/// Runs a command with a time limit; its status, whole stdout and stderr. The pipes are read
/// while it runs: one that fills a pipe (`pm2 jlist` of a few apps) would never end otherwise.
fn run_whole(
    program: &str,
    args: &[&str],
    dir: Option<&Path>,
    env: &std::collections::BTreeMap<String, String>,
) -> Option<(bool, String, String)> {
    let mut command = Command::new(program);
    command.args(args).envs(env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let mut child = super::pages::spawn(&mut command).ok()?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = std::io::Read::read_to_end(&mut pipe, &mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Some((false, String::new(), format!("`{program}` gave no answer within 20 s")));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Some((status.success(), stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default()))
}

fn artisan(current: &Path, deployed: bool, env: &std::collections::BTreeMap<String, String>) -> Row {
    if !deployed {
        return warn("artisan", "no release here yet: php artisan is tried once one is");
    }
    // Booting writes the package and service manifests into bootstrap/cache when the release
    // has none (one never optimized, or after optimize:clear), as the SSH user: a check writes
    // nothing there, so they go to a scratch directory removed after.
    let scratch = tempfile::Builder::new().prefix("release-check-").tempdir().ok();
    let mut env = env.clone();
    if let Some(dir) = &scratch {
        for (key, file) in [("APP_PACKAGES_CACHE", "packages.php"), ("APP_SERVICES_CACHE", "services.php")] {
            env.insert(key.to_owned(), dir.path().join(file).display().to_string());
        }
    }
    match run("php", &["artisan", "--version"], Some(current), &env) {
        Some((true, out)) => pass("artisan", out.lines().next().unwrap_or_default().to_owned()),
        Some((false, out)) => fail("artisan", format!("php artisan --version failed in {}: {out}", current.display())),
        None => fail("artisan", "php is not on the PATH of the SSH user (set the service's env PATH)"),
    }
}

/// The Apache sites that name this base: their DocumentRoot must be `<base>/current/public`.
fn document_root(base: &Path) -> Row {
    let want = base.join("current/public");
    let mut roots = Vec::new();
    for dir in ["/etc/apache2/sites-enabled", "/etc/httpd/conf.d"] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if words.next().is_some_and(|w| w.eq_ignore_ascii_case("DocumentRoot")) {
                    let root = words.next().unwrap_or_default().trim_matches('"').trim_end_matches('/').to_owned();
                    if Path::new(&root).starts_with(base) {
                        roots.push((entry.path(), root));
                    }
                }
            }
        }
    }
    match roots.iter().find(|(_, r)| Path::new(r) != want) {
        _ if roots.is_empty() => warn(
            "document_root",
            format!("no Apache site names {} here: point its DocumentRoot at {}", base.display(), want.display()),
        ),
        Some((file, root)) => fail(
            "document_root",
            format!("{} serves {root}: point its DocumentRoot at {}", file.display(), want.display()),
        ),
        None => pass("document_root", format!("Apache serves {}", want.display())),
    }
}

fn sudo_allowed(command: &str, env: &std::collections::BTreeMap<String, String>) -> Row {
    let words: Vec<&str> = command.split_whitespace().skip(1).collect();
    let mut args = vec!["-n", "-l"];
    args.extend(&words);
    match run("sudo", &args, None, &Default::default()) {
        Some((true, _)) => pass("reload_sudo", format!("sudo allows `{}` without a password", words.join(" "))),
        Some((false, out)) => {
            let fix = match sudoers_line(&words, env) {
                Some(line) => format!("add the sudoers line `{line}` (visudo -f /etc/sudoers.d/release)"),
                None => "add it to sudoers".to_owned(),
            };
            let said = if out.is_empty() { "sudo -n -l lists no rule for it".to_owned() } else { out };
            fail("reload_sudo", format!("sudo does not allow `{}` without a password ({said}): {fix}", words.join(" ")))
        }
        None => fail("reload_sudo", "sudo is not installed, and a reload command needs it"),
    }
}

/// The sudoers line that lets the SSH user run `sudo WORDS` without a password: sudoers
/// names commands by their full path (looked up as sudo does: the PATH, then the usual sbin
/// directories of `secure_path`). `None` for sudo options other than `-u USER`.
fn sudoers_line(words: &[&str], env: &std::collections::BTreeMap<String, String>) -> Option<String> {
    let (runas, command) = match words {
        ["-u", user, rest @ ..] => (*user, rest),
        rest => ("root", rest),
    };
    let (program, args) = command.split_first()?;
    if program.starts_with('-') {
        return None;
    }
    let path = find_program(program, env, true).map_or_else(|| (*program).to_owned(), |p| p.display().to_string());
    let me = super::ops::agent_user();
    Some(format!(
        "{me} ALL=({runas}) NOPASSWD: {}",
        [path.as_str()].iter().chain(args).copied().collect::<Vec<_>>().join(" ")
    ))
}

/// Where `program` is: itself when it names a path, else the first executable of that name
/// on the PATH (the service's, else this process's), then in the usual sbin and bin
/// directories when `secure_path` (as sudo looks).
fn find_program(
    program: &str,
    env: &std::collections::BTreeMap<String, String>,
    secure_path: bool,
) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Some(program.into());
    }
    let path = env.get("PATH").cloned().or_else(|| std::env::var("PATH").ok()).unwrap_or_default();
    let usual: &[&str] = if secure_path {
        &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    } else {
        &[]
    };
    path.split(':')
        .chain(usual.iter().copied())
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// Whether a PM2 daemon runs for the PM2_HOME the service's commands use (its pid file names
/// a live process): any `pm2` command would start one otherwise, and a check starts nothing.
fn pm2_daemon(env: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    let home = env
        .get("PM2_HOME")
        .cloned()
        .or_else(|| std::env::var("PM2_HOME").ok())
        .or_else(|| std::env::var("HOME").ok().map(|h| format!("{h}/.pm2")))
        .unwrap_or_else(|| "~/.pm2".to_owned());
    let pid = std::fs::read_to_string(Path::new(&home).join("pm2.pid")).unwrap_or_default();
    match pid.trim().parse::<u32>() {
        Ok(pid) if Path::new(&format!("/proc/{pid}")).exists() => Ok(()),
        _ => Err(home),
    }
}

fn pm2(app: &str, base: &Path, deployed: bool, env: &std::collections::BTreeMap<String, String>) -> Row {
    if find_program("pm2", env, false).is_none() {
        return fail("pm2", "pm2 is not on the PATH of the SSH user (set the service's env PATH and PM2_HOME)");
    }
    let hint =
        format!("pm2 start {}/current/<script> --name {app} -i 2 --cwd {}/current", base.display(), base.display());
    if let Err(home) = pm2_daemon(env) {
        let said = format!("no PM2 daemon runs for PM2_HOME {home} (the check starts none)");
        return if deployed {
            fail(
                "pm2",
                format!("{said}: start {app} there ({hint}, or pm2 resurrect), or set the service's env PM2_HOME"),
            )
        } else {
            warn("pm2", format!("{said}: after the first deploy, {hint}"))
        };
    }
    // The whole list: one app's entry alone is longer than a message shows.
    let Some((ok, out, err)) = run_whole("pm2", &["jlist"], None, env) else {
        return fail("pm2", "pm2 is not on the PATH of the SSH user (set the service's env PATH and PM2_HOME)");
    };
    if !ok {
        let said: String = format!("{out}{err}").trim().chars().take(2_000).collect();
        return fail("pm2", format!("pm2 jlist failed: {said}"));
    }
    let json_start = out.find('[').unwrap_or(0);
    let Ok(list) = serde_json::from_str::<Vec<Value>>(&out[json_start..]) else {
        let said: String = out.trim().chars().take(500).collect();
        return fail("pm2", format!("pm2 jlist printed no process list: {said}"));
    };
    let procs: Vec<&Value> = list.iter().filter(|p| p["name"] == app).collect();
    let Some(first) = procs.first() else {
        return if deployed {
            fail("pm2", format!("PM2 runs no app named {app}: start it once ({hint}), then pm2 save"))
        } else {
            warn("pm2", format!("PM2 runs no app named {app} yet: after the first deploy, {hint}"))
        };
    };
    let down: Vec<&str> =
        procs.iter().map(|p| p["pm2_env"]["status"].as_str().unwrap_or("unknown")).filter(|s| *s != "online").collect();
    if !down.is_empty() {
        return fail(
            "pm2",
            format!(
                "{} of {} process(es) of {app} are not online ({}): pm2 restart {app}",
                down.len(),
                procs.len(),
                down.join(", ")
            ),
        );
    }
    let cwd = first["pm2_env"]["pm_cwd"].as_str().unwrap_or_default();
    let current = base.join("current");
    if !Path::new(cwd).starts_with(&current) {
        return fail(
            "pm2",
            format!("{app} runs in {cwd}, not under {}: start it with --cwd {}", current.display(), current.display()),
        );
    }
    match first["pm2_env"]["exec_mode"].as_str().unwrap_or_default() {
        "cluster_mode" => pass("pm2", format!("{app}: {} process(es) in cluster mode from {cwd}", procs.len())),
        mode => warn(
            "pm2",
            format!("{app} runs in {mode}: pm2 reload restarts it and drops connections; use cluster mode (-i N)"),
        ),
    }
}

fn health(url: &str, deployed: bool) -> Row {
    let url = url.replace("{digest}", "check");
    let client = match reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(e) => return fail("health", e.to_string()),
    };
    match client.get(&url).send() {
        Ok(answer) if answer.status().is_success() => pass("health", format!("{url} answers {}", answer.status())),
        // A deployed release that answers 5xx is down; a 4xx may be the placeholder digest.
        Ok(answer) if deployed && answer.status().is_server_error() => {
            fail("health", format!("{url} answers {}: the running release is not healthy", answer.status()))
        }
        Ok(answer) => warn("health", format!("{url} answers {}", answer.status())),
        Err(_) if !deployed => warn("health", format!("{url} does not answer yet (nothing deployed here)")),
        Err(e) => fail("health", format!("{url} does not answer: {}", crate::error_chain(&e.without_url()))),
    }
}

/// Entries under the shared paths the web user could not write (owner and group both
/// another's, or no write bit for it): the classic Laravel trap. Looks at up to 10,000.
fn ownership(base: &Path, shared: &[String], user: &str) -> Row {
    let Some((uid, gid)) = super::ops::user_ids(user) else {
        return warn("ownership", format!("{user} is not a user on this node"));
    };
    let mut bad = Vec::new();
    let mut seen = 0usize;
    let mut stack: Vec<std::path::PathBuf> = shared.iter().map(|p| base.join("shared").join(p)).collect();
    while let Some(path) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let mode = meta.mode();
        let can_write = uid == 0
            || (meta.uid() == uid && mode & 0o200 != 0)
            || (meta.gid() == gid && mode & 0o020 != 0)
            || mode & 0o002 != 0;
        // .env is read, not written: only directories and files under them must be writable.
        if !can_write && (meta.is_dir() || path.components().count() > base.components().count() + 2) {
            bad.push(path.clone());
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                stack.push(entry.path());
            }
        }
    }
    if bad.is_empty() {
        pass("ownership", format!("{user} can write what it needs under shared/"))
    } else {
        let shown: Vec<String> = bad.iter().take(3).map(|p| p.display().to_string()).collect();
        warn(
            "ownership",
            format!(
                "{user} cannot write {} entr{} under shared/, e.g. {}: chgrp -R {user} and chmod -R g+rwX them, \
                 or run hooks as hook_user (README: Permissions)",
                bad.len(),
                if bad.len() == 1 { "y" } else { "ies" },
                shown.join(", ")
            ),
        )
    }
}
