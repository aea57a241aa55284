//! The node's unpacker: the archive's bytes are hashed and checked by the same rules as at
//! ingest (never trusting the server's check alone) while they are written into a fresh
//! directory. A digest that does not match, a rule broken, a full disk: the directory is
//! removed and nothing is left.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::archive::{self, ArchiveError, CheckOptions, Entry, Summary, Visitor, WalkError};
use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the artifact's digest is {actual}, not {expected}: corrupted in the store or on the way")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("unsafe archive: {0}")]
    Unsafe(#[from] ArchiveError),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
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

/// Whether `relative` (a path in a release) is at or under one of the `writable` paths,
/// which stay writable when the release is sealed.
pub fn is_writable(relative: &Path, writable: &[String]) -> bool {
    writable.iter().any(|w| relative.starts_with(w))
}

/// What [`unpack`] made.
#[derive(Debug)]
pub struct Unpacked {
    pub summary: Summary,
    /// Every directory of the tree, relative to its root (the root itself is `""`).
    pub dirs: Vec<PathBuf>,
}

/// Unpacks `input` (a whole `tar`+`zstd` stream) into `dest`, which must not exist yet.
pub fn unpack(
    input: impl BufRead,
    dest: &Path,
    options: &CheckOptions,
    expected: Digest,
    modes: Modes<'_>,
) -> Result<Unpacked, UnpackError> {
    let write_error = |path: &Path| {
        let path = path.display().to_string();
        move |source| UnpackError::Write { path, source }
    };
    fs::create_dir(dest).map_err(write_error(dest))?;
    let mut hashing = HashingReader { inner: input, hasher: Sha256::new() };
    let mut unpacker =
        Unpacker { root: dest.to_owned(), buffer: vec![0; 256 << 10], dirs: HashSet::from([PathBuf::new()]), modes };
    let walked = archive::walk(&mut hashing, options, &mut unpacker);
    let outcome = match walked {
        Err(WalkError::Archive(e)) => Err(UnpackError::Unsafe(e)),
        Err(WalkError::Visitor { path, source }) => Err(UnpackError::Write { path, source }),
        Ok(summary) => {
            // Drain whatever follows (nothing, for a well-formed stream) so the digest covers
            // every byte that was sent.
            io::copy(&mut hashing, &mut io::sink()).map_err(write_error(dest))?;
            let actual = Digest::from_hasher(hashing.hasher.clone());
            if actual == expected { Ok(summary) } else { Err(UnpackError::DigestMismatch { expected, actual }) }
        }
    };
    match outcome {
        Ok(summary) => {
            sync_filesystem(dest).map_err(write_error(dest))?;
            Ok(Unpacked { summary, dirs: unpacker.dirs.into_iter().collect() })
        }
        Err(e) => {
            let _ = remove_tree(dest);
            Err(e)
        }
    }
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

/// One `syncfs` for the whole tree instead of an fsync per file.
fn sync_filesystem(dir: &Path) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fs::File::open(dir)?)?)
}

struct Unpacker<'a> {
    root: PathBuf,
    /// One copy buffer for every file (a fresh one per file cost ~8% of an unpack in
    /// allocating and clearing pages).
    buffer: Vec<u8>,
    /// The directories made so far, relative: a file's parent is made once, not looked up
    /// again for every file in it (that lookup was 8% of an unpack).
    dirs: HashSet<PathBuf>,
    modes: Modes<'a>,
}

impl Unpacker<'_> {
    /// Makes the directory `relative` (and its parents) unless it was made already.
    fn make_dir(&mut self, relative: &Path) -> io::Result<()> {
        if self.dirs.contains(relative) {
            return Ok(());
        }
        fs::create_dir_all(self.root.join(relative))?;
        // The root is fresh, so everything between it and this directory was made here too.
        for dir in relative.ancestors() {
            if !self.dirs.insert(dir.to_owned()) {
                break;
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

    fn file_mode(&self, relative: &Path, executable: bool) -> u32 {
        let mode = if executable { 0o755 } else { 0o644 };
        match self.modes {
            Modes::Sealed(writable) if !is_writable(relative, writable) => mode & !0o222,
            _ => mode,
        }
    }
}

impl Visitor for Unpacker<'_> {
    /// Paths were checked (relative, no `..`, never under a symbolic link of the archive) and
    /// the root is a fresh directory, so joining them to it cannot leave it.
    fn entry(&mut self, entry: Entry<'_>, data: &mut dyn Read) -> io::Result<()> {
        match entry {
            Entry::Directory { path } => self.make_dir(Path::new(path.as_str())),
            Entry::File { path, executable, .. } => {
                let relative = Path::new(path.as_str());
                self.parent_of(relative)?;
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
                let link = self.root.join(relative);
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
