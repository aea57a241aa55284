//! Whether an upload would change nothing on record: what lets a repeat go unread.

use rusqlite::{OptionalExtension, params};

use super::artifacts::{UPLOAD_COLUMNS, query_artifact, upload_from_row};
use super::{Recorded, Registry, RegistryError};
use crate::digest::Digest;

impl Registry {
    /// What an upload of `digest` for `service` would leave exactly as it is, when it would:
    /// the artifact and that service's upload of it on record, its file index recorded, a
    /// check against every one of `shared` recorded, and its bytes not purged now. `None`: an
    /// upload could change something, and must be read, checked and recorded.
    pub fn unchanged_by_upload(
        &self,
        digest: Digest,
        service: &str,
        shared: &[String],
    ) -> Result<Option<Recorded>, RegistryError> {
        if !shared.is_empty() && !self.shared_checked(digest, shared)? {
            return Ok(None);
        }
        self.read(|conn| {
            let Some(artifact) = query_artifact(conn, digest)? else { return Ok(None) };
            let key = digest.to_string();
            let upload = conn
                .prepare_cached(&format!(
                    "SELECT {UPLOAD_COLUMNS} FROM artifact_uploads WHERE service = ?1 AND digest = ?2"
                ))?
                .query_row(params![service, key], upload_from_row)
                .optional()?;
            let Some(upload) = upload else { return Ok(None) };
            let indexed =
                conn.prepare_cached("SELECT 1 FROM artifact_indexes WHERE digest = ?1")?.exists(params![key])?;
            let purged = conn
                .prepare_cached(
                    "SELECT 1 FROM artifact_purges p WHERE p.digest = ?1
                       AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id)",
                )?
                .exists(params![key])?;
            Ok((indexed && !purged).then_some(Recorded { new_artifact: false, new_upload: false, artifact, upload }))
        })
    }
}
