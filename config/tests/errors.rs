//! Every kind of configuration error names the file, the line and the
//! dotted key, so an operator can go straight to the mistake.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sbc_config::{load, parse, Config, ConfigError};

/// A scratch directory removed on drop, holding files that cert/key/tls_ca
/// keys can point at.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "sbc-config-errors-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(path.join("certs")).expect("create temp dir");
        for name in ["certs/sbc.pem", "certs/sbc.key", "certs/ca.pem"] {
            std::fs::write(path.join(name), "-----BEGIN DEMO-----\n").expect("write file");
        }
        Dir(path)
    }

    fn origin(&self) -> PathBuf {
        self.0.join("sbc.toml")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A valid base: one listener and one pool. Tests append to or replace
/// parts of it.
const BASE: &str = r#"[[listen]]
transport = "udp"
addr = "127.0.0.1:5060"

[[pool]]
name = "pbx"

  [[pool.node]]
  name = "pbx-a"
  address = "127.0.0.1:5070"
"#;

fn ok(text: &str) -> Config {
    let dir = Dir::new();
    match parse(text, &dir.origin()) {
        Ok(c) => c,
        Err(e) => panic!("expected success, got {e}"),
    }
}

/// 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in text"));
    text[..at].matches('\n').count() + 1
}

/// Parses `text` (as `<tmp>/sbc.toml`), expecting an error at `line` about
/// `field` whose message contains `part`.
fn err(text: &str, line: usize, field: &str, part: &str) -> ConfigError {
    let dir = Dir::new();
    let origin = dir.origin();
    let e = match parse(text, &origin) {
        Ok(_) => panic!("expected an error about {field}, but the config was accepted"),
        Err(e) => e,
    };
    assert_eq!(e.file, origin, "{e}");
    assert_eq!((e.line, e.field.as_str()), (line, field), "{e}");
    assert!(e.column >= 1, "{e}");
    assert!(e.message.contains(part), "{e}\nshould contain: {part}");
    let prefix = format!("{}:{line}:{}: {field}: ", origin.display(), e.column);
    assert!(e.to_string().starts_with(&prefix), "{e}");
    e
}

/// `err` with the line located by the first occurrence of `needle`.
fn err_at(text: &str, needle: &str, field: &str, part: &str) -> ConfigError {
    err(text, line_of(text, needle), field, part)
}

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

// ---------------------------------------------------------------- syntax

#[test]
fn syntax_error_unterminated_string() {
    let text = BASE.replace("name = \"pbx-a\"", "name = \"pbx-a");
    err_at(&text, "name = \"pbx-a", "pool[0].node[0].name", "");
}

#[test]
fn syntax_error_duplicate_key() {
    let text = BASE.replace(
        "addr = \"127.0.0.1:5060\"",
        "addr = \"127.0.0.1:5060\"\naddr = \"127.0.0.1:5061\"",
    );
    err_at(
        &text,
        "addr = \"127.0.0.1:5061\"",
        "listen[0].addr",
        "duplicate key",
    );
}

#[test]
fn syntax_error_garbage_line() {
    let text = with("[limits]\nmax_headers 12\n");
    err_at(&text, "max_headers 12", "limits", "");
}

#[test]
fn syntax_error_column_is_reported() {
    let text = with("[general]\nname = 'a' 'b'\n");
    let e = err_at(&text, "name = 'a' 'b'", "general.name", "");
    assert_eq!(e.column, 12, "{e}");
}

// ---------------------------------------------------------------- unknown keys

#[test]
fn unknown_top_level_key() {
    let text = with("[[trunks]]\nname = \"x\"\n");
    err_at(&text, "[[trunks]]", "trunks", "unknown key `trunks`");
}

#[test]
fn unknown_key_in_second_listener() {
    let text = format!(
        "{BASE}\n[[listen]]\ntransport = \"tcp\"\naddr = \"127.0.0.1:5060\"\nport = 5060\n"
    );
    let e = err_at(&text, "port = 5060", "listen[1].port", "unknown key `port`");
    assert!(e.message.contains("`addr`"), "lists the accepted keys: {e}");
    assert_eq!(e.column, 1);
}

#[test]
fn unknown_key_in_node() {
    let text = BASE.replace("  address =", "  weight = 2\n  address =");
    err_at(
        &text,
        "weight",
        "pool[0].node[0].weight",
        "unknown key `weight`",
    );
}

