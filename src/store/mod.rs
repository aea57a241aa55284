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

mod records;
mod uploads;

pub use records::BackupStamp;
pub use uploads::Upload;
#[cfg(test)]
use uploads::multipart_upload_ids;

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
    #[error("artifact store, object {key}: its bytes hash to {actual}, not to the name they are stored under")]
    Corrupt { key: String, actual: Digest },
    #[error("artifact store ({backend}): listing the multipart uploads of {key}: {message}")]
    Multipart { backend: String, key: String, message: String },
}

/// How much of a local object one read hands over to the server's own readers (a deploy's
/// stream to its nodes, an adoption's re-read), and to a node fetching through a signed URL:
/// few blocking hand-offs per artifact sent to a fleet.
pub const READ_FOR_NODES: usize = 1 << 20;

/// ... and to a token's download. One that its client does not read holds what hyper queues
/// for the connection (up to ~400 KiB, or one piece past that) and one piece read ahead: with
/// 1 MiB pieces, 200 unread downloads held 2.2 MiB each; with 64 KiB pieces 0.65 MiB (F3 of
/// the stop-33 attack). 16 KiB pieces would hold ~0.33 MiB, but halved a download's speed
/// (0.5 GB/s, against 1.3–1.6 at 64 KiB and 1.7 at 1 MiB, on tmpfs).
pub const READ_FOR_CLIENTS: usize = 64 << 10;

