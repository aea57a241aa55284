//! A deploy over SSH whose outcome the registry would not record, resolved from the nodes once
//! its lease lapsed: live, put back, or stranded when a node is unreachable.

use std::fs;
use std::path::Path;

use serde_json::{Value, json};

use crate::support::Backend;

use super::SshFleet;

/// A short deploy lease (the sweep runs every half of it), so that a test sees one lapse.
const SHORT_LEASE: (&str, &str) = ("RELEASE_TEST_DEPLOY_LEASE_MS", "1500");

/// Each reload leaves a line on the node.
const RELOAD_COUNTED: &str = "hooks.reload = [\"echo reloaded >> $RELEASE_BASE/reloads\"]";

/// A trigger in the registry that refuses to record any release as live, as a registry that
/// fails at the wrong moment would; `sqlite3` on the server's disk, beside the running server.
const REFUSE_LIVE: &str = "CREATE TRIGGER test_refuses_live BEFORE UPDATE OF state ON releases
    WHEN NEW.state = 'live' BEGIN SELECT RAISE(ABORT, 'the test refuses to record live'); END";

fn registry_sql(fleet: &SshFleet, sql: &str) {
    let conn = rusqlite::Connection::open(fleet.f.server.data_dir().join("registry.db")).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    conn.execute_batch(sql).unwrap();
}

