//! The artifact endpoints of SPEC 5, exactly as written there.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::range::{self, Ranged};
use super::{AppState, blocking};
use crate::digest::{Digest, DigestRef};
use crate::ingest::{Pace, Piece, UploadRequest};
use crate::model::access::{Action, Principal};
use crate::registry::{Artifact, ArtifactUpload, Block, ListedArtifact, RegistryError};

use crate::digest::HTTP_HEADER as DIGEST_HEADER;
const MAX_PAGE: u32 = 500;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/artifacts", post(upload))
        .route("/artifacts/{digest}", get(show).head(exists))
        .route("/artifacts/{digest}/blob", get(blob))
        .route("/artifacts/{digest}/block", post(block))
        .route("/artifacts/purge", post(purge))
        .route("/services/{service}/artifacts", get(list))
}

#[derive(Deserialize)]
struct UploadQuery {
    service: Option<String>,
    version: Option<String>,
    git_sha: Option<String>,
    build_url: Option<String>,
}

/// The answer to an upload: the artifact's facts and this service's record of it.
#[derive(Serialize, Deserialize)]
pub struct Uploaded {
    #[serde(flatten)]
    pub artifact: Artifact,
    pub service: String,
    pub version: Option<String>,
    pub git_sha: Option<String>,
    pub build_url: Option<String>,
    pub uploaded_by: String,
    pub uploaded_at: crate::utc::Timestamp,
    /// False when the bytes were stored already (the first upload's labels stay).
    pub created: bool,
}

async fn upload(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let service = query.service.ok_or_else(|| ApiError::bad_request("the query parameter `service` is required"))?;
    let expected =
        match headers.get(DIGEST_HEADER) {
            None => None,
            Some(value) => {
                Some(value.to_str().ok().and_then(|v| v.parse::<Digest>().ok()).ok_or_else(|| {
                    ApiError::bad_request("X-Release-Digest must be sha256:<64 lowercase hex digits>")
                })?)
            }
        };
    let declared_size =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let request = UploadRequest {
        service,
        version: query.version,
        git_sha: query.git_sha,
        build_url: query.build_url,
        expected,
        declared_size,
        pace: Some(Pace::of(&state.config.limits)),
    };
    // In its own task, so that a client that goes away mid-body cannot cancel the ingest
    // half-way: it sees the body end in an error and aborts the staging upload itself.
    let ingestor = state.ingestor.clone();
    let recorded = tokio::spawn(async move { ingestor.ingest(&principal, request, pieces(body)).await })
        .await
        .expect("ingest does not panic")?;
    // SPEC 5: 201 for bytes stored now, 200 for bytes stored before (for this service or another).
    let status = if recorded.new_artifact { StatusCode::CREATED } else { StatusCode::OK };
    let upload = recorded.upload;
    let answer = Uploaded {
        artifact: recorded.artifact,
        service: upload.service,
        version: upload.version,
        git_sha: upload.git_sha,
        build_url: upload.build_url,
        uploaded_by: upload.uploaded_by,
        uploaded_at: upload.uploaded_at,
        created: recorded.new_artifact,
    };
    Ok((status, Json(answer)).into_response())
}

/// The body's data frames, then the digest named in its trailers (if any).
fn pieces(body: Body) -> impl futures::Stream<Item = Result<Piece, axum::Error>> + Unpin {
    use futures::StreamExt;
    http_body_util::BodyStream::new(body).filter_map(|frame| {
        futures::future::ready(match frame {
            Err(e) => Some(Err(e)),
            Ok(frame) => match frame.into_data() {
                Ok(data) => Some(Ok(Piece::Bytes(data))),
                Err(frame) => frame.into_trailers().ok().and_then(|trailers| {
                    trailers
                        .get(DIGEST_HEADER)
                        .map(|v| Ok(Piece::Claim(String::from_utf8_lossy(v.as_bytes()).into_owned())))
                }),
            },
        })
    })
}

