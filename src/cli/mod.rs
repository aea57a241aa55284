//! The command line: one file per subcommand; this file parses and dispatches.
//!
//! Every command takes `--json` (machine-readable output on stdout). Failures print their whole
//! error once and exit with SPEC 4's codes (see [`Failure`]).

mod artifact;
mod audit;
mod backup;
mod init;
mod look;
mod package;
mod release;
mod serve;
mod token;
mod upload;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::{Client, ClientError};

#[derive(Debug, Parser)]
#[command(name = "release", version, about = "Artifact build-and-release server with immutable releases")]
pub struct Cli {
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (with no configuration: the embedded default).
    Serve(serve::Args),
    /// Write a commented example release.toml.
    Init(init::Args),
    /// Manage API tokens on the local registry (works without a running server).
    #[command(subcommand)]
    Token(token::Command),
    /// Write a deterministic tar+zstd archive of a directory and print its digest.
    Package(package::Args),
    /// Upload an archive (packaging a directory first); prints the digest.
    Upload(upload::Args),
    /// Download an artifact's bytes, checking their digest.
    Download(artifact::DownloadArgs),
    /// Look at stored artifacts.
    #[command(subcommand)]
    Artifact(artifact::Command),
    /// Ask for an artifact to go live in an environment.
    Deploy(release::DeployArgs),
    /// Ask for what is live in one environment to go live in the next.
    Promote(release::PromoteArgs),
    /// Approve a release waiting for approval (not your own).
    Approve(release::DecideArgs),
    /// Reject a release waiting for approval.
    Reject(release::RejectArgs),
    /// Withdraw a release waiting for approval (yours, or as an admin).
    Cancel(release::CancelArgs),
    /// Go back to the last good release, or to a digest that was live before.
    Rollback(release::RollbackArgs),
    /// What is live where, and what is in flight.
    Status(look::StatusArgs),
    /// Before the first deploy and after any change to a node: what a deploy of SERVICE to
    /// ENV will need, looked at on each node, nothing changed (exit 1 if a check fails).
    Check(look::CheckArgs),
    /// Releases, newest first.
    History(look::HistoryArgs),
    /// One release with its transitions, approval and per-node deployments.
    Show(look::ShowArgs),
    /// The audit log: export, verify.
    #[command(subcommand)]
    Audit(audit::Command),
    /// Back up the registry to the object store (works while the server runs).
    Backup(backup::BackupArgs),
    /// Restore the registry from a backup in the object store (the server stopped).
    Restore(backup::RestoreArgs),
    /// The node side, run over SSH (or locally) by the server: not for people.
    #[command(hide = true)]
    Node(NodeArgs),
}

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The node protocol the server speaks; refused unless it is this agent's.
    #[arg(long)]
    protocol: Option<u32>,
}

/// Where the server is and who we are, for client commands.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The release server's URL.
    #[arg(long, env = "RELEASE_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API token. Prefer RELEASE_TOKEN: a token given here shows in the process list and lands
    /// in shell history (a warning says so). Given both, this flag wins, as flags always do.
    #[arg(long, env = "RELEASE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ServerArgs {
    pub fn client(&self) -> Client {
        Client::new(&self.server, self.token.clone())
    }
}

/// A command's failure: the message to print and the exit code (SPEC 4).
#[derive(Debug)]
pub struct Failure {
    pub exit: u8,
    pub message: String,
    /// The command already printed its JSON document (e.g. the release that failed): no
    /// second one for the error.
    pub json_printed: bool,
}

pub mod exit {
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONFLICT: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const NOT_ALLOWED: u8 = 5;
    pub const INTEGRITY: u8 = 6;
    /// The deploy failed and the fleet was put back on the previous release.
    pub const DEPLOY_FAILED: u8 = 7;
    /// The deploy failed and at least one node could not be put back.
    pub const NOT_PUT_BACK: u8 = 8;
}

impl Failure {
    /// Marks that the command printed its JSON document already.
    pub fn printed(mut self, printed: bool) -> Failure {
        self.json_printed = printed;
        self
    }

    pub fn new(exit: u8, message: impl std::fmt::Display) -> Failure {
        Failure { exit, message: message.to_string(), json_printed: false }
    }
}

/// Rows under a header, each column as wide as its widest cell, two spaces apart, no borders
/// (a terminal and `awk` read it alike); the columns in `right` aligned right (sizes).
fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>, right: &[usize]) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right.contains(&i) {
            column.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t.lines().map(|l| l.trim_end().to_owned()).collect::<Vec<_>>().join("\n")
}

