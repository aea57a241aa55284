//! Unit tests of the node agent's operations on real directories.

use super::hooks::{runs_php, sudo_refusal};
use super::prepare::set_writable;
use super::*;

fn modes_of(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        found.push((
            dir.strip_prefix(root).unwrap().to_owned(),
            fs::symlink_metadata(&dir).unwrap().permissions().mode(),
        ));
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if !meta.file_type().is_symlink() {
                found.push((path.strip_prefix(root).unwrap().to_owned(), meta.permissions().mode()));
            }
        }
    }
    found.sort();
    found
}

/// Files written read-only at once (no finalize hook) end with exactly the modes that the
/// walk after a finalize hook gives: writable paths left alone, shared links' new parents
/// sealed too; and so do directories made sealed (root) or sealed after the walk (any other
/// user), parents the archive does not list among them.
#[test]
fn a_release_sealed_while_unpacking_has_the_modes_of_one_sealed_after_finalize() {
    // Built by hand: the packer never writes hard links, other tools do.
    let mut tar = tar::Builder::new(Vec::new());
    for (path, body, mode) in [
        ("public/index.php", "<?php", 0o644),
        ("vendor/a/b/C.php", "<?php", 0o644),
        ("cache/views/x", "x", 0o644),
        ("cache/data/y", "y", 0o644),
        ("artisan", "#!", 0o755),
    ] {
        let mut header = tar::Header::new_ustar();
        header.set_size(body.len() as u64);
        header.set_mode(mode);
        tar.append_data(&mut header, path, body.as_bytes()).unwrap();
    }
    // One inode at a writable and at a sealed path: read-only, by either way.
    let mut link = tar::Header::new_ustar();
    link.set_entry_type(tar::EntryType::Link);
    link.set_size(0);
    link.set_mode(0o644);
    tar.append_link(&mut link, "public/y", "cache/data/y").unwrap();
    let bytes = zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap();
    let digest = Digest::of(&bytes);

    let mut trees = Vec::new();
    for (finalize, seal_after) in [(vec!["true".to_owned()], false), (vec![], false), (vec![], true)] {
        crate::node::unpack::SEAL_AFTER.set(seal_after);
        let base = tempfile::tempdir().unwrap();
        fs::create_dir_all(base.path().join("shared/data/uploads")).unwrap();
        fs::write(base.path().join("shared/.env"), "A=1").unwrap();
        let request = Prepare {
            shared: vec![".env".into(), "data/uploads".into()],
            writable: vec!["cache".into()],
            finalize,
            ..Prepare::from_stdin(base.path(), digest)
        };
        let answer = prepare(&request, &mut &bytes[..], &mut io::sink()).unwrap();
        let dir = answer.dir;
        trees.push(modes_of(&dir));
        set_writable(&dir).unwrap(); // so that the temporary directory can be removed
    }
    crate::node::unpack::SEAL_AFTER.set(false);
    assert_eq!(trees[0], trees[1]);
    assert_eq!(trees[1], trees[2]);
    let mode = |path: &str| trees[1].iter().find(|(p, _)| p == Path::new(path)).unwrap().1 & 0o777;
    assert_eq!(mode(""), 0o555);
    assert_eq!(mode("data"), 0o555, "made for a shared link, sealed too");
    assert_eq!(mode("vendor/a/b"), 0o555, "not in the archive, made for its file");
    assert_eq!(mode("vendor"), 0o555);
    assert_eq!(mode("public/index.php"), 0o444);
    assert_eq!(mode("artisan"), 0o555);
    assert_eq!(mode("cache/views/x") & 0o200, 0o200, "writable path left writable");
    assert_eq!(mode("cache/views") & 0o200, 0o200);
    assert_eq!(mode("public/y") & 0o222, 0, "a hard link at a sealed path seals its inode");
}

