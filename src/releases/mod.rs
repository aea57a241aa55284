//! Releases: requests to put an artifact live (deploy, promote, rollback), the four-eyes
//! approval, and the run of an approved release through the deploy seam.
//!
//! Policies (SPEC 3): `promote_from` (only what was live in the source environment),
//! `requires_approval` (a different owner approves, binding the digest), rollback targets
//! (what was live before), at most one release in flight per service and environment. Every
//! decision is checked here; the registry makes each change atomic with its audit event and
//! its triggers refuse anything off the state machine.

mod adopt;
mod decisions;
mod deployer;
mod observed;
mod reads;
mod recovery;
mod requests;
mod run;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::model::release::{
    Approval, Deployment, Detail, Kind, NodeView, Phase, PhaseOutcome, Release, SharedFile, State, StatusRow, Stranded,
    Transition,
};
pub use deployer::{
    Adopt, Adopter, CheckRow, CheckStatus, Deployer, Failure, Gate, LegacyBytes, NodeCheck, Observed, Plan, RecordOnly,
    Reporter,
};

use tokio_util::task::AbortOnDropHandle;

use crate::audit::NewEvent;
use crate::config::{Config, Node};
use crate::digest::Digest;
use crate::ingest::Ingestor;
use crate::metrics::Metrics;
use crate::model::access::{Action, Denied, Principal, Role};
use crate::model::audit::AuditAction;
use crate::registry::{
    ConfiguredEnvironment, Ending, Finished, NewApproval, NewRelease, Registry, RegistryError, Start,
};
use crate::store::Store;
use crate::token::same_owner;
use crate::utc::{self, Timestamp};

/// How long a deploy lease lasts unless renewed. It is renewed every third of that, and the
/// sweep (pending releases past their approval window, deploys whose lease lapsed) runs every
/// half of it.
const LEASE: Duration = Duration::from_secs(30);
/// Shortens the lease (and so the renewal and the sweep) for the integration tests, which
/// make a lease lapse for real. Not for production: a short lease is lost to a slow registry.
const TEST_LEASE_VARIABLE: &str = "RELEASE_TEST_DEPLOY_LEASE_MS";
/// How many times a deploy's final state is tried before it is left to the sweep.
const RECORD_ATTEMPTS: u64 = 5;
/// The longest pause between two resolutions of a deploy whose outcome cannot be recorded.
const MAX_RESOLVE_PAUSE: Duration = Duration::from_secs(15 * 60);

/// The lease's timings.
#[derive(Clone, Copy, Debug)]
struct Timing {
    lease: Duration,
    renewal: Duration,
    sweep: Duration,
}

impl Timing {
    fn with_lease(lease: Duration) -> Timing {
        Timing { lease, renewal: lease / 3, sweep: lease / 2 }
    }

