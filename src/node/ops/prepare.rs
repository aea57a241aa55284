//! Prepare: fetch or take the artifact, unpack it, link the shared paths, finalize, seal,
//! mark it ready.

use super::finalized::{describe_shared, note_finalized, shared_fingerprints};
use super::ranges::HttpFrames;
use super::*;

pub(super) fn prepare(
    p: &Prepare,
    input: &mut (dyn BufRead + Send),
    output: &mut dyn Write,
) -> Result<Prepared, NodeError> {
    let layout = Layout { base: p.base.clone() };
    layout.create()?;
    let _lock = layout.lock()?;
    layout.fence(p.fence)?;
    let live = if p.adopt && layout.current_is_plain_dir() {
        None
    } else {
        layout.current_digest()? // refuses a base that holds an application deployed another way
    };
    let dir = layout.release(p.digest);
    let ready = layout.ready(p.digest);
    let reused = dir.is_dir() && ready.exists();
    let (linked, shared_files, index);
    let mut fetched = None;
    if reused {
        if p.source == Source::Stdin {
            if p.ask_frames {
                // Asked which frames it lacks: none (the release was made since the server looked).
                ask(output, Lacking { frames: Some(Vec::new()), of: 0 })?;
            }
            drain(input);
        }
        if p.finalize.is_empty() {
            // Nothing to run (a rollback): prepare is only this check.
            return Ok(Prepared {
                dir,
                reused: true,
                refinalized: false,
                output: "artifact: already here, ready".into(),
            });
        }
        let shared_now = shared_fingerprints(&layout, &p.shared);
        if p.finalize_if_shared_changed {
            let recorded = fs::read(layout.finalized_with(p.digest)).ok();
            let then: Option<Vec<SharedEntry>> = recorded.and_then(|r| serde_json::from_slice(&r).ok());
            if then.as_ref() == Some(&shared_now) {
                let output = format!(
                    "artifact: already here, ready; finalized with the shared files as they are: {}",
                    describe_shared(&shared_now)
                );
                return Ok(Prepared { dir, reused: true, refinalized: false, output });
            }
            // Changed since (or never noted): finalize again, writing only where the kind
            // writes (its writable paths, and shared/ through its links). What it writes is
            // not known: the release no longer offers its files to newer ones.
            forget_index(&layout, p.digest);
            let env = release_env(&layout, p.digest, &p.env);
            share_writable(&dir, &p.writable, &p.run_as)?;
            let shared = files_of_several_links(&dir);
            let finalized = run_commands(&layout, &dir, &p.finalize, &env, p.hook_timeout(), &p.run_as);
            check_links(&layout, p.digest, None, &shared)?;
            let finalized = finalized?;
            note_finalized(&layout, p.digest, &shared_now)?;
            sync_fs(&dir).map_err(|e| io_error(&dir, e))?;
            let changed = match &then {
                Some(then) => format!("shared files changed since it was finalized (was: {})", describe_shared(then)),
                None => "no note of the shared files it was finalized with".to_owned(),
            };
            let output = format!(
                "artifact: already here; {changed}: finalized again with {}\n{finalized}",
                describe_shared(&shared_now)
            );
            return Ok(Prepared { dir, reused: true, refinalized: true, output });
        }
        // Its hooks may rewrite its files: it no longer offers them to newer releases.
        forget_index(&layout, p.digest);
        let shared = files_of_several_links(&dir);
        set_writable(&dir).map_err(|e| io_error(&dir, e))?;
        // Finalize runs again (a changed shared/.env is picked up); the release stays ready
        // whatever it does, so a failure never strands a node that can switch back to it.
        let env = release_env(&layout, p.digest, &p.env);
        let finalized = share_writable(&dir, &p.writable, &p.run_as)
            .and_then(|()| run_commands(&layout, &dir, &p.finalize, &env, p.hook_timeout(), &p.run_as));
        // Compared before the modes are sealed again (a chmod through a link shows), refused
        // after (the release stays read-only whatever the hooks did).
        let written_through = check_links(&layout, p.digest, None, &shared);
        set_read_only(&dir, &p.writable).map_err(|e| io_error(&dir, e))?;
        written_through?;
        if finalized.is_ok() {
            note_finalized(&layout, p.digest, &shared_now)?;
        }
        sync_fs(&dir).map_err(|e| io_error(&dir, e))?;
        let output = format!("artifact: already here, finalized again\n{}", finalized?);
        return Ok(Prepared { dir, reused: true, refinalized: false, output });
    } else {
        if p.source == Source::Present {
            return Err(NodeError::new(ErrorCode::Missing, format!("{} is not on this node", p.digest)));
        }
        if live == Some(p.digest) {
            return Err(NodeError::new(
                ErrorCode::LiveUnready,
                format!("{} is what current points at, but it is not marked ready: not touched", dir.display()),
            ));
        }
        // A marker without its tree (the tree removed by hand, or a cleanup's unmarking undone
        // by a power loss while its move of the tree was not): removed for good before a tree
        // appears under the release's name, or a crash after the rename below would leave an
        // unfinished tree (now not even flushed) marked ready.
        if ready.exists() {
            layout.unmark(p.digest).map_err(|e| io_error(&ready, e))?;
            layout.flush_markers()?;
        }
        // An index is kept only for a release prepared (again) with one, below.
        forget_index(&layout, p.digest);
        if dir.exists() {
            // Left unready by a crash: redone.
            remove_tree(&dir).map_err(|e| io_error(&dir, e))?;
        }
        let tmp = layout.releases().join(format!(".tmp-{}", p.digest.hex()));
        remove_tree(&tmp).map_err(|e| io_error(&tmp, e))?;
        let options = CheckOptions {
            max_unpacked_bytes: p.max_unpacked_bytes,
            max_files: p.max_files,
            shared: p.shared.clone(),
            record_migrations: false,
        };
        // Without finalize hooks nothing runs in the tree before it is sealed, so its files
        // are written read-only at once and only its directories are sealed afterwards.
        let modes = if p.finalize.is_empty() { Modes::Sealed(&p.writable) } else { Modes::Writable };
        // The releases' files to link to are read while the index sent is (a sixth of a
        // 1%-changed prepare's time before its walk, each).
        let (sent, candidates) = std::thread::scope(|scope| {
            let found = p.index.is_some().then(|| scope.spawn(|| candidates(&layout, p.digest, &p.writable)));
            let sent = sent_index(p);
            (sent, found.map(|found| found.join().expect("reading the older releases' indexes panicked")))
        });
        index = sent?;
        let candidates = candidates.filter(|_| index.is_some()).unwrap_or_default();
        let has_skeleton = index.as_ref().is_some_and(|index| index.skeleton.is_some());
        let sharing = |looked| {
            index.as_ref().map(|index| Sharing { index, candidates: &candidates, writable: &p.writable, looked })
        };
        // Which frames to fetch: those holding a file no release here holds; None: the whole
        // artifact (also when that is every frame: one stream, fewer steps). On stdin, asked
        // by the server, which then sends those; by URL, fetched by ranged GETs. The files
        // found linkable then are linked as found (not looked at again).
        let asked = p.ask_frames && p.source == Source::Stdin;
        let by_url = matches!(p.source, Source::Url(_) | Source::Server(_));
        // The skeleton is decompressed meanwhile when a release here offers files (the frames
        // to fetch are then likely a part): the older files' stats leave a core idle at times.
        // Joined once the node has asked (the server sends the frames meanwhile); dropped unread
        // when the whole artifact is fetched.
        let (frames, looked, early) = std::thread::scope(|scope| {
            let early = match &index {
                Some(index) if (asked || by_url) && has_skeleton && !candidates.is_empty() => {
                    Some(scope.spawn(move || Skeleton::of(index)))
                }
                _ => None,
            };
            let told = match sharing(None) {
                Some(sharing) if asked || by_url => {
                    frames_to_fetch(&sharing, has_skeleton).map_err(unpack_refusal(&layout))?
                }
                _ => None,
            };
            let (frames, looked) = told.map_or((None, None), |(frames, looked)| (Some(frames), Some(looked)));
            let frames = frames.filter(|frames| index.as_ref().is_some_and(|i| frames.len() < i.frames.len()));
            if asked {
                let of = index.as_ref().map_or(0, |i| i.frames.len());
                ask(output, Lacking { frames: frames.clone(), of })?;
            }
            let early = early
                .filter(|_| frames.is_some())
                .map(|early| early.join().expect("decompressing the skeleton panicked"));
            Ok::<_, NodeError>((frames, looked, early))
        })?;
        // Read (decompressed, checked against the index) only for an unpack from frames.
        let skeleton = match (&frames, &index) {
            (Some(_), Some(index)) => early
                .unwrap_or_else(|| Skeleton::of(index))
                .map_err(|e| NodeError::new(ErrorCode::IndexMismatch, e.to_string()))?,
            _ => None,
        };
        let stalled = std::rc::Rc::new(std::cell::Cell::new(None));
        let unpacked = match (&p.source, frames, sharing(looked.as_ref()), &skeleton) {
            (source, Some(needed), Some(sharing), Some(skeleton)) => {
                let mut source: Box<dyn FrameSource + '_> = match source {
                    Source::Stdin => Box::new(StdinFrames { input: &mut *input }),
                    Source::Url(url) | Source::Server(url) => {
                        Box::new(HttpFrames::new(url, &sharing.index.frames, &needed, p.fetch_stall_timeout())?)
                    }
                    Source::Present => unreachable!("answered above"),
                };
                let sparse = Sparse { skeleton, needed: &needed, source: source.as_mut() };
                unpack_sparse(&tmp, &options, modes, sharing, sparse).map(|(unpacked, bytes)| {
                    fetched = Some((needed.len(), bytes));
                    unpacked
                })
            }
            (Source::Stdin, ..) => unpack_sharing(input, &tmp, &options, p.digest, modes, sharing(looked.as_ref())),
            (Source::Url(url) | Source::Server(url), ..) => {
                let stall = p.fetch_stall_timeout();
                let response = Fetched { inner: fetch(url, stall)?, stall, failed: stalled.clone() };
                let response = io::BufReader::with_capacity(1 << 20, response);
                unpack_sharing(response, &tmp, &options, p.digest, modes, sharing(looked.as_ref()))
            }
            (Source::Present, ..) => unreachable!("answered above"),
        };
        // A fetch that failed mid-way is the cause, whatever the unpacker made of the cut.
        if unpacked.is_err()
            && let Some(why) = stalled.take()
        {
            let _ = remove_tree(&tmp);
            return Err(NodeError::new(ErrorCode::Fetch, why));
        }
        let unpacked = unpacked.map_err(unpack_refusal(&layout))?;
        (linked, shared_files) = (unpacked.linked, unpacked.shared);
        // Neither the tree nor the rename is flushed yet: one `syncfs` below flushes them with
        // the rest before the marker is written. A crash before it leaves a tree unready, at
        // either name, which is redone (above).
        fs::rename(&tmp, &dir).map_err(|e| io_error(&dir, e))?;
        let mut dirs = unpacked.dirs;
        link_shared(&layout, &dir, &p.shared, &mut dirs)?;
        if let Modes::Sealed(writable) = modes {
            seal_dirs(&dir, &dirs, writable).map_err(|e| io_error(&dir, e))?;
        }
    }
    let env = release_env(&layout, p.digest, &p.env);
    let shared_now = shared_fingerprints(&layout, &p.shared);
    // Before any hook: finalize here, and migrate or reload later, may write there as the
    // hook user even when the kind has no finalize hooks.
    share_writable(&dir, &p.writable, &p.run_as)?;
    let hooks_started = match (&index, p.finalize.is_empty()) {
        (Some(_), false) => Some(fs_clock(&layout, p.digest)?),
        _ => None,
    };
    let output = run_commands(&layout, &dir, &p.finalize, &env, p.hook_timeout(), &p.run_as);
    // Even after a failed hook: what it wrote through a link is in older releases now.
    let keep_index = match (&index, hooks_started) {
        (Some(index), Some(started)) => Some(after_finalize(&layout, p.digest, &dir, index, &linked, started)?),
        // Kept without the frame table and skeleton: only its files are offered.
        (index, _) => index.as_ref().map(|index| FileIndex::new(index.artifact, index.files.clone())),
    };
    let output = output?;
    if !p.finalize.is_empty() {
        note_finalized(&layout, p.digest, &shared_now)?;
    }
    if !p.finalize.is_empty() {
        set_read_only(&dir, &p.writable).map_err(|e| io_error(&dir, e))?;
    }
    if let Some(index) = &keep_index {
        store_index(&layout, p.digest, index)?;
    }
    // What finalize wrote, the links and the modes are on disk before the marker says ready.
    sync_fs(&dir).map_err(|e| io_error(&dir, e))?;
    fs::write(&ready, b"").map_err(|e| io_error(&ready, e))?;
    sync_dir(ready.parent().expect("ready has a parent")).map_err(|e| io_error(&ready, e))?;
    let how = match p.source {
        Source::Url(_) => "fetched from the object store (presigned URL)",
        Source::Server(_) => "fetched from the release server (signed URL)",
        _ => "streamed from the server",
    };
    let mut shared = match (&index, shared_files) {
        (None, _) => String::new(),
        (Some(index), n) => format!(" ({n} of its {} files linked to a release already here)", index.files.len()),
    };
    if let (Some((frames, bytes)), Some(index)) = (fetched, &index) {
        let size = index.frames.last().map_or(0, |f| f.offset + f.length);
        shared.push_str(&format!("; fetched {frames} of its {} frames, {bytes} of {size} bytes", index.frames.len()));
    }
    Ok(Prepared { dir, reused: false, refinalized: false, output: format!("artifact: {how}{shared}\n{output}") })
}

