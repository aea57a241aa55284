//! The release endpoints: deploy, promote, rollback, approve, reject, cancel, show, history,
//! status. Each handler extracts, calls one `Releases` method, answers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::limits::Deadline;
use crate::digest::DigestRef;
use crate::releases::{NodeCheck, Release, RequestOptions, Shown, StatusRow};

const MAX_PAGE: u32 = 500;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/releases", post(deploy).get(history))
        .route("/releases/promote", post(promote))
        .route("/releases/rollback", post(rollback))
        .route("/releases/{id}", get(show))
        .route("/releases/{id}/approve", post(approve))
        .route("/releases/{id}/reject", post(reject))
        .route("/releases/{id}/cancel", post(cancel))
        .route("/status", get(status))
        .route("/services/{service}/check", get(check))
}

type Created = (StatusCode, Json<Release>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    service: String,
    environment: String,
    digest: DigestRef,
    #[serde(default)]
    exclude_nodes: Vec<String>,
    /// Take over an application found at `current` deployed another way.
    #[serde(default)]
    adopt: bool,
    /// Deploy an artifact that lacks migrations the live one has.
    #[serde(default)]
    force: bool,
}

async fn deploy(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiJson(b): ApiJson<DeployBody>,
) -> Result<Created, ApiError> {
    let options = RequestOptions { exclude_nodes: b.exclude_nodes, force: b.force, adopt: b.adopt };
    // The role first: a prefix is resolved only for a caller who may deploy.
    p.require(crate::token::Action::Deploy)?;
    let digest = crate::artifacts::resolve(&state.registry, &p, b.digest).await?;
    let release = state.releases.deploy(&p, &b.service, &b.environment, digest, &options).await?;
    Ok((StatusCode::CREATED, Json(release)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    service: String,
    environment: String,
    from: Option<String>,
    #[serde(default)]
    exclude_nodes: Vec<String>,
    #[serde(default)]
    adopt: bool,
}

async fn promote(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiJson(b): ApiJson<PromoteBody>,
) -> Result<Created, ApiError> {
    let options = RequestOptions { exclude_nodes: b.exclude_nodes, force: false, adopt: b.adopt };
    let release = state.releases.promote(&p, &b.service, &b.environment, b.from.as_deref(), &options).await?;
    Ok((StatusCode::CREATED, Json(release)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    service: String,
    environment: String,
    to: Option<DigestRef>,
    #[serde(default)]
    exclude_nodes: Vec<String>,
    /// Roll back past migrations the target lacks.
    #[serde(default)]
    force: bool,
}

async fn rollback(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiJson(b): ApiJson<RollbackBody>,
) -> Result<Created, ApiError> {
    let options = RequestOptions { exclude_nodes: b.exclude_nodes, force: b.force, adopt: false };
    p.require(crate::token::Action::Rollback)?;
    let to = match b.to {
        Some(reference) => Some(crate::artifacts::resolve(&state.registry, &p, reference).await?),
        None => None,
    };
    let release = state.releases.rollback(&p, &b.service, &b.environment, to, &options).await?;
    Ok((StatusCode::CREATED, Json(release)))
}

async fn approve(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Release>, ApiError> {
    Ok(Json(state.releases.approve(&p, id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectBody {
    reason: String,
}

async fn reject(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<i64>,
    ApiJson(b): ApiJson<RejectBody>,
) -> Result<Json<Release>, ApiError> {
    Ok(Json(state.releases.reject(&p, id, &b.reason).await?))
}

async fn cancel(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Release>, ApiError> {
    Ok(Json(state.releases.cancel(&p, id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowQuery {
    /// How many transitions and node phases the caller has seen: with `wait`, the answer
    /// comes once there are more (or the release is final).
    #[serde(default)]
    seen: usize,
    /// Seconds to wait for a change, at most [`MAX_WAIT`]; without it, the answer is at once.
    wait: Option<u64>,
}

/// The longest a `GET /v1/releases/ID?wait=` holds its answer back.
const MAX_WAIT: u64 = 30;

async fn show(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(q): ApiQuery<ShowQuery>,
    deadline: Option<Extension<Deadline>>,
) -> Result<Json<Shown>, ApiError> {
    Ok(Json(match q.wait {
        Some(wait) => {
            // Answered before the request's deadline (limits.request_timeout), whatever was asked.
            let left = deadline.map_or(std::time::Duration::MAX, |Extension(d)| d.left());
            let wait = std::time::Duration::from_secs(wait.min(MAX_WAIT)).min(left);
            state.releases.show_after(&p, id, q.seen, wait).await?
        }
        None => state.releases.show(&p, id).await?,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    service: Option<String>,
    environment: Option<String>,
    limit: Option<u32>,
    before: Option<i64>,
}

/// A page of `GET /v1/releases`, newest first (the CLI reads it back through this type).
#[derive(Serialize, Deserialize)]
pub struct HistoryAnswer {
    pub releases: Vec<Release>,
    /// Pass as `before` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<i64>,
}

async fn history(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<HistoryAnswer>, ApiError> {
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let (releases, next) = state.releases.history(&p, q.service, q.environment, limit, q.before).await?;
    Ok(Json(HistoryAnswer { releases, next }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    service: Option<String>,
    /// Ask every node what it serves.
    #[serde(default)]
    nodes: bool,
}

async fn status(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiQuery(q): ApiQuery<StatusQuery>,
) -> Result<Json<Vec<StatusRow>>, ApiError> {
    Ok(Json(state.releases.status(&p, q.service, q.nodes).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckQuery {
    /// Required; optional here so that the role is checked before a missing one is named.
    environment: Option<String>,
}

/// `GET /v1/services/{service}/check` (the CLI reads it back through this type).
#[derive(Serialize, Deserialize)]
pub struct CheckAnswer {
    pub service: String,
    pub environment: String,
    /// No node failed a check (warnings allowed).
    pub ok: bool,
    pub nodes: Vec<NodeCheck>,
}

async fn check(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(service): ApiPath<String>,
    ApiQuery(q): ApiQuery<CheckQuery>,
) -> Result<Json<CheckAnswer>, ApiError> {
    p.require(crate::token::Action::Deploy)?;
    let environment = q.environment.ok_or_else(|| ApiError::bad_request("name the environment: ?environment=E"))?;
    let nodes = state.releases.check(&p, &service, &environment).await?;
    let ok = nodes.iter().all(|n| n.checks.iter().all(|c| c.status != crate::releases::CheckStatus::Fail));
    Ok(Json(CheckAnswer { service, environment, ok, nodes }))
}
