//! `--adopt` on the server's side: the package a node made of a legacy tree is kept as an
//! artifact of the service (through ingest, by the same rules and checks as any upload), and
//! the adoption is recorded with the release and in the audit log.

use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;

use super::deployer::{Adopter, LegacyBytes};
use crate::audit::NewEvent;
use crate::digest::Digest;
use crate::ingest::{Ingestor, Piece, UploadRequest};
use crate::model::audit::AuditAction;
use crate::model::release::Release;
use crate::registry::Registry;
use crate::token::{Principal, Role};

/// The version label an adopted tree's artifact carries.
pub const ADOPTED_VERSION: &str = "adopted";

pub struct ServerAdopter {
    pub ingestor: Ingestor,
    pub registry: Arc<Registry>,
    pub release: Release,
}

impl Adopter for ServerAdopter {
    fn keep<'a>(&'a self, digest: Digest, bytes: LegacyBytes<'a>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            // Recorded as uploaded by the release's requester, who asked for the adoption.
            let principal = Principal {
                name: self.release.requested_by.clone(),
                owner: self.release.requester_owner.clone(),
                roles: vec![Role::Ci],
                services: None,
                environments: None,
            };
            let request = UploadRequest {
                service: self.release.service.clone(),
                version: Some(ADOPTED_VERSION.into()),
                git_sha: None,
                build_url: None,
                expected: Some(digest),
                declared_size: None,
                pace: None,
            };
            self.ingestor
                .ingest(&principal, request, bytes.map(|chunk| chunk.map(Piece::Bytes)))
                .await
                .map(drop)
                .map_err(|e| format!("keeping the adopted tree as an artifact: {e}"))
        })
    }

    fn record(&self, digest: Digest, nodes: Vec<String>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let (registry, id) = (Arc::clone(&self.registry), self.release.id);
            let event = NewEvent::by_server(
                AuditAction::ReleaseAdopted,
                format!("release/{id}"),
                serde_json::json!({"digest": digest, "nodes": nodes}),
            );
            crate::registry::run(move || registry.record_adoption(id, digest, &nodes, &event))
                .await
                .map_err(|e| format!("recording the adoption: {e}"))
        })
    }
}
