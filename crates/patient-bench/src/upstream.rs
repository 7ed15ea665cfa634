//! The upstream server in a process of its own.
//!
//! The parent re-executes its own binary with `--upstream-child`; that child
//! runs a [`patient_testkit::Upstream`] on `127.0.0.1:0`, prints
//! `listening=ADDR fault=ADDR` and serves until its stdin closes. A separate
//! process has its own open-files limit, so 10,000 connections fit on both
//! ends.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::Path,
    process::{Child, ChildStdin, Command, ExitCode, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use patient_testkit::{Upstream, UpstreamOptions};

/// The flag that turns a benchmark binary into the upstream server.
pub const UPSTREAM_CHILD_FLAG: &str = "--upstream-child";

/// How long the upstream child has to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the upstream child has to exit once its stdin is closed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running upstream child process; closing its stdin on drop stops it.
#[derive(Debug)]
pub struct UpstreamProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
}

impl UpstreamProcess {
    /// Starts `exe --upstream-child` and waits for the address it prints.
    pub fn spawn(exe: &Path) -> io::Result<UpstreamProcess> {
        let mut child = Command::new(exe)
            .arg(UPSTREAM_CHILD_FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let addr = stdout
            .ok_or_else(|| io::Error::other("the upstream child has no stdout"))
            .and_then(|stdout| read_address(stdout, START_TIMEOUT));
        match addr {
            Ok(addr) => Ok(UpstreamProcess { child, stdin, addr }),
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

    /// `http://ADDR`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
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

/// Reads the `listening=ADDR …` line from `stdout` within `timeout`.
fn read_address(stdout: impl Read + Send + 'static, timeout: Duration) -> io::Result<SocketAddr> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("upstream-stdout".into())
        .spawn(move || {
            let mut line = String::new();
            let result = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(result);
        })?;
    let line = match rx.recv_timeout(timeout) {
        Ok(result) => result?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the upstream child did not start",
            ))
        }
    };
    parse_address(&line).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected upstream line {line:?}"),
        )
    })
}

/// The `ADDR` of `listening=ADDR` in `line`.
pub fn parse_address(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("listening="))
        .and_then(|addr| addr.parse().ok())
}

/// Body of the `--upstream-child` process: serves the test upstream on
/// `127.0.0.1:0` until stdin reaches end of file.
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
        let upstream = Upstream::start_with(UpstreamOptions::new().listen(listen)).await?;
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
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = [0u8; 256];
            let mut stdin = io::stdin().lock();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
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
}
