//! The HTTP server: state, routes, request logging and graceful serving.
//!
//! `router(state)` is separate from `serve(listener, router, shutdown)` so tests can drive the
//! router in-process or on a real port-0 socket. Handlers stay thin: extract, authenticate
//! (through the [`auth::Caller`] extractor), call one domain function, answer.

mod artifacts;
mod audit;
mod auth;
mod error;
mod extract;
mod limits;
mod listen;
mod pages;
mod range;
mod releases;
pub mod routes;
mod source;
mod tls;

/// Answers the CLI reads back through the types they were written from.
pub use artifacts::{ArtifactAnswer, ListAnswer, Uploaded};
pub use releases::{CheckAnswer, HistoryAnswer};

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

pub use error::ApiError;

use auth::Caller;

use crate::archive::SentIndexes;
use crate::config::{Config, StorageConfig};
use crate::ingest::Ingestor;
use crate::metrics::Metrics;
use crate::model::audit::AuditAction;
use crate::refusals::{RefusalLog, Refused};
use crate::registry::{Registry, RegistryError};
use crate::releases::{Deployer, Releases};
use crate::store::{Store, StoreError};
use crate::webhooks::Workers;

/// How old a staging upload of an S3 store must be before the start-up sweep removes it
/// (a shared bucket may hold another server's upload in progress; a local store is ours alone).
const S3_UPLOAD_SWEEP_AGE: Duration = Duration::from_secs(24 * 3600);
/// How often the pages' view of the audit chain is checked from its first event again.
const CHAIN_RECHECK: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DataDir(#[from] crate::datadir::LockError),
    #[error(transparent)]
    Curation(#[from] crate::curation::CurationError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot start: {0}")]
    Start(String),
}

/// Shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub ingestor: Ingestor,
    pub releases: Releases,
    /// The audit chain's state for the pages, checked incrementally.
    pub chain: Arc<crate::audit::ChainWatch>,
    pub metrics: Arc<Metrics>,
    /// Refused requests into the audit log, bounded.
    pub refusals: Arc<RefusalLog>,
    /// Serves `audit verify` at a bounded rate.
    verifier: Arc<audit::Verifier>,
    /// Sign-ins per token, bounded.
    logins: Arc<pages::LoginPace>,
    /// The count last checkpointed; the lock makes checkpoint writes one at a time, so the
    /// head in the bucket cannot go backwards between two writers.
    checkpointed: Arc<tokio::sync::Mutex<u64>>,
}

impl AppState {
    /// Checkpoints the audit chain's head to the store if it moved.
    pub async fn checkpoint(&self) {
        let mut last = self.checkpointed.lock().await;
        match crate::audit::checkpoint(&self.registry, &self.store, *last).await {
            Ok(n) => *last = n,
            Err(e) => tracing::error!(error = %e, "could not write the audit checkpoint"),
        }
    }
}

/// Removes from the store what a server killed mid-way left there, before anything else uses
/// it (the data directory's lock proves that server is gone): for each upload its journal
/// still notes, the staging object and its S3 multipart upload, and the bytes it was
/// publishing unless the registry names them; and the bytes of a purge recorded but cut short
/// before its delete (storage-layout.md, "Crashes and interrupted uploads").
async fn clear_what_a_crash_left(registry: &Arc<Registry>, store: &Store) -> Result<(), ServerError> {
    let reader = Arc::clone(registry);
    let left = crate::registry::run(move || reader.left_uploads()).await?;
    for upload in left {
        let parts = store.remove_left_upload(upload.id).await?;
        if let Some(digest) = upload.unnamed_artifact {
            store.remove_artifact(digest).await?;
        }
        let writer = Arc::clone(registry);
        crate::registry::run(move || writer.unstage_upload(upload.id)).await?;
        tracing::warn!(
            upload = %upload.id,
            parts,
            unnamed_artifact = upload.unnamed_artifact.map(|d| d.to_string()),
            "removed what an upload cut short by a stop left in the store"
        );
    }
    let reader = Arc::clone(registry);
    let purged = crate::registry::run(move || reader.purged_artifacts()).await?;
    if !purged.is_empty() {
        let stored: std::collections::HashSet<_> = store.list_artifacts().await?.into_iter().collect();
        for digest in purged.into_iter().filter(|d| stored.contains(d)) {
            crate::curation::remove_bytes(store, registry, digest).await?;
            tracing::warn!(%digest, "removed the bytes of a purge cut short by a stop");
        }
    }
    Ok(())
}

