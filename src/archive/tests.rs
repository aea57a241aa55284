//! Packing and checking archives: determinism, every refusal of the ingest rules, and the
//! streaming walk.
//!
//! Long on purpose: one set of hand-made tars serves every rule of the pack, the check and
//! the index.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use super::*;

fn options() -> CheckOptions {
    CheckOptions { max_unpacked_bytes: 1 << 30, max_files: 1000, shared: vec![], record_migrations: true }
}

/// Bytes that do not compress, the same for the same seed.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn pack_bytes(dir: &Path) -> (Packed, Vec<u8>) {
    pack_to_writer(dir, &[], Vec::new(), &mut |_| {}).unwrap()
}

fn write(path: &Path, content: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn sample_tree(root: &Path, reverse: bool) {
    let mut files = vec![
        ("app/Http/Kernel.php", "<?php // kernel"),
        ("database/migrations/2024_01_01_000000_create_users.php", "<?php // users"),
        ("database/migrations/2024_02_01_000000_create_posts.php", "<?php // posts"),
        ("public/index.php", "<?php echo 'hi';"),
        ("artisan", "#!/usr/bin/env php"),
    ];
    if reverse {
        files.reverse();
    }
    for (path, content) in files {
        write(&root.join(path), content);
    }
    fs::create_dir_all(root.join("storage/empty")).unwrap();
    fs::set_permissions(root.join("artisan"), fs::Permissions::from_mode(0o700)).unwrap();
    symlink("../public/index.php", root.join("app/entry.php")).unwrap();
}

#[test]
fn packing_passes_its_own_check_and_records_migrations() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(dir.path(), false);
    let (packed, bytes) = pack_bytes(dir.path());
    assert_eq!(packed.digest, crate::digest::Digest::of(&bytes));
    assert_eq!(packed.size, bytes.len() as u64);
    let summary = check(&bytes[..], &options()).unwrap();
    assert_eq!(summary.file_count, packed.file_count);
    assert_eq!(summary.file_count, 13);
    assert_eq!(summary.migrations, ["2024_01_01_000000_create_users.php", "2024_02_01_000000_create_posts.php"]);
}

#[test]
fn executable_bit_changes_the_digest_but_other_mode_bits_do_not() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(dir.path(), false);
    let before = pack_bytes(dir.path()).0.digest;
    fs::set_permissions(dir.path().join("artisan"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.path().join("public/index.php"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(pack_bytes(dir.path()).0.digest, before);
    fs::set_permissions(dir.path().join("artisan"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_ne!(pack_bytes(dir.path()).0.digest, before);
}

#[test]
fn the_worker_count_does_not_change_the_bytes() {
    // The packer's output must not depend on how many cores packed it.
    let dir = tempfile::tempdir().unwrap();
    let mut big = String::new();
    for i in 0..400_000 {
        big.push_str(&format!("line {i} of a file large enough to span many frames\n"));
    }
    write(&dir.path().join("big.txt"), &big);
    sample_tree(dir.path(), false);
    let with = |workers| pack_with_workers(dir.path(), &[], Vec::new(), &mut |_| {}, workers).unwrap();
    let (one, one_bytes) = with(1);
    let (four, four_bytes) = with(4);
    assert!(big.len() > 16 << 20, "input for many frames and several in flight on each thread");
    assert_eq!(one.digest, four.digest);
    assert_eq!(one_bytes, four_bytes);
}

#[test]
fn exclude_skips_paths_and_what_lies_under_them() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(dir.path(), false);
    write(&dir.path().join(".env"), "APP_KEY=secret");
    let excluded = pack_to_writer(dir.path(), &[".env".into(), "storage".into()], Vec::new(), &mut |_| {}).unwrap().1;
    let options = CheckOptions { shared: vec![".env".into(), "storage".into()], ..options() };
    check(&excluded[..], &options).unwrap();
    let (_, everything) = pack_bytes(dir.path());
    let err = check(&everything[..], &options).unwrap_err();
    assert_eq!(err, ArchiveError::SharedPath { path: ".env".into(), shared: ".env".into() });
}

#[test]
fn packing_refuses_what_cannot_be_deployed() {
    let dir = tempfile::tempdir().unwrap();
    symlink("/etc/passwd", dir.path().join("abs")).unwrap();
    assert!(matches!(pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}), Err(PackError::LinkEscapes { .. })));

    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("a")).unwrap();
    symlink("../../x", dir.path().join("a/up")).unwrap();
    assert!(matches!(pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}), Err(PackError::LinkEscapes { .. })));

    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o644), 0)
        .unwrap();
    let err = pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("a fifo cannot be deployed"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
    let err = pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("a socket cannot be deployed"), "{err}");
}

