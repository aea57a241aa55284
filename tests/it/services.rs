//! Real services on a local node: a Laravel app under Apache with mod_php and a Node.js app
//! under PM2 in cluster mode. Each shows the new version right after the switch and the old
//! one right after a rollback, with a bounded load loop running through both: no failed
//! request, every answer entirely old or entirely new. And the verify step catches the two
//! traps these servers set: mod_php serving the old code after a bare switch, and PM2
//! processes running from an old release directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use crate::releases::Fixture;
use crate::support::services::{self, Apache, Pm2};

fn node_toml(service: &str, base: &Path, migrate: bool) -> String {
    format!(
        "[[service.{service}.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\nmigrate = {migrate}\n",
        base.display()
    )
}

fn upload_dir(f: &Fixture, service: &str, dir: &Path) -> String {
    let out =
        f.cli("ci").args(["upload", dir.to_str().unwrap(), "--service", service, "--json"]).assert_success().json();
    out["digest"].as_str().unwrap().to_owned()
}

/// Deploys and waits; the release as `show` tells it (live or not).
fn deploy(f: &Fixture, service: &str, digest: &str) -> Value {
    f.cli("ci").args(["deploy", service, "--env", "staging", digest, "--wait", "--json"]).run().json()
}

fn get(url: &str) -> String {
    reqwest::blocking::get(url).unwrap().text().unwrap()
}

/// Runs `during` with a load loop on `url`; asserts no request failed and every answer is one
/// of `expected` (old or new, never a mix or an error).
fn under_load<T>(url: &str, expected: &[String], during: impl FnOnce() -> T) -> T {
    let stop = Arc::new(AtomicBool::new(false));
    let loader = services::load(url.to_owned(), Arc::clone(&stop));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let result = during();
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let answers = loader.join().unwrap();
    assert!(answers.len() > 20, "the load loop ran: {} requests", answers.len());
    let bad: Vec<&(u16, String)> =
        answers.iter().filter(|(status, body)| *status != 200 || !expected.contains(body)).collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests failed or mixed versions: {:?}",
        bad.len(),
        answers.len(),
        &bad[..bad.len().min(5)]
    );
    eprintln!("{url}: {} requests, all old or new", answers.len());
    result
}

fn scratch(prefix: &str) -> PathBuf {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap().keep()
}

/// The Laravel service `shop` on one local node at `root/shop` served by `apache`, its health
/// check naming the digest, reloaded by `reload` (TOML strings), with builds v1 and v2 of the
/// app uploaded: the fixture and their digests.
fn laravel_shop(root: &Path, apache: &Apache, reload: &str) -> (Fixture, String, String) {
    let config = format!(
        "[service.shop]\nkind = \"laravel\"\nhealth = {{ url = \"{}\", expect = \"{{digest}}\" }}\n\
         hooks.finalize = [\"echo $RELEASE_DIGEST > REVISION\", \"php artisan optimize\"]\n\
         hooks.reload = [{reload}]\n{}",
        apache.url("/version"),
        node_toml("shop", &root.join("shop"), true)
    );
    let f = Fixture::with_config(&config);
    let (src1, src2) = (root.join("v1"), root.join("v2"));
    services::laravel_app(&src1, "v1");
    services::laravel_app(&src2, "v2");
    let v1 = upload_dir(&f, "shop", &src1);
    let v2 = upload_dir(&f, "shop", &src2);
    (f, v1, v2)
}

