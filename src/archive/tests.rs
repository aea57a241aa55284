//! Packing and checking archives: determinism, every refusal of the ingest rules, and the
//! streaming walk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use super::*;

fn options() -> CheckOptions {
    CheckOptions { max_unpacked_bytes: 1 << 30, max_files: 1000, shared: vec![], record_migrations: true }
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
        big.push_str(&format!("line {i} of a file large enough to span several zstd jobs\n"));
    }
    write(&dir.path().join("big.txt"), &big);
    sample_tree(dir.path(), false);
    let with = |workers| pack_with_workers(dir.path(), &[], Vec::new(), &mut |_| {}, workers).unwrap();
    let (one, one_bytes) = with(1);
    let (four, four_bytes) = with(4);
    assert!(big.len() > 16 << 20, "input for several zstd jobs (8 MiB each at level 3)");
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
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
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