    /// 30 s, unless the test variable says otherwise (warned about).
    fn from_env() -> Timing {
        match std::env::var(TEST_LEASE_VARIABLE).ok().and_then(|v| v.parse::<u64>().ok()).filter(|ms| *ms > 0) {
            Some(ms) => {
                tracing::warn!(ms, "{TEST_LEASE_VARIABLE} shortens the deploy lease: meant for tests only");
                Timing::with_lease(Duration::from_millis(ms))
            }
            None => Timing::with_lease(LEASE),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{what} {name:?} is not in the configuration")]
    NotConfigured { what: &'static str, name: String },
    /// As `NotConfigured`, told to a token that may see every service and environment.
    #[error("{what} {name:?} is not in the configuration (configured: {known})")]
    NotConfiguredAmong { what: &'static str, name: String, known: String },
    #[error("no artifact {digest} was uploaded for {service}")]
    UnknownArtifact { service: String, digest: Digest },
    #[error("no release {0}")]
    NotFound(i64),
    /// A read names a service or environment never configured (nor, for a service, uploaded for).
    #[error("no {what} {name:?}")]
    Unknown { what: &'static str, name: String },
    /// What a token limited to some services or environments is told of something absent, or
    /// outside its scope: the same words either way. `why` says which, for the audit log.
    #[error("{message}")]
    Unseen { message: String, why: Option<Denied> },
    #[error(transparent)]
    Forbidden(#[from] Denied),
    #[error("{0}; wait for it to finish")]
    Conflict(RegistryError),
    /// The release in flight in the cell is a deploy a stopped server left, which the
    /// restarted server is resolving from its nodes.
    #[error(
        "release {} ({} in {}) is being recovered: the server restarted during its deploy and is asking \
         its nodes whether it went live; ask again when that ends (--queue waits for it)",
        .0.id, .0.service, .0.environment
    )]
    Recovering(Box<Release>),
    #[error("{owner} requested release {id}, so {owner} may not approve it: another person must (four eyes)")]
    SelfApproval { id: i64, owner: String },
    #[error("{digest} was never live in {source_env}, so it cannot go to {environment} (promote_from)")]
    NotPromotable { digest: Digest, source_env: String, environment: String },
    #[error(
        "{service} has no node in {environment}: a release there would go live with nothing deployed; \
         add a [[service.{service}.node]] with environment = {environment:?}"
    )]
    NoNodes { service: String, environment: String },
    #[error(
        "artifact {digest} holds {path:?}, but {shared:?} is one of the service's shared paths (kept in shared/ on \
         each node): its nodes would refuse it; build it without that path"
    )]
    SharedPathInArtifact { digest: Digest, path: String, shared: String },
    #[error("nothing is live for {service} in {environment}")]
    NothingLive { service: String, environment: String },
    #[error(
        "no earlier release of {service} in {environment} went live with another artifact: nothing to roll back to"
    )]
    NoRollbackTarget { service: String, environment: String },
    #[error("{digest} was never live for {service} in {environment}, so it is not a rollback target")]
    NotLiveBefore { service: String, environment: String, digest: Digest },
    #[error("release {id} is {state}: {what} needs a release waiting for approval")]
    InvalidState { id: i64, state: State, what: &'static str },
    #[error("release {id} expired at {at} without a decision")]
    Expired { id: i64, at: Timestamp },
    #[error("{0}")]
    BadRequest(String),
    #[error("artifact {digest} is blocked ({reason}): it never goes live again")]
    Blocked { digest: Digest, reason: String },
    #[error("the bytes of artifact {digest} were purged; upload them again to deploy it")]
    Purged { digest: Digest },
    #[error(
        "{} {digest} goes past migrations it lacks ({}): migrations are never undone, so the schema would stay ahead of the code; add --force to do it anyway (recorded)",
        if *kind == Kind::Rollback { "rolling back to" } else { "deploying" },
        migrations.join(", ")
    )]
    MigrationsAhead { kind: Kind, digest: Digest, migrations: Vec<String> },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Registry(RegistryError),
}

impl From<RegistryError> for ReleaseError {
    fn from(e: RegistryError) -> ReleaseError {
        match e {
            e @ RegistryError::InFlight(_) => ReleaseError::Conflict(e),
            RegistryError::ReleaseNotFound(id) => ReleaseError::NotFound(id),
            // Another decision, a cancel or the expiry sweep came first.
            RegistryError::WrongState { id, state } => ReleaseError::InvalidState { id, state, what: "that" },
            RegistryError::ApprovalExpired { id, at } => ReleaseError::Expired { id, at },
            RegistryError::ArtifactBlocked { digest, reason } => ReleaseError::Blocked { digest, reason },
            RegistryError::ArtifactPurged(digest) => ReleaseError::Purged { digest },
            e => ReleaseError::Registry(e),
        }
    }
}

