//! Uploads under way: a staging key written as the body comes, published under its content
//! address once verified, discarded, or swept after a crash (S3 multipart uploads included).

use super::*;

impl Store {
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
    pub(super) async fn stream_copy(&self, from: &Path, to: &Path) -> Result<(), StoreError> {
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
    pub(super) async fn multipart_uploads(&self, path: &Path) -> Result<Vec<String>, StoreError> {
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
pub(super) fn multipart_upload_ids(xml: &str, key: &str) -> Vec<String> {
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

pub(super) fn sweep_dir(dir: &std::path::Path, cutoff: SystemTime) -> usize {
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
