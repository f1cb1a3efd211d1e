//! SDP golden tests: every `testdata/sdp/NAME.sdp` (shaped like what common phones, PBXs and
//! carriers send, written from their public documentation) is parsed and rewritten for a relay
//! at 203.0.113.5 (2001:db8::5 for IPv6 inputs) with RTP ports 40000, 40002, ... per m= line.
//! The output must equal `NAME.out.sdp` byte for byte and the parse summary `NAME.summary`.
//! Run with `UPDATE_GOLDEN=1` to (re)write the expected files, then review the diff.
//!
//! Invariants checked on every input, beyond the golden bytes: no address of the input leaks
//! into the output (except the hold address 0.0.0.0), every line the rewrite does not own is
//! kept byte for byte and in order, line endings are kept, and the output parses again with the
//! same media count.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use sbc_media_relay::sdp::{MediaTarget, Sdp};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sdp")
}

fn summary(sdp: &Sdp<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "held={}", sdp.is_held());
    if let Some(o) = &sdp.origin {
        let _ = writeln!(s, "origin session={:?} version={:?}", o.session, o.version);
    }
    for (i, m) in sdp.media.iter().enumerate() {
        let _ = writeln!(
            s,
            "m{i} {} port={} proto={} transport={:?} dir={} conn={:?} rtp={:?} rtcp={:?} mux={} rates={:?}",
            m.kind,
            m.port,
            m.proto,
            m.transport,
            sdp.media_direction(i).as_str(),
            sdp.media_connection(i),
            sdp.rtp_addr(i),
            sdp.rtcp_addr(i),
            m.rtcp_mux,
            m.clock_rates.as_slice(),
        );
    }
    s
}

fn addresses_in(text: &str) -> Vec<String> {
    // Every token that parses as an IP address (c=, o=, a=rtcp, candidates, a=path hosts).
    text.split(|c: char| c.is_whitespace() || c == '/' || c == ';')
        .flat_map(|t| {
            [
                t.to_owned(),
                t.rsplit_once(':')
                    .map(|(h, _)| h.to_owned())
                    .unwrap_or_default(),
            ]
        })
        .map(|t| {
            t.trim_start_matches("msrp:")
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        })
        .filter(|t| t.parse::<IpAddr>().is_ok_and(|ip| !ip.is_unspecified()))
        .collect()
}

fn owned_by_rewrite(line: &str) -> bool {
    ["o=", "c=", "m=", "a=rtcp:", "a=candidate", "a=ice-"]
        .iter()
        .any(|p| line.starts_with(p))
}

#[test]
fn golden_outputs() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".sdp") && !n.ends_with(".out.sdp")
        })
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 10, "golden corpus missing");
    let mut failures = Vec::new();
    for input in &inputs {
        let name = input.file_stem().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read(input).unwrap();
        let sdp = Sdp::parse(&src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let relay: IpAddr = if name.contains("ipv6") {
            "2001:db8::5".parse().unwrap()
        } else {
            "203.0.113.5".parse().unwrap()
        };
        let targets: Vec<_> = (0..sdp.media.len())
            .map(|i| {
                let p = 40000 + 2 * i as u16;
                Some(MediaTarget {
                    rtp_port: p,
                    rtcp_port: p + 1,
                })
            })
            .collect();
        let out = sdp.rewrite(relay, &targets).sdp;
        let sum = summary(&sdp);

        // Invariants.
        let (text_in, text_out) = (String::from_utf8_lossy(&src), String::from_utf8_lossy(&out));
        for addr in addresses_in(&text_in) {
            assert!(
                !text_out.contains(&addr),
                "{name}: {addr} leaked into\n{text_out}"
            );
        }
        let crlf = text_in.contains("\r\n");
        assert_eq!(
            text_out.contains("\r\n"),
            crlf,
            "{name}: line endings changed"
        );
        if !crlf {
            assert!(!text_out.contains('\r'));
        }
        let kept_in: Vec<&str> = text_in
            .split_inclusive('\n')
            .filter(|l| !owned_by_rewrite(l))
            .collect();
        let kept_out: Vec<&str> = text_out
            .split_inclusive('\n')
            .filter(|l| !owned_by_rewrite(l))
            .collect();
        let refused = name.contains("refused");
        if !refused {
            assert_eq!(kept_in, kept_out, "{name}: untouched lines changed");
        }
        let again =
            Sdp::parse(&out).unwrap_or_else(|e| panic!("{name}: output does not parse: {e}"));
        assert_eq!(again.media.len(), sdp.media.len());
        for (i, m) in again.media.iter().enumerate() {
            if m.port != 0 {
                let ip = again.media_connection(i).unwrap();
                assert!(
                    ip == relay || ip.is_unspecified(),
                    "{name}: m{i} names {ip}"
                );
                assert_eq!(m.port, 40000 + 2 * i as u16, "{name}: m{i} port");
                assert_eq!(sdp.media_direction(i), again.media_direction(i));
            } else {
                assert!(
                    sdp.rtp_addr(i).is_none(),
                    "{name}: m{i} refused or disabled"
                );
            }
        }
        assert_eq!(
            sdp.is_held(),
            again.is_held(),
            "{name}: hold state must survive"
        );

        let out_path = dir().join(format!("{name}.out.sdp"));
        let sum_path = dir().join(format!("{name}.summary"));
        if update {
            std::fs::write(&out_path, &out).unwrap();
            std::fs::write(&sum_path, &sum).unwrap();
            continue;
        }
        let want = std::fs::read(&out_path).unwrap_or_default();
        if want != out {
            failures.push(format!("{name}: output differs:\n{text_out}"));
        }
        let want_sum = std::fs::read_to_string(&sum_path).unwrap_or_default();
        if want_sum != sum {
            failures.push(format!("{name}: summary differs:\n{sum}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
