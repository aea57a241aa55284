//! Turns for uploads: how many are received at once, how many of those one token may hold,
//! and how many uploads may wait for one, and how long.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// `limits.max_concurrent_uploads` turns, which bound the memory all uploads hold together.
///
/// - One token holds at most half of them (at least one), and a token already holding one
///   never takes the last free turn: two tokens trickling uploads at just above
///   `min_upload_rate` cannot keep every other service's CI waiting for hours.
/// - A token holding more than one turn gives one whose body is still being read up to a token
///   holding none that waited half its wait ([`Turns::cut_for`]): three tokens trickling
///   uploads once held all four turns.
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
    /// Per token with an upload waiting for a turn, or read without one.
    tokens: HashMap<String, Count>,
    queue: VecDeque<Waiter>,
    /// Clients' turns held, oldest first: what a token holds.
    holders: Vec<Holder>,
    /// Waiting uploads whose place went to another token's ([`Turns::take_place`]), until
    /// their turn is dropped.
    evicted: HashSet<u64>,
    next_id: u64,
}

#[derive(Default)]
struct Count {
    waiting: usize,
    unread: usize,
}

impl State {
    /// Clients' uploads waiting for a turn (the server's own count as none).
    fn waiting(&self) -> usize {
        self.queue.iter().filter(|w| w.token.is_some()).count()
    }

    /// Turns `token` holds.
    fn holding(&self, token: &str) -> usize {
        self.holders.iter().filter(|h| h.token == token).count()
    }

    /// Uploads of `token` that hold or wait for a turn.
    fn in_turn(&self, token: &str) -> usize {
        self.holding(token) + self.tokens.get(token).map_or(0, |c| c.waiting)
    }
}

struct Waiter {
    id: u64,
    /// `None`: the server's own.
    token: Option<String>,
    /// True: a turn; false: the place went to another token's upload.
    wake: oneshot::Sender<bool>,
    cut: Cut,
}

/// A client's turn held.
struct Holder {
    id: u64,
    token: String,
    cut: Cut,
}

impl Holder {
    /// Cut while its body is still being read: the turn comes back at the upload's next read.
    fn given_up(&self) -> bool {
        self.cut.stop.is_cancelled() && self.cut.reading()
    }
}

/// How an upload holding a turn is told to stop, and tells that its body has all been read
/// (then it is past stopping: it finishes, and a cut of it is spent for nothing).
#[derive(Clone, Default)]
pub struct Cut {
    stop: CancellationToken,
    read: Arc<AtomicBool>,
    /// The body's bytes read so far.
    bytes: Arc<AtomicU64>,
}

impl Cut {
    /// Done when the upload is to stop reading its body.
    pub async fn cancelled(&self) {
        self.stop.cancelled().await;
    }

    /// The body has all been read: this turn is no longer one to cut.
    pub fn body_read(&self) {
        self.read.store(true, Ordering::Relaxed);
    }

    /// `n` more bytes of the body read: of two turns to cut, the one with fewer goes.
    pub fn read_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn reading(&self) -> bool {
        !self.read.load(Ordering::Relaxed)
    }
}

/// A turn held, or waited for: given back (or the wait given up) when dropped.
pub struct Turn<'a> {
    turns: &'a Turns,
    id: u64,
    token: Option<String>,
    cut: Cut,
}

