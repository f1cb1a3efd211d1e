//! The `sbc` binary's operator commands against a running SBC (status, failover, failback,
//! maintenance over the admin API), and `sbc check-config` on broken files.
//!
//! The SBC runs in this process on its own runtime; the binary is a real child process.
//! Raw UDP sockets stand in for the PBX nodes and answer the SBC's OPTIONS probes.

use bytes::Bytes;
use sbc_sip::message::Message;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const TOKEN: &str = "cli-test-token-0123456789";

fn sbc_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sbc"));
    c.env_remove("SBC_ADMIN_TOKEN");
    c
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("run sbc");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out, stdout, stderr)
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sbc-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// A PBX node that answers every OPTIONS with 200, so the SBC sees it Up.
async fn options_responder(ip: &str) -> SocketAddr {
    let s = tokio::net::UdpSocket::bind(format!("{ip}:0"))
        .await
        .expect("bind");
    let addr = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let Ok(req) = Message::parse(Bytes::copy_from_slice(&buf[..n])) else {
                continue;
            };
            if req.method() != Some(sbc_sip::Method::Options) {
                continue;
            }
            let resp = sbc_sip::edit::response(
                &req,
                200,
                "OK",
                &sbc_sip::edit::ResponseOpts {
                    to_tag: Some(b"pbx"),
                    ..Default::default()
                },
            );
            let _ = s.send_to(&resp, from).await;
        }
    });
    addr
}

struct Running {
    rt: tokio::runtime::Runtime,
    sbc: sbc::Sbc,
    admin: String,
    config_text: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.sbc.shutdown();
    }
}

fn config(a: SocketAddr, b: SocketAddr, admin: &str) -> String {
    format!(
        r#"[[listen]]
transport = "udp"
addr = "127.0.0.1:0"

[[pool]]
name = "pbx"
[pool.probe]
interval_ms = 200
[[pool.node]]
name = "pbx-a"
address = "{a}"
[[pool.node]]
name = "pbx-b"
address = "{b}"

[admin]
listen = "{admin}"
token = "{TOKEN}"
"#
    )
}