#[test]
fn pack_to_file_refuses_an_output_inside_the_tree_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(dir.path(), false);
    let inside = dir.path().join("out.tar.zst");
    let err = pack_to_file(dir.path(), &[], &inside, &mut |_| {}).unwrap_err();
    assert!(matches!(err, PackError::OutputInsideTree { .. }), "{err}");
    assert!(!inside.exists());
}

fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    build(&mut builder);
    builder.into_inner().unwrap()
}

fn zstd_of(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

fn file_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    builder.append_data(&mut header, path, data).unwrap();
}

#[test]
fn the_end_of_archive_marker_is_required() {
    let tar = tar_of(|b| file_entry(b, "a.txt", b"hello"));
    check(&zstd_of(&tar)[..], &options()).unwrap();
    // Cut at the entry boundary: a valid prefix of entries, but no marker.
    let cut = &tar[..1024];
    let err = check(&zstd_of(cut)[..], &options()).unwrap_err();
    assert!(matches!(err, ArchiveError::Truncated(_)), "{err}");
    // Cut inside the file's data.
    let err = check(&zstd_of(&tar[..600])[..], &options()).unwrap_err();
    assert!(matches!(err, ArchiveError::Truncated(_)), "{err}");
}

#[test]
fn data_after_the_end_marker_is_refused() {
    let mut tar = tar_of(|b| file_entry(b, "a.txt", b"hello"));
    tar.extend_from_slice(&[7u8; 512]);
    let err = check(&zstd_of(&tar)[..], &options()).unwrap_err();
    assert!(matches!(err, ArchiveError::Tar(_)), "{err}");
}

#[test]
fn limits_stop_the_stream_early() {
    let tar = tar_of(|b| {
        for i in 0..5 {
            file_entry(b, &format!("f{i}"), b"x");
        }
    });
    let compressed = zstd_of(&tar);
    let few = CheckOptions { max_files: 4, ..options() };
    assert_eq!(check(&compressed[..], &few), Err(ArchiveError::TooManyFiles { limit: 4 }));
    let small = CheckOptions { max_unpacked_bytes: 2048, ..options() };
    assert_eq!(check(&compressed[..], &small), Err(ArchiveError::TooLarge { limit: 2048 }));
}

/// A visitor that expects many paths (a node's, from the artifact's index) makes room for them
/// in the walk's record; the limit on paths stays the walk's own.
#[test]
fn room_made_for_the_paths_a_visitor_expects_never_lifts_the_limit() {
    struct Expecting(usize);
    impl Visitor for Expecting {
        fn entry(&mut self, _: Entry<'_>, _: &mut dyn std::io::Read) -> std::io::Result<()> {
            Ok(())
        }
        fn paths_hint(&self) -> usize {
            self.0
        }
    }
    let tar = tar_of(|b| {
        for i in 0..3 {
            file_entry(b, &format!("d{i}/f"), b"x");
        }
    });
    let compressed = zstd_of(&tar);
    // Three files and the three directories they imply: six paths.
    let six = CheckOptions { max_files: 6, ..options() };
    assert!(walk(&compressed[..], &six, &mut Expecting(1_000_000)).is_ok());
    let five = CheckOptions { max_files: 5, ..options() };
    let refused = walk(&compressed[..], &five, &mut Expecting(1_000_000)).unwrap_err();
    assert!(matches!(refused, WalkError::Archive(ArchiveError::TooManyFiles { limit: 5 })), "{refused:?}");
}