#[test]
fn unknown_key_in_limits_and_dotted_table() {
    err_at(
        &with("[limits]\nmax_header = 12\n"),
        "max_header",
        "limits.max_header",
        "unknown key",
    );
    err_at(
        &with("[general.extra]\nx = 1\n"),
        "[general.extra]",
        "general.extra",
        "unknown key `extra`",
    );
}

// ---------------------------------------------------------------- wrong types

#[test]
fn wrong_type_for_addr() {
    let text = BASE.replace("addr = \"127.0.0.1:5060\"", "addr = 5060");
    err_at(
        &text,
        "addr = 5060",
        "listen[0].addr",
        "expected a string, found integer `5060`",
    );
}

#[test]
fn wrong_type_for_integer() {
    let text = with("[limits]\nmax_headers = \"many\"\n");
    err_at(
        &text,
        "max_headers",
        "limits.max_headers",
        "expected an integer, found string \"many\"",
    );
}

#[test]
fn wrong_type_for_list_and_list_element() {
    let trunk = "[[trunk]]\nname = \"t\"\naddress = \"192.0.2.1\"\n";
    err_at(
        &with(&format!("{trunk}sources = \"192.0.2.0/24\"\n")),
        "sources",
        "trunk[0].sources",
        "expected an array",
    );
    err_at(
        &with(&format!("{trunk}sources = [\"192.0.2.0/24\", 7]\n")),
        "sources",
        "trunk[0].sources[1]",
        "expected a string",
    );
}

#[test]
fn wrong_type_table_for_value() {
    let text = BASE.replace("addr = \"127.0.0.1:5060\"", "addr = { ip = \"127.0.0.1\" }");
    err_at(&text, "addr = {", "listen[0].addr", "");
    let text = with("[general]\nname.first = \"x\"\n");
    err_at(&text, "name.first", "general.name.first", "found a table");
}

#[test]
fn wrong_type_for_section() {
    let text = format!("phones = 3\n{BASE}");
    err(
        &text,
        line_of(&text, "phones = 3"),
        "phones",
        "expected a table, found integer",
    );
}

// ---------------------------------------------------------------- missing keys

#[test]
fn missing_listener_addr() {
    let text = format!("{BASE}\n[[listen]]\ntransport = \"tcp\"\n");
    let e = err(
        &text,
        line_of(&text, "[[listen]]\ntransport = \"tcp\""),
        "listen[1].addr",
        "required key is missing",
    );
    assert_eq!(e.column, 1);
}

#[test]
fn missing_node_address() {
    let text = BASE.replace("  address = \"127.0.0.1:5070\"\n", "");
    err_at(
        &text,
        "[[pool.node]]",
        "pool[0].node[0].address",
        "required key is missing",
    );
}

#[test]
fn missing_trunk_sources() {
    let text = with("\n[[trunk]]\nname = \"t\"\naddress = \"192.0.2.1\"\n");
    err_at(
        &text,
        "[[trunk]]",
        "trunk[0].sources",
        "required key is missing",
    );
}

#[test]
fn missing_listen_section() {
    let text = BASE.replace(
        "[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:5060\"\n",
        "",
    );
    let e = err(&text, 1, "listen", "at least one [[listen]]");
    assert_eq!(e.column, 1);
    let text = format!("listen = []\n{text}");
    err(&text, 1, "listen", "at least one [[listen]]");
}

#[test]
fn missing_pool_section() {
    let text =
        "[general]\nname = \"x\"\n\n[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:5060\"\n";
    err(text, 1, "pool", "at least one [[pool]]");
}

#[test]
fn pool_without_nodes() {
    let text = with("\n[[pool]]\nname = \"empty\"\n");
    err_at(
        &text,
        "[[pool]]\nname = \"empty\"",
        "pool[1].node",
        "at least one [[pool.node]]",
    );
}

// ---------------------------------------------------------------- addresses

#[test]
fn listener_addr_without_port() {
    let text = BASE.replace("127.0.0.1:5060", "127.0.0.1");
    err_at(
        &text,
        "addr = \"127.0.0.1\"",
        "listen[0].addr",
        "is not an IP address with a port",
    );
}

#[test]
fn listener_addr_bad_ip() {
    let text = BASE.replace("127.0.0.1:5060", "10.0.0.300:5060");
    err_at(&text, "10.0.0.300", "listen[0].addr", "\"10.0.0.300:5060\"");
}

