//! How the server reaches a node's agent (`release node`): the only code that knows whether a
//! node is this machine or one behind SSH. A call sends one request (and maybe an artifact's
//! bytes) and reads one answer.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::node::protocol::{Answer, ErrorCode};
use crate::node::{NodeError, Request, VERSION};
use crate::store::StoreError;

/// Bytes to send after the request (an artifact).
pub type Payload = BoxStream<'static, Result<Bytes, StoreError>>;

/// What the server sends a node's agent after the request line.
pub enum Input {
    /// Nothing: stdin is closed after the request.
    Nothing,
    /// These bytes (an artifact).
    Bytes(Payload),
    /// What the agent asks for on its first line of stdout, before it reads stdin (a prepare
    /// saying which frames it lacks, `Prepare::ask_frames`).
    Asked(Ask),
}

/// Given the agent's first line of stdout, what to send: `Some`, the line was the question and
/// these bytes answer it (the line is not part of the answer); `None`, it was not a question
/// (the agent answered at once: a refusal), nothing is sent and the line is the answer; an
/// error ends the call with it (a question the server cannot answer: stdin is closed).
pub type Ask = Box<dyn FnOnce(Vec<u8>) -> BoxFuture<'static, Result<Option<Payload>, String>> + Send>;

impl From<Option<Payload>> for Input {
    fn from(payload: Option<Payload>) -> Input {
        payload.map_or(Input::Nothing, Input::Bytes)
    }
}

/// Why a call did not get an answer from the node's agent.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The agent answered with a refusal or failure.
    #[error("{0}")]
    Node(NodeError),
    #[error("{0}")]
    Transport(String),
    /// The agent that answered is not of this server's build: what it is (`speaks protocol
    /// 2`, `is older than protocol 1 …`). Each transport says where it is and what it did
    /// about it (SSH replaces it).
    #[error("the node agent {0}, this server speaks protocol {VERSION}: it is not this server's binary")]
    Foreign(String),
}

/// What clap prints when an agent of a build before protocol 1 (one without `--protocol`)
/// is asked with it: such an agent answers nothing on stdout.
const BEFORE_PROTOCOL: &str = "unexpected argument '--protocol'";

pub trait Transport: Send + Sync {
    /// Sends `request` (then `input`) to the node's agent; its answer.
    fn call<'a>(&'a self, request: &'a Request, input: Input) -> BoxFuture<'a, Result<serde_json::Value, CallError>>;
}

/// This machine: the agent runs as a child process of the server (the same binary).
pub struct Local {
    pub program: PathBuf,
    pub timeout: Duration,
}

impl Local {
    pub fn new(timeout: Duration) -> Local {
        // /proc/self/exe still opens when the binary on disk has been replaced by an upgrade
        // (current_exe() would then name a deleted path).
        let program = PathBuf::from("/proc/self/exe");
        Local { program, timeout }
    }
}

