//! Nodes that stall or lie (SECURITY.md, "a compromised node"): what the server accepts from
//! a node, and what the node agent keeps of a hook, is bounded; a stalled node costs a bounded
//! wait and fails only its own cell or deploy. Hostile nodes are real sshd nodes on loopback
//! whose agent command is replaced by a script (`ForceCommand`).

use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::sshd::{self, SshNode};
use crate::support::{Backend, TestServer, bin};

/// The agent of a node that behaves except for one kind of request: `op` (e.g. `status`) is
/// answered by `then` (shell, with the request line in `$line`), every other request goes to
/// the real agent.
fn agent_lying_on(op: &str, then: &str) -> String {
    format!(
        "IFS= read -r line\ncase \"$line\" in\n  '{{\"op\":\"{op}\"'*)\n{then}\n    ;;\n  \
         *) {{ printf '%s\\n' \"$line\"; cat; }} | $SSH_ORIGINAL_COMMAND ;;\nesac\n"
    )
}

/// A server for service `api` with one node per (environment, node); `server` lines (e.g.
/// `node_url`) and `extra` configuration.
struct Hostile {
    f: Fixture,
    nodes: Vec<SshNode>,
    bases: Vec<PathBuf>,
}

impl Hostile {
    fn start(nodes: Vec<(&str, SshNode)>, server: &str, extra: &str) -> Hostile {
        let known_hosts = sshd::known_hosts(&nodes.iter().map(|(_, n)| n).collect::<Vec<_>>());
        let mut config = format!(
            "{extra}\n[ssh]\nidentity = \"{}\"\nknown_hosts = \"{}\"\nconnect_timeout = \"5s\"\ncommand_timeout = \"60s\"\n\
             [service.api]\nkind = \"generic\"\nshared = [\"config.txt\"]\n",
            sshd::client_key().display(),
            known_hosts.display()
        );
        let mut bases = Vec::new();
        for (env, node) in &nodes {
            let base = node.dir.join("base");
            fs::create_dir_all(base.join("shared")).unwrap();
            fs::write(base.join("shared/config.txt"), "config").unwrap();
            config.push_str(&format!(
                "[[service.api.node]]\nenvironment = \"{env}\"\nhost = \"{}\"\nport = {}\nuser = \"root\"\nbase = \"{}\"\n",
                node.address,
                node.port,
                base.display()
            ));
            bases.push(base);
        }
        config.push_str("[[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\n");
        let server = TestServer::start_with_server(Backend::Local, server, &config);
        Hostile { f: Fixture::adopt(server), nodes: nodes.into_iter().map(|(_, n)| n).collect(), bases }
    }

    fn name(&self, i: usize) -> String {
        format!("{}:{}", self.nodes[i].address, self.nodes[i].port)
    }

    /// `GET /v1/status?nodes=true`: its status, its answer, how long it took.
    fn status_nodes(&self) -> (u16, Value, Duration) {
        let started = Instant::now();
        let response = self
            .f
            .server
            .http()
            .get(format!("{}/v1/status?nodes=true", self.f.server.url))
            .bearer_auth(self.f.token("carol"))
            .timeout(Duration::from_secs(120))
            .send()
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null), started.elapsed())
    }

    /// The node view of `env`'s cell in a status answer.
    fn node_in<'a>(status: &'a Value, env: &str) -> &'a Value {
        let cell = status.as_array().unwrap().iter().find(|c| c["environment"] == env).unwrap();
        &cell["nodes"][0]
    }
}

impl Hostile {
    /// Requests `digest` in `env` (with `adopt`) and waits for its end.
    fn deploy(&self, env: &str, digest: &str, adopt: bool) -> Value {
        let (status, release) = self.f.post(
            "ci",
            "/v1/releases",
            json!({"service": "api", "environment": env, "digest": digest, "adopt": adopt}),
        );
        assert!(status.is_success(), "{release}");
        self.f.settle(release["id"].as_i64().unwrap())
    }
}

