//! `release`: an artifact build-and-release server with immutable releases.
//!
//! Code map (see `ARCHITECTURE.md` for the invariants):
//!
//! - [`config`] — typed configuration: defaults, TOML file, `RELEASE_*` variables, flags.
//! - [`digest`] — the `sha256:<hex>` name of an artifact.
//! - [`archive`] — deterministic packing and the streaming safety check of `tar`+`zstd`.
//! - [`store`] — artifact bytes in a local directory or S3, behind typed keys.
//! - [`registry`] — the SQLite registry; the only code with SQL.
//! - [`token`] — roles, token secrets, authentication and permission rules.
//! - [`audit`] — the hash-chained audit log, its verification and bucket checkpoints.
//! - [`ingest`] — an upload from body stream to verified object and registry row.
//! - [`curation`] — blocking artifacts and purging the bytes of ones never live.
//! - [`releases`] — deploy, promote, approve, rollback: policies, state machine, the deploy seam.
//! - [`deploy`] — the node deployer behind the seam: phases across a fleet, transports.
//! - [`node`] — the node side (`release node`): prepare, switch, status, cleanup, hooks, health.
//! - [`metrics`] — Prometheus metrics: per-process counters and histograms, registry gauges.
//! - [`server`] — HTTP: routes, auth extractor, error mapping, thin handlers.
//! - [`webhooks`] — release events POSTed, signed, to configured receivers; an outbox over the audit log.
//! - [`client`] — the HTTP client of the command line.
//! - [`cli`] — the command line, one file per subcommand.
//! - [`utc`] — time stamps.

pub mod archive;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod curation;
pub mod deploy;
pub mod digest;
pub mod ingest;
pub mod metrics;
pub mod node;
pub mod registry;
pub mod releases;
pub mod server;
pub mod store;
pub mod token;
pub mod utc;
pub mod webhooks;
