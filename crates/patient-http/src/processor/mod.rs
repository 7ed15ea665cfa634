//! The in-process processor: any thread hands it a task and returns at once;
//! the outcome comes back through the [`TaskHandler`].
//!
//! The processor owns a multi-threaded tokio runtime on threads of its own.
//! `enqueue` checks the state and capacity with atomics and spawns the task on
//! that runtime: it never blocks on I/O (unless a task journal is on: see
//! *Crash recovery*).
//!
//! # Exactly one outcome
//!
//! Each accepted task is owned by a guard from the moment `enqueue` accepts it.
//! The guard hands the task to exactly one of `on_complete`, `on_error` or
//! `retry`: the request's own outcome when it finishes; `retry` when `stop`
//! runs out of time; and `retry` from its `Drop` when the runtime is shut down
//! with the task still in it (queued, not yet polled, or mid-request). The
//! guard gives up the task the first time, so no second outcome can follow.
//! `stop` returns only once every guard has delivered, however long a handler
//! takes.
//!
//! # Crash recovery
//!
//! With a [`TaskJournal`] ([`Builder::journal`]), accepted tasks are also
//! kept on disk until their outcome was delivered, and a processor started
//! after a crash takes up what its predecessor left: it runs those tasks
//! again, or hands them to `retry`, and ends a request that had started and
//! is not safe to send twice with an `Interrupted` error instead of sending
//! it again. Delivery is then at least once across a crash. The
//! [`journal`] module says exactly what is written when.
//!
//! # No lock around user code
//!
//! Handlers and observers are never called with a lock of the processor held:
//! the locks below guard short state changes only. So either may call back
//! into the processor — `enqueue`, `counts`, `start`, `drain`, even `stop` —
//! from any thread without deadlock.

mod error;
mod gate;
pub mod journal;
mod state;

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering},
        Arc, Condvar, Mutex, RwLock,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub use error::{EnqueueError, EnqueueErrorKind, ProcessorError};
pub use journal::{
    JournalChange, JournalEntry, JournalEntryError, JournalError, JournalRecovery, TaskJournal,
};
pub use state::ProcessorState;
use tokio::sync::{mpsc, oneshot};

use self::{
    gate::PriorityGate,
    journal::{error_chain, Fate, JournalLink, JournalSlot, JournalWriter},
};
use crate::{engine::Engine, propagation::Admission, Builder, Outcome, Task, TaskHandler};

std::thread_local! {
    /// The id of the processor whose runtime owns this thread (0: none).
    static PROCESSOR_THREAD: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An in-process processor of tasks. Cheap to clone; every clone is the same
/// processor.
///
/// ```no_run
/// use std::sync::mpsc;
/// use patient_http::{Outcome, Processor, Request, Task};
///
/// let (tx, rx) = mpsc::channel::<Outcome>();
/// let processor = Processor::builder().build(tx)?;
/// processor.start()?;
/// let request = Request::get("https://example.com/").build()?;
/// processor.enqueue(Task::new(request, "ExampleCallback"))?;
/// println!("{:?}", rx.recv()?);
/// processor.stop(None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Processor {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    engine: Arc<Engine>,
    handler: Arc<dyn TaskHandler>,
    state: AtomicU8,
    /// Serializes the state changes of `start`, `drain` and `stop`; held for
    /// the change only, never while waiting for tasks or calling user code.
    lifecycle: Mutex<()>,
    /// Signalled (with `lifecycle`) when a stop has finished.
    stopped_cv: Condvar,
    /// The current run. `enqueue` holds the read guard from its state check
    /// to the hand-over of the task, so once `stop` has taken the run out no
    /// new task can reach it.
    run: RwLock<Option<Arc<Run>>>,
    /// Queued plus in-flight tasks (the capacity count).
    pending: AtomicUsize,
    /// Tasks whose request is being executed.
    in_flight: AtomicUsize,
    completed: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    idle_lock: Mutex<()>,
    idle_cv: Condvar,
    /// Orders tasks by priority when `max_in_flight` is set.
    gate: Option<Arc<PriorityGate>>,
    /// The task journal, if the processor keeps one.
    journal: Option<JournalSlot>,
}