#[test]
fn wildcard_listener_needs_advertise() {
    let text = BASE.replace("127.0.0.1:5060", "0.0.0.0:5060");
    err_at(&text, "0.0.0.0:5060", "listen[0].advertise", "wildcard");
    let text = BASE.replace("127.0.0.1:5060", "[::]:5060");
    err_at(&text, "[::]:5060", "listen[0].advertise", "wildcard");
}

#[test]
fn bad_advertise() {
    let base = BASE.replace("127.0.0.1:5060", "0.0.0.0:5060");
    for (value, part) in [
        ("sbc..example.com", "not a hostname"),
        ("sbc.example.com:0", "port"),
        ("sbc.example.com:70000", "port"),
        ("2001:db8::1", "brackets"),
        ("[2001:db8::zz]:5060", "IPv6"),
        ("0.0.0.0:5060", "wildcard"),
        ("10.0.0.300", "IPv4"),
    ] {
        let text = base.replace(
            "addr = \"0.0.0.0:5060\"",
            &format!("addr = \"0.0.0.0:5060\"\nadvertise = \"{value}\""),
        );
        err_at(&text, "advertise", "listen[0].advertise", part);
    }
}

#[test]
fn bad_node_address() {
    let text = BASE.replace("127.0.0.1:5070", "10.0.0.300:5060");
    err_at(
        &text,
        "10.0.0.300",
        "pool[0].node[0].address",
        "not a valid IPv4 address",
    );
    let text = BASE.replace("127.0.0.1:5070", "2001:db8::1:5060");
    err_at(&text, "2001:db8", "pool[0].node[0].address", "brackets");
    let text = BASE.replace("127.0.0.1:5070", "0.0.0.0:5060");
    err_at(&text, "0.0.0.0", "pool[0].node[0].address", "wildcard");
}

#[test]
fn unresolvable_node_address() {
    let text = BASE.replace("127.0.0.1:5070", "no-such-host.invalid:5060");
    err_at(
        &text,
        "no-such-host",
        "pool[0].node[0].address",
        "cannot resolve host",
    );
}

#[test]
fn bad_trunk_source() {
    let text = with(
        "\n[[trunk]]\nname = \"a\"\nsources = [\"192.0.2.1\"]\naddress = \"192.0.2.1\"\n\n[[trunk]]\nname = \"b\"\nsources = [\"10.0.0.300/8\"]\naddress = \"192.0.2.2\"\n",
    );
    let e = err_at(
        &text,
        "10.0.0.300/8",
        "trunk[1].sources[0]",
        "\"10.0.0.300/8\" is not an IP address or CIDR network",
    );
    assert_eq!(e.column, 12, "points at the string: {e}");
}

#[test]
fn trunk_source_with_host_bits() {
    let text = with("[[trunk]]\nname = \"a\"\nsources = [\"192.0.2.0/24\", \"10.1.2.3/8\"]\naddress = \"192.0.2.1\"\n");
    err_at(&text, "sources", "trunk[0].sources[1]", "\"10.0.0.0/8\"");
}

#[test]
fn trunk_max_calls() {
    let trunk = "[[trunk]]\nname = \"a\"\nsources = [\"192.0.2.0/24\"]\naddress = \"192.0.2.1\"\n";
    assert_eq!(
        ok(&with(trunk)).trunks[0].max_calls,
        None,
        "no limit by default"
    );
    let c = ok(&with(&format!("{trunk}max_calls = 30\n")));
    assert_eq!(c.trunks[0].max_calls, Some(30));
    let text = with(&format!("{trunk}max_calls = 0\n"));
    err_at(
        &text,
        "max_calls",
        "trunk[0].max_calls",
        "must be from 1 to 1000000 calls",
    );
}

#[test]
fn empty_trunk_sources() {
    let text = with("[[trunk]]\nname = \"a\"\nsources = []\naddress = \"192.0.2.1\"\n");
    err_at(&text, "sources", "trunk[0].sources", "at least one");
}

#[test]
fn bad_domains_and_phone_sources() {
    let text = with("[phones]\ndomains = [\"example.com\", \"bad domain\"]\n");
    err_at(&text, "domains", "phones.domains[1]", "\"bad domain\"");
    let text = with("[phones]\nsources = []\n");
    err_at(&text, "sources", "phones.sources", "empty list");
    let text = with("[phones]\nsources = [\"::/0\", \"any\"]\n");
    err_at(
        &text,
        "sources",
        "phones.sources[1]",
        "not an IP address or CIDR",
    );
}

