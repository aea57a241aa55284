//! The turns' rules, one at a time, on futures polled by hand (`now_or_never`), on a paused
//! clock where a rule waits.

use super::*;
use futures::FutureExt;

const WAIT: Duration = Duration::from_millis(50);
const LONG: Duration = Duration::from_secs(3600);

fn turns(size: u32, per_token: usize, all: usize) -> Turns {
    Turns::new(size, Waiting { per_token, all })
}

fn counts(turns: &Turns, token: &str) -> Option<(usize, usize)> {
    let state = turns.state();
    let waiting = state.tokens.get(token).map(|c| c.waiting);
    let holding = state.holding(token);
    (holding > 0 || waiting.is_some()).then_some((holding, waiting.unwrap_or(0)))
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
    assert_eq!((turns.running(), turns.state().waiting()), (0, 0));
}

/// F1 of the stop-35 attack: three tokens (one with two uploads) held all four turns, and a
/// fourth token's uploads waited in vain for as long as theirs trickled. A token holding none
/// that waited half its wait now cuts the newest turn of the token holding the most, once.
#[tokio::test(start_paused = true)]
async fn a_token_holding_two_turns_gives_its_newest_up_to_a_token_waiting_with_none() {
    let turns = turns(4, 4, 100);
    let wait = Duration::from_secs(10);
    let mut a = vec![turns.take("a", WAIT).await.unwrap(), turns.take("a", WAIT).await.unwrap()];
    let others = [turns.take("b", WAIT).await.unwrap(), turns.take("c", WAIT).await.unwrap()];
    let mut a3 = Box::pin(turns.take("a", wait));
    let mut d = Box::pin(turns.take("d", wait));
    let mut e = Box::pin(turns.take("e", wait));
    for w in [&mut a3, &mut d, &mut e] {
        assert!(w.now_or_never().is_none());
    }
    let cut = |turns: &[Turn]| turns.iter().map(|t| t.cut().stop.is_cancelled()).collect::<Vec<_>>();
    tokio::time::advance(Duration::from_secs(4)).await;
    for w in [&mut a3, &mut d, &mut e] {
        assert!(w.now_or_never().is_none());
    }
    assert_eq!(cut(&a), [false, false], "nothing cut before half the wait");
    tokio::time::advance(Duration::from_secs(2)).await;
    for w in [&mut a3, &mut d, &mut e] {
        assert!(w.now_or_never().is_none());
    }
    // d cut a's newest; e finds none holding two not cut, and a's own waiting upload cuts nothing.
    assert_eq!(cut(&a), [false, true]);
    assert_eq!(cut(&others), [false, false]);
    // a's cut upload stops: its turn goes to d, the first waiting that may take it.
    drop(a.pop());
    let _d = d.now_or_never().expect("d's turn").unwrap();
    assert_eq!(counts(&turns, "a"), Some((1, 1)));
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(e.now_or_never().map(|r| r.err()), Some(Some(NoTurn::Timeout)), "four tokens hold one each");
    assert_eq!(a3.now_or_never().map(|r| r.err()), Some(Some(NoTurn::Timeout)));
}

/// A1 of the stop-36 attack: a cut spent on an upload past its body (a check of many seconds)
/// gave no turn back, and no other was cut. Only turns still reading are cut, and a cut spent
/// on one whose body then ended is made again on another at the next look.
#[tokio::test(start_paused = true)]
async fn only_turns_still_reading_are_cut_and_a_cut_spent_is_made_again() {
    let turns = turns(6, 6, 100);
    let a: Vec<_> = (0..3).map(|_| turns.take("a", WAIT).now_or_never().unwrap().unwrap()).collect();
    let _others = ["b", "c", "x"].map(|t| turns.take(t, WAIT).now_or_never().unwrap().unwrap());
    a[2].cut().body_read();
    let mut d = Box::pin(turns.take("d", Duration::from_secs(10)));
    assert!((&mut d).now_or_never().is_none());
    let cut = || a.iter().map(|t| t.cut().stop.is_cancelled()).collect::<Vec<_>>();
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!((&mut d).now_or_never().is_none());
    assert_eq!(cut(), [false, true, false], "the newest still reading");
    // Its body ended before it saw the cut: it finishes, and still holds its turn.
    a[1].cut().body_read();
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!((&mut d).now_or_never().is_none());
    assert_eq!(cut(), [false, true, false], "not before the next look");
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!((&mut d).now_or_never().is_none());
    assert_eq!(cut(), [true, true, false], "cut again, on the one still reading");
    drop(a);
    assert!(d.now_or_never().expect("d's turn").is_ok());
}