/// One run of the processor: its runtime and the signals to stop it.
struct Run {
    handle: tokio::runtime::Handle,
    /// Tasks handed over from application threads, spawned by the dispatcher.
    queue: mpsc::UnboundedSender<TaskGuard>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The journal thread of this run, if the processor keeps a journal.
    journal: Option<Arc<JournalWriter>>,
}

/// Counts of a processor's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessorCounts {
    /// Tasks queued or in flight (what `max_connections` bounds).
    pub pending: usize,
    /// Tasks whose request is being executed.
    pub in_flight: usize,
    /// Tasks that ended in `on_complete`.
    pub completed: u64,
    /// Tasks that ended in `on_error`.
    pub failed: u64,
    /// Tasks handed to `retry`.
    pub retried: u64,
    /// Panics caught in handlers and observers.
    pub panics: u64,
}

impl ProcessorCounts {
    /// Tasks that have had their outcome.
    pub fn total(&self) -> u64 {
        self.completed + self.failed + self.retried
    }
}

impl Processor {
    /// A builder for the configuration, secrets, preprocessors and observers.
    pub fn builder() -> Builder {
        Builder::new()
    }

    pub(crate) fn from_engine(
        engine: Arc<Engine>,
        handler: Arc<dyn TaskHandler>,
        journal: Option<JournalSlot>,
    ) -> Processor {
        Processor {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                handler,
                state: AtomicU8::new(ProcessorState::Stopped as u8),
                lifecycle: Mutex::new(()),
                stopped_cv: Condvar::new(),
                run: RwLock::new(None),
                pending: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                completed: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                retried: AtomicU64::new(0),
                idle_lock: Mutex::new(()),
                idle_cv: Condvar::new(),
                gate: engine.config.max_in_flight.map(PriorityGate::new),
                engine,
                journal,
            }),
        }
    }

    /// The current lifecycle state.
    pub fn state(&self) -> ProcessorState {
        ProcessorState::from_u8(self.inner.state.load(Ordering::Acquire))
    }

    /// Whether it accepts tasks.
    pub fn is_running(&self) -> bool {
        self.state() == ProcessorState::Running
    }

    /// Whether it is draining.
    pub fn is_draining(&self) -> bool {
        self.state() == ProcessorState::Draining
    }

    /// Whether it is stopped.
    pub fn is_stopped(&self) -> bool {
        self.state() == ProcessorState::Stopped
    }

    /// Whether no task is queued or in flight.
    pub fn is_idle(&self) -> bool {
        self.inner.pending.load(Ordering::Acquire) == 0
    }

    /// Whether it is draining and has no task left.
    pub fn is_drained(&self) -> bool {
        self.is_draining() && self.is_idle()
    }

    /// Counts of its tasks.
    pub fn counts(&self) -> ProcessorCounts {
        let i = &self.inner;
        ProcessorCounts {
            pending: i.pending.load(Ordering::Acquire),
            in_flight: i.in_flight.load(Ordering::Acquire),
            completed: i.completed.load(Ordering::Acquire),
            failed: i.failed.load(Ordering::Acquire),
            retried: i.retried.load(Ordering::Acquire),
            panics: i.engine.panics.load(Ordering::Acquire),
        }
    }

    /// Its metrics, in the Prometheus text format with [`Metrics::render`](crate::metrics::Metrics::render).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.engine.metrics
    }

    /// The health of every upstream it keeps state for: breaker state,
    /// concurrency in use, cool-down, the last minute's attempts and
    /// failures.
    pub fn health(&self) -> crate::HealthSummary {
        self.inner.engine.health()
    }

    /// The health of one upstream (its key: `scheme://host[:port]` or an
    /// `upstream_key`), if state is kept for it.
    pub fn upstream_health(&self, key: &str) -> Option<crate::UpstreamHealth> {
        self.inner.engine.upstream_health(key)
    }

    /// Adds an observer, also while the processor runs: it sees every event
    /// from now on (a `start` already past is not replayed).
    pub fn add_observer(&self, observer: impl crate::ProcessorObserver) {
        self.inner.engine.observers.add(Arc::new(observer));
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &crate::Config {
        &self.inner.engine.config
    }

    /// Starts the runtime and returns when the processor is running. Starting a
    /// running processor does nothing; starting one that is draining or
    /// stopping is an error (stop it first, or wait for the stop under way).
    /// A stopped processor starts again, whatever ended its last run.
    ///
    /// With a task journal, it first reads the tasks an earlier run left
    /// there (an error if that fails: the processor stays stopped), and once
    /// running takes them up as its
    /// [`JournalRecovery`] says (see [`journal`]).
    pub fn start(&self) -> Result<(), ProcessorError> {
        let inner = &self.inner;
        let (run, left) = {
            let _lock = lock(&inner.lifecycle);
            match self.state() {
                ProcessorState::Running | ProcessorState::Starting => return Ok(()),
                state @ (ProcessorState::Draining | ProcessorState::Stopping) => {
                    return Err(ProcessorError::InvalidState {
                        action: "start",
                        state,
                    })
                }
                ProcessorState::Stopped => {}
            }
            inner.set_state(ProcessorState::Starting);
            // Runs no handler or observer: it starts the journal thread and
            // reads what is left, then builds the runtime and waits for it.
            let (writer, left) = match self.open_journal() {
                Ok(opened) => opened,
                Err(e) => {
                    inner.set_state(ProcessorState::Stopped);
                    return Err(ProcessorError::Journal(e));
                }
            };
            let run = match self.spawn_runtime(writer.clone()) {
                Ok(run) => Arc::new(run),
                Err(e) => {
                    if let Some(writer) = writer {
                        writer.close();
                    }
                    inner.set_state(ProcessorState::Stopped);
                    return Err(ProcessorError::Runtime(e));
                }
            };
            *write(&inner.run) = Some(Arc::clone(&run));
            inner.set_state(ProcessorState::Running);
            (run, left)
        };
        tracing::info!(processor = inner.id, "processor started");
        inner.engine.notify(|o| o.on_start());
        if !left.is_empty() {
            self.take_up(&run, left);
        }
        Ok(())
    }

    /// Starts the journal thread of a run and reads the entries left by
    /// earlier runs.
    fn open_journal(
        &self,
    ) -> Result<(Option<Arc<JournalWriter>>, Vec<JournalEntry>), JournalError> {
        let Some(slot) = &self.inner.journal else {
            return Ok((None, Vec::new()));
        };
        let writer = Arc::new(slot.start()?);
        match writer.pending() {
            Ok(left) => Ok((Some(writer), left)),
            Err(e) => {
                writer.close();
                Err(e)
            }
        }
    }

    /// Takes up the tasks an earlier run left in the journal: runs them
    /// again, hands them to `retry` or ends them as interrupted. Each counts
    /// as pending (never refused for capacity) and leaves the journal once
    /// its outcome was delivered, like any task.
    fn take_up(&self, run: &Arc<Run>, left: Vec<JournalEntry>) {
        let inner = &self.inner;
        let (Some(slot), Some(writer)) = (&inner.journal, &run.journal) else {
            return;
        };
        let decided = journal::recover(&inner.engine, slot.recovery, writer.name(), left);
        // Held like `enqueue` holds it: once `stop` has taken the run out,
        // nothing more reaches it.
        let current = read(&inner.run);
        if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, run)) {
            // Stopped before the tasks were taken up: they stay in the
            // journal for the next start.
            return;
        }
        tracing::info!(
            processor = inner.id,
            journal = %writer.name(),
            tasks = decided.len(),
            "taking up the tasks left in the task journal"
        );
        for (entry, task, fate) in decided {
            inner.pending.fetch_add(1, Ordering::AcqRel);
            let mut guard = TaskGuard {
                inner: Arc::clone(inner),
                task: Some(task),
                admitted: Admission::now(),
                journal: Some(JournalLink {
                    writer: Arc::clone(writer),
                    entry_id: entry.id,
                }),
            };
            match fate {
                Fate::Rerun => {
                    run.handle.spawn(run_task(guard));
                }
                Fate::Retry => {
                    run.handle
                        .spawn(async move { guard.deliver(Outcome::Retry) });
                }
                Fate::Interrupted => {
                    let engine = Arc::clone(&inner.engine);
                    run.handle.spawn(async move {
                        guard.deliver(|task| Outcome::Failed {
                            error: journal::interrupted_error(&engine, &task),
                            callback: task.callback,
                        })
                    });
                }
            }
        }
    }

    fn spawn_runtime(&self, journal: Option<Arc<JournalWriter>>) -> std::io::Result<Run> {
        let id = self.inner.id;
        let workers = self.inner.engine.config.worker_threads;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (queue, queue_rx) = mpsc::unbounded_channel::<TaskGuard>();
        let thread = std::thread::Builder::new()
            .name("patient-processor".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .thread_name("patient-worker")
                    .on_thread_start(move || PROCESSOR_THREAD.with(|c| c.set(id)))
                    .enable_all()
                    .build();
                let runtime = match runtime {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(runtime.handle().clone()));
                PROCESSOR_THREAD.with(|c| c.set(id));
                runtime.block_on(async {
                    tokio::spawn(dispatch(queue_rx));
                    let _ = shutdown_rx.await;
                });
                // The workers drop the tasks still inside, and each one's guard
                // hands its task to `retry`. Nothing waits here: `stop` waits
                // for every outcome itself, as long as a handler takes, and a
                // worker thread still busy elsewhere (a DNS lookup) ends on its own.
                runtime.shutdown_background();
            })?;
        let handle = match ready_rx.recv() {
            Ok(Ok(handle)) => handle,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(std::io::Error::other(
                    "the processor thread ended before its runtime started",
                ))
            }
        };
        Ok(Run {
            handle,
            queue,
            shutdown: Mutex::new(Some(shutdown_tx)),
            thread: Mutex::new(Some(thread)),
            journal,
        })
    }

    /// Hands a task to the processor and returns at once. Fails fast, giving the
    /// task back, when the processor is not running or is at capacity (queued
    /// plus in-flight tasks reached `max_connections`). Observers hear of a
    /// refusal for capacity with no lock held, so one may stop the processor.
    ///
    /// Enqueued while serving a request behind
    /// [`PropagationLayer`](crate::propagation::PropagationLayer), the task
    /// inherits that request's deadline and priority (see
    /// [inherited deadlines](crate::propagation#inherited-deadlines)).
    ///
    /// With a task journal, it returns once the task is recorded there
    /// (one durable write, shared with the other threads enqueuing at the
    /// same moment), and refuses the task, giving it back, when the journal
    /// fails to record it ([`EnqueueError::is_journal`]).
    pub fn enqueue(&self, task: Task) -> Result<(), EnqueueError> {
        let inner = &self.inner;
        let max = inner.engine.config.max_connections;
        {
            // Held from the state check to the hand-over; nothing in this
            // block calls a handler or an observer.
            let run = read(&inner.run);
            let state = self.state();
            let run = match (&*run, state) {
                (Some(run), ProcessorState::Running) => run,
                _ => {
                    return Err(EnqueueError::new(
                        EnqueueErrorKind::NotRunning { state },
                        task,
                    ))
                }
            };
            if inner.pending.fetch_add(1, Ordering::AcqRel) < max {
                let link = match &run.journal {
                    None => None,
                    Some(writer) => match self.record(writer, &task) {
                        Ok(link) => Some(link),
                        Err(e) => {
                            inner.finish_one();
                            return Err(EnqueueError::journal(e, task));
                        }
                    },
                };
                return self.hand_over(run, task, link);
            }
            inner.finish_one();
        }
        inner.engine.notify(|o| o.on_capacity_exceeded(&task));
        Err(EnqueueError::new(
            EnqueueErrorKind::AtCapacity { max },
            task,
        ))
    }

    /// Hands several tasks to the processor at once. Each is accepted or
    /// refused as [`enqueue`](Self::enqueue) would, in order; with a task
    /// journal, the records of all the accepted ones share one write, so a
    /// single thread enqueuing many tasks waits for one commit instead of
    /// one per task. Returns the refusals (none when every task was
    /// accepted), each with its task, in the order of the tasks.
    #[must_use = "refused tasks come back in the errors"]
    pub fn enqueue_batch(&self, tasks: impl IntoIterator<Item = Task>) -> Vec<EnqueueError> {
        let inner = &self.inner;
        let max = inner.engine.config.max_connections;
        let mut results: Vec<Result<(), EnqueueError>> = Vec::new();
        let mut at_capacity = Vec::new();
        {
            // Held from the state check to the hand-over, as in `enqueue`.
            let run = read(&inner.run);
            let state = self.state();
            let run = match (&*run, state) {
                (Some(run), ProcessorState::Running) => run,
                _ => {
                    return tasks
                        .into_iter()
                        .map(|task| EnqueueError::new(EnqueueErrorKind::NotRunning { state }, task))
                        .collect()
                }
            };
            let mut accepted = Vec::new();
            for task in tasks {
                let at = results.len();
                results.push(Ok(()));
                if inner.pending.fetch_add(1, Ordering::AcqRel) < max {
                    accepted.push((at, task));
                } else {
                    inner.finish_one();
                    at_capacity.push((at, task));
                }
            }
            let links = match &run.journal {
                None => accepted.iter().map(|_| Ok(None)).collect(),
                Some(writer) => self
                    .record_all(writer, accepted.iter().map(|(_, task)| task))
                    .into_iter()
                    .map(|link| link.map(Some))
                    .collect::<Vec<_>>(),
            };
            for ((at, task), link) in accepted.into_iter().zip(links) {
                results[at] = match link {
                    Ok(link) => self.hand_over(run, task, link),
                    Err(e) => {
                        inner.finish_one();
                        Err(EnqueueError::journal(e, task))
                    }
                };
            }
        }
        let max_error = |task| EnqueueError::new(EnqueueErrorKind::AtCapacity { max }, task);
        for (at, task) in at_capacity {
            inner.engine.notify(|o| o.on_capacity_exceeded(&task));
            results[at] = Err(max_error(task));
        }
        results.into_iter().filter_map(Result::err).collect()
    }

    /// Records a task in the journal; returns once it is durable.
    fn record(
        &self,
        writer: &Arc<JournalWriter>,
        task: &Task,
    ) -> Result<JournalLink, JournalError> {
        self.record_all(writer, std::iter::once(task))
            .pop()
            .unwrap_or_else(|| Err(writer.gone("record a task")))
    }

    /// Records tasks in the journal in one write; returns once each is
    /// durable, with each one's link or error.
    fn record_all<'t>(
        &self,
        writer: &Arc<JournalWriter>,
        tasks: impl Iterator<Item = &'t Task>,
    ) -> Vec<Result<JournalLink, JournalError>> {
        let entries: Vec<JournalEntry> = tasks.map(JournalEntry::for_task).collect();
        let ids: Vec<(String, String)> = entries
            .iter()
            .map(|e| (e.id.clone(), e.task_id.clone()))
            .collect();
        writer
            .record_all(entries)
            .into_iter()
            .zip(ids)
            .map(|(result, (entry_id, task_id))| match result {
                Ok(()) => Ok(JournalLink {
                    writer: Arc::clone(writer),
                    entry_id,
                }),
                Err(e) => {
                    tracing::error!(
                        processor = self.inner.id,
                        task_id = %task_id,
                        error = %error_chain(&e),
                        "the task journal did not record a task; enqueue refused it"
                    );
                    Err(e)
                }
            })
            .collect()
    }

    /// Hands an accepted task (already counted as pending, and recorded in
    /// the journal when there is one) to the run.
    ///
    /// The caller holds the run's read guard, so `stop` has not taken the run
    /// and its runtime is not shutting down: spawning there or sending to its
    /// dispatcher cannot drop the task's guard (which would call `retry`
    /// under the guard).
    fn hand_over(
        &self,
        run: &Run,
        task: Task,
        journal: Option<JournalLink>,
    ) -> Result<(), EnqueueError> {
        let inner = &self.inner;
        let guard = TaskGuard {
            inner: Arc::clone(inner),
            task: Some(task),
            // On the submitting thread: the context of the request it
            // serves, if any, is a task-local there.
            admitted: Admission::now(),
            journal,
        };
        if self.on_own_thread() {
            // On one of our own threads (a handler enqueueing the next task):
            // spawn straight onto this worker's queue.
            run.handle.spawn(run_task(guard));
            return Ok(());
        }
        // From an application thread: a lock-free push; the dispatcher on the
        // runtime spawns it, so this thread takes no lock and makes no system
        // call in the common case.
        match run.queue.send(guard) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(mut guard)) => {
                // The runtime is gone: give the task back, nothing delivered.
                let task = guard.task.take();
                if let Some(link) = guard.journal.take() {
                    link.writer.remove(link.entry_id);
                }
                drop(guard);
                inner.finish_one();
                match task {
                    Some(task) => Err(EnqueueError::new(
                        EnqueueErrorKind::NotRunning {
                            state: self.state(),
                        },
                        task,
                    )),
                    None => Ok(()),
                }
            }
        }
    }

    /// Stops accepting tasks and keeps running those it has. `stop` ends it.
    pub fn drain(&self) {
        let _lock = lock(&self.inner.lifecycle);
        if self.state() == ProcessorState::Running {
            self.inner.set_state(ProcessorState::Draining);
            tracing::info!(processor = self.inner.id, "processor draining");
        }
    }

    /// Stops the processor: refuses new tasks, waits up to `timeout` (default:
    /// the configured `shutdown_timeout`) for tasks in flight, hands the rest
    /// to `retry`, and shuts the runtime down. Every accepted task has had its
    /// one outcome when this returns: a handler still running when the time is
    /// up delays the return until it is done, however long it takes (that is
    /// the handler's call). Called while another stop is under way, it waits
    /// for that one to finish. Stopping a stopped processor does nothing.
    ///
    /// It holds no lock of the processor while it waits, so handlers and
    /// observers running meanwhile may call back into the processor (`start`
    /// is refused until the stop is done).
    ///
    /// Called from inside a handler or an observer (on one of the processor's
    /// own threads), it starts the stop on a thread of its own and returns at
    /// once: waiting there would wait for the caller itself. From async code,
    /// use [`stop_async`](Processor::stop_async).
    pub fn stop(&self, timeout: Option<Duration>) {
        if self.on_own_thread() {
            if let Err(e) = self.spawn_stopper(timeout, None) {
                tracing::error!(
                    processor = self.inner.id,
                    error = %e,
                    "the thread to stop the processor could not be started; it keeps running"
                );
            }
            return;
        }
        self.stop_here(timeout);
    }

    /// [`stop`](Processor::stop) for async callers, with the same guarantees:
    /// when it returns, every accepted task has had its one outcome. The
    /// waiting runs on a thread of its own, so the caller's runtime (even a
    /// current-thread one) keeps running its other tasks meanwhile.
    ///
    /// Dropping the future does not cancel the stop: it carries on and ends
    /// as it would have. Awaited in a task spawned on the processor's own
    /// runtime (say, from a handler), the stop completes but the awaiting
    /// task is dropped when that runtime shuts down, so it never resumes; a
    /// handler itself, being synchronous, calls `stop`, which returns at once
    /// there.
    pub async fn stop_async(&self, timeout: Option<Duration>) {
        let (done_tx, done_rx) = oneshot::channel();
        match self.spawn_stopper(timeout, Some(done_tx)) {
            // An error means the stopping thread panicked before it was done;
            // there is nothing left to wait for.
            Ok(()) => {
                let _ = done_rx.await;
            }
            Err(e) if self.on_own_thread() => tracing::error!(
                processor = self.inner.id,
                error = %e,
                "the thread to stop the processor could not be started; it keeps running"
            ),
            Err(e) => {
                tracing::warn!(
                    processor = self.inner.id,
                    error = %e,
                    "the thread to stop the processor could not be started; stopping on the caller's thread"
                );
                match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                    Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                        tokio::task::block_in_place(|| self.stop_here(timeout))
                    }
                    _ => self.stop_here(timeout),
                }
            }
        }
    }

    /// Runs `stop_here` on a new thread; `done` hears when it is finished.
    fn spawn_stopper(
        &self,
        timeout: Option<Duration>,
        done: Option<oneshot::Sender<()>>,
    ) -> std::io::Result<()> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("patient-stop".into())
            .spawn(move || {
                this.stop_here(timeout);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            })
            .map(drop)
    }

    /// The whole stop, on a thread that is not one of the processor's own.
    fn stop_here(&self, timeout: Option<Duration>) {
        let inner = &self.inner;
        let run = {
            let mut guard = lock(&inner.lifecycle);
            loop {
                match self.state() {
                    // `Starting` is never seen here: `start` holds the lock
                    // from `Starting` to `Running`.
                    ProcessorState::Stopped | ProcessorState::Starting => return,
                    // Another stop is under way: its end is this one's too.
                    ProcessorState::Stopping => {
                        guard = inner
                            .stopped_cv
                            .wait(guard)
                            .unwrap_or_else(|e| e.into_inner());
                    }
                    ProcessorState::Running | ProcessorState::Draining => break,
                }
            }
            inner.set_state(ProcessorState::Stopping);
            // No enqueue is past its state check once the run is taken out.
            write(&inner.run).take()
        };
        // No lock is held from here on: handlers and observers run meanwhile.
        if let Some(run) = run {
            let timeout = timeout.unwrap_or(inner.engine.config.shutdown_timeout);
            if !inner.wait_idle(Some(timeout)) {
                tracing::info!(
                    processor = inner.id,
                    pending = inner.pending.load(Ordering::Acquire),
                    "shutdown timeout reached; handing unfinished tasks to retry"
                );
            }
            if let Some(tx) = lock(&run.shutdown).take() {
                let _ = tx.send(());
            }
            // The runtime drops the tasks still inside and their guards hand
            // them to `retry`; a handler still running is waited for, with no
            // limit: the contract is one outcome per task before returning.
            inner.wait_idle(None);
            // Every outcome is delivered, so every removal is sent: write
            // them, and give the journal back for the next start.
            if let Some(writer) = &run.journal {
                writer.close();
            }
            if let Some(thread) = lock(&run.thread).take() {
                // The thread only shuts the runtime down in the background.
                let _ = thread.join();
            }
        }
        {
            let _lock = lock(&inner.lifecycle);
            inner.set_state(ProcessorState::Stopped);
            inner.stopped_cv.notify_all();
        }
        tracing::info!(processor = inner.id, "processor stopped");
        inner.engine.notify(|o| o.on_stop());
    }

    /// Waits until no task is queued or in flight; false if `timeout` passed first.
    pub fn wait_for_idle(&self, timeout: Duration) -> bool {
        self.inner.wait_idle(Some(timeout))
    }

    /// Waits until at least one task is being executed; false on timeout.
    pub fn wait_for_processing(&self, timeout: Duration) -> bool {
        // A timeout too large for the clock never runs out.
        let deadline = Instant::now().checked_add(timeout);
        while self.inner.in_flight.load(Ordering::Acquire) == 0 {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Whether the calling thread is one of this processor's own.
    fn on_own_thread(&self) -> bool {
        PROCESSOR_THREAD.with(|c| c.get()) == self.inner.id
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: make sure the runtime thread ends.
        if let Some(run) = self.run.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            if let Some(tx) = lock(&run.shutdown).take() {
                let _ = tx.send(());
            }
        }
    }
}