#[test]
fn admin_needs_token_off_loopback() {
    let text = with("[admin]\nlisten = \"0.0.0.0:9090\"\n");
    err_at(
        &text,
        "listen = \"0.0.0.0:9090\"",
        "admin.token",
        "not a loopback",
    );
    let text = with("[admin]\nlisten = \"localhost:9090\"\n");
    err_at(
        &text,
        "localhost",
        "admin.listen",
        "not an IP address with a port",
    );
    let text = with("[admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"short\"\n");
    err_at(&text, "token", "admin.token", "at least 16");
}

// ---------------------------------------------------------------- references

#[test]
fn trunk_refers_to_missing_pool() {
    let text = with("[[trunk]]\nname = \"a\"\nsources = [\"192.0.2.1\"]\naddress = \"192.0.2.1\"\npool = \"pbx2\"\n");
    let e = err_at(
        &text,
        "pool = \"pbx2\"",
        "trunk[0].pool",
        "no pool named \"pbx2\"",
    );
    assert!(e.message.contains("\"pbx\""), "lists defined pools: {e}");
}

#[test]
fn phones_refer_to_missing_pool() {
    let text = with("[phones]\npool = \"nope\"\n");
    err_at(
        &text,
        "pool = \"nope\"",
        "phones.pool",
        "no pool named \"nope\"",
    );
}

// ---------------------------------------------------------------- duplicates

#[test]
fn duplicate_pool_names() {
    let text = with("\n[[pool]]\nname = \"pbx\"\n  [[pool.node]]\n  name = \"pbx-b\"\n  address = \"127.0.0.1:5071\"\n");
    err(
        &text,
        line_of(
            &text,
            "[[pool]]\nname = \"pbx\"\n  [[pool.node]]\n  name = \"pbx-b\"",
        ) + 1,
        "pool[1].name",
        "already used by pool[0]",
    );
}

#[test]
fn duplicate_node_names_across_pools() {
    let text = with("\n[[pool]]\nname = \"other\"\n  [[pool.node]]\n  name = \"pbx-a\"\n  address = \"127.0.0.1:5071\"\n");
    err(
        &text,
        line_of(&text, "name = \"other\"") + 2,
        "pool[1].node[0].name",
        "already used by pool[0].node[0]",
    );
}

#[test]
fn duplicate_trunk_names() {
    let trunk = |src: &str| {
        format!("\n[[trunk]]\nname = \"carrier\"\nsources = [\"{src}\"]\naddress = \"{src}\"\n")
    };
    let text = with(&format!("{}{}", trunk("192.0.2.1"), trunk("192.0.2.2")));
    err(
        &text,
        line_of(&text, "192.0.2.2") - 1,
        "trunk[1].name",
        "already used by trunk[0]",
    );
}

#[test]
fn duplicate_trunk_sources_and_domains() {
    let text = with("[[trunk]]\nname = \"a\"\nsources = [\"192.0.2.0/24\"]\naddress = \"192.0.2.1\"\ndomains = [\"a.example\"]\n[[trunk]]\nname = \"b\"\nsources = [\"198.51.100.1\", \"192.0.2.0/24\"]\naddress = \"192.0.2.2\"\n");
    err_at(
        &text,
        "198.51.100.1",
        "trunk[1].sources[1]",
        "already a source of trunk[0] \"a\"",
    );
    let text = with("[[trunk]]\nname = \"a\"\nsources = [\"192.0.2.0/24\"]\naddress = \"192.0.2.1\"\ndomains = [\"a.example\"]\n[[trunk]]\nname = \"b\"\nsources = [\"198.51.100.1\"]\naddress = \"192.0.2.2\"\ndomains = [\"A.Example\"]\n");
    err_at(
        &text,
        "A.Example",
        "trunk[1].domains[0]",
        "already a domain of trunk[0]",
    );
    let text = with("[phones]\ndomains = [\"a.example\", \"a.example\"]\n");
    err_at(&text, "domains", "phones.domains[1]", "already listed");
}

