//! Signed URLs by which nodes fetch an artifact from this server over HTTP(S) instead of
//! through their SSH channel (`[server] node_url`, local store): the SSH stream costs both
//! ends ~0.4 CPU-s per 64 MB here, a plain fetch a fraction of that. The URL names the digest
//! and an expiry and carries an HMAC-SHA256 of both under a key this process drew at random,
//! so it opens that artifact only, for an hour, and only while this server runs. The node
//! checks the digest of what it receives as it does for every other source.

use std::sync::OnceLock;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::digest::Digest;

/// How long a fetch URL opens its artifact (as long as a presigned S3 URL).
pub const VALID_SECONDS: i64 = 3600;

/// The path under the server's `node_url` (outside `/v1`: no token, the signature is the
/// permission).
pub const PATH: &str = "/node/artifacts";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    #[error("this fetch URL expired at {expires} (unix time): the deploy that made it is over")]
    Expired { expires: i64 },
    #[error("this fetch URL is not signed by this server (or it restarted since): ask for a new deploy")]
    BadSignature,
}

fn key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(rand::random)
}

fn signature(digest: Digest, expires: i64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key()).expect("HMAC takes a key of any length");
    mac.update(format!("{digest}\n{expires}").as_bytes());
    mac
}

/// The URL a node fetches `digest` from, under `base` (the configured `node_url`).
pub fn url(base: &str, digest: Digest, now: i64) -> String {
    let expires = now + VALID_SECONDS;
    let sig = hex::encode(signature(digest, expires).finalize().into_bytes());
    format!("{}{PATH}/{digest}?expires={expires}&sig={sig}", base.trim_end_matches('/'))
}

/// Whether a fetch of `digest` with this expiry and signature may be served at `now`.
pub fn verify(digest: Digest, expires: i64, sig: &str, now: i64) -> Result<(), FetchError> {
    let sig = hex::decode(sig).map_err(|_| FetchError::BadSignature)?;
    // verify_slice compares in constant time.
    signature(digest, expires).verify_slice(&sig).map_err(|_| FetchError::BadSignature)?;
    if now > expires {
        return Err(FetchError::Expired { expires });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(url: &str) -> (i64, String) {
        let query = url.split_once('?').unwrap().1;
        let (e, s) = query.split_once('&').unwrap();
        (e.trim_start_matches("expires=").parse().unwrap(), s.trim_start_matches("sig=").to_owned())
    }

    #[test]
    fn a_url_opens_its_digest_until_it_expires_and_nothing_else() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let url = url("http://10.0.0.5:8080/", a, 1_000);
        assert!(url.starts_with(&format!("http://10.0.0.5:8080/node/artifacts/{a}?expires=4600&sig=")), "{url}");
        let (expires, sig) = parts(&url);
        assert_eq!(verify(a, expires, &sig, 1_000), Ok(()));
        assert_eq!(verify(a, expires, &sig, 4_600), Ok(()));
        assert_eq!(verify(a, expires, &sig, 4_601), Err(FetchError::Expired { expires: 4600 }));
        assert_eq!(verify(b, expires, &sig, 1_000), Err(FetchError::BadSignature), "another digest");
        assert_eq!(verify(a, expires + 3600, &sig, 1_000), Err(FetchError::BadSignature), "a later expiry");
        assert_eq!(verify(a, expires, "zz", 1_000), Err(FetchError::BadSignature));
        let mut forged = sig.clone();
        forged.replace_range(0..2, if &sig[0..2] == "00" { "01" } else { "00" });
        assert_eq!(verify(a, expires, &forged, 1_000), Err(FetchError::BadSignature));
    }
}
