//! Running each measured side in a child process, with a hard deadline.
//!
//! The parent ([`Harness`]) starts the upstream (unless `--url` is given),
//! then runs every measurement as `exe --side patient|hyper …` and collects
//! the one `bench=…` line the child prints. The child ([`SideContext`]) has
//! the parent's deadline minus a margin; if it is not done by then it prints
//! what it has with `timeout=true` and exits non-zero ([`Watchdog`]), and the
//! parent kills it at the deadline itself.

use std::{
    error::Error,
    fmt,
    io::{self, BufRead, BufReader},
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use crate::{
    args::{ArgError, Args},
    report::{Line, Record},
    upstream::{run_upstream_child, UpstreamProcess, UPSTREAM_CHILD_FLAG},
};

/// The flag for the number of measured rounds (default 1).
pub const ROUNDS_FLAG: &str = "--rounds";

/// Default hard limit on a whole program run, in seconds (`--timeout-s`).
pub const DEFAULT_TIMEOUT_S: u64 = 120;

/// How much earlier than the parent's deadline a child gives up.
const CHILD_MARGIN: Duration = Duration::from_secs(3);

/// How long after its own deadline a child's watchdog ends the process.
const WATCHDOG_GRACE: Duration = Duration::from_secs(2);

/// Exit status of a child that ran out of time.
const EXIT_TIMEOUT: u8 = 3;

/// A boxed error for the measured sides.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// Which client a child process measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// patient's processor.
    Patient,
    /// A bare hyper-util legacy client.
    Hyper,
}

impl Side {
    /// `patient` or `hyper`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Patient => "patient",
            Side::Hyper => "hyper",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A side name that is neither `patient` nor `hyper`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownSide(pub String);

impl fmt::Display for UnknownSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown side {:?} (expected patient or hyper)", self.0)
    }
}

impl Error for UnknownSide {}

impl FromStr for Side {
    type Err = UnknownSide;

    fn from_str(s: &str) -> Result<Side, UnknownSide> {
        match s {
            "patient" => Ok(Side::Patient),
            "hyper" => Ok(Side::Hyper),
            other => Err(UnknownSide(other.to_owned())),
        }
    }
}

/// What a benchmark program is made of; see [`main_with`].
pub struct Program<P, S> {
    /// The benchmark's name, the `bench=` value.
    pub bench: &'static str,
    /// Text printed for `--help`.
    pub usage: &'static str,
    /// Flags with a value, beyond the common ones.
    pub value_flags: &'static [&'static str],
    /// Runs the measurements in the parent process.
    pub parent: P,
    /// Runs one side in a child process and returns its line.
    pub side: S,
}

