//! The gateway against nginx: `patient serve` with one proxy route and
//! nginx as a reverse proxy with keep-alive to the same upstream, measured
//! in the same run, one after the other, with a direct run against the
//! upstream as the floor.
//!
//! ```text
//! eval "$(scripts/services.sh bench-tools)"   # Debian's nginx and wrk
//! cargo build --release -p patient -p patient-testkit -p patient-bench \
//!     --bin patient --bin patient-upstream --bin gateway
//! target/release/gateway [--duration-s 10] [--connections 64] [--rounds 3] [--only fast,64k,sse,streams]
//! ```
//!
//! Four servers, each a process of its own on a free loopback port: the
//! test kit's `patient-upstream`, `patient serve` (both release binaries
//! beside this one) on a fresh data directory with a route `bench` at
//! `/up/` (prefix stripped, no response cap, the default retries), a bare
//! hyper reverse proxy (this program as `--bare-proxy-child`, see
//! `patient_bench::bare_proxy`: the floor of the gateway's own stack), and
//! nginx (`PATIENT_BENCH_NGINX`, else `nginx` on `PATH`) with a generated
//! config: one worker per core, `access_log off`, an `upstream` block with
//! `keepalive 128`, HTTP/1.1 and `Connection ""` upstream, nginx's default
//! buffering at `/up/` and `proxy_buffering off` at `/sse/`. All three are
//! stopped at the end, on an error too.
//!
//! * `fast` and `64k`: `wrk -t2 -c64 -d10s --latency` (`PATIENT_BENCH_WRK`,
//!   else `wrk` on `PATH`) on `/up/fast` and `/up/bytes?n=65536`: the
//!   upstream directly, then the three proxies, the order reversed every
//!   other round. Each run's line has the requests/s, p50/p90/p99, the
//!   CPU the proxy (nginx: master and workers) and the upstream used; each
//!   round's line the ratios patient ÷ nginx, patient ÷ hyper and
//!   hyper ÷ nginx measured in that round; the
//!   last line the medians over the rounds and the verdict. Targets: `fast`
//!   ≥ 1.2× nginx's requests/s, `64k` ≥ 1.0×, p99 no worse than nginx's.
//! * `sse`: OpenAI-style streams (`"stream": true`, `?interval_ms=20`,
//!   about 50 events) read by a hyper client, in sets of seven started at
//!   the same instant on connections opened beforehand: the upstream
//!   directly (A), through the gateway, the upstream directly again (B),
//!   through nginx, through each proxy behind the tap, and through the
//!   tap alone. Each event's arrival is timed from its request's start;
//!   the lines give the mean, p50, p90 and p99 of (through − A) paired by
//!   event index over every set, and of (B − A), the measurement's own
//!   noise: the upstream sleeps between events one after the other, so two
//!   of its streams drift apart by whole milliseconds now and then. The
//!   tap is a relay in this process between a proxy and the upstream that
//!   notes when it hands each event on to the proxy (for the gateway a
//!   second `patient serve` whose route points at the tap, for nginx its
//!   `/tap/`): arrival at the client minus that instant is the event's
//!   time in the proxy, free of the upstream's drift; the tap alone gives
//!   that figure's floor (one loopback hop and the client's wake-up).
//!   Target: the gateway adds ≤ 1 ms per event (the mean of through − A;
//!   the mean and p99 from the tap).
//! * `streams`: 1,000 streams (`?interval_ms=200`, 110+ events, about 23 s
//!   each) held open at once through the gateway, then through nginx: the
//!   proxy's resident set (`VmRSS`, nginx's processes summed) before, at
//!   its peak and per stream, and whether every stream got every event.
//!
//! A missed target does not change the exit status; a failed run does.

use std::{
    collections::{BTreeSet, HashMap},
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    str::FromStr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use patient_bench::{
    args::Args,
    bare_proxy::{run_bare_proxy_child, BARE_PROXY_CHILD_FLAG},
    external::{
        cpu_ticks_of, find_program, free_port, raise_open_files_limit, rss_kib_of, sibling_program,
        wait_for_port, watch_lines, with_children, Process, TempDir,
    },
    report::{push_ratio, ratio, Line},
    stats::median,
    upstream::UpstreamProcess,
    wrk::{self, WrkLoad, WrkReport},
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BENCH: &str = "gateway";
const USAGE: &str = "usage: gateway [--duration-s S] [--connections C] [--threads T] [--rounds R]
               [--only fast,64k,sse,streams] [--sse-sets N] [--streams N]
               [--stream-interval-ms M] [--timeout-s T]

The gateway (`patient serve`, release binary beside this one) against nginx
(PATIENT_BENCH_NGINX or nginx on PATH) as reverse proxies to the test
upstream (patient-upstream beside this one), with a direct run as the floor:

  fast     wrk -tT -cC -dS --latency on /up/fast (T 2, C 64, S 10), R rounds (3)
  64k      the same on /up/bytes?n=65536
  sse      N sets (40) of seven OpenAI-style streams at once (direct, gateway,
           direct, nginx, each proxy behind a relay that timestamps the
           events, the relay alone): the added latency per event
  streams  N streams (1000) through each proxy held open at once, an event
           every M ms (200): the proxy's resident set

wrk is PATIENT_BENCH_WRK or wrk on PATH. The program stops after T seconds
(default 1800).";

/// The open-files limit this program asks for (children inherit it).
const OPEN_FILES: u64 = 20_000;

/// Connections the upstream keeps idle for nginx (per worker).
const NGINX_KEEPALIVE: u32 = 128;

/// How long each server has to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A warm-up run before a scenario's first round, per target.
const WARMUP: Duration = Duration::from_secs(2);

/// Words of the SSE scenario's message: the reply is `echo:` and these,
/// one event each, plus the role, finish and `[DONE]` events.
const SSE_WORDS: usize = 48;

/// Milliseconds between the SSE scenario's events.
const SSE_INTERVAL_MS: u64 = 20;

/// Sets of the SSE scenario run first and not counted.
const SSE_WARMUP_SETS: usize = 3;

/// Words of the tap's messages start with it and a number (`zq12x3`), so
/// that the tap and the client can tell the events apart.
const TAP_MARK: &[u8] = b"zq";

/// Words of the streams scenario's message.
const STREAM_WORDS: usize = 110;

/// Streams being opened at once in the streams scenario (the rest wait).
const OPENING_AT_ONCE: usize = 64;

/// How often the proxy's resident set is read while streams are open.
const RSS_SAMPLE: Duration = Duration::from_millis(50);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The measurements `--only` picks from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Fast,
    Body64k,
    Sse,
    Streams,
}

impl Scenario {
    const ALL: [Scenario; 4] = [
        Scenario::Fast,
        Scenario::Body64k,
        Scenario::Sse,
        Scenario::Streams,
    ];
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scenario::Fast => "fast",
            Scenario::Body64k => "64k",
            Scenario::Sse => "sse",
            Scenario::Streams => "streams",
        })
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Scenario, String> {
        Scenario::ALL
            .into_iter()
            .find(|scenario| scenario.to_string() == s)
            .ok_or_else(|| format!("unknown scenario {s:?} (fast, 64k, sse, streams)"))
    }
}

