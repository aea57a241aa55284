//! `release serve`: load the configuration, open state, serve until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Failure, exit};
use crate::config::{Config, Overrides};
use crate::server::{self, Opened};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file (TOML); without one, the embedded default.
    #[arg(long, env = "RELEASE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "RELEASE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory: registry.db, the lock and local objects [default: ./release-data].
    #[arg(long, env = "RELEASE_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), Failure> {
    init_logging();
    let overrides = Overrides { listen: args.listen, data_dir: args.data_dir };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    raise_open_files(config.limits.max_connections);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(config.limits.blocking_threads())
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listen = config.listen;
        let timeout = config.ssh.command_timeout.map_or(std::time::Duration::from_secs(600), |d| d.0);
        let control_dir = config.data_dir.join("ssh");
        let (limits, ssh, node_url) = (config.limits, config.ssh.clone(), config.node_url.clone());
        let deployer = move |store, indexes| -> std::sync::Arc<dyn crate::releases::Deployer> {
            std::sync::Arc::new(crate::deploy::NodeDeployer::new(
                store,
                limits,
                ssh,
                timeout,
                &control_dir,
                node_url,
                indexes,
            ))
        };
        // A certificate that does not load stops the start before anything else is opened.
        let tls = config.tls.as_ref().map(server::Tls::load).transpose().map_err(|e| Failure::new(exit::FAILED, e))?;
        // Bound first: while the registry and the store are opened, clients wait in the
        // listen backlog instead of being refused. Deploys a stopped server left are resolved
        // in the background once it serves (Releases::start).
        let listener = server::bind(listen, tls.is_some()).await.map_err(|e| Failure::new(exit::FAILED, e))?;
        let opened = Opened::open(config, deployer).await.map_err(|e| Failure::new(exit::FAILED, e))?;
        let local = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        // Every signal handled from here, before "listening" is logged: a HUP or TERM sent as
        // soon as the server says it listens (`systemctl reload` right after start, a test)
        // must find its handler, not the default action, which ends the process. Not before
        // the registry and store are open: until then, TERM or Ctrl-C stops a start that hangs.
        match &tls {
            Some(tls) => drop(std::sync::Arc::clone(tls).reload_on_sighup()?),
            // Handled all the same: a `systemctl reload` or a stray HUP must not stop the server.
            None => drop(ignore_sighup()?),
        }
        let stopped = shutdown_signal()?;
        tracing::info!(addr = %local, "listening on {scheme}://{local}");
        let releases = opened.state.releases.clone();
        let stopping = async move {
            stopped.await;
            releases.stop_waiting(); // followers waiting for a change answer now
        };
        let (limits, trusted) = (opened.state.config.limits, opened.state.config.trusted_proxies.clone());
        server::serve_tls(listener, server::router(opened.state.clone()), limits, tls, &trusted, stopping)
            .await
            .map_err(|e| Failure::new(exit::FAILED, e))?;
        opened.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Descriptors the server needs besides its connections: registry readers (three each: the
/// database, its WAL and shared memory), artifacts being read or written, SSH control sockets.
const SPARE_FILES: u64 = 1_024;

/// Raises the soft limit on open files to the hard one. Every connection is a descriptor, so
/// under systemd's default soft limit (1,024) `limits.max_connections` idle connections from a
/// stranger left no descriptor for the registry: readers could not open (500s) and accepting
/// failed for everyone until they closed. Warns when even the hard limit leaves too few.
fn raise_open_files(max_connections: u32) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None`: unlimited.
    let mut open_files = limit.current.unwrap_or(u64::MAX);
    if limit.current < limit.maximum || (limit.maximum.is_none() && limit.current.is_some()) {
        let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            open_files = limit.maximum.unwrap_or(u64::MAX);
        }
    }
    let needed = u64::from(max_connections) + SPARE_FILES;
    if open_files < needed {
        tracing::warn!(
            open_files,
            needed,
            "too few open files allowed (ulimit -n) for limits.max_connections = {max_connections}: raise \
             LimitNOFILE (systemd) or lower max_connections"
        );
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELEASE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes on either, and requests
/// in flight are then finished.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

/// Logs each SIGHUP (there is nothing to reload without TLS) instead of dying of it.
fn ignore_sighup() -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: nothing to reload (no tls_cert); the configuration is read at start only");
        }
    }))
}
