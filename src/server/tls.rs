//! HTTPS served directly: the certificate chain and key of `[server] tls_cert`/`tls_key`,
//! read at start (a bad pair stops the start) and again on SIGHUP, for certbot's renewals
//! (a bad pair then is logged and the pair in use kept).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls_cert {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("server.tls_key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("server.tls_cert and tls_key: {0}")]
    Pair(rustls::Error),
}

/// The acceptor for new connections; a reload swaps it, connections open keep theirs.
pub struct Tls {
    config: TlsConfig,
    acceptor: RwLock<TlsAcceptor>,
}

impl Tls {
    pub fn load(config: &TlsConfig) -> Result<Arc<Tls>, TlsError> {
        let acceptor = RwLock::new(acceptor(config)?);
        Ok(Arc::new(Tls { config: config.clone(), acceptor }))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Reads the pair again; on an error the one in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = acceptor(&self.config)?;
        *self.acceptor.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// Reloads on every SIGHUP, for as long as the server runs.
    pub fn reload_on_sighup(self: Arc<Tls>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match self.reload() {
                    Ok(()) => tracing::info!(cert = %self.config.cert.display(), "SIGHUP: certificate reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: certificate not reloaded; the one in use stays"),
                }
            }
        }))
    }
}

fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(&config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| TlsError::Key { path: config.key.clone(), message: e.to_string() })?;
    // The provider named, not the process default: two are linked in (the S3 client's and this).
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Pair)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Pair)?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::Cert { path: path.to_owned(), message };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if chain.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(chain)
}
