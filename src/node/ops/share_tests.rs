//! Shared files on real directories: what is linked, what never is, a lying index, hooks
//! writing through links, retention, and the disk a small change costs.
//!
//! Long on purpose: every way a link could carry the wrong bytes into a release (or out of
//! one) is a scenario on the same real release tree, and they read best side by side.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

use super::share::read_kept;
use super::*;
use crate::archive::{self, CheckOptions};

/// A change to an index, and the file its refusal must name.
type Lie = (&'static str, Box<dyn Fn(&mut FileIndex)>);

/// A tree to package: relative path → (content, executable).
type Tree = BTreeMap<String, (Vec<u8>, bool)>;

/// Packs `tree`; the artifact's bytes, digest and index (as ingest computes it).
fn package(tree: &Tree) -> (Vec<u8>, Digest, FileIndex) {
    let src = tempfile::tempdir().unwrap();
    for (path, (content, executable)) in tree {
        let full = src.path().join(path);
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        fs::write(&full, content).unwrap();
        let mode = if *executable { 0o755 } else { 0o644 };
        fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
    }
    let (packed, bytes) = archive::pack_to_writer(src.path(), &[], Vec::new(), &mut |_| {}).unwrap();
    let options =
        CheckOptions { max_unpacked_bytes: 1 << 30, max_files: 100_000, shared: vec![], record_migrations: false };
    let files = archive::index(&bytes[..], &options).unwrap().files.unwrap();
    (bytes, packed.digest, FileIndex::new(packed.digest, files))
}

fn request(base: &Path, digest: Digest, index: Option<FileIndex>, finalize: &[&str]) -> Prepare {
    Prepare {
        writable: vec!["cache".into()],
        finalize: finalize.iter().map(|c| c.to_string()).collect(),
        max_unpacked_bytes: 1 << 30,
        max_files: 100_000,
        index: index.map(|index| index.encode_wire()),
        ..Prepare::from_stdin(base, digest)
    }
}

fn prepared(base: &Path, tree: &Tree, finalize: &[&str]) -> (Digest, PathBuf) {
    let (bytes, digest, index) = package(tree);
    let answer = prepare(&request(base, digest, Some(index), finalize), &mut &bytes[..], &mut io::sink()).unwrap();
    (digest, answer.dir)
}

fn tree(files: &[(&str, &str, bool)]) -> Tree {
    files.iter().map(|(p, c, x)| (p.to_string(), (c.as_bytes().to_vec(), *x))).collect()
}

fn ino(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().ino()
}

/// Gives write bits back to every directory, so the temporary directory can be removed.
fn unseal(base: &Path) {
    let _ = super::super::prepare::set_writable(base);
}

fn first() -> Tree {
    tree(&[
        ("app/same.php", "<?php same", false),
        ("app/changed.php", "<?php one", false),
        ("bin/run", "#!/bin/sh\necho run", true),
        ("bin/tool", "#!/bin/sh\necho tool", true),
        ("cache/config.php", "<?php cached", false),
    ])
}

fn second() -> Tree {
    let mut second = first();
    second.insert("app/changed.php".into(), (b"<?php two".to_vec(), false));
    // The same bytes, no longer executable.
    second.insert("bin/tool".into(), (b"#!/bin/sh\necho tool".to_vec(), false));
    second
}

#[test]
fn unchanged_files_share_an_inode_with_the_older_release_and_nothing_else_does() {
    for finalize in [&[][..], &["true"][..]] {
        let base = tempfile::tempdir().unwrap();
        let layout = Layout { base: base.path().to_owned() };
        let (one, old) = prepared(base.path(), &first(), finalize);
        let (two, new) = prepared(base.path(), &second(), finalize);
        assert_eq!(ino(&old.join("app/same.php")), ino(&new.join("app/same.php")), "{finalize:?}");
        assert_eq!(ino(&old.join("bin/run")), ino(&new.join("bin/run")));
        assert_ne!(ino(&old.join("app/changed.php")), ino(&new.join("app/changed.php")));
        assert_ne!(ino(&old.join("bin/tool")), ino(&new.join("bin/tool")), "an executable bit changed");
        assert_ne!(ino(&old.join("cache/config.php")), ino(&new.join("cache/config.php")), "a writable path");
        assert_eq!(fs::read_to_string(new.join("app/changed.php")).unwrap(), "<?php two");
        assert_eq!(fs::metadata(new.join("bin/tool")).unwrap().mode() & 0o777, 0o444);
        assert_eq!(fs::metadata(new.join("bin/run")).unwrap().mode() & 0o777, 0o555);
        for digest in [one, two] {
            let stored = fs::read(layout.index(digest)).unwrap();
            assert_eq!(FileIndex::decode_kept(&stored, digest).unwrap().files.len(), 5);
        }
        unseal(base.path());
    }
}

/// Without an index a release is unpacked as before: nothing linked, no index kept.
#[test]
fn a_release_prepared_without_an_index_shares_nothing_and_keeps_none() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (_, old) = prepared(base.path(), &first(), &[]);
    let (bytes, digest, _) = package(&second());
    let new = prepare(&request(base.path(), digest, None, &[]), &mut &bytes[..], &mut io::sink()).unwrap().dir;
    assert_ne!(ino(&old.join("app/same.php")), ino(&new.join("app/same.php")));
    assert!(!layout.index(digest).exists());
    unseal(base.path());
}

