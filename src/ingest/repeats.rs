//! Uploads that change nothing, on record at a bounded rate: a CI retrying, or a leaked token
//! uploading the same bytes in a loop, once appended an audit event per request (13,000 in
//! 20 s from one client; ~25 GB of registry a day). And such a repeat that goes without an
//! event is not checked again either: ~500,000 empty files cost ~2 CPU-seconds to check at
//! each send (N4 of the stop-33 attack).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use sha2::{Digest as _, Sha256};

use super::{IngestError, Ingestor, Paced, Piece, UploadRequest};
use crate::digest::Digest;
use crate::model::access::Principal;
use crate::registry::Recorded;

/// A token's repeats of one artifact within this long of the last one on record go without
/// an event of their own; the next one on record counts them.
pub const WINDOW: Duration = Duration::from_secs(10 * 60);
/// Token and artifact pairs remembered; past it, those older than [`WINDOW`] are forgotten,
/// and if that is not enough, all (their next repeat is on record again).
const REMEMBERED: usize = 4_096;

/// Per token and artifact: when its last repeat on record was, and how many went without an
/// event since.
#[derive(Default)]
pub struct Repeats {
    seen: Mutex<HashMap<(String, Digest), (Instant, u64)>>,
}

/// Whether an upload, if it changes nothing, goes on record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Note {
    /// On record, with the count of the repeats since the last one on record.
    Record { unrecorded: u64 },
    /// A repeat within the window of one on record.
    Quiet,
}

impl Repeats {
    /// What an upload of `digest` by `token` would be, at `now`, if it changed nothing.
    pub fn note(&self, token: &str, digest: Digest, now: Instant) -> Note {
        match self.seen().get(&(token.to_owned(), digest)) {
            Some((at, _)) if now.duration_since(*at) < WINDOW => Note::Quiet,
            Some((_, unrecorded)) => Note::Record { unrecorded: *unrecorded },
            None => Note::Record { unrecorded: 0 },
        }
    }

    /// An upload of `digest` by `token` that changed nothing, on record or not (`note`).
    pub fn repeated(&self, token: &str, digest: Digest, note: Note, now: Instant) {
        let mut seen = self.seen();
        match note {
            Note::Record { .. } => {
                if seen.len() >= REMEMBERED {
                    seen.retain(|_, (at, _)| now.duration_since(*at) < WINDOW);
                    if seen.len() >= REMEMBERED {
                        seen.clear();
                    }
                }
                seen.insert((token.to_owned(), digest), (now, 0));
            }
            Note::Quiet => {
                if let Some((_, unrecorded)) = seen.get_mut(&(token.to_owned(), digest)) {
                    *unrecorded += 1;
                }
            }
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Digest), (Instant, u64)>> {
        self.seen.lock().expect("no code panics holding the repeats")
    }
}

impl Ingestor {
    /// An HTTP upload that names its digest before its bytes, repeating an upload of that
    /// token's on record within [`WINDOW`], of bytes the store holds, that would change
    /// nothing on record (`Registry::unchanged_by_upload`): its body is hashed at the upload's
    /// pace, without a turn (on a budget of its own, `Turns::without_turn`; past it, the upload
    /// takes the checked way), and not checked as an archive; bytes that hash to the digest get
    /// the answer on record. It would have been
    /// checked only to be dropped, and go without an event. What it does not do: write the
    /// index object again, or ready the index for the next deploy (that reads it from the
    /// store).
    pub(super) async fn unread_repeat<S, E>(
        &self,
        principal: &Principal,
        request: &UploadRequest,
        body: &mut Paced<S>,
        limit: u64,
    ) -> Result<Option<Recorded>, IngestError>
    where
        S: Stream<Item = Result<Piece, E>> + Unpin,
        E: std::fmt::Display,
    {
        let (Some(digest), Some(_)) = (request.expected, request.pace) else { return Ok(None) };
        let now = Instant::now();
        if self.repeats.note(&principal.name, digest, now) != Note::Quiet {
            return Ok(None);
        }
        let Some(recorded) = self.unchanged(digest, &request.service).await? else { return Ok(None) };
        if request.declared_size.is_some_and(|size| size != recorded.artifact.size) {
            return Ok(None);
        }
        let Some(_counted) = self.turns.without_turn(&principal.name) else { return Ok(None) };
        let (mut hasher, mut size, mut claims) = (Sha256::new(), 0, Vec::new());
        while let Some(piece) = body.next().await? {
            match piece.map_err(|e| IngestError::Interrupted(e.to_string()))? {
                Piece::Bytes(bytes) => {
                    size += bytes.len() as u64;
                    if size > limit {
                        return Err(IngestError::TooLarge { limit });
                    }
                    hasher.update(&bytes);
                }
                Piece::Claim(text) => claims.push(
                    text.parse::<Digest>()
                        .map_err(|e| IngestError::BadRequest(format!("X-Release-Digest trailer: {e}")))?,
                ),
            }
        }
        let actual = Digest::from_hasher(hasher);
        if let Some(expected) = std::iter::once(digest).chain(claims).find(|claimed| *claimed != actual) {
            return Err(IngestError::DigestMismatch { expected, actual });
        }
        // A purge may have come while the body was read: then this upload would have restored
        // the bytes, and must be sent again to do so.
        let _publishing = self.store.publishing().await;
        if self.unchanged(digest, &request.service).await?.is_none() {
            return Err(IngestError::Overtaken);
        }
        self.repeats.repeated(&principal.name, digest, Note::Quiet, now);
        tracing::debug!(%digest, token = %principal.name, size, "a repeat changing nothing, not checked again");
        Ok(Some(recorded))
    }

