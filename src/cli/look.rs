//! `release status|history|show`: what is live where, what happened, one release's story.

use super::{Failure, Output, ServerArgs, or_dash};
use crate::digest::Digest;
use crate::model::release::{PhaseOutcome, StatusRow};
use crate::node::protocol::CheckStatus;
use crate::releases::Shown;
use crate::server::{CheckAnswer, HistoryAnswer};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this service [default: every one].
    service: Option<String>,
    /// Ask every node what it really serves, and mark drift.
    #[arg(long)]
    nodes: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The service whose nodes are checked.
    service: String,
    /// The environment whose nodes are checked.
    #[arg(long = "env")]
    environment: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// Only this service [default: every one].
    service: Option<String>,
    /// Only this environment.
    #[arg(long = "env")]
    environment: Option<String>,
    /// At most this many releases, newest first.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The release's id.
    id: i64,
    #[command(flatten)]
    server: ServerArgs,
}

fn short(digest: &Option<Digest>) -> String {
    digest.as_ref().map_or_else(|| "-".into(), Digest::short)
}

pub async fn status(args: StatusArgs, output: Output) -> Result<(), Failure> {
    let mut query: Vec<(&str, String)> = args.service.iter().map(|s| ("service", s.clone())).collect();
    if args.nodes {
        query.push(("nodes", "true".into()));
    }
    let answer = args.server.client().get("/v1/status", &query).await?;
    let rows: Vec<StatusRow> = super::read(&answer)?;
    output.print(&answer, || {
        let table = super::table(
            &["SERVICE", "ENV", "LIVE", "VERSION", "RELEASE", "IN FLIGHT"],
            rows.iter().map(|r| {
                let pending = r.pending.iter().map(|p| format!("#{p} pending"));
                let mut busy: Vec<String> = r.in_flight.map(|id| format!("#{id}")).into_iter().collect();
                busy.extend(pending);
                if r.verified == Some(false) {
                    busy.insert(0, "UNVERIFIED (no health check proves the digest)".into());
                }
                vec![
                    r.service.clone(),
                    r.environment.clone(),
                    short(&r.digest),
                    or_dash(r.version.as_ref()),
                    r.release.map(|id| format!("#{id}")).unwrap_or_else(|| "-".into()),
                    busy.join(", "),
                ]
            }),
            &[],
        );
        let mut out = table;
        // Each cell's nodes, under the table: stranded ones, and what each said it serves.
        for r in &rows {
            let stranded = r.stranded.iter().map(|s| {
                let what = format!("STRANDED since {} by release #{}: {}", s.since, or_dash(s.release), s.reason);
                vec![s.node.clone(), String::new(), what]
            });
            let nodes = r.nodes.iter().flatten().map(|n| {
                let mark = match (&n.error, n.drift) {
                    (Some(e), _) => format!("UNREACHABLE: {e}"),
                    (None, true) => "DRIFT: not what the registry says is live".into(),
                    (None, false) => "ok".into(),
                };
                vec![n.node.clone(), short(&n.current), mark]
            });
            let lines: Vec<Vec<String>> = stranded.chain(nodes).collect();
            if lines.is_empty() {
                continue;
            }
            out.push_str(&format!("\n\n{} in {}:\n", r.service, r.environment));
            out.push_str(&super::table(&["NODE", "SERVES", ""], lines, &[]));
            if let Some(at) = &r.nodes_asked_at {
                out.push_str(&format!("\n(the nodes answered at {at}; answers are shared for a short while)"));
            }
        }
        out
    });
    // Asked what the nodes serve, a script learns from the exit code that some differ.
    let astray: Vec<String> = rows
        .iter()
        .flat_map(|r| r.nodes.iter().flatten().map(move |n| (r, n)))
        .filter(|(_, n)| n.drift || n.error.is_some())
        .map(|(r, n)| format!("{} ({} {})", n.node, r.service, r.environment))
        .collect();
    if !astray.is_empty() {
        let message = format!("{} node(s) drift or did not answer: {}", astray.len(), astray.join(", "));
        return Err(Failure::new(super::exit::FAILED, message).printed(output.json));
    }
    Ok(())
}

pub async fn history(args: HistoryArgs, output: Output) -> Result<(), Failure> {
    let mut query = vec![("limit", args.limit.to_string())];
    query.extend(args.service.iter().map(|s| ("service", s.clone())));
    query.extend(args.environment.iter().map(|e| ("environment", e.clone())));
    let answer = args.server.client().get("/v1/releases", &query).await?;
    let page: HistoryAnswer = super::read(&answer)?;
    // `--json` prints the page's releases as they came, not as this client re-serializes them.
    let releases = answer.get("releases").cloned().unwrap_or_default();
    output.print(&releases, || {
        let rows = page.releases.iter().map(|r| {
            vec![
                r.id.to_string(),
                r.service.clone(),
                r.environment.clone(),
                r.kind.as_str().to_owned(),
                r.state.as_str().to_owned(),
                r.digest.short(),
                format!("{} by {}", r.requested_at, r.requested_by),
            ]
        });
        super::table(&["ID", "SERVICE", "ENV", "KIND", "STATE", "DIGEST", "REQUESTED"], rows, &[0])
    });
    Ok(())
}