/// What `release serve` holds while it runs: the state, the webhook tasks and the data
/// directory's lock.
pub struct Opened {
    pub state: AppState,
    webhooks: Option<Workers>,
    /// Ends each window of refusal counts.
    refusal_windows: tokio::task::JoinHandle<()>,
    _lock: std::fs::File,
}

impl Opened {
    /// Locks the data directory, opens the registry and the store, sweeps stale uploads,
    /// checks the audit log against the bucket, starts the webhooks, resumes releases, and
    /// starts the audit checkpoints. `deployer` makes the deploy seam's implementation over
    /// the one store everything shares and the file indexes uploads keep ready to send.
    pub async fn open(
        config: Config,
        deployer: impl FnOnce(Store, Arc<SentIndexes>) -> Arc<dyn Deployer>,
    ) -> Result<Opened, ServerError> {
        let lock = crate::datadir::lock(&config.data_dir)?;
        let registry_path = config.registry_path();
        let registry = crate::registry::run(move || Registry::open(&registry_path)).await?;
        let store = Store::open(&config.storage)?;
        let sweep_age = match config.storage {
            StorageConfig::Local { .. } => Duration::ZERO,
            StorageConfig::S3(_) => S3_UPLOAD_SWEEP_AGE,
        };
        let swept = store.sweep_uploads(sweep_age).await?;
        if swept > 0 {
            tracing::info!(swept, "removed staging uploads left by an interrupted run");
        }
        tracing::info!(store = %store.describe(), registry = %registry.path().display(), "opened");
        let (config, registry) = (Arc::new(config), Arc::new(registry));
        clear_what_a_crash_left(&registry, &store).await?;
        check_audit_against_bucket(&registry, &store).await?;
        let metrics = Arc::new(Metrics::new());
        let services: Vec<String> = config.services.values().map(|s| s.name.clone()).collect();
        let environments: Vec<String> = config.environments.iter().map(|e| e.name.clone()).collect();
        metrics.start_at_zero(&services, &environments);
        let indexes = Arc::new(SentIndexes::default());
        let ingestor = Ingestor::new(
            Arc::clone(&config),
            store.clone(),
            Arc::clone(&registry),
            Arc::clone(&metrics),
            Arc::clone(&indexes),
        );
        // Before the releases start: a webhook new to the registry starts at the audit log's
        // head, and what recovery appends next is already after it.
        let webhooks = Workers::start(&config.webhooks, config.public_url.as_deref(), Arc::clone(&registry)).await?;
        // One ingestor for uploads and adoptions alike: both take turns of the same
        // `max_concurrent_uploads`, the limit that bounds upload memory.
        let releases = Releases::new(
            Arc::clone(&config),
            Arc::clone(&registry),
            deployer(store.clone(), indexes),
            ingestor.clone(),
            Arc::clone(&metrics),
        );
        releases.start().await.map_err(|e| ServerError::Start(e.to_string()))?;
        let checkpointed = Arc::new(tokio::sync::Mutex::new(0));
        let chain = Arc::new(crate::audit::ChainWatch::default());
        let refusals = Arc::new(RefusalLog::new(Arc::clone(&registry), config.audit.refusal_window.0));
        let refusal_windows = tokio::spawn(Arc::clone(&refusals).run());
        let (verifier, logins) = (Arc::default(), Arc::default());
        let state = AppState {
            config,
            store,
            registry,
            ingestor,
            releases,
            chain,
            metrics,
            refusals,
            verifier,
            logins,
            checkpointed,
        };
        tokio::spawn(checkpoints(state.clone()));
        tokio::spawn(watch_chain(state.clone()));
        if !state.config.backup.interval.0.is_zero() {
            tokio::spawn(backups(state.clone()));
        }
        Ok(Opened { state, webhooks: Some(webhooks), refusal_windows, _lock: lock })
    }

    /// Writes a last checkpoint of the audit chain (at shutdown).
    pub async fn checkpoint(&self) {
        self.state.checkpoint().await;
    }