impl Transport for Local {
    fn call<'a>(&'a self, request: &'a Request, input: Input) -> BoxFuture<'a, Result<serde_json::Value, CallError>> {
        Box::pin(async move {
            let mut child = tokio::process::Command::new(&self.program)
                .args(["node", "--protocol", &crate::node::VERSION.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| CallError::Transport(format!("cannot start {}: {e}", self.program.display())))?;
            let exchange = async {
                let (stdin, stdout, stderr) = (
                    child.stdin.take().expect("piped"),
                    child.stdout.take().expect("piped"),
                    child.stderr.take().expect("piped"),
                );
                let (sent, out, err) = exchange(request, input, stdin, stdout, stderr).await?;
                let status = child.wait().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((sent, out, err, status))
            };
            let (sent, out, err, status) = tokio::time::timeout(self.timeout, exchange)
                .await
                .map_err(|_| CallError::Transport(format!("the node agent did not answer within {:?}", self.timeout)))?
                .map_err(CallError::Transport)?;
            // (The agent here is this very process's binary: another cannot answer.)
            parse_answer(&out, &err, status.success(), sent).map_err(|e| match e {
                CallError::Foreign(_) => CallError::Transport(format!("{e} ({})", self.program.display())),
                e => e,
            })
        })
    }
}

/// The most of an agent's answer (its stdout) the server reads: a node that says more is
/// refused. The largest true answer is a chunk of an adopted package (4 MiB, 8 MiB in hex).
pub const MAX_ANSWER: usize = 16 << 20;
/// The most of an agent's stderr the server keeps; the rest is read and dropped.
pub const MAX_STDERR: usize = 1 << 20;
/// The most of a node's message (an error's text) kept.
const MAX_MESSAGE: usize = 2000;
/// The most of a node's output kept, its tail: as much as a true agent sends (the last 4,000
/// bytes of its hooks' output, and the line prepare puts before them saying where the
/// artifact came from).
pub const MAX_OUTPUT: usize = 4400;
/// The longest error code taken from a node.
const MAX_CODE: usize = 64;

/// One call's traffic with the agent: the request line and `input` written while its stdout
/// and stderr are read, all at once (a node that fills one pipe while the server waits on
/// another would stall the call until its timeout). The answer is read up to [`MAX_ANSWER`]
/// (past it, the call ends at once with an error), stderr up to [`MAX_STDERR`] kept. With
/// [`Input::Asked`], the first line of stdout is handed to the question's answer as soon as it
/// comes, and taken out of the answer when it was the question.
pub(super) async fn exchange(
    request: &Request,
    input: Input,
    mut stdin: impl AsyncWriteExt + Unpin,
    mut stdout: impl AsyncRead + Unpin,
    mut stderr: impl AsyncRead + Unpin,
) -> Result<(Result<(), String>, Vec<u8>, Vec<u8>), String> {
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    let (first_line, asked) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let mut first_line = matches!(input, Input::Asked(_)).then_some(first_line);
    let questioned = std::sync::atomic::AtomicBool::new(false);
    let writing = async {
        let sent = match input {
            Input::Nothing => send(&mut stdin, line, None).await,
            Input::Bytes(payload) => send(&mut stdin, line, Some(payload)).await,
            Input::Asked(ask) => {
                let wrote = async {
                    stdin.write_all(&line).await?;
                    stdin.flush().await
                }
                .await;
                match (wrote, asked.await) {
                    // The agent ended without a line, or stopped reading: its answer (or its
                    // silence) says why.
                    (Err(_), _) | (_, Err(_)) => Ok(()),
                    (Ok(()), Ok(question)) => match ask(question).await {
                        Ok(Some(payload)) => {
                            questioned.store(true, std::sync::atomic::Ordering::Relaxed);
                            send(&mut stdin, Vec::new(), Some(payload)).await
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    },
                }
            }
        };
        drop(stdin);
        sent
    };
    let stdout = &mut stdout;
    // Moved in: the sender is dropped when stdout ends, whether a line came or not.
    let answer = async move {
        // Each byte looked at once: an agent writing megabytes without a newline costs a scan
        // of them, not one per read.
        let mut scanned = 0;
        let mut first = |kept: &[u8]| {
            if first_line.is_none() {
                return;
            }
            let end = kept[scanned..].iter().position(|b| *b == b'\n').map(|at| scanned + at);
            scanned = kept.len();
            if let Some(end) = end
                && let Some(tx) = first_line.take()
            {
                let _ = tx.send(kept[..=end].to_vec());
            }
        };
        match read_capped_with(stdout, MAX_ANSWER, true, &mut first).await {
            (_, true) => Err(format!(
                "the node agent's answer is over {} MiB (the most a node may answer): refused",
                MAX_ANSWER >> 20
            )),
            (out, false) => Ok(out),
        }
    };
    let errors = async { Ok(read_capped(&mut stderr, MAX_STDERR, false).await.0) };
    let reading = async { tokio::try_join!(answer, errors) };
    tokio::pin!(writing, reading);
    // An answer over its cap ends the call at once, whatever is still being written.
    let (sent, (mut out, err)) = tokio::select! {
        read = &mut reading => {
            let read = read?;
            (writing.await, read)
        }
        sent = &mut writing => (sent, reading.await?),
    };
    if questioned.load(std::sync::atomic::Ordering::Relaxed) {
        let end = out.iter().position(|b| *b == b'\n').map_or(out.len(), |end| end + 1);
        out.drain(..end);
    }
    Ok((sent, out, err))
}

/// Reads `from` to its end (or its first error), keeping its first `cap` bytes; whether more
/// came. With `stop`, reading ends as soon as more came.
pub(super) async fn read_capped(from: &mut (impl AsyncRead + Unpin), cap: usize, stop: bool) -> (Vec<u8>, bool) {
    read_capped_with(from, cap, stop, &mut |_| {}).await
}

/// [`read_capped`], showing `seen` what was kept so far after each read.
async fn read_capped_with(
    from: &mut (impl AsyncRead + Unpin),
    cap: usize,
    stop: bool,
    seen: &mut (dyn FnMut(&[u8]) + Send),
) -> (Vec<u8>, bool) {
    let (mut kept, mut over) = (Vec::new(), false);
    let mut buf = vec![0; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                seen(&kept);
                if n > room {
                    over = true;
                    if stop {
                        break;
                    }
                }
            }
        }
    }
    (kept, over)
}