/// Where a measured request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Direct,
    Patient,
    Nginx,
    /// The bare hyper reverse proxy.
    Hyper,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Direct => "direct",
            Side::Patient => "patient",
            Side::Nginx => "nginx",
            Side::Hyper => "hyper",
        })
    }
}

/// The options of a run.
#[derive(Debug, Clone)]
struct Options {
    load: WrkLoad,
    rounds: u32,
    only: BTreeSet<Scenario>,
    sse_sets: usize,
    streams: usize,
    stream_interval_ms: u64,
    deadline: Instant,
}

fn main() -> ExitCode {
    let mut raw = std::env::args().skip(1);
    if raw.next().as_deref() == Some(BARE_PROXY_CHILD_FLAG) {
        let upstream = raw.next().and_then(|a| a.parse::<SocketAddr>().ok());
        let Some(upstream) = upstream else {
            eprintln!("{BENCH}: {BARE_PROXY_CHILD_FLAG} wants the upstream's address");
            return ExitCode::from(2);
        };
        return match run_bare_proxy_child(upstream) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{BENCH}: the bare proxy: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match Args::parse(
        std::env::args().skip(1),
        &[
            "--duration-s",
            "--connections",
            "--threads",
            "--sse-sets",
            "--streams",
            "--stream-interval-ms",
        ],
        &[],
    ) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{BENCH}: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.has("--help") || args.has("-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let options = match options(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{BENCH}: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{BENCH}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn options(args: &Args) -> Result<Options, BoxError> {
    let only = match args.value("--only") {
        None => Scenario::ALL.into_iter().collect(),
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse::<Scenario>())
            .collect::<Result<BTreeSet<_>, _>>()?,
    };
    Ok(Options {
        load: WrkLoad {
            threads: args.get("--threads", 2u32)?.max(1),
            connections: args.get("--connections", 64u32)?.max(1),
            duration: Duration::from_secs(args.get("--duration-s", 10u64)?.max(1)),
        },
        rounds: args.get("--rounds", 3u32)?.max(1),
        only,
        sse_sets: args.get("--sse-sets", 40usize)?.max(1),
        streams: args.get("--streams", 1000usize)?.max(1),
        stream_interval_ms: args.get("--stream-interval-ms", 200u64)?.max(1),
        deadline: Instant::now() + Duration::from_secs(args.get("--timeout-s", 1800u64)?),
    })
}

/// A server the benchmark started: its process and address.
struct Server {
    process: Process,
    addr: SocketAddr,
    /// The processes whose CPU and memory count as the server's.
    pids: Vec<u32>,
}

impl Server {
    fn cpu_ticks(&self) -> u64 {
        cpu_ticks_of(&self.pids)
    }
}

/// Everything a scenario needs: the three servers, the load generator and
/// the client's runtime.
struct Bench {
    options: Options,
    patient_bin: PathBuf,
    dir: PathBuf,
    tap: Tap,
    upstream: UpstreamProcess,
    patient: Server,
    nginx: Option<Server>,
    hyper: Server,
    wrk: Option<PathBuf>,
    runtime: tokio::runtime::Runtime,
    failures: u32,
}

fn run(options: &Options) -> Result<bool, BoxError> {
    let open_files = raise_open_files_limit(OPEN_FILES);
    let patient_bin = sibling_program("patient")?;
    let upstream_bin = sibling_program("patient-upstream")?;
    let nginx_bin = find_program("PATIENT_BENCH_NGINX", &["nginx", "/usr/sbin/nginx"]);
    let wrk = find_program("PATIENT_BENCH_WRK", &["wrk"]);
    let dir = TempDir::new("patient-bench-gateway")?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()?;
    let mut command = Command::new(&upstream_bin);
    command.args(["--listen", "127.0.0.1:0"]);
    let upstream = UpstreamProcess::spawn_command(command)?;
    let tap = runtime.block_on(Tap::start(upstream.addr()))?;
    let patient = start_patient(&patient_bin, &dir.path().join("patient"), upstream.addr())?;
    let hyper = start_bare_proxy(upstream.addr())?;
    let nginx = match &nginx_bin {
        Some(bin) => Some(start_nginx(
            bin,
            dir.path(),
            upstream.addr(),
            tap.addr,
            cores,
        )?),
        None => {
            eprintln!(
                "{BENCH}: nginx not found (PATIENT_BENCH_NGINX, or run scripts/services.sh bench-tools): its runs are skipped"
            );
            None
        }
    };
    if wrk.is_none() {
        eprintln!(
            "{BENCH}: wrk not found (PATIENT_BENCH_WRK, or run scripts/services.sh bench-tools): fast and 64k are skipped"
        );
    }
    let mut bench = Bench {
        options: options.clone(),
        patient_bin,
        dir: dir.path().to_owned(),
        tap,
        upstream,
        patient,
        nginx,
        hyper,
        wrk,
        runtime,
        failures: 0,
    };
    bench.check_routes()?;
    println!(
        "{}",
        Line::new(BENCH)
            .text("setup", "servers")
            .text("upstream", bench.upstream.addr())
            .text("patient", bench.patient.addr)
            .text("hyper", bench.hyper.addr)
            .text("tap", bench.tap.addr)
            .text(
                "nginx",
                bench
                    .nginx
                    .as_ref()
                    .map_or("none".to_owned(), |n| n.addr.to_string())
            )
            .text("nginx_workers", cores)
            .text("cores", cores)
            .text(
                "open_files",
                open_files.map_or("na".into(), |n| n.to_string())
            )
            .text("load_avg", load_average())
    );

    let mut pass = true;
    for scenario in options.only.iter().copied() {
        if Instant::now() >= options.deadline {
            println!(
                "{}",
                Line::new(BENCH)
                    .text("scenario", scenario)
                    .text("error", "out_of_time")
            );
            bench.failures += 1;
            continue;
        }
        pass &= match scenario {
            Scenario::Fast => bench.wrk_scenario(scenario, "/fast", 1.2),
            Scenario::Body64k => bench.wrk_scenario(scenario, "/bytes?n=65536", 1.0),
            Scenario::Sse => bench.sse_scenario(),
            Scenario::Streams => bench.streams_scenario(),
        };
    }
    println!(
        "{}",
        Line::new(BENCH)
            .text("setup", "done")
            .text("targets_met", pass)
            .text("failed_runs", bench.failures)
            .text("load_avg", load_average())
    );
    let ok = bench.failures == 0;
    // Servers stop in this order as `bench` drops: nginx, patient, the
    // upstream; the directory goes last.
    drop(bench);
    drop(dir);
    Ok(ok)
}

/// `/proc/loadavg`'s first three figures, `_`-joined.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_else(|| "na".into())
}

