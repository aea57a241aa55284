//! What the store keeps besides artifacts: the audit checkpoints and the registry backups
//! (and the time stamp that names a backup's keys).

use super::*;

/// When a backup was taken, to the millisecond (UTC); names its keys
/// `backups/registry-<yyyymmddThhmmss.mmmZ>.db.zst` and `.json`, which sort by time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupStamp(pub i64);

const STAMP_FORMAT: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[year][month][day]T[hour][minute][second].[subsecond digits:3]Z");

impl BackupStamp {
    pub fn now() -> BackupStamp {
        BackupStamp((time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64)
    }

    /// The time, as in the key.
    pub fn text(self) -> String {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        t.format(STAMP_FORMAT).expect("formats")
    }

    /// Reads a stamp from a backup's key, its file name, or the time alone
    /// (`backups/registry-20261203T044012.345Z.db.zst`, `registry-….json`, `20261203T044012.345Z`).
    pub fn parse(text: &str) -> Option<BackupStamp> {
        let name = text.rsplit('/').next()?;
        let name = name.strip_prefix("registry-").unwrap_or(name);
        let name = name.strip_suffix(".db.zst").or_else(|| name.strip_suffix(".json")).unwrap_or(name);
        let t = time::PrimitiveDateTime::parse(name, STAMP_FORMAT).ok()?.assume_utc();
        Some(BackupStamp((t.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

impl Store {
    /// Writes an audit checkpoint: its own immutable key, then the head key readers look at.
    pub async fn put_checkpoint(&self, events: u64, json: Vec<u8>) -> Result<(), StoreError> {
        let payload = bytes::Bytes::from(json);
        for key in [Key::Checkpoint(events), Key::CheckpointHead] {
            self.inner.put(&self.path(key), payload.clone().into()).await.map_err(self.error(key))?;
        }
        Ok(())
    }

    /// The latest audit checkpoint (key and JSON), if any was written.
    pub async fn latest_checkpoint(&self) -> Result<Option<(String, Bytes)>, StoreError> {
        let key = Key::CheckpointHead;
        match self.inner.get(&self.path(key)).await {
            Ok(result) => Ok(Some((self.path(key).to_string(), result.bytes().await.map_err(self.error(key))?))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key)(e)),
        }
    }

    /// The key of a backup (for messages and manifests).
    pub fn backup_key(&self, stamp: BackupStamp) -> String {
        self.path(Key::Backup(stamp)).to_string()
    }

    /// Writes a backup: the snapshot, then its manifest (a backup is listed once both are there).
    pub async fn put_backup(&self, stamp: BackupStamp, snapshot: Bytes, manifest: Bytes) -> Result<(), StoreError> {
        for (key, bytes) in [(Key::Backup(stamp), snapshot), (Key::BackupManifest(stamp), manifest)] {
            self.inner.put(&self.path(key), bytes.into()).await.map_err(self.error(key))?;
        }
        Ok(())
    }

    /// The complete backups (those with a manifest), oldest first.
    pub async fn list_backups(&self) -> Result<Vec<BackupStamp>, StoreError> {
        let prefix = Path::from(format!("{}backups", self.prefix));
        let metas: Vec<_> = match self.inner.list(Some(&prefix)).try_collect().await {
            Ok(metas) => metas,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(source) => {
                return Err(StoreError::Backend { backend: self.describe(), key: prefix.to_string(), source });
            }
        };
        let mut stamps: Vec<BackupStamp> = metas
            .iter()
            .filter_map(|m| m.location.filename())
            .filter(|name| name.ends_with(".json"))
            .filter_map(BackupStamp::parse)
            .collect();
        stamps.sort();
        Ok(stamps)
    }

    /// A backup's snapshot bytes and its manifest.
    pub async fn get_backup(&self, stamp: BackupStamp) -> Result<(Bytes, Bytes), StoreError> {
        let mut out = Vec::new();
        for key in [Key::BackupManifest(stamp), Key::Backup(stamp)] {
            let result = self.inner.get(&self.path(key)).await.map_err(self.error(key))?;
            out.push(result.bytes().await.map_err(self.error(key))?);
        }
        let snapshot = out.pop().expect("two");
        Ok((snapshot, out.pop().expect("two")))
    }

    /// Removes a backup: its manifest first, so that a half-removed one is never listed.
    pub async fn delete_backup(&self, stamp: BackupStamp) -> Result<(), StoreError> {
        self.delete(Key::BackupManifest(stamp)).await?;
        self.delete(Key::Backup(stamp)).await
    }
}
