//! The audit log: every state change and every refused request, as a SHA-256 hash chain, with
//! checkpoints of the chain's head kept in the object store.
//!
//! Each event's hash covers the previous event's hash and the event's own fields, so a changed,
//! removed or reordered event breaks the chain at that event. A registry replaced wholesale by
//! an older copy has a consistent chain, but a shorter one than the checkpoint in the bucket
//! says, or a different head at the checkpoint's count; `verify` catches both.

use std::sync::Arc;

use serde::Serialize;

pub use crate::model::audit::{AuditAction, Event, GENESIS, Hashed, NewEvent, chain_hash};
use crate::registry::{Registry, RegistryError};
use crate::store::{Store, StoreError};
use crate::utc::Timestamp;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt checkpoint {key}: {why}")]
    BadCheckpoint { key: String, why: String },
    #[error("not checkpointing the audit chain: {0}")]
    Diverged(String),
}

/// A checkpoint: how long the chain was and what its head was, at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub events: u64,
    /// Hex SHA-256 of event `events`.
    pub head: String,
    pub at: Timestamp,
}

/// The outcome of `verify`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Verification {
    pub ok: bool,
    pub events: u64,
    /// Hex hash of the last event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// The first event found wrong, and why (`seq` 0 when the chain itself is fine but does
    /// not match the bucket's checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad: Option<BadEvent>,
    /// The checkpoint it was compared with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// Events lost by restores of older backups, each recorded by its `registry.restored`
    /// event (the only gaps a chain may have).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<Gap>,
    /// When the walk started (the server may answer a recent walk again while the chain's
    /// head has not moved).
    pub checked_at: Timestamp,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BadEvent {
    pub seq: u64,
    pub why: String,
}

/// Walks the chain end to end, then compares it with the latest checkpoint in the store.
pub async fn verify(registry: &Arc<Registry>, store: &Store) -> Result<Verification, AuditError> {
    let checked_at = Timestamp::now();
    let walker = Arc::clone(registry);
    let walked = crate::registry::run(move || walk(&walker)).await?;
    let mut verification = Verification {
        ok: walked.first_bad.is_none(),
        events: walked.events,
        head: walked.head.map(hex::encode),
        first_bad: walked.first_bad,
        checkpoint: None,
        gaps: walked.gaps,
        checked_at,
    };
    if verification.ok {
        let (checkpoint, bad) = against_checkpoint(registry, store, walked.events).await?;
        if let Some(bad) = bad {
            verification.ok = false;
            verification.first_bad = Some(bad);
        }
        verification.checkpoint = checkpoint;
    }
    Ok(verification)
}

/// Compares the registry with the latest checkpoint in the store: the registry must hold at
/// least as many events, and the event at the checkpoint's count must have its hash. Cheap
/// (no walk), so the server runs it at start.
pub async fn against_checkpoint(
    registry: &Arc<Registry>,
    store: &Store,
    events: u64,
) -> Result<(Option<Checkpoint>, Option<BadEvent>), AuditError> {
    let Some((key, bytes)) = store.latest_checkpoint().await? else { return Ok((None, None)) };
    let checkpoint: Checkpoint =
        serde_json::from_slice(&bytes).map_err(|e| AuditError::BadCheckpoint { key, why: e.to_string() })?;
    let bad = if events < checkpoint.events {
        Some(BadEvent {
            seq: events + 1,
            why: format!(
                "the registry holds {events} events but the bucket's checkpoint of {} counted {}: the registry was replaced by an older copy or cut short",
                checkpoint.at, checkpoint.events
            ),
        })
    } else {
        let reader = Arc::clone(registry);
        let seq = checkpoint.events;
        let event = crate::registry::run(move || reader.audit_event(seq)).await?;
        match event {
            Some(event) if hex::encode(event.hash) == checkpoint.head => None,
            _ => Some(BadEvent {
                seq,
                why: format!(
                    "event {seq} does not have the hash the bucket's checkpoint of {} recorded ({}): the registry was rewritten",
                    checkpoint.at, checkpoint.head
                ),
            }),
        }
    };
    let bad = match bad {
        Some(bad) if restored_past(registry, &checkpoint).await? => {
            tracing::debug!(seq = bad.seq, "the bucket's checkpoint is the one a recorded restore lost events after");
            None
        }
        bad => bad,
    };
    Ok((Some(checkpoint), bad))
}

/// Whether a `registry.restored` event recorded exactly this checkpoint as the one whose
/// events it lost: then the registry was restored past it, knowingly, and that is on record.
async fn restored_past(registry: &Arc<Registry>, checkpoint: &Checkpoint) -> Result<bool, AuditError> {
    let reader = Arc::clone(registry);
    let restorations = crate::registry::run(move || reader.restorations()).await?;
    Ok(restorations.iter().any(|(seq, details)| {
        let recorded = &details["checkpoint"];
        details["lost"]["to"].as_u64() == Some(checkpoint.events)
            && *seq == checkpoint.events + 1
            && recorded["events"].as_u64() == Some(checkpoint.events)
            && recorded["head"].as_str() == Some(checkpoint.head.as_str())
    }))
}

