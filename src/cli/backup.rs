//! `release backup` and `release restore`: the registry to the object store and back (the
//! work is in `crate::backup`; this file parses, prints and maps failures to exit codes).

use std::path::PathBuf;

use super::{Failure, Output, exit};
use crate::backup::{self, BackupError, Which};
use crate::config::{Config, Overrides};

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    place: Place,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// `latest`, or a backup's key (`backups/registry-<UTC>.db.zst`, as `release backup` printed).
    which: String,
    /// Replace the registry that is there (every event since the backup is lost).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    place: Place,
}

/// The configuration (for the object store and the data directory) and the data directory.
#[derive(Debug, clap::Args)]
struct Place {
    /// Configuration file (TOML); without one, the embedded default.
    #[arg(long, env = "RELEASE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [default: the configuration's].
    #[arg(long, env = "RELEASE_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl Place {
    fn open(&self) -> Result<(Config, crate::store::Store), Failure> {
        let overrides = Overrides { listen: None, data_dir: self.data_dir.clone() };
        let config = Config::load(self.config.as_deref(), &overrides)?;
        let store = crate::store::Store::open(&config.storage).map_err(|e| Failure::new(exit::FAILED, e))?;
        Ok((config, store))
    }
}

impl From<BackupError> for Failure {
    fn from(e: BackupError) -> Failure {
        let code = match &e {
            BackupError::RegistryExists(_) | BackupError::Locked(_) => exit::CONFLICT,
            BackupError::NoBackups | BackupError::UnknownKey(_) => exit::NOT_FOUND,
            BackupError::BadKey(_) => exit::USAGE,
            BackupError::Mismatch { .. } | BackupError::BadManifest { .. } | BackupError::Diverged { .. } => {
                exit::INTEGRITY
            }
            _ => exit::FAILED,
        };
        Failure::new(code, crate::error_chain(&e))
    }
}

pub async fn backup(args: BackupArgs, output: Output) -> Result<(), Failure> {
    let (config, store) = args.place.open()?;
    let path = config.registry_path();
    if !path.exists() {
        return Err(Failure::new(exit::NOT_FOUND, format!("no registry at {}", path.display())));
    }
    let registry = std::sync::Arc::new(crate::registry::Registry::open(&path)?);
    let started = std::time::Instant::now();
    let manifest = backup::take(&registry, &store).await?;
    let json = serde_json::to_value(&manifest).expect("serializes");
    output.print(&json, || {
        format!(
            "backed up {} ({} events, head {}) to {} in {:.1?}: {} bytes, sha256 {}",
            path.display(),
            manifest.events,
            manifest.head,
            manifest.key,
            started.elapsed(),
            manifest.size,
            manifest.sha256
        )
    });
    Ok(())
}

pub async fn restore(args: RestoreArgs, output: Output) -> Result<(), Failure> {
    let (config, store) = args.place.open()?;
    let restored =
        backup::restore(&config.data_dir, &config.registry_path(), &store, Which::parse(&args.which), args.force)
            .await?;
    let json = serde_json::to_value(&restored).expect("serializes");
    output.print(&json, || {
        let m = &restored.manifest;
        let mut text = format!(
            "restored {} (taken {}, {} events, head {}) to {}",
            m.key,
            m.created_at,
            m.events,
            m.head,
            restored.registry.display()
        );
        match (&restored.lost, &restored.checkpoint) {
            (Some(lost), Some(c)) => text.push_str(&format!(
                "\nLOST: audit events {} to {} ({} events): the bucket's newest checkpoint ({}) counted {} events, \
                 head {}; the snapshot ends at event {}, head {}. Uploads, releases, approvals and tokens of those \
                 events are not in the registry.",
                lost.from, lost.to, lost.count, c.at, c.events, c.head, m.events, m.head
            )),
            (_, Some(c)) => text.push_str(&format!(
                "\nnothing lost: the snapshot holds every event the bucket's newest checkpoint ({}, {} events) counted",
                c.at, c.events
            )),
            (_, None) => text.push_str("\nno audit checkpoint in the bucket to compare with"),
        }
        text.push_str(&format!("\nrecorded as audit event {} (registry.restored)", restored.event));
        text
    });
    Ok(())
}