/// Writes the request line and the payload; a payload error (the store failed mid-stream) is
/// returned, a closed pipe is not (the agent refused early and says why in its answer).
pub(super) async fn send(
    stdin: &mut (impl AsyncWriteExt + Unpin),
    line: Vec<u8>,
    payload: Option<Payload>,
) -> Result<(), String> {
    if !line.is_empty() && stdin.write_all(&line).await.is_err() {
        return Ok(());
    }
    if let Some(mut payload) = payload {
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| format!("reading the artifact from the store: {e}"))?;
            if stdin.write_all(&chunk).await.is_err() {
                return Ok(());
            }
        }
    }
    let _ = stdin.shutdown().await;
    Ok(())
}

/// The agent's answer: its last line of stdout, as JSON. What a failed call says is cut and
/// cleaned here (see [`clean`]), since a node's words are stored and shown.
pub fn parse_answer(
    out: &[u8],
    err: &[u8],
    exited_ok: bool,
    sent: Result<(), String>,
) -> Result<serde_json::Value, CallError> {
    let text = String::from_utf8_lossy(out);
    let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
    // The server could not send everything (the store failed mid-stream): that is the cause,
    // whatever the agent made of the cut-off input.
    if let Err(e) = sent {
        return Err(CallError::Transport(format!(
            "{e} (the node agent answered: {})",
            clean(last, MAX_MESSAGE, Keep::End)
        )));
    }
    let answer: serde_json::Value = match serde_json::from_str(last) {
        Ok(v) => v,
        Err(_) => {
            let stderr = String::from_utf8_lossy(err);
            if !exited_ok && stderr.contains(BEFORE_PROTOCOL) {
                return Err(CallError::Foreign(format!(
                    "is older than protocol {VERSION} (it refused `--protocol`: {})",
                    clean(stderr.lines().next().unwrap_or_default(), MAX_MESSAGE, Keep::Start)
                )));
            }
            let why = if exited_ok {
                format!("the node agent's answer is not JSON: {}", clean(&text, MAX_MESSAGE, Keep::End))
            } else {
                format!("the node agent failed: {}", clean(stderr.trim(), MAX_MESSAGE, Keep::End))
            };
            return Err(CallError::Transport(why));
        }
    };
    // An agent of another protocol (or none: an old agent) is not read any further.
    if answer.get("protocol") != Some(&VERSION.into()) {
        let theirs = answer.get("protocol").map_or("none".to_owned(), |p| clean(&p.to_string(), MAX_CODE, Keep::Start));
        return Err(CallError::Foreign(format!("speaks protocol {theirs}")));
    }
    if answer["ok"] == true {
        return Ok(answer);
    }
    let error = match serde_json::from_value::<NodeError>(answer.clone()) {
        Ok(e) => NodeError {
            code: e.code,
            message: clean(&e.message, MAX_MESSAGE, Keep::Start),
            output: e.output.map(|o| clean(&o, MAX_OUTPUT, Keep::End)),
        },
        Err(_) => NodeError::new(
            ErrorCode::Unknown,
            format!("unexpected answer: {}", clean(&answer.to_string(), MAX_MESSAGE, Keep::Start)),
        ),
    };
    Err(CallError::Node(error))
}

/// An agent's answer as the type the request expects: an answer of another shape (an agent
/// of another build) is a failed call, not a field that reads as absent.
pub fn typed<A: Answer>(answer: serde_json::Value) -> Result<A, CallError> {
    serde_json::from_value(answer).map_err(|e| {
        CallError::Transport(format!(
            "the node agent's answer is not of the shape this server reads: {}",
            clean(&e.to_string(), MAX_MESSAGE, Keep::Start)
        ))
    })
}

/// Which part of a text [`clean`] keeps when it cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Its beginning (a message).
    Start,
    /// Its end (output, whose last lines say what failed).
    End,
}

/// Text a node sent, made fit to store and show: control characters other than newline and
/// tab removed (no terminal escapes, no carriage return overwriting a line, no bell), then cut
/// to at most `max` bytes (at a character boundary), marked with `…` where it was cut.
pub fn clean(text: &str, max: usize, keep: Keep) -> String {
    let cleaned: String = text.chars().filter(|c| !c.is_control() || matches!(c, '\n' | '\t')).collect();
    if cleaned.len() <= max {
        return cleaned;
    }
    let room = max.saturating_sub('…'.len_utf8());
    match keep {
        Keep::Start => {
            let end = (0..=room).rev().find(|i| cleaned.is_char_boundary(*i)).unwrap_or(0);
            format!("{}…", &cleaned[..end])
        }
        Keep::End => {
            let start = cleaned.len() - room;
            let start = (start..=cleaned.len()).find(|i| cleaned.is_char_boundary(*i)).unwrap_or(cleaned.len());
            format!("…{}", &cleaned[start..])
        }
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
