//! The witness check: before failing over, make sure the SBC is not the
//! one cut off.
//!
//! If the SBC's own link is down, every node looks dead; failing over then
//! would only add a switch (and webhooks repointing DNS) to an outage that
//! is ours. So a failover waits for one witness to answer: a configured
//! always-on URL (HTTP GET, 2xx) or another node of the pool.
//!
//! The other nodes are probed **afresh** rather than trusting their last
//! results: a result from just before the cut would witness a path that is
//! gone. Everything runs concurrently, the first answer wins and the rest is
//! cancelled; the whole check takes at most the probe timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sbc_config::HttpUrl;
use tokio::task::JoinSet;

use crate::http;
use crate::probe::Prober;
use crate::tls::Tls;

/// Who answered a witness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Witness {
    /// A configured witness URL (its `host[:port]`, never the path, which
    /// may carry a secret).
    Url(String),
    /// Another node of the pool (its name).
    Node(String),
}

impl std::fmt::Display for Witness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Witness::Url(authority) => write!(f, "url {authority}"),
            Witness::Node(name) => write!(f, "node {name}"),
        }
    }
}

/// Runs the check: `urls` are GET, `nodes` probed, concurrently; returns
/// the first that answered, or `None` if none did within `timeout`.
pub async fn check(urls: &[HttpUrl], nodes: &[Arc<Prober>], timeout: Duration) -> Option<Witness> {
    check_with(urls, nodes, timeout, &Tls::new(None)).await
}

pub(crate) async fn check_with(
    urls: &[HttpUrl],
    nodes: &[Arc<Prober>],
    timeout: Duration,
    tls: &Tls,
) -> Option<Witness> {
    let mut set: JoinSet<Option<Witness>> = JoinSet::new();
    for url in urls {
        let url = url.clone();
        let tls = tls.clone();
        set.spawn(async move {
            let code = http::send(&url, "GET", &[], Bytes::new(), tls.get())
                .await
                .ok()?;
            (200..300)
                .contains(&code)
                .then(|| Witness::Url(url.authority.clone()))
        });
    }
    for node in nodes {
        let node = Arc::clone(node);
        set.spawn(async move {
            node.probe()
                .await
                .alive
                .then(|| Witness::Node(node.node().to_string()))
        });
    }
    let first = async {
        while let Some(joined) = set.join_next().await {
            if let Ok(Some(witness)) = joined {
                return Some(witness);
            }
        }
        None
    };
    // Dropping the set (on return or timeout) aborts whatever still runs.
    tokio::time::timeout(timeout, first).await.ok().flatten()
}
