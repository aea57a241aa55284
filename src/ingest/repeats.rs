//! Uploads that change nothing, on record at a bounded rate: a CI retrying, or a leaked token
//! uploading the same bytes in a loop, once appended an audit event per request (13,000 in
//! 20 s from one client; ~25 GB of registry a day).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::digest::Digest;

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
