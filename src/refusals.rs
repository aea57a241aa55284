//! Refused requests on record, bounded (SPEC 2: every refused attempt is in the audit log;
//! SPEC 9: a flood of them is never a disk-filler).
//!
//! - What a refusal records of the request is cut: its method and path, and its message, keep
//!   at most [`MAX_TEXT`] bytes each (on a character boundary, marked as cut).
//! - Refusals without a real token (none, unknown, malformed) write nothing at once: they are
//!   counted in memory per source and window, and each window ends in one
//!   `request.refused.aggregate` event per source (count, first and last time, count per status
//!   and code, the first [`MAX_SAMPLES`] requests). A source is an IPv4 address or an IPv6 /64
//!   (one host holds a whole /64). Past [`MAX_SOURCES`] sources in a window, the rest share one
//!   bucket, `(other)`.
//! - Refusals of a real token (a caller without the role, a conflict, a revoked or expired
//!   token) are `request.refused` events of their own, naming the token, at once: the first
//!   [`TOKEN_BUDGET`] of each token in a window. Its later ones in that window are counted into
//!   one aggregate event of that token, so even a leaked token cannot write faster than that.
//!
//! A window's aggregates are appended in one transaction when it ends and at shutdown
//! ([`RefusalLog::flush`]): a clean stop loses nothing, a crash at most the open window's
//! counts. Memory is bounded by the caps: about 100 + 100 buckets of at most five samples.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::audit::NewEvent;
use crate::model::audit::AuditAction;
use crate::registry::Registry;
use crate::utc::Timestamp;

/// Bytes kept of a refused request's method and path, and of its message.
pub const MAX_TEXT: usize = 256;
/// Requests kept as samples in one aggregate event.
pub const MAX_SAMPLES: usize = 5;
/// Sources counted apart in one window; later ones share the `(other)` bucket.
pub const MAX_SOURCES: usize = 100;
/// Tokens counted apart in one window; later ones share one bucket.
pub const MAX_TOKENS: usize = 100;
/// Refusals of one token recorded as events of their own in one window.
pub const TOKEN_BUDGET: u32 = 20;

/// The action of one refusal's event.
pub const REFUSED: AuditAction = AuditAction::RequestRefused;
/// The action of a window's count of refusals, per source or per token.
pub const AGGREGATE: AuditAction = AuditAction::RequestRefusedAggregate;
/// The actor of refusals without a real token.
pub const UNAUTHENTICATED: &str = "(unauthenticated)";
/// The name of the bucket that sources (or tokens) past the cap share.
const OTHER: &str = "(other)";

/// One refused request, as the server saw it.
#[derive(Clone, Debug)]
pub struct Refused {
    pub status: u16,
    /// The error code (a fixed name from the server's error mapping).
    pub code: &'static str,
    pub message: String,
    /// `METHOD /path` (never the query).
    pub request: String,
    /// The client's address, when known.
    pub source: Option<IpAddr>,
    /// The real token it came with: a caller refused what it asked, or a revoked or expired
    /// token. `None` for no token, an unknown or a malformed one.
    pub token: Option<Token>,
}

/// A token that exists in the registry: its name and owner.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub owner: String,
}

/// Records refusals into the audit log, bounded (see the module's documentation).
pub struct RefusalLog {
    registry: Arc<Registry>,
    window: Duration,
    open: Mutex<Window>,
    /// One flush at a time, from taking the window to its commit: a flush at shutdown waits
    /// for one in progress, so nothing taken is dropped by the process ending.
    flushing: tokio::sync::Mutex<()>,
}

impl RefusalLog {
    pub fn new(registry: Arc<Registry>, window: Duration) -> RefusalLog {
        RefusalLog { registry, window, open: Mutex::default(), flushing: tokio::sync::Mutex::new(()) }
    }

    /// Counts `refused` in the open window, or (a real token within its budget) appends its
    /// own event before returning.
    pub async fn record(&self, refused: Refused) {
        let event = self.open.lock().expect("refusal window lock").add(refused, &Timestamp::now());
        let Some(event) = event else { return };
        let registry = Arc::clone(&self.registry);
        match crate::registry::catching(move || registry.append_event(&event)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not record a refused request in the audit log"),
            Err(e) => tracing::error!(error = %e, "recording a refused request panicked"),
        }
    }

    /// Ends the open window: appends its aggregate events, in one transaction.
    pub async fn flush(&self) {
        let _one_at_a_time = self.flushing.lock().await;
        let window = std::mem::take(&mut *self.open.lock().expect("refusal window lock"));
        let events = window.into_events(self.window);
        if events.is_empty() {
            return;
        }
        let registry = Arc::clone(&self.registry);
        let appended = crate::registry::catching(move || {
            let result = registry.append_events(&events);
            (events, result)
        })
        .await;
        match appended {
            Ok((_, Ok(()))) => {}
            Ok((events, Err(e))) => {
                // Not on record: at least in the log, whole.
                let lost: Vec<Value> =
                    events.iter().map(|e| json!({"subject": e.subject, "details": e.details})).collect();
                let lost = Value::Array(lost).to_string();
                tracing::error!(error = %e, refusals = %lost, "could not record counted refusals in the audit log");
            }
            Err(e) => tracing::error!(error = %e, "recording counted refusals panicked"),
        }
    }

