//! Prometheus metrics: what this server process counts as it runs, and the registry's gauges
//! read at each scrape, in the Prometheus text format (0.0.4) for `GET /metrics`.
//!
//! Counters and histograms live in this process only: they start at zero when the server
//! starts and are never seeded from the registry's history (Prometheus's `rate` and `increase`
//! expect exactly that, and take a restart as a counter reset). Gauges that describe the
//! registry (artifacts stored, releases waiting or in flight) are read from it at scrape time,
//! so they are true whatever happened before the start.
//!
//! One [`Metrics`] is made at start and shared through the server's state; the domain modules
//! that see things happen (ingest, releases, the refusal middleware) call its `record_*`
//! methods. Nothing here is global.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;

use crate::model::access::{Action, Denied, Principal};
use crate::model::release::{Deployment, Kind, Release, State};
use crate::registry::{Gauges, Registry, RegistryError};
use crate::utc::{self, Timestamp};

/// The `Content-Type` of what [`Metrics::scrape`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every metric family this server exposes, as scraped (counters with `_total`; histograms
/// add `_bucket`, `_sum` and `_count`). The README lists the same; a test holds both, and the
/// Grafana dashboard uses no other.
pub const FAMILIES: &[&str] = &[
    "release_build_info",
    "release_releases_total",
    "release_deploy_duration_seconds",
    "release_phase_duration_seconds",
    "release_uploads_total",
    "release_refused_requests_total",
    "release_artifacts_stored",
    "release_artifacts_stored_bytes",
    "release_releases_in_flight",
    "release_releases_pending_approval",
    "release_nodes_stranded",
    "release_backup_last_success_timestamp_seconds",
    "release_backup_failures_total",
];

/// The outcomes `release_releases_total` counts (`superseded` comes later, to a release that
/// was counted as `live`).
const FINAL_STATES: [State; 5] = [State::Live, State::Failed, State::Rejected, State::Cancelled, State::Expired];

