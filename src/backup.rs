//! Registry backups in the object store, and restoring one (`release backup`, `release restore`,
//! and the server's scheduled backups).
//!
//! A backup is a consistent SQLite snapshot (the online backup API, one read transaction),
//! zstd-compressed, under `backups/registry-<UTC>.db.zst`, with a manifest beside it naming its
//! SHA-256, its size and the audit chain head it holds. A restore checks the digest, writes
//! the registry through a temporary file (fsync, rename), and appends a `registry.restored`
//! event. A snapshot older than the bucket's newest audit checkpoint lost the events after it:
//! the event then takes the sequence number after the checkpoint's, names the lost range, and
//! records the checkpoint, so that `audit verify` and the start-up check accept exactly that
//! gap (see `audit.rs`). See `storage-layout.md` and `docs/operations.md`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::audit::{Checkpoint, NewEvent};
use crate::datadir::LockError;
use crate::registry::{RESTORED, Registry, RegistryError, SnapshotHead};
use crate::store::{BackupStamp, Store, StoreError};
use crate::utc::Timestamp;

/// zstd level of snapshots: a registry compresses about 5:1 at this level, quickly.
const LEVEL: i32 = 9;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("no backup in the object store (nothing under backups/)")]
    NoBackups,
    #[error("no backup {0} in the object store")]
    UnknownKey(String),
    #[error("{0:?} does not name a backup (expected backups/registry-<yyyymmddThhmmss.mmmZ>.db.zst, or latest)")]
    BadKey(String),
    #[error("backup {key}: its manifest is unreadable: {why}")]
    BadManifest { key: String, why: String },
    #[error("backup {key} does not match its manifest: {why}")]
    Mismatch { key: String, why: String },
    #[error(
        "a registry exists at {0} already; restoring replaces it (and every event since the backup): give --force if that is what you want"
    )]
    RegistryExists(PathBuf),
    #[error("a release server is running on the data directory {0} (it holds its lock): stop it first")]
    Locked(PathBuf),
    #[error(transparent)]
    DataDir(LockError),
    #[error("backup {key} is not of this bucket's audit chain: {why}")]
    Diverged { key: String, why: String },
}

/// The manifest beside a snapshot (`backups/registry-<UTC>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The snapshot's key.
    pub key: String,
    /// Hex SHA-256 of the compressed bytes stored under `key`.
    pub sha256: String,
    /// Bytes stored under `key`.
    pub size: u64,
    /// Bytes of the SQLite file once decompressed.
    pub db_size: u64,
    /// The audit chain head the snapshot holds: the last event's sequence number and hash.
    pub events: u64,
    pub head: String,
    /// The registry's schema version (`PRAGMA user_version`).
    pub schema: u64,
    pub created_at: Timestamp,
    /// The release binary that took it.
    pub release_version: String,
}

/// Takes a backup of `registry` into `store`; returns its manifest.
pub async fn take(registry: &Arc<Registry>, store: &Store) -> Result<Manifest, BackupError> {
    let stamp = BackupStamp::now();
    let key = store.backup_key(stamp);
    let reader = Arc::clone(registry);
    let (compressed, head, db_size) =
        tokio::task::spawn_blocking(move || snapshot_compressed(&reader)).await.expect("a snapshot does not panic")?;
    let manifest = Manifest {
        key,
        sha256: crate::digest::Digest::of(&compressed).hex(),
        size: compressed.len() as u64,
        db_size,
        events: head.events,
        head: head.head,
        schema: head.schema,
        created_at: Timestamp::now(),
        release_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("serializes");
    store.put_backup(stamp, Bytes::from(compressed), Bytes::from(json)).await?;
    Ok(manifest)
}

fn snapshot_compressed(registry: &Registry) -> Result<(Vec<u8>, SnapshotHead, u64), BackupError> {
    let dir = registry.path().parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".backup-")
        .tempdir_in(dir)
        .map_err(|source| BackupError::Io { what: format!("a temporary directory in {}", dir.display()), source })?;
    let file = tmp.path().join("registry.db");
    let head = registry.snapshot(&file)?;
    let io = |source| BackupError::Io { what: format!("reading the snapshot {}", file.display()), source };
    let raw = std::fs::File::open(&file).map_err(io)?;
    let db_size = raw.metadata().map_err(io)?.len();
    let compressed = zstd::stream::encode_all(raw, LEVEL).map_err(io)?;
    Ok((compressed, head, db_size))
}

