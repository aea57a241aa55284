//! A fixed set of threads that run registry work for the async side.
//!
//! `spawn_blocking` starts a thread whenever none is idle, so 64 clients reading at once grew
//! tokio's blocking pool to ~250 threads, each keeping its own allocator heap and stack; and
//! the registry holds only [`MAX_READERS`] reader connections anyway, so the extra threads only
//! waited for one. Registry calls from the async side queue here instead: [`THREADS`] threads,
//! started once, whatever the load.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::MAX_READERS;

/// Every reader connection busy, and a couple more threads for writes, which wait on the one
/// writer connection anyway.
pub const THREADS: usize = MAX_READERS + 2;

type Job = Box<dyn FnOnce() + Send>;

static QUEUE: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

fn queue() -> Sender<Job> {
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..THREADS {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("registry-{i}"))
                    .spawn(move || work(&rx))
                    .expect("the registry threads start");
            }
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// How long a registry thread waits for work before it gives the memory its jobs freed back.
const IDLE: Duration = Duration::from_secs(1);

fn work(rx: &Mutex<Receiver<Job>>) {
    // Whether jobs ran since this thread last gave its freed pages back.
    let mut used = false;
    loop {
        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv_timeout(IDLE);
        match job {
            Ok(job) => {
                job();
                used = true;
            }
            // mimalloc keeps a thread's freed pages in that thread's heap: after a burst of
            // requests, 18 heaps kept ~100 MiB a minute later. An idle thread returns them.
            Err(RecvTimeoutError::Timeout) if used => {
                // SAFETY: mi_collect only frees this thread's unused pages.
                unsafe { libmimalloc_sys::mi_collect(true) };
                used = false;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Runs `f` on one of the registry threads and waits for it without holding an async thread.
/// A panic in `f` is resumed in the caller, as `spawn_blocking(..).await.expect(..)` did.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match catching(f).await {
        Ok(value) => value,
        Err(Panicked(panic)) => resume_unwind(panic),
    }
}

/// [`run`] for callers that log a panic and carry on (the thread carries on either way).
pub async fn catching<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Panicked> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    queue().send(job).expect("the registry threads never stop");
    rx.await.expect("a registry job answers").map_err(Panicked)
}

/// A registry job that panicked.
pub struct Panicked(Box<dyn std::any::Any + Send>);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message =
            self.0.downcast_ref::<&str>().copied().or_else(|| self.0.downcast_ref::<String>().map(String::as_str));
        write!(f, "panicked: {}", message.unwrap_or("(no message)"))
    }
}

impl std::fmt::Debug for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_jobs_at_once_run_on_the_fixed_threads() {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let jobs = (0..THREADS * 20).map(|_| {
            let seen = Arc::clone(&seen);
            tokio::spawn(run(move || {
                std::thread::sleep(std::time::Duration::from_millis(2));
                seen.lock().unwrap().insert(std::thread::current().id());
            }))
        });
        for job in futures::future::join_all(jobs).await {
            job.unwrap();
        }
        let threads = seen.lock().unwrap().len();
        assert!(threads <= THREADS, "{threads} threads ran registry jobs, at most {THREADS} exist");
    }

    #[tokio::test]
    async fn a_panic_reaches_the_caller_and_the_thread_survives() {
        let panicked = tokio::spawn(run(|| panic!("boom"))).await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(run(|| 7).await, 7);
    }
}
