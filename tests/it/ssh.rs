//! Deploys over SSH to nodes behind real sshd instances on loopback addresses: a three-node
//! staging and a two-node production with approval, rollback, and the faults that SSH brings
//! (a node unreachable before prepare, sshd killed between prepare and switch), and a deploy
//! whose outcome the registry would not record, resolved from the nodes once its lease lapsed.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::archives::{RawTar, zstd};
use crate::support::sshd::{self, SshNode};
use crate::support::{Backend, TestServer};

struct SshFleet {
    f: Fixture,
    nodes: Vec<SshNode>,
    /// (environment, base) per node, in the order of `nodes`.
    bases: Vec<(String, PathBuf)>,
    /// The server's known_hosts file.
    known_hosts: PathBuf,
}

impl SshFleet {
    /// `layout`: the environment of each node. `finalize`: the service's finalize hook.
    fn new(backend: Backend, layout: &[&str], finalize: &str) -> SshFleet {
        SshFleet::with(backend, layout, &format!("hooks.finalize = [{finalize:?}]"), &[])
    }

    /// `service`: the service's hooks (and more); `env`: variables in the server's environment.
    fn with(backend: Backend, layout: &[&str], service: &str, env: &[(&str, &str)]) -> SshFleet {
        SshFleet::build(layout, service, |config| TestServer::start_with_env(backend, config, env))
    }

    /// `start` starts the server with the fleet's configuration.
    fn build(layout: &[&str], service: &str, start: impl FnOnce(&str) -> TestServer) -> SshFleet {
        SshFleet::build_as("root", layout, service, start)
    }

    /// As [`SshFleet::build`], logging in as `user` (who owns the bases, then).
    fn build_as(user: &str, layout: &[&str], service: &str, start: impl FnOnce(&str) -> TestServer) -> SshFleet {
        let nodes: Vec<SshNode> = layout.iter().map(|_| SshNode::start()).collect();
        let known_hosts = sshd::known_hosts(&nodes.iter().collect::<Vec<_>>());
        let mut config = format!(
            "[audit]\nrefusal_window = \"1s\"\n[ssh]\nidentity = \"{}\"\nknown_hosts = \"{}\"\nconnect_timeout = \"5s\"\ncommand_timeout = \"60s\"\n\
             [service.web]\nkind = \"generic\"\nshared = [\"config.txt\"]\n{service}\n",
            sshd::client_key().display(),
            known_hosts.display()
        );
        let mut bases = Vec::new();
        for (node, env) in nodes.iter().zip(layout) {
            let base = node.dir.join("base");
            fs::create_dir_all(base.join("shared")).unwrap();
            fs::write(base.join("shared/config.txt"), "config").unwrap();
            config.push_str(&format!(
                "[[service.web.node]]\nenvironment = \"{env}\"\nhost = \"{}\"\nport = {}\nuser = \"{user}\"\nbase = \"{}\"\n",
                node.address,
                node.port,
                base.display()
            ));
            if user != "root" {
                // Its sshd reads the authorized keys as the user, who must reach its base too.
                sshd::open_to_all(&node.dir);
                chown_tree(&base, user);
            }
            bases.push((env.to_string(), base));
        }
        config.push_str(
            "[[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\npromote_from = \"staging\"\nrequires_approval = true\n",
        );
        let server = start(&config);
        let f = Fixture::adopt(server);
        SshFleet { f, nodes, bases, known_hosts }
    }

    fn upload(&self, version: &str) -> String {
        let tar = RawTar::new().file("version.txt", version.as_bytes()).finish();
        let response = self
            .f
            .server
            .http()
            .post(format!("{}/v1/artifacts?service=web", self.f.server.url))
            .bearer_auth(self.f.token("ci"))
            .body(zstd(&tar))
            .send()
            .unwrap();
        assert!(response.status().is_success());
        response.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned()
    }

    /// Every node of `env` serves `digest`, and so say the registry and `status --nodes`.
    fn assert_env_on(&self, env: &str, digest: &str, version: &str) {
        for (node_env, base) in &self.bases {
            if node_env == env {
                assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(&digest[7..]));
                assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), version);
            }
        }
        let status = self.f.cli("carol").args(["status", "web", "--nodes", "--json"]).assert_success().json();
        let cell = status.as_array().unwrap().iter().find(|c| c["environment"] == env).unwrap();
        assert_eq!(cell["digest"], digest, "{cell}");
        let views = cell["nodes"].as_array().unwrap();
        assert!(!views.is_empty());
        assert!(views.iter().all(|n| n["current"] == digest && n["drift"] == false), "{cell}");
    }

    fn live_in(&self, env: &str, digest: &str) {
        let (status, release) =
            self.f.post("ci", "/v1/releases", json!({"service": "web", "environment": env, "digest": digest}));
        assert!(status.is_success(), "{release}");
        assert_eq!(self.f.settle(release["id"].as_i64().unwrap())["state"], "live");
    }

    fn release(&self, id: &Value) -> Value {
        self.f.get("carol", &format!("/v1/releases/{id}"))
    }
}

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
        assert!(prepare["output_tail"].as_str().unwrap().contains("presigned URL"), "{prepare}");
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
    let home = std::process::Command::new("sh").args(["-c", "getent passwd root | cut -d: -f6"]).output().unwrap();
    let bin = Path::new(String::from_utf8(home.stdout).unwrap().trim()).join(".release/bin");
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

