//! Who is looking at a page: a person signed in with a token (a session cookie), or a script
//! sending the bearer header. Signing in and out.

use std::sync::Arc;

use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use rand::RngExt as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::render;
use crate::model::audit::AuditAction;
use crate::refusals::{Refused, Token};
use crate::server::AppState;
use crate::server::auth::{self, ActorSlot};
use crate::server::error::ApiError;
use crate::server::source;
use crate::token::{self, Action, Principal, TokenError};
use crate::utc;

/// The session cookie's name.
const COOKIE: &str = "release_session";
/// How long a session lasts (never longer than its token).
pub const SESSION_TTL: time::Duration = time::Duration::hours(8);
/// Sign-ins one token may make in [`LOGIN_WINDOW`]: each writes a session row and an audit
/// event, so a token that signs in again and again would otherwise grow the registry (and the
/// log, which is never shortened) as fast as the disk syncs.
pub const LOGINS_PER_WINDOW: usize = 20;
pub const LOGIN_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

/// The sign-ins of each token within the last [`LOGIN_WINDOW`].
#[derive(Default)]
pub struct LoginPace(std::sync::Mutex<std::collections::HashMap<String, Vec<std::time::Instant>>>);

impl LoginPace {
    /// Counts a sign-in of `token`, or says how long until it may sign in again.
    fn admit(&self, token: &str) -> Result<(), std::time::Duration> {
        let mut seen = self.0.lock().expect("never poisoned");
        seen.retain(|_, at| {
            at.retain(|t| t.elapsed() < LOGIN_WINDOW);
            !at.is_empty()
        });
        let at = seen.entry(token.to_owned()).or_default();
        if at.len() >= LOGINS_PER_WINDOW {
            return Err(LOGIN_WINDOW.saturating_sub(at[0].elapsed()));
        }
        at.push(std::time::Instant::now());
        Ok(())
    }
}

/// The person (or script) looking at a page: authenticated, with the auditor role (or admin).
pub struct Viewer(pub Principal);

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let slot = parts.extensions.get::<ActorSlot>().cloned().unwrap_or_default();
        let registry = Arc::clone(&state.registry);
        let principal = if let Some(token) = auth::bearer(&parts.headers) {
            match auth::authenticate(state, token).await {
                Ok(p) => p,
                Err(e) => {
                    slot.refused(&e);
                    return Err(render::refused(e.into()));
                }
            }
        } else {
            let Some(id) = cookie(&parts.headers) else { return Err(to_login(parts)) };
            let hash = session_hash(&id);
            let found = crate::registry::run(move || {
                let session = registry.session(&hash)?;
                Ok::<_, TokenError>(match session {
                    Some(s) => Some(token::authenticate_by_id(&registry, &s.token_id)),
                    None => None,
                })
            })
            .await;
            match found {
                Ok(Some(Ok(p))) => p,
                // The session ended or expired: sign in again.
                Ok(None) => return Err(to_login(parts)),
                // Its token was revoked or expired: a refused attempt, on record, then sign in.
                Ok(Some(Err(e))) => {
                    let token = match &e {
                        TokenError::Revoked { name, owner } | TokenError::Expired { name, owner, .. } => {
                            Some(Token { name: name.clone(), owner: owner.clone() })
                        }
                        _ => None,
                    };
                    let refused = Refused {
                        status: 303,
                        code: "session_token_refused",
                        message: e.to_string(),
                        request: format!("{} {}", parts.method, parts.uri.path()),
                        source: source::client(&parts.extensions, &parts.headers, &state.config.trusted_proxies),
                        token,
                    };
                    state.refusals.record(refused).await;
                    return Err(to_login(parts));
                }
                Err(e) => return Err(render::refused(e.into())),
            }
        };
        slot.caller(&principal);
        if let Err(e) = principal.require(Action::ReadAudit) {
            return Err(render::refused(e.into()));
        }
        Ok(Viewer(principal))
    }
}

/// To the sign-in page, coming back here afterwards.
fn to_login(parts: &Parts) -> Response {
    let next = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let query = serde_urlencoded_pair("next", next);
    Redirect::to(&format!("/login?{query}")).into_response()
}

