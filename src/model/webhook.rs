//! Webhook events by name, and the attempts and deliveries the registry records of them; the
//! delivery itself is in `crate::webhooks`.

use serde::Serialize;

use crate::utc::Timestamp;

/// Every event a webhook may receive: one per change of a release's state.
pub const EVENTS: &[&str] = &[
    "release.requested",
    "release.approved",
    "release.rejected",
    "release.cancelled",
    "release.expired",
    "release.deploying",
    "release.live",
    "release.failed",
    "release.superseded",
];

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer: delivered.
    Accepted,
    /// Failed; another attempt follows.
    Retrying,
    /// The last attempt failed: the event is given up for this webhook.
    GaveUp,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Retrying => "retrying",
            Outcome::GaveUp => "gave_up",
        }
    }

    /// Ends the delivery (the cursor moves past the event).
    pub fn is_final(self) -> bool {
        self != Outcome::Retrying
    }
}

/// One attempt to deliver one event to one webhook, as recorded.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub webhook: String,
    pub event_seq: u64,
    pub release_id: i64,
    pub event: String,
    pub delivery: String,
    pub attempt: u32,
    pub at: Timestamp,
    pub duration_ms: u64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub outcome: Outcome,
    pub next_attempt_at: Option<Timestamp>,
}

/// One event's delivery to one webhook, as `release show` tells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Delivery {
    pub webhook: String,
    pub event: String,
    /// The audit event's sequence number (the body's `id`).
    pub event_id: u64,
    /// The `X-Release-Delivery` header.
    pub delivery: String,
    pub attempts: u32,
    /// `accepted`, `retrying` or `gave_up`.
    pub outcome: String,
    pub delivered: bool,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub first_attempt_at: Timestamp,
    pub last_attempt_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
}
