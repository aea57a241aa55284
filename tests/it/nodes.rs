//! Deploys onto nodes on this machine (`host = "local"`: the node agent runs as a child of
//! the server, no SSH): the files on each node, the registry and `status` agree at every
//! step; faults end with the whole fleet on the previous release and the release failed.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::archives::{RawTar, zstd};
use crate::support::{Backend, TestServer};

/// A fleet of local nodes, each a base directory with its shared/ ready.
struct Fleet {
    f: Fixture,
    bases: Vec<PathBuf>,
}

const FINALIZE: &str = "hooks.finalize = [\"echo finalized > FINALIZED\"]";

const RELOAD: &str = "hooks.reload = [\"echo reloaded $RELEASE_DIGEST >> $RELEASE_BASE/reloads\"]";

fn node_config(bases: &[PathBuf], service_extra: &str) -> String {
    let finalize = if service_extra.contains("hooks.finalize") { "" } else { FINALIZE };
    let reload = if service_extra.contains("hooks.reload") { "" } else { RELOAD };
    let mut config = format!(
        "[service.web]\nkind = \"generic\"\nshared = [\"config.txt\"]\nkeep = 3\n{finalize}\n{reload}\n{service_extra}\n"
    );
    for base in bases {
        config.push_str(&format!(
            "[[service.web.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\n",
            base.display()
        ));
    }
    config
}

impl Fleet {
    fn new(nodes: usize, service_extra: &str) -> Fleet {
        Fleet::with_env(nodes, service_extra, &[])
    }

    /// With these variables in the server's environment.
    fn with_env(nodes: usize, service_extra: &str, env: &[(&str, &str)]) -> Fleet {
        let root = tempfile::Builder::new().prefix("release-fleet-").tempdir().unwrap().keep();
        let bases: Vec<PathBuf> = (1..=nodes).map(|i| root.join(format!("node{i}"))).collect();
        for base in &bases {
            fs::create_dir_all(base.join("shared")).unwrap();
            fs::write(base.join("shared/config.txt"), format!("config of {}", base.display())).unwrap();
        }
        let server = TestServer::start_with_env(Backend::Local, &node_config(&bases, service_extra), env);
        Fleet { f: Fixture::adopt(server), bases }
    }

    /// Uploads an archive for `web` with `version.txt` = `version` (and `extra` files).
    fn upload(&self, version: &str, extra: &[(&str, &[u8])]) -> String {
        let mut tar =
            RawTar::new().dir("public").file("version.txt", version.as_bytes()).file("public/index.html", b"hi");
        for (path, data) in extra {
            tar = tar.file(path, data);
        }
        let response = self
            .f
            .server
            .http()
            .post(format!("{}/v1/artifacts?service=web", self.f.server.url))
            .bearer_auth(self.f.token("ci"))
            .body(zstd(&tar.finish()))
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{}", response.text().unwrap());
        response.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned()
    }

    /// Deploys and waits until it is final and, when live, until every node's clean-up (which
    /// follows `live`, in the background) is recorded: what `release_dirs` then shows is
    /// retention's doing.
    fn deploy(&self, digest: &str) -> Value {
        let (status, release) =
            self.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": digest}));
        assert!(status.is_success(), "{release}");
        let settled = self.f.settle(release["id"].as_i64().unwrap());
        if settled["state"] == "live" { self.cleaned(&settled["id"]) } else { settled }
    }

