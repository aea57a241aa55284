//! Artifacts as a token may read them, for the API and the pages alike: any role may read,
//! but a token limited to some services sees an artifact only through its upload records for
//! them, and one uploaded for none of them exactly as one that does not exist (SPEC 2: scopes
//! apply to reads). A digest prefix resolves among those artifacts only.

use std::sync::Arc;

use crate::digest::{Digest, DigestRef};
use crate::model::access::{Action, Denied, Principal};
use crate::registry::{Artifact, ArtifactUpload, ListedArtifact, Registry, RegistryError};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Absent, in the words a token is told of something absent (see `Principal::as_if_absent`).
    #[error("{0}")]
    Absent(String),
    /// Outside the token's scope, told exactly as [`ArtifactError::Absent`]; `why` is for the
    /// audit log only.
    #[error("{message}")]
    OutOfScope { message: String, why: Denied },
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// An artifact and the upload records of it the caller may see.
pub struct Seen {
    pub artifact: Artifact,
    pub uploads: Vec<ArtifactUpload>,
}

/// The artifact `digest` as `principal` may see it.
pub async fn readable(registry: &Arc<Registry>, principal: &Principal, digest: Digest) -> Result<Seen, ArtifactError> {
    principal.require(Action::Read)?;
    let registry = Arc::clone(registry);
    let (artifact, uploads) = crate::registry::run(move || {
        Ok::<_, RegistryError>((registry.artifact(digest)?, registry.artifact_uploads(digest)?))
    })
    .await?;
    let Some(artifact) = artifact else { return Err(absent(principal, digest)) };
    Ok(Seen { artifact, uploads: seen_uploads(principal, digest, uploads)? })
}

/// The one artifact a digest or a prefix of 12 or more hex digits names, among those
/// `principal` may see (uploaded for its services, or any when it has no service scope). A
/// whole digest is its own answer (whether it exists is the caller's next question); a prefix
/// that names none is absent ([`RegistryError::NoDigest`]), one that names several is
/// ambiguous ([`RegistryError::AmbiguousDigest`], naming them) — and a scoped token neither
/// resolves nor hears of another service's artifact.
pub async fn resolve(
    registry: &Arc<Registry>,
    principal: &Principal,
    reference: DigestRef,
) -> Result<Digest, ArtifactError> {
    if let DigestRef::Full(digest) = reference {
        return Ok(digest);
    }
    let registry = Arc::clone(registry);
    let services = principal.services.clone();
    Ok(crate::registry::run(move || registry.resolve_digest(&reference, services.as_deref())).await?)
}

/// What a token is told of an artifact that does not exist.
pub fn absent(principal: &Principal, digest: Digest) -> ArtifactError {
    ArtifactError::Absent(absent_words(principal, digest))
}

fn absent_words(principal: &Principal, digest: Digest) -> String {
    principal.as_if_absent(format!("no artifact {digest}"))
}

/// The upload records of `digest` that a token may see. When it may see none (a token scoped
/// to other services), the answer is exactly [`absent`]'s, with the reason for the audit log.
pub fn seen_uploads(
    principal: &Principal,
    digest: Digest,
    uploads: Vec<ArtifactUpload>,
) -> Result<Vec<ArtifactUpload>, ArtifactError> {
    let (seen, unseen): (Vec<_>, Vec<_>) =
        uploads.into_iter().partition(|u| principal.require_service(&u.service).is_ok());
    if !seen.is_empty() {
        return Ok(seen);
    }
    let message = absent_words(principal, digest);
    Err(match &principal.services {
        Some(allowed) if !unseen.is_empty() => {
            let services: Vec<&str> = unseen.iter().map(|u| u.service.as_str()).collect();
            let why = Denied::ServiceNotAllowed {
                name: principal.name.clone(),
                service: services.join(","),
                allowed: allowed.join(","),
            };
            ArtifactError::OutOfScope { message, why }
        }
        _ => ArtifactError::Absent(message),
    })
}

/// A page of `service`'s artifacts, newest first: a service never configured nor uploaded for
/// is absent, and so is one outside the token's scope, in the same words.
pub async fn of_service(
    registry: &Arc<Registry>,
    principal: &Principal,
    service: &str,
    limit: u32,
    before: Option<i64>,
) -> Result<Vec<ListedArtifact>, ArtifactError> {
    principal.require(Action::Read)?;
    let (reader, wanted) = (Arc::clone(registry), service.to_owned());
    let known = crate::registry::run(move || reader.service_known(&wanted)).await?;
    let message = principal.as_if_absent(format!("no service {service:?}"));
    if !known {
        return Err(ArtifactError::Absent(message));
    }
    principal.require_service(service).map_err(|why| ArtifactError::OutOfScope { message, why })?;
    let (reader, wanted) = (Arc::clone(registry), service.to_owned());
    Ok(crate::registry::run(move || reader.service_artifacts(&wanted, limit, before)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::access::Role;

    fn token(services: Option<&[&str]>) -> Principal {
        Principal {
            name: "ci-shop".into(),
            owner: "ci".into(),
            roles: vec![Role::Ci],
            services: services.map(|s| s.iter().map(|s| s.to_string()).collect()),
            environments: None,
        }
    }

    fn upload(service: &str, digest: Digest) -> ArtifactUpload {
        ArtifactUpload {
            service: service.into(),
            digest,
            version: None,
            git_sha: None,
            build_url: None,
            uploaded_by: "ci".into(),
            uploader_owner: "ci".into(),
            uploaded_at: crate::utc::Timestamp::now(),
        }
    }

    #[test]
    fn a_scoped_token_sees_only_its_services_uploads_and_the_rest_as_absent() {
        let digest = Digest::of(b"v1");
        let both = || vec![upload("shop", digest), upload("api", digest)];
        let shop = token(Some(&["shop"]));
        let seen = seen_uploads(&shop, digest, both()).unwrap();
        assert_eq!(seen.iter().map(|u| u.service.as_str()).collect::<Vec<_>>(), ["shop"]);
        assert_eq!(seen_uploads(&token(None), digest, both()).unwrap().len(), 2);

        // Uploaded for other services only: the words of an absent artifact, the reason kept.
        let blog = token(Some(&["blog"]));
        let ArtifactError::Absent(absent_words) = absent(&blog, digest) else { panic!() };
        match seen_uploads(&blog, digest, both()) {
            Err(ArtifactError::OutOfScope { message, why }) => {
                assert_eq!(message, absent_words);
                assert!(why.to_string().contains("shop,api"), "{why}");
            }
            other => panic!("{:?}", other.map(|u| u.len())),
        }
    }
}
