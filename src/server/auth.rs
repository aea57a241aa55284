//! Bearer-token authentication as an axum extractor, so a handler cannot forget it.

use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::token::{self, Principal, TokenError};

/// The caller of a `/v1` request, authenticated. Taking it as an argument is what makes a
/// handler require a valid token.
pub struct Caller(pub Principal);

/// Where the request log line and the refusal audit find the caller (set by [`Caller`]).
#[derive(Clone, Default)]
pub struct ActorSlot(Arc<Mutex<Option<Seen>>>);

#[derive(Clone)]
enum Seen {
    Caller {
        name: String,
        owner: String,
    },
    /// Refused; the token's name and owner when it was a real one (revoked, expired).
    Refused {
        why: String,
        token: Option<(String, String)>,
    },
}

impl ActorSlot {
    /// Records the authenticated caller (for extractors other than [`Caller`]).
    pub fn caller(&self, principal: &Principal) {
        *self.0.lock().expect("actor slot") =
            Some(Seen::Caller { name: principal.name.clone(), owner: principal.owner.clone() });
    }

    /// Records a refusal, naming a real token's owner when it was one (revoked, expired,
    /// or without the role).
    pub fn refused(&self, e: &TokenError) {
        let token = match e {
            TokenError::Revoked { name, owner } | TokenError::Expired { name, owner, .. } => {
                Some((name.clone(), owner.clone()))
            }
            _ => None,
        };
        *self.0.lock().expect("actor slot") = Some(Seen::Refused { why: e.to_string(), token });
    }

    /// For the log line: the token's name, or why it was refused.
    pub fn for_log(&self) -> String {
        match &*self.0.lock().expect("actor slot") {
            Some(Seen::Caller { name, .. }) => name.clone(),
            Some(Seen::Refused { why, .. }) => format!("(refused: {why})"),
            None => "-".into(),
        }
    }

    /// The token's name and owner: of the caller, or of a real token that was refused.
    pub fn who(&self) -> Option<(String, String)> {
        match &*self.0.lock().expect("actor slot") {
            Some(Seen::Caller { name, owner }) => Some((name.clone(), owner.clone())),
            Some(Seen::Refused { token, .. }) => token.clone(),
            None => None,
        }
    }
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
}

/// Checks a presented token against the registry (off the async threads).
pub async fn authenticate(state: &AppState, token: String) -> Result<Principal, TokenError> {
    let registry = Arc::clone(&state.registry);
    crate::registry::run(move || token::authenticate(&registry, &token)).await
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let result = match bearer(&parts.headers) {
            None => Err(TokenError::Missing),
            Some(token) => authenticate(state, token).await,
        };
        let seen = match &result {
            Ok(principal) => Seen::Caller { name: principal.name.clone(), owner: principal.owner.clone() },
            Err(e) => Seen::Refused {
                why: e.to_string(),
                token: match e {
                    TokenError::Revoked { name, owner } | TokenError::Expired { name, owner, .. } => {
                        Some((name.clone(), owner.clone()))
                    }
                    _ => None,
                },
            },
        };
        if let Some(slot) = parts.extensions.get::<ActorSlot>() {
            *slot.0.lock().expect("actor slot") = Some(seen);
        }
        Ok(Caller(result?))
    }
}
