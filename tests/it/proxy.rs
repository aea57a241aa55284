//! Behind Nginx with TLS, as docs/nginx/release.conf sets it up: a large upload streams through
//! and is checked against the client's digest, which a trailer would not survive.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Backend, TestCommand, TestServer};

/// Nginx from Debian, running the example site in front of `upstream`, with a certificate
/// signed by a throwaway CA (`ca`, for the client's SSL_CERT_FILE).
struct Nginx {
    child: Child,
    url: String,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstream: &str) -> Nginx {
        let dir = tempfile::Builder::new().prefix("release-nginx-").tempdir().unwrap();
        let d = dir.path();
        let ca = crate::support::certs::ca(d, "ca");
        let (cert, key) = crate::support::certs::leaf(d, "ca", "leaf");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let upstream = upstream.trim_start_matches("http://");
        // The example's TLS server, moved to this test's certificate and ports; its port-80
        // redirect left out.
        let site = include_str!("../../docs/nginx/release.conf");
        let tls_server = site.split("\nserver {").nth(1).expect("the example has a TLS server block");
        let tls_server = format!("server {{{tls_server}")
            .replace("listen 443 ssl;", &format!("listen 127.0.0.1:{port} ssl;"))
            .replace("/etc/letsencrypt/live/release.example.com/fullchain.pem", &cert.display().to_string())
            .replace("/etc/letsencrypt/live/release.example.com/privkey.pem", &key.display().to_string())
            .replace("127.0.0.1:8080", upstream);
        let tls_server = tls_server.split("\n}\n").next().unwrap().to_owned() + "\n}\n";
        assert!(tls_server.contains(&cert.display().to_string()), "{tls_server}");
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{}}\nhttp {{\naccess_log {d}/access.log;\nclient_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n{tls_server}}}\n",
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .args(["-p", &d.display().to_string(), "-c", &d.join("nginx.conf").display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start /usr/sbin/nginx (.ci/run installs it): {e}"));
        let nginx = Nginx { child, url: format!("https://127.0.0.1:{port}"), ca, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen\n{}", nginx.error_log());
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.ca.with_file_name("error.log")).unwrap_or_default()
    }

    /// The CLI, through Nginx, trusting its certificate.
    fn cli(&self, server: &TestServer) -> TestCommand {
        let mut cmd = server.cli();
        cmd.env("RELEASE_SERVER", &self.url).env("SSL_CERT_FILE", &self.ca);
        cmd
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- nginx error log ---\n{}", self.error_log());
        }
    }
}

#[test]
fn a_large_upload_through_nginx_with_tls_is_stored_and_its_digest_checked() {
    let server = TestServer::start(Backend::Local);
    let nginx = Nginx::start(&server.url);
    let ci = server.token("ci", "ci");
    let work = tempfile::tempdir().unwrap();
    let mb = std::env::var("RELEASE_PROXY_UPLOAD_MB").map_or(500, |v| v.parse().unwrap());
    let archive = crate::large::noise_archive(work.path(), mb << 20);
    let size = std::fs::metadata(&archive).unwrap().len();
    let digest = format!("sha256:{}", sha256_hex(&archive));

    let started = Instant::now();
    let out = nginx
        .cli(&server)
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", archive.to_str().unwrap(), "--service", "big", "--json"])
        .assert_success()
        .json();
    let elapsed = started.elapsed();
    let peak = server.peak_rss();
    eprintln!(
        "{size} bytes through Nginx+TLS in {:.2} s ({:.0} MB/s, debug build); server peak RSS {:.1} MiB",
        elapsed.as_secs_f64(),
        size as f64 / elapsed.as_secs_f64() / 1e6,
        peak as f64 / f64::from(1 << 20)
    );
    assert_eq!((out["digest"].as_str().unwrap(), out["size"].as_u64().unwrap()), (digest.as_str(), size));
    // A quarter of the upload at most: streamed, never held (132 MiB seen under the full
    // suite's load; the skeleton's zstd context and the frame table are a few MiB of it).
    assert!(peak < 160 << 20, "server peak RSS {peak} bytes: the upload was not streamed");
    // Stored whole, and named in Nginx's log as a request to the server (it went through).
    let stored = server.data_dir().join("objects/artifacts/sha256").join(&digest[7..]);
    assert_eq!(sha256_hex(&stored), digest[7..]);
    let access = std::fs::read_to_string(nginx.ca.with_file_name("access.log")).unwrap();
    assert!(access.contains("POST /v1/artifacts?service=big"), "{access}");

    // The header survives the proxy: bytes that do not match it are refused, nothing stored.
    let small = work.path().join("small.tar.zst");
    std::fs::write(&small, crate::support::archives::valid("through nginx")).unwrap();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let refused = Command::new("curl")
        .args(["-sS", "--cacert", nginx.ca.to_str().unwrap(), "-H", &format!("Authorization: Bearer {ci}")])
        .args(["-H", &format!("X-Release-Digest: {wrong}"), "--data-binary"])
        .arg(format!("@{}", small.display()))
        .arg(format!("{}/v1/artifacts?service=small", nginx.url))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&refused.stdout);
    assert!(body.contains("digest_mismatch"), "{body}");
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
}

#[test]
fn a_digest_trailer_goes_where_it_survives_and_the_default_needs_none() {
    let server = TestServer::start(Backend::Local);
    let nginx = Nginx::start(&server.url);
    let ci = server.token("ci", "ci");
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("app.tar.zst");
    std::fs::write(&file, crate::support::archives::valid("trailer")).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&file));
    // Straight to the server, a trailer arrives and is checked: one read of the file.
    let direct = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", file.to_str().unwrap(), "--service", "api", "--digest-trailer", "--json"])
        .assert_success()
        .json();
    assert_eq!(direct["digest"], digest.as_str());
    assert_eq!(direct["created"], true);
    // Through Nginx, the default (a header) again: already stored, nothing sent.
    let again = nginx
        .cli(&server)
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", file.to_str().unwrap(), "--service", "api", "--json"])
        .assert_success()
        .json();
    assert_eq!((again["digest"].as_str(), again["created"].as_bool()), (Some(digest.as_str()), Some(false)));
    let access = std::fs::read_to_string(nginx.ca.with_file_name("access.log")).unwrap();
    assert!(!access.contains("POST /v1/artifacts"), "a HEAD-like look first, no bytes sent:\n{access}");
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}
