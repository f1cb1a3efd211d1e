//! [`HttpStub`]: a tiny HTTP/1.1 server on loopback that a test controls, standing in for a
//! PBX's web server (a node's `http_url` probe), an always-on witness URL, or a webhook
//! receiver.
//!
//! It answers every request with the current status (200 by default) and `connection:
//! close`, records each request (method, path, headers, body), and can be made silent
//! (accepts, never answers) or taken away entirely ([`HttpStub::stop`]: the listener is
//! closed, so connections are refused) and brought back on the same address
//! ([`HttpStub::restart`]).
//!
//! Whatever arrives may be garbage: a request that cannot be read is dropped without an
//! answer, never a panic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Largest request head + body accepted; far above anything the SBC sends.
const MAX_REQUEST: usize = 64 * 1024;
/// A connection that has not sent a whole request by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One request the stub received.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

impl HttpRequest {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    status: AtomicU16,
    silent: AtomicBool,
    requests: Mutex<Vec<HttpRequest>>,
}

/// A running HTTP stub; stops when dropped.
pub struct HttpStub {
    addr: SocketAddr,
    state: Arc<State>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl HttpStub {
    /// Listens on `ip:0` (a loopback address such as 127.0.0.1) and answers 200.
    pub async fn start(ip: &str) -> anyhow::Result<HttpStub> {
        let listener = TcpListener::bind(format!("{ip}:0"))
            .await
            .with_context(|| format!("binding an HTTP stub on {ip}"))?;
        Self::from_listener(listener)
    }

    /// Listens on exactly `addr`.
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<HttpStub> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding an HTTP stub on {addr}"))?;
        Self::from_listener(listener)
    }

    fn from_listener(listener: TcpListener) -> anyhow::Result<HttpStub> {
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            status: AtomicU16::new(200),
            silent: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(HttpStub {
            addr,
            state,
            task: Mutex::new(Some(task)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The status every later request gets.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Silent: connections are accepted and read, but never answered.
    pub fn set_silent(&self, silent: bool) {
        self.state.silent.store(silent, Ordering::SeqCst);
    }

    /// Closes the listener (and every connection being served): later connections are
    /// refused, as when the PBX's web server is gone. Waits until the port is released.
    pub async fn stop(&self) {
        let task = self.task.lock().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    /// Serves again on the same address after [`HttpStub::stop`] (no-op while running).
    pub async fn restart(&self) -> anyhow::Result<()> {
        if self.task.lock().is_some() {
            return Ok(());
        }
        let mut last = None;
        // The old socket may linger for a moment after the abort.
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    let task = tokio::spawn(serve(listener, self.state.clone()));
                    *self.task.lock() = Some(task);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(anyhow::anyhow!(
            "rebinding {}: {}",
            self.addr,
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<HttpRequest> {
        self.state.requests.lock().clone()
    }

    /// Requests to `path` (exact match, query included).
    pub fn requests_to(&self, path: &str) -> Vec<HttpRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits until at least `n` requests to `path` arrived or `within` passed; returns them.
    pub async fn wait_for(&self, path: &str, n: usize, within: Duration) -> Vec<HttpRequest> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.requests_to(path);
            if got.len() >= n || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().take() {
            t.abort();
        }
    }
}

/// Accept loop; connections are served by tasks owned by this one, so aborting it drops
/// them all (a JoinSet aborts its tasks when dropped).
async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let state = state.clone();
                conns.spawn(async move {
                    let read = tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await;
                    let Ok(Some(request)) = read else {
                        return;
                    };
                    state.requests.lock().push(request);
                    if state.silent.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let code = state.status.load(Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {code} Stub\r\ncontent-length: 2\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nok"
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Reads one request (head, then a body of Content-Length bytes); `None` on anything odd.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Option<HttpRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(buf.get(..head_end)?).to_string();
    let mut lines = head.split("\r\n");
    let mut start = lines.next()?.split(' ');
    let method = start.next()?.to_string();
    let path = start.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if length > MAX_REQUEST {
        return None;
    }
    let mut body = buf.get(head_end + 4..)?.to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some(HttpRequest {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
        at: Instant::now(),
    })
}
