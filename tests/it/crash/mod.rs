//! Crash harness (issue 11, item 3): SIGKILLs the real `release serve` at random moments while
//! uploads (small ones and ~200 MB streamed ones, generated on the fly), deploys to local nodes
//! (`host = "local"`), approvals, rollbacks and purges run; restarts it on the same data
//! directory and configuration; and after every restart checks the invariants:
//!
//! 1. every artifact the registry lists (bytes not purged) is in the store, readable through
//!    the API, and hashes to its digest (hashed once; it is immutable);
//! 2. every upload that was acknowledged (200/201 with a digest) has its rows;
//! 3. no object without its row: no key under `artifacts/` that the registry does not name, no
//!    bytes left of a recorded purge, no staging object (`uploads/`) and, on S3, no multipart
//!    upload left begun (listed with a signed `ListMultipartUploads`);
//! 4. no release stays `deploying` (or `approved`) past its lease after the restart;
//! 5. every node's `current` is the registry's live digest of its environment (none: no
//!    `current`);
//! 6. `release audit verify` passes.
//!
//! Every moment is drawn from a seeded RNG, printed at the start; `RELEASE_CRASH_SEED=<n>`
//! replays the same kill delays and worker choices (the interleaving itself still depends on
//! the machine). CI runs `RELEASE_CRASH_KILLS` (default 10) kills per store, local and Garage;
//! by hand, the long mode:
//!
//! ```text
//! RELEASE_CRASH_KILLS=200 cargo test --test it crash:: -- --nocapture
//! ```
//!
//! `RELEASE_CRASH_BIG_MB` (default 200) sizes the big uploads. The run ends with its figures
//! (kills, kills during big uploads, kills with a release deploying, time to resolve the
//! interrupted deploys after the restart) and fails listing every violation it saw.
//!
//! This file holds the configuration, the shared state and the registry helpers; the topic
//! files hold the workload, the random-kill run and the targeted kills.

mod harness;
mod targeted;
mod workload;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::rngs::StdRng;
use serde_json::Value;
use sha2::Digest as _;

use crate::support::TestServer;

/// The deploy lease the server runs with here: short, so that "past its lease" is checked
/// within the run.
const LEASE_MS: u64 = 5000;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The nodes: (environment, name).
const NODES: [(&str, &str); 3] = [("staging", "s1"), ("staging", "s2"), ("production", "p1")];

fn config(root: &Path) -> String {
    let mut config = String::from(
        "[audit]\ncheckpoint_interval = \"1s\"\n\
         [[environment]]\nname = \"staging\"\n\
         [[environment]]\nname = \"production\"\nrequires_approval = true\napproval_ttl = \"24h\"\n\
         [service.web]\nkind = \"generic\"\nkeep = 3\n\
         hooks.finalize = [\"sleep 0.3\"]\nhooks.reload = [\"echo reloaded $RELEASE_DIGEST >> $RELEASE_BASE/reloads\"]\n",
    );
    for (env, name) in NODES {
        let base = root.join(name);
        std::fs::create_dir_all(&base).unwrap();
        config.push_str(&format!(
            "[[service.web.node]]\nname = \"{name}\"\nenvironment = \"{env}\"\nhost = \"local\"\nbase = \"{}\"\n",
            base.display()
        ));
    }
    config
}

/// An acknowledged upload.
#[derive(Clone, Debug)]
struct Acked {
    digest: String,
    service: &'static str,
}

/// Whether workers may start an operation, and how many are under way.
struct Gate {
    open: bool,
    inflight: usize,
}

/// What the workers and the killer share.
struct Shared {
    url: RwLock<String>,
    gate: Mutex<Gate>,
    changed: Condvar,
    done: AtomicBool,
    acked: Mutex<Vec<Acked>>,
    /// Small bodies acknowledged, uploaded again now and then (a repeat, or a restore).
    bodies: Mutex<Vec<Vec<u8>>>,
    big_in_flight: AtomicUsize,
    violations: Mutex<Vec<String>>,
    counts: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Shared {
    fn count(&self, what: String) {
        *self.counts.lock().unwrap().entry(what).or_default() += 1;
    }

    fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.violations.lock().unwrap().push(what);
    }

    /// Runs `op` with the server's URL each time the gate is open, until the run is done.
    fn work(&self, mut op: impl FnMut(&str)) {
        loop {
            let url = {
                let mut gate = self.gate.lock().unwrap();
                while !gate.open && !self.done.load(Ordering::SeqCst) {
                    gate = self.changed.wait(gate).unwrap();
                }
                if self.done.load(Ordering::SeqCst) {
                    return;
                }
                gate.inflight += 1;
                self.url.read().unwrap().clone()
            };
            op(&url);
            let mut gate = self.gate.lock().unwrap();
            gate.inflight -= 1;
            self.changed.notify_all();
        }
    }

    /// Stops new operations and waits until those under way ended.
    fn close(&self) {
        self.gate.lock().unwrap().open = false;
    }

    fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut gate = self.gate.lock().unwrap();
        while gate.inflight > 0 {
            assert!(Instant::now() < deadline, "workers did not stop within 120 s");
            gate = self.changed.wait_timeout(gate, Duration::from_millis(100)).unwrap().0;
        }
    }

    fn open(&self) {
        self.gate.lock().unwrap().open = true;
        self.changed.notify_all();
    }

    fn small_digest(&self, rng: &mut StdRng) -> Option<String> {
        let acked = self.acked.lock().unwrap();
        let small: Vec<&Acked> = acked.iter().filter(|a| a.service == "web").collect();
        (!small.is_empty()).then(|| small[rng.random_range(0..small.len())].digest.clone())
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

/// Posts `body`; the digest when acknowledged.
fn post_upload(
    http: &reqwest::blocking::Client,
    url: &str,
    service: &str,
    token: &str,
    body: reqwest::blocking::Body,
) -> Option<String> {
    let response =
        http.post(format!("{url}/v1/artifacts?service={service}")).bearer_auth(token).body(body).send().ok()?;
    if !response.status().is_success() {
        return None;
    }
    let answer: Value = response.json().ok()?;
    answer["digest"].as_str().map(str::to_owned)
}

struct Tokens {
    ci: String,
    alice: String,
    bob: String,
    root: String,
}

/// Read-only registry queries.
fn registry(server: &TestServer) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        server.data_dir().join("registry.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

fn strings(conn: &rusqlite::Connection, sql: &str) -> Vec<String> {
    let mut statement = conn.prepare(sql).unwrap();
    statement.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect()
}

fn ids(conn: &rusqlite::Connection, sql: &str) -> Vec<i64> {
    let mut statement = conn.prepare(sql).unwrap();
    statement.query_map([], |r| r.get::<_, i64>(0)).unwrap().map(Result::unwrap).collect()
}

/// A node's base, read back from the server's configuration.
fn server_config_base(server: &TestServer, name: &str) -> String {
    let text = std::fs::read_to_string(server.dir.path().join("release.toml")).unwrap();
    let section = text.split("[[service.web.node]]").find(|s| s.contains(&format!("name = \"{name}\""))).unwrap();
    section.lines().find_map(|l| l.strip_prefix("base = \"")).unwrap().trim_end_matches('"').to_owned()
}