    /// At shutdown (after the last request): stops the webhook tasks (an attempt in flight is
    /// dropped and made again after the next start), records the refusals counted in the open
    /// window, and writes a last checkpoint of the audit chain.
    pub async fn shutdown(mut self) {
        if let Some(webhooks) = self.webhooks.take() {
            webhooks.stop().await;
        }
        self.state.refusals.flush().await;
        self.refusal_windows.abort();
        self.checkpoint().await;
    }
}

/// A registry behind the bucket's checkpoint was replaced or rolled back: say so loudly and
/// record it in the audit log (whose chain `audit verify` then reports as not matching).
async fn check_audit_against_bucket(registry: &Arc<Registry>, store: &Store) -> Result<(), ServerError> {
    let reader = Arc::clone(registry);
    let head = crate::registry::run(move || reader.audit_head()).await?;
    let events = head.map_or(0, |(n, _)| n);
    match crate::audit::against_checkpoint(registry, store, events).await {
        Ok((_, None)) => Ok(()),
        Ok((_, Some(bad))) => {
            tracing::error!(event = bad.seq, "audit log does not match the bucket's checkpoint: {}", bad.why);
            let event = crate::audit::NewEvent::by_server(
                AuditAction::AuditCheckpointMismatch,
                format!("audit/{}", bad.seq),
                serde_json::json!({"why": bad.why}),
            );
            let writer = Arc::clone(registry);
            crate::registry::run(move || writer.append_event(&event)).await?;
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "could not compare the audit log with the bucket's checkpoint");
            Ok(())
        }
    }
}

/// Checkpoints the audit chain's head to the store every `audit.checkpoint_interval`, when it
/// moved.
async fn checkpoints(state: AppState) {
    let mut interval = tokio::time::interval(state.config.audit.checkpoint_interval.0);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        state.checkpoint().await;
    }
}

/// Backs the registry up to the store every `backup.interval`: the first one an interval after
/// the newest backup in the store (at once if that is overdue; an interval after the start
/// when there is none), so restarts neither skip nor repeat one.
async fn backups(state: AppState) {
    let interval = state.config.backup.interval.0;
    let newest = match state.store.list_backups().await {
        Ok(stamps) => stamps.last().copied(),
        Err(e) => {
            tracing::error!(error = %e, "could not list the registry backups");
            None
        }
    };
    let now_ms = crate::store::BackupStamp::now().0;
    let mut wait = match newest {
        Some(stamp) => {
            Duration::from_millis(u64::try_from(stamp.0 + interval.as_millis() as i64 - now_ms).unwrap_or(0))
        }
        None => interval,
    };
    loop {
        tokio::time::sleep(wait).await;
        backup_once(&state).await;
        wait = interval;
    }
}

/// Takes one backup, prunes old ones, and records the outcome: the audit log, `/metrics`, the log.
pub async fn backup_once(state: &AppState) {
    let started = std::time::Instant::now();
    let event = match crate::backup::take(&state.registry, &state.store).await {
        Ok(manifest) => {
            state.metrics.record_backup(time::OffsetDateTime::now_utc().unix_timestamp());
            tracing::info!(key = %manifest.key, size = manifest.size, events = manifest.events,
                elapsed_ms = started.elapsed().as_millis() as u64, "backed up the registry");
            match crate::backup::prune(&state.store, state.config.backup.keep).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "deleted old registry backups"),
                Err(e) => tracing::error!(error = %e, "could not delete old registry backups"),
            }
            crate::audit::NewEvent::by_server(
                AuditAction::RegistryBackup,
                manifest.key.clone(),
                serde_json::json!({"key": manifest.key, "sha256": manifest.sha256, "size": manifest.size,
                    "events": manifest.events, "head": manifest.head}),
            )
        }
        Err(e) => {
            state.metrics.record_backup_failure();
            let why = crate::error_chain(&e);
            tracing::error!(error = %why, "the registry backup failed");
            crate::audit::NewEvent::by_server(
                AuditAction::RegistryBackupFailed,
                "registry",
                serde_json::json!({"why": why}),
            )
        }
    };
    let writer = Arc::clone(&state.registry);
    if let Err(e) = crate::registry::run(move || writer.append_event(&event)).await {
        tracing::error!(error = %e, "could not record the registry backup in the audit log");
    }
}

