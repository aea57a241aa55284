//! The deploy seam: what makes an approved release live on its nodes.
//!
//! The orchestration (state machine, lease, audit) calls a [`Deployer`] with a [`Plan`]; it
//! does not know how nodes are reached. Each node's phase is reported through the plan's
//! [`Reporter`] as it ends, so `show` and `--wait` follow a deploy live. [`RecordOnly`]
//! records, for every configured node, that the release was taken; the node deployer
//! (`deploy::NodeDeployer`) really takes it.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{Deployment, Release};
use crate::config::{Environment, Node, Service};
use crate::digest::Digest;
/// One finding of `release check`: `pass`, `warn` or `fail`, and what to do about it; the
/// node protocol's own row, as the agent answers it.
pub use crate::node::protocol::{CheckRow, CheckStatus};
use crate::utc::{self, Timestamp};

/// Where a deploy's per-node phases go as they end.
#[derive(Clone)]
pub struct Reporter(pub Arc<dyn Fn(Deployment) + Send + Sync>);

impl Reporter {
    pub fn report(&self, deployment: Deployment) {
        (self.0)(deployment)
    }

    /// Drops every report (tests, recovery).
    pub fn none() -> Reporter {
        Reporter(Arc::new(|_| {}))
    }
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporter")
    }
}

/// What to deploy, and where.
#[derive(Clone, Debug)]
pub struct Plan {
    pub release: Release,
    /// The release live when the deploy started (what to go back to on failure).
    pub previous: Option<Release>,
    /// The service's configuration.
    pub service: Service,
    pub environment: Environment,
    /// The environment's nodes.
    pub nodes: Vec<Node>,
    /// This run's fence: when the plan was made, in µs ([`new_fence`]). Every change the run
    /// asks of a node carries it, the clean-up after `live` too, and a node refuses a fence
    /// older than the newest it saw: a later run (the next deploy, a resolution) outranks
    /// whatever is left of an earlier one.
    pub fence: u64,
    pub report: Reporter,
    /// `--adopt`: asked for by the release (and what it has captured so far).
    pub adopt: Option<Adopt>,
    /// Whether the release may still go on: asked before each node prepares, before the
    /// migration and before the switch, and before a resolution finishes a deploy.
    pub gate: Gate,
    /// The digest of the artifact's stored file index (issue 15), when ingest kept one: the
    /// nodes link the files a release already there holds instead of writing them.
    pub index: Option<Digest>,
}

/// Asks the registry whether a release may still go live: `Err(reason)` once its artifact is
/// blocked (or when that cannot be known: a deploy that cannot ask does not go on). A block
/// that comes while a deploy runs stops it before its nodes switch; after the switch it
/// changes nothing (a rollback does).
#[derive(Clone)]
pub struct Gate(pub Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>);

impl Gate {
    pub async fn check(&self) -> Result<(), String> {
        (self.0)().await
    }

    /// Never closes (tests).
    pub fn open() -> Gate {
        Gate(Arc::new(|| Box::pin(async { Ok(()) })))
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

/// A fence for a new run: the time in microseconds, so a later run always outranks an earlier
/// one's left-over calls.
pub fn new_fence() -> u64 {
    (utc::now().unix_timestamp_nanos() / 1000) as u64
}

/// The bytes of a legacy tree's package, as a node sends them.
pub type LegacyBytes<'a> = futures::stream::BoxStream<'a, Result<bytes::Bytes, String>>;

/// What a deploy that adopts needs from the rest of the server.
pub trait Adopter: Send + Sync {
    /// Keeps a legacy tree's package as an artifact of the service (its digest checked).
    fn keep<'a>(&'a self, digest: Digest, bytes: LegacyBytes<'a>) -> BoxFuture<'a, Result<(), String>>;
    /// Records that these nodes' `current` held the tree packaged as `digest`.
    fn record(&self, digest: Digest, nodes: Vec<String>) -> BoxFuture<'_, Result<(), String>>;
}

/// A release's `--adopt`.
#[derive(Clone)]
pub struct Adopt {
    pub adopter: Arc<dyn Adopter>,
    /// Already captured (a restarted server resolving the deploy): the legacy tree's digest
    /// and the nodes that held it — where those nodes go back to.
    pub captured: Option<(Digest, Vec<String>)>,
}

impl std::fmt::Debug for Adopt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adopt").field("captured", &self.captured).finish_non_exhaustive()
    }
}

