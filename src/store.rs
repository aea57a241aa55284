//! The artifact store: one small wrapper over `object_store` with typed keys.
//!
//! Two backends: a local directory (the embedded default) and S3-compatible object storage.
//! This is the only code that builds an object key. Uploads are streamed to a staging key
//! (`uploads/<uuid>`) and published under their content address (`artifacts/sha256/<hex>`)
//! only after the caller has verified digest and archive; the store never relies on
//! conditional (create-only) writes, which Akamai, Garage and multipart completion lack.
//! See `storage-layout.md`.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use uuid::Uuid;

use crate::config::{S3Config, StorageConfig};
use crate::digest::Digest;

/// Part size of multipart uploads. Memory per upload is about this times (`PARTS_IN_FLIGHT` + 1).
const PART_SIZE: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 2;
/// S3's limit for a single-request server-side copy.
const MAX_SINGLE_COPY: u64 = 5 << 30;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} not found in the artifact store")]
    NotFound { key: String },
    #[error("artifact store ({backend}), object {key}: {source}")]
    Backend { backend: String, key: String, source: object_store::Error },
    #[error("artifact store: cannot open {what}: {source}")]
    Open { what: String, source: object_store::Error },
    #[error("artifact store, object {key}: {source}")]
    Io { key: String, source: std::io::Error },
    #[error("artifact store ({backend}): listing the multipart uploads of {key}: {message}")]
    Multipart { backend: String, key: String, message: String },
}

/// How much of a local object one read hands over.
const LOCAL_READ_CHUNK: usize = 1 << 20;

/// A typed object key. `Store::path` is the only place that turns one into a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// Verified, immutable artifact bytes.
    Artifact(Digest),
    /// An upload being received; never read by anything but its own ingest.
    Upload(Uuid),
    /// A checkpoint of the audit chain after this many events (immutable).
    Checkpoint(u64),
    /// The latest checkpoint (overwritten each time).
    CheckpointHead,
    /// A registry backup: the zstd-compressed SQLite snapshot.
    Backup(BackupStamp),
    /// The JSON manifest beside it (written after it: a backup without one is incomplete).
    BackupManifest(BackupStamp),
}

/// When a backup was taken, to the millisecond (UTC); names its keys
/// `backups/registry-<yyyymmddThhmmss.mmmZ>.db.zst` and `.json`, which sort by time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackupStamp(pub i64);

