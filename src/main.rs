//! The `release` binary: parse the command line, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    release::cli::run(release::cli::Cli::parse())
}
