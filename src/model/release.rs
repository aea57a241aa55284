//! Releases as the registry stores them: kinds, the state machine of SPEC 3, and the rows `show`, `status` and the pages read.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::model::vocabulary::vocabulary;
use crate::utc::Timestamp;

vocabulary! {
    /// What a release asks for. Reads keep a kind this build does not know (a newer server's)
    /// as `Unknown`; the registry's column takes only these three.
    pub enum Kind(other Unknown) {
        Deploy = "deploy",
        Promote = "promote",
        Rollback = "rollback",
    }
}

vocabulary! {
    /// `pending_approval → approved → deploying → live`, or `rejected`, `failed`, `cancelled`,
    /// `expired`, and `superseded` once a later release goes live. A state this build does
    /// not know (an answer of a newer server) reads as `Unknown` with its name: no
    /// transition leads to or from it, and the CLI's `--wait` stops at it (it cannot tell
    /// whether it is final).
    pub enum State(other Unknown) {
        PendingApproval = "pending_approval",
        Approved = "approved",
        Deploying = "deploying",
        Live = "live",
        Rejected = "rejected",
        Failed = "failed",
        Cancelled = "cancelled",
        Expired = "expired",
        Superseded = "superseded",
    }
}

impl State {
    /// `approved` or `deploying`: at most one per (service, environment).
    pub fn in_flight(self) -> bool {
        matches!(self, State::Approved | State::Deploying)
    }

    /// No further change but `live → superseded`; true of a state this build does not know
    /// (no transition leads from it here, and nothing should wait on it).
    pub fn is_final(self) -> bool {
        !matches!(self, State::PendingApproval | State::Approved | State::Deploying)
    }

    /// The transitions SPEC 3 allows (the database's trigger holds the same table, and allows
    /// `approved → cancelled` only for a blocked artifact: a block cancels what was approved
    /// and has not started).
    pub fn may_become(self, next: State) -> bool {
        use State::*;
        matches!(
            (self, next),
            (PendingApproval, Approved | Rejected | Cancelled | Expired)
                | (Approved, Deploying | Failed | Cancelled)
                | (Deploying, Live | Failed)
                | (Live, Superseded)
        )
    }
}

impl FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::parse(s).ok_or_else(|| format!("unknown release state {s:?}"))
    }
}

impl Kind {
    /// The audit action of a request of this kind; `None` for a kind this build does not
    /// know (it asks for none such).
    pub fn audit_action(self) -> Option<crate::model::audit::AuditAction> {
        use crate::model::audit::AuditAction;
        match self {
            Kind::Deploy => Some(AuditAction::ReleaseDeploy),
            Kind::Promote => Some(AuditAction::ReleasePromote),
            Kind::Rollback => Some(AuditAction::ReleaseRollback),
            Kind::Unknown(_) => None,
        }
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::parse(s).ok_or_else(|| format!("unknown release kind {s:?}"))
    }
}

/// A release row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub id: i64,
    pub service: String,
    pub environment: String,
    pub digest: Digest,
    pub kind: Kind,
    pub state: State,
    pub requested_by: String,
    pub requester_owner: String,
    pub requested_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_environment: Option<String>,
    /// The release that was live when this one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    pub state_changed_at: Timestamp,
}

/// One change of a release's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: State,
    pub at: Timestamp,
    pub actor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The four-eyes decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub decision: String,
    pub digest: Digest,
    pub decided_by: String,
    pub decider_owner: String,
    pub decided_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One node's phase of one release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub node: String,
    pub phase: Phase,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub outcome: PhaseOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
    /// What the node found at its shared paths when it switched to this release (switch
    /// phases only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_files: Vec<SharedFile>,
}

vocabulary! {
    /// A step of a deploy on one node (SPEC 7), as `show`, the pages and `/metrics` name it
    /// (spaces and all: `switch back`). A phase this build does not know (stored or answered
    /// by a newer server) reads as `Unknown` with its name; only the deployer writes phases,
    /// and only these.
    pub enum Phase(other Unknown) {
        /// Reaching the node (SSH, the agent shipped).
        Connect = "connect",
        /// `--adopt`: the node packages the plain directory at `current`.
        Adopt = "adopt",
        Prepare = "prepare",
        /// The adopted tree, prepared as a release to go back to.
        PrepareAdopted = "prepare adopted",
        Migrate = "migrate",
        Switch = "switch",
        /// Back to the release before, after a failure past the switch.
        SwitchBack = "switch back",
        Reload = "reload",
        Verify = "verify",
        VerifyPm2 = "verify pm2",
        /// A node put back (switch back and reload) by the resolution of an interrupted deploy.
        PutBack = "put back",
        Cleanup = "cleanup",
        /// A deploy the record-only deployer "ran".
        Record = "record",
    }
}