/// GETs the artifact. `stall` bounds the wait for the answer's head and, in reqwest's blocking
/// client, each read of its body after that: a transfer that stops bringing bytes fails
/// after `stall` instead of holding the deploy until the server's command timeout.
pub(super) fn fetch(url: &str, stall: Duration) -> Result<reqwest::blocking::Response, NodeError> {
    let response = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(stall)
        .build()
        .map_err(|e| NodeError::new(ErrorCode::Fetch, e.to_string()))?
        .get(url)
        .send()
        // Without the URL: it carries the signature, and this text is stored with the phase.
        .map_err(|e| NodeError::new(ErrorCode::Fetch, format!("cannot fetch the artifact: {}", e.without_url())))?;
    if !response.status().is_success() {
        return Err(NodeError::new(ErrorCode::Fetch, format!("fetching the artifact: HTTP {}", response.status())));
    }
    Ok(response)
}

/// The body of a fetch, remembering why it failed (a read that timed out: it stalled), so that
/// the answer names the fetch rather than what the unpacker made of the cut-off stream.
pub(super) struct Fetched {
    inner: reqwest::blocking::Response,
    stall: Duration,
    failed: std::rc::Rc<std::cell::Cell<Option<String>>>,
}

impl Read for Fetched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let started = Instant::now();
        self.inner.read(buf).inspect_err(|e| {
            let why = if started.elapsed() >= self.stall {
                format!(
                    "the artifact fetch stalled: no byte for {} s (limits.node_fetch_stall_timeout)",
                    self.stall.as_secs()
                )
            } else {
                format!("the artifact fetch failed: {e}")
            };
            self.failed.set(Some(why));
        })
    }
}