fn time_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

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

/// Issue 12 item 11: `release check` on real sshd nodes, before the first deploy and after a
/// change breaks a node: a row per finding, exit 0 only if no node fails a check, nothing
/// changed on any node.
#[test]
fn release_check_finds_what_a_deploy_would_trip_on_and_changes_nothing() {
    let health = "health = { url = \"http://127.0.0.1:9/health\", expect = \"{digest}\" }\nhook_user = \"root\"";
    let mut fleet = SshFleet::with(Backend::Local, &["staging", "staging", "staging"], health, &[]);
    let check = |fleet: &SshFleet| fleet.f.cli("alice").args(["check", "web", "--env", "staging", "--json"]).run();
    let rows = |answer: &Value, node: usize| -> Vec<(String, String)> {
        answer["nodes"][node]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap().to_owned(), c["status"].as_str().unwrap().to_owned()))
            .collect()
    };
    let before: Vec<_> = fleet.bases.iter().map(|(_, b)| tree(b)).collect();

    // Before the first deploy: nothing fails (the health URL may not answer yet: a warning).
    let first = check(&fleet);
    assert_eq!(first.output.status.code(), Some(0), "{first}");
    let answer = first.json();
    assert_eq!(answer["ok"], true);
    for node in 0..3 {
        let found = rows(&answer, node);
        for (name, status) in
            [("reach", "pass"), ("base", "pass"), ("shared", "pass"), ("room", "pass"), ("health", "warn")]
        {
            assert!(found.contains(&(name.into(), status.into())), "node {node}: {found:?}");
        }
    }
    let after: Vec<_> = fleet.bases.iter().map(|(_, b)| tree(b)).collect();
    assert_eq!(before, after, "check changes nothing on a node");

    // Then broken: one node's shared file gone, one node's sshd down.
    fs::remove_file(fleet.bases[1].1.join("shared/config.txt")).unwrap();
    fleet.nodes[2].kill();
    let second = check(&fleet);
    assert_eq!(second.output.status.code(), Some(1), "{second}");
    let answer = second.json();
    assert_eq!(answer["ok"], false);
    assert!(rows(&answer, 1).contains(&("shared".into(), "fail".into())), "{answer}");
    let message =
        answer["nodes"][1]["checks"].as_array().unwrap().iter().find(|c| c["name"] == "shared").unwrap()["message"]
            .as_str()
            .unwrap()
            .to_owned();
    assert!(message.contains("config.txt does not exist: create it"), "{message}");
    assert_eq!(rows(&answer, 2), [("reach".to_owned(), "fail".to_owned())], "{answer}");
    assert!(!rows(&answer, 0).iter().any(|(_, status)| status == "fail"), "the good node stays good: {answer}");

    // The table, for a person: one row per finding, the failing ones named on stderr.
    let human = fleet.f.cli("alice").args(["check", "web", "--env", "staging"]).assert_exit(1);
    assert!(human.stdout().contains("FAIL") && human.stdout().contains("reach"), "{human}");
    assert!(human.stderr().contains("would fail a deploy"), "{human}");
    // Auditors may not make the server run commands on nodes.
    fleet.f.cli("carol").args(["check", "web", "--env", "staging"]).assert_exit(5);
}

