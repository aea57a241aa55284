//! Deploys over SSH: promote from staging to production and roll back, a node unreachable
//! before prepare, sshd killed before the switch, adopt in chunks, agent binaries pruned, SSH
//! masters a killed server left, and nodes fetching by signed URL.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::{Backend, TestServer};

use super::SshFleet;

#[test]
fn three_staging_nodes_promote_to_two_production_nodes_and_roll_back() {
    let fleet = SshFleet::new(Backend::S3, &["staging", "staging", "staging", "production", "production"], "true");
    let v1 = fleet.upload("v1");
    let v2 = fleet.upload("v2");

    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--wait"]).assert_success();
    assert!(out.stdout().contains(" switch "), "phases per node: {out}");
    fleet.assert_env_on("staging", &v1, "v1");

    let promoted =
        fleet.f.cli("alice").args(["promote", "web", "--to", "production", "--json"]).assert_success().json();
    fleet.f.cli("bob").args(["approve", &promoted["id"].to_string(), "--wait"]).assert_success();
    fleet.assert_env_on("production", &v1, "v1");

    fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v2, "--wait"]).assert_success();
    let promoted =
        fleet.f.cli("alice").args(["promote", "web", "--to", "production", "--json"]).assert_success().json();
    fleet.f.cli("bob").args(["approve", &promoted["id"].to_string(), "--wait"]).assert_success();
    fleet.assert_env_on("production", &v2, "v2");
    fleet.assert_env_on("staging", &v2, "v2");

    let started = std::time::Instant::now();
    fleet.f.cli("alice").args(["rollback", "web", "--env", "production", "--wait"]).assert_success();
    eprintln!("rollback of 2 ssh nodes through the CLI: {:?}", started.elapsed());
    fleet.assert_env_on("production", &v1, "v1");
    fleet.assert_env_on("staging", &v2, "v2");

    // The nodes fetched the artifact from the bucket (presigned URL), not through the server.
    let shown = fleet.release(&promoted["id"]);
    let prepares: Vec<&Value> =
        shown["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "prepare").collect();
    assert_eq!(prepares.len(), 2, "{shown}");
    for prepare in prepares {
        assert_eq!(prepare["outcome"], "ok");
        let output = prepare["output_tail"].as_str().unwrap();
        assert!(output.contains("presigned URL"), "{prepare}");
        // The index travelled over SSH with the prepare: lib.txt is v1's, linked.
        assert!(output.contains("(1 of its 2 files linked to a release already here)"), "{prepare}");
    }
}

#[test]
fn a_node_unreachable_before_prepare_fails_the_release_and_nothing_switches() {
    let mut fleet = SshFleet::new(Backend::Local, &["staging", "staging"], "true");
    let v1 = fleet.upload("v1");
    fleet.live_in("staging", &v1);
    fleet.nodes[1].kill();
    let v2 = fleet.upload("v2");
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v2, "--wait"]).assert_exit(7);
    assert!(out.stderr().contains("cannot connect"), "{out}");
    let node0 = &fleet.bases[0].1;
    assert_eq!(fs::read_to_string(node0.join("current/version.txt")).unwrap(), "v1", "nothing switched");
    fleet.nodes[1].start_again();
    fleet.assert_env_on("staging", &v1, "v1");
}

