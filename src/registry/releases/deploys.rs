//! A deploy's own records: its phases on each node, the configuration it ran with, its
//! lease, and its outcome.

use super::*;

impl Registry {
    /// Records one node's phase of a release, with the shared files it found at a switch (the
    /// first switch to the release counts).
    pub fn record_deployment(&self, release_id: i64, deployment: &Deployment) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            for file in &deployment.shared_files {
                tx.execute(
                    "INSERT OR IGNORE INTO release_shared_files (release_id, node, path, kind, sha256, recorded_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        release_id,
                        deployment.node,
                        file.path,
                        file.kind,
                        file.sha256.map(|d| d.to_string()),
                        deployment.finished_at
                    ],
                )?;
            }
            tx.execute(
                "INSERT INTO deployments (release_id, node, phase, started_at, finished_at, outcome, output_tail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    release_id,
                    deployment.node,
                    deployment.phase.as_str(),
                    deployment.started_at,
                    deployment.finished_at,
                    deployment.outcome.as_str(),
                    deployment.output_tail
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Records the digest of the configuration a release's deploy runs with (the first
    /// record stands: a deploy finished after a restart keeps the one it started with).
    pub fn record_config(&self, release_id: i64, config_digest: Digest, verifies: bool) -> Result<(), RegistryError> {
        self.write(|conn| {
            conn.execute(
                "INSERT OR IGNORE INTO release_configs (release_id, config_digest, verifies, recorded_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![release_id, config_digest.to_string(), verifies, utc::Timestamp::now()],
            )?;
            Ok(())
        })
    }

    /// `approved → deploying` and the deploy lease, in one transaction: a release is never
    /// deploying without a lease, nor leased without deploying. [`Start::Leased`] when another
    /// owner holds an unexpired lease on (service, environment); [`Start::Blocked`] when its
    /// artifact is blocked: then it is cancelled instead (with every other release of the
    /// artifact still waiting or approved), in this transaction.
    pub fn start_deploy(
        &self,
        id: i64,
        owner: &str,
        expires_at: &utc::Timestamp,
        event: &NewEvent,
    ) -> Result<Start, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let release = by_id(&tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
            if release.state == State::Approved
                && let Some(block) = crate::registry::artifacts::query_block(&tx, release.digest)?
            {
                let cancelled = cancel_blocked(&tx, release.digest, &block, ("release", "release"))?;
                tx.commit()?;
                return Ok(Start::Blocked { block, cancelled });
            }
            let held: Option<(String, utc::Timestamp)> = tx
                .query_row(
                    "SELECT owner, expires_at FROM deploy_leases WHERE service = ?1 AND environment = ?2",
                    params![release.service, release.environment],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((holder, until)) = held
                && holder != owner
                && until > utc::Timestamp::now()
            {
                return Ok(Start::Leased);
            }
            tx.execute(
                "INSERT INTO deploy_leases (service, environment, release_id, owner, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (service, environment) DO UPDATE SET release_id = excluded.release_id,
                   owner = excluded.owner, expires_at = excluded.expires_at",
                params![release.service, release.environment, id, owner, expires_at],
            )?;
            let release = change_state(&tx, id, State::Deploying, "release", None)?;
            crate::registry::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(Start::Deploying(release))
        })
    }

    /// Extends a lease this owner holds; false if it is no longer theirs.
    pub fn renew_lease(
        &self,
        release: &Release,
        owner: &str,
        expires_at: &utc::Timestamp,
    ) -> Result<bool, RegistryError> {
        self.write(|conn| {
            Ok(conn.execute(
                "UPDATE deploy_leases SET expires_at = ?1
                 WHERE service = ?2 AND environment = ?3 AND owner = ?4 AND release_id = ?5",
                params![expires_at, release.service, release.environment, owner, release.id],
            )? == 1)
        })
    }

    /// Takes the lease of a deploying release to resolve it: only when it lapsed, is gone, or
    /// is this owner's already; false when another owner holds it unexpired.
    pub fn take_lease(
        &self,
        release: &Release,
        owner: &str,
        expires_at: &utc::Timestamp,
    ) -> Result<bool, RegistryError> {
        self.write(|conn| {
            Ok(conn.execute(
                "INSERT INTO deploy_leases (service, environment, release_id, owner, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (service, environment) DO UPDATE SET release_id = excluded.release_id,
                   owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE deploy_leases.expires_at <= ?6
                   OR (deploy_leases.owner = excluded.owner AND deploy_leases.release_id = excluded.release_id)",
                params![release.service, release.environment, release.id, owner, expires_at, utc::Timestamp::now()],
            )? == 1)
        })
    }

    /// Ends a deploy in one transaction: its final state and event, the marks on its nodes
    /// (stranded by a failure, repaired by going live on them), the end of its lease.
    pub fn finish_deploy(&self, id: i64, ending: &Ending, event: &NewEvent) -> Result<Finished, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let (release, cancelled) = match ending {
                Ending::Live { nodes } => {
                    let (release, cancelled) = go_live(&tx, id, event)?;
                    let why = format!("release {id} went live on it");
                    crate::registry::marks::repair(
                        &tx,
                        (&release.service, &release.environment),
                        nodes,
                        Some(id),
                        &why,
                    )?;
                    (release, cancelled)
                }
                Ending::Failed { reason, stranded } => {
                    let release = change_state(&tx, id, State::Failed, "release", Some(reason))?;
                    crate::registry::audit::append(&tx, event)?;
                    crate::registry::marks::strand(&tx, &release, stranded, reason)?;
                    (release, vec![])
                }
            };
            tx.execute(
                "DELETE FROM deploy_leases WHERE service = ?1 AND environment = ?2 AND release_id = ?3",
                params![release.service, release.environment, id],
            )?;
            let deploying_since = tx
                .query_row(
                    "SELECT at FROM release_transitions WHERE release_id = ?1 AND state = 'deploying'
                     ORDER BY id DESC LIMIT 1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            tx.commit()?;
            Ok(Finished { release, deploying_since, cancelled })
        })
    }

    /// Removes every deploy lease (at start: the data directory's lock proves their owners
    /// are gone).
    pub fn clear_leases(&self) -> Result<usize, RegistryError> {
        self.write(|conn| Ok(conn.execute("DELETE FROM deploy_leases", [])?))
    }

    /// Releases deploying without a live lease: their runner is gone.
    pub fn lapsed_deploys(&self) -> Result<Vec<Release>, RegistryError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM releases r WHERE state = 'deploying' AND NOT EXISTS (
                   SELECT 1 FROM deploy_leases l WHERE l.service = r.service AND l.environment = r.environment
                   AND l.release_id = r.id AND l.expires_at > ?1) ORDER BY id"
            ))?;
            let rows = stmt.query_map([utc::Timestamp::now()], from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}