/// Links each shared path of the release to `<base>/shared/<path>` with a relative symlink;
/// the directories it has to make for them are added to `dirs` (relative to `dir`).
pub(super) fn link_shared(
    layout: &Layout,
    dir: &Path,
    shared: &[String],
    dirs: &mut Vec<PathBuf>,
) -> Result<(), NodeError> {
    for path in shared {
        let target = layout.shared().join(path);
        if fs::symlink_metadata(&target).is_err() {
            return Err(NodeError::new(
                ErrorCode::SharedMissing,
                format!(
                    "{} does not exist: create it (file or directory) on this node before deploying",
                    target.display()
                ),
            ));
        }
        let link = dir.join(path);
        // A link placed through a symlinked parent would land somewhere else.
        let mut parent = dir.to_path_buf();
        for component in Path::new(path).parent().into_iter().flat_map(Path::components) {
            parent.push(component);
            if fs::symlink_metadata(&parent).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(NodeError::new(
                    ErrorCode::SharedThroughLink,
                    format!(
                        "the artifact makes {} a symbolic link, so shared {path} cannot be linked there",
                        parent.display()
                    ),
                ));
            }
        }
        if fs::symlink_metadata(&link).is_ok() {
            return Err(NodeError::new(
                ErrorCode::SharedInArtifact,
                format!(
                    "the artifact contains {path}, which the service keeps in shared/: leave it out of the package"
                ),
            ));
        }
        for parent in Path::new(path).ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
            let absolute = dir.join(parent);
            if fs::symlink_metadata(&absolute).is_err() {
                dirs.push(parent.to_owned());
            }
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
        }
        // From <base>/releases/<hex>/<parents of path> up to <base>, then down to shared/.
        let depth = 2 + Path::new(path).components().count() - 1;
        let relative = format!("{}shared/{path}", "../".repeat(depth));
        std::os::unix::fs::symlink(&relative, &link).map_err(|e| io_error(&link, e))?;
    }
    Ok(())
}