/// Starts `patient serve` with the route `bench` at `/up/` to `upstream`,
/// its config and data in `dir` (created).
fn start_patient(bin: &Path, dir: &Path, upstream: SocketAddr) -> Result<Server, BoxError> {
    let data = dir.join("patient-data");
    std::fs::create_dir_all(&data)?;
    let config = dir.join("patient.toml");
    std::fs::write(
        &config,
        format!(
            "# The gateway benchmark's route: the upstream under /up/, prefix
# stripped, no response cap, retries and every other setting as default.
[[routes]]
name = \"bench\"
path_prefix = \"/up/\"
strip_prefix = true
upstreams = [\"http://{upstream}\"]
max_response_body = 0
"
        ),
    )?;
    let mut command = Command::new(bin);
    command
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(&data)
        .env("PATIENT_SHUTDOWN_TIMEOUT", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut process = Process::spawn("patient serve", command)?;
    let stderr = process
        .child_mut()
        .and_then(|child| child.stderr.take())
        .ok_or("patient serve has no stderr")?;
    listening(process, stderr, "patient: listening on http://")
}

/// The server of `process` once it printed `prefix` and its address on
/// `output`.
fn listening(
    process: Process,
    output: impl io::Read + Send + 'static,
    prefix: &'static str,
) -> Result<Server, BoxError> {
    let addr = watch_lines(output, START_TIMEOUT, move |line| {
        line.strip_prefix(prefix)
            .and_then(|addr| addr.trim().parse::<SocketAddr>().ok())
    })?
    .ok_or_else(|| format!("{} did not print its address", process.name()))?;
    let pid = process.pid();
    Ok(Server {
        process,
        addr,
        pids: vec![pid],
    })
}

/// The nginx config: `workers` workers, keep-alive to `upstream`, nginx's
/// default buffering at `/up/` and none at `/sse/`; `/tap/` as `/sse/` but
/// through the tap.
fn nginx_config(
    root: &Path,
    port: u16,
    upstream: SocketAddr,
    tap: SocketAddr,
    workers: usize,
) -> String {
    let root = root.display();
    format!(
        "# The gateway benchmark's peer: a reverse proxy with keep-alive to the
# same upstream.
worker_processes {workers};
daemon off;
master_process on;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_rlimit_nofile {OPEN_FILES};

events {{
    worker_connections 10000;
}}

http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;

    upstream bench {{
        server {upstream};
        keepalive {NGINX_KEEPALIVE};
    }}

    upstream tap {{
        server {tap};
        keepalive {NGINX_KEEPALIVE};
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;

        location /up/ {{
            proxy_pass http://bench/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}

        location /sse/ {{
            proxy_pass http://bench/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
        }}

        location /tap/ {{
            proxy_pass http://tap/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
        }}
    }}
}}
"
    )
}

/// Starts the bare hyper proxy: this program as `--bare-proxy-child`.
fn start_bare_proxy(upstream: SocketAddr) -> Result<Server, BoxError> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg(BARE_PROXY_CHILD_FLAG)
        .arg(upstream.to_string())
        .stdout(Stdio::piped());
    let mut process = Process::spawn("the bare proxy", command)?;
    let stdout = process
        .child_mut()
        .and_then(|child| child.stdout.take())
        .ok_or("the bare proxy has no stdout")?;
    listening(process, stdout, "listening=")
}

/// Starts nginx in the foreground (`daemon off`) on a free port.
fn start_nginx(
    bin: &Path,
    dir: &Path,
    upstream: SocketAddr,
    tap: SocketAddr,
    workers: usize,
) -> Result<Server, BoxError> {
    let root = dir.join("nginx");
    std::fs::create_dir_all(&root)?;
    let port = free_port()?;
    let config = root.join("nginx.conf");
    std::fs::write(&config, nginx_config(&root, port, upstream, tap, workers))?;
    let mut command = Command::new(bin);
    command
        .arg("-p")
        .arg(&root)
        .arg("-c")
        .arg(&config)
        .arg("-e")
        .arg(root.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut process = Process::spawn("nginx", command)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if !wait_for_port(addr, START_TIMEOUT) || !process.is_running() {
        let log = std::fs::read_to_string(root.join("error.log")).unwrap_or_default();
        return Err(format!("nginx did not start: {log}").into());
    }
    // The workers are forked once the master is up.
    let deadline = Instant::now() + START_TIMEOUT;
    let mut pids = with_children(process.pid());
    while pids.len() < workers + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        pids = with_children(process.pid());
    }
    Ok(Server {
        process,
        addr,
        pids,
    })
}

impl Bench {
    /// The base URL of `side`; the proxies' paths start with the route's
    /// prefix (`/up/`, nginx's `/sse/` for streams).
    fn base(&self, side: Side, streaming: bool) -> Option<String> {
        match side {
            Side::Direct => Some(format!("http://{}", self.upstream.addr())),
            Side::Patient => Some(format!("http://{}/up", self.patient.addr)),
            Side::Hyper => Some(format!("http://{}/up", self.hyper.addr)),
            Side::Nginx => self
                .nginx
                .as_ref()
                .map(|n| format!("http://{}/{}", n.addr, if streaming { "sse" } else { "up" })),
        }
    }

    fn addr(&self, side: Side) -> Option<SocketAddr> {
        match side {
            Side::Direct => Some(self.upstream.addr()),
            Side::Patient => Some(self.patient.addr),
            Side::Nginx => self.nginx.as_ref().map(|n| n.addr),
            Side::Hyper => Some(self.hyper.addr),
        }
    }

    /// The path prefix of `side`'s route.
    fn prefix(side: Side, streaming: bool) -> &'static str {
        match side {
            Side::Direct => "",
            Side::Patient | Side::Hyper => "/up",
            Side::Nginx if streaming => "/sse",
            Side::Nginx => "/up",
        }
    }

    fn server(&self, side: Side) -> Option<&Server> {
        match side {
            Side::Direct => None,
            Side::Patient => Some(&self.patient),
            Side::Nginx => self.nginx.as_ref(),
            Side::Hyper => Some(&self.hyper),
        }
    }

    fn sides(&self) -> Vec<Side> {
        let mut sides = vec![Side::Direct, Side::Patient];
        if self.nginx.is_some() {
            sides.push(Side::Nginx);
        }
        sides.push(Side::Hyper);
        sides
    }

    /// Every route answers `/fast` with 200 before anything is measured.
    fn check_routes(&mut self) -> Result<(), BoxError> {
        for side in self.sides() {
            let addr = self.addr(side).ok_or("no address")?;
            for streaming in [false, true] {
                let path = format!("{}/fast", Bench::prefix(side, streaming));
                let status = self.runtime.block_on(get_status(addr, &path))?;
                if status != 200 {
                    return Err(format!("{side} answered {status} to {path}").into());
                }
            }
        }
        if !self.patient.process.is_running() {
            return Err("patient serve has exited".into());
        }
        Ok(())
    }

    fn time_left(&self) -> Duration {
        self.options
            .deadline
            .saturating_duration_since(Instant::now())
    }

    /// One wrk run against `side`: its line, and its report when it ran.
    fn wrk_run(
        &mut self,
        scenario: Scenario,
        round: Option<u32>,
        side: Side,
        path: &str,
        load: WrkLoad,
    ) -> Option<WrkReport> {
        let wrk = self.wrk.clone()?;
        let url = format!("{}{path}", self.base(side, false)?);
        let mut line = Line::new(BENCH).text("scenario", scenario);
        line = match round {
            Some(round) => line.text("round", round),
            None => line.text("round", "warmup"),
        };
        line = line.text("side", side);
        if self.time_left() < load.duration + Duration::from_secs(5) {
            self.failures += 1;
            println!("{}", line.text("error", "out_of_time"));
            return None;
        }
        let proxy_before = self.server(side).map(Server::cpu_ticks);
        let upstream_pid = [self.upstream.pid()];
        let upstream_before = cpu_ticks_of(&upstream_pid);
        let result = wrk::run(&wrk, load, &url);
        let proxy_cpu = self
            .server(side)
            .map(Server::cpu_ticks)
            .zip(proxy_before)
            .map(|(after, before)| after.saturating_sub(before) as f64 / 100.0);
        let upstream_cpu =
            cpu_ticks_of(&upstream_pid).saturating_sub(upstream_before) as f64 / 100.0;
        match result {
            Ok(report) => {
                let mut line = line
                    .round("req_s", report.req_s)
                    .fixed("p50_ms", report.p50_ms, 3)
                    .fixed("p90_ms", report.p90_ms, 3)
                    .fixed("p99_ms", report.p99_ms, 3)
                    .text("requests", report.requests)
                    .text("socket_errors", report.socket_errors)
                    .text("non_2xx", report.non_2xx);
                if let Some(cpu) = proxy_cpu {
                    line = line.fixed("proxy_cpu_s", cpu, 2).fixed(
                        "proxy_cpu_us_per_req",
                        cpu * 1e6 / report.requests.max(1) as f64,
                        1,
                    );
                }
                line = line.fixed("upstream_cpu_s", upstream_cpu, 2);
                if round.is_some() && (report.socket_errors > 0 || report.non_2xx > 0) {
                    self.failures += 1;
                    line = line.text("error", "failed_requests");
                }
                println!("{line}");
                Some(report)
            }
            Err(e) => {
                self.failures += 1;
                eprintln!("{BENCH}: wrk against {side}: {e}");
                println!("{}", line.text("error", "wrk_failed"));
                None
            }
        }
    }

    /// `fast` or `64k`: rounds of wrk runs, direct first, then the two
    /// proxies in alternating order; true when the targets are met.
    fn wrk_scenario(&mut self, scenario: Scenario, path: &str, target: f64) -> bool {
        if self.wrk.is_none() {
            println!(
                "{}",
                Line::new(BENCH)
                    .text("scenario", scenario)
                    .text("skipped", "wrk not found")
            );
            return true;
        }
        let load = self.options.load;
        eprintln!(
            "{BENCH}: {scenario}: {} on {path}, {} rounds",
            load.describe(),
            self.options.rounds
        );
        let warmup = WrkLoad {
            duration: WARMUP,
            ..load
        };
        for side in self.sides() {
            let _ = self.wrk_run(scenario, None, side, path, warmup);
        }
        let mut reports: Vec<[Option<WrkReport>; 4]> = Vec::new();
        for round in 0..self.options.rounds {
            let order = if round % 2 == 0 {
                [Side::Direct, Side::Patient, Side::Nginx, Side::Hyper]
            } else {
                [Side::Direct, Side::Hyper, Side::Nginx, Side::Patient]
            };
            let mut got = [None; 4];
            for side in order {
                let slot = match side {
                    Side::Direct => 0,
                    Side::Patient => 1,
                    Side::Nginx => 2,
                    Side::Hyper => 3,
                };
                got[slot] = self.wrk_run(scenario, Some(round), side, path, load);
            }
            let [direct, patient, nginx, hyper] = got;
            let mut line = Line::new(BENCH)
                .text("scenario", scenario)
                .text("round", round)
                .text("side", "ratio")
                .text("first", order[1]);
            let req_s = |r: Option<WrkReport>| r.map(|r| r.req_s);
            let p99 = |r: Option<WrkReport>| r.map(|r| r.p99_ms);
            for (name, value) in [
                (
                    "patient_to_nginx_req_s",
                    ratio(req_s(patient), req_s(nginx)),
                ),
                (
                    "patient_to_direct_req_s",
                    ratio(req_s(patient), req_s(direct)),
                ),
                ("nginx_to_direct_req_s", ratio(req_s(nginx), req_s(direct))),
                ("patient_to_nginx_p99", ratio(p99(patient), p99(nginx))),
                (
                    "patient_to_hyper_req_s",
                    ratio(req_s(patient), req_s(hyper)),
                ),
                ("hyper_to_nginx_req_s", ratio(req_s(hyper), req_s(nginx))),
            ] {
                line = push_ratio(line, name, value);
            }
            println!("{line}");
            reports.push(got);
        }
        let pick = |slot: usize, f: fn(&WrkReport) -> f64| -> Option<f64> {
            median(
                reports
                    .iter()
                    .filter_map(|round| round[slot].as_ref().map(f))
                    .collect(),
            )
        };
        let round_ratios: Vec<f64> = reports
            .iter()
            .filter_map(|[_, p, n, _]| ratio(p.map(|r| r.req_s), n.map(|r| r.req_s)))
            .collect();
        let ratio_median = median(round_ratios);
        let (patient_p99, nginx_p99) = (pick(1, |r| r.p99_ms), pick(2, |r| r.p99_ms));
        let rate_met = ratio_median.is_some_and(|r| r >= target);
        let p99_met = matches!((patient_p99, nginx_p99), (Some(p), Some(n)) if p <= n);
        let met = rate_met && p99_met;
        let mut line = Line::new(BENCH)
            .text("scenario", scenario)
            .text("side", "summary")
            .text("rounds", reports.len())
            .text("load", load.describe());
        for (name, value) in [
            ("direct_req_s", pick(0, |r| r.req_s)),
            ("patient_req_s", pick(1, |r| r.req_s)),
            ("nginx_req_s", pick(2, |r| r.req_s)),
            ("hyper_req_s", pick(3, |r| r.req_s)),
        ] {
            line = match value {
                Some(v) => line.round(name, v),
                None => line.text(name, "na"),
            };
        }
        for (name, value) in [
            ("direct_p99_ms", pick(0, |r| r.p99_ms)),
            ("patient_p50_ms", pick(1, |r| r.p50_ms)),
            ("patient_p90_ms", pick(1, |r| r.p90_ms)),
            ("patient_p99_ms", patient_p99),
            ("nginx_p50_ms", pick(2, |r| r.p50_ms)),
            ("nginx_p90_ms", pick(2, |r| r.p90_ms)),
            ("nginx_p99_ms", nginx_p99),
            ("hyper_p99_ms", pick(3, |r| r.p99_ms)),
        ] {
            line = match value {
                Some(v) => line.fixed(name, v, 3),
                None => line.text(name, "na"),
            };
        }
        line = push_ratio(line, "ratio_req_s_median", ratio_median)
            .text("target", format!("req_s>={target}x_nginx,p99<=nginx"))
            .text("req_s_met", rate_met)
            .text("p99_met", p99_met)
            .text("pass", met);
        println!("{line}");
        met || self.nginx.is_none()
    }

    /// A streamed chat request whose message is `words`.
    fn chat_body_of(words: &[String]) -> Bytes {
        Bytes::from(
            json!({
                "model": "patient-test",
                "stream": true,
                "messages": [{"role": "user", "content": words.join(" ")}],
            })
            .to_string(),
        )
    }

    /// A streamed chat request with a message of `words` words.
    fn chat_body(words: usize) -> Bytes {
        let words: Vec<String> = (0..words).map(|i| format!("w{i}")).collect();
        Bench::chat_body_of(&words)
    }

    /// A streamed chat request with a message of `words` words marked for
    /// the tap as stream `stream`'s.
    fn tap_body(stream: usize, words: usize) -> Bytes {
        let mark = String::from_utf8_lossy(TAP_MARK);
        let words: Vec<String> = (0..words).map(|i| format!("{mark}{stream}x{i}")).collect();
        Bench::chat_body_of(&words)
    }

    /// `sse`: sets of streams started together, direct, through each proxy
    /// and through each proxy behind the tap; true when the gateway's added
    /// latency is within 1 ms.
    fn sse_scenario(&mut self) -> bool {
        let line = || Line::new(BENCH).text("scenario", "sse");
        // The gateway behind the tap: a second `patient serve`, for this
        // scenario only.
        let tapped = match start_patient(
            &self.patient_bin,
            &self.dir.join("patient-tap"),
            self.tap.addr,
        ) {
            Ok(server) => server,
            Err(e) => {
                eprintln!("{BENCH}: the gateway behind the tap: {e}");
                self.failures += 1;
                println!("{}", line().text("error", "tap_gateway_failed"));
                return false;
            }
        };
        let body = Bench::chat_body(SSE_WORDS);
        let query = format!("/v1/chat/completions?interval_ms={SSE_INTERVAL_MS}");
        // Slots: 0 direct A, 1 patient, 2 direct B, 3 patient behind the
        // tap, 4 the tap itself (no proxy: the floor of the tap's figure),
        // then 5 nginx and 6 nginx behind the tap.
        let mut targets: Vec<(SocketAddr, String, Bytes)> = vec![
            (self.upstream.addr(), query.clone(), body.clone()),
            (self.patient.addr, format!("/up{query}"), body.clone()),
            (self.upstream.addr(), query.clone(), body.clone()),
            (tapped.addr, format!("/up{query}"), Bytes::new()),
            (self.tap.addr, query.clone(), Bytes::new()),
        ];
        if let Some(nginx) = &self.nginx {
            targets.push((nginx.addr, format!("/sse{query}"), body.clone()));
            targets.push((nginx.addr, format!("/tap{query}"), Bytes::new()));
        }
        let tapped_slots: Vec<usize> = targets
            .iter()
            .enumerate()
            .filter(|(_, (_, _, body))| body.is_empty())
            .map(|(slot, _)| slot)
            .collect();
        let sets = self.options.sse_sets;
        eprintln!(
            "{BENCH}: sse: {sets} sets of {} streams (~{} events, {SSE_INTERVAL_MS} ms apart)",
            targets.len(),
            SSE_WORDS + 4
        );
        // Per slot, per set, the arrival times.
        let mut arrivals: Vec<Vec<Vec<Duration>>> = vec![Vec::new(); targets.len()];
        // Per slot, each marked event's time from leaving the tap to
        // reaching the client, ms.
        let mut in_proxy: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        let mut unmatched = 0usize;
        let mut broken = 0usize;
        let mut expected = None;
        for set in 0..SSE_WARMUP_SETS + sets {
            if self.time_left() < Duration::from_secs(10) {
                self.failures += 1;
                println!("{}", line().text("error", "out_of_time"));
                return false;
            }
            for &slot in &tapped_slots {
                targets[slot].2 = Bench::tap_body(set * 10 + slot, SSE_WORDS);
            }
            let result = self.runtime.block_on(stream_set(&targets));
            let records = match result {
                Ok(records) => records,
                Err(e) => {
                    eprintln!("{BENCH}: sse set {set}: {e}");
                    broken += 1;
                    continue;
                }
            };
            let expected = *expected.get_or_insert(records[0].arrivals.len());
            if records
                .iter()
                .any(|r| !r.done || r.arrivals.len() != expected)
            {
                eprintln!(
                    "{BENCH}: sse set {set}: incomplete streams (events, done): {:?}",
                    records
                        .iter()
                        .map(|r| (r.arrivals.len(), r.done))
                        .collect::<Vec<_>>()
                );
                broken += 1;
                continue;
            }
            if set < SSE_WARMUP_SETS {
                continue;
            }
            let left = self.tap.take_marks();
            for (slot, record) in records.into_iter().enumerate() {
                for (mark, arrived) in &record.marks {
                    match left.get(mark) {
                        Some(left) => in_proxy[slot]
                            .push(arrived.saturating_duration_since(*left).as_secs_f64() * 1e3),
                        None => unmatched += 1,
                    }
                }
                arrivals[slot].push(record.arrivals);
            }
        }
        drop(tapped);
        let events = expected.unwrap_or(0);
        let direct = &arrivals[0];
        let patient = Added::between(&arrivals[1], direct);
        let patient_tap = Added::of(in_proxy[3].clone());
        let met = broken == 0
            && unmatched == 0
            && patient.mean_ms <= 1.0
            && patient_tap.mean_ms <= 1.0
            && patient_tap.p99_ms <= 1.0;
        let mut lines = vec![
            ("patient", "through_minus_direct", patient),
            ("patient", "tap_to_client", patient_tap),
            (
                "direct_again",
                "through_minus_direct",
                Added::between(&arrivals[2], direct),
            ),
            ("direct", "tap_to_client", Added::of(in_proxy[4].clone())),
        ];
        if self.nginx.is_some() {
            lines.push((
                "nginx",
                "through_minus_direct",
                Added::between(&arrivals[5], direct),
            ));
            lines.push(("nginx", "tap_to_client", Added::of(in_proxy[6].clone())));
        }
        for (side, measure, added) in &lines {
            let mut out = line()
                .text("side", side)
                .text("measure", measure)
                .text("sets", direct.len())
                .text("events_per_stream", events)
                .text("interval_ms", SSE_INTERVAL_MS);
            out = added.push(out);
            if *side == "patient" && *measure == "tap_to_client" {
                out = out
                    .text("broken_sets", broken)
                    .text("unmatched_events", unmatched)
                    .text(
                        "target",
                        "through_minus_direct_mean<=1ms,tap_to_client_mean_and_p99<=1ms",
                    )
                    .text("pass", met);
            }
            println!("{out}");
        }
        if broken > 0 || unmatched > 0 {
            self.failures += 1;
        }
        met
    }

    /// `streams`: the streams held through each proxy at once; true when
    /// every stream got every event.
    fn streams_scenario(&mut self) -> bool {
        let interval = self.options.stream_interval_ms;
        let n = self.options.streams;
        let body = Bench::chat_body(STREAM_WORDS);
        let query = format!("/v1/chat/completions?interval_ms={interval}");
        // The events of one stream, read directly once.
        let probe = self.runtime.block_on(stream_set(&[(
            self.upstream.addr(),
            "/v1/chat/completions?interval_ms=0".to_owned(),
            body.clone(),
        )]));
        let expected = match probe {
            Ok(records) if records[0].done => records[0].arrivals.len(),
            Ok(_) | Err(_) => {
                self.failures += 1;
                println!(
                    "{}",
                    Line::new(BENCH)
                        .text("scenario", "streams")
                        .text("error", "probe_failed")
                );
                return false;
            }
        };
        let stream_s = (expected.saturating_sub(1) as u64 * interval) as f64 / 1e3;
        let mut pass = true;
        for side in [Side::Patient, Side::Nginx] {
            let Some(server) = self.server(side) else {
                continue;
            };
            let (addr, pids) = (server.addr, server.pids.clone());
            let path = format!("{}{query}", Bench::prefix(side, true));
            eprintln!(
                "{BENCH}: streams: {n} streams through {side}, {expected} events {interval} ms apart (~{stream_s:.0} s)"
            );
            let budget = Duration::from_secs_f64(stream_s) + Duration::from_secs(60);
            if self.time_left() < budget {
                self.failures += 1;
                println!(
                    "{}",
                    Line::new(BENCH)
                        .text("scenario", "streams")
                        .text("side", side)
                        .text("error", "out_of_time")
                );
                pass = false;
                continue;
            }
            let held = self.runtime.block_on(hold_streams(
                addr,
                &path,
                body.clone(),
                n,
                &pids,
                Instant::now() + budget,
            ));
            // Let the proxy settle, then read what it keeps.
            std::thread::sleep(Duration::from_secs(2));
            let rss_after = rss_kib_of(&pids);
            let complete = held.complete_with(expected);
            let ok = complete == n && held.max_open == n;
            if side == Side::Patient {
                pass &= ok;
            }
            if complete != n {
                self.failures += 1;
            }
            let per_stream_kib =
                held.rss_peak_kib.saturating_sub(held.rss_before_kib) as f64 / n as f64;
            println!(
                "{}",
                Line::new(BENCH)
                    .text("scenario", "streams")
                    .text("side", side)
                    .text("streams", n)
                    .text("events_per_stream", expected)
                    .text("interval_ms", interval)
                    .text("held_at_once", held.max_open)
                    .fixed("all_open_after_s", held.all_open_after_s, 2)
                    .text("complete", complete)
                    .text("errors", held.errors)
                    .text("events", held.events)
                    .fixed("rss_before_mb", held.rss_before_kib as f64 / 1024.0, 1)
                    .fixed("rss_all_open_mb", held.rss_all_open_kib as f64 / 1024.0, 1)
                    .fixed("rss_peak_mb", held.rss_peak_kib as f64 / 1024.0, 1)
                    .fixed("rss_after_mb", rss_after as f64 / 1024.0, 1)
                    .fixed("per_stream_kib", per_stream_kib, 1)
                    .fixed("wall_s", held.wall_s, 2)
                    .text("target", "every_event_of_every_stream,bounded_rss")
                    .text("pass", ok)
            );
        }
        pass
    }
}

