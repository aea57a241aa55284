//! `release deploy|promote|rollback|approve|reject|cancel`: ask for a release or decide one,
//! and with `--wait` follow it to its end.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Failure, Output, ServerArgs, exit};
use crate::client::Client;
use crate::model::release::{PhaseOutcome, Release, State};
use crate::releases::Shown;

/// How long one follow request may wait on the server for the release to change.
const WAIT_SECONDS: u64 = 25;
/// The pause before asking again when an answer brought nothing new (a server that does not
/// wait for changes answers at once).
const POLL: Duration = Duration::from_millis(100);
/// How often `--queue` asks again while another release is in flight.
const QUEUE_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The service, as configured (`[service.NAME]`).
    service: String,
    /// The environment, as configured (`[[environment]]`).
    #[arg(long = "env")]
    environment: String,
    /// The artifact's digest, `sha256:<64 hex>`, or its first 12 or more hex digits.
    digest: String,
    /// Leave this node out of the release (repeatable; recorded).
    #[arg(long = "exclude-node")]
    exclude_nodes: Vec<String>,
    /// Take over an application found at `current` on a node (a plain directory deployed
    /// another way): it is kept as an artifact and a release directory, so that even this
    /// first deploy can be rolled back (recorded).
    #[arg(long)]
    adopt: bool,
    /// Deploy an artifact that lacks migrations the live one has (Laravel; recorded).
    #[arg(long)]
    force: bool,
    /// Follow the release until it is final (exit 0 live, 7 failed and put back, 8 a node not
    /// put back, 3 rejected, cancelled or expired; 1 a state this command does not know).
    #[arg(long)]
    wait: bool,
    /// When another release of the service is in flight there, wait for it to end (at
    /// most this long, e.g. "10m") and ask again, instead of being refused (exit 3).
    #[arg(long, value_name = "DURATION", value_parser = parse_queue)]
    queue: Option<Duration>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    /// The service, as configured (`[service.NAME]`).
    service: String,
    /// The environment to promote to.
    #[arg(long = "to")]
    environment: String,
    /// Where it is live now [default: the environment's promote_from].
    #[arg(long)]
    from: Option<String>,
    /// Leave this node out of the release (repeatable; recorded).
    #[arg(long = "exclude-node")]
    exclude_nodes: Vec<String>,
    /// Take over an application found at `current` on a node (a plain directory deployed
    /// another way): it is kept as an artifact and a release directory, so that even this
    /// first deploy can be rolled back (recorded).
    #[arg(long)]
    adopt: bool,
    /// Follow the release until it is final (exit 0 live, 7 failed and put back, 8 a node not
    /// put back, 3 rejected, cancelled or expired; 1 a state this command does not know).
    #[arg(long)]
    wait: bool,
    /// When another release of the service is in flight there, wait for it to end (at
    /// most this long, e.g. "10m") and ask again, instead of being refused (exit 3).
    #[arg(long, value_name = "DURATION", value_parser = parse_queue)]
    queue: Option<Duration>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    /// The service, as configured (`[service.NAME]`).
    service: String,
    /// The environment, as configured (`[[environment]]`).
    #[arg(long = "env")]
    environment: String,
    /// A digest that was live in the environment before [default: the last good release
    /// before the live one].
    #[arg(long)]
    to: Option<String>,
    /// Leave this node out of the release (repeatable; recorded).
    #[arg(long = "exclude-node")]
    exclude_nodes: Vec<String>,
    /// Roll back past migrations the target lacks (Laravel; recorded).
    #[arg(long)]
    force: bool,
    /// Follow the release until it is final (exit 0 live, 7 failed and put back, 8 a node not
    /// put back, 3 rejected, cancelled or expired; 1 a state this command does not know).
    #[arg(long)]
    wait: bool,
    /// When another release of the service is in flight there, wait for it to end (at
    /// most this long, e.g. "10m") and ask again, instead of being refused (exit 3).
    #[arg(long, value_name = "DURATION", value_parser = parse_queue)]
    queue: Option<Duration>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    /// The release's id (as `release status` and `history` show it).
    id: i64,
    /// Follow the release until it is final (exit 0 live, 7 failed and put back, 8 a node not
    /// put back, 3 rejected, cancelled or expired; 1 a state this command does not know).
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct RejectArgs {
    /// The release's id.
    id: i64,
    /// Why (recorded with the decision).
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The release's id.
    id: i64,
    #[command(flatten)]
    server: ServerArgs,
}

