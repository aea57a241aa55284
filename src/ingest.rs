//! Upload ingest: stream the body once, hashing it, checking the archive and writing it to a
//! staging key at the same time; publish and record it only if everything checked out.
//!
//! The body is never held in memory: chunks flow through bounded channels to a hashing thread
//! and an archive-checking thread while being written to the store. The final object key is
//! written only after digest and archive checked out, and the registry row — the commit point —
//! only after that. Whatever fails, the staging object is aborted, so nothing is left under an
//! artifact key.
//!
//! Long on purpose: the pipeline's stages and the refusal at each of its joints (what is
//! aborted, what is kept) read best in one place.

mod repeats;
mod turns;

use std::io::{self, BufRead, Read};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::archive::{
    self, ArchiveError, CheckOptions, FileIndex, Frame, FrameScanner, IndexError, IndexedFile, SentIndex, SentIndexes,
    Summary,
};
use crate::audit::NewEvent;
use crate::config::{ByteSize, Config, HumanDuration, Limits, ServiceKind, is_valid_name};
use crate::digest::Digest;
use crate::metrics::{Metrics, UploadOutcome};
use crate::model::access::{Action, Denied, Principal};
use crate::model::audit::AuditAction;
use crate::registry::{ArtifactIndex, NewArtifact, Recorded, Registry, RegistryError};
use crate::store::{Store, StoreError, Upload};

/// Body chunks are handed to the hashing and checking threads in batches of about this many
/// bytes (fewer thread wake-ups), with this many batches in flight to each.
const BATCH_BYTES: usize = 1 << 20;
const CHANNEL_DEPTH: usize = 4;
const MAX_LABEL: usize = 256;
const MAX_URL: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Forbidden(Denied),
    #[error("the upload's digest is {actual}, not {expected} as the client said; nothing was stored")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("unsafe archive, nothing was stored: {0}")]
    Unsafe(ArchiveError),
    #[error("the upload is larger than {limit} bytes (limits.max_upload_bytes); nothing was stored")]
    TooLarge { limit: u64 },
    #[error("the upload was interrupted before its end ({0}); nothing was stored")]
    Interrupted(String),
    #[error("the upload sent no byte for {0} (limits.upload_stall_timeout); nothing was stored")]
    Stalled(HumanDuration),
    #[error(
        "the upload brought {got} bytes in {window} of waiting for it, less than limits.min_upload_rate \
         ({rate}/s); nothing was stored"
    )]
    TooSlow { got: u64, window: HumanDuration, rate: ByteSize },
    #[error(
        "this token has {running} uploads received or waiting, as many as one token may ({per_token} received at \
         once, half of limits.max_concurrent_uploads; an eighth of limits.max_connections waiting); nothing was read"
    )]
    TokenBusy { running: usize, per_token: usize },
    #[error(
        "no upload turn came free in {0} (limits.upload_stall_timeout; limits.max_concurrent_uploads are received \
         at once); nothing was read: send it again later"
    )]
    NoTurn(HumanDuration),
    #[error(
        "{waiting} uploads wait for a turn already, as many as may (a quarter of limits.max_connections, at \
         least limits.max_concurrent_uploads); nothing was read: send it again later"
    )]
    TooManyWaiting { waiting: usize },
    #[error(
        "this upload was stopped to give its turn to another token's upload, which waited for one while this \
         token held more than one (a token holding more than one of limits.max_concurrent_uploads gives one up to \
         a token holding none that waited half of limits.upload_stall_timeout); nothing was stored: send it \
         again later"
    )]
    Preempted,
    #[error(
        "the artifact's record changed while this repeat of it was read (its bytes purged?); nothing was \
         stored: send it again"
    )]
    Overtaken,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Why an upload of a client's got no turn, or may not be read without one.