/// The `main` of every benchmark program: dispatches to the upstream child,
/// a side child or the parent.
pub fn main_with<P, S>(program: Program<P, S>) -> ExitCode
where
    P: FnOnce(&mut Harness, &Args) -> Result<(), BoxError>,
    S: FnOnce(&SideContext, &Args) -> Result<SideReport, BoxError>,
{
    let bench = program.bench;
    let args = match Args::parse(std::env::args().skip(1), program.value_flags, &[]) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{bench}: {e}\n{}", program.usage);
            return ExitCode::from(2);
        }
    };
    if args.has("--help") || args.has("-h") {
        println!("{}", program.usage);
        return ExitCode::SUCCESS;
    }
    if args.has(UPSTREAM_CHILD_FLAG) {
        return run_upstream_child();
    }
    if args.value("--side").is_some() {
        let context = match SideContext::from_args(&args) {
            Ok(context) => context,
            Err(e) => {
                eprintln!("{bench}: {e}");
                return ExitCode::from(2);
            }
        };
        return match (program.side)(&context, &args) {
            Ok(report) => {
                println!("{}", report.line);
                if report.complete {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_TIMEOUT)
                }
            }
            Err(e) => {
                eprintln!("{bench} --side {}: {e}", context.side);
                ExitCode::FAILURE
            }
        };
    }
    let mut harness = match Harness::start(bench, &args) {
        Ok(harness) => harness,
        Err(e) => {
            eprintln!("{bench}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = (program.parent)(&mut harness, &args) {
        eprintln!("{bench}: {e}");
        return ExitCode::FAILURE;
    }
    harness.exit_code()
}

/// The parent process: owns the upstream and runs the sides.
#[derive(Debug)]
pub struct Harness {
    bench: &'static str,
    exe: PathBuf,
    deadline: Instant,
    base_url: String,
    only: Option<Side>,
    failures: u32,
    upstream: Option<UpstreamProcess>,
}

impl Harness {
    /// Reads `--timeout-s`, `--only` and `--url`; starts the upstream child
    /// unless `--url` names a server.
    pub fn start(bench: &'static str, args: &Args) -> Result<Harness, BoxError> {
        let timeout = Duration::from_secs(args.get("--timeout-s", DEFAULT_TIMEOUT_S)?);
        let deadline = Instant::now() + timeout;
        let only = args.value("--only").map(str::parse::<Side>).transpose()?;
        let exe = std::env::current_exe()?;
        let (base_url, upstream) = match args.value("--url") {
            Some(url) => (url.trim_end_matches('/').to_owned(), None),
            None => {
                let upstream = UpstreamProcess::spawn(&exe)?;
                eprintln!("{bench}: upstream child on {}", upstream.addr());
                (upstream.base_url(), Some(upstream))
            }
        };
        Ok(Harness {
            bench,
            exe,
            deadline,
            base_url,
            only,
            failures: 0,
            upstream,
        })
    }

    /// The upstream's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The requests the upstream child has received so far (see
    /// [`UpstreamProcess::requests`]); `None` with `--url` or when the child
    /// does not answer.
    pub fn upstream_requests(&mut self) -> Option<u64> {
        let upstream = self.upstream.as_mut()?;
        match upstream.requests() {
            Ok(count) => Some(count),
            Err(e) => {
                eprintln!("{}: {e}", self.bench);
                None
            }
        }
    }

    /// Whether `side` is to be measured (`--only`).
    pub fn wants(&self, side: Side) -> bool {
        self.only.is_none_or(|only| only == side)
    }

    /// Runs `side` in a child with the extra `flags` (flag, value) and prints
    /// the line it returns. A child that fails or runs out of time gets a
    /// line with `error=…` and makes the program exit non-zero.
    pub fn run(&mut self, side: Side, flags: &[(&str, String)]) -> Record {
        let fallback = flags.iter().fold(
            Line::new(self.bench).text("side", side),
            |line, (flag, value)| line.text(flag.trim_start_matches("--"), value),
        );
        if self.remaining().is_zero() {
            self.failures += 1;
            return self.emit(fallback.text("error", "out_of_time"));
        }
        match self.run_child(side, flags) {
            Ok((Some(line), true)) => self.emit_raw(line),
            Ok((Some(line), false)) => {
                self.failures += 1;
                self.emit_raw(line)
            }
            Ok((None, _)) => {
                self.failures += 1;
                self.emit(fallback.text("error", "no_output"))
            }
            Err(e) => {
                self.failures += 1;
                eprintln!("{}: side {side}: {e}", self.bench);
                self.emit(fallback.text("error", e.kind()))
            }
        }
    }

    /// Runs both sides (those [`wants`](Self::wants) allows) with the same
    /// `flags`: bare hyper first in even rounds, patient first in odd ones,
    /// so that neither always runs on a warmer upstream. Returns
    /// `(patient, hyper)`.
    pub fn run_pair(
        &mut self,
        round: u32,
        flags: &[(&str, String)],
    ) -> (Option<Record>, Option<Record>) {
        let order = if round.is_multiple_of(2) {
            [Side::Hyper, Side::Patient]
        } else {
            [Side::Patient, Side::Hyper]
        };
        let (mut patient, mut hyper) = (None, None);
        for side in order {
            if !self.wants(side) {
                continue;
            }
            let record = self.run(side, flags);
            match side {
                Side::Patient => patient = Some(record),
                Side::Hyper => hyper = Some(record),
            }
        }
        (patient, hyper)
    }

    /// Prints `line` and returns it parsed.
    pub fn emit(&self, line: Line) -> Record {
        self.emit_raw(line.to_string())
    }

    fn emit_raw(&self, line: String) -> Record {
        println!("{line}");
        Record::parse(&line)
    }

    /// Counts a failed check, so that the program exits non-zero.
    pub fn fail(&mut self) {
        self.failures += 1;
    }

    /// Success when every side finished.
    pub fn exit_code(&self) -> ExitCode {
        if self.failures == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Runs the child; its `bench=` line (if any) and whether it exited 0.
    fn run_child(
        &self,
        side: Side,
        flags: &[(&str, String)],
    ) -> io::Result<(Option<String>, bool)> {
        let child_budget = self.remaining().saturating_sub(CHILD_MARGIN);
        let mut command = Command::new(&self.exe);
        command
            .arg("--side")
            .arg(side.as_str())
            .arg("--url")
            .arg(&self.base_url)
            .arg("--deadline-ms")
            .arg(child_budget.as_millis().to_string());
        for (flag, value) in flags {
            command.arg(flag).arg(value);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("the side child has no stdout"))?;
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::Builder::new()
            .name("side-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.starts_with("bench=") {
                        let _ = tx.send(line);
                    }
                }
            })?;
        let mut found = None;
        let outcome = loop {
            match rx.recv_timeout(self.remaining()) {
                Ok(line) => found = Some(line),
                // The child closed its stdout: it has exited or is exiting.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break child.wait().map(|s| s.success())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    eprintln!(
                        "{}: side {side} still running at the deadline: killed",
                        self.bench
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break Ok(false);
                }
            }
        };
        let _ = reader.join();
        outcome.map(|ok| (found, ok))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        drop(self.upstream.take());
    }
}

