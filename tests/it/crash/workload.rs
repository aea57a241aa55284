//! The crash harness's workload: workers uploading small and ~200 MB streamed archives,
//! deploying, approving, rolling back and purging while the server is killed under them.

use std::io::Read;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::support::archives::{RawTar, zstd};

use super::{Acked, Shared, Tokens, client, digest_of, post_upload};

/// A ~`size`-byte archive generated as it is read: one tar entry of incompressible noise
/// (xorshift from `seed`), compressed by zstd (which stores noise as raw blocks).
struct BigBody {
    encoder: zstd::stream::read::Encoder<'static, std::io::BufReader<TarNoise>>,
    hasher: sha2::Sha256,
}

struct TarNoise {
    header: Vec<u8>,
    at: usize,
    size: u64,
    written: u64,
    trailer: usize,
    state: u64,
}

impl Read for TarNoise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.header.len() {
            let n = buf.len().min(self.header.len() - self.at);
            buf[..n].copy_from_slice(&self.header[self.at..self.at + n]);
            self.at += n;
            return Ok(n);
        }
        if self.written < self.size {
            let n = (buf.len() as u64).min(self.size - self.written) as usize & !7;
            let n = if n == 0 { ((self.size - self.written) as usize).min(buf.len()) } else { n };
            for chunk in buf[..n].chunks_mut(8) {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                let word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            self.written += n as u64;
            return Ok(n);
        }
        let n = buf.len().min(self.trailer);
        buf[..n].fill(0);
        self.trailer -= n;
        Ok(n)
    }
}

impl BigBody {
    fn new(seed: u64, size: u64) -> BigBody {
        // A header for one file of `size` bytes: RawTar writes the header before the data.
        let header = RawTar::new().entry("blob.bin", b'0', 0o644, "", &[]).unfinished();
        let mut header = header;
        // Patch the size field (and the checksum) of the empty entry RawTar wrote.
        let size_field = format!("{size:011o}\0");
        header[124..136].copy_from_slice(size_field.as_bytes());
        header[148..156].fill(b' ');
        let sum: u64 = header.iter().map(|b| *b as u64).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let pad = (size.next_multiple_of(512) - size) as usize;
        let tar = TarNoise { header, at: 0, size, written: 0, trailer: pad + 1024, state: seed | 1 };
        let encoder = zstd::stream::read::Encoder::new(tar, 1).unwrap();
        BigBody { encoder, hasher: sha2::Sha256::new() }
    }
}

/// The body as the server receives it, hashed on the way.
struct HashingBody(std::sync::Arc<Mutex<BigBody>>);

impl Read for HashingBody {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut body = self.0.lock().unwrap();
        let n = body.encoder.read(buf)?;
        body.hasher.update(&buf[..n]);
        Ok(n)
    }
}

pub(super) fn small_uploads(shared: &Shared, tokens: &Tokens, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        let again = { shared.bodies.lock().unwrap().clone() };
        let body = if !again.is_empty() && rng.random_range(0..4) == 0 {
            again[rng.random_range(0..again.len())].clone()
        } else {
            let noise: Vec<u8> = (0..rng.random_range(16..4096)).map(|_| rng.random::<u8>()).collect();
            zstd(
                &RawTar::new()
                    .dir("public")
                    .file("version.txt", format!("v{}", rng.random::<u32>()).as_bytes())
                    .file("public/noise.bin", &noise)
                    .finish(),
            )
        };
        let expected = digest_of(&body);
        if let Some(digest) = post_upload(&http, url, "web", &tokens.ci, body.clone().into()) {
            if digest != expected {
                shared.violation(format!("small upload acknowledged as {digest}, its bytes are {expected}"));
            }
            shared.acked.lock().unwrap().push(Acked { digest, service: "web" });
            let mut bodies = shared.bodies.lock().unwrap();
            if bodies.len() < 32 {
                bodies.push(body);
            }
            shared.count("small uploads acknowledged".into());
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(20..200)));
    });
}

pub(super) fn big_uploads(shared: &Shared, tokens: &Tokens, seed: u64, size: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        // A few variants only: some uploads repeat bytes already stored (or purged).
        let variant = rng.random_range(1..=3u64);
        let body = std::sync::Arc::new(Mutex::new(BigBody::new(variant.wrapping_mul(0x9E37_79B9_7F4A_7C15), size)));
        shared.big_in_flight.fetch_add(1, Ordering::SeqCst);
        let answer = post_upload(
            &http,
            url,
            "big",
            &tokens.ci,
            reqwest::blocking::Body::new(HashingBody(std::sync::Arc::clone(&body))),
        );
        shared.big_in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(digest) = answer {
            let hasher = std::mem::take(&mut body.lock().unwrap().hasher);
            let expected = format!("sha256:{}", hex::encode(hasher.finalize()));
            if digest != expected {
                shared.violation(format!("big upload acknowledged as {digest}, its bytes are {expected}"));
            }
            shared.acked.lock().unwrap().push(Acked { digest, service: "big" });
            shared.count("big uploads acknowledged".into());
        }
    });
}

pub(super) fn deploys(shared: &Shared, tokens: &Tokens, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        let Some(digest) = shared.small_digest(&mut rng) else {
            std::thread::sleep(Duration::from_millis(50));
            return;
        };
        let (path, token, body, what) = if rng.random_range(0..5) == 0 {
            ("rollback", &tokens.alice, json!({"service": "web", "environment": "staging"}), "rollbacks")
        } else {
            ("", &tokens.ci, json!({"service": "web", "environment": "staging", "digest": digest}), "deploys")
        };
        let path = if path.is_empty() { "/v1/releases".to_owned() } else { format!("/v1/releases/{path}") };
        if let Ok(response) = http.post(format!("{url}{path}")).bearer_auth(token).json(&body).send()
            && response.status() == reqwest::StatusCode::CREATED
        {
            shared.count(format!("{what} accepted"));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
    });
}

pub(super) fn approvals(shared: &Shared, tokens: &Tokens, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        let Some(digest) = shared.small_digest(&mut rng) else {
            std::thread::sleep(Duration::from_millis(50));
            return;
        };
        let body = json!({"service": "web", "environment": "production", "digest": digest});
        let Ok(response) = http.post(format!("{url}/v1/releases")).bearer_auth(&tokens.alice).json(&body).send() else {
            return;
        };
        if response.status() != reqwest::StatusCode::CREATED {
            std::thread::sleep(Duration::from_millis(200));
            return;
        }
        let Ok(release) = response.json::<Value>() else { return };
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        if let Ok(response) = http
            .post(format!("{url}/v1/releases/{}/approve", release["id"]))
            .bearer_auth(&tokens.bob)
            .json(&json!({}))
            .send()
            && response.status().is_success()
        {
            shared.count("approvals accepted".into());
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
    });
}

pub(super) fn purges(shared: &Shared, tokens: &Tokens, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let http = client();
    shared.work(|url| {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
        let body = json!({"never_live": true, "older_than_days": 1});
        if let Ok(response) =
            http.post(format!("{url}/v1/artifacts/purge")).bearer_auth(&tokens.root).json(&body).send()
            && let Ok(answer) = response.json::<Value>()
        {
            let n = answer["purged"].as_array().map_or(0, Vec::len) as u64;
            *shared.counts.lock().unwrap().entry("artifacts purged".into()).or_default() += n;
        }
    });
}
