//! What a client can make the server hold by asking much and taking little: an audit export
//! that the client never reads holds no thread (each held one until `send_timeout`, so a few
//! hundred took all 512 and every other request waited); a token signs in a bounded number
//! of times (each sign-in is written); idle connections up to the cap leave descriptors for
//! the registry; long-polls woken by every write share one look at their release instead of
//! each taking a blocking thread; downloads nobody reads hold a few hundred KiB each. Every
//! load below is bounded in connections, bytes and time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Backend, TestServer};

/// `Threads:` and `VmRSS:` (bytes) of a process.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Threads:"), field("VmRSS:") * 1024)
}

/// Appends `n` events to the server's audit log (another writer beside the server, as the
/// command line is), in one transaction.
fn grow_audit_log(server: &TestServer, n: usize) {
    let registry = release::registry::Registry::open(&server.data_dir().join("registry.db")).unwrap();
    let events: Vec<_> = (0..n)
        .map(|i| {
            release::audit::NewEvent::by_server(
                release::audit::AuditAction::ArtifactUpload,
                format!("filler/{i}"),
                json!({"note": "an event of an ordinary size, as a release or a refusal writes", "i": i}),
            )
        })
        .collect();
    registry.append_events(&events).unwrap();
}

/// Asks for `path` and never reads the answer.
fn unread(server: &TestServer, path: &str, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.url.strip_prefix("http://").unwrap()).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    stream
}

#[test]
fn audit_exports_left_unread_hold_no_thread() {
    let server = TestServer::start(Backend::Local);
    let auditor = server.token("audrey", "auditor");
    let bystander = server.token("bob", "deployer");
    grow_audit_log(&server, 60_000);
    let pid = server.pid();
    // Warm: one export read whole, so the threads and pages a single export needs are there.
    let whole = server.http().get(format!("{}/v1/audit/events", server.url)).bearer_auth(&auditor).send().unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert!(whole.text().unwrap().lines().count() > 60_000);
    std::thread::sleep(Duration::from_secs(11)); // tokio ends blocking threads idle for 10 s
    let (threads_before, rss_before) = threads_and_rss(pid);

    const EXPORTS: usize = 40;
    let held: Vec<TcpStream> = (0..EXPORTS)
        .map(|i| {
            let path = if i % 2 == 0 { "/v1/audit/events" } else { "/audit/export.jsonl" };
            unread(&server, path, &auditor)
        })
        .collect();
    // Each export reads pages while the socket takes them, then should hold no thread: tokio
    // ends a blocking thread idle for 10 s. Unfixed, each held one until `send_timeout` (60 s).
    std::thread::sleep(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut threads, mut rss) = threads_and_rss(pid);
    let mut most = threads;
    while threads >= threads_before + 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        (threads, rss) = threads_and_rss(pid);
        most = most.max(threads);
    }
    let started = Instant::now();
    let answer = server.http().get(format!("{}/v1/releases", server.url)).bearer_auth(&bystander).send().unwrap();
    let bystander_took = started.elapsed();
    assert_eq!(answer.status(), StatusCode::OK);
    eprintln!(
        "{EXPORTS} unread exports: threads {threads_before} -> {most} -> {threads}, RSS {} -> {} MiB, \
         a bystander's request {bystander_took:?}",
        rss_before >> 20,
        rss >> 20
    );
    assert!(threads < threads_before + 10, "unread exports hold threads: {threads_before} -> {threads}");
    assert!(bystander_took < Duration::from_secs(10), "{bystander_took:?}");
    drop(held);
}

#[test]
fn a_token_signs_in_a_bounded_number_of_times() {
    let server = TestServer::start(Backend::Local);
    let auditor = server.token("audrey", "auditor");
    let other = server.token("olga", "auditor");
    let client = reqwest::blocking::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let login = |token: &str| client.post(format!("{}/login", server.url)).form(&[("token", token)]).send().unwrap();
    let events = || server.count("SELECT count(*) FROM audit_events WHERE action = 'web.login'");
    for _ in 0..20 {
        assert_eq!(login(&auditor).status(), StatusCode::SEE_OTHER);
    }
    let (sessions, logged) = (server.count("SELECT count(*) FROM web_sessions"), events());
    for _ in 0..50 {
        let refused = login(&auditor);
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let seconds: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=3600).contains(&seconds), "Retry-After: {seconds}");
        assert!(refused.text().unwrap().contains("signed in 20 times"));
    }
    // Nothing written for those; another token signs in as usual.
    assert_eq!((server.count("SELECT count(*) FROM web_sessions"), events()), (sessions, logged));
    assert_eq!(login(&other).status(), StatusCode::SEE_OTHER);
    assert_eq!(events(), logged + 1);
}

