//! Real services for the node tests: a Laravel 8 app (from Debian's php-laravel-framework,
//! no composer) under Apache with mod_php, and a Node.js app under PM2 in cluster mode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The Laravel app's files, embedded (`tests/it/support/laravel/`).
const LARAVEL: &[(&str, &str)] = &[
    ("artisan", include_str!("laravel/artisan")),
    ("vendor/autoload.php", include_str!("laravel/vendor/autoload.php")),
    ("bootstrap/app.php", include_str!("laravel/bootstrap/app.php")),
    ("public/index.php", include_str!("laravel/public/index.php")),
    ("public/.htaccess", include_str!("laravel/public/.htaccess")),
    ("app/Http/Kernel.php", include_str!("laravel/app/Http/Kernel.php")),
    ("app/Console/Kernel.php", include_str!("laravel/app/Console/Kernel.php")),
    ("app/Exceptions/Handler.php", include_str!("laravel/app/Exceptions/Handler.php")),
    ("app/Providers/RouteServiceProvider.php", include_str!("laravel/app/Providers/RouteServiceProvider.php")),
    ("config/app.php", include_str!("laravel/config/app.php")),
    ("config/cache.php", include_str!("laravel/config/cache.php")),
    ("config/database.php", include_str!("laravel/config/database.php")),
    ("config/logging.php", include_str!("laravel/config/logging.php")),
    ("config/queue.php", include_str!("laravel/config/queue.php")),
    ("config/view.php", include_str!("laravel/config/view.php")),
    ("routes/web.php", include_str!("laravel/routes/web.php")),
    (
        "database/migrations/2026_01_01_000000_create_visits_table.php",
        include_str!("laravel/database/migrations/2026_01_01_000000_create_visits_table.php"),
    ),
];

/// Writes the Laravel app with `config('app.version')` = `version` (shared paths left out).
pub fn laravel_app(dir: &Path, version: &str) {
    for (path, content) in LARAVEL {
        let target = dir.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, content.replace("'VERSION'", &format!("'{version}'"))).unwrap();
    }
    for empty in ["bootstrap/cache", "resources/views"] {
        std::fs::create_dir_all(dir.join(empty)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("artisan"), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A Laravel node's shared/: `.env` with a key, `storage/` (with the SQLite database) that
/// mod_php (www-data) can write.
pub fn laravel_shared(base: &Path) {
    let storage = base.join("shared/storage");
    for dir in ["app", "logs", "framework/cache/data", "framework/sessions", "framework/views"] {
        std::fs::create_dir_all(storage.join(dir)).unwrap();
    }
    std::fs::write(storage.join("database.sqlite"), b"").unwrap();
    let key: [u8; 32] = rand::random();
    use base64_engine::encode;
    std::fs::write(base.join("shared/.env"), format!("APP_KEY=base64:{}\nAPP_ENV=production\n", encode(&key))).unwrap();
    let status = Command::new("chown").args(["-R", "www-data:www-data"]).arg(&storage).status().unwrap();
    assert!(status.success());
}

mod base64_engine {
    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// An Apache with mod_php of its own (its own config, pid file and port), serving
/// `<base>/current/public`.
pub struct Apache {
    pub port: u16,
    conf: PathBuf,
    pub dir: PathBuf,
}

impl Apache {
    /// Writes the configuration; the server itself is started by the service's first reload
    /// (`-k graceful` starts a server that is not running), since its DocumentRoot, the first
    /// release, does not exist before. `workers`: how many prefork workers (1 makes "the
    /// worker that served the old release" deterministic).
    pub fn configure(base: &Path, workers: u32) -> Apache {
        let dir = tempfile::Builder::new().prefix("release-apache-").tempdir().unwrap().keep();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let docroot = base.join("current/public");
        let conf = dir.join("apache2.conf");
        let modules = "/usr/lib/apache2/modules";
        std::fs::write(
            &conf,
            format!(
                "ServerRoot /etc/apache2\nServerName 127.0.0.1\nPidFile {d}/apache.pid\nMutex file:{d} default\n\
                 DefaultRuntimeDir {d}\nListen 127.0.0.1:{port}\nUser www-data\nGroup www-data\n\
                 ErrorLog {d}/error.log\nLogLevel warn\n\
                 LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so\n\
                 LoadModule authz_core_module {modules}/mod_authz_core.so\n\
                 LoadModule dir_module {modules}/mod_dir.so\nLoadModule mime_module {modules}/mod_mime.so\n\
                 LoadModule rewrite_module {modules}/mod_rewrite.so\nLoadModule php_module {modules}/libphp8.2.so\n\
                 TypesConfig /etc/mime.types\nStartServers {workers}\nMinSpareServers {workers}\n\
                 MaxSpareServers {workers}\nServerLimit {workers}\nMaxRequestWorkers {workers}\nKeepAlive Off\n\
                 <FilesMatch \"\\.php$\">\n    SetHandler application/x-httpd-php\n</FilesMatch>\n\
                 DirectoryIndex index.php\nDocumentRoot {root}\n\
                 <Directory {root}>\n    Options FollowSymLinks\n    AllowOverride All\n    Require all granted\n</Directory>\n",
                d = dir.display(),
                root = docroot.display(),
            ),
        )
        .unwrap();
        Apache { port, conf, dir }
    }

    /// The command that makes every worker pick up the new release (a graceful restart; it
    /// starts the server if it is not running).
    pub fn graceful(&self) -> String {
        format!("/usr/sbin/apache2 -f {} -k graceful", self.conf.display())
    }

    /// Starts the server unless it runs, and nothing more: no graceful restart.
    pub fn start_once(&self) -> String {
        format!("[ -f {}/apache.pid ] || /usr/sbin/apache2 -f {} -k start", self.dir.display(), self.conf.display())
    }

    /// Reads `site` too (`IncludeOptional`, at the end): a `<VirtualHost>` there overrides the
    /// DocumentRoot, as a file in sites-enabled does for the system's Apache.
    pub fn include(&self, site: &Path) {
        let mut text = std::fs::read_to_string(&self.conf).unwrap();
        text.push_str(&format!("IncludeOptional {}\n", site.display()));
        std::fs::write(&self.conf, text).unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/apache2").arg("-f").arg(&self.conf).args(["-k", "stop"]).output();
    }
}

/// Where `.ci/run` installs PM2 (npm), unless RELEASE_TEST_PM2 names another.
pub fn pm2_bin_dir() -> PathBuf {
    let dir = std::env::var_os("RELEASE_TEST_PM2_BIN").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/release-ci/node_modules/.bin")
    });
    assert!(dir.join("pm2").exists(), "the PM2 tests need pm2 in {}: run `bash .ci/run`", dir.display());
    dir
}

/// The Node.js app: answers every request with its version and REVISION.
pub fn node_app(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("version.txt"), version).unwrap();
    std::fs::write(
        dir.join("app.js"),
        "const http = require('http');\nconst fs = require('fs');\n\
         const read = (f) => { try { return fs.readFileSync(__dirname + '/' + f, 'utf8').trim(); } catch (e) { return ''; } };\n\
         const answer = read('version.txt') + ' ' + read('REVISION');\n\
         const server = http.createServer((req, res) => res.end(answer)).listen(process.env.PORT, '127.0.0.1');\n\
         // A graceful stop, as pm2 reload expects: finish what is in flight, then exit.\n\
         process.on('SIGINT', () => server.close(() => process.exit(0)));\n",
    )
    .unwrap();
}

