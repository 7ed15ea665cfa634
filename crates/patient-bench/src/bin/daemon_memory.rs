//! The daemon's memory: the resident set of a `patient serve` process with
//! 100,000 tasks queued, and with 10,000 requests in flight against an
//! upstream that answers after one second.
//!
//! ```text
//! cargo build --release -p patient -p patient-bench
//! ulimit -n 20000; target/release/daemon_memory [-- --queued 100000 --in-flight 10000 --delay-ms 1000]
//! ```
//!
//! The daemon is the release `patient` binary beside this one, started on
//! a fresh data directory (SQLite) for each phase, so its figures are its
//! own: `VmRSS` and `VmHWM` of `/proc/PID/status`. The upstream runs in a
//! child process of its own (10,000 connections fit on both ends).
//!
//! * queued: N tasks submitted in batches of 1,000 with `delay` 3600 (none
//!   runs), then the resident set once the last submit is answered.
//! * in flight: `max_in_flight` = M and M tasks to `/delay?ms=D`, all due
//!   together five seconds after their submit; the
//!   resident set is sampled every 20 ms until every task has finished;
//!   prints the peak, the most tasks seen in flight at once
//!   (`patient_tasks_in_flight`) and how long the M tasks took.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use patient_bench::{
    args::number_flag as flag,
    report::Line,
    rss::{status_kib, warn_if_fewer_files_than},
    upstream::{run_upstream_child, UpstreamProcess, UPSTREAM_CHILD_FLAG},
};

const BENCH: &str = "daemon_memory";
const USAGE: &str =
    "usage: daemon_memory [--queued N] [--in-flight M] [--delay-ms D] [--timeout-s T]