fn no_turn(no: turns::NoTurn, pace: Pace) -> IngestError {
    match no {
        turns::NoTurn::TokenBusy { running, per_token } => IngestError::TokenBusy { running, per_token },
        turns::NoTurn::Full { waiting } => IngestError::TooManyWaiting { waiting },
        turns::NoTurn::Timeout => IngestError::NoTurn(pace.stall),
    }
}

/// One piece of an upload body as it arrives.
#[derive(Debug)]
pub enum Piece {
    Bytes(Bytes),
    /// The digest the client names after the bytes (an HTTP trailer), so that it can hash
    /// while sending instead of reading the file twice.
    Claim(String),
}

/// What the client said about the upload, besides its bytes.
#[derive(Clone, Debug, Default)]
pub struct UploadRequest {
    pub service: String,
    pub version: Option<String>,
    pub git_sha: Option<String>,
    pub build_url: Option<String>,
    /// `X-Release-Digest` as a header: refuse the upload unless its bytes have this digest.
    /// (The same claim may come after the body instead, as a [`Piece::Claim`].)
    pub expected: Option<Digest>,
    /// `Content-Length`, when the client sent one: refused at once when over the limit.
    pub declared_size: Option<u64>,
    /// How fast the body must come (an HTTP client's); `None`: as fast as it comes (a node's
    /// package read by the server itself).
    pub pace: Option<Pace>,
}

/// The pace an upload's body must keep, so that a client cannot hold one of the
/// `max_concurrent_uploads` turns by trickling: no wait for the next piece longer than
/// `stall`, and at least `min_rate` bytes a second over each `window` of time spent waiting
/// for the client (time the server spends on its side — the store, the checks — is not the
/// client's to answer for).
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub stall: HumanDuration,
    pub min_rate: ByteSize,
    pub window: HumanDuration,
}

impl Pace {
    pub fn of(limits: &Limits) -> Pace {
        Pace { stall: limits.upload_stall_timeout, min_rate: limits.min_upload_rate, window: limits.upload_rate_window }
    }
}

/// A body read at a [`Pace`]: the time waited for the client and the bytes it brought in the
/// current window.
struct Paced<S> {
    body: S,
    pace: Option<Pace>,
    waited: std::time::Duration,
    bytes: u64,
    /// The turn read under, which may be given up to another token's upload while the body
    /// is read.
    cut: Option<turns::Cut>,
}

impl<S, E> Paced<S>
where
    S: Stream<Item = Result<Piece, E>> + Unpin,
{
    async fn next(&mut self) -> Result<Option<Result<Piece, E>>, IngestError> {
        let Some(pace) = self.pace else { return Ok(self.body.next().await) };
        let started = tokio::time::Instant::now();
        let next = tokio::time::timeout(pace.stall.0, self.body.next());
        let piece = match &self.cut {
            Some(cut) => tokio::select! {
                biased;
                () = cut.cancelled() => return Err(IngestError::Preempted),
                piece = next => piece,
            },
            None => next.await,
        };
        let piece = piece.map_err(|_| IngestError::Stalled(pace.stall))?;
        if piece.is_none()
            && let Some(cut) = &self.cut
        {
            cut.body_read();
        }
        self.waited += started.elapsed();
        if let Some(Ok(Piece::Bytes(bytes))) = &piece {
            self.bytes += bytes.len() as u64;
            if let Some(cut) = &self.cut {
                cut.read_bytes(bytes.len() as u64);
            }
        }
        if self.waited >= pace.window.0 {
            let wanted = (pace.min_rate.0 as f64 * self.waited.as_secs_f64()) as u64;
            if self.bytes < wanted {
                let window = HumanDuration(std::time::Duration::from_millis(self.waited.as_millis() as u64));
                return Err(IngestError::TooSlow { got: self.bytes, window, rate: pace.min_rate });
            }
            (self.waited, self.bytes) = (std::time::Duration::ZERO, 0);
        }
        Ok(piece)
    }
}

