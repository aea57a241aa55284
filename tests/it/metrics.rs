//! `GET /metrics` on a real server with a local node, parsed by a Prometheus text parser: the
//! values move as uploads, deploys, failures, rejections and refusals happen. Deltas are
//! asserted, not snapshots, except for what only this test's server can hold (the artifacts
//! stored).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::archives::{RawTar, zstd};

/// `web` on one local node in staging; production waits for approval. The finalize hook fails
/// for an artifact carrying a file named FAIL.
fn fixture() -> Fixture {
    let base = tempfile::Builder::new().prefix("release-metrics-node-").tempdir().unwrap().keep();
    Fixture::with_config(&format!(
        "[audit]\nrefusal_window = \"1s\"\n[[environment]]\nname = \"staging\"\n\
         [[environment]]\nname = \"production\"\npromote_from = \"staging\"\nrequires_approval = true\n\
         approval_ttl = \"24h\"\n\
         [service.web]\nkind = \"generic\"\n\
         hooks.finalize = [\"test ! -e FAIL || {{ echo 'this build fails on purpose' >&2; exit 3; }}\"]\n\
         hooks.reload = [\"true\"]\n\
         [[service.web.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\n{}",
        base.display(),
        crate::support::local_nodes("web", &["production"])
    ))
}

/// A scrape, parsed.
struct Scraped(prometheus_parse::Scrape);

impl Scraped {
    /// The samples named `name` whose labels include `labels`.
    fn samples<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = f64> + 'a {
        self.0
            .samples
            .iter()
            .filter(move |s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(move |s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name} is not a single value: {other:?}"),
            })
    }

    /// Their sum (0 when there is none).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).sum()
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples(name, labels).next().is_some()
    }
}

fn scrape(f: &Fixture) -> Scraped {
    let response =
        f.server.http().get(format!("{}/metrics", f.server.url)).bearer_auth(f.token("carol")).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = response.text().unwrap();
    Scraped(prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap())
}

