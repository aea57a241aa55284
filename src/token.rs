//! API tokens: roles, the secret's format, hashing and the permission rules (SPEC 2).
//!
//! A token string is `rls_<id>_<secret>`: `id` (16 hex digits) finds the row, `secret` (64 hex
//! digits, 256 random bits) is checked by comparing its SHA-256 with the stored one in constant
//! time. A plain SHA-256 is enough for a 256-bit random secret (no dictionary to attack); the
//! secret itself is shown once and never stored.

use rand::RngExt;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::config::is_valid_name;
pub use crate::model::access::{Action, Denied, Principal, Role, UnknownRole, join_roles};
use crate::model::audit::{AuditAction, NewEvent};
use crate::registry::{NewToken, Registry, RegistryError, TokenRecord};
use crate::utc::{self, Timestamp};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "missing token: send `Authorization: Bearer <token>` (the release command line: set RELEASE_TOKEN, or --token)"
    )]
    Missing,
    #[error("unknown token")]
    Unknown,
    #[error("token {name:?} is revoked")]
    Revoked { name: String, owner: String },
    #[error("token {name:?} expired at {at}")]
    Expired { name: String, owner: String, at: Timestamp },
    #[error("{what} {name:?} must match [a-z0-9][a-z0-9-]*")]
    BadScope { what: &'static str, name: String },
    #[error("--expires must be at least 1 day")]
    BadExpiry,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("a token needs at least one role")]
    NoRoles,
    #[error("token name {0:?} must be 1-64 characters of a-z, 0-9, '-', '_' or '.'")]
    BadName(String),
    #[error("owner {0:?} must be 1-64 characters of a-z, 0-9, '-', '_' or '.' (capitals are taken as lowercase)")]
    BadOwner(String),
    #[error(
        "a token with the {roles} role must name its owner with --owner (the person it belongs to): four eyes \
         compares owners, so without it a token named {name:?} would be an owner of its own"
    )]
    OwnerRequired { name: String, roles: String },
    #[error("not a release token (expected rls_<id>_<secret>)")]
    Malformed,
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    UnknownRole(#[from] UnknownRole),
}

/// A freshly generated token: the string to show once, and what to store.
pub struct NewSecret {
    pub id: String,
    pub token: String,
    pub secret_sha256: [u8; 32],
}

impl NewSecret {
    pub fn generate() -> NewSecret {
        let mut rng = rand::rng();
        let id: [u8; 8] = rng.random();
        let secret: [u8; 32] = rng.random();
        let (id, secret) = (hex::encode(id), hex::encode(secret));
        NewSecret { token: format!("rls_{id}_{secret}"), secret_sha256: Sha256::digest(secret.as_bytes()).into(), id }
    }
}

/// A token string as presented by a client, split but not yet checked.
pub struct Presented<'a> {
    pub id: &'a str,
    secret: &'a str,
}

impl<'a> Presented<'a> {
    pub fn parse(token: &'a str) -> Result<Presented<'a>, TokenError> {
        let rest = token.strip_prefix("rls_").ok_or(TokenError::Malformed)?;
        let (id, secret) = rest.split_once('_').ok_or(TokenError::Malformed)?;
        let hex16 = |s: &str, n| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex16(id, 16) || !hex16(secret, 64) {
            return Err(TokenError::Malformed);
        }
        Ok(Presented { id, secret })
    }

    /// Constant-time comparison of the presented secret's hash with the stored hash.
    pub fn matches(&self, stored_sha256: &[u8]) -> bool {
        let hash: [u8; 32] = Sha256::digest(self.secret.as_bytes()).into();
        hash.ct_eq(stored_sha256).into()
    }
}

pub fn check_name(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(TokenError::BadName(name.to_owned())) }
}

/// Roles whose tokens must name their owner: they request or decide releases, and four eyes
/// compares owners. A `ci` or `auditor` token never has a release waiting for approval
/// (`ci` deploys only where none is needed) and decides nothing, so its owner may default to
/// its name.
pub const OWNER_REQUIRED: [Role; 3] = [Role::Deployer, Role::Approver, Role::Admin];

