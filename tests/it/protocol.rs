//! The node protocol's version, as the real agent binary checks it: a server of another
//! protocol is refused before the request is read, and every answer names the agent's own.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// Runs `release node` with these arguments and one request; its answer.
fn agent(args: &[&str], request: Value) -> Value {
    let mut child = Command::new(crate::support::bin())
        .arg("node")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
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
    assert!(message.contains("speaks protocol 1, the server 999"), "{message}");
    assert_eq!(refused["protocol"], 1);

    let answered = agent(&["--protocol", "1"], status);
    assert_eq!((answered["ok"].clone(), answered["protocol"].clone()), (json!(true), json!(1)), "{answered}");
    assert!(answered["current"].is_null() && answered["ready"] == json!([]), "{answered}");
}
