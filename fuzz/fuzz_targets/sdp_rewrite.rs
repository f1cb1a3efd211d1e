//! SDP rewriting: every offer the relay accepts, it must turn into SDP a peer accepts, with
//! the same streams.
//!
//! For every body `Sdp::parse` accepts, with relay ports for each m= line:
//! - the rewritten body parses again, with the same number of m= lines, each of the same
//!   media type;
//! - each stream's port is the relay's for that line, or 0 where the input disabled the
//!   stream (port 0) or the relay cannot carry it (TCP-based);
//! - no ICE candidate survives (it would name the endpoint's own address);
//! - rewriting the output again changes nothing: the result is already in the relay's terms,
//!   so a re-INVITE carrying it back does not drift.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sbc_media_relay::sdp::{MediaTarget, Sdp, Transport};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn target(i: usize) -> Option<MediaTarget> {
    let rtp = 40000 + 2 * u16::try_from(i).ok()?;
    Some(MediaTarget {
        rtp_port: rtp,
        rtcp_port: rtp + 1,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let Ok(sdp) = Sdp::parse(body) else {
        return;
    };
    let addr = if pick & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
    };
    let targets: Vec<Option<MediaTarget>> = (0..sdp.media.len()).map(target).collect();
    let once = sdp.rewrite(addr, &targets).sdp;
    let text = || String::from_utf8_lossy(&once).into_owned();
    let again = match Sdp::parse(&once) {
        Ok(s) => s,
        Err(e) => panic!("the rewritten SDP no longer parses ({e}):\n{}", text()),
    };
    assert_eq!(again.media.len(), sdp.media.len(), "{}", text());
    for (i, (before, after)) in sdp.media.iter().zip(&again.media).enumerate() {
        assert_eq!(before.kind, after.kind, "m= line {i}:\n{}", text());
        let want = if before.port == 0 || before.transport == Transport::Unsupported {
            0
        } else {
            target(i).map_or(0, |t| t.rtp_port)
        };
        assert_eq!(after.port, want, "m= line {i}:\n{}", text());
    }
    assert!(
        !once
            .split(|&b| b == b'\n')
            .any(|l| l.starts_with(b"a=candidate:")),
        "an ICE candidate survived:\n{}",
        text()
    );
    let twice = again.rewrite(addr, &targets).sdp;
    assert_eq!(
        String::from_utf8_lossy(&twice),
        text(),
        "a second rewrite changed the body"
    );
});