    /// What is on record of `digest` for `service` if an upload of it would change nothing,
    /// the store holding its bytes.
    async fn unchanged(&self, digest: Digest, service: &str) -> Result<Option<Recorded>, IngestError> {
        let shared = self.config.service(service).map(|s| s.shared.clone()).unwrap_or_default();
        let (registry, service) = (Arc::clone(&self.registry), service.to_owned());
        let unchanged = crate::registry::run(move || registry.unchanged_by_upload(digest, &service, &shared)).await?;
        let Some(recorded) = unchanged else { return Ok(None) };
        let held = self.store.artifact_size(digest).await? == Some(recorded.artifact.size);
        Ok(held.then_some(recorded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_repeat_per_token_and_artifact_and_window_is_on_record_and_counts_the_others() {
        let repeats = Repeats::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let start = Instant::now();
        assert_eq!(repeats.note("ci", a, start), Note::Record { unrecorded: 0 });
        repeats.repeated("ci", a, Note::Record { unrecorded: 0 }, start);
        for n in 1..=3 {
            let at = start + Duration::from_secs(n);
            assert_eq!(repeats.note("ci", a, at), Note::Quiet);
            repeats.repeated("ci", a, Note::Quiet, at);
        }
        assert_eq!(repeats.note("ci", b, start), Note::Record { unrecorded: 0 }, "another artifact");
        assert_eq!(repeats.note("ci-web", a, start), Note::Record { unrecorded: 0 }, "another token");
        let later = start + WINDOW;
        assert_eq!(repeats.note("ci", a, later), Note::Record { unrecorded: 3 });
        repeats.repeated("ci", a, Note::Record { unrecorded: 3 }, later);
        assert_eq!(repeats.note("ci", a, later), Note::Quiet, "counted from the new one on record");

        // Remembered pairs are bounded: the old ones go first, then all.
        for n in 0..REMEMBERED as u64 {
            repeats.repeated("ci", Digest::of(&n.to_le_bytes()), Note::Record { unrecorded: 0 }, later);
        }
        assert!(repeats.seen().len() <= REMEMBERED);
    }
}
