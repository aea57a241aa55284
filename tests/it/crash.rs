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

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::releases::Fixture;
use crate::support::archives::{RawTar, zstd};
use crate::support::{Backend, TestServer};

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

/// A ~`size`-byte archive generated as it is read: one tar entry of incompressible noise
/// (xorshift from `seed`), compressed by zstd (which stores noise as raw blocks).
struct BigBody {
    encoder: zstd::stream::read::Encoder<'static, std::io::BufReader<TarNoise>>,
    hasher: sha2::Sha256,
}

struct TarNoise {
    header: Vec<u8>,
    at: usize,
    size: u64,
    written: u64,
    trailer: usize,
    state: u64,
}

impl Read for TarNoise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.header.len() {
            let n = buf.len().min(self.header.len() - self.at);
            buf[..n].copy_from_slice(&self.header[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        if self.written < self.size {
            let n = (buf.len() as u64).min(self.size - self.written) as usize & !7;
            let n = if n == 0 { ((self.size - self.written) as usize).min(buf.len()) } else { n };
            for chunk in buf[..n].chunks_mut(8) {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                let word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            self.written += n as u64;
            return Ok(n);
        }
        let n = buf.len().min(self.trailer);
        buf[..n].fill(0);
        self.trailer -= n;
        Ok(n)
    }
}

impl BigBody {
    fn new(seed: u64, size: u64) -> BigBody {
        // A header for one file of `size` bytes: RawTar writes the header before the data.
        let header = RawTar::new().entry("blob.bin", b'0', 0o644, "", &[]).unfinished();
        let mut header = header;
        // Patch the size field (and the checksum) of the empty entry RawTar wrote.
        let size_field = format!("{size:011o}\0");
        header[124..136].copy_from_slice(size_field.as_bytes());
        header[148..156].fill(b' ');
        let sum: u64 = header.iter().map(|b| *b as u64).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let pad = (size.next_multiple_of(512) - size) as usize;
        let tar = TarNoise { header, at: 0, size, written: 0, trailer: pad + 1024, state: seed | 1 };
        let encoder = zstd::stream::read::Encoder::new(tar, 1).unwrap();
        BigBody { encoder, hasher: sha2::Sha256::new() }
    }
}

/// The body as the server receives it, hashed on the way.
struct HashingBody(std::sync::Arc<Mutex<BigBody>>);

impl Read for HashingBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut body = self.0.lock().unwrap();
        let n = body.encoder.read(buf)?;
        body.hasher.update(&buf[..n]);
        Ok(n)
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

fn small_uploads(shared: &Shared, tokens: &Tokens, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        let again = { shared.bodies.lock().unwrap().clone() };
        let body = if !again.is_empty() && rng.random_range(0..4) == 0 {
            again[rng.random_range(0..again.len())].clone()
        } else {
            let noise: Vec<u8> = (0..rng.random_range(16..4096)).map(|_| rng.random::<u8>()).collect();
            zstd(
                &RawTar::new()
                    .dir("public")
                    .file("version.txt", format!("v{}", rng.random::<u32>()).as_bytes())
                    .file("public/noise.bin", &noise)
                    .finish(),
            )
        };
        let expected = digest_of(&body);
        if let Some(digest) = post_upload(&http, url, "web", &tokens.ci, body.clone().into()) {
            if digest != expected {
                shared.violation(format!("small upload acknowledged as {digest}, its bytes are {expected}"));
            }
            shared.acked.lock().unwrap().push(Acked { digest, service: "web" });
            let mut bodies = shared.bodies.lock().unwrap();
            if bodies.len() < 32 {
                bodies.push(body);
            }
            shared.count("small uploads acknowledged".into());
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(20..200)));
    });
}

