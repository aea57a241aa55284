//! The node deployer: SPEC 7's phases across an environment's nodes, behind the deploy seam.
//!
//! prepare all (bounded parallelism) → migrate on the one `migrate` node → switch all, as
//! close together as possible → reload → verify health. Any failure before the switch: no
//! node switches. Any failure after: every switched node is switched back and reloaded. Each
//! node's phase is reported as it ends. Old releases are cleaned up once the release is
//! recorded live ([`Deployer::clean_up`], called by `Releases` in the background).
//!
//! Architecture invariant: only this module (through `transport`) talks to nodes.

mod adopt;
pub mod fetch;
mod hooks;
mod look;
mod phase;
mod prepare;
mod recovery;
mod ssh;
mod transport;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::{BoxFuture, join_all};

pub use hooks::Hooks;
use phase::{call, first_error, phase, phase_quiet, report_phase};
use prepare::LazyIndex;
pub use transport::{Ask, CallError, Input, Local, Payload, Transport};
use transport::{Keep, MAX_OUTPUT, clean, typed};

use crate::archive::SentIndexes;
use crate::config::{Limits, Node, ServiceKind, SshConfig};
use crate::digest::Digest;
use crate::node::protocol::{
    Adopted, Answer, Asking, Checked, Chunk, Cleaned, ErrorCode, Fenced, Healthy, Pm2Checked, Prepared, Ran,
    SharedEntry, Status, Switched,
};
use crate::node::{self, Request, Source};
use crate::releases::{
    CheckRow, CheckStatus, Deployer, Deployment, Failure, Kind, LegacyBytes, NodeCheck, Observed, Phase, PhaseOutcome,
    Plan, SharedFile,
};
use crate::store::Store;
use crate::utc::{self, Timestamp};

/// What a node's hooks leave of the server's wait for an answer.
const HOOK_MARGIN: Duration = Duration::from_secs(5);
/// How long `status --nodes` waits for one node (connecting included).
const NODE_STATUS_TIMEOUT: Duration = Duration::from_secs(15);

pub struct NodeDeployer {
    store: Store,
    limits: Limits,
    ssh: SshConfig,
    timeout: Duration,
    /// SSH sessions kept between deploys.
    pool: ssh::Pool,
    /// `[server] node_url`: with the local store, nodes fetch artifacts from there.
    node_url: Option<String>,
    /// The file indexes sent or uploaded last, ready to send (shared with the ingest).
    indexes: Arc<SentIndexes>,
}

impl NodeDeployer {
    /// `control_dir`: where the SSH masters' control sockets go (`<data_dir>/ssh`);
    /// `node_url`: where nodes reach this server, if they may fetch artifacts from it;
    /// `indexes`: the file indexes kept ready to send, which uploads add to.
    pub fn new(
        store: Store,
        limits: Limits,
        ssh: SshConfig,
        timeout: Duration,
        control_dir: &Path,
        node_url: Option<String>,
        indexes: Arc<SentIndexes>,
    ) -> NodeDeployer {
        NodeDeployer { store, limits, ssh, timeout, pool: ssh::Pool::new(control_dir), node_url, indexes }
    }

    /// How long hooks may run on a node: a little less than the server waits for an answer,
    /// so that the node kills a hung hook and says so before the call times out.
    fn hook_timeout(&self) -> Duration {
        self.timeout.saturating_sub(HOOK_MARGIN).max(Duration::from_secs(1))
    }

    /// Connects to one node: a local agent, or an SSH session (host key checked, binary
    /// shipped if needed).
    async fn connect(&self, node: &Node, fence: u64) -> Result<Target, String> {
        let transport: Arc<dyn Transport> = if node.is_local() {
            Arc::new(Local::new(self.timeout))
        } else {
            self.pool
                .get(node, &self.ssh, self.timeout)
                .await
                .map_err(|e| format!("node {}: {e}", node.display_name()))?
        };
        Ok(Target {
            name: node.display_name(),
            base: node.base.clone(),
            migrate: node.migrate,
            transport,
            back_to: Mutex::new(None),
            adopting: AtomicBool::new(false),
            fence,
            remote: !node.is_local(),
        })
    }

