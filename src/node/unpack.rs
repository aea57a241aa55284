//! The node's unpacker: the archive's bytes are hashed and checked by the same rules as at
//! ingest (never trusting the server's check alone) while they are written into a fresh
//! directory. A digest that does not match, a rule broken, a full disk: the directory is
//! removed and nothing is left.
//!
//! Given the artifact's [`FileIndex`] and the files this node already holds ([`Sharing`]), a
//! file whose content and mode a ready release has is hard-linked to it instead of written;
//! its bytes are still read from the stream, hashed, and compared with the index, like every
//! other file's: an index that does not describe the artifact is refused. A sparse unpack's
//! files that an older release holds are linked unread (their bytes were not fetched, or were
//! fetched only as a changed file's neighbours in its frame): the index sent, bound to the
//! digest, and the older release's own check vouch for them.
//!
//! `sparse.rs` walks the same way a tar stream made of the frames the node fetched and of the
//! index's skeleton, through [`unpack_into`].
//!
//! Long on purpose: writing, hashing, checking and linking are one pass over one stream, and
//! each refusal on the way must leave nothing: they read best as one walk.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use foldhash::HashMapExt as _;
use sha2::{Digest as _, Sha256};

use super::ahead::Ahead;
use super::dirfd::{self, OpenDir, Stat};
use crate::archive::{
    self, ArchiveError, CheckOptions, Entry, FileIndex, IndexedFile, Indexing, Summary, Visitor, WalkError,
};
use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the artifact's digest is {actual}, not {expected}: corrupted in the store or on the way")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("unsafe archive: {0}")]
    Unsafe(#[from] ArchiveError),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("the artifact's file index does not describe it: {0}")]
    IndexMismatch(String),
    #[error(
        "{path}, a file of an older release on this node, does not hold what that release's kept index says \
         (changed here since its index was kept)"
    )]
    OlderChanged { path: String, releases: Vec<Digest> },
    #[error("frame {frame} of the artifact is not what its index says ({why}): corrupted in the store or on the way")]
    FrameMismatch { frame: usize, why: String },
    #[error("fetching the artifact's frames: {0}")]
    Frames(String),
}

/// What a node already holds, for [`unpack_sharing`].
pub struct Sharing<'a> {
    /// The artifact's index, as the server sent it (checked here, never trusted).
    pub index: &'a FileIndex,
    /// A file of a ready release for each (SHA-256, executable) those releases hold.
    pub candidates: &'a HashMap<(Digest, bool), Candidate>,
    /// The kind's writable paths: never linked (a hook may write there).
    pub writable: &'a [String],
    /// The files found linkable when the frames to fetch were told ([`frames_to_fetch`](super::frames_to_fetch)):
    /// each is linked as it was found then, not looked at again (a stat of 10,000 files is a
    /// tenth of a sparse prepare); a file not in it is not linked. `None`: looked at as the walk
    /// meets them.
    pub looked: Option<&'a Looked<'a>>,
}

/// The index's files by path: their place in `files`.
pub type ByPath<'a> = foldhash::HashMap<&'a str, usize>;

/// Files of older releases found linkable: the index by path, and for each of its files (by
/// place) the older file and what it was then, if one was found. Borrowed, not copied: a
/// sparse prepare's time goes as much to the memory it touches first as to its syscalls.
pub struct Looked<'a> {
    pub(super) by_path: ByPath<'a>,
    pub(super) seen: Vec<Option<Seen<'a>>>,
}

/// A file of an older release found linkable, as it was then.
#[derive(Clone, Copy, Debug)]
pub struct Seen<'a> {
    pub candidate: &'a Candidate,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub mode: u32,
}

impl Seen<'_> {
    /// The index's `file`, linked to this older file.
    fn linked(&self, file: &IndexedFile) -> Linked {
        Linked {
            path: file.path.clone(),
            source: self.candidate.path.clone(),
            ino: self.ino,
            size: self.size,
            mtime_ns: self.mtime_ns,
            mode: self.mode,
        }
    }
}

/// A file an older release holds, as its index says.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub path: PathBuf,
    pub size: u64,
    /// When that release's index was stored (ns since the epoch): a file modified since (an
    /// exec hook run as root, say) no longer holds what the index says, and is not linked.
    pub indexed_at_ns: i128,
    /// The release it is of: it offers its files no more, and is unpacked again, when the file
    /// turns out not to hold what its index says (edited on the node, or the file changed with
    /// its mtime put back).
    pub release: Digest,
}

