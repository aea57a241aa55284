//! `release init [DIR]`: write the commented example configuration, ready to run in DIR.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Failure, Output, exit};
use crate::config::{self, EXAMPLE};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write release.toml into; the data directory and the example service's two
    /// local nodes go under it too.
    #[arg(default_value = ".")]
    dir: PathBuf,
}

pub fn run(args: Args, output: Output) -> Result<(), Failure> {
    let dir = std::path::absolute(&args.dir)?;
    let path = dir.join("release.toml");
    // Checked before anything is made: a refused name leaves no directory behind.
    let text = example_in(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let mut file = match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Failure::new(exit::CONFLICT, format!("{} exists already; not overwritten", path.display())));
        }
        Err(e) => return Err(Failure::new(exit::FAILED, format!("{}: {e}", path.display()))),
    };
    file.write_all(text.as_bytes())?;
    output.print(&serde_json::json!({"path": path, "data_dir": dir.join("data")}), || {
        format!(
            "wrote {}: service \"api\" with a staging and a production node on this machine, under {}\n\
             start the server with: release serve --config {}",
            path.display(),
            dir.join("nodes").display(),
            path.display()
        )
    });
    Ok(())
}

/// The example with its data directory and its local nodes under `dir`, checked to load, so
/// that what `init` writes is what `serve --config` accepts.
fn example_in(dir: &Path) -> Result<String, Failure> {
    let shown = dir.to_str().filter(|s| !s.contains(['"', '\\', '\n'])).ok_or_else(|| {
        Failure::new(exit::USAGE, format!("{}: a directory whose name TOML can hold plainly, please", dir.display()))
    })?;
    let text = EXAMPLE
        .replace(&format!("data_dir = \"{}\"", config::DEFAULT_DATA_DIR), &format!("data_dir = \"{shown}/data\""))
        .replace("/tmp/release-tour", shown);
    config::Config::from_toml(&text).map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", dir.display())))?;
    Ok(text)
}