/// A deploy that did not make it; the fleet is back on `previous` unless `stranded` names
/// nodes that could not be put back.
#[derive(Clone, Debug)]
pub struct Failure {
    pub reason: String,
    /// Nodes left on the new release (or in an unknown state): shown as drift.
    pub stranded: Vec<String>,
}

impl Failure {
    pub fn new(reason: impl Into<String>) -> Failure {
        Failure { reason: reason.into(), stranded: vec![] }
    }
}

/// What a node says it serves.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Observed {
    pub node: String,
    /// What `current` points at.
    pub current: Option<Digest>,
    /// Why the node could not be asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `release check` found on one node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeCheck {
    pub node: String,
    pub checks: Vec<CheckRow>,
}

pub trait Deployer: Send + Sync + 'static {
    /// Called once the server holds its data directory, before anything is resolved or
    /// deployed (blocking work is fine: it runs off the async threads).
    fn start(&self) {}

    /// Asks each node what it serves (`release status --nodes`).
    fn observe<'a>(&'a self, nodes: &'a [Node]) -> BoxFuture<'a, Vec<Observed>> {
        Box::pin(async move {
            nodes
                .iter()
                .map(|n| Observed {
                    node: n.display_name(),
                    current: None,
                    error: Some("this deployer cannot ask nodes".into()),
                })
                .collect()
        })
    }

    /// Looks at each of `nodes` for what a deploy of `service` will need, changing nothing
    /// (`release check`); `needed_bytes`: room one more release takes.
    fn check<'a>(
        &'a self,
        _service: &'a crate::config::Service,
        nodes: &'a [Node],
        _needed_bytes: u64,
    ) -> BoxFuture<'a, Vec<NodeCheck>> {
        Box::pin(async move {
            nodes
                .iter()
                .map(|n| NodeCheck {
                    node: n.display_name(),
                    checks: vec![CheckRow {
                        name: "reach".into(),
                        status: CheckStatus::Fail,
                        message: "this deployer cannot ask nodes".into(),
                    }],
                })
                .collect()
        })
    }

    /// Makes `plan.release` live on its nodes; on failure, puts them back.
    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>>;

    /// A deploy whose run ended without recording how (a stopped server, or a run that could
    /// not record its outcome): finish it (`Ok`: the release is live on every node) or put
    /// the nodes back (`Err`, saying what the nodes were found in). Calls of the run that
    /// ended must no longer change a node once this has begun (fences).
    fn recover<'a>(&'a self, _plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async { Err(Failure::new("this deployer cannot ask the nodes, so it cannot finish the deploy")) })
    }

    /// Retention, once `plan.release` is recorded live (in the background): each node keeps
    /// `keep` (and what it serves) and removes its other releases, each node's outcome
    /// reported as its `cleanup` phase. It never changes the release's state. It carries the
    /// plan's fence, so a node a newer run has taken refuses it (it cannot remove what the
    /// next deploy just prepared).
    fn clean_up<'a>(&'a self, _plan: &'a Plan, _keep: &'a [Digest]) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// Records the outcome only: every node "takes" the release at once.
pub struct RecordOnly;

impl Deployer for RecordOnly {
    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            plan.gate.check().await.map_err(Failure::new)?;
            let now = Timestamp::now();
            for node in &plan.nodes {
                plan.report.report(Deployment {
                    node: node.name.clone().unwrap_or_else(|| node.host.clone()),
                    phase: super::Phase::Record,
                    started_at: now.clone(),
                    finished_at: now.clone(),
                    outcome: super::PhaseOutcome::Ok,
                    output_tail: Some("recorded only".into()),
                    shared_files: vec![],
                });
            }
            Ok(())
        })
    }
}
