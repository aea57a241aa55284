//! `release audit export|verify`: the audit log as JSON lines; the hash chain checked end to
//! end and against the bucket's checkpoint (exit 6 when anything was altered).

use super::{Failure, Output, ServerArgs, exit};
use crate::audit::Verification;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the audit log as JSON lines.
    Export {
        /// Only events at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Check the hash chain end to end and against the bucket's checkpoint.
    Verify {
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub async fn run(command: Command, output: Output) -> Result<(), Failure> {
    match command {
        Command::Export { since, server } => {
            let query: Vec<(&str, String)> = since.into_iter().map(|s| ("since", s)).collect();
            let mut stdout = std::io::stdout();
            server.client().stream_to("/v1/audit/events", &query, &mut stdout).await?;
            Ok(())
        }
        Command::Verify { server } => {
            let answer = server.client().get("/v1/audit/verify", &[]).await?;
            let v: Verification = super::read(&answer)?;
            if v.ok {
                output.print(&answer, || {
                    let against = match &v.checkpoint {
                        Some(c) => {
                            format!("; matches the bucket's checkpoint of {} ({} events)", c.at, c.events)
                        }
                        None => "; no checkpoint in the bucket yet".into(),
                    };
                    let gaps: String = v
                        .gaps
                        .iter()
                        .map(|g| {
                            format!(
                                "\nrecorded gap: events {} to {} lost by the restore recorded as event {}",
                                g.from, g.to, g.restored_at
                            )
                        })
                        .collect();
                    format!(
                        "audit log intact: {} events, head {}{against}{gaps}",
                        v.events,
                        v.head.as_deref().unwrap_or("-")
                    )
                });
                Ok(())
            } else {
                if output.json {
                    println!("{answer}");
                }
                let (seq, why) = match &v.first_bad {
                    Some(bad) => (bad.seq.to_string(), bad.why.as_str()),
                    None => ("null".into(), "?"),
                };
                Err(Failure::new(exit::INTEGRITY, format!("audit log broken at event {seq}: {why}")))
            }
        }
    }
}
