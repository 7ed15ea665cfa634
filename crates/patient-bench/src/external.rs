//! Programs a benchmark runs as processes of its own (`patient serve`, a
//! peer proxy, a load generator), stopped when their handle is dropped,
//! and the figures `/proc` gives about any process: resident memory, CPU
//! time, children.

use std::{
    fs,
    io::{self, BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use crate::rss::{stat_cpu_ticks, status_kib};

/// How long a stopped process has to exit after `SIGTERM` before it is
/// killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A child process, asked to stop (`SIGTERM`, then `SIGKILL` after a grace
/// period) when dropped, so that an early return or a panic does not leave
/// it running.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
}

impl Process {
    /// Starts `command` with stdin closed; `name` is for messages.
    pub fn spawn(name: &str, mut command: Command) -> io::Result<Process> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(Process::adopt(name, child))
    }

    /// Takes charge of a child already started.
    pub fn adopt(name: &str, child: Child) -> Process {
        Process {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child itself (to take its pipes).
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Sends `SIGTERM`, waits up to the grace period, then kills it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = signal(child.id(), "TERM");
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM: killed", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends the signal `name` (`TERM`, `QUIT`, …) to `pid` with `kill(1)`.
pub fn signal(pid: u32, name: &str) -> io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("kill -{name} {pid} failed")))
    }
}

/// The path of the program `name` in the directory of this executable
/// (`target/release/` for a release build), if it is there.
pub fn sibling_program(name: &str) -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .ok_or_else(|| io::Error::other("this executable has no directory"))?
        .join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} not found: build it first", path.display()),
        ))
    }
}

/// The program named by the environment variable `var`, else the first
/// of `candidates` that exists (a bare name is looked up on `PATH`).
pub fn find_program(var: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    candidates.iter().find_map(|candidate| {
        let candidate = Path::new(candidate);
        if candidate.is_absolute() {
            return candidate.is_file().then(|| candidate.to_owned());
        }
        path_dirs
            .iter()
            .map(|dir| dir.join(candidate))
            .find(|p| p.is_file())
    })
}

/// A loopback port nobody listens on right now (bound, read and released:
/// another program may take it in between, which on loopback is unlikely).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `addr` accepts a TCP connection; false after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Reads `reader` line by line on a thread of its own: the first line
/// `find` maps to a value is sent back (within `timeout`), and every line is
/// copied to this process's stderr (so the child's messages are not lost).
pub fn watch_lines<T: Send + 'static>(
    reader: impl io::Read + Send + 'static,
    timeout: Duration,
    find: impl Fn(&str) -> Option<T> + Send + 'static,
) -> io::Result<Option<T>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("child-output".into())
        .spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                if let Some(value) = tx.as_ref().and_then(|_| find(&line)) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(value);
                    }
                }
                eprintln!("{line}");
            }
        })?;
    Ok(rx.recv_timeout(timeout).ok())
}

/// Raises this process's soft limit on open files to its hard limit (at
/// most `cap`) with util-linux's `prlimit`, so that children inherit it;
/// returns the soft limit afterwards. Without `prlimit` the limit stays
/// and a warning says so.
pub fn raise_open_files_limit(cap: u64) -> Option<u64> {
    let (soft, hard) = open_files_limits(std::process::id())?;
    let target = hard.min(cap);
    if soft >= target {
        return Some(soft);
    }
    let raised = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={target}:{hard}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !raised {
        eprintln!("warning: cannot raise the open-files limit from {soft} to {target}: run under `ulimit -n {target}`");
    }
    open_files_limits(std::process::id()).map(|(soft, _)| soft)
}

/// The soft and hard limits on open files of process `pid`.
pub fn open_files_limits(pid: u32) -> Option<(u64, u64)> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let rest = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?;
    let mut words = rest.split_whitespace();
    let soft = words.next()?.parse().ok()?;
    let hard = words.next()?.parse().ok()?;
    Some((soft, hard))
}

/// The resident set size (`VmRSS`) of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmRSS:")
}

/// The peak resident set size (`VmHWM`) of process `pid`, KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmHWM:")
}

/// The CPU time (user + system) process `pid` has used, in clock ticks
/// (1/100 s).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_ticks(&stat)
}

/// The parent process id in a `/proc/PID/stat` text.
pub fn stat_parent(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The processes whose parent is `pid` (nginx's workers under its master).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| stat_parent(&stat))
                == Some(pid)
        })
        .collect()
}

/// `pid` and its children: the processes of one server.
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    all.extend(children(pid));
    all
}

/// The summed CPU ticks of `pids` (those still there).
pub fn cpu_ticks_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&pid| cpu_ticks(pid)).sum()
}

/// The summed `VmRSS` of `pids`, KiB.
pub fn rss_kib_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&pid| rss_kib(pid)).sum()
}

/// A fresh directory under the system's temporary directory, removed with
/// everything in it when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_parent_and_this_process() {
        let stat = "42 (a b) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(stat_parent(stat), Some(7));
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(cpu_ticks(me).is_some());
        assert!(open_files_limits(me).is_some_and(|(soft, hard)| soft <= hard));
    }

    #[test]
    fn a_temporary_directory_goes_away() {
        let dir = TempDir::new("patient-bench-test").unwrap();
        let path = dir.path().to_owned();
        fs::write(path.join("f"), "x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }
}