#[test]
fn a_laravel_app_under_apache_deploys_and_rolls_back_with_zero_downtime() {
    let root = scratch("release-laravel-");
    let base = root.join("shop");
    services::laravel_shared(&base);
    let apache = Apache::configure(&base, 4);
    let (f, v1, v2) = laravel_shop(&root, &apache, &format!("{:?}, \"php artisan queue:restart\"", apache.graceful()));

    let first = deploy(&f, "shop", &v1);
    assert_eq!(first["state"], "live", "{first}\n{}", apache.log());
    assert_eq!(get(&apache.url("/version")), format!("v1 {v1}"));
    // The migration ran, once, on the migrate node, against the shared SQLite database.
    let db = rusqlite::Connection::open(base.join("shared/storage/database.sqlite")).unwrap();
    let tables: i64 =
        db.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'visits'", [], |r| r.get(0)).unwrap();
    assert_eq!(tables, 1);
    // What it ran with: `.env` by its hash, `storage/` as a directory (data, not hashed).
    let files = first["shared_files"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> =
        files.iter().map(|f| (f["path"].as_str().unwrap(), f["kind"].as_str().unwrap())).collect();
    assert_eq!(kinds, [(".env", "file"), ("storage", "directory")], "{first}");
    assert!(files[0]["sha256"].as_str().unwrap().starts_with("sha256:") && files[1]["sha256"].is_null());

    let expected = [format!("v1 {v1}"), format!("v2 {v2}")];
    let second = under_load(&apache.url("/version"), &expected, || deploy(&f, "shop", &v2));
    assert_eq!(second["state"], "live", "{second}");
    assert_eq!(get(&apache.url("/version")), format!("v2 {v2}"), "right after the switch");

    let back = under_load(&apache.url("/version"), &expected, || {
        f.cli("alice").args(["rollback", "shop", "--env", "staging", "--wait", "--json"]).assert_success().json()
    });
    assert_eq!(back["digest"], v1.as_str());
    assert_eq!(get(&apache.url("/version")), format!("v1 {v1}"), "right after the rollback");
}

#[test]
fn verify_catches_mod_php_serving_the_old_release_after_a_bare_switch() {
    let root = scratch("release-laravel-trap-");
    let base = root.join("shop");
    services::laravel_shared(&base);
    // One worker, so "the worker that served the old release" is the one that answers.
    let apache = Apache::configure(&base, 1);
    let (f, v1, v2) =
        laravel_shop(&root, &apache, &format!("{:?}, \"php artisan queue:restart\"", apache.start_once()));
    assert_eq!(deploy(&f, "shop", &v1)["state"], "live");
    assert_eq!(get(&apache.url("/version")), format!("v1 {v1}"));

    // Reload without a graceful restart: the switch happens, mod_php keeps serving v1.
    let second = deploy(&f, "shop", &v2);
    assert_eq!(second["state"], "failed", "{second}");
    let reason = second["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("health_failed"), "{reason}");
    assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(&v1[7..]), "switched back");
    assert_eq!(get(&apache.url("/version")), format!("v1 {v1}"));
}

fn node_service(pm2: &Pm2, base: &Path, reload: &str, health: bool) -> String {
    let health = if health {
        format!("health = {{ url = \"{}\", expect = \"{{digest}}\" }}\n", pm2.url())
    } else {
        String::new()
    };
    format!(
        "[service.web]\nkind = \"node\"\n{}\n{health}hooks.finalize = [\"echo $RELEASE_DIGEST > REVISION\"]\n\
         hooks.reload = [{reload:?}]\n{}",
        pm2.env_toml().replace(" }", &format!(", PORT = \"{}\" }}", pm2.port)),
        node_toml("web", base, false)
    )
}

#[test]
fn a_node_app_under_pm2_deploys_and_rolls_back_with_zero_downtime() {
    let root = scratch("release-pm2-");
    let base = root.join("web");
    fs::create_dir_all(base.join("shared")).unwrap();
    fs::write(base.join("shared/.env"), "NODE_ENV=production\n").unwrap();
    let pm2 = Pm2::new();
    // The first deploy starts the app (from `current`, as it should); later ones reload it.
    let reload = "pm2 reload web || pm2 start app.js -i 2 --name web --cwd $RELEASE_BASE/current";
    let f = Fixture::with_config(&node_service(&pm2, &base, reload, true));
    let (src1, src2) = (root.join("v1"), root.join("v2"));
    services::node_app(&src1, "v1");
    services::node_app(&src2, "v2");
    let v1 = upload_dir(&f, "web", &src1);
    let v2 = upload_dir(&f, "web", &src2);

    let first = deploy(&f, "web", &v1);
    assert_eq!(first["state"], "live", "{first}");
    assert_eq!(get(&pm2.url()), format!("v1 {v1}"));

    let expected = [format!("v1 {v1}"), format!("v2 {v2}")];
    let second = under_load(&pm2.url(), &expected, || deploy(&f, "web", &v2));
    assert_eq!(second["state"], "live", "{second}");
    assert_eq!(get(&pm2.url()), format!("v2 {v2}"), "right after the switch");
    assert!(
        second["deployments"].as_array().unwrap().iter().any(|d| d["phase"] == "verify pm2" && d["outcome"] == "ok"),
        "{second}"
    );

    let back = under_load(&pm2.url(), &expected, || {
        f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json()
    });
    assert_eq!(back["digest"], v1.as_str());
    assert_eq!(get(&pm2.url()), format!("v1 {v1}"), "right after the rollback");
}

#[test]
fn verify_catches_pm2_processes_running_from_an_old_release() {
    let root = scratch("release-pm2-trap-");
    let base = root.join("web");
    fs::create_dir_all(base.join("shared")).unwrap();
    fs::write(base.join("shared/.env"), "NODE_ENV=production\n").unwrap();
    let pm2 = Pm2::new();
    // The trap: the app was started from the resolved release directory, not from `current`;
    // `pm2 reload` then restarts it in the same (old) directory.
    let reload =
        "pm2 reload web || (cd $(readlink -f $RELEASE_BASE/current) && pm2 start app.js -i 2 --name web --cwd $(pwd))";
    let f = Fixture::with_config(&node_service(&pm2, &base, reload, false));
    let (src1, src2) = (root.join("v1"), root.join("v2"));
    services::node_app(&src1, "v1");
    services::node_app(&src2, "v2");
    let v1 = upload_dir(&f, "web", &src1);
    let v2 = upload_dir(&f, "web", &src2);
    assert_eq!(deploy(&f, "web", &v1)["state"], "live");

    let second = deploy(&f, "web", &v2);
    assert_eq!(second["state"], "failed", "{second}");
    let reason = second["transitions"].as_array().unwrap().last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("pm2_cwd") && reason.contains("not from the new release"), "{reason}");
    assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(&v1[7..]), "switched back");
}

