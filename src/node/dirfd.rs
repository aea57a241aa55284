//! Files reached from their directory, kept open: consecutive files of one directory (an
//! archive lists them together, and an older release's mostly come in the same order, unless
//! the candidates alternate between releases) cost the kernel a lookup of their name, not of
//! every component of their path again. A sparse prepare stats and links 10,000 files, six to
//! ten components deep.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// The directory of the last path asked about, open (`O_PATH`: it is only looked through).
#[derive(Default)]
pub(super) struct OpenDir {
    path: PathBuf,
    fd: Option<OwnedFd>,
}

impl OpenDir {
    /// `path`'s directory, opened unless it is the one already open, and its name in it.
    fn split<'p>(&mut self, path: &'p Path) -> io::Result<(BorrowedFd<'_>, &'p OsStr)> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", path.display())));
        };
        // Compared as bytes: Path's own equality parses both into components.
        if self.fd.is_none() || self.path.as_os_str() != parent.as_os_str() {
            self.fd = None;
            let fd = rustix::fs::open(parent, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
            self.path.clear();
            self.path.push(parent);
            self.fd = Some(fd);
        }
        Ok((self.fd.as_ref().expect("opened above").as_fd(), name))
    }

    /// What `path` is (a symbolic link itself, not what it points to). `fstatat`, not
    /// `statx`: it is there on every kernel and sandbox, as std's fallback made sure before.
    pub(super) fn stat(&mut self, path: &Path) -> io::Result<Stat> {
        let (dir, name) = self.split(path)?;
        let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(Stat {
            is_file: FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile,
            ino: stat.st_ino,
            size: stat.st_size as u64,
            mtime_ns: i128::from(stat.st_mtime) * 1_000_000_000 + i128::from(stat.st_mtime_nsec),
            mode: stat.st_mode,
        })
    }

    /// `path` opened to read, from its directory (as `File::open`: a symbolic link is followed).
    pub(super) fn open(&mut self, path: &Path) -> io::Result<File> {
        let (dir, name) = self.split(path)?;
        Ok(rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?.into())
    }
}

/// What [`OpenDir::stat`] tells of a file.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stat {
    pub is_file: bool,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    /// With the file type's bits, as `st_mode`.
    pub mode: u32,
}

/// Hard-links `link` to `source`, each reached from its directory (`link`'s must exist; a
/// symbolic link at `source` is linked itself, as `link(2)` does).
pub(super) fn hard_link(sources: &mut OpenDir, source: &Path, links: &mut OpenDir, link: &Path) -> io::Result<()> {
    let (from_dir, from) = sources.split(source)?;
    let (to_dir, to) = links.split(link)?;
    Ok(rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn links_and_stats_across_directories_as_their_paths_say() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        fs::create_dir_all(a.join("deep")).unwrap();
        fs::create_dir_all(&b).unwrap();
        fs::write(a.join("one"), "1").unwrap();
        fs::write(a.join("deep/two"), "22").unwrap();
        std::os::unix::fs::symlink("one", a.join("link")).unwrap();
        let (mut sources, mut links) = (OpenDir::default(), OpenDir::default());
        // Back and forth between directories: each path is reached in its own.
        for (from, to) in [("one", "one"), ("deep/two", "two"), ("link", "link")] {
            hard_link(&mut sources, &a.join(from), &mut links, &b.join(to)).unwrap();
        }
        assert_eq!(fs::read_to_string(b.join("two")).unwrap(), "22");
        let stat = sources.stat(&b.join("one")).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(a.join("one")).unwrap();
        assert!(stat.is_file);
        assert_eq!((stat.ino, stat.size, stat.mode), (meta.ino(), 1, meta.mode()));
        assert_eq!(stat.mtime_ns, i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()));
        assert!(!sources.stat(&b.join("link")).unwrap().is_file, "a symbolic link is not followed");
        assert_eq!(fs::read_link(b.join("link")).unwrap(), Path::new("one"));
        assert_eq!(io::read_to_string(sources.open(&a.join("deep/two")).unwrap()).unwrap(), "22");
        let missing = sources.stat(&root.path().join("nowhere/x")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let taken = hard_link(&mut sources, &a.join("one"), &mut links, &b.join("one")).unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AlreadyExists, "never over a file already there");
    }
}