#[test]
fn duplicate_listener_address() {
    let text = format!("{BASE}\n[[listen]]\ntransport = \"UDP\"\naddr = \"127.0.0.1:5060\"\n");
    err(
        &text,
        line_of(&text, "transport = \"UDP\"") + 1,
        "listen[1].addr",
        "already used by listen[0]",
    );
    // TCP and TLS both need the TCP port.
    let dir_free = "[[listen]]\ntransport = \"tcp\"\naddr = \"127.0.0.1:5061\"\n[[listen]]\ntransport = \"tls\"\naddr = \"127.0.0.1:5061\"\ncert = \"certs/sbc.pem\"\nkey = \"certs/sbc.key\"\n";
    let text = with(dir_free);
    err(
        &text,
        line_of(&text, "transport = \"tls\"") + 1,
        "listen[2].addr",
        "both need the TCP port",
    );
}

// ---------------------------------------------------------------- TLS files

const TLS: &str = "\n[[listen]]\ntransport = \"tls\"\naddr = \"127.0.0.1:5061\"\n";

#[test]
fn tls_listener_without_cert() {
    let text = with(&format!("{TLS}key = \"certs/sbc.key\"\n"));
    err_at(
        &text,
        "[[listen]]\ntransport = \"tls\"",
        "listen[1].cert",
        "required for a tls listener",
    );
}

#[test]
fn tls_listener_without_key() {
    let text = with(&format!("{TLS}cert = \"certs/sbc.pem\"\n"));
    err_at(
        &text,
        "[[listen]]\ntransport = \"tls\"",
        "listen[1].key",
        "required for a tls listener",
    );
}

#[test]
fn missing_cert_file() {
    let text = with(&format!(
        "{TLS}cert = \"certs/nope.pem\"\nkey = \"certs/sbc.key\"\n"
    ));
    let e = err_at(&text, "nope.pem", "listen[1].cert", "certs/nope.pem");
    assert!(e.message.contains("cannot read"), "{e}");
}

#[test]
fn cert_is_a_directory() {
    let text = with(&format!("{TLS}cert = \"certs\"\nkey = \"certs/sbc.key\"\n"));
    err_at(
        &text,
        "cert = \"certs\"",
        "listen[1].cert",
        "not a regular file",
    );
}

#[test]
fn cert_on_udp_listener() {
    let text = BASE.replace(
        "addr = \"127.0.0.1:5060\"",
        "addr = \"127.0.0.1:5060\"\ncert = \"certs/sbc.pem\"",
    );
    err_at(&text, "cert =", "listen[0].cert", "only a tls listener");
    let text = BASE.replace(
        "addr = \"127.0.0.1:5060\"",
        "addr = \"127.0.0.1:5060\"\nkey = \"certs/sbc.key\"",
    );
    err_at(&text, "key =", "listen[0].key", "only a tls listener");
}

#[test]
fn tls_keys_on_non_tls_peer_and_missing_ca() {
    let text = BASE.replace(
        "  address = \"127.0.0.1:5070\"",
        "  address = \"127.0.0.1:5070\"\n  tls_ca = \"certs/ca.pem\"",
    );
    err_at(
        &text,
        "tls_ca",
        "pool[0].node[0].tls_ca",
        "only used with transport = \"tls\"",
    );
    let text = BASE.replace(
        "  address = \"127.0.0.1:5070\"",
        "  address = \"127.0.0.1:5070\"\n  transport = \"tls\"\n  tls_ca = \"certs/missing.pem\"",
    );
    err_at(&text, "tls_ca", "pool[0].node[0].tls_ca", "missing.pem");
    let text = BASE.replace(
        "  address = \"127.0.0.1:5070\"",
        "  address = \"127.0.0.1:5070\"\n  transport = \"tls\"\n  tls_server_name = \"bad name\"",
    );
    err_at(
        &text,
        "tls_server_name",
        "pool[0].node[0].tls_server_name",
        "not a DNS name",
    );
}

// ---------------------------------------------------------------- ranges

#[test]
fn limits_out_of_range() {
    for (key, value, part) in [
        (
            "max_message_size",
            "100",
            "from 1024 to 1048576 bytes, got 100",
        ),
        ("max_headers", "2000", "from 8 to 1024"),
        ("max_via", "1", "from 2 to 256"),
        ("idle_timeout_secs", "5", "from 10 to 86400 seconds"),
        ("tcp_connect_timeout_ms", "0", "milliseconds"),
        ("tls_handshake_timeout_ms", "-5", "got -5"),
        ("max_connections", "0", "from 1 to 1000000"),
    ] {
        let text = with(&format!("[limits]\n{key} = {value}\n"));
        err_at(&text, key, &format!("limits.{key}"), part);
    }
}