fn parse_queue(text: &str) -> Result<Duration, String> {
    let wait =
        humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration (e.g. \"10m\"): {e}"))?;
    if wait > Duration::from_secs(24 * 3600) {
        return Err(format!("{text} is longer than a day"));
    }
    Ok(wait)
}

/// Asks for a release; with `queue`, a refusal because another release of the cell is in
/// flight (`conflict`) is answered by waiting for it and asking again, until `queue` has
/// passed (then the refusal stands).
async fn post_in_turn(client: &Client, path: &str, body: &Value, queue: Option<Duration>) -> Result<Value, Failure> {
    let deadline = queue.map(|q| tokio::time::Instant::now() + q);
    let mut told = false;
    loop {
        match client.post(path, body).await {
            Err(crate::client::ClientError::Api { status: 409, code, message, .. })
                if (code == "conflict" || code == "recovering")
                    && deadline.is_some_and(|d| tokio::time::Instant::now() < d) =>
            {
                if !told {
                    eprintln!("{message}: waiting for its turn (--queue)");
                    told = true;
                }
                tokio::time::sleep(QUEUE_POLL).await;
            }
            answer => return Ok(answer?),
        }
    }
}

/// A digest as given (whole, or 12 or more of its hex digits), checked here, resolved by
/// the server.
fn digest(text: &str) -> Result<String, Failure> {
    text.parse::<crate::digest::DigestRef>().map(|d| d.to_string()).map_err(|e| Failure::new(exit::USAGE, e))
}

pub async fn deploy(args: DeployArgs, output: Output) -> Result<(), Failure> {
    let body = json!({"service": args.service, "environment": args.environment, "digest": digest(&args.digest)?,
        "exclude_nodes": args.exclude_nodes, "adopt": args.adopt, "force": args.force});
    let client = args.server.client();
    let release = post_in_turn(&client, "/v1/releases", &body, args.queue).await?;
    conclude(&client, release, args.wait, output).await
}

pub async fn promote(args: PromoteArgs, output: Output) -> Result<(), Failure> {
    let body = json!({"service": args.service, "environment": args.environment, "from": args.from,
        "exclude_nodes": args.exclude_nodes, "adopt": args.adopt});
    let client = args.server.client();
    let release = post_in_turn(&client, "/v1/releases/promote", &body, args.queue).await?;
    conclude(&client, release, args.wait, output).await
}

pub async fn rollback(args: RollbackArgs, output: Output) -> Result<(), Failure> {
    let to = args.to.as_deref().map(digest).transpose()?;
    let body = json!({"service": args.service, "environment": args.environment, "to": to,
        "exclude_nodes": args.exclude_nodes, "force": args.force});
    let client = args.server.client();
    let release = post_in_turn(&client, "/v1/releases/rollback", &body, args.queue).await?;
    conclude(&client, release, args.wait, output).await
}

pub async fn approve(args: DecideArgs, output: Output) -> Result<(), Failure> {
    let client = args.server.client();
    let release = client.post(&format!("/v1/releases/{}/approve", args.id), &json!({})).await?;
    conclude(&client, release, args.wait, output).await
}

pub async fn reject(args: RejectArgs, output: Output) -> Result<(), Failure> {
    let client = args.server.client();
    let release = client.post(&format!("/v1/releases/{}/reject", args.id), &json!({"reason": args.reason})).await?;
    conclude(&client, release, false, output).await
}

pub async fn cancel(args: CancelArgs, output: Output) -> Result<(), Failure> {
    let client = args.server.client();
    let release = client.post(&format!("/v1/releases/{}/cancel", args.id), &json!({})).await?;
    conclude(&client, release, false, output).await
}

