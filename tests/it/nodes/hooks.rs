//! Hooks on local nodes: a hung hook is killed, a hook a killed server left is waited for,
//! hooks run as `hook_user` with the service's umask, and `release check` warns on what that
//! user cannot write.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use serde_json::{Value, json};

use super::{Fleet, node_config};

#[test]
fn a_hung_hook_is_killed_on_the_node_before_the_server_gives_up_and_the_lock_is_free() {
    let mut fleet = Fleet::new(1, "");
    fleet.f.server.reconfigure(&format!(
        "[ssh]\ncommand_timeout = \"7s\"\n{}",
        node_config(&fleet.bases, "hooks.finalize = [\"sleep 120 # hung-hook-marker\"]")
    ));
    let v1 = fleet.upload("v1", &[]);
    let started = std::time::Instant::now();
    let failed = fleet.deploy(&v1);
    assert_eq!(failed["state"], "failed");
    let reason = failed["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("hook_timeout") && reason.contains("killed"), "{reason}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
    let ps = std::process::Command::new("pgrep").args(["-f", "hung-hook-marker"]).output().unwrap();
    assert!(ps.stdout.is_empty(), "the hook's processes are gone: {}", String::from_utf8_lossy(&ps.stdout));
    // The base is not locked by a left-over agent: the next deploy goes through.
    fleet.f.server.reconfigure(&format!("[ssh]\ncommand_timeout = \"7s\"\n{}", node_config(&fleet.bases, "")));
    assert_eq!(fleet.deploy(&v1)["state"], "live");
}

/// A hook outlives its agent when the server is killed: the restarted server's hooks on that
/// node wait for it (its process group is noted in `.release/hook`) instead of running beside it.
#[test]
fn a_hook_still_running_from_a_killed_server_is_waited_for_before_the_next_one_starts() {
    let reload = "hooks.reload = [\"echo start $RELEASE_DIGEST >> $RELEASE_BASE/hooks.log; \
                  test ! -e $RELEASE_BASE/shared/slow || sleep 4; echo end $RELEASE_DIGEST >> $RELEASE_BASE/hooks.log\"]";
    let mut fleet = Fleet::new(1, reload);
    let v1 = fleet.upload("v1", &[]);
    assert_eq!(fleet.deploy(&v1)["state"], "live");
    let log = fleet.bases[0].join("hooks.log");
    fs::write(&log, "").unwrap();
    fs::write(fleet.bases[0].join("shared/slow"), "").unwrap();
    let v2 = fleet.upload("v2", &[]);
    fleet.f.post("ci", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": v2}));
    // Killed while v2's reload sleeps on the node.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !fs::read_to_string(&log).unwrap().contains("start") {
        assert!(std::time::Instant::now() < deadline, "{}", fleet.f.server.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fleet.f.server.kill();
    fs::remove_file(fleet.bases[0].join("shared/slow")).unwrap();
    fleet.f.server.restart();
    // The restarted server finds the node on v2 and reloads it again: after the first ended.
    let settled = fleet.f.settle(2);
    assert_eq!(settled["state"], "live", "{settled}");
    let lines: Vec<String> =
        fs::read_to_string(&log).unwrap().lines().map(|l| l.split(' ').next().unwrap().to_owned()).collect();
    assert_eq!(lines, ["start", "end", "start", "end"], "the hooks ran one after the other");
}

/// A system user for the hook_user tests (tests run as root, as in CI).
fn web_user() -> (String, u32) {
    let name = "release-web";
    let exists = std::process::Command::new("id").arg(name).output().unwrap().status.success();
    if !exists {
        let made = std::process::Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .output()
            .unwrap();
        assert!(made.status.success() || String::from_utf8_lossy(&made.stderr).contains("exists"), "{made:?}");
    }
    let uid = std::process::Command::new("id").args(["-u", name]).output().unwrap();
    (name.to_owned(), String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap())
}

/// Issue 12 item 4: the application's hooks run as `hook_user` through `sudo -n -u`, with the
/// service's umask, so what they make in shared/ belongs to the web user and stays writable
/// by its group; a reload's service commands stay the SSH user's, its `php …` commands don't.
#[test]
fn hooks_run_as_the_hook_user_with_the_umask_and_reload_commands_split() {
    let (user, uid) = web_user();
    let out = "$RELEASE_BASE/shared/out";
    let extra = format!(
        "hook_user = \"{user}\"\numask = \"0002\"\n\
         hooks.finalize = [\"id -un > {out}/finalize-user; mkdir -p {out}/framework/cache; echo $RELEASE_DIGEST > {out}/digest\"]\n\
         hooks.reload = [\"id -un > {out}/reload-sh\", \"php -r 'echo exec(\\\"id -un\\\");' > {out}/reload-php\"]\n"
    );
    let fleet = Fleet::new(1, &extra);
    // The operator's part: shared/out belongs to the web user's group, set-group-ID.
    let shared_out = fleet.bases[0].join("shared/out");
    fs::create_dir_all(&shared_out).unwrap();
    std::os::unix::fs::chown(&shared_out, None, Some(primary_gid(&user))).unwrap();
    fs::set_permissions(&shared_out, fs::Permissions::from_mode(0o2775)).unwrap();

    let v1 = fleet.upload("v1", &[]);
    let live = fleet.deploy(&v1);
    assert_eq!(live["state"], "live", "{live}");
    let read = |name: &str| fs::read_to_string(shared_out.join(name)).unwrap().trim().to_owned();
    assert_eq!(read("finalize-user"), user);
    assert_eq!(read("digest"), v1, "the hook's variables reach it through sudo");
    assert_eq!(read("reload-php"), user, "a reload's php command is the application's");
    assert_eq!(read("reload-sh"), "root", "other reload commands stay the SSH user's");
    let made = fs::metadata(shared_out.join("framework/cache")).unwrap();
    assert_eq!(made.uid(), uid, "made by the web user");
    assert_eq!(made.mode() & 0o070, 0o070, "umask 0002: its group may write: {:o}", made.mode());
}

#[test]
fn a_hook_user_the_node_does_not_know_fails_the_prepare_naming_it() {
    let extra = "hook_user = \"release-no-such-user\"\nhooks.finalize = [\"true\"]\n";
    let fleet = Fleet::new(1, extra);
    let v1 = fleet.upload("v1", &[]);
    let failed = fleet.deploy(&v1);
    assert_eq!(failed["state"], "failed", "{failed}");
    let reason = failed["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("hook_user release-no-such-user is not a user on this node"), "{reason}");
}

fn primary_gid(user: &str) -> u32 {
    let out = std::process::Command::new("id").args(["-g", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `release check` warns, before it bites, on what the web user could not write in shared/
/// (issue 12 items 4 and 11), and passes once the operator gave it the group.
#[test]
fn release_check_warns_on_shared_entries_the_web_user_cannot_write() {
    let (user, _) = web_user();
    let root = tempfile::Builder::new().prefix("release-check-").tempdir().unwrap();
    let base = root.path().join("shop");
    fs::create_dir_all(base.join("shared/storage/framework/cache")).unwrap();
    let config = format!(
        "[service.shop]\nkind = \"generic\"\nshared = [\"storage\"]\nhook_user = \"{user}\"\n\
         [[service.shop.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\n",
        base.display()
    );
    let f = crate::releases::Fixture::with_config(&config);
    let check = || f.cli("alice").args(["check", "shop", "--env", "staging", "--json"]).assert_success().json();
    let ownership = |answer: &Value| {
        answer["nodes"][0]["checks"].as_array().unwrap().iter().find(|c| c["name"] == "ownership").unwrap().clone()
    };
    let answer = check();
    assert_eq!(answer["ok"], true, "a warning does not fail the check: {answer}");
    let row = ownership(&answer);
    assert_eq!(row["status"], "warn", "{row}");
    let message = row["message"].as_str().unwrap();
    assert!(message.contains(&format!("{user} cannot write 3 entries")) && message.contains("hook_user"), "{message}");

    let gid = primary_gid(&user);
    for dir in ["shared/storage", "shared/storage/framework", "shared/storage/framework/cache"] {
        std::os::unix::fs::chown(base.join(dir), None, Some(gid)).unwrap();
        fs::set_permissions(base.join(dir), fs::Permissions::from_mode(0o2775)).unwrap();
    }
    assert_eq!(ownership(&check())["status"], "pass");
}