/// The peak RSS (KiB) of `release node` answering `request`, and its answer. Read from its
/// VmHWM while it runs: the rusage of a child spawned by vfork (or fork) starts from this test
/// process's own peak, which other tests in it make large.
fn node_agent_peak_rss(request: &serde_json::Value) -> (u64, serde_json::Value) {
    let mut child = Command::new(bin()).arg("node").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), "{request}").unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reading = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        out
    });
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        let text = std::fs::read_to_string(&status).unwrap_or_default();
        let hwm =
            text.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().split(' ').next()?.parse().ok());
        peak = peak.max(hwm.unwrap_or(0));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    (peak, serde_json::from_str(reading.join().unwrap().trim()).unwrap())
}

#[test]
fn a_hook_printing_hundreds_of_megabytes_keeps_the_agent_small() {
    let base = tempfile::tempdir().unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    std::fs::create_dir_all(base.path().join("releases").join("ab".repeat(32))).unwrap();
    std::fs::create_dir_all(base.path().join(".release/ready")).unwrap();
    std::fs::write(base.path().join(".release/ready").join("ab".repeat(32)), "").unwrap();
    let request = json!({
        "op": "exec", "base": base.path(), "digest": digest, "env": {},
        "commands": ["head -c 300000000 /dev/zero | tr '\\0' x; echo; echo the end"],
    });
    let (rss_kib, answer) = node_agent_peak_rss(&request);
    eprintln!("a hook printing 300 MB: the agent's peak RSS {} MiB", rss_kib / 1024);
    assert_eq!(answer["ok"], true, "{answer}");
    let output = answer["output"].as_str().unwrap();
    assert!(output.ends_with("x\nthe end\n"), "the tail is kept: {:?}", &output[output.len() - 40..]);
    assert!(output.len() <= 4000, "{}", output.len());
    assert!(rss_kib < 64 * 1024, "the agent held {} MiB for a hook's output", rss_kib / 1024);
}