#[test]
fn sshd_killed_between_prepare_and_switch_leaves_the_fleet_on_the_previous_release() {
    // Node 1 finalizes at once, node 2 takes its time: node 1's sshd dies in between.
    let finalize = "sleep $(cat $RELEASE_BASE/shared/delay 2>/dev/null || echo 0)";
    let mut fleet = SshFleet::new(Backend::Local, &["staging", "staging"], finalize);
    let v1 = fleet.upload("v1");
    fleet.live_in("staging", &v1);
    fs::write(fleet.bases[1].1.join("shared/delay"), "3").unwrap();
    let v2 = fleet.upload("v2");
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    let id = release["id"].clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let shown = fleet.release(&id);
        let prepared = shown["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["phase"] == "prepare" && d["outcome"] == "ok")
            .count();
        if prepared == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{shown}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fleet.nodes[0].kill();
    let settled = fleet.f.settle(id.as_i64().unwrap());
    assert_eq!(settled["state"], "failed", "{settled}");
    fleet.nodes[0].start_again();
    fleet.assert_env_on("staging", &v1, "v1");
}

#[test]
fn adopt_over_ssh_reads_the_legacy_tree_in_chunks_into_the_bucket_and_rolls_back_to_it() {
    let fleet = SshFleet::new(Backend::S3, &["staging", "staging"], "true");
    // The same application, deployed another way, on both nodes; bigger than one chunk.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..9 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    for (_, base) in &fleet.bases {
        let current = base.join("current");
        fs::create_dir_all(current.join("public")).unwrap();
        fs::write(current.join("version.txt"), "legacy").unwrap();
        fs::write(current.join("public/video.bin"), &noise).unwrap();
        fs::write(current.join("config.txt"), "legacy config").unwrap();
    }
    let v1 = fleet.upload("v1");
    let out = fleet
        .f
        .cli("ci")
        .args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait", "--json"])
        .assert_success()
        .json();
    fleet.assert_env_on("staging", &v1, "v1");
    let legacy = out["adopted"]["digest"].as_str().unwrap().to_owned();
    // Kept in the bucket, downloadable, byte for byte the package of the tree.
    let blob = fleet
        .f
        .server
        .http()
        .get(format!("{}/v1/artifacts/{legacy}/blob", fleet.f.server.url))
        .bearer_auth(fleet.f.token("carol"))
        .send()
        .unwrap();
    assert!(blob.status().is_success());
    let bytes = blob.bytes().unwrap();
    assert!(bytes.len() > 8 << 20, "more than one chunk: {}", bytes.len());
    assert_eq!(format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))), legacy);

    fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait"]).assert_success();
    fleet.assert_env_on("staging", &legacy, "legacy");
    for (_, base) in &fleet.bases {
        assert_eq!(fs::read(base.join("current/public/video.bin")).unwrap(), noise);
    }
}

#[test]
fn agent_binaries_of_other_builds_are_pruned_on_the_node() {
    let fleet = SshFleet::new(Backend::Local, &["staging"], "true");
    let bin = crate::support::sshd::agent_dir();
    fs::create_dir_all(&bin).unwrap();
    // Four binaries of old builds, from 2020: the newest three binaries stay, ours among them.
    let old: Vec<PathBuf> = (1..=4).map(|i| bin.join(format!("release-{i:016x}"))).collect();
    for (i, path) in old.iter().enumerate() {
        fs::write(path, "old build").unwrap();
        let day = format!("2020-01-0{}", i + 1);
        assert!(std::process::Command::new("touch").args(["-d", &day]).arg(path).status().unwrap().success());
    }
    // Every new connection prunes, whether it ships this build or finds it there.
    let v1 = fleet.upload("v1");
    fleet.live_in("staging", &v1);
    let v2 = fleet.upload("v2");
    fleet.live_in("staging", &v2);
    let left: Vec<String> = fs::read_dir(&bin)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("release-") && !n.contains(".tmp-"))
        .collect();
    assert!(left.len() <= 3, "{left:?}");
    assert!(!old[0].exists() && !old[1].exists(), "the oldest go: {left:?}");
    // Ours stays: the next deploy works.
    let v3 = fleet.upload("v3");
    fleet.live_in("staging", &v3);
    // Three deploys, one SSH session: the server keeps it open between releases.
    let log = fleet.nodes[0].log();
    assert_eq!(log.matches("Accepted publickey").count(), 1, "{log}");
    for path in &old {
        let _ = fs::remove_file(path);
    }
}