/// Prints the release as accepted; with `wait`, follows it to a final state and exits by it
/// (or to a state this build does not know, where it stops with exit 1).
async fn conclude(client: &Client, answer: Value, wait: bool, output: Output) -> Result<(), Failure> {
    let release: Release = super::read(&answer)?;
    let id = release.id;
    if !wait {
        output.print(&answer, || describe(&release));
        if release.state == State::PendingApproval && !output.json {
            // Who may approve it, as --wait says: the request's answer does not name them.
            if let Ok(shown) = client.get(&format!("/v1/releases/{id}"), &[]).await
                && let Ok(shown) = super::read::<Shown>(&shown)
            {
                println!("{}", waits_for(id, &shown));
            }
        }
        return Ok(());
    }
    let mut seen_transitions = HashSet::new();
    let mut seen_phases = HashSet::new();
    let mut told_approvers = false;
    // Transitions and node phases seen so far: the server answers as soon as there are more.
    let mut known: usize = 0;
    loop {
        let query = [("seen", known.to_string()), ("wait", WAIT_SECONDS.to_string())];
        let answer = client.get(&format!("/v1/releases/{id}"), &query).await?;
        let shown: Shown = super::read(&answer)?;
        let detail = &shown.detail;
        let changes = detail.transitions.len() + detail.deployments.len();
        if !output.json {
            for t in &detail.transitions {
                if seen_transitions.insert((t.state, t.at.clone())) {
                    let reason = t.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default();
                    println!("release {id}: {} at {} by {}{reason}", t.state, t.at, t.actor);
                }
            }
            // Each node's phases, as they end.
            for d in &detail.deployments {
                if seen_phases.insert((d.node.clone(), d.phase, d.finished_at.clone())) {
                    let ms = millis_between(&d.started_at, &d.finished_at);
                    println!("  {:<28} {:<12} {:<7} {ms}", d.node, d.phase.as_str(), d.outcome.as_str());
                    if d.outcome == PhaseOutcome::Failed {
                        print!("{}", super::indented_tail(d.output_tail.as_deref()));
                    }
                }
            }
        }
        let state = detail.release.state;
        if state == State::PendingApproval && !told_approvers && !output.json {
            told_approvers = true;
            println!("{}", waits_for(id, &shown));
        }
        match state {
            State::Live | State::Superseded => {
                output.print(&answer, || format!("release {id} is live: {}", detail.release.digest));
                return Ok(());
            }
            State::Failed => {
                if output.json {
                    println!("{answer}");
                }
                // The server decides which nodes are stranded (a node unreachable while an
                // interrupted deploy was resolved has no `put back` phase to read).
                if !detail.stranded.is_empty() {
                    return Err(Failure::new(
                        exit::NOT_PUT_BACK,
                        format!(
                            "release {id} failed and could not be put back on: {} (shown as drift)",
                            detail.stranded.join(", ")
                        ),
                    )
                    .printed(output.json));
                }
                let reason = detail
                    .transitions
                    .last()
                    .and_then(|t| t.reason.as_deref())
                    .unwrap_or("no reason recorded")
                    .to_owned();
                return Err(Failure::new(
                    exit::DEPLOY_FAILED,
                    format!("release {id} failed ({reason}); the previous release stays live"),
                )
                .printed(output.json));
            }
            State::Rejected | State::Cancelled | State::Expired => {
                if output.json {
                    println!("{answer}");
                }
                return Err(Failure::new(exit::CONFLICT, format!("release {id} ended {state}")).printed(output.json));
            }
            // A newer server's state: whether it is final this CLI cannot tell, and waiting
            // for a known one could hang for ever. Stop, say so, exit 1 (not a deploy's
            // failure: the release goes on at the server).
            State::Unknown(name) => {
                if output.json {
                    println!("{answer}");
                }
                return Err(Failure::new(
                    exit::FAILED,
                    format!(
                        "release {id} is {name}, a state this release command does not know (the server is \
                         newer): no longer waiting; follow it with `release show {id}`"
                    ),
                )
                .printed(output.json));
            }
            _ if changes <= known => tokio::time::sleep(POLL).await,
            _ => {}
        }
        known = changes;
    }
}

/// "12 ms" between two RFC 3339 times, or nothing.
fn millis_between(start: impl AsRef<str>, end: impl AsRef<str>) -> String {
    match (crate::utc::parse(start.as_ref()), crate::utc::parse(end.as_ref())) {
        (Ok(a), Ok(b)) => format!("{} ms", (b - a).whole_milliseconds()),
        _ => String::new(),
    }
}

/// "release 7 waits for approval by one of: bob, dave; approve with `release approve 7`".
fn waits_for(id: i64, shown: &Shown) -> String {
    let approvers = shown.approvers.as_deref().unwrap_or_default();
    format!(
        "release {id} waits for approval by one of: {}; approve with `release approve {id}`",
        if approvers.is_empty() { "(no approver token exists yet)".to_owned() } else { approvers.join(", ") }
    )
}

fn describe(r: &Release) -> String {
    format!(
        "release {} ({} of {} to {}): {}\n{}",
        r.id,
        r.kind.as_str(),
        r.service,
        r.environment,
        r.state.as_str(),
        r.digest
    )
}
