//! The crash harness's run: random SIGKILLs under the workload, restarts, and the invariants
//! checked after each, on the local store and on Garage.

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sha2::Digest as _;

use crate::releases::Fixture;
use crate::support::{Backend, TestServer};

use super::workload::{approvals, big_uploads, deploys, purges, small_uploads};
use super::{Gate, LEASE_MS, NODES, Shared, Tokens, config, env_number, ids, registry, server_config_base, strings};

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

#[test]
fn random_sigkills_on_the_local_store_break_no_invariant() {
    run(Backend::Local);
}

#[test]
fn random_sigkills_on_garage_break_no_invariant() {
    run(Backend::S3);
}
