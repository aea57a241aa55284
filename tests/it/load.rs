//! Load on a whole server (issue 11, item 5): 16 uploaders and 64 readers while a
//! deploy/rollback loop runs on 2 local nodes. Nothing acknowledged is lost, no request fails
//! that should not, `audit verify` passes, and the server's threads stay within the fixed
//! registry threads plus the capped blocking pool. p99 per endpoint and peak RSS are printed,
//! never asserted (shared machines). Short in CI; by hand, `RELEASE_LOAD_SECONDS=60` for the
//! full minute, `RELEASE_LOAD_REST_SECONDS=60` for the RSS a minute after, `RELEASE_TEST_BIN`
//! for a release build of the server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::releases::Fixture;
use crate::support::archives::{RawTar, zstd};
use crate::support::{Backend, TestServer};

const UPLOADERS: usize = 16;
const READERS: usize = 64;
/// Seconds of load in CI; `RELEASE_LOAD_SECONDS` overrides.
const CI_SECONDS: u64 = 8;

#[derive(Default)]
struct Tally {
    /// Latencies by endpoint, in milliseconds.
    latencies: Mutex<BTreeMap<&'static str, Vec<f64>>>,
    errors: Mutex<Vec<String>>,
    requests: AtomicUsize,
}

impl Tally {
    fn took(&self, endpoint: &'static str, started: Instant) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        self.latencies.lock().unwrap().entry(endpoint).or_default().push(ms);
    }

    fn error(&self, what: String) {
        self.errors.lock().unwrap().push(what);
    }
}

fn proc_status(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmRSS:") * 1024, field("VmHWM:") * 1024, field("Threads:"))
}