const STAMP_FORMAT: &[time::format_description::FormatItem<'static>] =
    time::macros::format_description!("[year][month][day]T[hour][minute][second].[subsecond digits:3]Z");

impl BackupStamp {
    pub fn now() -> BackupStamp {
        BackupStamp((time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64)
    }

    /// The time, as in the key.
    pub fn text(self) -> String {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        t.format(STAMP_FORMAT).expect("formats")
    }

    /// Reads a stamp from a backup's key, its file name, or the time alone
    /// (`backups/registry-20261203T044012.345Z.db.zst`, `registry-….json`, `20261203T044012.345Z`).
    pub fn parse(text: &str) -> Option<BackupStamp> {
        let name = text.rsplit('/').next()?;
        let name = name.strip_prefix("registry-").unwrap_or(name);
        let name = name.strip_suffix(".db.zst").or_else(|| name.strip_suffix(".json")).unwrap_or(name);
        let t = time::PrimitiveDateTime::parse(name, STAMP_FORMAT).ok()?.assume_utc();
        Some(BackupStamp((t.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

#[derive(Clone, Debug)]
enum Backend {
    Local { root: PathBuf },
    S3 { endpoint: String, bucket: String },
}

/// The artifact store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The same S3 store, as a URL signer (presigned GETs for nodes).
    signer: Option<Arc<object_store::aws::AmazonS3>>,
    prefix: String,
    backend: Backend,
    /// Orders what writes artifact keys against what deletes them (see [`Store::publishing`]).
    keys: Arc<tokio::sync::RwLock<()>>,
}

/// Held while an upload looks for, publishes and records an artifact key (shared), or while
/// a purge records and deletes one (exclusive).
pub type KeyGuard<'a> = tokio::sync::RwLockReadGuard<'a, ()>;
pub type PurgeGuard<'a> = tokio::sync::RwLockWriteGuard<'a, ()>;

impl Store {
    /// Taken by an upload from the moment it looks whether its bytes are stored until its row
    /// is committed. A purge ([`Store::purging`]) waits for it, and it waits for a purge: an
    /// upload of bytes a purge is deleting used to find them still there, skip its publish,
    /// record their restore — and the purge deleted them after (an acknowledged upload
    /// without bytes; issue 11's crash harness).
    pub async fn publishing(&self) -> KeyGuard<'_> {
        self.keys.read().await
    }

    /// Taken by a purge while it records and deletes one artifact's bytes.
    pub async fn purging(&self) -> PurgeGuard<'_> {
        self.keys.write().await
    }

    pub fn open(config: &StorageConfig) -> Result<Store, StoreError> {
        match config {
            StorageConfig::Local { path } => {
                std::fs::create_dir_all(path).map_err(|e| StoreError::Open {
                    what: path.display().to_string(),
                    source: object_store::Error::Generic { store: "local", source: Box::new(e) },
                })?;
                let fs = LocalFileSystem::new_with_prefix(path)
                    .map_err(|source| StoreError::Open { what: path.display().to_string(), source })?
                    .with_fsync(true)
                    // Never remove a directory that a delete empties: `uploads/` emptied by one
                    // upload's clean-up was removed under another's publish, between its rename
                    // and the fsync of `uploads/`, and a valid upload answered 404 (issue 11).
                    // The directories are few and fixed (storage-layout.md).
                    .with_automatic_cleanup(false);
                Ok(Store {
                    inner: Arc::new(fs),
                    signer: None,
                    prefix: String::new(),
                    backend: Backend::Local { root: path.clone() },
                    keys: Arc::default(),
                })
            }
            StorageConfig::S3(s3) => Self::open_s3(s3),
        }
    }

    fn open_s3(s3: &S3Config) -> Result<Store, StoreError> {
        let endpoint = endpoint_url(s3);
        let plain_http = endpoint.starts_with("http://");
        let mut builder = AmazonS3Builder::from_env()
            .with_endpoint(&endpoint)
            .with_region(&s3.region)
            .with_bucket_name(&s3.bucket)
            .with_virtual_hosted_style_request(s3.virtual_hosted)
            .with_allow_http(plain_http)
            // Over TLS the payload is protected in transit and we hash every artifact ourselves;
            // over plain HTTP (loopback tests) the payload signature is kept.
            .with_unsigned_payload(!plain_http);
        if let Some(key) = &s3.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &s3.secret_access_key {
            builder = builder.with_secret_access_key(secret.expose());
        }
        let s3_store = builder
            .build()
            .map_err(|source| StoreError::Open { what: format!("bucket {} at {}", s3.bucket, s3.endpoint), source })?;
        let s3_store = Arc::new(s3_store);
        Ok(Store {
            inner: Arc::clone(&s3_store) as Arc<dyn ObjectStore>,
            signer: Some(s3_store),
            prefix: s3.prefix.clone(),
            backend: Backend::S3 { endpoint: s3.endpoint.clone(), bucket: s3.bucket.clone() },
            keys: Arc::default(),
        })
    }

    /// Where the bytes live, for logs and messages (never credentials).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local { root } => format!("local directory {}", root.display()),
            Backend::S3 { endpoint, bucket } => format!("s3 bucket {bucket} at {endpoint}, prefix {:?}", self.prefix),
        }
    }

    fn path(&self, key: Key) -> Path {
        let relative = match key {
            Key::Artifact(digest) => format!("artifacts/sha256/{}", digest.hex()),
            Key::Upload(id) => format!("uploads/{id}"),
            Key::Checkpoint(events) => format!("audit/checkpoints/{events:020}.json"),
            Key::CheckpointHead => "audit/head.json".to_owned(),
            Key::Backup(stamp) => format!("backups/registry-{}.db.zst", stamp.text()),
            Key::BackupManifest(stamp) => format!("backups/registry-{}.json", stamp.text()),
        };
        Path::from(format!("{}{relative}", self.prefix))
    }

    fn error(&self, key: Key) -> impl Fn(object_store::Error) -> StoreError + '_ {
        move |source| match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound { key: self.path(key).to_string() },
            source => StoreError::Backend { backend: self.describe(), key: self.path(key).to_string(), source },
        }
    }

    /// Starts receiving an upload under the staging key `uploads/<id>` (a fresh uuid, noted
    /// in the registry's journal first: see [`Store::remove_left_upload`]).
    pub async fn begin_upload(&self, id: Uuid) -> Result<Upload, StoreError> {
        let key = Key::Upload(id);
        let multipart = self.inner.put_multipart(&self.path(key)).await.map_err(self.error(key))?;
        Ok(Upload { id, writer: WriteMultipart::new_with_chunk_size(multipart, PART_SIZE), store: self.clone() })
    }

    /// Moves a completed, verified upload to its artifact key. Publishing the same digest twice
    /// writes the same bytes twice, which is harmless.
    pub async fn publish(&self, upload: Uuid, digest: Digest, size: u64) -> Result<(), StoreError> {
        let (from, to) = (Key::Upload(upload), Key::Artifact(digest));
        let (from_path, to_path) = (self.path(from), self.path(to));
        let published = match self.backend {
            Backend::Local { .. } => return self.inner.rename(&from_path, &to_path).await.map_err(self.error(from)),
            Backend::S3 { .. } if size <= MAX_SINGLE_COPY => {
                self.inner.copy(&from_path, &to_path).await.map_err(self.error(to))
            }
            Backend::S3 { .. } => self.stream_copy(&from_path, &to_path).await,
        };
        // Published or not, the staging object has served its purpose.
        self.discard(upload).await;
        published
    }

    /// Copies an object too large for CopyObject by streaming it across (object_store has no
    /// UploadPartCopy). A failed copy is aborted: nothing appears under `to`.
    async fn stream_copy(&self, from: &Path, to: &Path) -> Result<(), StoreError> {
        let backend_error = |key: &Path| {
            let key = key.to_string();
            move |source| StoreError::Backend { backend: self.describe(), key: key.clone(), source }
        };
        let source = self.inner.get(from).await.map_err(backend_error(from))?;
        let multipart = self.inner.put_multipart(to).await.map_err(backend_error(to))?;
        let mut writer = WriteMultipart::new_with_chunk_size(multipart, PART_SIZE);
        let mut stream = source.into_stream();
        let copied = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(backend_error(from))?;
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(backend_error(to))?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        match copied {
            Ok(()) => writer.finish().await.map(drop).map_err(backend_error(to)),
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Removes a staging object; a failure is only logged (the next start removes it) and
    /// answered `false`.
    pub async fn discard(&self, upload: Uuid) -> bool {
        match self.delete(Key::Upload(upload)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not remove a staging upload; the next start will");
                false
            }
        }
    }

    /// Removes everything an upload cut short by a crash wrote to its staging key
    /// `uploads/<id>`: the staging object; on the local backend its part files; on S3 every
    /// multipart upload begun there, which was never completed and so is never listed as an
    /// object (found with `ListMultipartUploads`, which object_store lacks, by a presigned
    /// request; then aborted). Returns how many multipart uploads or part files it removed.
    pub async fn remove_left_upload(&self, id: Uuid) -> Result<usize, StoreError> {
        let key = Key::Upload(id);
        let path = self.path(key);
        let mut removed = 0;
        match (&self.backend, &self.signer) {
            (Backend::Local { root }, _) => {
                let (dir, name) = (root.join("uploads"), id.to_string());
                for entry in std::fs::read_dir(&dir).into_iter().flatten().filter_map(Result::ok) {
                    let file = entry.file_name().to_string_lossy().into_owned();
                    if file.strip_prefix(&name).is_some_and(|rest| rest.starts_with('#'))
                        && std::fs::remove_file(entry.path()).is_ok()
                    {
                        removed += 1;
                    }
                }
            }
            (Backend::S3 { .. }, Some(s3)) => {
                use object_store::multipart::MultipartStore;
                for upload_id in self.multipart_uploads(&path).await? {
                    match s3.abort_multipart(&path, &upload_id).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                        Err(e) => return Err(self.error(key)(e)),
                    }
                }
            }
            (Backend::S3 { .. }, None) => unreachable!("an S3 store has its signer"),
        }
        self.delete(key).await?;
        Ok(removed)
    }

    /// The upload ids of the multipart uploads begun at exactly `path` and neither completed
    /// nor aborted (S3 only).
    async fn multipart_uploads(&self, path: &Path) -> Result<Vec<String>, StoreError> {
        use object_store::signer::{SignedUrlOptions, Signer};
        let failed =
            |message: String| StoreError::Multipart { backend: self.describe(), key: path.to_string(), message };
        let Some(s3) = &self.signer else { return Ok(Vec::new()) };
        let options = SignedUrlOptions::new().with_query([("uploads", String::new()), ("prefix", path.to_string())]);
        let url = s3
            .signed_url_opts(reqwest::Method::GET, &Path::from(""), Duration::from_secs(300), &options)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let client =
            reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(|e| failed(e.to_string()))?;
        let response = client.get(url).send().await.map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let xml = response.text().await.map_err(|e| failed(e.to_string()))?;
        if !status.is_success() {
            return Err(failed(format!("{status}: {}", xml.chars().take(300).collect::<String>())));
        }
        Ok(multipart_upload_ids(&xml, path.as_ref()))
    }

    async fn delete(&self, key: Key) -> Result<(), StoreError> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key)(e)),
        }
    }

    /// A presigned GET URL for an artifact, valid for an hour, when the store is S3 (nodes
    /// fetch from the bucket themselves); `None` for the local backend.
    pub async fn presigned_get(&self, digest: Digest) -> Result<Option<String>, StoreError> {
        let Some(signer) = &self.signer else { return Ok(None) };
        let key = Key::Artifact(digest);
        let url = object_store::signer::Signer::signed_url(
            signer.as_ref(),
            reqwest::Method::GET,
            &self.path(key),
            Duration::from_secs(3600),
        )
        .await
        .map_err(self.error(key))?;
        Ok(Some(url.to_string()))
    }

    /// Removes an artifact's bytes (a purge the registry has recorded; nothing else deletes an
    /// artifact key).
    pub async fn purge_artifact(&self, digest: Digest) -> Result<(), StoreError> {
        self.delete(Key::Artifact(digest)).await
    }

    /// Removes bytes an upload cut short by a crash published under an artifact key that the
    /// registry does not name (the only other delete of an artifact key besides a purge).
    pub async fn remove_artifact(&self, digest: Digest) -> Result<(), StoreError> {
        self.delete(Key::Artifact(digest)).await
    }

    /// The stored size of an artifact, or `None` when its key is absent.
    pub async fn artifact_size(&self, digest: Digest) -> Result<Option<u64>, StoreError> {
        let key = Key::Artifact(digest);
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key)(e)),
        }
    }

    /// Streams an artifact's bytes, or the given byte range of them.
    pub async fn read_artifact(
        &self,
        digest: Digest,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let key = Key::Artifact(digest);
        let options = GetOptions { range: range.map(GetRange::Bounded), ..Default::default() };
        let result = self.inner.get_opts(&self.path(key), options).await.map_err(self.error(key))?;
        let describe = self.describe();
        let key_text = self.path(key).to_string();
        if let object_store::GetResultPayload::File(file, _) = result.payload {
            // The local backend would read 8 KiB per blocking hand-off (tens of thousands
            // per artifact sent to a fleet): read the file in 1 MiB pieces instead.
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let range = result.range;
            let mut file = tokio::fs::File::from_std(file);
            file.seek(std::io::SeekFrom::Start(range.start))
                .await
                .map_err(|e| StoreError::Io { key: key_text.clone(), source: e })?;
            let reader = file.take(range.end - range.start);
            return Ok(tokio_util::io::ReaderStream::with_capacity(reader, LOCAL_READ_CHUNK)
                .map_err(move |source| StoreError::Io { key: key_text.clone(), source })
                .boxed());
        }
        Ok(result
            .into_stream()
            .map_err(move |source| StoreError::Backend { backend: describe.clone(), key: key_text.clone(), source })
            .boxed())
    }

    /// Writes an audit checkpoint: its own immutable key, then the head key readers look at.
    pub async fn put_checkpoint(&self, events: u64, json: Vec<u8>) -> Result<(), StoreError> {
        let payload = bytes::Bytes::from(json);
        for key in [Key::Checkpoint(events), Key::CheckpointHead] {
            self.inner.put(&self.path(key), payload.clone().into()).await.map_err(self.error(key))?;
        }
        Ok(())
    }

    /// The latest audit checkpoint (key and JSON), if any was written.
    pub async fn latest_checkpoint(&self) -> Result<Option<(String, Bytes)>, StoreError> {
        let key = Key::CheckpointHead;
        match self.inner.get(&self.path(key)).await {
            Ok(result) => Ok(Some((self.path(key).to_string(), result.bytes().await.map_err(self.error(key))?))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key)(e)),
        }
    }

    /// The key of a backup (for messages and manifests).
    pub fn backup_key(&self, stamp: BackupStamp) -> String {
        self.path(Key::Backup(stamp)).to_string()
    }

    /// Writes a backup: the snapshot, then its manifest (a backup is listed once both are there).
    pub async fn put_backup(&self, stamp: BackupStamp, snapshot: Bytes, manifest: Bytes) -> Result<(), StoreError> {
        for (key, bytes) in [(Key::Backup(stamp), snapshot), (Key::BackupManifest(stamp), manifest)] {
            self.inner.put(&self.path(key), bytes.into()).await.map_err(self.error(key))?;
        }
        Ok(())
    }

    /// The complete backups (those with a manifest), oldest first.
    pub async fn list_backups(&self) -> Result<Vec<BackupStamp>, StoreError> {
        let prefix = Path::from(format!("{}backups", self.prefix));
        let metas: Vec<_> = match self.inner.list(Some(&prefix)).try_collect().await {
            Ok(metas) => metas,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(source) => {
                return Err(StoreError::Backend { backend: self.describe(), key: prefix.to_string(), source });
            }
        };
        let mut stamps: Vec<BackupStamp> = metas
            .iter()
            .filter_map(|m| m.location.filename())
            .filter(|name| name.ends_with(".json"))
            .filter_map(BackupStamp::parse)
            .collect();
        stamps.sort();
        Ok(stamps)
    }

    /// A backup's snapshot bytes and its manifest.
    pub async fn get_backup(&self, stamp: BackupStamp) -> Result<(Bytes, Bytes), StoreError> {
        let mut out = Vec::new();
        for key in [Key::BackupManifest(stamp), Key::Backup(stamp)] {
            let result = self.inner.get(&self.path(key)).await.map_err(self.error(key))?;
            out.push(result.bytes().await.map_err(self.error(key))?);
        }
        let snapshot = out.pop().expect("two");
        Ok((snapshot, out.pop().expect("two")))
    }

    /// Removes a backup: its manifest first, so that a half-removed one is never listed.
    pub async fn delete_backup(&self, stamp: BackupStamp) -> Result<(), StoreError> {
        self.delete(Key::BackupManifest(stamp)).await?;
        self.delete(Key::Backup(stamp)).await
    }

    /// Deletes staging objects older than `age`: uploads a crash or a lost connection left
    /// behind. Returns how many were removed.
    pub async fn sweep_uploads(&self, age: Duration) -> Result<usize, StoreError> {
        let cutoff = SystemTime::now() - age;
        match &self.backend {
            Backend::Local { root } => {
                // The local backend stages multipart writes as `uploads/<uuid>#<n>`, which
                // object_store's listing hides; walk the directory itself.
                let dir = root.join("uploads");
                let removed =
                    tokio::task::spawn_blocking(move || sweep_dir(&dir, cutoff)).await.expect("sweep does not panic");
                Ok(removed)
            }
            Backend::S3 { .. } => {
                let prefix = Path::from(format!("{}uploads", self.prefix));
                let stale: Vec<Path> = self
                    .inner
                    .list(Some(&prefix))
                    .try_filter(|meta| {
                        let modified =
                            SystemTime::UNIX_EPOCH + Duration::from_secs(meta.last_modified.timestamp().max(0) as u64);
                        futures::future::ready(modified < cutoff)
                    })
                    .map_ok(|meta| meta.location)
                    .try_collect()
                    .await
                    .map_err(|source| StoreError::Backend {
                        backend: self.describe(),
                        key: prefix.to_string(),
                        source,
                    })?;
                for path in &stale {
                    match self.inner.delete(path).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(source) => {
                            return Err(StoreError::Backend {
                                backend: self.describe(),
                                key: path.to_string(),
                                source,
                            });
                        }
                    }
                }
                Ok(stale.len())
            }
        }
    }

    /// Every artifact key present, as digests (tests and consistency checks).
    pub async fn list_artifacts(&self) -> Result<Vec<Digest>, StoreError> {
        let prefix = Path::from(format!("{}artifacts/sha256", self.prefix));
        let metas: Vec<_> = self
            .inner
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|source| StoreError::Backend { backend: self.describe(), key: prefix.to_string(), source })?;
        Ok(metas.iter().filter_map(|m| m.location.filename()?.parse().ok()).collect())
    }

    /// Every staging key present, including the local backend's hidden part files.
    pub async fn list_uploads(&self) -> Result<Vec<String>, StoreError> {
        match &self.backend {
            Backend::Local { root } => Ok(std::fs::read_dir(root.join("uploads"))
                .map(|dir| dir.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
                .unwrap_or_default()),
            Backend::S3 { .. } => {
                let prefix = Path::from(format!("{}uploads", self.prefix));
                let metas: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await.map_err(|source| {
                    StoreError::Backend { backend: self.describe(), key: prefix.to_string(), source }
                })?;
                Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
            }
        }
    }
}