/// [`Sharing`] while unpacking: the index by path.
pub(super) struct Linking<'a, 'm> {
    pub(super) candidates: &'a HashMap<(Digest, bool), Candidate>,
    pub(super) files: &'a [IndexedFile],
    pub(super) by_path: &'m ByPath<'a>,
    pub(super) writable: &'a [String],
    pub(super) looked: Option<&'m [Option<Seen<'a>>]>,
    /// The directory of the last older file looked at or linked.
    pub(super) sources: RefCell<OpenDir>,
}

impl<'a> Linking<'a, '_> {
    /// The file of an older release the index's file `at` (`relative` in the release) may be
    /// linked to: one holding what the index says it holds, that still looks like it (a
    /// regular file of that size and mode, not modified since its index was kept, read-only:
    /// never a writable path's), as it is now. An empty file has no data to share (and
    /// thousands of them would reach the links' limit of one inode).
    pub(super) fn usable(&self, relative: &Path, at: usize, executable: bool) -> Option<Seen<'a>> {
        let said = &self.files[at];
        if said.executable != executable || said.size == 0 || is_writable(relative, self.writable) {
            return None;
        }
        if let Some(looked) = self.looked {
            return looked.get(at).copied().flatten();
        }
        let candidate = self.candidates.get(&(said.sha256, executable))?;
        let stat = self.sources.borrow_mut().stat(&candidate.path).ok()?;
        let looks_same = stat.is_file
            && stat.size == candidate.size
            && stat.size == said.size
            && stat.mtime_ns <= candidate.indexed_at_ns
            && stat.mode & 0o222 == 0
            && (stat.mode & 0o111 != 0) == executable;
        let Stat { ino, size, mtime_ns, mode, .. } = stat;
        looks_same.then_some(Seen { candidate, ino, size, mtime_ns, mode })
    }
}

/// A file of the new release hard-linked to one of an older release, as it was when linked.
#[derive(Clone, Debug)]
pub struct Linked {
    /// Relative to the release.
    pub path: String,
    /// The older release's file.
    pub source: PathBuf,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub mode: u32,
}

impl Linked {
    /// Whether `meta` (of the same inode, later) shows the file written, truncated or chmodded.
    pub fn changed(&self, meta: &fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt;
        meta.ino() == self.ino
            && (meta.size() != self.size || mtime_ns(meta) != self.mtime_ns || meta.mode() != self.mode)
    }
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// Whether files are written with their final, read-only modes.
#[derive(Clone, Copy, Debug)]
pub enum Modes<'a> {
    /// As the archive says (owner-writable): hooks will run in the tree before it is sealed.
    Writable,
    /// Read-only from the start, except under these relative paths: nothing will run in the
    /// tree before it is sealed, so the walk that would make every file read-only later (a
    /// fifth of an unpack) is not needed; only the directories are left to seal.
    Sealed(&'a [String]),
}

impl<'a> Modes<'a> {
    /// The writable paths of a tree sealed while unpacking.
    fn sealed(self) -> Option<&'a [String]> {
        match self {
            Modes::Sealed(writable) => Some(writable),
            Modes::Writable => None,
        }
    }
}

/// Whether `relative` (a path in a release) is at or under one of the `writable` paths,
/// which stay writable when the release is sealed.
pub fn is_writable(relative: &Path, writable: &[String]) -> bool {
    writable.iter().any(|w| relative.starts_with(w))
}

/// What [`unpack`] made.
#[derive(Debug)]
pub struct Unpacked {
    pub summary: Summary,
    /// The directories of the tree left to seal, relative to its root (the root itself is
    /// `""`): every one, or with [`Modes::Sealed`] where this process writes into a directory
    /// whatever its mode says (root), the root only: the others were made sealed.
    pub dirs: Vec<PathBuf>,
    /// How many files were hard-linked to an older release's (with [`unpack_sharing`]).
    pub shared: usize,
    /// Those files, as they were when linked, for the check after the finalize hooks; listed
    /// only when the tree was unpacked [`Modes::Writable`] (sealed, no hook runs in it before
    /// it is, and ten thousand paths copied were a twentieth of a 1%-changed prepare).
    pub linked: Vec<Linked>,
}

