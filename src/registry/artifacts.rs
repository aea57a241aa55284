//! Artifact rows: the bytes' facts (`artifacts`) and who uploaded them for which service
//! (`artifact_uploads`).

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::{Registry, RegistryError};
use crate::digest::{Digest, DigestRef};
use crate::model::audit::NewEvent;
use crate::utc::Timestamp;

/// How many matches an ambiguous prefix's refusal names (one more is looked for, to say
/// there are more).
pub const AMBIGUOUS_SHOWN: usize = 10;

/// The facts of stored bytes, measured at ingest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Artifact {
    pub digest: Digest,
    pub size: u64,
    pub unpacked_size: u64,
    pub file_count: u64,
    pub migrations: Vec<String>,
    pub stored_at: Timestamp,
}

/// One service's record of an artifact: the labels CI gave and who uploaded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ArtifactUpload {
    pub service: String,
    pub digest: Digest,
    pub version: Option<String>,
    pub git_sha: Option<String>,
    pub build_url: Option<String>,
    pub uploaded_by: String,
    pub uploader_owner: String,
    pub uploaded_at: Timestamp,
}

/// What ingest hands over once bytes are verified and published.
#[derive(Clone, Debug)]
pub struct NewArtifact {
    pub digest: Digest,
    pub size: u64,
    pub unpacked_size: u64,
    pub file_count: u64,
    pub migrations: Vec<String>,
    /// The service's shared paths the upload was checked against (none: no check to record).
    pub shared_checked: Vec<String>,
    pub service: String,
    pub version: Option<String>,
    pub git_sha: Option<String>,
    pub build_url: Option<String>,
    pub uploaded_by: String,
    pub uploader_owner: String,
    /// Its per-file index, stored already (none: not computed, as for adopted trees' tests).
    pub index: Option<ArtifactIndex>,
    /// Whether an upload that turns out to change nothing (no new artifact, upload or
    /// restore) goes without an audit event: the uploader repeated it lately, and that
    /// repeat is on record (`ingest::repeats`).
    pub quiet_repeat: bool,
}

/// Where an artifact's per-file index is stored, and how large it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArtifactIndex {
    /// The SHA-256 of the stored index (its object key's name).
    pub sha256: Digest,
    /// Regular files listed.
    pub files: u64,
    /// Stored bytes.
    pub size: u64,
}

/// The outcome of recording an upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// True when these bytes were not stored before.
    pub new_artifact: bool,
    /// True when this service had no record of these bytes before (false: nothing changed).
    pub new_upload: bool,
    pub artifact: Artifact,
    pub upload: ArtifactUpload,
}

const ARTIFACT_COLUMNS: &str = "digest, size, unpacked_size, file_count, migrations, stored_at";
pub(super) const UPLOAD_COLUMNS: &str =
    "service, digest, version, git_sha, build_url, uploaded_by, uploader_owner, uploaded_at";

