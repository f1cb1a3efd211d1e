//! The crate's error types: what an operator command can be refused for,
//! and why one probe failed.

use std::fmt;

/// Why an operator command (manual failover, failback, maintenance) was
/// refused. The message is meant to be shown to the operator as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    /// The pool index is not one of the configuration's pools.
    #[error("no pool with index {0}")]
    UnknownPool(usize),
    /// The node index is not one of the configuration's nodes.
    #[error("no node with index {0}")]
    UnknownNode(usize),
    /// A manual failover found no node to move to: every other node is
    /// Down or in maintenance (or the pool has a single node).
    #[error(
        "pool {pool}: no other node can take over (every other node is down or in maintenance)"
    )]
    NoStandby {
        /// The pool's name.
        pool: String,
    },
    /// A manual failback found no node of higher priority than the active
    /// one that is Up.
    #[error("pool {pool}: no node of higher priority than the active node {active} is up")]
    NothingToFailBackTo {
        /// The pool's name.
        pool: String,
        /// The active node's name.
        active: String,
    },
}

/// Why one probe of a node did not prove it alive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// No (final) answer within the probe timeout. Generated locally, so it
    /// never counts as an answer of the node.
    #[error("no answer within the timeout")]
    Timeout,
    /// The node refused or reset the connection, the network reported it
    /// unreachable, or the stream broke.
    #[error("transport error: {0}")]
    Transport(String),
    /// The TLS handshake failed or TLS could not be set up (bad CA file,
    /// bad server name, certificate not trusted).
    #[error("TLS error: {0}")]
    Tls(String),
    /// The node answered, with a code that does not count as alive
    /// (a SIP 503, a code outside `alive_codes`, an HTTP non-2xx).
    #[error("answered {0}")]
    Status(u16),
    /// The answer could not be understood (bad SIP framing, bad HTTP).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The host name of a URL did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
}

impl ProbeError {
    /// A short, fixed label for metrics (`result` label).
    pub fn label(&self) -> &'static str {
        match self {
            ProbeError::Timeout => "timeout",
            ProbeError::Transport(_) => "transport",
            ProbeError::Tls(_) => "tls",
            ProbeError::Status(_) => "status",
            ProbeError::Protocol(_) => "protocol",
            ProbeError::Resolve(_) => "resolve",
        }
    }

    /// Whether the node itself produced this answer (so the round trip
    /// time means something even though the probe failed).
    pub fn is_answer(&self) -> bool {
        matches!(self, ProbeError::Status(_))
    }

    pub(crate) fn transport(e: impl fmt::Display) -> ProbeError {
        ProbeError::Transport(e.to_string())
    }
}
