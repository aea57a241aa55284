//! Fetching only the frames a node lacks (issue 15, part 2): [`HttpFrames`] reads them from the
//! artifact's URL (an S3 presigned GET, or this server's signed one) by ranged GETs, one per
//! run of needed frames that lie back to back in the artifact.

use std::io::{self, Read};
use std::ops::Range;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};

use super::{ErrorCode, NodeError};
use crate::archive::Frame;
pub(super) use crate::archive::Run;
use crate::node::sparse::FrameSource;

/// [`archive::runs`](crate::archive::runs), refused as an index that does not hold together.
pub(super) fn runs(frames: &[Frame], needed: &[usize]) -> Result<Vec<Run>, NodeError> {
    crate::archive::runs(frames, needed).map_err(|e| NodeError::new(ErrorCode::IndexMismatch, e.to_string()))
}

/// The frames a node needs, read from the artifact's URL: each run's GET is sent when its
/// first frame is asked for, and each frame is then read from that answer's body in turn.
///
/// The answer must be a 206 whose Content-Range is exactly the range asked. A server that
/// ignores `Range` and answers 200 with the whole artifact is refused (an error of kind
/// [`io::ErrorKind::Unsupported`], so a caller can fetch the artifact whole instead), unless
/// the range asked was the whole artifact anyway (it starts at 0 and the 200's Content-Length
/// is its length): skipping to each run's offset would fetch the artifact's bytes before it
/// once per run, more than a whole fetch. Error texts never hold the URL (it carries a
/// signature, and they are stored with the deploy's phase).
pub(super) struct HttpFrames {
    client: reqwest::blocking::Client,
    url: String,
    stall: Duration,
    runs: Vec<Run>,
    /// The first run whose GET has not been sent.
    next: usize,
    /// The answer being read, if a run's frames are being asked for.
    open: Option<Open>,
    fetched: u64,
}

/// A run's answer, read up to `at`.
struct Open {
    body: reqwest::blocking::Response,
    frames: Range<usize>,
    bytes: Range<u64>,
    at: u64,
}

impl HttpFrames {
    /// Reads the frames `needed` (frame numbers in `frames`, the artifact's whole index,
    /// strictly increasing) from `url`; `stall` bounds the wait for each answer's head and
    /// each read of its body, as for a whole fetch (connections: 10 s). Sends nothing yet.
    pub(super) fn new(url: &str, frames: &[Frame], needed: &[usize], stall: Duration) -> Result<HttpFrames, NodeError> {
        let runs = runs(frames, needed)?;
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(stall)
            .build()
            .map_err(|e| NodeError::new(ErrorCode::Fetch, e.without_url().to_string()))?;
        Ok(HttpFrames { client, url: url.to_owned(), stall, runs, next: 0, open: None, fetched: 0 })
    }

    /// The bytes of artifact fetched so far (the frames' compressed bytes, and any of a run
    /// that a caller skipped).
    pub(super) fn fetched(&self) -> u64 {
        self.fetched
    }

    /// The runs of frames, one GET each.
    #[cfg(test)]
    pub(super) fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Sends the GET of run `index`, and checks its answer is that range.
    fn open(&self, index: usize) -> io::Result<Open> {
        let run = &self.runs[index];
        let (first, last) = (run.bytes.start, run.bytes.end - 1);
        let length = run.bytes.end - run.bytes.start;
        let what = format!("bytes {first}-{last} of the artifact");
        let response = self
            .client
            .get(&self.url)
            .header(RANGE, format!("bytes={first}-{last}"))
            .send()
            // Without the URL: it carries the signature.
            .map_err(|e| io::Error::other(format!("cannot fetch {what}: {}", error_text(&e.without_url()))))?;
        let header = |name| response.headers().get(name).and_then(|v| v.to_str().ok());
        let content_length = header(CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let answered = header(CONTENT_RANGE).unwrap_or("none");
                let total = answered.strip_prefix(&format!("bytes {first}-{last}/"));
                if !total.is_some_and(|t| t == "*" || t.parse::<u64>().is_ok_and(|t| t > last)) {
                    return Err(io::Error::other(format!(
                        "fetching {what}: the answer is another range (Content-Range: {answered})"
                    )));
                }
                if content_length.is_some_and(|l| l != length) {
                    return Err(io::Error::other(format!(
                        "fetching {what}: the answer says it holds {} bytes, not {length}",
                        content_length.unwrap_or_default()
                    )));
                }
            }
            StatusCode::OK if first == 0 && content_length == Some(length) => {}
            StatusCode::OK => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "fetching {what}: the server ignored the Range header and answered with the whole \
                         artifact (HTTP 200), so the frames this node lacks cannot be fetched alone"
                    ),
                ));
            }
            status => return Err(io::Error::other(format!("fetching {what}: HTTP {status}"))),
        }
        Ok(Open { body: response, frames: run.frames.clone(), bytes: run.bytes.clone(), at: first })
    }

    /// Reads `buf.len()` bytes of the open run's body.
    fn read_body(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let open = self.open.as_mut().expect("a run is open");
        let mut filled = 0;
        while filled < buf.len() {
            let started = Instant::now();
            let cause = match open.body.read(&mut buf[filled..]) {
                Ok(0) => io::Error::new(io::ErrorKind::UnexpectedEof, "the answer ended"),
                Ok(n) => {
                    filled += n;
                    self.fetched += n as u64;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            let (start, end) = (open.bytes.start, open.bytes.end - 1);
            let got = open.at + filled as u64 - start;
            let of = format!("{got} of the {} bytes asked (bytes {start}-{end})", end + 1 - start);
            let error = if started.elapsed() >= self.stall {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the artifact fetch stalled after {of}: no byte for {} s (limits.node_fetch_stall_timeout)",
                        self.stall.as_secs()
                    ),
                )
            } else {
                io::Error::new(cause.kind(), format!("the artifact fetch ended after {of}: {}", io_text(cause)))
            };
            self.open = None;
            return Err(error);
        }
        open.at += buf.len() as u64;
        Ok(())
    }
}