#[test]
fn an_index_that_lies_is_refused_and_leaves_nothing() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (one, old) = prepared(base.path(), &first(), &[]);
    let (bytes, digest, index) = package(&second());
    let same = index.files.iter().find(|f| f.path == "app/same.php").unwrap().clone();
    let lies: Vec<Lie> = vec![
        // Says changed.php holds what the older release's same.php holds: it is linked, and
        // the bytes that stream past tell the lie.
        (
            "app/changed.php",
            Box::new(move |i: &mut FileIndex| {
                let f = i.files.iter_mut().find(|f| f.path == "app/changed.php").unwrap();
                (f.sha256, f.size) = (same.sha256, same.size);
            }),
        ),
        ("bin/run", Box::new(|i: &mut FileIndex| i.files.retain(|f| f.path != "bin/run"))),
        (
            "app/ghost.php",
            Box::new(|i: &mut FileIndex| {
                let mut ghost = i.files[0].clone();
                ghost.path = "app/ghost.php".into();
                i.files.push(ghost);
            }),
        ),
    ];
    for (file, lie) in lies {
        let mut lying = index.clone();
        lie(&mut lying);
        let refused =
            prepare(&request(base.path(), digest, Some(lying), &[]), &mut &bytes[..], &mut io::sink()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::IndexMismatch, "{}", refused.message);
        assert!(refused.message.contains(file), "{file}: {}", refused.message);
        assert!(!layout.release(digest).exists() && !layout.ready(digest).exists() && !layout.index(digest).exists());
        let left: Vec<_> = fs::read_dir(layout.releases()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "only the older release: {left:?}");
        assert!(layout.index(one).exists(), "the index sent lied, not the older release's");
    }
    assert_eq!(fs::read_to_string(old.join("app/same.php")).unwrap(), "<?php same", "untouched");
    let mut other = index.clone();
    other.artifact = Digest::of(b"another");
    let refused =
        prepare(&request(base.path(), digest, Some(other), &[]), &mut &bytes[..], &mut io::sink()).unwrap_err();
    assert_eq!(refused.code, ErrorCode::IndexMismatch, "{}", refused.message);
    unseal(base.path());
}

