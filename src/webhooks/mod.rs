//! Outgoing webhooks: every change of a release's state POSTed as signed JSON to the
//! configured receivers, retried with backoff, never on a deploy's path.
//!
//! The audit log is the outbox. Each state change is already an audit event, appended in the
//! transaction that makes the change; one task per webhook reads the `release.*` events after
//! its cursor (`webhook_cursors`), delivers them one at a time, in order, and records every
//! attempt (`webhook_deliveries`). The attempt that ends a delivery (a 2xx answer, or the last
//! attempt failing) moves the cursor in the same transaction, so a restart resumes where the
//! last run stopped: at least once, never lost, with the same `X-Release-Delivery` id each
//! time. A slow or dead receiver holds back only its own webhook.

mod event;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::model::webhook::{Attempt, Delivery, EVENTS, Outcome};
pub use event::{Payload, delivery_id, event_for, signature};

use crate::config::{Format, Webhook};
use crate::model::audit::AuditAction;
use crate::model::audit::Event;
use crate::registry::{Registry, RegistryError};
use crate::utc;

/// How often a webhook with nothing to do looks for new events.
const POLL: Duration = Duration::from_millis(500);
/// Events read from the log at once.
const BATCH: u64 = 100;
/// The wait before trying again after the registry failed.
const REGISTRY_RETRY: Duration = Duration::from_secs(2);
/// How much of a refusing receiver's answer is kept with the attempt.
const ANSWER_TAIL: usize = 200;

