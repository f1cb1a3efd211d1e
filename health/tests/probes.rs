//! Probes against real loopback peers: SIP OPTIONS over UDP, TCP and TLS,
//! HTTP GET, and the witness check.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sbc_health::probe::{ProbeKind, Prober};
use sbc_health::witness::{self, Witness};
use sbc_health::ProbeError;
use support::{config, Dir, HttpPeer, Mode, Pki, SipPeer};

/// A prober for one node described by `node_keys` (TOML keys of the
/// `[[pool.node]]` table) with a 300 ms probe timeout.
fn prober(dir: &Dir, node_keys: &str, probe_keys: &str) -> Prober {
    let cfg = config(
        &dir.0,
        &format!(
            "[[pool]]\nname = \"p\"\n[pool.probe]\ninterval_ms = 1000\ntimeout_ms = 300\n{probe_keys}\n\
             [[pool.node]]\nname = \"n\"\n{node_keys}\n"
        ),
    );
    let pool = &cfg.pools[0];
    Prober::new(&pool.name, &pool.nodes[0], &pool.probe)
}

fn udp_node(peer: &SipPeer) -> String {
    format!("address = \"{}\"\ntransport = \"udp\"", peer.addr)
}

#[tokio::test]
async fn udp_options_any_final_answer_but_503_is_alive() {
    let dir = Dir::new("udp");
    let peer = SipPeer::udp().await;
    let p = prober(&dir, &udp_node(&peer), "");
    let rtt = p.options().await.expect("200 is alive");
    assert!(rtt < Duration::from_millis(300), "{rtt:?}");
    // The node itself answered: alive, whatever the code (many PBXs say 404/405).
    for code in [404, 405, 481, 500, 603] {
        peer.set(Mode::Answer(code));
        assert!(p.options().await.is_ok(), "{code} counts as alive");
    }
    peer.set(Mode::Answer(503));
    assert_eq!(p.options().await, Err(ProbeError::Status(503)));

    let report = p.probe().await;
    assert!(!report.alive);
    assert_eq!(report.http, None);
    assert_eq!(
        report.first_error(),
        Some((ProbeKind::Options, &ProbeError::Status(503)))
    );
}

#[tokio::test]
async fn udp_options_alive_codes_restrict_the_answers() {
    let dir = Dir::new("codes");
    let peer = SipPeer::udp().await;
    let p = prober(&dir, &udp_node(&peer), "alive_codes = [200, 405]");
    assert!(p.options().await.is_ok());
    peer.set(Mode::Answer(405));
    assert!(p.options().await.is_ok());
    peer.set(Mode::Answer(404));
    assert_eq!(p.options().await, Err(ProbeError::Status(404)));
}

#[tokio::test]
async fn udp_options_request_carries_a_real_via_with_rport_and_fresh_ids() {
    let dir = Dir::new("via");
    let peer = SipPeer::udp().await;
    let p = prober(&dir, &udp_node(&peer), "");
    p.options().await.expect("alive");
    let (src, first) = peer.last_request().expect("a request");
    // The Via names the very address the datagram came from, and asks for rport.
    let via = first
        .lines()
        .find(|l| l.starts_with("Via:"))
        .expect("Via")
        .to_string();
    assert!(
        via.contains(&format!("SIP/2.0/UDP {src};branch=z9hG4bK")),
        "{via} vs {src}"
    );
    assert!(via.ends_with(";rport"), "{via}");
    assert!(first.starts_with(&format!("OPTIONS sip:{} SIP/2.0\r\n", peer.addr)));
    p.options().await.expect("alive");
    let (_, second) = peer.last_request().expect("a request");
    let line = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .map(str::to_string)
    };
    assert_ne!(line(&first, "Via:"), line(&second, "Via:"), "fresh branch");
    assert_ne!(line(&first, "Call-ID:"), line(&second, "Call-ID:"));
}

#[tokio::test]
async fn udp_silence_is_a_local_timeout_after_one_retransmission() {
    let dir = Dir::new("silent");
    let peer = SipPeer::udp().await;
    peer.set(Mode::Silent);
    let p = prober(&dir, &udp_node(&peer), "");
    let start = Instant::now();
    assert_eq!(p.options().await, Err(ProbeError::Timeout));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_millis(600),
        "{took:?}"
    );
    assert_eq!(peer.requests(), 2, "sent once, retransmitted once");
}

