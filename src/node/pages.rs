//! The node agent's memory pages: 4 KiB, not transparent huge pages, for the whole run; every
//! process it starts gets back the setting the agent was started with.

use std::io;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the agent turned transparent huge pages off at its start (they were allowed).
static TURNED_OFF: AtomicBool = AtomicBool::new(false);

/// Held while a child is started with the agent's first setting back on.
static SPAWNING: Mutex<()> = Mutex::new(());

/// Transparent huge pages off for the rest of the agent's run. The agent touches most of
/// its memory once (the request line with the file index, its decoded form, the walk's map
/// and buffers; tens of megabytes for a 10,000-file release), and each first touch of a huge
/// page zeroes all 2 MiB of it (mimalloc asks for huge pages where the system gives them on
/// request, as on our machines). perf of a 1%-changed prepare on tmpfs, with them off during
/// the unpack only: ~30 ms of its main thread's first 40 zeroing pages, while it read and
/// decoded the request. Fails open: a refused `prctl` leaves the system's setting.
pub(super) fn small_pages() {
    let allowed = rustix::thread::transparent_huge_pages_are_disabled().is_ok_and(|off| !off);
    if allowed && rustix::thread::disable_transparent_huge_pages(true).is_ok() {
        TURNED_OFF.store(true, Ordering::Relaxed);
    }
}

/// Starts `command` with the huge-pages setting the agent was started with. The setting is
/// the process's and a child keeps it, through `exec` too: a PM2 daemon that a hook or a
/// `pm2 jlist` starts would run without huge pages for good. Every process the agent starts
/// is started here (the tidy test holds `src/node` to it).
pub(super) fn spawn(command: &mut Command) -> io::Result<Child> {
    if !TURNED_OFF.load(Ordering::Relaxed) {
        return command.spawn();
    }
    // One child at a time: another thread's spawn must not turn them off under this one. The
    // agent's other threads may get a huge page in these microseconds: only a little slower.
    let _one = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
    let _ = rustix::thread::disable_transparent_huge_pages(false);
    let child = command.spawn();
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    child
}

/// [`Command::output`] by [`spawn`]: stdin closed, stdout and stderr read whole.
pub(super) fn output(command: &mut Command) -> io::Result<Output> {
    spawn(command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()))?.wait_with_output()
}
