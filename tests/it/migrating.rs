//! docs/migrating.md run as written: every `sh` block of the guide, in order, against the
//! setup it starts from — a Laravel app under Apache with mod_php at /var/www/app with its
//! queue workers under supervisor and its scheduler in cron.d, a Node.js app started as
//! `pm2 start server.js` behind Nginx — on a node behind a real sshd, with the guide's own
//! `release.toml` tables, its Apache site, supervisor program, cron line and PM2 ecosystem
//! file. A load loop on each site sees no failed request from the first step to the last:
//! the move, the adopting deploy, the rollback and the way back to the old deploys.
//!
//! What differs from a reader's machine, and only that, is substituted in the text: the
//! system paths (under a directory of the test's own), the ports, the node's address and
//! SSH user (root), and the configuration file of the test's own Apache, Nginx, supervisor
//! and ssh (`APACHE_CONFDIR`, `-c FILE`, `-F FILE`).
//!
//! Long on purpose: it stands up the whole before-picture (Apache, supervisor, cron, PM2, Nginx)
//! the guide starts from.
//!
//! Long on purpose: one test follows the guide from its first step to its last, as a reader
//! would, with the setup each step starts from beside it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::releases::Fixture;
use crate::support::services::{self, Pm2};
use crate::support::sshd::{self, SshNode};
use crate::support::{Backend, TestServer};

/// The guide's marked blocks: `<!-- run: NAME -->` before each `sh` block, `<!-- file: NAME -->`
/// before each file the reader writes.
struct Guide {
    steps: Vec<(String, String)>,
    files: BTreeMap<String, String>,
}

fn guide() -> Guide {
    let text = include_str!("../../docs/migrating.md");
    let (mut steps, mut files) = (Vec::new(), BTreeMap::new());
    let mut lines = text.lines();
    let mut sh_blocks = 0;
    while let Some(line) = lines.next() {
        if line == "```sh" {
            sh_blocks += 1;
        }
        let Some(marker) = line.strip_prefix("<!-- ").and_then(|l| l.strip_suffix(" -->")) else { continue };
        let (kind, name) = marker.split_once(": ").expect("a marker names its block");
        let fence = lines.next().expect("a block after its marker");
        assert!(fence.starts_with("```"), "{name}: the marker is right above its block, not {fence:?}");
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        let block = format!("{}\n", block.join("\n"));
        match kind {
            "run" => {
                assert_eq!(fence, "```sh", "{name}");
                sh_blocks += 1;
                steps.push((name.to_owned(), block));
            }
            "file" => {
                files.insert(name.to_owned(), block);
            }
            _ => panic!("unknown marker {marker}"),
        }
    }
    assert_eq!(sh_blocks, steps.len(), "every sh block of docs/migrating.md is marked to run");
    Guide { steps, files }
}

/// The reader's machine and node, here: where each system path is, and the ports.
struct Place {
    root: PathBuf,
    node: SshNode,
    apache_port: u16,
    nginx_port: u16,
    old_port: u16,
    new_port: u16,
    pm2: Pm2,
}

impl Place {
    fn path(&self, system: &str) -> PathBuf {
        self.root.join(system.trim_start_matches('/'))
    }

