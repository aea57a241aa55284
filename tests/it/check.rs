//! `release check` (issue 12 item 11), the rows the first tests left out, each made to fail
//! for real on an sshd node and then to pass once the node is fixed: Laravel's `php artisan`
//! and Apache DocumentRoot, a reload through sudo the SSH user may not run, PM2 (no daemon, an
//! app stopped, in fork mode, from outside `current`), a base the SSH user cannot write, a
//! health URL failing after a deploy; and the refusals around it. Every check leaves the
//! node's tree as it was.
//!
//! Long on purpose: each row's story (fail for real, fix, pass) reads best whole.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::releases::Fixture;
use crate::support::services::{self, Apache, Pm2};
use crate::support::sshd::{self, SshNode};
use crate::support::{Backend, TestCommand, TestServer};

/// A server whose services have one node each, behind one sshd.
struct Fleet {
    f: Fixture,
    /// Kept for its sshd.
    _node: SshNode,
    /// The sshd's own directory: each service's base is `<dir>/<service>`.
    dir: PathBuf,
}

impl Fleet {
    /// `services`: each service's name; `section` gives its `[service.NAME]` lines (without
    /// nodes) from its name and base. Each gets a node in staging, logged in as `user`, with
    /// `node_extra` lines (e.g. `migrate = true`), its base (with an empty `shared/`) the user's.
    fn start(user: &str, services: &[&str], node_extra: &str, mut section: impl FnMut(&str, &Path) -> String) -> Fleet {
        let node = SshNode::start();
        let known_hosts = sshd::known_hosts(&[&node]);
        let mut config = format!(
            "[ssh]\nidentity = \"{}\"\nknown_hosts = \"{}\"\nconnect_timeout = \"5s\"\ncommand_timeout = \"60s\"\n",
            sshd::client_key().display(),
            known_hosts.display()
        );
        for name in services {
            let base = node.dir.join(name);
            fs::create_dir_all(base.join("shared")).unwrap();
            config.push_str(&format!(
                "[service.{name}]\n{}\n[[service.{name}.node]]\nenvironment = \"staging\"\nhost = \"{}\"\n\
                 port = {}\nuser = \"{user}\"\nbase = \"{}\"\n{node_extra}",
                section(name, &base),
                node.address,
                node.port,
                base.display()
            ));
            if user != "root" {
                chown(&base, user);
            }
        }
        if user != "root" {
            // Its sshd reads the authorized keys as the user.
            sshd::open_to_all(&node.dir);
        }
        config.push_str("[[environment]]\nname = \"staging\"\n");
        let f = Fixture::adopt(TestServer::start_with(Backend::Local, &config));
        let dir = node.dir.clone();
        Fleet { f, _node: node, dir }
    }

    fn base(&self, service: &str) -> PathBuf {
        self.dir.join(service)
    }

    /// `release check SERVICE --env staging --json` as Alice, asserted to exit `code` and to
    /// leave the node's tree (every service's base) as it was; its answer.
    fn check(&self, service: &str, code: i32) -> Value {
        let before = tree(&self.dir);
        let out = self.f.cli("alice").args(["check", service, "--env", "staging", "--json"]).run();
        assert_eq!(tree(&self.dir), before, "check changed the node: {out}");
        let answer = out.json();
        assert_eq!(out.output.status.code(), Some(code), "{answer}");
        assert_eq!(answer["ok"], code == 0, "exit 0 exactly when ok: {answer}");
        answer
    }
}

/// The one row `name` of the node, asserted to be `status` with each of `says` in its message;
/// the message.
fn assert_row(answer: &Value, name: &str, status: &str, says: &[&str]) -> String {
    let rows: Vec<&Value> =
        answer["nodes"][0]["checks"].as_array().unwrap().iter().filter(|c| c["name"] == name).collect();
    assert_eq!(rows.len(), 1, "one {name} row: {answer}");
    let message = rows[0]["message"].as_str().unwrap().to_owned();
    assert_eq!(rows[0]["status"], status, "{name}: {message}\n{answer}");
    for said in says {
        assert!(message.contains(said), "{name}: expected {said:?} in {message:?}");
    }
    message
}

