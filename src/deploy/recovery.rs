//! A deploy whose run ended unrecorded (a stopped server): fence every node, see what each
//! serves, then finish it where every node switched, or put the nodes back.

use super::*;

impl NodeDeployer {
    /// A deploy whose run ended without recording how (a stopped server, a run that could not
    /// record its outcome): if every node is reachable and switched, finish it (reload and
    /// verify). Else every reachable node on the new release is switched back, and every
    /// reachable node is reloaded (the stop may have come between a switch back and its
    /// reload); nodes that cannot be reached or asked are reported. The reason says what was
    /// found.
    pub(super) async fn resume(&self, plan: &Plan) -> Result<(), Failure> {
        let hooks = Hooks::of(&plan.service);
        let fence = plan.fence;
        let connected = join_all(plan.nodes.iter().map(|n| self.connect(n, fence))).await;
        let (mut targets, mut unknown) = (Vec::new(), Vec::new());
        for (node, result) in plan.nodes.iter().zip(connected) {
            match result {
                Ok(target) => {
                    target.set_back_to(plan.previous.as_ref().map(|p| p.digest));
                    targets.push(target);
                }
                Err(e) => unknown.push((node.display_name(), e)),
            }
        }
        if let Some(adopt) = &plan.adopt
            && let Some((digest, nodes)) = &adopt.captured
        {
            targets.iter().filter(|t| nodes.contains(&t.name)).for_each(|t| t.adopted(*digest));
        }
        let digest = plan.release.digest;
        let (mut on_new, mut elsewhere) = (Vec::new(), Vec::new());
        for target in &targets {
            // First take the node for this run: an agent of the run that ended, still waiting
            // for the lock, either finishes before (and status sees what it did) or is refused.
            let fenced = phase_quiet::<Fenced>(target, Request::Fence { base: target.base.clone(), fence }).await;
            let status = match fenced {
                Ok(_) => phase_quiet::<Status>(target, Request::Status { base: target.base.clone() }).await,
                Err(e) => Err(e),
            };
            match status {
                Ok(status) if status.current == Some(digest) => on_new.push(target),
                Ok(status) => {
                    let serves = match status.current {
                        Some(current) => current.short(),
                        None if status.plain => "a plain directory".to_owned(),
                        None => "nothing".to_owned(),
                    };
                    elsewhere.push((target, serves));
                }
                Err(e) => unknown.push((target.name.clone(), e)),
            }
        }
        let found = if let Some((_, e)) = unknown.first() {
            e.clone()
        } else if let Some((target, serves)) = elsewhere.first() {
            format!("node {} serves {serves}, not {}", target.name, digest.short())
        } else if on_new.is_empty() {
            "no node to finish it on".to_owned()
        } else if let Err(blocked) = plan.gate.check().await {
            // Every node switched, but nothing recorded it live: its artifact blocked since,
            // it is put back rather than finished (a blocked artifact never goes live).
            blocked
        } else {
            let after = join_all(targets.iter().map(|t| self.reload_and_verify(plan, t, &hooks))).await;
            match first_error(after) {
                None => return Ok(()),
                Some(reason) => reason,
            }
        };
        let mut stranded = self.put_back(plan, &on_new, &hooks).await;
        let _ = join_all(elsewhere.iter().map(|(t, _)| self.exec(plan, t, Phase::Reload, None, &hooks.reload))).await;
        stranded.extend(unknown.into_iter().map(|(name, _)| name));
        let put_back = if stranded.is_empty() { "the nodes were put back" } else { "the other nodes were put back" };
        Err(Failure { reason: format!("{found}; {put_back}"), stranded })
    }
}
