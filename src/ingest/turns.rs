//! Turns for uploads: how many are received at once, how many of those one token may hold,
//! and how many uploads may wait for one, and how long.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

/// `limits.max_concurrent_uploads` turns, which bound the memory all uploads hold together.
///
/// - One token holds at most half of them (at least one), and a token already holding one
///   never takes the last free turn: two tokens trickling uploads at just above
///   `min_upload_rate` cannot keep every other service's CI waiting for hours.
/// - The server's own uploads (adoptions, which a deploy waits for) take one turn more than
///   the clients may hold together, so that they wait only for each other.
/// - Uploads waiting are capped per token and in all, so that waiting uploads cannot fill the
///   server's connections with bodies nobody reads.
///
/// Turns go to waiting uploads first come, first served among those that may take one.
pub struct Turns {
    size: usize,
    per_token: usize,
    waiting: Waiting,
    state: Mutex<State>,
}

/// How many uploads may wait for a turn: of one token, and of all.
#[derive(Clone, Copy, Debug)]
pub struct Waiting {
    pub per_token: usize,
    pub all: usize,
}

/// Why an upload got no turn.
#[derive(Debug, PartialEq)]
pub enum NoTurn {
    /// The token has as many uploads running and waiting as it may, holding `per_token`.
    TokenBusy { running: usize, per_token: usize },
    /// As many uploads wait as may, of all tokens.
    Full { waiting: usize },
    /// None came free within the wait.
    Timeout,
}

#[derive(Default)]
struct State {
    /// Turns held, the server's own included.
    held: usize,
    /// Clients' uploads waiting for a turn, or read without one ([`Turns::without_turn`]).
    waiting: usize,
    /// Per token with an upload holding or waiting for a turn.
    tokens: HashMap<String, Count>,
    queue: VecDeque<Waiter>,
    /// Waiting uploads whose place went to another token's ([`Turns::take_place`]), until
    /// their turn is dropped.
    evicted: HashSet<u64>,
    next_id: u64,
}

#[derive(Default)]
struct Count {
    holding: usize,
    /// Waiting for a turn, or read without one.
    waiting: usize,
}

struct Waiter {
    id: u64,
    /// `None`: the server's own.
    token: Option<String>,
    /// True: a turn; false: the place went to another token's upload.
    wake: oneshot::Sender<bool>,
}

/// A turn held, or waited for: given back (or the wait given up) when dropped.
pub struct Turn<'a> {
    turns: &'a Turns,
    id: u64,
    token: Option<String>,
}

impl Turns {
    pub fn new(size: u32, waiting: Waiting) -> Turns {
        let size = size.max(1) as usize;
        Turns { size, per_token: (size / 2).max(1), waiting, state: Mutex::default() }
    }

    /// How many uploads hold a turn now.
    pub fn running(&self) -> usize {
        self.state().held
    }