struct Walked {
    /// The last good event's sequence number (the count, but for a recorded gap).
    events: u64,
    head: Option<[u8; 32]>,
    first_bad: Option<BadEvent>,
    gaps: Vec<Gap>,
}

/// Events a restore lost, recorded by its `registry.restored` event (at `restored_at`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub restored_at: u64,
}

/// Whether `event` is a restore's event that names exactly the events missing before it.
fn recorded_gap(event: &Event, expected_seq: u64) -> bool {
    if event.action != crate::registry::RESTORED.as_str() || event.seq <= expected_seq {
        return false;
    }
    let Ok(details) = serde_json::from_str::<serde_json::Value>(&event.details) else { return false };
    let lost = &details["lost"];
    lost["from"].as_u64() == Some(expected_seq) && lost["to"].as_u64() == Some(event.seq - 1)
}

fn walk(registry: &Registry) -> Result<Walked, RegistryError> {
    walk_after(registry, 0, GENESIS)
}

/// Walks the chain from the event after `after`, whose predecessor's hash is `prev`.
fn walk_after(registry: &Registry, after: u64, mut prev: [u8; 32]) -> Result<Walked, RegistryError> {
    let mut expected_seq = after + 1;
    let mut first_bad = None;
    let mut events = after;
    let mut gaps = Vec::new();
    registry.walk_audit_events_after(after, |event| {
        events += 1;
        let (seq, why) = if event.seq != expected_seq && recorded_gap(&event, expected_seq) {
            events = event.seq;
            // A restore's event after the events it lost, naming exactly them: the one gap
            // the chain may have. Its hashes are checked as any event's.
            gaps.push(Gap { from: expected_seq, to: event.seq - 1, restored_at: event.seq });
            if event.prev_hash != prev {
                (event.seq, Some("its previous-hash does not match the event before the recorded gap".into()))
            } else if event.hash != event.expected_hash(&prev) {
                (event.seq, Some("its content does not match its hash: the event was altered".into()))
            } else {
                (event.seq, None)
            }
        } else if event.seq != expected_seq {
            (
                expected_seq,
                Some(format!("event {expected_seq} is missing (the next is {}): events were removed", event.seq)),
            )
        } else if event.prev_hash != prev {
            (
                event.seq,
                Some(
                    "its previous-hash does not match the event before it: events were replaced, inserted or reordered"
                        .into(),
                ),
            )
        } else if event.hash != event.expected_hash(&prev) {
            (event.seq, Some("its content does not match its hash: the event was altered".into()))
        } else {
            (event.seq, None)
        };
        if let Some(why) = why {
            first_bad = Some(BadEvent { seq, why });
            return false;
        }
        prev = event.hash;
        expected_seq = event.seq + 1;
        true
    })?;
    Ok(Walked { events, head: (events > 0).then_some(prev), first_bad, gaps })
}

/// The state of the chain as the web pages show it, kept up to date cheaply: the first check
/// walks the whole chain (seconds at millions of events, so the server starts it in the
/// background), later ones walk only the events appended since, and compare with the bucket's
/// latest checkpoint; each check first makes sure the last event it checked is unchanged (a
/// cut or rewritten tail is found at once). [`ChainWatch::check_all`] walks everything again
/// (the server does so hourly: an edit deeper in the chain is found within the hour).
#[derive(Default)]
pub struct ChainWatch {
    /// How far the chain is known good: (events, hash of the last), or the first bad event.
    checked: tokio::sync::Mutex<Checked>,
    last: std::sync::Mutex<Option<ChainView>>,
    /// A walk from the first event is running (the page says so).
    walking_all: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Checked {
    events: u64,
    head: Option<[u8; 32]>,
    broken: Option<BadEvent>,
}

/// What the audit page says about the chain.
#[derive(Clone, Debug, Serialize)]
pub struct ChainView {
    pub ok: bool,
    pub events: u64,
    pub first_bad: Option<BadEvent>,
    /// The bucket's checkpoint compared with, if any.
    pub checkpoint: Option<Checkpoint>,
    pub checked_at: Timestamp,
    /// Another check is still running (the first full walk): this is the one before it.
    pub in_progress: bool,
}

impl ChainWatch {
    /// Checks what was appended since the last check. While another check runs (the first
    /// full walk), answers the last result at once, marked in progress (`None` before any).
    pub async fn check(&self, registry: &Arc<Registry>, store: &Store) -> Result<Option<ChainView>, AuditError> {
        let Ok(checked) = self.checked.try_lock() else {
            let in_progress = self.walking_all.load(std::sync::atomic::Ordering::Relaxed);
            let last = self.last.lock().expect("never poisoned").clone();
            if let (Some(last), false) = (&last, in_progress) {
                // Another page's check, a moment old.
                return Ok(Some(last.clone()));
            }
            return Ok(Some(last.map_or_else(
                || ChainView {
                    ok: true,
                    events: 0,
                    first_bad: None,
                    checkpoint: None,
                    checked_at: Timestamp::now(),
                    in_progress: true,
                },
                |v| ChainView { in_progress: true, ..v },
            )));
        };
        self.check_locked(checked, registry, store, false).await
    }

