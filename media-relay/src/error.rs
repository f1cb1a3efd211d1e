//! Error values of the control API. The SIP meaning of each lives here, in one place, so the
//! proxy never has to guess which status a media failure maps to.

use crate::config::Side;
use crate::sdp::SdpError;

/// Why an offer, answer or start of the relay failed. Nothing in this crate panics on input:
/// every failure the network or a configuration can cause ends up here.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The SDP body could not be understood well enough to anchor its media.
    #[error("SDP: {0}")]
    Sdp(#[from] SdpError),
    /// The port range of one side has no free RTP/RTCP pair left (or every free one is taken by
    /// another process). Transient: ports return as calls end.
    #[error("no free RTP/RTCP port pair on the {side} side")]
    PortsExhausted {
        /// The side whose range ran dry.
        side: Side,
    },
    /// An answer (or stats request) named a call the relay does not know: never offered,
    /// already deleted, or timed out.
    #[error("unknown call")]
    UnknownCall,
    /// The answer describes more media lines than the offer did (RFC 3264 section 6 forbids it).
    #[error("answer has {answer} media lines but the offer had {offer}")]
    MediaCountMismatch {
        /// Media lines in the offer as the relay knows them.
        offer: usize,
        /// Media lines in the answer.
        answer: usize,
    },
    /// The SDP names an IPv4 address for a side bound to IPv6 (or the reverse): the relay could
    /// not send to it from that side.
    #[error("SDP address {addr} is not reachable from the {side} side's address family")]
    AddressFamily {
        /// The side the endpoint is on.
        side: Side,
        /// The address the SDP named.
        addr: std::net::IpAddr,
    },
    /// The configuration cannot work (empty range, overlapping ranges on one address, ...).
    #[error("media relay config: {0}")]
    Config(String),
    /// An operating-system call failed where no retry makes sense (epoll, eventfd, threads).
    #[error("media relay I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The relay has been shut down; no new media can be anchored.
    #[error("media relay is shut down")]
    ShutDown,
}

impl MediaError {
    /// The SIP status a proxy should answer a request with when its SDP hit this error, so the
    /// mapping is decided once: 503 for a transient lack of resources (the caller may retry
    /// elsewhere), 488 for SDP we cannot anchor, 500 for our own faults.
    pub fn sip_status(&self) -> u16 {
        match self {
            MediaError::PortsExhausted { .. } | MediaError::ShutDown => 503,
            MediaError::Sdp(_)
            | MediaError::MediaCountMismatch { .. }
            | MediaError::AddressFamily { .. } => 488,
            MediaError::UnknownCall => 481,
            MediaError::Config(_) | MediaError::Io(_) => 500,
        }
    }

    /// True when the failure says nothing about the call itself and a later attempt (or another
    /// SBC) may succeed; the proxy adds Retry-After only then.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            MediaError::PortsExhausted { .. } | MediaError::ShutDown
        )
    }
}