fn start() -> Running {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (sbc, config_text) = rt.block_on(async {
        let a = options_responder("127.0.0.2").await;
        let b = options_responder("127.0.0.3").await;
        let text = config(a, b, "127.0.0.1:0");
        let cfg = sbc_config::parse(&text, Path::new("cli.toml")).expect("config");
        let sbc = sbc::Sbc::start_with(&cfg, sbc::StartOptions { admin: true })
            .await
            .expect("sbc starts");
        let admin = sbc.admin_addr().expect("admin").to_string();
        (sbc, config(a, b, &admin))
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sbc.health.status()[0]
        .nodes
        .iter()
        .all(|n| n.state == sbc_health::NodeState::Up)
    {
        assert!(Instant::now() < deadline, "{:?}", sbc.health.status());
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin = format!("http://{}", sbc.admin_addr().expect("admin"));
    Running {
        rt,
        sbc,
        admin,
        config_text,
    }
}

impl Running {
    fn active(&self) -> String {
        self.sbc.health.status()[0]
            .active
            .clone()
            .expect("active node")
    }

    fn cmd(&self, args: &[&str]) -> (Output, String, String) {
        run(sbc_bin()
            .args(args)
            .args(["--admin", &self.admin, "--token", TOKEN]))
    }
}

#[test]
fn status_failover_failback_and_maintenance_from_the_cli() {
    let r = start();
    let _guard = r.rt.enter();

    let (out, stdout, stderr) = r.cmd(&["status"]);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("pool pbx: active pbx-a"), "{stdout}");
    let a_line = stdout
        .lines()
        .find(|l| l.starts_with("  ") && l.contains("pbx-a "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        a_line.trim_start().starts_with('*') && a_line.contains(" up "),
        "{a_line}"
    );
    assert!(stdout.contains("config generation 1"), "{stdout}");

    let (out, stdout, stderr) = r.cmd(&["status", "--json"]);
    assert!(out.status.success(), "{stderr}");
    let j: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(j["pools"][0]["nodes"][1]["name"], "pbx-b");
    assert_eq!(j["pools"][0]["nodes"][1]["state"], "up");

    // The token from the environment works as well as the flag.
    let (out, stdout, stderr) = run(sbc_bin()
        .args([
            "failover", "pbx", "--reason", "cli test", "--admin", &r.admin,
        ])
        .env("SBC_ADMIN_TOKEN", TOKEN));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "pool pbx: active node pbx-a -> pbx-b");
    assert_eq!(r.active(), "pbx-b");

    let (out, stdout, stderr) = r.cmd(&["failback", "pbx"]);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "pool pbx: active node pbx-b -> pbx-a");
    assert_eq!(r.active(), "pbx-a");

    // Refusals exit non-zero with the server's reason.
    let (out, _, stderr) = r.cmd(&["maintenance", "pbx-b", "on"]);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        r.sbc.health.node_state(1),
        Some(sbc_health::NodeState::Maintenance)
    );
    let (out, stdout, stderr) = r.cmd(&["failover", "pbx"]);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stderr.contains("409") && stderr.contains("no other node can take over"),
        "{stderr}"
    );
    assert_eq!(r.active(), "pbx-a");
    let (out, stdout, stderr) = r.cmd(&["maintenance", "pbx-b", "off"]);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("node pbx-b (pool pbx)"), "{stdout}");
    assert_ne!(
        r.sbc.health.node_state(1),
        Some(sbc_health::NodeState::Maintenance)
    );

    let (out, _, stderr) = r.cmd(&["failover", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("404") && stderr.contains("no pool named nope"),
        "{stderr}"
    );

    // Wrong and missing token.
    let (out, _, stderr) = run(sbc_bin().args([
        "status",
        "--admin",
        &r.admin,
        "--token",
        "not-the-token-000000",
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("401") && stderr.contains("SBC_ADMIN_TOKEN"),
        "{stderr}"
    );
    let (out, _, stderr) = run(sbc_bin().args(["status", "--admin", &r.admin]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("401"), "{stderr}");

    // --config supplies both the address and the token.
    let dir = temp_dir("cfg");
    let file = dir.join("sbc.toml");
    std::fs::write(&file, &r.config_text).expect("write");
    let (out, stdout, stderr) =
        run(sbc_bin().args(["status", "--config", file.to_str().expect("utf-8")]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("pool pbx"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreachable_admin_endpoint_is_a_clear_error() {
    // Port 9 (discard) on loopback: nothing listens there in the test environment.
    let (out, _, stderr) = run(sbc_bin().args(["status", "--admin", "http://127.0.0.1:9"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with("sbc: cannot reach the admin endpoint at http://127.0.0.1:9"),
        "{stderr}"
    );
    let (out, _, stderr) = run(sbc_bin().args(["status", "--admin", "ftp://x"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("expected an http:// URL"), "{stderr}");
}

#[test]
fn check_config_reports_file_line_and_exits_non_zero() {
    let dir = temp_dir("check");
    let good = "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:5060\"\n\n[[pool]]\nname = \"pbx\"\n[[pool.node]]\nname = \"a\"\naddress = \"127.0.0.2:5060\"\n";
    let file = dir.join("good.toml");
    std::fs::write(&file, good).expect("write");
    let (out, stdout, stderr) = run(sbc_bin().args(["check-config", file.to_str().expect("p")]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(": ok"), "{stdout}");

    // (name, text, line, what the message must say)
    let cases: &[(&str, String, usize, &str)] = &[
        (
            "syntax",
            format!("{good}[admin\nlisten = 1\n"),
            10,
            "invalid TOML",
        ),
        (
            "unknown-key",
            format!("{good}colour = \"blue\"\n"),
            10,
            "colour",
        ),
        (
            "bad-address",
            good.replace("127.0.0.2:5060", "127.0.0.300:5060"),
            9,
            "pool[0].node[0].address",
        ),
        (
            "missing-node",
            good.replace(
                "[[pool.node]]\nname = \"a\"\naddress = \"127.0.0.2:5060\"\n",
                "",
            ),
            5,
            "node",
        ),
        (
            "admin-without-token",
            format!("{good}[admin]\nlisten = \"0.0.0.0:9090\"\n"),
            11,
            "admin.token",
        ),
    ];
    for (name, text, line, needle) in cases {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, text).expect("write");
        let shown = file.to_str().expect("p");
        let (out, _, stderr) = run(sbc_bin().args(["check-config", shown]));
        assert!(!out.status.success(), "{name} accepted");
        assert!(
            stderr.starts_with(&format!("{shown}:{line}:")),
            "{name}: expected {shown}:{line}: in {stderr}"
        );
        assert!(stderr.contains(needle), "{name}: {stderr}");
    }
    let missing = dir.join("missing.toml");
    let (out, _, stderr) = run(sbc_bin().args(["check-config", missing.to_str().expect("p")]));
    assert!(!out.status.success());
    assert!(stderr.contains("missing.toml"), "names the file: {stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sbc run` raises its soft descriptor limit to the hard one, and warns when even that is
/// below what the media port range may need.
#[test]
fn run_raises_the_descriptor_limit_and_warns_when_it_is_short() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
    // A hard limit of at most 2,048, under the default media range's 5,000 pairs x 3, and a
    // soft limit well below it.
    let hard = own.rlim_max.min(2048);
    if hard <= 256 {
        return; // nothing to raise on this machine
    }
    let dir = temp_dir("nofile");
    let cfg = dir.join("sbc.toml");
    std::fs::write(
        &cfg,
        "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n\n[[pool]]\nname = \"pbx\"\n\
         [[pool.node]]\nname = \"pbx-a\"\naddress = \"127.0.0.2:5060\"\n",
    )
    .expect("config");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && ulimit -Hn {hard} && exec \"$0\" run --config \"$1\""
        ))
        .arg(env!("CARGO_BIN_EXE_sbc"))
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sbc");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log.iter().any(|l: &String| l.contains("sbc running")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => break,
        }
    }
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let log = log.join("\n");
    assert!(log.contains("sbc running"), "sbc did not start:\n{log}");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("limits line");
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(
        fields[3..5],
        [hard.to_string().as_str(), hard.to_string().as_str()],
        "soft limit raised to the hard one: {open_files}"
    );
    assert!(
        log.contains("descriptor limit raised to the hard limit"),
        "{log}"
    );
    assert!(
        log.contains("descriptor limit (RLIMIT_NOFILE) is below"),
        "{log}"
    );
}
