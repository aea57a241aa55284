//! HTTP/1.1 by hand over a plain TCP stream, for what an HTTP client library will not do:
//! half-sent heads, bodies that stall or never end, answers left unread.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A connection to the server at `url` (`http://host:port`).
pub fn connect(url: &str) -> TcpStream {
    let stream = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// An answer as read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.head, String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (key, value) = l.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Reads one answer (with a `Content-Length`), waiting at most `limit`.
pub fn read_answer(stream: &mut TcpStream, limit: Duration) -> std::io::Result<Answer> {
    let deadline = Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 16 << 10];
    let mut wanted: Option<(usize, usize)> = None;
    loop {
        if let Some((head_len, body_len)) = wanted
            && bytes.len() >= head_len + body_len
        {
            let head = String::from_utf8_lossy(&bytes[..head_len]).into_owned();
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            return Ok(Answer { status, head, body: bytes[head_len..head_len + body_len].to_vec() });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no whole answer in time"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {:?}", String::from_utf8_lossy(&bytes)),
            ));
        }
        bytes.extend_from_slice(&buffer[..n]);
        if wanted.is_none()
            && let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let length =
                head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
            wanted = Some((end + 4, length));
        }
    }
}

/// How long until the server closes `stream` (reading and dropping whatever it sends), or
/// `None` if it is still open after `limit`.
pub fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buffer = [0u8; 64 << 10];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return None;
            }
            Err(_) => return Some(started.elapsed()), // reset
        }
    }
}

/// Writes `total` bytes of generated body (one block, again and again: never held whole),
/// chunked or not, until done or the server stops taking them; returns how many went out.
pub fn stream_body(stream: &mut TcpStream, total: u64, chunked: bool) -> u64 {
    let block = vec![b'a'; 1 << 20];
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(block.len() as u64) as usize;
        let written = if chunked {
            stream
                .write_all(format!("{n:x}\r\n").as_bytes())
                .and_then(|()| stream.write_all(&block[..n]))
                .and_then(|()| stream.write_all(b"\r\n"))
        } else {
            stream.write_all(&block[..n])
        };
        if written.is_err() {
            return sent;
        }
        sent += n as u64;
    }
    if chunked {
        let _ = stream.write_all(b"0\r\n\r\n");
    }
    sent
}
