//! [`HttpFrames`] against a small HTTP server on loopback that answers ranges of a byte vector
//! honestly, or as servers and proxies get it wrong: the whole body, another range, a body cut
//! short, a refusal, an answer that stops.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use super::*;
use crate::digest::Digest;

#[derive(Clone, Copy)]
enum Mode {
    Honest,
    /// 200 and the whole body, whatever the Range.
    IgnoresRange,
    /// The right head (206, Content-Range, Content-Length), half the body, then closes.
    CutsShort,
    /// 206 for the range one byte later.
    OtherRange,
    /// The right head, half the body, then nothing while the connection stays open.
    Stalls,
    Status(u16),
}

/// The `Range` headers a server was asked, one per GET ("" for none).
type Asked = Arc<Mutex<Vec<String>>>;

/// Serves `body` at any path, each connection one request; its URL (with a signature in the
/// query, which must never show in an error) and the ranges asked.
fn serve(body: Vec<u8>, mode: Mode) -> (String, Asked) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/node/artifacts/x?expires=1&sig=s3cr3t", listener.local_addr().unwrap());
    let asked = Asked::default();
    let seen = Arc::clone(&asked);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            answer(stream, &body, mode, &seen);
        }
    });
    (url, asked)
}

fn answer(mut stream: TcpStream, body: &[u8], mode: Mode, seen: &Asked) {
    let mut range = String::new();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = value.trim().to_owned();
        }
    }
    seen.lock().unwrap().push(range.clone());
    let (first, last) = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
        .unwrap_or((0, body.len() - 1));
    let part = |first: usize, last: usize| {
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len(),
            last + 1 - first
        );
        (head, &body[first..=last])
    };
    let (head, sent): (String, &[u8]) = match mode {
        Mode::Honest => part(first, last),
        Mode::IgnoresRange => {
            (format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()), body)
        }
        Mode::CutsShort | Mode::Stalls => {
            let (head, whole) = part(first, last);
            (head, &whole[..whole.len() / 2])
        }
        Mode::OtherRange => part(first + 1, last + 1),
        Mode::Status(code) => (format!("HTTP/1.1 {code} No\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"), b"no"),
    };
    let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(sent)).and_then(|()| stream.flush());
    if let Mode::Stalls = mode {
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// An artifact of 10 frames of 1000 to 1900 bytes, and its frame table.
fn artifact() -> (Vec<u8>, Vec<Frame>) {
    let mut bytes = Vec::new();
    let mut frames = Vec::new();
    for n in 0..10u64 {
        let length = 1000 + 100 * ((n * 7) % 10);
        let data: Vec<u8> = (0..length).map(|i| (i * 31 + n * 17) as u8).collect();
        frames.push(Frame {
            offset: bytes.len() as u64,
            length,
            raw_offset: 0,
            raw_length: 0,
            sha256: Digest::of(&data),
        });
        bytes.extend_from_slice(&data);
    }
    (bytes, frames)
}

fn slice<'a>(bytes: &'a [u8], frame: &Frame) -> &'a [u8] {
    &bytes[frame.offset as usize..(frame.offset + frame.length) as usize]
}

const STALL: Duration = Duration::from_secs(30);

/// The frames `needed`, read in order: their bytes, or the first error.
fn read(source: &mut HttpFrames, frames: &[Frame], needed: &[usize]) -> io::Result<Vec<Vec<u8>>> {
    needed.iter().map(|&n| frame_of(source, n, &frames[n])).collect()
}

