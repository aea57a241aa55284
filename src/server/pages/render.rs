//! The pages' HTML, checked at compile time (maud): every value is escaped; nothing inline
//! that the Content-Security-Policy would have to allow (no script, no style attribute).
//!
//! Long on purpose: every page's template, flat maud markup that reads top to bottom.

use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use crate::audit::{ChainView, Event};
use crate::digest::Digest;
use crate::registry::{Artifact, ArtifactUpload, AuditFilter, LiveSpell};
use crate::releases::{Release, Shown, State, StatusRow};
use crate::server::error::ApiError;
use crate::token::Principal;
use crate::utc;

/// The frame of every page: header with navigation and who is signed in.
fn page(title: &str, viewer: Option<&Principal>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — release" }
                link rel="stylesheet" href="/static/style.css";
            }
            body {
                header {
                    span.brand { "release" }
                    @if let Some(viewer) = viewer {
                        nav {
                            a href="/" { "Live" }
                            a href="/audit" { "Audit log" }
                        }
                        form method="post" action="/logout" {
                            span.dim { (viewer.name) " (" (viewer.owner) ") " }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A refusal or failure as a page: the status and words `server/error.rs` chose for it.
pub fn refused(error: ApiError) -> Response {
    error.into_page(|e| {
        let body = html! {
            h1 { (e.status.canonical_reason().unwrap_or("Refused")) }
            p.bad { (e.message) }
            p { a href="/login" { "Sign in" } " · " a href="/" { "Live" } }
        };
        page(e.status.as_str(), None, body).into_string()
    })
}

/// The sign-in form; after a refused sign-in, with why (and the refusal's status).
pub fn login(next: &str, refusal: Option<ApiError>) -> Response {
    let form = |error: Option<&str>| {
        let body = html! {
            div.login {
                h1 { "Sign in" }
                p.dim { "With a token that has the auditor role. The session lasts 8 hours, never longer than the token." }
                @if let Some(error) = error {
                    p.bad { "Refused: " (error) }
                }
                form method="post" action="/login" {
                    input type="hidden" name="next" value=(next);
                    p {
                        label for="token" { "Token" }
                        br;
                        input #token type="password" name="token" autocomplete="off" required placeholder="rls_…";
                    }
                    button type="submit" { "Sign in" }
                }
            }
        };
        page("Sign in", None, body).into_string()
    };
    match refusal {
        None => Html(form(None)).into_response(),
        Some(refusal) => refusal.into_page(|e| form(Some(&e.message))),
    }
}

/// A time as people read it (UTC, to the second), with the exact value for machines.
fn at(text: impl AsRef<str>) -> Markup {
    let text = text.as_ref();
    let shown = match utc::parse(text) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => text.to_owned(),
    };
    html! { time datetime=(text) { (shown) } }
}

/// An event's details (JSON text) as people read them: one `key: value` line per field
/// (strings bare, the rest as compact JSON), instead of one long line of JSON.
fn details_lines(details: &str) -> String {
    let parsed: serde_json::Value = serde_json::from_str(details).unwrap_or(serde_json::Value::Null);
    match parsed.as_object() {
        Some(fields) if !fields.is_empty() => fields
            .iter()
            .map(|(key, value)| match value {
                serde_json::Value::String(text) => format!("{key}: {text}"),
                other => format!("{key}: {other}"),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => details.to_owned(),
    }
}

/// How long from one time to another, for people.
fn took(from: impl AsRef<str>, to: impl AsRef<str>) -> String {
    match (utc::parse(from.as_ref()), utc::parse(to.as_ref())) {
        (Ok(a), Ok(b)) => {
            let ms = (b - a).whole_milliseconds().max(0);
            match ms {
                0..1_000 => format!("{ms} ms"),
                1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
                60_000..3_600_000 => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
                _ => format!("{} h {} min", ms / 3_600_000, (ms % 3_600_000) / 60_000),
            }
        }
        _ => String::new(),
    }
}

fn digest_link(digest: &Digest) -> Markup {
    html! { a.digest href={ "/artifacts/" (digest) } title=(digest) { (digest.short()) } }
}

fn state_mark(state: State) -> Markup {
    let class = match state {
        State::Live => "ok",
        State::Failed | State::Rejected => "bad",
        State::PendingApproval | State::Approved | State::Deploying => "warn",
        _ => "dim",
    };
    html! { span class=(class) { (state.as_str()) } }
}

fn is_final(state: State) -> bool {
    !matches!(state, State::PendingApproval | State::Approved | State::Deploying)
}

/// A state that ends a release's request: what "took" measures up to (superseded comes
/// later, to a release that went live).
fn is_outcome(state: State) -> bool {
    is_final(state) && state != State::Superseded
}

/// `/`: what is live where.
pub fn matrix(viewer: &Principal, rows: &[StatusRow], asked_nodes: bool) -> Markup {
    let mut services: Vec<&str> = Vec::new();
    let mut environments: Vec<&str> = Vec::new();
    for row in rows {
        if !services.contains(&row.service.as_str()) {
            services.push(&row.service);
        }
        if !environments.contains(&row.environment.as_str()) {
            environments.push(&row.environment);
        }
    }
    let cell = |service: &str, env: &str| rows.iter().find(|r| r.service == service && r.environment == env);
    let body = html! {
        h1 { "What is live where" }
        p.dim {
            "Times in UTC. "
            @if asked_nodes {
                @if let Some(oldest) = rows.iter().filter_map(|r| r.nodes_asked_at.as_ref()).min() {
                    "The nodes were asked what they serve at " (at(oldest)) " or since "
                    "(their answers are shared for a short while)."
                }
            }
            @else { a href="/?nodes=1" { "Ask every node what it serves" } " (marks drift)." }
        }
        @if rows.is_empty() {
            p { "No services are configured, or this token sees none." }
        } @else {
            table #matrix {
                thead { tr { th { "service" } @for env in &environments { th { (env) } } } }
                tbody {
                    @for service in &services {
                        tr {
                            th { a href={ "/services/" (service) } { (service) } }
                            @for env in &environments {
                                td.cell {
                                    @if let Some(row) = cell(service, env) { (status_cell(row)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page("Live", Some(viewer), body)
}

fn status_cell(row: &StatusRow) -> Markup {
    let drifting: Vec<&str> =
        row.nodes.iter().flatten().filter(|n| n.drift || n.error.is_some()).map(|n| n.node.as_str()).collect();
    html! {
        @match (&row.digest, row.release) {
            (Some(digest), Some(id)) => {
                div { (digest_link(digest)) " " span.dim { (row.version.as_deref().unwrap_or("")) } }
                div.dim {
                    a href={ "/releases/" (id) } { "#" (id) }
                    @if let Some(since) = &row.since { " since " (at(since)) }
                    @if let Some(by) = &row.live_by { " by " (by) }
                }
                @if row.verified == Some(false) { div.warn { "unverified" } }
            }
            _ => { span.dim { "nothing live" } }
        }
        @if let Some(id) = row.in_flight { div.warn { "in flight: " a href={ "/releases/" (id) } { "#" (id) } } }
        @for id in &row.pending { div.warn { "pending approval: " a href={ "/releases/" (id) } { "#" (id) } } }
        @for s in &row.stranded {
            div.bad title=(s.reason) {
                "stranded: " (s.node)
                @if let Some(id) = s.release { " by " a href={ "/releases/" (id) } { "#" (id) } }
            }
        }
        @if !drifting.is_empty() { div.bad { "drift: " (drifting.join(", ")) } }
    }
}

/// `/services/{service}`: its releases, newest first, per environment or all.
#[allow(clippy::too_many_arguments)] // one page, each argument a part of it
pub fn timeline(
    viewer: &Principal,
    service: &str,
    environment: Option<&str>,
    environments: &[String],
    releases: &[Release],
    deciders: &std::collections::HashMap<i64, (String, String)>,
    ended: &std::collections::HashMap<i64, String>,
    next: Option<i64>,
) -> Markup {
    let env_query = environment.map(|e| format!("env={e}&")).unwrap_or_default();
    let body = html! {
        h1 { "Timeline of " (service) }
        p {
            "Environment: "
            @if environment.is_none() { strong { "all" } } @else { a href={ "/services/" (service) } { "all" } }
            @for env in environments {
                " · "
                @if environment == Some(env.as_str()) { strong { (env) } }
                @else { a href={ "/services/" (service) "?env=" (env) } { (env) } }
            }
        }
        @if releases.is_empty() {
            p { "No releases." }
        } @else {
            table #timeline {
                thead { tr {
                    th { "release" } th { "environment" } th { "kind" } th { "state" } th { "artifact" }
                    th { "requested" } th { "by" } th { "decided by" } th { "took" }
                } }
                tbody {
                    @for r in releases {
                        tr {
                            td { a href={ "/releases/" (r.id) } { "#" (r.id) } }
                            td { (r.environment) }
                            td { (r.kind.as_str()) }
                            td { (state_mark(r.state)) }
                            td { (digest_link(&r.digest)) }
                            td { (at(&r.requested_at)) }
                            td { (r.requested_by) }
                            td {
                                @if let Some((decision, by)) = deciders.get(&r.id) { (by) " " span.dim { "(" (decision) ")" } }
                            }
                            td { @if let Some(ended) = ended.get(&r.id) { (took(&r.requested_at, ended)) } }
                        }
                    }
                }
            }
        }
        @if let Some(next) = next {
            p.pager { a href={ "/services/" (service) "?" (env_query) "before=" (next) } { "Older releases →" } }
        }
    };
    page(&format!("Timeline of {service}"), Some(viewer), body)
}

/// `/releases/{id}`: a release with its whole story.
pub fn release(
    viewer: &Principal,
    shown: &Shown,
    artifact: Option<&Artifact>,
    upload: Option<&ArtifactUpload>,
) -> Markup {
    let d = &shown.detail;
    let r = &d.release;
    let body = html! {
        h1 { "Release #" (r.id) ": " (r.kind.as_str()) " of " a href={ "/services/" (r.service) "?env=" (r.environment) } { (r.service) } " to " (r.environment) }
        dl.facts {
            dt { "state" } dd { (state_mark(r.state)) " since " (at(&r.state_changed_at)) }
            dt { "requested" } dd { (at(&r.requested_at)) " by " (r.requested_by) " (" (r.requester_owner) ")" }
            @if let Some(source) = &r.source_environment { dt { "promoted from" } dd { (source) } }
            @if let Some(replaces) = r.replaces { dt { "replaces" } dd { a href={ "/releases/" (replaces) } { "#" (replaces) } } }
            // To its outcome (live, failed…), not to a later supersession.
            @if let Some(ended) = d.transitions.iter().find(|t| is_outcome(t.state)) { dt { "took" } dd { (took(&r.requested_at, &ended.at)) } }
            @if !d.forced_past_migrations.is_empty() {
                dt { "forced past migrations" }
                dd.warn { (d.forced_past_migrations.join(", ")) " (the schema stays ahead of this code)" }
            }
            @if let Some(verified) = d.verified {
                dt { "verified" }
                dd {
                    @if verified { span.ok { "yes: the health check named the digest" } }
                    @else { span.warn { "no: no health check proves the digest" } }
                }
            }
            @if let Some(config) = &d.config_digest { dt { "configuration" } dd { code { (config) } } }
            @if !d.excluded_nodes.is_empty() { dt { "nodes left out" } dd { (d.excluded_nodes.join(", ")) } }
            @if !d.stranded.is_empty() { dt { "stranded (not put back)" } dd.bad { (d.stranded.join(", ")) } }
            @if let Some(adopted) = &d.adopted {
                dt { "adopted" }
                dd {
                    @if let Some(digest) = &adopted.digest {
                        (digest_link(digest)) " from " (adopted.nodes.join(", "))
                    } @else { "asked for, not captured" }
                }
            }
        }
        h2 { "Artifact" }
        dl.facts {
            dt { "digest" } dd { (digest_link(&r.digest)) " " code.dim { (r.digest) } }
            dt { "version" } dd { (d.version.as_deref().unwrap_or("—")) }
            @if let Some(u) = upload {
                dt { "git commit" } dd { code { (u.git_sha.as_deref().unwrap_or("—")) } }
                dt { "CI build" } dd {
                    @match u.build_url.as_deref() {
                        Some(url) if url.starts_with("https://") || url.starts_with("http://") => { a href=(url) rel="noreferrer" { (url) } }
                        Some(url) => { (url) }
                        None => { "—" }
                    }
                }
                dt { "uploaded" } dd { (at(&u.uploaded_at)) " by " (u.uploaded_by) " (" (u.uploader_owner) ")" }
            }
            @if let Some(a) = artifact {
                dt { "size" } dd { (a.size) " bytes (" (a.unpacked_size) " unpacked)" }
                dt { "files" } dd { (a.file_count) }
                @if !a.migrations.is_empty() { dt { "migrations" } dd { (a.migrations.len()) " files, newest " code { (a.migrations.last().map(String::as_str).unwrap_or("")) } } }
            }
        }
        h2 { "Approval" }
        @match &d.approval {
            Some(a) => { p { (a.decision) " by " (a.decided_by) " (" (a.decider_owner) ") at " (at(&a.decided_at)) @if let Some(reason) = &a.reason { ": " (reason) } } }
            None => {
                @if let Some(approvers) = &shown.approvers { p.warn { "Waiting for approval by: " (approvers.join(", ")) } }
                @else { p.dim { "None needed." } }
            }
        }
        h2 { "Transitions" }
        table #transitions {
            thead { tr { th { "at" } th { "state" } th { "by" } th { "reason" } } }
            tbody { @for t in &d.transitions { tr { td { (at(&t.at)) } td { (state_mark(t.state)) } td { (t.actor) } td { (t.reason.as_deref().unwrap_or("")) } } } }
        }
        h2 { "Nodes" }
        @if d.deployments.is_empty() {
            p.dim { "No node has been asked yet." }
        } @else {
            table #nodes {
                thead { tr { th { "node" } th { "phase" } th { "outcome" } th { "started" } th { "took" } th { "output" } } }
                tbody {
                    @for p in &d.deployments {
                        tr {
                            td { (p.node) }
                            td { (p.phase) }
                            td { @if p.outcome == crate::model::release::PhaseOutcome::Ok { span.ok { "ok" } } @else { span.bad { (p.outcome) } } }
                            td { (at(&p.started_at)) }
                            td { (took(&p.started_at, &p.finished_at)) }
                            td { @if let Some(tail) = &p.output_tail { pre { (tail) } } }
                        }
                    }
                }
            }
        }
        @if !d.webhook_deliveries.is_empty() {
            h2 { "Webhooks" }
            table #webhooks {
                thead { tr { th { "webhook" } th { "event" } th { "outcome" } th { "attempts" } th { "last answer" } th { "first attempt" } th { "last attempt" } th { "next attempt" } } }
                tbody {
                    @for w in &d.webhook_deliveries {
                        tr {
                            td { (w.webhook) }
                            td { code { (w.event) } }
                            td {
                                @if w.delivered { span.ok { (w.outcome) } }
                                @else if w.outcome == "gave_up" { span.bad { "gave up" } }
                                @else { span.warn { (w.outcome) } }
                            }
                            td { (w.attempts) }
                            td {
                                @if let Some(status) = w.last_status { "HTTP " (status) " " }
                                @if let Some(error) = &w.last_error { span.dim { (error) } }
                            }
                            td { (at(&w.first_attempt_at)) }
                            td { (at(&w.last_attempt_at)) }
                            td { @if let Some(next) = &w.next_attempt_at { (at(next)) } }
                        }
                    }
                }
            }
        }
        @if !d.shared_files.is_empty() {
            h2 { "Shared files at the switch" }
            table #shared {
                thead { tr { th { "node" } th { "path" } th { "SHA-256 (never the contents)" } } }
                tbody { @for f in &d.shared_files { tr { td { (f.node) } td { code { (f.path) } } td { @match &f.sha256 { Some(s) => { code { (s) } }, None => { span.dim { (f.kind) } } } } } } }
            }
        }
    };
    page(&format!("Release #{}", r.id), Some(viewer), body)
}

/// `/artifacts/{digest}`: what it is, and where it has been live.
pub fn artifact(
    viewer: &Principal,
    artifact: &Artifact,
    uploads: &[ArtifactUpload],
    spells: &[LiveSpell],
    blocked: Option<&str>,
) -> Markup {
    let body = html! {
        h1 { "Artifact " code { (artifact.digest.short()) } }
        @if let Some(reason) = blocked { p.banner.bad { "Blocked: never deployable again. " (reason) } }
        dl.facts {
            dt { "digest" } dd { code { (artifact.digest) } }
            dt { "size" } dd { (artifact.size) " bytes stored, " (artifact.unpacked_size) " unpacked" }
            dt { "files" } dd { (artifact.file_count) }
            dt { "stored" } dd { (at(&artifact.stored_at)) }
        }
        h2 { "Uploads" }
        table #uploads {
            thead { tr { th { "service" } th { "version" } th { "git commit" } th { "CI build" } th { "by" } th { "at" } } }
            tbody {
                @for u in uploads {
                    tr {
                        td { a href={ "/services/" (u.service) } { (u.service) } }
                        td { (u.version.as_deref().unwrap_or("")) }
                        td { code { (u.git_sha.as_deref().unwrap_or("")) } }
                        td { (u.build_url.as_deref().unwrap_or("")) }
                        td { (u.uploaded_by) " (" (u.uploader_owner) ")" }
                        td { (at(&u.uploaded_at)) }
                    }
                }
            }
        }
        h2 { "Where it has been live" }
        @if spells.is_empty() {
            p.dim { "Never live." }
        } @else {
            table #live {
                thead { tr { th { "service" } th { "environment" } th { "release" } th { "live from" } th { "until" } } }
                tbody {
                    @for s in spells {
                        tr {
                            td { (s.service) }
                            td { (s.environment) }
                            td { a href={ "/releases/" (s.release) } { "#" (s.release) } }
                            td { (at(&s.live_at)) }
                            td { @match &s.until { Some(until) => { (at(until)) }, None => { span.ok { "live now" } } } }
                        }
                    }
                }
            }
        }
    };
    page(&format!("Artifact {}", artifact.digest.short()), Some(viewer), body)
}

/// `/audit`: the log, newest first, filtered, with the chain's state on top.
pub fn audit(
    viewer: &Principal,
    chain: Option<&ChainView>,
    filter: &AuditFilter,
    query: &str,
    events: &[Event],
    next: Option<u64>,
) -> Markup {
    let value = |v: &Option<String>| v.clone().unwrap_or_default();
    let body = html! {
        h1 { "Audit log" }
        @match chain {
            Some(c) if !c.ok => {
                div.banner.bad #chain {
                    strong { "The hash chain is broken" }
                    @if let Some(bad) = &c.first_bad { " at event " (bad.seq) ": " (bad.why) }
                    " (checked " (at(&c.checked_at)) ")"
                }
            }
            Some(c) => {
                div.banner.ok #chain {
                    @if c.in_progress && c.events == 0 { "Checking the hash chain… (started with the server; reload in a moment)" }
                    @else {
                        strong { "The hash chain is intact" } ": " (c.events) " events"
                        @if let Some(cp) = &c.checkpoint { ", and it extends the bucket's checkpoint of " (cp.events) " events (" (at(&cp.at)) ")" }
                        ". Checked " (at(&c.checked_at))
                        @if c.in_progress { " (a full check is running)" }
                        "."
                    }
                }
            }
            None => { div.banner #chain { "The hash chain has not been checked yet." } }
        }
        form.filters method="get" action="/audit" {
            label { "actor (token)" input type="text" name="actor" value=(value(&filter.actor)); }
            label { "action" input type="text" name="action" value=(value(&filter.action)) placeholder="release.live"; }
            label { "service" input type="text" name="service" value=(value(&filter.service)); }
            label { "from (UTC)" input type="text" name="from" value=(filter.from.as_ref().map(ToString::to_string).unwrap_or_default()) placeholder="2026-11-01T00:00:00Z"; }
            label { "until (UTC)" input type="text" name="until" value=(filter.until.as_ref().map(ToString::to_string).unwrap_or_default()); }
            button type="submit" { "Filter" }
            a href="/audit" { "clear" }
        }
        p {
            "Export what this filter selects (newest first): "
            a #export-jsonl href={ "/audit/export.jsonl?" (query) } { "JSON lines" } " · "
            a #export-csv href={ "/audit/export.csv?" (query) } { "CSV" }
        }
        @if events.is_empty() {
            p { "No events." }
        } @else {
            table #events {
                thead { tr { th { "#" } th { "at" } th { "actor" } th { "action" } th { "subject" } th { "details" } } }
                tbody {
                    @for e in events {
                        tr {
                            td { (e.seq) }
                            td { (at(&e.at)) }
                            td { (e.actor) @if !e.owner.is_empty() && e.owner != e.actor { " " span.dim { "(" (e.owner) ")" } } }
                            td { code { (e.action) } }
                            td { (subject_link(&e.subject)) }
                            td { pre.details { (details_lines(&e.details)) } }
                        }
                    }
                }
            }
        }
        @if let Some(next) = next {
            p.pager { a href={ "/audit?" (query) (if query.is_empty() { "" } else { "&" }) "before=" (next) } { "Older events →" } }
        }
    };
    page("Audit log", Some(viewer), body)
}

/// A subject such as `release/12` links to its page.
fn subject_link(subject: &str) -> Markup {
    match subject.split_once('/') {
        Some(("release", id)) if id.bytes().all(|b| b.is_ascii_digit()) => {
            html! { a href={ "/releases/" (id) } { (subject) } }
        }
        Some(("artifact", digest)) if digest.parse::<Digest>().is_ok() => {
            html! { a href={ "/artifacts/" (digest) } { (subject) } }
        }
        _ => html! { (subject) },
    }
}
