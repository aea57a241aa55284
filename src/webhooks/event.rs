//! What a webhook receives: the event names, the JSON body built from an audit event, its
//! signature and its delivery id. No I/O.

use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::model::audit::AuditAction;
use crate::model::audit::Event;
use crate::model::release::{Kind, State};
use crate::registry::ReleaseAtEvent;

/// The event an audit action stands for, and the state the release entered with it (`None`
/// for a request, whose state is its first transition's: `pending_approval` or `approved`).
/// Audit actions that change no state (`release.adopted`) are no event. Every action is named
/// here (no catch-all): a new one must be decided on.
pub fn event_for(action: AuditAction) -> Option<(&'static str, Option<State>)> {
    use AuditAction::*;
    Some(match action {
        ReleaseDeploy | ReleasePromote | ReleaseRollback => ("release.requested", None),
        ReleaseApprove => ("release.approved", Some(State::Approved)),
        ReleaseReject => ("release.rejected", Some(State::Rejected)),
        ReleaseCancel => ("release.cancelled", Some(State::Cancelled)),
        ReleaseExpire => ("release.expired", Some(State::Expired)),
        ReleaseDeploying => ("release.deploying", Some(State::Deploying)),
        ReleaseLive => ("release.live", Some(State::Live)),
        ReleaseFailed => ("release.failed", Some(State::Failed)),
        ReleaseSuperseded => ("release.superseded", Some(State::Superseded)),
        ReleaseAdopted
        | ArtifactUpload
        | ArtifactBlock
        | ArtifactPurge
        | TokenCreate
        | TokenRevoke
        | WebLogin
        | WebLogout
        | ConfigService
        | ConfigEnvironment
        | ConfigServiceRetired
        | ConfigEnvironmentRetired
        | RequestRefused
        | RequestRefusedAggregate
        | RegistryBackup
        | RegistryBackupFailed
        | RegistryRestored
        | AuditCheckpointMismatch => return None,
    })
}

/// The release id an event is about (`release/<id>`).
pub fn release_id(subject: &str) -> Option<i64> {
    subject.strip_prefix("release/")?.parse().ok()
}

/// The body POSTed for one event.
#[derive(Debug, Serialize)]
pub struct Payload<'a> {
    /// The audit event's sequence number: increasing, unique within this registry.
    pub id: u64,
    pub event: &'a str,
    /// When the change happened (the audit event's time), RFC 3339 UTC.
    pub at: &'a str,
    pub release: ReleaseView<'a>,
    /// Who caused it: a token's name and owner, or `release` for the server itself.
    pub actor: Actor<'a>,
    /// Why, where the change has a reason (rejected, failed, cancelled by a newer release).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The release as it was right after this event.
#[derive(Debug, Serialize)]
pub struct ReleaseView<'a> {
    pub id: i64,
    pub service: &'a str,
    pub environment: &'a str,
    pub digest: Digest,
    pub version: Option<&'a str>,
    pub kind: Kind,
    /// The state this event put it in (not necessarily its state now).
    pub state: State,
    pub requested_by: &'a str,
    pub requester_owner: &'a str,
    pub requested_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_environment: Option<&'a str>,
    /// The release that was live when this one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Actor<'a> {
    pub name: &'a str,
    pub owner: &'a str,
}

/// The JSON body for `event` (named `name`, entering `state`) about `at_event`'s release.
pub fn body(event: &Event, name: &str, state: Option<State>, at_event: &ReleaseAtEvent) -> Vec<u8> {
    let r = &at_event.release;
    let details: serde_json::Value = serde_json::from_str(&event.details).unwrap_or_default();
    let payload = Payload {
        id: event.seq,
        event: name,
        at: event.at.as_str(),
        release: ReleaseView {
            id: r.id,
            service: &r.service,
            environment: &r.environment,
            digest: r.digest,
            version: at_event.version.as_deref(),
            kind: r.kind,
            state: state.unwrap_or(at_event.first_state),
            requested_by: &r.requested_by,
            requester_owner: &r.requester_owner,
            requested_at: r.requested_at.as_str(),
            source_environment: r.source_environment.as_deref(),
            replaces: r.replaces,
        },
        actor: Actor { name: &event.actor, owner: &event.owner },
        reason: details["reason"].as_str().map(str::to_owned),
    };
    serde_json::to_vec(&payload).expect("the payload serializes")
}

/// What one event says to a person, for the chat and board formats.
struct Told {
    /// "shop 1.4.2 is live in production", "shop 1.4.2 failed in production", …
    headline: String,
    /// The facts, one per line: release, digest, who asked, who approved, why.
    lines: Vec<String>,
    /// The release's page, when the server's `public_url` is known.
    link: Option<String>,
}

fn told(event: &Event, name: &str, at_event: &ReleaseAtEvent, public_url: Option<&str>) -> Told {
    let r = &at_event.release;
    let what = match &at_event.version {
        Some(v) => format!("{} {v}", r.service),
        None => format!("{} {}", r.service, r.digest.short()),
    };
    let headline = match name {
        "release.requested" => format!("{what}: {} to {} requested", r.kind.as_str(), r.environment),
        "release.approved" => format!("{what}: approved for {}", r.environment),
        "release.rejected" => format!("{what}: rejected for {}", r.environment),
        "release.cancelled" => format!("{what}: cancelled for {}", r.environment),
        "release.expired" => format!("{what}: approval for {} expired", r.environment),
        "release.deploying" => format!("{what} is deploying to {}", r.environment),
        "release.live" => format!("{what} is live in {}", r.environment),
        "release.failed" => format!("{what} failed in {}", r.environment),
        "release.superseded" => format!("{what} was superseded in {}", r.environment),
        other => format!("{what}: {other} in {}", r.environment),
    };
    let mut lines = vec![
        format!("release #{} ({}), digest {}", r.id, r.kind.as_str(), r.digest.short()),
        format!("requested by {} ({}) at {}", r.requested_by, r.requester_owner, r.requested_at),
    ];
    if let Some(a) = &at_event.approval {
        lines.push(format!("{} by {} ({}) at {}", a.decision, a.decided_by, a.decider_owner, a.decided_at));
    }
    let details: serde_json::Value = serde_json::from_str(&event.details).unwrap_or_default();
    if let Some(reason) = details["reason"].as_str() {
        lines.push(format!("reason: {reason}"));
    }
    lines.push(format!("by {} at {}", event.actor, event.at));
    Told { headline, lines, link: public_url.map(|base| format!("{base}/releases/{}", r.id)) }
}

