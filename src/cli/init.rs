//! `release init [DIR]`: write the commented example configuration.

use std::io::Write;
use std::path::PathBuf;

use super::{Failure, Output, exit};
use crate::config::EXAMPLE;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write release.toml into.
    #[arg(default_value = ".")]
    dir: PathBuf,
}

pub fn run(args: Args, output: Output) -> Result<(), Failure> {
    std::fs::create_dir_all(&args.dir)?;
    let path = args.dir.join("release.toml");
    let mut file = match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Failure::new(exit::CONFLICT, format!("{} exists already; not overwritten", path.display())));
        }
        Err(e) => return Err(Failure::new(exit::FAILED, format!("{}: {e}", path.display()))),
    };
    file.write_all(EXAMPLE.as_bytes())?;
    output.print(&serde_json::json!({"path": path}), || format!("wrote {}", path.display()));
    Ok(())
}