#[test]
fn a_node_flooding_stderr_or_stdout_costs_a_bounded_read_not_a_stall() {
    // Staging's node writes 8 MB on stderr before its (valid) answer: read one pipe after the
    // other, the agent blocks on the full one and the server waits for the other until its
    // command timeout. Production's node answers 40 MB: over the cap, refused by name.
    let flood_stderr = agent_lying_on(
        "status",
        "head -c 8000000 /dev/zero >&2; echo '{\"ok\":true,\"protocol\":3,\"current\":null,\"plain\":false,\"ready\":[],\"unready\":[]}'",
    );
    let flood_stdout = agent_lying_on("status", "head -c 40000000 /dev/zero | tr '\\0' x");
    let fleet = Hostile::start(
        vec![("staging", SshNode::hostile(&flood_stderr)), ("production", SshNode::hostile(&flood_stdout))],
        "",
        "",
    );
    let (status, answer, took) = fleet.status_nodes();
    eprintln!("status --nodes with a node flooding stderr and one flooding stdout: HTTP {status} in {took:?}");
    assert_eq!(status, 200, "{answer}");
    let staging = Hostile::node_in(&answer, "staging");
    assert!(staging["error"].is_null(), "its answer is read while its stderr is: {staging}");
    let production = Hostile::node_in(&answer, "production");
    let error = production["error"].as_str().unwrap();
    assert!(error.contains("16 MiB") && error.contains(&fleet.name(1)), "refused by name and cap: {error}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(!fleet.bases[0].join("current").exists(), "asking changed nothing there");
}

/// Why a failed release failed (its last transition's reason).
fn reason_of(release: &Value) -> &str {
    let last = release["transitions"].as_array().unwrap().last().unwrap();
    last["reason"].as_str().unwrap_or_else(|| panic!("no reason: {release:.2000}"))
}

/// Whether `text` holds a control character other than a newline or a tab.
fn has_control(text: &str) -> bool {
    text.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
}

#[test]
fn what_a_node_says_is_cut_cleaned_and_counted_before_it_is_recorded() {
    // Staging's node refuses prepare with terminal escapes and megabytes of text; production's
    // switches, then claims 20,000 shared files the server never asked about.
    let refuses = agent_lying_on(
        "prepare",
        r#"cat >/dev/null
printf '{"ok":false,"protocol":3,"code":"evil\\u001b[31m%s","message":"\\u001b[2J\\u001b[Hrelease approved by root\\r%s","output":"\\u0007%s"}\n' "$(head -c 300 /dev/zero | tr '\0' c)" "$(head -c 100000 /dev/zero | tr '\0' m)" "$(head -c 1000000 /dev/zero | tr '\0' o)""#,
    );
    let claims = agent_lying_on(
        "switch",
        r#"answer=$({ printf '%s\n' "$line"; cat; } | $SSH_ORIGINAL_COMMAND)
printf '{"ok":true,"protocol":3,"previous":null,"output":"\\u001b]0;owned\\u0007%s","shared":[' "$(head -c 100000 /dev/zero | tr '\0' o)"
awk 'BEGIN { for (i = 0; i < 20000; i++) { if (i) printf ","; printf "{\"path\":\"../../x%d\\u001b[2J\",\"kind\":\"file\"}", i } }'
echo ']}'"#,
    );
    let fleet = Hostile::start(
        vec![("staging", SshNode::hostile(&refuses)), ("production", SshNode::hostile(&claims))],
        "",
        "",
    );
    let v1 = fleet.f.upload("v1");

    let failed = fleet.deploy("staging", &v1, false);
    assert_eq!(failed["state"], "failed", "{failed}");
    let reason = reason_of(&failed);
    assert!(!has_control(reason) && reason.len() <= 2500, "{} bytes: {:?}", reason.len(), &reason[..200]);
    for deployment in failed["deployments"].as_array().unwrap() {
        let output = deployment["output_tail"].as_str().unwrap_or_default();
        assert!(!has_control(output) && output.len() <= 8100, "{} bytes: {deployment:.300}", output.len());
    }
    for event in fleet.f.events("release.failed") {
        let text = event.to_string();
        assert!(text.len() < 10_000 && !text.contains("\\u001b"), "{} bytes", text.len());
    }

    let live = fleet.deploy("production", &v1, false);
    assert_eq!(live["state"], "live", "{live:.2000}");
    let files = live["shared_files"].as_array().unwrap();
    assert!(files.len() <= 1, "{} shared files taken from the node", files.len());
    assert!(files.iter().all(|f| f["path"] == "config.txt"), "{files:?}");
    for deployment in live["deployments"].as_array().unwrap() {
        let output = deployment["output_tail"].as_str().unwrap_or_default();
        assert!(!has_control(output) && output.len() <= 8100, "{} bytes: {deployment:.300}", output.len());
    }
}

#[test]
fn a_stalled_node_shows_as_a_timeout_in_its_cell_and_the_cells_are_asked_at_once() {
    // Two "nodes" that take the connection and never say a word, one per cell; SSH would wait
    // its whole connect timeout (60 s) for each, one cell after the other.
    let silent: Vec<std::net::TcpListener> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("known_hosts");
    fs::write(&known_hosts, "").unwrap();
    let mut config = format!(
        "[limits]\nrequest_timeout = \"40s\"\n[ssh]\nknown_hosts = \"{}\"\nconnect_timeout = \"60s\"\n\
         [service.web]\nkind = \"generic\"\n",
        known_hosts.display()
    );
    for (listener, env) in silent.iter().zip(["staging", "production"]) {
        config.push_str(&format!(
            "[[service.web.node]]\nenvironment = \"{env}\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"root\"\n\
             base = \"/srv/web\"\n",
            listener.local_addr().unwrap().port()
        ));
    }
    config.push_str("[[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\n");
    let server = TestServer::start_with(Backend::Local, &config);
    let carol = server.token_with("carol", "auditor", &["--owner", "carol"]);
    let started = Instant::now();
    let response = server
        .http()
        .get(format!("{}/v1/status?nodes=true", server.url))
        .bearer_auth(&carol)
        .timeout(Duration::from_secs(120))
        .send()
        .unwrap();
    let took = started.elapsed();
    let status = response.status().as_u16();
    let answer: Value = response.json().unwrap();
    eprintln!("status --nodes with two silent nodes in two cells: HTTP {status} in {took:?}");
    assert_eq!(status, 200, "{answer}");
    for env in ["staging", "production"] {
        let node = Hostile::node_in(&answer, env);
        let error = node["error"].as_str().unwrap_or_default();
        assert!(error.contains("no answer within 15 s"), "{env}: {node}");
    }
    assert!(took >= Duration::from_secs(14) && took < Duration::from_secs(25), "{took:?}");
    drop(silent);
}

#[test]
fn an_artifact_fetch_that_stalls_fails_the_deploy_after_the_stall_timeout() {
    // Where the nodes fetch artifacts (`node_url`): answers 200, sends a little, then nothing.
    let stalling = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stalling.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in stalling.incoming() {
            let mut stream = stream.unwrap();
            let mut head = [0; 4096];
            let _ = stream.read(&mut head);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n");
            let _ = stream.write_all(&[0x28, 0xb5, 0x2f, 0xfd]);
            held.push(stream);
        }
    });
    let fleet = Hostile::start(
        vec![("staging", SshNode::start())],
        &format!("node_url = \"http://127.0.0.1:{port}\"\n"),
        "[limits]\nnode_fetch_stall_timeout = \"3s\"\n",
    );
    let v1 = fleet.f.upload("v1");
    let started = Instant::now();
    let failed = fleet.deploy("staging", &v1, false);
    let took = started.elapsed();
    eprintln!("a deploy whose artifact fetch stalls: {} after {took:?}", failed["state"]);
    assert_eq!(failed["state"], "failed", "{failed}");
    let reason = reason_of(&failed);
    assert!(reason.contains("stalled") && reason.contains("3 s"), "{reason}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert!(!fleet.bases[0].join("current").exists());
}

