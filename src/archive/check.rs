//! Streaming archive check: zstd frame, every tar header, the safety rules and the size limits,
//! in one pass over a `Read`, without keeping the archive in memory.

use std::cell::Cell;
use std::io::{self, BufRead, Read, Seek};
use std::rc::Rc;

use tar::EntryType;

use super::counted::{Counted, MAX_EXPANSION, Sent, Trouble};
use super::extensions::Extensions;
use super::rules::{
    Kind, MAX_MIGRATIONS, RelPath, TreeState, check_link_target_limits, check_mode, check_path_limits,
    check_symlink_target, migration_name,
};
use super::skeleton::{SharedBuilder, SkeletonBuilder, Tapped};
use super::{ArchiveError, ZSTD_MAGIC};

/// The largest zstd window accepted, as a power of two: 32 MiB. Every level up to 19 stays
/// within it (`release package` uses 2 MiB); only `--long` and `--ultra` go beyond. It bounds
/// what a hostile frame can make the server allocate per upload.
const MAX_WINDOW_LOG: u32 = 25;

const BLOCK: u64 = 512;
/// Entry data is read (and dropped) in pieces this large, so zstd decompresses straight into
/// one buffer instead of through the tar reader's 8 KiB copies.
const READ_BUFFER: usize = 1 << 20;

/// What a check enforces beyond the fixed rules.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Decompressed tar stream bytes, headers included.
    pub max_unpacked_bytes: u64,
    /// Entries of any type.
    pub max_files: u64,
    /// Paths the service keeps in `shared/`; an entry at or under one is refused.
    pub shared: Vec<String>,
    /// Record `database/migrations/*.php` (Laravel services, and services not configured yet).
    pub record_migrations: bool,
}

/// What a check measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Bytes of the decompressed tar stream.
    pub unpacked_bytes: u64,
    /// Entries: files, directories and links.
    pub file_count: u64,
    /// File names under `database/migrations/`, sorted.
    pub migrations: Vec<String>,
}

/// One entry that passed every rule, as a [`Visitor`] sees it.
#[derive(Debug)]
pub enum Entry<'a> {
    Directory {
        path: &'a RelPath,
    },
    /// A regular file; `executable` when any execute bit is set; its `size` bytes of data start
    /// at `offset` in the decompressed tar stream.
    File {
        path: &'a RelPath,
        executable: bool,
        offset: u64,
        size: u64,
    },
    Symlink {
        path: &'a RelPath,
        target: &'a str,
    },
    /// A hard link to an earlier regular file.
    Hardlink {
        path: &'a RelPath,
        target: RelPath,
    },
}

/// What to do with each entry that passed the rules: nothing (the ingest check) or write it
/// (the node's unpacker). `data` is the file's content; what the visitor leaves unread is
/// read and dropped.
pub trait Visitor {
    fn entry(&mut self, entry: Entry<'_>, data: &mut dyn Read) -> io::Result<()>;

    /// How many paths (entries, and the directories they imply) the walk will likely meet,
    /// when the visitor knows (a node unpacking with the artifact's index): the walk's record
    /// of them is made that large at once, not grown and copied over and over (its rehashing
    /// was ~5% of the main thread's samples in a 1%-changed prepare's walk, under perf).
    fn paths_hint(&self) -> usize {
        0
    }
}

/// Reads nothing: the check alone.
struct Nothing;

impl Visitor for Nothing {
    fn entry(&mut self, _: Entry<'_>, _: &mut dyn Read) -> io::Result<()> {
        Ok(())
    }
}

/// Why a walk stopped: the archive broke a rule, or the visitor could not do its part
/// (for the unpacker: a full disk, a permission).
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("{path}: {source}")]
    Visitor { path: String, source: io::Error },
}

/// Checks a whole `tar`+`zstd` stream. Reads `input` to its end unless it refuses earlier.
/// (`BufRead`, so zstd reads the caller's buffers in place instead of copying them.)
pub fn check(input: impl BufRead, options: &CheckOptions) -> Result<Summary, ArchiveError> {
    walk(input, options, &mut Nothing).map_err(|e| match e {
        WalkError::Archive(e) => e,
        WalkError::Visitor { .. } => unreachable!("the check's visitor does nothing"),
    })
}