/// Unpacks `input` (a whole `tar`+`zstd` stream) into `dest`, which must not exist yet. Not
/// flushed: the prepare flushes the tree once, with all it does after, before the release
/// is marked ready (on ext4 each flush is a journal commit).
pub fn unpack(
    input: impl BufRead,
    dest: &Path,
    options: &CheckOptions,
    expected: Digest,
    modes: Modes<'_>,
) -> Result<Unpacked, UnpackError> {
    unpack_sharing(input, dest, options, expected, modes, None)
}

/// [`unpack`], hard-linking the files `sharing` says this node holds already. Every file's
/// data is hashed and compared with the index (linked or written), and the index must list
/// exactly the archive's files: else nothing is left and the answer names the file.
pub fn unpack_sharing(
    input: impl BufRead,
    dest: &Path,
    options: &CheckOptions,
    expected: Digest,
    modes: Modes<'_>,
    sharing: Option<Sharing<'_>>,
) -> Result<Unpacked, UnpackError> {
    let mut hashing = HashingReader { inner: input, hasher: Sha256::new() };
    let walk = |visitor: &mut dyn Visitor| {
        let summary = archive::walk(&mut hashing, options, visitor).map_err(walk_error)?;
        // Drain whatever follows (nothing, for a well-formed stream) so the digest covers
        // every byte that was sent.
        io::copy(&mut hashing, &mut io::sink())
            .map_err(|source| UnpackError::Write { path: dest.display().to_string(), source })?;
        let actual = Digest::from_hasher(hashing.hasher.clone());
        if actual != expected {
            return Err(UnpackError::DigestMismatch { expected, actual });
        }
        Ok(summary)
    };
    unpack_into(dest, modes, sharing, &[], walk)
}

pub(super) fn walk_error(e: WalkError) -> UnpackError {
    match e {
        WalkError::Archive(e) => UnpackError::Unsafe(e),
        WalkError::Visitor { path, source } => UnpackError::Write { path, source },
    }
}

/// Whether this process makes entries in a directory whose mode says it cannot (root, on a
/// file system that lets it) and a directory made with mode 555 has it: then a sealed tree's
/// directories are made sealed. Tried in `root` (fresh), and nothing left there (failing
/// that, an error: the caller removes `root`).
pub(crate) fn writes_through_modes(root: &Path) -> io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    #[cfg(test)]
    if SEAL_AFTER.get() {
        return Ok(false);
    }
    let (probe, inner) = (root.join(".release-probe"), root.join(".release-probe/inner"));
    fs::DirBuilder::new().mode(0o555).create(&probe)?;
    let sealed = fs::symlink_metadata(&probe)?.permissions().mode() & 0o777 == 0o555;
    let through = fs::create_dir(&inner).is_ok();
    if through {
        fs::remove_dir(&inner)?;
    }
    fs::remove_dir(&probe)?;
    Ok(sealed && through)
}

