//! One HTTP/1.1 request over a fresh connection: HTTP probes, witness
//! checks and webhooks.
//!
//! Client: hyper 1's low-level `client::conn::http1` over a `TcpStream` or
//! our own tokio-rustls stream. Chosen over reqwest because
//! - TLS is the same ring-based rustls config the SIP probes use, with the
//!   node's own `tls_ca` trusted, built once in [`crate::tls`]; reqwest
//!   would bring its own TLS setup and roots.
//! - A fresh connection per request is what a liveness check wants (it
//!   tests the listener, not a pooled socket that may be stale), so
//!   reqwest's pool, redirects, cookies and tower stack would be dead
//!   weight: hyper + hyper-util + http-body-util are a subset of reqwest's
//!   own dependencies.
//! - Only the status line matters; hyper hands us the head as soon as it
//!   arrives and we drop the connection without reading the body.
//!
//! Callers bound the whole exchange (DNS, connect, TLS, request) with
//! their own timeout; nothing here waits on its own.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use sbc_config::HttpUrl;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::ProbeError;
use crate::tls;

/// `User-Agent` of every request, so the PBX's or witness's logs show who asks.
pub(crate) const USER_AGENT: &str = concat!("sbc-health/", env!("CARGO_PKG_VERSION"));

/// Sends one request and returns the response's status code.
pub(crate) async fn send(
    url: &HttpUrl,
    method: &str,
    headers: &[(String, String)],
    body: Bytes,
    tls: Result<&Arc<ClientConfig>, ProbeError>,
) -> Result<u16, ProbeError> {
    let request = build(url, method, headers, body)?;
    let addr = resolve(url).await?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::transport)?;
    // Requests are small and answered at once; Nagle would only add delay.
    let _ = tcp.set_nodelay(true);
    if url.tls {
        let name = ServerName::try_from(url.connect_host().to_string())
            .map_err(|e| ProbeError::Tls(format!("bad server name {}: {e}", url.host)))?;
        let stream = TlsConnector::from(Arc::clone(tls?))
            .connect(name, tcp)
            .await
            .map_err(tls::handshake_error)?;
        exchange(stream, request).await
    } else {
        exchange(tcp, request).await
    }
}

async fn resolve(url: &HttpUrl) -> Result<SocketAddr, ProbeError> {
    if let Some(ip) = url.ip() {
        return Ok(SocketAddr::new(ip, url.port));
    }
    let mut addrs = tokio::net::lookup_host((url.connect_host(), url.port))
        .await
        .map_err(|e| ProbeError::Resolve(format!("{}: {e}", url.host)))?;
    addrs
        .next()
        .ok_or_else(|| ProbeError::Resolve(format!("{}: no addresses", url.host)))
}

fn build(
    url: &HttpUrl,
    method: &str,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<hyper::Request<Full<Bytes>>, ProbeError> {
    let bad = |e: &dyn std::fmt::Display| ProbeError::Protocol(format!("bad request: {e}"));
    let method = hyper::Method::from_bytes(method.as_bytes()).map_err(|e| bad(&e))?;
    let needs_length = !body.is_empty() || !matches!(method, hyper::Method::GET);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(url.path.as_str())
        .header(HOST, url.authority.as_str())
        .header(hyper::header::USER_AGENT, USER_AGENT)
        .header(CONNECTION, "close");
    let mut has_type = false;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(&e))?;
        let value = HeaderValue::from_bytes(value.as_bytes()).map_err(|e| bad(&e))?;
        has_type |= name == CONTENT_TYPE;
        builder = builder.header(name, value);
    }
    if !body.is_empty() && !has_type {
        let trimmed = body.trim_ascii_start();
        let json = trimmed.starts_with(b"{") || trimmed.starts_with(b"[");
        builder = builder.header(
            CONTENT_TYPE,
            if json {
                "application/json"
            } else {
                "text/plain; charset=utf-8"
            },
        );
    }
    if needs_length {
        builder = builder.header(CONTENT_LENGTH, body.len());
    }
    builder.body(Full::new(body)).map_err(|e| bad(&e))
}

async fn exchange<S>(io: S, request: hyper::Request<Full<Bytes>>) -> Result<u16, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(hyper_error)?;
    // The connection future does the I/O; drive it in this task alongside
    // the request instead of spawning it, so nothing outlives the caller's
    // timeout.
    let mut conn = std::pin::pin!(conn);
    let send = sender.send_request(request);
    let mut send = std::pin::pin!(send);
    tokio::select! {
        biased;
        response = &mut send => response.map(|r| r.status().as_u16()).map_err(hyper_error),
        ended = &mut conn => match ended {
            // With `Connection: close` the connection may finish in the same
            // poll that delivered the response; it is waiting in `send`.
            Ok(()) => send.await.map(|r| r.status().as_u16()).map_err(hyper_error),
            Err(e) => Err(hyper_error(e)),
        },
    }
}

fn hyper_error(e: hyper::Error) -> ProbeError {
    if e.is_closed() || e.is_incomplete_message() || e.is_canceled() {
        return ProbeError::Transport(e.to_string());
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return ProbeError::Transport(format!("{e}: {s}"));
        }
        source = s.source();
    }
    ProbeError::Protocol(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> HttpUrl {
        HttpUrl::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn request_head() {
        let r = build(
            &url("http://127.0.0.1:8080/hook?x=1"),
            "POST",
            &[("Authorization".into(), "Bearer t".into())],
            Bytes::from_static(b" {\"a\":1}"),
        )
        .expect("request");
        assert_eq!(r.method(), hyper::Method::POST);
        assert_eq!(r.uri(), "/hook?x=1");
        let h = r.headers();
        assert_eq!(h[HOST], "127.0.0.1:8080");
        assert_eq!(h[CONTENT_TYPE], "application/json");
        assert_eq!(h[CONTENT_LENGTH], "8");
        assert_eq!(h["authorization"], "Bearer t");
        assert_eq!(h[CONNECTION], "close");

        let g = build(&url("http://pbx/health"), "GET", &[], Bytes::new()).expect("request");
        assert!(g.headers().get(CONTENT_LENGTH).is_none());
        assert!(g.headers().get(CONTENT_TYPE).is_none());

        let t = build(
            &url("http://pbx/"),
            "PUT",
            &[("Content-Type".into(), "text/csv".into())],
            Bytes::from_static(b"a,b"),
        )
        .expect("request");
        assert_eq!(t.headers()[CONTENT_TYPE], "text/csv");
        assert!(build(&url("http://pbx/"), "BAD METHOD", &[], Bytes::new()).is_err());
    }
}