/// As root, modes do not stop a hook: the write through a link is found after finalize, the
/// prepare fails naming the file, and the older release is no longer ready (it will be
/// unpacked again) — or, when it is live, the error says so and it stays ready.
#[test]
fn a_finalize_hook_writing_into_a_shared_file_as_root_is_found_and_refused() {
    let hook = "echo more >> app/same.php";
    for live in [false, true] {
        let base = tempfile::tempdir().unwrap();
        let layout = Layout { base: base.path().to_owned() };
        let (one, old) = prepared(base.path(), &first(), &[]);
        if live {
            switch::switch(base.path(), Some(one), &[], false, 0).unwrap();
        }
        let (bytes, two, index) = package(&second());
        let answer = prepare(&request(base.path(), two, Some(index), &[hook]), &mut &bytes[..], &mut io::sink());
        if !rustix::process::geteuid().is_root() {
            // The linked file is read-only and not root's to write: the hook fails, the older
            // release is untouched.
            assert_eq!(answer.unwrap_err().code, ErrorCode::HookFailed);
            assert_eq!(fs::read_to_string(old.join("app/same.php")).unwrap(), "<?php same");
            unseal(base.path());
            return;
        }
        let refused = answer.unwrap_err();
        assert_eq!(refused.code, ErrorCode::HookFailed);
        assert!(
            refused.message.contains("app/same.php") && refused.message.contains(&one.hex()[..12]),
            "{}",
            refused.message
        );
        assert!(!layout.ready(two).exists() && !layout.index(two).exists());
        assert!(!layout.index(one).exists(), "the changed release offers its files no more");
        if live {
            assert!(refused.message.contains("live release"), "{}", refused.message);
            assert!(layout.ready(one).exists(), "current is never unmarked");
        } else {
            assert!(!layout.ready(one).exists(), "redone from its artifact when next needed");
        }
        unseal(base.path());
    }
}

/// A hook run as another user gets EACCES on a shared file: the older release is unchanged.
#[test]
fn a_finalize_hook_run_as_the_hook_user_cannot_write_into_a_shared_file() {
    if !rustix::process::geteuid().is_root() || user_ids("nobody").is_none() {
        return; // sudo -u needs root (or a sudoers line) here
    }
    let base = tempfile::tempdir().unwrap();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (one, old) = prepared(base.path(), &first(), &[]);
    let (bytes, two, index) = package(&second());
    let mut asked = request(base.path(), two, Some(index), &["echo more >> app/same.php"]);
    asked.run_as = RunAs { user: Some("nobody".into()), umask: None, php_only: false };
    let refused = prepare(&asked, &mut &bytes[..], &mut io::sink()).unwrap_err();
    assert_eq!(refused.code, ErrorCode::HookFailed, "{}", refused.message);
    let said = format!("{} {}", refused.message, refused.output.unwrap_or_default());
    assert!(said.contains("Permission denied") && said.contains("app/same.php"), "{said}");
    assert_eq!(fs::read_to_string(old.join("app/same.php")).unwrap(), "<?php same");
    assert!(layout.ready(one).exists() && layout.index(one).exists(), "the older release is as it was");
    let linked = layout.release(two).join("app/same.php");
    assert_eq!(ino(&linked), ino(&old.join("app/same.php")), "the hook met a shared file");
    unseal(base.path());
}

/// Finalize run again on a release (a rollback) gives write bits back, but never to a file it
/// shares: that would change the other release's modes.
#[test]
fn finalize_run_again_leaves_shared_files_read_only() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (_, old) = prepared(base.path(), &first(), &["true"]);
    let (bytes, two, index) = package(&second());
    let asked = request(base.path(), two, Some(index), &["true"]);
    prepare(&asked, &mut &bytes[..], &mut io::sink()).unwrap();
    assert_eq!(fs::metadata(old.join("app/same.php")).unwrap().nlink(), 2, "shared");
    let again = prepare(&asked, &mut &b""[..], &mut io::sink()).unwrap();
    assert!(again.reused);
    assert_eq!(fs::metadata(old.join("app/same.php")).unwrap().mode() & 0o777, 0o444);
    assert!(!layout.index(two).exists(), "its hooks may have rewritten its files: it offers none");
    unseal(base.path());
}