impl Inner {
    fn set_state(&self, state: ProcessorState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// One task left the pending count.
    fn finish_one(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _lock = lock(&self.idle_lock);
            self.idle_cv.notify_all();
        }
    }

    /// Waits until no task is pending; `None` (or a timeout too large for
    /// the clock) waits as long as it takes. False if the time ran out first.
    fn wait_idle(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut guard = lock(&self.idle_lock);
        while self.pending.load(Ordering::Acquire) != 0 {
            guard = match deadline {
                None => self.idle_cv.wait(guard).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    match self.idle_cv.wait_timeout(guard, deadline - now) {
                        Ok((g, _)) => g,
                        Err(e) => e.into_inner().0,
                    }
                }
            };
        }
        true
    }

    /// Hands an outcome to the handler, containing a panic, then removes the
    /// task from the journal.
    fn deliver(&self, outcome: Outcome, journal: Option<JournalLink>) {
        let counter = match &outcome {
            Outcome::Completed { .. } => &self.completed,
            Outcome::Failed { .. } => &self.failed,
            Outcome::Retry(_) => &self.retried,
        };
        let id = outcome.task_id().to_owned();
        if catch_unwind(AssertUnwindSafe(|| outcome.deliver(self.handler.as_ref()))).is_err() {
            self.engine.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(task_id = %id, "the task handler panicked; the panic was contained");
        }
        // After the handler returned (a crash before this runs the task
        // again: at least once), before the task stops counting as pending
        // (so `stop` finds every removal sent).
        if let Some(link) = journal {
            link.writer.remove(link.entry_id);
        }
        counter.fetch_add(1, Ordering::AcqRel);
        self.finish_one();
    }
}

