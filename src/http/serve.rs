//! The listener: one port for plain HTTP and TLS, decided per connection,
//! each connection served by hyper with the router as its service and the
//! client ([`Peer`]) attached to every request for the access checks.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::access::Peer;
use super::HttpError;

/// The first byte of every TLS connection: the record type of the
/// ClientHello's handshake record. No HTTP/1 request starts with it (a
/// method is ASCII letters).
const TLS_HANDSHAKE: u8 = 0x16;

/// A connection that sends nothing, or no complete request head, for this
/// long is closed: on a public address idle sockets are cheap to open.
const FIRST_BYTES_WAIT: Duration = Duration::from_secs(10);
const HEADER_WAIT: Duration = Duration::from_secs(30);

/// Binds the listener (at start, so a taken port stops the agent at once).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves until the task is dropped. With `tls`, a connection that starts
/// with a TLS handshake is served over TLS, any other in plain HTTP.
///
/// Why one port for both rather than a second one for TLS: the probes (plain
/// HTTP, from the kubelet), Prometheus (TLS) and the Go version's users all
/// keep the one `-httpport` they know, with one container port and one
/// firewall opening. Peeking the first byte decides it without consuming
/// anything, so either protocol then reads the connection from its start.
pub async fn serve(listener: TcpListener, router: Router, tls: Option<TlsAcceptor>) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, as axum::serve
                // does, instead of spinning or stopping the endpoints.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tokio::spawn(connection(stream, addr, router.clone(), tls.clone()));
    }
}

async fn connection(stream: TcpStream, addr: SocketAddr, router: Router, tls: Option<TlsAcceptor>) {
    let mut first = [0u8; 1];
    match tokio::time::timeout(FIRST_BYTES_WAIT, stream.peek(&mut first)).await {
        Ok(Ok(1..)) => {}
        // Closed, reset or silent: nothing to serve.
        _ => return,
    }
    match tls {
        Some(acceptor) if first[0] == TLS_HANDSHAKE => {
            match tokio::time::timeout(FIRST_BYTES_WAIT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => http1(stream, Peer { addr, tls: true }, router).await,
                Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
            }
        }
        _ => http1(stream, Peer { addr, tls: false }, router).await,
    }
}

async fn http1<S>(stream: S, peer: Peer, router: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(peer);
        router.clone().oneshot(request)
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_WAIT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(peer = %peer.addr, error = %e, "HTTP connection ended with an error");
    }
}