/// A plain GET on a fresh connection; its status.
async fn get_status(addr: SocketAddr, path: &str) -> Result<u16, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| format!("no answer to {path} in 10 s"))??;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// One stream as read: each event's arrival after the request's start,
/// when each event marked for the tap arrived, and whether it ended with
/// `data: [DONE]`.
#[derive(Debug, Default)]
struct StreamRecord {
    arrivals: Vec<Duration>,
    marks: Vec<(String, Instant)>,
    done: bool,
}

/// A connection ready to send one request.
struct Opened {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

async fn open(addr: SocketAddr) -> Result<Opened, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(Opened { sender, addr })
}

/// Sends the streaming chat request on `opened` and returns the response
/// body once the head is in, with the request's start.
async fn start_stream(
    opened: &mut Opened,
    path: &str,
    body: Bytes,
) -> Result<(hyper::body::Incoming, Instant), BoxError> {
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, opened.addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "text/event-stream")
        .body(Full::new(body))?;
    let start = Instant::now();
    let response = opened.sender.send_request(request).await?;
    if response.status() != 200 {
        return Err(format!("{path} answered {}", response.status()).into());
    }
    Ok((response.into_body(), start))
}

/// Reads an event stream to its end: each event's arrival after `start`.
async fn read_events(
    mut body: hyper::body::Incoming,
    start: Instant,
    idle: Duration,
) -> Result<StreamRecord, BoxError> {
    let mut record = StreamRecord::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut last = Vec::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(frame)) => frame?,
            Ok(None) => break,
            Err(_) => return Err(format!("no event in {idle:?}").into()),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        let at = now.saturating_duration_since(start);
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            last = pending.drain(..end + 2).collect();
            record.arrivals.push(at);
            let mut marks = MarkScanner::default();
            for mark in marks.feed(&last) {
                record.marks.push((mark, now));
            }
        }
    }
    record.done = last.starts_with(b"data: [DONE]");
    Ok(record)
}

