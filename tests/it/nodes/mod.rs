//! Deploys onto nodes on this machine (`host = "local"`: the node agent runs as a child of
//! the server, no SSH): the files on each node, the registry and `status` agree at every
//! step; faults end with the whole fleet on the previous release and the release failed.
//! This file holds the fleet fixture the topic files share.

mod adopt;
mod cleanup;
mod deploy;
mod health;
mod hooks;
mod recovery;
mod rollback;
mod share;
mod status;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::archives::{RawTar, zstd};
use crate::support::{Backend, TestServer};

/// A fleet of local nodes, each a base directory with its shared/ ready.
struct Fleet {
    f: Fixture,
    bases: Vec<PathBuf>,
}

const FINALIZE: &str = "hooks.finalize = [\"echo finalized > FINALIZED\"]";

const RELOAD: &str = "hooks.reload = [\"echo reloaded $RELEASE_DIGEST >> $RELEASE_BASE/reloads\"]";

fn node_config(bases: &[PathBuf], service_extra: &str) -> String {
    let finalize = if service_extra.contains("hooks.finalize") { "" } else { FINALIZE };
    let reload = if service_extra.contains("hooks.reload") { "" } else { RELOAD };
    let mut config = format!(
        "[service.web]\nkind = \"generic\"\nshared = [\"config.txt\"]\nkeep = 3\n{finalize}\n{reload}\n{service_extra}\n"
    );
    for base in bases {
        config.push_str(&format!(
            "[[service.web.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\n",
            base.display()
        ));
    }
    config
}

impl Fleet {
    fn new(nodes: usize, service_extra: &str) -> Fleet {
        Fleet::with_env(nodes, service_extra, &[])
    }

    /// With these variables in the server's environment.
    fn with_env(nodes: usize, service_extra: &str, env: &[(&str, &str)]) -> Fleet {
        let root = tempfile::Builder::new().prefix("release-fleet-").tempdir().unwrap().keep();
        let bases: Vec<PathBuf> = (1..=nodes).map(|i| root.join(format!("node{i}"))).collect();
        for base in &bases {
            fs::create_dir_all(base.join("shared")).unwrap();
            fs::write(base.join("shared/config.txt"), format!("config of {}", base.display())).unwrap();
        }
        let server = TestServer::start_with_env(Backend::Local, &node_config(&bases, service_extra), env);
        Fleet { f: Fixture::adopt(server), bases }
    }

    /// Uploads an archive for `web` with `version.txt` = `version` (and `extra` files).
    fn upload(&self, version: &str, extra: &[(&str, &[u8])]) -> String {
        let mut tar =
            RawTar::new().dir("public").file("version.txt", version.as_bytes()).file("public/index.html", b"hi");
        for (path, data) in extra {
            tar = tar.file(path, data);
        }
        let response = self
            .f
            .server
            .http()
            .post(format!("{}/v1/artifacts?service=web", self.f.server.url))
            .bearer_auth(self.f.token("ci"))
            .body(zstd(&tar.finish()))
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{}", response.text().unwrap());
        response.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned()
    }

    /// Deploys and waits until it is final and, when live, until every node's clean-up (which
    /// follows `live`, in the background) is recorded: what `release_dirs` then shows is
    /// retention's doing.
    /// Asks for `digest` in staging (as CI) without waiting for it; the release's id.
    fn ask(&self, digest: &str) -> i64 {
        let (status, release) =
            self.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": digest}));
        assert!(status.is_success(), "{release}");
        release["id"].as_i64().unwrap()
    }

    fn deploy(&self, digest: &str) -> Value {
        let settled = self.f.settle(self.ask(digest));
        if settled["state"] == "live" { self.cleaned(&settled["id"]) } else { settled }
    }

    /// Waits until release `id` has a `cleanup` phase recorded for every node; returns it.
    fn cleaned(&self, id: &Value) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let shown = self.f.get("carol", &format!("/v1/releases/{id}"));
            let cleaned = shown["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "cleanup").count();
            if cleaned >= self.bases.len() {
                return shown;
            }
            assert!(std::time::Instant::now() < deadline, "no clean-up on every node: {shown}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// What `current` points at on every node.
    fn currents(&self) -> Vec<Option<String>> {
        self.bases
            .iter()
            .map(|b| {
                fs::read_link(b.join("current"))
                    .ok()
                    .map(|t| format!("sha256:{}", t.file_name().unwrap().to_string_lossy()))
            })
            .collect()
    }

    /// The registry, `status` and every node's `current` agree on `digest`.
    fn assert_all_on(&self, digest: &str) {
        assert!(
            self.currents().iter().all(|c| c.as_deref() == Some(digest)),
            "nodes: {:?}, expected {digest}",
            self.currents()
        );
        let status = self.f.get("carol", "/v1/status?service=web");
        let staging = status.as_array().unwrap().iter().find(|c| c["environment"] == "staging").unwrap();
        assert_eq!(staging["digest"], digest, "status: {staging}");
        for base in &self.bases {
            let version = fs::read_to_string(base.join("current/version.txt")).unwrap();
            let hex = &digest[7..];
            assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(hex));
            assert!(!version.is_empty());
        }
    }

    fn phases(&self, release: &Value) -> Vec<(String, String, String)> {
        let shown = self.f.get("carol", &format!("/v1/releases/{}", release["id"]));
        shown["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["node"].as_str().unwrap().to_owned(),
                    d["phase"].as_str().unwrap().to_owned(),
                    d["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

/// Takes the node's lock as the agent does (flock), until the file is dropped.
fn hold_node_lock(base: &Path) -> fs::File {
    use std::os::fd::AsRawFd;
    let lock = fs::OpenOptions::new().write(true).open(base.join(".release/lock")).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    lock
}

fn release_dirs(base: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(base.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A small HTTP server on `port` standing in for a node's application: it answers with the
/// digest `<base>/current` points at and `current/health.txt`, read at each request (so it
/// follows the switch); status 500 when that file starts with `500`, 503 while
/// `<base>/shared/starting` exists, else 200. Killed when dropped.
struct HealthServer(std::process::Child);

impl HealthServer {
    fn start(port: u16, base: &Path) -> HealthServer {
        let script = r#"
import http.server, os, sys
base = sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            digest = "sha256:" + os.path.basename(os.readlink(os.path.join(base, "current")))
        except OSError:
            digest = "none"
        try:
            text = open(os.path.join(base, "current", "health.txt"), "rb").read()
        except OSError:
            text = b""
        starting = os.path.exists(os.path.join(base, "shared", "starting"))
        code = 503 if starting else (500 if text.startswith(b"500") else 200)
        body = digest.encode() + b"\n" + text
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;
        let child = std::process::Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .arg(base)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "the health server did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        HealthServer(child)
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
