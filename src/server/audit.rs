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
/// Export pages read at once, server-wide; the other exports wait their turn without a thread,
/// so the blocking threads (512) stay free for every other request's reads (authentication
/// among them). Unbounded, 560 unread exports filling their sockets queued ~5,000 page reads
/// ahead of everyone's: a bystander's request timed out, and RSS reached 2.5 GB.
const PAGE_READS_AT_ONCE: usize = 4;
static PAGE_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(PAGE_READS_AT_ONCE);

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
        Some(since) => Some(crate::utc::Timestamp::at(
            crate::utc::parse(since)
                .map_err(|e| ApiError::bad_request(format!("since: {since:?} is not an RFC 3339 time: {e}")))?,
        )),
        None => None,
    };
    let registry = Arc::clone(&state.registry);
    let body = paged((q.after.unwrap_or(0), q.limit.unwrap_or(u64::MAX)), move |(after, left)| {
        let page = registry.audit_events(after, since.as_ref(), EXPORT_PAGE.min(left))?;
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
/// registry connection, and at most one page in memory (besides the socket's buffers); at most
/// [`PAGE_READS_AT_ONCE`] pages of all exports are read at once. `next`
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
            let _turn = PAGE_READS.acquire().await.expect("never closed");
            let page = crate::registry::run(move || next(cursor)).await;
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
        let head = crate::registry::run(move || reader.audit_head()).await?;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exports_read_a_bounded_number_of_pages_at_once() {
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let exports = (0..20).map(|_| {
            let (now, most) = (Arc::clone(&now), Arc::clone(&most));
            let body = paged(0u32, move |page| {
                most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                now.fetch_sub(1, Ordering::SeqCst);
                Ok((vec![b'x'; 10], (page < 3).then_some(page + 1)))
            });
            async move { body.into_data_stream().map(|chunk| chunk.unwrap().len()).collect::<Vec<_>>().await }
        });
        let read = futures::future::join_all(exports.map(tokio::spawn)).await;
        assert!(read.into_iter().all(|pages| pages.unwrap() == vec![10; 4]));
        assert_eq!(most.load(Ordering::SeqCst), PAGE_READS_AT_ONCE);
    }
}
