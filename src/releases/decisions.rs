//! The four-eyes decisions on a pending release: approve, reject, cancel, and expiry.

use super::*;

impl Releases {
    /// `release approve ID`: by an approver who is not the requester (owners compared), of a
    /// release whose artifact is not blocked (the refusal names the block, also when the block
    /// has cancelled the release already).
    pub async fn approve(&self, p: &Principal, id: i64) -> Result<Release, ReleaseError> {
        let release = self.decidable(p, id).await?;
        let digest = release.digest;
        if let Some(block) = self.blocking(move |r| r.artifact_block(digest)).await? {
            return Err(ReleaseError::Blocked { digest, reason: block.reason });
        }
        let release = self.pending(p, id, "approval").await?;
        if same_owner(&release.requester_owner, &p.owner) {
            return Err(ReleaseError::SelfApproval { id, owner: p.owner.clone() });
        }
        let decision =
            NewApproval { approve: true, decided_by: p.name.clone(), decider_owner: p.owner.clone(), reason: None };
        let event = NewEvent::by(
            p,
            AuditAction::ReleaseApprove,
            format!("release/{id}"),
            serde_json::json!({"digest": release.digest}),
        );
        let release = self.blocking(move |r| r.decide(id, &decision, &event)).await.map_err(|e| self.busy(e))?;
        self.launch(release.clone());
        Ok(release)
    }

    /// `release reject ID --reason TEXT`.
    pub async fn reject(&self, p: &Principal, id: i64, reason: &str) -> Result<Release, ReleaseError> {
        if crate::is_blank(reason) {
            return Err(ReleaseError::BadRequest("a rejection needs a reason".into()));
        }
        let release = self.pending(p, id, "rejection").await?;
        let decision = NewApproval {
            approve: false,
            decided_by: p.name.clone(),
            decider_owner: p.owner.clone(),
            reason: Some(reason.to_owned()),
        };
        let event = NewEvent::by(
            p,
            AuditAction::ReleaseReject,
            format!("release/{id}"),
            serde_json::json!({"digest": release.digest, "reason": reason}),
        );
        let rejected = self.blocking(move |r| r.decide(id, &decision, &event)).await?;
        self.metrics.record_release(&rejected, None);
        Ok(rejected)
    }

    /// `release cancel ID`: the requester (same owner) or an admin withdraws a pending release.
    pub async fn cancel(&self, p: &Principal, id: i64) -> Result<Release, ReleaseError> {
        p.require(Action::Cancel)?;
        let release = self.visible(p, id).await?;
        if !same_owner(&release.requester_owner, &p.owner) && !p.has(Role::Admin) {
            return Err(Denied::NotRequester { id, owner: release.requester_owner }.into());
        }
        if release.state != State::PendingApproval {
            return Err(ReleaseError::InvalidState { id, state: release.state, what: "cancelling" });
        }
        let event = NewEvent::by(p, AuditAction::ReleaseCancel, format!("release/{id}"), serde_json::json!({}));
        let actor = p.name.clone();
        let cancelled =
            self.blocking(move |r| r.transition(id, State::Cancelled, &actor, Some("withdrawn"), &event)).await?;
        self.metrics.record_release(&cancelled, None);
        Ok(cancelled)
    }

    /// Expires pending releases past their approval window, counting each.
    pub(super) async fn expire_pending(&self) -> Result<(), ReleaseError> {
        for expired in self.blocking(|r| r.expire_pending()).await? {
            self.metrics.record_release(&expired, None);
        }
        Ok(())
    }

    /// Counts a deploy that ended (and times it), and the pending releases its going live
    /// cancelled.
    pub(super) fn record_finished(&self, finished: &Finished) {
        self.metrics.record_release(&finished.release, finished.deploying_since.as_ref());
        for cancelled in &finished.cancelled {
            self.metrics.record_release(cancelled, None);
        }
    }

    /// A release this approver may decide, whatever its state: the role, then the scopes (one
    /// outside them answered as one that does not exist).
    pub(super) async fn decidable(&self, p: &Principal, id: i64) -> Result<Release, ReleaseError> {
        p.require(Action::Decide)?;
        self.visible(p, id).await
    }

    /// A release an approver may decide now: in scope, pending, not expired.
    pub(super) async fn pending(&self, p: &Principal, id: i64, what: &'static str) -> Result<Release, ReleaseError> {
        let release = self.decidable(p, id).await?;
        if release.state != State::PendingApproval {
            return Err(ReleaseError::InvalidState { id, state: release.state, what });
        }
        if let Some(at) = &release.expires_at
            && *at <= Timestamp::now()
        {
            self.expire_pending().await?;
            return Err(ReleaseError::Expired { id, at: at.clone() });
        }
        Ok(release)
    }
}