/// Everything an ingest needs; cheap to clone into a task.
#[derive(Clone)]
pub struct Ingestor {
    pub config: Arc<Config>,
    pub store: Store,
    pub registry: Arc<Registry>,
    /// Counts every upload by outcome.
    pub metrics: Arc<Metrics>,
    /// Every upload's file index goes there ready to send, for the deploy that follows.
    indexes: Arc<SentIndexes>,
    /// Turns for uploads, `limits.max_concurrent_uploads` of them: what bounds the memory all
    /// uploads together may hold.
    turns: Arc<turns::Turns>,
    /// Uploads that changed nothing, on record once per token, artifact and window.
    repeats: Arc<repeats::Repeats>,
}

impl Ingestor {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        indexes: Arc<SentIndexes>,
    ) -> Ingestor {
        let limits = &config.limits;
        // A token's waiting uploads hold an eighth of the connections at most: room for a
        // CI's parallel jobs, none for one token to make the server unreachable; and all
        // tokens' together a quarter, which leaves the rest to everything but uploads.
        let at_least = limits.max_concurrent_uploads as usize;
        let connections = limits.max_connections as usize;
        let waiting =
            turns::Waiting { per_token: (connections / 8).max(at_least), all: (connections / 4).max(at_least) };
        let turns = Arc::new(turns::Turns::new(limits.max_concurrent_uploads, waiting));
        Ingestor { config, store, registry, metrics, indexes, turns, repeats: Arc::default() }
    }

    /// How many uploads (adoptions included) hold one of the turns now.
    pub fn uploads_running(&self) -> usize {
        self.turns.running()
    }

    /// Takes one upload from its body stream to a registry row, or to nothing at all; counts
    /// how it ended (under its service only once the token may upload for it, so that a
    /// refused token cannot make up metric series).
    pub async fn ingest<S, E>(
        &self,
        principal: &Principal,
        request: UploadRequest,
        body: S,
    ) -> Result<Recorded, IngestError>
    where
        S: Stream<Item = Result<Piece, E>> + Unpin,
        E: std::fmt::Display,
    {
        if let Err(e) = authorize(principal, &request) {
            self.metrics.record_upload(None, UploadOutcome::Refused);
            return Err(e);
        }
        let service = request.service.clone();
        let result = self.take(principal, request, body).await;
        let outcome = match &result {
            Ok(recorded) if recorded.new_artifact => UploadOutcome::Stored,
            Ok(_) => UploadOutcome::Repeat,
            Err(IngestError::Store(_) | IngestError::Registry(_)) => UploadOutcome::Failed,
            Err(_) => UploadOutcome::Refused,
        };
        self.metrics.record_upload(Some(&service), outcome);
        result
    }

    /// The upload itself, once authorized; [`Ingestor::ingest`] counts how it ended.
    async fn take<S, E>(&self, principal: &Principal, request: UploadRequest, body: S) -> Result<Recorded, IngestError>
    where
        S: Stream<Item = Result<Piece, E>> + Unpin,
        E: std::fmt::Display,
    {
        let limit = self.config.limits.max_upload_bytes.0;
        if request.declared_size.is_some_and(|n| n > limit) {
            return Err(IngestError::TooLarge { limit });
        }

        let options = self.check_options(&request.service);
        let mut body = Paced { body, pace: request.pace, waited: std::time::Duration::ZERO, bytes: 0, cut: None };
        if let Some(recorded) = self.unread_repeat(principal, &request, &mut body, limit).await? {
            return Ok(recorded);
        }
        // A client's upload waits for a turn as long as it may wait for its next byte: what it
        // sends meanwhile is not read. The server's own (an adoption, unpaced, for a deploy
        // by `principal`) takes none of that token's turns and waits as long as it takes.
        let turn = match request.pace {
            Some(pace) => self.turns.take(&principal.name, pace.stall.0).await.map_err(|no| no_turn(no, pace))?,
            None => self.turns.take_own().await,
        };
        body.cut = Some(turn.cut());
        // The staging key is noted in the registry before anything is written to it, and
        // forgotten once the upload ended and its staging key is gone: a server killed in
        // between leaves the note, and the next start removes exactly what this upload wrote
        // (staging object, S3 multipart upload, artifact key the registry does not name).
        let id = uuid::Uuid::new_v4();
        self.journal(move |r| r.stage_upload(id)).await?;
        let mut clean = true;
        let result = self.stage(id, principal, request, body, limit, options, &mut clean).await;
        // A failure of the store or the registry may have left something behind (a staging
        // object, published bytes without their row): the note stays for the next start.
        let settled = clean && !matches!(result, Err(IngestError::Store(_) | IngestError::Registry(_)));
        if settled && let Err(e) = self.journal(move |r| r.unstage_upload(id)).await {
            tracing::warn!(error = %e, upload = %id, "could not forget a finished upload; the next start will");
        }
        result
    }

    /// Runs a registry call on the blocking pool.
    async fn journal(
        &self,
        f: impl FnOnce(&Registry) -> Result<(), RegistryError> + Send + 'static,
    ) -> Result<(), IngestError> {
        let registry = Arc::clone(&self.registry);
        Ok(crate::registry::run(move || f(&registry)).await?)
    }

    /// The upload under its noted staging key `id`. `clean` becomes false when the store
    /// refused to remove what it staged (the journal keeps it for the next start).
    #[allow(clippy::too_many_arguments)]
    async fn stage<S, E>(
        &self,
        id: uuid::Uuid,
        principal: &Principal,
        request: UploadRequest,
        body: Paced<S>,
        limit: u64,
        options: CheckOptions,
        clean: &mut bool,
    ) -> Result<Recorded, IngestError>
    where
        S: Stream<Item = Result<Piece, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut upload = self.store.begin_upload(id).await?;
        let received = match receive(body, &mut upload, limit, options).await {
            Ok(received) => received,
            Err(e) => {
                *clean = upload.abort().await;
                return Err(e);
            }
        };
        for claim in [request.expected, received.claim] {
            if let Some(expected) = claim
                && expected != received.digest
            {
                *clean = upload.abort().await;
                return Err(IngestError::DigestMismatch { expected, actual: received.digest });
            }
        }
        // The index is made (seconds of CPU for the largest) while the store finishes the
        // upload, and before the guard below, which a purge waits for (and uploads behind it).
        let made = make_index(&self.registry, received.digest, received.files, received.frames, received.skeleton);
        let (finished, made) = tokio::join!(upload.finish(), made);
        let staged = match finished {
            Ok(staged) => staged,
            Err(e) => {
                *clean = false;
                return Err(e.into());
            }
        };
        // From the look at the store to the committed row, no purge deletes these bytes.
        let _publishing = self.store.publishing().await;
        if self.store.artifact_size(received.digest).await? == Some(received.size) {
            // Stored already (published by an earlier upload, so verified): a repeated upload
            // leaves the object exactly as it was.
            *clean = self.store.discard(staged).await;
        } else {
            let digest = received.digest;
            self.journal(move |r| r.publishing_upload(id, digest)).await?;
            self.store.publish(staged, received.digest, received.size).await?;
            crate::crash_point("upload-published");
        }

        // The index goes to the store before the row that names it (the row is the upload's
        // commit point); a crash in between leaves an object of a few hundred KiB that the
        // same upload, repeated, writes again to the same key. None when reading it back
        // would refuse it: larger than any reader takes (the listing stopped at the ingest's
        // budget, or its JSON at the limit), or a frame table that does not hold together.
        let index = match made {
            Ok(made) => Ok(self.put_index(made).await?),
            Err(why) => Err(why),
        };
        let index = index
            .inspect_err(|why| {
                tracing::warn!(
                    digest = %received.digest,
                    files = received.summary.file_count,
                    "no file index ({why}): the artifact deploys without sharing files on the nodes"
                )
            })
            .ok();

        let mut new = NewArtifact {
            index,
            digest: received.digest,
            size: received.size,
            unpacked_size: received.summary.unpacked_bytes,
            file_count: received.summary.file_count,
            migrations: received.summary.migrations,
            // The check refused any entry at or under these (`check_options`).
            shared_checked: self.config.service(&request.service).map(|s| s.shared.clone()).unwrap_or_default(),
            service: request.service,
            version: request.version,
            git_sha: request.git_sha,
            build_url: request.build_url,
            uploaded_by: principal.name.clone(),
            uploader_owner: principal.owner.clone(),
            quiet_repeat: false,
        };
        let now = std::time::Instant::now();
        let note = self.repeats.note(&principal.name, new.digest, now);
        let mut details = serde_json::json!({
            "service": new.service,
            "size": new.size,
            "version": new.version,
            "git_sha": new.git_sha,
            "build_url": new.build_url,
        });
        match note {
            repeats::Note::Quiet => new.quiet_repeat = true,
            repeats::Note::Record { unrecorded: 0 } => {}
            repeats::Note::Record { unrecorded } => {
                details["repeats_not_recorded"] = unrecorded.into();
            }
        }
        let event = NewEvent::by(principal, AuditAction::ArtifactUpload, new.digest.to_string(), details);
        let registry = Arc::clone(&self.registry);
        let recorded = crate::registry::run(move || registry.record_artifact(&new, &event)).await?;
        if !recorded.new_artifact && !recorded.new_upload {
            self.repeats.repeated(&principal.name, recorded.artifact.digest, note, now);
        }
        tracing::info!(
            digest = %recorded.artifact.digest,
            service = %recorded.upload.service,
            size = recorded.artifact.size,
            new_artifact = recorded.new_artifact,
            new_upload = recorded.new_upload,
            "artifact stored"
        );
        Ok(recorded)
    }

    /// Stores an upload's index, and keeps it ready to send for the deploy that usually
    /// follows (what reading the stored form back would give, without reading it).
    async fn put_index(&self, made: MadeIndex) -> Result<ArtifactIndex, IngestError> {
        let size = made.stored.len() as u64;
        let index = ArtifactIndex { sha256: self.store.put_index(made.stored).await?, files: made.files, size };
        if let Some(sent) = made.sent {
            self.indexes.keep(index.sha256, Arc::new(sent));
        }
        Ok(index)
    }

    fn check_options(&self, service: &str) -> CheckOptions {
        let configured = self.config.service(service);
        CheckOptions {
            max_unpacked_bytes: self.config.limits.max_unpacked_bytes.0,
            max_files: self.config.limits.max_files,
            shared: configured.map(|s| s.shared.clone()).unwrap_or_default(),
            // A service not configured yet may turn out to be a Laravel one.
            record_migrations: configured.is_none_or(|s| s.kind == ServiceKind::Laravel),
        }
    }
}