    /// Flushes at the end of every window, for as long as the server runs.
    pub async fn run(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.window);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await; // the first tick is at once
        loop {
            interval.tick().await;
            self.flush().await;
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary, with a mark saying so.
pub fn truncate(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…[truncated, {} bytes]", &text[..end], text.len()))
}

/// How a source is named: an IPv4 address, an IPv6 /64, or `unknown`.
pub fn source_name(source: Option<IpAddr>) -> String {
    match source.map(crate::config::source) {
        None => "unknown".into(),
        Some(ip @ IpAddr::V4(_)) => ip.to_string(),
        Some(ip @ IpAddr::V6(_)) => format!("{ip}/64"),
    }
}

/// The refusals counted since the last flush.
#[derive(Default)]
struct Window {
    sources: HashMap<String, Tally>,
    other_sources: Option<Tally>,
    tokens: HashMap<Token, TokenTally>,
    other_tokens: Option<Tally>,
}

#[derive(Default)]
struct TokenTally {
    /// Events of their own written in this window.
    recorded: u32,
    /// Those past the budget.
    over: Option<Tally>,
}

/// A count of refusals in one window.
struct Tally {
    count: u64,
    first_at: Timestamp,
    last_at: Timestamp,
    statuses: BTreeMap<(u16, &'static str), u64>,
    samples: Vec<Value>,
}

impl Tally {
    fn new(at: &Timestamp) -> Tally {
        Tally { count: 0, first_at: at.to_owned(), last_at: at.to_owned(), statuses: BTreeMap::new(), samples: vec![] }
    }

    fn add(&mut self, refused: &Refused, at: &Timestamp) {
        self.count += 1;
        at.clone_into(&mut self.last_at);
        *self.statuses.entry((refused.status, refused.code)).or_default() += 1;
        if self.samples.len() < MAX_SAMPLES {
            let mut sample = json!({
                "at": at,
                "request": truncate(&refused.request, MAX_TEXT),
                "status": refused.status,
                "code": refused.code,
                "message": truncate(&refused.message, MAX_TEXT),
                "source": source_name(refused.source),
            });
            if let Some(token) = &refused.token {
                sample["token"] = token.name.clone().into();
            }
            self.samples.push(sample);
        }
    }

    fn details(self, window: Duration) -> serde_json::Map<String, Value> {
        let statuses: Vec<Value> = self
            .statuses
            .into_iter()
            .map(|((status, code), count)| json!({"status": status, "code": code, "count": count}))
            .collect();
        let details = json!({
            "count": self.count,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "window_seconds": window.as_secs(),
            "statuses": statuses,
            "samples": self.samples,
        });
        match details {
            Value::Object(map) => map,
            _ => unreachable!("a JSON object"),
        }
    }
}

fn bucket<'a, K: std::hash::Hash + Eq>(
    map: &'a mut HashMap<K, Tally>,
    other: &'a mut Option<Tally>,
    key: K,
    cap: usize,
    at: &Timestamp,
) -> &'a mut Tally {
    if map.len() >= cap && !map.contains_key(&key) {
        return other.get_or_insert_with(|| Tally::new(at));
    }
    map.entry(key).or_insert_with(|| Tally::new(at))
}

impl Window {
    /// Counts `refused`; returns the event to append at once, if it gets one of its own.
    fn add(&mut self, refused: Refused, at: &Timestamp) -> Option<NewEvent> {
        let Some(token) = &refused.token else {
            let source = source_name(refused.source);
            bucket(&mut self.sources, &mut self.other_sources, source, MAX_SOURCES, at).add(&refused, at);
            return None;
        };
        if self.tokens.len() >= MAX_TOKENS && !self.tokens.contains_key(token) {
            self.other_tokens.get_or_insert_with(|| Tally::new(at)).add(&refused, at);
            return None;
        }
        let tally = self.tokens.entry(token.clone()).or_default();
        if tally.recorded >= TOKEN_BUDGET {
            tally.over.get_or_insert_with(|| Tally::new(at)).add(&refused, at);
            return None;
        }
        tally.recorded += 1;
        Some(NewEvent {
            actor: token.name.clone(),
            owner: token.owner.clone(),
            action: REFUSED,
            subject: truncate(&refused.request, MAX_TEXT).into_owned(),
            details: json!({
                "status": refused.status,
                "code": refused.code,
                "message": truncate(&refused.message, MAX_TEXT),
                "source": source_name(refused.source),
            }),
        })
    }

    /// One aggregate event per bucket that counted something.
    fn into_events(self, window: Duration) -> Vec<NewEvent> {
        let aggregate = |actor: &str, owner: &str, subject: String, details: serde_json::Map<String, Value>| NewEvent {
            actor: actor.to_owned(),
            owner: owner.to_owned(),
            action: AGGREGATE,
            subject,
            details: Value::Object(details),
        };
        let mut events = Vec::new();
        let mut sources: Vec<_> = self.sources.into_iter().collect();
        sources.sort_by(|a, b| a.1.first_at.cmp(&b.1.first_at));
        let other = self.other_sources.map(|t| (OTHER.to_owned(), t));
        for (source, tally) in sources.into_iter().chain(other) {
            let mut details = tally.details(window);
            details.insert("source".into(), source.clone().into());
            events.push(aggregate(UNAUTHENTICATED, "", format!("source/{source}"), details));
        }
        let mut tokens: Vec<_> = self.tokens.into_iter().filter_map(|(t, tally)| Some((t, tally.over?))).collect();
        tokens.sort_by(|a, b| a.1.first_at.cmp(&b.1.first_at));
        for (token, tally) in tokens {
            let mut details = tally.details(window);
            details.insert("recorded_apart".into(), TOKEN_BUDGET.into());
            events.push(aggregate(&token.name, &token.owner, format!("token/{}", token.name), details));
        }
        if let Some(tally) = self.other_tokens {
            events.push(aggregate(OTHER, "", format!("token/{OTHER}"), tally.details(window)));
        }
        events
    }
}

#[cfg(test)]
mod tests;
