//! Config loading: whatever the file says, the loader answers with a configuration that keeps
//! its promises or an error an operator can act on.
//!
//! Invariants, for any text:
//! - `sbc_config::parse` returns (never panics);
//! - an error points into the file (line >= 1, column >= 1, the line exists) and names a
//!   field, and its message is one line: it is printed as `file:line:column: field: message`;
//! - a success holds what the types promise: at least one listener and one pool, every pool
//!   with a node, the phones' and trunks' pools existing, limits within their documented
//!   ranges, scanner patterns lower-case and non-empty.
//!
//! Node and trunk addresses may be host names, which the loader resolves. So that fuzzing
//! never sends DNS queries, the target moves itself into an empty network namespace at start
//! (as root, or through a user namespace); if neither is allowed it says so and goes on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fn isolate_from_network() {
    // SAFETY: unshare(2) only changes this process's namespaces; libFuzzer has not started
    // any thread yet when `init` runs.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNET) == 0
            || libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) == 0
    };
    if !ok {
        eprintln!(
            "config fuzz target: cannot enter an empty network namespace; host names in fuzzed \
             files will be looked up with the system resolver"
        );
    }
}

fuzz_target!(
    init: isolate_from_network(),
    |data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        let origin = Path::new("/nonexistent-sbc-fuzz/sbc.toml");
        match sbc_config::parse(&text, origin) {
            Err(e) => {
                let lines = text.split('\n').count();
                assert!(e.line >= 1 && e.line <= lines, "line {} of {lines}: {e}", e.line);
                assert!(e.column >= 1, "{e}");
                assert!(!e.field.is_empty(), "no field: {e}");
                assert!(!e.message.trim().is_empty(), "no message: {e}");
                assert!(!e.message.contains('\n'), "multi-line message: {e:?}");
                assert_eq!(e.file, origin);
            }
            Ok(c) => {
                assert!(!c.listen.is_empty());
                assert!(!c.pools.is_empty());
                assert!(c.pools.iter().all(|p| !p.nodes.is_empty()));
                assert!(c.pool(&c.phones.pool).is_some(), "phones.pool {}", c.phones.pool);
                for t in &c.trunks {
                    assert!(c.pool(&t.pool).is_some(), "trunk pool {}", t.pool);
                    assert!(!t.sources.is_empty());
                }
                let l = &c.limits;
                assert!((1024..=1_048_576).contains(&l.max_message_size));
                assert!((8..=1024).contains(&l.max_headers));
                assert!((2..=256).contains(&l.max_via));
                assert!(l.max_connections_per_source <= l.max_connections);
                assert!(l.max_transactions_per_source >= 1);
                assert!(c.timers.t2 >= c.timers.t1);
                assert!(c.media.port_min < c.media.port_max && c.media.port_min % 2 == 0);
                let r = &c.ratelimit;
                assert!(r.register.per_second >= 1 && r.invite.burst >= 1);
                assert!(r.max_sources >= 1024);
                assert!(r
                    .scanner_agents
                    .iter()
                    .all(|a| !a.is_empty() && *a == a.to_ascii_lowercase()));
            }
        }
    }
);