    /// A turn for an upload of `token`, waited for at most `wait`.
    pub async fn take(&self, token: &str, wait: Duration) -> Result<Turn<'_>, NoTurn> {
        let (turn, woken) = {
            let mut state = self.state();
            self.may_count(&state, token)?;
            let token = Some(token.to_owned());
            if self.may_take(&state, token.as_deref()) {
                return Ok(self.grant(&mut state, token));
            }
            if let Err(full) = self.may_wait(&state) {
                self.take_place(&mut state, token.as_deref().expect("a client's")).ok_or(full)?;
            }
            self.wait(&mut state, token)
        };
        // The turn (a waiting one until woken) gives its place back however this ends.
        if tokio::time::timeout(wait, woken).await.map_err(|_| NoTurn::Timeout)? == Ok(true) {
            return Ok(turn);
        }
        drop(turn);
        let waiting = self.state().waiting;
        Err(NoTurn::Full { waiting })
    }

    /// A turn for the server's own upload: waited for as long as it takes, which is as long
    /// as the server's other own uploads take at most.
    pub async fn take_own(&self) -> Turn<'_> {
        let (turn, woken) = {
            let mut state = self.state();
            if self.may_take(&state, None) {
                return self.grant(&mut state, None);
            }
            self.wait(&mut state, None)
        };
        let granted = woken.await.expect("woken before dropped");
        assert!(granted, "the server's own uploads keep their place");
        turn
    }

    /// Counts an upload of `token` that is read without a turn (a repeat drained unread: it
    /// holds no memory, but a connection) among its waiting ones, and among all.
    pub fn without_turn(&self, token: &str) -> Result<Unread<'_>, NoTurn> {
        let mut state = self.state();
        self.may_count(&state, token)?;
        self.may_wait(&state)?;
        state.tokens.entry(token.to_owned()).or_default().waiting += 1;
        state.waiting += 1;
        Ok(Unread { turns: self, token: token.to_owned() })
    }

    fn may_count(&self, state: &State, token: &str) -> Result<(), NoTurn> {
        let count = state.tokens.get(token).map_or(0, |c| c.holding + c.waiting);
        if count >= self.per_token + self.waiting.per_token {
            return Err(NoTurn::TokenBusy { running: count, per_token: self.per_token });
        }
        Ok(())
    }

    fn may_wait(&self, state: &State) -> Result<(), NoTurn> {
        if state.waiting >= self.waiting.all {
            return Err(NoTurn::Full { waiting: state.waiting });
        }
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics holding it, and every count stays whole between two statements that
        // could: a poisoned lock (and a drop while unwinding) goes on with what it holds.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn may_take(&self, state: &State, token: Option<&str>) -> bool {
        let Some(token) = token else { return state.held <= self.size };
        let holding = state.tokens.get(token).map_or(0, |c| c.holding);
        // A token holding a turn leaves the last free one to a token holding none.
        let needed = if holding > 0 { 2 } else { 1 };
        holding < self.per_token && self.size.saturating_sub(state.held) >= needed
    }

    fn grant(&self, state: &mut State, token: Option<String>) -> Turn<'_> {
        state.held += 1;
        if let Some(token) = &token {
            state.tokens.entry(token.clone()).or_default().holding += 1;
        }
        let id = state.next_id;
        state.next_id += 1;
        Turn { turns: self, id, token }
    }

    /// With every waiting place taken, the newest waiting upload of the token with the most
    /// waiting gives its place to an upload of `token`, if that has at least two fewer: two
    /// tokens' uploads in a queue kept full once left every other token a `503` at once.
    fn take_place(&self, state: &mut State, token: &str) -> Option<()> {
        let mine = state.tokens.get(token).map_or(0, |c| c.waiting);
        let (most, count) = state.tokens.iter().max_by_key(|(_, c)| c.waiting)?;
        if count.waiting < mine + 2 {
            return None;
        }
        let most = most.clone();
        let at = state.queue.iter().rposition(|w| w.token.as_deref() == Some(most.as_str()))?;
        let waiter = state.queue.remove(at).expect("in the queue");
        state.tokens.get_mut(&most).expect("a waiting token is counted").waiting -= 1;
        state.waiting -= 1;
        state.evicted.insert(waiter.id);
        let _ = waiter.wake.send(false);
        Some(())
    }

    fn wait(&self, state: &mut State, token: Option<String>) -> (Turn<'_>, oneshot::Receiver<bool>) {
        if let Some(token) = &token {
            state.tokens.entry(token.clone()).or_default().waiting += 1;
            state.waiting += 1;
        }
        let id = state.next_id;
        state.next_id += 1;
        let (wake, woken) = oneshot::channel();
        state.queue.push_back(Waiter { id, token: token.clone(), wake });
        (Turn { turns: self, id, token }, woken)
    }

    /// Gives free turns to the first waiting uploads that may take one.
    fn hand_on(&self, state: &mut State) {
        let mut at = 0;
        while at < state.queue.len() {
            if !self.may_take(state, state.queue[at].token.as_deref()) {
                at += 1;
                continue;
            }
            let waiter = state.queue.remove(at).expect("in the queue");
            state.held += 1;
            if let Some(token) = &waiter.token {
                let count = state.tokens.get_mut(token).expect("a waiting token is counted");
                count.waiting -= 1;
                count.holding += 1;
                state.waiting -= 1;
            }
            // Its receiver lives until its turn's drop has taken it out of the queue.
            let _ = waiter.wake.send(true);
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let turns = self.turns;
        let mut state = turns.state();
        let state = &mut *state;
        if state.evicted.remove(&self.id) {
            // Its counts went with its place.
            if let Some(token) = &self.token {
                forget_if_idle(state, token);
            }
            return;
        }
        let waited = state.queue.iter().position(|w| w.id == self.id).and_then(|at| state.queue.remove(at));
        if waited.is_none() {
            state.held -= 1;
        }
        if let Some(token) = &self.token {
            let count = state.tokens.get_mut(token).expect("a token holding or waiting is counted");
            match waited {
                Some(_) => {
                    count.waiting -= 1;
                    state.waiting -= 1;
                }
                None => count.holding -= 1,
            }
            forget_if_idle(state, token);
        }
        if waited.is_none() {
            turns.hand_on(state);
        }
    }
}

