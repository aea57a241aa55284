//! Artifact archives: deterministic `tar`+`zstd` packing and streaming safety checks.
//!
//! [`pack`] writes the archive CI uploads, as independent zstd frames ([`frames`]; [`scan`]
//! finds them again in an upload); [`check`] reads one as it streams in and refuses what could
//! never be deployed safely ([`index`] also lists its files with their hashes; [`sent`] keeps
//! the last ones ready to send to nodes); [`rules`] holds the per-entry rules both share (and
//! that the node's unpacker applies again, never trusting the server's check alone).
//!
//! Architecture invariant: this module does no network or database I/O; it works on
//! `std::io::Read`/`Write` and the file system only, so it runs on blocking threads.

mod check;
mod counted;
mod extensions;
mod frames;
#[cfg(test)]
mod frames_tests;
mod index;
#[cfg(test)]
mod index_tests;
mod listing;
mod pack;
mod rules;
mod scan;
mod sent;
mod skeleton;
#[cfg(test)]
mod skeleton_tests;
mod spill;
#[cfg(test)]
pub(crate) mod tests;

pub use check::{
    CheckOptions, Entry, Listing, Summary, Visitor, WalkError, check, index, walk, walk_tar, walk_tar_seeking,
};
pub use frames::{FRAME_TARGET, Frame, MAX_FRAMES, Run, RunsError, runs};
pub use index::{
    FileIndex, INDEX_VERSION, IndexError, IndexedFile, MAX_INDEX_BYTES, OLDEST_INDEX_VERSION, base64_bytes,
};
pub use listing::Indexing;
#[cfg(test)]
use pack::pack_with_workers;
pub use pack::{PackError, Packed, pack_to_file, pack_to_writer};
pub use rules::{
    MAX_DEPTH, MAX_LINK_TARGET_BYTES, MAX_MIGRATION_NAME_BYTES, MAX_MIGRATIONS, MAX_NAME_BYTES, MAX_PATH_BYTES,
    MAX_SYMLINKS, RelPath,
};
pub use scan::FrameScanner;
pub use sent::{MAX_WIRE_BYTES, SentIndex, SentIndexes};
pub use skeleton::Skeleton;

/// The first four bytes of every zstd frame.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Why an archive was refused. Each variant names the entry (or limit) at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("not a zstd stream (an artifact must be a tar archive compressed with zstd)")]
    NotZstd,
    #[error("corrupt zstd stream: {0}")]
    Zstd(String),
    #[error("not a valid tar stream: {0}")]
    Tar(String),
    #[error("the tar stream is truncated: {0}")]
    Truncated(String),
    #[error("entry {path:?}: absolute paths are not allowed")]
    AbsolutePath { path: String },
    #[error("entry {path:?}: `..` components are not allowed")]
    ParentDir { path: String },
    #[error("entry {path:?}: path is empty or not UTF-8")]
    BadPath { path: String },
    #[error(
        "entry {path:?}: link target {target:?} is not inside the archive's tree (relative, `..` only at its start, never above the root)"
    )]
    LinkEscapes { path: String, target: String },
    #[error("entry {path:?}: lies under the symbolic link {link:?}, so it would be written through it")]
    ThroughSymlink { path: String, link: String },
    #[error("entry {path:?}: hard link to {target:?}, which is not a regular file earlier in the archive")]
    HardlinkTarget { path: String, target: String },
    #[error("entry {path:?}: {kind} entries are not allowed")]
    ForbiddenType { path: String, kind: &'static str },
    #[error("entry {path:?}: setuid and setgid bits are not allowed (mode {mode:o})")]
    Setuid { path: String, mode: u32 },
    #[error("entry {path:?}: {shared:?} is kept in the service's shared/ directory, so it must not be in an artifact")]
    SharedPath { path: String, shared: String },
    #[error(
        "the archive holds more than {limit} entries (limits.max_files; directories implied by the entries' paths count too)"
    )]
    TooManyFiles { limit: u64 },
    #[error(
        "entry {path:?}: its path of {bytes} bytes is longer than {limit} bytes (Linux's PATH_MAX): no node could create it"
    )]
    PathTooLong { path: String, bytes: usize, limit: usize },
    #[error(
        "entry {path:?}: the name {name:?} of {bytes} bytes is longer than {limit} bytes (Linux's NAME_MAX): no node could create it"
    )]
    NameTooLong { path: String, name: String, bytes: usize, limit: usize },
    #[error("entry {path:?}: {depth} components deep, more than {limit}")]
    TooDeep { path: String, depth: usize, limit: usize },
    #[error(
        "entry {path:?}: a link target of {bytes} bytes is longer than {limit} bytes (Linux's PATH_MAX): no node could create it"
    )]
    LinkTargetTooLong { path: String, bytes: usize, limit: usize },
    #[error(
        "entry {path:?}: a {kind} where the archive already has a {earlier} of that name: no node could unpack both (\"File exists\")"
    )]
    SamePath { path: String, kind: &'static str, earlier: &'static str },
    #[error(
        "entry {path:?}: lies under {file:?}, a {kind} earlier in the archive, not a directory: no node could unpack it"
    )]
    UnderFile { path: String, file: String, kind: &'static str },
    #[error("the archive holds more than {limit} symbolic links")]
    TooManySymlinks { limit: u64 },
    #[error("the archive holds more than {limit} migration files (database/migrations/*.php)")]
    TooManyMigrations { limit: usize },
    #[error("the archive unpacks to more than {limit} bytes (limits.max_unpacked_bytes)")]
    TooLarge { limit: u64 },
    #[error(
        "the archive unpacks to more than {ratio} times the bytes sent for it once past its first GiB ({unpacked} \
         bytes from its first {sent} compressed bytes): it would cost far more to check than it weighs"
    )]
    TooDense { unpacked: u64, sent: u64, ratio: u64 },
}

impl ArchiveError {
    /// True for the refusals that are about size limits rather than safety.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            ArchiveError::TooManyFiles { .. }
                | ArchiveError::TooLarge { .. }
                | ArchiveError::TooDense { .. }
                | ArchiveError::TooManySymlinks { .. }
                | ArchiveError::TooManyMigrations { .. }
        )
    }
}