#[test]
fn a_node_app_named_otherwise_in_pm2_is_reloaded_and_checked_by_its_pm2_app() {
    let root = scratch("release-pm2-app-");
    let base = root.join("web");
    fs::create_dir_all(base.join("shared")).unwrap();
    fs::write(base.join("shared/.env"), "NODE_ENV=production\n").unwrap();
    let pm2 = Pm2::new();
    // The service is `web`; in PM2 the app is `storefront`.
    let config = |reload: &str| {
        format!(
            "[service.web]\nkind = \"node\"\npm2_app = \"storefront\"\n{}\n\
             health = {{ url = \"{}\", expect = \"{{digest}}\" }}\nhooks.finalize = [\"echo $RELEASE_DIGEST > REVISION\"]\n\
             {reload}\n{}",
            pm2.env_toml().replace(" }", &format!(", PORT = \"{}\" }}", pm2.port)),
            pm2.url(),
            node_toml("web", &base, false)
        )
    };
    // The first deploy starts the app (from `current`) under its PM2 name.
    let start = "pm2 reload storefront || pm2 start app.js -i 2 --name storefront --cwd $RELEASE_BASE/current";
    let mut f = Fixture::with_config(&config(&format!("hooks.reload = [{start:?}]")));
    let (src1, src2) = (root.join("v1"), root.join("v2"));
    services::node_app(&src1, "v1");
    services::node_app(&src2, "v2");
    let v1 = upload_dir(&f, "web", &src1);
    let v2 = upload_dir(&f, "web", &src2);
    let first = deploy(&f, "web", &v1);
    assert_eq!(first["state"], "live", "{first}");
    assert_eq!(get(&pm2.url()), format!("v1 {v1}"));

    // A PM2 app named after the service runs from v1's directory, on a port of its own: the
    // check must not look at it (it would say "runs from v1"), and the reload must not touch it.
    let decoy_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = pm2
        .command()
        .current_dir(base.join("releases").join(&v1[7..]))
        .env("PORT", decoy_port.to_string())
        .args(["start", "app.js", "--name", "web"])
        .output()
        .unwrap();
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let decoy = format!("http://127.0.0.1:{decoy_port}/");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while reqwest::blocking::get(&decoy).is_err() {
        assert!(std::time::Instant::now() < deadline, "the decoy app never answered");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // From now on the kind's default reload: `pm2 reload storefront`.
    f.server.reconfigure(&config(""));
    let second = deploy(&f, "web", &v2);
    assert_eq!(second["state"], "live", "{second}");
    assert_eq!(get(&pm2.url()), format!("v2 {v2}"), "storefront was reloaded into v2");
    let verify = second["deployments"].as_array().unwrap().iter().find(|d| d["phase"] == "verify pm2").unwrap();
    assert_eq!(verify["outcome"], "ok", "{second}");
    assert!(verify["output_tail"].as_str().unwrap().contains("processes of storefront run from"), "{verify}");
    assert_eq!(get(&decoy), format!("v1 {v1}"), "the app named after the service was left alone");
}

/// A rotated `.env` value reaches a release rolled back to: `php artisan optimize` cached the
/// configuration when that release was first deployed, so the rollback finalizes it again.
#[test]
fn a_laravel_rollback_runs_with_the_env_as_it_is_now() {
    let root = scratch("release-laravel-env-");
    let base = root.join("shop");
    services::laravel_shared(&base);
    let env = base.join("shared/.env");
    fs::write(&env, format!("{}APP_GREETING=first\n", fs::read_to_string(&env).unwrap())).unwrap();
    let apache = Apache::configure(&base, 2);
    let (f, v1, v2) = laravel_shop(&root, &apache, &format!("{:?}", apache.graceful()));
    assert_eq!(deploy(&f, "shop", &v1)["state"], "live");
    assert_eq!(deploy(&f, "shop", &v2)["state"], "live");
    assert_eq!(get(&apache.url("/greeting")), "first");

    // The database password is rotated: the .env changes while v2 runs.
    let rotated = fs::read_to_string(&env).unwrap().replace("APP_GREETING=first", "APP_GREETING=rotated");
    fs::write(&env, rotated).unwrap();
    let back =
        f.cli("alice").args(["rollback", "shop", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(back["digest"], v1.as_str());
    assert_eq!(get(&apache.url("/version")), format!("v1 {v1}"));
    assert_eq!(get(&apache.url("/greeting")), "rotated", "the rolled-back release reads the .env as it is now");
    let prepare = back["deployments"].as_array().unwrap().iter().find(|d| d["phase"] == "prepare").unwrap().clone();
    assert!(prepare["output_tail"].as_str().unwrap().contains("finalized again with .env sha256:"), "{prepare}");
}

/// PM2 restarts a fork-mode app on `pm2 reload` (refusing connections meanwhile): the verify
/// phase says which exec mode the app runs in and warns for fork mode.
#[test]
fn verify_pm2_names_the_exec_mode_and_warns_for_fork_mode() {
    let root = scratch("release-pm2-fork-");
    let base = root.join("web");
    fs::create_dir_all(base.join("shared")).unwrap();
    fs::write(base.join("shared/.env"), "NODE_ENV=production\n").unwrap();
    let pm2 = Pm2::new();
    // Without -i: fork mode.
    let reload = "pm2 reload web || pm2 start app.js --name web --cwd $RELEASE_BASE/current";
    let f = Fixture::with_config(&node_service(&pm2, &base, reload, true));
    let src = root.join("v1");
    services::node_app(&src, "v1");
    let v1 = upload_dir(&f, "web", &src);
    let first = deploy(&f, "web", &v1);
    assert_eq!(first["state"], "live", "{first}");
    let verify = first["deployments"].as_array().unwrap().iter().find(|d| d["phase"] == "verify pm2").unwrap().clone();
    let output = verify["output_tail"].as_str().unwrap();
    assert!(output.contains("(exec mode: fork)"), "{output}");
    assert!(output.contains("warning: web runs in fork mode") && output.contains("cluster mode"), "{output}");
}