/// One stream to each of `targets` (address, path, request body), all sent
/// at the same instant on connections opened beforehand; their records in
/// the same order.
async fn stream_set(
    targets: &[(SocketAddr, String, Bytes)],
) -> Result<Vec<StreamRecord>, BoxError> {
    let barrier = Arc::new(tokio::sync::Barrier::new(targets.len()));
    let mut tasks = Vec::new();
    for (addr, path, body) in targets {
        let (addr, path, body, barrier) = (*addr, path.clone(), body.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let opened = open(addr).await;
            barrier.wait().await;
            let mut opened = opened?;
            let (incoming, start) = start_stream(&mut opened, &path, body).await?;
            read_events(incoming, start, Duration::from_secs(10)).await
        }));
    }
    let mut records = Vec::new();
    for task in tasks {
        records.push(task.await??);
    }
    Ok(records)
}

/// The latency one side adds to each event, in milliseconds: against the
/// direct streams of the same sets paired by event index, or from the tap
/// to the client.
#[derive(Debug, Default)]
struct Added {
    count: usize,
    mean_ms: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    first_event_mean_ms: f64,
    worst_index_mean_ms: f64,
    /// Whether the figures are paired by event index (the per-index
    /// means mean something).
    indexed: bool,
}

impl Added {
    /// Figures of `all`, ms, without the per-index ones.
    fn of(all: Vec<f64>) -> Added {
        Added::between_values(all, &[])
    }

