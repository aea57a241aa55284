//! The window's arithmetic (what gets an event of its own, what is counted where, how much is
//! kept), and a flush into a real registry.

use super::*;

fn anonymous(ip: &str, path_len: usize) -> Refused {
    Refused {
        status: 401,
        code: "unauthenticated",
        message: "missing token: send `Authorization: Bearer <token>`".into(),
        request: format!("GET /v1/{}", "a".repeat(path_len)),
        source: Some(ip.parse().unwrap()),
        token: None,
    }
}

fn of_token(name: &str, status: u16, code: &'static str) -> Refused {
    Refused {
        status,
        code,
        message: format!("token {name:?} may not approve releases"),
        request: "POST /v1/releases/7/approve".into(),
        source: Some("10.0.0.9".parse().unwrap()),
        token: Some(Token { name: name.into(), owner: "alice".into() }),
    }
}

fn at() -> crate::utc::Timestamp {
    crate::utc::Timestamp::parse("2026-11-27T10:00:00.000000Z").unwrap()
}
const WINDOW: Duration = Duration::from_secs(60);

#[test]
fn truncation_keeps_a_char_boundary_and_says_so() {
    assert_eq!(truncate("short", 256), "short");
    let long = "é".repeat(200); // 400 bytes
    let cut = truncate(&long, 255);
    assert!(cut.starts_with(&"é".repeat(127)), "cut back to a boundary: {cut}");
    assert!(!cut.starts_with(&"é".repeat(128)));
    assert!(cut.ends_with("…[truncated, 400 bytes]"), "{cut}");
}

#[test]
fn refusals_without_a_token_are_one_event_per_source() {
    let mut window = Window::default();
    for i in 0..1000 {
        let ip = if i % 2 == 0 { "203.0.113.7" } else { "2001:db8:1:2::99" };
        assert!(window.add(anonymous(ip, 65_000), &at()).is_none(), "nothing written at once");
    }
    let mut forbidden = anonymous("203.0.113.7", 10);
    (forbidden.status, forbidden.code) = (403, "forbidden");
    window.add(forbidden, &at());
    let events = window.into_events(WINDOW);
    assert_eq!(events.len(), 2, "{events:#?}");
    let v4 = events.iter().find(|e| e.subject == "source/203.0.113.7").unwrap();
    assert_eq!(v4.action, AGGREGATE);
    assert_eq!(v4.actor, UNAUTHENTICATED);
    assert_eq!(v4.details["count"], 501);
    assert_eq!(v4.details["window_seconds"], 60);
    assert_eq!(
        v4.details["statuses"],
        json!([{"status": 401, "code": "unauthenticated", "count": 500}, {"status": 403, "code": "forbidden", "count": 1}])
    );
    let samples = v4.details["samples"].as_array().unwrap();
    assert_eq!(samples.len(), MAX_SAMPLES);
    for sample in samples {
        let request = sample["request"].as_str().unwrap();
        assert!(request.len() < MAX_TEXT + 40 && request.ends_with("[truncated, 65008 bytes]"), "{request}");
    }
    // Every address of a /64 is one source.
    let v6 = events.iter().find(|e| e.subject == "source/2001:db8:1:2::/64").unwrap();
    assert_eq!(v6.details["count"], 500);
    assert!(v6.to_json_len() < 4096, "an aggregate stays small: {}", v6.to_json_len());
}

#[test]
fn sources_past_the_cap_share_one_bucket() {
    let mut window = Window::default();
    for i in 0..(MAX_SOURCES as u32 + 50) {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
        window.add(anonymous(&ip, 10), &at());
        window.add(anonymous(&ip, 10), &at());
    }
    assert_eq!(window.sources.len(), MAX_SOURCES);
    let events = window.into_events(WINDOW);
    assert_eq!(events.len(), MAX_SOURCES + 1);
    let other = events.last().unwrap();
    assert_eq!(other.subject, "source/(other)");
    assert_eq!(other.details["count"], 100);
    let total: u64 = events.iter().map(|e| e.details["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 2 * (MAX_SOURCES as u64 + 50), "every refusal is counted somewhere");
}

#[test]
fn a_real_token_gets_events_of_its_own_up_to_its_budget() {
    let mut window = Window::default();
    let mut own = Vec::new();
    for _ in 0..(TOKEN_BUDGET + 7) {
        own.extend(window.add(of_token("deployer", 403, "forbidden"), &at()));
    }
    own.extend(window.add(of_token("other", 409, "conflict"), &at()));
    assert_eq!(own.len(), TOKEN_BUDGET as usize + 1);
    assert!(own.iter().all(|e| e.action == REFUSED && e.owner == "alice"));
    assert_eq!(own[0].subject, "POST /v1/releases/7/approve");
    assert_eq!(own[0].details["source"], "10.0.0.9");
    let events = window.into_events(WINDOW);
    assert_eq!(events.len(), 1, "only the token past its budget is aggregated: {events:#?}");
    assert_eq!(events[0].actor, "deployer");
    assert_eq!(events[0].subject, "token/deployer");
    assert_eq!(events[0].details["count"], 7);
    assert_eq!(events[0].details["recorded_apart"], TOKEN_BUDGET);
}

#[test]
fn an_empty_window_writes_nothing() {
    assert!(Window::default().into_events(WINDOW).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_appends_the_window_in_one_go() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::open(&dir.path().join("registry.db")).unwrap());
    let log = RefusalLog::new(Arc::clone(&registry), WINDOW);
    for _ in 0..300 {
        log.record(anonymous("198.51.100.1", 8192)).await;
    }
    log.record(of_token("ci", 409, "conflict")).await;
    assert_eq!(registry.audit_head().unwrap().unwrap().0, 1, "only the real token's refusal is written at once");
    log.flush().await;
    log.flush().await; // a second flush has nothing left to write
    let events = registry.audit_events(0, None, 100).unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].action, AGGREGATE.as_str());
    let details: Value = serde_json::from_str(&events[1].details).unwrap();
    assert_eq!(details["count"], 300);
    assert_eq!(details["source"], "198.51.100.1");
}

trait JsonLen {
    fn to_json_len(&self) -> usize;
}

impl JsonLen for NewEvent {
    fn to_json_len(&self) -> usize {
        self.subject.len() + self.details.to_string().len()
    }
}
