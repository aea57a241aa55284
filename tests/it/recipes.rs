//! The CI recipes in docs/ci/ run as written: each GitHub Actions workflow's `run:` steps in
//! order, in one workspace, against a real server, as a runner would (no `act` needed); and
//! the plain script for other CIs. So the examples cannot rot.
//!
//! What the runner provides and the test does too: `uses:` steps (checkout: the test writes
//! the application into the workspace; setup-php/setup-node: this machine's PHP, Composer and
//! Node.js), and the step "Install the release CLI" (the binary under test on PATH instead of
//! the team's .deb). Every other step runs verbatim in `bash -eo pipefail`, with GitHub's
//! variables (`GITHUB_ENV` carried between steps) and `${{ vars/secrets/inputs }}` filled in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::{Backend, TestServer, local_nodes};

/// A workflow's environment and its steps, read from docs/ci/github-actions/NAME.yml.
struct Workflow {
    name: String,
    env: Vec<(String, String)>,
    /// (name, script) of every `run:` step but the CLI install, in order.
    steps: Vec<(String, String)>,
}

impl Workflow {
    fn read(name: &str) -> Workflow {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("docs/ci/github-actions/{name}.yml"));
        let doc: yaml_serde::Value = yaml_serde::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let env = doc["env"]
            .as_mapping()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.as_str().unwrap().to_owned()))
            .collect();
        let jobs = doc["jobs"].as_mapping().expect("jobs");
        assert_eq!(jobs.len(), 1, "{name}: one job");
        let mut steps = Vec::new();
        let mut skipped_install = false;
        for step in jobs.values().next().unwrap()["steps"].as_sequence().unwrap() {
            if step.get("uses").is_some() {
                continue;
            }
            let title = step["name"].as_str().expect("every run step has a name").to_owned();
            let script = step["run"].as_str().expect("a step without uses runs something").to_owned();
            if title == "Install the release CLI" {
                skipped_install = true;
                continue;
            }
            steps.push((title, script));
        }
        assert!(skipped_install, "{name}: the CLI install step is named as the test expects");
        Workflow { name: name.to_owned(), env, steps }
    }
}

/// One runner: a workspace, the values of `${{ … }}`, GitHub's variables.
struct Runner {
    workspace: PathBuf,
    temp: PathBuf,
    values: BTreeMap<&'static str, String>,
    run_number: u32,
}

impl Runner {
    /// `${{ vars.X }}`, `${{ secrets.X }}` and `${{ inputs.X }}` filled in; anything else fails.
    fn expand(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(at) = rest.find("${{") {
            out.push_str(&rest[..at]);
            let end = rest[at..].find("}}").expect("closed expression") + at;
            let key = rest[at + 3..end].trim();
            let value = self.values.get(key).unwrap_or_else(|| panic!("the test has no value for ${{{{ {key} }}}}"));
            out.push_str(value);
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        out
    }

    /// Runs every step of `workflow`; returns each step's output. Panics at the first that fails.
    fn run(&mut self, workflow: &Workflow) -> Vec<Output> {
        self.run_number += 1;
        let github_env = self.temp.join(format!("github-env-{}", self.run_number));
        std::fs::write(&github_env, "").unwrap();
        let mut outputs = Vec::new();
        for (title, script) in &workflow.steps {
            let out = self.step(workflow, &github_env, script).output().unwrap();
            assert!(
                out.status.success(),
                "{} step {title:?} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
                workflow.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            outputs.push(out);
        }
        outputs
    }

    /// The command for one step, as a runner would start it.
    fn step(&self, workflow: &Workflow, github_env: &Path, script: &str) -> Command {
        let bin_dir = Path::new(crate::support::bin()).parent().unwrap();
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail", "-c", &self.expand(script)])
            .current_dir(&self.workspace)
            .env_clear()
            .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()))
            .env("HOME", self.temp.join("home"))
            // GitHub's runners are not root; this machine's tests are.
            .env("COMPOSER_ALLOW_SUPERUSER", "1")
            .env("CI", "true")
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_ENV", github_env)
            .env("GITHUB_REF_NAME", "main")
            .env("GITHUB_RUN_NUMBER", self.run_number.to_string())
            .env("GITHUB_RUN_ID", format!("{}", 9000 + self.run_number))
            .env("GITHUB_SHA", "4c1f2a9e0b7d3c5a6e8f90123456789abcdef012")
            .env("GITHUB_SERVER_URL", "https://github.com")
            .env("GITHUB_REPOSITORY", "acme/app")
            .env("RUNNER_TEMP", &self.temp);
        for (key, value) in &workflow.env {
            cmd.env(key, self.expand(value));
        }
        // What earlier steps wrote to GITHUB_ENV (KEY=value lines).
        for line in std::fs::read_to_string(github_env).unwrap().lines() {
            let (key, value) = line.split_once('=').expect("KEY=value");
            cmd.env(key, value);
        }
        cmd
    }
}

