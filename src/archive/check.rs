//! Streaming archive check: zstd frame, every tar header, the safety rules and the size limits,
//! in one pass over a `Read`, without keeping the archive in memory.

use std::cell::Cell;
use std::io::{self, BufRead, Read};
use std::rc::Rc;

use tar::EntryType;

use super::rules::{RelPath, TreeState, check_mode, check_symlink_target};
use super::{ArchiveError, ZSTD_MAGIC};

/// The largest zstd window accepted, as a power of two: 128 MiB, the zstd tool's own default
/// limit, so any archive made by `zstd` without `--long=28` or more passes, and a hostile frame
/// cannot make the server allocate more than that.
const MAX_WINDOW_LOG: u32 = 27;

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

/// Checks a whole `tar`+`zstd` stream. Reads `input` to its end unless it refuses earlier.
/// (`BufRead`, so zstd reads the caller's buffers in place instead of copying them.)
pub fn check(mut input: impl BufRead, options: &CheckOptions) -> Result<Summary, ArchiveError> {
    let mut magic = [0u8; 4];
    input.read_exact(&mut magic).map_err(|_| ArchiveError::NotZstd)?;
    if magic != ZSTD_MAGIC {
        return Err(ArchiveError::NotZstd);
    }
    let mut decoder = zstd::stream::read::Decoder::with_buffer(io::Cursor::new(magic).chain(input))
        .map_err(|e| ArchiveError::Zstd(e.to_string()))?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(|e| ArchiveError::Zstd(e.to_string()))?;

    let trouble = Rc::new(Cell::new(None));
    let counted = Counted { inner: decoder, pos: 0, limit: options.max_unpacked_bytes, trouble: Rc::clone(&trouble) };
    let mut archive = tar::Archive::new(counted);
    let read_error = |e: io::Error| match trouble.take() {
        Some(Trouble::Limit) => ArchiveError::TooLarge { limit: options.max_unpacked_bytes },
        Some(Trouble::Zstd(io::ErrorKind::UnexpectedEof, message)) => {
            ArchiveError::Truncated(format!("the zstd stream ends mid-frame ({message})"))
        }
        Some(Trouble::Zstd(_, message)) => ArchiveError::Zstd(message),
        Some(Trouble::Eof) => ArchiveError::Truncated(e.to_string()),
        None if e.kind() == io::ErrorKind::UnexpectedEof => ArchiveError::Truncated(e.to_string()),
        None => ArchiveError::Tar(e.to_string()),
    };

    let mut summary = Summary::default();
    let mut tree = TreeState::default();
    let mut end_of_entries = 0u64;
    let mut buffer = vec![0u8; READ_BUFFER];
    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        summary.file_count += 1;
        if summary.file_count > options.max_files {
            return Err(ArchiveError::TooManyFiles { limit: options.max_files });
        }
        end_of_entries = entry.raw_file_position() + entry.size().next_multiple_of(BLOCK);
        check_entry(&entry, options, &mut tree, &mut summary)?;
        while entry.read(&mut buffer).map_err(read_error)? > 0 {}
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
            return Err(ArchiveError::Tar("data follows the end-of-archive marker".into()));
        }
    }
    if after_entries == end_of_entries || counted.pos < end_of_entries + 2 * BLOCK {
        return Err(ArchiveError::Truncated("no end-of-archive marker after the last entry".into()));
    }
    summary.unpacked_bytes = counted.pos;
    summary.migrations.sort();
    Ok(summary)
}

fn check_entry<R: Read>(
    entry: &tar::Entry<'_, R>,
    options: &CheckOptions,
    tree: &mut TreeState,
    summary: &mut Summary,
) -> Result<(), ArchiveError> {
    let header = entry.header();
    let kind = header.entry_type();
    if kind == EntryType::XGlobalHeader {
        return Ok(());
    }
    let path = match RelPath::parse(&entry.path_bytes())? {
        Some(path) => path,
        // The root directory itself (`./`), as `tar -C dir .` writes it.
        None if kind == EntryType::Directory => return Ok(()),
        None => return Err(ArchiveError::BadPath { path: String::from_utf8_lossy(&entry.path_bytes()).into_owned() }),
    };
    let forbidden = |name: &'static str| ArchiveError::ForbiddenType { path: path.as_str().to_owned(), kind: name };
    match kind {
        EntryType::Regular | EntryType::Directory | EntryType::Symlink | EntryType::Link => {}
        EntryType::Char | EntryType::Block => return Err(forbidden("device")),
        EntryType::Fifo => return Err(forbidden("fifo")),
        EntryType::GNUSparse => return Err(forbidden("sparse file")),
        _ => return Err(forbidden("unsupported (not a file, directory or link)")),
    }
    let mode = header.mode().map_err(|e| ArchiveError::Tar(format!("entry {:?}: {e}", path.as_str())))?;
    check_mode(&path, mode)?;
    tree.check_not_through_symlink(&path)?;
    if let Some(shared) = options.shared.iter().find(|s| path.is_within(s)) {
        return Err(ArchiveError::SharedPath { path: path.as_str().to_owned(), shared: shared.clone() });
    }
    let link_target = || entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
    match kind {
        EntryType::Symlink => {
            check_symlink_target(&path, &link_target())?;
            tree.add_symlink(&path);
        }
        EntryType::Link => tree.check_hardlink(&path, &link_target())?,
        EntryType::Regular => {
            tree.add_file(&path);
            if options.record_migrations
                && let Some(name) = path.as_str().strip_prefix("database/migrations/")
                && !name.contains('/')
                && name.ends_with(".php")
            {
                summary.migrations.push(name.to_owned());
            }
        }
        _ => {}
    }
    Ok(())
}

enum Trouble {
    /// The decompressed stream ended; a tar error after this means it was cut short.
    Eof,
    Limit,
    Zstd(io::ErrorKind, String),
}

/// Counts decompressed bytes and enforces the unpacked-size limit as they flow (so a bomb is
/// stopped, not inflated).
struct Counted<R> {
    inner: R,
    pos: u64,
    limit: u64,
    trouble: Rc<Cell<Option<Trouble>>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|e| {
            self.trouble.set(Some(Trouble::Zstd(e.kind(), e.to_string())));
        })?;
        if n == 0 && !buf.is_empty() {
            self.trouble.set(Some(Trouble::Eof));
        }
        self.pos += n as u64;
        if self.pos > self.limit {
            self.trouble.set(Some(Trouble::Limit));
            return Err(io::Error::other("unpacked size limit reached"));
        }
        Ok(n)
    }
}