fn serde_urlencoded_pair(key: &str, value: &str) -> String {
    let mut out = format!("{key}=");
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The session id from the request's cookies.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn session_hash(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// Where to go after signing in: only a path on this server — visible ASCII only (browsers
/// drop tabs and line breaks, so `/<TAB>/evil` would become `//evil`), never `//` or `/\`.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.bytes().all(|b| (0x21..=0x7e).contains(&b)) =>
        {
            n.to_owned()
        }
        _ => "/".into(),
    }
}

/// A sign-in or sign-out posted by another site (login CSRF) is refused: browsers say where
/// a form came from in `Sec-Fetch-Site` and `Origin`.
fn cross_site(headers: &HeaderMap) -> bool {
    // Browsers that send Sec-Fetch-Site are believed; others are judged by Origin.
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return matches!(site, "cross-site" | "same-site");
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (Some("null") | None, _) => false,
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, h)| h) != Some(host),
        (Some(_), None) => true,
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

pub async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    render::login(&safe_next(q.next.as_deref()), None)
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Checks the token (auditor role, or admin), opens a session and sets its cookie:
/// HttpOnly, SameSite=Strict, Secure when the request came over HTTPS (a proxy says so).
pub async fn login(State(state): State<AppState>, parts: Parts, Form(form): Form<LoginForm>) -> Response {
    let next = safe_next(form.next.as_deref());
    if cross_site(&parts.headers) {
        return render::refused(ApiError::cross_site("a sign-in posted by another site is refused"));
    }
    let slot = parts.extensions.get::<ActorSlot>().cloned().unwrap_or_default();
    let registry = Arc::clone(&state.registry);
    let token = form.token.trim().to_owned();
    let authenticated = crate::registry::run(move || {
        let principal = token::authenticate(&registry, &token)?;
        let id = token::Presented::parse(&token)?.id.to_owned();
        Ok::<_, TokenError>((principal, id))
    })
    .await;
    let (principal, token_id) = match authenticated {
        Ok(found) => found,
        Err(e) => {
            slot.refused(&e);
            return render::login(&next, Some(e.into()));
        }
    };
    slot.caller(&principal);
    if let Err(e) = principal.require(Action::ReadAudit) {
        return render::login(&next, Some(e.into()));
    }
    if let Err(wait) = state.logins.admit(&principal.name) {
        let message = format!(
            "this token signed in {LOGINS_PER_WINDOW} times within the last hour; use the session you have, \
             or try again in {} minutes",
            wait.as_secs() / 60 + 1
        );
        return render::login(&next, Some(ApiError::rate_limited(message, wait)));
    }
    let id = hex::encode(rand::rng().random::<[u8; 32]>());
    let expires = utc::Timestamp::at(utc::now() + SESSION_TTL);
    let (registry, hash) = (Arc::clone(&state.registry), session_hash(&id));
    let event = crate::audit::NewEvent::by(
        &principal,
        AuditAction::WebLogin,
        format!("token/{}", principal.name),
        serde_json::json!({"expires_at": expires}),
    );
    let opened = crate::registry::run(move || registry.open_session(&hash, &token_id, &expires, &event)).await;
    if let Err(e) = opened {
        return render::refused(e.into());
    }
    let secure = https(&parts.headers);
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.whole_seconds(),
        if secure { "; Secure" } else { "" }
    );
    let mut response = Redirect::to(&next).into_response();
    response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&cookie).expect("cookie is ASCII"));
    response
}

/// Ends the session (if any) and clears the cookie.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if cross_site(&headers) {
        return render::refused(ApiError::cross_site("a sign-out posted by another site is refused"));
    }
    if let Some(id) = cookie(&headers) {
        let (registry, hash) = (Arc::clone(&state.registry), session_hash(&id));
        let ended = crate::registry::run(move || {
            registry.end_session(&hash, |name, owner| crate::audit::NewEvent {
                actor: name.to_owned(),
                owner: owner.to_owned(),
                action: AuditAction::WebLogout,
                subject: format!("token/{name}"),
                details: serde_json::json!({}),
            })
        })
        .await;
        if let Err(e) = ended {
            tracing::error!(error = %e, "could not end a session");
        }
    }
    let mut response = Redirect::to("/login").into_response();
    let clear = format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if https(&headers) { "; Secure" } else { "" }
    );
    response.headers_mut().insert(header::SET_COOKIE, HeaderValue::from_str(&clear).expect("ASCII"));
    response
}

/// Whether the browser talks HTTPS to us: TLS is terminated by a proxy, which says so.
fn https(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("https"))
}
