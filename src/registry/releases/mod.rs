//! Release rows and their story: transitions, approvals, deployments, leases, the status
//! matrix. Every change is one transaction with its audit event.

use rusqlite::{OptionalExtension, Transaction, params};

mod changes;
mod deploys;
mod reads;
mod rows;

use rows::*;
pub(super) use rows::{approval_of, by_id, cancel_blocked, digest_at, state_at, upload_version};

use super::{Registry, RegistryError, immediate};
use crate::digest::Digest;
use crate::model::audit::AuditAction;
use crate::model::audit::NewEvent;
use crate::model::release::{
    Adoption, Approval, Deployment, Detail, Kind, Phase, PhaseOutcome, Release, SharedFile, State, StatusRow,
    Transition,
};
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
    pub expires_at: Option<utc::Timestamp>,
    /// Why it needs no approval, or waits for one (recorded with the first transition).
    pub note: Option<String>,
    /// Nodes left out of this release.
    pub excluded: Vec<String>,
    /// `--adopt`: take over an application found at `current` deployed another way.
    pub adopt: bool,
    /// `--force`: the migration files the live artifact has and this one lacks.
    pub forced_past: Vec<String>,
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
    pub deploying_since: Option<utc::Timestamp>,
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
            let now = utc::Timestamp::now();
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
}
