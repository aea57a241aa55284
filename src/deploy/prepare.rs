//! The prepare phase on one node: the artifact fetched (presigned URL, signed URL of this
//! server, or streamed), or checked when the node has it already; the adopted legacy tree
//! first on a node adopting one; the artifact's file index read once per deploy and sent
//! along, so that a node links the files it already holds; and when the artifact rides the
//! node's stdin, the node says first (in the same call) which frames it lacks, and only those
//! are sent.

use super::*;
use crate::archive::{RunsError, SentIndex};

/// The artifact's index for one deploy: read (or taken from the kept ones) the first time a
/// node fetches, so that a rollback whose nodes all hold the release never reads it; shared by
/// the nodes from then on.
pub(super) type LazyIndex = tokio::sync::OnceCell<Option<Arc<SentIndex>>>;

/// The byte ranges of the artifact holding `frames`, a node's answer to which frames it lacks:
/// taken only as numbers of the index's frames in strictly increasing order (what the node
/// then expects on its stdin, in order); consecutive frames in one range.
pub(super) fn lacked_ranges(
    frames: &[crate::archive::Frame],
    lacks: &[usize],
) -> Result<Vec<std::ops::Range<u64>>, String> {
    match crate::archive::runs(frames, lacks) {
        Ok(runs) => Ok(runs.into_iter().map(|run| run.bytes).collect()),
        Err(RunsError::OutOfOrder { frame, after }) => {
            Err(format!("it said it lacks frame {frame} after frame {after}: not in increasing order"))
        }
        Err(RunsError::OutOfRange { frame, of }) => {
            Err(format!("it said it lacks frame {frame} of an artifact of {of} frames"))
        }
        Err(e) => Err(e.to_string()),
    }
}

impl NodeDeployer {
    /// Prepares the release (and first the adopted legacy tree, on a node adopting one); notes
    /// what the node's `current` points at, to put it back there.
    pub(super) async fn prepare_node(
        &self,
        plan: &Plan,
        target: &Target,
        hooks: &Hooks,
        index: &LazyIndex,
    ) -> Result<(), String> {
        // A blocked artifact is not even fetched (a presigned URL would bypass the server).
        plan.gate.check().await?;
        if target.adopting()
            && let Some(legacy) = target.back_to()
        {
            self.prepare(plan, target, hooks, legacy, None).await?;
        } else {
            let status: Status = phase_quiet(target, Request::Status { base: target.base.clone() }).await?;
            if !status.plain {
                target.set_back_to(status.current);
            }
        }
        self.prepare(plan, target, hooks, plan.release.digest, Some(index)).await
    }

