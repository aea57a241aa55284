//! Test support: a real `release` server process, the CLI, a real S3 server, hostile archives.
//! Failures explain themselves: commands print their arguments, stdout and stderr; servers
//! print their log.
//!
//! Long on purpose: the server, the CLI and their output checks are one harness every test uses.

pub mod archives;
pub mod certs;
pub mod chromium;
pub mod garage;
pub mod inprocess;
pub mod raw;
pub mod services;
pub mod sshd;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use release::config::{S3Config, Secret, StorageConfig};
use release::store::Store;
use rusqlite::OptionalExtension as _;

pub use garage::{Garage, garage};

/// The `release` binary under test: this build's, or `RELEASE_TEST_BIN` (a release build, to
/// measure by hand what `tests/it/load.rs` prints).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| std::env::var("RELEASE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_release").to_owned()))
}

pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// Spawns `command` from a thread that lives as long as the test process, with
/// PR_SET_PDEATHSIG, so the child dies with the tests even when they crash. Returns its pid.
pub fn spawn_tied_to_this_process(mut command: Command) -> u32 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: prctl in the child before exec; async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn();
        let ok = child.is_ok();
        tx.send(child.map(|c| c.id())).unwrap();
        if ok {
            loop {
                std::thread::park();
            }
        }
    });
    rx.recv().unwrap().expect("spawn the helper server")
}

pub fn s3_store(garage: &Garage, prefix: &str) -> Store {
    Store::open(&StorageConfig::S3(s3_config(garage, prefix))).unwrap()
}

fn s3_config(garage: &Garage, prefix: &str) -> S3Config {
    S3Config {
        endpoint: garage.endpoint.clone(),
        region: garage.region.clone(),
        bucket: garage.bucket.clone(),
        prefix: prefix.to_owned(),
        virtual_hosted: false,
        access_key_id: Some(garage.access_key.clone()),
        secret_access_key: Some(Secret::new(garage.secret_key.clone())),
    }
}

/// `ListMultipartUploads` under the prefix, through a presigned URL (object_store signs it
/// but has no call for it).
async fn incomplete_multipart_uploads(s3: &S3Config) -> Vec<String> {
    use object_store::signer::Signer;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&s3.endpoint)
        .with_region(&s3.region)
        .with_bucket_name(&s3.bucket)
        .with_allow_http(true)
        .with_access_key_id(s3.access_key_id.as_deref().unwrap())
        .with_secret_access_key(s3.secret_access_key.as_ref().unwrap().expose())
        .build()
        .unwrap();
    let options = object_store::signer::SignedUrlOptions::new()
        .with_query([("uploads", String::new()), ("prefix", format!("{}uploads/", s3.prefix))]);
    let url = store
        .signed_url_opts(reqwest::Method::GET, &object_store::path::Path::from(""), Duration::from_secs(60), &options)
        .await
        .unwrap();
    let response = reqwest::get(url).await.unwrap();
    let status = response.status();
    let xml = response.text().await.unwrap();
    assert!(status.is_success(), "ListMultipartUploads: {status}\n{xml}");
    xml.split("<Key>")
        .skip(1)
        .filter_map(|rest| rest.split("</Key>").next())
        .map(|k| format!("multipart:{k}"))
        .collect()
}

/// Local nodes of `service`, one in each of `environments`, under the server's own directory
/// (`@NODES@`): a release needs a node to go live on.
pub fn local_nodes(service: &str, environments: &[&str]) -> String {
    environments
        .iter()
        .map(|env| {
            format!("[[service.{service}.node]]\nenvironment = \"{env}\"\nhost = \"local\"\nbase = \"@NODES@/{service}-{env}\"\n")
        })
        .collect()
}

/// `config` with [`local_nodes`] for every `[service.NAME]` it has, in each environment it
/// names (`[[environment]]` then `name = "…"`).
pub fn with_local_nodes(config: &str) -> String {
    let lines: Vec<&str> = config.lines().collect();
    let environments: Vec<&str> = lines
        .windows(2)
        .filter(|pair| pair[0] == "[[environment]]")
        .filter_map(|pair| pair[1].strip_prefix("name = \"")?.strip_suffix('"'))
        .collect();
    let mut out = config.to_owned();
    for service in lines.iter().filter_map(|l| l.strip_prefix("[service.")?.strip_suffix(']')) {
        out.push_str(&local_nodes(service, &environments));
    }
    out
}

