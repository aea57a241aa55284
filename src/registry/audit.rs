//! Audit rows: appended in the same transaction as the change they record, read in order.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Registry, RegistryError};
use crate::model::audit::{Event, GENESIS, Hashed, NewEvent, chain_hash};
use crate::utc;

const COLUMNS: &str = "seq, at, actor, owner, action, subject, details, prev_hash, hash";

/// Events read per query while walking the whole log.
const WALK_PAGE: u64 = 10_000;

/// What the audit page filters on; every field optional.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// The token name that acted.
    pub actor: Option<String>,
    /// The exact action (`release.live`, `request.refused`, …).
    pub action: Option<String>,
    /// The service named in the event's details.
    pub service: Option<String>,
    /// At or after this time (stored form: RFC 3339, UTC, microseconds).
    pub from: Option<utc::Timestamp>,
    /// Before this time.
    pub until: Option<utc::Timestamp>,
    /// Older than this sequence number (the next page).
    pub before: Option<u64>,
}

impl Registry {
    /// Events matching `filter`, newest first. Only the conditions given are in the query, so
    /// SQLite walks the index of the one that narrows it (actor, action, service or time).
    pub fn audit_page(&self, filter: &AuditFilter, limit: u64) -> Result<Vec<Event>, RegistryError> {
        let mut conditions = Vec::new();
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        let mut add = |condition: &str, value: rusqlite::types::Value| {
            values.push(value);
            conditions.push(condition.replace('?', &format!("?{}", values.len())));
        };
        if let Some(actor) = &filter.actor {
            add("actor = ?", actor.clone().into());
        }
        if let Some(action) = &filter.action {
            add("action = ?", action.clone().into());
        }
        if let Some(service) = &filter.service {
            add("json_extract(details, '$.service') = ?", service.clone().into());
        }
        if let Some(from) = &filter.from {
            add("at >= ?", from.to_string().into());
        }
        if let Some(until) = &filter.until {
            add("at < ?", until.to_string().into());
        }
        if let Some(before) = filter.before {
            add("seq < ?", (before as i64).into());
        }
        let wher = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
        values.push((limit as i64).into());
        let sql = format!("SELECT {COLUMNS} FROM audit_events {wher} ORDER BY seq DESC LIMIT ?{}", values.len());
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(values), from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Appends one event on its own (a refused request, a start-up finding).
    pub fn append_event(&self, event: &NewEvent) -> Result<Event, RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            let appended = append(&tx, event)?;
            tx.commit()?;
            Ok(appended)
        })
    }

    /// Appends several events in one transaction (one sync for all: the refusals counted
    /// over a window).
    pub fn append_events(&self, events: &[NewEvent]) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            for event in events {
                append(&tx, event)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// The number of events and the hash of the last one.
    pub fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, RegistryError> {
        self.read(|conn| {
            let row = conn
                .query_row("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1", [], |r| {
                    Ok((r.get::<_, u64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .optional()?;
            row.map(|(seq, hash)| Ok((seq, to_hash(hash)?))).transpose()
        })
    }

    pub fn audit_event(&self, seq: u64) -> Result<Option<Event>, RegistryError> {
        self.read(|conn| {
            Ok(conn
                .query_row(&format!("SELECT {COLUMNS} FROM audit_events WHERE seq = ?1"), [seq], from_row)
                .optional()?)
        })
    }

    /// Events after `after_seq` (and at or after `since`, an RFC 3339 time), oldest first.
    pub fn audit_events(
        &self,
        after_seq: u64,
        since: Option<&utc::Timestamp>,
        limit: u64,
    ) -> Result<Vec<Event>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM audit_events WHERE seq > ?1 AND at >= ?2 ORDER BY seq LIMIT ?3"
            ))?;
            // SQLite integers are i64: beyond that there are no events, and no limit is lower.
            let (after_seq, limit) = (after_seq.min(i64::MAX as u64), limit.min(i64::MAX as u64));
            let rows = stmt.query_map(params![after_seq, since.map_or("", utc::Timestamp::as_str), limit], from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Calls `visit` with every event in order until it returns false. Reads page by page so
    /// that memory stays flat however long the log is.
    pub fn walk_audit_events(&self, visit: impl FnMut(Event) -> bool) -> Result<(), RegistryError> {
        self.walk_audit_events_after(0, visit)
    }

    /// [`Registry::walk_audit_events`] from the event after `after` on.
    pub fn walk_audit_events_after(
        &self,
        mut after: u64,
        mut visit: impl FnMut(Event) -> bool,
    ) -> Result<(), RegistryError> {
        loop {
            let page = self.audit_events(after, None, WALK_PAGE)?;
            let Some(last) = page.last().map(|e| e.seq) else { return Ok(()) };
            for event in page {
                if !visit(event) {
                    return Ok(());
                }
            }
            after = last;
        }
    }
}

/// Appends `event` inside `tx`, chaining it to the last event.
/// An event about a release names its service and environment in its details, whoever wrote
/// it, so that the audit log can be filtered (and scoped) by service.
fn with_release_cell(tx: &Transaction<'_>, event: &NewEvent) -> Result<serde_json::Value, RegistryError> {
    let mut details = event.details.clone();
    let id = event.subject.strip_prefix("release/").and_then(|id| id.parse::<i64>().ok());
    if let (Some(id), Some(map)) = (id, details.as_object_mut())
        && !map.contains_key("service")
    {
        let cell: Option<(String, String)> = tx
            .query_row("SELECT service, environment FROM releases WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((service, environment)) = cell {
            map.insert("service".into(), service.into());
            map.entry("environment").or_insert(environment.into());
        }
    }
    Ok(details)
}

pub(super) fn append(tx: &Transaction<'_>, event: &NewEvent) -> Result<Event, RegistryError> {
    append_at(tx, event, None)
}

/// [`append`], at sequence number `seq` when given (larger than the last event's: a restore's
/// event after the events a restore lost, see `src/backup.rs`).
pub(super) fn append_at(tx: &Transaction<'_>, event: &NewEvent, seq: Option<u64>) -> Result<Event, RegistryError> {
    let last = tx
        .query_row("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok((r.get::<_, u64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .optional()?;
    let (seq_next, prev_hash) = match last {
        Some((seq, hash)) => (seq + 1, to_hash(hash)?),
        None => (1, GENESIS),
    };
    let seq = seq.map_or(seq_next, |s| s.max(seq_next));
    let at = utc::Timestamp::now();
    let details = serde_json::to_string(&with_release_cell(tx, event)?).expect("JSON values serialize");
    let hash = chain_hash(
        &prev_hash,
        &Hashed {
            seq,
            at: at.as_str(),
            actor: &event.actor,
            owner: &event.owner,
            action: event.action.as_str(),
            subject: &event.subject,
            details: &details,
        },
    );
    tx.execute(
        &format!("INSERT INTO audit_events ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
        params![
            seq,
            at,
            event.actor,
            event.owner,
            event.action.as_str(),
            event.subject,
            details,
            &prev_hash[..],
            &hash[..]
        ],
    )?;
    Ok(Event {
        seq,
        at,
        actor: event.actor.clone(),
        owner: event.owner.clone(),
        action: event.action.as_str().to_owned(),
        subject: event.subject.clone(),
        details,
        prev_hash,
        hash,
    })
}

fn to_hash(bytes: Vec<u8>) -> Result<[u8; 32], RegistryError> {
    bytes.try_into().map_err(|_| RegistryError::Corrupt("an audit hash is not 32 bytes".into()))
}

pub(super) fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let hash_at = |i: usize| -> rusqlite::Result<[u8; 32]> {
        let bytes: Vec<u8> = row.get(i)?;
        // A wrong length is left to verification to report (it will not match).
        let mut out = [0u8; 32];
        let n = bytes.len().min(32);
        out[..n].copy_from_slice(&bytes[..n]);
        Ok(out)
    };
    Ok(Event {
        seq: row.get(0)?,
        at: row.get(1)?,
        actor: row.get(2)?,
        owner: row.get(3)?,
        action: row.get(4)?,
        subject: row.get(5)?,
        details: row.get(6)?,
        prev_hash: hash_at(7)?,
        hash: hash_at(8)?,
    })
}
