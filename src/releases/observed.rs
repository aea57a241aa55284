//! What a cell's nodes said they serve, kept for `limits.node_status_max_age`: `status --nodes`
//! (and the page `/?nodes=1`) would otherwise let any read token make the server reach every
//! node over SSH at each request. A cell's nodes are asked at most once in that long, whoever
//! asks and with however many tokens; callers that come while they are being asked wait for
//! that answer and share it. Each answer says when it was asked. A cell whose live or in-flight
//! release changed since is asked again at once, so a status right after a deploy never shows
//! what the nodes served before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::deployer::{Deployer, Observed};
use crate::config::Node;
use crate::utc::Timestamp;

/// One cell's last answer, and the lock its next asking takes.
type Slot = Arc<tokio::sync::Mutex<Option<Asked>>>;

#[derive(Default)]
pub(super) struct NodeAnswers {
    cells: Mutex<HashMap<(String, String), Slot>>,
}

struct Asked {
    at: Instant,
    /// RFC 3339, for the answer.
    at_text: Timestamp,
    /// The cell's (live release, release in flight) when asked.
    releases: (Option<i64>, Option<i64>),
    observed: Vec<Observed>,
}

impl NodeAnswers {
    /// What the nodes of a cell serve, and when they were asked: from the last asking if it is
    /// younger than `max_age` and the cell's releases are the same, else asked now.
    pub(super) async fn ask(
        &self,
        deployer: &dyn Deployer,
        cell: (&str, &str),
        releases: (Option<i64>, Option<i64>),
        nodes: &[Node],
        max_age: Duration,
    ) -> (Vec<Observed>, Timestamp) {
        let slot = Arc::clone(
            self.cells.lock().expect("never poisoned").entry((cell.0.to_owned(), cell.1.to_owned())).or_default(),
        );
        let mut last = slot.lock().await;
        if let Some(asked) = last.as_ref().filter(|a| a.releases == releases && a.at.elapsed() < max_age) {
            return (asked.observed.clone(), asked.at_text.clone());
        }
        let (at, at_text) = (Instant::now(), Timestamp::now());
        let observed = deployer.observe(nodes).await;
        *last = Some(Asked { at, at_text: at_text.clone(), releases, observed: observed.clone() });
        (observed, at_text)
    }
}
