//! Process-wide resource limits.
//!
//! Every RTP/RTCP socket and every TCP/TLS connection is a descriptor. Login shells and
//! container runtimes commonly start a process with a soft `RLIMIT_NOFILE` of 1,024 and a
//! far higher hard limit: the soft limit is a compatibility default for `select(2)` users,
//! which the SBC is not. Left there, the relay runs out of descriptors after a few hundred
//! calls and answers new calls 503 with most of its port range free.

use std::io;

/// Raises the soft descriptor limit to the hard one. Returns the soft limit before and after.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = rl.rlim_cur;
    if rl.rlim_cur < rl.rlim_max {
        rl.rlim_cur = rl.rlim_max;
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, rl.rlim_cur))
}

/// Descriptors to keep beyond the media relay's: listeners, probes, the admin endpoint and
/// TCP/TLS phones' connections.
pub const SIGNALLING_HEADROOM: u64 = 4_096;

/// The descriptors the SBC may need with this configuration: every media port pair in use
/// (see `RelayConfig::max_descriptors`) plus [`SIGNALLING_HEADROOM`].
pub fn descriptors_needed(cfg: &sbc_config::Config) -> u64 {
    let media = if cfg.media.enabled {
        crate::media::relay_config(&cfg.media).max_descriptors()
    } else {
        0
    };
    media + SIGNALLING_HEADROOM
}
