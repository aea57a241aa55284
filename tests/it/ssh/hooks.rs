//! Hooks over SSH as the service's `hook_user`: what they make is that user's, and a refusing
//! sudo fails the deploy naming the sudoers line.

use std::fs;

use crate::support::sshd;
use crate::support::{Backend, TestServer};

use super::{SshFleet, chown_tree};

/// Hooks as the service's `hook_user`: the file a finalize hook makes in shared/storage is
/// that user's, and with `umask = "002"` its directories are group-writable; the reload
/// (not the application's: no `php`) stays the SSH user's.
#[test]
fn hooks_run_as_the_hook_user_over_ssh_and_leave_shared_storage_theirs() {
    let Some(hook_uid) = sshd::system_user("release-hook", false) else { return };
    let finalize = "mkdir -p $RELEASE_BASE/shared/storage/framework/cache && id -un > $RELEASE_BASE/shared/storage/framework/cache/made-by";
    let service = format!(
        "hook_user = \"release-hook\"\numask = \"002\"\nhooks.finalize = [{finalize:?}]\n\
         hooks.reload = [\"id -un > $RELEASE_BASE/shared/reloaded-by\"]"
    );
    let fleet =
        SshFleet::build(&["staging"], &service, |config| TestServer::start_with_env(Backend::Local, config, &[]));
    sshd::open_to_all(&fleet.nodes[0].dir);
    let base = &fleet.bases[0].1;
    let storage = base.join("shared/storage");
    fs::create_dir_all(&storage).unwrap();
    chown_tree(&storage, "release-hook");
    let v1 = fleet.upload("v1");
    fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--wait"]).assert_success();
    use std::os::unix::fs::MetadataExt;
    let cache = storage.join("framework/cache");
    assert_eq!(fs::read_to_string(cache.join("made-by")).unwrap().trim(), "release-hook");
    for path in [storage.join("framework"), cache.clone(), cache.join("made-by")] {
        assert_eq!(fs::metadata(&path).unwrap().uid(), hook_uid, "{} is the hook user's", path.display());
    }
    assert_eq!(fs::metadata(&cache).unwrap().mode() & 0o777, 0o775, "umask 002: group-writable");
    assert_eq!(fs::read_to_string(base.join("shared/reloaded-by")).unwrap().trim(), "root", "reload: the SSH user");
}

/// A non-root SSH user without a sudoers rule: sudo asks for a password, `-n` makes it
/// refuse, and the deploy fails at finalize saying which sudoers line the node needs.
#[test]
fn a_hook_user_sudo_refuses_fails_the_deploy_naming_the_sudoers_line() {
    let Some(_) = sshd::system_user("release-hook", false) else { return };
    let Some(_) = sshd::system_user("release-deploy", true) else { return };
    let service = "hook_user = \"release-hook\"\nhooks.finalize = [\"touch made\"]";
    let fleet = SshFleet::build_as("release-deploy", &["staging"], service, |config| {
        TestServer::start_with_env(Backend::Local, config, &[])
    });
    let v1 = fleet.upload("v1");
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--wait"]).run();
    assert!(!out.output.status.success(), "{out}");
    let said = format!("{}{}", out.stdout(), out.stderr());
    for expected in [
        "as hook_user release-hook: sudo refused (sudo: a password is required)",
        "the SSH user release-deploy needs a sudoers line such as `release-deploy ALL=(release-hook) NOPASSWD: ALL`",
        "| sudo: a password is required",
    ] {
        assert!(said.contains(expected), "expected {expected:?} in: {said}");
    }
    assert!(fs::read_link(fleet.bases[0].1.join("current")).is_err(), "nothing switched");
}
