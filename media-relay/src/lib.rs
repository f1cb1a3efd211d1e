//! Media anchoring: SDP rewrite and the RTP/RTCP relay.
//!
//! This crate will own: an rtpengine-like `offer` / `answer` / `delete` surface keyed by call,
//! RTP/RTCP port-pair allocation from configured ranges per side, SDP rewriting, the forwarding
//! loop with latching, media timeouts and per-stream statistics. It knows nothing of SIP dialogs
//! beyond a call key, so it stays usable on its own.
//!
//! Nothing is here yet (issue 3); SDP passes through the proxy untouched today.