impl Registry {
    /// Records verified bytes and their upload for a service, in one transaction: the commit
    /// point of an upload. Existing rows are left exactly as they were.
    /// `event` is appended to the audit log in the same transaction, with the outcome
    /// (`new_artifact`, `new_upload`) added to its details.
    pub fn record_artifact(&self, new: &NewArtifact, event: &NewEvent) -> Result<Recorded, RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            let now = Timestamp::now();
            let migrations = serde_json::to_string(&new.migrations).expect("strings serialize");
            let new_artifact = tx.execute(
                "INSERT INTO artifacts (digest, size, unpacked_size, file_count, migrations, stored_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (digest) DO NOTHING",
                params![new.digest.to_string(), new.size, new.unpacked_size, new.file_count, migrations, now],
            )? == 1;
            let new_upload = tx.execute(
                "INSERT INTO artifact_uploads
                   (service, digest, version, git_sha, build_url, uploaded_by, uploader_owner, uploaded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (service, digest) DO NOTHING",
                params![
                    new.service,
                    new.digest.to_string(),
                    new.version,
                    new.git_sha,
                    new.build_url,
                    new.uploaded_by,
                    new.uploader_owner,
                    now
                ],
            )? == 1;
            if !new.shared_checked.is_empty() {
                record_shared_check(&tx, new.digest, &new.shared_checked)?;
            }
            if let Some(index) = &new.index {
                tx.execute(
                    "INSERT INTO artifact_indexes (digest, index_sha256, files, size, indexed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (digest) DO NOTHING",
                    params![new.digest.to_string(), index.sha256.to_string(), index.files, index.size, now],
                )?;
            }
            // Bytes purged before are stored again: each purge not yet undone is, now.
            let restored = tx.execute(
                "INSERT INTO artifact_restores (purge_id, restored_by, restored_at)
                 SELECT p.id, ?2, ?3 FROM artifact_purges p WHERE p.digest = ?1
                   AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id)",
                params![new.digest.to_string(), new.uploaded_by, now],
            )? > 0;
            let artifact = query_artifact(&tx, new.digest)?
                .ok_or_else(|| RegistryError::Corrupt("artifact row vanished".into()))?;
            let upload: ArtifactUpload = tx.query_row(
                &format!("SELECT {UPLOAD_COLUMNS} FROM artifact_uploads WHERE service = ?1 AND digest = ?2"),
                params![new.service, new.digest.to_string()],
                upload_from_row,
            )?;
            let mut event = event.clone();
            if let Some(details) = event.details.as_object_mut() {
                details.insert("new_artifact".into(), new_artifact.into());
                details.insert("new_upload".into(), new_upload.into());
                if restored {
                    details.insert("restored".into(), true.into());
                }
            }
            let no_op = !new_artifact && !new_upload && !restored;
            if !(no_op && new.quiet_repeat) {
                super::audit::append(&tx, &event)?;
            }
            tx.commit()?;
            Ok(Recorded { new_artifact, new_upload, artifact, upload })
        })
    }

    /// Where `digest`'s per-file index is stored, if one was recorded.
    pub fn artifact_index(&self, digest: Digest) -> Result<Option<ArtifactIndex>, RegistryError> {
        self.read(|conn| {
            let row = conn
                .prepare_cached("SELECT index_sha256, files, size FROM artifact_indexes WHERE digest = ?1")?
                .query_row(params![digest.to_string()], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, u64>(1)?, row.get::<_, u64>(2)?))
                })
                .optional()?;
            row.map(|(sha256, files, size)| {
                let sha256 = sha256.parse().map_err(|e| RegistryError::Corrupt(format!("artifact_indexes: {e}")))?;
                Ok(ArtifactIndex { sha256, files, size })
            })
            .transpose()
        })
    }

    /// Whether `digest` was found clean of every one of `shared` by one check (at its
    /// upload, or at an earlier request).
    pub fn shared_checked(&self, digest: Digest, shared: &[String]) -> Result<bool, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT shared FROM artifact_shared_checks WHERE digest = ?1")?;
            let checks = stmt.query_map([digest.to_string()], |r| r.get::<_, String>(0))?;
            for check in checks {
                let paths: Vec<String> = serde_json::from_str(&check?)
                    .map_err(|e| RegistryError::Corrupt(format!("artifact_shared_checks of {digest}: {e}")))?;
                if shared.iter().all(|s| paths.contains(s)) {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    /// Records that `digest` holds nothing at or under any of `shared`.
    pub fn record_shared_checked(&self, digest: Digest, shared: &[String]) -> Result<(), RegistryError> {
        self.write(|conn| record_shared_check(conn, digest, shared))
    }

    pub fn artifact(&self, digest: Digest) -> Result<Option<Artifact>, RegistryError> {
        self.read(|conn| query_artifact(conn, digest))
    }

    /// The one artifact a digest or a prefix of one names, among those uploaded for
    /// `services` (`None`: every artifact): a token limited to services resolves, and hears
    /// of, its own artifacts only. A whole digest is its own answer (whether it exists is the
    /// caller's next question); a prefix that names none or several is refused, naming them
    /// (at most [`AMBIGUOUS_SHOWN`]).
    pub fn resolve_digest(&self, reference: &DigestRef, services: Option<&[String]>) -> Result<Digest, RegistryError> {
        let prefix = match reference {
            DigestRef::Full(digest) => return Ok(*digest),
            DigestRef::Prefix(hex) => hex,
        };
        let scope = services.map(|s| serde_json::to_string(s).expect("names serialize"));
        let found: Vec<Digest> = self.read(|conn| {
            // GLOB on a literal prefix uses the primary key's index; the prefix is hex only.
            let mut stmt = conn.prepare_cached(
                "SELECT a.digest FROM artifacts a
                 WHERE a.digest GLOB ?1
                   AND (?2 IS NULL OR EXISTS (SELECT 1 FROM artifact_uploads u WHERE u.digest = a.digest
                                              AND u.service IN (SELECT value FROM json_each(?2))))
                 ORDER BY a.digest LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(params![format!("{}{prefix}*", Digest::PREFIX), scope, AMBIGUOUS_SHOWN as i64 + 1], |r| {
                    super::releases::digest_at(r, 0)
                })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?;
        match found.as_slice() {
            [] => Err(RegistryError::NoDigest(reference.clone())),
            [one] => Ok(*one),
            several => Err(RegistryError::AmbiguousDigest { reference: reference.clone(), matches: several.to_vec() }),
        }
    }

    /// The largest unpacked size of the artifacts uploaded for `service` (0: none yet): the
    /// room one more release of it takes on a node.
    pub fn largest_unpacked(&self, service: &str) -> Result<u64, RegistryError> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT coalesce(max(a.unpacked_size), 0) FROM artifacts a
                 JOIN artifact_uploads u ON u.digest = a.digest WHERE u.service = ?1",
                [service],
                |r| r.get::<_, i64>(0),
            )? as u64)
        })
    }

    /// Every service's upload record of a digest, oldest first.
    pub fn artifact_uploads(&self, digest: Digest) -> Result<Vec<ArtifactUpload>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM artifact_uploads WHERE digest = ?1 ORDER BY id"
            ))?;
            let rows = stmt.query_map([digest.to_string()], upload_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// A service's artifacts, newest upload first; `before` is the cursor from a previous page.
    pub fn service_artifacts(
        &self,
        service: &str,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<ListedArtifact>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT u.id, a.size, u.service, u.digest, u.version, u.git_sha, u.build_url,
                        u.uploaded_by, u.uploader_owner, u.uploaded_at
                 FROM artifact_uploads u JOIN artifacts a ON a.digest = u.digest
                 WHERE u.service = ?1 AND u.id < ?2 ORDER BY u.id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![service, before.unwrap_or(i64::MAX), limit], |row| {
                Ok(ListedArtifact { cursor: row.get(0)?, size: row.get(1)?, upload: upload_from_row_at(row, 2)? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

/// One row of a service's artifact list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ListedArtifact {
    #[serde(skip)]
    pub cursor: i64,
    pub size: u64,
    #[serde(flatten)]
    pub upload: ArtifactUpload,
}

pub(super) fn query_artifact(conn: &rusqlite::Connection, digest: Digest) -> Result<Option<Artifact>, RegistryError> {
    let row = conn
        .query_row(
            &format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE digest = ?1"),
            [digest.to_string()],
            |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, u64>(1)?,
                    row.get::<_, u64>(2)?,
                    row.get::<_, u64>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, Timestamp>(5)?,
                ))
            },
        )
        .optional()?;
    row.map(|(digest, size, unpacked_size, file_count, migrations, stored_at)| {
        Ok(Artifact {
            digest: digest.parse().map_err(|e| RegistryError::Corrupt(format!("{e}")))?,
            size,
            unpacked_size,
            file_count,
            migrations: serde_json::from_str(&migrations)
                .map_err(|e| RegistryError::Corrupt(format!("migrations of {digest}: {e}")))?,
            stored_at,
        })
    })
    .transpose()
}

pub(super) fn upload_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ArtifactUpload> {
    upload_from_row_at(row, 0)
}

fn upload_from_row_at(row: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<ArtifactUpload> {
    let digest: String = row.get(at + 1)?;
    Ok(ArtifactUpload {
        service: row.get(at)?,
        digest: digest
            .parse()
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(at + 1, rusqlite::types::Type::Text, Box::new(e)))?,
        version: row.get(at + 2)?,
        git_sha: row.get(at + 3)?,
        build_url: row.get(at + 4)?,
        uploaded_by: row.get(at + 5)?,
        uploader_owner: row.get(at + 6)?,
        uploaded_at: row.get(at + 7)?,
    })
}

/// An admin's block on an artifact: it is never deployable again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Block {
    pub reason: String,
    pub blocked_by: String,
    pub owner: String,
    pub blocked_at: Timestamp,
}