#[cfg(test)]
thread_local! {
    /// Unpacks on this thread seal their directories after the walk as a process that
    /// cannot write through modes does, even as root: the two ways are compared.
    pub(crate) static SEAL_AFTER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes `dest` and unpacks into it what `walk` hands the visitor; `unread`: by their place in
/// the index, the files linked whose data is passed over, never read or compared (a sparse
/// unpack's: made, not fetched, or found linkable when the frames to fetch were told).
/// Nothing is left when it fails.
pub(super) fn unpack_into(
    dest: &Path,
    modes: Modes<'_>,
    sharing: Option<Sharing<'_>>,
    unread: &[bool],
    walk: impl FnOnce(&mut dyn Visitor) -> Result<Summary, UnpackError>,
) -> Result<Unpacked, UnpackError> {
    let write_error = |path: &Path| {
        let path = path.display().to_string();
        move |source| UnpackError::Write { path, source }
    };
    let built;
    let by_path = match &sharing {
        Some(Sharing { looked: Some(looked), .. }) => Some(&looked.by_path),
        Some(sharing) => {
            built = index_by_path(sharing.index)?;
            Some(&built)
        }
        None => None,
    };
    fs::create_dir(dest).map_err(write_error(dest))?;
    let sealed_at_birth = match modes.sealed().map(|writable| (writable, writes_through_modes(dest))) {
        Some((writable, Ok(true))) => Some(writable),
        // The fresh directory failed to take a directory (a full disk): so would the walk.
        Some((_, Err(e))) => {
            let _ = remove_tree(dest);
            return Err(write_error(dest)(e));
        }
        _ => None,
    };
    // Files linked unread are linked by a thread of their own while the walk goes on.
    let seen = match &sharing {
        Some(Sharing { looked: Some(looked), .. }) if unread.contains(&true) => Some(&looked.seen[..]),
        _ => None,
    };
    let (dirs, shared, linked, outcome) = std::thread::scope(|scope| {
        let ahead = seen.zip(sharing.as_ref()).map(|(seen, s)| Ahead::start(scope, dest, &s.index.files, seen));
        let mut unpacker = Unpacker {
            root: dest.to_owned(),
            buffer: vec![0; 256 << 10],
            theirs: Vec::new(),
            dirs: foldhash::HashSet::from_iter([PathBuf::new()]),
            last_dir: PathBuf::new(),
            sealed_at_birth,
            modes,
            sharing: sharing.as_ref().zip(by_path).map(|(s, by_path)| Linking {
                candidates: s.candidates,
                files: &s.index.files,
                by_path,
                writable: s.writable,
                looked: s.looked.map(|looked| &looked.seen[..]),
                sources: RefCell::default(),
            }),
            links: OpenDir::default(),
            linked: Vec::with_capacity(sharing.as_ref().map_or(0, |s| s.index.files.len())),
            linked_at: vec![false; sharing.as_ref().map_or(0, |s| s.index.files.len())],
            not_as_said: Vec::new(),
            unread,
            ahead,
        };
        let (mut listed, mut unhashed_files) = (Vec::new(), Vec::new());
        let unhashed =
            |path: &str| by_path.and_then(|b| b.get(path)).copied().filter(|&at| unread.get(at) == Some(&true));
        let walked = match &sharing {
            None => walk(&mut unpacker),
            Some(_) => {
                let mut indexing = Indexing::new(&mut unpacker);
                indexing.unhashed = Some(&unhashed);
                let unread_count = unread.iter().filter(|u| **u).count();
                indexing.files.reserve(by_path.map_or(0, |b| b.len()).saturating_sub(unread_count));
                indexing.unhashed_files.reserve(unread_count);
                let walked = walk(&mut indexing);
                (listed, unhashed_files) = (indexing.files, indexing.unhashed_files);
                walked
            }
        };
        let outcome = walked.and_then(|summary| match (&sharing, by_path) {
            (Some(sharing), Some(by_path)) => matches_index(&listed, &unhashed_files, &sharing.index.files, by_path)
                .and_then(|()| older_as_said(&unpacker.not_as_said))
                .map(|()| summary),
            _ => Ok(summary),
        });
        // Stopped (and its failure known) before anything is removed.
        let ahead = unpacker.ahead.take().map(|ahead| ahead.finish(outcome.is_err()));
        // The link that failed is the cause, unless an older release was found changed:
        // that one is named, so that it is unmarked (and the link failed maybe because of it).
        let outcome = match (ahead, outcome) {
            (_, Err(e @ UnpackError::OlderChanged { .. })) => Err(e),
            (Some(Err((path, source))), _) => Err(UnpackError::Write { path, source }),
            (_, outcome) => outcome,
        };
        let linked = match (modes, &sharing, &outcome) {
            (Modes::Writable, Some(sharing), Ok(_)) => {
                unpacker.linked.iter().map(|(at, seen)| seen.linked(&sharing.index.files[*at])).collect()
            }
            _ => Vec::new(),
        };
        let dirs = match sealed_at_birth {
            Some(_) => vec![PathBuf::new()],
            None => unpacker.dirs.into_iter().collect(),
        };
        (dirs, unpacker.linked.len(), linked, outcome)
    });
    match outcome {
        Ok(summary) => Ok(Unpacked { summary, dirs, shared, linked }),
        Err(e) => {
            let _ = remove_tree(dest);
            Err(e)
        }
    }
}

/// The index's files by path; an index naming one path twice is refused.
pub(super) fn index_by_path(index: &FileIndex) -> Result<ByPath<'_>, UnpackError> {
    let mut by_path = ByPath::with_capacity(index.files.len());
    for (at, file) in index.files.iter().enumerate() {
        if by_path.insert(file.path.as_str(), at).is_some() {
            return Err(UnpackError::IndexMismatch(format!("it lists {:?} twice", file.path)));
        }
    }
    Ok(by_path)
}

