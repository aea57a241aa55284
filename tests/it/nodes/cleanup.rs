//! Retention and clean-up on local nodes, and the node's lock and run fence: what is kept, what
//! goes to trash, what a process still works in, and a refused older run.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{Value, json};

use super::{Fleet, HealthServer, free_port, hold_node_lock, release_dirs};

#[test]
fn retention_keeps_the_newest_successful_releases_and_never_counts_failed_ones() {
    let fleet = Fleet::new(2, "");
    let mut live = Vec::new();
    for i in 1..=5 {
        let digest = fleet.upload(&format!("v{i}"), &[]);
        assert_eq!(fleet.deploy(&digest)["state"], "live");
        live.push(digest);
        if i == 3 {
            // A release that fails in prepare on node 1: its directory never counts.
            fs::write(fleet.bases[0].join("shared/config.txt"), "").unwrap();
            let failing = fleet.upload("failing", &[]);
            fs::remove_file(fleet.bases[0].join("shared/config.txt")).unwrap();
            assert_eq!(fleet.deploy(&failing)["state"], "failed");
            fs::write(fleet.bases[0].join("shared/config.txt"), "config of").unwrap();
        }
    }
    // keep = 3: the live one and the two before it, on every node.
    let mut expected: Vec<String> = live[2..].iter().map(|d| d[7..].to_owned()).collect();
    expected.sort();
    for base in &fleet.bases {
        assert_eq!(release_dirs(base), expected, "{}", base.display());
    }
    fleet.assert_all_on(&live[4]);
}

