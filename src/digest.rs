//! The `Digest` newtype: the SHA-256 that names an artifact, parsed and printed as `sha256:<64 hex>`;
//! and `DigestRef`, a digest as people give it (whole, or its first 12 or more hex digits).
//!
//! No I/O here: hashing streams is done where the bytes flow (`archive::pack`, `ingest`,
//! the upload client); this module only knows the name's syntax and how to finish a hasher.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// The HTTP header (or trailer) in which a client names the digest it expects an upload to have.
pub const HTTP_HEADER: &str = "x-release-digest";

/// The SHA-256 of an artifact's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest {input:?}: expected sha256:<64 lowercase hex digits>")]
pub struct ParseDigestError {
    input: String,
}

impl Digest {
    pub const PREFIX: &'static str = "sha256:";

    /// Finishes a hasher that saw exactly the artifact's bytes.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Digest(hasher.finalize().into())
    }

    /// The digest of an in-memory byte string (tests, small files).
    pub fn of(bytes: &[u8]) -> Self {
        Digest(Sha256::digest(bytes).into())
    }

    /// The digest of everything a reader yields (a shared file on a node).
    pub fn of_reader(mut reader: impl std::io::Read) -> std::io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 64 * 1024];
        loop {
            match reader.read(&mut buf)? {
                0 => return Ok(Digest::from_hasher(hasher)),
                n => hasher.update(&buf[..n]),
            }
        }
    }

    /// The 32 bytes of a digest (a binary index).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix (used in object keys).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for people.
    pub fn short(&self) -> String {
        self.hex()[..12].to_owned()
    }
}

impl FromStr for Digest {
    type Err = ParseDigestError;

    /// Accepts `sha256:<hex>` and, for convenience on the command line, the bare hex.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDigestError { input: s.to_owned() };
        let hex_part = s.strip_prefix(Self::PREFIX).unwrap_or(s);
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| err())?;
        Ok(Digest(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The fewest hex digits a prefix may have: the short digest that tables print.
pub const MIN_PREFIX: usize = 12;

/// A digest as a person gives it: whole, or an unambiguous prefix of at least
/// [`MIN_PREFIX`] hex digits (with or without `sha256:`), as `artifact list` prints them.
/// The registry turns a prefix into the one digest it names, or refuses (none, several).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DigestRef {
    Full(Digest),
    /// 12 to 63 lowercase hex digits.
    Prefix(String),
}

/// Why a string names no digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest {input:?}: expected sha256:<64 lowercase hex digits>, or its first {MIN_PREFIX} or more")]
pub struct ParseDigestRefError {
    input: String,
}

impl FromStr for DigestRef {
    type Err = ParseDigestRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s.strip_prefix(Digest::PREFIX).unwrap_or(s);
        let valid = (MIN_PREFIX..=64).contains(&hex_part.len())
            && hex_part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match (valid, hex_part.len()) {
            (false, _) => Err(ParseDigestRefError { input: s.to_owned() }),
            (true, 64) => Ok(DigestRef::Full(hex_part.parse().expect("64 lowercase hex digits are a digest"))),
            (true, _) => Ok(DigestRef::Prefix(hex_part.to_owned())),
        }
    }
}

impl fmt::Display for DigestRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DigestRef::Full(d) => d.fmt(f),
            DigestRef::Prefix(hex) => write!(f, "{}{hex}", Digest::PREFIX),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DigestRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn empty_input_has_the_well_known_digest() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
    }

    #[test]
    fn parses_prefixed_and_bare_hex() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d, Digest::of(b""));
        assert_eq!(EMPTY[7..].parse::<Digest>().unwrap(), d);
        assert_eq!(d.short(), "e3b0c44298fc");
    }

    #[test]
    fn refuses_malformed_names() {
        for bad in [
            "",
            "sha256:",
            "sha256:abc",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/../x",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_reference_is_a_whole_digest_or_a_prefix_of_twelve_or_more() {
        let d = Digest::of(b"x");
        assert_eq!(d.to_string().parse::<DigestRef>(), Ok(DigestRef::Full(d)));
        assert_eq!(d.hex().parse::<DigestRef>(), Ok(DigestRef::Full(d)));
        assert_eq!(d.short().parse::<DigestRef>(), Ok(DigestRef::Prefix(d.short())));
        assert_eq!(
            format!("sha256:{}", &d.hex()[..40]).parse::<DigestRef>(),
            Ok(DigestRef::Prefix(d.hex()[..40].into()))
        );
        for bad in [&d.hex()[..11], "", "sha256:", "ABCDEF0123456", "0123456789abz", &format!("{}0", d.hex())] {
            let err = bad.parse::<DigestRef>().unwrap_err().to_string();
            assert!(err.contains("its first 12 or more"), "{bad:?}: {err}");
        }
    }
}