vocabulary! {
    /// How a phase ended on its node; another build's outcome (the schema also allows
    /// `skipped`, which nothing writes yet) reads as `Unknown` with its name.
    pub enum PhaseOutcome(other Unknown) {
        Ok = "ok",
        Failed = "failed",
    }
}

/// A shared path on one node as it was at the switch: a file's SHA-256, never its contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SharedFile {
    #[serde(default)]
    pub node: String,
    pub path: String,
    /// `file`, `directory` (its contents are data, not configuration), `missing` or
    /// `unreadable`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
}

/// A release with its whole story, as `show` tells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detail {
    #[serde(flatten)]
    pub release: Release,
    /// The version label its artifact was uploaded with for this service.
    pub version: Option<String>,
    pub transitions: Vec<Transition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    pub deployments: Vec<Deployment>,
    /// Nodes left out of this release (`--exclude-node`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_nodes: Vec<String>,
    /// Nodes its failure left stranded (could not be put back, or unreachable while its
    /// interrupted deploy was resolved): decides the client's exit 8.
    #[serde(default)]
    pub stranded: Vec<String>,
    /// `--force`: the migrations it went past (the live artifact had them, it lacks them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forced_past_migrations: Vec<String>,
    /// The digest of the service's configuration as its deploy started (hooks, shared paths,
    /// health check, nodes): what it ran with. None until the deploy starts.
    pub config_digest: Option<Digest>,
    /// Whether its health check proves the digest; a release live without that proof is
    /// *unverified*. Only for a release that went live (`None` otherwise).
    pub verified: Option<bool>,
    /// Each node's shared paths at its switch to this release.
    #[serde(default)]
    pub shared_files: Vec<SharedFile>,
    /// `--adopt`: the legacy tree it took over (kept as an artifact) and the nodes that held
    /// it; `{"digest": null, "nodes": []}` while asked for but not captured yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adopted: Option<Adoption>,
    /// Each of its events' delivery to each webhook, as the last attempt left it.
    #[serde(default)]
    pub webhook_deliveries: Vec<crate::model::webhook::Delivery>,
}

/// A release's `--adopt`: asked for, and what its deploy captured ([`Detail::adopted`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// The legacy tree's package, kept as an artifact; `None` until captured.
    pub digest: Option<Digest>,
    /// The nodes whose `current` held that tree (none until captured).
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// One cell of the status matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRow {
    pub service: String,
    pub environment: String,
    /// The live artifact, if any.
    pub digest: Option<Digest>,
    /// The live release's id.
    pub release: Option<i64>,
    pub version: Option<String>,
    pub since: Option<Timestamp>,
    /// Who asked for the live release (token name).
    pub live_by: Option<String>,
    /// Whether the live release's health check proved its digest (`false`: live but
    /// unverified; `None`: recorded before this was, or nothing live).
    pub verified: Option<bool>,
    /// The release in flight (approved or deploying), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<i64>,
    /// Releases waiting for approval.
    pub pending: Vec<i64>,
    /// Nodes a failed deploy could not put back, until a deploy goes live on them or
    /// `status --nodes` finds them serving the live release.
    #[serde(default)]
    pub stranded: Vec<Stranded>,
    /// With `--nodes`: what each node says it serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeView>>,
    /// With `--nodes`: when the nodes were asked (answers are shared for
    /// `limits.node_status_max_age`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes_asked_at: Option<Timestamp>,
}

/// A node a failed deploy could not put back: it may serve the failed release, or be
/// unreachable, while the registry says the cell runs its live release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stranded {
    pub node: String,
    /// The release whose failure stranded it.
    pub release: Option<i64>,
    pub reason: String,
    pub since: Timestamp,
}