impl Registry {
    /// Blocks an artifact for good; `ArtifactBlocked` if it is blocked already. In the same
    /// transaction, every release of it waiting for approval, or approved and not started, is
    /// cancelled (each with its transition and its `release.cancel` event, which webhooks
    /// send): a blocked artifact never goes live, whatever was pending when it was blocked.
    /// Returns the block and the releases it cancelled. A release already deploying is left
    /// to its run, which checks the block before each node prepares and before the switch.
    pub fn block_artifact(
        &self,
        digest: Digest,
        block: &Block,
        event: &NewEvent,
    ) -> Result<(Block, Vec<crate::model::release::Release>), RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            if query_artifact(&tx, digest)?.is_none() {
                return Err(RegistryError::ArtifactNotFound(digest));
            }
            if let Some(existing) = query_block(&tx, digest)? {
                return Err(RegistryError::ArtifactBlocked { digest, reason: existing.reason });
            }
            tx.execute(
                "INSERT INTO artifact_blocks (digest, reason, blocked_by, owner, blocked_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![digest.to_string(), block.reason, block.blocked_by, block.owner, Timestamp::now()],
            )?;
            super::audit::append(&tx, event)?;
            let stored = query_block(&tx, digest)?.ok_or_else(|| RegistryError::Corrupt("block row vanished".into()))?;
            let cancelled = super::releases::cancel_blocked(&tx, digest, &stored, (&block.blocked_by, &block.owner))?;
            tx.commit()?;
            Ok((stored, cancelled))
        })
    }

    pub fn artifact_block(&self, digest: Digest) -> Result<Option<Block>, RegistryError> {
        self.read(|conn| query_block(conn, digest))
    }

    /// When the artifact's bytes were last purged, if ever.
    pub fn last_purge(&self, digest: Digest) -> Result<Option<Timestamp>, RegistryError> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT purged_at FROM artifact_purges WHERE digest = ?1 ORDER BY id DESC LIMIT 1",
                    [digest.to_string()],
                    |r| r.get(0),
                )
                .optional()?)
        })
    }

    /// Artifacts whose bytes may be purged: stored (or stored again) before `cutoff`, never
    /// live anywhere, named by no release waiting or in flight, not an adopted legacy tree,
    /// and not purged now.
    pub fn purge_candidates(&self, cutoff: &Timestamp) -> Result<Vec<Digest>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT a.digest FROM artifacts a WHERE {PURGEABLE} ORDER BY a.stored_at, a.digest"
            ))?;
            let rows = stmt.query_map([cutoff], |r| r.get::<_, String>(0))?;
            rows.map(|d| d?.parse().map_err(|e| RegistryError::Corrupt(format!("{e}")))).collect()
        })
    }

    /// Records that an artifact's bytes are purged, if it still may be (the conditions of
    /// [`Registry::purge_candidates`], checked again in this transaction: a release requested
    /// or an adoption recorded since the candidates were listed keeps the bytes). False when
    /// it may not any more; nothing is recorded then. The triggers refuse the same.
    pub fn record_purge(
        &self,
        digest: Digest,
        cutoff: &Timestamp,
        by: &str,
        owner: &str,
        event: &NewEvent,
    ) -> Result<bool, RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            let purgeable: bool = tx.query_row(
                &format!("SELECT EXISTS (SELECT 1 FROM artifacts a WHERE a.digest = ?2 AND {PURGEABLE})"),
                params![cutoff, digest.to_string()],
                |r| r.get(0),
            )?;
            if !purgeable {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO artifact_purges (digest, purged_by, owner, purged_at) VALUES (?1, ?2, ?3, ?4)",
                params![digest.to_string(), by, owner, Timestamp::now()],
            )?;
            super::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(true)
        })
    }
}