    /// Connects to every node of the plan at once; the first node that cannot be reached fails
    /// the deploy before anything happens.
    async fn connect_all(&self, plan: &Plan) -> Result<Vec<Target>, Failure> {
        let connected = join_all(plan.nodes.iter().map(|n| self.connect(n, plan.fence))).await;
        let mut targets = Vec::new();
        let mut errors = Vec::new();
        for (node, result) in plan.nodes.iter().zip(connected) {
            match result {
                Ok(target) => {
                    target.set_back_to(plan.previous.as_ref().map(|p| p.digest));
                    targets.push(target)
                }
                Err(e) => {
                    let now = Timestamp::now();
                    plan.report.report(Deployment {
                        node: node.display_name(),
                        phase: Phase::Connect,
                        started_at: now.clone(),
                        finished_at: now,
                        outcome: PhaseOutcome::Failed,
                        output_tail: Some(e.clone()),
                        shared_files: vec![],
                    });
                    errors.push(Err(e));
                }
            }
        }
        match first_error(errors) {
            Some(reason) => Err(Failure::new(reason)),
            None => Ok(targets),
        }
    }
}

/// One node of the deploy, connected.
struct Target {
    name: String,
    base: PathBuf,
    migrate: bool,
    transport: Arc<dyn Transport>,
    /// What a put-back switches this node to: what its `current` pointed at when the deploy
    /// prepared it (else the registry's previous release), or the legacy tree it adopted.
    back_to: Mutex<Option<Digest>>,
    /// Its `current` is a plain directory this release adopts.
    adopting: AtomicBool,
    /// This deploy run's fence: a node refuses changes from runs older than the newest it saw.
    fence: u64,
    /// Reached over SSH (a local agent reads its artifact through a pipe, never by URL).
    remote: bool,
}

impl Target {
    fn back_to(&self) -> Option<Digest> {
        *self.back_to.lock().expect("never poisoned")
    }
    fn set_back_to(&self, digest: Option<Digest>) {
        *self.back_to.lock().expect("never poisoned") = digest;
    }
    fn adopting(&self) -> bool {
        self.adopting.load(Ordering::Relaxed)
    }
    /// Its `current` held the legacy tree adopted as `digest`: prepared beside, put back to.
    fn adopted(&self, digest: Digest) {
        self.adopting.store(true, Ordering::Relaxed);
        self.set_back_to(Some(digest));
    }
}

/// How a switch did not happen.
enum SwitchError {
    /// The node refused before touching `current`.
    Refused(String),
    /// It may or may not have switched (no answer, or a failure after the rename).
    Unclear(String),
}

impl SwitchError {
    fn reason(&self) -> &str {
        match self {
            SwitchError::Refused(r) | SwitchError::Unclear(r) => r,
        }
    }
}

impl NodeDeployer {
    async fn exec(
        &self,
        plan: &Plan,
        target: &Target,
        name: Phase,
        digest: Option<Digest>,
        commands: &[String],
    ) -> Result<(), String> {
        if commands.is_empty() {
            return Ok(());
        }
        let request = Request::Exec(node::Exec {
            base: target.base.clone(),
            digest,
            commands: commands.to_vec(),
            env: plan.service.env.clone(),
            hook_timeout_ms: Some(self.hook_timeout().as_millis() as u64),
            fence: plan.fence,
            // A reload's service commands (apachectl, pm2) stay the SSH user's.
            run_as: run_as(plan, name == Phase::Reload),
        });
        phase::<Ran>(plan, target, name, request, None).await.map(drop)
    }

    async fn switch(
        &self,
        plan: &Plan,
        target: &Target,
        name: Phase,
        digest: Option<Digest>,
    ) -> Result<(), SwitchError> {
        let request = Request::Switch {
            base: target.base.clone(),
            digest,
            shared: plan.service.shared.clone(),
            adopt: target.adopting(),
            fence: target.fence,
        };
        let started = Timestamp::now();
        let answer = call::<Switched>(target, &request, Input::Nothing).await;
        let refused = matches!(&answer, Err(CallError::Node(e)) if e.code.refused_before_switch());
        report_phase(plan, target, name, &request, started, answer)
            .map(drop)
            .map_err(|reason| if refused { SwitchError::Refused(reason) } else { SwitchError::Unclear(reason) })
    }