/// The `UploadId`s of the `<Upload>` entries of a `ListMultipartUploadsResult` whose `Key` is
/// exactly `key`.
fn multipart_upload_ids(xml: &str, key: &str) -> Vec<String> {
    let field = |entry: &str, name: &str| -> Option<String> {
        let start = entry.find(&format!("<{name}>"))? + name.len() + 2;
        let end = start + entry[start..].find(&format!("</{name}>"))?;
        Some(
            entry[start..end]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        )
    };
    xml.split("<Upload>")
        .skip(1)
        .filter(|entry| field(entry, "Key").as_deref() == Some(key))
        .filter_map(|entry| field(entry, "UploadId"))
        .collect()
}

/// The endpoint object_store wants: as configured for path-style addressing, with the bucket
/// in the host name for virtual-hosted style.
fn endpoint_url(s3: &S3Config) -> String {
    if !s3.virtual_hosted {
        return s3.endpoint.clone();
    }
    let (scheme, host) = s3.endpoint.split_once("://").unwrap_or(("https", &s3.endpoint));
    format!("{scheme}://{}.{}", s3.bucket, host.trim_end_matches('/'))
}

fn sweep_dir(dir: &std::path::Path, cutoff: SystemTime) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < cutoff))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// An upload being streamed to its staging key.
pub struct Upload {
    id: Uuid,
    writer: WriteMultipart,
    store: Store,
}

