//! Hand-made archives, hostile ones included: raw ustar headers, so nothing in between can
//! "fix" a path or a mode before the server sees it.

/// A tar stream written header by header.
#[derive(Default)]
pub struct RawTar {
    bytes: Vec<u8>,
}

pub const REGULAR: u8 = b'0';
pub const HARDLINK: u8 = b'1';
pub const SYMLINK: u8 = b'2';
pub const CHAR_DEVICE: u8 = b'3';
pub const DIRECTORY: u8 = b'5';
pub const FIFO: u8 = b'6';

impl RawTar {
    pub fn new() -> RawTar {
        RawTar::default()
    }

    pub fn file(self, path: &str, data: &[u8]) -> RawTar {
        self.entry(path, REGULAR, 0o644, "", data)
    }

    pub fn dir(self, path: &str) -> RawTar {
        self.entry(path, DIRECTORY, 0o755, "", b"")
    }

    pub fn symlink(self, path: &str, target: &str) -> RawTar {
        self.entry(path, SYMLINK, 0o777, target, b"")
    }

    /// An entry whose path or link target may be longer than a ustar header holds: each long
    /// one goes first in a GNU long-name (`L`) or long-link (`K`) entry, as GNU tar writes it.
    pub fn long(mut self, path: &str, kind: u8, link: &str, data: &[u8]) -> RawTar {
        if link.len() > 100 {
            self = self.gnu_long(b'K', link);
        }
        if path.len() > 100 {
            self = self.gnu_long(b'L', path);
        }
        let cut = |s: &str| s[..s.len().min(100)].to_owned();
        let mode = if kind == SYMLINK {
            0o777
        } else if kind == DIRECTORY {
            0o755
        } else {
            0o644
        };
        self.entry(&cut(path), kind, mode, &cut(link), data)
    }

    fn gnu_long(self, kind: u8, name: &str) -> RawTar {
        let mut data = name.as_bytes().to_vec();
        data.push(0);
        self.entry("././@LongLink", kind, 0o644, "", &data)
    }

    pub fn entry(mut self, path: &str, kind: u8, mode: u32, link: &str, data: &[u8]) -> RawTar {
        assert!(path.len() <= 100 && link.len() <= 100);
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|b| *b as u64).sum();
        let cksum = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(cksum.as_bytes());
        self.bytes.extend_from_slice(&h);
        self.bytes.extend_from_slice(data);
        let pad = data.len().next_multiple_of(512) - data.len();
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// The tar stream with its end-of-archive marker.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&[0u8; 1024]);
        self.bytes
    }

    /// The tar stream without the marker (for truncation tests).
    pub fn unfinished(self) -> Vec<u8> {
        self.bytes
    }
}

fn octal(field: &mut [u8], value: u64) {
    let text = format!("{value:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(text.as_bytes());
}

pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// A valid little archive.
pub fn valid(content: &str) -> Vec<u8> {
    zstd(&RawTar::new().dir("public").file("public/index.php", content.as_bytes()).finish())
}

/// Lowercase letters that compress poorly (a file's content that changes with `seed`).
pub fn letters(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b'a' + (state % 26) as u8
        })
        .collect()
}

/// What a prepare's output says it fetched: "fetched K of its N frames, X of Y bytes" as
/// `[K, N, X, Y]`; panics (naming the output) when it fetched the whole artifact.
pub fn fetched(output: &str) -> [u64; 4] {
    let said = output.split("; fetched ").nth(1).unwrap_or_else(|| panic!("fetched whole: {output}"));
    let numbers: Vec<u64> = said
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .take(4)
        .map(|n| n.parse().unwrap())
        .collect();
    numbers.try_into().unwrap_or_else(|_| panic!("{said}"))
}