/// Deletes all but the newest `keep` backups (never the newest); returns how many went.
pub async fn prune(store: &Store, keep: usize) -> Result<usize, BackupError> {
    let stamps = store.list_backups().await?;
    let excess = stamps.len().saturating_sub(keep.max(1));
    for stamp in &stamps[..excess] {
        store.delete_backup(*stamp).await?;
    }
    Ok(excess)
}

/// Which backup to restore.
#[derive(Clone, Debug)]
pub enum Which {
    Latest,
    Key(String),
}

impl Which {
    pub fn parse(text: &str) -> Which {
        if text == "latest" { Which::Latest } else { Which::Key(text.to_owned()) }
    }
}

/// Events a restore lost: those after the snapshot up to the bucket's newest checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Lost {
    pub from: u64,
    pub to: u64,
    pub count: u64,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct Restored {
    pub manifest: Manifest,
    /// The bucket's newest checkpoint when restoring, if any.
    pub checkpoint: Option<Checkpoint>,
    pub lost: Option<Lost>,
    /// The `registry.restored` event's sequence number.
    pub event: u64,
    pub registry: PathBuf,
}

/// Restores a backup into `registry_path` (in `data_dir`, whose lock it holds throughout).
pub async fn restore(
    data_dir: &Path,
    registry_path: &Path,
    store: &Store,
    which: Which,
    force: bool,
) -> Result<Restored, BackupError> {
    let _lock = crate::datadir::lock(data_dir).map_err(|e| match e {
        LockError::Held(_) => BackupError::Locked(data_dir.to_owned()),
        other => BackupError::DataDir(other),
    })?;
    if registry_path.exists() && !force {
        return Err(BackupError::RegistryExists(registry_path.to_owned()));
    }
    let stamp = match which {
        Which::Latest => *store.list_backups().await?.last().ok_or(BackupError::NoBackups)?,
        Which::Key(text) => BackupStamp::parse(&text).ok_or(BackupError::BadKey(text))?,
    };
    let key = store.backup_key(stamp);
    let (compressed, manifest) = match store.get_backup(stamp).await {
        Ok(got) => got,
        Err(StoreError::NotFound { .. }) => return Err(BackupError::UnknownKey(key)),
        Err(e) => return Err(e.into()),
    };
    let manifest: Manifest = serde_json::from_slice(&manifest)
        .map_err(|e| BackupError::BadManifest { key: key.clone(), why: e.to_string() })?;
    let mismatch = |why: String| BackupError::Mismatch { key: key.clone(), why };
    let digest = crate::digest::Digest::of(&compressed).hex();
    if digest != manifest.sha256 || compressed.len() as u64 != manifest.size {
        return Err(mismatch(format!(
            "its bytes ({} bytes) hash to {digest}, the manifest says {} ({} bytes)",
            compressed.len(),
            manifest.sha256,
            manifest.size
        )));
    }
    let checkpoint = match store.latest_checkpoint().await? {
        Some((ckey, bytes)) => Some(
            serde_json::from_slice::<Checkpoint>(&bytes)
                .map_err(|e| BackupError::BadManifest { key: ckey, why: e.to_string() })?,
        ),
        None => None,
    };

    let tmp = registry_path.with_file_name(format!(
        "{}.restoring",
        registry_path.file_name().map_or("registry.db".into(), |n| n.to_string_lossy())
    ));
    // Whatever refuses the snapshot from here on leaves no half-restored file behind (once
    // renamed into place, there is nothing left to remove).
    let _scratch = RemoveOnDrop(tmp.clone());
    let (tmp_w, reg) = (tmp.clone(), registry_path.to_owned());
    let head = tokio::task::spawn_blocking(move || write_snapshot(&compressed, &tmp_w))
        .await
        .expect("writing a snapshot does not panic")?;
    if head.events != manifest.events || head.head != manifest.head {
        return Err(mismatch(format!(
            "the snapshot's audit head is {} {}, the manifest says {} {}",
            head.events, head.head, manifest.events, manifest.head
        )));
    }
    if head.schema > crate::registry::known_schema() {
        return Err(BackupError::Registry(RegistryError::TooNew {
            found: head.schema as usize,
            known: crate::registry::known_schema() as usize,
        }));
    }
    // What the bucket knew beyond the snapshot is lost; a checkpoint within it must be its own.
    let lost = match &checkpoint {
        Some(c) if c.events > head.events => {
            Some(Lost { from: head.events + 1, to: c.events, count: c.events - head.events })
        }
        Some(c) => {
            let (tmp_r, seq) = (tmp.clone(), c.events);
            let at = tokio::task::spawn_blocking(move || crate::registry::snapshot_event_hash(&tmp_r, seq))
                .await
                .expect("no panic")?;
            if at.as_deref() != Some(c.head.as_str()) {
                return Err(BackupError::Diverged {
                    key,
                    why: format!(
                        "the bucket's checkpoint of {} says event {} has hash {}; the snapshot's has {}",
                        c.at,
                        c.events,
                        c.head,
                        at.unwrap_or_else(|| "none".into())
                    ),
                });
            }
            None
        }
        None => None,
    };

    let placed = tokio::task::spawn_blocking(move || place(&tmp, &reg)).await.expect("no panic");
    placed?;
    let registry = {
        let path = registry_path.to_owned();
        crate::registry::run(move || Registry::open(&path)).await?
    };
    let details = serde_json::json!({
        "key": manifest.key,
        "sha256": manifest.sha256,
        "created_at": manifest.created_at,
        "snapshot": {"events": head.events, "head": head.head},
        "checkpoint": checkpoint.as_ref().map(|c| serde_json::json!({"events": c.events, "head": c.head, "at": c.at})),
        "lost": lost,
    });
    let event = NewEvent::by_local_user(RESTORED, format!("registry/{}", stamp.text()), details);
    let seq = lost.as_ref().map(|l| l.to + 1);
    let appended = crate::registry::run(move || registry.append_restored(&event, seq)).await?;
    Ok(Restored { manifest, checkpoint, lost, event: appended.seq, registry: registry_path.to_owned() })
}

