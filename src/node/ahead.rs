//! The sparse unpack's second thread: it makes the release's directories and the hard links
//! of the files linked unread while the walk reads and checks the entries after them. Of a
//! 1%-changed release those are nearly all its entries, and their links and directories
//! nearly half of the walk.
//!
//! The thread does what it is handed in order, and the walk hands over a directory before
//! any link into it. The walk writes every other entry itself, first making its directory
//! with one `mkdir` (made already by the thread, or about to be, is no error; its parents
//! too when they are missing). The entries' paths are unique (the walk's rules), so nothing
//! it writes depends on a link handed over, except a hard link entry, whose target may be
//! one: before it, the walk waits until the thread has done all it was given.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{Scope, ScopedJoinHandle};

use super::dirfd::{self, OpenDir};
use super::unpack::{Seen, not_linkable};
use crate::archive::IndexedFile;

/// Work handed to the thread.
enum Op {
    /// Make this directory (relative to the root) and its parents.
    Dir(PathBuf),
    /// Link the index's file at this place to the older file found for it.
    Link(usize),
    /// Say, on the answer channel, whether everything before succeeded.
    Settle,
}

/// Why the thread stopped: the path it failed on and the error.
pub(super) type Failure = (String, io::Error);

/// The walk's side of the thread.
pub(super) struct Ahead<'scope> {
    batch: Vec<Op>,
    /// Ops handed over and not yet settled.
    unsettled: bool,
    /// Set by the thread when a link or directory failed: the walk stops at its next
    /// hand-over instead of fetching and reading the rest of the artifact for a prepare that
    /// fails anyway.
    failed: Arc<AtomicBool>,
    ops: mpsc::Sender<Vec<Op>>,
    answers: mpsc::Receiver<bool>,
    thread: ScopedJoinHandle<'scope, Result<(), Failure>>,
}

/// Ops per batch: a hand-over per entry would cost more than the link it hands over.
const BATCH: usize = 64;

impl<'scope> Ahead<'scope> {
    /// Starts the thread in `scope`, linking below `root` the `files` of the index to the
    /// older files `seen` for them.
    pub(super) fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        root: &'env Path,
        files: &'env [IndexedFile],
        seen: &'env [Option<Seen<'env>>],
    ) -> Ahead<'scope> {
        let (ops, received) = mpsc::channel::<Vec<Op>>();
        let (answer, answers) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&failed);
        let thread = scope.spawn(move || work(root, files, seen, received, answer, &flag));
        Ahead { batch: Vec::with_capacity(BATCH), unsettled: false, failed, ops, answers, thread }
    }

    /// Links the index's file `at` (its directory handed over before) to the older file seen
    /// for it; an error once something handed over before has failed
    /// ([`finish`](Self::finish) says which).
    pub(super) fn link(&mut self, at: usize) -> io::Result<()> {
        self.push(Op::Link(at))
    }

    /// Makes the directory `relative` (and its parents) before any link handed over after.
    pub(super) fn dir(&mut self, relative: &Path) -> io::Result<()> {
        self.push(Op::Dir(relative.to_owned()))
    }

    fn push(&mut self, op: Op) -> io::Result<()> {
        self.batch.push(op);
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
        let _ = self.ops.send(batch);
    }

    /// Waits until everything handed over is done; an error when some of it failed (which,
    /// [`finish`](Self::finish) says).
    pub(super) fn settle(&mut self) -> io::Result<()> {
        if !self.unsettled && self.batch.is_empty() {
            return Ok(());
        }
        self.batch.push(Op::Settle);
        self.hand_over();
        self.unsettled = false;
        match self.answers.recv() {
            Ok(true) => Ok(()),
            _ => Err(gave_up()),
        }
    }

    /// Does what is left and stops the thread; the first failure, if any.
    pub(super) fn finish(mut self) -> Result<(), Failure> {
        if !self.batch.is_empty() {
            self.hand_over();
        }
        drop(self.ops);
        self.thread.join().unwrap_or_else(|_| Err((String::new(), io::Error::other("the linking thread panicked"))))
    }
}

/// The thread: does the ops in order until the walk hangs up; after a failure, only answers.
fn work(
    root: &Path,
    files: &[IndexedFile],
    seen: &[Option<Seen>],
    ops: mpsc::Receiver<Vec<Op>>,
    answer: mpsc::Sender<bool>,
    gave_up: &AtomicBool,
) -> Result<(), Failure> {
    let (mut sources, mut links) = (OpenDir::default(), OpenDir::default());
    let mut failed: Option<Failure> = None;
    for batch in ops {
        for op in batch {
            match op {
                Op::Settle => {
                    let _ = answer.send(failed.is_none());
                }
                _ if failed.is_some() => {}
                Op::Dir(relative) => {
                    if let Err(e) = std::fs::create_dir_all(root.join(&relative)) {
                        failed = Some((relative.display().to_string(), e));
                        gave_up.store(true, Ordering::Relaxed);
                    }
                }
                Op::Link(at) => {
                    let link = root.join(&files[at].path);
                    let linked = match &seen[at] {
                        Some(seen) => dirfd::hard_link(&mut sources, &seen.candidate.path, &mut links, &link),
                        None => Err(io::Error::from(io::ErrorKind::NotFound)),
                    };
                    if let Err(e) = linked {
                        let why = not_linkable();
                        failed = Some((files[at].path.clone(), io::Error::new(e.kind(), format!("{why} ({e})"))));
                        gave_up.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// What the walk is told when a link or directory handed over failed.
fn gave_up() -> io::Error {
    io::Error::other("a link or directory made beside the walk failed")
}
