//! `[[webhook]]`: where release events are POSTed, signed with a secret, and which ones.
//!
//! Everything is checked at start: a webhook that could never deliver (no URL, no secret, an
//! event name that does not exist, a filter naming nothing configured) refuses the whole
//! configuration, naming the key.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Environment, HumanDuration, Secret, Service, is_valid_name};

/// One receiver of release events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    /// Unique; names the webhook in the registry (its cursor and its delivery records).
    pub name: String,
    /// Where events are POSTed. Held as a secret: Slack's and similar URLs carry a token.
    pub url: Secret,
    /// The HMAC-SHA256 key of `X-Release-Signature`: required for the `json` format (the
    /// receiver checks it); Slack and Monday check nothing, and a URL or token is theirs.
    pub secret: Option<Secret>,
    /// What the body is: this server's JSON, a Slack message, a Monday item.
    pub format: Format,
    /// Only these events (`release.live`, …); `None`: every release state change.
    pub events: Option<Vec<String>>,
    /// Only releases of these services; `None`: all.
    pub services: Option<Vec<String>>,
    /// Only releases in these environments; `None`: all.
    pub environments: Option<Vec<String>>,
    /// For one attempt, from connecting to the end of the answer.
    pub timeout: Duration,
    /// The wait after the first failed attempt; doubled after each further one.
    pub retry_base: Duration,
    /// The longest wait between two attempts.
    pub retry_max: Duration,
    /// Attempts per event before it is given up.
    pub max_attempts: u32,
}

/// The shape of what a webhook POSTs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// The event as this server's JSON (README: Webhooks), signed.
    Json,
    /// A Slack incoming-webhook message: `text` and `blocks`.
    Slack,
    /// An item on a Monday board per event, through Monday's GraphQL API (`url` is the API's,
    /// https://api.monday.com/v2 in production), the API token in `Authorization`.
    Monday { board_id: u64, group_id: Option<String>, token: Secret },
}

impl Webhook {
    /// Whether this webhook wants `event` about a release of `service` in `environment`.
    pub fn wants(&self, event: &str, service: &str, environment: &str) -> bool {
        let allows =
            |filter: &Option<Vec<String>>, value: &str| filter.as_ref().is_none_or(|f| f.iter().any(|v| v == value));
        allows(&self.events, event) && allows(&self.services, service) && allows(&self.environments, environment)
    }

    /// The wait before attempt `next` (2, 3, …): `retry_base × 2^(next − 2)`, at most `retry_max`.
    pub fn backoff(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(32);
        self.retry_base.saturating_mul(1u32 << doublings.min(31)).min(self.retry_max)
    }
}

/// `[[webhook]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WebhookSection {
    name: Option<String>,
    url: Option<Secret>,
    secret: Option<Secret>,
    secret_env: Option<String>,
    format: Option<String>,
    board_id: Option<u64>,
    group_id: Option<String>,
    token_env: Option<String>,
    events: Option<Vec<String>>,
    services: Option<Vec<String>>,
    environments: Option<Vec<String>>,
    timeout: Option<HumanDuration>,
    retry_base: Option<HumanDuration>,
    retry_max: Option<HumanDuration>,
    max_attempts: Option<u32>,
}

