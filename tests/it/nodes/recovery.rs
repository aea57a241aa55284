//! A server killed or blocked mid-deploy on local nodes: at restart it finishes the deploy or
//! puts every node back, and answers at once while it resolves it.

use std::fs;
use std::path::Path;

use serde_json::{Value, json};

use crate::support::archives::{RawTar, zstd};

use super::{Fleet, hold_node_lock};

/// Kills the server while release `id` is in `phase` on every node, starts it again, and
/// returns the release once final.
fn kill_during(fleet: &mut Fleet, id: i64, phase: &str) -> Value {
    reach_everywhere(fleet, id, phase);
    fleet.f.server.kill();
    fleet.f.server.restart();
    fleet.f.settle(id)
}

/// Two nodes (`extra`: their hooks) with v1 live and v2 uploaded: the fleet, v1, v2.
fn v1_live_and_v2_uploaded(extra: &str) -> (Fleet, String, String) {
    let fleet = Fleet::new(2, extra);
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    let v2 = fleet.upload("v2", &[]);
    (fleet, v1, v2)
}

/// Waits until release `id` has done `phase` on every node.
fn reach_everywhere(fleet: &Fleet, id: i64, phase: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let shown = fleet.f.get("carol", &format!("/v1/releases/{id}"));
        let done = shown["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["phase"] == phase && d["outcome"] == "ok")
            .count();
        if done == fleet.bases.len() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the deploy never reached {phase}: {shown}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_server_killed_after_the_switch_finishes_the_deploy_at_restart() {
    let (mut fleet, _v1, v2) = v1_live_and_v2_uploaded("hooks.reload = [\"sleep 2\"]");
    let id = fleet.ask(&v2);
    let settled = kill_during(&mut fleet, id, "switch");
    // Every node had switched: the restarted server reloads, verifies and records it live.
    assert_eq!(settled["state"], "live", "{settled}");
    fleet.assert_all_on(&v2);
}

#[test]
fn a_deploy_a_killed_server_left_switched_is_put_back_if_its_artifact_was_blocked_meanwhile() {
    let (mut fleet, v1, v2) = v1_live_and_v2_uploaded("hooks.reload = [\"sleep 2\"]");
    let id = fleet.ask(&v2);
    reach_everywhere(&fleet, id, "switch");
    fleet.f.server.kill();
    // While the server is down, v2 is blocked straight in its registry.
    let registry = release::registry::Registry::open(&fleet.f.server.data_dir().join("registry.db")).unwrap();
    let block = release::registry::Block {
        reason: "corrupts orders".into(),
        blocked_by: "root".into(),
        owner: "root".into(),
        blocked_at: release::utc::Timestamp::now(),
    };
    let event = release::audit::NewEvent::by_server(
        release::audit::AuditAction::ArtifactBlock,
        v2.clone(),
        json!({"reason": "corrupts orders"}),
    );
    let (_, cancelled) = registry.block_artifact(v2.parse().unwrap(), &block, &event).unwrap();
    assert!(cancelled.is_empty(), "a deploying release is not cancelled: {cancelled:?}");
    drop(registry);
    fleet.f.server.restart();
    // Every node had switched, but nothing recorded it live: it is put back, not finished.
    let settled = fleet.f.settle(id);
    assert_eq!(settled["state"], "failed", "{settled}");
    let reason = settled["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("stopped") && reason.contains("blocked by root (corrupts orders)"), "{reason}");
    fleet.assert_all_on(&v1);
}

#[test]
fn a_block_while_the_nodes_prepare_stops_the_deploy_before_anything_switches() {
    let waits = "hooks.finalize = [\"i=0; while [ -e $RELEASE_BASE/shared/hold ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\"]";
    let (fleet, v1, v2) = v1_live_and_v2_uploaded(waits);
    for base in &fleet.bases {
        fs::write(base.join("shared/hold"), "").unwrap();
    }
    let id = fleet.ask(&v2);
    // Both nodes are in prepare's finalize (the hook waits) when the block comes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !fleet.bases.iter().all(|b| b.join("releases").join(&v2[7..]).exists()) {
        assert!(std::time::Instant::now() < deadline, "v2 never reached the nodes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out =
        fleet.f.cli("root").args(["artifact", "block", &v2, "--reason", "corrupts orders", "--json"]).assert_success();
    assert_eq!(out.json()["cancelled"], json!([]), "a deploying release is left to its run");
    for base in &fleet.bases {
        fs::remove_file(base.join("shared/hold")).unwrap();
    }
    let settled = fleet.f.settle(id);
    assert_eq!(settled["state"], "failed", "{settled}");
    let reason = settled["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("blocked by root (corrupts orders)"), "{reason}");
    assert!(
        !fleet.phases(&settled).iter().any(|(_, phase, _)| phase.contains("switch")),
        "{:?}",
        fleet.phases(&settled)
    );
    fleet.assert_all_on(&v1);
}

#[test]
fn a_server_killed_before_the_switch_puts_the_release_back_at_restart() {
    let (mut fleet, v1, v2) = v1_live_and_v2_uploaded("hooks.finalize = [\"sleep 2\"]");
    let id = fleet.ask(&v2);
    // Wait until the deploy is under way (deploying), then kill the server mid-prepare.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fleet.f.get("carol", &format!("/v1/releases/{id}"))["state"] != "deploying" {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    fleet.f.server.kill();
    fleet.f.server.restart();
    let settled = fleet.f.settle(id);
    assert_eq!(settled["state"], "failed", "{settled}");
    assert!(settled["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().contains("stopped"));
    fleet.assert_all_on(&v1);
}

#[test]
fn a_server_killed_when_only_some_nodes_switched_puts_those_back_at_restart() {
    let mut fleet = Fleet::new(2, "hooks.finalize = [\"test ! -e $RELEASE_BASE/shared/slow || sleep 2\"]");
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    // Node 1 now prepares slowly; node 2 is prepared first, and then its base's lock is held
    // here, so node 1 switches while node 2 waits: the server is killed right then.
    fs::write(fleet.bases[0].join("shared/slow"), "").unwrap();
    let v2 = fleet.upload("v2", &[]);
    let id = fleet.ask(&v2);
    let node = |i: usize| format!("local:{}", fleet.bases[i].display());
    let reached = |fleet: &Fleet, node: &str, phase: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let shown = fleet.f.get("carol", &format!("/v1/releases/{id}"));
            if shown["deployments"].as_array().unwrap().iter().any(|d| d["node"] == node && d["phase"] == phase) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{node} never reached {phase}: {shown}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    reached(&fleet, &node(1), "prepare");
    let lock = hold_node_lock(&fleet.bases[1]);
    reached(&fleet, &node(0), "switch");
    fleet.f.server.kill();
    assert_eq!(fs::read_link(fleet.bases[0].join("current")).unwrap(), Path::new("releases").join(&v2[7..]));
    assert_eq!(fs::read_link(fleet.bases[1].join("current")).unwrap(), Path::new("releases").join(&v1[7..]));
    // The killed server's agent on node 2 is still waiting for the lock: let it give up
    // (10 s) before the lock goes, so the outcome is this one. (Released at once, the agent
    // may switch node 2 before the restarted server fences the node, which then finds every
    // node on v2 and finishes the deploy instead; after the fence it is refused. Either way
    // the registry and the nodes agree — see the fence test below.)
    std::thread::sleep(std::time::Duration::from_secs(11));
    drop(lock);
    fleet.f.server.restart();
    let settled = fleet.f.settle(id);
    assert_eq!(settled["state"], "failed", "{settled}");
    fleet.assert_all_on(&v1);
    let phases = fleet.phases(&settled);
    assert!(phases.iter().any(|(n, p, o)| n == &node(0) && p == "put back" && o == "ok"), "{phases:?}");
}

/// Issue 12 item 3: a restarted server listens and answers at once while it resolves a deploy
/// the stopped one left (its nodes slow to answer); the cell being recovered says so; other
/// cells work; once resolved, the cell takes requests again.
#[test]
fn a_restarted_server_answers_at_once_while_it_resolves_an_interrupted_deploy() {
    let extra = "hooks.reload = [\"test ! -e $RELEASE_BASE/shared/slow || sleep 6\"]\n\
                 [service.api]\nkind = \"generic\"\n\
                 [[service.api.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"@NODES@/api\"\n";
    let mut fleet = Fleet::new(1, extra);
    let v1 = fleet.upload("v1", &[]);
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    let v2 = fleet.upload("v2", &[]);
    fs::write(fleet.bases[0].join("shared/slow"), "").unwrap();
    let id = fleet.ask(&v2);
    // Killed after the switch, in the slow reload: the restart must ask the node and reload
    // it again, which takes seconds.
    reach_everywhere(&fleet, id, "switch");
    fleet.f.server.kill();
    let started = std::time::Instant::now();
    fleet.f.server.restart();
    let listening = started.elapsed();

    // At once: health, reads, and a refusal for the cell that names the recovery.
    let health = fleet.f.server.http().get(format!("{}/healthz", fleet.f.server.url)).send().unwrap();
    assert!(health.status().is_success());
    let shown = fleet.f.get("carol", &format!("/v1/releases/{id}"));
    assert_eq!(shown["state"], "deploying", "{shown}");
    let (status, refused) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v1}));
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "recovering", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains(&format!("release {id} (web in staging)")));
    let answered = started.elapsed();
    // Another cell is not held up by it.
    let upload = fleet
        .f
        .server
        .http()
        .post(format!("{}/v1/artifacts?service=api", fleet.f.server.url))
        .bearer_auth(fleet.f.token("ci"))
        .body(zstd(&RawTar::new().file("index.html", b"api").finish()))
        .send()
        .unwrap();
    let api = upload.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned();
    let (status, other) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "api", "environment": "staging", "digest": api}));
    assert!(status.is_success(), "{other}");
    assert_eq!(fleet.f.settle(other["id"].as_i64().unwrap())["state"], "live");
    let still = fleet.f.get("carol", &format!("/v1/releases/{id}"));
    eprintln!(
        "restart to listening {:.2} s, to the refusal answered {:.2} s; the interrupted deploy still {} then",
        listening.as_secs_f64(),
        answered.as_secs_f64(),
        still["state"]
    );

    // The recovery ends (the node was on v2: finished, live); the cell takes requests again.
    fs::remove_file(fleet.bases[0].join("shared/slow")).unwrap();
    let settled = fleet.f.settle(id);
    assert_eq!(settled["state"], "live", "{settled}");
    let resolved = started.elapsed();
    assert!(resolved > answered, "the recovery outlasted the first answers");
    eprintln!("resolved {:.2} s after the restart", resolved.as_secs_f64());
    assert_eq!(fleet.deploy(&v1)["state"], "live");
}