    async fn verify(&self, plan: &Plan, target: &Target) -> Result<(), String> {
        if plan.service.kind == ServiceKind::Node {
            let request = Request::Pm2Cwd {
                base: target.base.clone(),
                digest: plan.release.digest,
                app: plan.service.pm2_app.clone().unwrap_or_else(|| plan.service.name.clone()),
                env: plan.service.env.clone(),
            };
            phase::<Pm2Checked>(plan, target, Phase::VerifyPm2, request, None).await?;
        }
        let Some(health) = &plan.service.health else { return Ok(()) };
        let digest = plan.release.digest.to_string();
        let request = Request::Health(node::Health {
            url: health.url.replace("{digest}", &digest),
            expect: health.expect.as_ref().map(|e| e.replace("{digest}", &digest)),
            timeout_ms: health.timeout.0.as_millis() as u64,
            interval_ms: health.interval.0.as_millis() as u64,
            healthy_after: health.healthy_after,
            unhealthy_after: health.unhealthy_after,
        });
        phase::<Healthy>(plan, target, Phase::Verify, request, None).await.map(drop)
    }

    /// Switches the given nodes back to where each was (or removes `current` when there was
    /// nothing before) and reloads them. Returns the nodes that could not be put back.
    async fn put_back(&self, plan: &Plan, targets: &[&Target], hooks: &Hooks) -> Vec<String> {
        let results = join_all(targets.iter().map(|t| self.put_back_one(plan, t, hooks))).await;
        targets.iter().zip(results).filter(|(_, r)| r.is_err()).map(|(t, _)| t.name.clone()).collect()
    }

    /// Switches one node back and reloads it; reports the whole as a "put back" phase, whose
    /// failure means the node is left on the new release (or in an unknown state): drift.
    async fn put_back_one(&self, plan: &Plan, target: &Target, hooks: &Hooks) -> Result<(), String> {
        let started = Timestamp::now();
        let to = target.back_to();
        let result = async {
            self.switch(plan, target, Phase::SwitchBack, to).await.map_err(|e| e.reason().to_owned())?;
            if to.is_some() {
                self.exec(plan, target, Phase::Reload, None, &hooks.reload).await?;
            }
            Ok::<_, String>(())
        }
        .await;
        plan.report.report(Deployment {
            node: target.name.clone(),
            phase: Phase::PutBack,
            started_at: started,
            finished_at: Timestamp::now(),
            outcome: if result.is_ok() { PhaseOutcome::Ok } else { PhaseOutcome::Failed },
            output_tail: result.as_ref().err().cloned(),
            shared_files: vec![],
        });
        result
    }

    /// Reload, then verify, on one node.
    async fn reload_and_verify(&self, plan: &Plan, target: &Target, hooks: &Hooks) -> Result<(), String> {
        self.exec(plan, target, Phase::Reload, None, &hooks.reload).await?;
        self.verify(plan, target).await
    }

