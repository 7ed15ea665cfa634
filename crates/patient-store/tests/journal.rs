//! The SQLite task journal: its contract on a real file, a full file, and a
//! processor killed with SIGKILL mid-run whose successor takes up its tasks.
//!
//! The crash tests run this test binary again as a child process (the test
//! `journal_child_process`, selected by an environment variable): the child
//! runs a processor with the journal against an upstream the parent owns,
//! and is killed with `kill -9` while requests are in flight.
#![cfg(feature = "sql")]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Mutex},
    thread,
    time::{Duration, Instant},
};

use patient_http::{
    journal::INTERRUPTED_CLASS, Config, JournalChange, JournalEntry, JournalRecovery, Outcome,
    Processor, Request, Response, Task, TaskError, TaskHandler, TaskJournal,
};
use patient_store::journal::SqliteJournal;
use patient_testkit::Upstream;

const WAIT: Duration = Duration::from_secs(20);
/// Set (to a directory) in the child process only.
const CHILD_DIR: &str = "PATIENT_JOURNAL_TEST_CHILD_DIR";
/// The upstream's base URL, for the child.
const CHILD_UPSTREAM: &str = "PATIENT_JOURNAL_TEST_UPSTREAM";
/// The child's tasks: finished before the kill; in flight at the kill (held
/// by the upstream); queued behind `max_in_flight`, never started. Each kind
/// has as many GETs as POSTs without an idempotency key.
const FAST: usize = 4;
const SLOW: usize = 3;
const QUEUED: usize = 3;

/// A directory of its own for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "patient-journal-{name}-{}-{nanos:x}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn upstream() -> (Upstream, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(Upstream::start()).unwrap();
    (up, rt)
}

fn task(url: &str, id: &str) -> Task {
    Task::new(Request::get(url).build().unwrap(), "JournalCallback").with_id(id)
}