    /// Waits until release `id` has a `cleanup` phase recorded for every node; returns it.
    fn cleaned(&self, id: &Value) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let shown = self.f.get("carol", &format!("/v1/releases/{id}"));
            let cleaned = shown["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "cleanup").count();
            if cleaned >= self.bases.len() {
                return shown;
            }
            assert!(std::time::Instant::now() < deadline, "no clean-up on every node: {shown}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// What `current` points at on every node.
    fn currents(&self) -> Vec<Option<String>> {
        self.bases
            .iter()
            .map(|b| {
                fs::read_link(b.join("current"))
                    .ok()
                    .map(|t| format!("sha256:{}", t.file_name().unwrap().to_string_lossy()))
            })
            .collect()
    }

    /// The registry, `status` and every node's `current` agree on `digest`.
    fn assert_all_on(&self, digest: &str) {
        assert!(
            self.currents().iter().all(|c| c.as_deref() == Some(digest)),
            "nodes: {:?}, expected {digest}",
            self.currents()
        );
        let status = self.f.get("carol", "/v1/status?service=web");
        let staging = status.as_array().unwrap().iter().find(|c| c["environment"] == "staging").unwrap();
        assert_eq!(staging["digest"], digest, "status: {staging}");
        for base in &self.bases {
            let version = fs::read_to_string(base.join("current/version.txt")).unwrap();
            let hex = &digest[7..];
            assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(hex));
            assert!(!version.is_empty());
        }
    }

    fn phases(&self, release: &Value) -> Vec<(String, String, String)> {
        let shown = self.f.get("carol", &format!("/v1/releases/{}", release["id"]));
        shown["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["node"].as_str().unwrap().to_owned(),
                    d["phase"].as_str().unwrap().to_owned(),
                    d["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

/// Takes the node's lock as the agent does (flock), until the file is dropped.
fn hold_node_lock(base: &Path) -> fs::File {
    use std::os::fd::AsRawFd;
    let lock = fs::OpenOptions::new().write(true).open(base.join(".release/lock")).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    lock
}

fn release_dirs(base: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(base.join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

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
fn a_failing_health_check_switches_every_node_back() {
    // The health check reads node 1's current/health.txt through a small HTTP server.
    let root = tempfile::Builder::new().prefix("release-health-").tempdir().unwrap().keep();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let health = format!("health = {{ url = \"http://127.0.0.1:{port}/health.txt\", expect = \"healthy\" }}");
    let bases: Vec<PathBuf> = (1..=2).map(|i| root.join(format!("node{i}"))).collect();
    for base in &bases {
        fs::create_dir_all(base.join("shared")).unwrap();
        fs::write(base.join("shared/config.txt"), "config of").unwrap();
    }
    let fleet = Fleet { f: Fixture::with_config(&node_config(&bases, &health)), bases };
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let http = Reap(
        std::process::Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(fleet.bases[0].join("current"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let good = fleet.upload("v1", &[("health.txt", b"healthy v1")]);
    let first = fleet.deploy(&good);
    assert_eq!(first["state"], "live", "{first}");
    let bad = fleet.upload("v2", &[("health.txt", b"broken v2")]);
    let second = fleet.deploy(&bad);
    drop(http);
    assert_eq!(second["state"], "failed", "{second}");
    fleet.assert_all_on(&good);
    let phases = fleet.phases(&second);
    assert_eq!(phases.iter().filter(|(_, p, o)| p == "switch" && o == "ok").count(), 2, "{phases:?}");
    assert_eq!(phases.iter().filter(|(_, p, o)| p == "switch back" && o == "ok").count(), 2, "{phases:?}");
    assert!(phases.iter().any(|(_, p, o)| p == "verify" && o == "failed"), "{phases:?}");
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

/// Kills the server while release `id` is in `phase` on every node, starts it again, and
/// returns the release once final.
fn kill_during(fleet: &mut Fleet, id: i64, phase: &str) -> Value {
    reach_everywhere(fleet, id, phase);
    fleet.f.server.kill();
    fleet.f.server.restart();
    fleet.f.settle(id)
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
    let mut fleet = Fleet::new(2, "hooks.reload = [\"sleep 2\"]");
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    let v2 = fleet.upload("v2", &[]);
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    let settled = kill_during(&mut fleet, release["id"].as_i64().unwrap(), "switch");
    // Every node had switched: the restarted server reloads, verifies and records it live.
    assert_eq!(settled["state"], "live", "{settled}");
    fleet.assert_all_on(&v2);
}

#[test]
fn a_deploy_a_killed_server_left_switched_is_put_back_if_its_artifact_was_blocked_meanwhile() {
    let mut fleet = Fleet::new(2, "hooks.reload = [\"sleep 2\"]");
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    let v2 = fleet.upload("v2", &[]);
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    let id = release["id"].as_i64().unwrap();
    reach_everywhere(&fleet, id, "switch");
    fleet.f.server.kill();
    // While the server is down, v2 is blocked straight in its registry.
    let registry = release::registry::Registry::open(&fleet.f.server.data_dir().join("registry.db")).unwrap();
    let block = release::registry::Block {
        reason: "corrupts orders".into(),
        blocked_by: "root".into(),
        owner: "root".into(),
        blocked_at: String::new(),
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
    let fleet = Fleet::new(2, waits);
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    let v2 = fleet.upload("v2", &[]);
    for base in &fleet.bases {
        fs::write(base.join("shared/hold"), "").unwrap();
    }
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    let id = release["id"].as_i64().unwrap();
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
    let mut fleet = Fleet::new(2, "hooks.finalize = [\"sleep 2\"]");
    let v1 = fleet.upload("v1", &[]);
    fleet.deploy(&v1);
    let v2 = fleet.upload("v2", &[]);
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    let id = release["id"].as_i64().unwrap();
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

/// `status --nodes` as `who` sees it: the staging cell of `web`.
fn staging_nodes(fleet: &Fleet, who: &str) -> Value {
    let rows = fleet.f.cli(who).args(["status", "web", "--nodes", "--json"]).run().json();
    rows.as_array().unwrap().iter().find(|c| c["environment"] == "staging").unwrap().clone()
}

/// Also: nodes are asked at most once per `limits.node_status_max_age` (whoever asks), but at
/// once after the cell's release changed.
#[test]
fn status_nodes_reports_drift() {
    // `[limits]` after the service's keys; its nodes are tables of their own, further down.
    let fleet = Fleet::new(2, "[limits]\nnode_status_max_age = \"5s\"");
    let v1 = fleet.upload("v1", &[]);
    let v2 = fleet.upload("v2", &[]);
    fleet.deploy(&v1);
    let on_v1 = staging_nodes(&fleet, "carol");
    assert!(on_v1["nodes"].as_array().unwrap().iter().all(|n| n["current"] == v1.as_str()), "{on_v1}");
    // A deploy changes the cell: the next asking does not reuse what the nodes said before it.
    fleet.deploy(&v2);
    let clean = staging_nodes(&fleet, "carol");
    let asked = std::time::Instant::now();
    assert!(
        clean["nodes"].as_array().unwrap().iter().all(|n| n["drift"] == false && n["current"] == v2.as_str()),
        "{clean}"
    );
    assert_ne!(clean["nodes_asked_at"], on_v1["nodes_asked_at"], "{clean}");

    // Someone points node 2 back at v1 by hand.
    let node2 = &fleet.bases[1];
    std::os::unix::fs::symlink(format!("releases/{}", &v1[7..]), node2.join("current.tmp")).unwrap();
    fs::rename(node2.join("current.tmp"), node2.join("current")).unwrap();
    // Within the limit, every caller (another token too) gets the answer already given: the
    // nodes are not asked again.
    let again = staging_nodes(&fleet, "root");
    assert!(asked.elapsed() < std::time::Duration::from_secs(5), "the test was too slow to check the reuse");
    assert_eq!(again["nodes"], clean["nodes"], "{again}");
    assert_eq!(again["nodes_asked_at"], clean["nodes_asked_at"], "{again}");
    std::thread::sleep(std::time::Duration::from_secs(5).saturating_sub(asked.elapsed()));

    let staging = staging_nodes(&fleet, "carol");
    assert_ne!(staging["nodes_asked_at"], clean["nodes_asked_at"], "{staging}");
    let nodes = staging["nodes"].as_array().unwrap();
    let node2_view = nodes.iter().find(|n| n["node"].as_str().unwrap().ends_with("node2")).unwrap();
    assert_eq!(node2_view["drift"], true);
    assert_eq!(node2_view["current"], v1.as_str());
    let human = fleet.f.cli("carol").args(["status", "web", "--nodes"]).assert_exit(1);
    assert!(human.stdout().contains("DRIFT"), "{human}");
    assert!(
        human.stderr().contains("1 node(s) drift or did not answer") && human.stderr().contains("node2"),
        "{human}"
    );
}

#[test]
fn a_node_that_cannot_be_put_back_exits_8() {
    let fleet = Fleet::new(2, "hooks.reload = [\"test ! -e $RELEASE_BASE/shared/reload-broken\"]");
    let v1 = fleet.upload("v1", &[]);
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    // From now on node 2's reload fails: after the switch, and again after the switch back.
    fs::write(fleet.bases[1].join("shared/reload-broken"), "").unwrap();
    let v2 = fleet.upload("v2", &[]);
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v2, "--wait"]).assert_exit(8);
    assert!(out.stderr().contains("could not be put back on") && out.stderr().contains("node2"), "{out}");
    let shown = fleet.f.cli("carol").args(["show", "2", "--json"]).assert_success().json();
    assert_eq!(shown["state"], "failed");
    let reason = shown["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap();
    assert!(reason.contains("not put back") && reason.contains("node2"), "{reason}");
    let node2 = fleet.bases[1].display().to_string();
    assert_eq!(shown["stranded"], json!([format!("local:{node2}")]), "the server names the stranded node: {shown}");

    // Plain status (no asking the nodes), the page and the metrics show it until it is repaired.
    let stranded = || staging_row(&fleet)["stranded"].as_array().unwrap().clone();
    let marks = stranded();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert!(marks[0]["node"].as_str().unwrap().ends_with("node2") && marks[0]["release"] == 2, "{marks:?}");
    let human = fleet.f.cli("carol").args(["status", "web"]).assert_success().stdout();
    assert!(human.contains("STRANDED") && human.contains("node2"), "{human}");
    assert_eq!(stranded_gauge(&fleet), 1);
    let page = fleet.f.server.http().get(&fleet.f.server.url).bearer_auth(fleet.f.token("carol")).send().unwrap();
    let page = page.text().unwrap();
    assert!(page.contains("stranded: ") && page.contains(&format!("local:{node2}")), "{page}");

    // Node 2 is mended by hand; the next deploy goes live on it and lifts the mark.
    fs::remove_file(fleet.bases[1].join("shared/reload-broken")).unwrap();
    let v3 = fleet.upload("v3", &[]);
    assert_eq!(fleet.deploy(&v3)["state"], "live");
    assert!(stranded().is_empty(), "{:?}", stranded());
    assert_eq!(stranded_gauge(&fleet), 0);
    // The history keeps that release 2 stranded it.
    let shown = fleet.f.cli("carol").args(["show", "2", "--json"]).assert_success().json();
    assert_eq!(shown["stranded"], json!([format!("local:{node2}")]));
}

/// The staging cell of plain `status web` (the nodes are not asked).
fn staging_row(fleet: &Fleet) -> Value {
    let rows = fleet.f.cli("carol").args(["status", "web", "--json"]).assert_success().json();
    rows.as_array().unwrap().iter().find(|c| c["environment"] == "staging").unwrap().clone()
}

/// `release_nodes_stranded` of web/staging, as `/metrics` says.
fn stranded_gauge(fleet: &Fleet) -> u64 {
    let text = fleet
        .f
        .server
        .http()
        .get(format!("{}/metrics", fleet.f.server.url))
        .bearer_auth(fleet.f.token("carol"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(r#"release_nodes_stranded{service="web",environment="staging"}"#))
        .unwrap_or_else(|| panic!("no stranded gauge in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn status_nodes_lifts_the_stranded_mark_of_a_node_found_serving_the_live_release() {
    let broken_reload = "hooks.reload = [\"test ! -e $RELEASE_BASE/shared/reload-broken\"]";
    let fleet = Fleet::new(2, &format!("{broken_reload}\n[limits]\nnode_status_max_age = \"1s\""));
    let v1 = fleet.upload("v1", &[]);
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    fs::write(fleet.bases[1].join("shared/reload-broken"), "").unwrap();
    // Node 2 cannot be put back; someone then points it at v2 by hand, where it stays.
    let v2 = fleet.upload("v2", &[]);
    fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v2, "--wait"]).assert_exit(8);
    let node2 = &fleet.bases[1];
    std::os::unix::fs::symlink(format!("releases/{}", &v2[7..]), node2.join("current.tmp")).unwrap();
    fs::rename(node2.join("current.tmp"), node2.join("current")).unwrap();
    // Asking the nodes while node 2 serves v2 (not the live v1) keeps the mark.
    let asked = staging_nodes(&fleet, "carol");
    assert_eq!(asked["stranded"].as_array().unwrap().len(), 1, "{asked}");
    assert_eq!(staging_row(&fleet)["stranded"].as_array().unwrap().len(), 1);

    // Put back on v1 by hand: the next asking finds it serving the live release.
    std::os::unix::fs::symlink(format!("releases/{}", &v1[7..]), node2.join("current.tmp")).unwrap();
    fs::rename(node2.join("current.tmp"), node2.join("current")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let asked = staging_nodes(&fleet, "carol");
    assert_eq!(asked["stranded"], json!([]), "{asked}");
    assert_eq!(staging_row(&fleet)["stranded"], json!([]));
    assert_eq!(stranded_gauge(&fleet), 0);
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
fn rolling_a_laravel_service_back_past_migrations_needs_force() {
    let root = tempfile::Builder::new().prefix("release-migrate-").tempdir().unwrap().keep();
    let base = root.join("node1");
    fs::create_dir_all(base.join("shared/storage")).unwrap();
    fs::write(base.join("shared/.env"), "APP_KEY=x").unwrap();
    let config = format!(
        "[service.web]\nkind = \"laravel\"\nhooks.finalize = []\nhooks.migrate = [\"echo migrated >> $RELEASE_BASE/migrations.log\"]\n\
         hooks.reload = []\n[[service.web.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\nmigrate = true\n",
        base.display()
    );
    let fleet = Fleet { f: Fixture::with_config(&config), bases: vec![base.clone()] };
    let v1 = fleet.upload("v1", &[("database/migrations/2026_01_01_000000_create_orders.php", b"<?php")]);
    let v2 = fleet.upload(
        "v2",
        &[
            ("database/migrations/2026_01_01_000000_create_orders.php", b"<?php"),
            ("database/migrations/2026_02_01_000000_add_discounts.php", b"<?php"),
        ],
    );
    fleet.deploy(&v1);
    fleet.deploy(&v2);
    assert_eq!(
        fs::read_to_string(base.join("migrations.log")).unwrap().lines().count(),
        2,
        "migrate ran on the migrate node"
    );

    let out = fleet.f.cli("alice").args(["rollback", "web", "--env", "staging"]).assert_exit(3);
    assert!(out.stderr().contains("2026_02_01_000000_add_discounts.php") && out.stderr().contains("--force"), "{out}");
    fleet.f.assert_refusal_recorded("alice", 409, "migrations_ahead");
    // A plain deploy of the older build is the same step back (issue 11).
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1]).assert_exit(3);
    assert!(out.stderr().contains("deploying") && out.stderr().contains("add_discounts.php"), "{out}");
    fleet.f.assert_refusal_recorded("ci", 409, "migrations_ahead");
    assert_eq!(fleet.f.get("carol", "/v1/releases?service=web")["releases"].as_array().unwrap().len(), 2);

    let out = fleet
        .f
        .cli("alice")
        .args(["rollback", "web", "--env", "staging", "--force", "--wait", "--json"])
        .assert_success()
        .json();
    assert_eq!(out["digest"], v1.as_str());
    let event = fleet.f.events("release.rollback").pop().unwrap();
    assert_eq!(event["details"]["forced"], true);
    assert_eq!(event["details"]["migrations_ahead"], json!(["2026_02_01_000000_add_discounts.php"]));
    assert_eq!(
        fs::read_to_string(base.join("migrations.log")).unwrap().lines().count(),
        2,
        "a rollback runs no migration"
    );
    // Not only in the audit log: show, its --json and the release page say it.
    assert_eq!(out["forced_past_migrations"], json!(["2026_02_01_000000_add_discounts.php"]), "{out}");
    let id = out["id"].to_string();
    let human = fleet.f.cli("carol").args(["show", &id]).assert_success().stdout();
    assert!(human.contains("FORCED past migrations it lacks") && human.contains("add_discounts.php"), "{human}");
    let page =
        fleet.f.server.http().get(format!("{}/releases/{id}", fleet.f.server.url)).bearer_auth(fleet.f.token("carol"));
    let page = page.send().unwrap().text().unwrap();
    assert!(page.contains("forced past migrations") && page.contains("add_discounts.php"), "{page}");
}

#[test]
fn leaving_out_the_migrate_node_of_a_laravel_service_is_refused_except_from_a_rollback() {
    let root = tempfile::Builder::new().prefix("release-migrate-").tempdir().unwrap().keep();
    let mut config = "[service.web]\nkind = \"laravel\"\nhooks.finalize = []\nhooks.reload = []\n\
                      hooks.migrate = [\"true\"]\n"
        .to_owned();
    for (name, migrate) in [("node1", true), ("node2", false)] {
        let base = root.join(name);
        fs::create_dir_all(base.join("shared/storage")).unwrap();
        fs::write(base.join("shared/.env"), "APP_KEY=x").unwrap();
        config.push_str(&format!(
            "[[service.web.node]]\nname = \"{name}\"\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\nmigrate = {migrate}\n",
            base.display()
        ));
    }
    let fleet = Fleet { f: Fixture::with_config(&config), bases: vec![] };
    let v1 = fleet.upload("v1", &[]);
    let out =
        fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--exclude-node", "node1"]).assert_exit(2);
    assert!(out.stderr().contains("migrate node") && out.stderr().contains("node1"), "{out}");
    assert!(fleet.f.get("carol", "/v1/releases?service=web")["releases"].as_array().unwrap().is_empty());

    // A rollback runs no migration: with the migrate node down, it may be left out (issue 11).
    let v2 = fleet.upload("v2", &[]);
    for digest in [&v1, &v2] {
        fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", digest, "--wait"]).assert_success();
    }
    let out = fleet
        .f
        .cli("alice")
        .args(["rollback", "web", "--env", "staging", "--exclude-node", "node1", "--wait", "--json"])
        .assert_success()
        .json();
    assert_eq!((out["digest"].as_str(), &out["excluded_nodes"]), (Some(v1.as_str()), &json!(["node1"])));
    let current = |name: &str| fs::read_link(root.join(name).join("current")).unwrap();
    assert!(current("node2").ends_with(v1.trim_start_matches("sha256:")), "{:?}", current("node2"));
    assert!(current("node1").ends_with(v2.trim_start_matches("sha256:")), "{:?}", current("node1"));
    let event = fleet.f.events("release.rollback").pop().unwrap();
    assert_eq!(event["details"]["excluded_nodes"], json!(["node1"]));
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

/// An application deployed another way: `current` is a plain directory holding it, with its
/// own copy of the shared config.
fn legacy_app(base: &Path, version: &str) {
    let current = base.join("current");
    fs::create_dir_all(current.join("public")).unwrap();
    fs::write(current.join("version.txt"), version).unwrap();
    fs::write(current.join("public/index.html"), "hi").unwrap();
    fs::write(current.join("config.txt"), format!("legacy config of {}", base.display())).unwrap();
}

#[test]
fn adopt_keeps_an_application_deployed_another_way_so_the_first_deploy_rolls_back() {
    let fleet = Fleet::new(2, "");
    for base in &fleet.bases {
        legacy_app(base, "legacy");
    }
    // Node 2 has no shared config yet: adoption takes the one the legacy tree has.
    fs::remove_file(fleet.bases[1].join("shared/config.txt")).unwrap();
    let v1 = fleet.upload("v1", &[]);

    // Without --adopt, the plain directory is refused, and nothing is touched.
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--wait"]).assert_exit(7);
    assert!(out.stderr().contains("plain directory") && out.stderr().contains("--adopt"), "{out}");
    for base in &fleet.bases {
        assert!(fs::symlink_metadata(base.join("current")).unwrap().is_dir());
        assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), "legacy");
        assert!(release_dirs(base).is_empty(), "{:?}", release_dirs(base));
    }
    let status = fleet.f.cli("carol").args(["status", "web", "--nodes", "--json"]).assert_exit(1).json();
    assert!(status.to_string().contains("plain directory"), "{status}");

    let out = fleet
        .f
        .cli("ci")
        .args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait", "--json"])
        .assert_success()
        .json();
    assert_eq!(out["state"], "live", "{out}");
    fleet.assert_all_on(&v1);
    let legacy = out["adopted"]["digest"].as_str().unwrap().to_owned();
    assert_eq!(out["adopted"]["nodes"].as_array().unwrap().len(), 2, "{out}");
    for base in &fleet.bases {
        // The old tree is kept aside as it was, and as a release beside the new one.
        let kept: Vec<_> = fs::read_dir(base.join(".release"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("adopted-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(fs::read_to_string(kept[0].join("version.txt")).unwrap(), "legacy");
        let adopted = base.join("releases").join(&legacy[7..]);
        assert_eq!(fs::read_to_string(adopted.join("version.txt")).unwrap(), "legacy");
        assert_eq!(fs::read_link(adopted.join("config.txt")).unwrap(), Path::new("../../shared/config.txt"));
    }
    assert_eq!(
        fs::read_to_string(fleet.bases[1].join("shared/config.txt")).unwrap(),
        format!("legacy config of {}", fleet.bases[1].display()),
        "seeded from the legacy tree"
    );
    assert!(fs::read_to_string(fleet.bases[0].join("shared/config.txt")).unwrap().starts_with("config of"), "kept");
    // The legacy tree is an artifact of the service now, by the same digest a package gives.
    let artifact = fleet.f.get("carol", &format!("/v1/artifacts/{legacy}"));
    assert_eq!(artifact["uploads"][0]["version"], "adopted", "{artifact}");

    // Even this first deploy rolls back: to exactly the adopted tree.
    let back =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(back["digest"], legacy.as_str(), "{back}");
    fleet.assert_all_on(&legacy);
    for base in &fleet.bases {
        assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), "legacy");
    }
    let events = fleet.f.cli("carol").args(["audit", "export"]).assert_success().stdout();
    assert!(events.lines().any(|l| l.contains("\"release.adopted\"") && l.contains(&legacy)), "{events}");
}

#[test]
fn purge_keeps_the_adopted_tree_the_only_way_back_to_before_the_first_deploy() {
    let fleet = Fleet::with_env(1, "", &[crate::curation::SHORT_DAY]);
    legacy_app(&fleet.bases[0], "legacy");
    let v1 = fleet.upload("v1", &[]);
    let out = fleet
        .f
        .cli("ci")
        .args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait", "--json"])
        .assert_success()
        .json();
    let legacy = out["adopted"]["digest"].as_str().unwrap().to_owned();
    let never = fleet.upload("never deployed", &[]);
    std::thread::sleep(std::time::Duration::from_millis(5));
    // The adopted tree was never live as a release: only its adoption keeps it.
    let purged = fleet
        .f
        .cli("root")
        .args(["artifact", "purge", "--never-live", "--older-than", "1", "--json"])
        .assert_success()
        .json();
    assert_eq!(purged["purged"], json!([never]), "{purged}");
    assert_eq!(fleet.f.get("carol", &format!("/v1/artifacts/{legacy}"))["stored"], true);
    let back =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!((back["digest"].as_str(), back["state"].as_str()), (Some(legacy.as_str()), Some("live")), "{back}");
    fleet.assert_all_on(&legacy);
}

#[test]
fn adopt_refuses_nodes_holding_different_applications_and_touches_nothing() {
    let fleet = Fleet::new(2, "");
    legacy_app(&fleet.bases[0], "legacy a");
    legacy_app(&fleet.bases[1], "legacy b");
    let v1 = fleet.upload("v1", &[]);
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait"]).assert_exit(7);
    assert!(out.stderr().contains("different applications"), "{out}");
    for (base, version) in fleet.bases.iter().zip(["legacy a", "legacy b"]) {
        assert!(fs::symlink_metadata(base.join("current")).unwrap().is_dir());
        assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), version);
        assert!(release_dirs(base).is_empty());
    }
}

#[test]
fn a_failed_adopting_deploy_puts_every_node_back_on_the_adopted_tree() {
    // Node 2 cannot reload v1 (only v1): the deploy fails after the switch.
    let fleet =
        Fleet::new(2, "hooks.reload = [\"test ! -e $RELEASE_BASE/shared/reload-broken || ! grep -q v1 version.txt\"]");
    for base in &fleet.bases {
        legacy_app(base, "legacy");
    }
    fs::write(fleet.bases[1].join("shared/reload-broken"), "").unwrap();
    let v1 = fleet.upload("v1", &[]);
    let out = fleet
        .f
        .cli("ci")
        .args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait", "--json"])
        .assert_exit(7)
        .json();
    let legacy = out["adopted"]["digest"].as_str().unwrap().to_owned();
    for base in &fleet.bases {
        assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(&legacy[7..]));
        assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), "legacy");
    }
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
fn a_release_without_a_health_check_naming_the_digest_is_live_but_unverified() {
    let fleet = Fleet::new(1, "");
    let v1 = fleet.upload("v1", &[]);
    let live = fleet.deploy(&v1);
    assert_eq!(live["state"], "live");
    let status = fleet.f.cli("carol").args(["status", "web"]).assert_success();
    assert!(status.stdout().contains("UNVERIFIED"), "{status}");
    let shown = fleet.f.get("carol", &format!("/v1/releases/{}", live["id"]));
    assert_eq!(shown["verified"], false, "{shown}");
}

#[test]
fn a_hung_hook_is_killed_on_the_node_before_the_server_gives_up_and_the_lock_is_free() {
    let mut fleet = Fleet::new(1, "");
    fleet.f.server.reconfigure(&format!(
        "[ssh]\ncommand_timeout = \"7s\"\n{}",
        node_config(&fleet.bases, "hooks.finalize = [\"sleep 120 # hung-hook-marker\"]")
    ));
    let v1 = fleet.upload("v1", &[]);
    let started = std::time::Instant::now();
    let failed = fleet.deploy(&v1);
    assert_eq!(failed["state"], "failed");
    let reason = failed["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("hook_timeout") && reason.contains("killed"), "{reason}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
    let ps = std::process::Command::new("pgrep").args(["-f", "hung-hook-marker"]).output().unwrap();
    assert!(ps.stdout.is_empty(), "the hook's processes are gone: {}", String::from_utf8_lossy(&ps.stdout));
    // The base is not locked by a left-over agent: the next deploy goes through.
    fleet.f.server.reconfigure(&format!("[ssh]\ncommand_timeout = \"7s\"\n{}", node_config(&fleet.bases, "")));
    assert_eq!(fleet.deploy(&v1)["state"], "live");
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
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    let id = release["id"].as_i64().unwrap();
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

#[test]
fn adopt_refuses_a_tree_that_cannot_be_packaged_and_touches_nothing() {
    let fleet = Fleet::new(1, "");
    legacy_app(&fleet.bases[0], "legacy");
    // A link out of the tree: `release package` refuses it, so adoption does too.
    std::os::unix::fs::symlink("/etc/passwd", fleet.bases[0].join("current/public/leak")).unwrap();
    let v1 = fleet.upload("v1", &[]);
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait"]).assert_exit(7);
    assert!(out.stderr().contains("unadoptable") && out.stderr().contains("leaves the tree"), "{out}");
    assert!(fs::symlink_metadata(fleet.bases[0].join("current")).unwrap().is_dir());
    assert_eq!(fs::read_to_string(fleet.bases[0].join("current/version.txt")).unwrap(), "legacy");
    assert!(release_dirs(&fleet.bases[0]).is_empty());
}

/// A hook outlives its agent when the server is killed: the restarted server's hooks on that
/// node wait for it (its process group is noted in `.release/hook`) instead of running beside it.
#[test]
fn a_hook_still_running_from_a_killed_server_is_waited_for_before_the_next_one_starts() {
    let reload = "hooks.reload = [\"echo start $RELEASE_DIGEST >> $RELEASE_BASE/hooks.log; \
                  test ! -e $RELEASE_BASE/shared/slow || sleep 4; echo end $RELEASE_DIGEST >> $RELEASE_BASE/hooks.log\"]";
    let mut fleet = Fleet::new(1, reload);
    let v1 = fleet.upload("v1", &[]);
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    let log = fleet.bases[0].join("hooks.log");
    fs::write(&log, "").unwrap();
    fs::write(fleet.bases[0].join("shared/slow"), "").unwrap();
    let v2 = fleet.upload("v2", &[]);
    fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    // Killed while v2's reload sleeps on the node.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !fs::read_to_string(&log).unwrap().contains("start") {
        assert!(std::time::Instant::now() < deadline, "{}", fleet.f.server.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fleet.f.server.kill();
    fs::remove_file(fleet.bases[0].join("shared/slow")).unwrap();
    fleet.f.server.restart();
    // The restarted server finds the node on v2 and reloads it again: after the first ended.
    let settled = fleet.f.settle(2);
    assert_eq!(settled["state"], "live", "{settled}");
    let lines: Vec<String> =
        fs::read_to_string(&log).unwrap().lines().map(|l| l.split(' ').next().unwrap().to_owned()).collect();
    assert_eq!(lines, ["start", "end", "start", "end"], "the hooks ran one after the other");
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

/// A small HTTP server on `port` standing in for a node's application: it answers with the
/// digest `<base>/current` points at and `current/health.txt`, read at each request (so it
/// follows the switch); status 500 when that file starts with `500`, 503 while
/// `<base>/shared/starting` exists, else 200. Killed when dropped.
struct HealthServer(std::process::Child);

impl HealthServer {
    fn start(port: u16, base: &Path) -> HealthServer {
        let script = r#"
import http.server, os, sys
base = sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            digest = "sha256:" + os.path.basename(os.readlink(os.path.join(base, "current")))
        except OSError:
            digest = "none"
        try:
            text = open(os.path.join(base, "current", "health.txt"), "rb").read()
        except OSError:
            text = b""
        starting = os.path.exists(os.path.join(base, "shared", "starting"))
        code = 503 if starting else (500 if text.startswith(b"500") else 200)
        body = digest.encode() + b"\n" + text
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;
        let child = std::process::Command::new("python3")
            .args(["-c", script, &port.to_string()])
            .arg(base)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "the health server did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        HealthServer(child)
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// When node phase `phase` of a release ended.
fn phase_end<'a>(release: &'a Value, phase: &str) -> &'a Value {
    let phases = release["deployments"].as_array().unwrap();
    &phases.iter().find(|d| d["phase"] == phase).unwrap_or_else(|| panic!("no {phase} in {release}"))["finished_at"]
}

/// The time between two RFC 3339 instants, in seconds.
fn seconds_between(from: &Value, to: &Value) -> f64 {
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
    };
    (parse(to) - parse(from)).as_seconds_f64()
}

/// With the health check's defaults, a release that is up and answers 500 is switched back
/// as soon as that is clear (five wrong answers 200 ms apart), not after the 15 s a release
/// still starting gets.
#[test]
fn a_release_answering_500_is_switched_back_within_two_seconds_of_its_switch() {
    let port = free_port();
    let health = format!("health = {{ url = \"http://127.0.0.1:{port}/\", expect = \"{{digest}}\" }}");
    let fleet = Fleet::new(1, &health);
    let _app = HealthServer::start(port, &fleet.bases[0]);
    let good = fleet.upload("v1", &[("health.txt", b"fine")]);
    assert_eq!(fleet.deploy(&good)["state"], "live");
    let broken = fleet.upload("v2", &[("health.txt", b"500 boom")]);
    let failed = fleet.deploy(&broken);
    assert_eq!(failed["state"], "failed", "{failed}");
    fleet.assert_all_on(&good);
    let reason = failed["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap();
    assert!(reason.contains("answered wrong 5 times in a row"), "{reason}");
    // Its check could prove the digest, but it never passed: not "verified".
    assert!(failed["verified"].is_null(), "{failed}");
    let page = fleet.f.server.http().get(format!("{}/releases/{}", fleet.f.server.url, failed["id"]));
    let page = page.bearer_auth(fleet.f.token("carol")).send().unwrap().text().unwrap();
    assert!(!page.contains("verified"), "{page}");
    let switch_to_back = seconds_between(phase_end(&failed, "switch"), phase_end(&failed, "switch back"));
    println!("switch → switch back: {switch_to_back:.2} s");
    // Far below the 15 s a release that never came up gets (the figure is printed above).
    assert!(switch_to_back < 10.0, "{switch_to_back} s: {failed}");
}

/// A release still starting (503, or nothing listening) has the whole timeout to come up;
/// answers that are wrong only break the streak of good ones.
#[test]
fn a_release_still_starting_gets_the_timeout_and_goes_live_when_it_answers() {
    let port = free_port();
    let health = format!(
        "health = {{ url = \"http://127.0.0.1:{port}/\", expect = \"{{digest}}\", timeout = \"20s\", healthy_after = 3 }}"
    );
    let fleet = Fleet::new(1, &health);
    let app = HealthServer::start(port, &fleet.bases[0]);
    let v1 = fleet.upload("v1", &[("health.txt", b"fine")]);
    assert_eq!(fleet.deploy(&v1)["state"], "live");

    // Workers restarting: 503 for 3 s after the switch, and for a while nothing listens.
    let starting = fleet.bases[0].join("shared/starting");
    fs::write(&starting, "").unwrap();
    drop(app);
    let v2 = fleet.upload("v2", &[("health.txt", b"fine")]);
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let _app = HealthServer::start(port, &fleet.bases[0]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    fs::remove_file(&starting).unwrap();
    let settled = fleet.f.settle(release["id"].as_i64().unwrap());
    assert_eq!(settled["state"], "live", "{settled}");
    let verify = settled["deployments"].as_array().unwrap().iter().find(|d| d["phase"] == "verify").unwrap().clone();
    assert_eq!(verify["outcome"], "ok", "{settled}");
}

/// A rollback to a release already on the node finalizes it again where the shared files
/// changed since its finalize hooks ran (a rotated `.env` a cached configuration would keep
/// out), and only there; the phase says which files it was finalized with.
#[test]
fn a_rollback_finalizes_again_where_the_shared_files_changed() {
    let finalize = "hooks.finalize = [\"cp config.txt FINALIZED_WITH\"]";
    let fleet = Fleet::new(2, finalize);
    let v1 = fleet.upload("v1", &[]);
    let v2 = fleet.upload("v2", &[]);
    fleet.deploy(&v1);
    fleet.deploy(&v2);
    // Node 1's configuration is rotated while v2 runs.
    fs::write(fleet.bases[0].join("shared/config.txt"), "rotated secret").unwrap();
    let out =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(out["state"], "live", "{out}");
    let v1_dir = |i: usize| fleet.bases[i].join("releases").join(&v1[7..]);
    assert_eq!(fs::read_to_string(v1_dir(0).join("FINALIZED_WITH")).unwrap(), "rotated secret", "finalized again");
    assert!(fs::read_to_string(v1_dir(1).join("FINALIZED_WITH")).unwrap().starts_with("config of"), "untouched");
    let prepares: Vec<(String, String)> = out["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["phase"] == "prepare")
        .map(|d| (d["node"].as_str().unwrap().to_owned(), d["output_tail"].as_str().unwrap().to_owned()))
        .collect();
    let node1 = prepares.iter().find(|(n, _)| n.ends_with("node1")).unwrap();
    assert!(
        node1.1.contains("shared files changed since it was finalized")
            && node1.1.contains("finalized again with config.txt sha256:"),
        "{prepares:?}"
    );
    let node2 = prepares.iter().find(|(n, _)| n.ends_with("node2")).unwrap();
    assert!(node2.1.starts_with("artifact: already here, ready; finalized with"), "{prepares:?}");
    // The release stays read-only outside its writable paths, and a second rollback to it
    // with nothing changed finalizes nothing.
    assert_eq!(fs::metadata(v1_dir(0).join("version.txt")).unwrap().permissions().mode() & 0o222, 0);
    fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait"]).assert_success();
    let again = fleet
        .f
        .cli("alice")
        .args(["rollback", "web", "--env", "staging", "--to", &v1, "--wait", "--json"])
        .assert_success()
        .json();
    for d in again["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "prepare") {
        let output = d["output_tail"].as_str().unwrap();
        assert!(output.starts_with("artifact: already here, ready; finalized with"), "{again}");
    }
}

/// The timeline's "took" runs from the request to the outcome (live), not to the release's
/// supersession by the next one.
#[test]
fn the_timeline_times_a_release_to_its_outcome_not_to_its_supersession() {
    let fleet = Fleet::new(1, "");
    let v1 = fleet.upload("v1", &[]);
    let first = fleet.deploy(&v1);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let v2 = fleet.upload("v2", &[]);
    fleet.deploy(&v2);
    let page =
        fleet.f.server.http().get(format!("{}/services/web", fleet.f.server.url)).bearer_auth(fleet.f.token("carol"));
    let page = page.send().unwrap().text().unwrap();
    let row = page.split("<tr>").find(|r| r.contains(&format!("/releases/{}\"", first["id"]))).unwrap();
    assert!(row.contains("superseded"), "{row}");
    let took = row.rsplit("<td>").next().unwrap();
    assert!(
        took.contains(" ms<") || took.starts_with('0') || took.starts_with("1.") || took.starts_with("2."),
        "took to its supersession: {row}"
    );
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
    let (_, release) =
        fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    let id = release["id"].as_i64().unwrap();
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

/// A system user for the hook_user tests (tests run as root, as in CI).
fn web_user() -> (String, u32) {
    let name = "release-web";
    let exists = std::process::Command::new("id").arg(name).output().unwrap().status.success();
    if !exists {
        let made = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .output()
            .unwrap();
        assert!(made.status.success() || String::from_utf8_lossy(&made.stderr).contains("exists"), "{made:?}");
    }
    let uid = std::process::Command::new("id").args(["-u", name]).output().unwrap();
    (name.to_owned(), String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap())
}

/// Issue 12 item 4: the application's hooks run as `hook_user` through `sudo -n -u`, with the
/// service's umask, so what they make in shared/ belongs to the web user and stays writable
/// by its group; a reload's service commands stay the SSH user's, its `php …` commands don't.
#[test]
fn hooks_run_as_the_hook_user_with_the_umask_and_reload_commands_split() {
    let (user, uid) = web_user();
    let out = "$RELEASE_BASE/shared/out";
    let extra = format!(
        "hook_user = \"{user}\"\numask = \"0002\"\n\
         hooks.finalize = [\"id -un > {out}/finalize-user; mkdir -p {out}/framework/cache; echo $RELEASE_DIGEST > {out}/digest\"]\n\
         hooks.reload = [\"id -un > {out}/reload-sh\", \"php -r 'echo exec(\\\"id -un\\\");' > {out}/reload-php\"]\n"
    );
    let fleet = Fleet::new(1, &extra);
    // The operator's part: shared/out belongs to the web user's group, set-group-ID.
    let shared_out = fleet.bases[0].join("shared/out");
    fs::create_dir_all(&shared_out).unwrap();
    std::os::unix::fs::chown(&shared_out, None, Some(primary_gid(&user))).unwrap();
    fs::set_permissions(&shared_out, fs::Permissions::from_mode(0o2775)).unwrap();

    let v1 = fleet.upload("v1", &[]);
    let live = fleet.deploy(&v1);
    assert_eq!(live["state"], "live", "{live}");
    let read = |name: &str| fs::read_to_string(shared_out.join(name)).unwrap().trim().to_owned();
    assert_eq!(read("finalize-user"), user);
    assert_eq!(read("digest"), v1, "the hook's variables reach it through sudo");
    assert_eq!(read("reload-php"), user, "a reload's php command is the application's");
    assert_eq!(read("reload-sh"), "root", "other reload commands stay the SSH user's");
    let made = fs::metadata(shared_out.join("framework/cache")).unwrap();
    assert_eq!(made.uid(), uid, "made by the web user");
    assert_eq!(made.mode() & 0o070, 0o070, "umask 0002: its group may write: {:o}", made.mode());
}

#[test]
fn a_hook_user_the_node_does_not_know_fails_the_prepare_naming_it() {
    let extra = "hook_user = \"release-no-such-user\"\nhooks.finalize = [\"true\"]\n";
    let fleet = Fleet::new(1, extra);
    let v1 = fleet.upload("v1", &[]);
    let failed = fleet.deploy(&v1);
    assert_eq!(failed["state"], "failed", "{failed}");
    let reason = failed["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("hook_user release-no-such-user is not a user on this node"), "{reason}");
}

fn primary_gid(user: &str) -> u32 {
    let out = std::process::Command::new("id").args(["-g", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `release check` warns, before it bites, on what the web user could not write in shared/
/// (issue 12 items 4 and 11), and passes once the operator gave it the group.
#[test]
fn release_check_warns_on_shared_entries_the_web_user_cannot_write() {
    let (user, _) = web_user();
    let root = tempfile::Builder::new().prefix("release-check-").tempdir().unwrap();
    let base = root.path().join("shop");
    fs::create_dir_all(base.join("shared/storage/framework/cache")).unwrap();
    let config = format!(
        "[service.shop]\nkind = \"generic\"\nshared = [\"storage\"]\nhook_user = \"{user}\"\n\
         [[service.shop.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\n",
        base.display()
    );
    let f = crate::releases::Fixture::with_config(&config);
    let check = || f.cli("alice").args(["check", "shop", "--env", "staging", "--json"]).assert_success().json();
    let ownership = |answer: &Value| {
        answer["nodes"][0]["checks"].as_array().unwrap().iter().find(|c| c["name"] == "ownership").unwrap().clone()
    };
    let answer = check();
    assert_eq!(answer["ok"], true, "a warning does not fail the check: {answer}");
    let row = ownership(&answer);
    assert_eq!(row["status"], "warn", "{row}");
    let message = row["message"].as_str().unwrap();
    assert!(message.contains(&format!("{user} cannot write 3 entries")) && message.contains("hook_user"), "{message}");

    let gid = primary_gid(&user);
    for dir in ["shared/storage", "shared/storage/framework", "shared/storage/framework/cache"] {
        std::os::unix::fs::chown(base.join(dir), None, Some(gid)).unwrap();
        fs::set_permissions(base.join(dir), fs::Permissions::from_mode(0o2775)).unwrap();
    }
    assert_eq!(ownership(&check())["status"], "pass");
}
