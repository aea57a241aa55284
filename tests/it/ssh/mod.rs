//! Deploys over SSH to nodes behind real sshd instances on loopback addresses: a three-node
//! staging and a two-node production with approval, rollback, and the faults that SSH brings
//! (a node unreachable before prepare, sshd killed between prepare and switch), and a deploy
//! whose outcome the registry would not record, resolved from the nodes once its lease lapsed.
//! This file holds the sshd fleet fixture the topic files share.

mod check;
mod deploy;
mod hooks;
mod lease;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::archives::{self, RawTar, zstd};
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

    /// A tree of 300 files of ~12 KiB (about 28 frames) packed by `release package`, `changed`
    /// of them holding other bytes, and `version.txt`; uploaded, its digest.
    fn upload_packaged(&self, version: &str, changed: &[usize]) -> String {
        let files = (0..300usize).map(|i| {
            let seed = if changed.contains(&i) { 1_000_000 + i } else { i } as u64;
            (format!("vendor/p{}/f{i}.php", i % 10), archives::letters(seed, 12_000))
        });
        self.f.upload_packaged(files.chain([("version.txt".to_owned(), version.as_bytes().to_vec())]))
    }

    fn upload(&self, version: &str) -> String {
        // lib.txt is the same in every version: a node links it from the release before.
        let tar = RawTar::new().file("version.txt", version.as_bytes()).file("lib.txt", b"the same library").finish();
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
