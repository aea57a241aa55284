//! Per-entry safety rules: what path, link and mode an artifact entry may have.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::path::{Component, Path};

use super::ArchiveError;

/// A normalized path inside a release: relative, `/`-separated, no `.`, `..` or empty parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    /// Normalizes an entry path as a tar archive spells it (`./a/b/`, `a//b`), refusing absolute
    /// paths, `..` and non-UTF-8. `Ok(None)` is the archive's root directory itself (`./`).
    pub fn parse(raw: &[u8]) -> Result<Option<RelPath>, ArchiveError> {
        let shown = || String::from_utf8_lossy(raw).into_owned();
        let text = std::str::from_utf8(raw).map_err(|_| ArchiveError::BadPath { path: shown() })?;
        if text.is_empty() || text.contains('\0') {
            return Err(ArchiveError::BadPath { path: shown() });
        }
        if text.starts_with('/') {
            return Err(ArchiveError::AbsolutePath { path: shown() });
        }
        // Nearly every path is in its normal form already (no empty or `.` part): taken as it
        // is, one copy (this ran for every entry a node unpacks).
        let mut normal = true;
        for part in text.split('/') {
            match part {
                "" | "." => normal = false,
                ".." => return Err(ArchiveError::ParentDir { path: shown() }),
                _ => {}
            }
        }
        if normal {
            return Ok(Some(RelPath(text.to_owned())));
        }
        let parts: Vec<&str> = text.split('/').filter(|part| !matches!(*part, "" | ".")).collect();
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

/// The longest path an entry may have, in bytes: Linux's `PATH_MAX` is 4,096 with the
/// terminating NUL. A node joins it to its release directory, so in practice a path near this
/// deploys only under a short base (the unpacker then fails cleanly, leaving nothing).
pub const MAX_PATH_BYTES: usize = 4095;

/// The longest name (one component of a path), in bytes: Linux's `NAME_MAX`, what ext4, xfs
/// and btrfs hold.
pub const MAX_NAME_BYTES: usize = 255;

/// The most components a path may have. Deeper than any real application tree, and it keeps
/// the per-entry work of the ancestor check small.
pub const MAX_DEPTH: usize = 256;

/// The longest symbolic-link target, in bytes: `symlink(2)` refuses one of `PATH_MAX` or more.
pub const MAX_LINK_TARGET_BYTES: usize = 4095;

/// The most symbolic links an archive may hold: a real tree has a handful; this bounds what
/// the check and the node's unpacker do for them.
pub const MAX_SYMLINKS: u64 = 100_000;

/// The most migration files (`database/migrations/*.php`) an archive may hold: their names
/// are kept in the artifact's registry row and compared at every rollback.
pub const MAX_MIGRATIONS: usize = 10_000;

/// The longest migration file name, in bytes: a name is one component, so
/// [`MAX_NAME_BYTES`] bounds it (and Laravel's `migrations` table holds 255 characters).
/// 10,000 names of this length keep a registry row under 2.6 MB.
pub const MAX_MIGRATION_NAME_BYTES: usize = MAX_NAME_BYTES;

/// Where a path is shown in a refusal, its first [`SHOWN_CHARS`] characters and `…`.
const SHOWN_CHARS: usize = 100;

/// A path (or link target) as a refusal shows it: cut to a readable length.
pub fn shown(path: &str) -> String {
    match path.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &path[..cut]),
        None => path.to_owned(),
    }
}

/// Refuses a path no Linux node could create: longer than [`MAX_PATH_BYTES`], a name longer
/// than [`MAX_NAME_BYTES`], more than [`MAX_DEPTH`] components.
pub fn check_path_limits(path: &RelPath) -> Result<(), ArchiveError> {
    let text = path.as_str();
    if text.len() > MAX_PATH_BYTES {
        return Err(ArchiveError::PathTooLong { path: shown(text), bytes: text.len(), limit: MAX_PATH_BYTES });
    }
    let mut depth = 0;
    for name in text.split('/') {
        depth += 1;
        if name.len() > MAX_NAME_BYTES {
            return Err(ArchiveError::NameTooLong {
                path: shown(text),
                name: shown(name),
                bytes: name.len(),
                limit: MAX_NAME_BYTES,
            });
        }
    }
    if depth > MAX_DEPTH {
        return Err(ArchiveError::TooDeep { path: shown(text), depth, limit: MAX_DEPTH });
    }
    Ok(())
}

