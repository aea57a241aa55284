//! `--adopt` across a fleet: every node asked whether `current` is a plain directory, the
//! tree packaged there kept as an artifact (read in whole chunks, a short or long one refused),
//! and those nodes given it as a release to go back to.

use super::*;

/// How much of an adopted package one call reads.
pub(super) const ADOPTED_CHUNK: u64 = 4 << 20;

impl NodeDeployer {
    /// `--adopt`: asks every node whether its `current` is a plain directory; if any is, the
    /// tree (the same on every such node) is packaged there, kept as an artifact and recorded
    /// (so retention keeps it), and those nodes prepare it as a release to go back to.
    pub(super) async fn adopt(&self, plan: &Plan, targets: &[Target]) -> Result<(), Failure> {
        let Some(adopt) = &plan.adopt else { return Ok(()) };
        if let Some((digest, nodes)) = &adopt.captured {
            targets.iter().filter(|t| nodes.contains(&t.name)).for_each(|t| t.adopted(*digest));
            return Ok(());
        }
        let asking = targets.iter().map(|t| {
            let request = Request::Adopt { base: t.base.clone(), shared: plan.service.shared.clone() };
            phase::<Adopted>(plan, t, Phase::Adopt, request, None)
        });
        let mut found: Vec<(&Target, Digest, Option<u64>)> = Vec::new();
        let mut errors = Vec::new();
        for (target, answer) in targets.iter().zip(join_all(asking).await) {
            match answer {
                Ok(answer) => {
                    if let Some(legacy) = answer.legacy {
                        found.push((target, legacy.digest, Some(legacy.size)));
                    }
                }
                Err(e) => errors.push(Err(e)),
            }
        }
        if let Some(reason) = first_error(errors) {
            return Err(Failure::new(reason));
        }
        let Some(&(first, digest, size)) = found.first() else { return Ok(()) };
        if found.iter().any(|(_, d, _)| *d != digest) {
            let trees: Vec<String> = found.iter().map(|(t, d, _)| format!("{} has {}", t.name, d.short())).collect();
            return Err(Failure::new(format!(
                "the nodes hold different applications at current ({}): make them the same, or adopt them \
                 one release at a time with --exclude-node",
                trees.join(", ")
            )));
        }
        adopt
            .adopter
            .keep(digest, adopted_bytes(first, size.unwrap_or(0)))
            .await
            .map_err(|e| Failure::new(format!("node {}: {e}", first.name)))?;
        let nodes: Vec<String> = found.iter().map(|(t, _, _)| t.name.clone()).collect();
        adopt.adopter.record(digest, nodes).await.map_err(Failure::new)?;
        found.iter().for_each(|(t, _, _)| t.adopted(digest));
        Ok(())
    }
}

/// The adopted package on a node (`size` bytes, as its adopt answer said), read in chunks over
/// the node's transport. Each chunk must be whole: exactly what was asked (or the rest of the
/// package), the end said where the package ends. A node that sends less, more or a false end
/// is refused, and the stream's error stops ingest before anything is kept.
pub(super) fn adopted_bytes(target: &Target, size: u64) -> LegacyBytes<'_> {
    let chunks = futures::stream::unfold(Some(0u64), move |offset| async move {
        let offset = offset?;
        let request = Request::ReadAdopted { base: target.base.clone(), offset, len: ADOPTED_CHUNK };
        let chunk = phase_quiet::<Chunk>(target, request).await.and_then(|answer| {
            let data = hex::decode(&answer.data)
                .map_err(|e| format!("node {}: the adopted package came garbled: {e}", target.name))?;
            let (whole, eof) = (ADOPTED_CHUNK.min(size.saturating_sub(offset)), answer.eof);
            if data.len() as u64 != whole || eof != (offset + whole == size) {
                return Err(format!(
                    "node {}: sent {} bytes of the adopted package at offset {offset}{}, where its package \
                     of {size} bytes has {whole} there: refused, nothing kept",
                    target.name,
                    data.len(),
                    if eof { " as its end" } else { "" },
                ));
            }
            Ok((data, eof))
        });
        match chunk {
            Ok((data, eof)) => {
                let next = (!eof).then(|| offset + data.len() as u64);
                Some((Ok(bytes::Bytes::from(data)), next))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Box::pin(chunks)
}
