//! Deterministic packing: the archive's bytes depend only on the tree's paths, contents,
//! symlink targets and executable bits.
//!
//! Entries are written depth-first with each directory's names sorted bytewise; every header
//! has mtime 0, uid/gid 0, no user or group names, and mode 0755 (directories, executables),
//! 0644 (other files) or 0777 (links). Hard-linked files are stored as regular files.
//! The tar stream is compressed as independent zstd frames (level 3, content size and checksum
//! in each; [`super::frames`]): a frame ends at the first entry boundary after
//! [`FRAME_TARGET`](super::FRAME_TARGET) uncompressed bytes, and a file's data longer than that
//! is cut at each multiple of it. Frames are compressed alone, on all cores, and written in
//! order, so the bytes (and the digest) are the same on any machine running the same `release`
//! build, whatever its number of cores.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use super::ArchiveError;
use super::frames::{FRAME_TARGET, FrameWriter};
use super::rules::{
    MAX_MIGRATIONS, MAX_SYMLINKS, RelPath, check_link_target_limits, check_path_limits, check_symlink_target,
    migration_name,
};
use crate::digest::Digest;

/// Why a tree could not be packaged.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {kind} cannot be deployed, so it cannot be packaged", path.display())]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{}: symbolic link to {target:?} leaves the tree", path.display())]
    LinkEscapes { path: PathBuf, target: String },
    #[error("{}: file name is not UTF-8", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{}: changed size while being packaged", path.display())]
    Changed { path: PathBuf },
    #[error("{}: the output file must not be inside the directory being packaged", path.display())]
    OutputInsideTree { path: PathBuf },
    #[error("{}: not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// The tree breaks a bound of the archive rules (a path too long or too deep, too many
    /// links or migrations): the server would refuse the archive and no node could unpack it.
    /// The message names the entry as the server would (relative, cut to a readable length).
    #[error("cannot be packaged, since it could never be deployed: {source}")]
    Undeployable { path: PathBuf, source: ArchiveError },
}

/// The archive written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    pub digest: Digest,
    pub size: u64,
    /// Entries: files, directories and links.
    pub file_count: u64,
    /// Independent zstd frames.
    pub frames: u64,
}

/// Packs `dir` into `out`, skipping the relative paths in `exclude` (and what lies under them).
/// `progress` is called with the number of entries written so far.
pub fn pack_to_writer<W: Write>(
    dir: &Path,
    exclude: &[String],
    out: W,
    progress: &mut dyn FnMut(u64),
) -> Result<(Packed, W), PackError> {
    // Past 16 threads, compression outruns what a tree is read at; each thread holds a few MiB.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(16) as u32);
    pack_with_workers(dir, exclude, out, progress, workers)
}

/// [`pack_to_writer`] with a given number of compression threads (the output does not depend
/// on the number).
pub(super) fn pack_with_workers<W: Write>(
    dir: &Path,
    exclude: &[String],
    out: W,
    progress: &mut dyn FnMut(u64),
    workers: u32,
) -> Result<(Packed, W), PackError> {
    let meta = fs::metadata(dir).map_err(|source| PackError::Io { path: dir.to_owned(), source })?;
    if !meta.is_dir() {
        return Err(PackError::NotADirectory { path: dir.to_owned() });
    }
    let out_err = |source| PackError::Io { path: PathBuf::from("<output>"), source };
    let hashing = HashingWriter { inner: out, hasher: Sha256::new(), written: 0 };
    let frames = FrameWriter::new(hashing, workers).map_err(out_err)?;

    let mut packer =
        Packer { builder: tar::Builder::new(frames), exclude, count: 0, symlinks: 0, migrations: 0, progress };
    packer.builder.mode(tar::HeaderMode::Deterministic);
    packer.add_dir_contents(dir, "")?;
    let count = packer.count;
    let frames = packer.builder.into_inner().map_err(out_err)?;
    let (hashing, frames) = frames.finish().map_err(out_err)?;
    let packed =
        Packed { digest: Digest::from_hasher(hashing.hasher), size: hashing.written, file_count: count, frames };
    Ok((packed, hashing.inner))
}

/// Packs `dir` into the file `output`, written beside it under a temporary name and renamed into
/// place only when complete, so a failed run leaves nothing behind.
pub fn pack_to_file(
    dir: &Path,
    exclude: &[String],
    output: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Packed, PackError> {
    let io_err = io_error;
    let dir_abs = fs::canonicalize(dir).map_err(io_err(dir))?;
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let parent_abs = fs::canonicalize(&parent).map_err(io_err(&parent))?;
    if parent_abs.starts_with(&dir_abs) {
        return Err(PackError::OutputInsideTree { path: output.to_owned() });
    }
    let temp = tempfile::Builder::new().prefix(".release-package-").tempfile_in(&parent).map_err(io_err(&parent))?;
    let (packed, writer) = pack_to_writer(dir, exclude, BufWriter::new(temp), progress)?;
    let temp = writer.into_inner().map_err(|e| PackError::Io { path: output.to_owned(), source: e.into_error() })?;
    temp.as_file().sync_all().map_err(io_err(output))?;
    temp.persist(output).map_err(|e| PackError::Io { path: output.to_owned(), source: e.error })?;
    Ok(packed)
}

/// Wraps an I/O error with the path it concerns.
fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PackError + use<> {
    let path = path.to_owned();
    move |source| PackError::Io { path, source }
}

struct Packer<'a, W: Write> {
    builder: tar::Builder<FrameWriter<W>>,
    exclude: &'a [String],
    count: u64,
    /// Counted against the rules' bounds, so nothing is packed that ingest would refuse.
    symlinks: u64,
    migrations: usize,
    progress: &'a mut dyn FnMut(u64),
}

