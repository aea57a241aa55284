//! `release status|history|show`: what is live where, what happened, one release's story.

use serde_json::Value;

use super::{Failure, Output, ServerArgs, text};

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

fn short(digest: &Value) -> String {
    digest.as_str().map(|d| d.trim_start_matches("sha256:").chars().take(12).collect()).unwrap_or_else(|| "-".into())
}

pub async fn status(args: StatusArgs, output: Output) -> Result<(), Failure> {
    let mut query: Vec<(&str, String)> = args.service.iter().map(|s| ("service", s.clone())).collect();
    if args.nodes {
        query.push(("nodes", "true".into()));
    }
    let rows = args.server.client().get("/v1/status", &query).await?;
    output.print(&rows, || {
        let cells = rows.as_array().into_iter().flatten();
        let table = super::table(
            &["SERVICE", "ENV", "LIVE", "VERSION", "RELEASE", "IN FLIGHT"],
            cells.clone().map(|r| {
                let pending: Vec<String> =
                    r["pending"].as_array().into_iter().flatten().map(|p| format!("#{p} pending")).collect();
                let mut busy: Vec<String> = r["in_flight"].as_i64().map(|id| format!("#{id}")).into_iter().collect();
                busy.extend(pending);
                if r["verified"] == false {
                    busy.insert(0, "UNVERIFIED (no health check proves the digest)".into());
                }
                vec![
                    text(&r["service"]),
                    text(&r["environment"]),
                    short(&r["digest"]),
                    text(&r["version"]),
                    r["release"].as_i64().map(|id| format!("#{id}")).unwrap_or_else(|| "-".into()),
                    busy.join(", "),
                ]
            }),
            &[],
        );
        let mut out = table;
        // Each cell's nodes, under the table: stranded ones, and what each said it serves.
        for r in cells {
            let stranded = r["stranded"].as_array().into_iter().flatten().map(|s| {
                let what = format!(
                    "STRANDED since {} by release #{}: {}",
                    text(&s["since"]),
                    text(&s["release"]),
                    text(&s["reason"])
                );
                vec![text(&s["node"]), String::new(), what]
            });
            let nodes = r["nodes"].as_array().into_iter().flatten().map(|n| {
                let mark = match (&n["error"], n["drift"] == true) {
                    (serde_json::Value::String(e), _) => format!("UNREACHABLE: {e}"),
                    (_, true) => "DRIFT: not what the registry says is live".into(),
                    _ => "ok".into(),
                };
                vec![text(&n["node"]), short(&n["current"]), mark]
            });
            let lines: Vec<Vec<String>> = stranded.chain(nodes).collect();
            if lines.is_empty() {
                continue;
            }
            out.push_str(&format!("\n\n{} in {}:\n", text(&r["service"]), text(&r["environment"])));
            out.push_str(&super::table(&["NODE", "SERVES", ""], lines, &[]));
            if let Some(at) = r["nodes_asked_at"].as_str() {
                out.push_str(&format!("\n(the nodes answered at {at}; answers are shared for a short while)"));
            }
        }
        out
    });
    // Asked what the nodes serve, a script learns from the exit code that some differ.
    let astray: Vec<String> = rows
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["nodes"].as_array().into_iter().flatten().map(move |n| (r, n)))
        .filter(|(_, n)| n["drift"] == true || n["error"].is_string())
        .map(|(r, n)| format!("{} ({} {})", text(&n["node"]), text(&r["service"]), text(&r["environment"])))
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
    let page = args.server.client().get("/v1/releases", &query).await?;
    let releases = page["releases"].clone();
    output.print(&releases, || {
        let rows = releases.as_array().into_iter().flatten().map(|r| {
            vec![
                text(&r["id"]),
                text(&r["service"]),
                text(&r["environment"]),
                text(&r["kind"]),
                text(&r["state"]),
                short(&r["digest"]),
                format!("{} by {}", text(&r["requested_at"]), text(&r["requested_by"])),
            ]
        });
        super::table(&["ID", "SERVICE", "ENV", "KIND", "STATE", "DIGEST", "REQUESTED"], rows, &[0])
    });
    Ok(())
}

