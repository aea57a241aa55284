//! `release`: an artifact build-and-release server with immutable releases.
//!
//! Code map (see `ARCHITECTURE.md` for the invariants):
//!
//! - [`model`] — the shared nouns: releases and their states, audit events, roles and callers,
//!   webhook events; below everything but `digest` and `utc`.
//! - [`config`] — typed configuration: defaults, TOML file, `RELEASE_*` variables, flags.
//! - [`datadir`] — the data directory's lock: one process owns the registry.
//! - [`digest`] — the `sha256:<hex>` name of an artifact.
//! - [`archive`] — deterministic packing and the streaming safety check of `tar`+`zstd`.
//! - [`store`] — artifact bytes in a local directory or S3, behind typed keys.
//! - [`registry`] — the SQLite registry; the only code with SQL.
//! - [`token`] — roles, token secrets, authentication and permission rules.
//! - [`audit`] — the hash-chained audit log, its verification and bucket checkpoints.
//! - [`backup`] — registry snapshots in the object store, pruning, and restoring one.
//! - [`artifacts`] — artifacts as a token may read them: the scope rule, for API and pages.
//! - [`ingest`] — an upload from body stream to verified object and registry row.
//! - [`curation`] — blocking artifacts and purging the bytes of ones never live.
//! - [`releases`] — deploy, promote, approve, rollback: policies, state machine, the deploy seam.
//! - [`deploy`] — the node deployer behind the seam: phases across a fleet, transports.
//! - [`node`] — the node side (`release node`): prepare, switch, status, cleanup, hooks, health.
//! - [`refusals`] — refused requests in the audit log, bounded: cut, counted per source and window.
//! - [`metrics`] — Prometheus metrics: per-process counters and histograms, registry gauges.
//! - [`server`] — HTTP: routes, auth extractor, error mapping, thin handlers.
//! - [`webhooks`] — release events POSTed, signed, to configured receivers; an outbox over the audit log.
//! - [`client`] — the HTTP client of the command line.
//! - [`cli`] — the command line, one file per subcommand.
//! - [`utc`] — time stamps.

pub mod archive;
pub mod artifacts;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod client;
pub mod config;
pub mod curation;
pub mod datadir;
pub mod deploy;
pub mod digest;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod node;
pub mod refusals;
pub mod registry;
pub mod releases;
pub mod server;
pub mod store;
pub mod token;
pub mod utc;
pub mod webhooks;

/// An error and its causes, each once (a cause whose text the error already shows is left
/// out): what the command line prints and what a webhook attempt records.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether `text` says nothing a person could read: empty, or only whitespace, control
/// characters and byte-order marks. A reason (a rejection, a block) must say something; the
/// OpenAPI document states the same rule as a pattern.
pub fn is_blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || c.is_control() || c == '\u{feff}')
}

/// Test hook: with `RELEASE_TEST_CRASH_AT=<point>` in its environment, the process dies on
/// the spot when it reaches that point (`abort`: no destructor runs, nothing is flushed or
/// cleaned up, as after a SIGKILL), so that an integration test reproduces a crash at one
/// exact moment. Points: `upload-begun` (a staging upload begun, a body part written),
/// `upload-published` (verified bytes under their artifact key, no registry row yet),
/// `purge-recorded` (a purge recorded, its bytes not deleted yet). Never for production.
pub fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var("RELEASE_TEST_CRASH_AT").ok()).as_deref() == Some(point) {
        eprintln!("RELEASE_TEST_CRASH_AT={point}: the process dies here (a test's crash)");
        std::process::abort();
    }
}

/// Test hook: with `RELEASE_TEST_STALL_AT=<point>:<ms>`, waits that long at that point (a
/// [`crash_point`]'s name), so that an integration test can act inside a window that is
/// otherwise a few microseconds wide. Never for production.
pub async fn stall_point(point: &str) {
    static AT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| {
        let text = std::env::var("RELEASE_TEST_STALL_AT").ok()?;
        let (name, ms) = text.rsplit_once(':')?;
        Some((name.to_owned(), ms.parse().ok()?))
    });
    if let Some((name, ms)) = at
        && name == point
    {
        tracing::warn!(point, ms, "RELEASE_TEST_STALL_AT: waiting here (a test's stall)");
        tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reason_must_have_a_visible_character() {
        for blank in ["", " ", "\t\n", "\u{85}", "\u{a0}\u{3000}", "\u{feff}", "\u{1f}\u{7f}"] {
            assert!(super::is_blank(blank), "{blank:?}");
        }
        for reason in ["x", " data loss ", "\u{feff}é"] {
            assert!(!super::is_blank(reason), "{reason:?}");
        }
    }
}
