//! Outgoing webhooks against receivers in the test (loopback HTTP servers that record every
//! request): signed events in order, retries until accepted, dead receivers that never slow a
//! deploy, filters, configuration errors, and delivery across a crash. This file holds the
//! receiver and the helpers the topic files (and `curation`) share.

mod chat;
mod delivery;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::releases::Fixture;

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