/// A private PM2 (its own PM2_HOME) running the app `name` in cluster mode.
pub struct Pm2 {
    pub home: PathBuf,
    pub bin: PathBuf,
    pub port: u16,
}

impl Pm2 {
    pub fn new() -> Pm2 {
        let home = tempfile::Builder::new().prefix("release-pm2-").tempdir().unwrap().keep();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Pm2 { home, bin: pm2_bin_dir(), port }
    }

    /// The PATH and PM2_HOME the service's hooks and checks need, as TOML. The PM2 daemon
    /// starts from the first reload, so it inherits NODE_CLUSTER_SCHED_POLICY=none: with
    /// Node's default round-robin scheduling a connection the master has just handed to a
    /// worker that is stopping hangs (measured here: 3 of 15,478 requests over 4 reloads);
    /// with the kernel spreading connections, none of 31,018 over 5.
    pub fn env_toml(&self) -> String {
        format!(
            "env = {{ PATH = \"{}:/usr/local/bin:/usr/bin:/bin\", PM2_HOME = \"{}\", NODE_CLUSTER_SCHED_POLICY = \"none\" }}",
            self.bin.display(),
            self.home.display()
        )
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(self.bin.join("pm2"));
        command.env("PM2_HOME", &self.home).env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin.display()));
        command
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Pm2 {
    fn drop(&mut self) {
        let _ = self.command().arg("kill").output();
    }
}

/// Requests `url` in a loop from two threads until `stop`; every answer (status, body).
pub fn load(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(u16, String)>> {
    std::thread::spawn(move || {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (url, stop) = (url.clone(), stop.clone());
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .pool_max_idle_per_host(0)
                        .build()
                        .unwrap();
                    let mut answers = Vec::new();
                    // Bounded: at most 3000 requests per thread.
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && answers.len() < 3000 {
                        match client.get(&url).send() {
                            Ok(r) => answers.push((r.status().as_u16(), r.text().unwrap_or_default())),
                            Err(e) => answers.push((0, format!("{e:?}"))),
                        }
                    }
                    answers
                })
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    })
}
