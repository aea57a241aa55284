//! The web pages for people (SPEC 6): server-rendered HTML that works without JavaScript,
//! read-only, behind the same tokens (auditor role, or admin). `/` is what is live where;
//! then a service's timeline, a release, an artifact, and the audit log with its chain's state
//! and exports. A person signs in at `/login` (a session cookie); scripts may send the bearer
//! header. Every answer carries a strict Content-Security-Policy.

mod render;
mod session;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use crate::audit::Event;
use crate::registry::AuditFilter;
use crate::utc;
pub use session::LoginPace;
use session::Viewer;

/// Releases per timeline page, events per audit page.
const PAGE: u32 = 50;
/// Events per registry read while streaming an export.
const EXPORT_PAGE: u64 = 1_000;
/// How many stays live an artifact page lists.
const SPELLS: u32 = 200;

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(matrix))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/services/{service}", get(timeline))
        .route("/releases/{id}", get(release))
        .route("/artifacts/{digest}", get(artifact))
        .route("/audit", get(audit))
        .route("/audit/export.jsonl", get(export_jsonl))
        .route("/audit/export.csv", get(export_csv))
        .route("/static/style.css", get(style))
        .layer(middleware::from_fn(security_headers))
}

/// CSP and friends on every page; pages are never cached (they show live state and who is
/// signed in).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

/// A failure while building a page, shown as a page.
struct PageError(ApiError);

impl<E: Into<ApiError>> From<E> for PageError {
    fn from(e: E) -> PageError {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        render::refused(self.0)
    }
}