/// What a request may add: nodes to leave out, and consent to roll back past migrations.
#[derive(Clone, Debug, Default)]
pub struct RequestOptions {
    pub exclude_nodes: Vec<String>,
    pub force: bool,
    /// Adopt an application found at `current` deployed another way (deploy, promote).
    pub adopt: bool,
}

/// A release as `show` answers it: its story, and who may still decide it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Shown {
    #[serde(flatten)]
    pub detail: Detail,
    /// While pending: the owners whose tokens may approve it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approvers: Option<Vec<String>>,
}

/// Releases' progress (state, changes) as of one write generation.
type Progress = (u64, HashMap<i64, Option<(State, usize)>>);

/// The release service. Cheap to clone.
#[derive(Clone)]
pub struct Releases {
    config: Arc<Config>,
    registry: Arc<Registry>,
    store: Store,
    deployer: Arc<dyn Deployer>,
    /// Keeps adopted legacy trees as artifacts.
    ingestor: Ingestor,
    /// This server instance, as the owner of the deploy leases it takes.
    instance: String,
    /// Counts releases as they end, and times deploys and their phases.
    metrics: Arc<Metrics>,
    /// Set when the server stops: waiting readers answer at once.
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// The long-polls' view of releases' progress at the last write they woke for.
    progress: Arc<tokio::sync::Mutex<Progress>>,
    timing: Timing,
    /// The releases a task of this process is running (a deploy, or the resolution of one
    /// left unfinished): the sweep never resolves one of these, even when its lease lapsed
    /// (a renewal can fail while the runner is alive).
    running: Arc<Mutex<HashSet<i64>>>,
    /// Deploys resolved without their outcome being recorded (a registry that refuses
    /// writes): how many times, and when the sweep may try again. Each try fences, asks,
    /// reloads and verifies every node, so they come further and further apart.
    resolve_again: Arc<Mutex<HashMap<i64, (u32, std::time::Instant)>>>,
    /// What nodes said they serve, shared for `limits.node_status_max_age`.
    node_answers: Arc<observed::NodeAnswers>,
    /// Deploys a stopped server left unfinished, being resolved from their nodes since this
    /// server started: a request for their cell is told so (`Recovering`), not just "busy".
    recovering: Arc<Mutex<HashSet<i64>>>,
}