/// A typed object key. `Store::path` is the only place that turns one into a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// Verified, immutable artifact bytes.
    Artifact(Digest),
    /// An upload being received; never read by anything but its own ingest.
    Upload(Uuid),
    /// An artifact's per-file index (`archive::FileIndex`, stored form), by its own SHA-256.
    Index(Digest),
    /// A checkpoint of the audit chain after this many events (immutable).
    Checkpoint(u64),
    /// The latest checkpoint (overwritten each time).
    CheckpointHead,
    /// A registry backup: the zstd-compressed SQLite snapshot.
    Backup(BackupStamp),
    /// The JSON manifest beside it (written after it: a backup without one is incomplete).
    BackupManifest(BackupStamp),
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
            Key::Index(digest) => format!("indexes/sha256/{}", digest.hex()),
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

    /// Stores an artifact's index (its stored form) under its content address, which it
    /// returns. Written again by every upload of the artifact: the same bytes to the same key.
    pub async fn put_index(&self, stored: Vec<u8>) -> Result<Digest, StoreError> {
        let digest = Digest::of(&stored);
        let key = Key::Index(digest);
        self.inner.put(&self.path(key), Bytes::from(stored).into()).await.map_err(self.error(key))?;
        Ok(digest)
    }

    /// An index's stored bytes, checked against the name they are stored under.
    pub async fn get_index(&self, digest: Digest) -> Result<Bytes, StoreError> {
        let key = Key::Index(digest);
        let bytes = self.inner.get(&self.path(key)).await.map_err(self.error(key))?;
        let bytes = bytes.bytes().await.map_err(self.error(key))?;
        if Digest::of(&bytes) != digest {
            return Err(StoreError::Corrupt { key: self.path(key).to_string(), actual: Digest::of(&bytes) });
        }
        Ok(bytes)
    }

    /// Removes an index (with the purge of its artifact's bytes).
    pub async fn purge_index(&self, digest: Digest) -> Result<(), StoreError> {
        self.delete(Key::Index(digest)).await
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

    /// Streams an artifact's bytes, or the given byte range of them, read from a local store
    /// in pieces of `read_size` ([`READ_FOR_NODES`] or [`READ_FOR_CLIENTS`]).
    pub async fn read_artifact(
        &self,
        digest: Digest,
        range: Option<Range<u64>>,
        read_size: usize,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let key = Key::Artifact(digest);
        let options = GetOptions { range: range.clone().map(GetRange::Bounded), ..Default::default() };
        let result = self.inner.get_opts(&self.path(key), options).await.map_err(self.error(key))?;
        let describe = self.describe();
        let key_text = self.path(key).to_string();
        // S3 answers a range past the end with the bytes there are.
        if let Some(asked) = range.filter(|asked| *asked != result.range) {
            return Err(not_within(key_text, &asked, result.meta.size));
        }
        if let object_store::GetResultPayload::File(file, _) = result.payload {
            // The local backend would read 8 KiB per blocking hand-off (tens of thousands
            // per artifact sent to a fleet): read the file in larger pieces instead.
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let range = result.range;
            let mut file = tokio::fs::File::from_std(file);
            file.seek(std::io::SeekFrom::Start(range.start))
                .await
                .map_err(|e| StoreError::Io { key: key_text.clone(), source: e })?;
            let reader = file.take(range.end - range.start);
            return Ok(tokio_util::io::ReaderStream::with_capacity(reader, read_size)
                .map_err(move |source| StoreError::Io { key: key_text.clone(), source })
                .boxed());
        }
        Ok(result
            .into_stream()
            .map_err(move |source| StoreError::Backend { backend: describe.clone(), key: key_text.clone(), source })
            .boxed())
    }

    /// Streams the bytes of an artifact in `ranges`, one after another. The local backend reads
    /// them all from one open file: a ranged read each cost an open and several blocking
    /// hand-offs, on the cores the local nodes unpack on (a 1%-changed prepare, ~95 frames in
    /// runs: 86.8 -> 80.2 ms, bench/prepare.py on tmpfs). S3 gets a ranged GET each, one at
    /// a time. Every range is checked against the object's size first: an empty one, or one
    /// past its end, is refused, naming it, before a byte is sent.
    pub async fn read_artifact_ranges(
        &self,
        digest: Digest,
        ranges: Vec<Range<u64>>,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        if ranges.is_empty() {
            return Ok(futures::stream::empty().boxed());
        }
        let key = Key::Artifact(digest);
        let path = self.path(key);
        // The local backend's answer is its file, opened, not read; S3 is asked only the size.
        let (size, file) = match self.backend {
            Backend::S3 { .. } => (self.inner.head(&path).await.map_err(self.error(key))?.size, None),
            Backend::Local { .. } => {
                let result = self.inner.get_opts(&path, GetOptions::default()).await.map_err(self.error(key))?;
                match result.payload {
                    object_store::GetResultPayload::File(file, _) => (result.meta.size, Some(file)),
                    object_store::GetResultPayload::Stream(_) => (result.meta.size, None),
                }
            }
        };
        if let Some(bad) = ranges.iter().find(|r| r.start >= r.end || r.end > size) {
            return Err(not_within(path.to_string(), bad, size));
        }
        let Some(file) = file else {
            let store = self.clone();
            let reads = futures::stream::iter(ranges).then(move |range| {
                let store = store.clone();
                async move { store.read_artifact(digest, Some(range), READ_FOR_NODES).await }
            });
            return Ok(reads.try_flatten().boxed());
        };
        // A blocking thread of its own for the whole stream, unlike `read_artifact`'s piece by
        // piece (which an HTTP download, at its reader's pace, must not pin): here the reader is
        // a node in a deploy, and the thread ends when its call ends and drops the stream.
        let key = path.to_string();
        let (send, receive) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || read_ranges(&file, &ranges, &key, &send));
        Ok(futures::stream::unfold(receive, |mut receive| async { Some((receive.recv().await?, receive)) }).boxed())
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
}

/// The refusal of a byte range that is not within an object of `size` bytes (or is empty).
fn not_within(key: String, range: &Range<u64>, size: u64) -> StoreError {
    let why = format!("bytes {}..{} of it: not a range within its {size} bytes", range.start, range.end);
    StoreError::Io { key, source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why) }
}

/// Reads `ranges` of `file` in order, in pieces of at most [`READ_FOR_NODES`], onto `send`;
/// stops at the first failure (sent on) or when the receiver is gone.
fn read_ranges(
    file: &std::fs::File,
    ranges: &[Range<u64>],
    key: &str,
    send: &tokio::sync::mpsc::Sender<Result<Bytes, StoreError>>,
) {
    use std::os::unix::fs::FileExt;
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let mut piece = vec![0; (range.end - at).min(READ_FOR_NODES as u64) as usize];
            let read = file.read_exact_at(&mut piece, at).map(|()| Bytes::from(piece)).map_err(|e| {
                let what = format!("bytes {}..{} of it: {e}", range.start, range.end);
                StoreError::Io { key: key.to_owned(), source: std::io::Error::new(e.kind(), what) }
            });
            let failed = read.is_err();
            if send.blocking_send(read).is_err() || failed {
                return;
            }
            at += READ_FOR_NODES as u64;
        }
    }
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