#[test]
fn retention_removes_an_older_release_and_leaves_what_a_newer_one_shares() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (one, old) = prepared(base.path(), &first(), &[]);
    let (two, new) = prepared(base.path(), &second(), &[]);
    assert_eq!(fs::metadata(new.join("app/same.php")).unwrap().nlink(), 2);
    switch::switch(base.path(), Some(two), &[], false, 0).unwrap();
    let cleaned = cleanup(base.path(), &[two], 0).unwrap();
    assert_eq!(cleaned.removed, [one.hex()]);
    assert!(!old.exists() && !layout.index(one).exists() && !layout.ready(one).exists());
    assert_eq!(fs::read_to_string(new.join("app/same.php")).unwrap(), "<?php same");
    assert_eq!(fs::metadata(new.join("app/same.php")).unwrap().nlink(), 1);
    assert!(layout.index(two).exists());
    unseal(base.path());
}

/// Blocks of the regular files under `dir` whose inodes are not in `seen` (added to it).
fn new_blocks(dir: &Path, seen: &mut HashSet<u64>) -> u64 {
    let mut blocks = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let meta = fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && seen.insert(meta.ino()) {
                blocks += meta.blocks();
            }
        }
    }
    blocks
}

/// A release that changes 1% of a 2,000-file tree adds about 1% of the disk blocks.
#[test]
fn a_release_changing_one_percent_of_its_files_adds_few_blocks() {
    let mut first = Tree::new();
    for i in 0..2000 {
        let content = format!("file {i}\n").repeat(200 + i % 300);
        first.insert(format!("src/d{}/f{i}.php", i % 40), (content.into_bytes(), i % 50 == 0));
    }
    let mut second = first.clone();
    for i in (0..2000).step_by(100) {
        second.get_mut(&format!("src/d{}/f{i}.php", i % 40)).unwrap().0.extend_from_slice(b"changed\n");
    }
    let base = tempfile::tempdir().unwrap();
    let (_, old) = prepared(base.path(), &first, &[]);
    let (_, new) = prepared(base.path(), &second, &[]);
    let mut seen = HashSet::new();
    let (first_blocks, added) = (new_blocks(&old, &mut seen), new_blocks(&new, &mut seen));
    assert!(first_blocks > 2000 * 8, "{first_blocks}");
    assert!(added * 10 <= first_blocks, "the second release added {added} blocks to the first's {first_blocks}");
    unseal(base.path());
}

/// A file the release's own finalize rewrote no longer holds what the index says: it is left
/// out of the index kept, and never linked into a newer release.
#[test]
fn a_file_finalize_rewrote_is_not_offered_to_newer_releases() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (one, old) = prepared(base.path(), &first(), &["echo rewritten > app/changed.php"]);
    let kept = read_kept(&layout.index(one), one).unwrap();
    let paths: Vec<&str> = kept.files.iter().map(|f| f.path.as_str()).collect();
    assert!(!paths.contains(&"app/changed.php") && paths.contains(&"app/same.php"), "{paths:?}");
    let mut again = first();
    again.insert("README".into(), (b"a new file".to_vec(), false));
    let (_, new) = prepared(base.path(), &again, &[]);
    assert_ne!(ino(&old.join("app/changed.php")), ino(&new.join("app/changed.php")));
    assert_eq!(fs::read_to_string(new.join("app/changed.php")).unwrap(), "<?php one");
    assert_eq!(ino(&old.join("app/same.php")), ino(&new.join("app/same.php")));
    unseal(base.path());
}

