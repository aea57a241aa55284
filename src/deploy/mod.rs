//! The node deployer: SPEC 7's phases across an environment's nodes, behind the deploy seam.
//!
//! prepare all (bounded parallelism) → migrate on the one `migrate` node → switch all, as
//! close together as possible → reload → verify health → clean up old releases. Any failure
//! before the switch: no node switches. Any failure after: every switched node is switched
//! back and reloaded. Each node's phase is reported as it ends.
//!
//! Architecture invariant: only this module (through `transport`) talks to nodes.

mod hooks;
mod ssh;
mod transport;

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use futures::future::{BoxFuture, join_all};
use serde_json::Value;

pub use hooks::Hooks;
pub use transport::{CallError, Local, Payload, Transport};

use crate::config::{Limits, Node, ServiceKind, SshConfig};
use crate::digest::Digest;
use crate::node::{self, Request, Source};
use crate::releases::{Deployer, Deployment, Failure, Observed, Plan};
use crate::store::Store;
use crate::utc;

/// How long the node's health check may take to pass after a switch.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);

pub struct NodeDeployer {
    store: Store,
    limits: Limits,
    ssh: SshConfig,
    timeout: Duration,
}

impl NodeDeployer {
    pub fn new(store: Store, limits: Limits, ssh: SshConfig, timeout: Duration) -> NodeDeployer {
        NodeDeployer { store, limits, ssh, timeout }
    }

    /// Connects to one node: a local agent, or an SSH session (host key checked, binary
    /// shipped if needed).
    async fn connect(&self, node: &Node) -> Result<Target, String> {
        let transport: Box<dyn Transport> = if node.is_local() {
            Box::new(Local::new(self.timeout))
        } else {
            Box::new(
                ssh::Ssh::connect(node, &self.ssh, self.timeout)
                    .await
                    .map_err(|e| format!("node {}: {e}", node.display_name()))?,
            )
        };
        Ok(Target { name: node.display_name(), base: node.base.clone(), migrate: node.migrate, transport })
    }