fn big_uploads(shared: &Shared, tokens: &Tokens, seed: u64, size: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        // A few variants only: some uploads repeat bytes already stored (or purged).
        let variant = rng.random_range(1..=3u64);
        let body = std::sync::Arc::new(Mutex::new(BigBody::new(variant.wrapping_mul(0x9E37_79B9_7F4A_7C15), size)));
        shared.big_in_flight.fetch_add(1, Ordering::SeqCst);
        let answer = post_upload(
            &http,
            url,
            "big",
            &tokens.ci,
            reqwest::blocking::Body::new(HashingBody(std::sync::Arc::clone(&body))),
        );
        shared.big_in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(digest) = answer {
            let hasher = std::mem::take(&mut body.lock().unwrap().hasher);
            let expected = format!("sha256:{}", hex::encode(hasher.finalize()));
            if digest != expected {
                shared.violation(format!("big upload acknowledged as {digest}, its bytes are {expected}"));
            }
            shared.acked.lock().unwrap().push(Acked { digest, service: "big" });
            shared.count("big uploads acknowledged".into());
        }
    });
}

fn deploys(shared: &Shared, tokens: &Tokens, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        let Some(digest) = shared.small_digest(&mut rng) else {
            std::thread::sleep(Duration::from_millis(50));
            return;
        };
        let (path, token, body, what) = if rng.random_range(0..5) == 0 {
            ("rollback", &tokens.alice, json!({"service": "web", "environment": "staging"}), "rollbacks")
        } else {
            ("", &tokens.ci, json!({"service": "web", "environment": "staging", "digest": digest}), "deploys")
        };
        let path = if path.is_empty() { "/v1/releases".to_owned() } else { format!("/v1/releases/{path}") };
        if let Ok(response) = http.post(format!("{url}{path}")).bearer_auth(token).json(&body).send()
            && response.status() == reqwest::StatusCode::CREATED
        {
            shared.count(format!("{what} accepted"));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
    });
}

fn approvals(shared: &Shared, tokens: &Tokens, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        let Some(digest) = shared.small_digest(&mut rng) else {
            std::thread::sleep(Duration::from_millis(50));
            return;
        };
        let body = json!({"service": "web", "environment": "production", "digest": digest});
        let Ok(response) = http.post(format!("{url}/v1/releases")).bearer_auth(&tokens.alice).json(&body).send() else {
            return;
        };
        if response.status() != reqwest::StatusCode::CREATED {
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        let Ok(release) = response.json::<Value>() else { return };
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        if let Ok(response) = http
            .post(format!("{url}/v1/releases/{}/approve", release["id"]))
            .bearer_auth(&tokens.bob)
            .json(&json!({}))
            .send()
            && response.status().is_success()
        {
            shared.count("approvals accepted".into());
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
    });
}

fn purges(shared: &Shared, tokens: &Tokens, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
        let body = json!({"never_live": true, "older_than_days": 1});
        if let Ok(response) =
            http.post(format!("{url}/v1/artifacts/purge")).bearer_auth(&tokens.root).json(&body).send()
            && let Ok(answer) = response.json::<Value>()
        {
            let n = answer["purged"].as_array().map_or(0, Vec::len) as u64;
            *shared.counts.lock().unwrap().entry("artifacts purged".into()).or_default() += n;
        }
    });
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

/// The harness's figures.
#[derive(Default)]
struct Figures {
    kills: u32,
    during_big_uploads: u32,
    with_deploying: u32,
    /// Restarts killed too, during their start.
    starts_killed: u32,
    resolve_times: Vec<f64>,
}

