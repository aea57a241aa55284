//! The deploy seam: what makes an approved release live on its nodes.
//!
//! The orchestration (state machine, lease, audit) calls a [`Deployer`] and records what it
//! reports; it does not know how nodes are reached. [`RecordOnly`] is the first
//! implementation: it records, for every configured node, that the release was taken, and
//! succeeds. The node deployer (SSH and local transports) plugs in here unchanged.

use futures::future::BoxFuture;

use super::{Deployment, Release};
use crate::config::{Node, Service};
use crate::utc;

/// What to deploy, and where.
#[derive(Clone, Debug)]
pub struct Plan {
    pub release: Release,
    /// The release live when the deploy started (what to go back to on failure).
    pub previous: Option<Release>,
    /// The service's configuration.
    pub service: Service,
    /// The environment's nodes.
    pub nodes: Vec<Node>,
}

/// A deploy that did not make it; the fleet is back on `previous`.
#[derive(Clone, Debug)]
pub struct Failure {
    pub reason: String,
    pub deployments: Vec<Deployment>,
}

pub trait Deployer: Send + Sync + 'static {
    /// Makes `plan.release` live on its nodes; on failure, puts them back.
    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<Vec<Deployment>, Failure>>;
}

/// Records the outcome only: every node "takes" the release at once.
pub struct RecordOnly;

impl Deployer for RecordOnly {
    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<Vec<Deployment>, Failure>> {
        Box::pin(async move {
            let now = utc::now_text();
            Ok(plan
                .nodes
                .iter()
                .map(|node| Deployment {
                    node: node.name.clone().unwrap_or_else(|| node.host.clone()),
                    phase: "record".into(),
                    started_at: now.clone(),
                    finished_at: now.clone(),
                    outcome: "ok".into(),
                    output_tail: Some("recorded only: node deployments are not wired in yet".into()),
                })
                .collect())
        })
    }
}