/// Refuses a symbolic-link target `symlink(2)` would not take.
pub fn check_link_target_limits(link: &RelPath, target: &[u8]) -> Result<(), ArchiveError> {
    if target.len() > MAX_LINK_TARGET_BYTES {
        return Err(ArchiveError::LinkTargetTooLong {
            path: shown(link.as_str()),
            bytes: target.len(),
            limit: MAX_LINK_TARGET_BYTES,
        });
    }
    Ok(())
}

/// The name of a migration file, when `path` is one (`database/migrations/<name>.php`).
pub fn migration_name(path: &RelPath) -> Option<&str> {
    path.as_str().strip_prefix("database/migrations/").filter(|name| !name.contains('/') && name.ends_with(".php"))
}

/// What a path is in the tree the entries so far make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory entry, or a directory an entry's path implies (a node makes it).
    Directory,
    File,
    Hardlink,
    Symlink,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Directory => "directory",
            Kind::File => "file",
            Kind::Hardlink => "hard link",
            Kind::Symlink => "symbolic link",
        }
    }
}

/// A path's 128-bit keyed hash: two SipHash-1-3 hashes under two random keys (std's
/// `RandomState`, seeded from the OS). Paths
/// are known by these instead of kept whole, so the tree costs the same per entry whatever
/// the names' length. A collision (odds ~2⁻¹²⁸ per pair, keys unknown to the archive's author)
/// could only make a refusal of a sound archive or let a conflict through to the node's
/// unpacker, which refuses it again (it never overwrites).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key(u64, u64);

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

/// The hasher of the tree's map: a [`Key`] is a keyed hash already, so its first half is used
/// as it is instead of being hashed again.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What the entries seen so far imply for the ones that follow: every path an entry named or
/// implied, with its [`Kind`], known by its [`Key`].
pub struct TreeState {
    paths: HashMap<Key, Kind, BuildHasherDefault<KeyHasher>>,
    symlinks: u64,
    /// At most this many paths (entries and the directories they imply): `limits.max_files`.
    max_paths: u64,
    keys: [RandomState; 2],
    /// The keys of the current entry's proper ancestors, shallowest first (kept between
    /// entries to spare an allocation each).
    ancestors: Vec<(Key, usize)>,
}

impl TreeState {
    /// At most `max_paths` paths, with room for `expected` of them at once (never more than
    /// `max_paths`).
    pub fn with_capacity(max_paths: u64, expected: usize) -> TreeState {
        let room = expected.min(usize::try_from(max_paths).unwrap_or(usize::MAX));
        TreeState {
            paths: HashMap::with_capacity_and_hasher(room, BuildHasherDefault::default()),
            symlinks: 0,
            max_paths,
            keys: [RandomState::new(), RandomState::new()],
            ancestors: Vec::new(),
        }
    }

    fn key(&self, path: &str) -> Key {
        let (mut a, mut b) = (self.keys[0].build_hasher(), self.keys[1].build_hasher());
        a.write(path.as_bytes());
        b.write(path.as_bytes());
        Key(a.finish(), b.finish())
    }

    /// Adds an entry of `kind` at `path`, refusing what a node could not make: a path under an
    /// earlier symbolic link (it would be written through it) or under an earlier file, a path
    /// an earlier entry (or an implied directory) already holds — except a directory named
    /// again as a directory, which is harmless — and more than [`MAX_SYMLINKS`] links.
    ///
    /// Ancestors are checked in one pass over the path: its bytes are hashed once, each
    /// ancestor's key taken from the running state, and the walk back from the parent stops
    /// at the first known directory (its own ancestors were checked when it was added).
    pub fn add(&mut self, path: &RelPath, kind: Kind) -> Result<(), ArchiveError> {
        let text = path.as_str();
        let (mut a, mut b) = (self.keys[0].build_hasher(), self.keys[1].build_hasher());
        let mut ancestors = std::mem::take(&mut self.ancestors);
        ancestors.clear();
        let mut start = 0;
        for (end, _) in text.match_indices('/') {
            a.write(&text.as_bytes()[start..end]);
            b.write(&text.as_bytes()[start..end]);
            ancestors.push((Key(a.clone().finish(), b.clone().finish()), end));
            start = end;
        }
        a.write(&text.as_bytes()[start..]);
        b.write(&text.as_bytes()[start..]);
        let key = Key(a.finish(), b.finish());
        let checked = self.add_checked(text, key, kind, &ancestors);
        self.ancestors = ancestors;
        checked
    }

