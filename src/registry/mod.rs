//! The registry: SQLite through rusqlite. The only code that holds SQL (besides `migrations/`).
//!
//! rusqlite is blocking: callers on async threads go through [`run`], a fixed set of threads.
//! One writer connection (SQLite serializes writers anyway) and a bounded pool of readers,
//! which WAL mode lets read while a write is in progress.

mod artifacts;
mod audit;
mod backup;
mod gauges;
mod marks;
mod migrate;
mod releases;
mod staging;
mod tokens;
mod unchanged;
mod web;
mod webhooks;
mod workers;

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

pub use crate::model::release::Adoption;
pub use artifacts::{Artifact, ArtifactIndex, ArtifactUpload, Block, ListedArtifact, NewArtifact, Recorded};
pub use audit::AuditFilter;
pub use backup::{RESTORED, SnapshotHead, known_schema, snapshot_event_hash, snapshot_head};
pub use gauges::{Cell, Gauges};
pub use releases::{ConfiguredEnvironment, Ending, Finished, NewApproval, NewRelease, Start};
pub use staging::LeftUpload;
pub use tokens::{NewToken, TokenRecord};
pub use web::{LiveSpell, Session};
pub use webhooks::{Backlog, ReleaseAtEvent};
pub use workers::{Panicked, THREADS as WORKER_THREADS, catching, run};

/// Reader connections open at once; a read past them waits for one. However many requests
/// read at once, the registry holds this many connections,
/// their page caches and descriptors. (Unbounded, 300 clients reading at once opened ~120
/// connections, and SQLite keeps a closed connection's descriptor while others hold locks on
/// the file, so their descriptors stayed open for the life of the process.)
pub const MAX_READERS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("registry migration {name} failed: {source}")]
    Migration { name: &'static str, source: rusqlite::Error },
    #[error(
        "the registry has schema version {found}, newer than this release binary knows ({known}); run a newer release"
    )]
    TooNew { found: usize, known: usize },
    #[error("cannot create the registry's directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("a token named {0:?} exists already (names are never reused)")]
    TokenNameTaken(String),
    #[error("no token named {0:?}")]
    TokenNotFound(String),
    #[error("token {0:?} is revoked already")]
    TokenAlreadyRevoked(String),
    #[error("corrupt registry row: {0}")]
    Corrupt(String),
    #[error("no release {0}")]
    ReleaseNotFound(i64),
    #[error("release {id} of {service} in {environment} is in flight ({state})", id = .0.id, service = .0.service,
        environment = .0.environment, state = .0.state)]
    InFlight(Box<crate::model::release::Release>),
    #[error("release {id} is {state}, which does not allow that")]
    WrongState { id: i64, state: crate::model::release::State },
    #[error("release {id} expired at {at} without a decision")]
    ApprovalExpired { id: i64, at: crate::utc::Timestamp },
    #[error("no artifact {0}")]
    ArtifactNotFound(crate::digest::Digest),
    #[error("no artifact's digest starts with {0}")]
    NoDigest(crate::digest::DigestRef),
    #[error(
        "{reference} names more than one artifact: {}{}; give more of the digest",
        .matches.iter().take(artifacts::AMBIGUOUS_SHOWN).map(ToString::to_string).collect::<Vec<_>>().join(", "),
        if .matches.len() > artifacts::AMBIGUOUS_SHOWN { ", …" } else { "" }
    )]
    AmbiguousDigest { reference: crate::digest::DigestRef, matches: Vec<crate::digest::Digest> },
    #[error("artifact {digest} is blocked: {reason}")]
    ArtifactBlocked { digest: crate::digest::Digest, reason: String },
    #[error("the bytes of artifact {0} were purged")]
    ArtifactPurged(crate::digest::Digest),
}

pub struct Registry {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Readers>,
    /// Signalled when a reader connection goes back to the pool.
    reader_freed: Condvar,
    /// Counts this process's committed writes, so that a reader can wait for the next one.
    writes: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    /// Opens (creating if needed) the registry at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| RegistryError::CreateDir { path: dir.to_owned(), source })?;
        }
        let mut writer = Connection::open(path)?;
        configure(&writer)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        migrate::apply(&mut writer)?;
        Ok(Registry {
            path: path.to_owned(),
            writer: Mutex::new(writer),
            readers: Mutex::new(Readers::default()),
            reader_freed: Condvar::new(),
            writes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Changes with every write this process commits (and with [`Registry::nudge`]): a
    /// reader waits on it instead of polling.
    pub fn watch_writes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.writes.subscribe()
    }

    /// Wakes every [`Registry::watch_writes`] waiter without a write (the server is stopping).
    pub fn nudge(&self) {
        self.writes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, RegistryError>) -> Result<T, RegistryError> {
        let idle = {
            let mut readers = self.readers.lock().expect("reader pool lock");
            loop {
                if let Some(conn) = readers.idle.pop() {
                    break Some(conn);
                }
                if readers.open < MAX_READERS {
                    readers.open += 1;
                    break None;
                }
                readers = self.reader_freed.wait(readers).expect("reader pool lock");
            }
        };
        let conn = match idle {
            Some(conn) => conn,
            None => match self.open_reader() {
                Ok(conn) => conn,
                Err(e) => {
                    self.readers.lock().expect("reader pool lock").open -= 1;
                    self.reader_freed.notify_one();
                    return Err(e);
                }
            },
        };
        let lent = Lent { registry: self, conn: Some(conn) };
        f(lent.conn.as_ref().expect("lent until dropped"))
    }

    fn open_reader(&self) -> Result<Connection, RegistryError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        configure(&conn)?;
        Ok(conn)
    }

    fn write<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, RegistryError>) -> Result<T, RegistryError> {
        let mut conn = self.writer.lock().expect("registry writer lock");
        let written = f(&mut conn);
        drop(conn);
        if written.is_ok() {
            self.nudge();
        }
        written
    }
}

#[derive(Default)]
struct Readers {
    idle: Vec<Connection>,
    /// Idle and lent out.
    open: usize,
}

/// A reader connection lent out by [`Registry::read`]; back to the pool when dropped, even if
/// the read panicked.
struct Lent<'a> {
    registry: &'a Registry,
    conn: Option<Connection>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.registry.readers.lock().unwrap_or_else(|e| e.into_inner()).idle.push(conn);
            self.registry.reader_freed.notify_one();
        }
    }
}

/// A write transaction that takes the write lock at once: a deferred one could fail with
/// SQLITE_BUSY_SNAPSHOT when another process (the command line writing a token beside a
/// running server) wrote in between, and the busy timeout does not help with that.
fn immediate(conn: &mut Connection) -> Result<rusqlite::Transaction<'_>, RegistryError> {
    Ok(conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
}

impl Registry {}

fn configure(conn: &Connection) -> Result<(), RegistryError> {
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The registry row is the commit point of an upload and, later, of every release:
    // a committed transaction must survive a power cut.
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// `a,b` ↔ `["a", "b"]` for the comma-separated columns; `None` stays NULL.
fn join_list(list: &Option<Vec<String>>) -> Option<String> {
    list.as_ref().map(|l| l.join(","))
}

fn split_list(text: Option<String>) -> Option<Vec<String>> {
    text.map(|t| t.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
}

#[cfg(test)]
mod curation_tests;
#[cfg(test)]
mod tests;