/// Finalize run again on a release (as root) that writes through a file it shares with an
/// older release is found too; the older release is no longer ready.
#[test]
fn finalize_run_again_writing_into_a_shared_file_as_root_is_found_and_refused() {
    if !rustix::process::geteuid().is_root() {
        return; // the file is read-only: only root writes through
    }
    for only_if_changed in [false, true] {
        let base = tempfile::tempdir().unwrap();
        let layout = Layout { base: base.path().to_owned() };
        let (one, _) = prepared(base.path(), &first(), &[]);
        let (bytes, two, index) = package(&second());
        let mut asked = request(base.path(), two, Some(index), &["true"]);
        prepare(&asked, &mut &bytes[..], &mut io::sink()).unwrap();
        asked.finalize = vec!["echo more >> app/same.php".into()];
        asked.finalize_if_shared_changed = only_if_changed;
        // No note of the shared files it was finalized with: it is finalized again.
        fs::remove_file(layout.finalized_with(two)).unwrap();
        let refused = prepare(&asked, &mut &b""[..], &mut io::sink()).unwrap_err();
        assert_eq!(refused.code, ErrorCode::HookFailed, "{}", refused.message);
        assert!(
            refused.message.contains("app/same.php") && refused.message.contains(&one.hex()[..12]),
            "{}",
            refused.message
        );
        assert!(!layout.ready(one).exists() && !layout.index(one).exists(), "{}", refused.message);
        assert_eq!(fs::metadata(layout.release(two).join("app/same.php")).unwrap().mode() & 0o222, 0);
        unseal(base.path());
    }
}

/// Stores `index` as release `digest`'s kept index, as someone on the node might (a lying
/// `.release/index/<hex>`).
fn keep_lying_index(layout: &Layout, digest: Digest, lie: impl Fn(&mut FileIndex)) {
    let mut index = read_kept(&layout.index(digest), digest).unwrap();
    lie(&mut index);
    fs::write(layout.index(digest), index.encode_kept()).unwrap();
}

/// A kept index edited on the node (it says the older release's `changed.php` holds what the
/// new one's holds, same size) must not put the older content in the new release: a linked
/// file's bytes are compared with the stream's, not only its claimed hash.
#[test]
fn a_kept_index_edited_on_the_node_never_links_other_content() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (one, old) = prepared(base.path(), &first(), &[]);
    let (bytes, two, index) = package(&second());
    let theirs = index.files.iter().find(|f| f.path == "app/changed.php").unwrap().clone();
    keep_lying_index(&layout, one, |i| {
        let f = i.files.iter_mut().find(|f| f.path == "app/changed.php").unwrap();
        (f.sha256, f.size) = (theirs.sha256, theirs.size);
    });
    let refused =
        prepare(&request(base.path(), two, Some(index.clone()), &[]), &mut &bytes[..], &mut io::sink()).unwrap_err();
    assert_eq!(refused.code, ErrorCode::Io, "{}", refused.message);
    assert!(refused.message.contains("app/changed.php"), "{}", refused.message);
    assert!(!layout.release(two).exists() && !layout.ready(two).exists() && !layout.index(two).exists());
    assert!(!layout.index(one).exists(), "the lying index is forgotten");
    assert!(!layout.ready(one).exists(), "and the release unmarked (not current): unpacked again when needed");
    // Deployed again, it is written from the artifact.
    let again = prepare(&request(base.path(), two, Some(index), &[]), &mut &bytes[..], &mut io::sink()).unwrap();
    assert_eq!(fs::read_to_string(again.dir.join("app/changed.php")).unwrap(), "<?php two");
    assert_eq!(fs::read_to_string(again.dir.join("app/same.php")).unwrap(), "<?php same");
    assert_eq!(fs::read_to_string(old.join("app/changed.php")).unwrap(), "<?php one", "untouched");
    unseal(base.path());
}

