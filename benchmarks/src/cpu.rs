//! CPU accounting of the system under test and of the generator itself.
//!
//! The figure that compares proxies fairly is CPU time per completed call, not peak rate
//! (which on a 2-core machine mostly measures who got scheduled). utime+stime from
//! /proc/PID/stat covers every thread of a process, so one pid suffices for the SBC; Kamailio
//! forks worker processes, hence several pids (or [`pids_by_name`]).

use std::fs;

/// Clock ticks per second, the unit of /proc/PID/stat times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime+stime of a process in clock ticks; `None` when it does not exist (any more) or the
/// file does not look as expected.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&s)
}

/// Parses utime (field 14) + stime (field 15) of a /proc/PID/stat line. The command name
/// (field 2) is in parentheses and may itself contain spaces and ')', so fields are counted
/// from the last ')'.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3 (state): utime is the 12th token, stime the 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Pids whose /proc/PID/comm equals `name` (e.g. every kamailio process), sorted.
pub fn pids_by_name(name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) {
            if comm.trim_end() == name {
                out.push(pid);
            }
        }
    }
    out.sort_unstable();
    out
}

/// CPU seconds (user+system) this process has used so far, all threads.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU use of one watched process over a run.
#[derive(Clone, Debug)]
pub struct PidCpu {
    pub pid: u32,
    /// `None` when the process could not be read at the start or the end.
    pub cpu_seconds: Option<f64>,
}

/// Snapshot taken at the start of a run; [`CpuWatch::finish`] turns it into per-pid figures.
pub struct CpuWatch {
    start: Vec<(u32, Option<u64>)>,
    tck: f64,
}

impl CpuWatch {
    pub fn start(pids: &[u32]) -> CpuWatch {
        CpuWatch {
            start: pids.iter().map(|&p| (p, process_ticks(p))).collect(),
            tck: clock_ticks_per_second() as f64,
        }
    }

    pub fn finish(&self) -> Vec<PidCpu> {
        self.start
            .iter()
            .map(|&(pid, before)| {
                let after = process_ticks(pid);
                let cpu_seconds = match (before, after) {
                    (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / self.tck),
                    _ => None,
                };
                PidCpu { pid, cpu_seconds }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_odd_comm() {
        let s = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15 16 17";
        assert_eq!(parse_stat_ticks(s), Some(333));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_readable() {
        assert!(process_ticks(std::process::id()).is_some());
        assert!(clock_ticks_per_second() > 0);
    }
}
