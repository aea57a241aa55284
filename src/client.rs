//! The HTTP client the command line uses to talk to a `release` server.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;

use futures::StreamExt;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

/// Names the upload's digest: a request header, or a trailer after the body.
use crate::digest::HTTP_HEADER as DIGEST_HEADER;

use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the release server at {server}: {source}")]
    Connect { server: String, source: reqwest::Error },
    /// The server answered with an error document.
    #[error("{message} ({code}, HTTP {status})")]
    Api { status: u16, code: String, message: String, retry_after: Option<u64> },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the download's digest is {actual}, not {expected}; nothing was written")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

/// Labels sent with an upload.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UploadLabels {
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_sha: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_url: Option<String>,
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(server: &str, token: Option<String>) -> Client {
        Client {
            http: reqwest::Client::builder()
                .user_agent(concat!("release/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("HTTP client builds"),
            base: server.trim_end_matches('/').to_owned(),
            token,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response =
            builder.send().await.map_err(|source| ClientError::Connect { server: self.base.clone(), source })?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(api_error(response).await)
    }

    async fn json<T: DeserializeOwned>(&self, builder: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(builder).await?;
        response.json().await.map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Uploads an archive file. With `known`, the digest goes in the `X-Release-Digest` header;
    /// without, the file is hashed while it is sent and the digest follows the bytes as an HTTP
    /// trailer — one read of the file instead of two. Either way the server refuses bytes that
    /// hash differently, and the answer is checked against the digest computed here.
    /// `progress` sees the bytes sent so far.
    pub async fn upload(
        &self,
        file: &Path,
        known: Option<Digest>,
        labels: &UploadLabels,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Value, ClientError> {
        let handle = std::fs::File::open(file)?;
        let size = handle.metadata()?.len();
        let computed = Arc::new(OnceLock::new());
        let body = ChannelBody { rx: read_and_hash(handle, known.is_none(), Arc::clone(&computed), progress) };
        let mut builder = self
            .request(reqwest::Method::POST, "/v1/artifacts")
            .query(labels)
            .header(reqwest::header::CONTENT_TYPE, "application/zstd")
            .body(reqwest::Body::wrap(body));
        builder = match known {
            Some(digest) => {
                builder.header(DIGEST_HEADER, digest.to_string()).header(reqwest::header::CONTENT_LENGTH, size)
            }
            None => builder.header(reqwest::header::TRAILER, DIGEST_HEADER),
        };
        let answer: Value = self.json(builder).await?;
        // With a Content-Length the body is not polled past its last byte, so the known digest
        // is the one to compare with.
        let sent = known
            .or_else(|| computed.get().copied())
            .ok_or_else(|| ClientError::Protocol("the upload ended before its digest was sent".into()))?;
        // The answer is the artifact's facts (flattened into `server::artifacts::Uploaded`).
        let stored = crate::registry::Artifact::deserialize(&answer)
            .map_err(|e| ClientError::Protocol(format!("the upload's answer is not an artifact: {e}")))?
            .digest;
        if stored != sent {
            return Err(ClientError::Protocol(format!("the server stored {stored} but this file is {sent}")));
        }
        Ok(answer)
    }

    /// An artifact's metadata, or `None` if the server does not have it.
    pub async fn artifact(&self, digest: &impl std::fmt::Display) -> Result<Option<Value>, ClientError> {
        match self.json(self.request(reqwest::Method::GET, &format!("/v1/artifacts/{digest}"))).await {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET path` with query pairs, as JSON.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ClientError> {
        self.json(self.request(reqwest::Method::GET, path).query(query)).await
    }

    /// `POST path` with a JSON body, as JSON.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.json(self.request(reqwest::Method::POST, path).json(body)).await
    }

    /// `GET path` streamed to `out` as it arrives (the audit export).
    pub async fn stream_to(
        &self,
        path: &str,
        query: &[(&str, String)],
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, path).query(query)).await?;
        let mut body = response.bytes_stream();
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ClientError::Protocol(format!("the answer was cut short: {e}")))?;
            out.write_all(&chunk)?;
            written += chunk.len() as u64;
        }
        out.flush()?;
        Ok(written)
    }

    pub async fn service_artifacts(&self, service: &str, limit: u32) -> Result<Value, ClientError> {
        self.json(
            self.request(reqwest::Method::GET, &format!("/v1/services/{service}/artifacts")).query(&[("limit", limit)]),
        )
        .await
    }

    /// Downloads an artifact to `output` (through a temporary file beside it), checking its
    /// digest before the file appears.
    pub async fn download(
        &self,
        digest: Digest,
        output: &Path,
        progress: impl Fn(u64, Option<u64>),
    ) -> Result<u64, ClientError> {
        let response = self.send(self.request(reqwest::Method::GET, &format!("/v1/artifacts/{digest}/blob"))).await?;
        let total = response.content_length();
        let parent = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => std::path::PathBuf::from("."),
        };
        let temp = tempfile::Builder::new().prefix(".release-download-").tempfile_in(&parent)?;
        let (std_file, temp_path) = temp.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ClientError::Protocol(format!("download interrupted: {e}")))?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
            received += chunk.len() as u64;
            progress(received, total);
        }
        file.sync_all().await?;
        let actual = Digest::from_hasher(hasher);
        if actual != digest {
            return Err(ClientError::DigestMismatch { expected: digest, actual });
        }
        temp_path.persist(output).map_err(|e| ClientError::Io(e.error))?;
        Ok(received)
    }
}

async fn api_error(response: reqwest::Response) -> ClientError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if v["error"]["code"].is_string() => ClientError::Api {
            status: status.as_u16(),
            code: v["error"]["code"].as_str().unwrap_or_default().to_owned(),
            message: v["error"]["message"].as_str().unwrap_or_default().to_owned(),
            retry_after,
        },
        _ => ClientError::Api {
            status: status.as_u16(),
            code: status.canonical_reason().unwrap_or("error").to_lowercase().replace(' ', "_"),
            message: if text.is_empty() { format!("HTTP {status}") } else { text },
            retry_after,
        },
    }
}

/// Pieces of a file read and hashed on a thread of its own, so reading and hashing overlap with
/// sending (and no read hops through the async runtime's blocking pool).
const READ_CHUNK: usize = 512 << 10;
const CHUNKS_AHEAD: usize = 8;

type BodyFrame = Result<Frame<Bytes>, std::io::Error>;

/// Reads `file` to its end on a new thread, hashing it; the frames go to the returned channel,
/// then, with `trailer`, the digest as a trailer. The digest is also left in `computed`.
fn read_and_hash(
    mut file: std::fs::File,
    trailer: bool,
    computed: Arc<OnceLock<Digest>>,
    progress: impl Fn(u64) + Send + 'static,
) -> tokio::sync::mpsc::Receiver<BodyFrame> {
    use std::io::Read;
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
    std::thread::spawn(move || {
        let mut hasher = Sha256::new();
        let mut sent = 0u64;
        loop {
            // Read into spare capacity: no zeroing of a buffer about to be overwritten.
            let mut chunk = Vec::with_capacity(READ_CHUNK);
            let n = match (&mut file).take(READ_CHUNK as u64).read_to_end(&mut chunk) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            if n == 0 {
                break;
            }
            hasher.update(&chunk);
            sent += n as u64;
            progress(sent);
            if tx.blocking_send(Ok(Frame::data(Bytes::from(chunk)))).is_err() {
                return; // the request was dropped
            }
        }
        let digest = Digest::from_hasher(hasher);
        let _ = computed.set(digest);
        if trailer {
            let mut trailers = reqwest::header::HeaderMap::new();
            trailers.insert(DIGEST_HEADER, digest.to_string().parse().expect("a digest is a valid header value"));
            let _ = tx.blocking_send(Ok(Frame::trailers(trailers)));
        }
    });
    rx
}

/// A request body fed by [`read_and_hash`].
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<BodyFrame>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<BodyFrame>> {
        self.rx.poll_recv(cx)
    }
}
