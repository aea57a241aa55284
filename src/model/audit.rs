//! Audit events as appended and as stored, and the chain hash that links them; the walk, the
//! verification and the checkpoints are in `crate::audit`.

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::model::access::Principal;

/// The hash before the first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// An event about to be appended.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub actor: String,
    pub owner: String,
    pub action: String,
    pub subject: String,
    pub details: serde_json::Value,
}

impl NewEvent {
    /// An event caused by an authenticated caller.
    pub fn by(principal: &Principal, action: &str, subject: impl Into<String>, details: serde_json::Value) -> NewEvent {
        NewEvent {
            actor: principal.name.clone(),
            owner: principal.owner.clone(),
            action: action.to_owned(),
            subject: subject.into(),
            details,
        }
    }

    /// An event caused by the server itself (expiry, a deploy's progress, start-up checks).
    pub fn by_server(action: &str, subject: impl Into<String>, details: serde_json::Value) -> NewEvent {
        NewEvent {
            actor: "release".into(),
            owner: "release".into(),
            action: action.to_owned(),
            subject: subject.into(),
            details,
        }
    }

    /// An event caused on this machine by the command line (e.g. `release token create`,
    /// which works without a server): the actor is the operating-system user.
    pub fn by_local_user(action: &str, subject: impl Into<String>, details: serde_json::Value) -> NewEvent {
        let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
        NewEvent {
            actor: format!("local:{user}"),
            owner: user,
            action: action.to_owned(),
            subject: subject.into(),
            details,
        }
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    pub seq: u64,
    pub at: String,
    pub actor: String,
    pub owner: String,
    pub action: String,
    pub subject: String,
    /// The JSON text exactly as hashed.
    #[serde(serialize_with = "raw_json")]
    pub details: String,
    #[serde(serialize_with = "hex_bytes")]
    pub prev_hash: [u8; 32],
    #[serde(serialize_with = "hex_bytes")]
    pub hash: [u8; 32],
}

fn raw_json<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or(serde_json::Value::String(text.to_owned()));
    value.serialize(s)
}

fn hex_bytes<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// The fields of an event that its hash covers.
#[derive(Serialize)]
pub struct Hashed<'a> {
    pub seq: u64,
    pub at: &'a str,
    pub actor: &'a str,
    pub owner: &'a str,
    pub action: &'a str,
    pub subject: &'a str,
    /// As stored text.
    pub details: &'a str,
}

/// The hash of an event: SHA-256 over the previous hash and the JSON array
/// `[seq, at, actor, owner, action, subject, details]`.
pub fn chain_hash(prev: &[u8; 32], f: &Hashed<'_>) -> [u8; 32] {
    let fields = serde_json::to_vec(&(f.seq, f.at, f.actor, f.owner, f.action, f.subject, f.details))
        .expect("strings serialize");
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(&fields);
    hasher.finalize().into()
}

impl Event {
    pub fn expected_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        chain_hash(
            prev,
            &Hashed {
                seq: self.seq,
                at: &self.at,
                actor: &self.actor,
                owner: &self.owner,
                action: &self.action,
                subject: &self.subject,
                details: &self.details,
            },
        )
    }
}
