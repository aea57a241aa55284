//! `release token create|list|revoke`: tokens on the local registry, no server needed.

use super::{DataDirArgs, Failure, Output, exit};
use crate::token::{self, Manager, TokenError, TokenRequest};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a token; its secret is printed once and stored only as a hash.
    Create {
        /// The token's name (unique, never reused; it names the actor in the audit log).
        name: String,
        /// Roles, comma-separated: ci, deployer, approver, auditor, admin.
        #[arg(long = "role", required = true)]
        roles: String,
        /// The person or pipeline it belongs to: four eyes compares owners. Required with the
        /// deployer, approver or admin role; for ci and auditor tokens it defaults to NAME.
        /// Lowercased; a-z, 0-9, '-', '_', '.'.
        #[arg(long)]
        owner: Option<String>,
        /// Limit to these services (comma-separated).
        #[arg(long, value_delimiter = ',')]
        services: Option<Vec<String>>,
        /// Limit to these environments (comma-separated).
        #[arg(long, value_delimiter = ',')]
        envs: Option<Vec<String>>,
        /// Expire after this many days.
        #[arg(long)]
        expires: Option<u32>,
        #[command(flatten)]
        data: DataDirArgs,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        data: DataDirArgs,
    },
    /// Revoke a token; its name is never reused.
    Revoke {
        /// The token's name.
        name: String,
        #[command(flatten)]
        data: DataDirArgs,
    },
}

impl From<TokenError> for Failure {
    fn from(e: TokenError) -> Failure {
        match e {
            TokenError::Registry(e) => e.into(),
            e => Failure::new(exit::USAGE, e),
        }
    }
}

pub fn run(command: Command, output: Output) -> Result<(), Failure> {
    match command {
        Command::Create { name, roles, owner, services, envs, expires, data } => {
            let registry = data.registry()?;
            let request = TokenRequest {
                owner,
                name,
                roles: token::parse_roles(&roles)?,
                services,
                environments: envs,
                expires_in_days: expires,
            };
            let (record, secret) = token::create(&registry, request, Manager::Local)?;
            // The secret alone on stdout, so `export RELEASE_TOKEN=$(release token create …)`
            // works; what it is goes to stderr, where a person still reads it.
            output.print(
                &serde_json::json!({"name": record.name, "token": secret, "owner": record.owner,
                    "roles": record.roles, "expires_at": record.expires_at}),
                || {
                    eprintln!(
                        "token {:?} for {} ({}) created; its secret, on stdout, is shown only this once",
                        record.name,
                        record.owner,
                        token::join_roles(&record.roles)
                    );
                    secret.to_string()
                },
            );
        }
        Command::List { data } => {
            let tokens = data.registry()?.tokens()?;
            output.print(&serde_json::to_value(&tokens).expect("tokens serialize"), || {
                let rows = tokens.iter().map(|t| {
                    let state = if t.revoked_at.is_some() {
                        "revoked"
                    } else if t.expires_at.as_ref().is_some_and(|at| *at <= crate::utc::Timestamp::now()) {
                        "expired"
                    } else {
                        "active"
                    };
                    let scope = [("services", &t.services), ("envs", &t.environments)]
                        .iter()
                        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", v.join(","))))
                        .collect::<Vec<_>>()
                        .join(" ");
                    vec![
                        t.name.clone(),
                        t.owner.clone(),
                        token::join_roles(&t.roles),
                        state.to_owned(),
                        if scope.is_empty() { "all".into() } else { scope },
                    ]
                });
                super::table(&["NAME", "OWNER", "ROLES", "STATE", "SCOPE"], rows, &[])
            });
        }
        Command::Revoke { name, data } => {
            let record = token::revoke(&data.registry()?, &name, Manager::Local)?;
            output.print(&serde_json::json!({"name": record.name, "revoked_at": record.revoked_at}), || {
                format!("token {:?} revoked", record.name)
            });
        }
    }
    Ok(())
}
