//! The server as a process: health, auth on every /v1 route, graceful shutdown, the data
//! directory lock, configuration errors, request logs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::StatusCode;

use crate::support::{Backend, TestCommand, TestServer, archives};

#[test]
fn healthz_needs_no_token() {
    let server = TestServer::start(Backend::Local);
    let response = server.http().get(format!("{}/healthz", server.url)).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[test]
fn every_v1_route_needs_a_token() {
    let server = TestServer::start(Backend::Local);
    let digest = format!("sha256:{}", "a".repeat(64));
    let routes = [
        ("POST", "/v1/artifacts?service=api".to_owned()),
        ("HEAD", format!("/v1/artifacts/{digest}")),
        ("GET", format!("/v1/artifacts/{digest}")),
        ("GET", format!("/v1/artifacts/{digest}/blob")),
        ("GET", "/v1/services/api/artifacts".to_owned()),
    ];
    for (method, path) in routes {
        let response = server
            .http()
            .request(method.parse().unwrap(), format!("{}{path}", server.url))
            .body(if method == "POST" { archives::valid("x") } else { vec![] })
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
    }
}

#[test]
fn reads_are_open_to_every_role_but_scoped_by_service() {
    let server = TestServer::start(Backend::Local);
    let ci = server.token("ci", "ci");
    for service in ["api", "play"] {
        let response = server
            .http()
            .post(format!("{}/v1/artifacts?service={service}", server.url))
            .bearer_auth(&ci)
            .body(archives::valid(service))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    for role in ["ci", "deployer", "approver", "auditor", "admin"] {
        let token = server.token(&format!("{role}-1"), role);
        let response =
            server.http().get(format!("{}/v1/services/api/artifacts", server.url)).bearer_auth(&token).send().unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{role}");
    }
    // Outside its scope, as if it did not exist (tests/it/scopes.rs has the whole story).
    let scoped = server.token_with("scoped", "auditor", &["--services", "api"]);
    let response =
        server.http().get(format!("{}/v1/services/play/artifacts", server.url)).bearer_auth(&scoped).send().unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[test]
fn sigterm_finishes_the_upload_in_flight_then_exits() {
    let mut server = TestServer::start(Backend::Local);
    let ci = server.token("ci", "ci");
    let body = archives::valid(&"q".repeat(50_000));
    let addr = server.url.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "POST /v1/artifacts?service=api HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ci}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..body.len() / 2]).unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let pid = server.pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    stream.write_all(&body[body.len() / 2..]).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let status = server.terminate_after_signal();
    assert!(status.success(), "exit status {status}");
    let log = server.log();
    assert!(log.contains("SIGTERM: shutting down") && log.contains("stopped"), "{log}");
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let server = TestServer::start(Backend::Local);
    let out = TestCommand::new()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", server.data_dir().to_str().unwrap()])
        .assert_exit(1);
    assert!(out.stderr().contains("another release server is using the data directory"), "{out}");
}

#[test]
fn a_bad_config_names_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("release.toml");
    std::fs::write(&config, "[server]\nlisten = \"127.0.0.1:0\"\n\n[limits]\nmax_upload_bytes = \"lots\"\n").unwrap();
    let out = TestCommand::new().args(["serve", "--config", config.to_str().unwrap()]).assert_exit(2);
    let err = out.stderr();
    assert!(err.contains("release.toml:5") && err.contains("limits.max_upload_bytes"), "{out}");
    std::fs::write(&config, "[sever]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = TestCommand::new().args(["serve", "--config", config.to_str().unwrap()]).assert_exit(2);
    assert!(out.stderr().contains("unknown field `sever`"), "{out}");
    // A key in the wrong kind of service is named too.
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\n[service.shop]\nkind = \"laravel\"\npm2_app = \"shop\"\n",
    )
    .unwrap();
    let out = TestCommand::new().args(["serve", "--config", config.to_str().unwrap()]).assert_exit(2);
    assert!(
        out.stderr().contains("service.shop.pm2_app") && out.stderr().contains("only node services run under PM2"),
        "{out}"
    );
}

/// `release serve --config FILE`, which must stop by itself within 30 s (a configuration it
/// accepts would have it serve until killed).
pub(crate) fn serve_refusing(config: &std::path::Path) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_release"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("RELEASE_DATA_DIR", config.with_file_name("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("release serve accepted {}", std::fs::read_to_string(config).unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    err
}

#[test]
fn a_node_host_or_user_ssh_could_read_as_an_option_stops_the_server_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("release.toml");
    let pwned = dir.path().join("pwned");
    let node = |host: &str, user: &str| {
        format!(
            "[service.web]\nkind = \"generic\"\n\n[[service.web.node]]\nenvironment = \"staging\"\n\
             host = \"{host}\"\nuser = \"{user}\"\nbase = \"/srv/web\"\n"
        )
    };
    std::fs::write(&config, node(&format!("-oProxyCommand=touch {}", pwned.display()), "deploy")).unwrap();
    let err = serve_refusing(&config);
    assert!(err.contains("release.toml:6: key `service.web.node[0].host`") && err.contains("is not a host"), "{err}");
    std::fs::write(&config, node("10.0.0.5", "deploy user")).unwrap();
    let err = serve_refusing(&config);
    assert!(err.contains("release.toml:7: key `service.web.node[0].user`") && err.contains("is not a user"), "{err}");
    // Every command that reads the configuration refuses it the same way.
    let out = TestCommand::new().args(["token", "list", "--config", config.to_str().unwrap()]).assert_exit(2);
    assert!(out.stderr().contains("service.web.node[0].user"), "{out}");
    assert!(!pwned.exists());
}

#[test]
fn init_writes_a_config_that_serve_accepts_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    TestCommand::new().args(["init", dir.path().to_str().unwrap()]).assert_success();
    let config = dir.path().join("release.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("[limits]") && text.contains("# "));
    // Ready to run where it was written: the data and the example's local nodes under DIR.
    let under = dir.path().display().to_string();
    assert!(text.contains(&format!("data_dir = \"{under}/data\"")), "{text}");
    assert!(text.contains(&format!("base = \"{under}/nodes/staging/api\"")), "{text}");
    assert!(!text.contains("/tmp/release-tour"), "{text}");
    let again = TestCommand::new().args(["init", dir.path().to_str().unwrap()]).assert_exit(3);
    assert!(again.stderr().contains("exists already"), "{again}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), text);
}

#[test]
fn flags_win_over_environment_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("release.toml");
    let file_dir = dir.path().join("from-file");
    let env_dir = dir.path().join("from-env");
    let flag_dir = dir.path().join("from-flag");
    std::fs::write(&config, format!("[server]\ndata_dir = \"{}\"\n", file_dir.display())).unwrap();
    // token create opens the registry in the data dir it resolves.
    let create = |name: &str, extra: &[&str], env: Option<&std::path::Path>| {
        let mut cmd = TestCommand::new();
        cmd.args(["token", "create", name, "--role", "admin", "--owner", "ops", "--config", config.to_str().unwrap()])
            .args(extra);
        if let Some(env) = env {
            cmd.env("RELEASE_DATA_DIR", env);
        }
        cmd.assert_success();
    };
    create("a", &[], None);
    create("b", &[], Some(&env_dir));
    create("c", &["--data-dir", flag_dir.to_str().unwrap()], Some(&env_dir));
    assert!(file_dir.join("registry.db").exists());
    assert!(env_dir.join("registry.db").exists());
    assert!(flag_dir.join("registry.db").exists());
}

#[test]
fn one_log_line_per_request_without_secrets() {
    let server = TestServer::start(Backend::Local);
    let token = server.token("auditor", "auditor");
    for _ in 0..3 {
        server.http().get(format!("{}/v1/status", server.url)).bearer_auth(&token).send().unwrap();
    }
    let log = server.log();
    let lines: Vec<_> = log.lines().filter(|l| l.contains("path=/v1/status")).collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(lines.iter().all(|l| l.contains("status=200") && l.contains("actor=auditor")), "{log}");
    assert!(!log.contains(&token[4..]), "the token's secret appears in the log");
}

#[test]
fn errors_are_json_documents_even_for_unknown_routes_and_bad_queries() {
    let server = TestServer::start(Backend::Local);
    let token = server.token("auditor", "auditor");
    let cases = [
        (reqwest::Method::GET, "/v1/nope".to_owned(), StatusCode::NOT_FOUND, "not_found"),
        (
            reqwest::Method::DELETE,
            format!("/v1/artifacts/sha256:{}", "a".repeat(64)),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            reqwest::Method::GET,
            "/v1/services/api/artifacts?limit=many".to_owned(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (reqwest::Method::GET, "/v1/artifacts/sha256:xyz".to_owned(), StatusCode::BAD_REQUEST, "bad_request"),
    ];
    for (method, path, status, code) in cases {
        let response =
            server.http().request(method.clone(), format!("{}{path}", server.url)).bearer_auth(&token).send().unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let body: serde_json::Value = response.json().unwrap();
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
    }
}

#[test]
fn a_token_scoped_to_services_sees_only_their_artifacts() {
    let server = TestServer::start(Backend::Local);
    let ci = server.token("ci", "ci");
    let upload = |service: &str, content: &str| -> String {
        let response = server
            .http()
            .post(format!("{}/v1/artifacts?service={service}", server.url))
            .bearer_auth(&ci)
            .body(archives::valid(content))
            .send()
            .unwrap();
        let answer: serde_json::Value = response.json().unwrap();
        answer["digest"].as_str().unwrap().to_owned()
    };
    let api = upload("api", "api code");
    let play = upload("play", "play code");
    let scoped = server.token_with("api-auditor", "auditor", &["--services", "api"]);
    for path in ["", "/blob"] {
        let ok =
            server.http().get(format!("{}/v1/artifacts/{api}{path}", server.url)).bearer_auth(&scoped).send().unwrap();
        assert_eq!(ok.status(), StatusCode::OK, "{path}");
        let hidden =
            server.http().get(format!("{}/v1/artifacts/{play}{path}", server.url)).bearer_auth(&scoped).send().unwrap();
        assert_eq!(hidden.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let head = server.http().head(format!("{}/v1/artifacts/{play}", server.url)).bearer_auth(&scoped).send().unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
}