/// The turn cut is the one that has read least, so that a token's upload nearly sent is not
/// the one sent again; one cut for a token however many of its uploads wait; none when the
/// turn given up could not be taken.
#[tokio::test(start_paused = true)]
async fn the_turn_cut_has_read_least_and_one_token_waiting_twice_cuts_once() {
    let turns = turns(4, 4, 100);
    let a = [turns.take("a", WAIT).await.unwrap(), turns.take("a", WAIT).await.unwrap()];
    let _others = [turns.take("b", WAIT).await.unwrap(), turns.take("c", WAIT).await.unwrap()];
    a[1].cut().read_bytes(1 << 30);
    let mut d =
        [Box::pin(turns.take("d", Duration::from_secs(10))), Box::pin(turns.take("d", Duration::from_secs(10)))];
    for w in &mut d {
        assert!(w.now_or_never().is_none());
    }
    tokio::time::advance(Duration::from_secs(6)).await;
    for w in &mut d {
        assert!(w.now_or_never().is_none());
    }
    assert_eq!(a.each_ref().map(|t| t.cut().stop.is_cancelled()), [true, false], "the one that read least, once");

    // Held one beyond the clients' by the server's own, a turn given up could not be taken.
    let turns = super::tests::turns(4, 4, 100);
    let a = [turns.take("a", WAIT).await.unwrap(), turns.take("a", WAIT).await.unwrap()];
    let _b = turns.take("b", WAIT).await.unwrap();
    let _own = [turns.take_own().await, turns.take_own().await];
    assert_eq!(turns.running(), 5);
    let mut e = Box::pin(turns.take("e", Duration::from_secs(10)));
    assert!((&mut e).now_or_never().is_none());
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!((&mut e).now_or_never().is_none());
    assert_eq!(a.each_ref().map(|t| t.cut().stop.is_cancelled()), [false, false]);
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

/// A repeat read without a turn has a budget of its own, outside the waiting room: as many
/// per token as it may hold turns, as many in all as there are turns. The server's own
/// waiting uploads take no place in the room either.
#[tokio::test]
async fn uploads_read_without_a_turn_and_the_servers_own_take_no_place_in_the_waiting_room() {
    let turns = turns(2, 8, 2);
    let _held = [turns.take("a", WAIT).await.unwrap(), turns.take("b", WAIT).await.unwrap()];
    let _own = turns.take_own().await;
    let mut own_waiting = Box::pin(turns.take_own());
    assert!((&mut own_waiting).now_or_never().is_none());
    let c = turns.without_turn("c").expect("c's one");
    assert!(turns.without_turn("c").is_none(), "as many as c may hold turns");
    let _d = turns.without_turn("d").expect("d's one");
    assert!(turns.without_turn("e").is_none(), "as many in all as there are turns");
    assert_eq!((turns.running(), turns.state().waiting()), (3, 0));
    // The room's two places are the clients' to wait in.
    let mut waiting: Vec<_> = ["c", "e"].map(|t| Box::pin(turns.take(t, LONG))).into();
    for w in &mut waiting {
        assert!(w.now_or_never().is_none());
    }
    assert_eq!(turns.take("f", WAIT).await.err(), Some(NoTurn::Full { waiting: 2 }));
    drop(c);
    assert_eq!(counts(&turns, "c"), Some((0, 1)), "its waiting upload");
    assert!(turns.without_turn("e").is_some(), "room again");
}

#[tokio::test]
async fn with_one_turn_a_token_may_hold_it() {
    let turns = turns(1, 1, 1);
    let held = turns.take("a", WAIT).await.unwrap();
    assert_eq!(turns.take("b", WAIT).await.err(), Some(NoTurn::Timeout));
    drop(held);
    assert!(turns.take("b", WAIT).await.is_ok());
}