The resident set of `patient serve` (the release binary beside this one)
with N tasks queued (default 100000), then with M requests in flight
(default 10000) against an upstream that answers after D ms (default 1000).
Each phase stops after T seconds (default 300).";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The in-flight phase's tasks start this long after their submit, so that
/// all of them are due together once the last one is in.
const START_DELAY_S: u64 = 5;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == UPSTREAM_CHILD_FLAG) {
        return run_upstream_child();
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let parsed = (|| -> Result<_, String> {
        Ok((
            flag(&args, "--queued", 100_000)?,
            flag(&args, "--in-flight", 10_000)?.max(1),
            flag(&args, "--delay-ms", 1000)?,
            flag(&args, "--timeout-s", 300)?,
        ))
    })();
    let (queued, in_flight, delay_ms, timeout_s) = match parsed {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{BENCH}: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    warn_if_fewer_files_than(in_flight + 1000);
    let run = (|| -> Result<(), BoxError> {
        let exe = std::env::current_exe()?;
        let patient = exe.with_file_name("patient");
        if !patient.exists() {
            return Err(format!(
                "{} is missing: build it with `cargo build --release -p patient`",
                patient.display()
            )
            .into());
        }
        let upstream = UpstreamProcess::spawn(&exe)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let timeout = Duration::from_secs(timeout_s);
        runtime.block_on(async {
            tokio::time::timeout(timeout, queued_phase(&patient, queued))
                .await
                .map_err(|_| format!("the queued phase did not end in {timeout:?}"))?
        })?;
        let url = format!("{}/delay?ms={delay_ms}", upstream.base_url());
        runtime.block_on(async {
            tokio::time::timeout(timeout, in_flight_phase(&patient, &url, in_flight))
                .await
                .map_err(|_| format!("the in-flight phase did not end in {timeout:?}"))?
        })?;
        drop(upstream);
        Ok(())
    })();
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{BENCH}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A `patient serve` child on a fresh data directory, killed and its
/// directory removed on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Daemon {
    fn start(patient: &Path, label: &str, env: &[(&str, String)]) -> Result<Daemon, BoxError> {
        let dir = std::env::temp_dir().join(format!(
            "patient-bench-memory-{label}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut command = Command::new(patient);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env("PATIENT_EGRESS__ALLOW", "127.0.0.1")
            .env("PATIENT_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("patient: listening on http://") {
                        break addr.parse()?;
                    }
                }
                _ => {
                    let _ = child.kill();
                    return Err("patient serve exited before listening".into());
                }
            }
        };
        // Keep reading stderr so that the daemon never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Ok(Daemon { child, addr, dir })
    }

    /// (VmRSS, VmHWM) in MiB.
    fn rss_mb(&self) -> Option<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let mb = |field| status_kib(&status, field).map(|kib| kib as f64 / 1024.0);
        Some((mb("VmRSS:")?, mb("VmHWM:")?))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn call(
    client: &HttpClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, Bytes), BoxError> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

async fn submit_batches(
    client: &HttpClient,
    addr: SocketAddr,
    n: u64,
    task: impl Fn(u64) -> serde_json::Value,
) -> Result<(), BoxError> {
    const BATCH: u64 = 1000;
    let mut next = 0;
    while next < n {
        let end = (next + BATCH).min(n);
        let tasks: Vec<_> = (next..end).map(&task).collect();
        let body = serde_json::json!({ "tasks": tasks }).to_string();
        let (status, answer) = call(client, addr, "POST", "/v1/tasks/batch", Some(body)).await?;
        if status != 201 {
            return Err(format!(
                "batch answered {status}: {}",
                String::from_utf8_lossy(&answer)
            )
            .into());
        }
        next = end;
    }
    Ok(())
}

/// One figure of the daemon's `/metrics` text, summed over its labels.
async fn metric(client: &HttpClient, addr: SocketAddr, name: &str) -> Result<f64, BoxError> {
    let (_, text) = call(client, addr, "GET", "/metrics", None).await?;
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

async fn queued_phase(patient: &Path, n: u64) -> Result<(), BoxError> {
    let daemon = Daemon::start(patient, "queued", &[])?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let idle = daemon
        .rss_mb()
        .ok_or("cannot read the daemon's /proc status")?;
    let started = Instant::now();
    submit_batches(&client, daemon.addr, n, |i| {
        serde_json::json!({
            "request": {"http_method": "post", "url": "http://127.0.0.1:9/v1/chat",
                        "headers": {"content-type": "application/json"},
                        "body": {"encoding": "text", "value": format!("{{\"n\":{i}}}"), "charset": "UTF-8"},
                        "timeout": 60},
            "callback": "Bench",
            "callback_args": {"i": i},
            "delay": 3600,
        })
    })
    .await?;
    let took = started.elapsed().as_secs_f64();
    // Let the allocator settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, hwm) = daemon
        .rss_mb()
        .ok_or("cannot read the daemon's /proc status")?;
    println!(
        "{}",
        Line::new(BENCH)
            .text("phase", "queued")
            .text("tasks", n)
            .fixed("submit_s", took, 2)
            .fixed("idle_rss_mb", idle.0, 1)
            .fixed("rss_mb", rss, 1)
            .fixed("peak_rss_mb", hwm, 1)
    );
    Ok(())
}

async fn in_flight_phase(patient: &Path, url: &str, m: u64) -> Result<(), BoxError> {
    let daemon = Daemon::start(
        patient,
        "in-flight",
        &[("PATIENT_MAX_IN_FLIGHT", m.to_string())],
    )?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    submit_batches(&client, daemon.addr, m, |i| {
        // All due at once, after the last submit: M in flight together.
        serde_json::json!({
            "request": {"http_method": "get", "url": url, "timeout": 60},
            "callback": "Bench",
            "callback_args": {"i": i},
            "delay": START_DELAY_S,
        })
    })
    .await?;
    let mut peak_rss: f64 = 0.0;
    let mut most_in_flight: f64 = 0.0;
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    loop {
        if let Some((rss, _)) = daemon.rss_mb() {
            peak_rss = peak_rss.max(rss);
        }
        if last_sample.elapsed() >= Duration::from_millis(100) {
            last_sample = Instant::now();
            most_in_flight =
                most_in_flight.max(metric(&client, daemon.addr, "patient_tasks_in_flight").await?);
            let done = metric(&client, daemon.addr, "patient_outcomes_total").await?;
            if done >= m as f64 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let failed = {
        let (_, text) = call(&client, daemon.addr, "GET", "/metrics", None).await?;
        String::from_utf8_lossy(&text)
            .lines()
            .find(|l| l.starts_with("patient_outcomes_total{type=\"failed\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (_, hwm) = daemon
        .rss_mb()
        .ok_or("cannot read the daemon's /proc status")?;
    println!(
        "{}",
        Line::new(BENCH)
            .text("phase", "in_flight")
            .text("tasks", m)
            .round("most_in_flight", most_in_flight)
            .fixed("all_done_s", took, 2)
            .text("failed", failed)
            .fixed("peak_rss_sampled_mb", peak_rss, 1)
            .fixed("peak_rss_mb", hwm, 1)
    );
    Ok(())
}