impl Releases {
    pub fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        deployer: Arc<dyn Deployer>,
        ingestor: Ingestor,
        metrics: Arc<Metrics>,
    ) -> Releases {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let instance = format!("{}:{}:{}", host.trim(), std::process::id(), &uuid::Uuid::new_v4().to_string()[..8]);
        let store = ingestor.store.clone();
        let (timing, running) = (Timing::from_env(), Arc::default());
        Releases {
            config,
            registry,
            store,
            deployer,
            ingestor,
            instance,
            metrics,
            timing,
            running,
            resolve_again: Arc::default(),
            recovering: Arc::default(),
            node_answers: Arc::default(),
            closing: Default::default(),
            progress: Arc::default(),
        }
    }

    /// Marks release `id` as run by a task of this process until the guard is dropped; `None`
    /// when one already runs it.
    fn claim(&self, id: i64) -> Option<Running> {
        let fresh = self.running.lock().expect("never poisoned").insert(id);
        fresh.then(|| Running { id, set: Arc::clone(&self.running) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, ReleaseError> {
        let registry = Arc::clone(&self.registry);
        Ok(crate::registry::run(move || f(&registry)).await?)
    }

    fn environment(&self, name: &str) -> Result<&crate::config::Environment, ReleaseError> {
        self.config
            .environments
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| ReleaseError::NotConfigured { what: "environment", name: name.to_owned() })
    }

    /// The role, then the service and environment: each must be configured and within the
    /// token's scope, and one outside it is answered exactly as one not configured.
    fn check_scope(&self, p: &Principal, action: Action, service: &str, env: &str) -> Result<(), ReleaseError> {
        p.require(action)?;
        let absent = |what, name: &str| ReleaseError::NotConfigured { what, name: name.to_owned() };
        if self.config.service(service).is_none() {
            let known = self.config.services.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
            let known = match (known.is_empty(), &self.config.source) {
                (false, _) => known,
                (true, Some(file)) => format!("none: add a [service.NAME] table to {}", file.display()),
                (true, None) => "none: the server runs the embedded default, which has no services; \
                                 start it with `release serve --config FILE` (`release init` writes one)"
                    .to_owned(),
            };
            let missing = ReleaseError::NotConfiguredAmong { what: "service", name: service.to_owned(), known };
            return Err(unseen(p, missing, None));
        }
        if let Err(why) = p.require_service(service) {
            return Err(unseen(p, absent("service", service), Some(why)));
        }
        if self.environment(env).is_err() {
            let known = self.config.environments.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ");
            let missing = ReleaseError::NotConfiguredAmong { what: "environment", name: env.to_owned(), known };
            return Err(unseen(p, missing, None));
        }
        if let Err(why) = p.require_environment(env) {
            return Err(unseen(p, absent("environment", env), Some(why)));
        }
        Ok(())
    }

    /// A service or environment a read names: known to the registry (configured now or before;
    /// a service also when artifacts were uploaded for it) and within the token's scope, one
    /// outside it answered exactly as one never known.
    async fn require_known(&self, p: &Principal, named: Named, name: &str) -> Result<(), ReleaseError> {
        let wanted = name.to_owned();
        let (known, scope) = match named {
            Named::Service => (self.blocking(move |r| r.service_known(&wanted)).await?, p.require_service(name)),
            Named::Environment => {
                (self.blocking(move |r| r.environment_known(&wanted)).await?, p.require_environment(name))
            }
        };
        let absent = || ReleaseError::Unknown { what: named.as_str(), name: name.to_owned() };
        if !known {
            return Err(unseen(p, absent(), None));
        }
        scope.map_err(|why| unseen(p, absent(), Some(why)))
    }

    /// Release `id`, if the token may see it; else exactly what it is told of a release that
    /// does not exist.
    async fn visible(&self, p: &Principal, id: i64) -> Result<Release, ReleaseError> {
        let Some(release) = self.blocking(move |r| r.release(id)).await? else {
            return Err(unseen(p, ReleaseError::NotFound(id), None));
        };
        p.sees(&release.service, &release.environment)
            .map_err(|why| unseen(p, ReleaseError::NotFound(id), Some(why)))?;
        Ok(release)
    }
}

/// What a read may name, besides a release.
#[derive(Clone, Copy, Debug)]
enum Named {
    Service,
    Environment,
}

impl Named {
    fn as_str(self) -> &'static str {
        match self {
            Named::Service => "service",
            Named::Environment => "environment",
        }
    }
}

/// Whether a token's scopes let it see (service, environment).
fn visible(p: &Principal, service: &str, environment: &str) -> bool {
    p.sees(service, environment).is_ok()
}

/// What `p` is told of something absent (`missing`), or outside its scope (`why`, the reason,
/// for the audit log): exactly the same either way. A token without limits sees everything, so
/// it is only ever told of what is absent, in the usual words.
fn unseen(p: &Principal, missing: ReleaseError, why: Option<Denied>) -> ReleaseError {
    if !p.is_scoped() {
        return missing;
    }
    // A scoped token learns nothing of what lies outside its scope, the names configured
    // there included.
    let missing = match missing {
        ReleaseError::NotConfiguredAmong { what, name, .. } => ReleaseError::NotConfigured { what, name },
        other => other,
    };
    ReleaseError::Unseen { message: p.as_if_absent(&missing), why }
}

/// Removes its release from the set of those a task of this process runs, when dropped.
struct Running {
    id: i64,
    set: Arc<Mutex<HashSet<i64>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.set.lock().expect("never poisoned").remove(&self.id);
    }
}

#[cfg(test)]
mod tests;