    /// `text` with this machine's paths, ports, node and configuration files.
    fn here(&self, text: &str) -> String {
        let r = self.root.display().to_string();
        let node = (&self.node.address, self.node.port);
        let subs: Vec<(String, String)> = vec![
            (
                "ssh-keyscan -t ed25519 web1.example.com".into(),
                format!("ssh-keyscan -t ed25519 -p {} {}", node.1, node.0),
            ),
            ("host = \"web1.example.com\"".into(), format!("host = \"{}\"\nport = {}", node.0, node.1)),
            ("user = \"deploy\"".into(), "user = \"root\"".into()),
            ("/etc/ssh/ssh_host_ed25519_key.pub".into(), self.node.dir.join("host_key.pub").display().to_string()),
            ("/var/www/".into(), format!("{r}/var/www/")),
            ("/srv/".into(), format!("{r}/srv/")),
            ("/etc/".into(), format!("{r}/etc/")),
            ("supervisorctl ".into(), format!("supervisorctl -c {r}/etc/supervisor/supervisord.conf ")),
            ("nginx -t".into(), format!("nginx -c {r}/etc/nginx/nginx.conf -t")),
            ("nginx -s".into(), format!("nginx -c {r}/etc/nginx/nginx.conf -s")),
            // ssh reads ~/.ssh/config from the password database's home, not $HOME.
            ("scp ".into(), format!("scp -F {r}/home/.ssh/config ")),
            ("ssh web1".into(), format!("ssh -F {r}/home/.ssh/config web1")),
            ("http://127.0.0.1/".into(), format!("http://127.0.0.1:{}/", self.apache_port)),
            ("*:80>".into(), format!("*:{}>", self.apache_port)),
            ("listen 80;".into(), format!("listen 127.0.0.1:{};", self.nginx_port)),
            ("3000".into(), self.old_port.to_string()),
            ("3001".into(), self.new_port.to_string()),
        ];
        let mut out = text.to_owned();
        for (from, to) in &subs {
            out = out.replace(from.as_str(), to);
        }
        for system in ["/var/www/", "/srv/", "/etc/"] {
            let here = out.matches(&format!("{r}{system}")).count();
            assert_eq!(out.matches(system).count(), here, "{system} is left in:\n{out}");
        }
        for other in ["web1.example.com", "deploy\""] {
            assert!(!out.contains(other), "{other} is left in:\n{out}");
        }
        out
    }

    fn write(&self, system: &str, text: &str) {
        let path = self.path(system);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn apache_url(&self) -> String {
        format!("http://127.0.0.1:{}/version", self.apache_port)
    }

    fn nginx_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.nginx_port)
    }

    /// The environment every step runs in: the release CLI and PM2 on PATH, the reader's SSH
    /// configuration (`web1`), this Apache, a deployer's token.
    fn shell(&self, script: &str) -> Command {
        let bin_dir = Path::new(crate::support::bin()).parent().unwrap();
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-c", &format!("set -euo pipefail -x\n{script}")])
            .current_dir(self.path("work"))
            .env("PATH", format!("{}:{}:{}", bin_dir.display(), self.pm2.bin.display(), std::env::var("PATH").unwrap()))
            .env("HOME", self.path("home"))
            .env("PM2_HOME", &self.pm2.home)
            .env("NODE_CLUSTER_SCHED_POLICY", "none")
            .env("APACHE_CONFDIR", self.path("/etc/apache2"))
            .env_remove("RELEASE_CONFIG")
            .env_remove("RELEASE_DATA_DIR")
            .env_remove("RELEASE_TOKEN");
        cmd
    }

    /// Runs a setup command (not the guide's) and asserts it worked.
    fn setup(&self, script: &str) -> String {
        let out = self.shell(script).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "setup `{script}` failed: {}\n{stderr}", out.status);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Runs the guide's steps one by one, each in its own shell, and knows which ran.
struct Reader {
    steps: Vec<(String, String)>,
    ran: BTreeSet<String>,
    server: Option<(String, String)>,
}

impl Reader {
    fn step(&mut self, place: &Place, name: &str) -> String {
        let script = &self.steps.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no step {name}")).1;
        let mut cmd = place.shell(&place.here(script));
        if let Some((url, token)) = &self.server {
            cmd.env("RELEASE_SERVER", url).env("RELEASE_TOKEN", token);
        }
        let started = Instant::now();
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "step {name} stopped ({}) at the last command below\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
        eprintln!("step {name}: {:?}", started.elapsed());
        self.ran.insert(name.to_owned());
        stdout.into_owned()
    }
}

/// Requests `url` every few milliseconds until stopped; the number of requests and every
/// failure (no answer, a status other than 200, or a body of no version).
struct LoadLoop {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, BTreeMap<String, usize>, Vec<String>)>,
}