#[test]
fn a_truncated_zstd_frame_is_refused() {
    let tar = tar_of(|b| file_entry(b, "a.txt", &vec![1u8; 100_000]));
    let compressed = zstd_of(&tar);
    let err = check(&compressed[..compressed.len() - 10], &options()).unwrap_err();
    assert!(matches!(err, ArchiveError::Truncated(_) | ArchiveError::Zstd(_)), "{err}");
}

#[test]
fn hardlinks_must_point_at_an_earlier_file() {
    let link = |target: &str| {
        tar_of(|b| {
            file_entry(b, "a.txt", b"hello");
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Link);
            header.set_size(0);
            header.set_mode(0o644);
            b.append_link(&mut header, "b.txt", target).unwrap();
        })
    };
    check(&zstd_of(&link("a.txt"))[..], &options()).unwrap();
    let err = check(&zstd_of(&link("c.txt"))[..], &options()).unwrap_err();
    assert!(matches!(err, ArchiveError::HardlinkTarget { .. }), "{err}");
}

#[test]
fn long_names_are_read_but_capped() {
    // A real long name (GNU extension, written by the packer) passes, with its full path.
    let dir = tempfile::tempdir().unwrap();
    let deep = format!("{}/{}", "d".repeat(120), "f".repeat(120));
    write(&dir.path().join(&deep), "x");
    let shared_deep = CheckOptions { shared: vec![deep.clone()], ..options() };
    let (_, bytes) = pack_bytes(dir.path());
    check(&bytes[..], &options()).unwrap();
    // The long name is the one the rules see.
    assert!(matches!(check(&bytes[..], &shared_deep), Err(ArchiveError::SharedPath { path, .. }) if path == deep));

    // A long-name entry of 1 MiB is refused before it is read into memory.
    let mut tar = Vec::new();
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNULongName);
    header.set_path("././@LongLink").unwrap();
    header.set_size(1 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    tar.extend_from_slice(header.as_bytes());
    tar.extend(std::iter::repeat_n(b'a', 1 << 20));
    let mut file = tar::Header::new_gnu();
    file.set_path("short").unwrap();
    file.set_size(0);
    file.set_mode(0o644);
    file.set_cksum();
    tar.extend_from_slice(file.as_bytes());
    tar.extend_from_slice(&[0u8; 1024]);
    let err = check(&zstd_of(&tar)[..], &options()).unwrap_err();
    assert!(err.to_string().contains("long-name or PAX header of 1048576 bytes"), "{err}");
}

#[test]
fn pax_paths_are_checked_like_any_other() {
    let mut builder = tar::Builder::new(Vec::new());
    // A PAX header naming an absolute path for the entry that follows.
    builder.append_pax_extensions([("path", b"/etc/passwd".as_slice())]).unwrap();
    file_entry(&mut builder, "harmless", b"x");
    let tar = builder.into_inner().unwrap();
    let err = check(&zstd_of(&tar)[..], &options()).unwrap_err();
    assert!(matches!(err, ArchiveError::AbsolutePath { ref path } if path == "/etc/passwd"), "{err}");
}

#[test]
fn a_setuid_root_directory_is_refused() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    header.set_mode(0o4755);
    builder.append_data(&mut header, "./", std::io::empty()).unwrap();
    let tar = builder.into_inner().unwrap();
    let err = check(&zstd_of(&tar)[..], &options()).unwrap_err();
    assert!(matches!(err, ArchiveError::Setuid { .. }), "{err}");
}

#[test]
fn a_window_beyond_32_mib_is_refused_with_a_hint() {
    let tar = tar_of(|b| file_entry(b, "a.txt", &vec![7u8; 100_000]));
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    encoder.long_distance_matching(true).unwrap();
    encoder.window_log(27).unwrap();
    encoder.write_all(&tar).unwrap();
    let compressed = encoder.finish().unwrap();
    let err = check(&compressed[..], &options()).unwrap_err();
    assert!(err.to_string().contains("compress without --long"), "{err}");
}

fn dir_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    header.set_mode(0o755);
    builder.append_data(&mut header, path, std::io::empty()).unwrap();
}

fn symlink_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    builder.append_link(&mut header, path, target).unwrap();
}

