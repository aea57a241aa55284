//! The sparse unpack's linking threads: they make the hard links of the files linked unread
//! while the walk reads and checks the entries after them. Of a 1%-changed release those are
//! nearly all its entries, and their links nearly half of the walk.
//!
//! The walk makes every directory itself before it hands over a link into it, and writes
//! every other entry itself. Batches go to the threads in turn, and each does its own in
//! order: the entries' paths are unique (the walk's rules), so no link depends on another,
//! and nothing the walk writes depends on a link handed over, except a hard link entry, whose
//! target may be one: before it, the walk waits until every thread has done all it was given.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{Scope, ScopedJoinHandle};

use super::dirfd::{self, OpenDir};
use super::unpack::{Seen, not_linkable};
use crate::archive::IndexedFile;

/// Work handed to a thread.
enum Op {
    /// Link the index's file at this place to the older file found for it.
    Link(usize),
    /// Say, on the answer channel, whether everything before succeeded.
    Settle,
}

/// Why a thread stopped: the path it failed on and the error.
pub(super) type Failure = (String, io::Error);

/// The walk's side of the threads.
pub(super) struct Ahead<'scope> {
    batch: Vec<Op>,
    /// Ops handed over and not yet settled.
    unsettled: bool,
    /// Set by a thread when a link failed: the walk stops at its next hand-over instead of
    /// fetching and reading the rest of the artifact for a prepare that fails anyway.
    failed: Arc<AtomicBool>,
    /// Set by the walk when it failed: the threads drop what is left of their batches.
    abandoned: Arc<AtomicBool>,
    linkers: Vec<Linker<'scope>>,
    /// The thread the next batch goes to.
    next: usize,
}

/// One linking thread, where its batches go and where it answers (its own: a thread that is
/// gone, panicked, answers nothing, and its channel says so).
struct Linker<'scope> {
    ops: mpsc::Sender<Vec<Op>>,
    answers: mpsc::Receiver<bool>,
    thread: ScopedJoinHandle<'scope, Result<(), (usize, Failure)>>,
}

/// Ops per batch: a hand-over per entry would cost more than the link it hands over.
const BATCH: usize = 64;

/// Linking threads, at most: a link is mostly the kernel's work on the directories, which
/// two threads share well (the benchmarks' nodes have two cores).
const LINKERS: usize = 2;

impl<'scope> Ahead<'scope> {
    /// Starts the threads in `scope`, linking below `root` the `files` of the index to the
    /// older files `seen` for them.
    pub(super) fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        root: &'env Path,
        files: &'env [IndexedFile],
        seen: &'env [Option<Seen<'env>>],
    ) -> Ahead<'scope> {
        let (failed, abandoned) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(LINKERS));
        let linkers = (0..threads)
            .map(|_| {
                let (ops, received) = mpsc::channel::<Vec<Op>>();
                let (answer, answers) = mpsc::channel();
                let flags = Flags { failed: Arc::clone(&failed), abandoned: Arc::clone(&abandoned) };
                let thread = scope.spawn(move || work(root, files, seen, received, answer, &flags));
                Linker { ops, answers, thread }
            })
            .collect();
        Ahead { batch: Vec::with_capacity(BATCH), unsettled: false, failed, abandoned, linkers, next: 0 }
    }

    /// Links the index's file `at` (its directory made before) to the older file seen for
    /// it; an error once something handed over before has failed ([`finish`](Self::finish)
    /// says which).
    pub(super) fn link(&mut self, at: usize) -> io::Result<()> {
        self.batch.push(Op::Link(at));
        if self.batch.len() == BATCH {
            if self.failed.load(Ordering::Relaxed) {
                return Err(gave_up());
            }
            self.hand_over();
        }
        Ok(())
    }

    fn hand_over(&mut self) {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        self.unsettled = true;
        // A thread that is gone has failed: `finish` says how.
        let _ = self.linkers[self.next].ops.send(batch);
        self.next = (self.next + 1) % self.linkers.len();
    }

    /// Waits until everything handed over is done; an error when some of it failed (which,
    /// [`finish`](Self::finish) says).
    pub(super) fn settle(&mut self) -> io::Result<()> {
        if !self.unsettled && self.batch.is_empty() {
            return Ok(());
        }
        if !self.batch.is_empty() {
            self.hand_over();
        }
        self.unsettled = false;
        for linker in &self.linkers {
            let _ = linker.ops.send(vec![Op::Settle]);
        }
        let mut all_done = true;
        for linker in &self.linkers {
            all_done &= linker.answers.recv() == Ok(true);
        }
        if !all_done {
            return Err(gave_up());
        }
        Ok(())
    }

    /// Does what is left (nothing more when the walk `failed`: the tree is removed) and stops
    /// the threads; the failure of the first file in the index's order that failed, if any.
    pub(super) fn finish(mut self, failed: bool) -> Result<(), Failure> {
        if failed {
            self.abandoned.store(true, Ordering::Relaxed);
        } else if !self.batch.is_empty() {
            self.hand_over();
        }
        let mut first: Option<(usize, Failure)> = None;
        for Linker { ops, thread, .. } in self.linkers {
            drop(ops);
            let stopped = thread
                .join()
                .unwrap_or_else(|_| Err((usize::MAX, (String::new(), io::Error::other("a linking thread panicked")))));
            if let Err((at, failure)) = stopped
                && first.as_ref().is_none_or(|(before, _)| at < *before)
            {
                first = Some((at, failure));
            }
        }
        first.map_or(Ok(()), |(_, failure)| Err(failure))
    }
}

/// What a thread tells the others and the walk, and is told.
struct Flags {
    /// Set by a thread whose link failed.
    failed: Arc<AtomicBool>,
    /// Set by the walk when it failed.
    abandoned: Arc<AtomicBool>,
}

/// A thread: does the ops in order until the walk hangs up; after a failure, or once the
/// walk abandoned the tree, only answers. The failure: at which file of the index, and why.
fn work(
    root: &Path,
    files: &[IndexedFile],
    seen: &[Option<Seen>],
    ops: mpsc::Receiver<Vec<Op>>,
    answer: mpsc::Sender<bool>,
    flags: &Flags,
) -> Result<(), (usize, Failure)> {
    let (mut sources, mut links) = (OpenDir::default(), OpenDir::default());
    let mut failed: Option<(usize, Failure)> = None;
    for batch in ops {
        for op in batch {
            match op {
                Op::Settle => {
                    let _ = answer.send(failed.is_none());
                }
                _ if failed.is_some() || flags.abandoned.load(Ordering::Relaxed) => {}
                Op::Link(at) => {
                    let link = root.join(&files[at].path);
                    let linked = match &seen[at] {
                        Some(seen) => dirfd::hard_link(&mut sources, &seen.candidate.path, &mut links, &link),
                        None => Err(io::Error::from(io::ErrorKind::NotFound)),
                    };
                    if let Err(e) = linked {
                        let why = not_linkable();
                        let failure = (files[at].path.clone(), io::Error::new(e.kind(), format!("{why} ({e})")));
                        failed = Some((at, failure));
                        flags.failed.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// What the walk is told when a link or directory handed over failed.
fn gave_up() -> io::Error {
    io::Error::other("a link made beside the walk failed")
}