    fn between(through: &[Vec<Duration>], direct: &[Vec<Duration>]) -> Added {
        let mut all = Vec::new();
        let mut by_index: Vec<Vec<f64>> = Vec::new();
        for (t, d) in through.iter().zip(direct) {
            for (i, (t, d)) in t.iter().zip(d).enumerate() {
                let ms = (t.as_secs_f64() - d.as_secs_f64()) * 1e3;
                all.push(ms);
                if by_index.len() <= i {
                    by_index.push(Vec::new());
                }
                by_index[i].push(ms);
            }
        }
        Added::between_values(all, &by_index)
    }

    fn between_values(all: Vec<f64>, by_index: &[Vec<f64>]) -> Added {
        if all.is_empty() {
            return Added::default();
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let index_means: Vec<f64> = by_index.iter().map(|v| mean(v)).collect();
        let mut sorted = all.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let r = (p * sorted.len() as f64).ceil() as usize;
            sorted[r.clamp(1, sorted.len()) - 1]
        };
        Added {
            count: all.len(),
            mean_ms: mean(&all),
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: sorted[sorted.len() - 1],
            first_event_mean_ms: index_means.first().copied().unwrap_or(0.0),
            worst_index_mean_ms: index_means.iter().copied().fold(f64::MIN, f64::max),
            indexed: !by_index.is_empty(),
        }
    }

