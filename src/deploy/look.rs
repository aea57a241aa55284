//! Looking at nodes without deploying: what each serves (`status --nodes`) and `release
//! check` on one node.

use super::*;

/// How long `release check` waits for one node.
pub(super) const NODE_CHECK_TIMEOUT: Duration = Duration::from_secs(25);

impl NodeDeployer {
    /// What one node serves, asked within [`NODE_STATUS_TIMEOUT`]: a node that stalls is
    /// shown as such in its cell, never holding up the page.
    pub(super) async fn observe_one(&self, node: &Node) -> Observed {
        let name = node.display_name();
        let asking = async {
            match self.connect(node, 0).await {
                Ok(target) => phase_quiet::<Status>(&target, Request::Status { base: target.base.clone() }).await,
                Err(e) => Err(e),
            }
        };
        let answer = tokio::time::timeout(NODE_STATUS_TIMEOUT, asking).await.unwrap_or_else(|_| {
            Err(format!("node {name}: no answer within {} s (timeout)", NODE_STATUS_TIMEOUT.as_secs()))
        });
        match answer {
            Ok(status) if status.plain => Observed {
                node: name,
                current: None,
                error: Some("current is a plain directory (deployed another way): deploy with --adopt".into()),
            },
            Ok(status) => Observed { node: name, current: status.current, error: None },
            Err(e) => Observed { node: name, current: None, error: Some(e) },
        }
    }
}

impl NodeDeployer {
    /// `release check` on one node: reached (host key checked), then what its agent finds.
    pub(super) async fn check_one(
        &self,
        service: &crate::config::Service,
        node: &Node,
        needed_bytes: u64,
    ) -> NodeCheck {
        let name = node.display_name();
        let row = |name: &str, status: CheckStatus, message: String| CheckRow { name: name.into(), status, message };
        let target = match tokio::time::timeout(NODE_CHECK_TIMEOUT, self.connect(node, 0)).await {
            Ok(Ok(target)) => target,
            Ok(Err(e)) => return NodeCheck { node: name, checks: vec![row("reach", CheckStatus::Fail, e)] },
            Err(_) => {
                let e = format!("no connection within {} s", NODE_CHECK_TIMEOUT.as_secs());
                return NodeCheck { node: name, checks: vec![row("reach", CheckStatus::Fail, e)] };
            }
        };
        let how = if node.is_local() { "this machine, no SSH".to_owned() } else { "SSH, host key known".to_owned() };
        let mut checks = vec![row("reach", CheckStatus::Pass, how)];
        let hooks = Hooks::of(service);
        let request = Request::Check(node::Check {
            base: target.base.clone(),
            shared: service.shared.clone(),
            laravel: service.kind == crate::config::ServiceKind::Laravel,
            pm2_app: service.pm2_app.clone(),
            reload: hooks.reload.clone(),
            health_url: service.health.as_ref().map(|h| h.url.clone()),
            web_user: service
                .hook_user
                .clone()
                .or_else(|| (service.kind == crate::config::ServiceKind::Laravel).then(|| "www-data".to_owned())),
            env: service.env.clone(),
            needed_bytes,
        });
        match tokio::time::timeout(NODE_CHECK_TIMEOUT, phase_quiet::<Checked>(&target, request)).await {
            Ok(Ok(answer)) => checks.extend(answer.checks),
            Ok(Err(e)) => checks.push(row("agent", CheckStatus::Fail, e)),
            Err(_) => checks.push(row(
                "agent",
                CheckStatus::Fail,
                format!("no answer within {} s", NODE_CHECK_TIMEOUT.as_secs()),
            )),
        }
        NodeCheck { node: name, checks }
    }
}
