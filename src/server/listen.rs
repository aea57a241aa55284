//! Serving connections: HTTP/1.1 through hyper with a timer, so that the limits a client could
//! otherwise hold forever hold: a request's head must arrive within `limits.header_timeout`
//! (also between requests on a kept-alive connection), a client that takes no byte of an answer
//! for `limits.send_timeout` is disconnected, and at most `limits.max_connections` are open at
//! once (more wait in the kernel's listen backlog until one closes), at most
//! `limits.max_connections_per_source` of them from one source (more are closed at once). `axum::serve` sets no timer,
//! which turns hyper's header timeout off silently. With `[server] tls_cert`/`tls_key`, each
//! connection is HTTPS (`tls.rs`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::ServerError;
use super::tls::Tls;
use crate::config::{IpRange, Limits};

/// Serves `router` on `listener` until `shutdown` completes, then finishes the requests in
/// flight (connections close once their current answer is sent).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_tls(listener, router, limits, None, &[], shutdown).await
}

/// As [`serve`], with HTTPS when `tls` is given: the handshake must end within
/// `limits.header_timeout`, as a request's head must. Connections from `trusted` proxies are
/// not counted per source.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    trusted: &[IpRange],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let open = Arc::new(Semaphore::new(limits.max_connections as usize));
    let sources =
        Arc::new(Sources { cap: limits.max_connections_per_source, trusted: trusted.to_vec(), ..Sources::default() });
    // Dropping `stop_rx` tells every connection to finish; each holds a `done_rx` until it ends.
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        // A turn first, then the accept: over the cap, new connections wait in the backlog.
        let turn = tokio::select! {
            turn = Arc::clone(&open).acquire_owned() => turn.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(source) = sources.admit(remote.ip()) else {
            // Closed without a word: an answer would cost what the cap is there to save. Reset,
            // not closed: a closing server keeps each such connection in TIME_WAIT for a minute.
            tracing::debug!(%remote, "connection closed: limits.max_connections_per_source open from its source");
            let _ = stream.set_zero_linger();
            drop((stream, turn));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = PerConnection { router: router.clone(), remote };
        let (stop_tx, done_rx) = (stop_tx.clone(), done_rx.clone());
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        tokio::spawn(async move {
            let stream = SendTimeout::new(stream, limits.send_timeout.0);
            let ended = match acceptor {
                None => connection(TokioIo::new(stream), service, limits, &stop_tx).await,
                Some(acceptor) => match tokio::time::timeout(limits.header_timeout.0, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => connection(TokioIo::new(stream), service, limits, &stop_tx).await,
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no TLS handshake within limits.header_timeout".into()),
                },
            };
            if let Err(e) = ended {
                tracing::debug!(%remote, error = %e, "connection ended");
            }
            drop((turn, source, done_rx));
        });
    }
    drop(listener);
    drop(stop_rx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// Connections open per source (`config::source`: an IPv4 address or an IPv6 /64, as the
/// refusal counts name them); trusted proxies are not counted (they carry everyone).
#[derive(Default)]
struct Sources {
    open: Mutex<HashMap<IpAddr, u32>>,
    cap: u32,
    trusted: Vec<IpRange>,
}

/// A connection counted against its source until dropped.
struct Counted {
    sources: Arc<Sources>,
    key: Option<IpAddr>,
}

impl Sources {
    /// Counts a connection from `peer`, or `None` when its source has `cap` open already.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Counted> {
        if self.trusted.iter().any(|range| range.contains(peer)) {
            return Some(Counted { sources: Arc::clone(self), key: None });
        }
        let key = crate::config::source(peer);
        let mut open = self.open.lock().expect("no code panics holding the sources");
        let count = open.entry(key).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(Counted { sources: Arc::clone(self), key: Some(key) })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut open = self.sources.open.lock().expect("no code panics holding the sources");
        if let Some(count) = open.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&key);
            }
        }
    }
}

/// Serves one connection's requests until it closes, or until `stop_tx` closes: then the answer
/// in flight is finished and the connection closed after it.
async fn connection<I>(io: I, service: PerConnection, limits: Limits, stop_tx: &watch::Sender<()>) -> Result<(), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout.0).keep_alive(true);
    let mut connection = pin!(builder.serve_connection(io, service));
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = stop_tx.closed() => {
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    ended.map_err(|e| e.to_string())
}

/// The router for one connection's requests, which learn the peer's address
/// (`ConnectInfo<SocketAddr>`).
#[derive(Clone)]
struct PerConnection {
    router: Router,
    remote: SocketAddr,
}

impl hyper::service::Service<axum::http::Request<Incoming>> for PerConnection {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = axum::routing::future::RouteFuture<Infallible>;

    fn call(&self, mut request: axum::http::Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(ConnectInfo(self.remote));
        // A router is always ready.
        tower_service::Service::call(&mut self.router.clone(), request)
    }
}

/// A TCP stream whose writes fail once the peer has taken no byte for `limit`: a client that
/// stops reading an answer (a stream of the audit log, an artifact) cannot hold its
/// connection, and what feeds the answer, forever. Reads are untouched: waiting for a request
/// is the header timeout's business, and for an upload's body the upload pace's.
struct SendTimeout {
    stream: TcpStream,
    limit: Duration,
    /// Armed when a write could not proceed; disarmed by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl SendTimeout {
    fn new(stream: TcpStream, limit: Duration) -> SendTimeout {
        SendTimeout { stream, limit, stalled: None }
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no byte of the answer for {limit:?} (limits.send_timeout)"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for SendTimeout {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendTimeout {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(cap: u32, trusted: &[&str]) -> Arc<Sources> {
        let trusted = trusted.iter().map(|t| IpRange::parse(t).unwrap()).collect();
        Arc::new(Sources { cap, trusted, ..Sources::default() })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64_and_its_count_goes_back_to_nothing() {
        let sources = sources(2, &["10.0.0.1"]);
        let a = sources.admit(ip("192.0.2.7")).unwrap();
        let mapped = sources.admit(ip("::ffff:192.0.2.7")).unwrap();
        assert!(sources.admit(ip("192.0.2.7")).is_none(), "an IPv4-mapped address is the same source");
        assert!(sources.admit(ip("192.0.2.8")).is_some(), "the next address is another");
        let v6 = [sources.admit(ip("2001:db8::1")).unwrap(), sources.admit(ip("2001:db8::ffff:2")).unwrap()];
        assert!(sources.admit(ip("2001:db8::3")).is_none(), "one /64");
        assert!(sources.admit(ip("2001:db8:0:1::1")).is_some(), "the next /64 is another");
        let proxied: Vec<_> = (0..5).map(|_| sources.admit(ip("10.0.0.1")).unwrap()).collect();
        assert!(proxied.iter().all(|c| c.key.is_none()), "a trusted proxy is not counted");
        drop((a, mapped, v6, proxied));
        assert!(sources.open.lock().unwrap().is_empty(), "every count given back");
        assert!(sources.admit(ip("192.0.2.7")).is_some());
    }
}