    fn push(&self, line: Line) -> Line {
        let line = line
            .text("events", self.count)
            .fixed("added_mean_ms", self.mean_ms, 3)
            .fixed("added_p50_ms", self.p50_ms, 3)
            .fixed("added_p90_ms", self.p90_ms, 3)
            .fixed("added_p99_ms", self.p99_ms, 3)
            .fixed("added_max_ms", self.max_ms, 3);
        if !self.indexed {
            return line;
        }
        line.fixed("added_first_event_mean_ms", self.first_event_mean_ms, 3)
            .fixed("added_worst_index_mean_ms", self.worst_index_mean_ms, 3)
    }
}

/// What holding many streams at once showed.
#[derive(Debug, Default)]
struct Held {
    records: Vec<Option<StreamRecord>>,
    errors: usize,
    events: usize,
    max_open: usize,
    all_open_after_s: f64,
    rss_before_kib: u64,
    rss_all_open_kib: u64,
    rss_peak_kib: u64,
    wall_s: f64,
}

impl Held {
    /// Streams that got `expected` events and `[DONE]`.
    fn complete_with(&self, expected: usize) -> usize {
        self.records
            .iter()
            .flatten()
            .filter(|r| r.done && r.arrivals.len() == expected)
            .count()
    }
}

/// Opens `n` streams to `addr` (`OPENING_AT_ONCE` being opened at a time),
/// reads each to its end, and samples the resident set of `pids` meanwhile.
async fn hold_streams(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    n: usize,
    pids: &[u32],
    deadline: Instant,
) -> Held {
    let mut held = Held {
        rss_before_kib: rss_kib_of(pids),
        ..Held::default()
    };
    let open_now = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let opening = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (path, body) = (path.to_owned(), body.clone());
        let (open_now, finished, opening) = (open_now.clone(), finished.clone(), opening.clone());
        tasks.push(tokio::spawn(async move {
            let result = async {
                let permit = opening.acquire_owned().await?;
                let mut opened = open(addr).await?;
                let (incoming, start) = start_stream(&mut opened, &path, body).await?;
                drop(permit);
                open_now.fetch_add(1, Ordering::AcqRel);
                let record = read_events(incoming, start, Duration::from_secs(30)).await;
                open_now.fetch_sub(1, Ordering::AcqRel);
                record
            }
            .await;
            finished.fetch_add(1, Ordering::AcqRel);
            result
        }));
    }
    let mut all_open_seen = false;
    while finished.load(Ordering::Acquire) < n && Instant::now() < deadline {
        tokio::time::sleep(RSS_SAMPLE).await;
        let rss = rss_kib_of(pids);
        let open = open_now.load(Ordering::Acquire);
        held.rss_peak_kib = held.rss_peak_kib.max(rss);
        if open > held.max_open {
            held.max_open = open;
        }
        if open == n && !all_open_seen {
            all_open_seen = true;
            held.all_open_after_s = started.elapsed().as_secs_f64();
            held.rss_all_open_kib = rss;
        }
    }
    held.wall_s = started.elapsed().as_secs_f64();
    for task in tasks {
        if !task.is_finished() {
            task.abort();
            held.errors += 1;
            held.records.push(None);
            continue;
        }
        match task.await {
            Ok(Ok(record)) => {
                held.events += record.arrivals.len();
                held.records.push(Some(record));
            }
            Ok(Err(e)) => {
                if held.errors == 0 {
                    eprintln!("{BENCH}: a stream failed: {e}");
                }
                held.errors += 1;
                held.records.push(None);
            }
            Err(_) => {
                held.errors += 1;
                held.records.push(None);
            }
        }
    }
    held
}

