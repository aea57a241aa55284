//! HTTPS served directly (`[server] tls_cert`/`tls_key`): the certificate read at start and
//! again on SIGHUP, a bad one refused at start and kept out on a reload.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{Backend, TestCommand, TestServer, certs};

/// `GET /healthz` with curl trusting only `ca`: whether the handshake and the answer succeeded.
fn healthy_with(url: &str, ca: &Path) -> bool {
    let out = std::process::Command::new("curl")
        .args(["-sf", "--max-time", "5", "--cacert", ca.to_str().unwrap(), &format!("{url}/healthz")])
        .output()
        .unwrap();
    out.status.success()
}

#[test]
fn https_served_directly_and_the_certificate_reloaded_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (first_ca, second_ca) = (certs::ca(d, "first"), certs::ca(d, "second"));
    let (first_cert, first_key) = certs::leaf(d, "first", "leaf1");
    let (second_cert, second_key) = certs::leaf(d, "second", "leaf2");
    let (cert, key) = (d.join("cert.pem"), d.join("key.pem"));
    std::fs::copy(&first_cert, &cert).unwrap();
    std::fs::copy(&first_key, &key).unwrap();
    let server = TestServer::start_with_server(
        Backend::Local,
        &format!("tls_cert = \"{}\"\ntls_key = \"{}\"\n", cert.display(), key.display()),
        "",
    );
    assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);
    assert!(healthy_with(&server.url, &first_ca));
    assert!(!healthy_with(&server.url, &second_ca), "a certificate of another CA is not served");
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = server.url.replace("https://", "http://");
    assert!(reqwest::blocking::get(format!("{plain}/healthz")).map_or(true, |r| !r.status().is_success()));

    // The CLI, trusting the first CA the usual way (SSL_CERT_FILE).
    let ci = server.token("ci", "ci");
    let out = server
        .cli()
        .env("SSL_CERT_FILE", &first_ca)
        .env("RELEASE_TOKEN", &ci)
        .args(["status", "--json"])
        .assert_success();
    assert_eq!(out.json(), serde_json::json!([]), "{out}");

    // Renewed, as certbot does: new files, then SIGHUP. New connections get the new pair.
    std::fs::copy(&second_cert, &cert).unwrap();
    std::fs::copy(&second_key, &key).unwrap();
    hangup(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !healthy_with(&server.url, &second_ca) {
        assert!(Instant::now() < deadline, "the renewed certificate was not served\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!healthy_with(&server.url, &first_ca));

    // A broken renewal is logged and kept out: the pair in use stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    hangup(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("certificate not reloaded") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(healthy_with(&server.url, &second_ca), "{}", server.log());
}

#[test]
fn a_certificate_that_does_not_load_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs::ca(d, "ca");
    let (cert, key) = certs::leaf(d, "ca", "leaf");
    let (_, other_key) = certs::leaf(d, "ca", "other");
    for (cert, key, named) in [
        (d.join("missing.pem"), key.clone(), "server.tls_cert"),
        (cert.clone(), d.join("ca.pem"), "server.tls_key"),
        (cert.clone(), other_key, "server.tls_cert and tls_key"),
    ] {
        let config = d.join("release.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
                d.join("data").display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let out = TestCommand::new().args(["serve", "--config", config.to_str().unwrap()]).assert_exit(1);
        assert!(out.stderr().contains(named), "{named}\n{out}");
    }
}

fn hangup(server: &TestServer) {
    // SAFETY: a signal to the server process this test started.
    assert_eq!(unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) }, 0);
}

#[test]
fn without_tls_a_sighup_is_logged_and_the_server_keeps_serving() {
    // `systemctl reload release` sends SIGHUP whatever the configuration: it must not stop it.
    let server = TestServer::start(Backend::Local);
    hangup(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("SIGHUP: nothing to reload") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = reqwest::blocking::get(format!("{}/healthz", server.url)).unwrap();
    assert!(answer.status().is_success());
}
