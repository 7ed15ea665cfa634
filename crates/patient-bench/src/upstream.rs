//! The upstream server in a process of its own.
//!
//! The parent re-executes its own binary with `--upstream-child`; that child
//! runs a [`patient_testkit::Upstream`] on `127.0.0.1:0`, prints
//! `listening=ADDR fault=ADDR` and serves until its stdin closes. A separate
//! process has its own open-files limit, so 10,000 connections fit on both
//! ends.
//!
//! While it serves, the child answers the line `requests` on its stdin with
//! `requests=N` on its stdout: the requests its main listener has received
//! so far ([`UpstreamProcess::requests`]), a count taken on the server's
//! side of the wire.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::Path,
    process::{Child, ChildStdin, Command, ExitCode, Stdio},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use patient_testkit::{Upstream, UpstreamOptions};

/// The flag that turns a benchmark binary into the upstream server.
pub const UPSTREAM_CHILD_FLAG: &str = "--upstream-child";

/// How long the upstream child has to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the upstream child has to exit once its stdin is closed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the upstream child has to answer a `requests` query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The query line that asks the upstream child for its request count.
const REQUESTS_QUERY: &str = "requests";

/// A running upstream child process; closing its stdin on drop stops it.
#[derive(Debug)]
pub struct UpstreamProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The lines the child prints after its address line.
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
}

impl UpstreamProcess {
    /// Starts `exe --upstream-child` and waits for the address it prints.
    pub fn spawn(exe: &Path) -> io::Result<UpstreamProcess> {
        let mut command = Command::new(exe);
        command.arg(UPSTREAM_CHILD_FLAG);
        UpstreamProcess::spawn_command(command)
    }

    /// Starts `command`, a program that prints `listening=ADDR …` first and
    /// serves until its stdin closes (this module's child, or the test
    /// kit's `patient-upstream --listen 127.0.0.1:0`), and waits for the
    /// address. Only this module's child answers [`requests`](Self::requests).
    pub fn spawn_command(mut command: Command) -> io::Result<UpstreamProcess> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let started = stdout
            .ok_or_else(|| io::Error::other("the upstream child has no stdout"))
            .and_then(|stdout| read_address(stdout, START_TIMEOUT));
        match started {
            Ok((addr, lines)) => Ok(UpstreamProcess {
                child,
                stdin,
                lines,
                addr,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The address of its main listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests the upstream's main listener has received so far, all
    /// routes, counted by the server as each request's head arrives (so a
    /// hedge cancelled after sending counts, and a request never sent does
    /// not).
    pub fn requests(&mut self) -> io::Result<u64> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("the upstream child's stdin is closed"))?;
        writeln!(stdin, "{REQUESTS_QUERY}")?;
        stdin.flush()?;
        let deadline = Instant::now() + QUERY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the upstream child did not answer the requests query",
                )
            })?;
            if let Some(count) = parse_requests(&line) {
                return Ok(count);
            }
        }
    }
}

impl Drop for UpstreamProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the `listening=ADDR …` line from `stdout` within `timeout`; the
/// lines after it arrive on the returned receiver.
fn read_address(
    stdout: impl Read + Send + 'static,
    timeout: Duration,
) -> io::Result<(SocketAddr, mpsc::Receiver<String>)> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("upstream-stdout".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
    let line = rx
        .recv_timeout(timeout)
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the upstream child did not start"))?;
    let addr = parse_address(&line).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected upstream line {line:?}"),
        )
    })?;
    Ok((addr, rx))
}

/// The `ADDR` of `listening=ADDR` in `line`.
pub fn parse_address(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("listening="))
        .and_then(|addr| addr.parse().ok())
}

/// The `N` of `requests=N` in `line`.
pub fn parse_requests(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("requests="))
        .and_then(|n| n.parse().ok())
}

/// Body of the `--upstream-child` process: serves the test upstream on
/// `127.0.0.1:0` until stdin reaches end of file, answering each `requests`
/// line on stdin with `requests=N`.
pub fn run_upstream_child() -> ExitCode {
    crate::rss::warn_if_fewer_files_than(10_500);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("upstream: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: io::Result<()> = runtime.block_on(async {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let upstream = Arc::new(Upstream::start_with(UpstreamOptions::new().listen(listen)).await?);
        {
            let mut stdout = io::stdout().lock();
            writeln!(
                stdout,
                "listening={} fault={}",
                upstream.addr(),
                upstream.fault_addr()
            )?;
            stdout.flush()?;
        }
        let served = Arc::clone(&upstream);
        let _ = tokio::task::spawn_blocking(move || {
            for line in io::stdin().lock().lines().map_while(Result::ok) {
                if line.trim() == REQUESTS_QUERY {
                    let mut stdout = io::stdout().lock();
                    let _ = writeln!(stdout, "requests={}", served.requests());
                    let _ = stdout.flush();
                }
            }
        })
        .await;
        drop(upstream);
        Ok(())
    });
    // Connection tasks may still be winding down: do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upstream: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_address_line() {
        let addr = parse_address("listening=127.0.0.1:4000 fault=127.0.0.1:4001\n");
        assert_eq!(addr, Some(SocketAddr::from(([127, 0, 0, 1], 4000))));
        assert_eq!(parse_address("nothing"), None);
    }

    #[test]
    fn parses_the_requests_line() {
        assert_eq!(parse_requests("requests=42"), Some(42));
        assert_eq!(parse_requests("listening=127.0.0.1:1"), None);
    }
}
