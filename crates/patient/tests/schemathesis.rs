//! schemathesis drives `patient serve` from its own `/openapi.json`: every
//! check (no server error, statuses, content types, headers and bodies as
//! documented, invalid data refused, valid data accepted, authentication
//! not ignored, ...) must pass. schemathesis 4 runs all its checks unless
//! told otherwise; `tests/schemathesis.toml` turns one off for the submit
//! operations and says why.
//!
//! The generated cases include public host names, so the daemon and
//! schemathesis run inside a network namespace made for the test with only
//! `lo` up: no request and no DNS lookup can leave the machine. The daemon
//! has an API token, which schemathesis sends, so the routes behind it are
//! exercised and not only their `401`.
//!
//! schemathesis comes from `scripts/services.sh` (`PATIENT_TEST_SCHEMATHESIS`);
//! without it, or without the rights to make a namespace, the test is
//! skipped with a notice, except under `CI=true` or
//! `PATIENT_REQUIRE_SERVICES=1`, where that is a failure.

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

/// The daemon's API token in the test.
const TOKEN: &str = "schemathesis-token-7f3a";

/// Test cases per operation and phase.
const MAX_EXAMPLES: &str = "50";

/// The time budget of schemathesis's fuzzing and stateful phases, seconds.
const MAX_TIME: &str = "90";

/// How long the whole schemathesis run may take before the test kills it.
const RUN_LIMIT: Duration = Duration::from_secs(480);

/// The seed of the generated cases, so that a run can be repeated
/// (`PATIENT_SCHEMATHESIS_SEED` picks another).
const SEED: &str = "20261202";

fn required() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
        || std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// Skips (returns `None`, with a notice) or, when the run requires it,
/// fails.
fn unavailable<T>(why: &str) -> Option<T> {
    if required() {
        panic!("the schemathesis test cannot run (CI=true requires it): {why}");
    }
    eprintln!("notice: skipping the schemathesis test: {why}");
    None
}

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path =
            std::env::temp_dir().join(format!("patient-st-{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A network namespace with only `lo` up, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let name = format!("patient-st-{}", std::process::id());
        let run = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip {}: {e}", args.join(" ")))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        // A namespace left by an earlier run of this process id goes first.
        let _ = Command::new("ip")
            .args(["netns", "delete", &name])
            .stderr(Stdio::null())
            .status();
        run(&["netns", "add", &name])?;
        let ns = Netns { name };
        run(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NAME program`.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// The interfaces that are up in the namespace.
    fn links_up(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", "up"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `patient serve` inside `ns` on `127.0.0.1:0` with the token; its port
/// and its log.
fn serve(ns: &Netns, dir: &Path) -> (Killed, u16, Arc<Mutex<String>>) {
    let mut command = ns.command(env!("CARGO_BIN_EXE_patient"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars() {
        if name.starts_with("PATIENT_") {
            command.env_remove(name);
        }
    }
    command
        .env("PATIENT_LOG", "warn")
        .env("PATIENT_API_TOKEN", TOKEN)
        // Generated tasks retry quickly and give up soon.
        .env("PATIENT_RETRY__MAX_ATTEMPTS", "2")
        .env("PATIENT_RETRY__BASE_DELAY", "0.05")
        .env("PATIENT_RETRY__MAX_DELAY", "0.1")
        .env("PATIENT_DELIVERY__MAX_ATTEMPTS", "2")
        .env("PATIENT_DELIVERY__BASE_DELAY", "0.1")
        .env("PATIENT_DELIVERY__MAX_DELAY", "0.2")
        .env("PATIENT_SHUTDOWN_TIMEOUT", "1");
    let mut child = Killed(command.spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let lines = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("patient: listening on http://") {
                let _ = tx.send(addr.to_owned());
            }
            let mut log = lines.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "no listening line from patient serve in the namespace: {}",
                log.lock().unwrap()
            )
        });
    let port = addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {addr}"));
    (child, port, log)
}

/// Waits for `child` up to `limit`; `None` when it ran over (it is then
/// killed by its guard).
fn wait_limited(child: &mut Killed, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.0.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn schemathesis_finds_nothing_in_the_openapi_document_or_the_daemon() {
    let Some(schemathesis) = std::env::var("PATIENT_TEST_SCHEMATHESIS")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| unavailable("PATIENT_TEST_SCHEMATHESIS is not set; start `eval \"$(scripts/services.sh start)\"`"))
    else {
        return;
    };
    let Some(ns) = Netns::create().map_or_else(|e| unavailable(&e), Some) else {
        return;
    };
    // Only the loopback interface is up: nothing can leave the namespace.
    let links = ns.links_up();
    assert!(
        links.lines().all(|l| l.contains(": lo:")) && links.contains(": lo:"),
        "only lo is up in the namespace: {links}"
    );

    let data = TempDir::new("data");
    let work = TempDir::new("work");
    let (mut daemon, port, log) = serve(&ns, data.path());
    let schema = format!("http://127.0.0.1:{port}/openapi.json");
    let seed = std::env::var("PATIENT_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.to_owned());

    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let mut command = ns.command(&schemathesis);
    command
        .args(["--config-file", config, "--no-color", "run", &schema])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--max-examples", MAX_EXAMPLES, "--max-time", MAX_TIME])
        .args(["--seed", &seed, "--workers", "2"])
        .args(["--request-timeout", "10", "--max-failures", "50"])
        .args(["--output-truncate", "false"])
        // Its Hypothesis database and any report stay in the temporary
        // directory.
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut run = Killed(command.spawn().unwrap());
    let mut stdout = run.0.stdout.take().unwrap();
    let mut stderr = run.0.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = wait_limited(&mut run, RUN_LIMIT);
    drop(run);
    let (out, err) = (out.join().unwrap(), err.join().unwrap());

    // The daemon is still serving afterwards: nothing took it down.
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon exited during the run: {}",
        log.lock().unwrap()
    );
    drop(daemon);
    let status = status.unwrap_or_else(|| {
        panic!("schemathesis ran over {RUN_LIMIT:?}:\n{out}\n{err}");
    });
    assert!(
        status.success(),
        "schemathesis found problems ({status}):\n{out}\n{err}\ndaemon log:\n{}",
        log.lock().unwrap()
    );
    // It ran cases, and authenticated ones.
    assert!(
        out.contains("passed") || out.contains("Passed"),
        "schemathesis ran no test:\n{out}\n{err}"
    );
}