/// A Slack incoming-webhook message (`text` for notifications, `blocks` for the channel).
pub fn slack_body(event: &Event, name: &str, at_event: &ReleaseAtEvent, public_url: Option<&str>) -> Vec<u8> {
    let t = told(event, name, at_event, public_url);
    let title = match &t.link {
        Some(link) => format!("*<{link}|{}>*", slack_escape(&t.headline)),
        None => format!("*{}*", slack_escape(&t.headline)),
    };
    let facts = t.lines.iter().map(|l| slack_escape(l)).collect::<Vec<_>>().join("\n");
    let body = serde_json::json!({
        "text": t.headline,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": title}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": facts}]},
        ],
    });
    serde_json::to_vec(&body).expect("the message serializes")
}

/// Slack's mrkdwn control characters, escaped as Slack documents (&, <, >).
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The GraphQL request creating a Monday item for this event on `board_id` (in `group_id`).
pub fn monday_item(
    event: &Event,
    name: &str,
    at_event: &ReleaseAtEvent,
    board_id: u64,
    group_id: Option<&str>,
    public_url: Option<&str>,
) -> Vec<u8> {
    let t = told(event, name, at_event, public_url);
    let body = serde_json::json!({
        "query": "mutation ($board: ID!, $group: String, $name: String!) { \
                  create_item (board_id: $board, group_id: $group, item_name: $name) { id } }",
        "variables": {"board": board_id.to_string(), "group": group_id, "name": t.headline},
    });
    serde_json::to_vec(&body).expect("the request serializes")
}

/// The GraphQL request adding the event's facts (who asked, who approved, why, the link) as
/// an update on the item `item_id` that [`monday_item`] created.
pub fn monday_update(
    event: &Event,
    name: &str,
    at_event: &ReleaseAtEvent,
    item_id: &str,
    public_url: Option<&str>,
) -> Vec<u8> {
    let t = told(event, name, at_event, public_url);
    let mut text = t.lines.join("\n");
    if let Some(link) = &t.link {
        text.push_str(&format!("\n{link}"));
    }
    let body = serde_json::json!({
        "query": "mutation ($item: ID!, $body: String!) { create_update (item_id: $item, body: $body) { id } }",
        "variables": {"item": item_id, "body": text},
    });
    serde_json::to_vec(&body).expect("the request serializes")
}

/// `X-Release-Signature`: `sha256=` and the hex HMAC-SHA256 of the exact body with the secret.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `X-Release-Delivery`: the same for every attempt of one event to one webhook, different for
/// any other pair, even across registries (the event's chain hash is in it). UUID-shaped.
pub fn delivery_id(webhook: &str, event_hash: &[u8; 32]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"release webhook delivery\0");
    hasher.update(webhook.as_bytes());
    hasher.update([0]);
    hasher.update(event_hash);
    let digest = hasher.finalize();
    let bytes: [u8; 16] = digest[..16].try_into().expect("16 of 32 bytes");
    uuid::Builder::from_custom_bytes(bytes).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn every_state_has_an_event_and_every_event_an_action() {
        use AuditAction::*;
        let entered: Vec<State> = [ReleaseApprove, ReleaseReject, ReleaseCancel, ReleaseExpire]
            .into_iter()
            .chain([ReleaseDeploying, ReleaseLive, ReleaseFailed, ReleaseSuperseded])
            .map(|a| event_for(a).unwrap().1.unwrap())
            .collect();
        for state in State::ALL {
            // pending_approval and approved are also entered by a request (release.requested).
            assert!(entered.contains(&state) || state == State::PendingApproval, "no event enters {state}");
        }
        let named: Vec<&str> = [ReleaseDeploy, ReleaseApprove, ReleaseReject, ReleaseCancel]
            .into_iter()
            .chain([ReleaseExpire, ReleaseDeploying, ReleaseLive, ReleaseFailed, ReleaseSuperseded])
            .map(|a| event_for(a).unwrap().0)
            .collect();
        assert_eq!(named, crate::model::webhook::EVENTS);
        assert_eq!(event_for(ReleaseAdopted), None);
        assert_eq!(event_for(RequestRefused), None);
        assert_eq!(event_for(RequestRefusedAggregate), None);
        // Every action's name reads back as itself.
        for action in AuditAction::ALL {
            assert_eq!(AuditAction::parse(action.as_str()), Some(action));
        }
    }

    #[test]
    fn delivery_ids_are_stable_and_distinct() {
        let a = delivery_id("monday", &[1; 32]);
        assert_eq!(a, delivery_id("monday", &[1; 32]));
        assert_ne!(a, delivery_id("slack", &[1; 32]));
        assert_ne!(a, delivery_id("monday", &[2; 32]));
        assert!(uuid::Uuid::parse_str(&a).is_ok(), "{a}");
    }

    #[test]
    fn release_ids_from_subjects() {
        assert_eq!(release_id("release/42"), Some(42));
        assert_eq!(release_id("release/"), None);
        assert_eq!(release_id("token/42"), None);
    }
}