fn entry(id: &str) -> JournalEntry {
    JournalEntry::for_task(&task("https://api.example.com/items", id))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// Text that gzip barely shrinks.
fn noise(len: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

#[test]
fn records_marks_removes_and_keeps_entries_across_reopening() {
    let dir = TempDir::new("contract");
    let path = dir.path("journal.db");
    let mut journal = SqliteJournal::open(&path).unwrap();
    assert_eq!(journal.name(), format!("sqlite:{}", path.display()));
    assert_eq!(journal.table(), "patient_task_journal");
    assert!(journal.pending().unwrap().is_empty());

    let (a, b, c) = (entry("a"), entry("b"), entry("c"));
    journal.record(&a).unwrap();
    journal.record(&b).unwrap();
    journal.mark_started(&b.id).unwrap();
    journal
        .write_batch(&[
            JournalChange::Record(c.clone()),
            JournalChange::Remove(a.id.clone()),
            // Changes to entries that are not there do nothing.
            JournalChange::Started("no-such-entry".into()),
            JournalChange::Remove("no-such-entry".into()),
        ])
        .unwrap();
    let started_b = JournalEntry {
        started: true,
        ..b.clone()
    };
    assert_eq!(
        journal.pending().unwrap(),
        vec![started_b.clone(), c.clone()]
    );

    // Durable: a new connection (a new process) finds the same.
    drop(journal);
    let mut journal = SqliteJournal::open(&path).unwrap();
    let left = journal.pending().unwrap();
    assert_eq!(left, vec![started_b, c.clone()]);
    assert_eq!(left[1].to_task().unwrap().id, "c");

    // Recording an entry again replaces it whole, started mark included,
    // and keeps its place.
    journal.record(&b).unwrap();
    assert_eq!(journal.pending().unwrap(), vec![b.clone(), c.clone()]);
    journal.remove(&b.id).unwrap();
    journal.remove(&c.id).unwrap();
    assert!(journal.pending().unwrap().is_empty());

    // Large batches, written a few rows a statement, keep their order.
    let many: Vec<JournalEntry> = (0..85).map(|i| entry(&format!("t{i}"))).collect();
    let records: Vec<JournalChange> = many.iter().cloned().map(JournalChange::Record).collect();
    journal.write_batch(&records).unwrap();
    let mut changes: Vec<JournalChange> = many
        .iter()
        .step_by(2)
        .map(|e| JournalChange::Remove(e.id.clone()))
        .collect();
    changes.extend(
        many.iter()
            .skip(1)
            .step_by(10)
            .map(|e| JournalChange::Started(e.id.clone())),
    );
    journal.write_batch(&changes).unwrap();
    let expected: Vec<JournalEntry> = many
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(i, e)| JournalEntry {
            started: i % 10 == 1,
            ..e.clone()
        })
        .collect();
    assert_eq!(journal.pending().unwrap(), expected);
}

#[tokio::test]
async fn opens_and_writes_from_inside_an_async_runtime() {
    let dir = TempDir::new("async");
    let mut journal = SqliteJournal::open(dir.path("journal.db")).unwrap();
    let e = entry("a");
    journal.record(&e).unwrap();
    assert_eq!(journal.pending().unwrap(), vec![e]);
}

#[test]
fn a_batch_that_does_not_fit_writes_nothing() {
    let dir = TempDir::new("atomic");
    let path = dir.path("journal.db");
    let mut journal = SqliteJournal::builder(&path)
        .max_size(64 * 1024)
        .open()
        .unwrap();
    let small = entry("small");
    let mut huge = entry("huge");
    huge.task = noise(256 * 1024);
    let e = journal
        .write_batch(&[
            JournalChange::Record(small.clone()),
            JournalChange::Started(small.id.clone()),
            JournalChange::Record(huge),
        ])
        .unwrap_err();
    assert_eq!(e.journal(), format!("sqlite:{}", path.display()));
    assert!(chain(&e).contains("full"), "{}", chain(&e));
    assert!(
        journal.pending().unwrap().is_empty(),
        "half a batch was written"
    );
    journal.record(&small).unwrap();
    assert_eq!(journal.pending().unwrap(), vec![small]);
}

#[test]
fn enqueue_refuses_tasks_naming_the_journal_when_its_file_is_full() {
    let (up, _rt) = upstream();
    let dir = TempDir::new("full");
    let path = dir.path("journal.db");
    let journal = SqliteJournal::builder(&path)
        .max_size(96 * 1024)
        .open()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .config(
            Config::builder()
                .shutdown_timeout(Duration::ZERO)
                .build()
                .unwrap(),
        )
        .journal(journal)
        .build(tx)
        .unwrap();
    p.start().unwrap();

    // Large PUTs held by the upstream fill the file until one does not fit.
    let body = noise(20 * 1024);
    let mut accepted = Vec::new();
    let refused = loop {
        let request = Request::put(up.url("/delay?ms=30000"))
            .header("content-type", "text/plain")
            .body(body.clone())
            .build()
            .unwrap();
        let t = Task::new(request, "JournalCallback");
        let id = t.id.clone();
        match p.enqueue(t) {
            Ok(()) => accepted.push(id),
            Err(e) => break (e, id),
        }
        assert!(accepted.len() < 10, "the file never filled up");
    };
    let (error, id) = refused;
    assert!(!accepted.is_empty());
    assert!(error.is_journal(), "{error:?}");
    let text = chain(&error);
    assert!(
        text.contains(&format!("sqlite:{}", path.display())),
        "{text}"
    );
    assert!(text.contains("full"), "{text}");
    assert_eq!(error.into_task().id, id);

    wait_until("the accepted requests are in flight", || {
        up.requests_to("/delay") == accepted.len() as u64
    });
    // Stopping hands them back and frees their room.
    p.stop(None);
    let mut back = BTreeSet::new();
    for _ in 0..accepted.len() {
        match rx.recv_timeout(WAIT).unwrap() {
            Outcome::Retry(task) => back.insert(task.id),
            other => panic!("expected a retry, got {other:?}"),
        };
    }
    assert_eq!(back, accepted.iter().cloned().collect());
    assert!(rx.try_recv().is_err(), "the refused task has no outcome");
    assert_eq!(up.requests_to("/delay"), accepted.len() as u64);

    p.start().unwrap();
    p.enqueue(Task::new(
        Request::get(up.url("/fast")).build().unwrap(),
        "C",
    ))
    .unwrap();
    assert!(rx.recv_timeout(WAIT).unwrap().is_completed());
    p.stop(None);
    assert!(SqliteJournal::open(&path)
        .unwrap()
        .pending()
        .unwrap()
        .is_empty());
}

// ---------------------------------------------------------------------------
// kill -9

/// Writes the id of every outcome to a file, one a line, before returning.
struct DeliveryLog(Mutex<File>);

impl DeliveryLog {
    fn log(&self, id: &str) {
        let mut file = self.0.lock().unwrap();
        writeln!(file, "{id}").unwrap();
    }
}

impl TaskHandler for DeliveryLog {
    fn on_complete(&self, response: Response, _: &str) {
        self.log(&response.request_id);
    }
    fn on_error(&self, error: TaskError, _: &str) {
        self.log(error.request_id());
    }
    fn retry(&self, task: Task) {
        self.log(&task.id);
    }
}

/// The task whose id is `key`, to `/sequence?key=key`: held 10 minutes on
/// its first request when `hold`, answered at once after that.
fn keyed(base: &str, key: &str, hold: bool) -> Task {
    let delays = if hold { "600000,0" } else { "0" };
    let url = format!("{base}/sequence?key={key}&delays={delays}");
    let request = if key.contains("post") {
        Request::post(url).json(&serde_json::json!({"key": key}))
    } else {
        Request::get(url)
    };
    Task::new(request.build().unwrap(), "JournalCallback").with_id(key)
}

fn keys(kind: &str, n: usize) -> Vec<String> {
    (0..n)
        .flat_map(|i| [format!("{kind}-get-{i}"), format!("{kind}-post-{i}")])
        .collect()
}

/// The child's side: runs only when a crash test started this binary with
/// the child's environment.
#[test]
fn journal_child_process() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let base = std::env::var(CHILD_UPSTREAM).unwrap();
    let dir = PathBuf::from(dir);
    let journal = SqliteJournal::open(dir.join("journal.db")).unwrap();
    let log = DeliveryLog(Mutex::new(File::create(dir.join("delivered")).unwrap()));
    let config = Config::builder()
        .max_in_flight(Some(2 * SLOW))
        .build()
        .unwrap();
    let p = Processor::builder()
        .config(config)
        .journal(journal)
        .build(log)
        .unwrap();
    p.start().unwrap();
    let mut accepted = File::create(dir.join("accepted")).unwrap();
    let mut enqueue = |task: Task| {
        let id = task.id.clone();
        p.enqueue(task).unwrap();
        writeln!(accepted, "{id}").unwrap();
    };
    for key in keys("fast", FAST) {
        enqueue(keyed(&base, &key, false));
    }
    assert!(p.wait_for_idle(WAIT));
    for key in keys("slow", SLOW) {
        enqueue(keyed(&base, &key, true));
    }
    let deadline = Instant::now() + WAIT;
    while p.counts().in_flight < 2 * SLOW {
        assert!(Instant::now() < deadline, "the slow tasks never started");
        thread::sleep(Duration::from_millis(5));
    }
    for key in keys("queued", QUEUED) {
        enqueue(keyed(&base, &key, false));
    }
    File::create(dir.join("ready")).unwrap();
    loop {
        thread::park();
    }
}