/// Removes every write bit in the release, except under `writable` paths. A file read-only
/// already (one hard-linked to an older release's) is left alone.
pub(super) fn set_read_only(dir: &Path, writable: &[String]) -> io::Result<()> {
    walk_modes(dir, &mut |path, meta| {
        if is_writable(path.strip_prefix(dir).expect("walked under dir"), writable) {
            return Ok(());
        }
        let mode = meta.permissions().mode();
        if mode & 0o222 == 0 {
            return Ok(());
        }
        fs::set_permissions(path, fs::Permissions::from_mode(mode & !0o222))
    })
}

/// Seals the directories of a release whose files were written read-only already: the same
/// modes as [`set_read_only`] gives, without walking every file. In two halves at once: a
/// directory's mode does not depend on another's (each keeps its owner's search bit), and
/// their lookups and chmods were 6% of a 1%-changed prepare.
pub(super) fn seal_dirs(dir: &Path, dirs: &[PathBuf], writable: &[String]) -> io::Result<()> {
    let (first, second) = dirs.split_at(dirs.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| seal_some_dirs(dir, second, writable));
        let this = seal_some_dirs(dir, first, writable);
        this.and(other.join().unwrap_or_else(|_| Err(io::Error::other("sealing directories panicked"))))
    })
}

fn seal_some_dirs(dir: &Path, dirs: &[PathBuf], writable: &[String]) -> io::Result<()> {
    for relative in dirs {
        if is_writable(relative, writable) {
            continue;
        }
        let path = dir.join(relative);
        let meta = fs::symlink_metadata(&path)?;
        // A directory entry at the path of an earlier symlink made nothing of its own: as the
        // walk does, never seal through a link.
        if !meta.is_dir() {
            continue;
        }
        let mode = meta.permissions().mode();
        fs::set_permissions(&path, fs::Permissions::from_mode((mode | 0o500) & !0o222))?;
    }
    Ok(())
}