/// The instants events left the tap, by mark.
type Marks = Arc<Mutex<HashMap<String, Instant>>>;

/// The tap: a TCP relay between a proxy and the upstream that notes the
/// instant each marked event read from the upstream is handed on to the
/// proxy (after the read, before the write), on this process's clock.
struct Tap {
    addr: SocketAddr,
    marks: Marks,
    accept: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn start(upstream: SocketAddr) -> io::Result<Tap> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let marks: Marks = Arc::default();
        let shared = Arc::clone(&marks);
        let accept = tokio::spawn(async move {
            while let Ok((proxy, _)) = listener.accept().await {
                tokio::spawn(relay(proxy, upstream, Arc::clone(&shared)));
            }
        });
        Ok(Tap {
            addr,
            marks,
            accept,
        })
    }

    /// The marks noted so far, forgotten here.
    fn take_marks(&self) -> HashMap<String, Instant> {
        std::mem::take(&mut *self.marks.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Relays one proxy connection to the upstream, noting marks on the way
/// back.
async fn relay(proxy: tokio::net::TcpStream, upstream: SocketAddr, marks: Marks) {
    let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let _ = (proxy.set_nodelay(true), up.set_nodelay(true));
    let (mut proxy_read, mut proxy_write) = proxy.into_split();
    let (mut up_read, mut up_write) = up.into_split();
    let requests = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut proxy_read, &mut up_write).await;
        let _ = up_write.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    let mut scanner = MarkScanner::default();
    loop {
        let n = match up_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let at = Instant::now();
        let found = scanner.feed(&buf[..n]);
        if !found.is_empty() {
            let mut marks = marks.lock().unwrap_or_else(|e| e.into_inner());
            for mark in found {
                marks.insert(mark, at);
            }
        }
        if proxy_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = proxy_write.shutdown().await;
    requests.abort();
}

/// Finds the marks (`TAP_MARK`, then digits and `x`) in a byte stream fed
/// in pieces; a mark cut between two pieces is found in the second.
#[derive(Debug, Default)]
struct MarkScanner {
    carry: Vec<u8>,
}

impl MarkScanner {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut text = std::mem::take(&mut self.carry);
        text.extend_from_slice(bytes);
        let mut found = Vec::new();
        let mut at = 0;
        while let Some(offset) = text[at..]
            .windows(TAP_MARK.len())
            .position(|w| w == TAP_MARK)
        {
            let begin = at + offset;
            let body = begin + TAP_MARK.len();
            let end = text[body..]
                .iter()
                .position(|b| !(b.is_ascii_digit() || *b == b'x'))
                .map(|n| body + n);
            match end {
                Some(end) => {
                    if end > body {
                        found.push(String::from_utf8_lossy(&text[begin..end]).into_owned());
                    }
                    at = end;
                }
                None => {
                    // The mark may go on in the next piece.
                    self.carry = text[begin..].to_vec();
                    return found;
                }
            }
        }
        // A piece may end in the middle of `TAP_MARK` itself.
        let keep = (TAP_MARK.len() - 1).min(text.len());
        self.carry = text[text.len() - keep..].to_vec();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_found_across_pieces() {
        let mut scanner = MarkScanner::default();
        assert_eq!(
            scanner.feed(b"data: {\"content\":\"zq1x0 \"}\n\nz"),
            ["zq1x0"]
        );
        assert_eq!(scanner.feed(b"q1x"), Vec::<String>::new());
        assert_eq!(scanner.feed(b"12 \"} zq2x3\""), ["zq1x12", "zq2x3"]);
        assert!(scanner.feed(b"zq \"zz").is_empty());
    }

    #[test]
    fn scenarios_parse() {
        assert_eq!("64k".parse::<Scenario>(), Ok(Scenario::Body64k));
        assert!("slow".parse::<Scenario>().is_err());
    }
}