/// Kills the child when dropped, so a failing test leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs the child until its slow tasks are in flight and its queued ones
/// wait, kills it with SIGKILL, and returns what it accepted and delivered.
fn run_and_kill_child(up: &Upstream, dir: &TempDir) -> (Vec<String>, Vec<String>) {
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["journal_child_process", "--exact", "--nocapture"])
        .env(CHILD_DIR, &dir.0)
        .env(CHILD_UPSTREAM, up.url(""))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);

    let fast = keys("fast", FAST);
    let slow = keys("slow", SLOW);
    let queued = keys("queued", QUEUED);
    wait_until("the child's slow requests are in flight", || {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the child ended early: {status}");
        }
        dir.path("ready").exists() && fast.iter().chain(&slow).all(|k| up.sequence_count(k) == 1)
    });
    // What the journal holds at the kill: the slow and queued tasks, the
    // slow POSTs marked started (before they were sent); the fast ones were
    // removed once delivered.
    let journal_path = dir.path("journal.db");
    wait_until("the journal holds exactly the unfinished tasks", || {
        let pending = SqliteJournal::open(&journal_path)
            .unwrap()
            .pending()
            .unwrap();
        let ids: BTreeSet<&str> = pending.iter().map(|e| e.task_id.as_str()).collect();
        let expected: BTreeSet<&str> = slow.iter().chain(&queued).map(String::as_str).collect();
        ids == expected
            && pending
                .iter()
                .all(|e| e.started == (e.task_id.starts_with("slow-post")))
    });
    assert!(queued.iter().all(|k| up.sequence_count(k) == 0));

    // SIGKILL: no destructor, no stop, no flush runs in the child.
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert!(!status.success());

    let accepted = lines(&dir.path("accepted"));
    let delivered = lines(&dir.path("delivered"));
    let all: Vec<String> = fast.iter().chain(&slow).chain(&queued).cloned().collect();
    assert_eq!(
        accepted.iter().collect::<BTreeSet<_>>(),
        all.iter().collect::<BTreeSet<_>>()
    );
    assert_eq!(
        delivered.iter().collect::<BTreeSet<_>>(),
        fast.iter().collect::<BTreeSet<_>>()
    );
    (accepted, delivered)
}