    /// Walks the whole chain again (the server does so hourly), then compares as `check`.
    pub async fn check_all(&self, registry: &Arc<Registry>, store: &Store) -> Result<Option<ChainView>, AuditError> {
        let checked = self.checked.lock().await;
        self.check_locked(checked, registry, store, true).await
    }

    async fn check_locked(
        &self,
        mut checked: tokio::sync::MutexGuard<'_, Checked>,
        registry: &Arc<Registry>,
        store: &Store,
        from_scratch: bool,
    ) -> Result<Option<ChainView>, AuditError> {
        // The last event checked must still be what it was: a rewritten or cut tail is found
        // at once, not only at the next full walk.
        if !from_scratch && checked.events > 0 && checked.broken.is_none() {
            let (reader, seq) = (Arc::clone(registry), checked.events);
            let tail = crate::registry::run(move || reader.audit_event(seq)).await?;
            let intact = tail.is_some_and(|e| Some(e.hash) == checked.head && e.expected_hash(&e.prev_hash) == e.hash);
            if !intact {
                *checked = Checked::default();
            }
        }
        if from_scratch {
            *checked = Checked::default();
        }
        let walking_all = checked.events == 0;
        self.walking_all.store(walking_all, std::sync::atomic::Ordering::Relaxed);
        if checked.broken.is_none() {
            let (reader, after, prev) = (Arc::clone(registry), checked.events, checked.head.unwrap_or(GENESIS));
            let walked = crate::registry::run(move || walk_after(&reader, after, prev)).await?;
            checked.events = walked.events;
            checked.head = walked.head.or(checked.head);
            checked.broken = walked.first_bad;
        }
        self.walking_all.store(false, std::sync::atomic::Ordering::Relaxed);
        let mut view = ChainView {
            ok: checked.broken.is_none(),
            events: checked.events,
            first_bad: checked.broken.clone(),
            checkpoint: None,
            checked_at: Timestamp::now(),
            in_progress: false,
        };
        if view.ok {
            let (checkpoint, bad) = against_checkpoint(registry, store, checked.events).await?;
            view.checkpoint = checkpoint;
            if let Some(bad) = bad {
                view.ok = false;
                view.first_bad = Some(bad);
            }
        }
        *self.last.lock().expect("never poisoned") = Some(view.clone());
        Ok(Some(view))
    }
}

/// Writes a checkpoint of the chain's head to the store if it moved since `last`; returns the
/// count checkpointed. A checkpoint never moves backwards: a registry that does not extend
/// the chain the bucket's latest checkpoint recorded (shorter, or another head at its count)
/// is not checkpointed, so the evidence stays for `verify` to report.
pub async fn checkpoint(registry: &Arc<Registry>, store: &Store, last: u64) -> Result<u64, AuditError> {
    let reader = Arc::clone(registry);
    let head = crate::registry::run(move || reader.audit_head()).await?;
    let Some((events, hash)) = head else { return Ok(last) };
    if events == last {
        return Ok(last);
    }
    match against_checkpoint(registry, store, events).await? {
        (_, Some(bad)) => return Err(AuditError::Diverged(bad.why)),
        (Some(latest), None) if latest.events >= events => return Ok(events),
        _ => {}
    }
    let checkpoint = Checkpoint { events, head: hex::encode(hash), at: Timestamp::now() };
    store.put_checkpoint(events, serde_json::to_vec(&checkpoint).expect("serializes")).await?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(prev: &[u8; 32], seq: u64, actor: &str, owner: &str, details: &str) -> [u8; 32] {
        chain_hash(prev, &Hashed { seq, at: "t", actor, owner, action: "x", subject: "s", details })
    }

    #[test]
    fn the_hash_covers_every_field_and_the_previous_hash() {
        let base = hash(&GENESIS, 1, "a", "o", "{}");
        assert_ne!(base, hash(&[1; 32], 1, "a", "o", "{}"));
        assert_ne!(base, hash(&GENESIS, 2, "a", "o", "{}"));
        assert_ne!(base, hash(&GENESIS, 1, "a", "o", "{\"k\":1}"));
        // Field boundaries are part of the encoding: moving a character between fields changes it.
        assert_ne!(hash(&GENESIS, 1, "ab", "o", "{}"), hash(&GENESIS, 1, "a", "bo", "{}"));
    }
}
