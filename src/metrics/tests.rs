//! What a scrape shows for what was recorded, and that the README and the Grafana dashboard
//! name only metrics the server exposes (so neither drifts from the code).

use std::collections::BTreeSet;

use super::*;
use crate::digest::Digest;
use crate::model::release::{Kind, Phase, PhaseOutcome, State};
use crate::registry::Cell;
use crate::utc::Timestamp;

fn ts(text: &str) -> Timestamp {
    Timestamp::parse(text).unwrap()
}

fn release(state: State, changed_at: &str) -> Release {
    Release {
        id: 1,
        service: "api".into(),
        environment: "staging".into(),
        digest: Digest::of(b"x"),
        kind: Kind::Deploy,
        state,
        requested_by: "ci".into(),
        requester_owner: "gitlab".into(),
        requested_at: ts("2026-11-27T10:00:00.000000Z"),
        source_environment: None,
        replaces: None,
        expires_at: None,
        state_changed_at: ts(changed_at),
    }
}

fn gauges() -> Gauges {
    Gauges {
        artifacts: 2,
        artifact_bytes: 1234,
        cells: vec![Cell {
            service: "api".into(),
            environment: "staging".into(),
            in_flight: 1,
            pending_approval: 3,
            stranded_nodes: 2,
        }],
    }
}

/// Metrics with one of everything recorded, so that every family shows in a scrape (an empty
/// family shows nothing, not even its `# TYPE`).
fn everything() -> String {
    let metrics = Metrics::new();
    metrics.start_at_zero(&["api".into()], &["staging".into()]);
    metrics.record_phase(&Deployment {
        node: "web1".into(),
        phase: Phase::Prepare,
        started_at: ts("2026-11-27T10:00:00.000000Z"),
        finished_at: ts("2026-11-27T10:00:01.000000Z"),
        outcome: PhaseOutcome::Ok,
        output_tail: None,
        shared_files: vec![],
    });
    metrics.record_refusal(403, "forbidden");
    metrics.encode(&gauges())
}

/// The names of the samples a scrape can hold: each family's `# TYPE` name, and for
/// histograms its `_bucket`, `_sum` and `_count` series.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = line.split_once(' ').unwrap();
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.to_owned());
    }
    names
}

/// Every `release_…` name in a PromQL expression or a piece of text.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("release_") {
        let before = rest[..at].chars().next_back();
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    names
}

