//! The processor's task journal contract, against a real upstream, with an
//! in-memory journal whose writes the tests can slow down, hold or fail
//! (the SQLite journal and the crash itself are tested in patient-store).

use std::{
    collections::HashMap,
    sync::{mpsc, Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use patient_http::{
    journal::INTERRUPTED_CLASS, retry::RetryPolicy, Config, ErrorType, JournalChange, JournalEntry,
    JournalError, JournalRecovery, Outcome, Processor, ProcessorError, Request, RequestOptions,
    ResilienceConfig, Response, Task, TaskError, TaskHandler, TaskJournal,
};
use patient_testkit::Upstream;

const WAIT: Duration = Duration::from_secs(10);
const NAME: &str = "memory journal";

/// Starts an upstream on a runtime of its own that lives as long as the test.
fn upstream() -> (Upstream, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(Upstream::start()).unwrap();
    (up, rt)
}

#[derive(Default)]
struct State {
    entries: Vec<JournalEntry>,
    fail_records: bool,
    fail_started: bool,
    fail_pending: bool,
    /// While set, `mark_started` waits for a message on it.
    hold_started: Option<mpsc::Receiver<()>>,
    /// Signalled when `mark_started` is called.
    started_called: Option<mpsc::Sender<String>>,
    /// Time each batch takes.
    batch_delay: Duration,
    /// The size of every batch written.
    batches: Vec<usize>,
    /// The records in every batch that had some.
    record_batches: Vec<usize>,
}

/// A journal in memory; clones share it, so a test can look inside while a
/// processor owns it.
#[derive(Clone, Default)]
struct MemoryJournal(Arc<Mutex<State>>);

impl MemoryJournal {
    fn with_entries(entries: Vec<JournalEntry>) -> MemoryJournal {
        let journal = MemoryJournal::default();
        journal.state().entries = entries;
        journal
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn entries(&self) -> Vec<JournalEntry> {
        self.state().entries.clone()
    }

    fn entry_of(&self, task_id: &str) -> Option<JournalEntry> {
        self.entries().into_iter().find(|e| e.task_id == task_id)
    }

    fn fail(action: String) -> JournalError {
        JournalError::new(NAME, action, "no space left on device")
    }

    fn apply(&self, change: &JournalChange) -> Result<(), JournalError> {
        match change {
            JournalChange::Record(entry) => {
                let mut state = self.state();
                if state.fail_records {
                    return Err(Self::fail(format!("record task {}", entry.task_id)));
                }
                state.entries.retain(|e| e.id != entry.id);
                state.entries.push(entry.clone());
            }
            JournalChange::Started(id) => {
                let (hold, called) = {
                    let mut state = self.state();
                    if state.fail_started {
                        return Err(Self::fail(format!("mark entry {id} started")));
                    }
                    (state.hold_started.take(), state.started_called.clone())
                };
                if let Some(called) = called {
                    let _ = called.send(id.clone());
                }
                if let Some(hold) = hold {
                    let _ = hold.recv();
                }
                let mut state = self.state();
                if let Some(e) = state.entries.iter_mut().find(|e| e.id == *id) {
                    e.started = true;
                }
            }
            JournalChange::Remove(id) => self.state().entries.retain(|e| e.id != *id),
        }
        Ok(())
    }
}

impl TaskJournal for MemoryJournal {
    fn name(&self) -> String {
        NAME.to_owned()
    }

    fn record(&mut self, entry: &JournalEntry) -> Result<(), JournalError> {
        self.apply(&JournalChange::Record(entry.clone()))
    }

    fn mark_started(&mut self, entry_id: &str) -> Result<(), JournalError> {
        self.apply(&JournalChange::Started(entry_id.to_owned()))
    }

    fn remove(&mut self, entry_id: &str) -> Result<(), JournalError> {
        self.apply(&JournalChange::Remove(entry_id.to_owned()))
    }

    fn pending(&mut self) -> Result<Vec<JournalEntry>, JournalError> {
        let state = self.state();
        if state.fail_pending {
            return Err(Self::fail("read pending tasks".into()));
        }
        Ok(state.entries.clone())
    }

    fn write_batch(&mut self, changes: &[JournalChange]) -> Result<(), JournalError> {
        let delay = {
            let mut state = self.state();
            state.batches.push(changes.len());
            let records = changes
                .iter()
                .filter(|c| matches!(c, JournalChange::Record(_)))
                .count();
            if records > 0 {
                state.record_batches.push(records);
            }
            state.batch_delay
        };
        thread::sleep(delay);
        changes.iter().try_for_each(|c| self.apply(c))
    }
}

fn get(url: &str) -> Task {
    Task::new(Request::get(url).build().unwrap(), "JournalCallback")
}

fn post(url: &str) -> Task {
    Task::new(
        Request::post(url)
            .json(&serde_json::json!({"n": 1}))
            .build()
            .unwrap(),
        "JournalCallback",
    )
}

fn processor(
    journal: MemoryJournal,
    recovery: JournalRecovery,
) -> (Processor, mpsc::Receiver<Outcome>) {
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .journal(journal)
        .journal_recovery(recovery)
        .build(tx)
        .unwrap();
    (p, rx)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
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

fn outcomes(rx: &mpsc::Receiver<Outcome>, n: usize) -> HashMap<String, Outcome> {
    let mut by_id = HashMap::new();
    for _ in 0..n {
        let outcome = rx.recv_timeout(WAIT).expect("an outcome");
        let id = outcome.task_id().to_owned();
        assert!(
            by_id.insert(id.clone(), outcome).is_none(),
            "{id} came back twice"
        );
    }
    by_id
}

fn response(outcome: &Outcome) -> &Response {
    match outcome {
        Outcome::Completed { response, .. } => response,
        other => panic!("expected a response, got {other:?}"),
    }
}

fn interrupted(outcome: &Outcome) -> &patient_http::RequestError {
    match outcome {
        Outcome::Failed {
            error: TaskError::Request(e),
            ..
        } => {
            assert_eq!(e.class_name, INTERRUPTED_CLASS, "{e:?}");
            e
        }
        other => panic!("expected an interrupted error, got {other:?}"),
    }
}

#[test]
fn enqueue_records_the_task_and_removes_it_after_the_handler_returned() {
    let (up, _rt) = upstream();
    let journal = MemoryJournal::default();

    /// Reports, from inside `on_complete`, whether the task was still in the
    /// journal (after a while: a removal sent too early would be written).
    struct Probe {
        journal: MemoryJournal,
        tx: Mutex<mpsc::Sender<(String, bool)>>,
    }
    impl TaskHandler for Probe {
        fn on_complete(&self, response: Response, _: &str) {
            thread::sleep(Duration::from_millis(100));
            let present = self.journal.entry_of(&response.request_id).is_some();
            let _ = self.tx.lock().unwrap().send((response.request_id, present));
        }
        fn on_error(&self, error: TaskError, _: &str) {
            panic!("unexpected error {error}");
        }
        fn retry(&self, task: Task) {
            panic!("unexpected retry of {}", task.id);
        }
    }
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .journal(journal.clone())
        .build(Probe {
            journal: journal.clone(),
            tx: Mutex::new(tx),
        })
        .unwrap();
    p.start().unwrap();

    let g = get(&up.url("/delay?ms=300"));
    let q = post(&up.url("/delay?ms=300"));
    let (g_id, q_id) = (g.id.clone(), q.id.clone());
    p.enqueue(g).unwrap();
    // Recorded before `enqueue` returned.
    let recorded = journal.entry_of(&g_id).expect("the GET is in the journal");
    assert!(!recorded.started);
    let task = recorded.to_task().unwrap();
    assert_eq!(task.request.url().as_str(), up.url("/delay?ms=300"));
    p.enqueue(q).unwrap();
    assert!(journal.entry_of(&q_id).is_some());

    // While both are in flight: the POST, not safe to send twice, was marked
    // started before it was sent; the GET needs no mark.
    wait_until("both requests reached the upstream", || {
        up.requests_to("/delay") == 2
    });
    assert!(journal.entry_of(&q_id).unwrap().started);
    assert!(!journal.entry_of(&g_id).unwrap().started);

    let mut seen = HashMap::new();
    for _ in 0..2 {
        let (id, present) = rx.recv_timeout(WAIT).unwrap();
        seen.insert(id, present);
    }
    assert_eq!(
        seen.get(&g_id),
        Some(&true),
        "still journaled during on_complete"
    );
    assert_eq!(
        seen.get(&q_id),
        Some(&true),
        "still journaled during on_complete"
    );

    // `stop` returns once every removal is written.
    p.stop(None);
    assert!(journal.entries().is_empty(), "{:?}", journal.entries());

    // The journal comes back for the next run, and nothing is left to take up.
    p.start().unwrap();
    p.enqueue(get(&up.url("/fast"))).unwrap();
    assert!(rx.recv_timeout(WAIT).unwrap().1);
    p.stop(None);
    assert!(journal.entries().is_empty());
}

#[test]
fn the_started_mark_is_written_before_the_request_is_sent() {
    let (up, _rt) = upstream();
    let journal = MemoryJournal::default();
    let (release, hold) = mpsc::channel();
    let (called_tx, called) = mpsc::channel();
    {
        let mut state = journal.state();
        state.hold_started = Some(hold);
        state.started_called = Some(called_tx);
    }
    let (p, rx) = processor(journal.clone(), JournalRecovery::default());
    p.start().unwrap();
    let task = post(&up.url("/fast"));
    let id = task.id.clone();
    p.enqueue(task).unwrap();

    // The mark is being written and is held there: the request waits.
    let entry_id = called.recv_timeout(WAIT).unwrap();
    assert_eq!(journal.entry_of(&id).unwrap().id, entry_id);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(up.requests(), 0, "sent before its started mark was written");

    release.send(()).unwrap();
    assert_eq!(response(&rx.recv_timeout(WAIT).unwrap()).status, 200);
    assert_eq!(up.requests(), 1);
    p.stop(None);
    assert!(journal.entries().is_empty());
}

#[test]
fn enqueue_refuses_the_task_naming_the_journal_when_it_cannot_record_it() {
    let (up, _rt) = upstream();
    let journal = MemoryJournal::default();
    journal.state().fail_records = true;
    let (p, rx) = processor(journal.clone(), JournalRecovery::default());
    p.start().unwrap();

    let task = get(&up.url("/fast"));
    let id = task.id.clone();
    let error = p.enqueue(task).unwrap_err();
    assert!(error.is_journal(), "{error:?}");
    assert!(!error.is_at_capacity() && !error.is_not_running());
    assert!(error.to_string().contains(NAME), "{error}");
    let text = chain(&error);
    assert!(text.contains("no space left on device"), "{text}");
    assert!(text.contains(&format!("record task {id}")), "{text}");
    assert_eq!(error.journal_error().map(|e| e.journal()), Some(NAME));
    // The task comes back whole, and was not accepted.
    assert_eq!(error.into_task().id, id);
    assert_eq!(p.counts().pending, 0);

    // Once the journal writes again, so does enqueue.
    journal.state().fail_records = false;
    p.enqueue(get(&up.url("/fast"))).unwrap();
    assert!(rx.recv_timeout(WAIT).unwrap().is_completed());
    p.stop(None);
    // The refused task was never sent, and nothing else came back.
    assert_eq!(up.requests(), 1);
    assert!(rx.try_recv().is_err());
    assert!(journal.entries().is_empty());
}

#[test]
fn a_task_whose_started_mark_fails_goes_back_unsent() {
    let (up, _rt) = upstream();
    let journal = MemoryJournal::default();
    journal.state().fail_started = true;
    let (p, rx) = processor(journal.clone(), JournalRecovery::default());
    p.start().unwrap();

    let unsafe_post = post(&up.url("/fast"));
    let id = unsafe_post.id.clone();
    p.enqueue(unsafe_post).unwrap();
    match rx.recv_timeout(WAIT).unwrap() {
        Outcome::Retry(task) => assert_eq!(task.id, id),
        other => panic!("expected a retry, got {other:?}"),
    }
    assert_eq!(up.requests(), 0);

    // A GET needs no mark and runs.
    p.enqueue(get(&up.url("/fast"))).unwrap();
    assert!(rx.recv_timeout(WAIT).unwrap().is_completed());
    p.stop(None);
    assert!(journal.entries().is_empty());
}

/// What a crashed run left: entries as its journal holds them.
fn left_behind(up: &Upstream) -> (Vec<JournalEntry>, HashMap<&'static str, String>) {
    let mut ids = HashMap::new();
    let mut entries = Vec::new();
    let mut leave = |name: &'static str, task: Task, started: bool| {
        let mut entry = JournalEntry::for_task(&task.with_id(format!("task-{name}")));
        entry.started = started;
        ids.insert(name, entry.task_id.clone());
        entries.push(entry);
    };
    let seq = |key: &str| up.url(&format!("/sequence?key={key}"));
    leave("get-started", get(&seq("get-started")), true);
    leave("post-started", post(&seq("post-started")), true);
    leave("post-queued", post(&seq("post-queued")), false);
    let keyed = Request::post(seq("post-keyed"))
        .idempotency_key("k-1")
        .build()
        .unwrap();
    leave("post-keyed", Task::new(keyed, "JournalCallback"), true);
    let opted_in = Request::post(seq("post-opted-in"))
        .request_options(RequestOptions {
            upstream_key: Some("unsafe-ok".into()),
            ..RequestOptions::default()
        })
        .build()
        .unwrap();
    leave(
        "post-opted-in",
        Task::new(opted_in, "JournalCallback"),
        true,
    );
    (entries, ids)
}

fn retry_unsafe_upstream() -> ResilienceConfig {
    ResilienceConfig::builder()
        .upstream("unsafe-ok", |p| {
            p.retry(Some(
                RetryPolicy::builder().retry_unsafe(true).build().unwrap(),
            ))
        })
        .build()
        .unwrap()
}

#[test]
fn start_reruns_what_a_crash_left_and_interrupts_started_unsafe_requests() {
    let (up, _rt) = upstream();
    let (mut entries, ids) = left_behind(&up);
    let mut corrupt = JournalEntry::for_task(&get(&up.url("/fast")));
    corrupt.task = r#"{"id": "broken", "callback": "C", "request": {"url": 3}}"#.into();
    entries.push(corrupt.clone());
    let journal = MemoryJournal::with_entries(entries);
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .resilience(retry_unsafe_upstream())
        .journal(journal.clone())
        .build(tx)
        .unwrap();
    p.start().unwrap();

    let got = outcomes(&rx, 5);
    // Safe to send again: run again.
    for name in ["get-started", "post-queued", "post-keyed", "post-opted-in"] {
        let r = response(&got[&ids[name]]);
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(up.sequence_count(name), 1, "{name} sent once");
    }
    // Started and not safe to send twice: interrupted, never sent again.
    let e = interrupted(&got[&ids["post-started"]]);
    assert_eq!(e.error_type, ErrorType::Unknown);
    assert_eq!(e.request_id, ids["post-started"]);
    assert_eq!(e.method, patient_http::Method::Post);
    assert_eq!(e.url, up.url("/sequence?key=post-started"));
    assert!(e.message.contains("not idempotent"), "{}", e.message);
    match &got[&ids["post-started"]] {
        Outcome::Failed { callback, .. } => assert_eq!(callback, "JournalCallback"),
        _ => unreachable!(),
    }
    assert_eq!(up.sequence_count("post-started"), 0);

    p.stop(None);
    assert!(rx.try_recv().is_err(), "one outcome per task");
    // Only the entry that does not load is left, for someone to look at.
    assert_eq!(journal.entries(), vec![corrupt]);
}

#[test]
fn start_with_the_retry_policy_hands_the_tasks_back() {
    let (up, _rt) = upstream();
    let (entries, ids) = left_behind(&up);
    let originals: HashMap<String, Task> = entries
        .iter()
        .map(|e| (e.task_id.clone(), e.to_task().unwrap()))
        .collect();
    let journal = MemoryJournal::with_entries(entries);
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .resilience(retry_unsafe_upstream())
        .journal(journal.clone())
        .journal_recovery(JournalRecovery::Retry)
        .build(tx)
        .unwrap();
    p.start().unwrap();

    let got = outcomes(&rx, 5);
    for name in ["get-started", "post-queued", "post-keyed", "post-opted-in"] {
        match &got[&ids[name]] {
            Outcome::Retry(task) => {
                let original = &originals[&ids[name]];
                assert_eq!(task.request, original.request);
                assert_eq!(task.callback, original.callback);
            }
            other => panic!("{name}: expected a retry, got {other:?}"),
        }
    }
    interrupted(&got[&ids["post-started"]]);
    p.stop(None);
    assert_eq!(up.requests(), 0, "nothing is sent");
    assert!(journal.entries().is_empty());
}

#[test]
fn a_task_handed_back_and_enqueued_again_under_its_id_stays_journaled() {
    let (up, _rt) = upstream();
    let left = get(&up.url("/delay?ms=200")).with_id("again");
    let journal = MemoryJournal::with_entries(vec![JournalEntry::for_task(&left)]);

    /// Enqueues every task handed to `retry` again, as the gem's retry does.
    struct Requeue {
        processor: Arc<OnceLock<Processor>>,
        journal: MemoryJournal,
        tx: Mutex<mpsc::Sender<(String, bool)>>,
    }
    impl TaskHandler for Requeue {
        fn on_complete(&self, response: Response, _: &str) {
            let present = self.journal.entry_of(&response.request_id).is_some();
            let _ = self.tx.lock().unwrap().send((response.request_id, present));
        }
        fn on_error(&self, error: TaskError, _: &str) {
            panic!("unexpected error {error}");
        }
        fn retry(&self, task: Task) {
            self.processor.get().unwrap().enqueue(task).unwrap();
        }
    }
    let cell = Arc::new(OnceLock::new());
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .journal(journal.clone())
        .journal_recovery(JournalRecovery::Retry)
        .build(Requeue {
            processor: Arc::clone(&cell),
            journal: journal.clone(),
            tx: Mutex::new(tx),
        })
        .unwrap();
    cell.set(p.clone()).ok().unwrap();
    p.start().unwrap();

    // The first entry's removal (after `retry` returned) leaves the second
    // acceptance of the same task id alone.
    let (id, present) = rx.recv_timeout(WAIT).unwrap();
    assert_eq!(id, "again");
    assert!(
        present,
        "the task enqueued again was dropped from the journal"
    );
    p.stop(None);
    assert!(journal.entries().is_empty());
    assert_eq!(up.requests_to("/delay"), 1);
}

#[test]
fn stop_hands_unfinished_tasks_to_retry_and_clears_them_from_the_journal() {
    let (up, _rt) = upstream();
    let journal = MemoryJournal::default();
    let (p, rx) = processor(journal.clone(), JournalRecovery::default());
    p.start().unwrap();
    let task = get(&up.url("/delay?ms=5000"));
    let id = task.id.clone();
    p.enqueue(task).unwrap();
    wait_until("the request is in flight", || up.requests() == 1);
    p.stop(Some(Duration::from_millis(50)));
    match rx.recv_timeout(WAIT).unwrap() {
        Outcome::Retry(task) => assert_eq!(task.id, id),
        other => panic!("expected a retry, got {other:?}"),
    }
    // Handed to the application: no longer the journal's.
    assert!(journal.entries().is_empty());
}

#[test]
fn start_fails_when_the_journal_cannot_be_read_and_works_once_it_can() {
    let (up, _rt) = upstream();
    let left = get(&up.url("/fast"));
    let id = left.id.clone();
    let journal = MemoryJournal::with_entries(vec![JournalEntry::for_task(&left)]);
    journal.state().fail_pending = true;
    let (p, rx) = processor(journal.clone(), JournalRecovery::default());
    match p.start() {
        Err(ProcessorError::Journal(e)) => {
            assert_eq!(e.journal(), NAME);
            assert_eq!(e.action(), "read pending tasks");
        }
        other => panic!("expected a journal error, got {other:?}"),
    }
    assert!(p.is_stopped());
    assert!(p
        .enqueue(get(&up.url("/fast")))
        .unwrap_err()
        .is_not_running());

    journal.state().fail_pending = false;
    p.start().unwrap();
    assert_eq!(response(&rx.recv_timeout(WAIT).unwrap()).request_id, id);
    p.stop(None);
    assert!(journal.entries().is_empty());
}

#[test]
fn records_from_threads_enqueuing_at_once_share_a_write() {
    let (up, _rt) = upstream();
    let journal = MemoryJournal::default();
    journal.state().batch_delay = Duration::from_millis(20);
    let (p, rx) = processor(journal.clone(), JournalRecovery::default());
    p.start().unwrap();
    let url = up.url("/fast");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (p, url) = (p.clone(), url.clone());
            thread::spawn(move || {
                for _ in 0..10 {
                    p.enqueue(get(&url)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    outcomes(&rx, 80);
    p.stop(None);
    let batches = journal.state().batches.clone();
    let records_and_removals: usize = batches.iter().sum();
    assert_eq!(records_and_removals, 160);
    assert!(
        batches.len() < 80,
        "160 changes took {} writes: {batches:?}",
        batches.len()
    );
    assert!(journal.entries().is_empty());
}

#[test]
fn enqueue_batch_records_its_tasks_in_one_write_and_refuses_like_enqueue() {
    let (up, _rt) = upstream();
    let journal = MemoryJournal::default();
    journal.state().batch_delay = Duration::from_millis(20);
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .config(Config::builder().max_connections(50).build().unwrap())
        .journal(journal.clone())
        .build(tx)
        .unwrap();
    let batch = |n: usize, tag: &str| -> Vec<Task> {
        (0..n)
            .map(|i| get(&up.url("/delay?ms=100")).with_id(format!("{tag}-{i}")))
            .collect()
    };

    // Not running: every task comes back.
    let refused = p.enqueue_batch(batch(3, "early"));
    assert_eq!(refused.len(), 3);
    assert!(refused.iter().all(|e| e.is_not_running()));

    p.start().unwrap();
    // 55 tasks for 50 places: the last 5 are refused, in order.
    let refused = p.enqueue_batch(batch(55, "t"));
    let ids: Vec<String> = refused.iter().map(|e| e.task().id.clone()).collect();
    assert_eq!(ids, ["t-50", "t-51", "t-52", "t-53", "t-54"]);
    assert!(refused.iter().all(|e| e.is_at_capacity()));
    let recorded = journal.state().record_batches.clone();
    assert_eq!(recorded.iter().sum::<usize>(), 50);
    assert!(
        recorded.len() <= 3,
        "50 records took {} writes: {recorded:?}",
        recorded.len()
    );
    outcomes(&rx, 50);

    // A journal that fails refuses the whole batch, naming itself.
    journal.state().fail_records = true;
    let refused = p.enqueue_batch(batch(4, "full"));
    assert_eq!(refused.len(), 4);
    assert!(refused.iter().all(|e| e.is_journal()));
    assert_eq!(p.counts().pending, 0);
    p.stop(None);
    assert!(rx.try_recv().is_err());
    assert!(journal.entries().is_empty());
    assert_eq!(up.requests_to("/delay"), 50);
}

#[test]
fn only_the_processor_keeps_a_journal() {
    let (tx, _rx) = mpsc::channel::<Outcome>();
    let e = Processor::builder()
        .journal(MemoryJournal::default())
        .build_inline(tx)
        .err()
        .unwrap();
    assert_eq!(e.field(), "journal");
    let e = Processor::builder()
        .journal(MemoryJournal::default())
        .build_awaitable()
        .err()
        .unwrap();
    assert_eq!(e.field(), "journal");
}