#[test]
fn an_adopted_package_sent_cut_short_is_refused_and_nothing_is_kept() {
    // The node packages its legacy tree truly, then sends 4 bytes of it and says that is all.
    let cuts = agent_lying_on(
        "read_adopted",
        r#"{ printf '%s\n' "$line"; cat; } | $SSH_ORIGINAL_COMMAND >/dev/null
echo '{"ok":true,"protocol":3,"data":"28b52ffd","eof":true}'"#,
    );
    let fleet = Hostile::start(vec![("staging", SshNode::hostile(&cuts))], "", "");
    let current = fleet.bases[0].join("current");
    fs::create_dir_all(current.join("public")).unwrap();
    fs::write(current.join("version.txt"), "legacy").unwrap();
    fs::write(current.join("public/index.html"), "legacy page").unwrap();
    let v1 = fleet.f.upload("v1");
    let failed = fleet.deploy("staging", &v1, true);
    assert_eq!(failed["state"], "failed", "{failed}");
    let reason = reason_of(&failed);
    assert!(reason.contains(&fleet.name(0)) && reason.contains("4 bytes of the adopted package"), "{reason}");
    let artifacts = fleet.f.get("carol", "/v1/services/api/artifacts");
    assert_eq!(artifacts["artifacts"].as_array().map(Vec::len), Some(1), "only v1 is kept: {artifacts}");
    assert!(current.join("version.txt").exists(), "the legacy tree is untouched");
}

