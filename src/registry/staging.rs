//! The journal of uploads under way (`staged_uploads`): which staging keys exist and which
//! artifact key an upload is publishing, so that the start after a crash removes exactly what
//! a dead server's uploads left in the store, and nothing of another server's sharing the
//! bucket (storage-layout.md, "Crashes and interrupted uploads").

use rusqlite::{OptionalExtension, params};
use uuid::Uuid;

use super::{Registry, RegistryError};
use crate::digest::Digest;
use crate::utc;

/// An upload a server that is gone left under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftUpload {
    /// Its staging key's uuid.
    pub id: Uuid,
    /// The artifact key it was publishing, when the registry does not name those bytes (no
    /// artifact row, or its bytes purged and not restored): what it wrote there goes.
    pub unnamed_artifact: Option<Digest>,
}

impl Registry {
    /// Notes an upload's staging key before anything is written to it.
    pub fn stage_upload(&self, id: Uuid) -> Result<(), RegistryError> {
        self.write(|conn| {
            conn.execute(
                "INSERT INTO staged_uploads (id, started_at) VALUES (?1, ?2)",
                params![id.to_string(), utc::Timestamp::now()],
            )?;
            Ok(())
        })
    }

    /// Notes the artifact key an upload's verified bytes are about to be published under.
    pub fn publishing_upload(&self, id: Uuid, digest: Digest) -> Result<(), RegistryError> {
        self.write(|conn| {
            conn.execute(
                "UPDATE staged_uploads SET digest = ?2 WHERE id = ?1",
                params![id.to_string(), digest.to_string()],
            )?;
            Ok(())
        })
    }

    /// The upload ended (recorded, refused or aborted): forgets it.
    pub fn unstage_upload(&self, id: Uuid) -> Result<(), RegistryError> {
        self.write(|conn| {
            conn.execute("DELETE FROM staged_uploads WHERE id = ?1", [id.to_string()])?;
            Ok(())
        })
    }

    /// Every upload still noted: at start, those a server that is gone left under way.
    pub fn left_uploads(&self) -> Result<Vec<LeftUpload>, RegistryError> {
        self.read(|conn| {
            let mut statement = conn.prepare(
                "SELECT s.id, s.digest,
                        s.digest IS NOT NULL AND (
                          NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.digest = s.digest)
                          OR EXISTS (SELECT 1 FROM artifact_purges p WHERE p.digest = s.digest
                                     AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id)))
                 FROM staged_uploads s ORDER BY s.started_at",
            )?;
            let rows = statement.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, bool>(2)?))
            })?;
            let mut left = Vec::new();
            for row in rows {
                let (id, digest, unnamed) = row?;
                let id = id.parse().map_err(|_| RegistryError::Corrupt(format!("staged upload id {id:?}")))?;
                let unnamed_artifact = match digest.filter(|_| unnamed) {
                    Some(d) => Some(d.parse().map_err(|_| RegistryError::Corrupt(format!("staged digest {d:?}")))?),
                    None => None,
                };
                left.push(LeftUpload { id, unnamed_artifact });
            }
            Ok(left)
        })
    }

    /// Artifacts whose bytes are purged now (a purge not undone by a restore): at start, any
    /// bytes of theirs still in the store are what a purge cut short left.
    pub fn purged_artifacts(&self) -> Result<Vec<Digest>, RegistryError> {
        self.read(|conn| {
            let mut statement = conn.prepare(
                "SELECT DISTINCT p.digest FROM artifact_purges p
                 WHERE NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id)",
            )?;
            let digests = statement.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for d in digests {
                let d = d?;
                out.push(d.parse().map_err(|_| RegistryError::Corrupt(format!("purged digest {d:?}")))?);
            }
            Ok(out)
        })
    }

    /// Whether an upload is noted (tests).
    pub fn is_staged(&self, id: Uuid) -> Result<bool, RegistryError> {
        self.read(|conn| {
            Ok(conn
                .query_row("SELECT 1 FROM staged_uploads WHERE id = ?1", [id.to_string()], |_| Ok(()))
                .optional()?
                .is_some())
        })
    }
}
