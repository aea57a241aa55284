//! Deploys onto local nodes: the layout each node ends with, and the faults of prepare and
//! finalize (a failing hook, a corrupt object, a full disk, a refused shared path) that switch
//! no node; what each release records of its configuration; `--exclude-node`.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::archives::{RawTar, zstd};

use super::{Fleet, hold_node_lock, node_config, release_dirs};

#[test]
fn deploy_deploy_again_and_roll_back_on_three_nodes() {
    let fleet = Fleet::new(3, "");
    let v1 = fleet.upload("v1", &[]);
    let v2 = fleet.upload("v2", &[]);

    let first = fleet.deploy(&v1);
    assert_eq!(first["state"], "live", "{first}");
    fleet.assert_all_on(&v1);
    for base in &fleet.bases {
        let release = base.join("releases").join(&v1[7..]);
        assert_eq!(fs::read_to_string(release.join("version.txt")).unwrap(), "v1");
        // Shared paths are linked, relatively, into each release.
        assert_eq!(fs::read_link(release.join("config.txt")).unwrap(), Path::new("../../shared/config.txt"));
        assert!(fs::read_to_string(base.join("current/config.txt")).unwrap().starts_with("config of"));
        // Finalize ran in the release; it is read-only since; it is marked ready.
        assert_eq!(fs::read_to_string(release.join("FINALIZED")).unwrap(), "finalized\n");
        assert_eq!(fs::metadata(release.join("version.txt")).unwrap().permissions().mode() & 0o222, 0);
        assert!(base.join(".release/ready").join(&v1[7..]).exists());
        assert_eq!(fs::read_to_string(base.join("reloads")).unwrap(), format!("reloaded {v1}\n"));
    }
    let phases = fleet.phases(&first);
    for phase in ["prepare", "switch", "reload", "cleanup"] {
        assert_eq!(phases.iter().filter(|(_, p, o)| p == phase && o == "ok").count(), 3, "{phase}: {phases:?}");
    }

    let second = fleet.deploy(&v2);
    assert_eq!(second["state"], "live", "{second}");
    fleet.assert_all_on(&v2);
    let v1_inode = fs::metadata(fleet.bases[0].join("releases").join(&v1[7..])).unwrap().ino();

    // Rollback: the directory is there, so prepare only checks it; switch + reload.
    let out =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(out["digest"], v1.as_str());
    fleet.assert_all_on(&v1);
    fleet.cleaned(&out["id"]);
    assert_eq!(
        fs::metadata(fleet.bases[0].join("releases").join(&v1[7..])).unwrap().ino(),
        v1_inode,
        "not unpacked again"
    );
    let shown = fleet.f.get("carol", &format!("/v1/releases/{}", out["id"]));
    for prepare in shown["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "prepare") {
        let output = prepare["output_tail"].as_str().unwrap();
        assert!(
            output.starts_with(
                "artifact: already here, ready; finalized with the shared files as they are: config.txt sha256:"
            ),
            "a check only, no finalize: {prepare}"
        );
    }
    for base in &fleet.bases {
        assert_eq!(release_dirs(base), {
            let mut both = vec![v1[7..].to_owned(), v2[7..].to_owned()];
            both.sort();
            both
        });
        assert_eq!(fs::read_to_string(base.join("reloads")).unwrap().lines().count(), 3);
    }
}

