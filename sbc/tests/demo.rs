//! `sbc demo` as a user runs it: the real binary, no files, everything on loopback. It must
//! exit 0 and its timeline must show what the README promises: registrations, calls with RTP
//! through the relay both ways, the failover to the standby with calls on it, and the manual
//! failback with a call on the primary again.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far above the demo's own budget (about 6 s, 20 s at most): a debug build on a loaded
/// machine is slow, and the demo bounds itself anyway.
const LIMIT: Duration = Duration::from_secs(90);

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

fn demo(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sbc"))
        .arg("demo")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sbc demo");
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for sbc demo") {
            break st;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sbc demo still running after {LIMIT:?}; output so far:\n{}",
                out_t.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        success: status.success(),
        stdout: out_t.join().expect("stdout reader"),
        stderr: err_t.join().expect("stderr reader"),
    }
}

/// The `received/sent` pairs of a `call N media:` line, in order (caller to callee, then back).
fn rtp_counts(line: &str) -> Vec<(u32, u32)> {
    line.split([' ', ','])
        .filter_map(|w| {
            let (r, s) = w.split_once('/')?;
            Some((r.parse().ok()?, s.parse().ok()?))
        })
        .collect()
}

/// The timeline line of `call N` that contains `what` (`" up: "` or `" media: "`).
fn call_line<'a>(out: &'a str, n: usize, what: &str) -> Option<&'a str> {
    let prefix = format!("call {n}{what}");
    out.lines().find(|l| {
        l.split_once("s  ")
            .is_some_and(|(_, rest)| rest.starts_with(&prefix))
    })
}

#[test]
fn demo_fails_over_and_back_with_media_through_the_relay() {
    let r = demo(&[]);
    let out = &r.stdout;
    assert!(
        r.success,
        "sbc demo failed\nstdout:\n{out}\nstderr:\n{}",
        r.stderr
    );
    // Nothing scary: the SBC's own warnings (a failover logs some) are kept unless it fails.
    assert!(
        r.stderr.trim().is_empty(),
        "sbc demo wrote to stderr:\n{}",
        r.stderr
    );
    // The SBC sees the primary go down (through suspect, unless both came in one reading).
    assert!(
        out.lines()
            .any(|l| l.contains("SBC: node pbx-a ") && l.ends_with("-> down")),
        "no down transition of pbx-a in:\n{out}"
    );
    for want in [
        "/metrics",
        "alice and bob registered via pbx-a",
        "pbx-a killed",
        "SBC: pool pbx failed over from pbx-a to pbx-b",
        "failover: pbx-a detected down",
        "alice and bob registered via pbx-b",
        "SBC: node pbx-a down -> up",
        "GET http://127.0.0.1:",
        "/status: pool pbx active pbx-b; pbx-a down, pbx-b up",
        "POST http://127.0.0.1:",
        "failback: answered 200, active node pbx-b -> pbx-a",
        "SBC: pool pbx failed back from pbx-b to pbx-a",
        "demo finished: every step passed",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // Every call: up through the expected node, RTP counted both ways.
    let expected_via = ["pbx-a", "pbx-a", "pbx-a", "pbx-b", "pbx-b", "pbx-a"];
    for (i, via) in expected_via.iter().enumerate() {
        let n = i + 1;
        let up = call_line(out, n, " up: ").unwrap_or_else(|| panic!("no call {n} in:\n{out}"));
        assert!(
            up.contains(&format!("via {via};")),
            "call {n} not via {via}: {up}"
        );
        assert!(up.contains("at relay port 41"), "media not anchored: {up}");
        let media = call_line(out, n, " media: ")
            .unwrap_or_else(|| panic!("no RTP line for call {n} in:\n{out}"));
        let counts = rtp_counts(media);
        assert_eq!(counts.len(), 2, "two directions in {media:?}");
        for (received, sent) in counts {
            assert!(
                sent > 0 && received > 0,
                "no RTP through the relay: {media}"
            );
        }
    }
    assert!(
        out.contains("calls          6 of 6 completed with media: 4 via pbx-a, 2 via pbx-b"),
        "{out}"
    );
    // The order a person reads: failover before the calls on the standby, failback after.
    let pos = |s: &str| out.find(s).unwrap_or_else(|| panic!("{s:?} missing"));
    assert!(pos("failed over from pbx-a to pbx-b") < pos("call 4 up: "));
    assert!(pos("call 5 media: ") < pos("failed back from pbx-b to pbx-a"));
    assert!(pos("failed back from pbx-b to pbx-a") < pos("call 6 up: "));
}

#[test]
fn verbose_demo_shows_the_sip_trace() {
    let r = demo(&["--verbose"]);
    assert!(
        r.success,
        "sbc demo --verbose failed\nstdout:\n{}\nstderr:\n{}",
        r.stdout, r.stderr
    );
    for want in [
        "alice -> SBC      REGISTER sip:demo.pbx",
        "pbx-a -> SBC      401 Unauthorized (REGISTER)",
        "SBC -> pbx-b    INVITE sip:bob@demo.pbx",
        "demo finished: every step passed",
    ] {
        assert!(
            r.stdout.contains(want),
            "missing {want:?} in:\n{}",
            r.stdout
        );
    }
}

#[test]
fn rtp_counts_are_read_from_the_media_line() {
    let line = "   1.000s  call 1 media: alice -> bob 25/25 RTP packets, bob -> alice 24/25, through the relay; alice hung up";
    assert_eq!(rtp_counts(line), vec![(25, 25), (24, 25)]);
    assert_eq!(call_line(line, 1, " media: "), Some(line));
    assert_eq!(call_line(line, 2, " media: "), None);
}