/// Separates the harness's part of a test configuration from the test's own.
const EXTRA_MARK: &str = "# --- test configuration ---\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Local,
    S3,
}

/// A `release serve` process on a port of its own, with its own data directory (and, on S3,
/// its own key prefix in the shared bucket).
pub struct TestServer {
    pub url: String,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    config: PathBuf,
    storage: StorageConfig,
    log: PathBuf,
    starts: u32,
    /// Variables the server process is started with (the harness clears every other
    /// `RELEASE_*` one).
    env: Vec<(String, String)>,
}

impl TestServer {
    pub fn start(backend: Backend) -> TestServer {
        TestServer::start_with(backend, "")
    }

    /// Starts with `extra` appended to the configuration file (limits, services…); `@NODES@`
    /// in it names a directory of this server's own, for local nodes' bases.
    pub fn start_with(backend: Backend, extra: &str) -> TestServer {
        TestServer::start_with_env(backend, extra, &[])
    }

    /// Starts with `extra` in the configuration and these variables in the server's
    /// environment (e.g. `RELEASE_TEST_DEPLOY_LEASE_MS`), at every start.
    pub fn start_with_env(backend: Backend, extra: &str, env: &[(&str, &str)]) -> TestServer {
        TestServer::start_listening(backend, extra, env, "listen = \"127.0.0.1:0\"\n")
    }

    /// Starts with `server` among the `[server]` lines (e.g. `trusted_proxies`) and `extra`
    /// in the rest of the configuration.
    pub fn start_with_server(backend: Backend, server: &str, extra: &str) -> TestServer {
        TestServer::start_listening(backend, extra, &[], &format!("listen = \"127.0.0.1:0\"\n{server}"))
    }