pub(super) fn parse_digest(text: &str) -> Result<Digest, ApiError> {
    text.parse().map_err(|e: crate::digest::ParseDigestError| ApiError::bad_request(e.to_string()))
}

/// The digest a path names: whole, or a prefix resolved among the artifacts the caller may
/// see ([`crate::artifacts::resolve`]).
pub(super) async fn resolve_path(state: &AppState, principal: &Principal, text: &str) -> Result<Digest, ApiError> {
    let reference: DigestRef =
        text.parse().map_err(|e: crate::digest::ParseDigestRefError| ApiError::bad_request(e.to_string()))?;
    Ok(crate::artifacts::resolve(&state.registry, principal, reference).await?)
}

/// The artifact and the upload records the caller may see ([`crate::artifacts::readable`]).
async fn readable(
    state: &AppState,
    principal: &Principal,
    digest: &str,
) -> Result<(Artifact, Vec<ArtifactUpload>), ApiError> {
    principal.require(Action::Read)?;
    let digest = resolve_path(state, principal, digest).await?;
    let seen = crate::artifacts::readable(&state.registry, principal, digest).await?;
    Ok((seen.artifact, seen.uploads))
}

async fn exists(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiPath(digest): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (artifact, _) = readable(&state, &principal, &digest).await?;
    Ok(([(header::CONTENT_LENGTH, artifact.size.to_string())], StatusCode::OK).into_response())
}

/// `GET /v1/artifacts/{digest}` (the CLI reads it back through this type).
#[derive(Serialize, Deserialize)]
pub struct ArtifactAnswer {
    #[serde(flatten)]
    pub artifact: Artifact,
    pub uploads: Vec<ArtifactUpload>,
    /// Whether the bytes are in the store (false after a purge, until uploaded again).
    pub stored: bool,
    /// An admin's block: never deployable again.
    pub blocked: Option<Block>,
    /// The last purge of its bytes.
    pub purged_at: Option<crate::utc::Timestamp>,
}

