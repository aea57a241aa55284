//! Releases: requests to put an artifact live (deploy, promote, rollback), the four-eyes
//! approval, and the run of an approved release through the deploy seam.
//!
//! Policies (SPEC 3): `promote_from` (only what was live in the source environment),
//! `requires_approval` (a different owner approves, binding the digest), rollback targets
//! (what was live before), at most one release in flight per service and environment. Every
//! decision is checked here; the registry makes each change atomic with its audit event and
//! its triggers refuse anything off the state machine.

mod adopt;
mod deployer;
mod observed;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::model::release::{
    Approval, Deployment, Detail, Kind, NodeView, Release, SharedFile, State, StatusRow, Stranded, Transition,
};
pub use deployer::{
    Adopt, Adopter, CheckRow, Deployer, Failure, Gate, LegacyBytes, NodeCheck, Observed, Plan, RecordOnly, Reporter,
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
use crate::utc;

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
    Expired { id: i64, at: String },
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
#[derive(Clone, Debug, serde::Serialize)]
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

    /// Records the configured services and environments; starts resolving (in the
    /// background) what a stopped server left in flight; starts the expiry sweep.
    pub async fn start(&self) -> Result<(), ReleaseError> {
        let services: Vec<(String, String)> = self
            .config
            .services
            .values()
            .map(|s| {
                (s.name.clone(), serde_json::to_value(s.kind).expect("serializes").as_str().unwrap_or("").to_owned())
            })
            .collect();
        let environments: Vec<ConfiguredEnvironment> = self
            .config
            .environments
            .iter()
            .map(|e| ConfiguredEnvironment {
                name: e.name.clone(),
                promote_from: e.promote_from.clone(),
                requires_approval: e.requires_approval,
            })
            .collect();
        self.blocking(move |r| r.sync_config(&services, &environments)).await?;
        let deployer = Arc::clone(&self.deployer);
        tokio::task::spawn_blocking(move || deployer.start()).await.expect("the deployer's start does not panic");
        self.recover().await?;
        let sweeper = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(sweeper.timing.sweep).await;
                sweeper.sweep().await;
            }
        });
        Ok(())
    }

    /// A deploy left `deploying` by a stopped server is resolved, and an `approved` one not
    /// yet started is started. The server holds its data directory's lock, so every lease in
    /// the registry belonged to a server that is gone: they are cleared, none needs a human.
    ///
    /// Only the registry's part is done before this returns: resolving asks the nodes, which
    /// can take as long as a deploy, so each runs in a task of its own while the server
    /// already answers. Its cell stays busy meanwhile (the release is `deploying`), and a
    /// request for it is told it is being recovered. Approved releases are in other cells
    /// (one in flight per cell), so they start at once.
    async fn recover(&self) -> Result<(), ReleaseError> {
        let cleared = self.blocking(|r| r.clear_leases()).await?;
        if cleared > 0 {
            tracing::warn!(cleared, "cleared deploy leases left by a stopped server");
        }
        for release in self.blocking(|r| r.releases_in_state(State::Deploying)).await? {
            let Some(running) = self.claim(release.id) else { continue };
            self.recovering.lock().expect("never poisoned").insert(release.id);
            tracing::warn!(release = release.id, "resolving a deploy the stopped server left, in the background");
            let this = self.clone();
            tokio::spawn(async move {
                let id = release.id;
                this.resolve(release, "the server stopped during the deploy", running).await;
                this.recovering.lock().expect("never poisoned").remove(&id);
            });
        }
        for release in self.blocking(|r| r.releases_in_state(State::Approved)).await? {
            self.launch(release);
        }
        Ok(())
    }

    /// Whether release `id` is a deploy a stopped server left, still being resolved.
    pub fn is_recovering(&self, id: i64) -> bool {
        self.recovering.lock().expect("never poisoned").contains(&id)
    }

    /// `e`, or, when it is a refusal because of a release still being recovered, that.
    fn busy(&self, e: ReleaseError) -> ReleaseError {
        match e {
            ReleaseError::Conflict(RegistryError::InFlight(busy)) if self.is_recovering(busy.id) => {
                ReleaseError::Recovering(busy)
            }
            e => e,
        }
    }

    /// Resolves a deploy whose run ended without recording how (a stopped server, or a run
    /// that could not record its outcome) from what its nodes say, as SPEC 7 asks of a
    /// stopped server's: all of them on the new release → finished (reload, verify) and live;
    /// otherwise put back and failed, naming the nodes that could not be. The deployer fences
    /// every node first, so a late call of the run that ended is refused by the node. `cause`
    /// begins the reason of a failure.
    async fn resolve(&self, release: Release, cause: &'static str, _running: Running) {
        let id = release.id;
        let (r, owner, until) = (release.clone(), self.instance.clone(), self.lease_expiry());
        match self.blocking(move |reg| reg.take_lease(&r, &owner, &until)).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(release = id, "another server holds the deploy lease; leaving the release to it");
                return;
            }
            Err(e) => tracing::error!(release = id, error = %e, "could not take the deploy lease to resolve"),
        }
        // Aborted when dropped: the lease renewer ends with its deploy, whatever way it ends.
        let _renewer = AbortOnDropHandle::new(self.renew_lease_while_running(release.clone()));
        let (plan, outcome) = match self.plan(&release).await {
            Ok(plan) => {
                let (deployer, resolving) = (Arc::clone(&self.deployer), plan.clone());
                match tokio::spawn(async move { deployer.recover(&resolving).await }).await {
                    Ok(outcome) => (Some(plan), outcome),
                    Err(e) => (Some(plan), Err(Failure::new(format!("resolving it from the nodes crashed: {e}")))),
                }
            }
            Err(e) => (None, Err(Failure::new(format!("it could not be resolved from the nodes: {e}")))),
        };
        let outcome = outcome.map_err(|f| Failure { reason: format!("{cause}; {}", f.reason), stranded: f.stranded });
        tracing::warn!(release = id, cause, finished = outcome.is_ok(), "resolved a deploy from its nodes");
        self.conclude(id, outcome, plan).await;
        let unrecorded = !matches!(self.blocking(move |r| r.release(id)).await, Ok(Some(r)) if r.state.is_final());
        let mut again = self.resolve_again.lock().expect("never poisoned");
        if unrecorded {
            let tries = again.get(&id).map_or(0, |(n, _)| *n) + 1;
            let pause = (self.timing.lease * 2u32.pow(tries.min(10))).min(MAX_RESOLVE_PAUSE);
            tracing::error!(
                release = id,
                tries,
                ?pause,
                "the resolved deploy could not be recorded; trying again later"
            );
            again.insert(id, (tries, std::time::Instant::now() + pause));
        } else {
            again.remove(&id);
        }
    }

    /// Records a deploy's final state and ends its lease, retried with a growing pause. When
    /// it still cannot be recorded, the release is left `deploying`: its run ends, so its
    /// lease lapses and the sweep resolves it from the nodes (never failed blindly: the nodes
    /// may serve it). True when this call recorded it.
    async fn finish(&self, id: i64, ending: Ending) -> bool {
        let (action, details, state) = match &ending {
            Ending::Failed { reason, stranded } => {
                (AuditAction::ReleaseFailed, serde_json::json!({"reason": reason, "stranded": stranded}), State::Failed)
            }
            Ending::Live { .. } => (AuditAction::ReleaseLive, serde_json::json!({}), State::Live),
        };
        let event = NewEvent::by_server(action, format!("release/{id}"), details);
        for attempt in 1..=RECORD_ATTEMPTS {
            let (event, recorded) = (event.clone(), ending.clone());
            match self.blocking(move |r| r.finish_deploy(id, &recorded, &event)).await {
                Ok(finished) => {
                    match &ending {
                        Ending::Failed { reason, stranded } => {
                            tracing::warn!(release = id, reason, ?stranded, "release failed")
                        }
                        Ending::Live { .. } => tracing::info!(release = id, "release live"),
                    }
                    self.record_finished(&finished);
                    return true;
                }
                // Already final: an earlier attempt committed, its answer was lost.
                Err(ReleaseError::InvalidState { .. }) => return false,
                Err(e) => {
                    tracing::error!(release = id, attempt, %state, error = %e, "could not record the release's final state");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
        tracing::error!(
            release = id,
            %state,
            "gave up recording the release's final state: it stays deploying until its lease lapses, \
             then the sweep resolves it from the nodes"
        );
        false
    }

    /// Expires pending releases past their approval window, and resolves deploys whose lease
    /// lapsed and that no task of this process runs (their run ended without recording an
    /// outcome), each in a task of its own.
    async fn sweep(&self) {
        if let Err(e) = self.expire_pending().await {
            tracing::error!(error = %e, "expiring pending releases failed");
        }
        match self.blocking(|r| r.lapsed_deploys()).await {
            Ok(lapsed) => {
                for release in lapsed {
                    let not_yet =
                        self.resolve_again.lock().expect("never poisoned").get(&release.id).map(|(_, at)| *at);
                    if not_yet.is_some_and(|at| std::time::Instant::now() < at) {
                        continue;
                    }
                    let Some(running) = self.claim(release.id) else {
                        tracing::warn!(release = release.id, "the deploy lease lapsed while its run goes on");
                        continue;
                    };
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.resolve(release, "the deploy's run ended without recording its outcome", running).await
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "looking for lapsed deploys failed"),
        }
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

    /// `release deploy S --env E DIGEST`.
    pub async fn deploy(
        &self,
        p: &Principal,
        service: &str,
        env: &str,
        digest: Digest,
        options: &RequestOptions,
    ) -> Result<Release, ReleaseError> {
        self.check_scope(p, Action::Deploy, service, env)?;
        let environment = self.environment(env)?;
        if environment.requires_approval && !p.has(Role::Deployer) && !p.has(Role::Admin) {
            return Err(Denied::CiNeedsNoApproval { name: p.name.clone(), environment: env.to_owned() }.into());
        }
        self.require_uploaded(service, digest).await?;
        if let Some(source) = &environment.promote_from {
            self.require_went_live(service, source, env, digest).await?;
        }
        let details = self.migration_guard(Kind::Deploy, service, env, None, digest, options).await?;
        self.request(p, Kind::Deploy, service, env, digest, None, options, details).await
    }

    /// `release promote S --to E [--from E0]`: what is live in E0 goes to E.
    pub async fn promote(
        &self,
        p: &Principal,
        service: &str,
        env: &str,
        from: Option<&str>,
        options: &RequestOptions,
    ) -> Result<Release, ReleaseError> {
        self.check_scope(p, Action::Promote, service, env)?;
        let environment = self.environment(env)?;
        let source = match from.map(str::to_owned).or_else(|| environment.promote_from.clone()) {
            Some(source) => source,
            None => {
                return Err(ReleaseError::BadRequest(format!(
                    "{env} has no promote_from; name the source environment with --from"
                )));
            }
        };
        self.environment(&source).map_err(|e| unseen(p, e, None))?;
        // Promoting reads what is live in the source: a token must see it too, or it could
        // learn another environment's live digest through the release it creates.
        if let Err(why) = p.require_environment(&source) {
            let absent = ReleaseError::NotConfigured { what: "environment", name: source.clone() };
            return Err(unseen(p, absent, Some(why)));
        }
        let (s, e) = (service.to_owned(), source.clone());
        let live = self
            .blocking(move |r| r.live_release(&s, &e))
            .await?
            .ok_or_else(|| ReleaseError::NothingLive { service: service.to_owned(), environment: source.clone() })?;
        if let Some(required) = &environment.promote_from {
            self.require_went_live(service, required, env, live.digest).await?;
        }
        self.request(p, Kind::Promote, service, env, live.digest, Some(source), options, serde_json::json!({})).await
    }

    /// `release rollback S --env E [--to DIGEST]`.
    pub async fn rollback(
        &self,
        p: &Principal,
        service: &str,
        env: &str,
        to: Option<Digest>,
        options: &RequestOptions,
    ) -> Result<Release, ReleaseError> {
        self.check_scope(p, Action::Rollback, service, env)?;
        let (s, e) = (service.to_owned(), env.to_owned());
        let live = self
            .blocking(move |r| r.live_release(&s, &e))
            .await?
            .ok_or_else(|| ReleaseError::NothingLive { service: service.to_owned(), environment: env.to_owned() })?;
        let target = match to {
            Some(digest) => {
                let (s, e) = (service.to_owned(), env.to_owned());
                if !self.blocking(move |r| r.went_live(&s, &e, digest)).await? {
                    return Err(ReleaseError::NotLiveBefore {
                        service: service.to_owned(),
                        environment: env.to_owned(),
                        digest,
                    });
                }
                digest
            }
            None => {
                let current = live.clone();
                self.blocking(move |r| r.rollback_target(&current)).await?.ok_or_else(|| {
                    ReleaseError::NoRollbackTarget { service: service.to_owned(), environment: env.to_owned() }
                })?
            }
        };
        let details = self.migration_guard(Kind::Rollback, service, env, Some(live.digest), target, options).await?;
        self.request(p, Kind::Rollback, service, env, target, None, options, details).await
    }

    /// Migrations are never undone: taking a Laravel service to an artifact that lacks
    /// migration files the live one has (a rollback, or a plain deploy of an older build)
    /// leaves the schema ahead of the code, so it takes `--force`, recorded in the request's
    /// details (returned). `live`: the live digest when the caller has read it already.
    async fn migration_guard(
        &self,
        kind: Kind,
        service: &str,
        env: &str,
        live: Option<Digest>,
        target: Digest,
        options: &RequestOptions,
    ) -> Result<serde_json::Value, ReleaseError> {
        if !self.config.service(service).is_some_and(|s| s.kind == crate::config::ServiceKind::Laravel) {
            return Ok(serde_json::json!({}));
        }
        let from = match live {
            Some(digest) => digest,
            None => {
                let (s, e) = (service.to_owned(), env.to_owned());
                match self.blocking(move |r| r.live_release(&s, &e)).await? {
                    Some(release) => release.digest,
                    None => return Ok(serde_json::json!({})),
                }
            }
        };
        let (live_artifact, target_artifact) =
            self.blocking(move |r| Ok((r.artifact(from)?, r.artifact(target)?))).await?;
        let ahead: Vec<String> = match (live_artifact, target_artifact) {
            (Some(l), Some(t)) => l.migrations.into_iter().filter(|m| !t.migrations.contains(m)).collect(),
            _ => vec![],
        };
        match (ahead.is_empty(), options.force) {
            (true, _) => Ok(serde_json::json!({})),
            (false, false) => Err(ReleaseError::MigrationsAhead { kind, digest: target, migrations: ahead }),
            (false, true) => Ok(serde_json::json!({"forced": true, "migrations_ahead": ahead})),
        }
    }

    /// `--exclude-node` names must be nodes of the service in the environment, and at least
    /// one node must remain. A Laravel service's migrate node may be left out only of a
    /// rollback, which runs no migration (SPEC 7: a rollback never waits on it).
    fn check_exclusions(
        &self,
        kind: Kind,
        service: &str,
        env: &str,
        names: &[String],
    ) -> Result<Vec<String>, ReleaseError> {
        if names.is_empty() {
            return Ok(vec![]);
        }
        let nodes: Vec<String> = self
            .config
            .service(service)
            .map(|s| s.nodes.iter().filter(|n| n.environment == env).map(|n| n.display_name()).collect())
            .unwrap_or_default();
        if let Some(unknown) = names.iter().find(|n| !nodes.contains(n)) {
            return Err(ReleaseError::BadRequest(format!(
                "--exclude-node {unknown:?} is not a node of {service} in {env} (nodes: {})",
                nodes.join(", ")
            )));
        }
        if nodes.iter().all(|n| names.contains(n)) {
            return Err(ReleaseError::BadRequest(format!("every node of {service} in {env} would be left out")));
        }
        if kind != Kind::Rollback
            && let Some(s) = self.config.service(service).filter(|s| s.kind == crate::config::ServiceKind::Laravel)
            && let Some(migrator) = s.nodes.iter().find(|n| n.environment == env && n.migrate)
            && names.contains(&migrator.display_name())
        {
            return Err(ReleaseError::BadRequest(format!(
                "--exclude-node {:?} is the migrate node of {service} in {env}: migrations would not run; \
                 mark another node `migrate = true` first",
                migrator.display_name()
            )));
        }
        let mut names = names.to_vec();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn require_uploaded(&self, service: &str, digest: Digest) -> Result<(), ReleaseError> {
        let uploads = self.blocking(move |r| r.artifact_uploads(digest)).await?;
        if uploads.iter().any(|u| u.service == service) {
            Ok(())
        } else {
            Err(ReleaseError::UnknownArtifact { service: service.to_owned(), digest })
        }
    }

    async fn require_went_live(
        &self,
        service: &str,
        source: &str,
        env: &str,
        digest: Digest,
    ) -> Result<(), ReleaseError> {
        let (s, e) = (service.to_owned(), source.to_owned());
        if self.blocking(move |r| r.went_live(&s, &e, digest)).await? {
            Ok(())
        } else {
            Err(ReleaseError::NotPromotable { digest, source_env: source.to_owned(), environment: env.to_owned() })
        }
    }

    /// Refuses an artifact holding one of the service's shared paths (uploaded before the
    /// service, or that path, was configured): its nodes would refuse it at prepare. Known
    /// from the upload's check, or an earlier one; otherwise the artifact is read from the
    /// store once and checked (a scan of its tar stream), and a clean verdict recorded.
    async fn require_clean_of_shared(&self, service: &str, digest: Digest) -> Result<(), ReleaseError> {
        let shared = self.config.service(service).map(|s| s.shared.clone()).unwrap_or_default();
        if shared.is_empty() {
            return Ok(());
        }
        let known = shared.clone();
        if self.blocking(move |r| r.shared_checked(digest, &known)).await? {
            return Ok(());
        }
        let bytes = self.store.read_artifact(digest, None).await?;
        let bytes = futures::TryStreamExt::map_err(bytes, std::io::Error::other);
        let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(bytes));
        let options = crate::archive::CheckOptions {
            max_unpacked_bytes: u64::MAX,
            max_files: u64::MAX,
            shared: shared.clone(),
            record_migrations: false,
        };
        let started = std::time::Instant::now();
        let verdict = tokio::task::spawn_blocking(move || {
            crate::archive::check(std::io::BufReader::with_capacity(1 << 20, reader), &options)
        })
        .await
        .expect("the archive check does not panic");
        tracing::info!(%digest, service, ms = started.elapsed().as_millis() as u64, "checked an artifact for shared paths");
        match verdict {
            Ok(_) => {
                self.blocking(move |r| r.record_shared_checked(digest, &shared)).await?;
                Ok(())
            }
            Err(crate::archive::ArchiveError::SharedPath { path, shared }) => {
                Err(ReleaseError::SharedPathInArtifact { digest, path, shared })
            }
            Err(e) => Err(ReleaseError::BadRequest(format!("artifact {digest} fails its check when read again: {e}"))),
        }
    }

    /// Records the request: pending when the environment requires approval (a rollback to an
    /// artifact approved there before does not), else approved and started at once.
    #[allow(clippy::too_many_arguments)]
    async fn request(
        &self,
        p: &Principal,
        kind: Kind,
        service: &str,
        env: &str,
        digest: Digest,
        source_environment: Option<String>,
        options: &RequestOptions,
        extra: serde_json::Value,
    ) -> Result<Release, ReleaseError> {
        let environment = self.environment(env)?.clone();
        if !self.config.service(service).is_some_and(|s| s.nodes.iter().any(|n| n.environment == env)) {
            return Err(ReleaseError::NoNodes { service: service.to_owned(), environment: env.to_owned() });
        }
        let excluded = self.check_exclusions(kind, service, env, &options.exclude_nodes)?;
        if let Some(block) = self.blocking(move |r| r.artifact_block(digest)).await? {
            return Err(ReleaseError::Blocked { digest, reason: block.reason });
        }
        if self.store.artifact_size(digest).await?.is_none() {
            return Err(ReleaseError::Purged { digest });
        }
        self.require_clean_of_shared(service, digest).await?;
        let approved_before = if kind == Kind::Rollback && environment.requires_approval {
            let (s, e) = (service.to_owned(), env.to_owned());
            self.blocking(move |r| r.was_approved(&s, &e, digest)).await?
        } else {
            false
        };
        let needs_approval = environment.requires_approval && !approved_before;
        let (s, e) = (service.to_owned(), env.to_owned());
        let replaces = self.blocking(move |r| r.live_release(&s, &e)).await?.map(|r| r.id);
        let new = NewRelease {
            service: service.to_owned(),
            environment: env.to_owned(),
            digest,
            kind,
            state: if needs_approval { State::PendingApproval } else { State::Approved },
            requested_by: p.name.clone(),
            requester_owner: p.owner.clone(),
            source_environment,
            replaces,
            expires_at: needs_approval.then(|| {
                utc::format(
                    utc::now() + time::Duration::try_from(environment.approval_ttl).unwrap_or(time::Duration::DAY),
                )
            }),
            excluded: excluded.clone(),
            adopt: options.adopt,
            forced_past: extra["migrations_ahead"]
                .as_array()
                .map(|files| files.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            note: match (needs_approval, approved_before, environment.requires_approval) {
                (true, _, _) => Some(format!("{env} requires approval")),
                (false, true, _) => Some("rollback to an artifact approved in this environment before".into()),
                _ => None,
            },
        };
        let event = NewEvent::by(p, kind.audit_action(), String::new(), {
            let mut details = serde_json::json!({
                "service": service, "environment": env, "digest": digest,
                "state": new.state, "replaces": replaces, "source_environment": new.source_environment,
                "excluded_nodes": excluded,
            });
            if options.adopt {
                details["adopt"] = serde_json::json!(true);
            }
            if let (Some(d), Some(x)) = (details.as_object_mut(), extra.as_object()) {
                d.extend(x.clone());
            }
            details
        });
        let release = self.blocking(move |r| r.create_release(&new, &event)).await.map_err(|e| self.busy(e))?;
        if release.state == State::Approved {
            self.launch(release.clone());
        }
        Ok(release)
    }

    /// `release check S --env E`: each node of the cell looked at for what a deploy will need,
    /// nothing changed. Needs the deploy role (it runs commands on the nodes).
    pub async fn check(&self, p: &Principal, service: &str, env: &str) -> Result<Vec<NodeCheck>, ReleaseError> {
        self.check_scope(p, Action::Deploy, service, env)?;
        let config = self.config.service(service).expect("checked in scope").clone();
        let nodes: Vec<Node> = config.nodes.iter().filter(|n| n.environment == env).cloned().collect();
        if nodes.is_empty() {
            return Err(ReleaseError::NoNodes { service: service.to_owned(), environment: env.to_owned() });
        }
        // Room for one more: the largest artifact of the service unpacked so far.
        let s = service.to_owned();
        let needed = self.blocking(move |r| r.largest_unpacked(&s)).await?;
        Ok(self.deployer.check(&config, &nodes, needed).await)
    }

    /// `release approve ID`: by an approver who is not the requester (owners compared), of a
    /// release whose artifact is not blocked (the refusal names the block, also when the block
    /// has cancelled the release already).
    pub async fn approve(&self, p: &Principal, id: i64) -> Result<Release, ReleaseError> {
        let release = self.decidable(p, id).await?;
        let digest = release.digest;
        if let Some(block) = self.blocking(move |r| r.artifact_block(digest)).await? {
            return Err(ReleaseError::Blocked { digest, reason: block.reason });
        }
        let release = self.pending(p, id, "approval").await?;
        if same_owner(&release.requester_owner, &p.owner) {
            return Err(ReleaseError::SelfApproval { id, owner: p.owner.clone() });
        }
        let decision =
            NewApproval { approve: true, decided_by: p.name.clone(), decider_owner: p.owner.clone(), reason: None };
        let event = NewEvent::by(
            p,
            AuditAction::ReleaseApprove,
            format!("release/{id}"),
            serde_json::json!({"digest": release.digest}),
        );
        let release = self.blocking(move |r| r.decide(id, &decision, &event)).await.map_err(|e| self.busy(e))?;
        self.launch(release.clone());
        Ok(release)
    }

    /// `release reject ID --reason TEXT`.
    pub async fn reject(&self, p: &Principal, id: i64, reason: &str) -> Result<Release, ReleaseError> {
        if crate::is_blank(reason) {
            return Err(ReleaseError::BadRequest("a rejection needs a reason".into()));
        }
        let release = self.pending(p, id, "rejection").await?;
        let decision = NewApproval {
            approve: false,
            decided_by: p.name.clone(),
            decider_owner: p.owner.clone(),
            reason: Some(reason.to_owned()),
        };
        let event = NewEvent::by(
            p,
            AuditAction::ReleaseReject,
            format!("release/{id}"),
            serde_json::json!({"digest": release.digest, "reason": reason}),
        );
        let rejected = self.blocking(move |r| r.decide(id, &decision, &event)).await?;
        self.metrics.record_release(&rejected, None);
        Ok(rejected)
    }

    /// `release cancel ID`: the requester (same owner) or an admin withdraws a pending release.
    pub async fn cancel(&self, p: &Principal, id: i64) -> Result<Release, ReleaseError> {
        p.require(Action::Cancel)?;
        let release = self.visible(p, id).await?;
        if !same_owner(&release.requester_owner, &p.owner) && !p.has(Role::Admin) {
            return Err(Denied::NotRequester { id, owner: release.requester_owner }.into());
        }
        if release.state != State::PendingApproval {
            return Err(ReleaseError::InvalidState { id, state: release.state, what: "cancelling" });
        }
        let event = NewEvent::by(p, AuditAction::ReleaseCancel, format!("release/{id}"), serde_json::json!({}));
        let actor = p.name.clone();
        let cancelled =
            self.blocking(move |r| r.transition(id, State::Cancelled, &actor, Some("withdrawn"), &event)).await?;
        self.metrics.record_release(&cancelled, None);
        Ok(cancelled)
    }

    /// Expires pending releases past their approval window, counting each.
    async fn expire_pending(&self) -> Result<(), ReleaseError> {
        for expired in self.blocking(|r| r.expire_pending()).await? {
            self.metrics.record_release(&expired, None);
        }
        Ok(())
    }

    /// Counts a deploy that ended (and times it), and the pending releases its going live
    /// cancelled.
    fn record_finished(&self, finished: &Finished) {
        self.metrics.record_release(&finished.release, finished.deploying_since.as_deref());
        for cancelled in &finished.cancelled {
            self.metrics.record_release(cancelled, None);
        }
    }

    /// A release this approver may decide, whatever its state: the role, then the scopes (one
    /// outside them answered as one that does not exist).
    async fn decidable(&self, p: &Principal, id: i64) -> Result<Release, ReleaseError> {
        p.require(Action::Decide)?;
        self.visible(p, id).await
    }

    /// A release an approver may decide now: in scope, pending, not expired.
    async fn pending(&self, p: &Principal, id: i64, what: &'static str) -> Result<Release, ReleaseError> {
        let release = self.decidable(p, id).await?;
        if release.state != State::PendingApproval {
            return Err(ReleaseError::InvalidState { id, state: release.state, what });
        }
        if let Some(at) = &release.expires_at
            && at.as_str() <= utc::now_text().as_str()
        {
            self.expire_pending().await?;
            return Err(ReleaseError::Expired { id, at: at.clone() });
        }
        Ok(release)
    }

    /// `show`, once the release has more than `seen` transitions and node phases recorded, or
    /// is final, or `wait` has passed, or the server stops: a follower (`--wait`) hears of each
    /// change as it is committed instead of polling for it.
    pub async fn show_after(&self, p: &Principal, id: i64, seen: usize, wait: Duration) -> Result<Shown, ReleaseError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut writes = self.registry.watch_writes();
        writes.borrow_and_update();
        // The whole story once (it also checks the caller may see it), then only the cheap
        // count at each write anywhere, until it moved.
        let shown = self.show(p, id).await?;
        let changes = shown.detail.transitions.len() + shown.detail.deployments.len();
        if changes > seen || shown.detail.release.state.is_final() {
            return Ok(shown);
        }
        loop {
            if self.closing.load(std::sync::atomic::Ordering::SeqCst)
                || tokio::time::timeout_at(deadline, writes.changed()).await.is_err()
            {
                return Ok(shown);
            }
            let generation = *writes.borrow_and_update();
            match self.progress_after(generation, id).await? {
                Some((state, now)) if now <= seen && !state.is_final() => continue,
                _ => return self.show(p, id).await,
            }
        }
    }

    /// A release's progress as of write `generation`, read once for all the long-polls that
    /// every write wakes, one read at a time: 1,000 long-polls each reading at every write
    /// filled the blocking threads (515) and slowed uploads 7 times.
    async fn progress_after(&self, generation: u64, id: i64) -> Result<Option<(State, usize)>, ReleaseError> {
        let mut seen = self.progress.lock().await;
        if seen.0 != generation {
            *seen = (generation, HashMap::new());
        }
        if let Some(progress) = seen.1.get(&id) {
            return Ok(*progress);
        }
        let progress = self.blocking(move |r| r.release_progress(id)).await?;
        seen.1.insert(id, progress);
        Ok(progress)
    }

    /// Ends every [`Releases::show_after`] wait (the server is stopping and finishes the
    /// requests in flight first).
    pub fn stop_waiting(&self) {
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        self.registry.nudge();
    }

    pub async fn show(&self, p: &Principal, id: i64) -> Result<Shown, ReleaseError> {
        p.require(Action::Read)?;
        let Some(detail) = self.blocking(move |r| r.release_detail(id)).await? else {
            return Err(unseen(p, ReleaseError::NotFound(id), None));
        };
        p.sees(&detail.release.service, &detail.release.environment)
            .map_err(|why| unseen(p, ReleaseError::NotFound(id), Some(why)))?;
        let approvers = if detail.release.state == State::PendingApproval {
            let (service, env, requester) = (
                detail.release.service.clone(),
                detail.release.environment.clone(),
                detail.release.requester_owner.clone(),
            );
            let tokens = self.blocking(|r| r.tokens()).await?;
            let now = utc::now_text();
            let mut owners: Vec<String> = tokens
                .into_iter()
                .filter(|t| t.revoked_at.is_none() && t.expires_at.as_ref().is_none_or(|at| *at > now))
                .filter(|t| t.roles.iter().any(|r| Action::Decide.allowed_roles().contains(r)))
                .filter(|t| t.services.as_ref().is_none_or(|s| s.contains(&service)))
                .filter(|t| t.environments.as_ref().is_none_or(|e| e.contains(&env)))
                .filter(|t| !same_owner(&t.owner, &requester))
                .map(|t| t.owner.to_ascii_lowercase())
                .collect();
            owners.sort();
            owners.dedup();
            Some(owners)
        } else {
            None
        };
        Ok(Shown { detail, approvers })
    }

    /// A page of history, and the cursor of the next page (`None` on the last). A token scoped
    /// to some services or environments sees only theirs; its pages may come out shorter, but
    /// the cursor still moves through the whole history.
    pub async fn history(
        &self,
        p: &Principal,
        service: Option<String>,
        env: Option<String>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<(Vec<Release>, Option<i64>), ReleaseError> {
        p.require(Action::Read)?;
        if let Some(service) = &service {
            self.require_known(p, Named::Service, service).await?;
        }
        if let Some(env) = &env {
            self.require_known(p, Named::Environment, env).await?;
        }
        let scanned = self.blocking(move |r| r.history(service.as_deref(), env.as_deref(), limit, before)).await?;
        let next = (scanned.len() == limit as usize).then(|| scanned.last().map(|r| r.id)).flatten();
        let visible = scanned.into_iter().filter(|r| visible(p, &r.service, &r.environment)).collect();
        Ok((visible, next))
    }

    /// The status matrix; with `nodes`, each cell's nodes are asked what they serve (at most
    /// once per `limits.node_status_max_age`, see `observed`) and those that differ from the
    /// registry are marked as drift.
    pub async fn status(
        &self,
        p: &Principal,
        service: Option<String>,
        nodes: bool,
    ) -> Result<Vec<StatusRow>, ReleaseError> {
        p.require(Action::Read)?;
        if let Some(service) = &service {
            self.require_known(p, Named::Service, service).await?;
        }
        let rows = self.blocking(move |r| r.status(service.as_deref())).await?;
        let mut rows: Vec<StatusRow> = rows.into_iter().filter(|r| visible(p, &r.service, &r.environment)).collect();
        if nodes {
            // Every cell at once: each node is asked within a bounded time (the deployer's),
            // so the slowest node, not their sum, is what the page waits for.
            let asking = rows.iter().map(|row| {
                let configured: Vec<crate::config::Node> = self
                    .config
                    .service(&row.service)
                    .map(|s| s.nodes.iter().filter(|n| n.environment == row.environment).cloned().collect())
                    .unwrap_or_default();
                let (cell, releases) = ((row.service.clone(), row.environment.clone()), (row.release, row.in_flight));
                async move {
                    self.node_answers
                        .ask(
                            self.deployer.as_ref(),
                            (&cell.0, &cell.1),
                            releases,
                            &configured,
                            self.config.limits.node_status_max_age.0,
                        )
                        .await
                }
            });
            let answers = futures::future::join_all(asking).await;
            for (row, (observed, asked_at)) in rows.iter_mut().zip(answers) {
                row.nodes_asked_at = Some(asked_at);
                row.nodes = Some(
                    observed
                        .into_iter()
                        .map(|o| NodeView {
                            drift: o.error.is_none() && o.current != row.digest,
                            node: o.node,
                            current: o.current,
                            error: o.error,
                        })
                        .collect(),
                );
                self.repair_seen(row).await;
            }
        }
        Ok(rows)
    }

    /// Marks repaired the stranded nodes of `row` that its nodes' answers show serving the
    /// live release again, and takes them off the row. A failure to record it is only
    /// logged: the node stays shown as stranded, and the next asking tries again.
    async fn repair_seen(&self, row: &mut StatusRow) {
        let Some(nodes) = &row.nodes else { return };
        let serving: Vec<String> = row
            .stranded
            .iter()
            .filter(|s| nodes.iter().any(|n| n.node == s.node && n.error.is_none() && !n.drift && n.current.is_some()))
            .map(|s| s.node.clone())
            .collect();
        if serving.is_empty() {
            return;
        }
        let (service, env) = (row.service.clone(), row.environment.clone());
        let why = "status --nodes found it serving the live release";
        match self.blocking(move |r| r.repair_nodes(&service, &env, &serving, why)).await {
            Ok(repaired) => {
                tracing::info!(
                    service = row.service,
                    environment = row.environment,
                    ?repaired,
                    "stranded nodes repaired"
                );
                row.stranded.retain(|s| !repaired.contains(&s.node));
            }
            Err(e) => tracing::error!(error = %e, "could not record the repair of stranded nodes"),
        }
    }

    /// Runs an approved release through the deploy seam, in the background.
    fn launch(&self, release: Release) {
        let this = self.clone();
        tokio::spawn(async move {
            let id = release.id;
            if let Err(e) = this.run(release).await {
                tracing::error!(release = id, error = %e, "running the release failed");
            }
        });
    }

    async fn run(&self, release: Release) -> Result<(), ReleaseError> {
        let id = release.id;
        // Marked before the lease is taken, so the sweep never sees this run's release
        // deploying while nothing marks it as run here.
        let Some(_running) = self.claim(id) else {
            tracing::warn!(release = id, "the release already runs here");
            return Ok(());
        };
        let (owner, until) = (self.instance.clone(), self.lease_expiry());
        let event = NewEvent::by_server(AuditAction::ReleaseDeploying, format!("release/{id}"), serde_json::json!({}));
        let release = match self.blocking(move |r| r.start_deploy(id, &owner, &until, &event)).await {
            Ok(Start::Deploying(release)) => release,
            Ok(Start::Leased) => {
                tracing::warn!(release = id, "another server holds the deploy lease; leaving the release to it");
                return Ok(());
            }
            Ok(Start::Blocked { block, cancelled }) => {
                tracing::warn!(release = id, reason = block.reason, "the artifact is blocked: release cancelled");
                cancelled.iter().for_each(|r| self.metrics.record_release(r, None));
                return Ok(());
            }
            // Cancelled (its artifact blocked) or otherwise decided before it could start.
            Err(ReleaseError::InvalidState { state, .. }) => {
                tracing::info!(release = id, %state, "the release is no longer approved; not started");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        // From here on every path ends the release: live, or failed with the reason; or, when
        // that cannot be recorded, left to lapse and be resolved from the nodes. The lease is
        // renewed until this function returns, and no longer.
        // Aborted when dropped: the lease renewer ends with its deploy, whatever way it ends.
        let _renewer = AbortOnDropHandle::new(self.renew_lease_while_running(release.clone()));
        let (plan, outcome) = match self.plan(&release).await {
            Ok(plan) => {
                let config_digest = plan.service.config_digest(&plan.environment);
                let verifies = plan.service.health_proves_digest();
                if let Err(e) = self.blocking(move |r| r.record_config(id, config_digest, verifies)).await {
                    tracing::error!(release = id, error = %e, "could not record the release's configuration digest");
                }
                let (deployer, running) = (Arc::clone(&self.deployer), plan.clone());
                // In a task of its own, so that a panicking deployer fails the release instead
                // of leaving it deploying.
                match tokio::spawn(async move { deployer.deploy(&running).await }).await {
                    Ok(outcome) => (Some(plan), outcome),
                    Err(e) => (Some(plan), Err(Failure::new(format!("the deployer crashed: {e}")))),
                }
            }
            Err(e) => (None, Err(Failure::new(format!("could not plan the deploy: {e}")))),
        };
        self.conclude(id, outcome, plan).await;
        Ok(())
    }

    /// Records how a deploy ended: live, or failed with its reason (and the nodes it could not
    /// put back). Either may fail to be recorded; the release is then left to the sweep. Once
    /// `live` is recorded, the plan's nodes are cleaned up in the background.
    async fn conclude(&self, id: i64, outcome: Result<(), Failure>, plan: Option<Plan>) {
        match outcome {
            Ok(()) => {
                let nodes = plan.iter().flat_map(|p| &p.nodes).map(|n| n.display_name()).collect();
                if self.finish(id, Ending::Live { nodes }).await
                    && let Some(plan) = plan
                {
                    self.clean_up(plan);
                }
            }
            Err(failure) => {
                let reason = if failure.stranded.is_empty() {
                    failure.reason
                } else {
                    format!("{}; not put back: {}", failure.reason, failure.stranded.join(", "))
                };
                self.finish(id, Ending::Failed { reason, stranded: failure.stranded }).await;
            }
        }
    }

    /// Retention after `live` is recorded, in the background: what the nodes keep is read from
    /// the registry now (whatever any environment has live, this one included; the newest
    /// `keep` successful digests here; adopted trees), with the release the deploy replaced.
    /// The deploy is over: a failure here is only reported (each node's `cleanup` phase), and
    /// a newer run's fence makes a node refuse it.
    fn clean_up(&self, plan: Plan) {
        let this = self.clone();
        tokio::spawn(async move {
            let release = &plan.release;
            let (s, e, keep) = (release.service.clone(), release.environment.clone(), plan.service.keep);
            let mut retain = match this.blocking(move |r| r.retained_digests(&s, &e, keep)).await {
                Ok(retain) => retain,
                Err(e) => {
                    let now = utc::now_text();
                    for node in &plan.nodes {
                        plan.report.report(Deployment {
                            node: node.display_name(),
                            phase: "cleanup".into(),
                            started_at: now.clone(),
                            finished_at: now.clone(),
                            outcome: "failed".into(),
                            output_tail: Some(format!("not cleaned up: what to keep could not be read ({e})")),
                            shared_files: vec![],
                        });
                    }
                    return;
                }
            };
            retain.push(release.digest);
            retain.extend(plan.previous.as_ref().map(|p| p.digest));
            retain.sort();
            retain.dedup();
            this.deployer.clean_up(&plan, &retain).await;
        });
    }

    /// Records each node's phase as the deployer reports it, and times it.
    fn reporter(&self, id: i64) -> Reporter {
        let registry = Arc::clone(&self.registry);
        let metrics = Arc::clone(&self.metrics);
        Reporter(Arc::new(move |deployment: Deployment| {
            metrics.record_phase(&deployment);
            let registry = Arc::clone(&registry);
            // The deployer reports from async code: record off its thread, in order.
            let recorded = tokio::task::block_in_place(|| registry.record_deployment(id, &deployment));
            if let Err(e) = recorded {
                tracing::error!(release = id, error = %e, "could not record a node's deployment");
            }
        }))
    }

    /// When a lease taken or renewed now lapses.
    fn lease_expiry(&self) -> String {
        utc::format(utc::now() + time::Duration::try_from(self.timing.lease).expect("small"))
    }

    fn renew_lease_while_running(&self, release: Release) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(this.timing.renewal).await;
                let (r, owner, until) = (release.clone(), this.instance.clone(), this.lease_expiry());
                match this.blocking(move |reg| reg.renew_lease(&r, &owner, &until)).await {
                    Ok(true) => {}
                    Ok(false) => tracing::error!(release = release.id, "the deploy lease was lost"),
                    Err(e) => tracing::error!(release = release.id, error = %e, "renewing the deploy lease failed"),
                }
            }
        })
    }

    async fn plan(&self, release: &Release) -> Result<Plan, ReleaseError> {
        let service = self
            .config
            .service(&release.service)
            .ok_or_else(|| ReleaseError::NotConfigured { what: "service", name: release.service.clone() })?
            .clone();
        let id = release.id;
        let excluded = self.blocking(move |r| r.excluded_nodes(id)).await?;
        let nodes = service
            .nodes
            .iter()
            .filter(|n| n.environment == release.environment && !excluded.contains(&n.display_name()))
            .cloned()
            .collect();
        let previous = match release.replaces {
            Some(id) => self.blocking(move |r| r.release(id)).await?,
            None => None,
        };
        let environment = self.environment(&release.environment)?.clone();
        let adopt = self.blocking(move |r| r.adoption(id)).await?.map(|adoption| deployer::Adopt {
            adopter: Arc::new(adopt::ServerAdopter {
                ingestor: self.ingestor.clone(),
                registry: Arc::clone(&self.registry),
                release: release.clone(),
            }),
            captured: adoption.digest.map(|d| (d, adoption.nodes)),
        });
        Ok(Plan {
            release: release.clone(),
            previous,
            service,
            environment,
            nodes,
            fence: deployer::new_fence(),
            report: self.reporter(release.id),
            adopt,
            gate: self.gate(release.digest),
        })
    }

    /// Asks the registry, each time, whether `digest` is blocked now.
    fn gate(&self, digest: Digest) -> Gate {
        let registry = Arc::clone(&self.registry);
        Gate(Arc::new(move || {
            let registry = Arc::clone(&registry);
            Box::pin(async move {
                let block = crate::registry::catching(move || registry.artifact_block(digest))
                    .await
                    .map_err(|e| format!("could not check whether {digest} is blocked: {e}"))?
                    .map_err(|e| format!("could not check whether {digest} is blocked: {e}"))?;
                match block {
                    None => Ok(()),
                    Some(b) => Err(format!(
                        "artifact {digest} was blocked by {} ({}): it never goes live",
                        b.blocked_by, b.reason
                    )),
                }
            })
        }))
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