/// An upload read without a turn, counted until dropped.
pub struct Unread<'a> {
    turns: &'a Turns,
    token: String,
}

impl Drop for Unread<'_> {
    fn drop(&mut self) {
        let mut state = self.turns.state();
        let state = &mut *state;
        if let Some(count) = state.tokens.get_mut(&self.token) {
            count.waiting -= 1;
        }
        state.waiting -= 1;
        forget_if_idle(state, &self.token);
    }
}

/// A token with nothing running or waiting is forgotten.
fn forget_if_idle(state: &mut State, token: &str) {
    if state.tokens.get(token).is_some_and(|c| c.holding + c.waiting == 0) {
        state.tokens.remove(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    const WAIT: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_secs(3600);

    fn turns(size: u32, per_token: usize, all: usize) -> Turns {
        Turns::new(size, Waiting { per_token, all })
    }

    fn counts(turns: &Turns, token: &str) -> Option<(usize, usize)> {
        turns.state().tokens.get(token).map(|c| (c.holding, c.waiting))
    }

    #[tokio::test]
    async fn a_token_holds_half_the_turns_and_has_so_many_waiting_at_most() {
        let turns = turns(4, 4, 100);
        assert_eq!(turns.per_token, 2);
        let a1 = turns.take("a", WAIT).await.unwrap();
        let a2 = turns.take("a", WAIT).await.unwrap();
        assert_eq!(turns.take("a", WAIT).await.err(), Some(NoTurn::Timeout), "a third waits, and times out");
        assert_eq!(turns.running(), 2);
        assert_eq!(counts(&turns, "a"), Some((2, 0)), "the wait given up is not counted");

        // Four of a's uploads wait at most; the fifth is refused at once.
        let mut waiting: Vec<_> = (0..4).map(|_| Box::pin(turns.take("a", LONG))).collect();
        for w in &mut waiting {
            assert!(w.now_or_never().is_none());
        }
        assert_eq!(turns.take("a", WAIT).await.err(), Some(NoTurn::TokenBusy { running: 6, per_token: 2 }));
        // A turn of a's given back goes to the first of a's waiting.
        drop(a1);
        let next = waiting.remove(0).await.unwrap();
        assert_eq!(turns.running(), 2);
        drop((next, waiting));
        assert_eq!(counts(&turns, "a"), Some((1, 0)), "a's waiting uploads gave their count back");
        drop(a2);
        assert_eq!(counts(&turns, "a"), None, "a token with nothing running is forgotten");
        assert_eq!(turns.running(), 0);
    }

    /// N1 of the stop-33 attack: two tokens took all four turns, so that a third service's
    /// CI waited for as long as their trickles lasted.
    #[tokio::test]
    async fn a_token_holding_a_turn_leaves_the_last_free_one_to_a_token_holding_none() {
        let turns = turns(4, 4, 100);
        let _a = [turns.take("a", WAIT).await.unwrap(), turns.take("a", WAIT).await.unwrap()];
        let b1 = turns.take("b", WAIT).await.unwrap();
        let mut b2 = Box::pin(turns.take("b", LONG));
        assert!((&mut b2).now_or_never().is_none(), "b holds one: the last free turn is not b's");
        let c = turns.take("c", WAIT).await.expect("the last free turn is c's");
        assert_eq!(turns.running(), 4);
        // c done: one free, b holds one, so b still waits; d holds none and takes it.
        drop(c);
        assert!((&mut b2).now_or_never().is_none());
        let _d = turns.take("d", WAIT).await.unwrap();
        // b's own turn given back: its waiting upload takes it.
        drop(b1);
        let _b2 = b2.now_or_never().expect("b's turn").unwrap();
        assert_eq!(turns.running(), 4);
    }

    /// A waiting upload that may not take the free turn does not keep the ones behind it
    /// waiting; among those that may, the first come goes first.
    #[tokio::test]
    async fn turns_go_first_come_first_served_among_those_that_may_take_one() {
        let turns = turns(3, 4, 100);
        assert_eq!(turns.per_token, 1);
        let a = turns.take("a", WAIT).await.unwrap();
        let b = turns.take("b", WAIT).await.unwrap();
        let c = turns.take("c", WAIT).await.unwrap();
        let mut a2 = Box::pin(turns.take("a", LONG));
        let mut d = Box::pin(turns.take("d", LONG));
        let mut e = Box::pin(turns.take("e", LONG));
        for w in [&mut a2, &mut d, &mut e] {
            assert!(w.now_or_never().is_none());
        }
        drop(b);
        assert!((&mut a2).now_or_never().is_none(), "a holds its one");
        let _d = d.now_or_never().expect("d came before e").unwrap();
        assert!((&mut e).now_or_never().is_none());
        drop(a);
        let _a2 = a2.now_or_never().expect("a came before e").unwrap();
        assert!((&mut e).now_or_never().is_none());
        drop(c);
        assert!(e.now_or_never().is_some());
    }

    /// N3: many tokens' waiting uploads together could hold every connection.
    #[tokio::test]
    async fn so_many_uploads_wait_in_all() {
        let turns = turns(1, 4, 3);
        let _held = turns.take("a", WAIT).await.unwrap();
        let mut waiting: Vec<_> = ["b", "c", "d"].map(|t| Box::pin(turns.take(t, LONG))).into();
        for w in &mut waiting {
            assert!(w.now_or_never().is_none());
        }
        assert_eq!(turns.take("e", WAIT).await.err(), Some(NoTurn::Full { waiting: 3 }));
        drop(waiting.pop());
        let mut e = Box::pin(turns.take("e", LONG));
        assert!((&mut e).now_or_never().is_none(), "room again: e waits");
    }

    /// F2 of the stop-34 attack: two tokens kept the waiting room full, and every other
    /// token's upload got `503` at once. A token with fewer waiting now takes the place of the
    /// newest waiting upload of the token with the most, as long as that has two more.
    #[tokio::test]
    async fn a_token_with_fewer_waiting_takes_the_place_of_the_newest_of_the_token_with_most() {
        let turns = turns(1, 8, 4);
        let held = turns.take("x", WAIT).await.unwrap();
        let mut a: Vec<_> = (0..3).map(|_| Box::pin(turns.take("a", LONG))).collect();
        let mut b = Box::pin(turns.take("b", LONG));
        for w in a.iter_mut().chain([&mut b]) {
            assert!(w.now_or_never().is_none());
        }
        let mut c = Box::pin(turns.take("c", LONG));
        assert!((&mut c).now_or_never().is_none(), "c waits, in a's newest place");
        let evicted = a.pop().unwrap().now_or_never().map(|r| r.err());
        assert_eq!(evicted, Some(Some(NoTurn::Full { waiting: 4 })));
        let mut d = Box::pin(turns.take("d", LONG));
        assert!((&mut d).now_or_never().is_none());
        assert!(a.pop().unwrap().now_or_never().is_some(), "a's next newest gave its place to d");
        // One each: nobody has two more than a newcomer.
        assert_eq!(turns.take("e", WAIT).await.err(), Some(NoTurn::Full { waiting: 4 }));
        assert_eq!(turns.take("a", WAIT).await.err(), Some(NoTurn::Full { waiting: 4 }));
        // The places kept keep their order: x's turn goes to a's first.
        drop(held);
        let first = a.pop().unwrap().now_or_never().expect("a's first").unwrap();
        drop((first, b, c, d));
        assert!(turns.state().tokens.is_empty());
        assert!(turns.state().evicted.is_empty());
        assert_eq!((turns.running(), turns.state().waiting), (0, 0));
    }

    /// An adoption is the server's own upload, asked for by a deploy's requester: it takes
    /// none of that token's turns, is never refused, and waits only for other adoptions.
    #[tokio::test]
    async fn the_servers_own_upload_waits_for_no_client() {
        let turns = turns(4, 4, 100);
        let held = [
            turns.take("a", WAIT).await.unwrap(),
            turns.take("a", WAIT).await.unwrap(),
            turns.take("b", WAIT).await.unwrap(),
            turns.take("c", WAIT).await.unwrap(),
        ];
        let own = turns.take_own().await;
        assert_eq!(turns.running(), 5);
        assert_eq!(counts(&turns, "a"), Some((2, 0)), "not counted as a's");
        let mut second = Box::pin(turns.take_own());
        assert!((&mut second).now_or_never().is_none(), "one turn beyond the clients' at most");
        drop(own);
        let second = second.await;
        drop(held);
        // Clients' uploads may not take the server's turn.
        let mut four: Vec<_> = ["a", "b", "c", "d"].map(|t| Box::pin(turns.take(t, LONG))).into();
        let ready: Vec<_> = four.iter_mut().filter_map(|w| w.now_or_never()).collect();
        assert_eq!(ready.len(), 3, "the server's one and three of the clients'");
        drop((ready, four, second));
        assert_eq!(turns.running(), 0);
        assert!(turns.state().tokens.is_empty());
    }

    /// A repeat read without a turn holds a connection as a waiting upload does: it counts
    /// among its token's and all waiting uploads. The server's own waiting uploads count in
    /// neither.
    #[tokio::test]
    async fn uploads_read_without_a_turn_count_as_waiting_and_the_servers_own_do_not() {
        let turns = turns(1, 2, 3);
        let _held = turns.take("a", WAIT).await.unwrap();
        let _own = turns.take_own().await;
        let mut own_waiting = Box::pin(turns.take_own());
        assert!((&mut own_waiting).now_or_never().is_none());
        let [b1, _b2, _b3] = [(); 3].map(|()| turns.without_turn("b").unwrap());
        assert_eq!(turns.running(), 2, "read without a turn");
        assert_eq!(turns.without_turn("b").err(), Some(NoTurn::TokenBusy { running: 3, per_token: 1 }));
        assert_eq!(turns.without_turn("c").err(), Some(NoTurn::Full { waiting: 3 }));
        assert_eq!(turns.take("c", WAIT).await.err(), Some(NoTurn::Full { waiting: 3 }));
        drop(b1);
        assert_eq!(counts(&turns, "b"), Some((0, 2)));
        drop(turns.without_turn("c").expect("room again"));
        assert_eq!(counts(&turns, "c"), None, "given back when dropped");
    }

    #[tokio::test]
    async fn with_one_turn_a_token_may_hold_it() {
        let turns = turns(1, 1, 1);
        let held = turns.take("a", WAIT).await.unwrap();
        assert_eq!(turns.take("b", WAIT).await.err(), Some(NoTurn::Timeout));
        drop(held);
        assert!(turns.take("b", WAIT).await.is_ok());
    }
}