impl Upload {
    /// Appends bytes, waiting while too many parts are in flight (backpressure to the client).
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let key = Key::Upload(self.id);
        self.writer.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(self.store.error(key))?;
        self.writer.put(bytes);
        Ok(())
    }

    /// Completes the staging object.
    pub async fn finish(self) -> Result<Uuid, StoreError> {
        let key = Key::Upload(self.id);
        self.writer.finish().await.map_err(self.store.error(key))?;
        Ok(self.id)
    }

    /// Drops everything written; nothing stays under the staging key. `false` (logged) when
    /// the store refused: the next start removes it.
    pub async fn abort(self) -> bool {
        let key = Key::Upload(self.id);
        match self.writer.abort().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(key = %self.store.path(key), error = %e, "could not abort a staged upload; the next start removes it");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_hosted_endpoints_carry_the_bucket() {
        let mut s3 = S3Config {
            endpoint: "https://us-east-1.linodeobjects.com/".into(),
            region: "us-east-1".into(),
            bucket: "edye-artifacts".into(),
            prefix: "release/".into(),
            virtual_hosted: true,
            access_key_id: None,
            secret_access_key: None,
        };
        assert_eq!(endpoint_url(&s3), "https://edye-artifacts.us-east-1.linodeobjects.com");
        s3.virtual_hosted = false;
        assert_eq!(endpoint_url(&s3), "https://us-east-1.linodeobjects.com/");
    }

    #[test]
    fn backup_keys_sort_by_time_and_read_back_in_every_form() {
        let stamp = BackupStamp(1_796_272_812_345);
        assert_eq!(stamp.text(), "20261203T044012.345Z");
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&StorageConfig::Local { path: dir.path().into() }).unwrap();
        store.prefix = "release/".into();
        let key = store.backup_key(stamp);
        assert_eq!(key, "release/backups/registry-20261203T044012.345Z.db.zst");
        for text in [key.as_str(), "registry-20261203T044012.345Z.json", "20261203T044012.345Z"] {
            assert_eq!(BackupStamp::parse(text), Some(stamp), "{text}");
        }
        assert_eq!(BackupStamp::parse("latest"), None);
        assert!(BackupStamp(stamp.0 + 1).text() > stamp.text());
    }

    #[test]
    fn multipart_listing_is_read_for_one_key_exactly() {
        let xml = "<ListMultipartUploadsResult><Bucket>b</Bucket>\
            <Upload><Key>p/uploads/a</Key><UploadId>1&amp;x</UploadId></Upload>\
            <Upload><Key>p/uploads/ab</Key><UploadId>2</UploadId></Upload>\
            <Upload><Key>p/uploads/a</Key><UploadId>3</UploadId></Upload></ListMultipartUploadsResult>";
        assert_eq!(multipart_upload_ids(xml, "p/uploads/a"), vec!["1&x".to_owned(), "3".to_owned()]);
        assert!(multipart_upload_ids(xml, "p/uploads/c").is_empty());
    }

    #[test]
    fn keys_are_content_addresses_under_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&StorageConfig::Local { path: dir.path().into() }).unwrap();
        store.prefix = "release/".into();
        let digest = Digest::of(b"x");
        assert_eq!(store.path(Key::Artifact(digest)).to_string(), format!("release/artifacts/sha256/{}", digest.hex()));
        let id = Uuid::nil();
        assert_eq!(store.path(Key::Upload(id)).to_string(), format!("release/uploads/{id}"));
    }
}