async fn show(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiPath(digest): ApiPath<String>,
) -> Result<Json<ArtifactAnswer>, ApiError> {
    let (artifact, uploads) = readable(&state, &principal, &digest).await?;
    let digest = artifact.digest;
    let stored = state.store.artifact_size(digest).await?.is_some();
    let registry = Arc::clone(&state.registry);
    let (blocked, purged_at) =
        blocking(move || Ok::<_, RegistryError>((registry.artifact_block(digest)?, registry.last_purge(digest)?)))
            .await?;
    Ok(Json(ArtifactAnswer { artifact, uploads, stored, blocked, purged_at }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockBody {
    reason: String,
}

async fn block(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiPath(digest): ApiPath<String>,
    ApiJson(body): ApiJson<BlockBody>,
) -> Result<Json<crate::curation::Blocked>, ApiError> {
    let digest = resolve_path(&state, &principal, &digest).await?;
    Ok(Json(crate::curation::block(&state.registry, &state.metrics, &principal, digest, &body.reason).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    /// Must be true: only artifacts never live are ever purged, and the request says so.
    never_live: bool,
    #[serde(deserialize_with = "super::extract::whole_number")]
    older_than_days: u32,
}

async fn purge(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiJson(body): ApiJson<PurgeBody>,
) -> Result<Json<crate::curation::Purged>, ApiError> {
    if !body.never_live {
        return Err(ApiError::bad_request("only artifacts never live can be purged: send never_live = true"));
    }
    Ok(Json(crate::curation::purge(&state.registry, &state.store, &principal, body.older_than_days).await?))
}

async fn blob(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiPath(digest): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (artifact, _) = readable(&state, &principal, &digest).await?;
    ranged_bytes(&state, &artifact, &headers, crate::store::READ_FOR_CLIENTS).await
}

/// `GET /node/artifacts/{digest}?expires=&sig=`: a node fetching an artifact by the signed
/// URL its deploy gave it (no token: the signature names the digest and an expiry). Ranges
/// as for the blob: a node that holds most files fetches only the frames it lacks.
pub async fn node_fetch(
    State(state): State<AppState>,
    ApiPath(digest): ApiPath<String>,
    ApiQuery(q): ApiQuery<FetchQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest = parse_digest(&digest)?;
    crate::deploy::fetch::verify(digest, q.expires, &q.sig, crate::utc::now().unix_timestamp())
        .map_err(|e| ApiError::forbidden(e.to_string()))?;
    let registry = Arc::clone(&state.ingestor.registry);
    let (artifact, block) =
        blocking(move || Ok::<_, RegistryError>((registry.artifact(digest)?, registry.artifact_block(digest)?)))
            .await?;
    let artifact = artifact.ok_or_else(|| ApiError::not_found(format!("no artifact {digest}")))?;
    // A URL handed out before the artifact was blocked opens nothing after.
    if let Some(block) = block {
        return Err(ApiError::blocked(format!("artifact {digest} is blocked: {}", block.reason)));
    }
    ranged_bytes(&state, &artifact, &headers, crate::store::READ_FOR_NODES).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchQuery {
    expires: i64,
    sig: String,
}

/// The artifact's bytes, or the one range its `Range` header asks (206 with its
/// Content-Range; 416 with `Content-Range: bytes */size` when it lies past the end), for
/// every route that serves them, read from a local store in pieces of `read_size`.
async fn ranged_bytes(
    state: &AppState,
    artifact: &Artifact,
    headers: &HeaderMap,
    read_size: usize,
) -> Result<Response, ApiError> {
    let size = artifact.size;
    let requested = range::parse(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), size);
    let (status, range) = match requested {
        Ranged::Whole => (StatusCode::OK, None),
        Ranged::Part(r) => (StatusCode::PARTIAL_CONTENT, Some(r)),
        Ranged::Unsatisfiable => {
            let mut response = ApiError::range_not_satisfiable(size).into_response();
            response.headers_mut().insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}")));
            return Ok(response);
        }
    };
    bytes_of(state, artifact, status, range, read_size).await
}

/// The artifact's bytes (or a range of them) as a streamed response.
async fn bytes_of(
    state: &AppState,
    artifact: &Artifact,
    status: StatusCode,
    range: Option<std::ops::Range<u64>>,
    read_size: usize,
) -> Result<Response, ApiError> {
    let size = artifact.size;
    let stream = match state.store.read_artifact(artifact.digest, range.clone(), read_size).await {
        Err(crate::store::StoreError::NotFound { .. }) => {
            return Err(ApiError::purged(format!(
                "the bytes of {} were purged; upload them again to restore them",
                artifact.digest
            )));
        }
        other => other?,
    };
    let length = range.as_ref().map_or(size, |r| r.end - r.start);
    let mut response = Response::new(Body::from_stream(stream.map_err(std::io::Error::other)));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/zstd"));
    h.insert(header::CONTENT_LENGTH, header_value(&length.to_string()));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, header_value(&format!("\"{}\"", artifact.digest)));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable"));
    if let Some(r) = range {
        h.insert(header::CONTENT_RANGE, header_value(&format!("bytes {}-{}/{size}", r.start, r.end - 1)));
    }
    Ok(response)
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("ASCII header value")
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    before: Option<i64>,
}

/// A page of `GET /v1/services/{service}/artifacts` (the CLI reads it back through this type).
#[derive(Serialize, Deserialize)]
pub struct ListAnswer {
    pub service: String,
    pub artifacts: Vec<ListedArtifact>,
    /// Pass as `before` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    Caller(principal): Caller,
    ApiPath(service): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<ListAnswer>, ApiError> {
    let limit = query.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    let artifacts = crate::artifacts::of_service(&state.registry, &principal, &service, limit, query.before).await?;
    let next = (artifacts.len() == limit as usize).then(|| artifacts.last().map(|a| a.cursor)).flatten();
    Ok(Json(ListAnswer { service, artifacts, next }))
}
