//! The registry's side of backups: a consistent snapshot through SQLite's online backup API,
//! what a snapshot file holds, and a restore's audit event (see `src/backup.rs`).

use std::path::Path;
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{Registry, RegistryError};
use crate::model::audit::AuditAction;
use crate::model::audit::{Event, NewEvent};

/// The action of the event a restore appends.
pub const RESTORED: AuditAction = AuditAction::RegistryRestored;

/// What a snapshot file holds: its audit chain's head and its schema version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHead {
    /// The last event's sequence number (0: no events).
    pub events: u64,
    /// Hex SHA-256 of that event (empty with no events).
    pub head: String,
    pub schema: u64,
}

impl Registry {
    /// Writes a consistent copy of the registry to `dst` (a new file): one backup step over
    /// all pages, inside one read transaction of a connection of its own, so that writers go
    /// on (WAL) and the copy is the database as of one commit. Never a file copy of a live
    /// WAL database.
    pub fn snapshot(&self, dst: &Path) -> Result<SnapshotHead, RegistryError> {
        let src = Connection::open_with_flags(
            self.path(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        super::configure(&src)?;
        let mut out = Connection::open(dst)?;
        {
            let backup = Backup::new(&src, &mut out)?;
            loop {
                match backup.step(-1)? {
                    StepResult::Done => break,
                    // Another connection holds a lock the copy needs for a moment: try again.
                    StepResult::Busy | StepResult::Locked | StepResult::More => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        // Uploads under way belong to the running server, not to the copy: a registry restored
        // from it must not take them for uploads a crash cut short and delete the bytes they
        // were publishing (committed after the snapshot, and perhaps deployed since).
        out.execute("DELETE FROM staged_uploads", [])?;
        // The copy is a self-contained file: no WAL beside it.
        out.pragma_update(None, "journal_mode", "DELETE")?;
        let head = head_of(&out)?;
        out.close().map_err(|(_, e)| e)?;
        Ok(head)
    }

    /// Appends a restore's event after a gap: at `seq` (the first sequence number after the
    /// events the restore lost) when given, else next. Its predecessor hash is the snapshot's
    /// head, so the chain stays one chain with one recorded gap.
    pub fn append_restored(&self, event: &NewEvent, seq: Option<u64>) -> Result<Event, RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            let appended = super::audit::append_at(&tx, event, seq)?;
            tx.commit()?;
            Ok(appended)
        })
    }

    /// The details of every `registry.restored` event, oldest first (few: one per restore).
    pub fn restorations(&self) -> Result<Vec<(u64, serde_json::Value)>, RegistryError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT seq, details FROM audit_events WHERE action = ?1 ORDER BY seq")?;
            let rows = stmt.query_map([RESTORED.as_str()], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, details) = row?;
                out.push((seq, serde_json::from_str(&details).unwrap_or(serde_json::Value::Null)));
            }
            Ok(out)
        })
    }
}

/// The audit head and schema version of a registry file (a snapshot), read without changing it.
pub fn snapshot_head(path: &Path) -> Result<SnapshotHead, RegistryError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    head_of(&conn)
}

fn head_of(conn: &Connection) -> Result<SnapshotHead, RegistryError> {
    let schema: u64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let head = conn
        .query_row("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok((r.get::<_, u64>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .optional()?;
    let (events, head) = head.map_or((0, String::new()), |(seq, hash)| (seq, hex::encode(hash)));
    Ok(SnapshotHead { events, head, schema })
}

/// The hex hash of event `seq` in a registry file (a snapshot), if it has that event.
pub fn snapshot_event_hash(path: &Path, seq: u64) -> Result<Option<String>, RegistryError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    let hash =
        conn.query_row("SELECT hash FROM audit_events WHERE seq = ?1", [seq], |r| r.get::<_, Vec<u8>>(0)).optional()?;
    Ok(hash.map(hex::encode))
}

/// The schema version this binary knows: a snapshot newer than that cannot be restored by it.
pub fn known_schema() -> u64 {
    super::migrate::known_schema()
}
