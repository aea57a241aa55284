//! `release check` on the node: what a deploy will need, looked at without changing anything
//! (no file written, no lock taken), each finding a row: pass, warn or fail, and what to do.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::Check;

/// One finding.
struct Row {
    name: &'static str,
    status: &'static str,
    message: String,
}

fn pass(name: &'static str, message: impl Into<String>) -> Row {
    Row { name, status: "pass", message: message.into() }
}

fn warn(name: &'static str, message: impl Into<String>) -> Row {
    Row { name, status: "warn", message: message.into() }
}

fn fail(name: &'static str, message: impl Into<String>) -> Row {
    Row { name, status: "fail", message: message.into() }
}

/// The node's findings, as `{"checks": [{name, status, message}]}`.
pub fn check(c: &Check) -> Value {
    let mut rows = vec![base(&c.base)];
    let current = c.base.join("current");
    let deployed = current.exists();
    rows.extend(c.shared.iter().map(|path| shared(&c.base, path)));
    rows.push(room(&c.base, c.needed_bytes));
    if c.laravel {
        rows.push(artisan(&current, deployed, &c.env));
        rows.push(document_root(&c.base));
    }
    rows.extend(c.reload.iter().filter(|r| r.trim_start().starts_with("sudo ")).map(|r| sudo_allowed(r)));
    if let Some(app) = &c.pm2_app {
        rows.push(pm2(app, &c.base, deployed, &c.env));
    }
    if let Some(url) = &c.health_url {
        rows.push(health(url, deployed));
    }
    if let Some(user) = &c.web_user {
        rows.push(ownership(&c.base, &c.shared, user));
    }
    let checks: Vec<Value> =
        rows.into_iter().map(|r| json!({"name": r.name, "status": r.status, "message": r.message})).collect();
    json!({"checks": checks})
}

fn writable(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: access(2) reads the NUL-terminated path we own.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
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
    let Ok(c) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return warn("room", "cannot tell the free space");
    };
    // SAFETY: statvfs(3) fills the struct we own from the NUL-terminated path we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return warn("room", format!("cannot tell the free space of {}", probe.display()));
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let gib = |b: u64| b as f64 / f64::from(1 << 30);
    if needed > 0 && free < needed + needed / 10 {
        fail("room", format!("{:.2} GiB free, one more release needs about {:.2} GiB", gib(free), gib(needed)))
    } else {
        pass("room", format!("{:.2} GiB free (one more release: about {:.2} GiB)", gib(free), gib(needed)))
    }
}

/// Runs a command with a time limit; its status and output (stdout and stderr, trimmed, cut
/// to 2,000 characters for a row).
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

/// Runs a command with a time limit; its status, its whole stdout and its stderr. Both pipes
/// are read while it runs (a command writing more than a pipe holds would otherwise wait
/// for a reader until the time limit: `pm2 jlist` holds every process's environment).
fn run_whole(
    program: &str,
    args: &[&str],
    dir: Option<&Path>,
    env: &std::collections::BTreeMap<String, String>,
) -> Option<(bool, String, String)> {
    use std::io::Read;
    let mut command = Command::new(program);
    command.args(args).envs(env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let mut child = command.spawn().ok()?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take()?));
    let stderr = drain(Box::new(child.stderr.take()?));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
    match status {
        Some(status) => Some((status.success(), stdout, stderr)),
        None => Some((false, String::new(), format!("`{program}` gave no answer within 20 s"))),
    }
}

fn artisan(current: &Path, deployed: bool, env: &std::collections::BTreeMap<String, String>) -> Row {
    if !deployed {
        return warn("artisan", "no release here yet: php artisan is tried once one is");
    }
    match run("php", &["artisan", "--version"], Some(current), env) {
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

fn sudo_allowed(command: &str) -> Row {
    let words: Vec<&str> = command.split_whitespace().skip(1).collect();
    let mut args = vec!["-n", "-l"];
    args.extend(&words);
    match run("sudo", &args, None, &Default::default()) {
        Some((true, _)) => pass("reload_sudo", format!("sudo allows `{}` without a password", words.join(" "))),
        Some((false, out)) => fail(
            "reload_sudo",
            format!("sudo does not allow `{}` without a password ({out}): add it to sudoers", words.join(" ")),
        ),
        None => fail("reload_sudo", "sudo is not installed, and a reload command needs it"),
    }
}

fn pm2(app: &str, base: &Path, deployed: bool, env: &std::collections::BTreeMap<String, String>) -> Row {
    // The whole list: every process carries its environment, kilobytes each.
    let Some((ok, out, err)) = run_whole("pm2", &["jlist"], None, env) else {
        return fail("pm2", "pm2 is not on the PATH of the SSH user (set the service's env PATH and PM2_HOME)");
    };
    if !ok {
        let said: String = format!("{out}{err}").trim().chars().take(2_000).collect();
        return fail("pm2", format!("pm2 jlist failed: {said}"));
    }
    let json_start = out.find('[').unwrap_or(0);
    let list: Vec<Value> = serde_json::from_str(&out[json_start..]).unwrap_or_default();
    let procs: Vec<&Value> = list.iter().filter(|p| p["name"] == app).collect();
    let Some(first) = procs.first() else {
        let hint =
            format!("pm2 start {}/current/<script> --name {app} -i 2 --cwd {}/current", base.display(), base.display());
        return if deployed {
            fail("pm2", format!("PM2 runs no app named {app}: start it once ({hint}), then pm2 save"))
        } else {
            warn("pm2", format!("PM2 runs no app named {app} yet: after the first deploy, {hint}"))
        };
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A `pm2` on PATH that answers `jlist` with `list`.
    fn fake_pm2(list: &Value) -> (tempfile::TempDir, std::collections::BTreeMap<String, String>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("list.json"), list.to_string()).unwrap();
        let script = format!("#!/bin/sh\ncat {}\n", dir.path().join("list.json").display());
        let pm2 = dir.path().join("pm2");
        std::fs::write(&pm2, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pm2, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("{}:/usr/bin:/bin", dir.path().display());
        (dir, [("PATH".to_owned(), path)].into())
    }

    #[test]
    fn the_pm2_row_reads_a_list_longer_than_a_row_and_than_a_pipe_holds() {
        // Each PM2 process carries its whole environment: real lists run to kilobytes per
        // process. This one is ~200 KB: past the 2,000 characters a row keeps, and past the
        // 64 KiB a pipe holds before its writer waits for a reader.
        let base = Path::new("/srv/storefront");
        let env: serde_json::Map<String, Value> =
            (0..1000).map(|i| (format!("VAR_{i}"), json!("x".repeat(90)))).collect();
        let process = |name: &str, mode: &str| json!({"name": name, "pid": 1, "pm2_env": {"pm_cwd": "/srv/storefront/current", "exec_mode": mode, "env": env}});
        let list = json!([
            process("server", "fork_mode"),
            process("storefront", "cluster_mode"),
            process("storefront", "cluster_mode")
        ]);
        assert!(list.to_string().len() > 150_000);
        let (_dir, path) = fake_pm2(&list);
        let row = pm2("storefront", base, true, &path);
        assert_eq!(row.status, "pass", "{}", row.message);
        assert!(row.message.contains("2 process(es) in cluster mode"), "{}", row.message);

        let (_dir, path) = fake_pm2(&json!([process("server", "fork_mode")]));
        let row = pm2("storefront", base, true, &path);
        assert_eq!(row.status, "fail", "{}", row.message);
        assert!(row.message.contains("PM2 runs no app named storefront"), "{}", row.message);
    }
}
