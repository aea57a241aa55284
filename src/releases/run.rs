//! The run of an approved release: launch, lease, the plan handed to the deploy seam, the
//! outcome recorded, retention after `live`.

use super::*;

impl Releases {
    /// Runs an approved release through the deploy seam, in the background.
    pub(super) fn launch(&self, release: Release) {
        let this = self.clone();
        tokio::spawn(async move {
            let id = release.id;
            if let Err(e) = this.run(release).await {
                tracing::error!(release = id, error = %e, "running the release failed");
            }
        });
    }

    pub(super) async fn run(&self, release: Release) -> Result<(), ReleaseError> {
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
    pub(super) async fn conclude(&self, id: i64, outcome: Result<(), Failure>, plan: Option<Plan>) {
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
    pub(super) fn clean_up(&self, plan: Plan) {
        let this = self.clone();
        tokio::spawn(async move {
            let release = &plan.release;
            let (s, e, keep) = (release.service.clone(), release.environment.clone(), plan.service.keep);
            let mut retain = match this.blocking(move |r| r.retained_digests(&s, &e, keep)).await {
                Ok(retain) => retain,
                Err(e) => {
                    let now = Timestamp::now();
                    for node in &plan.nodes {
                        plan.report.report(Deployment {
                            node: node.display_name(),
                            phase: Phase::Cleanup,
                            started_at: now.clone(),
                            finished_at: now.clone(),
                            outcome: PhaseOutcome::Failed,
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
    pub(super) fn reporter(&self, id: i64) -> Reporter {
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
    pub(super) fn lease_expiry(&self) -> Timestamp {
        Timestamp::at(utc::now() + time::Duration::try_from(self.timing.lease).expect("small"))
    }

    pub(super) fn renew_lease_while_running(&self, release: Release) -> tokio::task::JoinHandle<()> {
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

    pub(super) async fn plan(&self, release: &Release) -> Result<Plan, ReleaseError> {
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
        let digest = release.digest;
        let index = self.blocking(move |r| r.artifact_index(digest)).await?.map(|i| i.sha256);
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
            index,
        })
    }

    /// Asks the registry, each time, whether `digest` is blocked now.
    pub(super) fn gate(&self, digest: Digest) -> Gate {
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