    /// Prepares `digest` on one node: a check when it is already there, else a fetch (the
    /// files `index` names, read now if not yet, that a release on the node holds are linked,
    /// not written).
    async fn prepare(
        &self,
        plan: &Plan,
        target: &Target,
        hooks: &Hooks,
        digest: Digest,
        index: Option<&LazyIndex>,
    ) -> Result<(), String> {
        let status: Status = phase_quiet(target, Request::Status { base: target.base.clone() }).await?;
        let present = status.ready.contains(&digest);
        let name = if digest == plan.release.digest { Phase::Prepare } else { Phase::PrepareAdopted };
        let started = Timestamp::now();
        if present {
            let request = self.prepare_request(plan, target, hooks, digest, Source::Present, None);
            let answer = call::<Prepared>(target, &request, Input::Nothing).await;
            // The status was read without the node's lock: the clean-up of an earlier run may
            // have removed the release since (it follows `live` in the background). Then it is
            // fetched after all.
            if !matches!(&answer, Err(CallError::Node(e)) if e.code == ErrorCode::Missing) {
                return report_phase(plan, target, name, &request, started, answer).map(drop);
            }
            tracing::warn!(node = %target.name, %digest, "the release left the node between its status and prepare; fetching it");
        }
        let index = match index {
            Some(lazy) => lazy.get_or_init(|| self.file_index(plan)).await.as_deref(),
            None => None,
        };
        let source = if let Some(url) = self.store.presigned_get(digest).await.map_err(|e| e.to_string())? {
            // The node fetches from the bucket itself: the bytes do not pass through the server.
            Source::Url(url)
        } else if let Some(base) = self.node_url.as_ref().filter(|_| target.remote) {
            // From this server, by a signed URL: plain HTTP(S) costs less than the SSH stream.
            Source::Server(fetch::url(base, digest, utc::now().unix_timestamp()))
        } else {
            Source::Stdin
        };
        // On stdin: only the frames the node says it lacks, when it can tell.
        let input = match (&source, index) {
            // A node holding no release has nothing to link: the whole artifact, unasked.
            (Source::Stdin, Some(sent)) if sent.sparse && !status.ready.is_empty() => {
                Input::Asked(self.answer_lacking(target, digest, sent))
            }
            (Source::Stdin, _) => Input::Bytes(artifact(&self.store, digest).await?),
            _ => Input::Nothing,
        };
        let mut request = self.prepare_request(plan, target, hooks, digest, source, index);
        if let Request::Prepare(prepare) = &mut request {
            prepare.ask_frames = matches!(input, Input::Asked(_));
        }
        let answer = call::<Prepared>(target, &request, input).await;
        report_phase(plan, target, name, &request, started, answer).map(drop)
    }

    /// What to send a node that says which frames it lacks (its first line, [`node::Asking`]):
    /// those frames, in runs of consecutive frames ([`Store::read_artifact_ranges`]), or the
    /// whole artifact. A list out of order or naming a frame the artifact does not have is
    /// refused, naming the node.
    fn answer_lacking(&self, target: &Target, digest: Digest, sent: &SentIndex) -> Ask {
        let (store, node, frames) = (self.store.clone(), target.name.clone(), Arc::clone(&sent.frames));
        Box::new(move |line: Vec<u8>| {
            Box::pin(async move {
                let Ok(asking) = serde_json::from_slice::<Asking>(&line) else {
                    // Not the question: the agent answered at once (a refusal).
                    return Ok(None);
                };
                if asking.protocol != node::VERSION {
                    return Err(format!(
                        "node {node} asks for frames in node protocol {}, not {}: its agent is another build",
                        asking.protocol,
                        node::VERSION
                    ));
                }
                let payload = match asking.lacking.frames {
                    Some(lacks) => {
                        let ranges = lacked_ranges(&frames, &lacks).map_err(|e| format!("node {node}: {e}"))?;
                        store.read_artifact_ranges(digest, ranges).await.map_err(|e| e.to_string())?
                    }
                    None => artifact(&store, digest).await?,
                };
                Ok(Some(payload))
            })
        })
    }

    fn prepare_request(
        &self,
        plan: &Plan,
        target: &Target,
        hooks: &Hooks,
        digest: Digest,
        source: Source,
        index: Option<&SentIndex>,
    ) -> Request {
        let present = matches!(source, Source::Present);
        Request::Prepare(node::Prepare {
            base: target.base.clone(),
            digest,
            source,
            shared: plan.service.shared.clone(),
            writable: hooks.writable.clone(),
            // A rollback to a directory already here is a check, a switch and a reload; its
            // finalize hooks run again only when the shared files changed since they last
            // ran there (the node knows).
            finalize: hooks.finalize.clone(),
            finalize_if_shared_changed: present && plan.release.kind == Kind::Rollback,
            env: plan.service.env.clone(),
            max_unpacked_bytes: self.limits.max_unpacked_bytes.0,
            max_files: self.limits.max_files,
            fence: target.fence,
            adopt: target.adopting(),
            hook_timeout_ms: Some(self.hook_timeout().as_millis() as u64),
            fetch_stall_ms: Some(self.limits.node_fetch_stall_timeout.0.as_millis() as u64),
            run_as: run_as(plan, false),
            index: index.map(|sent| sent.wire.clone()),
            ask_frames: false,
        })
    }