pub(super) fn resolve(
    sections: Vec<WebhookSection>,
    environments: &[Environment],
    services: &BTreeMap<String, Service>,
    env: &dyn Fn(&str) -> Option<String>,
    invalid: &impl Fn(&str, String) -> ConfigError,
) -> Result<Vec<Webhook>, ConfigError> {
    let mut webhooks: Vec<Webhook> = Vec::new();
    for (i, s) in sections.into_iter().enumerate() {
        let key = |field: &str| format!("webhook[{i}].{field}");
        let name =
            s.name.ok_or_else(|| invalid(&key("name"), "is required (it names the webhook's records)".into()))?;
        if !is_valid_name(&name) {
            return Err(invalid(&key("name"), format!("{name:?} must match [a-z0-9][a-z0-9-]*")));
        }
        if webhooks.iter().any(|w| w.name == name) {
            return Err(invalid(&key("name"), format!("webhook {name:?} is defined twice")));
        }
        let url = s.url.ok_or_else(|| invalid(&key("url"), format!("is required: where webhook {name:?} POSTs")))?;
        // The URL itself is never echoed: it may carry a token.
        match reqwest::Url::parse(url.expose()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(_) => return Err(invalid(&key("url"), "must be an http:// or https:// URL with a host".into())),
            Err(e) => return Err(invalid(&key("url"), format!("is not a URL ({e})"))),
        }
        let format = match s.format.as_deref().unwrap_or("json") {
            "json" => Format::Json,
            "slack" => Format::Slack,
            "monday" => {
                let board_id = s.board_id.ok_or_else(|| {
                    invalid(&key("board_id"), "is required with format = \"monday\": the board items go on".into())
                })?;
                let var = s.token_env.as_deref().ok_or_else(|| {
                    invalid(
                        &key("token_env"),
                        "is required with format = \"monday\": the variable holding the API token".into(),
                    )
                })?;
                let token = match env(var) {
                    Some(value) if !value.trim().is_empty() => Secret::new(value.trim().to_owned()),
                    _ => return Err(invalid(&key("token_env"), format!("the environment variable {var} is not set"))),
                };
                Format::Monday { board_id, group_id: s.group_id.clone(), token }
            }
            other => {
                return Err(invalid(&key("format"), format!("{other:?} is not a format: json, slack or monday")));
            }
        };
        if !matches!(format, Format::Monday { .. }) {
            for (field, given) in [
                ("board_id", s.board_id.is_some()),
                ("group_id", s.group_id.is_some()),
                ("token_env", s.token_env.is_some()),
            ] {
                if given {
                    return Err(invalid(&key(field), "is for format = \"monday\" only".into()));
                }
            }
        }
        let secret = match (s.secret, s.secret_env) {
            (Some(secret), None) => Some(secret),
            (None, Some(var)) => match env(&var) {
                Some(value) if !value.is_empty() => Some(Secret::new(value)),
                _ => return Err(invalid(&key("secret_env"), format!("the environment variable {var} is not set"))),
            },
            (Some(_), Some(_)) => return Err(invalid(&key("secret"), "give secret or secret_env, not both".into())),
            (None, None) if format == Format::Json => {
                return Err(invalid(
                    &key("secret"),
                    "is required (or secret_env): events are signed with it (X-Release-Signature)".into(),
                ));
            }
            (None, None) => None,
        };
        if secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
            return Err(invalid(&key("secret"), "must be at least 16 characters".into()));
        }
        // A Monday item per release that went live or failed, unless other events are named.
        let events = match (&format, s.events) {
            (Format::Monday { .. }, None) => Some(vec!["release.live".to_owned(), "release.failed".to_owned()]),
            (_, events) => events,
        };
        if let Some(events) = &events {
            if let Some(bad) = events.iter().find(|e| !crate::model::webhook::EVENTS.contains(&e.as_str())) {
                return Err(invalid(
                    &key("events"),
                    format!("{bad:?} is not an event; the events are {}", crate::model::webhook::EVENTS.join(", ")),
                ));
            }
        }
        if let Some(bad) = s.services.iter().flatten().find(|n| !services.contains_key(*n)) {
            return Err(invalid(&key("services"), format!("{bad:?} is not a configured service")));
        }
        if let Some(bad) = s.environments.iter().flatten().find(|n| !environments.iter().any(|e| &e.name == *n)) {
            return Err(invalid(&key("environments"), format!("{bad:?} is not a configured environment")));
        }
        for (field, list) in [("events", &events), ("services", &s.services), ("environments", &s.environments)] {
            if list.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(
                    &key(field),
                    "an empty list lets nothing through; leave the key out for all".into(),
                ));
            }
        }
        let timeout = s.timeout.map_or(Duration::from_secs(10), |d| d.0);
        let retry_base = s.retry_base.map_or(Duration::from_secs(1), |d| d.0);
        let retry_max = s.retry_max.map_or(Duration::from_secs(600), |d| d.0);
        for (field, value) in [("timeout", timeout), ("retry_base", retry_base), ("retry_max", retry_max)] {
            if value.is_zero() {
                return Err(invalid(&key(field), "must be longer than zero".into()));
            }
        }
        if retry_max < retry_base {
            return Err(invalid(&key("retry_max"), "must not be shorter than retry_base".into()));
        }
        let max_attempts = s.max_attempts.unwrap_or(8);
        if max_attempts == 0 {
            return Err(invalid(&key("max_attempts"), "must be at least 1".into()));
        }
        webhooks.push(Webhook {
            name,
            url,
            secret,
            format,
            events,
            services: s.services,
            environments: s.environments,
            timeout,
            retry_base,
            retry_max,
            max_attempts,
        });
    }
    Ok(webhooks)
}
