//! What every request but an upload gets: a body of at most `limits.max_body_bytes`, read here
//! (so no handler ever buffers more, and a body without `Content-Length` is cut off at the
//! limit), and an answer begun within `limits.request_timeout`. Uploads stream through ingest,
//! which keeps its own limits (`max_upload_bytes`, the upload pace).
//!
//! The handler runs in a task of its own: a timeout, or a client that goes away, never cancels
//! it half-way (between a registry transaction and what must follow it, such as starting the
//! deploy the transaction approved). A request that times out is answered at once; its
//! handler finishes on its own and its answer is dropped.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::time::Instant;

use super::AppState;
use super::error::ApiError;

/// The route whose body is an artifact, streamed through ingest.
const UPLOAD: (Method, &str) = (Method::POST, "/v1/artifacts");

/// When the request's answer must have begun; handlers that wait on purpose (the long-poll)
/// answer before it.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// How long a handler may still wait and answer in time (a second kept for the answer).
    pub fn left(&self) -> std::time::Duration {
        self.0.saturating_duration_since(Instant::now()).saturating_sub(std::time::Duration::from_secs(1))
    }
}

/// The route layer: body limit, then the deadline.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // A route layer, so the router matched this path exactly (it does not normalize paths).
    if (request.method(), request.uri().path()) == (&UPLOAD.0, UPLOAD.1) {
        return next.run(request).await;
    }
    let limits = state.config.limits;
    let deadline = Instant::now() + limits.request_timeout.0;
    let limit = limits.max_body_bytes.0;
    let (mut parts, body) = request.into_parts();
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_large(limit);
    }
    let bytes = match tokio::time::timeout_at(deadline, read(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(Unread::TooLarge)) => return too_large(limit),
        Ok(Err(Unread::Failed(e))) => return ApiError::bad_request(format!("request body: {e}")).into_response(),
        Err(_) => {
            let message =
                format!("the request's body did not arrive within {} (limits.request_timeout)", limits.request_timeout);
            return ApiError::request_timeout(message).into_response();
        }
    };
    parts.extensions.insert(Deadline(deadline));
    let handler = tokio::spawn(next.run(Request::from_parts(parts, Body::from(bytes))));
    match tokio::time::timeout_at(deadline, handler).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Ok(Err(_)) => ApiError::stopping().into_response(),
        Err(_) => {
            tracing::warn!("a request was not answered within limits.request_timeout; it finishes in the background");
            let message = format!(
                "the server did not answer within {} (limits.request_timeout); the request goes on in the \
                 background: look before trying it again",
                limits.request_timeout
            );
            ApiError::timeout(message).into_response()
        }
    }
}

fn too_large(limit: u64) -> Response {
    let message = format!(
        "the request body is larger than {} (limits.max_body_bytes); only uploads may be larger",
        crate::config::ByteSize(limit)
    );
    ApiError::payload_too_large(message).into_response()
}

enum Unread {
    TooLarge,
    Failed(axum::Error),
}

/// The whole body, if it is at most `limit` bytes; stops reading as soon as it is not.
async fn read(body: Body, limit: u64) -> Result<Bytes, Unread> {
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Unread::Failed)?;
        if (buffer.len() + chunk.len()) as u64 > limit {
            return Err(Unread::TooLarge);
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buffer))
}
