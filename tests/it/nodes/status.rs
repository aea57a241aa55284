//! What `status` says of local nodes: `--nodes` reports drift, a node that cannot be put back
//! is stranded (exit 8) until found serving the live release, and the timeline's times.

use std::fs;

use serde_json::{Value, json};

use super::Fleet;

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