/// An owner as four eyes compares it: ASCII letters lowercased (`Alice` is `alice`), then the
/// token-name charset. The registry's four-eyes trigger compares `lower()` of both sides, which
/// folds the same letters.
pub fn normalize_owner(owner: &str) -> Result<String, TokenError> {
    let normalized = owner.to_ascii_lowercase();
    check_name(&normalized).map_err(|_| TokenError::BadOwner(owner.to_owned()))?;
    Ok(normalized)
}

/// Whether two recorded owners are the same person. Rows written before owners were normalized
/// may hold capitals, so the comparison folds them as [`normalize_owner`] does.
pub fn same_owner(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Parses `ci,deployer`.
pub fn parse_roles(list: &str) -> Result<Vec<Role>, TokenError> {
    let mut roles: Vec<Role> =
        list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect::<Result<_, _>>()?;
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        return Err(TokenError::NoRoles);
    }
    Ok(roles)
}

/// What `release token create` asks for.
pub struct TokenRequest {
    pub name: String,
    /// Required for the roles in [`OWNER_REQUIRED`]; otherwise defaults to the name.
    pub owner: Option<String>,
    pub roles: Vec<Role>,
    pub services: Option<Vec<String>>,
    pub environments: Option<Vec<String>>,
    pub expires_in_days: Option<u32>,
}

/// Who manages a token: an admin through the API, or someone on the server's machine through
/// the command line (recorded as the operating-system user).
#[derive(Clone, Copy, Debug)]
pub enum Manager<'a> {
    Local,
    Caller(&'a Principal),
}

impl Manager<'_> {
    fn event(self, action: AuditAction, subject: &str, details: serde_json::Value) -> NewEvent {
        match self {
            Manager::Local => NewEvent::by_local_user(action, subject, details),
            Manager::Caller(principal) => NewEvent::by(principal, action, subject, details),
        }
    }
}

/// Creates a token; returns its record and the token string, which exists nowhere else.
pub fn create(
    registry: &Registry,
    request: TokenRequest,
    manager: Manager<'_>,
) -> Result<(TokenRecord, String), TokenError> {
    check_name(&request.name)?;
    if request.roles.is_empty() {
        return Err(TokenError::NoRoles);
    }
    let owner = match &request.owner {
        Some(owner) => normalize_owner(owner)?,
        None => {
            let privileged: Vec<Role> = request.roles.iter().copied().filter(|r| OWNER_REQUIRED.contains(r)).collect();
            if !privileged.is_empty() {
                return Err(TokenError::OwnerRequired { name: request.name, roles: join_roles(&privileged) });
            }
            request.name.clone()
        }
    };
    for (what, list) in [("service", &request.services), ("environment", &request.environments)] {
        if let Some(bad) = list.iter().flatten().find(|n| !is_valid_name(n)) {
            return Err(TokenError::BadScope { what, name: bad.clone() });
        }
    }
    let expires_at = match request.expires_in_days {
        None => None,
        Some(0) => return Err(TokenError::BadExpiry),
        Some(days) => Some(Timestamp::at(utc::now() + time::Duration::days(days.into()))),
    };
    let secret = NewSecret::generate();
    let event = manager.event(
        AuditAction::TokenCreate,
        &request.name,
        serde_json::json!({
            "owner": owner,
            "roles": join_roles(&request.roles),
            "services": request.services,
            "environments": request.environments,
            "expires_at": expires_at,
        }),
    );
    let record = registry.create_token(
        &NewToken {
            id: secret.id,
            name: request.name,
            owner,
            roles: request.roles,
            services: request.services,
            environments: request.environments,
            secret_sha256: secret.secret_sha256,
            expires_at,
        },
        &event,
    )?;
    Ok((record, secret.token))
}

/// Revokes a token for good; its name is never reused.
pub fn revoke(registry: &Registry, name: &str, manager: Manager<'_>) -> Result<TokenRecord, TokenError> {
    Ok(registry.revoke_token(name, &manager.event(AuditAction::TokenRevoke, name, serde_json::json!({})))?)
}