/// Compares what the archive held (`listed`: hashed while unpacking) with its index (`files`,
/// by path), file by file; of a file linked unread (`unhashed`: its place in the index, size
/// and mode; its data zeros or passed over), its size and mode only. The walk's rules let no
/// path through twice, so as many files as the index lists are all of them.
fn matches_index(
    listed: &[IndexedFile],
    unhashed: &[(usize, u64, bool)],
    files: &[IndexedFile],
    by_path: &ByPath,
) -> Result<(), UnpackError> {
    let mode = |x: bool| if x { "executable" } else { "not executable" };
    for file in listed {
        let Some(&at) = by_path.get(file.path.as_str()) else {
            return Err(UnpackError::IndexMismatch(format!(
                "the archive holds {:?}, which it does not list",
                file.path
            )));
        };
        let said = &files[at];
        if (said.sha256, said.size, said.executable) != (file.sha256, file.size, file.executable) {
            return Err(UnpackError::IndexMismatch(format!(
                "{:?} is {} ({} bytes, {}) in the archive, {} ({} bytes, {}) in the index",
                file.path,
                file.sha256,
                file.size,
                mode(file.executable),
                said.sha256,
                said.size,
                mode(said.executable)
            )));
        }
    }
    for &(at, size, executable) in unhashed {
        let said = &files[at];
        if (said.size, said.executable) != (size, executable) {
            return Err(UnpackError::IndexMismatch(format!(
                "{:?} is {size} bytes, {} in the archive, {} bytes, {} in the index",
                said.path,
                mode(executable),
                said.size,
                mode(said.executable)
            )));
        }
    }
    if listed.len() + unhashed.len() != by_path.len() {
        let held: foldhash::HashSet<&str> = listed
            .iter()
            .map(|f| f.path.as_str())
            .chain(unhashed.iter().map(|&(at, ..)| files[at].path.as_str()))
            .collect();
        let missing = by_path.keys().find(|p| !held.contains(*p)).expect("more listed than held");
        return Err(UnpackError::IndexMismatch(format!("it lists {missing:?}, which the archive does not hold")));
    }
    Ok(())
}

/// Refuses an unpack that linked files of older releases not holding what their stored index
/// says (it was edited on this node, or they were changed with their mtime put back), naming
/// those releases (the caller unmarks them).
fn older_as_said(not_as_said: &[Candidate]) -> Result<(), UnpackError> {
    let Some(first) = not_as_said.first() else { return Ok(()) };
    let mut releases: Vec<Digest> = not_as_said.iter().map(|c| c.release).collect();
    releases.sort();
    releases.dedup();
    Err(UnpackError::OlderChanged { path: first.path.display().to_string(), releases })
}

/// Removes a tree whose directories may have been made read-only.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        make_writable_dirs(path)?;
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

fn make_writable_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        let mode = meta.permissions().mode();
        if mode & 0o200 == 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700))?;
        }
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                make_writable_dirs(&entry.path())?;
            }
        }
    }
    Ok(())
}

struct Unpacker<'a> {
    root: PathBuf,
    /// One copy buffer for every file (a fresh one per file cost ~8% of an unpack in
    /// allocating and clearing pages).
    buffer: Vec<u8>,
    /// What a linked file holds, read to compare with the stream's bytes (as long as `buffer`
    /// once a file is compared; a sparse unpack may compare none).
    theirs: Vec<u8>,
    /// The directories made so far, relative: a file's parent is made once, not looked up
    /// again for every file in it (that lookup was 8% of an unpack).
    dirs: foldhash::HashSet<PathBuf>,
    /// The directory `make_dir` was last asked for.
    last_dir: PathBuf,
    /// With [`Modes::Sealed`], when this process writes into a directory whatever its mode
    /// says: the writable paths; every other directory is made with its sealed mode, and none
    /// is sealed after the walk (a chmod and a lookup each, 6% of a 1%-changed prepare).
    sealed_at_birth: Option<&'a [String]>,
    modes: Modes<'a>,
    /// The files to link to, and the index by path.
    sharing: Option<Linking<'a, 'a>>,
    /// The files linked (by place in the index), and the older file each is linked to.
    linked: Vec<(usize, Seen<'a>)>,
    /// By place in the index: the files in `linked`.
    linked_at: Vec<bool>,
    /// Older files linked that do not hold what their release's index says.
    not_as_said: Vec<Candidate>,
    /// By place in the index: the files linked unread (see [`unpack_into`]).
    unread: &'a [bool],
    /// The directory of the last file linked.
    links: OpenDir,
    /// The threads making the links of `unread` files, when there are some.
    ahead: Option<Ahead<'a>>,
}

