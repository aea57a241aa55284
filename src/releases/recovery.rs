//! Start-up and recovery: deploys a stopped server left are claimed and resolved from their
//! nodes in the background (their cells answer `recovering` meanwhile), a run's outcome
//! recorded with retries, and the sweep (expiry, lapsed leases).

use super::*;

impl Releases {
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
    pub(super) async fn recover(&self) -> Result<(), ReleaseError> {
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
    pub(super) fn busy(&self, e: ReleaseError) -> ReleaseError {
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
    pub(super) async fn resolve(&self, release: Release, cause: &'static str, _running: Running) {
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
    pub(super) async fn finish(&self, id: i64, ending: Ending) -> bool {
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
    pub(super) async fn sweep(&self) {
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
}