fn hardlink_entry(builder: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Link);
    header.set_size(0);
    header.set_mode(0o644);
    builder.append_link(&mut header, path, target).unwrap();
}

fn checked(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Result<Summary, ArchiveError> {
    check(&zstd_of(&tar_of(build))[..], &options())
}

#[test]
fn paths_up_to_linux_limits_pass_and_one_byte_more_is_refused() {
    // 16 names of 255 bytes: a path of exactly 4,095 bytes.
    let longest = vec!["n".repeat(255); 16].join("/");
    assert_eq!(longest.len(), MAX_PATH_BYTES);
    checked(|b| file_entry(b, &longest, b"x")).unwrap();
    let err = checked(|b| file_entry(b, &format!("a/{}", "n".repeat(256)), b"x")).unwrap_err();
    assert!(matches!(err, ArchiveError::NameTooLong { bytes: 256, limit: 255, .. }), "{err}");
    let err = checked(|b| file_entry(b, &format!("{longest}/x"), b"x")).unwrap_err();
    assert!(matches!(err, ArchiveError::PathTooLong { bytes: 4097, limit: 4095, .. }), "{err}");
    assert!(err.to_string().contains("longer than 4095 bytes"), "{err}");

    let deepest = vec!["d"; MAX_DEPTH].join("/");
    checked(|b| file_entry(b, &deepest, b"x")).unwrap();
    let err = checked(|b| file_entry(b, &format!("{deepest}/d"), b"x")).unwrap_err();
    assert!(matches!(err, ArchiveError::TooDeep { depth: 257, limit: 256, .. }), "{err}");
}

#[test]
fn a_refusal_shows_a_long_path_cut() {
    let deep = "a/".repeat(29_999) + "f";
    let err = checked(|b| file_entry(b, &deep, b"x")).unwrap_err();
    let message = err.to_string();
    assert!(message.len() < 300, "{message}");
    assert!(message.contains(&format!("{}…", &deep[..100])), "{message}");
}

#[test]
fn twenty_paths_thirty_thousand_deep_under_a_link_are_refused_at_the_first() {
    // Once every ancestor of every path was hashed against the links: quadratic in the depth.
    let tar = tar_of(|b| {
        symlink_entry(b, "link", "target");
        for i in 0..20 {
            file_entry(b, &format!("{}f{i}", "a/".repeat(29_999)), b"x");
        }
    });
    let err = check(&zstd_of(&tar)[..], &options()).unwrap_err();
    assert!(matches!(err, ArchiveError::PathTooLong { bytes: 60_000, .. }), "{err}");
}

#[test]
fn link_targets_are_bounded_by_path_max() {
    let longest = "t/".repeat(2047) + "t";
    assert_eq!(longest.len(), MAX_LINK_TARGET_BYTES);
    checked(|b| symlink_entry(b, "link", &longest)).unwrap();
    let err = checked(|b| symlink_entry(b, "link", &format!("{longest}t"))).unwrap_err();
    assert!(matches!(err, ArchiveError::LinkTargetTooLong { bytes: 4096, limit: 4095, .. }), "{err}");
}

#[test]
fn symlinks_are_counted() {
    let links = |n: u64| {
        tar_of(|b| {
            for i in 0..n {
                symlink_entry(b, &format!("l{i}"), "t");
            }
        })
    };
    let many = CheckOptions { max_files: 200_000, ..options() };
    check(&zstd_of(&links(MAX_SYMLINKS))[..], &many).unwrap();
    let err = check(&zstd_of(&links(MAX_SYMLINKS + 1))[..], &many).unwrap_err();
    assert_eq!(err, ArchiveError::TooManySymlinks { limit: MAX_SYMLINKS });
    assert!(err.is_limit());
}

#[test]
fn migrations_are_counted_when_recorded() {
    let tar = tar_of(|b| {
        for i in 0..=MAX_MIGRATIONS {
            file_entry(b, &format!("database/migrations/{i:05}_m.php"), b"");
        }
    });
    let many = CheckOptions { max_files: 20_000, ..options() };
    let err = check(&zstd_of(&tar)[..], &many).unwrap_err();
    assert_eq!(err, ArchiveError::TooManyMigrations { limit: MAX_MIGRATIONS });
    // Not a Laravel service: the names are not kept, so not counted.
    check(&zstd_of(&tar)[..], &CheckOptions { record_migrations: false, ..many }).unwrap();
    // A name is one component: NAME_MAX bounds it.
    let err = checked(|b| {
        file_entry(b, &format!("database/migrations/{}.php", "m".repeat(MAX_MIGRATION_NAME_BYTES - 3)), b"")
    })
    .unwrap_err();
    assert!(matches!(err, ArchiveError::NameTooLong { .. }), "{err}");
}

#[test]
fn paths_no_node_could_unpack_are_refused_naming_the_path() {
    let same = |build: fn(&mut tar::Builder<Vec<u8>>), path: &str, kind: &str, earlier: &str| {
        let err = checked(build).unwrap_err();
        match &err {
            ArchiveError::SamePath { path: p, kind: k, earlier: e } => {
                assert_eq!((p.as_str(), *k, *e), (path, kind, earlier))
            }
            _ => panic!("{path}: {err}"),
        }
        assert!(err.to_string().contains(&format!("{path:?}")), "{err}");
    };
    same(|b| (file_entry(b, "a.txt", b"1"), file_entry(b, "a.txt", b"2")).1, "a.txt", "file", "file");
    same(|b| (file_entry(b, "public", b"1"), dir_entry(b, "public/")).1, "public", "directory", "file");
    same(|b| (dir_entry(b, "public"), file_entry(b, "public", b"1")).1, "public", "file", "directory");
    same(|b| (symlink_entry(b, "current", "a"), dir_entry(b, "current")).1, "current", "directory", "symbolic link");
    same(|b| (file_entry(b, "a", b"1"), symlink_entry(b, "a", "b")).1, "a", "symbolic link", "file");
    // A directory the path of an earlier entry implies (the node makes it) is one too.
    same(|b| (file_entry(b, "a/b/c", b"1"), file_entry(b, "a/b", b"2")).1, "a/b", "file", "directory");
    same(
        |b| (file_entry(b, "a", b"1"), hardlink_entry(b, "b", "a"), file_entry(b, "b", b"2")).2,
        "b",
        "file",
        "hard link",
    );

    let err = checked(|b| {
        file_entry(b, "config", b"1");
        file_entry(b, "config/app.php", b"2");
    })
    .unwrap_err();
    assert_eq!(err, ArchiveError::UnderFile { path: "config/app.php".into(), file: "config".into(), kind: "file" });
    let err = checked(|b| {
        file_entry(b, "a", b"1");
        hardlink_entry(b, "l", "a");
        dir_entry(b, "l/d/e");
    })
    .unwrap_err();
    assert_eq!(err, ArchiveError::UnderFile { path: "l/d/e".into(), file: "l".into(), kind: "hard link" });
    let err = checked(|b| {
        symlink_entry(b, "a/b/link", "../c");
        file_entry(b, "a/b/link/x/y", b"1");
    })
    .unwrap_err();
    assert_eq!(err, ArchiveError::ThroughSymlink { path: "a/b/link/x/y".into(), link: "a/b/link".into() });
}

#[test]
fn a_directory_named_again_as_a_directory_is_accepted() {
    // GNU tar writes a directory twice when it is named twice; a node makes it once.
    let summary = checked(|b| {
        dir_entry(b, "public");
        file_entry(b, "public/css/app.css", b"x");
        dir_entry(b, "public");
        dir_entry(b, "public/css");
        hardlink_entry(b, "public/copy.css", "public/css/app.css");
    })
    .unwrap();
    assert_eq!(summary.file_count, 5);
}

#[test]
fn implied_directories_count_against_max_files() {
    let few = CheckOptions { max_files: 4, ..options() };
    check(&zstd_of(&tar_of(|b| file_entry(b, "a/b/c", b"x")))[..], &few).unwrap();
    let err = check(&zstd_of(&tar_of(|b| file_entry(b, "a/b/c/d/e", b"x")))[..], &few).unwrap_err();
    assert_eq!(err, ArchiveError::TooManyFiles { limit: 4 });
}

#[test]
fn packing_refuses_a_tree_past_the_limits() {
    // Deeper than MAX_DEPTH: refused before it is read, naming the path.
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join(vec!["d"; MAX_DEPTH + 1].join("/"));
    fs::create_dir_all(&deep).unwrap();
    // The packer recurses once per level: 256 unoptimized frames need more than a test
    // thread's 2 MiB (the CLI runs it on the main thread, 8 MiB).
    let packing = std::thread::Builder::new().stack_size(16 << 20);
    let root = dir.path().to_owned();
    let packed = packing.spawn(move || pack_to_writer(&root, &[], Vec::new(), &mut |_| {}).map(|_| ())).unwrap();
    let err = packed.join().unwrap().unwrap_err();
    assert!(matches!(err, PackError::Undeployable { source: ArchiveError::TooDeep { .. }, .. }), "{err}");
    assert!(err.to_string().contains("257 components deep, more than 256"), "{err}");

    // A path over PATH_MAX, made relative to a directory handle (the kernel takes no longer
    // path): refused before the packer asks the file system about it.
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join(vec!["p".repeat(250); 16].join("/"));
    fs::create_dir_all(&parent).unwrap();
    let handle = fs::File::open(&parent).unwrap();
    // Relative to the directory's descriptor: the whole path is longer than PATH_MAX.
    let flags = rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY;
    drop(rustix::fs::openat(&handle, "f".repeat(100), flags, rustix::fs::Mode::from_raw_mode(0o644)).unwrap());
    let err = pack_to_writer(dir.path(), &[], Vec::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, PackError::Undeployable { source: ArchiveError::PathTooLong { .. }, .. }), "{err}");
    assert!(err.to_string().contains("could never be deployed: entry \"pppp"), "{err}");
    assert!(err.to_string().len() < 400, "{err}");
}

