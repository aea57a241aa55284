//! The Slack and Monday webhook kinds: the message and the item each gets, and configuration
//! errors that name the key.

use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::TestCommand;

use super::{Received, Receiver, config, deliveries, id_of};

/// Issue 14 item 4: a Slack incoming-webhook message, as Slack documents it: `text` (the
/// notification), `blocks` with a mrkdwn section linking the release's page and a context
/// block with the facts; no signature without a secret (Slack checks none).
#[test]
fn slack_gets_a_message_naming_the_release_with_a_link_to_its_page() {
    let receiver = Receiver::ok();
    let hook = format!(
        "[[webhook]]\nname = \"slack\"\nformat = \"slack\"\nurl = \"{}/services/T0/B0/x\"\nevents = [\"release.live\"]\n",
        receiver.url
    );
    let server = crate::support::TestServer::start_with_server(
        crate::support::Backend::Local,
        "public_url = \"https://release.example.com/\"\n",
        &config(&hook),
    );
    let f = Fixture::adopt(server);
    let digest = f.upload("v1.4.2");
    let live = f.live_in("ci", "staging", &digest);
    let id = id_of(&live);
    let seen = receiver.wait_for("the live message", |r| !r.is_empty());
    let message = seen[0].json();
    assert_eq!(seen[0].path, "/services/T0/B0/x");
    assert!(!seen[0].headers.contains_key("x-release-signature"), "{:?}", seen[0].headers);
    assert_eq!(message["text"], "api v1.4.2 is live in staging", "{message}");
    let section = &message["blocks"][0];
    assert_eq!(section["type"], "section");
    assert_eq!(section["text"]["type"], "mrkdwn");
    assert_eq!(
        section["text"]["text"],
        format!("*<https://release.example.com/releases/{id}|api v1.4.2 is live in staging>*")
    );
    let facts = message["blocks"][1]["elements"][0]["text"].as_str().unwrap();
    assert_eq!(message["blocks"][1]["type"], "context");
    assert!(facts.contains(&format!("release #{id} (deploy), digest {}", &digest[7..19])), "{facts}");
    assert!(facts.contains("requested by ci (gitlab)"), "{facts}");
}