/// Checks the whole audit chain for the pages in the background at start (seconds at
/// millions of events), then again every hour from scratch; pages check what was appended
/// since.
async fn watch_chain(state: AppState) {
    let mut interval = tokio::time::interval(CHAIN_RECHECK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if let Err(e) = state.chain.check_all(&state.registry, &state.store).await {
            tracing::error!(error = %e, "checking the audit chain");
        }
    }
}

/// Every route of the server.
pub fn router(state: AppState) -> Router {
    let v1 = artifacts::routes().merge(releases::routes()).merge(audit::routes());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route(&format!("{}/{{digest}}", crate::deploy::fetch::PATH), get(artifacts::node_fetch))
        .nest("/v1", v1)
        .merge(pages::routes())
        // Every route: a small body and a deadline, but the upload (see `limits`).
        .route_layer(middleware::from_fn_with_state(state.clone(), limits::guard))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        // The guard has read every body the extractors see; this only keeps them in step.
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes.0 as usize))
        .layer(middleware::from_fn_with_state(state.clone(), record_refusals))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// Every refused request (401, 403, 408, 409, 413, 422, and 429: a token past its own limit)
/// is recorded in the audit log, bounded ([`crate::refusals`]): who, what, why, from where;
/// and counted in `release_refused_requests_total`. So is a 404 that answered for something
/// outside the token's scope (code `out_of_scope`, with the real reason). Malformed
/// requests (400), missing things (404), wrong methods (405) and the server's own want of room
/// (503 `busy`: send it again later) are neither.
async fn record_refusals(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let what = format!("{} {}", request.method(), request.uri().path());
    let source = source::client(request.extensions(), request.headers(), &state.config.trusted_proxies);
    let slot = request.extensions().get::<auth::ActorSlot>().cloned();
    let response = next.run(request).await;
    let status = response.status();
    let out_of_scope = response.extensions().get::<error::OutOfScope>().map(|o| o.0.clone());
    if !matches!(status.as_u16(), 401 | 403 | 408 | 409 | 413 | 422 | 429) && out_of_scope.is_none() {
        return response;
    }
    let refusal = response.extensions().get::<error::Refusal>();
    let (code, message) = match out_of_scope.clone() {
        Some(why) => (error::OUT_OF_SCOPE, why),
        None => (
            refusal.map_or("unknown", |r| r.code),
            refusal.map_or_else(|| status.canonical_reason().unwrap_or_default().to_owned(), |r| r.message.clone()),
        ),
    };
    state.metrics.record_refusal(status.as_u16(), code);
    let token = slot.and_then(|s| s.who()).map(|(name, owner)| crate::refusals::Token { name, owner });
    let refused = Refused { status: status.as_u16(), code, message, request: what, source, token };
    if out_of_scope.is_some() {
        // Not waited for: this 404 must come as soon as one for something absent does, or the
        // time of an audit write would tell a scoped token what exists outside its scope.
        let refusals = Arc::clone(&state.refusals);
        tokio::spawn(async move { refusals.record(refused).await });
    } else {
        state.refusals.record(refused).await;
    }
    response
}

/// The API reference (OpenAPI 3.1), public like `/healthz`; a test keeps it true to
/// [`routes::ROUTES`] and to the request bodies the handlers accept.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    use axum::response::IntoResponse;
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

/// `GET /metrics`: Prometheus text, for a token with any role and no scope.
async fn metrics(State(state): State<AppState>, Caller(principal): Caller) -> Result<Response, ApiError> {
    let text = state.metrics.scrape(&principal, &state.registry).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// One log line per request: method, path (never the query or headers; cut like a refusal's,
/// so a flood of long paths cannot fill the log either), status, time, caller.
async fn log_request(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = crate::refusals::truncate(request.uri().path(), crate::refusals::MAX_TEXT).into_owned();
    let slot = auth::ActorSlot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    let actor = slot.for_log();
    tracing::info!(
        %method,
        %path,
        status = response.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        %actor,
        "request"
    );
    response
}

pub use listen::{serve, serve_tls};
pub use tls::Tls;

/// Binds `addr`, warning when it serves plain HTTP beyond this machine.
pub async fn bind(addr: std::net::SocketAddr, https: bool) -> Result<TcpListener, ServerError> {
    if !https && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving plain HTTP beyond loopback: put TLS in front (a reverse proxy)");
    }
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr: addr.to_string(), source })
}

/// Runs blocking registry work off the async threads.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    crate::registry::run(f).await.map_err(Into::into)
}