fn run(backend: Backend) {
    let kills = env_number("RELEASE_CRASH_KILLS", 10);
    let seed = std::env::var("RELEASE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    let big = env_number("RELEASE_CRASH_BIG_MB", 200) << 20;
    eprintln!("crash harness on {backend:?}: seed {seed} (replay: RELEASE_CRASH_SEED={seed}), {kills} kills");
    let mut rng = StdRng::seed_from_u64(seed);

    let root = tempfile::Builder::new().prefix("release-crash-nodes-").tempdir().unwrap();
    let lease = LEASE_MS.to_string();
    let server = TestServer::start_with_env(
        backend,
        &config(root.path()),
        &[("RELEASE_TEST_DEPLOY_LEASE_MS", &lease), ("RELEASE_TEST_PURGE_DAY_MS", "15000")],
    );
    let mut f = Fixture::adopt(server);
    let tokens = Tokens {
        ci: f.token("ci").to_owned(),
        alice: f.token("alice").to_owned(),
        bob: f.token("bob").to_owned(),
        root: f.token("root").to_owned(),
    };
    let shared = Shared {
        url: RwLock::new(f.server.url.clone()),
        gate: Mutex::new(Gate { open: true, inflight: 0 }),
        changed: Condvar::new(),
        done: AtomicBool::new(false),
        acked: Mutex::default(),
        bodies: Mutex::default(),
        big_in_flight: AtomicUsize::new(0),
        violations: Mutex::default(),
        counts: Mutex::default(),
    };
    let mut figures = Figures::default();
    let mut verified = HashSet::new();
    let started = Instant::now();

    std::thread::scope(|scope| {
        let (s, t) = (&shared, &tokens);
        let worker_seeds: [u64; 6] = std::array::from_fn(|_| rng.random());
        scope.spawn(move || small_uploads(s, t, worker_seeds[0]));
        scope.spawn(move || small_uploads(s, t, worker_seeds[1]));
        scope.spawn(move || big_uploads(s, t, worker_seeds[2], big));
        scope.spawn(move || deploys(s, t, worker_seeds[3]));
        scope.spawn(move || approvals(s, t, worker_seeds[4]));
        scope.spawn(move || purges(s, t, worker_seeds[5]));

        for kill in 1..=kills {
            // Mostly within a ~200 MB upload; one kill in three later, so that big uploads
            // also finish (and get killed in their publish: S3's CopyObject) now and then.
            let delay = if rng.random_range(0..3) == 0 {
                Duration::from_millis(rng.random_range(4000..9000))
            } else {
                Duration::from_millis(rng.random_range(300..4000))
            };
            std::thread::sleep(delay);
            shared.close();
            let big_in_flight = shared.big_in_flight.load(Ordering::SeqCst) > 0;
            f.server.kill();
            let interrupted = ids(&registry(&f.server), "SELECT id FROM releases WHERE state = 'deploying'");
            figures.kills += 1;
            figures.during_big_uploads += u32::from(big_in_flight);
            figures.with_deploying += u32::from(!interrupted.is_empty());
            // Resolution times count from the first start after the kill.
            let spawned = time::OffsetDateTime::now_utc();
            // One kill in four also kills the next start within 400 ms, often before it
            // listens: the start's own recovery is cut short, and the start after must
            // finish it.
            if rng.random_range(0..4) == 0 {
                let after = Duration::from_millis(rng.random_range(0..400));
                let listening = f.server.start_and_kill_after(after);
                figures.starts_killed += 1;
                eprintln!(
                    "  … and its restart killed {} ms after its start (listening: {listening})",
                    after.as_millis()
                );
            }
            f.server.restart();
            let restarted = Instant::now();
            *shared.url.write().unwrap() = f.server.url.clone();
            let mut resolved = Vec::new();
            for id in &interrupted {
                let seconds = wait_final(&f.server, *id, restarted, spawned);
                match seconds {
                    Some(s) => {
                        figures.resolve_times.push(s);
                        resolved.push(format!("{id} in {s:.2} s"));
                    }
                    None => shared.violation(format!(
                        "kill {kill}: release {id} still deploying {} ms after the restart (its lease)",
                        LEASE_MS * 2
                    )),
                }
            }
            shared.drain();
            settle(&f, &shared, kill);
            let checked = check(&f, &shared, kill, &mut verified);
            eprintln!(
                "kill {kill}/{kills} after {:.2} s: big upload {}, deploying {:?} resolved [{}]; {checked}",
                delay.as_secs_f64(),
                if big_in_flight { "in flight" } else { "none" },
                interrupted,
                resolved.join(", ")
            );
            shared.open();
        }
        shared.done.store(true, Ordering::SeqCst);
        shared.close();
        shared.changed.notify_all();
    });

    let times = &figures.resolve_times;
    let max = times.iter().copied().fold(0.0, f64::max);
    let mean = if times.is_empty() { 0.0 } else { times.iter().sum::<f64>() / times.len() as f64 };
    let violations = shared.violations.lock().unwrap().clone();
    eprintln!(
        "crash harness on {backend:?}, seed {seed}: {} SIGKILLs ({} during ~{} MB uploads, {} with a release deploying; \
         {} more killing the restart during its start) in {:.0} s; {} interrupted deploys resolved, counted from the new process's start, in at most {max:.2} s (mean {mean:.2} s); \
         work done: {:?}; {} violations",
        figures.kills,
        figures.during_big_uploads,
        big >> 20,
        figures.with_deploying,
        figures.starts_killed,
        started.elapsed().as_secs_f64(),
        times.len(),
        shared.counts.lock().unwrap(),
        violations.len()
    );
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
}

/// Seconds from the new server's start (`spawned`) until release `id` left `deploying`, by
/// the time of its transition; `None` when still deploying twice the lease after the restart.
fn wait_final(server: &TestServer, id: i64, since: Instant, spawned: time::OffsetDateTime) -> Option<f64> {
    let deadline = since + Duration::from_millis(LEASE_MS * 2);
    loop {
        let conn = registry(server);
        let state: String = conn.query_row("SELECT state FROM releases WHERE id = ?1", [id], |r| r.get(0)).unwrap();
        if state != "deploying" {
            let at: String = conn
                .query_row("SELECT max(at) FROM release_transitions WHERE release_id = ?1", [id], |r| r.get(0))
                .unwrap();
            let at = time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339).unwrap();
            return Some((at - spawned).as_seconds_f64());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until nothing is approved or deploying (the workers are stopped, so whatever runs
/// was started before the check): past twice the lease, a violation.
fn settle(f: &Fixture, shared: &Shared, kill: u64) {
    let deadline = Instant::now() + Duration::from_millis(LEASE_MS * 2);
    loop {
        let busy = ids(&registry(&f.server), "SELECT id FROM releases WHERE state IN ('approved', 'deploying')");
        if busy.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            shared.violation(format!("kill {kill}: releases {busy:?} still approved or deploying past the lease"));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks every invariant; returns a one-line summary.
fn check(f: &Fixture, shared: &Shared, kill: u64, verified: &mut HashSet<String>) -> String {
    let server = &f.server;
    let conn = registry(server);
    let rows: HashSet<String> = strings(&conn, "SELECT digest FROM artifacts").into_iter().collect();
    let purged: HashSet<String> = strings(
        &conn,
        "SELECT p.digest FROM artifact_purges p WHERE p.id = (SELECT max(id) FROM artifact_purges q WHERE q.digest = p.digest) \
         AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id)",
    )
    .into_iter()
    .collect();
    let keys: HashSet<String> = server.artifact_keys().iter().map(ToString::to_string).collect();
    let v = |what: String| shared.violation(format!("kill {kill}: {what}"));

    // 1. Listed and not purged: stored, readable, hashing to its digest.
    let mut hashed = 0;
    for digest in rows.difference(&purged) {
        if !keys.contains(digest) {
            v(format!("the registry lists {digest} (not purged) but the store has no such object"));
            continue;
        }
        if verified.contains(digest) {
            continue;
        }
        let response = server
            .http()
            .get(format!("{}/v1/artifacts/{digest}/blob", server.url))
            .bearer_auth(f.token("carol"))
            .send()
            .unwrap();
        if !response.status().is_success() {
            v(format!("GET {digest}/blob answered {}", response.status()));
            continue;
        }
        let mut hasher = sha2::Sha256::new();
        let mut reader = response;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if &actual != digest {
            v(format!("artifact {digest} reads back as {actual}"));
        }
        verified.insert(digest.clone());
        hashed += 1;
    }
    // A purge recorded has no bytes left.
    for digest in purged.intersection(&keys) {
        v(format!("purge of {digest} recorded, its bytes are still in the store"));
        verified.remove(digest);
    }
    // 2. Every acknowledged upload has its rows.
    let uploads: HashSet<(String, String)> = {
        let mut statement = conn.prepare("SELECT service, digest FROM artifact_uploads").unwrap();
        statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    let acked = shared.acked.lock().unwrap().clone();
    for a in &acked {
        if !rows.contains(&a.digest) || !uploads.contains(&(a.service.to_owned(), a.digest.clone())) {
            v(format!("acknowledged upload {} for {} has no row", a.digest, a.service));
        }
    }
    // 3. No object without its row; no staging left.
    for digest in keys.difference(&rows) {
        v(format!("object artifacts/{digest} in the store without a registry row"));
    }
    let staging = server.staging_keys();
    if !staging.is_empty() {
        v(format!("staging left after the restart: {staging:?}"));
    }
    // 5. Every node's current is its environment's live digest.
    for (env, name) in NODES {
        let live = strings(
            &conn,
            &format!("SELECT digest FROM releases WHERE service = 'web' AND environment = '{env}' AND state = 'live'"),
        );
        let base = PathBuf::from(&server_config_base(server, name));
        let current = std::fs::read_link(base.join("current"))
            .ok()
            .map(|t| format!("sha256:{}", t.file_name().unwrap().to_string_lossy()));
        if current.as_ref() != live.first() {
            v(format!("node {name}: current {current:?}, the registry's live digest in {env} {live:?}"));
        }
    }
    // 6. The audit chain.
    let out = f.cli("carol").args(["audit", "verify"]).run();
    if out.output.status.code() != Some(0) {
        v(format!("audit verify failed:\n{out}"));
    }
    format!(
        "{} artifacts ({} purged, {hashed} hashed now), {} acknowledged uploads checked",
        rows.len(),
        purged.len(),
        acked.len()
    )
}

/// A node's base, read back from the server's configuration.
fn server_config_base(server: &TestServer, name: &str) -> String {
    let text = std::fs::read_to_string(server.dir.path().join("release.toml")).unwrap();
    let section = text.split("[[service.web.node]]").find(|s| s.contains(&format!("name = \"{name}\""))).unwrap();
    section.lines().find_map(|l| l.strip_prefix("base = \"")).unwrap().trim_end_matches('"').to_owned()
}

#[test]
fn random_sigkills_on_the_local_store_break_no_invariant() {
    run(Backend::Local);
}

#[test]
fn random_sigkills_on_garage_break_no_invariant() {
    run(Backend::S3);
}

// Each violation the harness found, reproduced at its exact moment: the server dies there
// (`RELEASE_TEST_CRASH_AT`, an abort: nothing cleaned up, as after a SIGKILL), and the next
// start on the same data directory must leave the store as the invariants say.

/// A server that dies when it reaches `point`, with the usual tokens.
fn dying_at(backend: Backend, point: &str, env: &[(&str, &str)]) -> Fixture {
    let mut env = env.to_vec();
    env.push(("RELEASE_TEST_CRASH_AT", point));
    Fixture::adopt(TestServer::start_with_env(backend, "", &env))
}

/// Posts an upload the server dies in: no answer.
fn upload_dies(f: &Fixture, body: Vec<u8>) {
    let answer = f
        .server
        .http()
        .post(format!("{}/v1/artifacts?service=api", f.server.url))
        .bearer_auth(f.token("ci"))
        .body(body)
        .send();
    assert!(answer.is_err(), "the server answered instead of dying: {:?}", answer.map(|r| r.status()));
}

fn staged_rows(server: &TestServer) -> i64 {
    server.count("SELECT count(*) FROM staged_uploads")
}

fn killed_after_publish(backend: Backend) {
    let mut f = dying_at(backend, "upload-published", &[]);
    let body = crate::support::archives::valid("v1");
    let digest = digest_of(&body);
    upload_dies(&f, body);
    // The crash: verified bytes under their artifact key, no row names them.
    let keys: Vec<String> = f.server.artifact_keys().iter().map(ToString::to_string).collect();
    assert_eq!(keys, vec![digest.clone()]);
    assert_eq!(f.server.count("SELECT count(*) FROM artifacts"), 0);
    assert_eq!(staged_rows(&f.server), 1, "the upload is in the journal");
    f.server.restart();
    assert_eq!(f.server.artifact_keys(), vec![], "an object without its row after the restart\n{}", f.server.log());
    assert_eq!(f.server.staging_keys(), Vec::<String>::new());
    assert_eq!(staged_rows(&f.server), 0);
    assert!(f.server.log().contains("removed what an upload cut short by a stop left in the store"));
}

#[test]
fn an_upload_killed_between_its_publish_and_its_row_leaves_no_object_on_the_local_store() {
    killed_after_publish(Backend::Local);
}

#[test]
fn an_upload_killed_between_its_publish_and_its_row_leaves_no_object_on_s3() {
    killed_after_publish(Backend::S3);
}

fn killed_mid_body(backend: Backend) {
    let mut f = dying_at(backend, "upload-begun", &[]);
    upload_dies(&f, crate::support::archives::valid("v1"));
    // The crash: a staging upload begun (S3: a multipart upload, never listed as an object).
    assert!(!f.server.staging_keys().is_empty(), "the crash left a staging upload");
    f.server.restart();
    assert_eq!(f.server.staging_keys(), Vec::<String>::new(), "staging left after the restart\n{}", f.server.log());
    assert_eq!(staged_rows(&f.server), 0);
    assert_eq!(f.server.artifact_keys(), vec![]);
}

#[test]
fn an_upload_killed_mid_body_leaves_no_staging_on_the_local_store() {
    killed_mid_body(Backend::Local);
}

#[test]
fn an_upload_killed_mid_body_leaves_no_multipart_upload_on_s3() {
    killed_mid_body(Backend::S3);
}

fn killed_mid_purge(backend: Backend) {
    let mut f = dying_at(backend, "purge-recorded", &[("RELEASE_TEST_PURGE_DAY_MS", "200")]);
    let digest = f.upload("v1");
    std::thread::sleep(Duration::from_millis(400));
    let answer = f
        .server
        .http()
        .post(format!("{}/v1/artifacts/purge", f.server.url))
        .bearer_auth(f.token("root"))
        .json(&json!({"never_live": true, "older_than_days": 1}))
        .send();
    assert!(answer.is_err(), "the server answered instead of dying");
    // The crash: the purge is recorded, the bytes are still there.
    assert_eq!(f.server.count("SELECT count(*) FROM artifact_purges"), 1);
    let keys: Vec<String> = f.server.artifact_keys().iter().map(ToString::to_string).collect();
    assert_eq!(keys, vec![digest.clone()]);
    f.server.restart();
    assert_eq!(
        f.server.artifact_keys(),
        vec![],
        "bytes of a recorded purge left after the restart\n{}",
        f.server.log()
    );
    let blob = f
        .server
        .http()
        .get(format!("{}/v1/artifacts/{digest}/blob", f.server.url))
        .bearer_auth(f.token("carol"))
        .send()
        .unwrap();
    assert_eq!(blob.status(), reqwest::StatusCode::GONE);
}

#[test]
fn a_purge_killed_before_its_delete_leaves_no_bytes_on_the_local_store() {
    killed_mid_purge(Backend::Local);
}

#[test]
fn a_purge_killed_before_its_delete_leaves_no_bytes_on_s3() {
    killed_mid_purge(Backend::S3);
}

fn upload_during_purge(backend: Backend) {
    let env = [("RELEASE_TEST_PURGE_DAY_MS", "200"), ("RELEASE_TEST_STALL_AT", "purge-recorded:1500")];
    let f = Fixture::adopt(TestServer::start_with_env(backend, "", &env));
    let digest = f.upload("v1");
    std::thread::sleep(Duration::from_millis(400));
    std::thread::scope(|scope| {
        let purge = scope.spawn(|| {
            let body = json!({"never_live": true, "older_than_days": 1});
            let (status, answer) = f.post("root", "/v1/artifacts/purge", body);
            assert!(status.is_success(), "{answer}");
            answer
        });
        // The purge is recorded and waits before its delete: the same bytes come again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.server.count("SELECT count(*) FROM artifact_purges") == 0 {
            assert!(Instant::now() < deadline, "the purge was never recorded");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(f.upload("v1"), digest, "the upload is acknowledged");
        assert_eq!(purge.join().unwrap()["purged"], json!([digest]));
    });
    // Acknowledged after the purge was recorded: its bytes are there, and recorded restored.
    assert_eq!(f.server.count("SELECT count(*) FROM artifact_restores"), 1);
    let blob = f
        .server
        .http()
        .get(format!("{}/v1/artifacts/{digest}/blob", f.server.url))
        .bearer_auth(f.token("carol"))
        .send()
        .unwrap();
    assert_eq!(blob.status(), reqwest::StatusCode::OK, "an acknowledged upload lost its bytes to a purge");
    assert_eq!(digest_of(&blob.bytes().unwrap()), digest);
}

#[test]
fn an_upload_during_a_purge_of_the_same_bytes_keeps_them_on_the_local_store() {
    upload_during_purge(Backend::Local);
}

#[test]
fn an_upload_during_a_purge_of_the_same_bytes_keeps_them_on_s3() {
    upload_during_purge(Backend::S3);
}