/// What a side child knows: which side, the upstream and its deadline.
#[derive(Debug, Clone)]
pub struct SideContext {
    /// The side to measure.
    pub side: Side,
    /// The upstream's base URL, without a trailing slash.
    pub url: String,
    /// When to give up and print what there is.
    pub deadline: Instant,
}

impl SideContext {
    /// Reads `--side`, `--url` and `--deadline-ms`.
    pub fn from_args(args: &Args) -> Result<SideContext, BoxError> {
        let side = args
            .get::<String>("--side", String::new())?
            .parse::<Side>()?;
        let url = args
            .value("--url")
            .ok_or_else(|| ArgError::MissingValue("--url".into()))?
            .trim_end_matches('/')
            .to_owned();
        let budget = Duration::from_millis(args.get("--deadline-ms", DEFAULT_TIMEOUT_S * 1000)?);
        Ok(SideContext {
            side,
            url,
            deadline: Instant::now() + budget,
        })
    }

    /// A line starting `bench=NAME side=SIDE`.
    pub fn line(&self, bench: &str) -> Line {
        Line::new(bench).text("side", self.side)
    }

    /// The worker-thread count of the processor's default configuration (the
    /// number of CPUs), used for the bare side's runtime too.
    pub fn workers() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

/// The line a side child prints, and whether it finished in time.
#[derive(Debug, Clone)]
pub struct SideReport {
    /// The `bench=…` line.
    pub line: Line,
    /// False when the deadline came first (the child then exits non-zero).
    pub complete: bool,
}

/// Counts finished tasks from any thread and wakes a waiter when all are done.
#[derive(Debug)]
pub struct Completion {
    target: u64,
    done: AtomicU64,
    errors: AtomicU64,
    lock: Mutex<()>,
    all_done: Condvar,
}

impl Completion {
    /// Waits for `target` tasks.
    pub fn new(target: u64) -> Completion {
        Completion {
            target,
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            lock: Mutex::new(()),
            all_done: Condvar::new(),
        }
    }

    /// One task finished, successfully or not.
    pub fn record(&self, ok: bool) {
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.all_done.notify_all();
        }
    }

    /// Tasks finished so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Tasks that finished with an error so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Acquire)
    }

    /// Whether every task finished.
    pub fn is_complete(&self) -> bool {
        self.done() >= self.target
    }

    /// Waits until every task finished (true) or `deadline` passed (false).
    pub fn wait(&self, deadline: Instant) -> bool {
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        while !self.is_complete() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = match self.all_done.wait_timeout(guard, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// Ends a side child that is stuck past its deadline, printing `line` with
/// the progress so far and `timeout=true` first.
#[derive(Debug)]
pub struct Watchdog {
    _disarm: mpsc::Sender<()>,
}

impl Watchdog {
    /// Fires `WATCHDOG_GRACE` after `deadline` unless dropped first.
    pub fn arm(deadline: Instant, progress: Arc<Completion>, line: Line) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let fire_at = deadline + WATCHDOG_GRACE;
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let left = fire_at.saturating_duration_since(Instant::now());
                if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(left) {
                    let line = line
                        .text("done", progress.done())
                        .text("errors", progress.errors())
                        .peak_rss()
                        .text("timeout", true);
                    println!("{line}");
                    std::process::exit(i32::from(EXIT_TIMEOUT));
                }
            });
        if let Err(e) = spawned {
            eprintln!("watchdog: cannot start its thread: {e}");
        }
        Watchdog { _disarm: tx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_parse() {
        assert_eq!("patient".parse::<Side>().unwrap(), Side::Patient);
        assert_eq!("hyper".parse::<Side>().unwrap().to_string(), "hyper");
        assert!("reqwest".parse::<Side>().is_err());
    }

    #[test]
    fn completion_wakes_the_waiter() {
        let completion = Arc::new(Completion::new(3));
        let worker = {
            let completion = Arc::clone(&completion);
            std::thread::spawn(move || {
                completion.record(true);
                completion.record(false);
                completion.record(true);
            })
        };
        assert!(completion.wait(Instant::now() + Duration::from_secs(5)));
        worker.join().unwrap();
        assert_eq!((completion.done(), completion.errors()), (3, 1));
        assert!(!Completion::new(1).wait(Instant::now()));
    }
}