/// What [`index`] found: the check's summary, every regular file with the SHA-256 of its data
/// (the artifact's [`FileIndex`](super::FileIndex), less the artifact's own digest, which the
/// caller knows; `None` when its index would be larger than
/// [`MAX_INDEX_BYTES`](super::MAX_INDEX_BYTES): then it has none, and its files are shared
/// on no node), and the tar stream's skeleton (zstd; see [`Skeleton`](super::Skeleton)).
#[derive(Debug)]
pub struct Listing {
    pub summary: Summary,
    pub files: Option<Vec<super::IndexedFile>>,
    pub skeleton: Option<Vec<u8>>,
}

/// [`check`], also listing every regular file and keeping the skeleton of the tar stream.
pub fn index(input: impl BufRead, options: &CheckOptions) -> Result<Listing, ArchiveError> {
    index_keeping(input, options, SkeletonBuilder::shared(), super::MAX_INDEX_BYTES)
}

/// [`index`], keeping the skeleton in `skeleton` and listing files while their index takes at
/// most `budget` bytes (a test's: small limits).
pub(super) fn index_keeping(
    input: impl BufRead,
    options: &CheckOptions,
    skeleton: SharedBuilder,
    budget: u64,
) -> Result<Listing, ArchiveError> {
    let mut nothing = Nothing;
    let mut indexing = super::listing::Indexing::new(&mut nothing);
    indexing.within(budget, Rc::clone(&skeleton));
    let summary = walk_zstd(input, options, &mut indexing, Some(Rc::clone(&skeleton)), true).map_err(|e| match e {
        WalkError::Archive(e) => e,
        // Hashing reads only what the walk hands it; a read error there is the archive's and
        // comes back as `Archive`.
        WalkError::Visitor { path, source } => ArchiveError::Tar(format!("entry {path:?}: {source}")),
    })?;
    // A skeleton is of use only beside the files' index.
    let skeleton = skeleton.borrow_mut().finish().filter(|_| !indexing.over_budget);
    let files = (!indexing.over_budget).then_some(indexing.files);
    Ok(Listing { summary, files, skeleton })
}

/// [`check`], handing every entry that passed the rules to `visitor` as it goes.
pub fn walk(input: impl BufRead, options: &CheckOptions, visitor: &mut dyn Visitor) -> Result<Summary, WalkError> {
    walk_zstd(input, options, visitor, None, false)
}

/// [`walk`] over a tar stream that is not compressed (the node's sparse unpack makes it from
/// the frames it fetched and the index's skeleton). Read errors are the caller's to explain.
pub fn walk_tar(input: impl Read, options: &CheckOptions, visitor: &mut dyn Visitor) -> Result<Summary, WalkError> {
    walk_stream(input, options, visitor, None, Skip::Read, None)
}

/// [`walk_tar`] of a stream that can pass over bytes: the data the visitor leaves unread is
/// skipped by seeking forward (`SeekFrom::Current`, the only seek asked for) instead of read.
/// A sparse unpack's stream is mostly files' data it links, never reads.
pub fn walk_tar_seeking(
    input: impl Read + Seek,
    options: &CheckOptions,
    visitor: &mut dyn Visitor,
) -> Result<Summary, WalkError> {
    walk_stream(input, options, visitor, None, Skip::Seek(seeking), None)
}

/// How the walk passes over the data a visitor leaves unread.
enum Skip<R: Read> {
    /// Reads it.
    Read,
    /// Seeks past it: the tar reader's seeking entries.
    Seek(fn(&mut tar::Archive<R>) -> io::Result<tar::Entries<'_, R>>),
}

fn seeking<R: Read + Seek>(archive: &mut tar::Archive<R>) -> io::Result<tar::Entries<'_, R>> {
    archive.entries_with_seek()
}

/// The walk of a `tar`+`zstd` stream; `dense`: the unpacked bytes are held to
/// [`MAX_EXPANSION`] times the compressed ones past [`FREE_UNPACKED`].
fn walk_zstd(
    mut input: impl BufRead,
    options: &CheckOptions,
    visitor: &mut dyn Visitor,
    skeleton: Option<SharedBuilder>,
    dense: bool,
) -> Result<Summary, WalkError> {
    let mut magic = [0u8; 4];
    input.read_exact(&mut magic).map_err(|_| ArchiveError::NotZstd)?;
    if magic != ZSTD_MAGIC {
        return Err(WalkError::Archive(ArchiveError::NotZstd));
    }
    let sent = Rc::new(Cell::new(magic.len() as u64));
    let input = Sent { inner: input, count: Rc::clone(&sent) };
    let mut decoder = zstd::stream::read::Decoder::with_buffer(io::Cursor::new(magic).chain(input))
        .map_err(|e| ArchiveError::Zstd(e.to_string()))?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(|e| ArchiveError::Zstd(e.to_string()))?;
    walk_stream(decoder, options, visitor, skeleton, Skip::Read, dense.then_some(sent))
}

