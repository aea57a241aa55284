//! `release upload FILE|DIR --service S`: package if needed, upload, print the digest.
//!
//! A directory is packaged first, which yields its digest; a file is hashed first (~1 GB/s from
//! the page cache). If the server already holds that digest for this service, nothing is sent
//! (the same bytes again are a no-op that succeeds), else the bytes go with the digest in the
//! `X-Release-Digest` header, which every proxy passes on. `--digest-trailer` hashes a file
//! while it is sent and names the digest in a trailer instead: one read, but proxies such as
//! Nginx drop trailers. Either way the server refuses bytes that changed on the way.

use std::path::PathBuf;

use super::package::pack_with_progress;
use super::{Failure, Output, ServerArgs, exit};
use crate::client::UploadLabels;
use crate::digest::Digest;
use crate::server::{ArtifactAnswer, Uploaded};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An archive made by `release package`, or a directory to package first.
    path: PathBuf,
    /// The service it is a build of.
    #[arg(long)]
    service: String,
    /// Version label, e.g. 1.4.2.
    #[arg(long)]
    version: Option<String>,
    /// The commit it was built from.
    #[arg(long)]
    git_sha: Option<String>,
    /// Link to the CI build.
    #[arg(long)]
    build_url: Option<String>,
    /// When packaging a directory: leave out this relative path (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// A file: hash it while it is sent and name its digest in an HTTP trailer, reading it
    /// once instead of twice. Only where nothing between here and the server drops trailers
    /// (Nginx does): by default the file is hashed first and its digest sent as a header.
    #[arg(long)]
    digest_trailer: bool,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn run(args: Args, output: Output) -> Result<(), Failure> {
    let meta = std::fs::metadata(&args.path)
        .map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", args.path.display())))?;
    let client = args.server.client();
    // A packaged directory lives in a temporary directory until the upload is done.
    let mut _scratch = None;
    let (file, known) = if meta.is_dir() {
        let scratch = tempfile::tempdir()?;
        let target = scratch.path().join("artifact.tar.zst");
        let (dir, exclude, target_clone) = (args.path.clone(), args.exclude.clone(), target.clone());
        let packed = tokio::task::spawn_blocking(move || pack_with_progress(&dir, &exclude, &target_clone, output))
            .await
            .expect("packaging does not panic")?;
        _scratch = Some(scratch);
        (target, Some(packed.digest))
    } else if args.digest_trailer {
        (args.path.clone(), None)
    } else {
        let path = args.path.clone();
        let bar = output.progress(Some(meta.len()), "hashing");
        let hashing = bar.clone();
        let digest = tokio::task::spawn_blocking(move || hash_file(&path, move |n| hashing.set_position(n)))
            .await
            .expect("hashing does not panic")
            .map_err(|e| Failure::new(exit::FAILED, format!("{}: {e}", args.path.display())))?;
        bar.finish_and_clear();
        (args.path.clone(), Some(digest))
    };
    let size = std::fs::metadata(&file)?.len();
    if let Some(digest) = known
        && let Some(existing) = client.artifact(&digest).await?
        && super::read::<ArtifactAnswer>(&existing)?.uploads.iter().any(|u| u.service == args.service)
    {
        let answer = serde_json::json!({"digest": digest, "size": size, "created": false, "service": args.service});
        output.print(&answer, || {
            eprintln!("already stored for {}; nothing sent", args.service);
            digest.to_string()
        });
        return Ok(());
    }

    let labels =
        UploadLabels { service: args.service, version: args.version, git_sha: args.git_sha, build_url: args.build_url };
    let answer = upload_in_turn(&client, &file, known, &labels, size, output).await?;
    let uploaded: Uploaded = super::read(&answer)?;
    let digest = uploaded.artifact.digest.to_string();
    output.print(&answer, || {
        let what = if uploaded.created { "stored" } else { "already stored" };
        // The digest alone on stdout (`DIGEST=$(release upload …)`), the rest for a person.
        eprintln!("{what} for {} ({size} bytes)", labels.service);
        digest
    });
    Ok(())
}

/// How long `release upload` keeps sending an upload again that the server had no turn for.
const BUSY_FOR: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Uploads `file`; sent again, after the time the answer names (`Retry-After`, 1-60 s), while
/// the server has no turn for it (`503 busy`: every turn held longer than
/// `limits.upload_stall_timeout`, or this upload's turn went to another token's; `429
/// rate_limited`: this token has as many uploads running and waiting as it may) or a proxy
/// says the same, for [`BUSY_FOR`] at most. Nothing of a refused upload was stored, and the
/// same bytes again are a no-op: sending it again is safe.
async fn upload_in_turn(
    client: &crate::client::Client,
    file: &std::path::Path,
    known: Option<Digest>,
    labels: &UploadLabels,
    size: u64,
    output: Output,
) -> Result<serde_json::Value, crate::client::ClientError> {
    use crate::client::ClientError;
    let started = std::time::Instant::now();
    loop {
        let bar = output.progress(Some(size), "uploading");
        let progress_bar = bar.clone();
        let answer = client.upload(file, known, labels, move |sent| progress_bar.set_position(sent)).await;
        bar.finish_and_clear();
        match answer {
            // Whoever answered (this server, or a proxy before it), with the time to wait.
            Err(ClientError::Api { status: 429 | 503, message, retry_after: Some(seconds), .. })
                if started.elapsed() < BUSY_FOR =>
            {
                let seconds = seconds.clamp(1, 60);
                eprintln!("{message}; sending it again in {seconds} s");
                tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
            }
            answer => return answer,
        }
    }
}

/// The SHA-256 of a file, read in large pieces; `progress` sees the bytes read so far.
fn hash_file(path: &std::path::Path, progress: impl Fn(u64)) -> std::io::Result<Digest> {
    use sha2::Digest as _;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(Digest::from_hasher(hasher));
        }
        hasher.update(&buf[..n]);
        read += n as u64;
        progress(read);
    }
}