impl LoadLoop {
    fn start(url: String) -> LoadLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let client = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let (mut count, mut seen, mut failed) = (0, BTreeMap::new(), Vec::new());
            while !flag.load(Ordering::Relaxed) {
                count += 1;
                match client.get(&url).send() {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().unwrap_or_default();
                        if status != 200 || !(body.starts_with("v1 ") || body.starts_with("v2 ")) {
                            failed.push(format!("{status} {body:.200}"));
                        }
                        *seen.entry(body).or_insert(0) += 1;
                    }
                    Err(e) => failed.push(format!("{e:?}")),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (count, seen, failed)
        });
        LoadLoop { stop, thread }
    }

    /// Stops the loop; how many times each answer came.
    fn finish(self, what: &str) -> BTreeMap<String, usize> {
        self.stop.store(true, Ordering::Relaxed);
        let (count, seen, failed) = self.thread.join().unwrap();
        eprintln!("{what}: {count} requests, {} failed; answers {seen:?}", failed.len());
        assert!(count > 100, "{what}: the load loop ran ({count} requests)");
        assert!(
            failed.is_empty(),
            "{what}: {} of {count} requests failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        seen
    }
}

fn get(url: &str) -> String {
    reqwest::blocking::get(url).map(|r| r.text().unwrap_or_default()).unwrap_or_else(|e| format!("{e}"))
}

