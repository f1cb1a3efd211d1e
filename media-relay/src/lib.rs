//! Media anchoring for the SBC: SDP rewrite and a fast RTP/RTCP relay.
//!
//! Phones behind NAT, carriers and PBX nodes never exchange media directly: every m= line of a
//! call gets an RTP/RTCP port pair on each side of the SBC, SDP is rewritten to name those
//! pairs, and the relay forwards packets between them. The contract is rtpengine's (offer,
//! answer, delete, keyed by call), as an in-process API. The crate knows nothing of SIP beyond
//! a call key and tags, so it stays usable on its own.
//!
//! # API
//! - [`Relay::start`]`(RelayConfig) -> (Arc<Relay>, UnboundedReceiver<MediaEvent>)`
//! - [`Relay::offer`]`(call, offerer_tag, offer_side, answer_side, sdp) -> Result<Vec<u8>>`
//! - [`Relay::answer`]`(call, offerer_tag, answerer_tag, sdp) -> Result<Vec<u8>>`
//! - [`Relay::join`]`(a, b) -> bool`: a hairpin (see below) forwarded in one hop
//! - [`Relay::delete`]`(call) -> bool`, [`Relay::stats`], [`Relay::sessions`],
//!   [`Relay::totals`], [`Relay::shutdown`]
//! - [`MediaEvent::Timeout`] on the event channel when a call's media went silent; its ports
//!   are already free, the proxy sends BYE both ways.
//! - [`MediaError::sip_status`]: 503 for port exhaustion (transient), 488 for SDP that cannot be
//!   anchored, 481 for an unknown call.
//!
//! All calls are short (a few binds, a map update, a queued command) and never wait for a
//! worker, so they may be called from async code; [`Relay::flush`] waits for the workers when a
//! caller must know a change is applied.
//!
//! # How the proxy calls it
//! | SIP | call |
//! |---|---|
//! | INVITE / re-INVITE / UPDATE with SDP (either direction) | `offer(key, From-tag, sender's side, receiver's side, body)` |
//! | 18x / 2xx with SDP answering it | `answer(key, From-tag, To-tag, body)` |
//! | 2xx (or reliable 18x) with an offer, INVITE had none | `offer(key, To-tag, callee's side, caller's side, body)` |
//! | ACK / PRACK with the answer to that | `answer(key, To-tag, From-tag, body)` |
//! | BYE, CANCEL, final failure of the initial INVITE | `delete(key)` |
//! | failure of a re-INVITE / UPDATE | nothing: ports are kept, the call goes on |
//!
//! Sides: [`Side::Public`] toward phones and trunks, [`Side::Internal`] toward PBX nodes. On
//! an error from `offer`, answer the request with `err.sip_status()` instead of forwarding it.
//!
//! # Layout
//! - [`sdp`]: our own SDP reader/rewriter (why not a crate: see there), the o= version rule.
//! - `config`: [`RelayConfig`], [`SideConfig`], [`Side`].
//! - `relay`: [`Relay`], call/leg/media-line state, the control operations, events, stats.
//! - `ports`: even/odd port-pair pools, bound at allocation, FIFO reuse.
//! - `worker`: forwarding threads (epoll + recvmmsg/sendmmsg, or io_uring), latching, timeouts.
//! - `uring`: the io_uring ring, provided buffers and send requests of the io_uring backend.
//! - `stats`: single-writer atomic counters, RFC 3550 loss and jitter estimators.
//! - `sys`: the Linux system calls; with `uring` (the io_uring variant) the crate's only
//!   `unsafe`.
//!
//! # Design
//! **Calls, legs, streams.** A call has two legs: leg 0 is whoever made the first offer, leg 1
//! the other party. Leg 0's tag is fixed; any other tag in an offer or answer is the other
//! party (the callee before its tag was known, or another fork), so an offer from the callee,
//! a late offer in a 2xx, and a 200 from a different fork than the 183 all work. A new tag on
//! leg 1 replaces the old endpoint: its learned addresses are forgotten. Each m= line has an
//! RTP and an RTCP socket per leg, on that leg's side; SDP sent to a leg names that leg's
//! sockets, so a re-INVITE, hold or resume never moves the address the far end sees.
//!
//! **Forwarding.** `workers` threads (default one per core) each own whole calls: their
//! sockets sit in the worker's own epoll set and their state in the worker's slab, so the
//! packet path takes no lock, allocates nothing and shares nothing with other workers. A ready
//! socket is drained with `recvmmsg` (32 per call); what is accepted leaves through the partner
//! socket in one `sendmmsg` (symmetric RTP: each endpoint sees the relay's socket facing it as
//! source). Control changes travel on a queue; only those that bring new sockets ring the
//! eventfd doorbell, the rest wait for the worker's next pass (a packet, another command, the
//! sweep timer). Every pass applies the queue before it handles a packet, so a packet sent in
//! reply to an SDP the proxy forwarded is relayed by that SDP. Counters flow back as single-writer atomics, published once per batch.
//! Bytes are forwarded untouched (SRTP passes through; a=crypto is kept).
//!
//! With [`RelayConfig::io`] = [`IoBackend::Uring`] the workers use io_uring instead of epoll:
//! a multishot receive per socket into provided buffers, sends as queued requests, one
//! `io_uring_enter` per pass for all of them (falls back to epoll where the kernel refuses).
//! A worker that falls behind its packets runs out of provided buffers; the receives that
//! found none wait and are re-armed a few per pass as buffers come back
//! ([`RelayTotals::buffer_waits`] counts them), instead of failing again on every pass.
//!
//! **Latching.** The advertised address (SDP) is where media goes until a packet arrives; the
//! source of the first valid RTP packet (RTCP on the RTCP socket, any datagram for udptl) is
//! learned and wins (NAT). After that, packets from other sources are dropped and counted,
//! until the learned source has been silent for `relatch_after` (default 2 s): then valid RTP
//! from a new source takes over. A changed address in a leg's new SDP forgets the learned one.
//! With no advertised and no learned address (hold with c=0.0.0.0), packets toward that leg
//! are dropped and counted.
//!
//! **Timeouts.** A call whose sockets received nothing (and which saw no signalling) for
//! `timeout` (60 s) ends: sockets closed, ports returned, [`MediaEvent::Timeout`] sent. Calls
//! on hold get `hold_timeout` (1 h), calls not yet answered `setup_timeout` (3 min, Timer C).
//!
//! **Ports.** Even RTP, odd RTCP = RTP + 1, from each side's range, bound when allocated (a
//! port taken by another process is skipped), released to the back of the queue after the
//! sockets are closed (by the worker, at its next pass after the delete). An offer that cannot
//! get every pair it needs waits for the deletes in flight, tries once more, and otherwise
//! changes nothing and fails with [`MediaError::PortsExhausted`].
//!
//! **SDP versions.** Each leg keeps an [`sdp::OriginTracker`]: the o= version we send follows
//! the sender's (identical SDP keeps the version, a sender's +n gives +n) and grows by one when
//! only our rewrite changed; a new o= session (another fork) restarts from its own number.
//!
//! **Hairpins.** When a PBX bridges two calls that both pass through the SBC and leaves media
//! end to end, the SDP it sends on one names our internal port of the other. A first offer
//! that names one of our ports puts the new call on the other call's worker, and
//! [`Relay::join`] then points each public socket at the other call's public socket: packets
//! cross the relay once instead of twice, and no longer depend on the internal sockets. The
//! join is undone when either call ends or a new SDP moves an internal leg (a transfer).
//!
//! Not done yet: SDP inside multipart bodies (the proxy's job), DSCP marking.

#![warn(missing_docs)]

mod config;
mod error;
mod ports;
mod relay;
pub mod sdp;
mod stats;
mod sys;
mod uring;
mod worker;

pub use config::{IoBackend, RelayConfig, Side, SideConfig};
pub use error::MediaError;
pub use relay::{CallKey, CallStats, LegStats, MediaEvent, MediaStats, Relay, RelayTotals};
pub use sdp::SdpError;
pub use stats::StreamStats;
pub use sys::monotonic_ns;

#[cfg(test)]
mod tests {
    #[test]
    fn relay_is_shareable_across_threads() {
        fn check<T: Send + Sync>() {}
        check::<super::Relay>();
        check::<super::MediaEvent>();
        check::<super::MediaError>();
    }
}