/// Gives the owner write permission back (before finalize runs again on a reused release),
/// except to a file of several links: it may be another release's file too (hard-linked,
/// shared), whose mode would change with it, and which a hook must not rewrite.
pub(super) fn set_writable(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    walk_modes(dir, &mut |path, meta| {
        if !meta.is_dir() && meta.nlink() > 1 {
            return Ok(());
        }
        let mode = meta.permissions().mode();
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200))
    })
}

/// The index the prepare was sent, read (`None` when none was); refused when it does not read
/// or is of another artifact.
fn sent_index(p: &Prepare) -> Result<Option<FileIndex>, NodeError> {
    let read = |wire: &[u8]| {
        FileIndex::decode_wire(wire, p.digest)
            .map_err(|e| NodeError::new(ErrorCode::IndexMismatch, format!("the file index sent: {e}")))
    };
    p.index.as_deref().map(read).transpose()
}

/// Says which frames it lacks, on a line of its own before it reads stdin
/// ([`Prepare::ask_frames`]): the server sends those.
fn ask(output: &mut dyn Write, lacking: Lacking) -> Result<(), NodeError> {
    let line = serde_json::to_string(&Asking { protocol: super::super::VERSION, lacking }).expect("serializes");
    writeln!(output, "{line}")
        .and_then(|()| output.flush())
        .map_err(|e| NodeError::new(ErrorCode::Io, format!("cannot say which frames it lacks on stdout: {e}")))
}

/// What the prepare answers for an unpack that failed.
fn unpack_refusal(layout: &Layout) -> impl Fn(UnpackError) -> NodeError + '_ {
    move |e| match e {
        UnpackError::DigestMismatch { .. } | UnpackError::FrameMismatch { .. } => {
            NodeError::new(ErrorCode::DigestMismatch, e.to_string())
        }
        UnpackError::Unsafe(_) => NodeError::new(ErrorCode::UnsafeArchive, e.to_string()),
        UnpackError::Write { ref source, .. } if source.kind() == io::ErrorKind::StorageFull => {
            NodeError::new(ErrorCode::DiskFull, e.to_string())
        }
        UnpackError::Write { .. } => NodeError::new(ErrorCode::Io, e.to_string()),
        UnpackError::IndexMismatch(_) => NodeError::new(ErrorCode::IndexMismatch, e.to_string()),
        UnpackError::Frames(_) => NodeError::new(ErrorCode::Fetch, e.to_string()),
        UnpackError::OlderChanged { ref releases, .. } => {
            let unmarked = unmark_changed(layout, releases);
            NodeError::new(ErrorCode::Io, format!("{e}: not shared{unmarked}; deploy again"))
        }
    }
}

/// The frames the server sends on stdin, each `length` bytes, in order.
struct StdinFrames<'a> {
    input: &'a mut (dyn BufRead + Send),
}

impl FrameSource for StdinFrames<'_> {
    fn frame(&mut self, _: usize, frame: &Frame, bytes: &mut Vec<u8>) -> io::Result<()> {
        bytes.clear();
        (&mut self.input).take(frame.length).read_to_end(bytes)?;
        if (bytes.len() as u64) < frame.length {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stdin ended {} bytes into it, of {}", bytes.len(), frame.length),
            ));
        }
        Ok(())
    }
}