#[test]
fn a_failing_finalize_hook_on_one_node_switches_no_node() {
    let fleet = Fleet::new(2, "");
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    // v2 carries a file that makes the finalize hook fail on node 2 only.
    fs::write(fleet.bases[1].join("shared/config.txt"), "broken").unwrap();
    let mut fleet = fleet;
    fleet.f.server.reconfigure(&node_config(
        &fleet.bases,
        "hooks.finalize = [\"grep -q 'config of' config.txt || { echo 'config.txt is broken' >&2; exit 3; }\"]",
    ));
    let v2 = fleet.upload("v2", &[]);
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v2, "--wait"]).assert_exit(7);
    assert!(out.stderr().contains("node2") && out.stderr().contains("failed"), "{out}");
    assert!(
        out.stdout().lines().filter(|l| l.contains(" prepare ")).count() == 2,
        "--wait shows each node's phases: {out}"
    );
    fleet.assert_all_on(&v1);
    let shown = fleet.f.cli("carol").args(["show", "2", "--json"]).assert_success().json();
    let failed: Vec<&Value> =
        shown["deployments"].as_array().unwrap().iter().filter(|d| d["outcome"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{shown}");
    assert!(failed[0]["node"].as_str().unwrap().ends_with("node2"));
    assert!(failed[0]["output_tail"].as_str().unwrap().contains("config.txt is broken"), "{shown}");
    assert!(!shown["deployments"].as_array().unwrap().iter().any(|d| d["phase"] == "switch"), "nothing switched");
    // What the hook said is in the terminal too: under its phase with --wait, and in show.
    assert!(out.stdout().contains("      | config.txt is broken"), "--wait prints the failed hook's output: {out}");
    let human = fleet.f.cli("carol").args(["show", "2"]).assert_success().stdout();
    assert!(human.contains("      | config.txt is broken"), "{human}");
    // The nodes are one aligned table; the failure's output comes under it, headed by its node.
    let header = human.lines().find(|l| l.trim_start().starts_with("NODE")).expect("a nodes table");
    let phase_column = header.find("PHASE").unwrap();
    let rows: Vec<&str> =
        human.lines().filter(|l| l.trim_start().contains("node") && l.contains(" prepare ")).collect();
    assert!(rows.len() >= 2 && rows.iter().all(|r| r.find("prepare") == Some(phase_column)), "{human}");
    assert!(human.lines().any(|l| l.contains("node2 failed (") && l.ends_with("):")), "{human}");
}

#[test]
fn a_corrupt_object_in_the_store_is_refused_by_the_node() {
    let fleet = Fleet::new(2, "");
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    let v2 = fleet.upload("v2", &[("filler.bin", &[7u8; 4096])]);
    let v3 = fleet.upload("v3", &[("filler.bin", &[8u8; 4096])]);
    let objects = fleet.f.server.data_dir().join("objects/artifacts/sha256");
    let reason_of = |release: &Value| {
        release["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned()
    };

    // Someone with the bucket puts another well-formed archive under v2's name: only the
    // node's digest check can tell.
    let v2_bytes = fs::read(objects.join(&v2[7..])).unwrap();
    fs::copy(objects.join(&v3[7..]), objects.join(&v2[7..])).unwrap();
    let release = fleet.deploy(&v2);
    assert_eq!(release["state"], "failed");
    assert!(reason_of(&release).contains("digest_mismatch"), "{}", reason_of(&release));
    fleet.assert_all_on(&v1);
    for base in &fleet.bases {
        assert_eq!(release_dirs(base), vec![v1[7..].to_owned()], "nothing half-unpacked is left");
    }

    // Or flips a byte of it: zstd's checksum or the archive check catches it first.
    let mut bytes = v2_bytes;
    let last = bytes.len() - 20;
    bytes[last] ^= 0x55;
    fs::write(objects.join(&v2[7..]), bytes).unwrap();
    let release = fleet.deploy(&v2);
    assert_eq!(release["state"], "failed");
    assert!(reason_of(&release).contains("unsafe_archive") || reason_of(&release).contains("digest_mismatch"));
    fleet.assert_all_on(&v1);
    for base in &fleet.bases {
        assert_eq!(release_dirs(base), vec![v1[7..].to_owned()], "nothing half-unpacked is left");
    }
}

#[test]
fn a_full_disk_on_one_node_switches_no_node() {
    let fleet = Fleet::new(2, "");
    // Node 2's base on a tiny filesystem of its own.
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&fleet.bases[1])
        .status()
        .expect("mount (the tests run as root, as .ci/run does)");
    assert!(status.success(), "mounting a small tmpfs for node 2 failed");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(fleet.bases[1].clone());
    fs::create_dir_all(fleet.bases[1].join("shared")).unwrap();
    fs::write(fleet.bases[1].join("shared/config.txt"), "config of").unwrap();

    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    let noise: Vec<u8> = (0..600_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let big = fleet.upload("v2", &[("big.bin", &noise)]);
    let release = fleet.deploy(&big);
    assert_eq!(release["state"], "failed");
    let reason = release["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("node2") && reason.contains("disk_full"), "{reason}");
    fleet.assert_all_on(&v1);
    assert_eq!(release_dirs(&fleet.bases[1]), vec![v1[7..].to_owned()], "the partial unpack is gone");
}

/// The node agents (`release node`) the server `pid` runs now.
fn agents_of(pid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let parent = stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            parent == Some(pid) && cmdline.split(|b| *b == 0).nth(1) == Some(b"node")
        })
        .collect()
}

#[test]
fn a_release_removed_between_the_status_and_the_prepare_is_fetched_again() {
    let fleet = Fleet::new(1, "");
    let base = fleet.bases[0].clone();
    let v1 = fleet.upload("v1", &[]);
    let v2 = fleet.upload("v2", &[]);
    fleet.deploy(&v1);
    fleet.deploy(&v2);
    // The node's lock is held here: the rollback's status says v1 is ready, its prepare waits.
    let lock = hold_node_lock(&base);
    let (status, release) =
        fleet.f.post("alice", "/v1/releases/rollback", json!({"service": "web", "environment": "staging"}));
    assert!(status.is_success(), "{release}");
    // An agent that stays: the prepare, waiting for the lock (status answers at once).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    loop {
        let before = agents_of(fleet.f.server.pid());
        std::thread::sleep(std::time::Duration::from_millis(300));
        if agents_of(fleet.f.server.pid()).iter().any(|a| before.contains(a)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no prepare waiting for the lock");
    }
    // Meanwhile v1 goes, as the clean-up of an earlier run (which took the lock first) removes
    // a release the new run's status had seen.
    fs::remove_file(base.join(".release/ready").join(&v1[7..])).unwrap();
    fs::remove_dir_all(base.join("releases").join(&v1[7..])).unwrap();
    drop(lock);
    let settled = fleet.f.settle(release["id"].as_i64().unwrap());
    assert_eq!(settled["state"], "live", "{settled}");
    fleet.assert_all_on(&v1);
    assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), "v1");
    let prepare = settled["deployments"].as_array().unwrap().iter().find(|d| d["phase"] == "prepare").unwrap().clone();
    assert_eq!(prepare["outcome"], "ok");
    assert!(prepare["output_tail"].as_str().unwrap().contains("streamed from the server"), "{prepare}");
    assert!(fleet.f.server.log().contains("left the node between its status and prepare"));
}