/// Starts a processor on the dead child's journal and collects one outcome
/// per task it left, checking that no task comes back twice.
fn recover(dir: &TempDir, recovery: JournalRecovery, expected: usize) -> BTreeMap<String, Outcome> {
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .journal(SqliteJournal::open(dir.path("journal.db")).unwrap())
        .journal_recovery(recovery)
        .build(tx)
        .unwrap();
    p.start().unwrap();
    let mut got = BTreeMap::new();
    for _ in 0..expected {
        let outcome = rx
            .recv_timeout(WAIT)
            .expect("an outcome for every task left");
        let id = outcome.task_id().to_owned();
        assert!(
            got.insert(id.clone(), outcome).is_none(),
            "{id} came back twice"
        );
    }
    p.stop(None);
    assert!(rx.try_recv().is_err(), "more outcomes than tasks left");
    // Every outcome delivered: the journal is empty.
    let left = SqliteJournal::open(dir.path("journal.db"))
        .unwrap()
        .pending()
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    got
}

fn assert_interrupted(outcome: &Outcome) {
    match outcome {
        Outcome::Failed {
            error: TaskError::Request(e),
            callback,
        } => {
            assert_eq!(e.class_name, INTERRUPTED_CLASS);
            assert_eq!(callback, "JournalCallback");
        }
        other => panic!("expected an interrupted error, got {other:?}"),
    }
}

fn unfinished(accepted: &[String], delivered: &[String]) -> BTreeSet<String> {
    let delivered: BTreeSet<&String> = delivered.iter().collect();
    accepted
        .iter()
        .filter(|id| !delivered.contains(id))
        .cloned()
        .collect()
}

#[test]
fn after_kill_9_the_next_processor_reruns_the_unfinished_tasks_and_never_resends_a_started_post() {
    let (up, _rt) = upstream();
    let dir = TempDir::new("rerun");
    let (accepted, delivered) = run_and_kill_child(&up, &dir);
    let left = unfinished(&accepted, &delivered);
    let got = recover(&dir, JournalRecovery::Rerun, left.len());
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), left);

    let mut sent = HashMap::new();
    for (id, outcome) in &got {
        if id.starts_with("slow-post") {
            // It may have reached the upstream: ended, not sent again.
            assert_interrupted(outcome);
        } else {
            match outcome {
                Outcome::Completed { response, .. } => assert_eq!(response.status, 200, "{id}"),
                other => panic!("{id}: expected a response, got {other:?}"),
            }
        }
        sent.insert(id.clone(), up.sequence_count(id));
    }
    for key in keys("slow", SLOW) {
        let expected = if key.contains("get") { 2 } else { 1 };
        assert_eq!(sent[&key], expected, "{key}");
    }
    // Queued POSTs had never been sent: run once, now.
    for key in keys("queued", QUEUED) {
        assert_eq!(sent[&key], 1, "{key}");
    }
    // Delivered before the kill: not run again.
    for key in keys("fast", FAST) {
        assert_eq!(up.sequence_count(&key), 1, "{key}");
    }
}

