//! The audit endpoints: export as JSON lines (streamed page by page), and verification (at a
//! bounded rate: [`Verifier`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::ApiQuery;
use crate::audit::{self, Verification};
use crate::token::{Action, Principal};

/// Events per registry read while streaming an export (one page is all an export holds).
const EXPORT_PAGE: u64 = 1_000;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/audit/events", get(export)).route("/audit/verify", get(verify))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    /// Only events after this sequence number.
    after: Option<u64>,
    /// Only events at or after this time (RFC 3339).
    since: Option<String>,
    limit: Option<u64>,
}

async fn export(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    p.require(Action::ReadAudit)?;
    p.require_unscoped("the audit log")?;
    // Normalized to the stored form (UTC, microseconds), so that text order is time order.
    let since = match &q.since {
        Some(since) => Some(crate::utc::format(
            crate::utc::parse(since)
                .map_err(|e| ApiError::bad_request(format!("since: {since:?} is not an RFC 3339 time: {e}")))?,
        )),
        None => None,
    };
    let registry = Arc::clone(&state.registry);
    let body = paged((q.after.unwrap_or(0), q.limit.unwrap_or(u64::MAX)), move |(after, left)| {
        let page = registry.audit_events(after, since.as_deref(), EXPORT_PAGE.min(left))?;
        let mut lines = Vec::with_capacity(page.len() * 300);
        for event in &page {
            serde_json::to_writer(&mut lines, event).expect("events serialize");
            lines.push(b'\n');
        }
        let left = left - page.len() as u64;
        let more = (page.len() as u64 == EXPORT_PAGE && left > 0).then(|| (page.last().map_or(after, |e| e.seq), left));
        Ok((lines, more))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// A streamed answer read from the registry a page at a time, each page only once the client
/// has taken the one before: a client that reads slowly, or not at all, holds no thread and no
/// registry connection, and at most one page in memory (besides the socket's buffers). `next`
/// turns a cursor into a page's bytes and the next cursor (`None`: that was the last).
pub(super) fn paged<C, F>(first: C, next: F) -> Body
where
    C: Send + 'static,
    F: Fn(C) -> Result<(Vec<u8>, Option<C>), crate::registry::RegistryError> + Send + Sync + 'static,
{
    let next = Arc::new(next);
    let pages = futures::stream::unfold(Some(first), move |cursor| {
        let next = Arc::clone(&next);
        async move {
            let cursor = cursor?;
            let page = tokio::task::spawn_blocking(move || next(cursor)).await.expect("reading a page does not panic");
            Some(match page {
                Ok((bytes, more)) => (Ok::<_, std::io::Error>(bytes), more),
                Err(e) => (Err(std::io::Error::other(e.to_string())), None),
            })
        }
    });
    Body::from_stream(pages)
}

async fn verify(State(state): State<AppState>, Caller(p): Caller) -> Result<Json<Verification>, ApiError> {
    p.require(Action::ReadAudit)?;
    Ok(Json(state.verifier.verify(&p, &state).await?))
}

/// `audit verify` walks the whole chain (seconds at millions of events), so it is served at a
/// bounded rate: one walk at a time (callers queue for it); an answer younger than
/// `limits.verify_interval` is given again while the chain's head has not moved; and each
/// token gets at most one fresh walk per interval — within it, a head that moved (any refused
/// request moves it) gets 429 with `Retry-After`.
#[derive(Default)]
pub struct Verifier {
    /// The last walk's answer; the lock is the one-walk-at-a-time.
    last: tokio::sync::Mutex<Option<(Instant, Verification)>>,
    /// When each token last had a fresh walk (only those within the interval are kept).
    walks: std::sync::Mutex<HashMap<String, Instant>>,
}

impl Verifier {
    async fn verify(&self, p: &Principal, state: &AppState) -> Result<Verification, ApiError> {
        let interval = state.config.limits.verify_interval.0;
        let mut last = self.last.lock().await;
        let reader = Arc::clone(&state.registry);
        let head = tokio::task::spawn_blocking(move || reader.audit_head()).await.expect("no panic")?;
        let head = head.map_or((0, None), |(n, hash)| (n, Some(hex::encode(hash))));
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < interval
            && (answer.events, &answer.head) == (head.0, &head.1)
        {
            return Ok(answer.clone());
        }
        let now = Instant::now();
        {
            let mut walks = self.walks.lock().expect("never poisoned");
            walks.retain(|_, at| at.elapsed() < interval);
            if let Some(at) = walks.get(&p.name) {
                let wait = interval.saturating_sub(at.elapsed());
                return Err(ApiError::rate_limited(
                    format!(
                        "this token had a fresh walk of the audit chain less than {} ago \
                         (limits.verify_interval), and the chain has grown since: try again in {}s",
                        state.config.limits.verify_interval,
                        wait.as_secs().max(1)
                    ),
                    wait,
                ));
            }
            walks.insert(p.name.clone(), now);
        }
        let answer = audit::verify(&state.registry, &state.store).await?;
        *last = Some((now, answer.clone()));
        Ok(answer)
    }
}