    fn add_checked(
        &mut self,
        text: &str,
        key: Key,
        kind: Kind,
        ancestors: &[(Key, usize)],
    ) -> Result<(), ArchiveError> {
        // The deepest known ancestor; below it, every ancestor is new and becomes a directory.
        let mut known = 0;
        for (i, (ancestor, end)) in ancestors.iter().enumerate().rev() {
            match self.paths.get(ancestor) {
                None => continue,
                Some(Kind::Directory) => {}
                Some(Kind::Symlink) => {
                    return Err(ArchiveError::ThroughSymlink { path: shown(text), link: shown(&text[..*end]) });
                }
                Some(earlier) => {
                    return Err(ArchiveError::UnderFile {
                        path: shown(text),
                        file: shown(&text[..*end]),
                        kind: earlier.name(),
                    });
                }
            }
            known = i + 1;
            break;
        }
        match (self.paths.get(&key), kind) {
            (None, _) => {}
            (Some(Kind::Directory), Kind::Directory) => return Ok(()),
            (Some(earlier), _) => {
                return Err(ArchiveError::SamePath { path: shown(text), kind: kind.name(), earlier: earlier.name() });
            }
        }
        if kind == Kind::Symlink {
            self.symlinks += 1;
            if self.symlinks > MAX_SYMLINKS {
                return Err(ArchiveError::TooManySymlinks { limit: MAX_SYMLINKS });
            }
        }
        let new = (ancestors.len() - known) as u64 + 1;
        if self.paths.len() as u64 + new > self.max_paths {
            return Err(ArchiveError::TooManyFiles { limit: self.max_paths });
        }
        for (ancestor, _) in &ancestors[known..] {
            self.paths.insert(*ancestor, Kind::Directory);
        }
        self.paths.insert(key, kind);
        Ok(())
    }

    /// Returns the link's (normalized) target: an earlier regular file.
    pub fn check_hardlink(&self, path: &RelPath, target: &[u8]) -> Result<RelPath, ArchiveError> {
        let refused = || ArchiveError::HardlinkTarget {
            path: shown(path.as_str()),
            target: shown(&String::from_utf8_lossy(target)),
        };
        let target = match RelPath::parse(target) {
            Ok(Some(t)) => t,
            Ok(None) => return Err(refused()),
            Err(ArchiveError::AbsolutePath { .. } | ArchiveError::ParentDir { .. }) => {
                return Err(ArchiveError::LinkEscapes {
                    path: shown(path.as_str()),
                    target: shown(&String::from_utf8_lossy(target)),
                });
            }
            Err(_) => return Err(refused()),
        };
        if self.paths.get(&self.key(target.as_str())) == Some(&Kind::File) { Ok(target) } else { Err(refused()) }
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
        assert!(matches!(RelPath::parse(b"a/\0b"), Err(ArchiveError::BadPath { .. })));
        // Every spelling of a few parts: the normal form taken as it is, any other one
        // normalized to the same path (or refused for `..` anywhere).
        let parts = ["a", "b.php", ".", "", "..", "...", ".env"];
        for x in parts {
            for y in parts {
                for z in parts {
                    let text = format!("{x}/{y}/{z}");
                    let kept: Vec<&str> = [x, y, z].into_iter().filter(|p| !matches!(*p, "" | ".")).collect();
                    match RelPath::parse(text.as_bytes()) {
                        Err(ArchiveError::AbsolutePath { .. }) if x.is_empty() => {}
                        Err(ArchiveError::ParentDir { .. }) if [x, y, z].contains(&"..") => {}
                        Ok(parsed) if !x.is_empty() && ![x, y, z].contains(&"..") => {
                            assert_eq!(parsed.map(|p| p.0), (!kept.is_empty()).then(|| kept.join("/")), "{text}")
                        }
                        other => panic!("{text}: {other:?}"),
                    }
                }
            }
        }
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
