//! Extractors that answer malformed input with the JSON error document instead of axum's
//! plain-text rejections.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;

use super::error::ApiError;

/// `Query`, with JSON errors.
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

/// `Path`, with JSON errors.
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

/// `Json` request bodies, with JSON errors (an empty body reads as `{}`). The body is in
/// memory already, at most `limits.max_body_bytes` (`server::limits` read it).
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(request.into_body(), usize::MAX)
            .await
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
        let bytes =
            if bytes.iter().all(u8::is_ascii_whitespace) { axum::body::Bytes::from_static(b"{}") } else { bytes };
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
    }
}

/// A whole number in a JSON body, written `7` or `7.0`: JSON Schema's `integer` (what the
/// OpenAPI document says) admits both, serde's integers only the first.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    use serde::de::{Deserialize, Error};
    let number = serde_json::Number::deserialize(deserializer)?;
    let whole = match (number.as_u64(), number.as_f64()) {
        (Some(n), _) => u32::try_from(n).ok(),
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => Some(f as u32),
        _ => None,
    };
    whole.ok_or_else(|| D::Error::custom(format!("{number} is not a whole number from 0 to {}", u32::MAX)))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug)]
    struct Days {
        #[serde(deserialize_with = "super::whole_number")]
        days: u32,
    }

    #[test]
    fn whole_numbers_may_be_written_with_a_fraction_of_zero() {
        let days = |json: &str| serde_json::from_str::<Days>(json).map(|d| d.days).map_err(|e| e.to_string());
        assert_eq!(days(r#"{"days": 7}"#), Ok(7));
        assert_eq!(days(r#"{"days": 7.0}"#), Ok(7));
        assert_eq!(days(r#"{"days": 4294967295}"#), Ok(u32::MAX));
        for bad in [r#"{"days": 7.5}"#, r#"{"days": -1}"#, r#"{"days": 4294967296}"#, r#"{"days": 1e300}"#] {
            assert!(days(bad).unwrap_err().contains("not a whole number"), "{bad}");
        }
    }
}
