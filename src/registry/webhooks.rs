//! The webhooks' outbox: per-webhook cursors over the audit log, and every delivery attempt.

use rusqlite::{OptionalExtension, params};

use super::releases::{by_id, state_at, upload_version};
use super::{Registry, RegistryError, immediate};
use crate::model::audit::Event;
use crate::model::release::{Release, State};
use crate::model::webhook::{Attempt, Delivery};
use crate::utc;

/// `release.*` audit events after a cursor.
#[derive(Clone, Debug)]
pub struct Backlog {
    /// Oldest first.
    pub events: Vec<Event>,
    /// Every event up to here was looked at (the last one returned, or the head of the log
    /// when fewer than asked for were found): a cursor may move here once `events` are done.
    pub scanned_to: u64,
}

/// What an event's payload tells of its release.
#[derive(Clone, Debug)]
pub struct ReleaseAtEvent {
    pub release: Release,
    /// The version label its artifact was uploaded with for the service.
    pub version: Option<String>,
    /// The state it was created in (`pending_approval` or `approved`).
    pub first_state: State,
    /// Its four-eyes decision, if one was made (a Monday item's update names it).
    pub approval: Option<crate::model::release::Approval>,
}

impl Registry {
    /// Creates a cursor at the head of the audit log for each webhook that has none (a
    /// webhook starts with what happens after it is first configured).
    pub fn start_webhook_cursors(&self, webhooks: &[String]) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let head: u64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM audit_events", [], |r| r.get(0))?;
            for name in webhooks {
                tx.execute(
                    "INSERT OR IGNORE INTO webhook_cursors (webhook, after_seq, updated_at) VALUES (?1, ?2, ?3)",
                    params![name, head, utc::Timestamp::now()],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Where a webhook's cursor stands (`None`: no cursor yet).
    pub fn webhook_cursor(&self, webhook: &str) -> Result<Option<u64>, RegistryError> {
        self.read(|conn| {
            Ok(conn
                .query_row("SELECT after_seq FROM webhook_cursors WHERE webhook = ?1", [webhook], |r| r.get(0))
                .optional()?)
        })
    }

    /// Moves a webhook's cursor forward to `to` (never back).
    pub fn advance_webhook_cursor(&self, webhook: &str, to: u64) -> Result<(), RegistryError> {
        self.write(|conn| {
            conn.execute(
                "UPDATE webhook_cursors SET after_seq = ?2, updated_at = ?3 WHERE webhook = ?1 AND after_seq < ?2",
                params![webhook, to, utc::Timestamp::now()],
            )?;
            Ok(())
        })
    }

    /// Up to `limit` `release.*` events after `after`, and how far the scan got, from one
    /// snapshot of the log.
    pub fn webhook_backlog(&self, after: u64, limit: u64) -> Result<Backlog, RegistryError> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            let events: Vec<Event> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT seq, at, actor, owner, action, subject, details, prev_hash, hash FROM audit_events
                     WHERE seq > ?1 AND action LIKE 'release.%' ORDER BY seq LIMIT ?2",
                )?;
                stmt.query_map(params![after, limit], super::audit::from_row)?.collect::<Result<_, _>>()?
            };
            let scanned_to = match events.last() {
                Some(last) if events.len() as u64 == limit => last.seq,
                _ => tx.query_row("SELECT coalesce(max(seq), 0) FROM audit_events", [], |r| r.get::<_, u64>(0))?,
            };
            tx.finish()?;
            Ok(Backlog { events, scanned_to: scanned_to.max(after) })
        })
    }

    /// A release as an event's payload shows it.
    pub fn release_at_event(&self, id: i64) -> Result<Option<ReleaseAtEvent>, RegistryError> {
        self.read(|conn| {
            let Some(release) = by_id(conn, id)? else { return Ok(None) };
            let version = upload_version(conn, &release.service, release.digest)?;
            let first_state = conn.query_row(
                "SELECT state FROM release_transitions WHERE release_id = ?1 ORDER BY id LIMIT 1",
                [id],
                |r| state_at(r, 0),
            )?;
            let approval = super::releases::approval_of(conn, id)?;
            Ok(Some(ReleaseAtEvent { release, version, first_state, approval }))
        })
    }

    /// How many attempts were made to deliver event `seq` to `webhook` (before a restart).
    pub fn webhook_attempts(&self, webhook: &str, seq: u64) -> Result<u32, RegistryError> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT coalesce(max(attempt), 0) FROM webhook_deliveries WHERE webhook = ?1 AND event_seq = ?2",
                params![webhook, seq],
                |r| r.get(0),
            )?)
        })
    }

    /// Records one attempt; one that ends the delivery (accepted, given up) moves the
    /// webhook's cursor past its event in the same transaction.
    pub fn record_webhook_attempt(&self, a: &Attempt) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            tx.execute(
                "INSERT INTO webhook_deliveries (webhook, event_seq, release_id, event, delivery, attempt, at,
                   duration_ms, status_code, error, outcome, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    a.webhook,
                    a.event_seq,
                    a.release_id,
                    a.event,
                    a.delivery,
                    a.attempt,
                    a.at,
                    a.duration_ms,
                    a.status_code,
                    a.error,
                    a.outcome.as_str(),
                    a.next_attempt_at
                ],
            )?;
            if a.outcome.is_final() {
                tx.execute(
                    "UPDATE webhook_cursors SET after_seq = ?2, updated_at = ?3 WHERE webhook = ?1 AND after_seq < ?2",
                    params![a.webhook, a.event_seq, a.at],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }
}

/// The deliveries of a release's events, one per (event, webhook), each as its last attempt
/// left it.
pub(super) fn deliveries_of(conn: &rusqlite::Connection, release_id: i64) -> Result<Vec<Delivery>, RegistryError> {
    let mut stmt = conn.prepare_cached(
        "SELECT d.webhook, d.event, d.event_seq, d.delivery, d.attempt, d.outcome, d.status_code, d.error,
                (SELECT min(f.at) FROM webhook_deliveries f WHERE f.webhook = d.webhook AND f.event_seq = d.event_seq),
                d.at, d.next_attempt_at
         FROM webhook_deliveries d
         WHERE d.release_id = ?1 AND d.attempt = (SELECT max(m.attempt) FROM webhook_deliveries m
                                                 WHERE m.webhook = d.webhook AND m.event_seq = d.event_seq)
         ORDER BY d.event_seq, d.webhook",
    )?;
    let rows = stmt.query_map([release_id], |r| {
        let outcome: String = r.get(5)?;
        Ok(Delivery {
            webhook: r.get(0)?,
            event: r.get(1)?,
            event_id: r.get(2)?,
            delivery: r.get(3)?,
            attempts: r.get(4)?,
            delivered: outcome == "accepted",
            outcome,
            last_status: r.get(6)?,
            last_error: r.get(7)?,
            first_attempt_at: r.get(8)?,
            last_attempt_at: r.get(9)?,
            next_attempt_at: r.get(10)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