/// Every path under `root`: size, mode, owner, modification time and link target.
fn tree(root: &Path) -> Vec<(PathBuf, u64, u32, u32, i64, Option<PathBuf>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        // sshd's own log changes with every connection: the node's files are what count.
        let Some(meta) = fs::symlink_metadata(&path).ok().filter(|_| !path.ends_with("sshd.log")) else { continue };
        let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        out.push((path.clone(), meta.len(), meta.mode(), meta.uid(), mtime, fs::read_link(&path).ok()));
        if meta.is_dir() {
            for e in fs::read_dir(&path).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

fn chown(path: &Path, owner: &str) {
    let status = Command::new("chown").arg("-R").arg(format!("{owner}:")).arg(path).status().unwrap();
    assert!(status.success(), "chown -R {owner}: {}", path.display());
}

fn sh(command: &str) {
    let out = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A file of the system's configuration this test adds, removed however the test ends.
struct Added(PathBuf);

impl Drop for Added {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `<base>/current` → `releases/<name>`, made by hand (as a tree deployed another way is).
fn current_by_hand(base: &Path, name: &str) -> PathBuf {
    let release = base.join("releases").join(name);
    fs::create_dir_all(&release).unwrap();
    std::os::unix::fs::symlink(format!("releases/{name}"), base.join("current")).unwrap();
    release
}

#[test]
fn php_artisan_that_does_not_run_fails_the_artisan_row_saying_why_and_the_check_writes_no_cache() {
    let fleet = Fleet::start("root", &["shop"], "migrate = true\n", |_, _| "kind = \"laravel\"".into());
    let base = fleet.base("shop");
    services::laravel_shared(&base);

    // Nothing deployed yet: artisan is tried once something is; no Apache site names the base.
    let answer = fleet.check("shop", 0);
    assert_row(&answer, "artisan", "warn", &["no release here yet"]);
    assert_row(&answer, "document_root", "warn", &[&format!("no Apache site names {}", base.display())]);
    assert_row(&answer, "ownership", "pass", &["www-data can write"]);

    // A release without artisan (the build left it out).
    let release = current_by_hand(&base, "r1");
    services::laravel_app(&release, "v1");
    fs::rename(release.join("artisan"), base.join("artisan.aside")).unwrap();
    let answer = fleet.check("shop", 1);
    let current = base.join("current");
    assert_row(
        &answer,
        "artisan",
        "fail",
        &[&format!("php artisan --version failed in {}", current.display()), "Could not open input file: artisan"],
    );

    // Artisan there, its dependencies not (composer install never ran).
    fs::rename(base.join("artisan.aside"), release.join("artisan")).unwrap();
    fs::rename(release.join("vendor/autoload.php"), base.join("autoload.aside")).unwrap();
    let answer = fleet.check("shop", 1);
    assert_row(&answer, "artisan", "fail", &["php artisan --version failed", "vendor/autoload.php"]);

    // Fixed: Laravel answers. The release was never optimized, so booting it writes the package
    // and service manifests into bootstrap/cache: `check` (tree compared) writes none there.
    fs::rename(base.join("autoload.aside"), release.join("vendor/autoload.php")).unwrap();
    let answer = fleet.check("shop", 0);
    assert_row(&answer, "artisan", "pass", &["Laravel Framework 8."]);
    assert_eq!(fs::read_dir(release.join("bootstrap/cache")).unwrap().count(), 0, "no cache written");
}

/// GET `url` until it answers `status` (Apache's workers restart after a graceful restart);
/// its body.
fn get_until(url: &str, status: u16) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::blocking::get(url) {
            if r.status().as_u16() == status {
                return r.text().unwrap();
            }
        }
        assert!(std::time::Instant::now() < deadline, "{url} never answered {status}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn an_apache_site_serving_current_instead_of_current_public_fails_the_document_root_row() {
    let mut apache = None;
    let fleet = Fleet::start("root", &["shop"], "migrate = true\n", |_, base| {
        let a = Apache::configure(base, 1);
        let section = format!(
            "kind = \"laravel\"\nhealth = {{ url = \"{}\", expect = \"{{digest}}\" }}\n\
             hooks.finalize = [\"echo $RELEASE_DIGEST > REVISION\", \"php artisan optimize\"]\nhooks.reload = [{:?}]",
            a.url("/version"),
            a.graceful()
        );
        apache = Some(a);
        section
    });
    let apache = apache.unwrap();
    let base = fleet.base("shop");
    services::laravel_shared(&base);
    // The app's site, where the check reads Apache's sites; the fixture's Apache reads it too.
    let site = Added(PathBuf::from(format!("/etc/apache2/sites-enabled/release-check-test-{}.conf", apache.port)));
    let write_site = |root: &Path| {
        fs::write(
            &site.0,
            format!(
                "<VirtualHost 127.0.0.1:{}>\n    ServerName shop.test\n    DocumentRoot \"{}/\"\n</VirtualHost>\n",
                apache.port,
                root.display()
            ),
        )
        .unwrap()
    };
    let public = base.join("current/public");
    write_site(&public);
    apache.include(&site.0);

    let src = base.parent().unwrap().join("v1");
    services::laravel_app(&src, "v1");
    let out = fleet.f.cli("ci").args(["upload", src.to_str().unwrap(), "--service", "shop", "--json"]).assert_success();
    let v1 = out.json()["digest"].as_str().unwrap().to_owned();
    let deployed = fleet.f.cli("ci").args(["deploy", "shop", "--env", "staging", &v1, "--wait", "--json"]).run().json();
    assert_eq!(deployed["state"], "live", "{deployed}\n{}", apache.log());
    let answer = fleet.check("shop", 0);
    assert_row(&answer, "document_root", "pass", &[&format!("Apache serves {}", public.display())]);
    assert_row(&answer, "artisan", "pass", &["Laravel Framework"]);
    assert_row(&answer, "health", "pass", &["200"]);

    // Someone points the site at current: Apache serves the release's root, the app is gone.
    write_site(&base.join("current"));
    sh(&apache.graceful());
    get_until(&apache.url("/version"), 404);
    let answer = fleet.check("shop", 1);
    assert_row(
        &answer,
        "document_root",
        "fail",
        &[&format!(
            "{} serves {}/current: point its DocumentRoot at {}",
            site.0.display(),
            base.display(),
            public.display()
        )],
    );
    // The health URL answers 404 (a 4xx may be the placeholder digest: a warning).
    assert_row(&answer, "health", "warn", &["404"]);
    let human = fleet.f.cli("alice").args(["check", "shop", "--env", "staging"]).assert_exit(1);
    assert!(human.stdout().contains("document_root") && human.stdout().contains("FAIL"), "{human}");

    // Fixed: the app answers again, and the check passes.
    write_site(&public);
    sh(&apache.graceful());
    assert_eq!(get_until(&apache.url("/version"), 200), format!("v1 {v1}"));
    let answer = fleet.check("shop", 0);
    assert_row(&answer, "document_root", "pass", &[]);
}

#[test]
fn a_reload_through_sudo_the_ssh_user_may_not_run_fails_naming_the_sudoers_line_to_add() {
    let Some(_) = sshd::system_user("release-deploy", true) else { return };
    let fleet = Fleet::start("release-deploy", &["web"], "", |_, _| {
        "kind = \"generic\"\nhooks.reload = [\"sudo apachectl -k graceful\", \"true\"]".into()
    });
    let answer = fleet.check("web", 1);
    let line = "release-deploy ALL=(root) NOPASSWD: /usr/sbin/apachectl -k graceful";
    assert_row(
        &answer,
        "reload_sudo",
        "fail",
        &[
            "sudo does not allow `apachectl -k graceful` without a password (sudo: a password is required)",
            &format!("add the sudoers line `{line}`"),
        ],
    );
    assert_row(&answer, "base", "pass", &[]);

    // A rule for another command of the same program is not enough.
    let dropin = Added(PathBuf::from(format!("/etc/sudoers.d/release-check-test-{}", std::process::id())));
    let allow = |rule: &str| {
        fs::write(&dropin.0, format!("{rule}\n")).unwrap();
        fs::set_permissions(&dropin.0, fs::Permissions::from_mode(0o440)).unwrap();
        let checked = Command::new("visudo").arg("-cf").arg(&dropin.0).output().unwrap();
        assert!(checked.status.success(), "{rule}: {}", String::from_utf8_lossy(&checked.stdout));
    };
    allow("release-deploy ALL=(root) NOPASSWD: /usr/sbin/apachectl -k stop");
    let answer = fleet.check("web", 1);
    assert_row(&answer, "reload_sudo", "fail", &[&format!("add the sudoers line `{line}`")]);

    // The line the check named, in a drop-in: allowed.
    allow(line);
    let answer = fleet.check("web", 0);
    assert_row(&answer, "reload_sudo", "pass", &["sudo allows `apachectl -k graceful` without a password"]);
}

#[test]
fn a_base_the_ssh_user_cannot_write_fails_the_base_row() {
    let Some(_) = sshd::system_user("release-deploy", true) else { return };
    let fleet = Fleet::start("release-deploy", &["web"], "", |_, _| "kind = \"generic\"".into());
    let base = fleet.base("web");
    let answer = fleet.check("web", 0);
    assert_row(&answer, "base", "pass", &[&format!("{} is a writable directory", base.display())]);

    // Root's, as after a `sudo mkdir`: the SSH user cannot make releases in it.
    chown(&base, "root");
    let answer = fleet.check("web", 1);
    assert_row(&answer, "base", "fail", &[&format!("{} is not writable by this user: chown it", base.display())]);

    // Not there, in a directory the SSH user cannot write either: the first deploy could not
    // make it.
    fs::remove_dir_all(&base).unwrap();
    let answer = fleet.check("web", 1);
    assert_row(&answer, "base", "fail", &["does not exist and cannot be made here: mkdir -p it and chown it"]);
    assert!(!base.exists(), "the check made nothing");

    fs::create_dir_all(base.join("shared")).unwrap();
    chown(&base, "release-deploy");
    let answer = fleet.check("web", 0);
    assert_row(&answer, "base", "pass", &[]);
}

/// The Node.js app: answers its version and REVISION, or 500 while its `.env` (shared) says
/// the database is down.
fn node_app(dir: &Path, version: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("version.txt"), version).unwrap();
    fs::write(
        dir.join("app.js"),
        "const http = require('http');\nconst fs = require('fs');\n\
         const read = (f) => { try { return fs.readFileSync(__dirname + '/' + f, 'utf8').trim(); } catch (e) { return ''; } };\n\
         const answer = read('version.txt') + ' ' + read('REVISION');\n\
         const server = http.createServer((req, res) => {\n\
           if (read('.env').includes('DATABASE=down')) { res.statusCode = 500; return res.end('database is down'); }\n\
           res.end(answer);\n\
         }).listen(process.env.PORT, '127.0.0.1');\n\
         process.on('SIGINT', () => server.close(() => process.exit(0)));\n",
    )
    .unwrap();
}

#[test]
fn pm2_rows_and_a_health_url_failing_after_a_deploy() {
    let pm2 = Pm2::new();
    let env = pm2.env_toml().replace(" }", &format!(", PORT = \"{}\" }}", pm2.port));
    let reload = "pm2 reload web || pm2 start app.js -i 2 --name web --cwd $RELEASE_BASE/current";
    let fleet = Fleet::start("root", &["web", "bare"], "", |name, _| match name {
        "web" => format!(
            "kind = \"node\"\n{env}\nhealth = {{ url = \"{}\", expect = \"{{digest}}\" }}\n\
             hooks.finalize = [\"echo $RELEASE_DIGEST > REVISION\"]\nhooks.reload = [{reload:?}]",
            pm2.url()
        ),
        // The same app, with a PATH that has no pm2.
        _ => "kind = \"node\"\npm2_app = \"web\"\nenv = { PATH = \"/usr/bin:/bin\" }".into(),
    });
    let base = fleet.base("web");
    fs::write(base.join("shared/.env"), "DATABASE=up\n").unwrap();
    fs::write(fleet.base("bare").join("shared/.env"), "").unwrap();
    let daemon = pm2.home.join("pm2.pid");

    // Before the first deploy: no daemon, nothing answers; warnings, and no daemon started.
    let answer = fleet.check("web", 0);
    assert_row(
        &answer,
        "pm2",
        "warn",
        &[&format!("no PM2 daemon runs for PM2_HOME {} (the check starts none)", pm2.home.display())],
    );
    assert_row(&answer, "health", "warn", &["does not answer yet"]);
    assert!(!daemon.exists(), "the check started a PM2 daemon");

    let answer = fleet.check("bare", 1);
    assert_row(&answer, "pm2", "fail", &["pm2 is not on the PATH of the SSH user"]);

    // Deployed (the reload starts it in cluster mode from current): every row passes.
    let src = base.parent().unwrap().join("v1");
    node_app(&src, "v1");
    let out = fleet.f.cli("ci").args(["upload", src.to_str().unwrap(), "--service", "web", "--json"]).assert_success();
    let v1 = out.json()["digest"].as_str().unwrap().to_owned();
    let deployed = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--wait", "--json"]).run().json();
    assert_eq!(deployed["state"], "live", "{deployed}");
    let current = base.join("current");
    let answer = fleet.check("web", 0);
    assert_row(&answer, "pm2", "pass", &[&format!("web: 2 process(es) in cluster mode from {}", current.display())]);
    assert_row(&answer, "health", "pass", &["200"]);

    // The app answers 500 (its database is down): the health row fails.
    fs::write(base.join("shared/.env"), "DATABASE=down\n").unwrap();
    let answer = fleet.check("web", 1);
    assert_row(&answer, "health", "fail", &[&pm2.url(), "answers 500", "not healthy"]);
    fs::write(base.join("shared/.env"), "DATABASE=up\n").unwrap();

    // Stopped: PM2 knows the app, nothing answers.
    let pm2_run = |args: &[&str], dir: &Path| {
        let out = pm2.command().args(args).current_dir(dir).env("PORT", pm2.port.to_string()).output().unwrap();
        assert!(out.status.success(), "pm2 {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    pm2_run(&["stop", "web"], &base);
    let answer = fleet.check("web", 1);
    assert_row(
        &answer,
        "pm2",
        "fail",
        &["2 of 2 process(es) of web are not online (stopped, stopped): pm2 restart web"],
    );
    assert_row(&answer, "health", "fail", &[&format!("{} does not answer", pm2.url())]);

    // Started again by hand in fork mode: a warning (reload drops connections), not a failure.
    pm2_run(&["delete", "web"], &base);
    let script = current.join("app.js");
    pm2_run(&["start", script.to_str().unwrap(), "--name", "web", "--cwd", current.to_str().unwrap()], &base);
    get_until(&pm2.url(), 200);
    let answer = fleet.check("web", 0);
    assert_row(&answer, "pm2", "warn", &["web runs in fork_mode: pm2 reload restarts it", "use cluster mode (-i N)"]);
    assert_row(&answer, "health", "pass", &[]);

    // Started from inside the release (cd current resolves it): the next deploy's processes
    // would keep running the old code.
    pm2_run(&["delete", "web"], &base);
    pm2_run(&["start", "app.js", "-i", "2", "--name", "web"], &current);
    let release = fs::canonicalize(&current).unwrap();
    let answer = fleet.check("web", 1);
    assert_row(
        &answer,
        "pm2",
        "fail",
        &[&format!("web runs in {}, not under {}: start it with --cwd", release.display(), current.display())],
    );

    // No daemon at all once something is deployed: a failure, and the check starts none.
    pm2_run(&["kill"], &base);
    assert!(!daemon.exists());
    let answer = fleet.check("web", 1);
    assert_row(&answer, "pm2", "fail", &["no PM2 daemon runs for PM2_HOME", "(the check starts none)", "pm2 start"]);
    assert!(!daemon.exists(), "the check started a PM2 daemon");
}

#[test]
fn check_refusals_and_configurations_that_cannot_load() {
    let extra = "[service.solo]\nkind = \"generic\"\n[[service.solo.node]]\nenvironment = \"staging\"\nhost = \"local\"\n\
                 base = \"@NODES@/solo\"\n";
    let f = Fixture::with_env(extra, &[]);
    let get = |path: &str| {
        let r = f.server.http().get(format!("{}{path}", f.server.url)).bearer_auth(f.token("alice")).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    // No environment named: 400, saying how to name one.
    let (status, body) = get("/v1/services/api/check");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(body["error"]["message"].as_str().unwrap().contains("name the environment: ?environment=E"), "{body}");
    // A service without a node in that environment: 409, saying where to add one.
    let (status, body) = get("/v1/services/solo/check?environment=production");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "no_nodes");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("[[service.solo.node]] with environment = \"production\""), "{message}");
    let out = f.cli("alice").args(["check", "solo", "--env", "production"]).run();
    assert!(!out.output.status.success() && out.stderr().contains("[[service.solo.node]]"), "{out}");
    // An environment that is not configured: named, with those that are.
    let (status, body) = get("/v1/services/solo/check?environment=prod");
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("staging, production"), "{body}");
    // A service that has one: 200.
    assert_eq!(get("/v1/services/solo/check?environment=staging").0, 200);

    // `init` into a directory whose name a TOML string cannot hold plainly: refused, nothing
    // made; a name with other odd characters gets a configuration that loads.
    let root = tempfile::tempdir().unwrap();
    for name in ["say \"hi\"", "back\\slash"] {
        let dir = root.path().join(name);
        let out = TestCommand::new().args(["init", dir.to_str().unwrap()]).assert_exit(2);
        assert!(out.stderr().contains("a directory whose name TOML can hold plainly"), "{out}");
        assert!(!dir.exists(), "{name}: init made {}", dir.display());
    }
    let dir = root.path().join("it's #1 [ok] $HOME");
    TestCommand::new().args(["init", dir.to_str().unwrap()]).assert_success();
    let config = dir.join("release.toml");
    TestCommand::new()
        .args(["token", "create", "ops", "--role", "admin", "--owner", "ops", "--config", config.to_str().unwrap()])
        .assert_success();
    assert!(dir.join("data/registry.db").exists(), "the data directory the configuration names");

    // `[server] public_url` that is no page address: the server does not start, naming the key.
    let config = root.path().join("release.toml");
    for (url, says) in [
        ("release.example.com", "is not a URL"),
        ("ftp://release.example.com", "an http:// or https:// URL with a host"),
        ("https://release.example.com/?from=mail", "without user, password, query or fragment"),
    ] {
        fs::write(&config, format!("[server]\nlisten = \"127.0.0.1:0\"\npublic_url = \"{url}\"\n")).unwrap();
        let err = crate::server::serve_refusing(&config);
        assert!(err.contains("release.toml: key `server.public_url`") && err.contains(says), "{err}");
    }
}