#[test]
fn a_scrape_shows_what_was_recorded() {
    let metrics = Metrics::new();
    let live = release(State::Live, "2026-11-27T10:00:42.500000Z");
    metrics.record_release(&live, Some(&ts("2026-11-27T10:00:00.000000Z")));
    metrics.record_release(&release(State::Rejected, "2026-11-27T10:00:01.000000Z"), None);
    metrics.record_phase(&Deployment {
        node: "web1".into(),
        phase: Phase::PutBack,
        started_at: ts("2026-11-27T10:00:00.000000Z"),
        finished_at: ts("2026-11-27T10:00:00.200000Z"),
        outcome: PhaseOutcome::Ok,
        output_tail: None,
        shared_files: vec![],
    });
    metrics.start_at_zero(&["api".into()], &[]);
    metrics.record_upload(Some("api"), UploadOutcome::Stored);
    metrics.record_upload(Some("made-up"), UploadOutcome::Stored);
    metrics.record_upload(None, UploadOutcome::Refused);
    metrics.record_refusal(401, "unauthenticated");
    let text = metrics.encode(&gauges());

    for line in [
        format!("release_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        r#"release_releases_total{service="api",environment="staging",kind="deploy",outcome="live"} 1"#.into(),
        r#"release_releases_total{service="api",environment="staging",kind="deploy",outcome="rejected"} 1"#.into(),
        r#"release_deploy_duration_seconds_count{service="api",environment="staging",outcome="live"} 1"#.into(),
        r#"release_deploy_duration_seconds_sum{service="api",environment="staging",outcome="live"} 42.5"#.into(),
        r#"release_deploy_duration_seconds_bucket{service="api",environment="staging",outcome="live",le="60"} 1"#
            .into(),
        r#"release_deploy_duration_seconds_bucket{service="api",environment="staging",outcome="live",le="30"} 0"#
            .into(),
        r#"release_phase_duration_seconds_count{phase="put back",outcome="ok"} 1"#.into(),
        r#"release_uploads_total{service="api",outcome="stored"} 1"#.into(),
        r#"release_uploads_total{service="other",outcome="stored"} 1"#.into(),
        r#"release_uploads_total{service="",outcome="refused"} 1"#.into(),
        r#"release_refused_requests_total{status="401",code="unauthenticated"} 1"#.into(),
        "release_artifacts_stored 2".into(),
        "release_artifacts_stored_bytes 1234".into(),
        r#"release_releases_in_flight{service="api",environment="staging"} 1"#.into(),
        r#"release_releases_pending_approval{service="api",environment="staging"} 3"#.into(),
        r#"release_nodes_stranded{service="api",environment="staging"} 2"#.into(),
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    }
    // Only the deploy that ran is timed; a rejected release never deployed.
    assert!(
        !text.contains(
            r#"release_deploy_duration_seconds_count{service="api",environment="staging",outcome="rejected""#
        )
    );

    // Series the configuration knows start at zero.
    metrics.start_at_zero(&["web".into()], &["production".into()]);
    let text = metrics.encode(&gauges());
    for line in [
        r#"release_releases_total{service="web",environment="production",kind="rollback",outcome="expired"} 0"#,
        r#"release_deploy_duration_seconds_count{service="web",environment="production",outcome="failed"} 0"#,
        r#"release_uploads_total{service="web",outcome="refused"} 0"#,
        r#"release_refused_requests_total{status="403",code="forbidden"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    }
    assert!(
        text.contains(r#"release_releases_total{service="api",environment="staging",kind="deploy",outcome="live"} 1"#)
    );

    // A cell that left the configuration leaves the gauges too.
    let text = metrics.encode(&Gauges { cells: vec![], ..gauges() });
    assert!(!text.contains("release_releases_in_flight{"), "{text}");
}

#[test]
fn families_is_what_a_scrape_exposes() {
    let text = everything();
    let families: BTreeSet<String> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap().into()).collect();
    let listed: BTreeSet<String> = FAMILIES.iter().map(|s| s.to_string()).collect();
    assert_eq!(families, listed);
}

#[test]
fn the_readme_lists_every_metric_and_no_other() {
    let readme = include_str!("../../README.md");
    let section = readme.split("\n## Metrics\n").nth(1).expect("README.md has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let exposed = exposed(&everything());
    for name in metric_names(section) {
        assert!(exposed.contains(&name), "README's Metrics section names {name}, which the server does not expose");
    }
    for family in FAMILIES {
        assert!(section.contains(&format!("`{family}")), "README's Metrics section does not list {family}");
    }
}

/// The example dashboard imports into Grafana (a `DS_PROMETHEUS` input that every panel and
/// query uses) and queries only metrics the server exposes.
#[test]
fn the_grafana_dashboard_uses_only_exposed_metrics() {
    let text = include_str!("../../systemd/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(text).expect("the dashboard is JSON");
    let inputs = dashboard["__inputs"].as_array().expect("__inputs for import");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["type"] == "datasource" && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS datasource input: {inputs:?}"
    );
    assert!(dashboard["title"].is_string() && dashboard["schemaVersion"].is_u64() && dashboard["uid"].is_string());
    let exposed = exposed(&everything());

    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for panel in panels.iter().chain(panels.iter().flat_map(|p| p["panels"].as_array().into_iter().flatten())) {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(ids.insert(panel["id"].as_u64().expect("every panel has an id")), "{title}: id used twice");
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}: datasource");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}: a query's datasource");
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{title}: a query without expr"));
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr} uses no release_ metric");
            for name in names {
                assert!(exposed.contains(&name), "{title}: {expr} uses {name}, which the server does not expose");
                used.insert(name);
            }
        }
    }
    for wanted in [
        "release_releases_total",
        "release_deploy_duration_seconds_bucket",
        "release_phase_duration_seconds_bucket",
        "release_refused_requests_total",
        "release_artifacts_stored_bytes",
        "release_uploads_total",
    ] {
        assert!(used.contains(wanted), "the dashboard has no panel on {wanted}");
    }
}

#[test]
fn durations_come_from_the_time_stamps() {
    assert_eq!(seconds_between("2026-11-27T10:00:00.000000Z", "2026-11-27T10:01:00.250000Z"), Some(60.25));
    assert_eq!(seconds_between("2026-11-27T10:00:01.000000Z", "2026-11-27T10:00:00.000000Z"), Some(0.0));
    assert_eq!(seconds_between("yesterday", "2026-11-27T10:00:00.000000Z"), None);
}

#[test]
fn invented_services_add_no_upload_series() {
    let metrics = Metrics::new();
    metrics.start_at_zero(&["api".into()], &["staging".into()]);
    let series = |text: &str| text.lines().filter(|l| l.starts_with("release_uploads_total{")).count();
    let before = series(&metrics.encode(&gauges()));
    for i in 0..100 {
        let name = format!("invented-{i}");
        for outcome in [UploadOutcome::Stored, UploadOutcome::Repeat, UploadOutcome::Refused, UploadOutcome::Failed] {
            metrics.record_upload(Some(&name), outcome);
        }
        metrics.record_upload(None, UploadOutcome::Refused);
    }
    let text = metrics.encode(&gauges());
    assert_eq!(series(&text), before, "{text}");
    assert!(text.contains(r#"release_uploads_total{service="other",outcome="stored"} 100"#), "{text}");
    assert!(text.contains(r#"release_uploads_total{service="",outcome="refused"} 100"#), "{text}");
}
