//! `release package`: deterministic bytes, digest = sha256sum, refusals.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::support::{TestCommand, app_tree};

fn package(dir: &Path, out: &Path) -> serde_json::Value {
    TestCommand::new()
        .args(["package", dir.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"])
        .assert_success()
        .json()
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

fn set_mtime_everywhere(root: &Path, when: SystemTime) {
    for entry in walk(root) {
        if !entry.is_symlink() {
            fs::File::open(&entry).unwrap().set_modified(when).unwrap();
        }
    }
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn the_same_tree_always_gives_the_same_digest() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));

    // Tree a: created in one order, old mtimes, umask-ish modes.
    app_tree(&a, "1.0");
    fs::create_dir_all(a.join("storage/framework")).unwrap();
    symlink("../public/index.php", a.join("routes/entry.php")).unwrap();
    set_mtime_everywhere(&a, SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));

    // Tree b: the same content created in reverse order, now, other non-exec mode bits.
    fs::create_dir_all(b.join("storage/framework")).unwrap();
    fs::create_dir_all(b.join("routes")).unwrap();
    symlink("../public/index.php", b.join("routes/entry.php")).unwrap();
    app_tree(&b, "1.0");
    fs::set_permissions(b.join("public/index.php"), fs::Permissions::from_mode(0o600)).unwrap();

    let (out_a, out_b) = (work.path().join("a.tar.zst"), work.path().join("b.tar.zst"));
    let (pa, pb) = (package(&a, &out_a), package(&b, &out_b));
    assert_eq!(pa["digest"], pb["digest"], "same tree, same digest");
    assert_eq!(fs::read(&out_a).unwrap(), fs::read(&out_b).unwrap());
    assert_eq!(pa["digest"].as_str().unwrap(), format!("sha256:{}", sha256sum(&out_a)));
    assert_eq!(pa["size"].as_u64().unwrap(), fs::metadata(&out_a).unwrap().len());

    // A change of content changes the digest.
    fs::write(b.join("public/index.php"), "<?php echo 'changed';\n").unwrap();
    let pc = package(&b, &work.path().join("c.tar.zst"));
    assert_ne!(pa["digest"], pc["digest"]);
}

#[test]
fn gnu_tar_reads_the_archive_back_identically() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    app_tree(&src, "2.0");
    symlink("index.php", src.join("public/alias.php")).unwrap();
    let archive = work.path().join("app.tar.zst");
    package(&src, &archive);
    let out = work.path().join("out");
    fs::create_dir(&out).unwrap();
    let status = Command::new("tar")
        .args(["--zstd", "-xf", archive.to_str().unwrap(), "-C", out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let diff = Command::new("diff").args(["-r", "--no-dereference"]).arg(&src).arg(&out).output().unwrap();
    assert!(diff.status.success(), "{}", String::from_utf8_lossy(&diff.stdout));
    let mode = fs::metadata(out.join("artisan")).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, "the executable bit survives");
    let listing = Command::new("tar").args(["--zstd", "-tvf", archive.to_str().unwrap()]).output().unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert!(listing.lines().all(|l| l.contains("0/0") && l.contains("1970-01-01")), "{listing}");
}

#[test]
fn packaging_refuses_an_escaping_link_and_leaves_no_file() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    app_tree(&src, "1.0");
    symlink("../../../etc/passwd", src.join("public/passwd")).unwrap();
    let archive = work.path().join("app.tar.zst");
    let out =
        TestCommand::new().args(["package", src.to_str().unwrap(), "-o", archive.to_str().unwrap()]).assert_exit(6);
    assert!(out.stderr().contains("public/passwd"), "{out}");
    assert!(out.stderr().contains("leaves the tree"), "{out}");
    assert!(!archive.exists());
    let leftovers: Vec<_> = fs::read_dir(work.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("src")], "no temporary file left");
}

#[test]
fn packaging_refuses_a_socket() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    app_tree(&src, "1.0");
    let _socket = std::os::unix::net::UnixListener::bind(src.join("php-fpm.sock")).unwrap();
    let out = TestCommand::new()
        .args(["package", src.to_str().unwrap(), "-o", work.path().join("x.tar.zst").to_str().unwrap()])
        .assert_exit(6);
    assert!(out.stderr().contains("php-fpm.sock: a socket cannot be deployed"), "{out}");
}

#[test]
fn exclude_leaves_shared_paths_out() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    app_tree(&src, "1.0");
    fs::write(src.join(".env"), "APP_KEY=base64:secret\n").unwrap();
    let archive = work.path().join("app.tar.zst");
    TestCommand::new()
        .args(["package", src.to_str().unwrap(), "-o", archive.to_str().unwrap(), "--exclude", ".env"])
        .assert_success();
    let listing = Command::new("tar").args(["--zstd", "-tf", archive.to_str().unwrap()]).output().unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert!(!listing.contains(".env"), "{listing}");
    assert!(listing.contains("public/index.php"), "{listing}");
}

#[test]
fn packaging_refuses_a_tree_no_node_could_hold() {
    // 257 directories deep: past the archive rules' depth bound, so the server would refuse it.
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    app_tree(&src, "1.0");
    fs::create_dir_all(src.join(vec!["d"; 257].join("/"))).unwrap();
    let archive = work.path().join("app.tar.zst");
    let out =
        TestCommand::new().args(["package", src.to_str().unwrap(), "-o", archive.to_str().unwrap()]).assert_exit(6);
    assert!(out.stderr().contains("257 components deep, more than 256"), "{}", out.stderr());
    assert!(!archive.exists());
}

#[test]
fn package_prints_the_digest_alone_and_a_reader_that_leaves_is_no_panic() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("app");
    app_tree(&src, "v1");
    let archive = work.path().join("app.tar.zst");
    let out =
        TestCommand::new().args(["package", src.to_str().unwrap(), "-o", archive.to_str().unwrap()]).assert_success();
    // `D=$(release package …)`: stdout is the digest, what was written goes to stderr.
    assert_eq!(out.stdout(), format!("sha256:{}\n", sha256sum(&archive)));
    assert!(out.stderr().contains("app.tar.zst") && out.stderr().contains("entries"), "{}", out.stderr());

    // A pipe whose reader is gone (`| true`): the write fails with EPIPE, the command does not
    // panic ("failed printing to stdout: Broken pipe", exit 101 before).
    let piped = Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -o pipefail; {} package {} -o {} | true",
                crate::support::bin(),
                src.display(),
                archive.display()
            ),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", piped.status);
}
