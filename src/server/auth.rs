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

/// Where the request log line finds the caller's name (set by [`Caller`]).
#[derive(Clone, Default)]
pub struct ActorSlot(pub Arc<Mutex<Option<String>>>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        let result = match presented {
            None => Err(TokenError::Missing),
            Some(token) => {
                let registry = Arc::clone(&state.ingestor.registry);
                tokio::task::spawn_blocking(move || token::authenticate(&registry, &token))
                    .await
                    .expect("authentication does not panic")
            }
        };
        let actor = match &result {
            Ok(principal) => principal.name.clone(),
            Err(e) => format!("(refused: {e})"),
        };
        if let Some(slot) = parts.extensions.get::<ActorSlot>() {
            *slot.0.lock().expect("actor slot") = Some(actor);
        }
        Ok(Caller(result?))
    }
}