#[test]
fn after_kill_9_the_retry_policy_hands_the_unfinished_tasks_back() {
    let (up, _rt) = upstream();
    let dir = TempDir::new("retry");
    let (accepted, delivered) = run_and_kill_child(&up, &dir);
    let left = unfinished(&accepted, &delivered);
    let got = recover(&dir, JournalRecovery::Retry, left.len());
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), left);
    for (id, outcome) in &got {
        if id.starts_with("slow-post") {
            assert_interrupted(outcome);
        } else {
            match outcome {
                Outcome::Retry(task) => {
                    assert_eq!(&task.id, id);
                    assert_eq!(task.callback, "JournalCallback");
                    assert_eq!(
                        task.request.to_json(),
                        keyed(&up.url(""), id, id.starts_with("slow"))
                            .request
                            .to_json()
                    );
                }
                other => panic!("{id}: expected a retry, got {other:?}"),
            }
        }
    }
    // Nothing was sent by the new processor.
    for key in keys("slow", SLOW) {
        assert_eq!(up.sequence_count(&key), 1, "{key}");
    }
    for key in keys("queued", QUEUED) {
        assert_eq!(up.sequence_count(&key), 0, "{key}");
    }
}

// ---------------------------------------------------------------------------
// Throughput, measured by hand:
// cargo test --release -p patient-store --test journal -- --ignored --nocapture

#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn enqueue_throughput_with_and_without_the_journal() {
    const N: usize = 10_000;
    let (up, _rt) = upstream();
    let dir = TempDir::new("throughput");
    let url = up.url("/fast");
    let run = |label: &str, journal: Option<SqliteJournal>, threads: usize, batch: usize| {
        let (tx, rx) = mpsc::channel::<Outcome>();
        let config = Config::builder().max_connections(N + 1).build().unwrap();
        let mut builder = Processor::builder().config(config);
        if let Some(journal) = journal {
            builder = builder.journal(journal);
        }
        let p = builder.build(tx).unwrap();
        p.start().unwrap();
        let started = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (p, url) = (p.clone(), url.clone());
                thread::spawn(move || {
                    let task = || Task::new(Request::get(&url).build().unwrap(), "C");
                    if batch == 1 {
                        for _ in 0..N / threads {
                            p.enqueue(task()).unwrap();
                        }
                    } else {
                        for _ in 0..N / threads / batch {
                            let refused = p.enqueue_batch((0..batch).map(|_| task()));
                            assert!(refused.is_empty());
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let took = started.elapsed();
        for _ in 0..N {
            rx.recv_timeout(Duration::from_secs(120)).unwrap();
        }
        let all_done = started.elapsed();
        p.stop(None);
        let how = if batch == 1 {
            format!("{threads} thread(s), enqueue")
        } else {
            format!("{threads} thread(s), enqueue_batch of {batch}")
        };
        println!(
            "{label:<42} {how:<36} {N} enqueued in {:>7.0} ms = {:>7.0}/s; all outcomes in {:>6.0} ms",
            took.as_secs_f64() * 1e3,
            N as f64 / took.as_secs_f64(),
            all_done.as_secs_f64() * 1e3,
        );
    };
    for (threads, batch) in [(1, 1), (8, 1), (1, 100)] {
        run("no journal", None, threads, batch);
        let path = dir.path(&format!("full-{threads}-{batch}.db"));
        run(
            "SQLite journal, fsync on commit (default)",
            Some(SqliteJournal::open(&path).unwrap()),
            threads,
            batch,
        );
        let path = dir.path(&format!("normal-{threads}-{batch}.db"));
        run(
            "SQLite journal, sync_on_commit(false)",
            Some(
                SqliteJournal::builder(&path)
                    .sync_on_commit(false)
                    .open()
                    .unwrap(),
            ),
            threads,
            batch,
        );
    }
}
