//! Nodes that stall or lie (SECURITY.md, "a compromised node"): what the server accepts from
//! a node, and what the node agent keeps of a hook, is bounded; a stalled node costs a bounded
//! wait and fails only its own cell or deploy. Hostile nodes are real sshd nodes on loopback
//! whose agent command is replaced by a script (`ForceCommand`).

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::json;

use crate::support::bin;

/// The peak RSS (KiB) of `release node` answering `request`, and its answer.
fn node_agent_peak_rss(request: &serde_json::Value) -> (i64, serde_json::Value) {
    let mut child = Command::new(bin()).arg("node").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    writeln!(child.stdin.take().unwrap(), "{request}").unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    let mut status = 0;
    // SAFETY: wait4 on our own child, with storage for its status and usage.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::wait4(child.id() as i32, &mut status, 0, &mut usage), child.id() as i32);
        usage
    };
    (usage.ru_maxrss, serde_json::from_str(out.trim()).unwrap())
}

#[test]
fn a_hook_printing_hundreds_of_megabytes_keeps_the_agent_small() {
    let base = tempfile::tempdir().unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    std::fs::create_dir_all(base.path().join("releases").join("ab".repeat(32))).unwrap();
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