/// The walk of a tar stream (`decoded`), feeding `skeleton` every byte but the files' data.
fn walk_stream<R: Read>(
    decoded: R,
    options: &CheckOptions,
    visitor: &mut dyn Visitor,
    skeleton: Option<SharedBuilder>,
    skip: Skip<Counted<Tapped<R>>>,
    sent: Option<Rc<Cell<u64>>>,
) -> Result<Summary, WalkError> {
    let trouble = Rc::new(Cell::new(None));
    let tapped = Tapped { inner: decoded, skeleton: skeleton.clone() };
    let limit = options.max_unpacked_bytes;
    let counted = Counted { inner: tapped, pos: 0, limit, sent, trouble: Rc::clone(&trouble) };
    let mut archive = tar::Archive::new(counted);
    let read_error = |e: io::Error| match trouble.take() {
        Some(Trouble::Limit) => ArchiveError::TooLarge { limit: options.max_unpacked_bytes },
        Some(Trouble::Dense { unpacked, sent }) => ArchiveError::TooDense { unpacked, sent, ratio: MAX_EXPANSION },
        Some(Trouble::Zstd(io::ErrorKind::UnexpectedEof, message)) => {
            ArchiveError::Truncated(format!("the zstd stream ends mid-frame ({message})"))
        }
        Some(Trouble::Zstd(_, message)) if message.contains("too much memory") => ArchiveError::Zstd(format!(
            "{message}: its window is over {} MiB; compress without --long or --ultra",
            1 << (MAX_WINDOW_LOG - 20)
        )),
        Some(Trouble::Zstd(_, message)) => ArchiveError::Zstd(message),
        Some(Trouble::Eof) => ArchiveError::Truncated(e.to_string()),
        None if e.kind() == io::ErrorKind::UnexpectedEof => ArchiveError::Truncated(e.to_string()),
        None => ArchiveError::Tar(e.to_string()),
    };

    let mut summary = Summary::default();
    let mut tree = TreeState::with_capacity(options.max_files, visitor.paths_hint());
    let mut names = Extensions::default();
    let mut end_of_entries = 0u64;
    let mut buffer = vec![0u8; READ_BUFFER];
    // Raw entries: GNU long names and PAX headers are read here, capped, instead of by the tar
    // reader, which would read one of any size into memory.
    let entries = match skip {
        Skip::Read => archive.entries(),
        Skip::Seek(seeking) => seeking(&mut archive),
    };
    let reads = matches!(skip, Skip::Read);
    for entry in entries.map_err(read_error)?.raw(true) {
        let mut entry = entry.map_err(read_error)?;
        end_of_entries = entry.raw_file_position() + entry.size().next_multiple_of(BLOCK);
        if names.absorb(&mut entry).map_err(|e| e.or_else(read_error))? {
            continue;
        }
        summary.file_count += 1;
        if summary.file_count > options.max_files {
            return Err(WalkError::Archive(ArchiveError::TooManyFiles { limit: options.max_files }));
        }
        let (path, link) = names.take(&entry)?;
        let header = entry.header().clone();
        if let Some(checked) = check_entry(&header, &path, link.as_deref(), options, &mut tree, &mut summary)? {
            if let (Checked::File(..), Some(skeleton)) = (&checked, &skeleton) {
                skeleton.borrow_mut().cut(entry.raw_file_position(), entry.size());
            }
            let shown = checked.path().as_str().to_owned();
            let visited = visitor.entry(checked.as_entry(entry.raw_file_position(), entry.size()), &mut entry);
            if let Err(source) = visited {
                // A read error inside the visitor is the archive's; anything else is the visitor's.
                return Err(match trouble.take() {
                    Some(t) => {
                        trouble.set(Some(t));
                        read_error(source).into()
                    }
                    None => WalkError::Visitor { path: shown, source },
                });
            }
        }
        // What the visitor left: read here (counted, checked), or passed over by the tar
        // reader's seek (counted too) before the next header.
        while reads && entry.read(&mut buffer).map_err(read_error)? > 0 {}
    }
    if names.pending() {
        return Err(WalkError::Archive(ArchiveError::Tar(
            "a long-name or PAX header is not followed by an entry".into(),
        )));
    }

    // What follows the entries: the end-of-archive marker (two zero blocks, the first of which
    // the tar reader consumed) and zero padding, nothing else.
    let mut counted = archive.into_inner();
    let after_entries = counted.pos;
    loop {
        let n = counted.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            break;
        }
        if buffer[..n].iter().any(|b| *b != 0) {
            return Err(WalkError::Archive(ArchiveError::Tar("data follows the end-of-archive marker".into())));
        }
    }
    if after_entries == end_of_entries || counted.pos < end_of_entries + 2 * BLOCK {
        return Err(WalkError::Archive(ArchiveError::Truncated(
            "no end-of-archive marker after the last entry".into(),
        )));
    }
    summary.unpacked_bytes = counted.pos;
    summary.migrations.sort();
    Ok(summary)
}