/// Checks a presented token against the registry: known, secret matches, not revoked, not
/// expired.
pub fn authenticate(registry: &Registry, token: &str) -> Result<Principal, TokenError> {
    let presented = Presented::parse(token)?;
    let record = registry.token_by_id(presented.id)?.ok_or(TokenError::Unknown)?;
    if !presented.matches(&record.secret_sha256) {
        return Err(TokenError::Unknown);
    }
    still_valid(record)
}

/// The principal of a token known by its id (a web session opened with it): refused once the
/// token is revoked or expired, so a session never outlives its token.
pub fn authenticate_by_id(registry: &Registry, id: &str) -> Result<Principal, TokenError> {
    still_valid(registry.token_by_id(id)?.ok_or(TokenError::Unknown)?)
}

fn still_valid(record: TokenRecord) -> Result<Principal, TokenError> {
    if record.revoked_at.is_some() {
        return Err(TokenError::Revoked { name: record.name, owner: record.owner });
    }
    if let Some(at) = &record.expires_at
        && *at <= Timestamp::now()
    {
        return Err(TokenError::Expired { name: record.name, owner: record.owner, at: at.clone() });
    }
    Ok(Principal {
        name: record.name,
        // Normalized also for tokens made before owners were (their rows stay as written).
        owner: record.owner.to_ascii_lowercase(),
        roles: record.roles,
        services: record.services,
        environments: record.environments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_verify_and_others_do_not() {
        let new = NewSecret::generate();
        let presented = Presented::parse(&new.token).unwrap();
        assert_eq!(presented.id, new.id);
        assert!(presented.matches(&new.secret_sha256));
        let other = NewSecret::generate();
        assert!(!Presented::parse(&other.token).unwrap().matches(&new.secret_sha256));
    }

    #[test]
    fn authenticate_checks_secret_revocation_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(&dir.path().join("r.db")).unwrap();
        let request = |name: &str| TokenRequest {
            name: name.into(),
            owner: Some("alice".into()),
            roles: vec![Role::Deployer],
            services: None,
            environments: Some(vec!["staging".into()]),
            expires_in_days: Some(90),
        };
        let (record, token) = create(&registry, request("alice-laptop"), Manager::Local).unwrap();
        assert!(record.expires_at.is_some());
        let principal = authenticate(&registry, &token).unwrap();
        assert_eq!(principal.owner, "alice");
        assert_eq!(principal.environments, Some(vec!["staging".to_owned()]));

        // Right id, wrong secret.
        let forged = format!("{}{}", &token[..token.len() - 1], if token.ends_with('0') { '1' } else { '0' });
        assert!(matches!(authenticate(&registry, &forged), Err(TokenError::Unknown)));

        // Expired: a row whose expiry has passed.
        let old = NewSecret::generate();
        registry
            .create_token(
                &NewToken {
                    id: old.id.clone(),
                    name: "old".into(),
                    owner: "bob".into(),
                    roles: vec![Role::Ci],
                    services: None,
                    environments: None,
                    secret_sha256: old.secret_sha256,
                    expires_at: Some(Timestamp::parse("2020-01-01T00:00:00.000000Z").unwrap()),
                },
                &NewEvent::by_local_user(AuditAction::TokenCreate, "old", serde_json::json!({})),
            )
            .unwrap();
        assert!(matches!(authenticate(&registry, &old.token), Err(TokenError::Expired { .. })));

        revoke(&registry, "alice-laptop", Manager::Local).unwrap();
        assert!(matches!(authenticate(&registry, &token), Err(TokenError::Revoked { .. })));

        let mut bad = request("Bad Name");
        assert!(matches!(create(&registry, bad, Manager::Local), Err(TokenError::BadName(_))));
        bad = request("scoped");
        bad.services = Some(vec!["API!".into()]);
        assert!(matches!(create(&registry, bad, Manager::Local), Err(TokenError::BadScope { .. })));
    }

    #[test]
    fn owners_are_required_for_requesters_and_deciders_and_normalized() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(&dir.path().join("r.db")).unwrap();
        let request = |name: &str, roles: Vec<Role>, owner: Option<&str>| TokenRequest {
            name: name.into(),
            owner: owner.map(str::to_owned),
            roles,
            services: None,
            environments: None,
            expires_in_days: None,
        };
        for roles in [vec![Role::Deployer], vec![Role::Approver], vec![Role::Admin], vec![Role::Ci, Role::Approver]] {
            let refused = create(&registry, request("alice-approver", roles.clone(), None), Manager::Local);
            assert!(
                matches!(&refused, Err(TokenError::OwnerRequired { .. })),
                "{roles:?}: {:?}",
                refused.as_ref().map(|r| &r.0)
            );
            assert!(refused.unwrap_err().to_string().contains("--owner"));
        }
        // ci and auditor tokens never request a release that waits for approval, nor decide one.
        let (ci, _) =
            create(&registry, request("ci-api", vec![Role::Ci, Role::Auditor], None), Manager::Local).unwrap();
        assert_eq!(ci.owner, "ci-api");

        let (alice, token) =
            create(&registry, request("alice", vec![Role::Deployer], Some("Alice")), Manager::Local).unwrap();
        assert_eq!(alice.owner, "alice");
        assert_eq!(authenticate(&registry, &token).unwrap().owner, "alice");
        for bad in ["alice smith", "", "al/ice", "ålice", &"a".repeat(65)] {
            let refused = create(&registry, request("x", vec![Role::Deployer], Some(bad)), Manager::Local);
            assert!(matches!(refused, Err(TokenError::BadOwner(ref o)) if o == bad), "{bad:?}");
        }
    }

    #[test]
    fn a_token_made_before_owners_were_normalized_compares_lowercase() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(&dir.path().join("r.db")).unwrap();
        let old = NewSecret::generate();
        registry
            .create_token(
                &NewToken {
                    id: old.id.clone(),
                    name: "bob-old".into(),
                    owner: "Bob".into(),
                    roles: vec![Role::Approver],
                    services: None,
                    environments: None,
                    secret_sha256: old.secret_sha256,
                    expires_at: None,
                },
                &NewEvent::by_local_user(AuditAction::TokenCreate, "bob-old", serde_json::json!({})),
            )
            .unwrap();
        assert_eq!(authenticate(&registry, &old.token).unwrap().owner, "bob");
        assert!(same_owner("Bob", "bob") && !same_owner("bob", "bobby"));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in ["", "rls_", "rls_abc_def", "Bearer x", "rls_0123456789abcdef_short"] {
            assert!(Presented::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roles_parse_and_gate_actions() {
        assert_eq!(parse_roles("deployer, ci,ci").unwrap(), [Role::Ci, Role::Deployer]);
        assert!(matches!(parse_roles("root"), Err(TokenError::UnknownRole(r)) if r.0 == "root"));
        assert!(matches!(parse_roles(""), Err(TokenError::NoRoles)));
        let p = |roles: Vec<Role>| Principal {
            name: "t".into(),
            owner: "o".into(),
            roles,
            services: Some(vec!["api".into()]),
            environments: None,
        };
        assert!(p(vec![Role::Ci]).require(Action::UploadArtifact).is_ok());
        assert!(p(vec![Role::Admin]).require(Action::UploadArtifact).is_ok());
        assert!(p(vec![Role::Auditor]).require(Action::UploadArtifact).is_err());
        assert!(p(vec![Role::Auditor]).require(Action::Read).is_ok());
        assert!(p(vec![Role::Ci]).require_service("api").is_ok());
        assert!(p(vec![Role::Ci]).require_service("play").is_err());
    }

    #[test]
    fn a_limited_token_is_told_the_same_words_of_absent_and_unseen_things() {
        let scoped = Principal {
            name: "ci-api".into(),
            owner: "gitlab".into(),
            roles: vec![Role::Ci],
            services: Some(vec!["api".into()]),
            environments: None,
        };
        assert!(
            scoped.is_scoped() && scoped.sees("api", "production").is_ok() && scoped.sees("web", "staging").is_err()
        );
        assert_eq!(scoped.as_if_absent("no release 7"), "no release 7, or not within the scope of token \"ci-api\"");
        let everything = Principal { services: None, ..scoped };
        assert!(!everything.is_scoped() && everything.sees("web", "staging").is_ok());
        assert_eq!(everything.as_if_absent("no release 7"), "no release 7");
    }
}
