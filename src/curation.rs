//! Taking artifacts out of use (SPEC 3): an admin blocks an artifact (never deployable again,
//! e.g. after a data-corrupting bug) or purges the bytes of ones never live and older than an
//! age. Both are recorded; the artifact's row stays; an artifact ever live is kept for good.
//!
//! A block cancels, in its own transaction, every release of the artifact still waiting for
//! approval or approved and not started; a deploy already running stops before its nodes
//! switch. A purge records each artifact in a transaction that checks again that nothing
//! needs its bytes (a release waiting, in flight or ever live; an adoption), and only then
//! deletes them; a release request refuses purged bytes in its own transaction.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;

use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::model::access::{Action, Denied, Principal};
use crate::model::audit::AuditAction;
use crate::model::audit::NewEvent;
use crate::model::release::Release;
use crate::registry::{Block, Registry, RegistryError};
use crate::store::{Store, StoreError};
use crate::utc::{self, Timestamp};

#[derive(Debug, thiserror::Error)]
pub enum CurationError {
    #[error(transparent)]
    Forbidden(#[from] Denied),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes a purge's "day" shorter, so that integration tests can purge what they uploaded a
/// moment ago (`older_than_days` must be at least 1). Read once, warned about; never for
/// production.
const TEST_DAY_VARIABLE: &str = "RELEASE_TEST_PURGE_DAY_MS";

/// What a block did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Blocked {
    #[serde(flatten)]
    pub block: Block,
    /// The releases of the artifact it cancelled: waiting for approval, or approved and not
    /// started.
    pub cancelled: Vec<i64>,
}

/// What a purge did.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Purged {
    /// Artifacts whose bytes were removed.
    pub purged: Vec<Digest>,
    /// Bytes freed.
    pub bytes: u64,
}

/// Blocks `digest` for good, with the reason, and cancels its releases waiting for approval
/// or approved and not started (counted as they end).
pub async fn block(
    registry: &Arc<Registry>,
    metrics: &Metrics,
    p: &Principal,
    digest: Digest,
    reason: &str,
) -> Result<Blocked, CurationError> {
    p.require(Action::ManageArtifacts)?;
    if crate::is_blank(reason) {
        return Err(CurationError::BadRequest("a block needs a reason".into()));
    }
    let block = Block {
        reason: reason.to_owned(),
        blocked_by: p.name.clone(),
        owner: p.owner.clone(),
        blocked_at: Timestamp::now(),
    };
    let event = NewEvent::by(p, AuditAction::ArtifactBlock, digest.to_string(), serde_json::json!({"reason": reason}));
    let registry = Arc::clone(registry);
    let (block, cancelled): (Block, Vec<Release>) =
        crate::registry::run(move || registry.block_artifact(digest, &block, &event)).await?;
    for release in &cancelled {
        tracing::warn!(release = release.id, %digest, "release cancelled: its artifact was blocked");
        metrics.record_release(release, None);
    }
    Ok(Blocked { block, cancelled: cancelled.iter().map(|r| r.id).collect() })
}

/// Removes the bytes of artifacts never live anywhere and stored more than `older_than_days`
/// (at least 1) ago, that no release waiting or in flight names and that are not an adopted
/// legacy tree. Each purge is recorded before its bytes go, so the record never lags the
/// store, in a transaction that checks all that again: a release requested since the
/// candidates were listed keeps its bytes.
pub async fn purge(
    registry: &Arc<Registry>,
    store: &Store,
    p: &Principal,
    older_than_days: u32,
) -> Result<Purged, CurationError> {
    p.require(Action::ManageArtifacts)?;
    if older_than_days == 0 {
        return Err(CurationError::BadRequest(
            "older_than_days must be at least 1 (got 0): a purge never takes the bytes of an artifact \
             uploaded today, which a release may be about to name"
                .into(),
        ));
    }
    // Past the calendar's start (a huge number of days), nothing is that old.
    let age = day().saturating_mul(older_than_days);
    let Some(cutoff) =
        time::Duration::try_from(age).ok().and_then(|age| utc::now().checked_sub(age)).map(Timestamp::at)
    else {
        return Ok(Purged::default());
    };
    let reader = Arc::clone(registry);
    let listed = cutoff.clone();
    let candidates = crate::registry::run(move || reader.purge_candidates(&listed)).await?;
    let mut report = Purged::default();
    for digest in candidates {
        let size = store.artifact_size(digest).await?;
        let event = NewEvent::by(
            p,
            AuditAction::ArtifactPurge,
            digest.to_string(),
            serde_json::json!({"older_than_days": older_than_days, "bytes": size}),
        );
        // No upload of these bytes between the record and the delete (it would record their
        // restore, then lose them to the delete).
        let _purging = store.purging().await;
        let (writer, by, owner, cutoff) = (Arc::clone(registry), p.name.clone(), p.owner.clone(), cutoff.clone());
        let recorded = crate::registry::run(move || writer.record_purge(digest, &cutoff, &by, &owner, &event)).await?;
        if !recorded {
            // Named by a release (or adopted, or purged by another call) since the candidates
            // were listed: kept.
            tracing::info!(%digest, "not purged: needed since it was listed");
            continue;
        }
        crate::stall_point("purge-recorded").await;
        crate::crash_point("purge-recorded");
        remove_bytes(store, registry, digest).await?;
        report.bytes += size.unwrap_or(0);
        report.purged.push(digest);
    }
    Ok(report)
}

/// Deletes a purged artifact's bytes and its index: the index first, so a stop in between
/// leaves bytes the start-up sweep finds (and removes with their index) rather than an index
/// no sweep would look for.
pub async fn remove_bytes(store: &Store, registry: &Arc<Registry>, digest: Digest) -> Result<(), CurationError> {
    let reader = Arc::clone(registry);
    if let Some(index) = crate::registry::run(move || reader.artifact_index(digest)).await? {
        store.purge_index(index.sha256).await?;
    }
    store.purge_artifact(digest).await?;
    Ok(())
}

/// A day, unless the test variable says otherwise (warned about once).
fn day() -> Duration {
    static DAY: OnceLock<Duration> = OnceLock::new();
    *DAY.get_or_init(|| {
        match std::env::var(TEST_DAY_VARIABLE).ok().and_then(|v| v.parse::<u64>().ok()).filter(|ms| *ms > 0) {
            Some(ms) => {
                tracing::warn!(ms, "{TEST_DAY_VARIABLE} shortens a purge's day: meant for tests only");
                Duration::from_millis(ms)
            }
            None => Duration::from_secs(24 * 60 * 60),
        }
    })
}