#[tokio::test]
async fn udp_closed_port_fails_fast_through_icmp() {
    let dir = Dir::new("closed");
    let peer = SipPeer::udp().await;
    let p = prober(&dir, &udp_node(&peer), "");
    peer.stop();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = Instant::now();
    let result = p.options().await;
    assert!(
        matches!(result, Err(ProbeError::Transport(_))),
        "{result:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(200));
    // Back again: alive.
    peer.restart().await;
    assert!(p.options().await.is_ok());
}

#[tokio::test]
async fn tcp_options_reuses_its_connection_and_reconnects() {
    let dir = Dir::new("tcp");
    let peer = SipPeer::tcp().await;
    let p = prober(
        &dir,
        &format!("address = \"{}\"\ntransport = \"tcp\"", peer.addr),
        "",
    );
    for _ in 0..3 {
        p.options().await.expect("alive");
    }
    assert_eq!(peer.connections(), 1, "one connection for all probes");
    let (_, request) = peer.last_request().expect("request");
    assert!(request.contains("SIP/2.0/TCP 127.0.0.1:"), "{request}");
    assert!(request.starts_with(&format!("OPTIONS sip:{};transport=tcp ", peer.addr)));

    // The PBX restarts: the cached connection is dead; the probe still
    // succeeds on a fresh one instead of counting a failure.
    peer.restart().await;
    p.options().await.expect("alive after the restart");
    assert_eq!(peer.connections(), 2);

    peer.set(Mode::Answer(503));
    assert_eq!(p.options().await, Err(ProbeError::Status(503)));
    peer.set(Mode::Silent);
    assert_eq!(p.options().await, Err(ProbeError::Timeout));
    // After a timeout the connection is not trusted again.
    peer.set(Mode::Answer(200));
    p.options().await.expect("alive");
    assert_eq!(peer.connections(), 3);

    peer.stop();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let result = p.options().await;
    assert!(
        matches!(result, Err(ProbeError::Transport(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn tls_options_checks_sni_and_the_node_ca() {
    let dir = Dir::new("tls");
    let pki = Pki::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let peer = SipPeer::tls(&pki).await;
    let node = |name: &str, ca: &std::path::Path| {
        format!(
            "address = \"{}\"\ntransport = \"tls\"\ntls_server_name = \"{name}\"\ntls_ca = \"{}\"",
            peer.addr,
            ca.display()
        )
    };
    let p = prober(&dir, &node("pbx.test", &ca), "");
    p.options().await.expect("alive over TLS");
    p.options().await.expect("alive over TLS");
    assert_eq!(peer.connections(), 1);
    let (_, request) = peer.last_request().expect("request");
    assert!(request.starts_with(&format!(
        "OPTIONS sip:pbx.test:{};transport=tls ",
        peer.addr.port()
    )));
    assert!(request.contains("SIP/2.0/TLS 127.0.0.1:"), "{request}");

    // A name the certificate does not carry.
    let wrong_name = prober(&dir, &node("other.test", &ca), "");
    let result = wrong_name.options().await;
    assert!(matches!(result, Err(ProbeError::Tls(_))), "{result:?}");

    // A CA that did not issue the certificate.
    let other = Pki::new();
    let other_ca = dir.write("other.pem", &other.ca_pem);
    let untrusted = prober(&dir, &node("pbx.test", &other_ca), "");
    let result = untrusted.options().await;
    assert!(matches!(result, Err(ProbeError::Tls(_))), "{result:?}");
}

#[tokio::test]
async fn http_probe_2xx_is_alive() {
    let dir = Dir::new("http");
    let web = HttpPeer::start(200).await;
    let p = prober(
        &dir,
        &format!(
            "address = \"127.0.0.1:5999\"\noptions = false\nhttp_url = \"{}\"",
            web.url("/health?deep=1")
        ),
        "",
    );
    let report = p.probe().await;
    assert!(report.alive, "{report:?}");
    assert_eq!(report.options, None);
    let requests = web.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].path, "/health?deep=1");
    assert_eq!(
        requests[0].header("host"),
        Some(web.addr.to_string().as_str())
    );

    web.set_status(204);
    assert!(p.probe().await.alive);
    web.set_status(500);
    assert_eq!(p.http().await, Some(Err(ProbeError::Status(500))));
    web.set_silent(true);
    assert_eq!(p.http().await, Some(Err(ProbeError::Timeout)));
}

#[tokio::test]
async fn http_probe_to_a_closed_port_is_a_transport_error() {
    let dir = Dir::new("http-closed");
    let web = HttpPeer::start(200).await;
    let url = web.url("/health");
    drop(web);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let p = prober(
        &dir,
        &format!("address = \"127.0.0.1:5999\"\noptions = false\nhttp_url = \"{url}\""),
        "",
    );
    let result = p.http().await;
    assert!(
        matches!(result, Some(Err(ProbeError::Transport(_)))),
        "{result:?}"
    );
}

#[tokio::test]
async fn both_probes_must_pass() {
    let dir = Dir::new("both");
    let peer = SipPeer::udp().await;
    let web = HttpPeer::start(200).await;
    let p = prober(
        &dir,
        &format!("{}\nhttp_url = \"{}\"", udp_node(&peer), web.url("/health")),
        "",
    );
    assert!(p.probe().await.alive);
    // The PBX's web application is gone but SIP still answers: not healthy.
    web.set_status(503);
    let report = p.probe().await;
    assert!(!report.alive);
    assert!(matches!(report.options, Some(Ok(_))));
    assert_eq!(
        report.first_error(),
        Some((ProbeKind::Http, &ProbeError::Status(503)))
    );
}

#[tokio::test]
async fn witness_check_takes_the_first_answer() {
    let dir = Dir::new("witness");
    let peer = SipPeer::udp().await;
    let node = Arc::new(prober(&dir, &udp_node(&peer), ""));
    let web = HttpPeer::start(200).await;
    let url = sbc_config::HttpUrl::parse(&web.url("/ok")).expect("url");
    let timeout = Duration::from_millis(400);

    // A node answering is a witness.
    let w = witness::check(&[], &[Arc::clone(&node)], timeout).await;
    assert_eq!(w, Some(Witness::Node("n".into())));

    // A URL answering is one too, even with the node silent.
    peer.set(Mode::Silent);
    let w = witness::check(std::slice::from_ref(&url), &[Arc::clone(&node)], timeout).await;
    assert_eq!(w, Some(Witness::Url(web.addr.to_string())));

    // Nothing answers (URL 500, node silent): no witness, within the timeout.
    web.set_status(500);
    let start = Instant::now();
    let w = witness::check(&[url], &[node], timeout).await;
    assert_eq!(w, None);
    assert!(start.elapsed() < timeout + Duration::from_millis(200));
}
