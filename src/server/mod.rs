//! The HTTP server: state, routes, request logging and graceful serving.
//!
//! `router(state)` is separate from `serve(listener, router, shutdown)` so tests can drive the
//! router in-process or on a real port-0 socket. Handlers stay thin: extract, authenticate
//! (through the [`auth::Caller`] extractor), call one domain function, answer.

mod artifacts;
mod auth;
mod error;
mod range;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tokio::net::TcpListener;

pub use error::ApiError;

use crate::config::{Config, StorageConfig};
use crate::ingest::Ingestor;
use crate::registry::{Registry, RegistryError};
use crate::store::{Store, StoreError};

/// How old a staging upload of an S3 store must be before the start-up sweep removes it
/// (a shared bucket may hold another server's upload in progress; a local store is ours alone).
const S3_UPLOAD_SWEEP_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("another release server is using the data directory {0} (it holds {0}/lock)")]
    Locked(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server.tls_cert: serving HTTPS directly is not implemented yet; terminate TLS in a reverse proxy")]
    TlsUnsupported,
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub ingestor: Ingestor,
}

/// What `release serve` holds while it runs: the state and the data directory's lock.
pub struct Opened {
    pub state: AppState,
    _lock: std::fs::File,
}

impl Opened {
    /// Locks the data directory, opens the registry and the store, and sweeps stale uploads.
    pub async fn open(config: Config) -> Result<Opened, ServerError> {
        if config.tls.is_some() {
            return Err(ServerError::TlsUnsupported);
        }
        let lock = lock_data_dir(&config.data_dir)?;
        let registry_path = config.registry_path();
        let registry = tokio::task::spawn_blocking(move || Registry::open(&registry_path))
            .await
            .expect("opening the registry does not panic")?;
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
        let ingestor = Ingestor::new(Arc::new(config), store, Arc::new(registry));
        Ok(Opened { state: AppState { ingestor }, _lock: lock })
    }
}

/// Takes `<data_dir>/lock` (flock, released when the process ends, even by a crash).
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, ServerError> {
    use std::os::fd::AsRawFd;
    let err = |source| ServerError::DataDir { path: dir.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(err)?;
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock")).map_err(err)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ServerError::Locked(dir.display().to_string()));
    }
    Ok(file)
}

/// Every route of the server.
pub fn router(state: AppState) -> Router {
    let v1 = artifacts::routes();
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
        })
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

/// One log line per request: method, path (never the query or headers), status, time, caller.
async fn log_request(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let slot = auth::ActorSlot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    let actor = slot.0.lock().expect("actor slot").take().unwrap_or_else(|| "-".into());
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

/// Serves `router` on `listener` until `shutdown` completes, then finishes the requests in
/// flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// Binds `addr`, warning when it is not loopback (plain HTTP beyond this machine).
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ServerError> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving plain HTTP beyond loopback: put TLS in front (a reverse proxy)");
    }
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr: addr.to_string(), source })
}

/// `Query`, answering a malformed query string with the JSON error document.
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// `Path`, answering a malformed path parameter with the JSON error document.
pub struct ApiPath<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Runs blocking registry work off the async threads.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: Into<ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.expect("blocking task does not panic").map_err(Into::into)
}
