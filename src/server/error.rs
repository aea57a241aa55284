//! The one place that turns domain errors into HTTP: status, error code and the message the
//! client may see, for the API (a JSON body) and the web pages alike (an HTML body the pages
//! render, [`ApiError::into_page`]). Internal details are logged, not sent.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Html;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::artifacts::ArtifactError;
use crate::audit::AuditError;
use crate::ingest::IngestError;
use crate::model::access::Denied;
use crate::registry::RegistryError;
use crate::releases::ReleaseError;
use crate::store::StoreError;
use crate::token::TokenError;

/// An error answer: `{"error": {"code": "...", "message": "..."}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a `Retry-After` header (429).
    retry_after: Option<u64>,
    /// `Connection: close`: the request's body may be left unread.
    close: bool,
    /// Set when this 404 answers for something outside the caller's scope: why, for the audit
    /// log only (the client is told exactly what it would be told of something absent).
    pub out_of_scope: Option<String>,
}

impl ApiError {
    /// Every refusal's status is chosen in this file: handlers and middleware use the named
    /// constructors below, or a domain error's `From`.
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None, close: false, out_of_scope: None }
    }

    /// The connection is closed after this answer (what is left of the request's body is
    /// not read).
    pub fn closing(self) -> ApiError {
        ApiError { close: true, ..self }
    }

    /// 429 `rate_limited`, with `Retry-After` (whole seconds, at least 1).
    pub fn rate_limited(message: impl Into<String>, retry_after: std::time::Duration) -> ApiError {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(retry_after)
    }

    /// 503 `busy`: the server has no room for this now, with `Retry-After`.
    pub fn busy(message: impl Into<String>, retry_after: std::time::Duration) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", message).retry_after(retry_after)
    }

    /// With `Retry-After` (whole seconds, at least 1).
    fn retry_after(self, after: std::time::Duration) -> ApiError {
        let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        ApiError { retry_after: Some(seconds.max(1)), ..self }
    }

    /// A 404 for something the caller may not see, worded as for something absent; `why`
    /// reaches the audit log only.
    pub fn out_of_scope(message: impl Into<String>, why: impl std::fmt::Display) -> ApiError {
        ApiError { out_of_scope: Some(why.to_string()), ..ApiError::not_found(message) }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 403: a sign-in or sign-out form posted by another site (login CSRF).
    pub fn cross_site(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "cross_site", message)
    }

    /// 416: a `Range` outside the artifact's `size` bytes (the handler adds `Content-Range`).
    pub fn range_not_satisfiable(size: u64) -> ApiError {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
            format!("the artifact has {size} bytes"),
        )
    }

    /// 409: the artifact is blocked; nothing opens it.
    pub fn blocked(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "blocked", message)
    }

    /// 410: the artifact's bytes were purged (its record stays).
    pub fn purged(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::GONE, "purged", message)
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed here")
    }

    /// 408: the request's body did not come in time (the connection is closed).
    pub fn request_timeout(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message).closing()
    }

    /// 503: the answer did not come within `limits.request_timeout`.
    pub fn timeout(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", message)
    }

    /// 503: the server is stopping.
    pub fn stopping() -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the server is stopping")
    }

    /// 413: a body over its limit (the connection is closed: the rest is not read).
    pub fn payload_too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message).closing()
    }

    fn internal(what: &str, error: &dyn std::error::Error) -> ApiError {
        tracing::error!(error = %error, "{what}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{what}; see the server log"))
    }
}

/// What a refusal said, left on the response for the audit middleware.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

/// The code under which a 404 for something outside the caller's scope is recorded (audit log
/// and metrics); the client sees `not_found`.
pub const OUT_OF_SCOPE: &str = "out_of_scope";

/// Left on a 404 that answered for something outside the caller's scope: the real reason, for
/// the audit middleware (the answer itself says nothing of it).
#[derive(Clone, Debug)]
pub struct OutOfScope(pub String);

impl ApiError {
    /// This refusal as a web page: its status, the HTML `body` renders of it, and the marks
    /// the API's answer carries for the audit middleware (and `Retry-After`).
    pub fn into_page(self, body: impl FnOnce(&ApiError) -> String) -> Response {
        let mut response = (self.status, Html(body(&self))).into_response();
        self.mark(&mut response);
        response
    }

    /// What the audit middleware reads off a refusal ([`Refusal`], [`OutOfScope`]), and
    /// `Retry-After`.
    fn mark(self, response: &mut Response) {
        response.extensions_mut().insert(Refusal { code: self.code, message: self.message });
        if let Some(why) = self.out_of_scope {
            response.extensions_mut().insert(OutOfScope(why));
        }
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, close) = (self.status, self.close);
        let mut response =
            (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response();
        self.mark(&mut response);
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> ApiError {
        match e {
            TokenError::Missing
            | TokenError::Unknown
            | TokenError::Malformed
            | TokenError::Revoked { .. }
            | TokenError::Expired { .. } => ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string()),
            TokenError::Denied(e) => e.into(),
            TokenError::Registry(e) => e.into(),
            TokenError::UnknownRole(_)
            | TokenError::NoRoles
            | TokenError::BadName(_)
            | TokenError::BadScope { .. }
            | TokenError::BadOwner(_)
            | TokenError::OwnerRequired { .. }
            | TokenError::BadExpiry => ApiError::bad_request(e.to_string()),
        }
    }
}