/// Root makes directories sealed (the test above compares that with sealing after the walk
/// only where it runs as root); any other user seals after. Nothing of the try is left.
#[test]
fn only_an_agent_that_writes_through_modes_makes_directories_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let through = crate::node::unpack::writes_through_modes(dir.path()).unwrap();
    assert_eq!(through, rustix::process::geteuid().is_root());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_hook_users_group_gets_the_writable_paths_or_the_refusal_says_how() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("cache/views")).unwrap();
    fs::write(dir.path().join("cache/views/x"), "x").unwrap();
    fs::create_dir_all(dir.path().join("app")).unwrap();
    let (_, nogroup) = user_ids("nobody").expect("Debian has nobody");
    let run_as = RunAs { user: Some("nobody".into()), umask: None, php_only: false };
    let shared = share_writable(dir.path(), &["cache".into()], &run_as);
    if rustix::process::geteuid().is_root() {
        shared.unwrap();
        for path in ["cache", "cache/views", "cache/views/x"] {
            let meta = fs::metadata(dir.path().join(path)).unwrap();
            assert_eq!(meta.gid(), nogroup, "{path}");
            let want = if meta.is_dir() { 0o2070 } else { 0o060 };
            assert_eq!(meta.permissions().mode() & want, want, "{path}: {:o}", meta.permissions().mode());
        }
        assert_ne!(fs::metadata(dir.path().join("app")).unwrap().gid(), nogroup, "only writable paths");
    } else {
        let err = shared.unwrap_err().to_string();
        assert!(err.contains("make the SSH user a member"), "{err}");
    }
    // Without a user (or for a reload's php commands only), nothing is touched.
    let plain = RunAs { user: Some("nobody".into()), umask: None, php_only: true };
    share_writable(dir.path(), &["app".into()], &plain).unwrap();
    assert_ne!(fs::metadata(dir.path().join("app")).unwrap().gid(), nogroup);
}

/// Without finalize hooks the release is sealed while unpacking; its writable paths still go
/// to the hook user's group, for the migrate and reload commands that run as that user.
#[test]
fn a_release_without_finalize_hooks_still_gives_its_writable_paths_to_the_hook_user() {
    use std::os::unix::fs::MetadataExt;
    let mut tar = tar::Builder::new(Vec::new());
    for path in ["bootstrap/cache/x", "public/index.php"] {
        let mut header = tar::Header::new_ustar();
        header.set_size(1);
        header.set_mode(0o644);
        tar.append_data(&mut header, path, &b"x"[..]).unwrap();
    }
    let bytes = zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap();
    let base = tempfile::tempdir().unwrap();
    let request = Prepare {
        writable: vec!["bootstrap/cache".into()],
        run_as: RunAs { user: Some("nobody".into()), umask: None, php_only: false },
        ..Prepare::from_stdin(base.path(), Digest::of(&bytes))
    };
    let prepared = prepare(&request, &mut &bytes[..], &mut io::sink());
    if !rustix::process::geteuid().is_root() {
        assert!(prepared.unwrap_err().to_string().contains("make the SSH user a member"));
        return;
    }
    let dir = prepared.unwrap().dir;
    let (_, nogroup) = user_ids("nobody").unwrap();
    let cache = fs::metadata(dir.join("bootstrap/cache")).unwrap();
    assert_eq!((cache.gid(), cache.mode() & 0o2070), (nogroup, 0o2070));
    assert_ne!(fs::metadata(dir.join("public")).unwrap().gid(), nogroup, "only writable paths");
    set_writable(&dir).unwrap();
}

fn exec_in(base: &Path, digest: Digest, command: &str, fence: u64) -> Result<Ran, NodeError> {
    exec(&Exec {
        base: base.to_owned(),
        digest: Some(digest),
        commands: vec![command.to_owned()],
        env: BTreeMap::new(),
        hook_timeout_ms: None,
        fence,
        run_as: RunAs::default(),
    })
}

fn mark_ready(layout: &Layout, digest: Digest) {
    fs::create_dir_all(layout.ready(digest).parent().unwrap()).unwrap();
    fs::write(layout.ready(digest), "").unwrap();
}

#[test]
fn hooks_are_fenced_like_every_change_and_run_only_in_a_ready_release() {
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    layout.create().unwrap();
    let digest = Digest::of(b"release");
    fs::create_dir_all(layout.release(digest)).unwrap();
    layout.fence(100).unwrap();
    let refused = exec_in(base.path(), digest, "echo ran > ran", 100).unwrap_err();
    assert_eq!(refused.code, ErrorCode::NotReady, "{}", refused.message);
    assert!(refused.message.contains("not marked ready"), "{}", refused.message);
    mark_ready(&layout, digest);
    let refused = exec_in(base.path(), digest, "echo ran > ran", 50).unwrap_err();
    assert_eq!(refused.code, ErrorCode::Fenced, "{}", refused.message);
    assert!(!layout.release(digest).join("ran").exists(), "a stale run's hook never starts");
    exec_in(base.path(), digest, "echo ran > ran", 100).unwrap();
    assert!(layout.release(digest).join("ran").exists());
}