pub async fn show(args: ShowArgs, output: Output) -> Result<(), Failure> {
    let r = args.server.client().get(&format!("/v1/releases/{}", args.id), &[]).await?;
    output.print(&r, || {
        let mut out = format!(
            "release {} — {} of {} to {}: {}\nartifact  {} (version {})\nrequested {} by {} ({})",
            r["id"],
            text(&r["kind"]),
            text(&r["service"]),
            text(&r["environment"]),
            text(&r["state"]),
            text(&r["digest"]),
            text(&r["version"]),
            text(&r["requested_at"]),
            text(&r["requested_by"]),
            text(&r["requester_owner"])
        );
        if let Some(a) = r.get("approval").filter(|a| !a.is_null()) {
            out.push_str(&format!(
                "\n{} {} by {} ({})",
                text(&a["decision"]),
                text(&a["decided_at"]),
                text(&a["decided_by"]),
                text(&a["decider_owner"])
            ));
        }
        if let Some(approvers) = r["approvers"].as_array() {
            let names: Vec<String> = approvers.iter().map(text).collect();
            out.push_str(&format!(
                "\nmay approve: {}",
                if names.is_empty() { "(nobody yet)".into() } else { names.join(", ") }
            ));
        }
        out.push_str("\ntransitions:");
        for t in r["transitions"].as_array().into_iter().flatten() {
            let reason = t["reason"].as_str().map(|x| format!(" — {x}")).unwrap_or_default();
            out.push_str(&format!("\n  {} {:<17} by {}{reason}", text(&t["at"]), text(&t["state"]), text(&t["actor"])));
        }
        let list = |key: &str| r[key].as_array().into_iter().flatten().map(text).collect::<Vec<String>>();
        if !list("forced_past_migrations").is_empty() {
            out.push_str(&format!(
                "\nFORCED past migrations it lacks (--force; the schema stays ahead): {}",
                list("forced_past_migrations").join(", ")
            ));
        }
        if !list("excluded_nodes").is_empty() {
            out.push_str(&format!("\nnodes left out (--exclude-node): {}", list("excluded_nodes").join(", ")));
        }
        if let Some(adopted) = r.get("adopted").filter(|a| !a.is_null()) {
            let nodes: Vec<String> = adopted["nodes"].as_array().into_iter().flatten().map(text).collect();
            match adopted["digest"].as_str() {
                Some(digest) => {
                    out.push_str(&format!("\nadopted the tree at current as {digest} from: {}", nodes.join(", ")))
                }
                None => out.push_str("\nadopt asked for; nothing captured yet"),
            }
        }
        let stranded = list("stranded");
        if !stranded.is_empty() {
            out.push_str(&format!("\nSTRANDED (could not be put back): {}", stranded.join(", ")));
        }
        let deployments = r["deployments"].as_array().cloned().unwrap_or_default();
        if !deployments.is_empty() {
            out.push_str("\nnodes:\n");
            let rows = deployments
                .iter()
                .map(|d| vec![text(&d["node"]), text(&d["phase"]), text(&d["outcome"]), text(&d["finished_at"])]);
            out.push_str(&super::indent(&super::table(&["NODE", "PHASE", "OUTCOME", "FINISHED"], rows, &[])));
            // The failures' output under the table, so its columns stay together.
            for d in deployments.iter().filter(|d| d["outcome"] == "failed") {
                out.push_str(&format!("\n  {} failed ({}):\n", text(&d["node"]), text(&d["phase"])));
                out.push_str(super::indented_tail(&d["output_tail"]).trim_end_matches('\n'));
            }
        }
        if let Some(config) = r["config_digest"].as_str() {
            out.push_str(&format!("\nconfiguration {config}"));
        }
        if r["verified"] == false {
            out.push_str("\nunverified: no health check proves the digest (put {digest} in its url or expect)");
        }
        let shared = r["shared_files"].as_array().cloned().unwrap_or_default();
        if !shared.is_empty() {
            out.push_str("\nshared files at the switch:\n");
            let rows = shared.iter().map(|f| {
                let what = f["sha256"].as_str().unwrap_or_else(|| f["kind"].as_str().unwrap_or("?"));
                vec![text(&f["node"]), text(&f["path"]), what.to_owned()]
            });
            out.push_str(&super::indent(&super::table(&["NODE", "PATH", "SHA256"], rows, &[])));
        }
        let deliveries = r["webhook_deliveries"].as_array().cloned().unwrap_or_default();
        if !deliveries.is_empty() {
            out.push_str("\nwebhooks:\n");
            let rows = deliveries.iter().map(|d| {
                let how = match d["outcome"].as_str() {
                    Some("accepted") => format!("accepted ({})", text(&d["last_status"])),
                    Some("retrying") => {
                        format!("retrying at {}: {}", text(&d["next_attempt_at"]), text(&d["last_error"]))
                    }
                    _ => format!("GAVE UP: {}", text(&d["last_error"])),
                };
                vec![text(&d["webhook"]), text(&d["event"]), text(&d["attempts"]), text(&d["last_attempt_at"]), how]
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
    output.print(&answer, || {
        let rows = answer["nodes"].as_array().into_iter().flatten().flat_map(|n| {
            n["checks"].as_array().into_iter().flatten().map(move |c| {
                let status = text(&c["status"]);
                let shown = if status == "pass" { "ok".to_owned() } else { status.to_uppercase() };
                vec![text(&n["node"]), text(&c["name"]), shown, text(&c["message"])]
            })
        });
        super::table(&["NODE", "CHECK", "", "FOUND"], rows, &[])
    });
    if answer["ok"] == true {
        return Ok(());
    }
    let failed: Vec<String> = answer["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["checks"].as_array().into_iter().flatten().any(|c| c["status"] == "fail"))
        .map(|n| text(&n["node"]))
        .collect();
    let message = format!("{} node(s) would fail a deploy: {}", failed.len(), failed.join(", "));
    Err(Failure::new(super::exit::FAILED, message).printed(output.json))
}