/// An upload's index as the store gets it, and as it is kept ready to send.
struct MadeIndex {
    stored: Vec<u8>,
    /// How many files it lists.
    files: u64,
    /// `None` when too large to keep (a deploy reads it from the store).
    sent: Option<SentIndex>,
}

/// The stored form of an upload's index (under the name an earlier upload of the artifact
/// gave it, when it can be) and the form kept ready to send; why not, when reading it back
/// would refuse it (too large: the listing stopped at the ingest's budget, or its JSON at the
/// limit; a frame table that does not hold together).
async fn make_index(
    registry: &Arc<Registry>,
    digest: Digest,
    files: Option<Vec<IndexedFile>>,
    frames: Vec<Frame>,
    skeleton: Option<Vec<u8>>,
) -> Result<MadeIndex, IndexError> {
    let files = files.ok_or(IndexError::TooLarge)?;
    let registry = Arc::clone(registry);
    tokio::task::spawn_blocking(move || {
        // The name an earlier upload of these bytes gave their index, which it is to keep.
        let named = registry.artifact_index(digest).unwrap_or_else(|e| {
            tracing::warn!(%digest, error = %e, "could not read the artifact's index row; its index is made anew");
            None
        });
        // Only one listing as many files could be the same JSON (not an older format's).
        let named = named.filter(|i| i.files == files.len() as u64).map(|i| i.sha256);
        let index = FileIndex::new(digest, files).with_frames(frames).with_skeleton(skeleton);
        let (index, stored) = index.into_readable_as(named)?;
        let files = index.files.len() as u64;
        Ok(MadeIndex { stored, files, sent: SentIndex::to_keep(index) })
    })
    .await
    .expect("encoding an index does not panic")
}