fn wait_for(url: &str, want: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = get(url);
        if body.starts_with(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{url} answers {body:?}, not {want:?}\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The Node.js app as the team has it: answers its version and its REVISION (none before
/// `release`), on PORT or 3000.
fn node_server(dir: &Path, version: &str, port: u16) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("version.txt"), version).unwrap();
    fs::write(
        dir.join("server.js"),
        format!(
            "const http = require('http');\nconst fs = require('fs');\n\
             const read = (f) => {{ try {{ return fs.readFileSync(__dirname + '/' + f, 'utf8').trim(); }} catch (e) {{ return ''; }} }};\n\
             const answer = read('version.txt') + ' ' + read('REVISION');\n\
             const server = http.createServer((req, res) => res.end(answer)).listen(process.env.PORT || {port}, '127.0.0.1');\n\
             process.on('SIGINT', () => server.close(() => process.exit(0)));\n"
        ),
    )
    .unwrap();
}

/// Today's Laravel deploy: the app at /var/www/app with its .env and storage/, migrated and
/// optimized in place, served by Apache (its own APACHE_CONFDIR) from the site the guide
/// shows, with the guide's supervisor program and cron line as they were.
fn laravel_today(place: &Place, guide: &Guide) {
    let app = place.path("/var/www/app");
    services::laravel_app(&app, "v1");
    let seed = place.path("seed");
    services::laravel_shared(&seed);
    fs::rename(seed.join("shared/.env"), app.join(".env")).unwrap();
    fs::rename(seed.join("shared/storage"), app.join("storage")).unwrap();
    place.setup(&format!("cd {} && php artisan migrate --force && php artisan optimize", app.display()));

    let old = |text: &str| place.here(&text.replace("/var/www/shop/current/", "/var/www/app/"));
    let conf = place.path("/etc/apache2");
    let run = place.path("run/apache2");
    fs::create_dir_all(&run).unwrap();
    place.write(
        "/etc/apache2/envvars",
        &format!(
            "export APACHE_RUN_USER=www-data APACHE_RUN_GROUP=www-data APACHE_PID_FILE={r}/apache2.pid \
             APACHE_RUN_DIR={r} APACHE_LOCK_DIR={r} APACHE_LOG_DIR={r} LANG=C\n",
            r = run.display()
        ),
    );
    let modules = "/usr/lib/apache2/modules";
    place.write(
        "/etc/apache2/apache2.conf",
        &format!(
            "ServerName 127.0.0.1\nPidFile ${{APACHE_PID_FILE}}\nMutex file:{r} default\nDefaultRuntimeDir {r}\n\
             Listen 127.0.0.1:{port}\nUser www-data\nGroup www-data\nErrorLog {r}/error.log\nLogLevel warn\n\
             LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so\n\
             LoadModule authz_core_module {modules}/mod_authz_core.so\n\
             LoadModule dir_module {modules}/mod_dir.so\nLoadModule mime_module {modules}/mod_mime.so\n\
             LoadModule rewrite_module {modules}/mod_rewrite.so\nLoadModule php_module {modules}/libphp8.2.so\n\
             TypesConfig /etc/mime.types\nStartServers 4\nMinSpareServers 4\nMaxSpareServers 4\nServerLimit 4\n\
             MaxRequestWorkers 4\nKeepAlive Off\n<FilesMatch \"\\.php$\">\n    SetHandler application/x-httpd-php\n</FilesMatch>\n\
             DirectoryIndex index.php\nIncludeOptional sites-enabled/*.conf\n",
            r = run.display(),
            port = place.apache_port,
        ),
    );
    place.write("/etc/apache2/sites-available/app.conf", &old(&guide.files["vhost"]));
    fs::create_dir_all(conf.join("sites-enabled")).unwrap();
    std::os::unix::fs::symlink("../sites-available/app.conf", conf.join("sites-enabled/app.conf")).unwrap();
    place.setup("apachectl start");
    wait_for(&place.apache_url(), "v1 ", || fs::read_to_string(run.join("error.log")).unwrap_or_default());

    let sup = place.path("/etc/supervisor");
    place.write(
        "/etc/supervisor/supervisord.conf",
        &format!(
            "[unix_http_server]\nfile={s}/supervisor.sock\n[supervisord]\nlogfile={s}/supervisord.log\n\
             pidfile={s}/supervisord.pid\nchildlogdir={s}\n[rpcinterface:supervisor]\n\
             supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\
             [supervisorctl]\nserverurl=unix://{s}/supervisor.sock\n[include]\nfiles = {s}/conf.d/*.conf\n",
            s = sup.display()
        ),
    );
    place.write("/etc/supervisor/conf.d/shop-worker.conf", &old(&guide.files["supervisor"]));
    place.write("/etc/cron.d/shop", &old(&guide.files["cron"]));
    place.setup(&format!("supervisord -c {}/supervisord.conf", sup.display()));
}

/// Today's Node.js deploy: /var/www/storefront started once with `pm2 start server.js` (id
/// 0, fork mode), behind Nginx (its own configuration) proxying to it.
fn node_today(place: &Place) {
    let app = place.path("/var/www/storefront");
    node_server(&app, "v1", place.old_port);
    fs::write(app.join(".env"), "NODE_ENV=production\n").unwrap();
    place.setup(&format!("cd {} && pm2 start server.js", app.display()));

    let run = place.path("run/nginx");
    fs::create_dir_all(&run).unwrap();
    place.write(
        "/etc/nginx/nginx.conf",
        &format!(
            "pid {r}/nginx.pid;\nerror_log {r}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  \
             client_body_temp_path {r}/body;\n  proxy_temp_path {r}/proxy;\n  include {e}/sites-enabled/*;\n}}\n",
            r = run.display(),
            e = place.path("/etc/nginx").display()
        ),
    );
    place.write(
        "/etc/nginx/sites-available/storefront",
        &place
            .here("server {\n    listen 80;\n    location / {\n        proxy_pass http://127.0.0.1:3000;\n    }\n}\n"),
    );
    let enabled = place.path("/etc/nginx/sites-enabled");
    fs::create_dir_all(&enabled).unwrap();
    std::os::unix::fs::symlink("../sites-available/storefront", enabled.join("storefront")).unwrap();
    place.setup(&format!("nginx -c {}", place.path("/etc/nginx/nginx.conf").display()));
    wait_for(&place.nginx_url(), "v1 ", || fs::read_to_string(run.join("error.log")).unwrap_or_default());
}

/// Stops what the test started, however it ends.
struct Services<'a>(&'a Place);