fn sha256(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    format!("sha256:{}", hash.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn archive(version: &str) -> Vec<u8> {
    zstd(&RawTar::new().dir("public").file("version.txt", version.as_bytes()).file("public/index.html", b"hi").finish())
}

#[test]
fn uploads_reads_and_deploys_at_once_lose_nothing_and_keep_threads_bounded() {
    let seconds: u64 = std::env::var("RELEASE_LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(CI_SECONDS);
    let root = tempfile::Builder::new().prefix("release-load-").tempdir().unwrap();
    let mut config = String::from("[service.web]\nkind = \"generic\"\nkeep = 3\n");
    for i in 1..=2 {
        let base = root.path().join(format!("node{i}"));
        std::fs::create_dir_all(&base).unwrap();
        config.push_str(&format!(
            "[[service.web.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\n",
            base.display()
        ));
    }
    let f = Arc::new(Fixture::adopt(TestServer::start_with(Backend::Local, &config)));
    let pid = f.server.pid();
    let (idle_rss, _, idle_threads) = proc_status(pid);
    let url = f.server.url.clone();
    let tally = Arc::new(Tally::default());
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let most_threads = Arc::new(AtomicUsize::new(idle_threads as usize));
    let client = || reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();

    let upload = |http: &reqwest::blocking::Client, tally: &Tally, token: &str, body: Vec<u8>| -> Option<String> {
        let started = Instant::now();
        let sent =
            http.post(format!("{url}/v1/artifacts?service=web")).bearer_auth(token).body(body).send().and_then(|r| {
                let status = r.status();
                r.json::<Value>().map(|v| (status, v))
            });
        tally.took("POST /v1/artifacts", started);
        match sent {
            Ok((status, answer)) if status.is_success() => answer["digest"].as_str().map(str::to_owned),
            Ok((status, answer)) => {
                tally.error(format!("upload: {status} {answer}"));
                None
            }
            Err(e) => {
                tally.error(format!("upload: {e}"));
                None
            }
        }
    };
    let http = client();
    let first = upload(&http, &tally, f.token("ci"), archive("first")).expect("the first upload");
    let second = upload(&http, &tally, f.token("ci"), archive("second")).expect("the second upload");
    // One CI token each: one token holds half the upload turns at most.
    let uploaders: Vec<String> =
        (0..UPLOADERS).map(|u| f.server.token_with(&format!("ci-{u}"), "ci", &["--owner", "gitlab"])).collect();
    acknowledged.lock().unwrap().extend([first.clone(), second]);
    let (status, release) =
        f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": first}));
    assert!(status.is_success(), "{release}");
    assert_eq!(f.settle(release["id"].as_i64().unwrap())["state"], "live");

    std::thread::scope(|scope| {
        // Threads of the server, sampled.
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                most_threads.fetch_max(proc_status(pid).2 as usize, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        for (u, token) in uploaders.iter().enumerate() {
            let (tally, acknowledged, stop) = (&tally, &acknowledged, &stop);
            let upload = &upload;
            scope.spawn(move || {
                let http = client();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Every fourth one repeats an archive others upload too.
                    let version = if n % 4 == 3 { "repeated".to_owned() } else { format!("u{u}-{n}") };
                    n += 1;
                    if let Some(digest) = upload(&http, tally, token, archive(&version)) {
                        acknowledged.lock().unwrap().insert(digest);
                    }
                }
            });
        }
        for r in 0..READERS {
            let (tally, stop, url, f, first) = (&tally, &stop, &url, &f, &first);
            scope.spawn(move || {
                let http = client();
                let paths: [(&'static str, String); 4] = [
                    ("GET /v1/status", "/v1/status".to_owned()),
                    ("GET /v1/releases", "/v1/releases?service=web&environment=staging&limit=20".to_owned()),
                    ("GET /v1/services/{s}/artifacts", "/v1/services/web/artifacts?limit=20".to_owned()),
                    ("GET /v1/artifacts/{digest}", format!("/v1/artifacts/{first}")),
                ];
                let mut n = r;
                while !stop.load(Ordering::Relaxed) {
                    let (endpoint, path) = &paths[n % paths.len()];
                    n += 1;
                    let started = Instant::now();
                    let answer = http.get(format!("{url}{path}")).bearer_auth(f.token("carol")).send();
                    let answer = answer.and_then(|r| {
                        let status = r.status();
                        r.bytes().map(|_| status)
                    });
                    tally.took(endpoint, started);
                    match answer {
                        Ok(status) if status.is_success() => {}
                        Ok(status) => tally.error(format!("{endpoint}: {status}")),
                        Err(e) => tally.error(format!("{endpoint}: {e}")),
                    }
                }
            });
        }
        // The deploy/rollback loop, on this thread, for the duration.
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let (mut lives, mut live) = (0, first.clone());
        while Instant::now() < deadline {
            let newest = acknowledged.lock().unwrap().iter().rfind(|d| **d != live).cloned().unwrap_or(first.clone());
            for (endpoint, path, body) in [
                (
                    "POST /v1/releases",
                    "/v1/releases",
                    json!({"service": "web", "environment": "staging", "digest": newest}),
                ),
                (
                    "POST /v1/releases/rollback",
                    "/v1/releases/rollback",
                    json!({"service": "web", "environment": "staging"}),
                ),
            ] {
                let started = Instant::now();
                let (status, release) = f.post("alice", path, body);
                tally.took(endpoint, started);
                if !status.is_success() {
                    tally.error(format!("{endpoint}: {status} {release}"));
                    continue;
                }
                let settled = f.settle(release["id"].as_i64().unwrap());
                if settled["state"] == "live" {
                    lives += 1;
                    live = settled["digest"].as_str().unwrap().to_owned();
                } else {
                    tally.error(format!("{endpoint}: ended {settled}"));
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        eprintln!("load: {lives} deploys and rollbacks went live");
    });

    let (after_rss, peak_rss, _) = proc_status(pid);
    // Every acknowledged upload is listed and its bytes hash to its digest.
    let mut listed = BTreeSet::new();
    let mut before: Option<i64> = None;
    loop {
        let cursor = before.map(|b| format!("&before={b}")).unwrap_or_default();
        let page = f.get("carol", &format!("/v1/services/web/artifacts?limit=500{cursor}"));
        for a in page["artifacts"].as_array().unwrap() {
            listed.insert(a["digest"].as_str().unwrap().to_owned());
        }
        match page["next"].as_i64() {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let missing: Vec<_> = acknowledged.difference(&listed).collect();
    assert!(missing.is_empty(), "acknowledged but not listed: {missing:?}");
    for digest in &acknowledged {
        let bytes = http
            .get(format!("{url}/v1/artifacts/{digest}/blob"))
            .bearer_auth(f.token("carol"))
            .send()
            .unwrap()
            .error_for_status()
            .unwrap()
            .bytes()
            .unwrap();
        assert_eq!(&sha256(&bytes), digest, "the bytes served for {digest}");
    }
    f.cli("carol").args(["audit", "verify"]).assert_success();

    let requests = tally.requests.load(Ordering::Relaxed);
    eprintln!(
        "load: {seconds} s, {UPLOADERS} uploaders, {READERS} readers: {requests} requests, {} uploads acknowledged",
        acknowledged.len()
    );
    for (endpoint, ms) in tally.latencies.lock().unwrap().iter_mut() {
        ms.sort_by(f64::total_cmp);
        let p = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
        eprintln!("load:   {endpoint:<32} n={:<6} p50 {:>7.1} ms  p99 {:>7.1} ms", ms.len(), p(0.5), p(0.99));
    }
    let threads = most_threads.load(Ordering::Relaxed);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "load: server RSS idle {:.0} MiB, peak {:.0} MiB, {:.0} MiB at the end; threads idle {idle_threads}, most {threads}",
        mib(idle_rss),
        mib(peak_rss),
        mib(after_rss)
    );
    // By hand: how much the server gives back once the load is gone.
    let rest: u64 = std::env::var("RELEASE_LOAD_REST_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    if rest > 0 {
        std::thread::sleep(Duration::from_secs(rest));
        let (rss, _, threads) = proc_status(pid);
        eprintln!("load: {rest} s later: RSS {:.0} MiB, {threads} threads", mib(rss));
    }
    let errors = tally.errors.lock().unwrap();
    assert!(errors.is_empty(), "{} unexpected errors, first ones: {:?}", errors.len(), &errors[..errors.len().min(10)]);
    // Async workers (one per core), the registry's fixed threads, the capped blocking pool, and
    // a few of the runtime's own. Without the fixed registry threads, 64 readers alone grew the
    // blocking pool past 90 threads here (and to ~250 in the release build).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bound = cores + release::registry::WORKER_THREADS + release::config::Limits::default().blocking_threads() + 8;
    assert!(threads <= bound, "the server ran {threads} threads at once, more than {bound}");
}
