//! Whole-system SIP benchmarking tools: a UDP load generator ([`loadgen`], binary
//! `sbc-loadgen`) and a scripted PBX/UAS that answers it ([`uas`], binary `sbc-uas`).
//!
//! Both parse with `sbc_sip` so that the generator measures the system under test, not a
//! slow parser of its own, and both treat every received datagram as untrusted: anything
//! that fails to parse or match is counted and skipped, never a panic.
//!
//! Every load loop here is bounded twice, by a count (rate x duration) and by a wall-clock
//! deadline, and only ever sends to loopback addresses (see [`net::ensure_loopback`]): these
//! tools run on shared machines where stray traffic is not acceptable.

pub mod bencode;
pub mod cpu;
pub mod loadgen;
pub mod media;
pub mod net;
pub mod phones;
pub mod report;
pub mod rx;
pub mod sipcalls;
pub mod uas;