/// An entry that passed the rules, owning what the visitor borrows.
enum Checked {
    Directory(RelPath),
    File(RelPath, bool),
    Symlink(RelPath, String),
    Hardlink(RelPath, RelPath),
}

impl Checked {
    fn path(&self) -> &RelPath {
        match self {
            Checked::Directory(p) | Checked::File(p, _) | Checked::Symlink(p, _) | Checked::Hardlink(p, _) => p,
        }
    }

    /// The entry whose `size` bytes of data start at `offset` in the tar stream.
    fn as_entry(&self, offset: u64, size: u64) -> Entry<'_> {
        match self {
            Checked::Directory(path) => Entry::Directory { path },
            Checked::File(path, executable) => Entry::File { path, executable: *executable, offset, size },
            Checked::Symlink(path, target) => Entry::Symlink { path, target },
            Checked::Hardlink(path, target) => Entry::Hardlink { path, target: target.clone() },
        }
    }
}

/// Applies the rules to one entry; `None` for the root directory itself.
fn check_entry(
    header: &tar::Header,
    raw_path: &[u8],
    link: Option<&[u8]>,
    options: &CheckOptions,
    tree: &mut TreeState,
    summary: &mut Summary,
) -> Result<Option<Checked>, ArchiveError> {
    let kind = header.entry_type();
    let shown = || String::from_utf8_lossy(raw_path).into_owned();
    let mode = header.mode().map_err(|e| ArchiveError::Tar(format!("entry {:?}: {e}", shown())))?;
    let path = match RelPath::parse(raw_path)? {
        Some(path) => path,
        // The root directory itself (`./`), as `tar -C dir .` writes it.
        None if kind == EntryType::Directory => {
            check_mode(&RelPath::root(), mode)?;
            return Ok(None);
        }
        None => return Err(ArchiveError::BadPath { path: shown() }),
    };
    let forbidden = |name: &'static str| ArchiveError::ForbiddenType { path: path.as_str().to_owned(), kind: name };
    match kind {
        EntryType::Regular | EntryType::Directory | EntryType::Symlink | EntryType::Link => {}
        EntryType::Char | EntryType::Block => return Err(forbidden("device")),
        EntryType::Fifo => return Err(forbidden("fifo")),
        EntryType::GNUSparse => return Err(forbidden("sparse file")),
        _ => return Err(forbidden("unsupported (not a file, directory or link)")),
    }
    check_path_limits(&path)?;
    check_mode(&path, mode)?;
    let link = link.unwrap_or_default();
    let checked = match kind {
        EntryType::Symlink => {
            check_link_target_limits(&path, link)?;
            check_symlink_target(&path, link)?;
            tree.add(&path, Kind::Symlink)?;
            let target = String::from_utf8(link.to_vec()).expect("checked UTF-8 by check_symlink_target");
            Checked::Symlink(path, target)
        }
        EntryType::Link => {
            let target = tree.check_hardlink(&path, link)?;
            tree.add(&path, Kind::Hardlink)?;
            Checked::Hardlink(path, target)
        }
        EntryType::Regular => {
            tree.add(&path, Kind::File)?;
            if options.record_migrations
                && let Some(name) = migration_name(&path)
            {
                if summary.migrations.len() >= MAX_MIGRATIONS {
                    return Err(ArchiveError::TooManyMigrations { limit: MAX_MIGRATIONS });
                }
                summary.migrations.push(name.to_owned());
            }
            Checked::File(path, mode & 0o111 != 0)
        }
        _ => {
            tree.add(&path, Kind::Directory)?;
            Checked::Directory(path)
        }
    };
    if let Some(shared) = options.shared.iter().find(|s| checked.path().is_within(s)) {
        return Err(ArchiveError::SharedPath { path: checked.path().as_str().to_owned(), shared: shared.clone() });
    }
    Ok(Some(checked))
}
