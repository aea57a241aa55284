//! The paths of one base, its ready markers, its lock, its fence and the note of the hook running now.

use super::*;

/// The paths of one base.
pub(super) struct Layout {
    pub(super) base: PathBuf,
}

impl Layout {
    pub(super) fn releases(&self) -> PathBuf {
        self.base.join("releases")
    }
    pub(super) fn release(&self, digest: Digest) -> PathBuf {
        self.releases().join(digest.hex())
    }
    /// The ready markers' directory.
    fn markers(&self) -> PathBuf {
        self.base.join(".release/ready")
    }
    pub(super) fn ready(&self, digest: Digest) -> PathBuf {
        self.markers().join(digest.hex())
    }
    /// The shared files a release's finalize hooks last ran with (JSON, as `shared_file`).
    pub(super) fn finalized_with(&self, digest: Digest) -> PathBuf {
        self.base.join(".release/finalized").join(digest.hex())
    }
    /// The file index a release was prepared with (encoded), minus what its finalize wrote.
    pub(super) fn index(&self, digest: Digest) -> PathBuf {
        self.base.join(".release/index").join(digest.hex())
    }
    pub(super) fn current(&self) -> PathBuf {
        self.base.join("current")
    }
    pub(super) fn shared(&self) -> PathBuf {
        self.base.join("shared")
    }
    pub(super) fn adopted_package(&self) -> PathBuf {
        self.base.join(".release/adopted.tar.zst")
    }

    /// Takes a release's ready marker away, and the note of what its finalize hooks ran with:
    /// no longer ready here (neither there is no error). Not durable until
    /// [`flush_markers`](Self::flush_markers).
    pub(super) fn unmark(&self, digest: Digest) -> io::Result<()> {
        let _ = fs::remove_file(self.finalized_with(digest));
        match fs::remove_file(self.ready(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes the markers taken away so far stay away after a power loss (an fsync of their
    /// directory; none yet, no release here was ever ready, is no error). Needed before a tree
    /// moves or a new one takes an unmarked release's name: on separate mounts, or a file
    /// system without a journal, the move could survive and the unmarking not.
    pub(super) fn flush_markers(&self) -> Result<(), NodeError> {
        let markers = self.markers();
        match sync_dir(&markers) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(&markers, e)),
            _ => Ok(()),
        }
    }

    /// Whether `current` is a plain directory: an application deployed another way.
    pub(super) fn current_is_plain_dir(&self) -> bool {
        fs::symlink_metadata(self.current()).is_ok_and(|m| m.is_dir())
    }

    pub(super) fn create(&self) -> Result<(), NodeError> {
        for dir in [self.releases(), self.shared(), self.base.join(".release/ready")] {
            fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        }
        Ok(())
    }

    /// The digest `current` points at; an error if `current` is not a symlink into releases/.
    pub(super) fn current_digest(&self) -> Result<Option<Digest>, NodeError> {
        let current = self.current();
        match fs::symlink_metadata(&current) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&current, e)),
            Ok(meta) if !meta.file_type().is_symlink() => Err(NodeError::new(
                ErrorCode::NotAdopted,
                format!(
                    "{} is a plain directory, not a release (an application deployed another way?): \
                     deploy with --adopt to keep it as the release to roll back to",
                    current.display()
                ),
            )),
            Ok(_) => {
                let target = fs::read_link(&current).map_err(|e| io_error(&current, e))?;
                let hex = target.strip_prefix("releases").ok().and_then(|t| t.to_str()).unwrap_or_default();
                hex.parse::<Digest>().map(Some).map_err(|_| {
                    NodeError::new(
                        ErrorCode::Drift,
                        format!("{} points at {}, not a release", current.display(), target.display()),
                    )
                })
            }
        }
    }

    /// Refuses a change from a deploy run older than the newest that took this base (call
    /// under the lock); records `fence` when it is the newest. 0 asks nothing.
    pub(super) fn fence(&self, fence: u64) -> Result<(), NodeError> {
        if fence == 0 {
            return Ok(());
        }
        let path = self.base.join(".release/fence");
        let newest: u64 = fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        if fence < newest {
            return Err(NodeError::new(
                ErrorCode::Fenced,
                format!(
                    "a newer deploy run (fence {newest}) has taken {}; this one ({fence}) is stale",
                    self.base.display()
                ),
            ));
        }
        if fence > newest {
            // Durable before anything it guards happens: a fence lost to a power cut would let
            // the older run's late calls through again.
            let tmp = self.base.join(format!(".release/fence.tmp-{}", std::process::id()));
            let mut file = fs::File::create(&tmp).map_err(|e| io_error(&tmp, e))?;
            io::Write::write_all(&mut file, fence.to_string().as_bytes()).map_err(|e| io_error(&tmp, e))?;
            file.sync_all().map_err(|e| io_error(&tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
            let dir = self.base.join(".release");
            sync_dir(&dir).map_err(|e| io_error(&dir, e))?;
        }
        Ok(())
    }

    pub(super) fn hook_record(&self) -> PathBuf {
        self.base.join(".release/hook")
    }

    /// Notes the process group of a hook as it starts (`<pgid> <command>`), so that a hook
    /// outliving its agent (the server was killed, its SSH session cut) is still seen. Best
    /// effort: a hook runs even when the note cannot be written.
    pub(super) fn record_hook(&self, pgid: u32, command: &str) -> io::Result<()> {
        let path = self.hook_record();
        let command: String = command.chars().take(200).collect();
        fs::write(&path, format!("{pgid} {command}"))
    }

    pub(super) fn end_hook(&self) {
        let _ = fs::remove_file(self.hook_record());
    }

    /// Waits (up to the lock's wait) while a hook that an earlier agent started still runs:
    /// the lock dies with the agent, the hook may not. The hook runs while its shell, the
    /// leader of its process group, does: background processes it left (`worker &`) are not
    /// waited for, nor daemons it started. A note whose hook is gone is removed.
    pub(super) fn wait_for_earlier_hook(&self) -> Result<(), NodeError> {
        let path = self.hook_record();
        let started = Instant::now();
        loop {
            let Ok(note) = fs::read_to_string(&path) else { return Ok(()) };
            let (pgid, command) = note.split_once(' ').unwrap_or((note.as_str(), ""));
            // The leader still leads its group: a pid reused since by an unrelated process is
            // not mistaken for it (unless it leads a group of the same id, which only delays
            // the hook by the wait).
            let leader = pgid.parse::<i32>().ok().filter(|p| *p > 1).and_then(rustix::process::Pid::from_raw);
            let alive = leader.is_some_and(|p| rustix::process::getpgid(Some(p)).is_ok_and(|group| group == p));
            if !alive {
                let _ = fs::remove_file(&path);
                return Ok(());
            }
            if started.elapsed() > LOCK_WAIT {
                return Err(NodeError::new(
                    ErrorCode::Locked,
                    format!(
                        "a hook an earlier deploy run started is still running on this node (process group {pgid}: \
                         `{command}`; waited {} s)",
                        LOCK_WAIT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Takes `<base>/.release/lock`, waiting a little for another deploy to finish.
    pub(super) fn lock(&self) -> Result<fs::File, NodeError> {
        let path = self.base.join(".release/lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        let started = Instant::now();
        while rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            if started.elapsed() > LOCK_WAIT {
                return Err(NodeError::new(
                    ErrorCode::Locked,
                    format!("another deploy holds {} (waited {} s)", path.display(), LOCK_WAIT.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(file)
    }
}
