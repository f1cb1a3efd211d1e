//! Process-wide memory policy.
//!
//! An SBC runs for months and its operator sizes the machine by its resident memory, so RSS
//! must follow the work, not the kernel's background housekeeping. mimalloc asks for
//! transparent huge pages on its arena (`MADV_HUGEPAGE`), and with the kernel's default
//! `khugepaged/max_ptes_none` of 511 khugepaged collapses any 2 MiB range with a single
//! page in use into a whole resident huge page. It works through a 1 GiB arena at its default
//! pace (4,096 pages every 10 s) in about 11 minutes: in three one-hour soaks RSS stepped up by
//! 15-30 MB at minute 10-13 with no table growing (benchmarks/README.md, "Scale and soak").

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), so resident
/// memory is the pages the SBC touched. The flag covers mappings made before the call too,
/// and khugepaged skips the process. Returns whether the kernel accepted it; a kernel that
/// refuses only costs that predictability, so callers log and go on.
pub fn disable_transparent_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and only sets a flag on
        // this process's memory descriptor; no memory is passed to the kernel.
        let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Whether transparent huge pages are off for this process (`PR_GET_THP_DISABLE`).
pub fn transparent_huge_pages_disabled() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_GET_THP_DISABLE takes no pointers; it returns the flag.
        let r = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        r == 1
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_off_after_the_call() {
        // The test binary is its own process; turning THP off here changes nothing else.
        assert!(disable_transparent_huge_pages());
        assert!(transparent_huge_pages_disabled());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        // Linux 6.x reports the flag as "THP_enabled: 0" (older kernels have no line).
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
        }
    }
}