/// Owns an accepted task until its one outcome is delivered.
struct TaskGuard {
    inner: Arc<Inner>,
    task: Option<Task>,
    /// When it was accepted, in which context.
    admitted: Admission,
    /// The task's journal entry, removed after delivery.
    journal: Option<JournalLink>,
}

impl TaskGuard {
    fn deliver(&mut self, outcome: impl FnOnce(Task) -> Outcome) {
        if let Some(task) = self.task.take() {
            self.inner.deliver(outcome(task), self.journal.take());
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        // Dropped undelivered: the runtime shut down with the task inside.
        self.deliver(Outcome::Retry);
    }
}

/// Spawns the tasks handed over by application threads.
async fn dispatch(mut queue: mpsc::UnboundedReceiver<TaskGuard>) {
    let mut batch = Vec::with_capacity(64);
    while queue.recv_many(&mut batch, 64).await > 0 {
        for guard in batch.drain(..) {
            tokio::spawn(run_task(guard));
        }
    }
}

async fn run_task(mut guard: TaskGuard) {
    let Some(task) = guard.task.as_ref() else {
        return;
    };
    let engine = Arc::clone(&guard.inner.engine);
    let gate = guard.inner.gate.clone();
    let admitted = guard.admitted;
    let entry = guard.journal.as_ref();
    let work = async {
        // Saturated: wait for a slot, high priority first.
        let _slot = match &gate {
            Some(gate) => {
                let own = task.request.request_options().priority;
                let priority = admitted.priority(own).unwrap_or_default();
                engine.metrics.set_queue_depth(gate.waiting() + 1);
                let slot = gate.acquire(priority).await;
                engine.metrics.set_queue_depth(gate.waiting());
                Some(slot)
            }
            None => None,
        };
        // A request that must not be sent twice is marked started, durably,
        // before it is sent: after a crash it ends as interrupted instead of
        // being sent again.
        if let Some(link) = entry {
            if !journal::resendable_by_itself(&task.request) {
                if let Err(e) = link.writer.started(link.entry_id.clone()).await {
                    tracing::error!(
                        task_id = %task.id,
                        error = %error_chain(&e),
                        "the task journal did not mark a task started; it is handed to retry unsent"
                    );
                    return None;
                }
            }
        }
        let _in_flight = InFlight::enter(&guard.inner.in_flight);
        let _gauge = engine.metrics.track_in_flight();
        // Boxed: a spawned task's future is copied into and out of the
        // runtime's task cell; keeping the large request state behind a
        // pointer makes those copies small.
        Some(Box::pin(engine.execute(task, admitted)).await)
    };
    match work.await {
        Some(Ok(response)) => guard.deliver(|task| Outcome::Completed {
            response,
            callback: task.callback,
        }),
        Some(Err(error)) => guard.deliver(|task| Outcome::Failed {
            error,
            callback: task.callback,
        }),
        // Not sent: the task goes back to the application.
        None => guard.deliver(Outcome::Retry),
    }
}

/// Counts a task as executing until dropped (also when the runtime shuts
/// down with the task inside).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