    /// The release's file index, read once per deploy for every node, or taken from the ones
    /// kept in memory. An index that cannot be read or does not describe the artifact costs
    /// the sharing, never the deploy: every node then writes every file (and checks each
    /// against the artifact's digest as always).
    pub(super) async fn file_index(&self, plan: &Plan) -> Option<Arc<SentIndex>> {
        let stored = plan.index?;
        let artifact = plan.release.digest;
        let read = async {
            if let Some(sent) = self.indexes.get(stored) {
                return Ok(sent);
            }
            let bytes = self.store.get_index(stored).await.map_err(|e| e.to_string())?;
            let sent = tokio::task::spawn_blocking(move || SentIndex::read(&bytes, artifact))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let sent = Arc::new(sent);
            self.indexes.keep(stored, Arc::clone(&sent));
            Ok::<_, String>(sent)
        };
        match read.await {
            Ok(sent) if sent.artifact != artifact => {
                tracing::warn!(%artifact, index = %stored, described = %sent.artifact, "deploying without the file index: it describes another artifact");
                None
            }
            Ok(sent) => Some(sent),
            Err(e) => {
                tracing::warn!(%artifact, index = %stored, error = %e, "deploying without the file index: nodes write every file");
                None
            }
        }
    }
}

/// The whole artifact.
async fn artifact(store: &Store, digest: Digest) -> Result<Payload, String> {
    store.read_artifact(digest, None, crate::store::READ_FOR_NODES).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::FileIndex;

    #[test]
    fn frames_are_sent_in_runs() {
        let frame = |n: u64| crate::archive::Frame {
            offset: n * 100,
            length: 100,
            raw_offset: n * 1000,
            raw_length: 1000,
            sha256: Digest::of(&n.to_le_bytes()),
        };
        let index = FileIndex::new(Digest::of(b"a"), vec![]).with_frames((0..10).map(frame).collect());
        assert_eq!(lacked_ranges(&index.frames, &[1, 2, 3, 5, 9]), Ok(vec![100..400, 500..600, 900..1000]));
        assert_eq!(lacked_ranges(&index.frames, &[]), Ok(Vec::<std::ops::Range<u64>>::new()));

        // What a node says it lacks is taken only in order and in range.
        assert!(lacked_ranges(&index.frames, &[0, 3, 9]).is_ok());
        assert!(lacked_ranges(&index.frames, &[3, 3]).unwrap_err().contains("frame 3 after frame 3"));
        assert!(lacked_ranges(&index.frames, &[5, 2]).unwrap_err().contains("not in increasing order"));
        assert!(lacked_ranges(&index.frames, &[2, 10]).unwrap_err().contains("frame 10 of an artifact of 10 frames"));

        // A skeleton that does not fit (here: no bytes for ten frames' worth of stream) is
        // dropped before sending; one that fits is sent whole, in the wire form.
        let broken = index.clone().with_skeleton(Some(zstd::bulk::compress(b"short", 3).unwrap()));
        let sent = SentIndex::read(&broken.encode(), Digest::of(b"a")).unwrap();
        assert!(!sent.sparse);
        assert_eq!(FileIndex::decode_wire(&sent.wire, Digest::of(b"a")).unwrap().skeleton, None);
        let whole = zstd::bulk::compress(&[0u8; 10_000], 3).unwrap();
        let fits = index.clone().with_skeleton(Some(whole));
        let sent = SentIndex::read(&fits.encode(), Digest::of(b"a")).unwrap();
        assert!(sent.sparse);
        assert_eq!(*sent.frames, *fits.frames);
        assert_eq!(FileIndex::decode_wire(&sent.wire, Digest::of(b"a")).unwrap(), fits);
    }
}
