//! `release check` on real sshd nodes: a row per finding, the exit status, and nothing changed
//! on any node.

use std::fs;

use serde_json::Value;

use crate::support::Backend;

use super::{SshFleet, tree};

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
