//! The real agent binary, alone in its process: the node protocol's version as it checks it (a
//! server of another protocol is refused before the request is read, and every answer names
//! the agent's own), and the huge-pages setting its hooks inherit.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// `release node` with these arguments, its stdin and stdout piped.
fn spawn_agent(args: &[&str]) -> std::process::Child {
    Command::new(crate::support::bin())
        .arg("node")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `release node` with these arguments and one request; its answer.
fn agent(args: &[&str], request: Value) -> Value {
    let mut child = spawn_agent(args);
    // The agent may answer (and exit) before reading: a refused protocol reads nothing.
    let _ = child.stdin.take().unwrap().write_all(format!("{request}\n").as_bytes());
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_agent_refuses_a_server_of_another_protocol_and_names_its_own_in_every_answer() {
    let base = tempfile::tempdir().unwrap();
    let status = json!({"op": "status", "base": base.path()});

    let refused = agent(&["--protocol", "999"], status.clone());
    assert_eq!((refused["ok"].clone(), refused["code"].clone()), (json!(false), json!("bad_request")), "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains(&format!("speaks protocol {}, the server 999", release::node::VERSION)), "{message}");
    assert_eq!(refused["protocol"], release::node::VERSION);

    let answered = agent(&["--protocol", &release::node::VERSION.to_string()], status);
    assert_eq!(
        (answered["ok"].clone(), answered["protocol"].clone()),
        (json!(true), json!(release::node::VERSION)),
        "{answered}"
    );
    assert!(answered["current"].is_null() && answered["ready"] == json!([]), "{answered}");
}

/// A server of another protocol is refused before the agent reads anything: with stdin left
/// open and empty (a server still writing, or about to write an artifact), the refusal comes
/// at once and the agent exits, so the server's writes meet a closed pipe, never a full one.
#[test]
fn a_refused_protocol_is_answered_before_stdin_is_read() {
    let mut child = spawn_agent(&["--protocol", "999"]);
    let stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        let _ = tx.send(out);
    });
    // Not a measure of speed: a bound that turns "waits for input for ever" into a failure.
    let out = rx.recv_timeout(std::time::Duration::from_secs(120));
    drop(stdin);
    let out = out.expect("the agent waited for its input before refusing the protocol");
    let refused: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((refused["ok"].clone(), refused["code"].clone()), (json!(false), json!("bad_request")), "{refused}");
    assert!(child.wait().unwrap().success());
    // And after a refusal, writing an artifact's worth of bytes fails (closed pipe) rather
    // than blocking.
    let mut child = spawn_agent(&["--protocol", "999"]);
    let mut stdin = child.stdin.take().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("the server 999"));
    assert!(stdin.write_all(&vec![0; 8 << 20]).is_err(), "a refused agent's stdin is closed");
}

/// The agent runs without transparent huge pages (its memory is touched once); its hooks, and
/// what they start (a PM2 daemon), run as the agent was started. The setting is the process's:
/// tested on the real agent, alone in its process, read by a hook for itself and its parent.
#[test]
fn a_prepares_hooks_run_with_the_huge_pages_setting_the_agent_was_started_with() {
    let bytes = crate::support::archives::valid("<?php");
    let base = tempfile::tempdir().unwrap();
    let digest = release::digest::Digest::of(&bytes);
    let request = release::node::Request::Prepare(release::node::Prepare {
        finalize: vec![
            "echo hook $(grep THP_enabled /proc/self/status); echo agent $(grep THP_enabled /proc/$PPID/status)".into(),
        ],
        ..release::node::Prepare::from_stdin(base.path(), digest)
    });
    // Started with huge pages allowed (this test process's setting, which the agent inherits):
    // the hook must see them allowed again, the agent itself off.
    rustix::thread::disable_transparent_huge_pages(false).unwrap();
    let mut child = spawn_agent(&[]);
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}", serde_json::to_string(&request).unwrap()).unwrap();
    stdin.write_all(&bytes).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["ok"], json!(true), "{answer}");
    let output = answer["output"].as_str().unwrap();
    assert!(output.contains("hook THP_enabled: 1"), "the hook ran with huge pages off: {output}");
    assert!(output.contains("agent THP_enabled: 0"), "the agent ran with huge pages on: {output}");
}
