//! Metric names and labels in one place, so dashboards and code agree.

use sbc_sip::Transport;

/// Why a stream connection ended; the `reason` label of `sbc_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum CloseReason {
    /// No byte received and no message sent for `idle_timeout`.
    Idle = 1,
    /// The peer closed its side.
    Eof = 2,
    /// Read/write/connect/handshake failure, or the write queue overflowed.
    Error = 3,
    /// Refused at accept by `max_connections` / `max_connections_per_source`.
    Limit = 4,
    /// The stream could not be framed (see `sbc_sip::framing::FramingError`).
    Framing = 5,
    /// [`super::Transports::shutdown`].
    Shutdown = 6,
    /// A message was started and not finished within `message_timeout` (slow sender).
    Slow = 7,
    /// Closed on purpose after a failover so the phone re-registers on the new active node
    /// ([`super::Transports::close_flow`]).
    Reregister = 8,
}

impl CloseReason {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Eof => "eof",
            CloseReason::Error => "error",
            CloseReason::Limit => "limit",
            CloseReason::Framing => "framing",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Slow => "slow",
            CloseReason::Reregister => "reregister",
        }
    }

    pub(super) fn from_u8(v: u8) -> Option<CloseReason> {
        Some(match v {
            1 => CloseReason::Idle,
            2 => CloseReason::Eof,
            3 => CloseReason::Error,
            4 => CloseReason::Limit,
            5 => CloseReason::Framing,
            6 => CloseReason::Shutdown,
            7 => CloseReason::Slow,
            8 => CloseReason::Reregister,
            _ => return None,
        })
    }
}

pub(super) fn opened(t: Transport) {
    metrics::counter!("sbc_connections_opened_total", "transport" => t.uri_param()).increment(1);
}

pub(super) fn closed(t: Transport, reason: CloseReason) {
    metrics::counter!(
        "sbc_connections_closed_total",
        "transport" => t.uri_param(),
        "reason" => reason.as_str()
    )
    .increment(1);
}

pub(super) fn gauge_inc(t: Transport) {
    metrics::gauge!("sbc_connections", "transport" => t.uri_param()).increment(1.0);
}

pub(super) fn gauge_dec(t: Transport) {
    metrics::gauge!("sbc_connections", "transport" => t.uri_param()).decrement(1.0);
}

/// A stream that could not be framed, or a UDP datagram over `max_message_size`.
pub(super) fn framing_error(t: Transport) {
    metrics::counter!("sbc_framing_errors_total", "transport" => t.uri_param()).increment(1);
}