/// Deploys `digest` to staging while the registry refuses `live`: the deploy succeeds on every
/// node, recording it fails (retried), and the run ends leaving it deploying. Returns its id
/// once the server gave up recording.
fn deploy_that_cannot_be_recorded(fleet: &SshFleet, digest: &str) -> Value {
    registry_sql(fleet, REFUSE_LIVE);
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": digest}));
    let id = release["id"].clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !fleet.f.server.log().contains("gave up recording the release's final state") {
        assert!(std::time::Instant::now() < deadline, "{}", fleet.f.server.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The registry does not say failed while the nodes serve it: it is still deploying.
    assert_eq!(fleet.release(&id)["state"], "deploying");
    for (_, base) in &fleet.bases {
        assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(&digest[7..]));
    }
    id
}

/// The audit events of release `id` with this action.
fn events_of(fleet: &SshFleet, id: &Value, action: &str) -> usize {
    let subject = format!("release/{id}");
    fleet.f.events(action).iter().filter(|e| e["subject"] == subject.as_str()).count()
}

#[test]
fn a_deploy_live_on_every_node_but_not_recorded_goes_live_once_its_lease_lapses() {
    let fleet = SshFleet::with(Backend::Local, &["staging", "staging"], RELOAD_COUNTED, &[SHORT_LEASE]);
    let v1 = fleet.upload("v1");
    fleet.live_in("staging", &v1);
    let v2 = fleet.upload("v2");
    let id = deploy_that_cannot_be_recorded(&fleet, &v2);

    // The registry can record again; the run is over, its lease lapses, the sweep asks the
    // nodes: every one serves v2, so it reloads and verifies them and records v2 live.
    registry_sql(&fleet, "DROP TRIGGER test_refuses_live");
    let settled = fleet.f.settle(id.as_i64().unwrap());
    assert_eq!(settled["state"], "live", "{settled}");
    fleet.assert_env_on("staging", &v2, "v2");
    assert!(fleet.f.server.log().contains("resolved a deploy from its nodes"), "{}", fleet.f.server.log());
    assert_eq!(events_of(&fleet, &id, "release.live"), 1);
    assert_eq!(events_of(&fleet, &id, "release.failed"), 0, "never recorded as failed");
    // The resolution reloaded every node again (it cannot know whether the run's reload came).
    let reloads = settled["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "reload").count();
    assert!(reloads >= 4, "the run's two reloads and the resolution's: {settled}");
    for (_, base) in &fleet.bases {
        assert!(fs::read_to_string(base.join("reloads")).unwrap().lines().count() >= 3, "v1, v2, v2 again");
    }
}

#[test]
fn a_deploy_not_recorded_whose_node_moved_elsewhere_is_put_back_and_failed_once_its_lease_lapses() {
    let fleet = SshFleet::with(Backend::Local, &["staging", "staging"], RELOAD_COUNTED, &[SHORT_LEASE]);
    let v1 = fleet.upload("v1");
    fleet.live_in("staging", &v1);
    let v2 = fleet.upload("v2");
    let id = deploy_that_cannot_be_recorded(&fleet, &v2);

    // Meanwhile someone points node 2 back at v1 by hand. The registry still refuses `live`,
    // which no longer matters: node 2 is not on v2, so the sweep puts node 1 back and fails it.
    let node2 = &fleet.bases[1].1;
    std::os::unix::fs::symlink(format!("releases/{}", &v1[7..]), node2.join("current.tmp")).unwrap();
    fs::rename(node2.join("current.tmp"), node2.join("current")).unwrap();
    let settled = fleet.f.settle(id.as_i64().unwrap());
    assert_eq!(settled["state"], "failed", "{settled}");
    let reason = settled["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.starts_with("the deploy's run ended without recording its outcome; "), "{reason}");
    assert!(reason.contains(&format!("serves {}, not {}", &v1[7..19], &v2[7..19])), "{reason}");
    assert!(reason.contains("the nodes were put back") && !reason.contains("not put back"), "{reason}");
    // Nodes and registry agree: v1 everywhere, v1 live.
    fleet.assert_env_on("staging", &v1, "v1");
    let phases = settled["deployments"].as_array().unwrap();
    assert!(phases.iter().any(|d| d["phase"] == "put back" && d["outcome"] == "ok"), "{settled}");
    assert_eq!(events_of(&fleet, &id, "release.failed"), 1);
    assert_eq!(events_of(&fleet, &id, "release.live"), 0);
    registry_sql(&fleet, "DROP TRIGGER test_refuses_live");
}

#[test]
fn a_node_unreachable_while_an_interrupted_deploy_is_resolved_is_stranded_and_the_client_exits_8() {
    let mut fleet = SshFleet::with(Backend::Local, &["staging", "staging"], RELOAD_COUNTED, &[SHORT_LEASE]);
    let v1 = fleet.upload("v1");
    fleet.live_in("staging", &v1);
    let v2 = fleet.upload("v2");
    // A client follows the deploy while the registry refuses to record it live: its run ends,
    // and once the lease lapses the sweep resolves it from the nodes. Node 2 is gone by then:
    // node 1 is put back, node 2 cannot be asked, so it gets no `put back` phase at all.
    registry_sql(&fleet, REFUSE_LIVE);
    let out = std::thread::scope(|scope| {
        let follower =
            scope.spawn(|| fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v2, "--wait"]).assert_exit(8));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !fleet.f.server.log().contains("gave up recording the release's final state") {
            assert!(std::time::Instant::now() < deadline, "{}", fleet.f.server.log());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        fleet.nodes[1].kill();
        follower.join().unwrap()
    });
    let node2 = format!("{}:{}", fleet.nodes[1].address, fleet.nodes[1].port);
    // SPEC 4's 8, not 7: the server says which nodes are stranded.
    assert!(out.stderr().contains("could not be put back on") && out.stderr().contains(&node2), "{out}");
    let settled = fleet.release(&json!(2));
    assert_eq!(settled["state"], "failed", "{settled}");
    assert_eq!(settled["stranded"], json!([node2]), "{settled}");
    let phases = settled["deployments"].as_array().unwrap();
    assert!(!phases.iter().any(|d| d["node"] == node2.as_str() && d["phase"] == "put back"), "{settled}");
    let cell = |fleet: &SshFleet| {
        let rows = fleet.f.get("carol", "/v1/status?service=web");
        rows.as_array().unwrap().iter().find(|c| c["environment"] == "staging").unwrap().clone()
    };
    assert_eq!(cell(&fleet)["stranded"][0]["node"], node2.as_str());

    // Node 2 is back (still on v2); the next deploy goes live on both and lifts the mark.
    fleet.nodes[1].start_again();
    registry_sql(&fleet, "DROP TRIGGER test_refuses_live");
    let v3 = fleet.upload("v3");
    fleet.live_in("staging", &v3);
    assert_eq!(cell(&fleet)["stranded"], json!([]));
    fleet.assert_env_on("staging", &v3, "v3");
}
