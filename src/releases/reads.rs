//! Reads: a release's whole story (and the long-poll for its next change), history, the
//! status of every cell with what its nodes say.

use super::*;

impl Releases {
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
    pub(super) async fn progress_after(
        &self,
        generation: u64,
        id: i64,
    ) -> Result<Option<(State, usize)>, ReleaseError> {
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
            let now = utc::Timestamp::now();
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
    pub(super) async fn repair_seen(&self, row: &mut StatusRow) {
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
}