/// The pid of the SSH master behind `socket`, as `ssh -O check` reports it.
fn master_pid(socket: &Path) -> Option<u32> {
    let out = std::process::Command::new("ssh").arg("-S").arg(socket).args(["-O", "check", "x"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    text.split("pid=").nth(1)?.split(')').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn ssh_masters_a_killed_server_left_are_ended_when_it_starts_again() {
    let mut fleet = SshFleet::new(Backend::Local, &["staging"], "true");
    let v1 = fleet.upload("v1");
    fleet.live_in("staging", &v1);
    // The master's control socket is in the server's own data directory.
    let control = fleet.f.server.data_dir().join("ssh");
    let sockets: Vec<PathBuf> =
        fs::read_dir(&control).unwrap().map(|e| e.unwrap().path().join("master")).filter(|p| p.exists()).collect();
    assert_eq!(sockets.len(), 1, "one master for one node: {sockets:?}");
    let pid = master_pid(&sockets[0]).expect("the master answers");

    // A second server started on the same data directory is refused by its lock, and ends
    // nothing of the running one's.
    let config = fleet.f.server.dir.path().join("release.toml");
    let refused = fleet.f.server.cli().args(["serve", "--config", config.to_str().unwrap()]).assert_exit(1);
    assert!(refused.stderr().contains("lock") || refused.stderr().contains("in use"), "{refused}");
    assert!(alive(pid), "a refused server ended the running server's master");
    assert!(sockets[0].exists());

    // A crash leaves the master (a process of its own) connected to the node.
    fleet.f.server.kill();
    assert!(alive(pid), "the master outlived the server, as a crashed server's would");

    // The next start ends it and clears its directory; deploys then use a new master.
    fleet.f.server.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!alive(pid), "master {pid} left running after the restart");
    assert!(!sockets[0].parent().unwrap().exists(), "its control directory is removed");
    let v2 = fleet.upload("v2");
    fleet.live_in("staging", &v2);
    fleet.assert_env_on("staging", &v2, "v2");
}

#[test]
fn with_a_node_url_nodes_fetch_the_artifact_from_the_server_by_signed_url() {
    let fleet = SshFleet::build(&["staging", "staging"], "hooks.finalize = [\"true\"]", |config| {
        TestServer::start_serving_nodes(Backend::Local, config)
    });
    let v1 = fleet.upload("v1");
    let (status, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v1}));
    assert!(status.is_success(), "{release}");
    assert_eq!(fleet.f.settle(release["id"].as_i64().unwrap())["state"], "live");
    fleet.assert_env_on("staging", &v1, "v1");
    let shown = fleet.release(&release["id"]);
    let prepares: Vec<&Value> =
        shown["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "prepare").collect();
    assert_eq!(prepares.len(), 2);
    for prepare in prepares {
        let output = prepare["output_tail"].as_str().unwrap();
        assert!(output.contains("fetched from the release server (signed URL)"), "{prepare}");
    }

    // The fetch path opens nothing without this server's signature, and says why.
    let url = &fleet.f.server.url;
    let http = fleet.f.server.http();
    let expires = time_now() + 600;
    let forged =
        http.get(format!("{url}/node/artifacts/{v1}?expires={expires}&sig={}", "00".repeat(32))).send().unwrap();
    assert_eq!(forged.status(), reqwest::StatusCode::FORBIDDEN);
    assert!(forged.text().unwrap().contains("not signed by this server"));
    let unsigned = http.get(format!("{url}/node/artifacts/{v1}?expires={expires}")).send().unwrap();
    assert_eq!(unsigned.status(), reqwest::StatusCode::BAD_REQUEST);
    assert!(unsigned.text().unwrap().contains("sig"));
    fleet.f.assert_refusal_recorded("(unauthenticated)", 403, "forbidden");
}

/// Issue 15 part 2: a node that holds the release before fetches only the frames with what
/// changed — over SSH, the frames it says it lacks on its first line of the same call (the
/// server then streams only those), or by ranged GETs of the bucket's presigned URL or of this
/// server's signed URL — and the release it makes is the artifact's.
#[test]
fn a_node_fetches_only_the_frames_it_lacks_over_ssh_or_by_url() {
    let by_pipe = SshFleet::new(Backend::Local, &["staging", "staging"], "true");
    let by_bucket = SshFleet::new(Backend::S3, &["staging", "staging"], "true");
    let by_server = SshFleet::build(&["staging"], "hooks.finalize = [\"true\"]", |config| {
        TestServer::start_serving_nodes(Backend::Local, config)
    });
    for (fleet, how) in
        [(&by_pipe, "streamed from the server"), (&by_bucket, "presigned URL"), (&by_server, "signed URL")]
    {
        let v1 = fleet.upload_packaged("v1", &[]);
        let v2 = fleet.upload_packaged("v2", &[5, 150]);
        fleet.live_in("staging", &v1);
        let (status, release) =
            fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
        assert!(status.is_success(), "{release}");
        assert_eq!(fleet.f.settle(release["id"].as_i64().unwrap())["state"], "live");
        fleet.assert_env_on("staging", &v2, "v2");
        let shown = fleet.release(&release["id"]);
        for prepare in shown["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "prepare") {
            let output = prepare["output_tail"].as_str().unwrap();
            assert!(output.contains(how), "{prepare}");
            let [frames, of, bytes, size] = crate::support::archives::fetched(output);
            // Two changed files and version.txt: at most three frames of about 28.
            assert!(of > 20 && (1..=3).contains(&frames), "{output}");
            assert!(bytes * 5 <= size, "{output}");
        }
    }
}

fn time_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}
