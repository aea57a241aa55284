//! What the web pages read beyond the release API: people's sessions, where an artifact has
//! been live, and who approved a page of releases.

use std::collections::HashMap;

use rusqlite::{OptionalExtension, params};

use super::{Registry, RegistryError};
use crate::digest::Digest;
use crate::model::audit::NewEvent;
use crate::utc::{self, Timestamp};

/// A signed-in session, as found by its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub token_id: String,
    pub expires_at: Timestamp,
}

/// One stay of an artifact live in a (service, environment).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LiveSpell {
    pub release: i64,
    pub service: String,
    pub environment: String,
    pub live_at: Timestamp,
    /// When another release replaced it; `None` while it is live.
    pub until: Option<Timestamp>,
}

impl Registry {
    /// Opens a session for the token (by id) and appends `event` (the sign-in) in the same
    /// transaction; `id_sha256` is the SHA-256 of the cookie's id.
    pub fn open_session(
        &self,
        id_sha256: &[u8; 32],
        token_id: &str,
        expires_at: &Timestamp,
        event: &NewEvent,
    ) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            let now = utc::Timestamp::now();
            // Sessions long over are of no use to anyone: dropped as new ones open.
            tx.execute(
                "DELETE FROM web_sessions WHERE expires_at < ?1",
                [utc::Timestamp::at(utc::now() - time::Duration::days(30))],
            )?;
            tx.execute(
                "INSERT INTO web_sessions (id_sha256, token_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![id_sha256.as_slice(), token_id, now, expires_at],
            )?;
            super::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// The live session with this id hash (not ended, not expired).
    pub fn session(&self, id_sha256: &[u8; 32]) -> Result<Option<Session>, RegistryError> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT token_id, expires_at FROM web_sessions
                     WHERE id_sha256 = ?1 AND ended_at IS NULL AND expires_at > ?2",
                    params![id_sha256.as_slice(), utc::Timestamp::now()],
                    |r| Ok(Session { token_id: r.get(0)?, expires_at: r.get(1)? }),
                )
                .optional()?)
        })
    }

    /// Signs a session out and appends the event `event` makes of its token's name and owner
    /// (the sign-out) in the same transaction; whether a session was open.
    pub fn end_session(
        &self,
        id_sha256: &[u8; 32],
        event: impl FnOnce(&str, &str) -> NewEvent,
    ) -> Result<bool, RegistryError> {
        self.write(|conn| {
            let tx = super::immediate(conn)?;
            let token: Option<(Option<String>, Option<String>)> = tx
                .query_row(
                    "UPDATE web_sessions SET ended_at = ?2 WHERE id_sha256 = ?1 AND ended_at IS NULL
                     RETURNING (SELECT name FROM tokens WHERE id = token_id),
                               (SELECT owner FROM tokens WHERE id = token_id)",
                    params![id_sha256.as_slice(), utc::Timestamp::now()],
                    |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<String>>(1)?)),
                )
                .optional()?;
            let Some((name, owner)) = token else { return Ok(false) };
            // A session outlives no token (tokens are never deleted); were its row gone, the
            // sign-out would still end the session, with no event naming nobody.
            if let (Some(name), Some(owner)) = (name, owner) {
                super::audit::append(&tx, &event(&name, &owner))?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    /// Every time `digest` went live, newest first (at most `limit`).
    pub fn live_spells(
        &self,
        digest: Digest,
        services: Option<&[String]>,
        environments: Option<&[String]>,
        limit: u32,
    ) -> Result<Vec<LiveSpell>, RegistryError> {
        // The scope is applied in the query, so that `limit` counts only what may be shown.
        let scope = |names: Option<&[String]>| names.map(|n| serde_json::to_string(n).expect("names serialize"));
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT r.id, r.service, r.environment, t.at,
                        CASE WHEN r.state = 'superseded' THEN r.state_changed_at END
                 FROM releases r JOIN release_transitions t ON t.release_id = r.id AND t.state = 'live'
                 WHERE r.digest = ?1 AND r.state IN ('live', 'superseded')
                   AND (?3 IS NULL OR r.service IN (SELECT value FROM json_each(?3)))
                   AND (?4 IS NULL OR r.environment IN (SELECT value FROM json_each(?4)))
                 ORDER BY r.id DESC LIMIT ?2",
            )?;
            let params = params![digest.to_string(), limit, scope(services), scope(environments)];
            let rows = stmt.query_map(params, |r| {
                Ok(LiveSpell {
                    release: r.get(0)?,
                    service: r.get(1)?,
                    environment: r.get(2)?,
                    live_at: r.get(3)?,
                    until: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// When each of these releases reached its outcome (live, failed, rejected, cancelled,
    /// expired), by release id: what the timeline's "took" measures up to.
    pub fn outcomes_at(&self, ids: &[i64]) -> Result<HashMap<i64, String>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT at FROM release_transitions WHERE release_id = ?1
                   AND state IN ('live', 'failed', 'rejected', 'cancelled', 'expired') ORDER BY id LIMIT 1",
            )?;
            let mut out = HashMap::new();
            for id in ids {
                if let Some(at) = stmt.query_row([id], |r| r.get::<_, String>(0)).optional()? {
                    out.insert(*id, at);
                }
            }
            Ok(out)
        })
    }

    /// Who approved (or rejected) each of these releases, by release id.
    pub fn deciders(&self, ids: &[i64]) -> Result<HashMap<i64, (String, String)>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT decision, decided_by FROM approvals WHERE release_id = ?1")?;
            let mut out = HashMap::new();
            for id in ids {
                if let Some(row) =
                    stmt.query_row([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).optional()?
                {
                    out.insert(*id, row);
                }
            }
            Ok(out)
        })
    }
}