/// `release check` on the failures a deploy would meet first: a node whose host key changed is
/// a failed `reach` row (the check goes on to the other nodes), a base that is not a directory
/// a failed `base` row; the server's answer names both and the exit status is 1.
#[test]
fn release_check_fails_a_changed_host_key_and_a_base_that_is_not_a_directory() {
    let fleet = SshFleet::with(Backend::Local, &["staging", "staging"], "", &[]);
    // Node 1 now shows a key other than the one known for it (node 0's).
    let lines = fs::read_to_string(&fleet.known_hosts).unwrap();
    let first: Vec<&str> = lines.lines().next().unwrap().split_whitespace().collect();
    let second: Vec<&str> = lines.lines().nth(1).unwrap().split_whitespace().collect();
    fs::write(
        &fleet.known_hosts,
        format!("{}\n{} {} {}\n", lines.lines().next().unwrap(), second[0], first[1], first[2]),
    )
    .unwrap();
    // Node 0's base is a file.
    fs::remove_dir_all(&fleet.bases[0].1).unwrap();
    fs::write(&fleet.bases[0].1, "not a directory").unwrap();

    let out = fleet.f.cli("alice").args(["check", "web", "--env", "staging", "--json"]).run();
    assert_eq!(out.output.status.code(), Some(1), "{out}");
    let answer = out.json();
    let find = |node: usize, name: &str| {
        answer["nodes"][node]["checks"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned()
    };
    let base = find(0, "base").expect("a base row");
    assert_eq!(base["status"], "fail", "{answer}");
    assert!(base["message"].as_str().unwrap().contains("is not a directory"), "{base}");
    assert_eq!(find(0, "reach").unwrap()["status"], "pass", "{answer}");
    let reach = find(1, "reach").expect("a reach row");
    assert_eq!(reach["status"], "fail", "{answer}");
    let message = reach["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("host key") || message.contains("host identification"), "{reach}");
    assert_eq!(answer["nodes"][1]["checks"].as_array().unwrap().len(), 1, "nothing asked of an unverified host");
    // Nothing was made in place of the file.
    assert_eq!(fs::read_to_string(&fleet.bases[0].1).unwrap(), "not a directory");
}

/// Every path under `base` with its size and mode: what a check must leave as it was.
fn tree(base: &Path) -> Vec<(PathBuf, u64, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![base.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        out.push((path.clone(), meta.len(), meta.mode()));
        if meta.is_dir() {
            for e in fs::read_dir(&path).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

/// `chown -R user: path`.
fn chown_tree(path: &Path, user: &str) {
    let status = std::process::Command::new("chown").arg("-R").arg(format!("{user}:")).arg(path).status().unwrap();
    assert!(status.success(), "chown -R {user}: {}", path.display());
}

/// Hooks as the service's `hook_user`: the file a finalize hook makes in shared/storage is
/// that user's, and with `umask = "002"` its directories are group-writable; the reload
/// (not the application's: no `php`) stays the SSH user's.
#[test]
fn hooks_run_as_the_hook_user_over_ssh_and_leave_shared_storage_theirs() {
    let Some(hook_uid) = sshd::system_user("release-hook", false) else { return };
    let finalize = "mkdir -p $RELEASE_BASE/shared/storage/framework/cache && id -un > $RELEASE_BASE/shared/storage/framework/cache/made-by";
    let service = format!(
        "hook_user = \"release-hook\"\numask = \"002\"\nhooks.finalize = [{finalize:?}]\n\
         hooks.reload = [\"id -un > $RELEASE_BASE/shared/reloaded-by\"]"
    );
    let fleet =
        SshFleet::build(&["staging"], &service, |config| TestServer::start_with_env(Backend::Local, config, &[]));
    sshd::open_to_all(&fleet.nodes[0].dir);
    let base = &fleet.bases[0].1;
    let storage = base.join("shared/storage");
    fs::create_dir_all(&storage).unwrap();
    chown_tree(&storage, "release-hook");
    let v1 = fleet.upload("v1");
    fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--wait"]).assert_success();
    use std::os::unix::fs::MetadataExt;
    let cache = storage.join("framework/cache");
    assert_eq!(fs::read_to_string(cache.join("made-by")).unwrap().trim(), "release-hook");
    for path in [storage.join("framework"), cache.clone(), cache.join("made-by")] {
        assert_eq!(fs::metadata(&path).unwrap().uid(), hook_uid, "{} is the hook user's", path.display());
    }
    assert_eq!(fs::metadata(&cache).unwrap().mode() & 0o777, 0o775, "umask 002: group-writable");
    assert_eq!(fs::read_to_string(base.join("shared/reloaded-by")).unwrap().trim(), "root", "reload: the SSH user");
}

/// A non-root SSH user without a sudoers rule: sudo asks for a password, `-n` makes it
/// refuse, and the deploy fails at finalize saying which sudoers line the node needs.
#[test]
fn a_hook_user_sudo_refuses_fails_the_deploy_naming_the_sudoers_line() {
    let Some(_) = sshd::system_user("release-hook", false) else { return };
    let Some(_) = sshd::system_user("release-deploy", true) else { return };
    let service = "hook_user = \"release-hook\"\nhooks.finalize = [\"touch made\"]";
    let fleet = SshFleet::build_as("release-deploy", &["staging"], service, |config| {
        TestServer::start_with_env(Backend::Local, config, &[])
    });
    let v1 = fleet.upload("v1");
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--wait"]).run();
    assert!(!out.output.status.success(), "{out}");
    let said = format!("{}{}", out.stdout(), out.stderr());
    for expected in [
        "as hook_user release-hook: sudo refused (sudo: a password is required)",
        "the SSH user release-deploy needs a sudoers line such as `release-deploy ALL=(release-hook) NOPASSWD: ALL`",
        "| sudo: a password is required",
    ] {
        assert!(said.contains(expected), "expected {expected:?} in: {said}");
    }
    assert!(fs::read_link(fleet.bases[0].1.join("current")).is_err(), "nothing switched");
}