/// A deploy takes seconds to many minutes.
const DEPLOY_BUCKETS: [f64; 12] = [1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0];
/// A node's phase takes milliseconds (a switch) to minutes (a large unpack, a migration).
const PHASE_BUCKETS: [f64; 14] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Forbidden(#[from] Denied),
    #[error(
        "token {name:?} is limited to some services or environments, and the metrics cover all of them: scrape with a token without --services/--envs"
    )]
    Scoped { name: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabels {
    service: String,
    environment: String,
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeployLabels {
    service: String,
    environment: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UploadLabels {
    service: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    status: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CellLabels {
    service: String,
    environment: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// How an upload ended, for `release_uploads_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadOutcome {
    /// Bytes stored now (`201`).
    Stored,
    /// Bytes stored before, for this service or another (`200`).
    Repeat,
    /// Refused: the request, the token or the archive was wrong (4xx).
    Refused,
    /// The store or the registry failed (5xx).
    Failed,
}

impl UploadOutcome {
    fn as_str(self) -> &'static str {
        match self {
            UploadOutcome::Stored => "stored",
            UploadOutcome::Repeat => "repeat",
            UploadOutcome::Refused => "refused",
            UploadOutcome::Failed => "failed",
        }
    }
}

/// The server's metrics. Shared as `Arc<Metrics>`; recording is lock-free (atomics), a scrape
/// takes a lock of its own.
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
    releases: Family<ReleaseLabels, Counter>,
    deploy_duration: Histograms<DeployLabels>,
    phase_duration: Histograms<PhaseLabels>,
    uploads: Family<UploadLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    artifacts: Gauge,
    artifact_bytes: Gauge,
    in_flight: Family<CellLabels, Gauge>,
    pending: Family<CellLabels, Gauge>,
    stranded: Family<CellLabels, Gauge>,
    backup_last_success: Gauge,
    backup_failures: Counter,
    /// The configured services: the only ones that label uploads (others count as
    /// [`OTHER_SERVICE`]), so that the series stay as many as the configuration makes.
    services: RwLock<BTreeSet<String>>,
    /// One scrape at a time: the gauges are set from a registry read, then encoded.
    scraping: Mutex<()>,
}

/// The `service` of uploads for a service that is not configured.
pub const OTHER_SERVICE: &str = "other";
/// The `service` of uploads refused before the token was found allowed to upload for the
/// service it named: none (Prometheus reads an empty label as no label).
const NO_SERVICE: &str = "";

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: prometheus_client::registry::Registry::with_prefix("release"),
            releases: Family::default(),
            deploy_duration: Family::new_with_constructor(|| Histogram::new(DEPLOY_BUCKETS)),
            phase_duration: Family::new_with_constructor(|| Histogram::new(PHASE_BUCKETS)),
            uploads: Family::default(),
            refused: Family::default(),
            artifacts: Gauge::default(),
            artifact_bytes: Gauge::default(),
            in_flight: Family::default(),
            pending: Family::default(),
            stranded: Family::default(),
            backup_last_success: Gauge::default(),
            backup_failures: Counter::default(),
            services: RwLock::default(),
            scraping: Mutex::new(()),
        };
        // Families are handles to shared values: the registry holds clones, for encoding.
        let mut registry = metrics.registry;
        let build = Info::new(vec![("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())]);
        registry.register("build", "The running release binary", build);
        registry.register(
            "releases",
            "Releases that reached a final state since this process started, by outcome \
             (live, failed, rejected, cancelled, expired)",
            metrics.releases.clone(),
        );
        registry.register(
            "deploy_duration_seconds",
            "From deploying to live or failed",
            metrics.deploy_duration.clone(),
        );
        registry.register(
            "phase_duration_seconds",
            "One node's phase of a deploy (prepare, migrate, switch, reload, verify, cleanup, put back, ...)",
            metrics.phase_duration.clone(),
        );
        registry.register(
            "uploads",
            "Artifact uploads since this process started, by configured service (others: other; none when \
             refused before the token was found allowed to upload) and outcome (stored, repeat, refused, failed)",
            metrics.uploads.clone(),
        );
        registry.register(
            "refused_requests",
            "Requests refused with 401, 403, 408, 409, 413, 422 or 429 since this process started, every one (the \
             audit log has each, or counts it in a request.refused.aggregate event)",
            metrics.refused.clone(),
        );
        registry.register(
            "artifacts_stored",
            "Artifacts whose bytes are stored (not purged, or uploaded again since), read from the registry at scrape time",
            metrics.artifacts.clone(),
        );
        registry.register(
            "artifacts_stored_bytes",
            "The sum of the sizes of the artifacts whose bytes are stored, read from the registry at scrape time",
            metrics.artifact_bytes.clone(),
        );
        registry.register(
            "releases_in_flight",
            "Releases approved or deploying, per service and environment, read from the registry at scrape time",
            metrics.in_flight.clone(),
        );
        registry.register(
            "releases_pending_approval",
            "Releases waiting for approval, per service and environment, read from the registry at scrape time",
            metrics.pending.clone(),
        );
        registry.register(
            "nodes_stranded",
            "Nodes a failed deploy could not put back, per service and environment, until a deploy goes live on \
             them or `status --nodes` finds them serving the live release; read from the registry at scrape time",
            metrics.stranded.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When this process last backed up the registry to the object store (Unix time; 0: not since it started)",
            metrics.backup_last_success.clone(),
        );
        registry.register(
            "backup_failures",
            "Scheduled registry backups that failed since this process started",
            metrics.backup_failures.clone(),
        );
        Metrics { registry, ..metrics }
    }

    /// Takes note of the configured services (only they label uploads) and creates, at zero,
    /// every series whose labels are known before anything happens: releases and deploy
    /// durations per (service, environment), uploads per service (and `other`, and refused
    /// without a service), and the refusals any server sees (401 `unauthenticated`, 403
    /// `forbidden`). Prometheus's `increase()` cannot see the first increment of a series that
    /// appears with it, so a first failure after a start would go unseen otherwise. Other
    /// series (phases, other refusal codes) appear at their first event.
    pub fn start_at_zero(&self, services: &[String], environments: &[String]) {
        self.services.write().expect("services lock").extend(services.iter().cloned());
        for (status, code) in [(401, "unauthenticated"), (403, "forbidden")] {
            self.refused.get_or_create_owned(&RefusedLabels { status: status.to_string(), code: code.into() });
        }
        self.uploads.get_or_create_owned(&UploadLabels {
            service: NO_SERVICE.into(),
            outcome: UploadOutcome::Refused.as_str().into(),
        });
        let outcomes = [UploadOutcome::Stored, UploadOutcome::Repeat, UploadOutcome::Refused, UploadOutcome::Failed];
        for outcome in outcomes {
            self.uploads
                .get_or_create_owned(&UploadLabels { service: OTHER_SERVICE.into(), outcome: outcome.as_str().into() });
        }
        for service in services {
            for outcome in outcomes {
                self.uploads
                    .get_or_create_owned(&UploadLabels { service: service.clone(), outcome: outcome.as_str().into() });
            }
            for environment in environments {
                for kind in [Kind::Deploy, Kind::Promote, Kind::Rollback] {
                    for outcome in FINAL_STATES {
                        self.releases.get_or_create_owned(&ReleaseLabels {
                            service: service.clone(),
                            environment: environment.clone(),
                            kind: kind.as_str().into(),
                            outcome: outcome.as_str().into(),
                        });
                    }
                }
                for outcome in [State::Live, State::Failed] {
                    self.deploy_duration.get_or_create_owned(&DeployLabels {
                        service: service.clone(),
                        environment: environment.clone(),
                        outcome: outcome.as_str().into(),
                    });
                }
            }
        }
    }

    /// A release reached a final state (live, failed, rejected, cancelled, expired).
    /// `deploying_since`: when its deploy began, for a deploy that ended live or failed.
    pub fn record_release(&self, release: &Release, deploying_since: Option<&Timestamp>) {
        let outcome = release.state.as_str().to_owned();
        self.releases
            .get_or_create(&ReleaseLabels {
                service: release.service.clone(),
                environment: release.environment.clone(),
                kind: release.kind.as_str().to_owned(),
                outcome: outcome.clone(),
            })
            .inc();
        if let Some(seconds) = deploying_since.and_then(|since| seconds_between(since, &release.state_changed_at)) {
            let labels =
                DeployLabels { service: release.service.clone(), environment: release.environment.clone(), outcome };
            self.deploy_duration.get_or_create(&labels).observe(seconds);
        }
    }

    /// One node's phase ended.
    pub fn record_phase(&self, deployment: &Deployment) {
        if let Some(seconds) = seconds_between(&deployment.started_at, &deployment.finished_at) {
            let labels = PhaseLabels { phase: deployment.phase.to_string(), outcome: deployment.outcome.to_string() };
            self.phase_duration.get_or_create(&labels).observe(seconds);
        }
    }

    /// An upload ended. `service`: what the request named, once the token was found allowed
    /// to upload for it (`None`: refused before that). Only a configured service labels it:
    /// any other counts as `other`, so no token can add series by naming services.
    pub fn record_upload(&self, service: Option<&str>, outcome: UploadOutcome) {
        let service = match service {
            None => NO_SERVICE,
            Some(s) if self.services.read().expect("services lock").contains(s) => s,
            Some(_) => OTHER_SERVICE,
        };
        let labels = UploadLabels { service: service.to_owned(), outcome: outcome.as_str().to_owned() };
        self.uploads.get_or_create(&labels).inc();
    }

    /// A request was refused with `status` and error `code`.
    pub fn record_refusal(&self, status: u16, code: &str) {
        let labels = RefusedLabels { status: status.to_string(), code: code.to_owned() };
        self.refused.get_or_create(&labels).inc();
    }

    /// Every metric as Prometheus text, for a token with any role and no scope (the metrics
    /// name every service and environment).
    pub async fn scrape(&self, principal: &Principal, registry: &Arc<Registry>) -> Result<String, MetricsError> {
        principal.require(Action::Read)?;
        if principal.services.is_some() || principal.environments.is_some() {
            return Err(MetricsError::Scoped { name: principal.name.clone() });
        }
        let registry = Arc::clone(registry);
        let gauges = crate::registry::run(move || registry.gauges()).await?;
        Ok(self.encode(&gauges))
    }

    /// A registry backup was written (at `unix_seconds`).
    pub fn record_backup(&self, unix_seconds: i64) {
        self.backup_last_success.set(unix_seconds);
    }

    /// A scheduled registry backup failed.
    pub fn record_backup_failure(&self) {
        self.backup_failures.inc();
    }

    /// Sets the gauges to `gauges` and encodes everything.
    pub fn encode(&self, gauges: &Gauges) -> String {
        let _one_at_a_time = self.scraping.lock().expect("scrape lock");
        self.artifacts.set(i64::try_from(gauges.artifacts).unwrap_or(i64::MAX));
        self.artifact_bytes.set(i64::try_from(gauges.artifact_bytes).unwrap_or(i64::MAX));
        // Cells no longer active disappear rather than stay at their last value.
        self.in_flight.clear();
        self.pending.clear();
        self.stranded.clear();
        for cell in &gauges.cells {
            let labels = CellLabels { service: cell.service.clone(), environment: cell.environment.clone() };
            self.in_flight.get_or_create(&labels).set(i64::try_from(cell.in_flight).unwrap_or(i64::MAX));
            self.pending.get_or_create(&labels).set(i64::try_from(cell.pending_approval).unwrap_or(i64::MAX));
            self.stranded.get_or_create(&labels).set(i64::try_from(cell.stranded_nodes).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String does not fail");
        text
    }
}

/// Seconds from one time stamp to another (`None` if either does not parse).
fn seconds_between(from: impl AsRef<str>, to: impl AsRef<str>) -> Option<f64> {
    let (from, to) = (utc::parse(from.as_ref()).ok()?, utc::parse(to.as_ref()).ok()?);
    Some((to - from).as_seconds_f64().max(0.0))
}

#[cfg(test)]
mod tests;
