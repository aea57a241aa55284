//! Audit events as appended and as stored, and the chain hash that links them; the walk, the
//! verification and the checkpoints are in `crate::audit`.

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::model::access::Principal;
use crate::model::vocabulary::vocabulary;
use crate::utc::Timestamp;

/// The hash before the first event.
pub const GENESIS: [u8; 32] = [0; 32];

vocabulary! {
    /// What an audit event records: each writer names one of these, so a typo is a compile
    /// error (and the webhook mapper's `match` is exhaustive); the log stores and exports the
    /// name. `parse` gives `None` for a name this build does not write (an event of an older
    /// or newer release): the log's reads keep the name as text.
    pub enum AuditAction {
        /// A release asked for: deploy, promote, rollback.
        ReleaseDeploy = "release.deploy",
        ReleasePromote = "release.promote",
        ReleaseRollback = "release.rollback",
        ReleaseApprove = "release.approve",
        ReleaseReject = "release.reject",
        ReleaseCancel = "release.cancel",
        ReleaseExpire = "release.expire",
        ReleaseDeploying = "release.deploying",
        ReleaseLive = "release.live",
        ReleaseFailed = "release.failed",
        ReleaseSuperseded = "release.superseded",
        /// A node's legacy tree kept as an artifact by `--adopt`.
        ReleaseAdopted = "release.adopted",
        ArtifactUpload = "artifact.upload",
        ArtifactBlock = "artifact.block",
        ArtifactPurge = "artifact.purge",
        TokenCreate = "token.create",
        TokenRevoke = "token.revoke",
        WebLogin = "web.login",
        WebLogout = "web.logout",
        /// A service's or an environment's configuration as the server first saw it, or changed.
        ConfigService = "config.service",
        ConfigEnvironment = "config.environment",
        /// A service or an environment no longer in the configuration.
        ConfigServiceRetired = "config.service_retired",
        ConfigEnvironmentRetired = "config.environment_retired",
        /// One refused request.
        RequestRefused = "request.refused",
        /// A window's count of refusals, per source or token (past the per-window cut).
        RequestRefusedAggregate = "request.refused.aggregate",
        RegistryBackup = "registry.backup",
        RegistryBackupFailed = "registry.backup_failed",
        /// A registry restored from a backup, naming the events lost.
        RegistryRestored = "registry.restored",
        AuditCheckpointMismatch = "audit.checkpoint_mismatch",
    }
}

/// An event about to be appended.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub actor: String,
    pub owner: String,
    pub action: AuditAction,
    pub subject: String,
    pub details: serde_json::Value,
}

impl NewEvent {
    /// An event caused by an authenticated caller.
    pub fn by(
        principal: &Principal,
        action: AuditAction,
        subject: impl Into<String>,
        details: serde_json::Value,
    ) -> NewEvent {
        NewEvent {
            actor: principal.name.clone(),
            owner: principal.owner.clone(),
            action,
            subject: subject.into(),
            details,
        }
    }

    /// An event caused by the server itself (expiry, a deploy's progress, start-up checks).
    pub fn by_server(action: AuditAction, subject: impl Into<String>, details: serde_json::Value) -> NewEvent {
        NewEvent { actor: "release".into(), owner: "release".into(), action, subject: subject.into(), details }
    }

    /// An event caused on this machine by the command line (e.g. `release token create`,
    /// which works without a server): the actor is the operating-system user.
    pub fn by_local_user(action: AuditAction, subject: impl Into<String>, details: serde_json::Value) -> NewEvent {
        let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
        NewEvent { actor: format!("local:{user}"), owner: user, action, subject: subject.into(), details }
    }
}

/// An event as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    pub seq: u64,
    pub at: Timestamp,
    pub actor: String,
    pub owner: String,
    pub action: String,
    pub subject: String,
    /// The JSON text exactly as hashed.
    #[serde(serialize_with = "raw_json")]
    pub details: String,
    #[serde(serialize_with = "hex_bytes")]
    pub prev_hash: [u8; 32],
    #[serde(serialize_with = "hex_bytes")]
    pub hash: [u8; 32],
}

fn raw_json<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    let value: serde_json::Value = serde_json::from_str(text).unwrap_or(serde_json::Value::String(text.to_owned()));
    value.serialize(s)
}

fn hex_bytes<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// The fields of an event that its hash covers.
#[derive(Serialize)]
pub struct Hashed<'a> {
    pub seq: u64,
    pub at: &'a str,
    pub actor: &'a str,
    pub owner: &'a str,
    pub action: &'a str,
    pub subject: &'a str,
    /// As stored text.
    pub details: &'a str,
}

/// The hash of an event: SHA-256 over the previous hash and the JSON array
/// `[seq, at, actor, owner, action, subject, details]`.
pub fn chain_hash(prev: &[u8; 32], f: &Hashed<'_>) -> [u8; 32] {
    let fields = serde_json::to_vec(&(f.seq, f.at, f.actor, f.owner, f.action, f.subject, f.details))
        .expect("strings serialize");
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(&fields);
    hasher.finalize().into()
}

impl Event {
    pub fn expected_hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        chain_hash(
            prev,
            &Hashed {
                seq: self.seq,
                at: self.at.as_str(),
                actor: &self.actor,
                owner: &self.owner,
                action: &self.action,
                subject: &self.subject,
                details: &self.details,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALL`, the names and `parse` come from one declaration: every action, once, reads
    /// back as itself (before, `ALL` was a list kept by hand beside the enum).
    #[test]
    fn every_action_is_in_all_once_and_reads_back_by_its_name() {
        let names: std::collections::HashSet<&str> = AuditAction::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(names.len(), AuditAction::ALL.len(), "two actions share a name");
        for action in AuditAction::ALL {
            assert_eq!(AuditAction::parse(action.as_str()), Some(action));
        }
        // The first and the last declared, and the one an old hand-kept list could most
        // easily miss (declared between two others with doc comments).
        for action in [AuditAction::ReleaseDeploy, AuditAction::ReleaseAdopted, AuditAction::AuditCheckpointMismatch] {
            assert!(AuditAction::ALL.contains(&action), "{action}");
        }
        assert_eq!(AuditAction::parse("release.unknown"), None);
    }
}
