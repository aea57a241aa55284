//! State changes of a release, each one transaction with its audit event: the request, a
//! transition, a decision, expiry, the adoption of a legacy tree.

use super::*;

impl Registry {
    /// Records a new release. One in flight per (service, environment): an `Approved` release
    /// is refused with [`RegistryError::InFlight`] while another is approved or deploying.
    pub fn create_release(&self, new: &NewRelease, event: &NewEvent) -> Result<Release, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            // Checked here, in the transaction that records the request, so that a block or a
            // purge committed since the caller looked is seen (the triggers refuse the same).
            if let Some(block) = crate::registry::artifacts::query_block(&tx, new.digest)? {
                return Err(RegistryError::ArtifactBlocked { digest: new.digest, reason: block.reason });
            }
            if crate::registry::artifacts::purged_now(&tx, new.digest)? {
                return Err(RegistryError::ArtifactPurged(new.digest));
            }
            if new.state.in_flight()
                && let Some(busy) = in_flight(&tx, &new.service, &new.environment)?
            {
                return Err(RegistryError::InFlight(Box::new(busy)));
            }
            let now = utc::Timestamp::now();
            tx.execute(
                "INSERT INTO releases (service, environment, digest, kind, state, requested_by, requester_owner,
                   requested_at, source_environment, replaces, expires_at, state_changed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?8)",
                params![
                    new.service,
                    new.environment,
                    new.digest.to_string(),
                    new.kind.as_str(),
                    new.state.as_str(),
                    new.requested_by,
                    new.requester_owner,
                    now,
                    new.source_environment,
                    new.replaces,
                    new.expires_at
                ],
            )
            .map_err(|e| in_flight_violation(e, &tx, &new.service, &new.environment))?;
            let id = tx.last_insert_rowid();
            for node in &new.excluded {
                tx.execute("INSERT INTO release_exclusions (release_id, node) VALUES (?1, ?2)", params![id, node])?;
            }
            if new.adopt {
                tx.execute("INSERT INTO release_adoptions (release_id) VALUES (?1)", [id])?;
            }
            if !new.forced_past.is_empty() {
                let files = serde_json::to_string(&new.forced_past).expect("strings serialize");
                tx.execute(
                    "INSERT INTO release_forced_migrations (release_id, migrations) VALUES (?1, ?2)",
                    params![id, files],
                )?;
            }
            record_transition(&tx, id, new.state, &now, &new.requested_by, new.note.as_deref())?;
            let mut event = event.clone();
            event.subject = format!("release/{id}");
            crate::registry::audit::append(&tx, &event)?;
            let release = by_id(&tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
            tx.commit()?;
            Ok(release)
        })
    }

    /// Moves a release to `to` if the state machine allows it from its current state.
    pub fn transition(
        &self,
        id: i64,
        to: State,
        actor: &str,
        reason: Option<&str>,
        event: &NewEvent,
    ) -> Result<Release, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let release = change_state(&tx, id, to, actor, reason)?;
            crate::registry::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(release)
        })
    }

    /// Approves (→ `approved`) or rejects (→ `rejected`) a pending release, recording the
    /// decision bound to its digest. Approval is refused while another release of the same
    /// service and environment is in flight, and whenever its artifact is blocked (also when
    /// the block has cancelled it already: the refusal names the block).
    pub fn decide(&self, id: i64, decision: &NewApproval, event: &NewEvent) -> Result<Release, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let release = by_id(&tx, id)?.ok_or(RegistryError::ReleaseNotFound(id))?;
            if decision.approve
                && let Some(block) = crate::registry::artifacts::query_block(&tx, release.digest)?
            {
                return Err(RegistryError::ArtifactBlocked { digest: release.digest, reason: block.reason });
            }
            if release.state != State::PendingApproval {
                return Err(RegistryError::WrongState { id, state: release.state });
            }
            if let Some(at) = &release.expires_at
                && *at <= utc::Timestamp::now()
            {
                return Err(RegistryError::ApprovalExpired { id, at: at.clone() });
            }
            if decision.approve
                && let Some(busy) = in_flight(&tx, &release.service, &release.environment)?
            {
                return Err(RegistryError::InFlight(Box::new(busy)));
            }
            tx.execute(
                "INSERT INTO approvals (release_id, digest, decision, decided_by, decider_owner, decided_at, reason)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    release.digest.to_string(),
                    if decision.approve { "approved" } else { "rejected" },
                    decision.decided_by,
                    decision.decider_owner,
                    utc::Timestamp::now(),
                    decision.reason
                ],
            )?;
            let to = if decision.approve { State::Approved } else { State::Rejected };
            let release =
                change_state(&tx, id, to, &decision.decided_by, decision.reason.as_deref()).map_err(|e| match e {
                    RegistryError::Sqlite(e) => in_flight_violation(e, &tx, &release.service, &release.environment),
                    e => e,
                })?;
            crate::registry::audit::append(&tx, event)?;
            tx.commit()?;
            Ok(release)
        })
    }

    /// Expires releases whose approval window has passed.
    pub fn expire_pending(&self) -> Result<Vec<Release>, RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let now = utc::Timestamp::now();
            let due: Vec<i64> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT id FROM releases WHERE state = 'pending_approval' AND expires_at <= ?1 ORDER BY id",
                )?;
                stmt.query_map([&now], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            let mut expired = Vec::new();
            for id in due {
                let release = change_state(&tx, id, State::Expired, "release", Some("not approved in time"))?;
                let details = serde_json::json!({"expires_at": release.expires_at});
                crate::registry::audit::append(
                    &tx,
                    &NewEvent::by_server(AuditAction::ReleaseExpire, format!("release/{id}"), details),
                )?;
                expired.push(release);
            }
            tx.commit()?;
            Ok(expired)
        })
    }

    /// Records what a release's deploy adopted: the legacy tree's artifact and the nodes that
    /// held it, with an audit event. Once only.
    pub fn record_adoption(
        &self,
        release_id: i64,
        digest: Digest,
        nodes: &[String],
        event: &NewEvent,
    ) -> Result<(), RegistryError> {
        self.write(|conn| {
            let tx = immediate(conn)?;
            let changed = tx.execute(
                "UPDATE release_adoptions SET digest = ?2, nodes = ?3, adopted_at = ?4
                 WHERE release_id = ?1 AND digest IS NULL",
                params![
                    release_id,
                    digest.to_string(),
                    serde_json::to_string(nodes).expect("names serialize"),
                    utc::Timestamp::now()
                ],
            )?;
            if changed == 1 {
                crate::registry::audit::append(&tx, event)?;
            }
            tx.commit()?;
            Ok(())
        })
    }
}