/// A table (or any lines) set two spaces in, as a list under a heading.
fn indent(lines: &str) -> String {
    lines.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

/// An answer read into the type the server wrote it from (`--json` still prints the answer
/// as it came).
fn read<T: serde::de::DeserializeOwned>(answer: &serde_json::Value) -> Result<T, Failure> {
    T::deserialize(answer).map_err(|e| Failure::new(exit::FAILED, format!("the server's answer does not read: {e}")))
}

/// `-` for nothing, as [`text`] shows a null.
fn or_dash(value: Option<impl std::fmt::Display>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The last lines of a failed phase's output (what the hook or check said), each indented
/// under its phase; nothing when there is none.
fn indented_tail(output: Option<&str>) -> String {
    const LINES: usize = 20;
    let Some(output) = output.filter(|o| !o.trim().is_empty()) else { return String::new() };
    let lines: Vec<&str> = output.trim_end().lines().collect();
    let start = lines.len().saturating_sub(LINES);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("      … ({start} lines above; `release show ID --json` has the output kept)\n"));
    }
    for line in &lines[start..] {
        out.push_str(&format!("      | {line}\n"));
    }
    out
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let exit = match &e {
            ClientError::Api { status, code, .. } => match (status, code.as_str()) {
                (401 | 403, _) => exit::NOT_ALLOWED,
                (404, _) => exit::NOT_FOUND,
                (409, _) => exit::CONFLICT,
                (_, "digest_mismatch" | "unsafe_archive" | "archive_too_large" | "upload_too_large") => exit::INTEGRITY,
                (_, "upload_interrupted") => exit::FAILED,
                (400, _) => exit::USAGE,
                _ => exit::FAILED,
            },
            ClientError::DigestMismatch { .. } => exit::INTEGRITY,
            _ => exit::FAILED,
        };
        Failure::new(exit, crate::error_chain(&e))
    }
}

impl From<crate::config::ConfigError> for Failure {
    fn from(e: crate::config::ConfigError) -> Failure {
        Failure::new(exit::USAGE, crate::error_chain(&e))
    }
}

impl From<crate::registry::RegistryError> for Failure {
    fn from(e: crate::registry::RegistryError) -> Failure {
        use crate::registry::RegistryError as R;
        let exit = match e {
            R::TokenNameTaken(_) | R::TokenAlreadyRevoked(_) => exit::CONFLICT,
            R::TokenNotFound(_) => exit::NOT_FOUND,
            _ => exit::FAILED,
        };
        Failure::new(exit, crate::error_chain(&e))
    }
}

impl From<crate::archive::PackError> for Failure {
    fn from(e: crate::archive::PackError) -> Failure {
        use crate::archive::PackError as P;
        let exit = match e {
            P::Unsupported { .. } | P::LinkEscapes { .. } | P::NotUtf8 { .. } | P::Undeployable { .. } => {
                exit::INTEGRITY
            }
            P::OutputInsideTree { .. } | P::NotADirectory { .. } => exit::USAGE,
            P::Io { .. } | P::Changed { .. } => exit::FAILED,
        };
        Failure::new(exit, crate::error_chain(&e))
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::new(exit::FAILED, crate::error_chain(&e))
    }
}

/// How a command prints: JSON for machines, text for people, progress only on a terminal.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn interactive(&self) -> bool {
        !self.json && std::io::stdout().is_terminal()
    }

    /// A progress bar on stderr when stdout is a terminal; hidden otherwise.
    pub fn progress(&self, total: Option<u64>, message: &str) -> indicatif::ProgressBar {
        if !self.interactive() {
            return indicatif::ProgressBar::hidden();
        }
        let bar = match total {
            Some(total) => indicatif::ProgressBar::new(total).with_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            ),
            None => indicatif::ProgressBar::new_spinner()
                .with_style(indicatif::ProgressStyle::with_template("{spinner} {msg} {pos}").expect("valid template")),
        };
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.with_message(message.to_owned())
    }

    /// Prints the answer on stdout. A reader that went away (`| head -n 1`) is not an error
    /// of ours: what it did not read is dropped, no panic.
    pub fn print(&self, json: &serde_json::Value, human: impl FnOnce() -> String) {
        use std::io::Write;
        let text = if self.json { json.to_string() } else { human() };
        let _ = writeln!(std::io::stdout(), "{text}");
    }
}