#[test]
fn runs_join_the_frames_back_to_back_and_refuse_an_impossible_list() {
    let (_, frames) = artifact();
    let at = |n: usize| frames[n].offset;
    let end = |n: usize| frames[n].offset + frames[n].length;
    let got = runs(&frames, &[0, 1, 2, 5, 7, 8, 9]).unwrap();
    assert_eq!(
        got,
        vec![
            Run { frames: 0..3, bytes: at(0)..end(2) },
            Run { frames: 5..6, bytes: at(5)..end(5) },
            Run { frames: 7..10, bytes: at(7)..end(9) }
        ]
    );
    assert_eq!(runs(&frames, &[]).unwrap(), vec![]);

    // An index with a gap between two frames: two GETs, never bytes of the gap read as a frame.
    let mut gapped = frames.clone();
    gapped[4].offset += 1;
    assert_eq!(runs(&gapped, &[3, 4]).unwrap().len(), 2);

    for (needed, why) in [
        (&[3, 10][..], "frame 10 is needed, but the index has 10 frames"),
        (&[4, 4][..], "frame 4 is needed after frame 4"),
        (&[5, 2][..], "frame 2 is needed after frame 5"),
    ] {
        let e = runs(&frames, needed).unwrap_err();
        assert_eq!(e.code, ErrorCode::IndexMismatch);
        assert!(e.message.contains(why), "{needed:?}: {}", e.message);
    }
    let mut hostile = frames.clone();
    hostile[1].length = 0;
    hostile[2].offset = u64::MAX;
    assert!(runs(&hostile, &[1]).unwrap_err().message.contains("no bytes"));
    assert!(runs(&hostile, &[2]).unwrap_err().message.contains("no bytes"));
}

#[test]
fn each_run_of_needed_frames_is_one_ranged_get_and_each_frame_gets_its_bytes() {
    let (bytes, frames) = artifact();
    let (url, asked) = serve(bytes.clone(), Mode::Honest);
    let needed = [0, 1, 2, 5, 7, 8, 9];
    let mut source = HttpFrames::new(&url, &frames, &needed, STALL).unwrap();
    assert_eq!(source.runs().len(), 3);
    assert!(asked.lock().unwrap().is_empty(), "nothing is sent before a frame is asked for");
    let got = read(&mut source, &frames, &needed).unwrap();
    for (data, &n) in got.iter().zip(&needed) {
        assert_eq!(data.as_slice(), slice(&bytes, &frames[n]), "frame {n}");
        assert_eq!(Digest::of(data), frames[n].sha256);
    }
    let end = |n: usize| frames[n].offset + frames[n].length - 1;
    assert_eq!(
        *asked.lock().unwrap(),
        vec![
            format!("bytes=0-{}", end(2)),
            format!("bytes={}-{}", frames[5].offset, end(5)),
            format!("bytes={}-{}", frames[7].offset, end(9))
        ]
    );
    let fetched: u64 = needed.iter().map(|&n| frames[n].length).sum();
    assert_eq!(source.fetched(), fetched);
    assert!(fetched < bytes.len() as u64);

    // A frame not needed, or asked for again, is refused rather than read from the wrong place.
    let e = frame_of(&mut source, 3, &frames[3]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("frame 3 was not among the frames needed"), "{e}");
    let mut again = HttpFrames::new(&url, &frames, &needed, STALL).unwrap();
    frame_of(&mut again, 1, &frames[1]).unwrap();
    assert!(frame_of(&mut again, 1, &frames[1]).unwrap_err().to_string().contains("out of order"));

    // A needed frame the caller passes over inside a run is read past, and counted.
    let mut skipping = HttpFrames::new(&url, &frames, &[4, 5, 6], STALL).unwrap();
    assert_eq!(frame_of(&mut skipping, 6, &frames[6]).unwrap(), slice(&bytes, &frames[6]));
    assert_eq!(skipping.fetched(), frames[4].length + frames[5].length + frames[6].length);
}

