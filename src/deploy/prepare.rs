//! The prepare phase on one node: the artifact fetched (presigned URL, signed URL of this
//! server, or streamed), or checked when the node has it already; the adopted legacy tree
//! first on a node adopting one; the artifact's file index read once per deploy and sent
//! along, so that a node links the files it already holds.

use super::*;

/// The most an index may take on a prepare's request line, as JSON: a node reads that line
/// whole, and the server writes it for every node at once (`parallel`). An artifact of
/// 500,000 files of 60-byte paths (`limits.max_files`) makes about 101 MiB; one of longer
/// paths, up to the 256 MiB an index may decompress to. A larger index costs the sharing.
pub(super) const MAX_SENT_INDEX_BYTES: u64 = 64 << 20;

/// How many bytes `index` takes as JSON (counted, not written out).
pub(super) fn sent_bytes(index: &FileIndex) -> u64 {
    struct Counting(u64);
    impl std::io::Write for Counting {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counted = Counting(0);
    serde_json::to_writer(&mut counted, index).expect("an index serializes");
    counted.0
}

impl NodeDeployer {
    /// Prepares the release (and first the adopted legacy tree, on a node adopting one); notes
    /// what the node's `current` points at, to put it back there.
    pub(super) async fn prepare_node(
        &self,
        plan: &Plan,
        target: &Target,
        hooks: &Hooks,
        index: Option<&FileIndex>,
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
        self.prepare(plan, target, hooks, plan.release.digest, index).await
    }

    /// Prepares `digest` on one node: a check when it is already there, else a fetch (the
    /// files `index` names that a release on the node holds are linked, not written).
    async fn prepare(
        &self,
        plan: &Plan,
        target: &Target,
        hooks: &Hooks,
        digest: Digest,
        index: Option<&FileIndex>,
    ) -> Result<(), String> {
        let status: Status = phase_quiet(target, Request::Status { base: target.base.clone() }).await?;
        let present = status.ready.contains(&digest);
        let name = if digest == plan.release.digest { Phase::Prepare } else { Phase::PrepareAdopted };
        let started = Timestamp::now();
        if present {
            let request = self.prepare_request(plan, target, hooks, digest, Source::Present, None);
            let answer = call::<Prepared>(target, &request, None).await;
            // The status was read without the node's lock: the clean-up of an earlier run may
            // have removed the release since (it follows `live` in the background). Then it is
            // fetched after all.
            if !matches!(&answer, Err(CallError::Node(e)) if e.code == ErrorCode::Missing) {
                return report_phase(plan, target, name, &request, started, answer).map(drop);
            }
            tracing::warn!(node = %target.name, %digest, "the release left the node between its status and prepare; fetching it");
        }
        let (source, payload) = if let Some(url) = self.store.presigned_get(digest).await.map_err(|e| e.to_string())? {
            // The node fetches from the bucket itself: the bytes do not pass through the server.
            (Source::Url(url), None)
        } else if let Some(base) = self.node_url.as_ref().filter(|_| target.remote) {
            // From this server, by a signed URL: plain HTTP(S) costs less than the SSH stream.
            (Source::Server(fetch::url(base, digest, utc::now().unix_timestamp())), None)
        } else {
            (Source::Stdin, Some(self.artifact(digest).await?))
        };
        let request = self.prepare_request(plan, target, hooks, digest, source, index);
        let answer = call::<Prepared>(target, &request, payload).await;
        report_phase(plan, target, name, &request, started, answer).map(drop)
    }

    fn prepare_request(
        &self,
        plan: &Plan,
        target: &Target,
        hooks: &Hooks,
        digest: Digest,
        source: Source,
        index: Option<&FileIndex>,
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
            index: index.cloned(),
        })
    }

    /// The release's file index, read once per deploy for every node. An index that cannot
    /// be read or does not describe the artifact costs the sharing, never the deploy: every
    /// node then writes every file (and checks each against the artifact's digest as always).
    pub(super) async fn file_index(&self, plan: &Plan) -> Option<FileIndex> {
        let stored = plan.index?;
        let artifact = plan.release.digest;
        let read = async {
            let bytes = self.store.get_index(stored).await.map_err(|e| e.to_string())?;
            tokio::task::spawn_blocking(move || FileIndex::decode(&bytes, artifact))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
        };
        match read.await {
            Ok(index) if sent_bytes(&index) > MAX_SENT_INDEX_BYTES => {
                tracing::warn!(%artifact, index = %stored, files = index.files.len(), "deploying without the file index: too large to send with every prepare");
                None
            }
            Ok(index) => Some(index),
            Err(e) => {
                tracing::warn!(%artifact, index = %stored, error = %e, "deploying without the file index: nodes write every file");
                None
            }
        }
    }

    async fn artifact(&self, digest: Digest) -> Result<Payload, String> {
        self.store.read_artifact(digest, None).await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::IndexedFile;

    #[test]
    fn an_index_is_measured_as_the_json_a_node_reads() {
        let file = |i: u64| IndexedFile {
            path: format!("vendor/package/src/file{i}.php"),
            executable: false,
            size: 1000,
            offset: i * 1536,
            sha256: Digest::of(&i.to_le_bytes()),
        };
        let index = FileIndex::new(Digest::of(b"a"), (0..1000).map(file).collect());
        assert_eq!(sent_bytes(&index), serde_json::to_vec(&index).unwrap().len() as u64);
        // 500,000 files of 60-byte paths (limits.max_files): over the bound, sent without.
        let per_file = sent_bytes(&index) / 1000;
        assert!(per_file * 500_000 > MAX_SENT_INDEX_BYTES, "{per_file} bytes a file");
    }
}