/// May this token upload this request's artifact: the role, a well-formed request, the
/// token's services.
fn authorize(principal: &Principal, request: &UploadRequest) -> Result<(), IngestError> {
    principal.require(Action::UploadArtifact).map_err(IngestError::Forbidden)?;
    check_request(request)?;
    principal.require_service(&request.service).map_err(IngestError::Forbidden)
}

fn check_request(request: &UploadRequest) -> Result<(), IngestError> {
    if !is_valid_name(&request.service) {
        return Err(IngestError::BadRequest(format!(
            "service {:?} must match [a-z0-9][a-z0-9-]* (at most 64 characters)",
            request.service
        )));
    }
    for (name, value, max) in [
        ("version", &request.version, MAX_LABEL),
        ("git_sha", &request.git_sha, MAX_LABEL),
        ("build_url", &request.build_url, MAX_URL),
    ] {
        if let Some(value) = value
            && (value.is_empty() || value.chars().count() > max || value.chars().any(char::is_control))
        {
            return Err(IngestError::BadRequest(format!(
                "{name} must be 1 to {max} characters without control characters"
            )));
        }
    }
    Ok(())
}

struct Received {
    digest: Digest,
    /// A digest named after the body.
    claim: Option<Digest>,
    size: u64,
    summary: Summary,
    /// Every regular file with its hash (the artifact's index, less its digest); `None` when
    /// that index would be larger than [`MAX_INDEX_BYTES`](archive::MAX_INDEX_BYTES).
    files: Option<Vec<IndexedFile>>,
    /// The artifact's independent zstd frames (one when it cannot be laid out in frames).
    frames: Vec<Frame>,
    /// The tar stream but the files' data (zstd), for nodes that fetch only some frames.
    skeleton: Option<Vec<u8>>,
}