/// A file of an older release changed in place after its index was kept, its mtime put back
/// (`touch -r`), the same size: a newer release holding what the index says must not get it.
#[test]
fn a_file_changed_in_place_with_its_mtime_put_back_is_never_linked() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (one, old) = prepared(base.path(), &first(), &[]);
    let path = old.join("app/same.php");
    let before = fs::metadata(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, "<?php evil").unwrap();
    let times = fs::FileTimes::new().set_modified(before.modified().unwrap()).set_accessed(before.accessed().unwrap());
    fs::File::options().write(true).open(&path).unwrap().set_times(times).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), before.modified().unwrap());
    let (bytes, two, index) = package(&second());
    let refused =
        prepare(&request(base.path(), two, Some(index.clone()), &[]), &mut &bytes[..], &mut io::sink()).unwrap_err();
    assert_eq!(refused.code, ErrorCode::Io, "{}", refused.message);
    assert!(refused.message.contains("app/same.php"), "{}", refused.message);
    assert!(!layout.release(two).exists() && !layout.index(one).exists());
    assert!(!layout.ready(one).exists(), "its file is not its artifact's: no longer ready");
    let dir = prepare(&request(base.path(), two, Some(index), &[]), &mut &bytes[..], &mut io::sink()).unwrap().dir;
    assert_eq!(fs::read_to_string(dir.join("app/same.php")).unwrap(), "<?php same");
    assert_ne!(ino(&dir.join("app/same.php")), ino(&path));
    unseal(base.path());
}

/// An artifact whose tar holds a hard link in a writable path to a file shared with an older
/// release: the writable path must not be that inode (the hook user's group gets write on
/// writable paths, and hooks and the service write there).
#[test]
fn a_tar_hard_link_in_a_writable_path_never_shares_an_older_inode() {
    if user_ids("nobody").is_none() {
        return;
    }
    let tar_with_hard_link = || {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(10);
        header.set_mode(0o644);
        builder.append_data(&mut header, "app/same.php", &b"<?php same"[..]).unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Link);
        header.set_size(0);
        header.set_mode(0o644);
        builder.append_link(&mut header, "cache/same.php", "app/same.php").unwrap();
        zstd::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap()
    };
    for finalize in [&[][..], &["true"][..]] {
        let base = tempfile::tempdir().unwrap();
        let (_, old) = prepared(base.path(), &first(), &[]);
        let shared = old.join("app/same.php");
        let mode = fs::metadata(&shared).unwrap().mode();
        let bytes = tar_with_hard_link();
        let digest = Digest::of(&bytes);
        let options =
            CheckOptions { max_unpacked_bytes: 1 << 30, max_files: 100, shared: vec![], record_migrations: false };
        let files = archive::index(&bytes[..], &options).unwrap().files.unwrap();
        let mut asked = request(base.path(), digest, Some(FileIndex::new(digest, files)), finalize);
        asked.run_as = RunAs { user: Some("nobody".into()), umask: None, php_only: false };
        let dir = prepare(&asked, &mut &bytes[..], &mut io::sink()).unwrap().dir;
        assert_eq!(fs::read_to_string(dir.join("cache/same.php")).unwrap(), "<?php same");
        assert_ne!(ino(&dir.join("cache/same.php")), ino(&shared), "{finalize:?}");
        let after = fs::metadata(&shared).unwrap();
        assert_eq!(after.mode(), mode, "the older release's file keeps its mode ({finalize:?})");
        assert_eq!(after.gid(), fs::metadata(old.join("app/changed.php")).unwrap().gid(), "and its group");
        unseal(base.path());
    }
}

/// A finalize hook run as root rewriting a linked file in place with the same size and putting
/// its mtime back (`touch -r`): its ctime shows it, and its bytes are compared with the index.
#[test]
fn a_finalize_hook_rewriting_a_shared_file_with_its_mtime_put_back_is_found() {
    if !rustix::process::geteuid().is_root() {
        return; // not root: EACCES, as above
    }
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (one, old) = prepared(base.path(), &first(), &[]);
    let (bytes, two, index) = package(&second());
    let ref_file = base.path().join("ref");
    let hook = format!(
        "cp -p app/same.php {r} && printf '<?php evil' > app/same.php && touch -r {r} app/same.php",
        r = ref_file.display()
    );
    let refused = prepare(&request(base.path(), two, Some(index), &[hook.as_str()]), &mut &bytes[..], &mut io::sink())
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::HookFailed, "{}", refused.message);
    assert!(refused.message.contains("app/same.php"), "{}", refused.message);
    assert!(!layout.ready(two).exists() && !layout.index(two).exists());
    assert!(!layout.index(one).exists() && !layout.ready(one).exists(), "the changed release is unmarked");
    assert_eq!(fs::read_to_string(old.join("app/same.php")).unwrap(), "<?php evil", "root did write through");
    unseal(base.path());
}

