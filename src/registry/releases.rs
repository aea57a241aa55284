//! Release rows and their story: transitions, approvals, deployments, leases, the status
//! matrix. Every change is one transaction with its audit event.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Registry, RegistryError, immediate};
use crate::digest::Digest;
use crate::model::audit::AuditAction;
use crate::model::audit::NewEvent;
use crate::model::release::{Approval, Deployment, Detail, Kind, Release, SharedFile, State, StatusRow, Transition};
use crate::utc;

const COLUMNS: &str = "id, service, environment, digest, kind, state, requested_by, requester_owner, requested_at, \
                       source_environment, replaces, expires_at, state_changed_at";

/// A release about to be recorded.
#[derive(Clone, Debug)]
pub struct NewRelease {
    pub service: String,
    pub environment: String,
    pub digest: Digest,
    pub kind: Kind,
    /// `PendingApproval` or `Approved`.
    pub state: State,
    pub requested_by: String,
    pub requester_owner: String,
    pub source_environment: Option<String>,
    pub replaces: Option<i64>,
    pub expires_at: Option<String>,
    /// Why it needs no approval, or waits for one (recorded with the first transition).
    pub note: Option<String>,
    /// Nodes left out of this release.
    pub excluded: Vec<String>,
    /// `--adopt`: take over an application found at `current` deployed another way.
    pub adopt: bool,
    /// `--force`: the migration files the live artifact has and this one lacks.
    pub forced_past: Vec<String>,
}

/// A release's `--adopt`: asked for, and what its deploy captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adoption {
    /// The legacy tree's package, kept as an artifact; `None` until captured.
    pub digest: Option<Digest>,
    /// The nodes whose `current` held that tree.
    pub nodes: Vec<String>,
}

/// A decision on a pending release.
#[derive(Clone, Debug)]
pub struct NewApproval {
    pub approve: bool,
    pub decided_by: String,
    pub decider_owner: String,
    pub reason: Option<String>,
}

/// How a deploy ended, as [`Registry::finish_deploy`] recorded it.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The release in its final state (`live` or `failed`).
    pub release: Release,
    /// When it became `deploying` (`None` if it never did).
    pub deploying_since: Option<String>,
    /// Releases waiting for approval that its going live cancelled.
    pub cancelled: Vec<Release>,
}

/// How a deploy ended, for [`Registry::finish_deploy`].
#[derive(Clone, Debug)]
pub enum Ending {
    /// Live on these nodes (those of them stranded are repaired).
    Live { nodes: Vec<String> },
    /// Failed, leaving these nodes stranded.
    Failed { reason: String, stranded: Vec<String> },
}

/// What [`Registry::start_deploy`] did.
#[derive(Clone, Debug)]
pub enum Start {
    /// `deploying`, with the lease.
    Deploying(Release),
    /// Another server holds the lease of (service, environment).
    Leased,
    /// Its artifact is blocked: it was cancelled, with these (itself among them).
    Blocked { block: super::Block, cancelled: Vec<Release> },
}

impl Start {
    /// The release, if it is deploying now.
    pub fn deploying(self) -> Option<Release> {
        match self {
            Start::Deploying(release) => Some(release),
            _ => None,
        }
    }
}

/// What the configuration declares, for the registry's own record.
#[derive(Clone, Debug)]
pub struct ConfiguredEnvironment {
    pub name: String,
    pub promote_from: Option<String>,
    pub requires_approval: bool,
}

