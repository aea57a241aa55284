//! `release package DIR [-o FILE]`: a deterministic archive and its digest.

use std::path::{Path, PathBuf};

use super::{Failure, Output, exit};
use crate::archive::{self, Packed};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory to package (its contents become the release's root).
    dir: PathBuf,
    /// Where to write the archive [default: ./<DIR name>.tar.zst].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Leave out this relative path and what lies under it (repeatable), e.g. `.env`.
    #[arg(long)]
    exclude: Vec<String>,
}

pub fn run(args: Args, output: Output) -> Result<(), Failure> {
    let target = match args.output {
        Some(path) => path,
        None => default_output(&args.dir)?,
    };
    let packed = pack_with_progress(&args.dir, &args.exclude, &target, output)?;
    // The digest alone on stdout (`D=$(release package …)`), what was written on stderr.
    if !output.json {
        eprintln!("{} ({} bytes, {} entries)", target.display(), packed.size, packed.file_count);
    }
    output.print(
        &serde_json::json!({"digest": packed.digest, "size": packed.size, "file_count": packed.file_count, "path": target}),
        || packed.digest.to_string(),
    );
    Ok(())
}

fn default_output(dir: &Path) -> Result<PathBuf, Failure> {
    let absolute =
        std::fs::canonicalize(dir).map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", dir.display())))?;
    let name = absolute.file_name().map_or_else(|| "root".into(), |n| n.to_string_lossy().into_owned());
    Ok(PathBuf::from(format!("{name}.tar.zst")))
}

/// Packs with a spinner counting entries on a terminal.
pub fn pack_with_progress(dir: &Path, exclude: &[String], target: &Path, output: Output) -> Result<Packed, Failure> {
    let bar = output.progress(None, "packaging, entries:");
    let packed = archive::pack_to_file(dir, exclude, target, &mut |n| {
        if n % 256 == 0 {
            bar.set_position(n);
        }
    });
    bar.finish_and_clear();
    Ok(packed?)
}