#[test]
fn a_server_that_ignores_the_range_is_refused_unless_the_whole_artifact_was_asked() {
    let (bytes, frames) = artifact();
    let (url, _) = serve(bytes.clone(), Mode::IgnoresRange);
    let mut source = HttpFrames::new(&url, &frames, &[3, 4], STALL).unwrap();
    let e = frame_of(&mut source, 3, &frames[3]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("ignored the Range header"), "{e}");
    assert!(!e.to_string().contains("s3cr3t"), "{e}");
    // Even a run from the first byte: the 200 holds more than was asked.
    let mut first = HttpFrames::new(&url, &frames, &[0, 1], STALL).unwrap();
    assert_eq!(frame_of(&mut first, 0, &frames[0]).unwrap_err().kind(), io::ErrorKind::Unsupported);

    // Every frame needed: the whole artifact is what was asked, and the 200 is exactly that.
    let all: Vec<usize> = (0..frames.len()).collect();
    let mut whole = HttpFrames::new(&url, &frames, &all, STALL).unwrap();
    let got = read(&mut whole, &frames, &all).unwrap();
    assert_eq!(got.concat(), bytes);
    assert_eq!(whole.fetched(), bytes.len() as u64);
}

#[test]
fn a_body_cut_short_fails_saying_how_much_came() {
    let (bytes, frames) = artifact();
    let (url, _) = serve(bytes, Mode::CutsShort);
    let mut source = HttpFrames::new(&url, &frames, &[2, 3], STALL).unwrap();
    let asked = frames[2].length + frames[3].length;
    // Half of the first frame came.
    let e = read(&mut source, &frames, &[2, 3]).unwrap_err().to_string();
    assert!(e.contains(&format!("the artifact fetch ended after {} of the {asked} bytes asked", asked / 2)), "{e}");
    assert!(!e.contains("s3cr3t"), "{e}");
}

#[test]
fn an_answer_of_another_range_is_refused() {
    let (bytes, frames) = artifact();
    let (url, _) = serve(bytes, Mode::OtherRange);
    let mut source = HttpFrames::new(&url, &frames, &[2], STALL).unwrap();
    let e = frame_of(&mut source, 2, &frames[2]).unwrap_err().to_string();
    let (first, last) = (frames[2].offset, frames[2].offset + frames[2].length - 1);
    assert!(e.contains(&format!("fetching bytes {first}-{last} of the artifact: the answer is another range")), "{e}");
    assert!(e.contains(&format!("Content-Range: bytes {}-{}/", first + 1, last + 1)), "{e}");
}

#[test]
fn a_refusal_or_no_server_is_named_without_the_url() {
    let (bytes, frames) = artifact();
    let (url, _) = serve(bytes, Mode::Status(403));
    let e = frame_of(&mut HttpFrames::new(&url, &frames, &[1], STALL).unwrap(), 1, &frames[1]).unwrap_err().to_string();
    assert!(e.contains("HTTP 403 Forbidden"), "{e}");
    assert!(!e.contains("s3cr3t"), "{e}");

    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x?sig=s3cr3t", closed.local_addr().unwrap());
    drop(closed);
    let e = frame_of(&mut HttpFrames::new(&url, &frames, &[1], STALL).unwrap(), 1, &frames[1]).unwrap_err().to_string();
    assert!(e.starts_with(&format!("cannot fetch bytes {}-", frames[1].offset)), "{e}");
    assert!(!e.contains("s3cr3t") && !e.contains("http://"), "{e}");
}

#[test]
fn an_answer_that_stops_sending_fails_as_stalled() {
    let (bytes, frames) = artifact();
    let (url, _) = serve(bytes, Mode::Stalls);
    let mut source = HttpFrames::new(&url, &frames, &[6], Duration::from_secs(1)).unwrap();
    let e = frame_of(&mut source, 6, &frames[6]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    let e = e.to_string();
    assert!(e.contains("the artifact fetch stalled after"), "{e}");
    assert!(e.contains("no byte for 1 s (limits.node_fetch_stall_timeout)"), "{e}");
    assert!(!e.contains("s3cr3t"), "{e}");
}

/// [`FrameSource::frame`] into a buffer of its own.
fn frame_of(source: &mut HttpFrames, number: usize, frame: &Frame) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    source.frame(number, frame, &mut bytes).map(|()| bytes)
}