/// The lock dies with the agent that held it; a hook it started may live on, in its own
/// process group. The next hook waits for that group, and gives up after the lock's wait.
#[test]
fn a_hook_whose_agent_died_is_waited_for_and_refused_after_the_wait() {
    use std::os::unix::process::CommandExt;
    let base = tempfile::tempdir().unwrap();
    let layout = Layout { base: base.path().to_owned() };
    layout.create().unwrap();
    let digest = Digest::of(b"release");
    fs::create_dir_all(layout.release(digest)).unwrap();
    mark_ready(&layout, digest);
    let started = |seconds: u64| {
        let child = Command::new("sleep").arg(seconds.to_string()).process_group(0).spawn().unwrap();
        layout.record_hook(child.id(), &format!("php artisan migrate # {seconds} s")).unwrap();
        let pid = child.id();
        // Reaped as soon as it ends (a zombie still counts as a member of its group).
        let reaper = std::thread::spawn(move || {
            let mut child = child;
            child.wait().unwrap()
        });
        (pid, reaper)
    };
    let overlap = |pid: u32| format!("if kill -0 {pid} 2>/dev/null; then echo overlap; else echo after; fi");

    let (pid, reaper) = started(1);
    let output = exec_in(base.path(), digest, &overlap(pid), 0).unwrap();
    assert!(output.output.contains("after"), "{}", output.output);
    reaper.join().unwrap();
    assert!(!layout.hook_record().exists(), "the note of a hook that ended is removed");

    let (pid, reaper) = started(LOCK_WAIT.as_secs() + 3);
    let refused = exec_in(base.path(), digest, &overlap(pid), 0).unwrap_err();
    assert_eq!(refused.code, ErrorCode::Locked);
    assert!(
        refused.message.contains("php artisan migrate") && refused.message.contains(&pid.to_string()),
        "{}",
        refused.message
    );
    reaper.join().unwrap();
}

/// sudo's complaints on its stderr are told apart from a hook's own failure, and say what
/// to do: the sudoers line for the SSH user, or that the user does not exist.
#[test]
fn sudos_refusals_are_told_apart_and_name_the_fix() {
    let me = agent_user();
    let refused = sudo_refusal("sudo: a password is required\n", "www-data").unwrap();
    assert!(refused.contains("sudo refused (sudo: a password is required)"), "{refused}");
    assert!(refused.contains(&format!("`{me} ALL=(www-data) NOPASSWD: ALL`")), "{refused}");
    let unknown =
        sudo_refusal("sudo: unknown user wwwdata\nsudo: error initializing audit plugin\n", "wwwdata").unwrap();
    assert!(unknown.contains("not a user on this node") && !unknown.contains("NOPASSWD"), "{unknown}");
    assert_eq!(sudo_refusal("", "www-data"), None, "the hook ran: its failure is its own");
}

#[test]
fn the_applications_php_is_told_from_the_web_servers_commands() {
    for php in ["php artisan queue:restart", "  php8.2 artisan horizon:terminate", "/usr/bin/php7.4 artisan x", "php"] {
        assert!(runs_php(php), "{php}");
    }
    for other in
        ["apachectl -k graceful", "systemctl reload php8.2-fpm", "phpunit", "sudo php artisan x", "php-fpm8.2 -t"]
    {
        assert!(!runs_php(other), "{other}");
    }
}

/// A ready marker whose tree is gone (removed by hand, or a cleanup half undone by a power
/// loss) must not survive into the next prepare of that release: a crash after its tree is
/// renamed into place, before it is finished, would leave it marked ready.
#[test]
fn a_marker_without_its_tree_is_gone_once_the_release_is_prepared_again() {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(5);
    header.set_mode(0o644);
    tar.append_data(&mut header, "public/index.php", &b"<?php"[..]).unwrap();
    let bytes = zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap();
    let digest = Digest::of(&bytes);
    let base = tempfile::tempdir().unwrap();
    let request = Prepare::from_stdin(base.path(), digest);
    let dir = prepare(&request, &mut &bytes[..], &mut io::sink()).unwrap().dir;
    let marker = base.path().join(".release/ready").join(digest.hex());
    assert!(marker.exists());
    set_writable(&dir).unwrap();
    fs::remove_dir_all(&dir).unwrap();

    // Prepared again from a cut stream: refused, and the stale marker went first.
    let err = prepare(&request, &mut &bytes[..bytes.len() / 2], &mut io::sink()).unwrap_err();
    assert!(!marker.exists(), "the marker outlived its tree: {}", err.message);
    assert!(!dir.exists());

    // And from the whole stream: ready again, marker and tree.
    let dir = prepare(&request, &mut &bytes[..], &mut io::sink()).unwrap().dir;
    assert!(marker.exists() && dir.join("public/index.php").is_file());
    set_writable(&dir).unwrap();
}