impl Registry {
    /// Records the configured services and environments: new or changed ones are (re)activated,
    /// ones no longer configured marked inactive; each change is an event.
    pub fn sync_config(
        &self,
        services: &[(String, String)],
        environments: &[ConfiguredEnvironment],
    ) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let now = utc::now_text();
            for (name, kind) in services {
                let known: Option<(String, bool)> = tx
                    .query_row("SELECT kind, active FROM services WHERE name = ?1", [name], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                if known.as_ref() != Some(&(kind.clone(), true)) {
                    tx.execute(
                        "INSERT INTO services (name, kind, active, recorded_at) VALUES (?1, ?2, 1, ?3)
                         ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, active = 1,
                           recorded_at = excluded.recorded_at",
                        params![name, kind, now],
                    )?;
                    let event =
                        NewEvent::by_server(AuditAction::ConfigService, name, serde_json::json!({"kind": kind}));
                    super::audit::append(&tx, &event)?;
                }
            }
            for (position, env) in environments.iter().enumerate() {
                let known: Option<(i64, Option<String>, bool, bool)> = tx
                    .query_row(
                        "SELECT position, promote_from, requires_approval, active FROM environments WHERE name = ?1",
                        [&env.name],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()?;
                let wanted = (position as i64, env.promote_from.clone(), env.requires_approval, true);
                if known.as_ref() != Some(&wanted) {
                    tx.execute(
                        "INSERT INTO environments (name, position, promote_from, requires_approval, active, recorded_at)
                         VALUES (?1, ?2, ?3, ?4, 1, ?5)
                         ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                           promote_from = excluded.promote_from, requires_approval = excluded.requires_approval,
                           active = 1, recorded_at = excluded.recorded_at",
                        params![env.name, position as i64, env.promote_from, env.requires_approval, now],
                    )?;
                    let details = serde_json::json!({
                        "position": position, "promote_from": env.promote_from,
                        "requires_approval": env.requires_approval,
                    });
                    super::audit::append(
                        &tx,
                        &NewEvent::by_server(AuditAction::ConfigEnvironment, &env.name, details),
                    )?;
                }
            }
            for (table, configured) in [
                ("services", services.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()),
                ("environments", environments.iter().map(|e| e.name.clone()).collect()),
            ] {
                let active: Vec<String> = {
                    let mut stmt = tx.prepare(&format!("SELECT name FROM {table} WHERE active = 1"))?;
                    stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
                };
                for gone in active.iter().filter(|n| !configured.contains(n)) {
                    tx.execute(
                        &format!("UPDATE {table} SET active = 0, recorded_at = ?1 WHERE name = ?2"),
                        params![now, gone],
                    )?;
                    let action = if table == "services" {
                        AuditAction::ConfigServiceRetired
                    } else {
                        AuditAction::ConfigEnvironmentRetired
                    };
                    super::audit::append(&tx, &NewEvent::by_server(action, gone, serde_json::json!({})))?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Whether `name` is a service `release` knows of: configured now or before, or named by
    /// an upload.
    pub fn service_known(&self, name: &str) -> Result<bool, RegistryError> {
        self.read(|conn| {
            Ok(conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM services WHERE name = ?1)
                     OR EXISTS (SELECT 1 FROM artifact_uploads WHERE service = ?1)",
                [name],
                |r| r.get(0),
            )?)
        })
    }

    /// Whether `name` is an environment configured now or before.
    pub fn environment_known(&self, name: &str) -> Result<bool, RegistryError> {
        self.read(|conn| {
            Ok(conn.query_row("SELECT EXISTS (SELECT 1 FROM environments WHERE name = ?1)", [name], |r| r.get(0))?)
        })
    }

    /// Records a new release. One in flight per (service, environment): an `Approved` release
    /// is refused with [`RegistryError::InFlight`] while another is approved or deploying.
    pub fn create_release(&self, new: &NewRelease, event: &NewEvent) -> Result<Release, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            // Checked here, in the transaction that records the request, so that a block or a
            // purge committed since the caller looked is seen (the triggers refuse the same).
            if let Some(block) = super::artifacts::query_block(&tx, new.digest)? {
                return Err(RegistryError::ArtifactBlocked { digest: new.digest, reason: block.reason });
            }
            if super::artifacts::purged_now(&tx, new.digest)? {
                return Err(RegistryError::ArtifactPurged(new.digest));
            }
            if new.state.in_flight()
                && let Some(busy) = in_flight(&tx, &new.service, &new.environment)?
            {
                return Err(RegistryError::InFlight(Box::new(busy)));
            }
            let now = utc::now_text();
            tx.execute(
                "INSERT INTO releases (service, environment, digest, kind, state, requested_by, requester_owner,
                   requested_at, source_environment, replaces, expires_at, state_changed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?8)",
                params![
                    new.service,
                    new.environment,
                    new.digest.to_string(),
                    new.kind.as_str(),
                    new.state.as_str(),
                    new.requested_by,
                    new.requester_owner,
                    now,
                    new.source_environment,
                    new.replaces,
                    new.expires_at
                ],
            )
            .map_err(|e| in_flight_violation(e, &tx, &new.service, &new.environment))?;
            let id = tx.last_insert_rowid();
            for node in &new.excluded {
                tx.execute("INSERT INTO release_exclusions (release_id, node) VALUES (?1, ?2)", params![id, node])?;
            }
            if new.adopt {
                tx.execute("INSERT INTO release_adoptions (release_id) VALUES (?1)", [id])?;
            }
            if !new.forced_past.is_empty() {
                let files = serde_json::to_string(&new.forced_past).expect("strings serialize");
                tx.execute(
                    "INSERT INTO release_forced_migrations (release_id, migrations) VALUES (?1, ?2)",
                    params![id, files],
                )?;
            }
            record_transition(&tx, id, new.state, &now, &new.requested_by, new.note.as_deref())?;
            let mut event = event.clone();
            event.subject = format!("release/{id}");
            super::audit::append(&tx, &event)?;
            let release = by_id(&tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
            tx.commit()?;
            Ok(release)
        })
    }

    /// Moves a release to `to` if the state machine allows it from its current state.
    pub fn transition(
        &self,
        id: i64,
        to: State,
        actor: &str,
        reason: Option<&str>,
        event: &NewEvent,
    ) -> Result<Release, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let release = change_state(&tx, id, to, actor, reason)?;
            super::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(release)
        })
    }

    /// Approves (→ `approved`) or rejects (→ `rejected`) a pending release, recording the
    /// decision bound to its digest. Approval is refused while another release of the same
    /// service and environment is in flight, and whenever its artifact is blocked (also when
    /// the block has cancelled it already: the refusal names the block).
    pub fn decide(&self, id: i64, decision: &NewApproval, event: &NewEvent) -> Result<Release, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let release = by_id(&tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
            if decision.approve
                && let Some(block) = super::artifacts::query_block(&tx, release.digest)?
            {
                return Err(RegistryError::ArtifactBlocked { digest: release.digest, reason: block.reason });
            }
            if release.state != State::PendingApproval {
                return Err(RegistryError::WrongState { id, state: release.state });
            }
            if let Some(at) = &release.expires_at
                && *at <= utc::now_text()
            {
                return Err(RegistryError::ApprovalExpired { id, at: at.clone() });
            }
            if decision.approve
                && let Some(busy) = in_flight(&tx, &release.service, &release.environment)?
            {
                return Err(RegistryError::InFlight(Box::new(busy)));
            }
            tx.execute(
                "INSERT INTO approvals (release_id, digest, decision, decided_by, decider_owner, decided_at, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    release.digest.to_string(),
                    if decision.approve { "approved" } else { "rejected" },
                    decision.decided_by,
                    decision.decider_owner,
                    utc::now_text(),
                    decision.reason
                ],
            )?;
            let to = if decision.approve { State::Approved } else { State::Rejected };
            let release =
                change_state(&tx, id, to, &decision.decided_by, decision.reason.as_deref()).map_err(|e| match e {
                    RegistryError::Sqlite(e) => in_flight_violation(e, &tx, &release.service, &release.environment),
                    e => e,
                })?;
            super::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(release)
        })
    }

    /// Expires releases whose approval window has passed.
    pub fn expire_pending(&self) -> Result<Vec<Release>, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let now = utc::now_text();
            let due: Vec<i64> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT id FROM releases WHERE state = 'pending_approval' AND expires_at <= ?1 ORDER BY id",
                )?;
                stmt.query_map([&now], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            let mut expired = Vec::new();
            for id in due {
                let release = change_state(&tx, id, State::Expired, "release", Some("not approved in time"))?;
                let details = serde_json::json!({"expires_at": release.expires_at});
                super::audit::append(
                    &tx,
                    &NewEvent::by_server(AuditAction::ReleaseExpire, format!("release/{id}"), details),
                )?;
                expired.push(release);
            }
            tx.commit()?;
            Ok(expired)
        })
    }

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
                        phase: r.get(1)?,
                        started_at: r.get(2)?,
                        finished_at: r.get(3)?,
                        outcome: r.get(4)?,
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
            let stranded = super::marks::stranded_by(conn, id)?;
            let forced_past_migrations: Vec<String> = conn
                .query_row("SELECT migrations FROM release_forced_migrations WHERE release_id = ?1", [id], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?
                .map(|json| serde_json::from_str(&json))
                .transpose()
                .map_err(|e| RegistryError::Corrupt(format!("release_forced_migrations of {id}: {e}")))?
                .unwrap_or_default();
            let adopted = conn
                .query_row("SELECT digest, nodes FROM release_adoptions WHERE release_id = ?1", [id], |r| {
                    let nodes: Option<String> = r.get(1)?;
                    let nodes: serde_json::Value =
                        nodes.and_then(|n| serde_json::from_str(&n).ok()).unwrap_or_else(|| serde_json::json!([]));
                    Ok(serde_json::json!({"digest": r.get::<_, Option<String>>(0)?, "nodes": nodes}))
                })
                .optional()?;
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
            let webhook_deliveries = super::webhooks::deliveries_of(conn, id)?;
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
                    stranded: super::marks::stranded_in(conn, &service, &environment)?,
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
        self.read(|conn| {
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
        })
    }

    /// Records what a release's deploy adopted: the legacy tree's artifact and the nodes that
    /// held it, with an audit event. Once only.
    pub fn record_adoption(
        &self,
        release_id: i64,
        digest: Digest,
        nodes: &[String],
        event: &NewEvent,
    ) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let changed = tx.execute(
                "UPDATE release_adoptions SET digest = ?2, nodes = ?3, adopted_at = ?4
                 WHERE release_id = ?1 AND digest IS NULL",
                params![
                    release_id,
                    digest.to_string(),
                    serde_json::to_string(nodes).expect("names serialize"),
                    utc::now_text()
                ],
            )?;
            if changed == 1 {
                super::audit::append(&tx, event)?;
            }
            tx.commit()?;
            Ok(())
        })
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

    /// Records one node's phase of a release, with the shared files it found at a switch (the
    /// first switch to the release counts).
    pub fn record_deployment(&self, release_id: i64, deployment: &Deployment) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            for file in &deployment.shared_files {
                tx.execute(
                    "INSERT OR IGNORE INTO release_shared_files (release_id, node, path, kind, sha256, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        release_id,
                        deployment.node,
                        file.path,
                        file.kind,
                        file.sha256.map(|d| d.to_string()),
                        deployment.finished_at
                    ],
                )?;
            }
            tx.execute(
                "INSERT INTO deployments (release_id, node, phase, started_at, finished_at, outcome, output_tail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    release_id,
                    deployment.node,
                    deployment.phase,
                    deployment.started_at,
                    deployment.finished_at,
                    deployment.outcome,
                    deployment.output_tail
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Records the digest of the configuration a release's deploy runs with (the first
    /// record stands: a deploy finished after a restart keeps the one it started with).
    pub fn record_config(&self, release_id: i64, config_digest: Digest, verifies: bool) -> Result<(), RegistryError> {
        self.write(|conn| {
            conn.execute(
                "INSERT OR IGNORE INTO release_configs (release_id, config_digest, verifies, recorded_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![release_id, config_digest.to_string(), verifies, utc::now_text()],
            )?;
            Ok(())
        })
    }

    /// `approved → deploying` and the deploy lease, in one transaction: a release is never
    /// deploying without a lease, nor leased without deploying. [`Start::Leased`] when another
    /// owner holds an unexpired lease on (service, environment); [`Start::Blocked`] when its
    /// artifact is blocked: then it is cancelled instead (with every other release of the
    /// artifact still waiting or approved), in this transaction.
    pub fn start_deploy(
        &self,
        id: i64,
        owner: &str,
        expires_at: &str,
        event: &NewEvent,
    ) -> Result<Start, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let release = by_id(&tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
            if release.state == State::Approved
                && let Some(block) = super::artifacts::query_block(&tx, release.digest)?
            {
                let cancelled = cancel_blocked(&tx, release.digest, &block, ("release", "release"))?;
                tx.commit()?;
                return Ok(Start::Blocked { block, cancelled });
            }
            let held: Option<(String, String)> = tx
                .query_row(
                    "SELECT owner, expires_at FROM deploy_leases WHERE service = ?1 AND environment = ?2",
                    params![release.service, release.environment],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((holder, until)) = held
                && holder != owner
                && until > utc::now_text()
            {
                return Ok(Start::Leased);
            }
            tx.execute(
                "INSERT INTO deploy_leases (service, environment, release_id, owner, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (service, environment) DO UPDATE SET release_id = excluded.release_id,
                   owner = excluded.owner, expires_at = excluded.expires_at",
                params![release.service, release.environment, id, owner, expires_at],
            )?;
            let release = change_state(&tx, id, State::Deploying, "release", None)?;
            super::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(Start::Deploying(release))
        })
    }

    /// Extends a lease this owner holds; false if it is no longer theirs.
    pub fn renew_lease(&self, release: &Release, owner: &str, expires_at: &str) -> Result<bool, RegistryError> {
        self.write(|conn| {
            Ok(conn.execute(
                "UPDATE deploy_leases SET expires_at = ?1
                 WHERE service = ?2 AND environment = ?3 AND owner = ?4 AND release_id = ?5",
                params![expires_at, release.service, release.environment, owner, release.id],
            )? == 1)
        })
    }

    /// Takes the lease of a deploying release to resolve it: only when it lapsed, is gone, or
    /// is this owner's already; false when another owner holds it unexpired.
    pub fn take_lease(&self, release: &Release, owner: &str, expires_at: &str) -> Result<bool, RegistryError> {
        self.write(|conn| {
            Ok(conn.execute(
                "INSERT INTO deploy_leases (service, environment, release_id, owner, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (service, environment) DO UPDATE SET release_id = excluded.release_id,
                   owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE deploy_leases.expires_at <= ?6
                   OR (deploy_leases.owner = excluded.owner AND deploy_leases.release_id = excluded.release_id)",
                params![release.service, release.environment, release.id, owner, expires_at, utc::now_text()],
            )? == 1)
        })
    }

    /// Ends a deploy in one transaction: its final state and event, the marks on its nodes
    /// (stranded by a failure, repaired by going live on them), the end of its lease.
    pub fn finish_deploy(&self, id: i64, ending: &Ending, event: &NewEvent) -> Result<Finished, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let (release, cancelled) = match ending {
                Ending::Live { nodes } => {
                    let (release, cancelled) = go_live(&tx, id, event)?;
                    let why = format!("release {id} went live on it");
                    super::marks::repair(&tx, (&release.service, &release.environment), nodes, Some(id), &why)?;
                    (release, cancelled)
                }
                Ending::Failed { reason, stranded } => {
                    let release = change_state(&tx, id, State::Failed, "release", Some(reason))?;
                    super::audit::append(&tx, event)?;
                    super::marks::strand(&tx, &release, stranded, reason)?;
                    (release, vec![])
                }
            };
            tx.execute(
                "DELETE FROM deploy_leases WHERE service = ?1 AND environment = ?2 AND release_id = ?3",
                params![release.service, release.environment, id],
            )?;
            let deploying_since = tx
                .query_row(
                    "SELECT at FROM release_transitions WHERE release_id = ?1 AND state = 'deploying'
                     ORDER BY id DESC LIMIT 1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            tx.commit()?;
            Ok(Finished { release, deploying_since, cancelled })
        })
    }

    /// Removes every deploy lease (at start: the data directory's lock proves their owners
    /// are gone).
    pub fn clear_leases(&self) -> Result<usize, RegistryError> {
        self.write(|conn| Ok(conn.execute("DELETE FROM deploy_leases", [])?))
    }

    /// Releases deploying without a live lease: their runner is gone.
    pub fn lapsed_deploys(&self) -> Result<Vec<Release>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM releases r WHERE state = 'deploying' AND NOT EXISTS (
                   SELECT 1 FROM deploy_leases l WHERE l.service = r.service AND l.environment = r.environment
                   AND l.release_id = r.id AND l.expires_at > ?1) ORDER BY id"
            ))?;
            let rows = stmt.query_map([utc::now_text()], from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

/// Cancels every release of a blocked artifact that waits for approval or is approved and
/// not started, each with its transition (by `by`: the token that blocked it, or the server)
/// and its `release.cancel` event.
pub(super) fn cancel_blocked(
    tx: &Transaction<'_>,
    digest: Digest,
    block: &super::Block,
    (actor, owner): (&str, &str),
) -> Result<Vec<Release>, RegistryError> {
    let ids: Vec<i64> = {
        let mut stmt = tx.prepare_cached(
            "SELECT id FROM releases WHERE digest = ?1 AND state IN ('pending_approval', 'approved') ORDER BY id",
        )?;
        stmt.query_map([digest.to_string()], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let why = format!("artifact {digest} was blocked by {}: {}", block.blocked_by, block.reason);
    let mut cancelled = Vec::new();
    for id in ids {
        cancelled.push(change_state(tx, id, State::Cancelled, actor, Some(&why))?);
        let event = NewEvent {
            actor: actor.to_owned(),
            owner: owner.to_owned(),
            action: AuditAction::ReleaseCancel,
            subject: format!("release/{id}"),
            details: serde_json::json!({"reason": why, "blocked": digest}),
        };
        super::audit::append(tx, &event)?;
    }
    Ok(cancelled)
}

fn change_state(
    tx: &Transaction<'_>,
    id: i64,
    to: State,
    actor: &str,
    reason: Option<&str>,
) -> Result<Release, RegistryError> {
    let release = by_id(tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
    if !release.state.may_become(to) {
        return Err(RegistryError::WrongState { id, state: release.state });
    }
    let now = utc::now_text();
    tx.execute("UPDATE releases SET state = ?1, state_changed_at = ?2 WHERE id = ?3", params![to.as_str(), now, id])?;
    record_transition(tx, id, to, &now, actor, reason)?;
    by_id(tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))
}

fn record_transition(
    tx: &Transaction<'_>,
    id: i64,
    state: State,
    at: &str,
    actor: &str,
    reason: Option<&str>,
) -> Result<(), RegistryError> {
    tx.execute(
        "INSERT INTO release_transitions (release_id, state, at, actor, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, state.as_str(), at, actor, reason],
    )?;
    Ok(())
}

/// The unique index `one_in_flight` refusing a second release in flight, as the error that
/// names the one in flight.
fn in_flight_violation(
    e: rusqlite::Error,
    conn: &rusqlite::Connection,
    service: &str,
    environment: &str,
) -> RegistryError {
    let unique = matches!(&e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE);
    match (unique, in_flight(conn, service, environment)) {
        (true, Ok(Some(busy))) => RegistryError::InFlight(Box::new(busy)),
        _ => RegistryError::Sqlite(e),
    }
}

pub(super) fn by_id(conn: &rusqlite::Connection, id: i64) -> Result<Option<Release>, RegistryError> {
    Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM releases WHERE id = ?1"), [id], from_row).optional()?)
}

fn in_flight(conn: &rusqlite::Connection, service: &str, environment: &str) -> Result<Option<Release>, RegistryError> {
    Ok(conn
        .query_row(
            &format!(
                "SELECT {COLUMNS} FROM releases WHERE service = ?1 AND environment = ?2
                 AND state IN ('approved', 'deploying')"
            ),
            params![service, environment],
            from_row,
        )
        .optional()?)
}

fn live(conn: &rusqlite::Connection, service: &str, environment: &str) -> Result<Option<Release>, RegistryError> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM releases WHERE service = ?1 AND environment = ?2 AND state = 'live'"),
            params![service, environment],
            from_row,
        )
        .optional()?)
}