/// Streams the body to the staging upload, the hasher, the frame scanner and the checker.
async fn receive<S, E>(
    mut body: Paced<S>,
    upload: &mut Upload,
    limit: u64,
    options: CheckOptions,
) -> Result<Received, IngestError>
where
    S: Stream<Item = Result<Piece, E>> + Unpin,
    E: std::fmt::Display,
{
    let (hash_tx, mut hash_rx) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
    let hasher = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        while let Some(batch) = hash_rx.blocking_recv() {
            batch.iter().for_each(|chunk| hasher.update(chunk));
        }
        Digest::from_hasher(hasher)
    });
    // The frame table, from the frame and block headers, each frame hashed: a thread of its
    // own beside the hasher, so the upload is not hashed twice on one core.
    let (frame_tx, mut frame_rx) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
    let framer = tokio::task::spawn_blocking(move || {
        let mut frames = FrameScanner::new();
        while let Some(batch) = frame_rx.blocking_recv() {
            batch.iter().for_each(|chunk| frames.feed(chunk));
        }
        frames
    });
    let (check_tx, check_rx) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
    let checker = tokio::task::spawn_blocking(move || {
        archive::index(ChannelReader { rx: check_rx, batch: Vec::new().into_iter(), current: Bytes::new() }, &options)
    });

    let mut size = 0u64;
    let mut check_tx = Some(check_tx);
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut outcome = Ok(());
    let mut claim = None;
    loop {
        let piece = match body.next().await {
            Ok(Some(piece)) => piece,
            Ok(None) => break,
            Err(too_slow) => {
                outcome = Err(too_slow);
                break;
            }
        };
        let chunk = match piece {
            Ok(Piece::Bytes(chunk)) => chunk,
            Ok(Piece::Claim(text)) => {
                match text.parse::<Digest>() {
                    Ok(digest) => claim = Some(digest),
                    Err(e) => outcome = Err(IngestError::BadRequest(format!("X-Release-Digest trailer: {e}"))),
                }
                continue;
            }
            Err(e) => {
                outcome = Err(IngestError::Interrupted(e.to_string()));
                break;
            }
        };
        size += chunk.len() as u64;
        if size > limit {
            outcome = Err(IngestError::TooLarge { limit });
            break;
        }
        if check_tx.is_none() {
            continue; // refused already: the rest of the body is read and dropped
        }
        batch_bytes += chunk.len();
        batch.push(chunk.clone());
        upload.write(chunk).await?;
        crate::crash_point("upload-begun");
        if batch_bytes >= BATCH_BYTES {
            hand_over(&mut batch, &mut batch_bytes, [&hash_tx, &frame_tx], &mut check_tx).await;
        }
    }
    if outcome.is_ok() && !batch.is_empty() {
        hand_over(&mut batch, &mut batch_bytes, [&hash_tx, &frame_tx], &mut check_tx).await;
    }
    // The check refused the archive while its body was still coming (then read to its end).
    let refused_early = check_tx.is_none();
    drop(check_tx);
    drop(hash_tx);
    drop(frame_tx);
    let checked = checker.await.expect("the archive check does not panic");
    let digest = hasher.await.expect("hashing does not panic");
    let frames = framer.await.expect("scanning frames does not panic");
    // An archive refused already (its body was being read to its end) says more than the turn
    // given up meanwhile: the client is not to send it again.
    if refused_early
        && matches!(outcome, Err(IngestError::Preempted))
        && let Err(refused) = checked
    {
        return Err(IngestError::Unsafe(refused));
    }
    outcome?;
    // The check reads its input to the end unless it refuses, so a check that stopped early
    // has an error here.
    let archive::Listing { summary, files, skeleton } = checked.map_err(IngestError::Unsafe)?;
    let frames = frames.finish(size, summary.unpacked_bytes, digest);
    Ok(Received { digest, claim, size, summary, files, frames, skeleton })
}

