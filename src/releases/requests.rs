//! Requests to put an artifact live (deploy, promote, rollback) and the policies each must
//! pass before it is recorded; `release check`.

use super::*;

impl Releases {
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
    pub(super) async fn migration_guard(
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
    pub(super) fn check_exclusions(
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

    pub(super) async fn require_uploaded(&self, service: &str, digest: Digest) -> Result<(), ReleaseError> {
        let uploads = self.blocking(move |r| r.artifact_uploads(digest)).await?;
        if uploads.iter().any(|u| u.service == service) {
            Ok(())
        } else {
            Err(ReleaseError::UnknownArtifact { service: service.to_owned(), digest })
        }
    }

    pub(super) async fn require_went_live(
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
    pub(super) async fn require_clean_of_shared(&self, service: &str, digest: Digest) -> Result<(), ReleaseError> {
        let shared = self.config.service(service).map(|s| s.shared.clone()).unwrap_or_default();
        if shared.is_empty() {
            return Ok(());
        }
        let known = shared.clone();
        if self.blocking(move |r| r.shared_checked(digest, &known)).await? {
            return Ok(());
        }
        let bytes = self.store.read_artifact(digest, None, crate::store::READ_FOR_NODES).await?;
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
    pub(super) async fn request(
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
        let Some(action) = kind.audit_action() else {
            return Err(ReleaseError::BadRequest(format!("{kind} is no kind of release this server records")));
        };
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
                utc::Timestamp::at(
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
        let event = NewEvent::by(p, action, String::new(), {
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
}
