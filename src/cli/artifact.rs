//! `release download DIGEST` and `release artifact show|list`.

use std::path::PathBuf;

use super::{Failure, Output, ServerArgs, exit};
use crate::digest::Digest;

#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
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
        digest: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// A service's artifacts, newest first.
    List {
        service: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
}

fn parse(digest: &str) -> Result<Digest, Failure> {
    digest.parse().map_err(|e| Failure::new(exit::USAGE, e))
}

pub async fn download(args: DownloadArgs, output: Output) -> Result<(), Failure> {
    let digest = parse(&args.digest)?;
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
                .artifact(digest)
                .await?
                .ok_or_else(|| Failure::new(exit::NOT_FOUND, format!("no artifact {digest}")))?;
            output.print(&artifact, || serde_json::to_string_pretty(&artifact).expect("JSON prints"));
        }
        Command::List { service, limit, server } => {
            let list = server.client().service_artifacts(&service, limit).await?;
            output.print(&list, || {
                let mut text = format!("{:<20} {:<16} {:>12}  {}", "DIGEST", "VERSION", "SIZE", "UPLOADED");
                for a in list["artifacts"].as_array().into_iter().flatten() {
                    let digest = a["digest"].as_str().unwrap_or_default();
                    text.push_str(&format!(
                        "\n{:<20} {:<16} {:>12}  {} by {}",
                        &digest[..digest.len().min(19)],
                        a["version"].as_str().unwrap_or("-"),
                        a["size"],
                        a["uploaded_at"].as_str().unwrap_or_default(),
                        a["uploaded_by"].as_str().unwrap_or_default()
                    ));
                }
                text
            });
        }
    }
    Ok(())
}
