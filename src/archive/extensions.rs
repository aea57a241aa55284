//! GNU long-name and long-link entries and PAX headers: the extension entries that name the
//! entry after them, read into memory (capped) by the walk instead of by the tar reader,
//! which would read one of any size.

use std::io::{self, Read};

use tar::EntryType;

use super::ArchiveError;

/// GNU long-name and long-link entries and PAX headers, which name the entry that follows.
/// Each is read into memory, so each is capped at [`MAX_EXTENSION`] bytes.
#[derive(Default)]
pub(super) struct Extensions {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    /// A PAX `size`, which must agree with the next header's (entries past 8 GiB, which need
    /// it, are not supported).
    size: Option<u64>,
    pending: bool,
}

const MAX_EXTENSION: u64 = 64 << 10;

impl Extensions {
    /// Takes in an extension entry; `Ok(false)` for an ordinary entry. Errors are either an
    /// archive error or a read error for the caller to classify.
    pub(super) fn absorb<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<bool, Either> {
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            EntryType::GNULongName | EntryType::GNULongLink | EntryType::XHeader | EntryType::XGlobalHeader
        ) {
            return Ok(false);
        }
        let size = entry.size();
        if size > MAX_EXTENSION {
            return Err(Either::Archive(ArchiveError::Tar(format!(
                "a long-name or PAX header of {size} bytes (at most {MAX_EXTENSION})"
            ))));
        }
        let mut data = Vec::with_capacity(size as usize);
        entry.read_to_end(&mut data).map_err(Either::Read)?;
        let twice = || Either::Archive(ArchiveError::Tar("two long names or PAX headers for one entry".into()));
        match kind {
            EntryType::GNULongName | EntryType::GNULongLink => {
                let slot = if kind == EntryType::GNULongName { &mut self.path } else { &mut self.link };
                if slot.is_some() {
                    return Err(twice());
                }
                let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
                data.truncate(end);
                *slot = Some(data);
                self.pending = true;
            }
            EntryType::XHeader => {
                for extension in tar::PaxExtensions::new(&data) {
                    let extension =
                        extension.map_err(|e| Either::Archive(ArchiveError::Tar(format!("PAX header: {e}"))))?;
                    let value = extension.value_bytes().to_vec();
                    match extension.key_bytes() {
                        b"path" => self.path = Some(value),
                        b"linkpath" => self.link = Some(value),
                        b"size" => {
                            let size = std::str::from_utf8(&value).ok().and_then(|v| v.parse().ok());
                            self.size = Some(size.ok_or_else(|| {
                                Either::Archive(ArchiveError::Tar("PAX header: size is not a number".into()))
                            })?);
                        }
                        _ => {}
                    }
                }
                self.pending = true;
            }
            _ => {} // a global PAX header: nothing in it matters here
        }
        Ok(true)
    }

    /// The path and link target of an ordinary entry, from the extensions before it or its
    /// own header.
    pub(super) fn take<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), ArchiveError> {
        if let Some(size) = self.size.take()
            && size != entry.size()
        {
            return Err(ArchiveError::Tar(format!(
                "PAX size {size} differs from the header's {} (entries past 8 GiB are not supported)",
                entry.size()
            )));
        }
        self.pending = false;
        let path = self.path.take().unwrap_or_else(|| entry.header().path_bytes().into_owned());
        let link = self.link.take().or_else(|| entry.header().link_name_bytes().map(|l| l.into_owned()));
        Ok((path, link))
    }

    pub(super) fn pending(&self) -> bool {
        self.pending
    }
}

/// An archive error, or a read error still to be classified (limit, zstd, truncation).
pub(super) enum Either {
    Archive(ArchiveError),
    Read(io::Error),
}

impl Either {
    pub(super) fn or_else(self, classify: impl Fn(io::Error) -> ArchiveError) -> ArchiveError {
        match self {
            Either::Archive(e) => e,
            Either::Read(e) => classify(e),
        }
    }
}