    /// Starts on a port picked beforehand, which it also gives as its `node_url`: nodes fetch
    /// artifacts from it by signed URL.
    pub fn start_serving_nodes(backend: Backend, extra: &str) -> TestServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = format!("listen = \"127.0.0.1:{port}\"\nnode_url = \"http://127.0.0.1:{port}\"\n");
        TestServer::start_listening(backend, extra, &[], &server)
    }

    /// `server`: the `[server]` lines besides `data_dir`.
    fn start_listening(backend: Backend, extra: &str, env: &[(&str, &str)], server: &str) -> TestServer {
        let dir = tempfile::Builder::new().prefix("release-test-").tempdir().unwrap();
        let data = dir.path().join("data");
        let (storage, storage_toml) = match backend {
            Backend::Local => (StorageConfig::Local { path: data.join("objects") }, String::new()),
            Backend::S3 => {
                let garage = garage();
                let prefix = format!("test-{}/", uuid::Uuid::new_v4());
                let toml = format!(
                    "[storage]\nkind = \"s3\"\nendpoint = \"{}\"\nregion = \"{}\"\nbucket = \"{}\"\nprefix = \"{prefix}\"\n\
                     access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                    garage.endpoint, garage.region, garage.bucket, garage.access_key, garage.secret_key
                );
                (StorageConfig::S3(s3_config(&garage, &prefix)), toml)
            }
        };
        // A test's nodes may live under the server's own directory: `@NODES@`.
        let extra = extra.replace("@NODES@", &dir.path().join("nodes").display().to_string());
        let config = dir.path().join("release.toml");
        std::fs::write(
            &config,
            format!("[server]\n{server}data_dir = \"{}\"\n{storage_toml}{EXTRA_MARK}{extra}", data.display()),
        )
        .unwrap();
        let mut server = TestServer {
            url: String::new(),
            log: dir.path().join("server.log"),
            dir,
            child: None,
            config,
            storage,
            starts: 0,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        server.spawn();
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        self.starts += 1;
        self.child = Some(self.serve_command().spawn().unwrap());
        self.url = self.wait_for_listen_line();
    }

    /// `release serve` on this configuration and data directory, its log appended to.
    fn serve_command(&self) -> Command {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = clean_command();
        command
            .args(["serve", "--config", self.config.to_str().unwrap()])
            .env("RELEASE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        command
    }

    /// Stops the server (SIGKILL), starts it again on the same data directory and
    /// configuration, and SIGKILLs that start `after` later, listening or not: a crash during
    /// the start, its recovery cut short. The server is stopped afterwards; `restart` it.
    /// Returns whether it was listening already.
    pub fn start_and_kill_after(&mut self, after: Duration) -> bool {
        self.kill();
        let mut child = self.serve_command().spawn().unwrap();
        std::thread::sleep(after);
        let _ = child.kill();
        let _ = child.wait();
        let listened = self.log().matches("listening on ").count() as u32;
        let was_listening = listened > self.starts;
        self.starts = listened;
        was_listening
    }

    fn wait_for_listen_line(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let wanted = self.starts;
        loop {
            let log = self.log();
            let found = log
                .lines()
                .filter_map(|l| l.split("listening on ").nth(1))
                .nth(wanted as usize - 1)
                .map(|rest| rest.split_whitespace().next().unwrap().to_owned());
            if let Some(url) = found {
                return url;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("release serve exited with {status} before listening\n--- server log ---\n{log}");
            }
            if Instant::now() > deadline {
                panic!("release serve did not listen within 30 s\n--- server log ---\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the exit after a SIGTERM the test sent itself.
    pub fn terminate_after_signal(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("release serve did not stop within 20 s of SIGTERM\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Stops the server, replaces the `extra` part of its configuration, starts it again on
    /// the same data directory and store.
    pub fn reconfigure(&mut self, extra: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let base = text.split(EXTRA_MARK).next().unwrap().to_owned();
        let extra = extra.replace("@NODES@", &self.dir.path().join("nodes").display().to_string());
        std::fs::write(&self.config, format!("{base}{EXTRA_MARK}{extra}")).unwrap();
        self.restart();
    }

    /// A fresh token with these roles, made with the CLI on the server's registry, owned by a
    /// person of the same name (`--owner`, which deployer, approver and admin tokens need).
    pub fn token(&self, name: &str, roles: &str) -> String {
        self.token_with(name, roles, &["--owner", name])
    }

    pub fn token_with(&self, name: &str, roles: &str, extra: &[&str]) -> String {
        let out = self.cli().args(["token", "create", name, "--role", roles, "--json"]).args(extra).assert_success();
        out.json()["token"].as_str().unwrap().to_owned()
    }

    /// The CLI pointed at this server and its data directory.
    pub fn cli(&self) -> TestCommand {
        let mut cmd = TestCommand::new();
        cmd.env("RELEASE_SERVER", &self.url).env("RELEASE_DATA_DIR", self.data_dir());
        cmd
    }

    pub fn store(&self) -> Store {
        Store::open(&self.storage).unwrap()
    }

    /// Digests present under artifact keys in the store.
    pub fn artifact_keys(&self) -> Vec<release::digest::Digest> {
        block_on(self.store().list_artifacts()).unwrap()
    }

    /// Staging objects present: the local backend's staging and part files; on S3, staging
    /// objects and multipart uploads begun and neither completed nor aborted (which a plain
    /// listing never shows).
    pub fn staging_keys(&self) -> Vec<String> {
        let mut keys = block_on(self.store().list_uploads()).unwrap();
        if let StorageConfig::S3(s3) = &self.storage {
            keys.extend(block_on(incomplete_multipart_uploads(s3)));
        }
        keys
    }

    /// The stored index of `digest` as the registry names it: `None` without a row, `Some(None)`
    /// when the row names an object the store does not hold.
    pub fn stored_index(&self, digest: &str) -> Option<Option<release::archive::FileIndex>> {
        let named = self.index_named(digest)?;
        let artifact: release::digest::Digest = digest.parse().unwrap();
        match block_on(self.store().get_index(named)) {
            Ok(bytes) => Some(Some(release::archive::FileIndex::decode(&bytes, artifact).unwrap())),
            Err(release::store::StoreError::NotFound { .. }) => Some(None),
            Err(e) => panic!("{e}"),
        }
    }

    /// The digest of the index the registry names for artifact `digest`, if any.
    fn index_named(&self, digest: &str) -> Option<release::digest::Digest> {
        let conn = rusqlite::Connection::open_with_flags(
            self.data_dir().join("registry.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let named: Option<String> = conn
            .query_row("SELECT index_sha256 FROM artifact_indexes WHERE digest = ?1", [digest], |r| r.get(0))
            .optional()
            .unwrap();
        named.map(|n| n.parse().unwrap())
    }

    /// Deletes the stored index of artifact `digest` behind the server's back (the row that
    /// names it stays): a store that lost an object.
    pub fn lose_index(&self, digest: &str) {
        let named = self.index_named(digest).expect("the artifact has an index");
        block_on(self.store().purge_index(named)).unwrap();
    }

    /// Runs one query against the registry (read-only) and returns the first column as i64.
    pub fn count(&self, sql: &str) -> i64 {
        let conn = rusqlite::Connection::open_with_flags(
            self.data_dir().join("registry.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Asserts that the store and the registry hold no artifact at all, and no staging object.
    pub fn assert_nothing_stored(&self) {
        assert_eq!(self.artifact_keys(), vec![], "artifact keys in the store\n{}", self.log());
        assert_eq!(self.count("SELECT count(*) FROM artifacts"), 0, "artifact rows");
        assert_eq!(self.count("SELECT count(*) FROM artifact_uploads"), 0, "upload rows");
        self.assert_no_staging_left();
    }

    /// Staging objects are aborted asynchronously after a failed upload; give it a moment.
    pub fn assert_no_staging_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.staging_keys();
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!("staging objects left behind: {left:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
    }

    /// Posts `body` as an upload for service `api` with a new ci token (so a test's refusals
    /// never reach one token's budget of named refusal events); the status and the document.
    pub fn upload_as_new_ci(&self, body: Vec<u8>) -> (reqwest::StatusCode, serde_json::Value) {
        let ci = self.token(&format!("ci-{}", uuid::Uuid::new_v4()), "ci");
        let response = self
            .http()
            .post(format!("{}/v1/artifacts?service=api", self.url))
            .bearer_auth(&ci)
            .body(body)
            .send()
            .unwrap();
        (response.status(), response.json().unwrap())
    }

    /// Peak resident memory of the server process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- server log ({}) ---\n{}", self.url, self.log());
        }
    }
}

/// The `release` binary with no `RELEASE_*` or `AWS_*` from the environment leaking in.
fn clean_command() -> Command {
    let mut command = Command::new(bin());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("RELEASE_") || key.starts_with("AWS_") {
            command.env_remove(&*key);
        }
    }
    command
}

/// A CLI invocation whose failures print everything needed to understand them.
pub struct TestCommand {
    command: Command,
}

impl TestCommand {
    pub fn new() -> TestCommand {
        TestCommand { command: clean_command() }
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut TestCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(&mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> &mut TestCommand {
        self.command.env(key, value);
        self
    }

    pub fn run(&mut self) -> CmdOutput {
        let output = self.command.stdin(Stdio::null()).output().unwrap();
        CmdOutput { description: format!("{:?}", self.command), output }
    }

    pub fn assert_success(&mut self) -> CmdOutput {
        let out = self.run();
        assert!(out.output.status.success(), "command failed\n{out}");
        out
    }

    /// Asserts the exit code and returns the output.
    pub fn assert_exit(&mut self, code: i32) -> CmdOutput {
        let out = self.run();
        assert_eq!(out.output.status.code(), Some(code), "unexpected exit code\n{out}");
        out
    }
}

pub struct CmdOutput {
    description: String,
    pub output: Output,
}

impl CmdOutput {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.output.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{self}"))
    }
}

impl std::fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.description,
            self.output.status,
            self.stdout(),
            self.stderr()
        )
    }
}

/// Writes a small, Laravel-like tree under `root`.
pub fn app_tree(root: &Path, version: &str) {
    let files = [
        ("artisan", "#!/usr/bin/env php\n<?php require __DIR__.'/vendor/autoload.php';\n"),
        ("public/index.php", "<?php echo 'hello';\n"),
        ("routes/web.php", "<?php Route::get('/version', fn () => config('app.version'));\n"),
        ("config/app.php", "<?php return ['version' => 'VERSION'];\n"),
        ("database/migrations/2024_01_01_000000_create_users_table.php", "<?php // users\n"),
        ("vendor/autoload.php", "<?php require '/usr/share/php/Illuminate/autoload.php';\n"),
    ];
    for (path, content) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content.replace("VERSION", version)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("artisan"), std::fs::Permissions::from_mode(0o755)).unwrap();
}
