//! The node's unpacker (`release::node::unpack`) on any archive, into a fresh directory: it
//! writes nothing outside that directory, leaves nothing when it refuses, and refuses
//! exactly what the ingest check refuses (the same refusal), save for I/O errors.
#![no_main]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use release::archive::check;
use release::digest::Digest;
use release::node::{Modes, UnpackError, remove_tree, unpack};
use release_fuzz::{archive_bytes, options, same_refusal};

/// tmpfs when there is one: the unpacker's syncfs is then free.
static SCRATCH: LazyLock<PathBuf> = LazyLock::new(|| {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() }
});

fuzz_target!(|data: &[u8]| {
    let bytes = archive_bytes(data);
    let options = options();
    // root/sentinel and root/a/b/release: an escape by `..` or through a link lands in root.
    let root = tempfile::Builder::new().prefix("release-fuzz-").tempdir_in(&*SCRATCH).expect("scratch dir");
    fs::write(root.path().join("sentinel"), b"untouched").unwrap();
    fs::create_dir_all(root.path().join("a/b")).unwrap();
    let dest = root.path().join("a/b/release");

    let checked = check(&bytes[..], &options);
    let unpacked = unpack(&bytes[..], &dest, &options, Digest::of(&bytes), Modes::Writable);
    match (&checked, &unpacked) {
        (Ok(summary), Ok(unpacked)) => {
            assert_eq!(summary, &unpacked.summary);
            every_link_stays_inside(&dest);
        }
        (Err(refused), Err(UnpackError::Unsafe(also))) => {
            assert!(same_refusal(refused, also), "{refused:?} / {also:?}")
        }
        (_, Err(UnpackError::Write { source, .. })) if tolerated(source) => {}
        _ => panic!("the check says {checked:?}, the unpacker {unpacked:?}"),
    }
    if unpacked.is_err() {
        assert!(!dest.exists(), "a refused unpack left {}", dest.display());
    }
    // Nothing but what was there and the release.
    assert_eq!(fs::read(root.path().join("sentinel")).unwrap(), b"untouched");
    assert_eq!(names(root.path()), ["a", "sentinel"]);
    assert_eq!(names(&root.path().join("a")), ["b"]);
    let expected: &[&str] = if unpacked.is_ok() { &["release"] } else { &[] };
    assert_eq!(names(&root.path().join("a/b")), expected);
    remove_tree(&dest).unwrap();
});

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Every symbolic link in the tree resolves (if it resolves at all) inside it.
fn every_link_stays_inside(dest: &Path) {
    let top = fs::canonicalize(dest).unwrap();
    let mut stack = vec![dest.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_symlink()
                && let Ok(resolved) = fs::canonicalize(entry.path())
            {
                assert!(
                    resolved.starts_with(&top),
                    "{} points outside: {}",
                    entry.path().display(),
                    resolved.display()
                );
            }
        }
    }
}

/// Write errors that are the machine's, not the archive's; and, until the checker refuses
/// them (issue 10 items 4 and 5, a change of `archive::check` landing on its own), the ones
/// that archives with a path twice or a name too long for Linux give.
fn tolerated(error: &io::Error) -> bool {
    match error.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE | libc::ENOMEM) => true,
        Some(libc::EEXIST | libc::ENOTDIR) => !*REFUSES_DUPLICATES,
        Some(libc::ENAMETOOLONG) => !*REFUSES_LONG_NAMES,
        _ => false,
    }
}

/// Whether the checker refuses the same path twice (asked of it, once).
static REFUSES_DUPLICATES: LazyLock<bool> = LazyLock::new(|| {
    let tar = tar_of(&[("a", b'0'), ("a", b'0')]);
    check(&archive_bytes(&tar)[..], &options()).is_err()
});

/// Whether the checker refuses a name of 256 bytes (asked of it, once).
static REFUSES_LONG_NAMES: LazyLock<bool> = LazyLock::new(|| {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o644);
    builder.append_data(&mut header, "n".repeat(256), io::empty()).unwrap();
    check(&archive_bytes(&builder.into_inner().unwrap())[..], &options()).is_err()
});

/// A tar stream of empty entries (path, type flag).
fn tar_of(entries: &[(&str, u8)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::new(*kind));
        header.set_size(0);
        header.set_mode(0o644);
        builder.append_data(&mut header, path, io::empty()).unwrap();
    }
    builder.into_inner().unwrap()
}
