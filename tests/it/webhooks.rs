//! Outgoing webhooks against receivers in the test (loopback HTTP servers that record every
//! request): signed events in order, retries until accepted, dead receivers that never slow a
//! deploy, filters, configuration errors, and delivery across a crash.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::releases::Fixture;
use crate::support::TestCommand;

const SECRET: &str = "a-webhook-secret-for-tests";

fn config(webhooks: &str) -> String {
    format!(
        "[audit]\ncheckpoint_interval = \"1s\"\n[service.api]\nkind = \"generic\"\n[service.web]\nkind = \"generic\"\n\
         [[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\npromote_from = \"staging\"\n\
         requires_approval = true\n{}{}{webhooks}",
        crate::support::local_nodes("api", &["staging", "production"]),
        crate::support::local_nodes("web", &["staging", "production"])
    )
}

pub fn webhook(name: &str, url: &str, extra: &str) -> String {
    format!("[[webhook]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\nretry_base = \"100ms\"\n{extra}\n")
}

/// One request as the receiver saw it, and what it answered.
#[derive(Clone, Debug)]
pub struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    answered: u16,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or_else(|| panic!("no {name} header in {self:?}"))
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }

    pub fn event(&self) -> String {
        self.json()["event"].as_str().unwrap().to_owned()
    }

    fn delivery(&self) -> String {
        self.header("x-release-delivery").to_owned()
    }
}

type Answer = dyn Fn(&Received, &[Received]) -> (u16, String) + Send + Sync;

/// A webhook receiver on 127.0.0.1: records each request and answers with the status
/// `answer` picks (given the request and those before it).
pub struct Receiver {
    pub url: String,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(answer: impl Fn(&Received, &[Received]) -> u16 + Send + Sync + 'static) -> Receiver {
        Receiver::answering(move |request, before| {
            let status = answer(request, before);
            (status, if status < 300 { "ok" } else { "receiver says no" }.to_owned())
        })
    }