impl<'a> Unpacker<'a> {
    /// Makes the directory `relative` (and its parents) unless it was made already.
    fn make_dir(&mut self, relative: &Path) -> io::Result<()> {
        // A directory's files come one after another: the last one asked for is the likeliest
        // (compared as bytes; a Path is hashed component by component).
        if self.last_dir.as_os_str() == relative.as_os_str() {
            return Ok(());
        }
        if !self.dirs.contains(relative) {
            self.create_dir(relative)?;
            // The root is fresh, so everything between it and this directory was made here too.
            for dir in relative.ancestors() {
                if !self.dirs.insert(dir.to_owned()) {
                    break;
                }
            }
        }
        self.last_dir.clear();
        self.last_dir.push(relative);
        Ok(())
    }

    /// Makes `relative` and those of its parents not made yet (an archive lists them before,
    /// so this is one `mkdir`). There already as a directory (or a link to one: a directory
    /// entry at the path of an earlier symbolic link makes nothing) is no error.
    fn create_dir(&self, relative: &Path) -> io::Result<()> {
        let Some(writable) = self.sealed_at_birth else { return fs::create_dir_all(self.root.join(relative)) };
        let missing = relative.ancestors().take_while(|dir| !dir.as_os_str().is_empty() && !self.dirs.contains(*dir));
        for dir in missing.collect::<Vec<_>>().into_iter().rev() {
            // As `create_dir_all` and then `seal_dirs` would leave it (555 was found to come
            // out as asked: the umask takes nothing from it; from 777 it takes what it takes
            // there too).
            let mode = if is_writable(dir, writable) { 0o777 } else { 0o555 };
            let path = self.root.join(dir);
            match fs::DirBuilder::new().mode(mode).create(&path) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists || !path.is_dir() => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    fn parent_of(&mut self, relative: &Path) -> io::Result<()> {
        match relative.parent() {
            Some(parent) => self.make_dir(parent),
            None => Ok(()),
        }
    }

    /// Hard-links `relative` (the index's file `at`) to the file of an older release holding
    /// what the index says it holds, when there is one that still looks like it
    /// ([`Linking::usable`]). None (write it) when there is none, or the link fails (another
    /// filesystem, too many links): sharing never fails an unpack that has the file's bytes.
    /// Some: the older file, open, and its candidate, for [`same_as_linked`] to read.
    /// `open`: whether to open the older file (to compare; not when its bytes are not read).
    fn link_to_older(
        &mut self,
        relative: &Path,
        at: usize,
        executable: bool,
        open: bool,
    ) -> Option<(Option<fs::File>, &'a Candidate)> {
        use std::os::unix::fs::MetadataExt;
        let linking = self.sharing.as_ref()?;
        let seen = linking.usable(relative, at, executable)?;
        let source = &seen.candidate.path;
        // Opened before linking, and the same inode: its bytes are what the link holds.
        let opened = match open {
            true => {
                let opened = linking.sources.borrow_mut().open(source).ok();
                Some(opened.filter(|f| f.metadata().is_ok_and(|m| m.ino() == seen.ino))?)
            }
            false => None,
        };
        let link = self.root.join(relative);
        if dirfd::hard_link(&mut linking.sources.borrow_mut(), source, &mut self.links, &link).is_err() {
            return None;
        }
        self.linked_at[at] = true;
        self.linked.push((at, seen));
        Some((opened, seen.candidate))
    }

    /// [`link_to_older`](Self::link_to_older) of a file linked unread, by the linking thread:
    /// an error when there is no older file to link it to.
    fn link_ahead(&mut self, relative: &Path, at: usize, executable: bool) -> io::Result<()> {
        let linking = self.sharing.as_ref().expect("files are linked unread only with sharing");
        let seen = linking.usable(relative, at, executable).ok_or_else(not_linkable)?;
        self.linked_at[at] = true;
        self.linked.push((at, seen));
        self.ahead.as_mut().expect("checked by the caller").link(at)
    }

    /// Waits for the linking thread, if any, to do all it was handed.
    fn settle(&mut self) -> io::Result<()> {
        self.ahead.as_mut().map_or(Ok(()), Ahead::settle)
    }

    fn file_mode(&self, relative: &Path, executable: bool) -> u32 {
        let mode = if executable { 0o755 } else { 0o644 };
        match self.modes {
            Modes::Sealed(writable) if !is_writable(relative, writable) => mode & !0o222,
            _ => mode,
        }
    }
}

impl Visitor for Unpacker<'_> {
    /// The index's files, and a directory for every three of them (10,229 files in 2,980
    /// directories in the Laravel-like tree of the benchmarks; a Node tree has fewer).
    fn paths_hint(&self) -> usize {
        self.sharing.as_ref().map_or(0, |s| s.files.len() + s.files.len() / 3)
    }

    /// Paths were checked (relative, no `..`, never under a symbolic link of the archive) and
    /// the root is a fresh directory, so joining them to it cannot leave it.
    fn entry(&mut self, entry: Entry<'_>, data: &mut dyn Read) -> io::Result<()> {
        match entry {
            Entry::Directory { path } => self.make_dir(Path::new(path.as_str())),
            Entry::File { path, executable, .. } => {
                let relative = Path::new(path.as_str());
                let at = self.sharing.as_ref().and_then(|s| s.by_path.get(path.as_str()).copied());
                let unread = at.is_some_and(|at| self.unread.get(at) == Some(&true));
                self.parent_of(relative)?;
                if let (true, Some(at)) = (unread && self.ahead.is_some(), at) {
                    return self.link_ahead(relative, at, executable);
                }
                // Linked: its data (hashed by the caller, compared with the index) is compared
                // with the older file's bytes too: an older release's index is the node's word,
                // which someone there may have changed, and so may its file be.
                // Which one lied (the index sent, or the older release's) is known once the
                // stream's bytes are compared with the index sent: the unpack fails after the walk.
                if let Some((older, candidate)) =
                    at.and_then(|at| self.link_to_older(relative, at, executable, !unread))
                {
                    // Linked unread: nothing to compare.
                    if let Some(older) = older {
                        self.theirs.resize(self.buffer.len(), 0);
                        if !same_as_linked(data, older, &mut self.buffer, &mut self.theirs)? {
                            self.not_as_said.push(candidate.clone());
                        }
                    }
                    return Ok(());
                }
                if unread {
                    return Err(not_linkable());
                }
                // create_new: a second entry for the same path is refused, never overwrites.
                // A read-only mode does not stop writing through the descriptor it opens.
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(self.file_mode(relative, executable))
                    .open(self.root.join(relative))?;
                copy_with(data, file, &mut self.buffer)
            }
            Entry::Symlink { path, target } => {
                let relative = Path::new(path.as_str());
                self.parent_of(relative)?;
                std::os::unix::fs::symlink(target, self.root.join(relative))
            }
            Entry::Hardlink { path, target } => {
                let relative = Path::new(path.as_str());
                self.parent_of(relative)?;
                // Its target may be a file the linking thread was handed.
                self.settle()?;
                let link = self.root.join(relative);
                // A writable path never shares an inode with an older release (the hook user's
                // group is given write there): a link to a linked file is a copy of it instead.
                if let Some(sharing) = &self.sharing
                    && sharing.by_path.get(target.as_str()).is_some_and(|&at| self.linked_at[at])
                    && is_writable(relative, sharing.writable)
                {
                    use std::os::unix::fs::PermissionsExt;
                    let from = self.root.join(target.as_str());
                    let executable = fs::metadata(&from)?.permissions().mode() & 0o111 != 0;
                    fs::copy(&from, &link)?;
                    let mode = self.file_mode(relative, executable);
                    return fs::set_permissions(&link, fs::Permissions::from_mode(mode));
                }
                fs::hard_link(self.root.join(target.as_str()), &link)?;
                // One inode, two paths: read-only when either is (as the walk would leave it).
                if let Modes::Sealed(writable) = self.modes
                    && !is_writable(relative, writable)
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = fs::metadata(&link)?.permissions().mode();
                    fs::set_permissions(&link, fs::Permissions::from_mode(mode & !0o222))?;
                }
                Ok(())
            }
        }
    }
}