/// One node of a status cell, as it answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub node: String,
    pub current: Option<Digest>,
    /// The node serves something other than what the registry says is live.
    pub drift: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vocabulary::OtherName;

    /// The CLI reads answers back through these types: each name reads as what wrote it.
    #[test]
    fn wire_names_read_back_as_written() {
        for phase in Phase::ALL {
            let wire = serde_json::to_value(phase).unwrap();
            assert_eq!(wire, phase.as_str());
            assert_eq!(serde_json::from_value::<Phase>(wire).unwrap(), phase);
        }
        for state in State::ALL {
            let wire = serde_json::to_value(state).unwrap();
            assert_eq!(wire, state.as_str());
            assert_eq!(serde_json::from_value::<State>(wire).unwrap(), state);
        }
        for kind in Kind::ALL {
            assert_eq!(serde_json::from_value::<Kind>(serde_json::to_value(kind).unwrap()).unwrap(), kind);
        }
        for outcome in PhaseOutcome::ALL {
            let wire = serde_json::to_value(outcome).unwrap();
            assert_eq!(wire, outcome.as_str());
            assert_eq!(serde_json::from_value::<PhaseOutcome>(wire).unwrap(), outcome);
        }
    }

    /// A newer server's names (a state, a kind, a phase, an outcome this build lacks) read
    /// as `Unknown` with the name, show as written, and go back out unchanged; the strict
    /// parses every write path uses refuse them.
    #[test]
    fn an_answer_of_a_newer_server_reads_with_the_names_it_does_not_know() {
        let answer = serde_json::json!({
            "id": 7, "service": "api", "environment": "prod", "digest": format!("sha256:{}", "a".repeat(64)),
            "kind": "restart", "state": "paused", "requested_by": "ci", "requester_owner": "alice",
            "requested_at": "2026-12-04T09:00:00Z", "state_changed_at": "2026-12-04T09:01:00Z",
            "version": null, "approval": null, "config_digest": null, "verified": null,
            "transitions": [{"state": "paused", "at": "2026-12-04T09:01:00Z", "actor": "release"}],
            "deployments": [{"node": "web-1", "phase": "switch_back", "started_at": "2026-12-04T09:00:30Z",
                             "finished_at": "2026-12-04T09:00:31Z", "outcome": "skipped"}],
        });
        let detail: Detail = serde_json::from_value(answer.clone()).expect("reads");
        assert_eq!(detail.release.state, State::Unknown(OtherName::new("paused")));
        assert_eq!(detail.release.state.to_string(), "paused");
        assert_eq!(detail.release.kind.as_str(), "restart");
        assert!(!detail.release.kind.is_known() && detail.release.kind.audit_action().is_none());
        assert_eq!(detail.transitions[0].state.as_str(), "paused");
        let d = &detail.deployments[0];
        assert_eq!((d.phase.to_string(), d.outcome.to_string()), ("switch_back".into(), "skipped".into()));
        assert!(d.phase != Phase::SwitchBack && d.outcome != PhaseOutcome::Failed);
        // Written back as read: `--json` and a re-serialized answer keep the names.
        let again = serde_json::to_value(&detail).unwrap();
        for key in ["kind", "state"] {
            assert_eq!(again[key], answer[key]);
        }
        assert_eq!(again["deployments"][0]["phase"], "switch_back");
        // What a write parses stays strict, and no transition leads to or from the unknown.
        assert!("paused".parse::<State>().is_err() && "restart".parse::<Kind>().is_err());
        assert_eq!((Phase::parse("switch_back"), PhaseOutcome::parse("skipped")), (None, None));
        let paused = detail.release.state;
        assert!(!paused.in_flight() && State::ALL.iter().all(|s| !s.may_become(paused) && !paused.may_become(*s)));
    }

    #[test]
    fn the_state_machine_of_spec_3() {
        use State::*;
        assert!(PendingApproval.may_become(Approved));
        assert!(Approved.may_become(Deploying));
        assert!(Deploying.may_become(Live));
        assert!(Live.may_become(Superseded));
        assert!(!Live.may_become(Deploying));
        assert!(!Rejected.may_become(Approved));
        assert!(!Superseded.may_become(Live));
        assert!(!PendingApproval.may_become(Live));
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>().unwrap(), s);
            assert!(!s.may_become(s), "{s} to itself");
        }
        assert!(Approved.in_flight() && Deploying.in_flight() && !Live.in_flight());
    }

    #[test]
    fn phases_and_outcomes_go_out_and_come_back_by_their_names() {
        for phase in Phase::ALL {
            assert_eq!(Phase::parse(phase.as_str()), Some(phase));
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.as_str());
        }
        assert_eq!(Phase::parse("verify pm2"), Some(Phase::VerifyPm2));
        assert_eq!(Phase::parse("deploy"), None);
        for outcome in PhaseOutcome::ALL {
            assert_eq!(PhaseOutcome::parse(outcome.as_str()), Some(outcome));
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.as_str());
        }
    }

    /// `adopted` goes out as it went out when it was free JSON: `{"digest": …, "nodes": […]}`,
    /// `digest` null (and `nodes` empty) while nothing is captured yet.
    #[test]
    fn an_adoption_goes_out_as_the_free_json_it_was() {
        let asked = Adoption { digest: None, nodes: vec![] };
        assert_eq!(serde_json::to_string(&asked).unwrap(), r#"{"digest":null,"nodes":[]}"#);
        let digest = Digest::of(b"legacy");
        let captured = Adoption { digest: Some(digest), nodes: vec!["web-1".into(), "web-2".into()] };
        let wire = serde_json::to_string(&captured).unwrap();
        assert_eq!(wire, format!(r#"{{"digest":"{digest}","nodes":["web-1","web-2"]}}"#));
        assert_eq!(serde_json::from_str::<Adoption>(&wire).unwrap(), captured);
        assert!(serde_json::from_str::<Adoption>(r#"{"digest":"sha256:00","nodes":[]}"#).is_err());
    }
}
