//! Runs the `wrk` load generator and reads its report.

use std::{
    io::{self, Read},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// How long past its `-d` a `wrk` run may take before it is killed.
const OVERRUN: Duration = Duration::from_secs(30);

/// What one `wrk --latency` run reports.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WrkReport {
    /// `Requests/sec`.
    pub req_s: f64,
    /// Requests completed (`N requests in …`).
    pub requests: u64,
    /// Latency percentiles of the distribution, milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, milliseconds.
    pub p90_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// `Socket errors:` connect + read + write + timeout.
    pub socket_errors: u64,
    /// `Non-2xx or 3xx responses`.
    pub non_2xx: u64,
}

/// How `wrk` is run: `wrk -tT -cC -dDs --latency URL`.
#[derive(Debug, Clone, Copy)]
pub struct WrkLoad {
    /// Threads (`-t`).
    pub threads: u32,
    /// Connections (`-c`).
    pub connections: u32,
    /// Duration (`-d`), whole seconds.
    pub duration: Duration,
}

impl WrkLoad {
    /// The command line, for reports.
    pub fn describe(&self) -> String {
        format!(
            "wrk -t{} -c{} -d{}s --latency",
            self.threads,
            self.connections,
            self.duration.as_secs()
        )
    }
}

/// Runs `wrk` at `url` and parses its report. The run is killed if it
/// takes 30 s longer than asked.
pub fn run(wrk: &Path, load: WrkLoad, url: &str) -> io::Result<WrkReport> {
    let mut child = Command::new(wrk)
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.duration.as_secs().max(1)))
        .arg("--latency")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("wrk has no stdout"))?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + load.duration + OVERRUN;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "wrk did not finish in time",
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = reader
        .join()
        .map_err(|_| io::Error::other("wrk's reader panicked"))?;
    if !status.success() {
        return Err(io::Error::other(format!("wrk failed ({status}): {text}")));
    }
    parse(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected wrk output: {text}"),
        )
    })
}

/// Reads a `wrk --latency` report; `None` without `Requests/sec` or the
/// latency distribution.
pub fn parse(text: &str) -> Option<WrkReport> {
    let mut report = WrkReport::default();
    let (mut rate, mut p50, mut p90, mut p99) = (false, false, false, false);
    for line in text.lines() {
        let line = line.trim();
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        match first {
            "Requests/sec:" => {
                report.req_s = words.next()?.parse().ok()?;
                rate = true;
            }
            "50%" | "90%" | "99%" => {
                let ms = duration_ms(words.next()?)?;
                match first {
                    "50%" => (report.p50_ms, p50) = (ms, true),
                    "90%" => (report.p90_ms, p90) = (ms, true),
                    _ => (report.p99_ms, p99) = (ms, true),
                }
            }
            "Socket" => {
                // Socket errors: connect 0, read 0, write 0, timeout 0
                report.socket_errors = line
                    .split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum();
            }
            "Non-2xx" => {
                report.non_2xx = line.rsplit(' ').next()?.parse().ok()?;
            }
            _ if line.contains(" requests in ") => {
                report.requests = first.parse().ok()?;
            }
            _ => {}
        }
    }
    (rate && p50 && p90 && p99).then_some(report)
}

/// A `wrk` duration (`812.00us`, `1.23ms`, `2.00s`, `1.50m`) in milliseconds.
pub fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(number * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 10s test @ http://127.0.0.1:8080/fast
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  456.78us  12.34ms   89.01%
    Req/Sec    25.12k     1.23k   28.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.40ms
     90%    1.80ms
     99%    2.00s
  500000 requests in 10.00s, 60.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:  50000.50
Transfer/sec:      6.00MB
";

    #[test]
    fn reads_a_report() {
        let report = parse(REPORT).unwrap();
        assert_eq!(report.req_s, 50000.5);
        assert_eq!(report.requests, 500_000);
        assert!((report.p50_ms - 0.812).abs() < 1e-9);
        assert_eq!(report.p90_ms, 1.8);
        assert_eq!(report.p99_ms, 2000.0);
        assert_eq!(report.socket_errors, 15);
        assert_eq!(report.non_2xx, 5);
        assert!(parse("Requests/sec: 5").is_none());
    }

    #[test]
    fn reads_durations() {
        assert_eq!(duration_ms("1.50m"), Some(90_000.0));
        assert_eq!(duration_ms("3ms"), Some(3.0));
        assert_eq!(duration_ms("3"), None);
        assert_eq!(duration_ms("3ns"), None);
    }
}
