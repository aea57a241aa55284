//! Turns for uploads: how many are received at once, how many of those one token may hold,
//! and how long an upload waits for one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `limits.max_concurrent_uploads` turns, which bound the memory all uploads hold together.
/// One token holds at most half of them (at least one), so that a token trickling uploads at
/// just above `min_upload_rate` cannot keep every other service's CI waiting for hours; and
/// it has at most `waiting` more waiting, so that it cannot fill the server's connections
/// with uploads nobody reads.
pub struct Turns {
    all: Arc<Semaphore>,
    size: usize,
    per_token: usize,
    waiting: usize,
    /// Per token with an upload holding or waiting for a turn: its own turns, and how many of
    /// its uploads hold or wait.
    tokens: Mutex<HashMap<String, (Arc<Semaphore>, usize)>>,
}

/// Why an upload got no turn.
#[derive(Debug, PartialEq)]
pub enum NoTurn {
    /// The token has as many uploads running and waiting as it may, holding `per_token`.
    TokenBusy { running: usize, per_token: usize },
    /// None came free within the wait.
    Timeout,
}

/// A turn held; the token's count goes down when it is dropped.
pub struct Turn<'a> {
    turns: &'a Turns,
    /// `None`: the server's own.
    token: Option<String>,
    /// The token's turn and one of all; given back when dropped.
    permits: (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>),
}

impl Turns {
    pub fn new(size: u32, waiting: usize) -> Turns {
        let size = size.max(1) as usize;
        let per_token = (size / 2).max(1);
        Turns { all: Arc::new(Semaphore::new(size)), size, per_token, waiting, tokens: Mutex::default() }
    }

    /// How many uploads hold a turn now.
    pub fn running(&self) -> usize {
        self.size - self.all.available_permits()
    }

    /// A turn for an upload of `token`, waited for at most `wait`.
    pub async fn take(&self, token: &str, wait: Duration) -> Result<Turn<'_>, NoTurn> {
        let own = {
            let mut tokens = self.tokens.lock().expect("no code panics holding the turns");
            let (own, count) =
                tokens.entry(token.to_owned()).or_insert_with(|| (Arc::new(Semaphore::new(self.per_token)), 0));
            if *count >= self.per_token + self.waiting {
                return Err(NoTurn::TokenBusy { running: *count, per_token: self.per_token });
            }
            *count += 1;
            Arc::clone(own)
        };
        // Counted from here: the guard gives the count back however this ends.
        let mut turn = Turn { turns: self, token: Some(token.to_owned()), permits: (None, None) };
        let permits = async {
            let own = own.acquire_owned().await.expect("the semaphores are never closed");
            let all = Arc::clone(&self.all).acquire_owned().await.expect("the semaphores are never closed");
            (own, all)
        };
        let (own, all) = tokio::time::timeout(wait, permits).await.map_err(|_| NoTurn::Timeout)?;
        turn.permits = (Some(own), Some(all));
        Ok(turn)
    }

    /// A turn for the server's own upload (an adoption, which a deploy waits for): one of all
    /// the turns, outside any token's share, waited for as long as it takes.
    pub async fn take_own(&self) -> Turn<'_> {
        let all = Arc::clone(&self.all).acquire_owned().await.expect("the semaphores are never closed");
        Turn { turns: self, token: None, permits: (None, Some(all)) }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // The permits go back just after this (the fields drop after it): the count may be
        // one below what holds a turn for that moment, never above.
        let Some(token) = &self.token else { return };
        let mut tokens = self.turns.tokens.lock().expect("no code panics holding the turns");
        if let Some((_, count)) = tokens.get_mut(token) {
            *count -= 1;
            if *count == 0 {
                tokens.remove(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn a_token_holds_half_the_turns_and_has_so_many_waiting_at_most() {
        let turns = Turns::new(4, 4);
        assert_eq!(turns.per_token, 2);
        let a1 = turns.take("a", WAIT).await.unwrap();
        let _a2 = turns.take("a", WAIT).await.unwrap();
        assert_eq!(turns.take("a", WAIT).await.err(), Some(NoTurn::Timeout), "a third waits, and times out");
        assert_eq!(turns.running(), 2);
        // Another token still gets the two turns left.
        let b1 = turns.take("b", WAIT).await.unwrap();
        let _b2 = turns.take("b", WAIT).await.unwrap();
        assert_eq!(turns.running(), 4);
        assert_eq!(turns.take("c", WAIT).await.err(), Some(NoTurn::Timeout), "all four held");

        // Four of a's uploads wait at most (`waiting`); the fifth is refused at once.
        let waiting: Vec<_> = (0..4).map(|_| turns.take("a", LONG)).collect();
        let mut waiting: Vec<_> = waiting.into_iter().map(Box::pin).collect();
        for w in &mut waiting {
            assert!(futures::poll!(w.as_mut()).is_pending());
        }
        assert_eq!(turns.take("a", WAIT).await.err(), Some(NoTurn::TokenBusy { running: 6, per_token: 2 }));
        // A turn of a's given back goes to the first of a's waiting; b's goes to no one of a's.
        drop(b1);
        assert!(futures::poll!(waiting[0].as_mut()).is_pending(), "a holds its two already");
        drop(a1);
        let next = waiting.remove(0).await;
        assert_eq!(turns.running(), 3, "a's two and b's one");
        drop((next, waiting));
        assert_eq!(turns.tokens.lock().unwrap()["a"].1, 1, "a's waiting uploads gave their count back");
        drop(_a2);
        assert!(!turns.tokens.lock().unwrap().contains_key("a"), "a token with nothing running is forgotten");
    }

    /// An adoption is the server's own upload, asked for by a deploy's requester: it takes
    /// one of all the turns, never one of that token's, and is never refused.
    #[tokio::test]
    async fn the_servers_own_upload_takes_no_tokens_turn() {
        let turns = Turns::new(4, 4);
        let held = [turns.take("a", WAIT).await.unwrap(), turns.take("a", WAIT).await.unwrap()];
        let own = turns.take_own().await;
        assert_eq!(turns.running(), 3);
        assert_eq!(turns.tokens.lock().unwrap()["a"].1, 2, "not counted as a's");
        drop(own);
        drop(held);
        assert!(turns.tokens.lock().unwrap().is_empty());
        assert_eq!(turns.running(), 0);
    }

    #[tokio::test]
    async fn with_one_turn_a_token_may_hold_it() {
        let turns = Turns::new(1, 1);
        let held = turns.take("a", WAIT).await.unwrap();
        assert_eq!(turns.take("b", WAIT).await.err(), Some(NoTurn::Timeout));
        drop(held);
        assert!(turns.take("b", WAIT).await.is_ok());
    }
}