#[test]
fn idle_connections_up_to_the_cap_leave_descriptors_for_the_registry() {
    // The soft limit systemd gives a service (1,024, here 256 to be quick) is below
    // limits.max_connections: the server raises it to the hard limit at start.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("release.toml");
    let data = dir.path().join("data");
    // One source may hold every connection here: what is tested is the descriptors, which
    // strangers on many addresses could take (one address alone is held to 256).
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[limits]\nmax_connections_per_source = 1024\n",
            data.display()
        ),
    )
    .unwrap();
    let token = {
        let out = crate::support::TestCommand::new()
            .args(["token", "create", "bob", "--role", "deployer", "--owner", "bob", "--json"])
            .env("RELEASE_DATA_DIR", &data)
            .assert_success();
        out.json()["token"].as_str().unwrap().to_owned()
    };
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = std::process::Command::new("bash")
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" serve --config \"$1\""])
        .arg(crate::support::bin())
        .arg(&config)
        .env_remove("RELEASE_CONFIG")
        .env_remove("RELEASE_DATA_DIR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{url}/healthz")).send().is_err() {
        assert!(Instant::now() < deadline, "the server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();

    // A stranger opens 400 connections and sends nothing (the header timeout is 10 s).
    let idle: Vec<TcpStream> = (0..600).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let answer = http.get(format!("{url}/v1/releases")).bearer_auth(&token).send();
    let took = started.elapsed();
    drop(idle);
    let _ = child.kill();
    let _ = child.wait();
    let server_log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "the soft limit was not raised: {open_files}");
    let answer = answer.unwrap_or_else(|e| panic!("the bystander got no answer in {took:?}: {e}\n{server_log}"));
    assert_eq!(answer.status(), StatusCode::OK, "{server_log}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn long_polls_woken_by_every_write_share_one_look() {
    let f = crate::releases::Fixture::new();
    let digest = f.upload("v1");
    let id = crate::releases::pending_promotion(&f, &digest);
    let pid = f.server.pid();
    // 250 long-polls that no write will satisfy (seen is beyond anything), held 30 s: as many
    // as one address may hold (`max_connections_per_source`, 256) less a few.
    let polls: Vec<TcpStream> = (0..250)
        .map(|_| unread(&f.server, &format!("/v1/releases/{id}?seen=1000&wait=30"), f.token("carol")))
        .collect();
    std::thread::sleep(Duration::from_secs(11)); // the threads that authenticated them end
    let (threads_before, _) = threads_and_rss(pid);
    // Each upload is a write, and each write wakes every long-poll to look again.
    let sampling = std::sync::atomic::AtomicBool::new(true);
    let most = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(threads_and_rss(pid).0);
                std::thread::sleep(Duration::from_millis(10));
            }
            most
        });
        for i in 0..20 {
            f.upload(&format!("w{i}"));
        }
        sampling.store(false, std::sync::atomic::Ordering::SeqCst);
        sampler.join().unwrap()
    });
    eprintln!("250 long-polls, 20 writes: threads {threads_before} -> at most {most}");
    assert!(most < threads_before + 40, "the long-polls' re-checks took {threads_before} -> {most} threads");
    drop(polls);
}

/// Downloads whose client reads nothing once held ~2.2 MiB each in the server (the local store
/// was read in 1 MiB pieces: one queued for the connection, one read ahead), so that a few
/// hundred of one token's took gigabytes (F3 of the stop-33 attack: 439 MiB for these 200). A
/// token's download is read in 64 KiB pieces now: ~130 MiB for 200.
#[test]
fn downloads_nobody_reads_hold_little_memory() {
    const DOWNLOADS: usize = 200;
    let server = TestServer::start(Backend::Local);
    let (status, stored) = server.upload_as_new_ci(crate::timeouts::archive_of(8 << 20));
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    let digest = stored["digest"].as_str().unwrap().to_owned();
    let auditor = server.token("audrey", "auditor");
    let path = format!("/v1/artifacts/{digest}/blob");
    // One download read whole first, so that what the allocator keeps for it is not counted.
    let whole = server.http().get(format!("{}{path}", server.url)).bearer_auth(&auditor).send().unwrap();
    assert_eq!(whole.bytes().unwrap().len() as u64, stored["size"].as_u64().unwrap());
    let (_, before) = threads_and_rss(server.pid());

    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auditor}\r\n\r\n");
    let unread: Vec<TcpStream> = (0..DOWNLOADS)
        .map(|_| {
            let mut stream = crate::support::raw::connect(&server.url);
            stream.write_all(head.as_bytes()).unwrap();
            stream
        })
        .collect();
    // Each is answered, and the server writes until the socket's buffers are full.
    for stream in &unread {
        let mut first = [0u8; 12];
        stream.try_clone().unwrap().read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
    }
    std::thread::sleep(Duration::from_secs(2));
    let (_, after) = threads_and_rss(server.pid());
    let grew = after.saturating_sub(before);
    eprintln!("{DOWNLOADS} downloads nobody reads: the server grew by {} MiB", grew >> 20);
    assert!(grew < 200 << 20, "{DOWNLOADS} unread downloads took {} MiB", grew >> 20);
    // And the server answers meanwhile.
    let response = server.http().get(format!("{}/v1/artifacts/{digest}", server.url)).bearer_auth(&auditor).send();
    assert_eq!(response.unwrap().status(), StatusCode::OK);
    drop(unread);
}