#[test]
fn a_node_left_out_with_exclude_node_keeps_its_release_and_the_record_says_so() {
    let fleet = Fleet::new(2, "");
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    // Node 2 is down for good (here: its shared config is gone, so it could not prepare).
    fs::remove_file(fleet.bases[1].join("shared/config.txt")).unwrap();
    let v2 = fleet.upload("v2", &[]);
    let node2 = format!("local:{}", fleet.bases[1].display());
    let out = fleet
        .f
        .cli("ci")
        .args(["deploy", "web", "--env", "staging", &v2, "--exclude-node", &node2, "--wait", "--json"])
        .assert_success()
        .json();
    assert_eq!(out["state"], "live");
    assert_eq!(out["excluded_nodes"], json!([node2]));
    assert_eq!(fs::read_to_string(fleet.bases[0].join("current/version.txt")).unwrap(), "v2");
    assert_eq!(fs::read_to_string(fleet.bases[1].join("current/version.txt")).unwrap(), "v1");
    let events = fleet.f.events("release.deploy");
    assert_eq!(events.last().unwrap()["details"]["excluded_nodes"], json!([node2]));

    let (status, body) = fleet.f.post(
        "ci",
        "/v1/releases",
        json!({"service": "web", "environment": "staging", "digest": v2, "exclude_nodes": ["nobody"]}),
    );
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");
    let everyone = vec![format!("local:{}", fleet.bases[0].display()), node2];
    let (status, body) = fleet.f.post(
        "ci",
        "/v1/releases",
        json!({"service": "web", "environment": "staging", "digest": v2, "exclude_nodes": everyone}),
    );
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");
}

