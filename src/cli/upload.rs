//! `release upload FILE|DIR --service S`: package if needed, hash, upload, print the digest.
//!
//! The digest is computed before sending and named in `X-Release-Digest`, so the server refuses
//! bytes that changed on the way. If the server already holds the digest for this service, the
//! upload is skipped: the same bytes again are a no-op that succeeds.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::package::pack_with_progress;
use super::{Failure, Output, ServerArgs, exit};
use crate::client::UploadLabels;
use crate::digest::Digest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An archive made by `release package`, or a directory to package first.
    path: PathBuf,
    #[arg(long)]
    service: String,
    /// Version label, e.g. 1.4.2.
    #[arg(long)]
    version: Option<String>,
    #[arg(long)]
    git_sha: Option<String>,
    /// Link to the CI build.
    #[arg(long)]
    build_url: Option<String>,
    /// When packaging a directory: leave out this relative path (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn run(args: Args, output: Output) -> Result<(), Failure> {
    let meta = std::fs::metadata(&args.path)
        .map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", args.path.display())))?;
    // A packaged directory lives in a temporary directory until the upload is done.
    let mut _scratch = None;
    let (file, digest) = if meta.is_dir() {
        let scratch = tempfile::tempdir()?;
        let target = scratch.path().join("artifact.tar.zst");
        let (dir, exclude, target_clone) = (args.path.clone(), args.exclude.clone(), target.clone());
        let packed = tokio::task::spawn_blocking(move || pack_with_progress(&dir, &exclude, &target_clone, output))
            .await
            .expect("packaging does not panic")?;
        _scratch = Some(scratch);
        (target, packed.digest)
    } else {
        let path = args.path.clone();
        let digest =
            tokio::task::spawn_blocking(move || hash_file(&path, output)).await.expect("hashing does not panic")?;
        (args.path.clone(), digest)
    };
    let size = std::fs::metadata(&file)?.len();
    let client = args.server.client();

    if let Some(existing) = client.artifact(digest).await?
        && existing["uploads"].as_array().is_some_and(|u| u.iter().any(|u| u["service"] == args.service.as_str()))
    {
        let answer = serde_json::json!({"digest": digest, "size": size, "created": false, "service": args.service});
        output.print(&answer, || format!("{digest}\nalready stored for {}; nothing sent", args.service));
        return Ok(());
    }

    let labels =
        UploadLabels { service: args.service, version: args.version, git_sha: args.git_sha, build_url: args.build_url };
    let bar = output.progress(Some(size), "uploading");
    let progress_bar = bar.clone();
    let answer = client.upload(&file, digest, &labels, move |sent| progress_bar.set_position(sent)).await;
    bar.finish_and_clear();
    let answer = answer?;
    output.print(&answer, || {
        let what = if answer["created"] == true { "stored" } else { "already stored" };
        format!("{digest}\n{what} for {} ({size} bytes)", labels.service)
    });
    Ok(())
}

fn hash_file(path: &Path, output: Output) -> Result<Digest, Failure> {
    let mut file =
        std::fs::File::open(path).map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", path.display())))?;
    let bar = output.progress(file.metadata().ok().map(|m| m.len()), "hashing");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(Digest::from_hasher(hasher))
}