pub async fn show(args: ShowArgs, output: Output) -> Result<(), Failure> {
    let answer = args.server.client().get(&format!("/v1/releases/{}", args.id), &[]).await?;
    let shown: Shown = super::read(&answer)?;
    output.print(&answer, || {
        let d = &shown.detail;
        let r = &d.release;
        let mut out = format!(
            "release {} — {} of {} to {}: {}\nartifact  {} (version {})\nrequested {} by {} ({})",
            r.id,
            r.kind.as_str(),
            r.service,
            r.environment,
            r.state.as_str(),
            r.digest,
            or_dash(d.version.as_ref()),
            r.requested_at,
            r.requested_by,
            r.requester_owner
        );
        if let Some(a) = &d.approval {
            out.push_str(&format!("\n{} {} by {} ({})", a.decision, a.decided_at, a.decided_by, a.decider_owner));
        }
        if let Some(names) = &shown.approvers {
            out.push_str(&format!(
                "\nmay approve: {}",
                if names.is_empty() { "(nobody yet)".into() } else { names.join(", ") }
            ));
        }
        out.push_str("\ntransitions:");
        for t in &d.transitions {
            let reason = t.reason.as_ref().map(|x| format!(" — {x}")).unwrap_or_default();
            out.push_str(&format!("\n  {} {:<17} by {}{reason}", t.at, t.state.as_str(), t.actor));
        }
        if !d.forced_past_migrations.is_empty() {
            out.push_str(&format!(
                "\nFORCED past migrations it lacks (--force; the schema stays ahead): {}",
                d.forced_past_migrations.join(", ")
            ));
        }
        if !d.excluded_nodes.is_empty() {
            out.push_str(&format!("\nnodes left out (--exclude-node): {}", d.excluded_nodes.join(", ")));
        }
        if let Some(adopted) = &d.adopted {
            match adopted.digest {
                Some(digest) => out
                    .push_str(&format!("\nadopted the tree at current as {digest} from: {}", adopted.nodes.join(", "))),
                None => out.push_str("\nadopt asked for; nothing captured yet"),
            }
        }
        if !d.stranded.is_empty() {
            out.push_str(&format!("\nSTRANDED (could not be put back): {}", d.stranded.join(", ")));
        }
        if !d.deployments.is_empty() {
            out.push_str("\nnodes:\n");
            let rows = d.deployments.iter().map(|p| {
                vec![
                    p.node.clone(),
                    p.phase.as_str().to_owned(),
                    p.outcome.as_str().to_owned(),
                    p.finished_at.to_string(),
                ]
            });
            out.push_str(&super::indent(&super::table(&["NODE", "PHASE", "OUTCOME", "FINISHED"], rows, &[])));
            // The failures' output under the table, so its columns stay together.
            for p in d.deployments.iter().filter(|p| p.outcome == PhaseOutcome::Failed) {
                out.push_str(&format!("\n  {} failed ({}):\n", p.node, p.phase));
                out.push_str(super::indented_tail(p.output_tail.as_deref()).trim_end_matches('\n'));
            }
        }
        if let Some(config) = &d.config_digest {
            out.push_str(&format!("\nconfiguration {config}"));
        }
        if d.verified == Some(false) {
            out.push_str("\nunverified: no health check proves the digest (put {digest} in its url or expect)");
        }
        if !d.shared_files.is_empty() {
            out.push_str("\nshared files at the switch:\n");
            let rows = d.shared_files.iter().map(|f| {
                let what = f.sha256.as_ref().map_or_else(|| f.kind.clone(), Digest::to_string);
                vec![f.node.clone(), f.path.clone(), what]
            });
            out.push_str(&super::indent(&super::table(&["NODE", "PATH", "SHA256"], rows, &[])));
        }
        if !d.webhook_deliveries.is_empty() {
            out.push_str("\nwebhooks:\n");
            let rows = d.webhook_deliveries.iter().map(|w| {
                let how = match w.outcome.as_str() {
                    "accepted" => format!("accepted ({})", or_dash(w.last_status)),
                    "retrying" => format!(
                        "retrying at {}: {}",
                        or_dash(w.next_attempt_at.as_ref()),
                        or_dash(w.last_error.as_ref())
                    ),
                    _ => format!("GAVE UP: {}", or_dash(w.last_error.as_ref())),
                };
                vec![w.webhook.clone(), w.event.clone(), w.attempts.to_string(), w.last_attempt_at.to_string(), how]
            });
            let header = ["WEBHOOK", "EVENT", "ATTEMPTS", "LAST ATTEMPT", "OUTCOME"];
            out.push_str(&super::indent(&super::table(&header, rows, &[2])));
        }
        out
    });
    Ok(())
}

/// `release check S --env E`: a row per finding per node; exit 1 when any check fails.
pub async fn check(args: CheckArgs, output: Output) -> Result<(), Failure> {
    let path = format!("/v1/services/{}/check", args.service);
    let answer = args.server.client().get(&path, &[("environment", args.environment.clone())]).await?;
    let checked: CheckAnswer = super::read(&answer)?;
    output.print(&answer, || {
        let rows = checked.nodes.iter().flat_map(|n| {
            n.checks.iter().map(move |c| {
                let shown =
                    if c.status == CheckStatus::Pass { "ok".to_owned() } else { c.status.as_str().to_uppercase() };
                vec![n.node.clone(), c.name.clone(), shown, c.message.clone()]
            })
        });
        super::table(&["NODE", "CHECK", "", "FOUND"], rows, &[])
    });
    if checked.ok {
        return Ok(());
    }
    let failed: Vec<String> = checked
        .nodes
        .iter()
        .filter(|n| n.checks.iter().any(|c| c.status == CheckStatus::Fail))
        .map(|n| n.node.clone())
        .collect();
    let message = format!("{} node(s) would fail a deploy: {}", failed.len(), failed.join(", "));
    Err(Failure::new(super::exit::FAILED, message).printed(output.json))
}