/// The running webhook tasks; stopped by [`Workers::stop`] or when dropped.
pub struct Workers {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Gives each webhook that has none a cursor at the head of the audit log (call this
    /// before anything appends events at start, so that none is missed), then starts one
    /// task per webhook.
    pub async fn start(
        webhooks: &[Webhook],
        public_url: Option<&str>,
        registry: Arc<Registry>,
    ) -> Result<Workers, RegistryError> {
        let names: Vec<String> = webhooks.iter().map(|w| w.name.clone()).collect();
        let reg = Arc::clone(&registry);
        crate::registry::run(move || reg.start_webhook_cursors(&names)).await?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("release/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with rustls builds");
        for hook in webhooks {
            let plain = reqwest::Url::parse(hook.url.expose())
                .is_ok_and(|u| u.scheme() == "http" && !is_loopback(u.host_str().unwrap_or("")));
            if plain {
                // Signed, so not forgeable; but anyone on the way reads the events.
                tracing::warn!(webhook = %hook.name, "webhook over plain HTTP beyond loopback: use https://");
            }
        }
        let cancel = CancellationToken::new();
        let tasks = webhooks
            .iter()
            .map(|hook| {
                let worker = Worker {
                    hook: hook.clone(),
                    public_url: public_url.map(str::to_owned),
                    registry: Arc::clone(&registry),
                    client: client.clone(),
                    cancel: cancel.clone(),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        Ok(Workers { cancel, tasks })
    }

    /// Stops every task: an attempt in flight is dropped (its event is delivered again after
    /// the next start, with the same delivery id).
    pub async fn stop(mut self) {
        self.cancel.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The task of one webhook.
struct Worker {
    hook: Webhook,
    /// The pages' address (`[server] public_url`), for links in messages.
    public_url: Option<String>,
    registry: Arc<Registry>,
    client: reqwest::Client,
    cancel: CancellationToken,
}

/// The task was told to stop.
struct Stopped;

impl Worker {
    async fn run(self) {
        let name = self.hook.name.clone();
        let cursor = self.until_ok(move |r| {
            r.start_webhook_cursors(std::slice::from_ref(&name))?;
            r.webhook_cursor(&name)
        });
        let Ok(Some(mut cursor)) = cursor.await else { return };
        tracing::info!(webhook = %self.hook.name, after = cursor, "webhook started");
        loop {
            let backlog = match self.until_ok(move |r| r.webhook_backlog(cursor, BATCH)).await {
                Ok(backlog) => backlog,
                Err(Stopped) => return,
            };
            let full = backlog.events.len() as u64 == BATCH;
            for event in backlog.events {
                match self.handle(&event).await {
                    Ok(true) => cursor = event.seq,
                    Ok(false) => {}
                    Err(Stopped) => return,
                }
            }
            if backlog.scanned_to > cursor {
                let (name, to) = (self.hook.name.clone(), backlog.scanned_to);
                if self.until_ok(move |r| r.advance_webhook_cursor(&name, to)).await.is_err() {
                    return;
                }
                cursor = backlog.scanned_to;
            }
            if !full && self.sleep(POLL).await.is_err() {
                return;
            }
        }
    }

    /// Delivers `event` if this webhook wants it; `Ok(true)` when it was delivered or given up
    /// (the cursor moved past it), `Ok(false)` when it is not one for this webhook.
    async fn handle(&self, event: &Event) -> Result<bool, Stopped> {
        let Some((name, state)) = AuditAction::parse(&event.action).and_then(event_for) else { return Ok(false) };
        let Some(id) = event::release_id(&event.subject) else { return Ok(false) };
        let Some(release) = self.until_ok(move |r| r.release_at_event(id)).await? else {
            tracing::error!(webhook = %self.hook.name, event = event.seq, release = id, "an event names no release");
            return Ok(false);
        };
        let r = &release.release;
        if !self.hook.wants(name, &r.service, &r.environment) {
            return Ok(false);
        }
        self.deliver(event, name, state, &release).await?;
        Ok(true)
    }

    /// One attempt in the webhook's format: `(status, None)` when the receiver took it, else
    /// what went wrong. A Monday item created by an earlier attempt of this delivery is kept
    /// in `monday_item`, so a retry adds its update instead of a second item.
    async fn attempt(
        &self,
        event: &Event,
        name: &str,
        state: Option<crate::model::release::State>,
        release: &crate::registry::ReleaseAtEvent,
        delivery: &str,
        monday_item: &mut Option<String>,
    ) -> (Option<u16>, Option<String>) {
        let hook = &self.hook;
        let public_url = self.public_url.as_deref();
        let post = |body: Vec<u8>| {
            let mut request = self
                .client
                .post(hook.url.expose())
                .timeout(hook.timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Release-Event", name)
                .header("X-Release-Delivery", delivery);
            if let Some(secret) = &hook.secret {
                request = request.header("X-Release-Signature", signature(secret.expose().as_bytes(), &body));
            }
            request.body(body)
        };
        match &hook.format {
            Format::Json => done(send(post(event::body(event, name, state, release)), hook.timeout).await),
            Format::Slack => done(send(post(event::slack_body(event, name, release, public_url)), hook.timeout).await),
            Format::Monday { board_id, group_id, token } => {
                let monday = |body: Vec<u8>| post(body).header(reqwest::header::AUTHORIZATION, token.expose());
                if monday_item.is_none() {
                    let body = event::monday_item(event, name, release, *board_id, group_id.as_deref(), public_url);
                    match graphql(send(monday(body), hook.timeout).await) {
                        Ok((_, answer)) => match answer["data"]["create_item"]["id"].as_str() {
                            Some(id) => *monday_item = Some(id.to_owned()),
                            None => return (None, Some("monday: create_item answered no item id".into())),
                        },
                        Err(failed) => return failed,
                    }
                }
                let item = monday_item.as_deref().expect("created above");
                match graphql(
                    send(monday(event::monday_update(event, name, release, item, public_url)), hook.timeout).await,
                ) {
                    Ok((status, _)) => (status, None),
                    Err(failed) => failed,
                }
            }
        }
    }

    /// Attempts until the receiver accepts or the attempts run out; records each attempt.
    async fn deliver(
        &self,
        event: &Event,
        name: &str,
        state: Option<crate::model::release::State>,
        release: &crate::registry::ReleaseAtEvent,
    ) -> Result<(), Stopped> {
        let hook = &self.hook;
        let release_id = release.release.id;
        let delivery = delivery_id(&hook.name, &event.hash);
        let (webhook, seq) = (hook.name.clone(), event.seq);
        let mut attempt = self.until_ok(move |r| r.webhook_attempts(&webhook, seq)).await? + 1;
        let mut monday_item = None;
        loop {
            let at = utc::Timestamp::now();
            let started = Instant::now();
            let (status_code, error) = tokio::select! {
                answer = self.attempt(event, name, state, release, &delivery, &mut monday_item) => answer,
                _ = self.cancel.cancelled() => return Err(Stopped),
            };
            let outcome = match (&error, attempt >= hook.max_attempts) {
                (None, _) => Outcome::Accepted,
                (Some(_), false) => Outcome::Retrying,
                (Some(_), true) => Outcome::GaveUp,
            };
            let wait = hook.backoff(attempt + 1);
            let record = Attempt {
                webhook: hook.name.clone(),
                event_seq: event.seq,
                release_id,
                event: name.to_owned(),
                delivery: delivery.clone(),
                attempt,
                at,
                duration_ms: started.elapsed().as_millis() as u64,
                status_code,
                error: error.clone(),
                outcome,
                next_attempt_at: (outcome == Outcome::Retrying).then(|| {
                    utc::Timestamp::at(utc::now() + time::Duration::try_from(wait).unwrap_or(time::Duration::MAX))
                }),
            };
            let (webhook, delivery_id) = (hook.name.as_str(), delivery.as_str());
            match outcome {
                Outcome::Accepted => {
                    tracing::info!(webhook, event = name, seq, delivery = delivery_id, attempt, "webhook delivered")
                }
                Outcome::Retrying => tracing::warn!(
                    webhook,
                    event = name,
                    seq,
                    delivery = delivery_id,
                    attempt,
                    error = error.as_deref().unwrap_or(""),
                    retry_in_ms = wait.as_millis() as u64,
                    "webhook attempt failed"
                ),
                Outcome::GaveUp => tracing::error!(
                    webhook,
                    event = name,
                    seq,
                    delivery = delivery_id,
                    attempt,
                    error = error.as_deref().unwrap_or(""),
                    "webhook delivery given up"
                ),
            }
            self.until_ok(move |r| r.record_webhook_attempt(&record)).await?;
            if outcome.is_final() {
                return Ok(());
            }
            self.sleep(wait).await?;
            attempt += 1;
        }
    }

    /// Runs a registry call off the async threads, again and again until it succeeds (a
    /// registry that fails now may not in a moment), or until the task is stopped.
    async fn until_ok<T: Send + 'static>(
        &self,
        f: impl Fn(&Registry) -> Result<T, RegistryError> + Send + Sync + 'static,
    ) -> Result<T, Stopped> {
        let f = Arc::new(f);
        loop {
            let (registry, call) = (Arc::clone(&self.registry), Arc::clone(&f));
            match crate::registry::catching(move || call(&registry)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => tracing::error!(webhook = %self.hook.name, error = %e, "webhook: registry call failed"),
                Err(e) => tracing::error!(webhook = %self.hook.name, error = %e, "webhook: registry call panicked"),
            }
            self.sleep(REGISTRY_RETRY).await?;
        }
    }

    async fn sleep(&self, how_long: Duration) -> Result<(), Stopped> {
        tokio::select! {
            _ = tokio::time::sleep(how_long) => Ok(()),
            _ = self.cancel.cancelled() => Err(Stopped),
        }
    }
}

/// An answer as an attempt's outcome: `(status, None)` when it was a 2xx.
fn done(answer: (Option<u16>, Result<Vec<u8>, String>)) -> (Option<u16>, Option<String>) {
    (answer.0, answer.1.err())
}

/// A GraphQL answer (Monday's): its JSON on a 2xx without `errors`, else the attempt's
/// failure. Monday answers 200 to a refused query, naming why in `errors`.
#[allow(clippy::type_complexity)]
fn graphql(
    answer: (Option<u16>, Result<Vec<u8>, String>),
) -> Result<(Option<u16>, serde_json::Value), (Option<u16>, Option<String>)> {
    let (status, body) = answer;
    let body = body.map_err(|e| (status, Some(e)))?;
    let json: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| (status, Some(format!("monday: the answer is not JSON ({e})"))))?;
    if let Some(errors) = json.get("errors").or_else(|| json.get("error_message")) {
        let first = errors[0]["message"].as_str().map_or_else(|| errors.to_string(), str::to_owned);
        let first: String = first.chars().take(ANSWER_TAIL).collect();
        return Err((status, Some(format!("monday: {first}"))));
    }
    Ok((status, json))
}

/// The most of a 2xx answer's body kept (a Monday answer is a few hundred bytes).
const MAX_ANSWER: usize = 64 << 10;

/// Sends one attempt: `(status, Ok(body))` on a 2xx answer (the body's first `MAX_ANSWER`
/// bytes), else what went wrong. The URL never appears in the error (it may carry a token).
async fn send(request: reqwest::RequestBuilder, timeout: Duration) -> (Option<u16>, Result<Vec<u8>, String>) {
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.is_timeout() => {
            return (None, Err(format!("no answer within {}", humantime::format_duration(timeout))));
        }
        Err(e) => return (None, Err(crate::error_chain(&e.without_url()))),
    };
    let status = response.status();
    if status.is_success() {
        let mut body = Vec::new();
        let mut response = response;
        while body.len() < MAX_ANSWER {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return (Some(status.as_u16()), Err(crate::error_chain(&e.without_url()))),
            }
        }
        body.truncate(MAX_ANSWER);
        return (Some(status.as_u16()), Ok(body));
    }
    let mut answer = Vec::new();
    let mut response = response;
    while answer.len() < ANSWER_TAIL {
        match response.chunk().await {
            Ok(Some(chunk)) => answer.extend_from_slice(&chunk),
            _ => break,
        }
    }
    answer.truncate(ANSWER_TAIL);
    let answer: String =
        String::from_utf8_lossy(&answer).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let answer = answer.trim();
    let error = if answer.is_empty() { format!("answered {status}") } else { format!("answered {status}: {answer}") };
    (Some(status.as_u16()), Err(error))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