impl From<ArtifactError> for ApiError {
    fn from(e: ArtifactError) -> ApiError {
        match e {
            ArtifactError::Absent(message) => ApiError::not_found(message),
            ArtifactError::OutOfScope { message, why } => ApiError::out_of_scope(message, why),
            ArtifactError::Denied(e) => e.into(),
            ArtifactError::Registry(e) => e.into(),
        }
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::NoDigest(_) => ApiError::not_found(e.to_string()),
            RegistryError::AmbiguousDigest { .. } => {
                ApiError::new(StatusCode::CONFLICT, "ambiguous_digest", e.to_string())
            }
            e => ApiError::internal("registry error", &e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
            e => {
                tracing::error!(error = %e, "artifact store error");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "storage_unavailable",
                    "the artifact store failed; see the server log",
                )
            }
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> ApiError {
        let message = e.to_string();
        match e {
            IngestError::BadRequest(_) => ApiError::bad_request(message),
            IngestError::Forbidden(e) => e.into(),
            IngestError::DigestMismatch { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "digest_mismatch", message)
            }
            IngestError::Unsafe(a) if a.is_limit() => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "archive_too_large", message)
            }
            IngestError::Unsafe(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unsafe_archive", message),
            IngestError::TooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large", message),
            IngestError::Interrupted(_) => ApiError::new(StatusCode::BAD_REQUEST, "upload_interrupted", message),
            IngestError::Stalled(_) | IngestError::TooSlow { .. } => {
                ApiError::new(StatusCode::REQUEST_TIMEOUT, "upload_too_slow", message).closing()
            }
            // Answered before a byte of the body is read: the connection goes with the answer.
            IngestError::TokenBusy { .. } => ApiError::rate_limited(message, UPLOAD_RETRY_AFTER).closing(),
            IngestError::NoTurn(_) | IngestError::TooManyWaiting { .. } => {
                ApiError::busy(message, UPLOAD_RETRY_AFTER).closing()
            }
            // Answered while the body is still coming: the connection goes with the answer.
            IngestError::Preempted => ApiError::busy(message, UPLOAD_RETRY_AFTER).closing(),
            // The body was read: only the record moved under it.
            IngestError::Overtaken => ApiError::busy(message, UPLOAD_RETRY_AFTER),
            IngestError::Store(e) => e.into(),
            IngestError::Registry(e) => e.into(),
        }
    }
}

/// When to send an upload again that got no turn (`release upload` does).
const UPLOAD_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

impl From<ReleaseError> for ApiError {
    fn from(e: ReleaseError) -> ApiError {
        let message = e.to_string();
        let conflict = |code| ApiError::new(StatusCode::CONFLICT, code, message.clone());
        match e {
            ReleaseError::NotConfigured { .. }
            | ReleaseError::NotConfiguredAmong { .. }
            | ReleaseError::UnknownArtifact { .. }
            | ReleaseError::NotFound(_)
            | ReleaseError::Unknown { .. } => ApiError::not_found(message),
            ReleaseError::Unseen { why: None, .. } => ApiError::not_found(message),
            ReleaseError::Unseen { why: Some(why), .. } => ApiError::out_of_scope(message, why),
            ReleaseError::Forbidden(e) => e.into(),
            ReleaseError::Conflict(_) => conflict("conflict"),
            ReleaseError::Recovering(_) => conflict("recovering"),
            ReleaseError::SelfApproval { .. } => conflict("self_approval"),
            ReleaseError::NotPromotable { .. } => conflict("not_promotable"),
            ReleaseError::NothingLive { .. } => conflict("nothing_live"),
            ReleaseError::NoNodes { .. } => conflict("no_nodes"),
            ReleaseError::SharedPathInArtifact { .. } => conflict("shared_path_in_artifact"),
            ReleaseError::NoRollbackTarget { .. } => conflict("no_rollback_target"),
            ReleaseError::NotLiveBefore { .. } => conflict("not_live_before"),
            ReleaseError::InvalidState { .. } => conflict("invalid_state"),
            ReleaseError::Expired { .. } => conflict("expired"),
            ReleaseError::BadRequest(_) => ApiError::bad_request(message),
            ReleaseError::Blocked { .. } => conflict("blocked"),
            ReleaseError::Purged { .. } => conflict("purged"),
            ReleaseError::MigrationsAhead { .. } => conflict("migrations_ahead"),
            ReleaseError::Store(e) => e.into(),
            ReleaseError::Registry(e) => e.into(),
        }
    }
}

impl From<crate::curation::CurationError> for ApiError {
    fn from(e: crate::curation::CurationError) -> ApiError {
        use crate::curation::CurationError as C;
        match e {
            C::Forbidden(e) => e.into(),
            C::BadRequest(m) => ApiError::bad_request(m),
            C::Registry(RegistryError::ArtifactNotFound(d)) => ApiError::not_found(format!("no artifact {d}")),
            C::Registry(e @ RegistryError::ArtifactBlocked { .. }) => {
                ApiError::new(StatusCode::CONFLICT, "blocked", format!("{e} (blocked already)"))
            }
            C::Registry(e) => e.into(),
            C::Store(e) => e.into(),
        }
    }
}

impl From<crate::metrics::MetricsError> for ApiError {
    fn from(e: crate::metrics::MetricsError) -> ApiError {
        use crate::metrics::MetricsError as M;
        match e {
            M::Forbidden(e) => e.into(),
            e @ M::Scoped { .. } => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            M::Registry(e) => e.into(),
        }
    }
}

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> ApiError {
        match e {
            AuditError::Registry(e) => e.into(),
            AuditError::Store(e) => e.into(),
            e @ (AuditError::BadCheckpoint { .. } | AuditError::Diverged(_)) => {
                ApiError::internal("the bucket's audit checkpoint is unreadable", &e)
            }
        }
    }
}
