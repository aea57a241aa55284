//! Audit events as appended and as stored, and the chain hash that links them; the walk, the
//! verification and the checkpoints are in `crate::audit`.

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::model::access::Principal;
use crate::utc::Timestamp;

/// The hash before the first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// What an audit event records: each writer names one of these, so a typo is a compile error
/// (and the webhook mapper's `match` is exhaustive); the log stores and exports the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditAction {
    /// A release asked for: deploy, promote, rollback.
    ReleaseDeploy,
    ReleasePromote,
    ReleaseRollback,
    ReleaseApprove,
    ReleaseReject,
    ReleaseCancel,
    ReleaseExpire,
    ReleaseDeploying,
    ReleaseLive,
    ReleaseFailed,
    ReleaseSuperseded,
    /// A node's legacy tree kept as an artifact by `--adopt`.
    ReleaseAdopted,
    ArtifactUpload,
    ArtifactBlock,
    ArtifactPurge,
    TokenCreate,
    TokenRevoke,
    WebLogin,
    WebLogout,
    /// A service's or an environment's configuration as the server first saw it, or changed.
    ConfigService,
    ConfigEnvironment,
    /// A service or an environment no longer in the configuration.
    ConfigServiceRetired,
    ConfigEnvironmentRetired,
    /// One refused request.
    RequestRefused,
    /// A window's count of refusals, per source or token (past the per-window cut).
    RequestRefusedAggregate,
    RegistryBackup,
    RegistryBackupFailed,
    /// A registry restored from a backup, naming the events lost.
    RegistryRestored,
    AuditCheckpointMismatch,
}

impl AuditAction {
    pub const ALL: [AuditAction; 29] = [
        AuditAction::ReleaseDeploy,
        AuditAction::ReleasePromote,
        AuditAction::ReleaseRollback,
        AuditAction::ReleaseApprove,
        AuditAction::ReleaseReject,
        AuditAction::ReleaseCancel,
        AuditAction::ReleaseExpire,
        AuditAction::ReleaseDeploying,
        AuditAction::ReleaseLive,
        AuditAction::ReleaseFailed,
        AuditAction::ReleaseSuperseded,
        AuditAction::ReleaseAdopted,
        AuditAction::ArtifactUpload,
        AuditAction::ArtifactBlock,
        AuditAction::ArtifactPurge,
        AuditAction::TokenCreate,
        AuditAction::TokenRevoke,
        AuditAction::WebLogin,
        AuditAction::WebLogout,
        AuditAction::ConfigService,
        AuditAction::ConfigEnvironment,
        AuditAction::ConfigServiceRetired,
        AuditAction::ConfigEnvironmentRetired,
        AuditAction::RequestRefused,
        AuditAction::RequestRefusedAggregate,
        AuditAction::RegistryBackup,
        AuditAction::RegistryBackupFailed,
        AuditAction::RegistryRestored,
        AuditAction::AuditCheckpointMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::ReleaseDeploy => "release.deploy",
            AuditAction::ReleasePromote => "release.promote",
            AuditAction::ReleaseRollback => "release.rollback",
            AuditAction::ReleaseApprove => "release.approve",
            AuditAction::ReleaseReject => "release.reject",
            AuditAction::ReleaseCancel => "release.cancel",
            AuditAction::ReleaseExpire => "release.expire",
            AuditAction::ReleaseDeploying => "release.deploying",
            AuditAction::ReleaseLive => "release.live",
            AuditAction::ReleaseFailed => "release.failed",
            AuditAction::ReleaseSuperseded => "release.superseded",
            AuditAction::ReleaseAdopted => "release.adopted",
            AuditAction::ArtifactUpload => "artifact.upload",
            AuditAction::ArtifactBlock => "artifact.block",
            AuditAction::ArtifactPurge => "artifact.purge",
            AuditAction::TokenCreate => "token.create",
            AuditAction::TokenRevoke => "token.revoke",
            AuditAction::WebLogin => "web.login",
            AuditAction::WebLogout => "web.logout",
            AuditAction::ConfigService => "config.service",
            AuditAction::ConfigEnvironment => "config.environment",
            AuditAction::ConfigServiceRetired => "config.service_retired",
            AuditAction::ConfigEnvironmentRetired => "config.environment_retired",
            AuditAction::RequestRefused => "request.refused",
            AuditAction::RequestRefusedAggregate => "request.refused.aggregate",
            AuditAction::RegistryBackup => "registry.backup",
            AuditAction::RegistryBackupFailed => "registry.backup_failed",
            AuditAction::RegistryRestored => "registry.restored",
            AuditAction::AuditCheckpointMismatch => "audit.checkpoint_mismatch",
        }
    }

    /// The action a stored event's name stands for; `None` for a name this build does not
    /// write (an event of an older or newer release).
    pub fn parse(name: &str) -> Option<AuditAction> {
        AuditAction::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