/// Why a file linked unread (its bytes not fetched, or passed over) was not linked.
pub(super) fn not_linkable() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        "it was to be linked, its bytes not fetched or not read, from a release already here, which no longer \
         holds it as its index says (changed or removed since the prepare began): deploy again",
    )
}

/// Whether `data` (a file's bytes in the stream) is exactly what `older` holds, read through
/// `buffer` and `theirs` (of one length): a file linked to it holds what the artifact says.
/// Reads `data` to its end either way.
fn same_as_linked(data: &mut dyn Read, mut older: fs::File, buffer: &mut [u8], theirs: &mut [u8]) -> io::Result<bool> {
    let mut same = true;
    loop {
        let n = match data.read(buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if same {
            same = older.read_exact(&mut theirs[..n]).is_ok() && buffer[..n] == theirs[..n];
        }
    }
    // Nothing more in the older file either.
    Ok(same && matches!(older.read(&mut theirs[..1]), Ok(0)))
}

/// Copies `data` into `file` through `buffer`, in as few writes as it takes.
fn copy_with(data: &mut dyn Read, mut file: fs::File, buffer: &mut [u8]) -> io::Result<()> {
    loop {
        let n = match data.read(buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        file.write_all(&buffer[..n])?;
    }
}

/// Hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: BufRead> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for HashingReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        if let Ok(buf) = self.inner.fill_buf() {
            self.hasher.update(&buf[..amount.min(buf.len())]);
        }
        self.inner.consume(amount);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> CheckOptions {
        CheckOptions { max_unpacked_bytes: 1 << 30, max_files: 1000, shared: vec![], record_migrations: false }
    }

    fn packed_tree() -> (tempfile::TempDir, Vec<u8>, Digest) {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("public/css")).unwrap();
        fs::write(src.path().join("public/index.php"), "<?php echo 1;").unwrap();
        fs::write(src.path().join("public/css/app.css"), "body{}").unwrap();
        fs::write(src.path().join("artisan"), "#!/usr/bin/env php").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(src.path().join("artisan"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("public/index.php", src.path().join("entry")).unwrap();
        let (packed, bytes) = archive::pack_to_writer(src.path(), &[], Vec::new(), &mut |_| {}).unwrap();
        (src, bytes, packed.digest)
    }

    #[test]
    fn unpacks_exactly_the_tree() {
        let (src, bytes, digest) = packed_tree();
        let dest = tempfile::tempdir().unwrap();
        let target = dest.path().join("release");
        unpack(&bytes[..], &target, &options(), digest, Modes::Writable).unwrap();
        assert_eq!(fs::read_to_string(target.join("public/css/app.css")).unwrap(), "body{}");
        assert_eq!(fs::read_link(target.join("entry")).unwrap(), Path::new("public/index.php"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(target.join("artisan")).unwrap().permissions().mode() & 0o111, 0o111);
        drop(src);
    }

    #[test]
    fn a_wrong_digest_leaves_nothing() {
        let (_src, bytes, _) = packed_tree();
        let dest = tempfile::tempdir().unwrap();
        let target = dest.path().join("release");
        let err = unpack(&bytes[..], &target, &options(), Digest::of(b"other"), Modes::Writable).unwrap_err();
        assert!(matches!(err, UnpackError::DigestMismatch { .. }), "{err}");
        assert!(!target.exists());
    }

    #[test]
    fn a_corrupt_stream_leaves_nothing() {
        let (_src, mut bytes, digest) = packed_tree();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        let dest = tempfile::tempdir().unwrap();
        let target = dest.path().join("release");
        assert!(unpack(&bytes[..], &target, &options(), digest, Modes::Writable).is_err());
        assert!(!target.exists());
    }

    /// The unpacker walks with the ingest check's rules, so it refuses what ingest refuses,
    /// with the same verdict, before writing the entry that breaks them.
    #[test]
    fn refuses_what_ingest_refuses_and_leaves_nothing() {
        let tar = |entries: &[(&str, tar::EntryType)]| {
            let mut builder = tar::Builder::new(Vec::new());
            for (path, kind) in entries {
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(*kind);
                header.set_size(1);
                header.set_mode(0o644);
                builder.append_data(&mut header, path, &b"x"[..]).unwrap();
            }
            zstd::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap()
        };
        let file = tar::EntryType::Regular;
        let long = format!("{}/f", "d".repeat(255)).repeat(16);
        for entries in [
            vec![("a/b", file), ("a/b", file)],
            vec![("public", file), ("public/index.php", file)],
            vec![("public/index.php", file), ("public", file)],
            vec![(long.as_str(), file)],
        ] {
            let bytes = tar(&entries);
            let expected = archive::check(&bytes[..], &options()).unwrap_err();
            let dest = tempfile::tempdir().unwrap();
            let target = dest.path().join("release");
            let err = unpack(&bytes[..], &target, &options(), Digest::of(&bytes), Modes::Writable).unwrap_err();
            assert!(matches!(&err, UnpackError::Unsafe(e) if *e == expected), "{err} (ingest: {expected})");
            assert!(!target.exists());
        }
    }
}
