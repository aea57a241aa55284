//! Hostile archives (issue 10 items 4 and 5): shapes that once cost the checker gigabytes or
//! seconds of CPU, and shapes no node could unpack. Each is refused at ingest (`422`, CLI exit
//! 6) with a message naming the entry, nothing stored, the server's memory bounded.

use std::io::Write;

use reqwest::StatusCode;

use crate::support::archives::{DIRECTORY, REGULAR, RawTar, SYMLINK, letters, zstd};
use crate::support::{Backend, TestServer};

/// A `tar`+`zstd` stream compressed as it is written, entry by entry, so a hostile archive of
/// hundreds of megabytes unpacked never sits whole in the test's memory.
struct Streamed(zstd::stream::write::Encoder<'static, Vec<u8>>);

impl Streamed {
    fn new() -> Streamed {
        Streamed(zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap())
    }

    fn add(&mut self, entry: RawTar) {
        self.0.write_all(&entry.unfinished()).unwrap();
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.write_all(&[0u8; 1024]).unwrap();
        self.0.finish().unwrap()
    }
}

/// 10,000 symbolic links, each named by a path of ~60 KB (components of 200 bytes): ~93 KB
/// compressed. The checker once kept every name whole (~690 MB).
fn long_symlinks() -> Vec<u8> {
    let mut tar = Streamed::new();
    let middle = format!("{}/", "y".repeat(200)).repeat(299);
    for i in 0..10_000 {
        tar.add(RawTar::new().long(&format!("s{i}/{middle}link"), SYMLINK, "target", b""));
    }
    tar.finish()
}

/// A symbolic link, then 20 files 30,000 directories deep: a few hundred bytes compressed. The
/// checker once hashed every ancestor of every path (quadratic in the depth).
fn deep_paths() -> Vec<u8> {
    let mut tar = Streamed::new();
    tar.add(RawTar::new().symlink("link", "target"));
    let deep = "a/".repeat(29_999);
    for i in 0..20 {
        tar.add(RawTar::new().long(&format!("{deep}f{i}"), REGULAR, "", b"x"));
    }
    tar.finish()
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Uploads a hostile archive; asserts the refusal (422 `unsafe_archive`, a message containing
/// `says`, nothing stored) and that it cost the server at most `max_growth` bytes of peak
/// resident memory. Prints what it cost.
fn refused_cheaply(server: &TestServer, what: &str, body: Vec<u8>, says: &str, max_growth: u64) {
    let size = body.len();
    let peak_before = server.peak_rss();
    let cpu_before = cpu_seconds(server.pid());
    let (status, answer) = server.upload_as_new_ci(body);
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    let peak = server.peak_rss();
    eprintln!(
        "{what}: {size} bytes uploaded; server CPU {cpu:.2} s, peak RSS {:.1} MiB (before: {:.1} MiB); {answer}",
        peak as f64 / (1 << 20) as f64,
        peak_before as f64 / (1 << 20) as f64,
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "unsafe_archive", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "message {message:?} should contain {says:?}");
    assert!(message.len() < 400, "the message is cut to a readable length: {} bytes", message.len());
    assert!(peak <= peak_before + max_growth, "peak RSS grew from {peak_before} to {peak} bytes");
    server.assert_nothing_stored();
}

#[test]
fn ten_thousand_symlinks_with_long_names_are_refused_in_bounded_memory() {
    let server = TestServer::start(Backend::Local);
    let body = long_symlinks();
    assert!(body.len() < 200_000, "a small upload: {} bytes", body.len());
    refused_cheaply(&server, "10,000 symlinks x 60 KB names", body, "longer than 4095 bytes", 32 << 20);
}

#[test]
fn paths_thirty_thousand_directories_deep_are_refused() {
    let server = TestServer::start(Backend::Local);
    let body = deep_paths();
    assert!(body.len() < 2_000, "a tiny upload: {} bytes", body.len());
    refused_cheaply(&server, "20 entries x 30,000 components", body, "longer than 4095 bytes", 32 << 20);
}

#[test]
fn the_same_path_twice_is_refused_naming_it() {
    let server = TestServer::start(Backend::Local);
    let twice =
        zstd(&RawTar::new().dir("public").file("public/index.php", b"a").file("public/index.php", b"b").finish());
    refused_cheaply(&server, "a file twice", twice, "\"public/index.php\"", 32 << 20);
}

#[test]
fn a_file_then_a_directory_of_its_name_is_refused_and_the_cli_exits_6() {
    let server = TestServer::start(Backend::Local);
    let archive = zstd(&RawTar::new().file("public", b"x").entry("public/", DIRECTORY, 0o755, "", b"").finish());
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("conflict.tar.zst");
    std::fs::write(&path, &archive).unwrap();
    let ci = server.token("ci", "ci");
    let out = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", path.to_str().unwrap(), "--service", "api"])
        .assert_exit(6);
    assert!(out.stderr().contains("\"public\""), "{}", out.stderr());
    refused_cheaply(&server, "a file then a directory", archive, "\"public\"", 32 << 20);
}

#[test]
fn a_directory_listed_twice_is_accepted() {
    // GNU tar writes a directory twice when it is named twice on its command line; a node
    // makes it once, so nothing stops a deploy.
    let server = TestServer::start(Backend::Local);
    let archive = zstd(&RawTar::new().dir("public").file("public/index.php", b"<?php").dir("public").finish());
    let (status, answer) = server.upload_as_new_ci(archive);
    assert_eq!(status, StatusCode::CREATED, "{answer}");
}

/// `count` empty files in one directory 18 deep whose names are 200 of `letter`, each named
/// by a path of ~3,600 bytes: a few hundred KB compressed.
fn long_named_files(letter: char, count: u32) -> Vec<u8> {
    let mut tar = Streamed::new();
    let middle = format!("{}/", letter.to_string().repeat(200)).repeat(18);
    for i in 0..count {
        tar.add(RawTar::new().long(&format!("{middle}f{i}"), REGULAR, "", b""));
    }
    tar.finish()
}

/// Uploads `body` (`files` regular files); asserts it is stored, and that it cost the server
/// at most `max_growth` bytes of peak resident memory. Prints what it cost. Whether the
/// registry names an index for it.
fn uploaded_cheaply(server: &TestServer, what: &str, body: Vec<u8>, files: u64, max_growth: u64) -> bool {
    let (size, digest) = (body.len(), release::digest::Digest::of(&body));
    let peak_before = server.peak_rss();
    let started = std::time::Instant::now();
    let (status, answer) = server.upload_as_new_ci(body);
    let peak = server.peak_rss();
    eprintln!(
        "{what}: {size} bytes uploaded in {:.1} s; server peak RSS {:.1} MiB (before: {:.1} MiB)",
        started.elapsed().as_secs_f64(),
        peak as f64 / (1 << 20) as f64,
        peak_before as f64 / (1 << 20) as f64,
    );
    assert_eq!(status, reqwest::StatusCode::CREATED, "{answer}");
    assert!(peak <= peak_before + max_growth, "peak RSS grew from {peak_before} to {peak} bytes");
    let conn = rusqlite::Connection::open_with_flags(
        server.data_dir().join("registry.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let count = |sql: &str| -> u64 { conn.query_row(sql, [digest.to_string()], |r| r.get(0)).unwrap() };
    assert_eq!(count("SELECT file_count FROM artifacts WHERE digest = ?1"), files, "the artifact is recorded");
    count("SELECT count(*) FROM artifact_indexes WHERE digest = ?1") == 1
}

/// [`uploaded_cheaply`], for an upload whose index no reader would take: it is stored
/// without one, and the log says why.
fn stored_without_index_cheaply(server: &TestServer, what: &str, body: Vec<u8>, files: u64, max_growth: u64) {
    assert!(!uploaded_cheaply(server, what, body, files, max_growth), "no index named");
    assert!(server.log().contains("no file index"), "the server says why");
}

/// 150,000 empty files in one directory 19 deep, each named by a path of ~3,600 bytes
/// (components of 200): ~580 KB compressed, ~540 MB of paths. Their index would be larger
/// than any reader takes (`MAX_INDEX_BYTES`, 256 MiB): the ingest once listed them all (and
/// made the JSON of them) before it found that out.
#[test]
fn an_upload_whose_index_would_be_too_large_is_stored_without_one_in_bounded_memory() {
    let server = TestServer::start(Backend::Local);
    // The listing stops at the budget (~71,000 of these files): it grew 304 MiB here, and
    // 1.65 GiB when every path was listed and made into JSON.
    let body = long_named_files('y', 150_000);
    stored_without_index_cheaply(&server, "150,000 files x 3.6 KB paths", body, 150_000, 400 << 20);
}

/// 20,000 empty files named by paths of control characters, which JSON writes six bytes each
/// (`\u0001`): 80 MB of paths made 460 MB of JSON when the listing counted them one byte each.
#[test]
fn paths_of_control_characters_count_as_their_json_takes() {
    let server = TestServer::start(Backend::Local);
    let body = long_named_files('\u{1}', 20_000);
    stored_without_index_cheaply(&server, "20,000 files x 3.6 KB control paths", body, 20_000, 200 << 20);
}

/// 65,000 of the same files: an index of 234 MB of paths, just within what a reader takes.
/// It is stored, and costs its listing and its compressed forms: ~330 MiB here, where making
/// its JSON and then its sent form whole beside the listing grew the server 675 MiB.
#[test]
fn an_index_just_within_the_limit_is_stored_and_costs_about_its_listing() {
    let server = TestServer::start(Backend::Local);
    let body = long_named_files('y', 65_000);
    assert!(uploaded_cheaply(&server, "65,000 files x 3.6 KB paths", body, 65_000, 400 << 20), "the index is named");
}

/// One file after `headers` global PAX headers, each a `comment` of 64 KiB of letters, which
/// zstd shrinks to about 60% and the walk passes over: all of it would go into the skeleton.
fn global_headers(headers: u64) -> Vec<u8> {
    let mut tar = Streamed::new();
    for n in 0..headers {
        let value = String::from_utf8(letters(n, (64 << 10) - 32)).unwrap();
        let record = |len: usize| format!("{len} comment={value}\n");
        let mut len = record(0).len();
        while record(len).len() != len {
            len = record(len).len();
        }
        tar.add(RawTar::new().entry("pax_global_header", b'g', 0o644, "", record(len).as_bytes()));
    }
    tar.add(RawTar::new().file("public/index.php", b"<?php echo 1;"));
    tar.finish()
}

/// 2,000 global PAX headers: 125 MiB of letters, ~78 MiB compressed, past what a prepare
/// sends of a skeleton (`MAX_WIRE_BYTES`, 48 MiB). The skeleton is dropped as soon as it
/// passes that, and the file is indexed. Where the skeleton's room was only what the listing
/// left (192 MiB), and its base64 and the sent form were made whole, such uploads cost ~750 MiB.
#[test]
fn a_skeleton_larger_than_a_prepare_sends_is_dropped_as_the_upload_is_read() {
    let server = TestServer::start(Backend::Local);
    let body = global_headers(2_000);
    let digest = release::digest::Digest::of(&body);
    assert!(uploaded_cheaply(&server, "2,000 global headers x 64 KiB", body, 1, 200 << 20), "the index is named");
    let conn = rusqlite::Connection::open(server.data_dir().join("registry.db")).unwrap();
    let sql = "SELECT index_sha256 FROM artifact_indexes WHERE digest = ?1";
    let stored: String = conn.query_row(sql, [digest.to_string()], |r| r.get(0)).unwrap();
    let hex = stored.trim_start_matches("sha256:");
    let bytes = std::fs::read(server.data_dir().join("objects/indexes/sha256").join(hex)).unwrap();
    let index: serde_json::Value = serde_json::from_slice(&zstd::decode_all(&bytes[..]).unwrap()).unwrap();
    assert_eq!(index["files"].as_array().unwrap().len(), 1, "the file is indexed");
    assert_eq!(index.get("skeleton"), None, "without a skeleton");
}

/// 65,000 empty files named by paths of ~3,600 letters (components of 200), which zstd shrinks
/// to about 60%: an index of 234 MB of paths, just within what a reader takes, whose stored
/// form is ~140 MB. Its sent form (larger than the ingest keeps) is not made. Every file in
/// directories of its own: 1.2 million entries, past the default `max_files`. It grew the
/// server ~585 MiB here (the listing's 234 MB, the entry check's 1.2 million paths, the
/// stored form compressed as it is made); ~725 MiB when the skeleton's base64 and the sent
/// form were made whole.
#[test]
fn an_index_of_paths_that_do_not_compress_is_stored_in_bounded_memory() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nmax_files = 1300000\n");
    let mut tar = Streamed::new();
    for i in 0..65_000u64 {
        let path: Vec<String> =
            letters(i, 18 * 200).chunks(200).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
        tar.add(RawTar::new().long(&format!("{}/f", path.join("/")), REGULAR, "", b""));
    }
    let body = tar.finish();
    assert!(
        uploaded_cheaply(&server, "65,000 files x 3.6 KB random paths", body, 65_000, 640 << 20),
        "the index is named"
    );
}

/// A small archive of a great many zeros (534 KiB for 15 GiB took 11 CPU-seconds to check,
/// within `max_unpacked_bytes`) is refused once past its first GiB it unpacks to more than a
/// thousand times what was sent: `422 archive_too_large`, nothing stored.
#[test]
fn an_archive_of_many_more_zeros_than_it_weighs_is_refused() {
    let server = TestServer::start(Backend::Local);
    let size: u64 = 3 << 30;
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_path("zeros.bin").unwrap();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    encoder.write_all(header.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(size >> 20) + 1 {
        encoder.write_all(&zeros).unwrap();
    }
    let body = encoder.finish().unwrap();
    let sent = body.len();
    let cpu_before = cpu_seconds(server.pid());
    let (status, answer) = server.upload_as_new_ci(body);
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    eprintln!("{sent} bytes for 3 GiB of zeros: server CPU {cpu:.2} s; {answer}");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "archive_too_large", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("1000 times the bytes sent"), "{answer}");
    server.assert_nothing_stored();
}