impl FrameSource for HttpFrames {
    fn frame(&mut self, number: usize, frame: &Frame, bytes: &mut Vec<u8>) -> io::Result<()> {
        if !self.open.as_ref().is_some_and(|o| o.frames.contains(&number)) {
            // The run it starts (runs never asked for at all are passed over, unfetched).
            let Some(index) = (self.next..self.runs.len()).find(|&i| self.runs[i].frames.contains(&number)) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("frame {number} was not among the frames needed, or was asked for out of order"),
                ));
            };
            self.open = None;
            self.next = index + 1;
            self.open = Some(self.open(index)?);
        }
        let open = self.open.as_ref().expect("opened above");
        let end =
            frame.offset.checked_add(frame.length).filter(|&end| frame.offset >= open.at && end <= open.bytes.end);
        let Some(end) = end else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame {number} ({frame:?}) is not in the bytes left of its run ({}..{}): asked for out of order",
                    open.at, open.bytes.end
                ),
            ));
        };
        // A needed frame of the run the caller passed over: read past it.
        let mut skipped = vec![0; usize::try_from(frame.offset - open.at).map_err(io::Error::other)?];
        self.read_body(&mut skipped)?;
        bytes.clear();
        bytes.resize(usize::try_from(frame.length).map_err(io::Error::other)?, 0);
        self.read_body(bytes)?;
        if end == self.open.as_ref().expect("still open").bytes.end {
            // The run is read: its answer should end here (and the connection go back to the pool).
            let mut open = self.open.take().expect("still open");
            let mut more = [0; 1];
            if matches!(open.body.read(&mut more), Ok(n) if n > 0) {
                return Err(io::Error::other(format!(
                    "the answer to bytes {}-{} of the artifact holds more bytes than asked",
                    open.bytes.start,
                    open.bytes.end - 1
                )));
            }
        }
        Ok(())
    }
}

/// The frames `needed` of the artifact at `url`, read in order as a sparse prepare reads them,
/// and the bytes fetched (for the integration tests: [`crate::node::fetch_frames`]).
pub(in crate::node) fn fetch_frames(
    url: &str,
    frames: &[Frame],
    needed: &[usize],
    stall: Duration,
) -> Result<(Vec<Vec<u8>>, u64), NodeError> {
    let mut source = HttpFrames::new(url, frames, needed, stall)?;
    let read: io::Result<Vec<Vec<u8>>> = (needed.iter())
        .map(|&n| {
            let mut bytes = Vec::new();
            source.frame(n, &frames[n], &mut bytes).map(|()| bytes)
        })
        .collect();
    let read = read.map_err(|e| NodeError::new(ErrorCode::Fetch, e.to_string()))?;
    Ok((read, source.fetched()))
}

/// A reqwest error (already without its URL) and its causes.
fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// An error reading a body, without the URL should it be a reqwest error that names it.
fn io_text(e: io::Error) -> String {
    if e.get_ref().is_some_and(|inner| inner.is::<reqwest::Error>()) {
        let inner = e.into_inner().expect("checked above");
        let reqwest = inner.downcast::<reqwest::Error>().expect("checked above");
        return error_text(&reqwest.without_url());
    }
    error_text(&e)
}

#[cfg(test)]
#[path = "ranges_tests.rs"]
mod tests;
