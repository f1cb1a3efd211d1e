//! Every shipped example must load, so the files operators copy from are
//! known to be valid and up to date with the schema.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sbc_config::{load, Advertise, Config, Side, Transport};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn load_example(name: &str) -> Config {
    let path = examples_dir().join(name);
    match load(&path) {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

#[test]
fn every_example_loads() {
    let mut count = 0;
    for entry in std::fs::read_dir(examples_dir()).expect("examples dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = load(&path) {
                panic!("{} does not load: {e}", path.display());
            }
            count += 1;
        }
    }
    assert!(
        count >= 2,
        "expected minimal.toml and full.toml, found {count}"
    );
}

#[test]
fn minimal_example() {
    let c = load_example("minimal.toml");
    assert_eq!(c.general.name, "sbc");
    assert_eq!(c.general.secret, None);
    assert_eq!(c.listen.len(), 1);
    assert_eq!(c.listen[0].transport, Transport::Udp);
    assert_eq!(c.listen[0].addr, addr("127.0.0.1:5060"));
    assert_eq!(c.listen[0].side, Side::Both);
    assert_eq!(c.listen[0].advertise, None);
    assert_eq!(c.pools.len(), 1);
    assert_eq!(c.pools[0].nodes[0].name, "pbx-a");
    assert_eq!(c.pools[0].nodes[0].address, addr("127.0.0.1:5070"));
    assert!(c.trunks.is_empty());
    assert_eq!(c.phones.pool, "pbx");
    assert_eq!(c.limits, sbc_config::Limits::default());
    assert_eq!(c.timers, sbc_config::Timers::default());
    assert_eq!(c.admin, sbc_config::Admin::default());
    assert!(c.source.is_absolute());
    assert!(c.source.ends_with("minimal.toml"));
}

#[test]
fn full_example() {
    let c = load_example("full.toml");
    let dir = examples_dir();
    assert_eq!(c.general.name, "sbc-1");
    assert!(c.general.secret.is_some());

    assert_eq!(c.listen.len(), 4);
    let transports: Vec<Transport> = c.listen.iter().map(|l| l.transport).collect();
    assert_eq!(
        transports,
        [
            Transport::Udp,
            Transport::Tcp,
            Transport::Tls,
            Transport::Udp
        ]
    );
    assert_eq!(
        c.listen[0].advertise,
        Some(Advertise {
            host: "sbc.example.com".into(),
            port: Some(5060)
        })
    );
    assert_eq!(c.listen[1].side, Side::Internal);
    let tls = &c.listen[2];
    assert_eq!(tls.advertise.as_ref().map(|a| a.port), Some(None));
    assert_eq!(
        tls.cert.as_deref(),
        Some(dir.join("certs/sbc.pem").as_path())
    );
    assert_eq!(
        tls.key.as_deref(),
        Some(dir.join("certs/sbc.key").as_path())
    );
    assert_eq!(c.listen[3].addr, addr("[::]:5060"));
    assert_eq!(
        c.listen[3].advertise.as_ref().map(ToString::to_string),
        Some("[2001:db8::10]:5060".to_string())
    );

    assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.limits.max_message_size, 65535);
    assert_eq!(c.timers.t1, Duration::from_millis(500));
    assert_eq!(c.timers.timer_c, Duration::from_secs(180));

    assert_eq!(c.pools.len(), 2);
    let pbx = c.pool("pbx").expect("pool pbx");
    assert_eq!(pbx.nodes[1].address, addr("10.0.0.11:5060"));
    assert_eq!(pbx.nodes[1].address_text, "10.0.0.11");
    assert_eq!(pbx.nodes[1].transport, Transport::Tcp);
    let secure = c.pool("pbx-secure").expect("pool pbx-secure");
    assert_eq!(secure.nodes[0].address.port(), 5061);
    assert!(secure.nodes[0].address.ip().is_loopback());
    assert_eq!(
        secure.nodes[0].tls_server_name.as_deref(),
        Some("sbc.example.com")
    );
    assert!(c.pool("nope").is_none());
    assert_eq!(pbx.failback, sbc_config::Failback::Manual);
    assert_eq!(pbx.failback_hold, Duration::from_secs(300));
    assert_eq!(pbx.branch_timeout, Duration::from_millis(1000));
    assert_eq!(pbx.probe.interval, Duration::from_millis(1000));
    assert_eq!(pbx.probe.timeout, Duration::from_millis(800));
    assert_eq!(pbx.probe.witnesses, ["http://10.0.0.1:8080/ok"]);
    assert!(pbx.nodes[0].options);
    assert_eq!(
        pbx.nodes[0].http_url.as_deref(),
        Some("http://10.0.0.10:8080/health")
    );
    assert_eq!(pbx.webhooks.len(), 1);
    assert_eq!(pbx.webhooks[0].method, "POST");
    assert_eq!(pbx.webhooks[0].retries, 2);
    assert!(pbx.webhooks[0].body.contains("{reason}"));
    assert_eq!(secure.probe, sbc_config::Probe::default());
    assert!(secure.webhooks.is_empty());

    assert_eq!(c.trunks.len(), 2);
    assert_eq!(c.trunks[0].sources.len(), 3);
    assert_eq!(c.trunks[0].sources[1].to_string(), "198.51.100.7/32");
    assert_eq!(c.trunks[0].pool, "pbx");
    assert_eq!(c.trunks[1].address, addr("[2001:db8:b::1]:5061"));
    assert_eq!(c.trunks[1].transport, Transport::Tls);
    assert_eq!(c.trunks[1].pool, "pbx-secure");
    assert_eq!(
        c.trunks[1].tls_ca.as_deref(),
        Some(dir.join("certs/sbc.pem").as_path())
    );

    assert_eq!(c.phones.domains, ["example.com", "voice.example.com"]);
    assert_eq!(c.phones.sources.len(), 2);
    assert_eq!(c.admin.listen, addr("0.0.0.0:9090"));
    assert!(c.admin.token.is_some());
    // Secrets never show up in Debug output (logs).
    let debug = format!("{c:?}");
    assert!(!debug.contains("change-me"));
    assert!(!debug.contains("another-long-random"));
}