/// Removes a file when dropped, if it is still there.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Decompresses a snapshot into `tmp` (fsynced) and reads its audit head.
fn write_snapshot(compressed: &[u8], tmp: &Path) -> Result<SnapshotHead, BackupError> {
    let io = |source| BackupError::Io { what: format!("writing {}", tmp.display()), source };
    let mut file = std::fs::File::create(tmp).map_err(io)?;
    zstd::stream::copy_decode(compressed, &mut file).map_err(io)?;
    file.flush().map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    Ok(crate::registry::snapshot_head(tmp)?)
}

/// Puts the restored file in place: the old registry's WAL and shared memory go first (an old
/// WAL beside the new file would be replayed into it), then one rename, then the directory is
/// fsynced.
fn place(tmp: &Path, registry: &Path) -> Result<(), BackupError> {
    let io = |what: String| move |source| BackupError::Io { what, source };
    for suffix in ["-wal", "-shm", "-journal"] {
        let side = PathBuf::from(format!("{}{suffix}", registry.display()));
        match std::fs::remove_file(&side) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", side.display()))(e)),
        }
    }
    std::fs::rename(tmp, registry).map_err(io(format!("renaming {} to {}", tmp.display(), registry.display())))?;
    let dir = registry.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing {}", dir.display())))?;
    Ok(())
}
