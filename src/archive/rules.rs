//! Per-entry safety rules: what path, link and mode an artifact entry may have.

use std::collections::HashSet;
use std::path::{Component, Path};

use super::ArchiveError;

/// A normalized path inside a release: relative, `/`-separated, no `.`, `..` or empty parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    /// Normalizes an entry path as a tar archive spells it (`./a/b/`, `a//b`), refusing absolute
    /// paths, `..` and non-UTF-8. `Ok(None)` is the archive's root directory itself (`./`).
    pub fn parse(raw: &[u8]) -> Result<Option<RelPath>, ArchiveError> {
        let shown = String::from_utf8_lossy(raw).into_owned();
        let text = std::str::from_utf8(raw).map_err(|_| ArchiveError::BadPath { path: shown.clone() })?;
        if text.is_empty() || text.contains('\0') {
            return Err(ArchiveError::BadPath { path: shown });
        }
        if text.starts_with('/') {
            return Err(ArchiveError::AbsolutePath { path: shown });
        }
        let mut parts = Vec::new();
        for part in text.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(ArchiveError::ParentDir { path: shown }),
                p => parts.push(p),
            }
        }
        Ok((!parts.is_empty()).then(|| RelPath(parts.join("/"))))
    }

    /// The release's root directory, `.` (only for messages about the root entry itself).
    pub fn root() -> RelPath {
        RelPath(".".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The proper ancestors, nearest last: `a/b/c` → `a`, `a/b`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(i, _)| &self.0[..i])
    }

    /// True when `self` is `prefix` or lies under it.
    pub fn is_within(&self, prefix: &str) -> bool {
        self.0 == prefix || (self.0.starts_with(prefix) && self.0.as_bytes().get(prefix.len()) == Some(&b'/'))
    }

    fn depth_of_parent(&self) -> usize {
        self.0.matches('/').count()
    }
}

/// A symbolic link's target must stay inside the tree: relative, `..` only as leading components
/// (so the climb happens from the link's own real directory, never through another link), and
/// never above the root.
pub fn check_symlink_target(link: &RelPath, target: &[u8]) -> Result<(), ArchiveError> {
    let escapes = || ArchiveError::LinkEscapes {
        path: link.as_str().to_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
    };
    let target = std::str::from_utf8(target).map_err(|_| escapes())?;
    if target.is_empty() {
        return Err(escapes());
    }
    let mut depth = link.depth_of_parent() as isize;
    let mut descended = false;
    for component in Path::new(target).components() {
        match component {
            Component::Normal(_) => descended = true,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 || descended {
                    return Err(escapes());
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(escapes()),
        }
    }
    Ok(())
}

pub fn check_mode(path: &RelPath, mode: u32) -> Result<(), ArchiveError> {
    if mode & 0o6000 != 0 {
        return Err(ArchiveError::Setuid { path: path.as_str().to_owned(), mode });
    }
    Ok(())
}

/// What the entries seen so far imply for the ones that follow.
#[derive(Default)]
pub struct TreeState {
    symlinks: HashSet<String>,
    /// Hashes of regular-file paths, so a hard link can be checked against an earlier file
    /// without keeping every path in memory. A collision could only let a hard link to a
    /// missing file through; the node's unpacker refuses that again.
    files: HashSet<u64>,
    hasher: std::hash::RandomState,
}

impl TreeState {
    /// Refuses a path that lies under an earlier symbolic link.
    pub fn check_not_through_symlink(&self, path: &RelPath) -> Result<(), ArchiveError> {
        if self.symlinks.is_empty() {
            return Ok(());
        }
        match path.ancestors().find(|a| self.symlinks.contains(*a)) {
            Some(link) => Err(ArchiveError::ThroughSymlink { path: path.as_str().to_owned(), link: link.to_owned() }),
            None => Ok(()),
        }
    }

    pub fn add_symlink(&mut self, path: &RelPath) {
        self.symlinks.insert(path.as_str().to_owned());
    }

    pub fn add_file(&mut self, path: &RelPath) {
        self.files.insert(std::hash::BuildHasher::hash_one(&self.hasher, path.as_str()));
    }

    /// Returns the link's (normalized) target: an earlier regular file.
    pub fn check_hardlink(&self, path: &RelPath, target: &[u8]) -> Result<RelPath, ArchiveError> {
        let refused = || ArchiveError::HardlinkTarget {
            path: path.as_str().to_owned(),
            target: String::from_utf8_lossy(target).into_owned(),
        };
        let target = match RelPath::parse(target) {
            Ok(Some(t)) => t,
            Ok(None) => return Err(refused()),
            Err(ArchiveError::AbsolutePath { .. } | ArchiveError::ParentDir { .. }) => {
                return Err(ArchiveError::LinkEscapes {
                    path: path.as_str().to_owned(),
                    target: String::from_utf8_lossy(target).into_owned(),
                });
            }
            Err(_) => return Err(refused()),
        };
        if self.files.contains(&std::hash::BuildHasher::hash_one(&self.hasher, target.as_str())) {
            Ok(target)
        } else {
            Err(refused())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::parse(s.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn paths_are_normalized() {
        assert_eq!(rel("./a//b/./c/").as_str(), "a/b/c");
        assert_eq!(RelPath::parse(b"./").unwrap(), None);
        assert!(matches!(RelPath::parse(b"/etc/passwd"), Err(ArchiveError::AbsolutePath { .. })));
        assert!(matches!(RelPath::parse(b"a/../../b"), Err(ArchiveError::ParentDir { .. })));
        assert!(matches!(RelPath::parse(b"a\xffb"), Err(ArchiveError::BadPath { .. })));
        assert!(matches!(RelPath::parse(b""), Err(ArchiveError::BadPath { .. })));
    }

    #[test]
    fn within_and_ancestors() {
        assert!(rel("storage/logs/x").is_within("storage"));
        assert!(rel("storage").is_within("storage"));
        assert!(!rel("storage2/x").is_within("storage"));
        assert_eq!(rel("a/b/c").ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
    }

    #[test]
    fn symlink_targets() {
        assert!(check_symlink_target(&rel("a/b/link"), b"../c").is_ok());
        assert!(check_symlink_target(&rel("a/link"), b"../c").is_ok());
        assert!(check_symlink_target(&rel("link"), b"../c").is_err());
        assert!(check_symlink_target(&rel("a/link"), b"x/../../../c").is_err());
        // `s/..` climbs from wherever `s` points, which need not be `a/`.
        assert!(check_symlink_target(&rel("a/b/link"), b"s/../x").is_err());
        assert!(check_symlink_target(&rel("link"), b"/etc").is_err());
        assert!(check_symlink_target(&rel("link"), b"").is_err());
    }
}