#[test]
fn per_source_above_max_connections() {
    let text = with("[limits]\nmax_connections = 100\nmax_connections_per_source = 200\n");
    err_at(
        &text,
        "max_connections_per_source",
        "limits.max_connections_per_source",
        "from 1 to 100",
    );
}

#[test]
fn timers_out_of_range() {
    let text = with("[timers]\ntimer_c_secs = 5\n");
    err_at(
        &text,
        "timer_c_secs",
        "timers.timer_c_secs",
        "from 10 to 86400 seconds",
    );
    let text = with("[timers]\nt1_ms = 0\n");
    err_at(&text, "t1_ms", "timers.t1_ms", "from 1 to 10000");
    let text = with("[timers]\nt1_ms = 1000\nt2_ms = 500\n");
    err_at(&text, "t2_ms", "timers.t2_ms", "may not be below t1_ms");
    let text = with("[timers]\nt4_ms = 100000\n");
    err_at(&text, "t4_ms", "timers.t4_ms", "from 0 to 60000");
}

// ---------------------------------------------------------------- other values

#[test]
fn bad_enumerations() {
    let text = BASE.replace("transport = \"udp\"", "transport = \"sctp\"");
    err_at(
        &text,
        "sctp",
        "listen[0].transport",
        "expected \"udp\", \"tcp\" or \"tls\"",
    );
    let text = BASE.replace(
        "transport = \"udp\"",
        "transport = \"udp\"\nside = \"outside\"",
    );
    err_at(&text, "outside", "listen[0].side", "not a side");
}

#[test]
fn bad_names_and_secrets() {
    let text = BASE.replace("name = \"pbx\"", "name = \"pbx one\"");
    err_at(&text, "pbx one", "pool[0].name", "letters, digits");
    let text = with("[general]\nsecret = \"tooshort\"\n");
    err_at(&text, "secret", "general.secret", "at least 16 characters");
    let text = with("[general]\nname = \"\"\n");
    err_at(&text, "name = \"\"", "general.name", "1 to 64");
    let text = with("[general]\nname = \"a\\u0007b\"\n");
    err_at(&text, "name = \"a", "general.name", "control characters");
    let text = with("[general]\ndrain_secs = 90000\n");
    err_at(
        &text,
        "drain_secs",
        "general.drain_secs",
        "must be from 0 to 86400 seconds",
    );
    assert_eq!(ok(BASE).general.drain, std::time::Duration::ZERO);
    let c = ok(&with("[general]\ndrain_secs = 600\n"));
    assert_eq!(c.general.drain, std::time::Duration::from_secs(600));
}

#[test]
fn unreadable_file_is_line_zero() {
    let dir = Dir::new();
    let path = dir.0.join("absent.toml");
    let e = load(&path).expect_err("no such file");
    assert_eq!((e.line, e.column, e.field.as_str()), (0, 0, "(file)"));
    assert!(e
        .to_string()
        .starts_with(&format!("{}:0:0: (file): ", path.display())));
}

// ---------------------------------------------------------------- accepted forms and defaults

#[test]
fn load_reads_file_and_resolves_relative_paths() {
    let dir = Dir::new();
    let text = with(&format!(
        "{TLS}cert = \"certs/sbc.pem\"\nkey = \"./certs/sbc.key\"\n"
    ));
    std::fs::write(dir.origin(), &text).expect("write config");
    let c = load(&dir.origin()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.listen[1].cert, Some(dir.0.join("certs/sbc.pem")));
    assert!(c.listen[1].key.as_deref().is_some_and(Path::is_absolute));
    assert!(c.listen[1].key.as_deref().is_some_and(Path::is_file));
    assert_eq!(c.source, dir.origin());
}

