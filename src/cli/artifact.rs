//! `release download DIGEST` and `release artifact show|list`.

use std::path::PathBuf;

use super::{Failure, Output, ServerArgs, exit};
use crate::curation::{Blocked, Purged};
use crate::digest::DigestRef;
use crate::server::{ArtifactAnswer, ListAnswer};

#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// The artifact's digest, `sha256:<64 hex>`, or its first 12 or more hex digits.
    digest: String,
    /// Where to write the bytes [default: ./<hex>.tar.zst].
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// One artifact's metadata and upload records.
    Show {
        /// The artifact's digest, `sha256:<64 hex>`, or its first 12 or more hex digits.
        digest: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Never deployable again (admin), e.g. after a data-corrupting bug; cancels its releases
    /// waiting for approval or approved and not started, and stops one deploying before its
    /// switch. What is live stays live: roll it back.
    Block {
        /// The artifact's digest, `sha256:<64 hex>`, or its first 12 or more hex digits.
        digest: String,
        /// Why (recorded with the block, shown to whoever tries to deploy it).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Free the bytes of artifacts never live and older than DAYS (admin); the rows stay.
    /// Artifacts a release waits for or runs, and adopted legacy trees, are kept.
    Purge {
        /// Required: only artifacts never live are ever purged.
        #[arg(long, required = true)]
        never_live: bool,
        /// At least 1.
        #[arg(long, value_name = "DAYS")]
        older_than: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// A service's artifacts, newest first.
    List {
        /// The service the artifacts were uploaded for.
        service: String,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn parse(digest: &str) -> Result<DigestRef, Failure> {
    digest.parse().map_err(|e| Failure::new(exit::USAGE, e))
}

pub async fn download(args: DownloadArgs, output: Output) -> Result<(), Failure> {
    let digest = match parse(&args.digest)? {
        DigestRef::Full(digest) => digest,
        // The whole digest first: the bytes are checked against it.
        prefix => {
            let found = args.server.client().artifact(&prefix).await?;
            let found = found.ok_or_else(|| Failure::new(exit::NOT_FOUND, format!("no artifact {prefix}")))?;
            super::read::<ArtifactAnswer>(&found)?.artifact.digest
        }
    };
    let target = args.output.unwrap_or_else(|| PathBuf::from(format!("{}.tar.zst", digest.hex())));
    let bar = output.progress(None, "downloading");
    let progress_bar = bar.clone();
    let size = args
        .server
        .client()
        .download(digest, &target, move |received, total| {
            if let Some(total) = total {
                progress_bar.set_length(total);
            }
            progress_bar.set_position(received);
        })
        .await;
    bar.finish_and_clear();
    let size = size?;
    output.print(&serde_json::json!({"digest": digest, "size": size, "path": target}), || {
        format!("{digest}\n{} ({size} bytes, digest verified)", target.display())
    });
    Ok(())
}

pub async fn run(command: Command, output: Output) -> Result<(), Failure> {
    match command {
        Command::Show { digest, server } => {
            let digest = parse(&digest)?;
            let artifact = server
                .client()
                .artifact(&digest)
                .await?
                .ok_or_else(|| Failure::new(exit::NOT_FOUND, format!("no artifact {digest}")))?;
            output.print(&artifact, || serde_json::to_string_pretty(&artifact).expect("JSON prints"));
        }
        Command::Block { digest, reason, server } => {
            let digest = parse(&digest)?;
            let block = server
                .client()
                .post(&format!("/v1/artifacts/{digest}/block"), &serde_json::json!({"reason": reason}))
                .await?;
            let blocked: Blocked = super::read(&block)?;
            output.print(&block, || {
                let cancelled: Vec<String> = blocked.cancelled.iter().map(i64::to_string).collect();
                if cancelled.is_empty() {
                    format!("{digest} is blocked: {reason}")
                } else {
                    format!(
                        "{digest} is blocked: {reason}\ncancelled the releases of it not started: {}",
                        cancelled.join(", ")
                    )
                }
            });
        }
        Command::Purge { never_live, older_than, server } => {
            let body = serde_json::json!({"never_live": never_live, "older_than_days": older_than});
            let report = server.client().post("/v1/artifacts/purge", &body).await?;
            let purged: Purged = super::read(&report)?;
            output.print(&report, || {
                let count = purged.purged.len();
                format!("purged the bytes of {count} artifacts never live ({} bytes freed)", purged.bytes)
            });
        }
        Command::List { service, limit, server } => {
            let list = server.client().service_artifacts(&service, limit).await?;
            let page: ListAnswer = super::read(&list)?;
            output.print(&list, || {
                // The short digest is what every command takes back (12 hex digits or more).
                let rows = page.artifacts.iter().map(|a| {
                    let u = &a.upload;
                    vec![
                        u.digest.short(),
                        u.version.as_deref().unwrap_or("-").to_owned(),
                        a.size.to_string(),
                        format!("{} by {}", u.uploaded_at, u.uploaded_by),
                    ]
                });
                super::table(&["DIGEST", "VERSION", "SIZE", "UPLOADED"], rows, &[2])
            });
        }
    }
    Ok(())
}