/// An agent killed mid-prepare (-9: nothing cleaned) left a half-linked temporary tree, or a
/// renamed tree whose index was kept but no ready marker: neither is offered to a newer
/// release, the redo removes them without touching the older release's files, and the older
/// files keep their content, mode and links.
#[test]
fn a_prepare_killed_half_linked_is_redone_and_leaves_older_files_as_they_were() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    let (_, old) = prepared(base.path(), &first(), &[]);
    let same = old.join("app/same.php");
    let before = fs::metadata(&same).unwrap();
    let (bytes, two, index) = package(&second());
    // Killed while linking: .tmp-<hex> holds a link to the older file.
    let tmp = layout.releases().join(format!(".tmp-{}", two.hex()));
    fs::create_dir_all(tmp.join("app")).unwrap();
    fs::hard_link(&same, tmp.join("app/same.php")).unwrap();
    // A third release killed between keeping its index and its ready marker.
    let mut third = second();
    third.insert("app/third.php".into(), (b"<?php third".to_vec(), false));
    let (third_bytes, three, third_index) = package(&third);
    let answer =
        prepare(&request(base.path(), three, Some(third_index.clone()), &[]), &mut &third_bytes[..], &mut io::sink())
            .unwrap();
    fs::remove_file(layout.ready(three)).unwrap();
    assert!(layout.index(three).exists());
    let unready = answer.dir;
    let unready_third = fs::metadata(unready.join("app/third.php")).unwrap().ino();

    // The second release with a file only the unready one holds: never linked to it.
    let mut second_tree = second();
    second_tree.insert("app/third.php".into(), (b"<?php third".to_vec(), false));
    second_tree.insert("app/other.php".into(), (b"<?php other".to_vec(), false));
    let (bytes_b, two_b, index_b) = package(&second_tree);
    let dir =
        prepare(&request(base.path(), two_b, Some(index_b), &[]), &mut &bytes_b[..], &mut io::sink()).unwrap().dir;
    assert_ne!(two_b, three);
    assert_ne!(ino(&dir.join("app/third.php")), unready_third, "an unready release offers nothing");
    assert_eq!(fs::metadata(unready.join("app/third.php")).unwrap().ino(), unready_third, "still there");
    assert_eq!(ino(&dir.join("app/same.php")), ino(&same));

    // Redone: the half-linked tree is gone, the older file as it was.
    let dir = prepare(&request(base.path(), two, Some(index), &[]), &mut &bytes[..], &mut io::sink()).unwrap().dir;
    assert!(!tmp.exists());
    assert_eq!(ino(&dir.join("app/same.php")), ino(&same));
    let after = fs::metadata(&same).unwrap();
    assert_eq!((after.mode(), after.len(), after.mtime()), (before.mode(), before.len(), before.mtime()));
    assert_eq!(
        after.nlink(),
        4,
        "the older release, the unready third, the second and its sibling: not the killed tree"
    );
    assert_eq!(fs::read_to_string(&same).unwrap(), "<?php same");
    // The unready third is redone too: its kept index is forgotten first, then kept again.
    prepare(&request(base.path(), three, Some(third_index), &[]), &mut &third_bytes[..], &mut io::sink()).unwrap();
    assert!(layout.ready(three).exists() && layout.index(three).exists());
    unseal(base.path());
}