    /// Connects to every node of the plan at once; the first node that cannot be reached fails
    /// the deploy before anything happens.
    async fn connect_all(&self, plan: &Plan) -> Result<Vec<Target>, Failure> {
        let connected = join_all(plan.nodes.iter().map(|n| self.connect(n))).await;
        let mut targets = Vec::new();
        let mut errors = Vec::new();
        for (node, result) in plan.nodes.iter().zip(connected) {
            match result {
                Ok(target) => targets.push(target),
                Err(e) => {
                    let now = utc::now_text();
                    plan.report.report(Deployment {
                        node: node.display_name(),
                        phase: "connect".into(),
                        started_at: now.clone(),
                        finished_at: now,
                        outcome: "failed".into(),
                        output_tail: Some(e.clone()),
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

    async fn artifact(&self, digest: Digest) -> Result<Payload, String> {
        self.store.read_artifact(digest, None).await.map_err(|e| e.to_string())
    }
}

/// One node of the deploy, connected.
struct Target {
    name: String,
    base: PathBuf,
    migrate: bool,
    transport: Box<dyn Transport>,
}

/// Runs one phase on one node, reports it, and returns the answer or the reason.
async fn phase(
    plan: &Plan,
    target: &Target,
    name: &str,
    request: Request,
    payload: Option<Payload>,
) -> Result<Value, String> {
    let started = utc::now_text();
    let answer = target.transport.call(&request, payload).await;
    let (outcome, output, result) = match answer {
        Ok(value) => {
            let output = value["output"].as_str().map(str::to_owned);
            ("ok", output, Ok(value))
        }
        Err(CallError::Node(e)) => {
            let output = Some(match &e.output {
                Some(out) => format!("{}\n{out}", e.message),
                None => e.message.clone(),
            });
            ("failed", output, Err(format!("node {}: {name}: {} ({})", target.name, e.message, e.code)))
        }
        Err(CallError::Transport(e)) => ("failed", Some(e.clone()), Err(format!("node {}: {name}: {e}", target.name))),
    };
    plan.report.report(Deployment {
        node: target.name.clone(),
        phase: name.to_owned(),
        started_at: started,
        finished_at: utc::now_text(),
        outcome: outcome.to_owned(),
        output_tail: output.filter(|o| !o.is_empty()),
    });
    result
}

impl NodeDeployer {
    async fn prepare(&self, plan: &Plan, target: &Target, hooks: &Hooks) -> Result<(), String> {
        let digest = plan.release.digest;
        let status = phase_quiet(target, Request::Status { base: target.base.clone() }).await?;
        let present = status["ready"].as_array().is_some_and(|r| r.iter().any(|d| d == &digest.to_string()));
        let (source, payload) = if present {
            (Source::Present, None)
        } else if let Some(url) = self.store.presigned_get(digest).await.map_err(|e| e.to_string())? {
            // The node fetches from the bucket itself: the bytes do not pass through the server.
            (Source::Url(url), None)
        } else {
            (Source::Stdin, Some(self.artifact(digest).await?))
        };
        let request = Request::Prepare(node::Prepare {
            base: target.base.clone(),
            digest,
            source,
            shared: plan.service.shared.clone(),
            writable: hooks.writable.clone(),
            finalize: hooks.finalize.clone(),
            env: plan.service.env.clone(),
            max_unpacked_bytes: self.limits.max_unpacked_bytes.0,
            max_files: self.limits.max_files,
        });
        phase(plan, target, "prepare", request, payload).await.map(drop)
    }

    async fn exec(
        &self,
        plan: &Plan,
        target: &Target,
        name: &str,
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
        });
        phase(plan, target, name, request, None).await.map(drop)
    }

    async fn switch(
        &self,
        plan: &Plan,
        target: &Target,
        name: &str,
        digest: Option<Digest>,
    ) -> Result<Option<Digest>, String> {
        let answer = phase(plan, target, name, Request::Switch { base: target.base.clone(), digest }, None).await?;
        Ok(answer["previous"].as_str().and_then(|d| d.parse().ok()))
    }

    async fn verify(&self, plan: &Plan, target: &Target) -> Result<(), String> {
        if plan.service.kind == ServiceKind::Node {
            let request = Request::Pm2Cwd {
                base: target.base.clone(),
                digest: plan.release.digest,
                app: plan.service.name.clone(),
                env: plan.service.env.clone(),
            };
            phase(plan, target, "verify pm2", request, None).await?;
        }
        let Some(health) = &plan.service.health else { return Ok(()) };
        let digest = plan.release.digest.to_string();
        let request = Request::Health(node::Health {
            url: health.url.replace("{digest}", &digest),
            expect: health.expect.as_ref().map(|e| e.replace("{digest}", &digest)),
            timeout_ms: HEALTH_TIMEOUT.as_millis() as u64,
        });
        phase(plan, target, "verify", request, None).await.map(drop)
    }

    /// Switches the given nodes back to `to` (or removes `current` when there was nothing
    /// before) and reloads them. Returns the nodes that could not be put back.
    async fn put_back(&self, plan: &Plan, targets: &[&Target], hooks: &Hooks) -> Vec<String> {
        let results = join_all(targets.iter().map(|t| self.put_back_one(plan, t, hooks))).await;
        targets.iter().zip(results).filter(|(_, r)| r.is_err()).map(|(t, _)| t.name.clone()).collect()
    }

    /// Switches one node back and reloads it; reports the whole as a "put back" phase, whose
    /// failure means the node is left on the new release (or in an unknown state): drift.
    async fn put_back_one(&self, plan: &Plan, target: &Target, hooks: &Hooks) -> Result<(), String> {
        let started = utc::now_text();
        let to = plan.previous.as_ref().map(|p| p.digest);
        let result = async {
            self.switch(plan, target, "switch back", to).await?;
            if to.is_some() {
                self.exec(plan, target, "reload", None, &hooks.reload).await?;
            }
            Ok::<_, String>(())
        }
        .await;
        plan.report.report(Deployment {
            node: target.name.clone(),
            phase: "put back".into(),
            started_at: started,
            finished_at: utc::now_text(),
            outcome: if result.is_ok() { "ok" } else { "failed" }.into(),
            output_tail: result.as_ref().err().cloned(),
        });
        result
    }

    /// Reload, then verify, on one node.
    async fn reload_and_verify(&self, plan: &Plan, target: &Target, hooks: &Hooks) -> Result<(), String> {
        self.exec(plan, target, "reload", None, &hooks.reload).await?;
        self.verify(plan, target).await
    }

    async fn run(&self, plan: &Plan) -> Result<(), Failure> {
        let hooks = Hooks::of(&plan.service);
        let targets = self.connect_all(plan).await?;
        if targets.is_empty() {
            return Ok(());
        }

        // 1. Prepare everywhere; nothing that serves traffic changes yet.
        let parallel = plan.environment.parallel.max(1) as usize;
        let preparing: Vec<BoxFuture<'_, Result<(), String>>> =
            targets.iter().map(|t| Box::pin(self.prepare(plan, t, &hooks)) as BoxFuture<'_, _>).collect();
        let prepared: Vec<Result<(), String>> = futures::stream::iter(preparing).buffered(parallel).collect().await;
        if let Some(reason) = first_error(prepared) {
            return Err(Failure::new(reason));
        }

        // 2. Migrate on exactly one node, in the new release, before anything switches.
        if plan.service.kind == ServiceKind::Laravel
            && let Some(migrator) = targets.iter().find(|t| t.migrate)
        {
            self.exec(plan, migrator, "migrate", Some(plan.release.digest), &hooks.migrate)
                .await
                .map_err(Failure::new)?;
        }

        // 3. Switch everywhere at once.
        let digest = plan.release.digest;
        let switched = join_all(targets.iter().map(|t| self.switch(plan, t, "switch", Some(digest)))).await;
        let mut moved = Vec::new();
        let mut failure = None;
        for (target, result) in targets.iter().zip(switched) {
            match result {
                Ok(_) => moved.push(target),
                Err(reason) => failure = failure.or(Some(reason)),
            }
        }
        if let Some(reason) = failure {
            let stranded = self.put_back(plan, &moved, &hooks).await;
            return Err(Failure { reason, stranded });
        }

        // 4. Reload and 5. verify, everywhere; any failure puts every node back.
        let after = join_all(targets.iter().map(|t| self.reload_and_verify(plan, t, &hooks))).await;
        if let Some(reason) = first_error(after) {
            let all: Vec<&Target> = targets.iter().collect();
            let stranded = self.put_back(plan, &all, &hooks).await;
            return Err(Failure { reason, stranded });
        }

        // 6. Retention; a failure here is reported, the release is live regardless.
        let _ = join_all(targets.iter().map(|t| {
            phase(plan, t, "cleanup", Request::Cleanup { base: t.base.clone(), keep: plan.retain.clone() }, None)
        }))
        .await;
        Ok(())
    }

    /// A deploy a stopped server left behind: if every node switched, finish it (reload and
    /// verify); else put back the nodes that did.
    async fn resume(&self, plan: &Plan) -> Result<(), Failure> {
        let hooks = Hooks::of(&plan.service);
        let targets = self.connect_all(plan).await?;
        let digest = plan.release.digest;
        let mut on_new = Vec::new();
        for target in &targets {
            match phase_quiet(target, Request::Status { base: target.base.clone() }).await {
                Ok(status) if status["current"] == digest.to_string() => on_new.push(target),
                Ok(_) => {}
                Err(reason) => {
                    let stranded = self.put_back(plan, &on_new, &hooks).await;
                    return Err(Failure { reason: format!("after a stop: {reason}"), stranded });
                }
            }
        }
        if on_new.len() == targets.len() && !targets.is_empty() {
            let after = join_all(targets.iter().map(|t| self.reload_and_verify(plan, t, &hooks))).await;
            if first_error(after).is_none() {
                return Ok(());
            }
        }
        let all: Vec<&Target> = if on_new.is_empty() { vec![] } else { targets.iter().collect() };
        let stranded = self.put_back(plan, &all, &hooks).await;
        Err(Failure { reason: "the server stopped during the deploy; the nodes were put back".into(), stranded })
    }
}

/// A call whose outcome is not a phase of its own (status).
async fn phase_quiet(target: &Target, request: Request) -> Result<Value, String> {
    target.transport.call(&request, None).await.map_err(|e| format!("node {}: {e}", target.name))
}

fn first_error(results: Vec<Result<(), String>>) -> Option<String> {
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    match errors.len() {
        0 => None,
        1 => errors.into_iter().next(),
        n => Some(format!("{} (and {} more nodes failed)", errors[0], n - 1)),
    }
}

impl NodeDeployer {
    async fn observe_one(&self, node: &Node) -> Observed {
        let name = node.display_name();
        let answer = match self.connect(node).await {
            Ok(target) => phase_quiet(&target, Request::Status { base: target.base.clone() }).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(status) => {
                Observed { node: name, current: status["current"].as_str().and_then(|d| d.parse().ok()), error: None }
            }
            Err(e) => Observed { node: name, current: None, error: Some(e) },
        }
    }
}

impl Deployer for NodeDeployer {
    fn observe<'a>(&'a self, nodes: &'a [Node]) -> BoxFuture<'a, Vec<Observed>> {
        Box::pin(join_all(nodes.iter().map(|n| self.observe_one(n))))
    }

    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.run(plan))
    }

    fn recover<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(self.resume(plan))
    }
}
