//! Generic webhook delivery: signed events in order, retries until accepted, dead receivers,
//! filters, a configuration error refusing the start, and delivery after a crash.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::releases::Fixture;
use crate::support::TestCommand;

use super::{Received, Receiver, SECRET, assert_well_formed, config, id_of, story, wait_for_deliveries, webhook};

#[test]
fn each_state_change_arrives_signed_and_in_order() {
    let receiver = Receiver::ok();
    let f = Fixture::with_config(&config(&webhook("trail", &format!("{}/hook", receiver.url), "")));
    let (v1, v2) = (f.upload("v1"), f.upload("v2"));
    let first = id_of(&f.live_in("ci", "staging", &v1));
    let second = id_of(&f.live_in("ci", "staging", &v2));
    let (status, pending) =
        f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    assert!(status.is_success(), "{pending}");
    let third = id_of(&pending);
    let (status, rejected) = f.post("bob", &format!("/v1/releases/{third}/reject"), json!({"reason": "not today"}));
    assert!(status.is_success(), "{rejected}");

    let seen = receiver.wait_for("nine events", |seen| seen.len() >= 9);
    let expected = [
        (first, "release.requested", "approved"),
        (first, "release.deploying", "deploying"),
        (first, "release.live", "live"),
        (second, "release.requested", "approved"),
        (second, "release.deploying", "deploying"),
        (first, "release.superseded", "superseded"),
        (second, "release.live", "live"),
        (third, "release.requested", "pending_approval"),
        (third, "release.rejected", "rejected"),
    ];
    let expected: Vec<(i64, String, String)> =
        expected.iter().map(|(id, e, s)| (*id, (*e).to_owned(), (*s).to_owned())).collect();
    assert_eq!(story(&seen), expected);
    for r in &seen {
        assert_well_formed(r);
        assert_eq!(r.path, "/hook");
    }
    let ids: Vec<u64> = seen.iter().map(|r| r.json()["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids increase: {ids:?}");
    let mut delivery_ids: Vec<String> = seen.iter().map(Received::delivery).collect();
    delivery_ids.sort();
    delivery_ids.dedup();
    assert_eq!(delivery_ids.len(), 9, "one delivery id per event");

    // The body tells the story without another request.
    let request = seen[7].json();
    assert_eq!(request["release"]["kind"], "promote");
    assert_eq!(request["release"]["source_environment"], "staging");
    assert_eq!(request["release"]["digest"], v2.as_str());
    assert_eq!(request["release"]["version"], "v2");
    assert_eq!(request["actor"], json!({"name": "alice", "owner": "alice"}));
    let rejection = seen[8].json();
    assert_eq!(rejection["actor"]["name"], "bob");
    assert_eq!(rejection["reason"], "not today");
    assert_eq!(seen[2].json()["actor"]["name"], "release", "the server put it live");

    // Each release shows its deliveries, with the ids the receiver saw.
    let shown = wait_for_deliveries(&f, first, "four delivered events", |d| {
        d.len() == 4 && d.iter().all(|x| x["delivered"] == true)
    });
    let events: Vec<&str> = shown.iter().map(|d| d["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["release.requested", "release.deploying", "release.live", "release.superseded"]);
    for d in &shown {
        assert_eq!(
            (d["webhook"].as_str(), d["attempts"].as_u64(), d["last_status"].as_u64()),
            (Some("trail"), Some(1), Some(200))
        );
        assert_eq!(d["outcome"], "accepted");
        assert!(seen.iter().any(|r| r.delivery() == d["delivery"] && r.json()["id"] == d["event_id"]), "{d}");
    }
    let out = f.cli("carol").args(["show", &first.to_string()]).assert_success().stdout();
    assert!(out.contains("webhooks:") && out.contains("release.superseded") && out.contains("accepted (200)"), "{out}");
    assert!(!f.server.log().contains(SECRET), "the secret never reaches the log");
}

#[test]
fn a_receiver_failing_twice_accepts_each_event_once() {
    // 500 for the first two attempts of every delivery, then 200.
    let receiver = Receiver::start(|r, before| {
        let earlier = before.iter().filter(|b| b.delivery() == r.delivery()).count();
        if earlier < 2 { 500 } else { 200 }
    });
    let f = Fixture::with_config(&config(&webhook("flaky", &receiver.url, "max_attempts = 5")));
    let release = id_of(&f.live_in("ci", "staging", &f.upload("v1")));

    let seen =
        receiver.wait_for("three events accepted", |seen| seen.iter().filter(|r| r.answered == 200).count() >= 3);
    let mut by_delivery: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in &seen {
        assert_well_formed(r);
        by_delivery.entry(r.delivery()).or_default().push(r);
    }
    assert_eq!(by_delivery.len(), 3, "{:?}", story(&seen));
    for (id, attempts) in &by_delivery {
        let answers: Vec<u16> = attempts.iter().map(|r| r.answered).collect();
        assert_eq!(answers, [500, 500, 200], "delivery {id}: accepted exactly once, after two failures");
        assert!(attempts.iter().all(|r| r.body == attempts[0].body), "every attempt sends the same bytes");
    }
    // In order: every attempt at an event comes after the previous event was accepted.
    let events: Vec<String> = seen.iter().map(Received::event).collect();
    assert_eq!(
        events,
        [["release.requested"; 3], ["release.deploying"; 3], ["release.live"; 3]].concat(),
        "attempts in event order"
    );

    let shown = wait_for_deliveries(&f, release, "three accepted deliveries", |d| {
        d.len() == 3 && d.iter().all(|x| x["delivered"] == true)
    });
    for d in &shown {
        assert_eq!(d["attempts"], 3, "{d}");
        assert_eq!(d["last_status"], 200, "{d}");
        assert!(d["first_attempt_at"].as_str() < d["last_attempt_at"].as_str(), "{d}");
    }
    // Each failed attempt is on record, and moved nothing.
    assert_eq!(
        f.server.count("SELECT count(*) FROM webhook_deliveries WHERE outcome = 'retrying' AND status_code = 500"),
        6
    );
    assert_eq!(f.server.count("SELECT count(*) FROM webhook_deliveries WHERE outcome = 'accepted'"), 3);

    // The release's page shows the attempts too.
    let page = f
        .server
        .http()
        .get(format!("{}/releases/{release}", f.server.url))
        .bearer_auth(f.token("carol"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let table = page.split("id=\"webhooks\"").nth(1).expect("a webhooks table on the release page");
    assert_eq!(table.matches("<td>flaky</td>").count(), 3, "{table}");
    assert_eq!(table.matches("HTTP 200").count(), 3, "{table}");
}

#[test]
fn dead_receivers_never_slow_a_deploy() {
    // One accepts connections and never answers; one refuses them; one works.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let refused_url = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let alive = Receiver::ok();
    let hooks = [
        webhook("silent", &silent_url, "timeout = \"12s\"\nmax_attempts = 2"),
        webhook("refused", &refused_url, "max_attempts = 3"),
        webhook("alive", &alive.url, ""),
    ]
    .concat();
    let f = Fixture::with_config(&config(&hooks));
    let digest = f.upload("v1");

    let started = Instant::now();
    let release = id_of(&f.live_in("ci", "staging", &digest));
    let took = started.elapsed();
    // Waiting for one webhook answer would take the silent receiver's 12 s timeout.
    assert!(took < Duration::from_secs(8), "the deploy took {took:?} with dead receivers");
    alive.wait_for("all three events despite the dead receivers", |seen| seen.len() >= 3);
    assert!(started.elapsed() < Duration::from_secs(11), "the live receiver waited for the dead ones");

    // The refused receiver's deliveries are given up after three attempts each, on record.
    let shown = wait_for_deliveries(&f, release, "three given-up deliveries to `refused`", |d| {
        d.iter().filter(|x| x["webhook"] == "refused" && x["outcome"] == "gave_up").count() == 3
    });
    for d in shown.iter().filter(|d| d["webhook"] == "refused") {
        assert_eq!((d["attempts"].as_u64(), d["delivered"].as_bool()), (Some(3), Some(false)), "{d}");
        assert!(d["last_status"].is_null(), "{d}");
        assert!(d["last_error"].as_str().unwrap().to_lowercase().contains("connect"), "{d}");
        assert!(!d["last_error"].as_str().unwrap().contains("127.0.0.1"), "no URL in errors: {d}");
    }
    assert!(f.server.log().contains("webhook delivery given up"), "given up is logged");
    // The silent one: its first attempt times out and is retried.
    let shown = wait_for_deliveries(&f, release, "a timed-out attempt to `silent`", |d| {
        d.iter().any(|x| x["webhook"] == "silent")
    });
    let silent = shown.iter().find(|d| d["webhook"] == "silent").unwrap();
    assert_eq!(silent["event"], "release.requested", "{silent}");
    assert_eq!(silent["outcome"], "retrying", "{silent}");
    assert!(silent["last_error"].as_str().unwrap().contains("no answer within 12s"), "{silent}");
    assert!(silent["next_attempt_at"].is_string(), "{silent}");

    // Nor do they hold up a shutdown: the attempt in flight is dropped (and made after a restart).
    let mut f = f;
    let stopping = Instant::now();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(f.server.pid() as i32, libc::SIGTERM) };
    let status = f.server.terminate_after_signal();
    assert!(status.success(), "{status}");
    assert!(stopping.elapsed() < Duration::from_secs(5), "stopping took {:?}", stopping.elapsed());
}

#[test]
fn filters_pick_events_services_and_environments() {
    let receiver = Receiver::ok();
    let url = &receiver.url;
    let hooks = [
        webhook("all", &format!("{url}/all"), ""),
        webhook("live-only", &format!("{url}/live"), "events = [\"release.live\"]"),
        webhook("web-only", &format!("{url}/web"), "services = [\"web\"]"),
        webhook("production-only", &format!("{url}/production"), "environments = [\"production\"]"),
    ]
    .concat();
    let f = Fixture::with_config(&config(&hooks));
    f.live_in("ci", "staging", &f.upload("v1"));
    let (status, pending) =
        f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    assert!(status.is_success(), "{pending}");

    // Every webhook has looked at every event so far.
    let last = f.events("release.promote").last().unwrap()["seq"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.server.count("SELECT min(after_seq) FROM webhook_cursors") < last {
        assert!(Instant::now() < deadline, "the webhooks never got past event {last}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let events = |path: &str| receiver.at(path).iter().map(Received::event).collect::<Vec<_>>();
    assert_eq!(events("/all"), ["release.requested", "release.deploying", "release.live", "release.requested"]);
    assert_eq!(events("/live"), ["release.live"]);
    assert_eq!(events("/web"), Vec::<String>::new());
    assert_eq!(events("/production"), ["release.requested"]);
    assert_eq!(receiver.at("/production")[0].json()["release"]["state"], "pending_approval");
}

#[test]
fn a_webhook_configuration_error_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[webhook]]\nname = \"monday\"\nsecret = \"0123456789abcdef\"\n", "webhook[0].url"),
        (
            "[[webhook]]\nname = \"monday\"\nurl = \"http://127.0.0.1:9/\"\nsecret = \"0123456789abcdef\"\nevents = [\"release.done\"]\n",
            "webhook[0].events",
        ),
    ];
    for (text, key) in cases {
        let path = dir.path().join("release.toml");
        std::fs::write(&path, text).unwrap();
        let data = dir.path().join("data");
        let out = TestCommand::new()
            .args(["serve", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args(["--data-dir", data.to_str().unwrap()])
            .assert_exit(2);
        assert!(out.stderr().contains(key), "expected {key} in the error\n{out}");
        assert!(!data.exists(), "nothing was started\n{out}");
    }
}

#[test]
fn undelivered_events_are_delivered_after_a_crash() {
    let status = Arc::new(AtomicU16::new(200));
    let answer = Arc::clone(&status);
    let receiver = Receiver::start(move |_, _| answer.load(Ordering::SeqCst));
    let hook = webhook("trail", &receiver.url, "retry_max = \"200ms\"\nmax_attempts = 1000");
    let mut f = Fixture::with_config(&config(&hook));
    let (v1, v2) = (f.upload("v1"), f.upload("v2"));
    let first = id_of(&f.live_in("ci", "staging", &v1));
    receiver.wait_for("the first release's three events", |seen| seen.len() >= 3);

    // The receiver goes down; the next release's events wait, retried.
    status.store(503, Ordering::SeqCst);
    let second = id_of(&f.live_in("ci", "staging", &v2));
    wait_for_deliveries(&f, second, "a retried delivery", |d| d.iter().any(|x| x["attempts"].as_u64() >= Some(2)));

    // The server crashes; the receiver comes back; the server starts again.
    f.server.kill();
    let tried = f.server.count(&format!(
        "SELECT count(*) FROM webhook_deliveries WHERE release_id = {second} AND event = 'release.requested'"
    ));
    status.store(200, Ordering::SeqCst);
    f.server.restart();

    let seen = receiver.wait_for("the second release's events accepted", |seen| {
        seen.iter().any(|r| r.answered == 200 && r.event() == "release.live" && r.json()["release"]["id"] == second)
    });
    let accepted: Vec<&Received> = seen.iter().filter(|r| r.answered == 200).collect();
    assert_eq!(
        story(&accepted.iter().map(|r| (*r).clone()).collect::<Vec<_>>()),
        [
            (first, "release.requested", "approved"),
            (first, "release.deploying", "deploying"),
            (first, "release.live", "live"),
            (second, "release.requested", "approved"),
            (second, "release.deploying", "deploying"),
            (first, "release.superseded", "superseded"),
            (second, "release.live", "live"),
        ]
        .iter()
        .map(|(id, e, s)| (*id, (*e).to_owned(), (*s).to_owned()))
        .collect::<Vec<_>>(),
        "every event accepted once, in order, none lost across the crash"
    );
    let mut per_delivery: HashMap<String, usize> = HashMap::new();
    for r in &accepted {
        *per_delivery.entry(r.delivery()).or_default() += 1;
    }
    assert!(per_delivery.values().all(|n| *n == 1), "{per_delivery:?}");
    // The retried delivery kept its id and its count of attempts across the crash.
    let shown = wait_for_deliveries(&f, second, "three delivered events", |d| {
        d.len() == 3 && d.iter().all(|x| x["delivered"] == true)
    });
    let requested = &shown[0];
    assert_eq!(requested["event"], "release.requested");
    assert_eq!(requested["attempts"].as_i64().unwrap(), tried + 1, "attempts counted on after the crash: {requested}");
    let retried: Vec<&Received> = seen.iter().filter(|r| r.delivery() == requested["delivery"]).collect();
    assert!(retried.len() >= 3 && retried.last().unwrap().answered == 200, "{retried:?}");
}