impl<W: Write> Packer<'_, W> {
    fn add_dir_contents(&mut self, dir: &Path, prefix: &str) -> Result<(), PackError> {
        let io_err = io_error;
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(dir))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = dir.join(&name);
            let name = name.to_str().ok_or_else(|| PackError::NotUtf8 { path: path.clone() })?;
            let rel = if prefix.is_empty() { name.to_owned() } else { format!("{prefix}/{name}") };
            if self.exclude.iter().any(|x| x == &rel) {
                continue;
            }
            // Before anything is asked of the file system: a path past the limits may be past
            // what it answers for, too.
            let undeployable = |source| PackError::Undeployable { path: path.clone(), source };
            let rel_path = RelPath::parse(rel.as_bytes())
                .ok()
                .flatten()
                .ok_or_else(|| PackError::NotUtf8 { path: path.clone() })?;
            check_path_limits(&rel_path).map_err(undeployable)?;
            let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let file_type = meta.file_type();
            self.builder.get_mut().boundary().map_err(io_err(&path))?;
            if file_type.is_dir() {
                self.append(&rel, EntryType::Directory, 0o755, 0, io::empty(), &path)?;
                self.add_dir_contents(&path, &rel)?;
            } else if file_type.is_file() {
                if migration_name(&rel_path).is_some() {
                    self.migrations += 1;
                    if self.migrations > MAX_MIGRATIONS {
                        return Err(undeployable(ArchiveError::TooManyMigrations { limit: MAX_MIGRATIONS }));
                    }
                }
                let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
                let file = File::open(&path).map_err(io_err(&path))?;
                self.append(&rel, EntryType::Regular, mode, meta.len(), file, &path)?;
            } else if file_type.is_symlink() {
                let target = fs::read_link(&path).map_err(io_err(&path))?;
                let escapes = || PackError::LinkEscapes { path: path.clone(), target: target.display().to_string() };
                check_link_target_limits(&rel_path, target.as_os_str().as_bytes()).map_err(undeployable)?;
                check_symlink_target(&rel_path, target.as_os_str().as_bytes()).map_err(|_| escapes())?;
                self.symlinks += 1;
                if self.symlinks > MAX_SYMLINKS {
                    return Err(undeployable(ArchiveError::TooManySymlinks { limit: MAX_SYMLINKS }));
                }
                let mut header = self.header(EntryType::Symlink, 0o777, 0);
                self.builder.append_link(&mut header, &rel, &target).map_err(io_err(&path))?;
                self.bump();
            } else {
                let kind = if file_type.is_socket() {
                    "a socket"
                } else if file_type.is_fifo() {
                    "a fifo"
                } else {
                    "a device file"
                };
                return Err(PackError::Unsupported { path, kind });
            }
        }
        Ok(())
    }

    fn header(&self, kind: EntryType, mode: u32, size: u64) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header
    }

    fn append(
        &mut self,
        rel: &str,
        kind: EntryType,
        mode: u32,
        size: u64,
        data: impl Read,
        path: &Path,
    ) -> Result<(), PackError> {
        let mut header = self.header(kind, mode, size);
        let started = (size > FRAME_TARGET).then(|| self.builder.get_mut().large_file(size));
        let mut exact = ExactReader { inner: data.take(size), remaining: size, shrank: false, started };
        let appended = self.builder.append_data(&mut header, rel, &mut exact);
        let mut one_more = [0u8; 1];
        let grew = exact.inner.into_inner().read(&mut one_more).is_ok_and(|n| n > 0);
        if exact.shrank || grew {
            return Err(PackError::Changed { path: path.to_owned() });
        }
        appended.map_err(|source| PackError::Io { path: path.to_owned(), source })?;
        self.bump();
        Ok(())
    }

    fn bump(&mut self) {
        self.count += 1;
        (self.progress)(self.count);
    }
}

/// Reads what the header announced and notices a file that shrank meanwhile (the `take`
/// inside stops one that grew; the caller checks for that).
struct ExactReader<R> {
    inner: io::Take<R>,
    remaining: u64,
    shrank: bool,
    /// Set at the first read: the entry's header is written, its data starts (where the frame
    /// writer cuts a large file's data from).
    started: Option<Arc<AtomicBool>>,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(started) = self.started.take() {
            started.store(true, Ordering::Relaxed);
        }
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            self.shrank = true;
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being packaged"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