    async fn run(&self, plan: &Plan) -> Result<(), Failure> {
        let hooks = Hooks::of(&plan.service);
        let targets = self.connect_all(plan).await?;
        if targets.is_empty() {
            return Ok(());
        }
        self.adopt(plan, &targets).await?;
        let index = LazyIndex::new();

        // 1. Prepare everywhere; nothing that serves traffic changes yet.
        let parallel = plan.environment.parallel.max(1) as usize;
        let preparing: Vec<BoxFuture<'_, Result<(), String>>> =
            targets.iter().map(|t| Box::pin(self.prepare_node(plan, t, &hooks, &index)) as BoxFuture<'_, _>).collect();
        let prepared: Vec<Result<(), String>> = futures::stream::iter(preparing).buffered(parallel).collect().await;
        if let Some(reason) = first_error(prepared) {
            return Err(Failure::new(reason));
        }
        // A block that came while the nodes prepared stops the deploy here: migrations are
        // never undone, and nothing has switched yet.
        plan.gate.check().await.map_err(Failure::new)?;

        // 2. Migrate on exactly one node, in the new release, before anything switches
        //    (never for a rollback: migrations are never undone, the schema stays ahead).
        if plan.service.kind == ServiceKind::Laravel && plan.release.kind != Kind::Rollback {
            let Some(migrator) = targets.iter().find(|t| t.migrate) else {
                return Err(Failure::new("no migrate node among the nodes of this release: migrations would not run"));
            };
            self.exec(plan, migrator, Phase::Migrate, Some(plan.release.digest), &hooks.migrate)
                .await
                .map_err(Failure::new)?;
        }

        // 3. Switch everywhere at once. If any node fails, every node that switched, or may
        //    have, goes back to where it was. The last look at the block: once the nodes have
        //    switched, a block does not undo it (a rollback does).
        plan.gate.check().await.map_err(Failure::new)?;
        let digest = plan.release.digest;
        let switched = join_all(targets.iter().map(|t| self.switch(plan, t, Phase::Switch, Some(digest)))).await;
        let mut back = Vec::new();
        let mut failure = None;
        for (target, result) in targets.iter().zip(switched) {
            match result {
                Ok(()) => back.push(target),
                Err(SwitchError::Unclear(reason)) => {
                    back.push(target);
                    failure = failure.or(Some(reason));
                }
                Err(SwitchError::Refused(reason)) => failure = failure.or(Some(reason)),
            }
        }
        if let Some(reason) = failure {
            let stranded = self.put_back(plan, &back, &hooks).await;
            return Err(Failure { reason, stranded });
        }

        // 4. Reload and 5. verify, everywhere; any failure puts every node back.
        let after = join_all(targets.iter().map(|t| self.reload_and_verify(plan, t, &hooks))).await;
        if let Some(reason) = first_error(after) {
            let all: Vec<&Target> = targets.iter().collect();
            let stranded = self.put_back(plan, &all, &hooks).await;
            return Err(Failure { reason, stranded });
        }
        // 6. Retention comes after `live` is recorded: see `clean_up`.
        Ok(())
    }

    /// Retention (phase 6), on every node of the plan, with the plan's fence; each node's
    /// outcome is its `cleanup` phase (a node that cannot be reached too). Nothing here fails
    /// anything.
    async fn clean_up_nodes(&self, plan: &Plan, keep: &[Digest]) {
        join_all(plan.nodes.iter().map(|node| async move {
            let started = Timestamp::now();
            match self.connect(node, plan.fence).await {
                Ok(target) => {
                    let request =
                        Request::Cleanup { base: target.base.clone(), keep: keep.to_vec(), fence: plan.fence };
                    let _ = phase::<Cleaned>(plan, &target, Phase::Cleanup, request, None).await;
                }
                Err(e) => plan.report.report(Deployment {
                    node: node.display_name(),
                    phase: Phase::Cleanup,
                    started_at: started,
                    finished_at: Timestamp::now(),
                    outcome: PhaseOutcome::Failed,
                    output_tail: Some(e),
                    shared_files: vec![],
                }),
            }
        }))
        .await;
    }
}

impl Deployer for NodeDeployer {
    fn check<'a>(
        &'a self,
        service: &'a crate::config::Service,
        nodes: &'a [Node],
        needed_bytes: u64,
    ) -> BoxFuture<'a, Vec<NodeCheck>> {
        Box::pin(join_all(nodes.iter().map(|n| self.check_one(service, n, needed_bytes))))
    }

    /// The server holds its data directory now: SSH masters a killed server left in it end.
    fn start(&self) {
        self.pool.end_masters_left_behind();
    }

    fn observe<'a>(&'a self, nodes: &'a [Node]) -> BoxFuture<'a, Vec<Observed>> {
        Box::pin(join_all(nodes.iter().map(|n| self.observe_one(n))))
    }

    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.run(plan))
    }

    fn recover<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.resume(plan))
    }

    fn clean_up<'a>(&'a self, plan: &'a Plan, keep: &'a [Digest]) -> BoxFuture<'a, ()> {
        Box::pin(self.clean_up_nodes(plan, keep))
    }
}

/// Who runs the service's hooks on its nodes: `hook_user` (in a reload, for `php …` commands
/// only) with the service's `umask`.
fn run_as(plan: &Plan, php_only: bool) -> node::RunAs {
    node::RunAs { user: plan.service.hook_user.clone(), umask: plan.service.umask, php_only }
}