#[test]
fn each_release_records_its_configuration_and_each_nodes_shared_files() {
    let mut fleet = Fleet::new(2, "");
    let v1 = fleet.upload("v1", &[]);
    let v2 = fleet.upload("v2", &[]);
    let v3 = fleet.upload("v3", &[]);
    let sha256 = |bytes: &[u8]| format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes)));

    let first = recorded(&fleet, &fleet.deploy(&v1));
    let config_1 = first["config_digest"].as_str().unwrap().to_owned();
    assert!(config_1.starts_with("sha256:") && config_1.len() == 71, "{first}");
    let files = first["shared_files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{first}");
    for (file, base) in files.iter().zip(&fleet.bases) {
        assert_eq!(file["node"], format!("local:{}", base.display()));
        assert_eq!(file["path"], "config.txt");
        assert_eq!(file["kind"], "file");
        let content = fs::read(base.join("shared/config.txt")).unwrap();
        assert_eq!(file["sha256"], sha256(&content), "the hash, never the contents");
        assert!(!first.to_string().contains(std::str::from_utf8(&content).unwrap()), "contents leaked: {first}");
    }

    // Node 2's shared file changes: the next release records the new hash there, the first
    // keeps what it ran with.
    fs::write(fleet.bases[1].join("shared/config.txt"), "config of node 2, rotated").unwrap();
    let second = recorded(&fleet, &fleet.deploy(&v2));
    assert_eq!(second["config_digest"], config_1.as_str(), "same configuration, same digest");
    assert_eq!(second["shared_files"][1]["sha256"], sha256(b"config of node 2, rotated"));
    assert_eq!(second["shared_files"][0]["sha256"], first["shared_files"][0]["sha256"]);
    assert_eq!(recorded(&fleet, &first)["shared_files"], first["shared_files"]);

    // A changed hook is a changed configuration; `show` names the digest and the hashes.
    fleet.f.server.reconfigure(&node_config(&fleet.bases, "hooks.finalize = [\"true\"]"));
    let third = recorded(&fleet, &fleet.deploy(&v3));
    assert_ne!(third["config_digest"], config_1.as_str());
    assert_eq!(recorded(&fleet, &second)["config_digest"], config_1.as_str());
    let shown = fleet.f.cli("carol").args(["show", &third["id"].to_string()]).assert_success();
    assert!(shown.stdout().contains(&format!("configuration {}", third["config_digest"].as_str().unwrap())), "{shown}");
    assert!(shown.stdout().contains(&sha256(b"config of node 2, rotated")), "{shown}");
}

fn recorded(fleet: &Fleet, release: &Value) -> Value {
    fleet.f.get("carol", &format!("/v1/releases/{}", release["id"]))
}

#[test]
fn redeploying_the_live_release_with_a_failing_finalize_leaves_it_live_and_ready() {
    let mut fleet = Fleet::new(2, "");
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    let inode = fs::metadata(fleet.bases[0].join("releases").join(&v1[7..])).unwrap().ino();
    fleet.f.server.reconfigure(&node_config(&fleet.bases, "hooks.finalize = [\"exit 3\"]"));
    let again = fleet.deploy(&v1);
    assert_eq!(again["state"], "failed", "{again}");
    fleet.assert_all_on(&v1);
    for base in &fleet.bases {
        assert!(base.join(".release/ready").join(&v1[7..]).exists(), "still ready");
    }
    // A later deploy that fails after the switch can still go back to it.
    fleet.f.server.reconfigure(&node_config(&fleet.bases, "hooks.finalize = [\"true\"]"));
    let v2 = fleet.upload("v2", &[]);
    assert_eq!(fleet.deploy(&v2)["state"], "live");
    let back =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(back["state"], "live", "{back}");
    fleet.assert_all_on(&v1);
    assert_eq!(fs::metadata(fleet.bases[0].join("releases").join(&v1[7..])).unwrap().ino(), inode, "never redone");
}

#[test]
fn a_shared_path_under_a_directory_the_artifact_makes_a_symlink_is_refused() {
    let root = tempfile::Builder::new().prefix("release-shared-link-").tempdir().unwrap().keep();
    let base = root.join("node1");
    fs::create_dir_all(base.join("shared/data")).unwrap();
    fs::write(base.join("shared/data/config.txt"), "config").unwrap();
    let config = format!(
        "[service.web]\nkind = \"generic\"\nshared = [\"data/config.txt\"]\n\
         [[service.web.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\n",
        base.display()
    );
    let fleet = Fleet { f: Fixture::with_config(&config), bases: vec![base.clone()] };
    // `data` is a link to `public`: the shared link would land in public/, not data/.
    let tar = RawTar::new().dir("public").file("public/index.html", b"hi").symlink("data", "public").finish();
    let response = fleet
        .f
        .server
        .http()
        .post(format!("{}/v1/artifacts?service=web", fleet.f.server.url))
        .bearer_auth(fleet.f.token("ci"))
        .body(zstd(&tar))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().unwrap());
    let digest = response.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned();
    let release = fleet.deploy(&digest);
    assert_eq!(release["state"], "failed");
    let reason = release["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("shared_through_link") && reason.contains("data/config.txt"), "{reason}");
    assert!(fs::symlink_metadata(base.join("current")).is_err(), "nothing switched");
    assert!(!base.join("public/config.txt").exists());
}