/// The version label `digest` was uploaded with for `service`, if any.
pub(super) fn upload_version(
    conn: &rusqlite::Connection,
    service: &str,
    digest: Digest,
) -> Result<Option<String>, RegistryError> {
    Ok(conn
        .query_row(
            "SELECT version FROM artifact_uploads WHERE service = ?1 AND digest = ?2",
            params![service, digest.to_string()],
            |r| r.get::<_, Option<String>>(0),
        )
        .optional()?
        .flatten())
}

pub(super) fn conversion(i: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadText(String);

pub(super) fn state_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<State> {
    row.get::<_, String>(i)?.parse().map_err(|e| conversion(i, BadText(e)))
}

pub(super) fn digest_at(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Digest> {
    row.get::<_, String>(i)?.parse().map_err(|e| conversion(i, e))
}

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Release> {
    Ok(Release {
        id: row.get(0)?,
        service: row.get(1)?,
        environment: row.get(2)?,
        digest: digest_at(row, 3)?,
        kind: row.get::<_, String>(4)?.parse().map_err(|e| conversion(4, BadText(e)))?,
        state: state_at(row, 5)?,
        requested_by: row.get(6)?,
        requester_owner: row.get(7)?,
        requested_at: row.get(8)?,
        source_environment: row.get(9)?,
        replaces: row.get(10)?,
        expires_at: row.get(11)?,
        state_changed_at: row.get(12)?,
    })
}

/// `deploying → live`, in the caller's transaction: the previously live release becomes
/// `superseded`, and releases of the same service and environment still waiting for approval
/// are cancelled (an approval never lands on a stale request). Each change gets its event.
/// Returns the live release and the ones it cancelled.
fn go_live(tx: &Transaction<'_>, id: i64, event: &NewEvent) -> Result<(Release, Vec<Release>), RegistryError> {
    let release = by_id(tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
    if let Some(previous) = live(tx, &release.service, &release.environment)? {
        let why = format!("release {id} went live");
        change_state(tx, previous.id, State::Superseded, "release", Some(&why))?;
        let details = serde_json::json!({"by": id});
        let event = NewEvent::by_server(AuditAction::ReleaseSuperseded, format!("release/{}", previous.id), details);
        super::audit::append(tx, &event)?;
    }
    let release = change_state(tx, id, State::Live, "release", None)?;
    super::audit::append(tx, event)?;
    let pending: Vec<i64> = {
        let mut stmt = tx.prepare_cached(
            "SELECT id FROM releases WHERE service = ?1 AND environment = ?2 AND state = 'pending_approval'",
        )?;
        stmt.query_map(params![release.service, release.environment], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let mut cancelled = Vec::new();
    for stale in pending {
        let why = format!("release {id} went live first");
        cancelled.push(change_state(tx, stale, State::Cancelled, "release", Some(&why))?);
        let details = serde_json::json!({"reason": why});
        super::audit::append(
            tx,
            &NewEvent::by_server(AuditAction::ReleaseCancel, format!("release/{stale}"), details),
        )?;
    }
    Ok((release, cancelled))
}

/// Release `id`'s four-eyes decision, if one was made.
pub(super) fn approval_of(conn: &rusqlite::Connection, id: i64) -> Result<Option<Approval>, RegistryError> {
    Ok(conn
        .query_row(
            "SELECT decision, digest, decided_by, decider_owner, decided_at, reason FROM approvals
             WHERE release_id = ?1",
            [id],
            |r| {
                Ok(Approval {
                    decision: r.get(0)?,
                    digest: digest_at(r, 1)?,
                    decided_by: r.get(2)?,
                    decider_owner: r.get(3)?,
                    decided_at: r.get(4)?,
                    reason: r.get(5)?,
                })
            },
        )
        .optional()?)
}
