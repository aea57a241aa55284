//! The README's five-minute tour, run as written: every command of its block, in order, in
//! one shell, against the fresh server the tour itself starts.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tour's shell block, as the README holds it.
fn tour() -> &'static str {
    let readme = include_str!("../../README.md");
    let section = readme.split("\n## Five-minute tour\n").nth(1).expect("README.md has a Five-minute tour");
    let block = section.split("```sh\n").nth(1).expect("the tour has a sh block");
    block.split("\n```").next().unwrap()
}

#[test]
fn the_readme_tour_runs_as_written() {
    let dir = tempfile::Builder::new().prefix("release-tour-").tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // What differs from a reader's machine: the place (a fresh directory for /tmp/tour), the
    // port (a free one for 8080: in the script, and for the server and the CLI through
    // RELEASE_LISTEN and RELEASE_SERVER), and the binary (this build's).
    let (build, rest) = tour().split_once('\n').unwrap();
    assert!(build.starts_with("cargo build --release"), "the tour starts by building: {build}");
    let script = rest.replace("/tmp/tour", &dir.path().display().to_string()).replace(":8080", &format!(":{port}"));
    assert!(!script.contains("…"), "the tour has a placeholder no shell can run:\n{script}");
    let bin_dir = std::path::Path::new(crate::support::bin()).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    // The server the tour leaves running in the background ends with the shell.
    let prologue = "set -euo pipefail -x\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n";
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("{prologue}{script}"))
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("RELEASE_TOKEN")
        .env_remove("RELEASE_SERVER")
        .env_remove("RELEASE_CONFIG")
        .env_remove("RELEASE_DATA_DIR")
        .env("RELEASE_LISTEN", format!("127.0.0.1:{port}"))
        .env("RELEASE_SERVER", format!("http://127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let shown = format!("--- stdout\n{stdout}\n--- stderr (each command after +)\n{stderr}");
    assert!(status.success(), "the tour stopped ({status}) at the last command below\n{shown}");

    // What a reader sees: v1 live in production, then v2, then v1 again after the rollback.
    let served: Vec<&str> = stdout.lines().filter(|l| l.starts_with("<?php")).collect();
    assert_eq!(served, [r#"<?php echo "v1";"#, r#"<?php echo "v1";"#], "{shown}");
    for live in ["release 1 is live", "release 2 is live", "release 3 is live", "release 4 is live"] {
        assert!(stdout.contains(live), "{live}\n{shown}");
    }
    let production = dir.path().join("nodes/production/api/current/public/index.php");
    assert_eq!(std::fs::read_to_string(production).unwrap(), "<?php echo \"v1\";\n");
}

#[test]
fn a_server_on_the_embedded_default_says_how_to_give_it_services() {
    // The tour's first trap, before it was fixed: `release serve` without --config runs the
    // embedded default, which has no services, and a deploy was told only "not configured".
    let dir = tempfile::Builder::new().prefix("release-default-").tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let server = Command::new(crate::support::bin())
        .args(["serve", "--data-dir", data.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("RELEASE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _server = KillOnDrop(server);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::blocking::get(format!("{url}/healthz")).is_err() {
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(dir.path().join("server.log")).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let cli = || {
        let mut cmd = crate::support::TestCommand::new();
        cmd.env("RELEASE_SERVER", &url).env("RELEASE_DATA_DIR", &data);
        cmd
    };
    let token = cli().args(["token", "create", "ci", "--role", "ci", "--json"]).assert_success().json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let digest = format!("sha256:{}", "0".repeat(64));
    let out = cli().env("RELEASE_TOKEN", token).args(["deploy", "api", "--env", "staging", &digest]).run();
    assert_ne!(out.output.status.code(), Some(0), "{out}");
    let said = out.stderr();
    assert!(said.contains("\"api\" is not in the configuration"), "{out}");
    assert!(said.contains("embedded default") && said.contains("release serve --config"), "{out}");
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