    /// Answers with the status and body `answer` picks.
    fn answering(answer: impl Fn(&Received, &[Received]) -> (u16, String) + Send + Sync + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer: Arc<Answer> = Arc::new(answer);
        let recorder = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (seen, answer) = (Arc::clone(&recorder), Arc::clone(&answer));
                std::thread::spawn(move || serve(stream, &seen, &*answer));
            }
        });
        Receiver { url, seen }
    }

    /// Answers 200 to everything.
    pub fn ok() -> Receiver {
        Receiver::start(|_, _| 200)
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    fn at(&self, path: &str) -> Vec<Received> {
        self.seen().into_iter().filter(|r| r.path == path).collect()
    }

    /// Waits until `done` holds for what was received; returns it.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.seen();
            if done(&seen) {
                return seen;
            }
            let summary: Vec<(String, String, u16)> =
                seen.iter().map(|r| (r.path.clone(), r.json()["event"].to_string(), r.answered)).collect();
            assert!(Instant::now() < deadline, "the receiver never saw {what}; it saw {summary:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reads one HTTP/1.1 request, records it, answers and closes the connection.
fn serve(stream: TcpStream, seen: &Mutex<Vec<Received>>, answer: &Answer) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap();
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let length: usize = headers.get("content-length").map_or(0, |l| l.parse().unwrap());
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let mut request = Received { path, headers, body, answered: 0 };
    let (status, text) = {
        let mut seen = seen.lock().unwrap();
        let (status, text) = answer(&request, &seen);
        request.answered = status;
        seen.push(request);
        (status, text)
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

/// HMAC-SHA256 written out from RFC 2104, independent of the server's `hmac` crate.
fn hmac_sha256(key: &[u8], message: &[u8]) -> String {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    hex::encode(Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize())
}

/// The checks every request must pass: headers, signature, body.
fn assert_well_formed(r: &Received) {
    assert_eq!(r.header("content-type"), "application/json", "{r:?}");
    let body = r.json();
    assert_eq!(r.header("x-release-event"), body["event"], "{body}");
    assert!(uuid::Uuid::parse_str(r.header("x-release-delivery")).is_ok(), "{r:?}");
    let signature = r.header("x-release-signature");
    assert_eq!(signature, format!("sha256={}", hmac_sha256(SECRET.as_bytes(), &r.body)), "{body}");
    assert_ne!(signature, format!("sha256={}", hmac_sha256(b"another secret", &r.body)));
    let at = body["at"].as_str().unwrap();
    assert!(
        at.ends_with('Z') && time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).is_ok()
    );
    assert!(body["id"].as_u64().is_some(), "{body}");
    for key in ["id", "service", "environment", "digest", "kind", "state", "requested_by", "requested_at"] {
        assert!(!body["release"][key].is_null(), "release.{key} missing in {body}");
    }
    assert!(body["actor"]["name"].is_string() && body["actor"]["owner"].is_string(), "{body}");
}

/// (release id, event, state) of each request.
fn story(requests: &[Received]) -> Vec<(i64, String, String)> {
    requests
        .iter()
        .map(|r| {
            let b = r.json();
            (b["release"]["id"].as_i64().unwrap(), r.event(), b["release"]["state"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn deliveries(f: &Fixture, id: i64) -> Vec<Value> {
    f.get("carol", &format!("/v1/releases/{id}"))["webhook_deliveries"].as_array().unwrap().clone()
}

/// Waits until release `id` shows deliveries for which `done` holds; returns them.
fn wait_for_deliveries(f: &Fixture, id: i64, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let shown = deliveries(f, id);
        if done(&shown) {
            return shown;
        }
        assert!(Instant::now() < deadline, "release {id} never showed {what}: {shown:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn id_of(release: &Value) -> i64 {
    release["id"].as_i64().unwrap()
}

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

/// Issue 14 item 4: a Slack incoming-webhook message, as Slack documents it: `text` (the
/// notification), `blocks` with a mrkdwn section linking the release's page and a context
/// block with the facts; no signature without a secret (Slack checks none).
#[test]
fn slack_gets_a_message_naming_the_release_with_a_link_to_its_page() {
    let receiver = Receiver::ok();
    let hook = format!(
        "[[webhook]]\nname = \"slack\"\nformat = \"slack\"\nurl = \"{}/services/T0/B0/x\"\nevents = [\"release.live\"]\n",
        receiver.url
    );
    let server = crate::support::TestServer::start_with_server(
        crate::support::Backend::Local,
        "public_url = \"https://release.example.com/\"\n",
        &config(&hook),
    );
    let f = Fixture::adopt(server);
    let digest = f.upload("v1.4.2");
    let live = f.live_in("ci", "staging", &digest);
    let id = id_of(&live);
    let seen = receiver.wait_for("the live message", |r| !r.is_empty());
    let message = seen[0].json();
    assert_eq!(seen[0].path, "/services/T0/B0/x");
    assert!(!seen[0].headers.contains_key("x-release-signature"), "{:?}", seen[0].headers);
    assert_eq!(message["text"], "api v1.4.2 is live in staging", "{message}");
    let section = &message["blocks"][0];
    assert_eq!(section["type"], "section");
    assert_eq!(section["text"]["type"], "mrkdwn");
    assert_eq!(
        section["text"]["text"],
        format!("*<https://release.example.com/releases/{id}|api v1.4.2 is live in staging>*")
    );
    let facts = message["blocks"][1]["elements"][0]["text"].as_str().unwrap();
    assert_eq!(message["blocks"][1]["type"], "context");
    assert!(facts.contains(&format!("release #{id} (deploy), digest {}", &digest[7..19])), "{facts}");
    assert!(facts.contains("requested by ci (gitlab)"), "{facts}");
}

/// A Monday board as its GraphQL API answers: `create_item` gives an item id, `create_update`
/// adds the facts to it; a refusal comes as 200 with `errors`.
#[test]
fn monday_gets_an_item_per_release_going_live_with_the_approval_in_its_update() {
    let receiver = Receiver::answering(|r, before| {
        let query = r.json()["query"].as_str().unwrap_or("").to_owned();
        if query.contains("create_item") {
            let n = before.iter().filter(|b| b.json()["query"].as_str().unwrap_or("").contains("create_item")).count();
            (200, format!("{{\"data\": {{\"create_item\": {{\"id\": \"{}\"}}}}}}", 9000 + n))
        } else if before.iter().all(|b| !b.json()["query"].as_str().unwrap_or("").contains("create_update")) {
            // The first update is refused as Monday refuses: 200 and errors.
            (200, "{\"errors\": [{\"message\": \"Complexity budget exhausted\"}]}".to_owned())
        } else {
            (200, "{\"data\": {\"create_update\": {\"id\": \"1\"}}}".to_owned())
        }
    });
    let hook = format!(
        "[[webhook]]\nname = \"monday\"\nformat = \"monday\"\nurl = \"{}/v2\"\nboard_id = 4242\n\
         group_id = \"releases\"\ntoken_env = \"MONDAY_API_TOKEN\"\nretry_base = \"100ms\"\n",
        receiver.url
    );
    let server = crate::support::TestServer::start_with_env(
        crate::support::Backend::Local,
        &config(&hook),
        &[("MONDAY_API_TOKEN", "eyJhbGciOi-test-token")],
    );
    let f = Fixture::adopt(server);
    let digest = f.upload("v2");
    f.live_in("ci", "staging", &digest);
    let (status, pending) =
        f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    assert!(status.is_success(), "{pending}");
    let id = id_of(&pending);
    let (status, approved) = f.post("bob", &format!("/v1/releases/{id}/approve"), json!({}));
    assert!(status.is_success(), "{approved}");
    assert_eq!(f.settle(id)["state"], "live");

    // By default only going live or failing makes an item: two releases went live.
    let seen = receiver.wait_for("two items with their updates", |r| {
        r.iter().filter(|x| x.json()["query"].as_str().unwrap().contains("create_update")).count() >= 3
    });
    for r in &seen {
        assert_eq!(r.path, "/v2");
        assert_eq!(r.header("authorization"), "eyJhbGciOi-test-token");
        assert_eq!(r.header("content-type"), "application/json");
    }
    let items: Vec<Value> =
        seen.iter().map(Received::json).filter(|j| j["query"].as_str().unwrap().contains("create_item")).collect();
    assert_eq!(items.len(), 2, "one item per release gone live, none twice for a retried update: {items:?}");
    assert_eq!(items[0]["variables"]["board"], "4242");
    assert_eq!(items[0]["variables"]["group"], "releases");
    assert_eq!(items[0]["variables"]["name"], "api v2 is live in staging");
    assert_eq!(items[1]["variables"]["name"], "api v2 is live in production");
    let updates: Vec<Value> =
        seen.iter().map(Received::json).filter(|j| j["query"].as_str().unwrap().contains("create_update")).collect();
    // The first update was refused and tried again on the same item.
    assert_eq!(updates[0]["variables"]["item"], "9000");
    assert_eq!(updates[1]["variables"]["item"], "9000");
    assert_eq!(updates[2]["variables"]["item"], "9001");
    let production = updates[2]["variables"]["body"].as_str().unwrap();
    assert!(production.contains("requested by alice (alice)"), "{production}");
    assert!(production.contains("approved by bob (bob)"), "{production}");
    let refused = deliveries(&f, 1);
    assert!(
        refused.iter().any(|d| d["attempts"] == 2 && d["outcome"] == "accepted"),
        "the refused update counted as a failed attempt: {refused:?}"
    );
    let refusal = "SELECT count(*) FROM webhook_deliveries WHERE error = 'monday: Complexity budget exhausted'";
    assert_eq!(f.server.count(refusal), 1, "the refusal is recorded in Monday's words");
}

#[test]
fn slack_and_monday_configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = "url = \"http://127.0.0.1:9/\"\n";
    let cases = [
        (format!("[[webhook]]\nname = \"x\"\n{url}format = \"teams\"\n"), "webhook[0].format"),
        (format!("[[webhook]]\nname = \"x\"\n{url}format = \"monday\"\ntoken_env = \"PATH\"\n"), "webhook[0].board_id"),
        (format!("[[webhook]]\nname = \"x\"\n{url}format = \"monday\"\nboard_id = 1\n"), "webhook[0].token_env"),
        (
            format!(
                "[[webhook]]\nname = \"x\"\n{url}format = \"monday\"\nboard_id = 1\ntoken_env = \"RELEASE_NO_SUCH_VARIABLE\"\n"
            ),
            "RELEASE_NO_SUCH_VARIABLE is not set",
        ),
        (format!("[[webhook]]\nname = \"x\"\n{url}format = \"slack\"\nboard_id = 1\n"), "webhook[0].board_id"),
        // The JSON format is signed: its secret stays required.
        (format!("[[webhook]]\nname = \"x\"\n{url}"), "webhook[0].secret"),
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
    }
}