impl Turn<'_> {
    /// How the upload holding this turn is told to give it up to another token's upload.
    pub fn cut(&self) -> Cut {
        self.cut.clone()
    }
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
        // The turn (a waiting one until woken) gives its place back however this ends. From
        // half the wait on, a turn is cut for it if it may have one, again every tenth of the
        // wait: a cut turn whose body ended meanwhile does not come back soon.
        let deadline = tokio::time::Instant::now() + wait;
        let mut woken = woken;
        let mut next = tokio::time::Instant::now() + wait / 2;
        let granted = loop {
            match tokio::time::timeout_at(next.min(deadline), &mut woken).await {
                Ok(granted) => break granted,
                Err(_) if next >= deadline => return Err(NoTurn::Timeout),
                Err(_) => self.cut_for(&turn),
            }
            next += (wait / 10).max(Duration::from_millis(10));
        };
        if granted == Ok(true) {
            return Ok(turn);
        }
        drop(turn);
        let waiting = self.state().waiting();
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

    /// Counts an upload of `token` that may be read without a turn (a repeat hashed but not
    /// checked: it holds no memory, but a connection), on a budget of its own: as many per
    /// token as a token may hold turns, and as many in all as there are turns. `None`: past
    /// it, and the upload is to take the checked way, with a turn. Outside the waiting room,
    /// so that these cannot fill it, nor be given a place in it.
    pub fn without_turn(&self, token: &str) -> Option<Unread<'_>> {
        let mut state = self.state();
        let count = state.tokens.get(token).map_or(0, |c| c.unread);
        if count >= self.per_token || state.tokens.values().map(|c| c.unread).sum::<usize>() >= self.size {
            return None;
        }
        state.tokens.entry(token.to_owned()).or_default().unread += 1;
        Some(Unread { turns: self, token: token.to_owned() })
    }

    fn may_count(&self, state: &State, token: &str) -> Result<(), NoTurn> {
        let count = state.in_turn(token);
        if count >= self.per_token + self.waiting.per_token {
            return Err(NoTurn::TokenBusy { running: count, per_token: self.per_token });
        }
        Ok(())
    }

    fn may_wait(&self, state: &State) -> Result<(), NoTurn> {
        let waiting = state.waiting();
        if waiting >= self.waiting.all {
            return Err(NoTurn::Full { waiting });
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
        let holding = state.holding(token);
        // A token holding a turn leaves the last free one to a token holding none.
        let needed = if holding > 0 { 2 } else { 1 };
        holding < self.per_token && self.size.saturating_sub(state.held) >= needed
    }

    fn grant(&self, state: &mut State, token: Option<String>) -> Turn<'_> {
        let id = state.next_id;
        state.next_id += 1;
        let cut = Cut::default();
        hold(state, id, token.as_deref(), &cut);
        Turn { turns: self, id, token, cut }
    }

    /// When `waiting` (an upload of a client's, the first of its token's waiting) still waits
    /// and its token holds no turn, a turn of a token holding two or more not given up already
    /// is cut: of the tokens holding the most, the turn still reading its body that has read
    /// the least (the newest of equals). Its upload stops at its next read, and the turn goes
    /// to the first waiting upload that may take it. No cut while as many turns are being
    /// given up as tokens holding none wait up to this one, nor when the turn given up could
    /// not be taken (the server's own hold one beyond the clients').
    fn cut_for(&self, waiting: &Turn) {
        let state = self.state();
        let Some(token) = waiting.token.as_deref() else { return };
        let holding = |state: &State, t: &str| state.holders.iter().filter(|h| h.token == t && !h.given_up()).count();
        let Some(at) = state.queue.iter().position(|w| w.id == waiting.id) else { return };
        let mut seen = HashSet::new();
        let mut starved = 0;
        for t in state.queue.iter().take(at + 1).filter_map(|w| w.token.as_deref()) {
            if seen.insert(t) && holding(&state, t) == 0 {
                starved += 1;
            }
        }
        let first = state.queue.iter().find(|w| w.token.as_deref() == Some(token)).map(|w| w.id);
        let given_up = state.holders.iter().filter(|h| h.given_up()).count();
        let free_after = (self.size + given_up + 1).saturating_sub(state.held);
        if first != Some(waiting.id) || holding(&state, token) > 0 || given_up >= starved || free_after == 0 {
            return;
        }
        let candidate = state
            .holders
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.cut.stop.is_cancelled() && h.cut.reading() && holding(&state, &h.token) >= 2)
            .max_by_key(|&(at, h)| {
                (holding(&state, &h.token), std::cmp::Reverse(h.cut.bytes.load(Ordering::Relaxed)), at)
            });
        if let Some((_, holder)) = candidate {
            tracing::info!(token = %holder.token, waiting = %token, "an upload gives its turn to another token's");
            holder.cut.stop.cancel();
        }
    }

    /// With every waiting place taken, the newest waiting upload of the token with the most
    /// uploads holding or waiting for a turn gives its place to an upload of `token`, if that
    /// has at least two fewer: two tokens' uploads in a queue kept full once left every other
    /// token a `503` at once.
    fn take_place(&self, state: &mut State, token: &str) -> Option<()> {
        let in_turn = |state: &State, waiter: &Waiter| waiter.token.as_deref().map_or(0, |t| state.in_turn(t));
        let mine = state.in_turn(token);
        let most = state.queue.iter().map(|w| in_turn(state, w)).max()?;
        if most < mine + 2 {
            return None;
        }
        let at = state.queue.iter().rposition(|w| in_turn(state, w) == most).expect("its maximum");
        let waiter = state.queue.remove(at).expect("in the queue");
        let most = waiter.token.as_deref().expect("a client's: the server's own count as none");
        state.tokens.get_mut(most).expect("a waiting token is counted").waiting -= 1;
        state.evicted.insert(waiter.id);
        let _ = waiter.wake.send(false);
        Some(())
    }

    fn wait(&self, state: &mut State, token: Option<String>) -> (Turn<'_>, oneshot::Receiver<bool>) {
        if let Some(token) = &token {
            state.tokens.entry(token.clone()).or_default().waiting += 1;
        }
        let id = state.next_id;
        state.next_id += 1;
        let (wake, woken) = oneshot::channel();
        let cut = Cut::default();
        state.queue.push_back(Waiter { id, token: token.clone(), wake, cut: cut.clone() });
        (Turn { turns: self, id, token, cut }, woken)
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
            if let Some(token) = &waiter.token {
                state.tokens.get_mut(token).expect("a waiting token is counted").waiting -= 1;
            }
            hold(state, waiter.id, waiter.token.as_deref(), &waiter.cut);
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
        match (&waited, &self.token) {
            (Some(_), Some(token)) => state.tokens.get_mut(token).expect("a waiting token is counted").waiting -= 1,
            (Some(_), None) => {}
            (None, _) => {
                state.held -= 1;
                state.holders.retain(|h| h.id != self.id);
            }
        }
        if let Some(token) = &self.token {
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
            count.unread -= 1;
        }
        forget_if_idle(state, &self.token);
    }
}

/// A turn taken, by `token` (`None`: the server's own, never cut).
fn hold(state: &mut State, id: u64, token: Option<&str>, cut: &Cut) {
    state.held += 1;
    if let Some(token) = token {
        state.holders.push(Holder { id, token: token.to_owned(), cut: cut.clone() });
    }
}

/// A token with nothing waiting or read without a turn is forgotten (what it holds is in
/// `holders`).
fn forget_if_idle(state: &mut State, token: &str) {
    if state.tokens.get(token).is_some_and(|c| c.waiting + c.unread == 0) {
        state.tokens.remove(token);
    }
}

#[cfg(test)]
mod tests;
