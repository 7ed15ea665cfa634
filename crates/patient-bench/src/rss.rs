//! Memory and descriptor figures of the current process, read from `/proc`.

use std::fs;

/// Peak resident set size (`VmHWM` in `/proc/self/status`) in MiB; `None`
/// where `/proc` is not available.
pub fn peak_rss_mb() -> Option<f64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status_kib(&status, "VmHWM:").map(|kib| kib as f64 / 1024.0)
}

/// The value in kB of the `field` line (e.g. `"VmHWM:"`) of a
/// `/proc/PID/status` text.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The soft limit on open files (`Max open files` in `/proc/self/limits`).
pub fn open_files_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Warns on stderr when this process may open fewer than `needed` files.
/// The limit cannot be raised without `unsafe` code; run under
/// `ulimit -n 20000` instead.
pub fn warn_if_fewer_files_than(needed: u64) {
    if let Some(limit) = open_files_limit() {
        if limit < needed {
            eprintln!(
                "warning: the open-files limit is {limit}, this run needs about {needed}: \
                 run it under `ulimit -n 20000`"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_fields() {
        let status = "Name:\tx\nVmHWM:\t   20480 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(peak_rss_mb().is_some_and(|mb| mb > 0.0));
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