/// What makes artifact `a` purgeable, given the cutoff as `?1`: its bytes stored (or last
/// stored again) before the cutoff; no release naming it ever live, waiting or in flight
/// (rejected, cancelled, expired and failed ones do not keep it); not an adopted legacy tree;
/// not purged now.
const PURGEABLE: &str = "
    max(a.stored_at, COALESCE((SELECT max(r.restored_at) FROM artifact_restores r
                               JOIN artifact_purges p ON p.id = r.purge_id WHERE p.digest = a.digest), '')) < ?1
    AND NOT EXISTS (SELECT 1 FROM releases r WHERE r.digest = a.digest
                    AND r.state IN ('live', 'superseded', 'pending_approval', 'approved', 'deploying'))
    AND NOT EXISTS (SELECT 1 FROM release_adoptions d WHERE d.digest = a.digest)
    AND NOT EXISTS (SELECT 1 FROM artifact_purges p WHERE p.digest = a.digest
                    AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id))";

/// Whether the artifact's bytes are purged now (purged, and not uploaded again since).
pub(super) fn purged_now(conn: &rusqlite::Connection, digest: Digest) -> Result<bool, RegistryError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM artifact_purges p WHERE p.digest = ?1
           AND NOT EXISTS (SELECT 1 FROM artifact_restores r WHERE r.purge_id = p.id))",
        [digest.to_string()],
        |r| r.get(0),
    )?)
}

pub(super) fn query_block(conn: &rusqlite::Connection, digest: Digest) -> Result<Option<Block>, RegistryError> {
    Ok(conn
        .query_row(
            "SELECT reason, blocked_by, owner, blocked_at FROM artifact_blocks WHERE digest = ?1",
            [digest.to_string()],
            |r| Ok(Block { reason: r.get(0)?, blocked_by: r.get(1)?, owner: r.get(2)?, blocked_at: r.get(3)? }),
        )
        .optional()?)
}

fn record_shared_check(conn: &rusqlite::Connection, digest: Digest, shared: &[String]) -> Result<(), RegistryError> {
    let mut paths = shared.to_vec();
    paths.sort();
    paths.dedup();
    conn.execute(
        "INSERT INTO artifact_shared_checks (digest, shared, checked_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (digest, shared) DO NOTHING",
        params![digest.to_string(), serde_json::to_string(&paths).expect("strings serialize"), Timestamp::now()],
    )?;
    Ok(())
}