impl Drop for Services<'_> {
    fn drop(&mut self) {
        let p = self.0;
        let _ = p.shell("apachectl -k stop").output();
        let _ = p.shell(&format!("nginx -c {} -s stop", p.path("/etc/nginx/nginx.conf").display())).output();
        let _ = p
            .shell(&format!("supervisorctl -c {} shutdown", p.path("/etc/supervisor/supervisord.conf").display()))
            .output();
    }
}

/// The pids of the shop's queue workers, and the command line of each.
fn workers(place: &Place) -> Vec<(u32, String)> {
    let conf = place.path("/etc/supervisor/supervisord.conf");
    let out = place.setup(&format!("supervisorctl -c {} pid all", conf.display()));
    out.lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter(|pid| *pid > 0)
        .map(|pid| (pid, fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ")))
        .collect()
}

fn wait_for_workers(place: &Place, what: &str, ok: impl Fn(&[(u32, String)]) -> bool) -> Vec<(u32, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = workers(place);
        if now.len() == 2 && ok(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the cron line's command as cron would: as its user, through sh.
fn run_cron_line(place: &Place) {
    let line = fs::read_to_string(place.path("/etc/cron.d/shop")).unwrap();
    let fields: Vec<&str> = line.trim().splitn(7, ' ').collect();
    let out = Command::new("runuser").args(["-u", fields[5], "--", "sh", "-c", fields[6]]).output().unwrap();
    assert!(out.status.success(), "the cron line failed: {line}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_migration_guide_runs_as_written_with_no_failed_request() {
    let guide = guide();
    let root = tempfile::Builder::new().prefix("release-migrating-").tempdir().unwrap().keep();
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    let place = Place {
        root,
        node: SshNode::start(),
        apache_port: free_port(),
        nginx_port: free_port(),
        old_port: free_port(),
        new_port: free_port(),
        pm2: Pm2::new(),
    };
    let _services = Services(&place);
    fs::create_dir_all(place.path("work")).unwrap();
    // The server's configuration directory, as the Debian package makes it.
    fs::create_dir_all(place.path("/etc/release")).unwrap();
    // The reader's SSH configuration names the node `web1`.
    let ssh = place.path("home/.ssh");
    fs::create_dir_all(&ssh).unwrap();
    fs::write(
        ssh.join("config"),
        format!(
            "Host web1\n  HostName {}\n  Port {}\n  User root\n  IdentityFile {}\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
            place.node.address,
            place.node.port,
            sshd::client_key().display(),
            sshd::known_hosts(&[&place.node]).display()
        ),
    )
    .unwrap();
    laravel_today(&place, &guide);
    node_today(&place);
    let legacy_workers = wait_for_workers(&place, "the workers run from /var/www/app", |w| {
        w.iter().all(|(_, cmd)| cmd.contains("/var/www/app/artisan queue:work"))
    });

    let shop = LoadLoop::start(place.apache_url());
    let storefront = LoadLoop::start(place.nginx_url());
    let mut reader = Reader { steps: guide.steps.clone(), ran: BTreeSet::new(), server: None };

    // 2. Laravel: the base, Apache on the copy, the workers and the scheduler.
    reader.step(&place, "laravel-base");
    reader.step(&place, "laravel-apache");
    assert_eq!(
        fs::read_to_string(place.path("/etc/apache2/sites-available/app.conf")).unwrap(),
        place.here(&guide.files["vhost"]),
        "the site is as the guide shows it"
    );
    assert!(fs::read_link(place.path("/var/www/shop/current/storage")).is_ok());
    reader.step(&place, "laravel-workers");
    assert_eq!(fs::read_to_string(place.path("/etc/cron.d/shop")).unwrap(), place.here(&guide.files["cron"]));
    assert_eq!(
        fs::read_to_string(place.path("/etc/supervisor/conf.d/shop-worker.conf")).unwrap(),
        place.here(&guide.files["supervisor"])
    );
    let moved_workers = wait_for_workers(&place, "the workers run from /var/www/shop/current", |w| {
        w.iter().all(|(pid, cmd)| {
            cmd.contains("/var/www/shop/current/artisan") && !legacy_workers.iter().any(|l| l.0 == *pid)
        })
    });
    run_cron_line(&place);

    // 3. Node.js: the base, the ecosystem file, Nginx on the new app.
    reader.step(&place, "node-base");
    place.write("/srv/storefront/ecosystem.config.js", &place.here(&guide.files["ecosystem"]));
    reader.step(&place, "node-pm2");

    // 4. The server: the node's host key, the guide's service tables.
    let fingerprint = reader.step(&place, "host-key");
    let scanned = reader.step(&place, "known-hosts");
    let key = |s: &str| s.split_whitespace().nth(1).map(str::to_owned);
    assert!(key(&fingerprint).is_some() && key(&fingerprint) == key(&scanned), "{fingerprint} vs {scanned}");
    let config = format!(
        "[ssh]\nidentity = \"{}\"\nknown_hosts = \"{}\"\nconnect_timeout = \"5s\"\ncommand_timeout = \"60s\"\n\
         [[environment]]\nname = \"staging\"\n{}\n{}",
        sshd::client_key().display(),
        place.path("/etc/release/known_hosts").display(),
        // This Apache's configuration for the default reload (apachectl); PM2 where the test has it.
        place.here(&guide.files["config-shop"]).replace(
            "kind = \"laravel\"",
            &format!("kind = \"laravel\"\nenv = {{ APACHE_CONFDIR = \"{}\" }}", place.path("/etc/apache2").display())
        ),
        place
            .here(&guide.files["config-storefront"])
            .replace("kind = \"node\"", &format!("kind = \"node\"\n{}", place.pm2.env_toml())),
    );
    let f = Fixture::adopt(TestServer::start_with(Backend::Local, &config));
    reader.server = Some((f.server.url.clone(), f.token("alice").to_owned()));

    // CI has uploaded a build of each (docs/ci: tested by recipes.rs).
    let builds = place.path("builds");
    services::laravel_app(&builds.join("shop"), "v2");
    node_server(&builds.join("storefront"), "v2", place.old_port);
    for service in ["shop", "storefront"] {
        let dir = builds.join(service);
        f.cli("ci").args(["upload", dir.to_str().unwrap(), "--service", service]).assert_success();
    }
    let check = reader.step(&place, "check");
    assert!(!check.contains("FAIL"), "{check}");

    // 5. The first deploy adopts the running trees.
    reader.step(&place, "adopt");
    let status = f.cli("carol").args(["status", "--json"]).assert_success().json();
    let live = |service: &str| {
        status.as_array().unwrap().iter().find(|c| c["service"] == service).unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (shop_v2, storefront_v2) = (live("shop"), live("storefront"));
    assert_eq!(get(&place.apache_url()), format!("v2 {shop_v2}"));
    assert_eq!(get(&place.nginx_url()), format!("v2 {storefront_v2}"));
    for (base, name) in [("/var/www/shop", "shop"), ("/srv/storefront", "storefront")] {
        let kept: Vec<_> = fs::read_dir(place.path(&format!("{base}/.release")))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("adopted-"))
            .collect();
        assert_eq!(kept.len(), 1, "{name}: the old tree is kept under .release");
    }
    reader.step(&place, "adopt-workers");
    let adopted_workers = wait_for_workers(&place, "the workers restarted after the adopt", |w| {
        w.iter().all(|(pid, _)| !moved_workers.iter().any(|m| m.0 == *pid))
    });
    run_cron_line(&place);

    // 6. A new .env, applied by deploying the live digest again; its fingerprint on record.
    let env = format!("{}APP_GREETING=rotated\n", fs::read_to_string(place.path("/var/www/app/.env")).unwrap());
    fs::write(place.path("work/shop.env"), &env).unwrap();
    reader.step(&place, "env-copy");
    let shown = reader.step(&place, "env-apply");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(env.as_bytes()));
    assert!(shown.contains(&hash[..12]), "release show names the .env's SHA-256 {hash}:\n{shown}");
    assert_eq!(get(&format!("http://127.0.0.1:{}/greeting", place.apache_port)), "rotated");
    let mode = fs::metadata(place.path("/var/www/shop/shared/.env")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    // An ordinary deploy (a symlink switched for a symlink): `php artisan queue:restart` in its
    // reload restarts the workers, without help.
    let deployed_workers = wait_for_workers(&place, "the workers restarted after a deploy", |w| {
        w.iter().all(|(pid, _)| !adopted_workers.iter().any(|a| a.0 == *pid))
    });

    // 7. Back to the adopted trees, then to the old deploys.
    reader.step(&place, "rollback");
    // The rollback's queue:restart restarts the workers too. Waited for before the next step
    // stops them: a worker sent SIGTERM 20 ms after supervisor started it was seen here to
    // live on, looping, and `supervisorctl update` waited for it (stopwaitsecs: an hour).
    wait_for_workers(&place, "the workers restarted after the rollback", |w| {
        w.iter().all(|(pid, _)| !deployed_workers.iter().any(|d| d.0 == *pid))
    });
    std::thread::sleep(Duration::from_secs(2));
    let adopted = |service: &str| {
        let shown = f.cli("carol").args(["history", service, "--limit", "1", "--json"]).assert_success().json();
        shown[0]["digest"].as_str().unwrap().to_owned()
    };
    let (shop_v1, storefront_v1) = (adopted("shop"), adopted("storefront"));
    assert_eq!(get(&place.apache_url()), format!("v1 {shop_v1}"), "the adopted tree answers, as a release");
    assert_eq!(get(&place.nginx_url()), format!("v1 {storefront_v1}"), "the adopted tree answers, as a release");
    reader.step(&place, "back-laravel");
    reader.step(&place, "back-node");
    assert_eq!(get(&place.apache_url()), "v1 ", "the old tree serves again");
    assert_eq!(get(&place.nginx_url()), "v1 ", "the old process serves again");
    assert_eq!(get(&format!("http://127.0.0.1:{}/greeting", place.apache_port)), "rotated", "with the .env of shared/");
    wait_for_workers(&place, "the workers run from /var/www/app again", |w| {
        w.iter().all(|(_, cmd)| cmd.contains("/var/www/app/artisan queue:work"))
    });
    run_cron_line(&place);

    let shop_answers = shop.finish("the Laravel site through the move");
    let storefront_answers = storefront.finish("the Node.js site through the move");
    // Every answer of the Node.js site came from one whole version: the old process, the
    // release, or the adopted tree as a release.
    let whole = |v1: &str, v2: &str| BTreeSet::from(["v1 ".to_owned(), format!("v1 {v1}"), format!("v2 {v2}")]);
    let storefront_whole = whole(&storefront_v1, &storefront_v2);
    assert!(storefront_answers.keys().all(|a| storefront_whole.contains(a)), "{storefront_answers:?}");
    // mod_php at the adopt: between the exchange and Apache's graceful restart, PHP's caches
    // (opcache, realpath) still take the paths under `current` for the old tree's files, so
    // a request may mix the old tree and the new release: old code reading the new REVISION
    // (`v1 <new digest>`), or the new configuration with the old tree's base path, which has
    // no REVISION (`v2 `). The guide says so; the count is printed, not asserted (a matter of
    // timing). Any other mix (at a later deploy, at the rollback) fails.
    let shop_whole = whole(&shop_v1, &shop_v2);
    let at_adopt = [format!("v1 {shop_v2}"), "v2 ".to_owned()];
    let mixed: usize = shop_answers.iter().filter(|(a, _)| !shop_whole.contains(*a)).map(|(_, n)| n).sum();
    eprintln!("the Laravel site: {mixed} answer(s) mixing the old tree and the release, around the adopt");
    assert!(shop_answers.keys().all(|a| shop_whole.contains(a) || at_adopt.contains(a)), "{shop_answers:?}");
    for answers in [&shop_answers, &storefront_answers] {
        assert!(answers.contains_key("v1 ") && answers.keys().any(|a| a.starts_with("v2 sha256:")), "{answers:?}");
    }
    let all: BTreeSet<String> = guide.steps.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(reader.ran, all, "every step of the guide ran");
}