#[test]
fn the_index_lists_every_regular_file_with_its_hash_mode_and_place_in_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(dir.path(), false);
    let (packed, bytes) = pack_bytes(dir.path());
    let crate::archive::Listing { summary, files, .. } = index(&bytes[..], &options()).unwrap();
    assert_eq!(summary, check(&bytes[..], &options()).unwrap(), "indexing checks exactly as the check does");
    let files = files.expect("a small tree's index is made");
    let tar = zstd::decode_all(&bytes[..]).unwrap();
    let mut listed: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    listed.sort();
    // Directories and the symbolic link are not listed.
    assert_eq!(
        listed,
        [
            "app/Http/Kernel.php",
            "artisan",
            "database/migrations/2024_01_01_000000_create_users.php",
            "database/migrations/2024_02_01_000000_create_posts.php",
            "public/index.php",
        ]
    );
    for file in &files {
        let content = fs::read(dir.path().join(&file.path)).unwrap();
        assert_eq!(file.size, content.len() as u64, "{}", file.path);
        assert_eq!(file.sha256, crate::digest::Digest::of(&content), "{}", file.path);
        let at = file.offset as usize;
        assert_eq!(&tar[at..at + content.len()], &content[..], "{}: its data is at its offset", file.path);
        assert_eq!(file.executable, file.path == "artisan", "{}", file.path);
    }

    let stored = FileIndex::new(packed.digest, files.clone());
    let encoded = stored.encode();
    assert_eq!(encoded, FileIndex::new(packed.digest, files).encode(), "the same index, the same bytes");
    assert_eq!(FileIndex::decode(&encoded, packed.digest).unwrap(), stored);
}

