//! Taking artifacts out of use (SPEC 3): an admin blocks an artifact (never deployable again,
//! e.g. after a data-corrupting bug) or purges the bytes of ones never live and older than an
//! age. Both are recorded; the artifact's row stays; an artifact ever live is kept for good.

use std::sync::Arc;

use serde::Serialize;

use crate::audit::NewEvent;
use crate::digest::Digest;
use crate::registry::{Block, Registry, RegistryError};
use crate::store::{Store, StoreError};
use crate::token::{Action, Principal, TokenError};
use crate::utc;

#[derive(Debug, thiserror::Error)]
pub enum CurationError {
    #[error(transparent)]
    Forbidden(#[from] TokenError),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a purge did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Purged {
    /// Artifacts whose bytes were removed.
    pub purged: Vec<Digest>,
    /// Bytes freed.
    pub bytes: u64,
}

/// Blocks `digest` for good, with the reason.
pub async fn block(
    registry: &Arc<Registry>,
    p: &Principal,
    digest: Digest,
    reason: &str,
) -> Result<Block, CurationError> {
    p.require(Action::ManageArtifacts)?;
    if crate::is_blank(reason) {
        return Err(CurationError::BadRequest("a block needs a reason".into()));
    }
    let block = Block {
        reason: reason.to_owned(),
        blocked_by: p.name.clone(),
        owner: p.owner.clone(),
        blocked_at: String::new(),
    };
    let event = NewEvent::by(p, "artifact.block", digest.to_string(), serde_json::json!({"reason": reason}));
    let registry = Arc::clone(registry);
    Ok(tokio::task::spawn_blocking(move || registry.block_artifact(digest, &block, &event)).await.expect("no panic")?)
}

/// Removes the bytes of artifacts never live anywhere and stored more than `older_than_days`
/// ago (and not named by a release still waiting or in flight). Each purge is recorded before
/// its bytes go, so the record never lags the store.
pub async fn purge(
    registry: &Arc<Registry>,
    store: &Store,
    p: &Principal,
    older_than_days: u32,
) -> Result<Purged, CurationError> {
    p.require(Action::ManageArtifacts)?;
    let cutoff = utc::format(utc::now() - time::Duration::days(older_than_days.into()));
    let reader = Arc::clone(registry);
    let candidates = tokio::task::spawn_blocking(move || reader.purge_candidates(&cutoff)).await.expect("no panic")?;
    let mut report = Purged::default();
    for digest in candidates {
        let size = store.artifact_size(digest).await?;
        let event = NewEvent::by(
            p,
            "artifact.purge",
            digest.to_string(),
            serde_json::json!({"older_than_days": older_than_days, "bytes": size}),
        );
        let (writer, by, owner) = (Arc::clone(registry), p.name.clone(), p.owner.clone());
        let recorded = tokio::task::spawn_blocking(move || writer.record_purge(digest, &by, &owner, &event))
            .await
            .expect("no panic");
        if let Err(e) = recorded {
            // Went live (or was named by a release) since the candidates were listed: kept.
            tracing::info!(%digest, error = %e, "not purged");
            continue;
        }
        store.purge_artifact(digest).await?;
        report.bytes += size.unwrap_or(0);
        report.purged.push(digest);
    }
    Ok(report)
}