/// Scrapes until `name{labels}` has moved by `delta` from `before` (a release's counters move
/// just after its final state is committed); then it must be exactly that.
fn wait_for_delta(f: &Fixture, before: &Scraped, name: &str, labels: &[(&str, &str)], delta: f64) -> Scraped {
    let deadline = Instant::now() + Duration::from_secs(10);
    let was = before.value(name, labels);
    loop {
        let now = scrape(f);
        let moved = now.value(name, labels) - was;
        if moved >= delta || Instant::now() > deadline {
            assert_eq!(moved, delta, "{name}{labels:?} moved by {moved}, not {delta}");
            return now;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Uploads a `web` artifact (`extra` files beside version.txt); returns status and answer.
fn upload(f: &Fixture, version: &str, extra: &[(&str, &[u8])], claim: Option<&str>) -> (StatusCode, Value) {
    let mut tar = RawTar::new().file("version.txt", version.as_bytes());
    for (path, data) in extra {
        tar = tar.file(path, data);
    }
    let mut request = f
        .server
        .http()
        .post(format!("{}/v1/artifacts?service=web", f.server.url))
        .bearer_auth(f.token("ci"))
        .body(zstd(&tar.finish()));
    if let Some(digest) = claim {
        request = request.header("x-release-digest", digest);
    }
    let response = request.send().unwrap();
    (response.status(), response.json().unwrap())
}

fn deploy(f: &Fixture, digest: &str) -> Value {
    let (status, release) =
        f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": digest}));
    assert_eq!(status, StatusCode::CREATED, "{release}");
    f.settle(release["id"].as_i64().unwrap())
}

#[test]
fn metrics_move_as_releases_happen() {
    let f = fixture();
    let start = scrape(&f);
    assert_eq!(start.value("release_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    let live = [("service", "web"), ("environment", "staging"), ("kind", "deploy"), ("outcome", "live")];
    assert!(start.has("release_releases_total", &live), "configured series start at zero");

    // Uploads: two new, one repeat, one refused (its digest claim is wrong).
    let (status, v1) = upload(&f, "v1", &[], None);
    assert_eq!(status, StatusCode::CREATED, "{v1}");
    let (status, again) = upload(&f, "v1", &[], None);
    assert_eq!(status, StatusCode::OK, "{again}");
    let (status, v2) = upload(&f, "v2", &[("FAIL", b"on purpose")], None);
    assert_eq!(status, StatusCode::CREATED, "{v2}");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let (status, refused) = upload(&f, "v3", &[], Some(&wrong));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    let after_uploads = scrape(&f);
    for (outcome, delta) in [("stored", 2.0), ("repeat", 1.0), ("refused", 1.0), ("failed", 0.0)] {
        let labels = [("service", "web"), ("outcome", outcome)];
        let moved =
            after_uploads.value("release_uploads_total", &labels) - start.value("release_uploads_total", &labels);
        assert_eq!(moved, delta, "uploads {outcome}");
    }
    let mismatch = [("status", "422"), ("code", "digest_mismatch")];
    assert_eq!(
        after_uploads.value("release_refused_requests_total", &mismatch)
            - start.value("release_refused_requests_total", &mismatch),
        1.0
    );
    // Only this test's uploads are on this server: the stored bytes are exactly theirs.
    let sizes = v1["size"].as_u64().unwrap() + v2["size"].as_u64().unwrap();
    assert_eq!(after_uploads.value("release_artifacts_stored_bytes", &[]), sizes as f64);
    assert_eq!(after_uploads.value("release_artifacts_stored", &[]), 2.0);

    // A deploy that goes live: counted, timed, and its phases timed.
    let (v1, v2) = (v1["digest"].as_str().unwrap(), v2["digest"].as_str().unwrap());
    let before = scrape(&f);
    assert_eq!(deploy(&f, v1)["state"], "live");
    let after = wait_for_delta(&f, &before, "release_releases_total", &live, 1.0);
    let timed = |outcome| [("service", "web"), ("environment", "staging"), ("outcome", outcome)];
    let delta = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
    assert_eq!(delta("release_deploy_duration_seconds_count", &timed("live")), 1.0);
    assert!(delta("release_deploy_duration_seconds_sum", &timed("live")) > 0.0);
    for phase in ["prepare", "switch", "reload"] {
        let labels = [("phase", phase), ("outcome", "ok")];
        assert_eq!(delta("release_phase_duration_seconds_count", &labels), 1.0, "phase {phase}");
    }
    assert_eq!(after.value("release_releases_in_flight", &[("service", "web"), ("environment", "staging")]), 0.0);

    // A deploy that fails in prepare: counted as failed, timed; live does not move.
    let before = after;
    assert_eq!(deploy(&f, v2)["state"], "failed");
    let failed = [("service", "web"), ("environment", "staging"), ("kind", "deploy"), ("outcome", "failed")];
    let after = wait_for_delta(&f, &before, "release_releases_total", &failed, 1.0);
    let delta = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
    assert_eq!(delta("release_releases_total", &live), 0.0);
    assert_eq!(delta("release_deploy_duration_seconds_count", &timed("failed")), 1.0);
    assert_eq!(delta("release_phase_duration_seconds_count", &[("phase", "prepare"), ("outcome", "failed")]), 1.0);

    // A promotion waits for approval (a gauge read from the registry), then is rejected.
    let production = [("service", "web"), ("environment", "production")];
    let (status, promoted) =
        f.post("alice", "/v1/releases/promote", json!({"service": "web", "environment": "production"}));
    assert_eq!(status, StatusCode::CREATED, "{promoted}");
    assert_eq!(scrape(&f).value("release_releases_pending_approval", &production), 1.0);
    let before = scrape(&f);
    let id = promoted["id"].as_i64().unwrap();
    let (status, rejected) = f.post("bob", &format!("/v1/releases/{id}/reject"), json!({"reason": "not today"}));
    assert_eq!(status, StatusCode::OK, "{rejected}");
    let rejected = [("service", "web"), ("environment", "production"), ("kind", "promote"), ("outcome", "rejected")];
    let after = wait_for_delta(&f, &before, "release_releases_total", &rejected, 1.0);
    assert_eq!(after.value("release_releases_pending_approval", &production), 0.0);

    // A refused request: a token that does not exist.
    let before = after;
    let response = f.server.http().get(format!("{}/v1/status", f.server.url)).bearer_auth("rls_nope").send().unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    wait_for_delta(
        &f,
        &before,
        "release_refused_requests_total",
        &[("status", "401"), ("code", "unauthenticated")],
        1.0,
    );
}

#[test]
fn metrics_need_a_token_without_scope() {
    let f = Fixture::new();
    let url = format!("{}/metrics", f.server.url);
    let response = f.server.http().get(&url).send().unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    f.assert_refusal_recorded("(unauthenticated)", 401, "unauthenticated");

    let scoped = f.server.token_with("ci-api", "ci", &["--services", "api"]);
    let response = f.server.http().get(&url).bearer_auth(&scoped).send().unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("--services"), "{body}");

    // Any role will do (the role matrix checks each); the refusals above are counted.
    let response = f.server.http().get(&url).bearer_auth(f.token("ci")).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().unwrap();
    let scraped = Scraped(prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap());
    assert_eq!(scraped.value("release_refused_requests_total", &[("status", "401")]), 1.0, "{text}");
    assert_eq!(scraped.value("release_refused_requests_total", &[("status", "403"), ("code", "forbidden")]), 1.0);
}

/// Every series of a scrape: name and labels.
fn series(scraped: &Scraped) -> std::collections::BTreeSet<String> {
    scraped
        .0
        .samples
        .iter()
        .map(|s| {
            let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            labels.sort();
            format!("{}{{{}}}", s.metric, labels.join(","))
        })
        .collect()
}

#[test]
fn uploads_for_invented_services_add_no_series() {
    let f = fixture();
    let scoped = f.server.token_with("ci-web", "ci", &["--services", "web"]);
    let before = scrape(&f);
    let archive = zstd(&RawTar::new().file("index.html", b"hello").finish());
    let upload = |token: &str, service: &str| {
        let url = format!("{}/v1/artifacts?service={service}", f.server.url);
        f.server.http().post(url).bearer_auth(token).body(archive.clone()).send().unwrap().status()
    };
    for i in 0..100 {
        let service = format!("invented-{i}");
        // Stored (then repeated) for a service nobody configured; refused for a token without
        // the role and for one limited to another service.
        assert!(upload(f.token("ci"), &service).is_success());
        assert_eq!(upload(f.token("carol"), &service), StatusCode::FORBIDDEN);
        assert_eq!(upload(&scoped, &service), StatusCode::FORBIDDEN);
    }
    assert_eq!(upload(f.token("ci"), "Not-A-Name"), StatusCode::BAD_REQUEST);
    let after = scrape(&f);
    let (was, now) = (series(&before), series(&after));
    assert_eq!(now.difference(&was).collect::<Vec<_>>(), Vec::<&String>::new(), "new series");
    let delta = |labels: &[(&str, &str)]| {
        after.value("release_uploads_total", labels) - before.value("release_uploads_total", labels)
    };
    assert_eq!(delta(&[("service", "other"), ("outcome", "stored")]), 1.0);
    assert_eq!(delta(&[("service", "other"), ("outcome", "repeat")]), 99.0);
    assert_eq!(delta(&[("service", ""), ("outcome", "refused")]), 201.0, "refused before authorization: no service");
}