/// A Monday board as its GraphQL API answers: `create_item` gives an item id, `create_update`
/// adds the facts to it; a refusal comes as 200 with `errors`.
#[test]
fn monday_gets_an_item_per_release_going_live_with_the_approval_in_its_update() {
    let receiver = Receiver::answering(|r, before| {
        let query = r.json()["query"].as_str().unwrap_or("").to_owned();
        if query.contains("create_item") {
            let n = before.iter().filter(|b| b.json()["query"].as_str().unwrap_or("").contains("create_item")).count();
            (200, format!("{{\"data\": {{\"create_item\": {{\"id\": \"{}\"}}}}}}", 9000 + n))
        } else if before.iter().all(|b| !b.json()["query"].as_str().unwrap_or("").contains("create_update")) {
            // The first update is refused as Monday refuses: 200 and errors.
            (200, "{\"errors\": [{\"message\": \"Complexity budget exhausted\"}]}".to_owned())
        } else {
            (200, "{\"data\": {\"create_update\": {\"id\": \"1\"}}}".to_owned())
        }
    });
    let hook = format!(
        "[[webhook]]\nname = \"monday\"\nformat = \"monday\"\nurl = \"{}/v2\"\nboard_id = 4242\n\
         group_id = \"releases\"\ntoken_env = \"MONDAY_API_TOKEN\"\nretry_base = \"100ms\"\n",
        receiver.url
    );
    let server = crate::support::TestServer::start_with_env(
        crate::support::Backend::Local,
        &config(&hook),
        &[("MONDAY_API_TOKEN", "eyJhbGciOi-test-token")],
    );
    let f = Fixture::adopt(server);
    let digest = f.upload("v2");
    f.live_in("ci", "staging", &digest);
    let (status, pending) =
        f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    assert!(status.is_success(), "{pending}");
    let id = id_of(&pending);
    let (status, approved) = f.post("bob", &format!("/v1/releases/{id}/approve"), json!({}));
    assert!(status.is_success(), "{approved}");
    assert_eq!(f.settle(id)["state"], "live");

    // By default only going live or failing makes an item: two releases went live.
    let seen = receiver.wait_for("two items with their updates", |r| {
        r.iter().filter(|x| x.json()["query"].as_str().unwrap().contains("create_update")).count() >= 3
    });
    for r in &seen {
        assert_eq!(r.path, "/v2");
        assert_eq!(r.header("authorization"), "eyJhbGciOi-test-token");
        assert_eq!(r.header("content-type"), "application/json");
    }
    let items: Vec<Value> =
        seen.iter().map(Received::json).filter(|j| j["query"].as_str().unwrap().contains("create_item")).collect();
    assert_eq!(items.len(), 2, "one item per release gone live, none twice for a retried update: {items:?}");
    assert_eq!(items[0]["variables"]["board"], "4242");
    assert_eq!(items[0]["variables"]["group"], "releases");
    assert_eq!(items[0]["variables"]["name"], "api v2 is live in staging");
    assert_eq!(items[1]["variables"]["name"], "api v2 is live in production");
    let updates: Vec<Value> =
        seen.iter().map(Received::json).filter(|j| j["query"].as_str().unwrap().contains("create_update")).collect();
    // The first update was refused and tried again on the same item.
    assert_eq!(updates[0]["variables"]["item"], "9000");
    assert_eq!(updates[1]["variables"]["item"], "9000");
    assert_eq!(updates[2]["variables"]["item"], "9001");
    let production = updates[2]["variables"]["body"].as_str().unwrap();
    assert!(production.contains("requested by alice (alice)"), "{production}");
    assert!(production.contains("approved by bob (bob)"), "{production}");
    let refused = deliveries(&f, 1);
    assert!(
        refused.iter().any(|d| d["attempts"] == 2 && d["outcome"] == "accepted"),
        "the refused update counted as a failed attempt: {refused:?}"
    );
    let refusal = "SELECT count(*) FROM webhook_deliveries WHERE error = 'monday: Complexity budget exhausted'";
    assert_eq!(f.server.count(refusal), 1, "the refusal is recorded in Monday's words");
}

#[test]
fn slack_and_monday_configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = "url = \"http://127.0.0.1:9/\"\n";
    let cases = [
        (format!("[[webhook]]\nname = \"x\"\n{url}format = \"teams\"\n"), "webhook[0].format"),
        (format!("[[webhook]]\nname = \"x\"\n{url}format = \"monday\"\ntoken_env = \"PATH\"\n"), "webhook[0].board_id"),
        (format!("[[webhook]]\nname = \"x\"\n{url}format = \"monday\"\nboard_id = 1\n"), "webhook[0].token_env"),
        (
            format!(
                "[[webhook]]\nname = \"x\"\n{url}format = \"monday\"\nboard_id = 1\ntoken_env = \"RELEASE_NO_SUCH_VARIABLE\"\n"
            ),
            "RELEASE_NO_SUCH_VARIABLE is not set",
        ),
        (format!("[[webhook]]\nname = \"x\"\n{url}format = \"slack\"\nboard_id = 1\n"), "webhook[0].board_id"),
        // The JSON format is signed: its secret stays required.
        (format!("[[webhook]]\nname = \"x\"\n{url}"), "webhook[0].secret"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("release.toml");
        std::fs::write(&path, text).unwrap();
        let data = dir.path().join("data");
        let out = TestCommand::new()
            .args(["serve", "--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args(["--data-dir", data.to_str().unwrap()])
            .assert_exit(2);
        assert!(out.stderr().contains(key), "expected {key} in the error\n{out}");
    }
}