fn html(markup: maud::Markup) -> Response {
    Html(markup.into_string()).into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        include_str!("style.css"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct MatrixQuery {
    nodes: Option<String>,
}

async fn matrix(
    State(state): State<AppState>,
    Viewer(p): Viewer,
    Query(q): Query<MatrixQuery>,
) -> Result<Response, PageError> {
    let nodes = q.nodes.is_some_and(|n| n == "1" || n == "true");
    let rows = state.releases.status(&p, None, nodes).await?;
    Ok(html(render::matrix(&p, &rows, nodes)))
}

#[derive(Deserialize)]
struct TimelineQuery {
    env: Option<String>,
    before: Option<i64>,
}

async fn timeline(
    State(state): State<AppState>,
    Viewer(p): Viewer,
    Path(service): Path<String>,
    Query(q): Query<TimelineQuery>,
) -> Result<Response, PageError> {
    let env = q.env.filter(|e| !e.is_empty());
    let (releases, next) = state.releases.history(&p, Some(service.clone()), env.clone(), PAGE, q.before).await?;
    let ids: Vec<i64> = releases.iter().map(|r| r.id).collect();
    let registry = Arc::clone(&state.registry);
    let (deciders, ended) = crate::registry::run(move || {
        Ok::<_, crate::registry::RegistryError>((registry.deciders(&ids)?, registry.outcomes_at(&ids)?))
    })
    .await?;
    let environments: Vec<String> =
        state.config.environments.iter().map(|e| e.name.clone()).filter(|e| p.require_environment(e).is_ok()).collect();
    Ok(html(render::timeline(&p, &service, env.as_deref(), &environments, &releases, &deciders, &ended, next)))
}

async fn release(State(state): State<AppState>, Viewer(p): Viewer, Path(id): Path<i64>) -> Result<Response, PageError> {
    // A token limited to some services learns nothing of others' releases, not even that they
    // exist: `show` answers as for a release that does not.
    let shown = state.releases.show(&p, id).await?;
    let (registry, digest, service) =
        (Arc::clone(&state.registry), shown.detail.release.digest, shown.detail.release.service.clone());
    let (artifact, uploads) = crate::registry::run(move || {
        Ok::<_, crate::registry::RegistryError>((registry.artifact(digest)?, registry.artifact_uploads(digest)?))
    })
    .await?;
    let upload = uploads.iter().find(|u| u.service == service);
    Ok(html(render::release(&p, &shown, artifact.as_ref(), upload)))
}

async fn artifact(
    State(state): State<AppState>,
    Viewer(p): Viewer,
    Path(digest): Path<String>,
) -> Result<Response, PageError> {
    let digest = super::artifacts::resolve_path(&state, &p, &digest).await?;
    let registry = Arc::clone(&state.registry);
    let (services, environments) = (p.services.clone(), p.environments.clone());
    let found = crate::registry::run(move || {
        Ok::<_, crate::registry::RegistryError>((
            registry.artifact(digest)?,
            registry.artifact_uploads(digest)?,
            registry.live_spells(digest, services.as_deref(), environments.as_deref(), SPELLS)?,
            registry.artifact_block(digest)?,
        ))
    })
    .await?;
    let (Some(artifact), uploads, spells, block) = found else {
        return Err(crate::artifacts::absent(&p, digest).into());
    };
    // The API's scope rule: through the token's services only, else as if absent.
    let uploads = crate::artifacts::seen_uploads(&p, digest, uploads)?;
    Ok(html(render::artifact(&p, &artifact, &uploads, &spells, block.as_ref().map(|b| b.reason.as_str()))))
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    service: Option<String>,
    from: Option<String>,
    until: Option<String>,
    before: Option<u64>,
}

impl AuditQuery {
    /// The registry's filter (times normalized to the stored form), and the query string that
    /// selects the same events (for the next page and the export links).
    fn filter(&self) -> Result<(AuditFilter, String), ApiError> {
        let given = |v: &Option<String>| v.as_ref().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let time = |name: &str, v: &Option<String>| -> Result<Option<utc::Timestamp>, ApiError> {
            given(v)
                .map(|t| {
                    utc::parse(&t)
                        .map(utc::Timestamp::at)
                        .map_err(|e| ApiError::bad_request(format!("{name}: {t:?} is not an RFC 3339 time ({e})")))
                })
                .transpose()
        };
        let filter = AuditFilter {
            actor: given(&self.actor),
            action: given(&self.action),
            service: given(&self.service),
            from: time("from", &self.from)?,
            until: time("until", &self.until)?,
            before: self.before,
        };
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in [
            ("actor", given(&self.actor)),
            ("action", given(&self.action)),
            ("service", given(&self.service)),
            ("from", given(&self.from)),
            ("until", given(&self.until)),
        ] {
            if let Some(value) = value {
                query.append_pair(key, &value);
            }
        }
        Ok((filter, query.finish()))
    }
}

async fn audit(
    State(state): State<AppState>,
    Viewer(p): Viewer,
    Query(q): Query<AuditQuery>,
) -> Result<Response, PageError> {
    p.require_unscoped("the audit log")?;
    let (filter, query) = q.filter()?;
    let chain = match state.chain.check(&state.registry, &state.store).await {
        Ok(view) => view,
        Err(e) => {
            tracing::error!(error = %e, "checking the audit chain for the audit page");
            None
        }
    };
    let registry = Arc::clone(&state.registry);
    let f = filter.clone();
    let events = crate::registry::run(move || registry.audit_page(&f, PAGE as u64 + 1)).await?;
    let (events, next) = page_of(events);
    Ok(html(render::audit(&p, chain.as_ref(), &filter, &query, &events, next)))
}

/// The first `PAGE` events, and the cursor of the next page if there is one.
fn page_of(mut events: Vec<Event>) -> (Vec<Event>, Option<u64>) {
    if events.len() > PAGE as usize {
        events.truncate(PAGE as usize);
        let next = events.last().map(|e| e.seq);
        (events, next)
    } else {
        (events, None)
    }
}

async fn export_jsonl(
    State(state): State<AppState>,
    Viewer(p): Viewer,
    Query(q): Query<AuditQuery>,
) -> Result<Response, PageError> {
    p.require_unscoped("the audit log")?;
    let (filter, _) = q.filter()?;
    Ok(export(state, filter, "application/x-ndjson", "audit.jsonl", b"", |event, out| {
        serde_json::to_writer(&mut *out, event).expect("events serialize");
        out.push(b'\n');
    }))
}

async fn export_csv(
    State(state): State<AppState>,
    Viewer(p): Viewer,
    Query(q): Query<AuditQuery>,
) -> Result<Response, PageError> {
    p.require_unscoped("the audit log")?;
    let (filter, _) = q.filter()?;
    let header = b"seq,at,actor,owner,action,subject,details,prev_hash,hash\r\n";
    Ok(export(state, filter, "text/csv; charset=utf-8", "audit.csv", header, |event, out| {
        let fields = [
            event.seq.to_string(),
            event.at.to_string(),
            event.actor.clone(),
            event.owner.clone(),
            event.action.clone(),
            event.subject.clone(),
            event.details.clone(),
            hex::encode(event.prev_hash),
            hex::encode(event.hash),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.extend_from_slice(line.join(",").as_bytes());
        out.extend_from_slice(b"\r\n");
    }))
}

/// RFC 4180: quoted when it holds a comma, quote or line break; quotes doubled. A leading
/// `=`, `+`, `-`, `@`, tab or carriage return is prefixed with `'` so a spreadsheet never runs it as a formula.
fn csv_field(field: &str) -> String {
    let field =
        if field.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{field}") } else { field.to_owned() };
    if field.contains([',', '"', '\r', '\n']) { format!("\"{}\"", field.replace('"', "\"\"")) } else { field }
}

/// Streams the events `filter` selects, newest first, page by page from the registry (a page
/// read only once the client took the one before: [`super::audit::paged`]).
fn export(
    state: AppState,
    filter: AuditFilter,
    content_type: &'static str,
    file_name: &'static str,
    header: &'static [u8],
    write: impl Fn(&Event, &mut Vec<u8>) + Send + Sync + 'static,
) -> Response {
    let registry = Arc::clone(&state.registry);
    let body = super::audit::paged((true, filter), move |(first, mut filter)| {
        let page = registry.audit_page(&filter, EXPORT_PAGE)?;
        let mut out = Vec::with_capacity(page.len() * 300 + header.len());
        if first {
            out.extend_from_slice(header);
        }
        for event in &page {
            write(event, &mut out);
        }
        filter.before = page.last().map(|e| e.seq);
        Ok((out, (page.len() as u64 == EXPORT_PAGE).then_some((false, filter))))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{file_name}\"")),
        ],
        body,
    )
        .into_response()
}