#[test]
fn a_stored_index_of_another_artifact_format_or_shape_is_refused() {
    let (a, b) = (crate::digest::Digest::of(b"a"), crate::digest::Digest::of(b"b"));
    let index = FileIndex::new(a, vec![]);
    let refusal = FileIndex::decode(&index.encode(), b).unwrap_err().to_string();
    assert!(refusal.contains(&format!("describes {a}, not {b}")), "{refusal}");

    let mut later = index.clone();
    later.version = INDEX_VERSION + 1;
    let refusal = FileIndex::decode(&later.encode(), a).unwrap_err().to_string();
    assert!(
        refusal.contains(&format!("of format {}; this build reads formats 2 to {INDEX_VERSION}", INDEX_VERSION + 1))
    );
    let mut first = index.clone();
    first.version = 1;
    let refusal = FileIndex::decode(&first.encode(), a).unwrap_err().to_string();
    assert!(refusal.contains("of format 1; this build reads formats 2 to"), "{refusal}");
    // Format 2: the same without a skeleton.
    let mut second = index.clone();
    second.version = 2;
    assert_eq!(FileIndex::decode(&second.encode(), a).unwrap(), second);

    let refusal = FileIndex::decode(b"not zstd", a).unwrap_err().to_string();
    assert!(refusal.starts_with("the stored index does not decompress"), "{refusal}");
    let refusal =
        FileIndex::decode(&zstd_of(format!(r#"{{"version":{INDEX_VERSION}}}"#).as_bytes()), a).unwrap_err().to_string();
    assert!(refusal.starts_with("the stored index does not read"), "{refusal}");
}

#[test]
fn a_kept_index_reads_back_in_its_compact_form_and_a_cut_or_foreign_one_is_refused() {
    let (a, b) = (crate::digest::Digest::of(b"a"), crate::digest::Digest::of(b"b"));
    let file = |i: u64| IndexedFile {
        path: format!("vendor/ünïcode/p{i}.php"),
        executable: i % 3 == 0,
        size: i * 1000,
        offset: i * 1536 + 512,
        sha256: crate::digest::Digest::of(&i.to_le_bytes()),
    };
    let index = FileIndex::new(a, (0..50).map(file).collect());
    let kept = index.encode_kept();
    assert_eq!(FileIndex::decode_kept(&kept, a).unwrap(), index);
    assert!(kept.len() < index.files.iter().map(|f| f.path.len() + 60).sum::<usize>());
    assert!(matches!(FileIndex::decode_kept(&kept, b), Err(IndexError::OtherArtifact { .. })));
    for cut in [0, 3, 20, 36 + 10, kept.len() - 1] {
        assert!(FileIndex::decode_kept(&kept[..cut], a).is_err(), "cut at {cut}");
    }
    // The zstd JSON form is not the compact one (a node reads both: share.rs).
    assert!(FileIndex::decode_kept(&index.encode(), a).is_err());
    assert!(FileIndex::decode_kept(&FileIndex::new(a, vec![]).encode_kept(), a).unwrap().files.is_empty());
}

/// A `tar`+`zstd` archive of one file of `size` zeros, compressed as it is made.
fn zeros_archive(size: u64) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_path("zeros.bin").unwrap();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    encoder.write_all(header.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = size + (512 - size % 512) % 512 + 1024;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        encoder.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    encoder.finish().unwrap()
}

/// A 534 KiB archive of 15 GiB of zeros took 11 CPU-seconds to check, within the unpacked-size
/// limit (helper-60's attack): past its first GiB an upload unpacks to at most a thousand
/// times what was sent for it.
#[test]
fn an_upload_unpacking_to_a_thousand_times_its_size_past_a_gib_is_refused() {
    use super::counted::{FREE_UNPACKED, MAX_EXPANSION};
    let big = CheckOptions { max_unpacked_bytes: 16 << 30, ..options() };
    let bomb = zeros_archive(FREE_UNPACKED + (64 << 20));
    let refused = index(&bomb[..], &big).unwrap_err();
    assert!(matches!(refused, ArchiveError::TooDense { ratio: MAX_EXPANSION, .. }), "{refused}");
    assert!(refused.is_limit());
    assert!(refused.to_string().contains("more than 1000 times the bytes sent"), "{refused}");
    // Within the first GiB, whatever it weighs; a node's check reads what passed the ingest.
    let within = zeros_archive(512 << 20);
    assert!(within.len() < (512 << 20) / MAX_EXPANSION as usize, "{} bytes", within.len());
    assert!(index(&within[..], &big).is_ok());
    assert!(check(&bomb[..], &big).is_ok());
}
