//! Who may do what: roles, the actions they allow, the authenticated caller and its scope,
//! and the refusal when a caller may not (SPEC 2). Secrets and the token table are in
//! `crate::token`.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Ci,
    Deployer,
    Approver,
    Auditor,
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Ci, Role::Deployer, Role::Approver, Role::Auditor, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ci => "ci",
            Role::Deployer => "deployer",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// What a request wants to do; each maps to the roles allowed to (SPEC 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read artifacts, status, history, releases.
    Read,
    UploadArtifact,
    ManageTokens,
    /// Ask for an artifact to go live (`ci` only where no approval is needed: a policy).
    Deploy,
    Promote,
    Rollback,
    /// Approve or reject a pending release.
    Decide,
    /// Export and verify the audit log.
    ReadAudit,
    /// Withdraw a pending release (its requester, or an admin: a policy on top).
    Cancel,
    /// Block an artifact, purge the bytes of ones never live.
    ManageArtifacts,
}

impl Action {
    pub fn allowed_roles(self) -> &'static [Role] {
        match self {
            Action::Read => &Role::ALL,
            Action::UploadArtifact => &[Role::Ci, Role::Admin],
            Action::ManageTokens => &[Role::Admin],
            Action::Deploy => &[Role::Ci, Role::Deployer, Role::Admin],
            Action::Promote | Action::Rollback => &[Role::Deployer, Role::Admin],
            Action::Decide => &[Role::Approver, Role::Admin],
            Action::ReadAudit => &[Role::Auditor, Role::Admin],
            Action::Cancel => &[Role::Ci, Role::Deployer, Role::Admin],
            Action::ManageArtifacts => &[Role::Admin],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::UploadArtifact => "upload artifacts",
            Action::ManageTokens => "manage tokens",
            Action::Deploy => "deploy",
            Action::Promote => "promote",
            Action::Rollback => "roll back",
            Action::Decide => "approve or reject releases",
            Action::ReadAudit => "read the audit log",
            Action::Cancel => "cancel releases",
            Action::ManageArtifacts => "block or purge artifacts",
        }
    }
}

/// A role name that is none of the five.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?} (roles: ci, deployer, approver, auditor, admin)")]
pub struct UnknownRole(pub String);

/// A caller refused: its roles or its scope do not allow what it asked.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("token {name:?} may not {action}; its roles are {roles}")]
    Forbidden { name: String, action: &'static str, roles: String },
    #[error("token {name:?} is limited to services {allowed}; {service:?} is not one of them")]
    ServiceNotAllowed { name: String, service: String, allowed: String },
    #[error("token {name:?} is limited to environments {allowed}; {environment:?} is not one of them")]
    EnvironmentNotAllowed { name: String, environment: String, allowed: String },
    #[error(
        "token {name:?} has only the ci role, which deploys only to environments without approval; {environment:?} requires approval"
    )]
    CiNeedsNoApproval { name: String, environment: String },
    #[error("only the requester ({owner}) or an admin may cancel release {id}")]
    NotRequester { id: i64, owner: String },
    #[error(
        "token {name:?} is limited to some services or environments; {what} covers all of them, so it needs a token without limits"
    )]
    Scoped { name: String, what: &'static str },
}

pub fn join_roles(roles: &[Role]) -> String {
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
}

/// The authenticated caller of a request: a valid, unexpired, unrevoked token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub owner: String,
    pub roles: Vec<Role>,
    /// `None`: every service.
    pub services: Option<Vec<String>>,
    /// `None`: every environment.
    pub environments: Option<Vec<String>>,
}

impl Principal {
    pub fn require(&self, action: Action) -> Result<(), Denied> {
        if self.roles.iter().any(|r| action.allowed_roles().contains(r)) {
            return Ok(());
        }
        Err(Denied::Forbidden { name: self.name.clone(), action: action.name(), roles: join_roles(&self.roles) })
    }

    pub fn require_environment(&self, environment: &str) -> Result<(), Denied> {
        match &self.environments {
            Some(allowed) if !allowed.iter().any(|e| e == environment) => Err(Denied::EnvironmentNotAllowed {
                name: self.name.clone(),
                environment: environment.to_owned(),
                allowed: allowed.join(","),
            }),
            _ => Ok(()),
        }
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Whether the token is limited to some services or environments.
    pub fn is_scoped(&self) -> bool {
        self.services.is_some() || self.environments.is_some()
    }

    /// Whether the token may see what belongs to (service, environment).
    pub fn sees(&self, service: &str, environment: &str) -> Result<(), Denied> {
        self.require_service(service)?;
        self.require_environment(environment)
    }

    /// What this token is told when something it names is absent, or outside its scope: the
    /// same words either way, so a scoped token cannot tell them apart (SPEC 2: scopes apply to
    /// reads; issue 10). `missing` is what any token is told of something absent.
    pub fn as_if_absent(&self, missing: impl fmt::Display) -> String {
        if self.is_scoped() {
            format!("{missing}, or not within the scope of token {:?}", self.name)
        } else {
            missing.to_string()
        }
    }

    /// For what spans every service and environment (the audit log and its exports).
    pub fn require_unscoped(&self, what: &'static str) -> Result<(), Denied> {
        if self.services.is_some() || self.environments.is_some() {
            return Err(Denied::Scoped { name: self.name.clone(), what });
        }
        Ok(())
    }

    pub fn require_service(&self, service: &str) -> Result<(), Denied> {
        match &self.services {
            Some(allowed) if !allowed.iter().any(|s| s == service) => Err(Denied::ServiceNotAllowed {
                name: self.name.clone(),
                service: service.to_owned(),
                allowed: allowed.join(","),
            }),
            _ => Ok(()),
        }
    }
}