#[test]
fn cleanup_follows_live_and_a_newer_runs_fence_refuses_an_older_one() {
    // The health check waits while <base>/shared/starting exists (503): the test takes the
    // node's lock meanwhile (hooks take it; the health check does not).
    let port = free_port();
    let health =
        format!("health = {{ url = \"http://127.0.0.1:{port}/\", expect = \"{{digest}}\", timeout = \"30s\" }}");
    let fleet = Fleet::new(1, &health);
    let base = fleet.bases[0].clone();
    let _app = HealthServer::start(port, &base);
    let digests: Vec<String> = (1..=3).map(|i| fleet.upload(&format!("v{i}"), &[])).collect();
    for digest in &digests {
        assert_eq!(fleet.deploy(digest)["state"], "live");
    }
    // keep = 3: v4 going live would leave v1 out.
    let v4 = fleet.upload("v4", &[]);
    fs::write(base.join("shared/starting"), "").unwrap();
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v4}));
    let id = release["id"].as_i64().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !fleet.phases(&release).iter().any(|(_, p, o)| p == "switch" && o == "ok") {
        assert!(std::time::Instant::now() < deadline, "v4 never switched");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Switched, and verifying (held): the node's lock is taken here before the check may
    // pass. Verify needs no lock; the clean-up does.
    while !fleet.phases(&release).iter().any(|(_, p, _)| p == "reload") {
        assert!(std::time::Instant::now() < deadline, "v4 never reloaded");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let lock = hold_node_lock(&base);
    fs::remove_file(base.join("shared/starting")).unwrap();
    let live = fleet.f.settle(id);
    assert_eq!(live["state"], "live", "live is recorded without waiting for the clean-up: {live}");
    assert!(!fleet.phases(&live).iter().any(|(_, p, _)| p == "cleanup"), "{live}");
    assert!(base.join("releases").join(&digests[0][7..]).exists());
    // Meanwhile a newer run takes the node: its fence, written under the lock as the agent
    // writes it (the next deploy's prepare would, first thing).
    let newer = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    fs::write(base.join(".release/fence"), newer.to_string()).unwrap();
    drop(lock);
    // v4's clean-up carries v4's own (older) fence: refused, reported, nothing removed, and
    // v4 stays live.
    let cleaned = fleet.cleaned(&live["id"]);
    let cleanup = cleaned["deployments"].as_array().unwrap().iter().find(|d| d["phase"] == "cleanup").unwrap();
    assert_eq!(cleanup["outcome"], "failed", "{cleaned}");
    assert!(cleanup["output_tail"].as_str().unwrap().contains("a newer deploy run"), "{cleanup}");
    assert_eq!(cleaned["state"], "live");
    let mut all: Vec<String> = digests.iter().chain([&v4]).map(|d| d[7..].to_owned()).collect();
    all.sort();
    assert_eq!(release_dirs(&base), all, "the refused clean-up removed nothing");
    fleet.assert_all_on(&v4);
    // The next deploy (a newer fence still) cleans up after itself: v3, v4, v5 stay.
    let v5 = fleet.upload("v5", &[]);
    let next = fleet.deploy(&v5);
    assert!(fleet.phases(&next).iter().any(|(_, p, o)| p == "cleanup" && o == "ok"), "{next}");
    let mut kept: Vec<String> = [&digests[2], &v4, &v5].iter().map(|d| d[7..].to_owned()).collect();
    kept.sort();
    assert_eq!(release_dirs(&base), kept);
}

#[test]
fn cleanup_moves_releases_to_trash_and_clears_what_a_dead_clean_up_left() {
    let fleet = Fleet::new(1, "");
    let base = fleet.bases[0].clone();
    let v1 = fleet.upload("v1", &[]);
    let v2 = fleet.upload("v2", &[]);
    fleet.deploy(&v1);
    fleet.deploy(&v2);
    // Trash of a clean-up that died while deleting (a read-only tree, as releases are), and
    // trash of one still running (this process stands in for it).
    let dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let left = base.join(format!(".release/trash/{dead_pid}-1/{}", &v1[7..]));
    fs::create_dir_all(left.join("public")).unwrap();
    fs::write(left.join("public/index.html"), "hi").unwrap();
    fs::set_permissions(left.join("public"), fs::Permissions::from_mode(0o555)).unwrap();
    let running = base.join(format!(".release/trash/{}-1", std::process::id()));
    fs::create_dir_all(&running).unwrap();

    let fence = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    let answer = agent(json!({"op": "cleanup", "base": base, "keep": [], "fence": fence}));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["removed"], json!([&v1[7..]]), "{answer}");
    assert_eq!(release_dirs(&base), vec![v2[7..].to_owned()], "the current release stays");
    assert!(!base.join(".release/ready").join(&v1[7..]).exists());
    let trash: Vec<String> = fs::read_dir(base.join(".release/trash"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(trash, vec![format!("{}-1", std::process::id())], "only the live clean-up's trash is left");
    fs::remove_dir_all(running).unwrap();
}

/// Runs the node agent (`release node`) with one request; its answer.
fn agent(request: Value) -> Value {
    use std::io::Write;
    let mut child = std::process::Command::new(crate::support::bin())
        .arg("node")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{request}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_node_refuses_changes_from_a_deploy_run_older_than_the_newest_it_saw() {
    let fleet = Fleet::new(1, "");
    let v1 = fleet.upload("v1", &[]);
    let v2 = fleet.upload("v2", &[]);
    fleet.deploy(&v1);
    fleet.deploy(&v2);
    let base = &fleet.bases[0];
    // A restarted server took the node with a newer fence...
    let taken = agent(json!({"op": "fence", "base": base, "fence": 2_000_000_000_000_000u64}));
    assert_eq!(taken["ok"], true, "{taken}");
    // ...so the stopped server's agent, still holding an older one, changes nothing.
    let stale = agent(json!({"op": "switch", "base": base, "digest": v1, "fence": 1_000_000_000_000_000u64}));
    assert_eq!(stale["code"], "fenced", "{stale}");
    assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(&v2[7..]));
    let stale = agent(json!({"op": "cleanup", "base": base, "keep": [], "fence": 1_000_000_000_000_000u64}));
    assert_eq!(stale["code"], "fenced", "{stale}");
    assert!(base.join("releases").join(&v1[7..]).exists());
    // The newer run itself goes on.
    let newer = agent(json!({"op": "switch", "base": base, "digest": v1, "fence": 2_000_000_000_000_000u64}));
    assert_eq!(newer["ok"], true, "{newer}");
    assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(&v1[7..]));
}

/// Runs `release node` with one request, as user and group `id` (`None`: this test's user,
/// root).
fn node_agent(request: &Value, id: Option<u32>) -> Value {
    use std::io::Write;
    let mut command = match id {
        Some(id) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([&format!("--reuid={id}"), &format!("--regid={id}"), "--clear-groups", crate::support::bin()]);
            c
        }
        None => std::process::Command::new(crate::support::bin()),
    };
    let mut child =
        command.arg("node").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), "{request}").unwrap();
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The clean-up never removes a release a process works in, when it can see the process; an
/// agent that is not root cannot see other users' processes (Apache's `www-data`), and says
/// how many it could not check rather than pretend it did.
#[test]
fn cleanup_keeps_a_release_a_process_works_in_and_says_what_it_could_not_check() {
    let root = tempfile::Builder::new().prefix("release-cwd-").tempdir().unwrap();
    let base = root.path().join("base");
    let (old, live) = (release::digest::Digest::of(b"old"), release::digest::Digest::of(b"live"));
    let hex = |d: &release::digest::Digest| d.to_string()[7..].to_owned();
    for d in [&old, &live] {
        fs::create_dir_all(base.join("releases").join(hex(d))).unwrap();
    }
    std::os::unix::fs::symlink(format!("releases/{}", hex(&live)), base.join("current")).unwrap();
    // A root process works in the old release.
    let mut worker = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(base.join("releases").join(hex(&old)))
        .spawn()
        .unwrap();
    let request = json!({"op": "cleanup", "base": base, "keep": []});

    // As root: seen, kept.
    let answer = node_agent(&request, None);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["in_use"], json!([hex(&old)]), "{answer}");
    assert_eq!(answer["removed"], json!([]), "{answer}");
    let unseen_by_root = answer["unseen_processes"].as_u64().unwrap();

    // As nobody (the base is theirs): root's processes cannot be checked, and the answer says so.
    fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    std::process::Command::new("chown").args(["-R", "65534:65534"]).arg(&base).status().unwrap();
    let answer = node_agent(&request, Some(65534));
    worker.kill().unwrap();
    worker.wait().unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(answer["unseen_processes"].as_u64().unwrap() > unseen_by_root, "{answer}");
    let output = answer["output"].as_str().unwrap();
    assert!(output.contains("could not be checked") && output.contains("run the agent as root"), "{output}");
}