fn write(root: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// A Laravel-shaped application as a checkout holds it: Composer and npm manifests (no
/// packages to fetch), an asset build, and what must never be packaged.
fn laravel_checkout(root: &Path) {
    write(
        root,
        &[
            ("composer.json", r#"{"name": "acme/shop", "require": {}, "autoload": {"psr-4": {"App\\": "app/"}}}"#),
            ("app/Models/Order.php", "<?php\nnamespace App\\Models;\nclass Order {}\n"),
            ("public/index.php", "<?php require __DIR__.'/../vendor/autoload.php'; echo 'shop';\n"),
            (
                "package.json",
                r#"{"name": "shop", "private": true, "scripts": {"build": "mkdir -p public/build && echo built > public/build/app.js"}}"#,
            ),
            (
                "package-lock.json",
                r#"{"name": "shop", "lockfileVersion": 3, "requires": true, "packages": {"": {"name": "shop"}}}"#,
            ),
            (".env", "APP_KEY=a-developer-secret\n"),
            ("storage/logs/laravel.log", "a developer's log\n"),
            ("tests/Feature/OrderTest.php", "<?php\n"),
        ],
    );
}

fn node_checkout(root: &Path) {
    write(
        root,
        &[
            (
                "package.json",
                r#"{"name": "storefront", "private": true, "main": "dist/server.js", "scripts": {"build": "mkdir -p dist && cp src/server.js dist/server.js"}}"#,
            ),
            (
                "package-lock.json",
                r#"{"name": "storefront", "lockfileVersion": 3, "requires": true, "packages": {"": {"name": "storefront"}}}"#,
            ),
            ("src/server.js", "require('http').createServer((q, s) => s.end('storefront')).listen(3000);\n"),
            (".env", "SECRET=never-packaged\n"),
            ("test/server.test.js", "\n"),
        ],
    );
}

/// A server with shop (staging, production) and storefront (staging) on local nodes, whose
/// shared files the operator has put in place.
fn start() -> TestServer {
    let config = format!(
        "[service.shop]\nshared = [\".env\", \"storage\"]\n[service.storefront]\nshared = [\".env\"]\n{}{}",
        local_nodes("shop", &["staging", "production"]),
        local_nodes("storefront", &["staging"])
    );
    let server = TestServer::start_with(Backend::Local, &config);
    let nodes = server.data_dir().parent().unwrap().join("nodes");
    for base in ["shop-staging", "shop-production", "storefront-staging"] {
        write(&nodes.join(base), &[("shared/.env", "APP_KEY=the-node's-own\n"), ("shared/storage/logs/.keep", "")]);
    }
    server
}

fn runner(server: &TestServer, root: &Path, name: &str, token: &str) -> Runner {
    let (workspace, temp) = (root.join(format!("{name}-workspace")), root.join(format!("{name}-temp")));
    std::fs::create_dir_all(&workspace).unwrap();
    std::fs::create_dir_all(temp.join("home")).unwrap();
    let values = BTreeMap::from([
        ("vars.RELEASE_SERVER", server.url.clone()),
        ("vars.RELEASE_DEB_URL", "https://packages.example.com/release.deb".to_owned()),
        ("secrets.RELEASE_TOKEN", token.to_owned()),
    ]);
    Runner { workspace, temp, values, run_number: 0 }
}

/// The file a node serves for `service` in `env`, or None.
fn served(server: &TestServer, service: &str, env: &str, path: &str) -> Option<String> {
    let base = server.data_dir().parent().unwrap().join("nodes").join(format!("{service}-{env}"));
    std::fs::read_to_string(base.join("current").join(path)).ok()
}

#[test]
fn the_laravel_and_promote_workflows_run_as_written() {
    let server = start();
    let ci = server.token_with("gh-shop", "ci", &["--owner", "github", "--services", "shop"]);
    let root = tempfile::tempdir().unwrap();
    let mut ci_runner = runner(&server, root.path(), "laravel", &ci);
    laravel_checkout(&ci_runner.workspace);
    let laravel = Workflow::read("laravel");
    ci_runner.run(&laravel);

    // Built once in CI: dependencies and assets in; the shared paths, tests and git out.
    assert_eq!(served(&server, "shop", "staging", "public/build/app.js").as_deref(), Some("built\n"));
    assert!(served(&server, "shop", "staging", "vendor/autoload.php").is_some());
    assert!(served(&server, "shop", "staging", "vendor/composer/autoload_classmap.php").unwrap().contains("Order"));
    for absent in ["node_modules", "tests", "storage/logs/laravel.log"] {
        assert!(served(&server, "shop", "staging", absent).is_none(), "{absent} was packaged");
    }
    // .env is the node's own (shared/.env), never the developer's.
    assert_eq!(served(&server, "shop", "staging", ".env").as_deref(), Some("APP_KEY=the-node's-own\n"));

    // The same commit built again: the same digest, so no bytes sent (the deploy runs again).
    let again = ci_runner.run(&laravel);
    let upload = String::from_utf8_lossy(&again[2].stderr).into_owned();
    assert!(upload.contains("nothing sent"), "{upload}");

    // Production by hand: the workflow waits for a person's approval, then for the release.
    let deployer = server.token_with("gh-promote", "deployer", &["--owner", "github", "--services", "shop"]);
    let approver = server.token("dana", "approver");
    let mut promote_runner = runner(&server, root.path(), "promote", "");
    promote_runner.values.insert("secrets.RELEASE_PROMOTE_TOKEN", deployer);
    promote_runner.values.insert("inputs.service", "shop".to_owned());
    let promote = Workflow::read("promote");
    assert_eq!(promote.steps.len(), 1, "{:?}", promote.steps);
    let github_env = promote_runner.temp.join("github-env");
    std::fs::write(&github_env, "").unwrap();
    let mut job = promote_runner.step(&promote, &github_env, &promote.steps[0].1).spawn().unwrap();
    let pending = wait_for_pending(&server, &approver);
    assert!(job.try_wait().unwrap().is_none(), "the job waits for the approval");
    server.cli().env("RELEASE_TOKEN", &approver).args(["approve", &pending.to_string()]).assert_success();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = job.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the promote job did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "promote job: {status}");
    assert_eq!(served(&server, "shop", "production", "public/build/app.js").as_deref(), Some("built\n"));
}

/// The id of the production release of shop waiting for approval, once there is one.
fn wait_for_pending(server: &TestServer, token: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let history = server
            .cli()
            .env("RELEASE_TOKEN", token)
            .args(["history", "shop", "--env", "production", "--json"])
            .assert_success()
            .json();
        if let Some(r) = history.as_array().unwrap().iter().find(|r| r["state"] == "pending_approval") {
            return r["id"].as_i64().unwrap();
        }
        assert!(Instant::now() < deadline, "no release waits for approval: {history}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_node_workflow_and_the_plain_script_run_as_written() {
    let server = start();
    let ci = server.token_with("gh-storefront", "ci", &["--owner", "github", "--services", "storefront"]);
    let root = tempfile::tempdir().unwrap();
    let mut ci_runner = runner(&server, root.path(), "node", &ci);
    node_checkout(&ci_runner.workspace);
    ci_runner.run(&Workflow::read("node"));
    assert!(served(&server, "storefront", "staging", "dist/server.js").unwrap().contains("storefront"));
    assert!(served(&server, "storefront", "staging", "test/server.test.js").is_none());

    // The plain script, from another CI: a new build in a git checkout.
    let checkout = root.path().join("script-checkout");
    node_checkout(&checkout);
    write(&checkout, &[("dist/server.js", "// build 2\n")]);
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).current_dir(&checkout).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&["-c", "user.email=ci@example.com", "-c", "user.name=ci", "commit", "-q", "--allow-empty", "-m", "build 2"]);
    let commit = git(&["rev-parse", "HEAD"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ci/release.sh");
    let bin_dir = Path::new(crate::support::bin()).parent().unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(&checkout)
        .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()))
        .env("RELEASE_SERVER", &server.url)
        .env("RELEASE_TOKEN", &ci)
        .env("SERVICE", "storefront")
        .env("EXCLUDE", ".env .git test")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "release.sh: {}\n{stderr}", out.status);
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(served(&server, "storefront", "staging", "dist/server.js").as_deref(), Some("// build 2\n"));
    let meta = server.cli().env("RELEASE_TOKEN", &ci).args(["artifact", "show", &digest, "--json"]).assert_success();
    let meta = meta.json();
    assert_eq!(meta["uploads"][0]["git_sha"], commit.as_str());
    assert_eq!(meta["uploads"][0]["version"], &commit[..12]);
}