#[test]
fn relative_origin_gives_absolute_source() {
    let c = parse(BASE, Path::new("sbc.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.source.is_absolute());
}

#[test]
fn defaults_fill_in() {
    let c = ok(&with(
        "[[pool]]\nname = \"second\"\n[[pool.node]]\nname = \"n\"\naddress = \"localhost\"\ntransport = \"tls\"\n\
         [[trunk]]\nname = \"t\"\nsources = [\"192.0.2.1\", \"2001:db8::1\"]\naddress = \"192.0.2.1\"\n\
         [limits]\nmax_connections = 100\n[timers]\nt1_ms = 5000\n",
    ));
    assert_eq!(c.general, sbc_config::General::default());
    assert_eq!(c.limits.max_connections_per_source, 100);
    assert_eq!(c.timers.t2.as_millis(), 5000);
    assert_eq!(c.phones.pool, "pbx");
    assert_eq!(c.phones.sources, sbc_config::Phones::default().sources);
    assert!(c.phones.domains.is_empty());
    assert_eq!(c.trunks[0].pool, "pbx");
    assert_eq!(c.trunks[0].address.port(), 5060);
    assert_eq!(c.trunks[0].sources[1].to_string(), "2001:db8::1/128");
    let node = &c.pools[1].nodes[0];
    assert_eq!(node.address.port(), 5061);
    assert_eq!(node.address_text, "localhost");
    assert_eq!(node.tls_server_name.as_deref(), Some("localhost"));
    assert_eq!(c.admin, sbc_config::Admin::default());
}

#[test]
fn accepts_dotted_keys_case_and_port_zero() {
    let text = format!(
        "general.name = \"edge\"\n{}",
        BASE.replace("\"udp\"", "\"UDP\"").replace("5060", "0")
    );
    let text = format!("{text}[[listen]]\ntransport = \"udp\"\naddr = \"127.0.0.1:0\"\n");
    let c = ok(&text);
    assert_eq!(c.general.name, "edge");
    assert_eq!(c.listen.len(), 2);
    assert_eq!(c.listen[0].addr.port(), 0);
}

// ---------------------------------------------------------------- media

#[test]
fn media_defaults_follow_the_sip_listener() {
    let c = ok(BASE);
    assert!(c.media.enabled);
    let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert_eq!((c.media.public.address, c.media.public.advertise), (lo, lo));
    assert_eq!(c.media.internal.address, lo);
    assert_eq!((c.media.port_min, c.media.port_max), (30000, 39999));
    assert_eq!(c.media.timeout, std::time::Duration::from_secs(60));
}

#[test]
fn media_wildcard_listener_lends_its_advertised_address() {
    let text = BASE.replace(
        "addr = \"127.0.0.1:5060\"",
        "addr = \"0.0.0.0:5060\"\nadvertise = \"192.0.2.7\"",
    );
    let c = ok(&text);
    assert!(c.media.public.address.is_unspecified());
    assert_eq!(
        c.media.public.advertise,
        "192.0.2.7".parse::<std::net::IpAddr>().unwrap()
    );
}

#[test]
fn media_io_interface_is_chosen_or_named_wrong() {
    use sbc_config::MediaIo;
    assert_eq!(ok(BASE).media.io, MediaIo::Uring);
    assert_eq!(
        ok(&with("[media]\nio = \"epoll\"\n")).media.io,
        MediaIo::Epoll
    );
    assert_eq!(
        ok(&with("[media]\nio = \"io_uring\"\n")).media.io,
        MediaIo::Uring
    );
    err_at(
        &with("[media]\nio = \"poll\"\n"),
        "io = \"poll\"",
        "media.io",
        "expected \"uring\" or \"epoll\"",
    );
}

#[test]
fn media_sides_and_ranges_are_checked() {
    let c = ok(&with(
        "[media]\nport_min = 40000\nport_max = 40001\n[media.public]\naddress = \"::1\"\nadvertise = \"[2001:db8::5]\"\n",
    ));
    assert_eq!(
        c.media.public.advertise,
        "2001:db8::5".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!((c.media.port_min, c.media.port_max), (40000, 40001));
    err_at(
        &with("[media]\nport_min = 30001\n"),
        "port_min = 30001",
        "media.port_min",
        "must be even",
    );
    err_at(
        &with("[media]\nport_min = 30000\nport_max = 30000\n"),
        "port_max = 30000",
        "media.port_max",
        "at least one RTP/RTCP pair",
    );
    err_at(
        &with("[media.internal]\naddress = \"pbx.example\"\n"),
        "address = \"pbx.example\"",
        "media.internal.address",
        "not an IP address",
    );
    err_at(
        &with("[media]\ntimeout_secs = 0\n"),
        "timeout_secs = 0",
        "media.timeout_secs",
        "must be from 1",
    );
    err_at(
        &with("[media.public]\naddress = \"0.0.0.0\"\n"),
        "[media.public]",
        "media.public.advertise",
        "wildcard",
    );
    let off = ok(&with("[media]\nenabled = false\n"));
    assert!(!off.media.enabled);
}