/// A node asked which frames of the artifact it lacks (it holds an older release, and the
/// artifact rides its stdin) that answers with a list out of order, or naming a frame past the
/// artifact's, or asking in another protocol version than this build's, is refused naming the
/// node and what it said; nothing is sent to it (its stdin
/// is closed at once) and the deploy fails with nothing switched. A first line that is no
/// question at all is taken for the answer (the prepare fails, naming the node).
#[test]
fn a_node_lying_about_the_frames_it_lacks_is_refused_and_sent_nothing() {
    for (said, why) in [
        (r#"{"protocol":3,"lacking":{"frames":[5,2],"of":9}}"#, "it said it lacks frame 2 after frame 5"),
        (
            r#"{"protocol":3,"lacking":{"frames":[0,99999],"of":99999}}"#,
            "it said it lacks frame 99999 of an artifact of",
        ),
        (
            r#"{"protocol":4,"lacking":{"frames":[0],"of":9}}"#,
            "asks for frames in node protocol 4, not 3: its agent is another build",
        ),
        ("not a question", "not JSON"),
    ] {
        // The prepare asked for frames says `said`, then notes how many bytes it was sent.
        let noted = tempfile::tempdir().unwrap().keep().join("sent-bytes");
        let lies = format!(
            "IFS= read -r line\ncase \"$line\" in\n  *'\"ask_frames\":true'*)\n    echo '{said}'\n    \
             wc -c > {}\n    ;;\n  *) {{ printf '%s\\n' \"$line\"; cat; }} | $SSH_ORIGINAL_COMMAND ;;\nesac\n",
            noted.display()
        );
        let fleet = Hostile::start(vec![("staging", SshNode::hostile(&lies))], "", "");
        let files = |changed: usize| {
            (0..300usize).map(move |i| {
                let seed = if i == changed { 1_000_000 } else { i } as u64;
                (format!("vendor/p{}/f{i}.php", i % 10), crate::support::archives::letters(seed, 12_000))
            })
        };
        let v1 = fleet.f.upload_packaged_for("api", files(usize::MAX));
        let v2 = fleet.f.upload_packaged_for("api", files(7));
        assert_eq!(fleet.deploy("staging", &v1, false)["state"], "live");
        let failed = fleet.deploy("staging", &v2, false);
        assert_eq!(failed["state"], "failed", "{failed}");
        let reason = reason_of(&failed);
        assert!(reason.contains(&fleet.name(0)) && reason.contains(why), "{said}: {reason}");
        let sent = fs::read_to_string(&noted).unwrap();
        assert_eq!(sent.trim(), "0", "{said}: nothing is sent after a lie");
        let current = fs::read_link(fleet.bases[0].join("current")).unwrap();
        assert!(current.ends_with(v1.trim_start_matches("sha256:")), "still on v1: {current:?}");
    }
}

/// A build before protocol 1 asked with `--protocol` (clap refuses the flag: nothing on
/// stdout, exit 2), found at this build's own path: the server names it and what it is, and
/// replaces it with its own binary (a new file renamed over it), instead of "the node agent
/// failed".
#[test]
fn an_agent_older_than_the_protocol_at_this_builds_path_is_named_and_replaced() {
    let old = "echo \"error: unexpected argument '--protocol' found\" >&2\necho 'Usage: release node' >&2\nexit 2\n";
    let fleet = Hostile::start(vec![("staging", SshNode::hostile(old))], "", "");
    // This build's agent path, made present first (atomically, as the server ships it) so that
    // a change of its inode can only be the replacement.
    let dir = sshd::agent_dir();
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(fs::read(bin()).unwrap()));
    let agent = dir.join(format!("release-{}", &sum[..16]));
    if !agent.exists() {
        fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!("release-{}.tmp-test-{}", &sum[..16], std::process::id()));
        fs::copy(bin(), &tmp).unwrap();
        fs::rename(&tmp, &agent).unwrap();
    }
    let inode = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(&agent).unwrap());
    let before = inode();

    let v1 = fleet.f.upload("v1");
    let failed = fleet.deploy("staging", &v1, false);
    assert_eq!(failed["state"], "failed", "{failed:.2000}");
    let reason = reason_of(&failed);
    let older = format!("the node agent is older than protocol {} (it refused `--protocol`", release::node::VERSION);
    for says in [
        older.as_str(),
        &format!("at ~/.release/bin/release-{} on {}", &sum[..16], fleet.name(0)),
        "it was replaced by this server's binary",
    ] {
        assert!(reason.contains(says), "{says:?} not in {reason}");
    }
    assert_ne!(inode(), before, "the agent at this build's path was not replaced");
    let shipped = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(fs::read(&agent).unwrap()));
    assert_eq!(shipped, sum, "what replaced it is this build");
}