/// Parses the process's command line (exiting on bad usage, as clap does), with a warning on
/// stderr when a token came on it: every user of the machine can read it in `ps`.
pub fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    if token_on_command_line(&matches) {
        eprintln!(
            "warning: --token shows the token to every user of this machine (ps) and keeps it in your shell \
             history; set RELEASE_TOKEN instead"
        );
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Whether `--token` was given on the command line (not through RELEASE_TOKEN), in whichever
/// subcommand takes it.
fn token_on_command_line(matches: &clap::ArgMatches) -> bool {
    let here = matches.try_contains_id("token").unwrap_or(false)
        && matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine);
    here || matches.subcommand().is_some_and(|(_, sub)| token_on_command_line(sub))
}

/// Runs a parsed command line; the process's exit code.
pub fn run(cli: Cli) -> ExitCode {
    let output = Output { json: cli.json };
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Init(args) => init::run(args, output),
        Command::Token(command) => token::run(command, output),
        Command::Package(args) => package::run(args, output),
        Command::Upload(args) => runtime().block_on(upload::run(args, output)),
        Command::Download(args) => runtime().block_on(artifact::download(args, output)),
        Command::Artifact(command) => runtime().block_on(artifact::run(command, output)),
        Command::Deploy(args) => runtime().block_on(release::deploy(args, output)),
        Command::Promote(args) => runtime().block_on(release::promote(args, output)),
        Command::Approve(args) => runtime().block_on(release::approve(args, output)),
        Command::Reject(args) => runtime().block_on(release::reject(args, output)),
        Command::Cancel(args) => runtime().block_on(release::cancel(args, output)),
        Command::Rollback(args) => runtime().block_on(release::rollback(args, output)),
        Command::Status(args) => runtime().block_on(look::status(args, output)),
        Command::Check(args) => runtime().block_on(look::check(args, output)),
        Command::History(args) => runtime().block_on(look::history(args, output)),
        Command::Show(args) => runtime().block_on(look::show(args, output)),
        Command::Audit(command) => runtime().block_on(audit::run(command, output)),
        Command::Backup(args) => runtime().block_on(backup::backup(args, output)),
        Command::Restore(args) => runtime().block_on(backup::restore(args, output)),
        Command::Node(args) => return crate::node::main(args.protocol),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if output.json && !failure.json_printed {
                println!("{}", serde_json::json!({"error": {"exit": failure.exit, "message": failure.message}}));
            }
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.exit)
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime starts")
}

/// A data directory from `--data-dir`/`RELEASE_DATA_DIR`, else the config file's, else the default.
#[derive(Debug, clap::Args)]
pub struct DataDirArgs {
    /// The server's data directory (registry.db lives there).
    #[arg(long, env = "RELEASE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Read data_dir from this configuration file.
    #[arg(long, env = "RELEASE_CONFIG")]
    pub config: Option<PathBuf>,
}

impl DataDirArgs {
    pub fn registry(&self) -> Result<crate::registry::Registry, Failure> {
        let overrides = crate::config::Overrides { listen: None, data_dir: self.data_dir.clone() };
        let config = crate::config::Config::load(self.config.as_deref(), &overrides)?;
        let path = config.registry_path();
        if !path.exists() {
            // A token made in a registry no server reads is the usual first-hour mistake.
            eprintln!(
                "no registry at {}: creating one there (a server must run with that data directory to see \
                 it; give the server's with --data-dir, RELEASE_DATA_DIR or --config)",
                path.display()
            );
        }
        Ok(crate::registry::Registry::open(&path)?)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Columns line up under a heading whatever the widths: a long node name pushes the
    /// next column right on every row, not just its own.
    #[test]
    fn indented_tables_align_whatever_the_widths() {
        let long = "a-node-whose-hostname-is-much-longer-than-twenty.example.org";
        let rows = vec![
            vec![long.to_owned(), "switch".to_owned(), "ok".to_owned()],
            vec!["n1".to_owned(), "fetch".to_owned(), "failed".to_owned()],
        ];
        let out = super::indent(&super::table(&["NODE", "PHASE", "OUTCOME"], rows, &[]));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines.iter().all(|l| l.starts_with("  ") && !l.starts_with("   ")), "{out}");
        let column = lines[0].find("PHASE").unwrap();
        assert!(column > long.len() + 2, "{out}");
        assert_eq!(lines[1].find("switch"), Some(column), "{out}");
        assert_eq!(lines[2].find("fetch"), Some(column), "{out}");
    }

    /// Every argument of every command says what it is for in `--help`.
    #[test]
    fn every_argument_has_a_description() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "release", &mut missing);
        assert!(missing.is_empty(), "arguments without a description:\n{}", missing.join("\n"));
    }
}