type Batch = Vec<Bytes>;

/// Sends the batch to the checker, the hasher and the frame scanner. When the checker has
/// stopped (it refused the archive), `check_tx` becomes `None` and nothing more is handed over.
async fn hand_over(
    batch: &mut Batch,
    batch_bytes: &mut usize,
    hash_txs: [&mpsc::Sender<Batch>; 2],
    check_tx: &mut Option<mpsc::Sender<Batch>>,
) {
    let full = std::mem::take(batch);
    *batch_bytes = 0;
    let Some(tx) = check_tx.as_ref() else { return };
    if tx.send(full.clone()).await.is_err() {
        *check_tx = None;
        return;
    }
    for tx in hash_txs {
        tx.send(full.clone()).await.expect("the hasher and the scanner only stop when their channel closes");
    }
}

/// Reads batches of chunks from a channel on a blocking thread, in place; end of channel is
/// end of file.
struct ChannelReader {
    rx: mpsc::Receiver<Batch>,
    batch: std::vec::IntoIter<Bytes>,
    current: Bytes,
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.is_empty() {
            match self.batch.next() {
                Some(chunk) => self.current = chunk,
                None => match self.rx.blocking_recv() {
                    Some(batch) => self.batch = batch.into_iter(),
                    None => return Ok(&[]),
                },
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amount: usize) {
        self.current.advance(amount);
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}
