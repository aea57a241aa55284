//! Reads of releases: one (with its whole story), history, status, what went live and
//! what a rollback may go back to.

use super::*;

impl Registry {
    pub fn release(&self, id: i64) -> Result<Option<Release>, RegistryError> {
        self.read(|conn| by_id(conn, id))
    }

    /// A release's state and how many transitions and node phases it has recorded: what a
    /// follower compares before it reads the whole story again. `None`: no such release.
    pub fn release_progress(&self, id: i64) -> Result<Option<(State, usize)>, RegistryError> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT state,
                        (SELECT count(*) FROM release_transitions WHERE release_id = ?1)
                      + (SELECT count(*) FROM deployments WHERE release_id = ?1)
                 FROM releases WHERE id = ?1",
            )?
            .query_row([id], |row| Ok((state_at(row, 0)?, row.get::<_, i64>(1)? as usize)))
            .optional()
            .map_err(Into::into)
        })
    }

    /// A release with its story.
    pub fn release_detail(&self, id: i64) -> Result<Option<Detail>, RegistryError> {
        self.read(|conn| {
            let Some(release) = by_id(conn, id)? else { return Ok(None) };
            let version = upload_version(conn, &release.service, release.digest)?;
            let transitions = {
                let mut stmt = conn.prepare_cached(
                    "SELECT state, at, actor, reason FROM release_transitions WHERE release_id = ?1 ORDER BY id",
                )?;
                stmt.query_map([id], |r| {
                    Ok(Transition { state: state_at(r, 0)?, at: r.get(1)?, actor: r.get(2)?, reason: r.get(3)? })
                })?
                .collect::<Result<Vec<_>, _>>()?
            };
            let approval = approval_of(conn, id)?;
            let deployments = {
                let mut stmt = conn.prepare_cached(
                    "SELECT node, phase, started_at, finished_at, outcome, output_tail FROM deployments
                     WHERE release_id = ?1 ORDER BY id",
                )?;
                stmt.query_map([id], |r| {
                    Ok(Deployment {
                        node: r.get(0)?,
                        phase: phase_at(r, 1)?,
                        started_at: r.get(2)?,
                        finished_at: r.get(3)?,
                        outcome: outcome_at(r, 4)?,
                        output_tail: r.get(5)?,
                        shared_files: vec![],
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?
            };
            let excluded_nodes = {
                let mut stmt =
                    conn.prepare_cached("SELECT node FROM release_exclusions WHERE release_id = ?1 ORDER BY node")?;
                stmt.query_map([id], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?
            };
            let stranded = crate::registry::marks::stranded_by(conn, id)?;
            let forced_past_migrations: Vec<String> = conn
                .query_row("SELECT migrations FROM release_forced_migrations WHERE release_id = ?1", [id], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?
                .map(|json| serde_json::from_str(&json))
                .transpose()
                .map_err(|e| RegistryError::Corrupt(format!("release_forced_migrations of {id}: {e}")))?
                .unwrap_or_default();
            let adopted = adoption_of(conn, id)?;
            let (config_digest, verified) = conn
                .query_row("SELECT config_digest, verifies FROM release_configs WHERE release_id = ?1", [id], |r| {
                    Ok((Some(digest_at(r, 0)?), Some(r.get::<_, bool>(1)?)))
                })
                .optional()?
                .unwrap_or((None, None));
            // Verified or not is said of a release that went live: one that failed (before its
            // health check, or by it) was never verified, whatever its check could prove.
            let went_live = matches!(release.state, State::Live | State::Superseded);
            let verified = verified.filter(|_| went_live);
            let shared_files = {
                let mut stmt = conn.prepare_cached(
                    "SELECT node, path, kind, sha256 FROM release_shared_files WHERE release_id = ?1 ORDER BY node, path",
                )?;
                stmt.query_map([id], |r| {
                    let sha256: Option<String> = r.get(3)?;
                    Ok(SharedFile {
                        node: r.get(0)?,
                        path: r.get(1)?,
                        kind: r.get(2)?,
                        sha256: sha256.map(|s| s.parse().map_err(|e| conversion(3, e))).transpose()?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?
            };
            let webhook_deliveries = crate::registry::webhooks::deliveries_of(conn, id)?;
            Ok(Some(Detail {
                release,
                version,
                transitions,
                approval,
                deployments,
                excluded_nodes,
                stranded,
                forced_past_migrations,
                config_digest,
                verified,
                shared_files,
                adopted,
                webhook_deliveries,
            }))
        })
    }

    /// Releases, newest first, optionally of one service and/or environment; `before` is
    /// the id from a previous page.
    pub fn history(
        &self,
        service: Option<&str>,
        environment: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<Release>, RegistryError> {
        self.read(|conn| {
            let before = before.unwrap_or(i64::MAX);
            let sql = match (service, environment) {
                (Some(_), Some(_)) => format!(
                    "SELECT {COLUMNS} FROM releases WHERE service = ?1 AND environment = ?2 AND id < ?3 ORDER BY id DESC LIMIT ?4"
                ),
                (Some(_), None) => format!(
                    "SELECT {COLUMNS} FROM releases WHERE service = ?1 AND ?2 IS NULL AND id < ?3 ORDER BY id DESC LIMIT ?4"
                ),
                (None, Some(_)) => format!(
                    "SELECT {COLUMNS} FROM releases WHERE ?1 IS NULL AND environment = ?2 AND id < ?3 ORDER BY id DESC LIMIT ?4"
                ),
                (None, None) => format!(
                    "SELECT {COLUMNS} FROM releases WHERE ?1 IS NULL AND ?2 IS NULL AND id < ?3 ORDER BY id DESC LIMIT ?4"
                ),
            };
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![service, environment, before, limit], from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// What is live and in flight, for every configured service and environment (or one
    /// service), in the environments' lifecycle order.
    pub fn status(&self, service: Option<&str>) -> Result<Vec<StatusRow>, RegistryError> {
        self.read(|conn| {
            let mut cells = Vec::new();
            let mut stmt = conn.prepare_cached(
                "SELECT s.name, e.name FROM services s CROSS JOIN environments e
                 WHERE s.active = 1 AND e.active = 1 AND (?1 IS NULL OR s.name = ?1) ORDER BY s.name, e.position",
            )?;
            let pairs: Vec<(String, String)> =
                stmt.query_map([service], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            for (service, environment) in pairs {
                let live = live(conn, &service, &environment)?;
                let version = match &live {
                    Some(r) => upload_version(conn, &service, r.digest)?,
                    None => None,
                };
                let verified = match &live {
                    Some(r) => conn
                        .query_row("SELECT verifies FROM release_configs WHERE release_id = ?1", [r.id], |row| {
                            row.get::<_, bool>(0)
                        })
                        .optional()?,
                    None => None,
                };
                let in_flight = in_flight(conn, &service, &environment)?.map(|r| r.id);
                let pending: Vec<i64> = {
                    let mut stmt = conn.prepare_cached(
                        "SELECT id FROM releases WHERE service = ?1 AND environment = ?2 AND state = 'pending_approval'
                         ORDER BY id",
                    )?;
                    stmt.query_map(params![service, environment], |r| r.get(0))?.collect::<Result<_, _>>()?
                };
                cells.push(StatusRow {
                    digest: live.as_ref().map(|r| r.digest),
                    release: live.as_ref().map(|r| r.id),
                    since: live.as_ref().map(|r| r.state_changed_at.clone()),
                    live_by: live.as_ref().map(|r| r.requested_by.clone()),
                    version,
                    verified,
                    in_flight,
                    pending,
                    stranded: crate::registry::marks::stranded_in(conn, &service, &environment)?,
                    nodes: None,
                    nodes_asked_at: None,
                    service,
                    environment,
                });
            }
            Ok(cells)
        })
    }

    pub fn live_release(&self, service: &str, environment: &str) -> Result<Option<Release>, RegistryError> {
        self.read(|conn| live(conn, service, environment))
    }

    /// Whether `digest` went live, successfully, in this service and environment at some time
    /// (an adopted legacy tree was live before the release that adopted it).
    pub fn went_live(&self, service: &str, environment: &str, digest: Digest) -> Result<bool, RegistryError> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM releases WHERE digest = ?1 AND environment = ?2 AND service = ?3
                   AND state IN ('live', 'superseded'))
                 OR EXISTS (SELECT 1 FROM release_adoptions a JOIN releases r ON r.id = a.release_id
                   WHERE a.digest = ?1 AND r.environment = ?2 AND r.service = ?3)",
                params![digest.to_string(), environment, service],
                |r| r.get(0),
            )?)
        })
    }

    /// Whether a release of `digest` in this service and environment was approved by an
    /// approver at some time, or `digest` is a legacy tree adopted by an approved release.
    pub fn was_approved(&self, service: &str, environment: &str, digest: Digest) -> Result<bool, RegistryError> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM approvals a JOIN releases r ON r.id = a.release_id
                   WHERE a.digest = ?1 AND r.environment = ?2 AND r.service = ?3 AND a.decision = 'approved')
                 OR EXISTS (SELECT 1 FROM release_adoptions d JOIN approvals a ON a.release_id = d.release_id
                   JOIN releases r ON r.id = d.release_id
                   WHERE d.digest = ?1 AND r.environment = ?2 AND r.service = ?3 AND a.decision = 'approved')",
                params![digest.to_string(), environment, service],
                |r| r.get(0),
            )?)
        })
    }

    /// The digest of the newest release before `live` that went live successfully with
    /// another digest; failing that, the legacy tree adopted by `live` or a release before it.
    /// A blocked artifact is never a target (it never goes live again).
    pub fn rollback_target(&self, live: &Release) -> Result<Option<Digest>, RegistryError> {
        self.read(|conn| {
            let params = params![live.service, live.environment, live.id, live.digest.to_string()];
            let before = conn
                .query_row(
                    "SELECT digest FROM releases WHERE service = ?1 AND environment = ?2 AND id < ?3
                     AND state = 'superseded' AND digest != ?4
                     AND NOT EXISTS (SELECT 1 FROM artifact_blocks b WHERE b.digest = releases.digest)
                     ORDER BY id DESC LIMIT 1",
                    params,
                    |r| digest_at(r, 0),
                )
                .optional()?;
            if before.is_some() {
                return Ok(before);
            }
            Ok(conn
                .query_row(
                    "SELECT a.digest FROM release_adoptions a JOIN releases r ON r.id = a.release_id
                     WHERE r.service = ?1 AND r.environment = ?2 AND r.id <= ?3 AND a.digest IS NOT NULL
                       AND a.digest != ?4 AND r.state IN ('live', 'superseded')
                       AND NOT EXISTS (SELECT 1 FROM artifact_blocks b WHERE b.digest = a.digest)
                     ORDER BY r.id DESC LIMIT 1",
                    params,
                    |r| digest_at(r, 0),
                )
                .optional()?)
        })
    }

    /// A release's `--adopt`, if it asked for one.
    pub fn adoption(&self, release_id: i64) -> Result<Option<Adoption>, RegistryError> {
        self.read(|conn| adoption_of(conn, release_id))
    }

    /// What nodes of (service, environment) must keep: every digest live for the service in
    /// any environment, the newest `keep` distinct digests that went live in this one (looked
    /// for among its newest `20 × keep` successful releases), and any legacy tree adopted here
    /// (the way back to before the first deploy).
    pub fn retained_digests(&self, service: &str, environment: &str, keep: u32) -> Result<Vec<Digest>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT digest FROM releases WHERE service = ?1 AND state = 'live'
                 UNION
                 SELECT digest FROM (SELECT digest, max(id) AS newest
                                     FROM (SELECT digest, id FROM releases WHERE service = ?1 AND environment = ?2
                                           AND state IN ('live', 'superseded') ORDER BY id DESC LIMIT ?3 * 20)
                                     GROUP BY digest ORDER BY newest DESC LIMIT ?3)
                 UNION
                 SELECT a.digest FROM release_adoptions a JOIN releases r ON r.id = a.release_id
                 WHERE r.service = ?1 AND r.environment = ?2 AND a.digest IS NOT NULL",
            )?;
            let rows = stmt.query_map(params![service, environment, keep], |r| digest_at(r, 0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The nodes left out of a release.
    pub fn excluded_nodes(&self, id: i64) -> Result<Vec<String>, RegistryError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT node FROM release_exclusions WHERE release_id = ?1 ORDER BY node")?;
            let rows = stmt.query_map([id], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Releases in a state, oldest first (start-up recovery).
    pub fn releases_in_state(&self, state: State) -> Result<Vec<Release>, RegistryError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {COLUMNS} FROM releases WHERE state = ?1 ORDER BY id"))?;
            let rows = stmt.query_map([state.as_str()], from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

/// A release's `--adopt`, if it asked for one: what its deploy captured (nothing yet: no
/// digest, no nodes).
fn adoption_of(conn: &rusqlite::Connection, release_id: i64) -> Result<Option<Adoption>, RegistryError> {
    let row: Option<(Option<String>, Option<String>)> = conn
        .query_row("SELECT digest, nodes FROM release_adoptions WHERE release_id = ?1", [release_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((digest, nodes)) = row else { return Ok(None) };
    let digest = digest.map(|d| d.parse().map_err(|e| conversion(0, e))).transpose()?;
    let nodes = match nodes {
        Some(text) => serde_json::from_str(&text).map_err(|e| conversion(1, e))?,
        None => vec![],
    };
    Ok(Some(Adoption { digest, nodes }))
}
