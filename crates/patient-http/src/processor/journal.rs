//! The task journal: crash recovery for the processor.
//!
//! Without a journal, the processor keeps its tasks in memory: a process that
//! dies (`kill -9`, an out-of-memory kill, a power cut) loses every task it
//! had accepted and not yet handed to the [`TaskHandler`](crate::TaskHandler).
//! With one ([`Builder::journal`](crate::Builder::journal)), it keeps them on
//! disk as well:
//!
//! * **`enqueue` records the task before it returns.** A task is accepted
//!   only once [`TaskJournal::record`] (or the batch holding it) has returned;
//!   when the write fails (disk full, database gone), `enqueue` refuses the
//!   task with an error naming the journal
//!   ([`EnqueueError::is_journal`](crate::EnqueueError::is_journal)) and
//!   gives it back: nothing accepted is lost silently.
//! * **A request that is not safe to send twice is marked started before it
//!   is sent.** For a POST or PATCH without an idempotency key and without
//!   `retry_unsafe` in the request's own options, the processor writes a
//!   started mark and waits until it is on disk before the first attempt
//!   (when the mark cannot be written, the task goes to `retry`, unsent).
//!   Other tasks are never marked: sending them again is harmless.
//! * **The task leaves the journal after its outcome was delivered**: after
//!   `on_complete`, `on_error` or `retry` returned (a task handed to `retry`
//!   belongs to the application from then on). A crash while the handler
//!   runs, or before the removal reaches the disk, brings the task back at
//!   the next start, so an outcome may be delivered twice across a crash:
//!   delivery is *at least once* (exactly once while the process lives).
//!   Make handlers idempotent, keyed by the task id.
//! * **On the next start the processor takes up what was left**
//!   ([`TaskJournal::pending`], read before `start` returns; a failure to
//!   read fails the start), as soon as it runs, following its
//!   [`JournalRecovery`]: by default it runs those tasks again (their
//!   deadline counts from the restart; they count towards `max_connections`
//!   but are never refused for it); with [`JournalRecovery::Retry`] it hands
//!   them to `retry` instead. Either way, a started task that is not safe to
//!   send again is never sent again silently: it ends in `on_error` with a
//!   request error of class [`INTERRUPTED_CLASS`] (`"Interrupted"`), as the
//!   daemon does — it may or may not have reached the upstream. A POST that
//!   was merely queued (never started) is safe, and is run again or handed
//!   back like the others. An entry whose task does not load (edited by
//!   hand, written by a newer version) is logged and left in the journal.
//!
//! Whether a task is safe to send again is decided when it is taken up: an
//! idempotent method, an idempotency key (`options.idempotency_key` or an
//! `Idempotency-Key` / `X-Idempotency-Key` header), or `retry_unsafe` in the
//! request's retry options or its upstream's retry policy.
//!
//! # What is kept
//!
//! Each entry ([`JournalEntry`]) holds the task as JSON: the wire format's
//! [`Request`](crate::Request) under `request`, with `id`, `callback`,
//! `callback_args` and `raise_error_responses` beside it, the fields of the
//! daemon's submit body. Secret references stay references (resolved when the
//! task runs); a user name and password in the URL are never serialized, so a
//! task taken up from the journal runs without them (keep credentials in a
//! secret header instead). Entries are keyed by an id of their own, new on
//! every acceptance: a task handed to `retry` and enqueued again under the
//! same task id (from inside the handler, say) is a new entry, which the
//! removal of the first one leaves alone.
//!
//! # Threads and group commit
//!
//! The processor calls its journal from one thread of its own, never from an
//! async task: a [`TaskJournal`] may block (a synchronous SQLite connection,
//! a file with `fsync`). That thread hands the journal every change waiting
//! at once in one [`TaskJournal::write_batch`], so records from many
//! enqueuing threads, started marks and removals share one durable write.
//! An `enqueue` waits for its own record only, and
//! [`enqueue_batch`](crate::Processor::enqueue_batch) for one write of all
//! its records; a task waits for its started mark on the runtime without
//! holding a thread; removals are not waited for (they join the next write
//! someone waits for, or go alone within 20 ms), except by `stop`, which
//! returns once every removal is written.
//!
//! One journal serves one processor at a time: two processors sharing one
//! would each take up the other's tasks at start.

use std::{
    any::Any,
    fmt,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{mpsc as std_mpsc, Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use patient_wire::{CallbackArgs, ErrorType, Request, WireError};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::{engine::Engine, resilience::upstream_key_ref, Task};

/// The `class_name` of the request error that ends a task taken up from the
/// journal whose request had started and is not safe to send again (see the
/// [module docs](self)).
pub const INTERRUPTED_CLASS: &str = "Interrupted";

/// Most changes handed to the journal in one batch.
const MAX_BATCH: usize = 1024;

/// How long a removal, which nobody waits for, may wait to share the commit
/// of a record or a started mark.
const REMOVAL_LINGER: Duration = Duration::from_millis(20);

/// Where the processor keeps its accepted tasks so that a crash loses none
/// (see the [crate docs on crash recovery](crate::Builder::journal)).
///
/// The processor owns the journal and calls it from one thread of its own,
/// so the methods take `&mut self` and may block until their write is
/// durable. Every change is idempotent — a record replaces an entry of the
/// same id, a started mark or removal of an entry that is not there does
/// nothing — so a change may be written again after an error.
///
/// A journal that can make several changes durable at once (one transaction,
/// one `fsync`) overrides [`write_batch`](Self::write_batch); the processor
/// batches whatever is waiting.
pub trait TaskJournal: Send + 'static {
    /// A name for errors and logs, such as the file it writes to (default:
    /// the type's name).
    fn name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }

    /// Records an accepted task; durable when it returns `Ok`.
    fn record(&mut self, entry: &JournalEntry) -> Result<(), JournalError>;

    /// Marks the entry with this id as started: its request may be sent from
    /// now on. Durable when it returns `Ok`.
    fn mark_started(&mut self, entry_id: &str) -> Result<(), JournalError>;

    /// Removes the entry with this id: its outcome was delivered.
    fn remove(&mut self, entry_id: &str) -> Result<(), JournalError>;

    /// Every entry recorded and not removed, in the order recorded, with its
    /// started mark.
    fn pending(&mut self) -> Result<Vec<JournalEntry>, JournalError>;

    /// Writes `changes` in order, all durable when it returns `Ok`. The
    /// default calls the methods above one at a time; a journal that can,
    /// writes them all at once. After an error the processor writes each
    /// change of the batch again on its own, to tell which one failed.
    fn write_batch(&mut self, changes: &[JournalChange]) -> Result<(), JournalError> {
        for change in changes {
            match change {
                JournalChange::Record(entry) => self.record(entry)?,
                JournalChange::Started(id) => self.mark_started(id)?,
                JournalChange::Remove(id) => self.remove(id)?,
            }
        }
        Ok(())
    }
}

/// One change to a journal, as handed to [`TaskJournal::write_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalChange {
    /// [`TaskJournal::record`] this entry.
    Record(JournalEntry),
    /// [`TaskJournal::mark_started`] the entry with this id.
    Started(String),
    /// [`TaskJournal::remove`] the entry with this id.
    Remove(String),
}

/// What the processor does, on start, with the tasks its journal still holds
/// (default [`Rerun`](JournalRecovery::Rerun)). Under both, a task whose
/// request had started and is not safe to send again ends in `on_error` with
/// class [`INTERRUPTED_CLASS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum JournalRecovery {
    /// Run the tasks again, as if just enqueued (the default): what a job
    /// queue does with a job whose worker died.
    #[default]
    Rerun,
    /// Hand the tasks to `retry`, the gem's "not finished, enqueue me again",
    /// for the application to decide.
    Retry,
}

/// One accepted task as a journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// The entry's own id, new on every acceptance: the key of
    /// [`TaskJournal::mark_started`] and [`TaskJournal::remove`].
    pub id: String,
    /// The task's id.
    pub task_id: String,
    /// The task as JSON text (see [`JournalEntry::task_json`]).
    pub task: String,
    /// Whether the task was marked started (always false in an entry handed
    /// to [`TaskJournal::record`]).
    pub started: bool,
}

impl JournalEntry {
    /// A new entry (with a new id) for `task`, not started.
    pub fn for_task(task: &Task) -> JournalEntry {
        JournalEntry {
            id: new_entry_id(),
            task_id: task.id.clone(),
            task: JournalEntry::task_json(task).to_string(),
            started: false,
        }
    }

    /// The JSON an entry keeps for `task`: `{"id", "request", "callback",
    /// "callback_args", "raise_error_responses"}`, with the request in the
    /// wire format and `raise_error_responses` `null` when the task takes
    /// the processor's default.
    pub fn task_json(task: &Task) -> Value {
        let mut map = Map::new();
        map.insert("id".into(), task.id.clone().into());
        map.insert("request".into(), task.request.to_json());
        map.insert("callback".into(), task.callback.clone().into());
        map.insert("callback_args".into(), task.callback_args.to_json());
        map.insert(
            "raise_error_responses".into(),
            task.raise_error_responses.map_or(Value::Null, Value::Bool),
        );
        Value::Object(map)
    }

    /// The task this entry keeps; the error names the field that does not
    /// load. The request loads within [`WireLimits::default`](crate::WireLimits).
    pub fn to_task(&self) -> Result<Task, JournalEntryError> {
        let value: Value = serde_json::from_str(&self.task).map_err(|e| JournalEntryError {
            entry: self.id.clone(),
            field: String::new(),
            reason: EntryReason::Json(e),
        })?;
        let fail = |field: &str, reason: EntryReason| JournalEntryError {
            entry: self.id.clone(),
            field: field.to_owned(),
            reason,
        };
        let Value::Object(map) = &value else {
            return Err(fail("", EntryReason::NotAnObject));
        };
        let string = |key: &str| match map.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(fail(key, EntryReason::NotAString)),
        };
        let id = string("id")?;
        let callback = string("callback")?;
        let request = map
            .get("request")
            .ok_or_else(|| fail("request", EntryReason::Missing))
            .and_then(|r| {
                Request::from_json(r).map_err(|e| {
                    let field = match e.path() {
                        "" => "request".to_owned(),
                        path => format!("request.{path}"),
                    };
                    fail(&field, EntryReason::Wire(e))
                })
            })?;
        let callback_args = match map.get("callback_args") {
            None | Some(Value::Null) => CallbackArgs::new(),
            Some(args) => CallbackArgs::from_json(args)
                .map_err(|e| fail("callback_args", EntryReason::Wire(e)))?,
        };
        let raise_error_responses = match map.get("raise_error_responses") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Err(fail("raise_error_responses", EntryReason::NotABool)),
        };
        Ok(Task {
            id,
            request,
            callback,
            callback_args,
            raise_error_responses,
        })
    }
}

/// A random id for a journal entry.
fn new_entry_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// A journal entry whose task does not load.
#[derive(Debug, thiserror::Error)]
#[error("journal entry {entry}: {}{reason}", field_prefix(.field))]
pub struct JournalEntryError {
    entry: String,
    field: String,
    #[source]
    reason: EntryReason,
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

#[derive(Debug, thiserror::Error)]
enum EntryReason {
    #[error("not JSON")]
    Json(#[source] serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("missing")]
    Missing,
    #[error("not a string")]
    NotAString,
    #[error("not a boolean or null")]
    NotABool,
    #[error("invalid")]
    Wire(#[source] WireError),
}

impl JournalEntryError {
    /// The id of the entry.
    pub fn entry(&self) -> &str {
        &self.entry
    }

    /// The field of the task's JSON that does not load (`request.url`,
    /// `callback`, …); empty for the JSON as a whole.
    pub fn field(&self) -> &str {
        &self.field
    }
}

/// A journal operation that failed: the journal's name, what it was doing,
/// and why (the [`source`](std::error::Error::source)).
#[derive(Debug, thiserror::Error)]
#[error("task journal {journal} cannot {action}")]
pub struct JournalError {
    journal: String,
    action: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl JournalError {
    /// The error of `journal` (its [`name`](TaskJournal::name)) failing to
    /// do `action` (`"record task 42"`, `"read pending tasks"`) because of
    /// `source`.
    pub fn new(
        journal: impl Into<String>,
        action: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> JournalError {
        JournalError {
            journal: journal.into(),
            action: action.into(),
            source: Some(source.into()),
        }
    }

    /// The name of the journal.
    pub fn journal(&self) -> &str {
        &self.journal
    }

    /// What it was doing, like `record task 42`.
    pub fn action(&self) -> &str {
        &self.action
    }
}

// ---------------------------------------------------------------------------
// The processor's side: one thread that owns the journal.

/// The journal a processor was built with, between runs.
pub(crate) struct JournalSlot {
    /// The journal itself; the writer thread holds it while a run lasts and
    /// puts it back when it ends.
    journal: Arc<Mutex<Option<Box<dyn TaskJournal>>>>,
    name: String,
    pub(crate) recovery: JournalRecovery,
}

impl JournalSlot {
    pub(crate) fn new(journal: Box<dyn TaskJournal>, recovery: JournalRecovery) -> JournalSlot {
        let name = journal.name();
        JournalSlot {
            journal: Arc::new(Mutex::new(Some(journal))),
            name,
            recovery,
        }
    }

    /// Starts the writer thread for one run.
    pub(crate) fn start(&self) -> Result<JournalWriter, JournalError> {
        let (tx, rx) = std_mpsc::channel::<Command>();
        let slot = Arc::clone(&self.journal);
        let name = self.name.clone();
        let (ready_tx, ready_rx) = std_mpsc::sync_channel::<bool>(1);
        let thread = std::thread::Builder::new()
            .name("patient-journal".into())
            .spawn(move || {
                let taken = lock(&slot).take();
                let Some(mut journal) = taken else {
                    let _ = ready_tx.send(false);
                    return;
                };
                let _ = ready_tx.send(true);
                drop(ready_tx);
                write_loop(journal.as_mut(), &name, &rx);
                *lock(&slot) = Some(journal);
            })
            .map_err(|e| JournalError::new(&self.name, "start its thread", e))?;
        match ready_rx.recv() {
            Ok(true) => Ok(JournalWriter {
                name: self.name.clone(),
                tx,
                thread: Mutex::new(Some(thread)),
            }),
            _ => {
                let _ = thread.join();
                Err(JournalError::new(
                    &self.name,
                    "start",
                    "the journal was lost when an earlier run's journal thread ended abnormally",
                ))
            }
        }
    }
}

/// A run's handle on the journal thread.
pub(crate) struct JournalWriter {
    name: String,
    tx: std_mpsc::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

type Reply<T> = std_mpsc::SyncSender<Result<T, JournalError>>;

enum Command {
    Change(JournalChange, Ack),
    Pending(Reply<Vec<JournalEntry>>),
    /// Ends the thread once everything sent before is written.
    Close,
}

/// Who waits for a change.
enum Ack {
    None,
    Blocking(Reply<()>),
    Async(oneshot::Sender<Result<(), JournalError>>),
}

impl Ack {
    fn send(self, result: Result<(), JournalError>, name: &str, change: &JournalChange) {
        match self {
            Ack::None => {
                if let Err(e) = result {
                    tracing::warn!(
                        journal = %name,
                        error = %error_chain(&e),
                        change = change.describe(),
                        "a task journal write failed; the task comes back at the next start"
                    );
                }
            }
            Ack::Blocking(tx) => {
                let _ = tx.send(result);
            }
            Ack::Async(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

impl JournalChange {
    fn describe(&self) -> &'static str {
        match self {
            JournalChange::Record(_) => "record",
            JournalChange::Started(_) => "started",
            JournalChange::Remove(_) => "remove",
        }
    }
}

impl JournalWriter {
    /// The journal's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn gone(&self, action: &str) -> JournalError {
        JournalError::new(&self.name, action, "the journal thread has ended")
    }

    /// Records entries, all sent before any answer is awaited so that they
    /// share a write; returns once each is durable, with each one's result.
    pub(crate) fn record_all(&self, entries: Vec<JournalEntry>) -> Vec<Result<(), JournalError>> {
        let waiting: Vec<_> = entries
            .into_iter()
            .map(|entry| {
                let task_id = entry.task_id.clone();
                let (tx, rx) = std_mpsc::sync_channel(1);
                let change = Command::Change(JournalChange::Record(entry), Ack::Blocking(tx));
                (task_id, self.tx.send(change).is_ok().then_some(rx))
            })
            .collect();
        waiting
            .into_iter()
            .map(|(task_id, rx)| {
                rx.and_then(|rx| rx.recv().ok())
                    .unwrap_or_else(|| Err(self.gone(&format!("record task {task_id}"))))
            })
            .collect()
    }

    /// Marks an entry started; resolves once the mark is durable.
    pub(crate) async fn started(&self, entry_id: String) -> Result<(), JournalError> {
        let (tx, rx) = oneshot::channel();
        let gone = self.gone("mark a task started");
        if self
            .tx
            .send(Command::Change(
                JournalChange::Started(entry_id),
                Ack::Async(tx),
            ))
            .is_err()
        {
            return Err(gone);
        }
        rx.await.unwrap_or(Err(gone))
    }

    /// Removes an entry, without waiting.
    pub(crate) fn remove(&self, entry_id: String) {
        if self
            .tx
            .send(Command::Change(JournalChange::Remove(entry_id), Ack::None))
            .is_err()
        {
            tracing::warn!(
                journal = %self.name,
                "the task journal was closed before a task's removal; the task comes back at the next start"
            );
        }
    }

    /// The entries left by earlier runs.
    pub(crate) fn pending(&self) -> Result<Vec<JournalEntry>, JournalError> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        let gone = self.gone("read pending tasks");
        if self.tx.send(Command::Pending(tx)).is_err() {
            return Err(gone);
        }
        rx.recv().unwrap_or(Err(gone))
    }

    /// Writes everything sent so far, ends the thread and waits for it.
    pub(crate) fn close(&self) {
        let _ = self.tx.send(Command::Close);
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

/// The journal thread: takes every command waiting, writes the changes among
/// them in batches, answers each. Removals, which nobody waits for, linger
/// up to [`REMOVAL_LINGER`] for a write someone waits for, and share its
/// commit.
fn write_loop(journal: &mut dyn TaskJournal, name: &str, rx: &std_mpsc::Receiver<Command>) {
    let mut changes: Vec<JournalChange> = Vec::new();
    let mut acks: Vec<Ack> = Vec::new();
    // When the oldest lingering removal must be written.
    let mut due: Option<Instant> = None;
    loop {
        let first = match due {
            None => match rx.recv() {
                Ok(command) => command,
                Err(_) => break,
            },
            Some(due_at) => {
                let wait = due_at.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(command) => command,
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        flush(journal, name, &mut changes, &mut acks);
                        due = None;
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        let mut next = Some(first);
        while let Some(command) = next.take() {
            match command {
                Command::Change(change, ack) => {
                    changes.push(change);
                    acks.push(ack);
                }
                Command::Pending(reply) => {
                    flush(journal, name, &mut changes, &mut acks);
                    let result = guarded(name, "read pending tasks", || journal.pending());
                    let _ = reply.send(result);
                }
                Command::Close => {
                    flush(journal, name, &mut changes, &mut acks);
                    return;
                }
            }
            if changes.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let waited_for = acks.iter().any(|ack| !matches!(ack, Ack::None));
        if waited_for || changes.len() >= MAX_BATCH {
            flush(journal, name, &mut changes, &mut acks);
            due = None;
        } else if !changes.is_empty() && due.is_none() {
            due = Some(Instant::now() + REMOVAL_LINGER);
        }
    }
    flush(journal, name, &mut changes, &mut acks);
}

/// Writes the changes collected so far as one batch and answers their
/// waiters; after an error, writes each on its own to tell which failed.
fn flush(
    journal: &mut dyn TaskJournal,
    name: &str,
    changes: &mut Vec<JournalChange>,
    acks: &mut Vec<Ack>,
) {
    if changes.is_empty() {
        return;
    }
    let result = guarded(name, "write a batch", || journal.write_batch(changes));
    match result {
        Ok(()) => {
            for (ack, change) in acks.drain(..).zip(changes.iter()) {
                ack.send(Ok(()), name, change);
            }
        }
        Err(e) if changes.len() == 1 => {
            if let Some(ack) = acks.pop() {
                ack.send(Err(e), name, &changes[0]);
            }
        }
        Err(_) => {
            for (ack, change) in acks.drain(..).zip(changes.iter()) {
                let one = std::slice::from_ref(change);
                let result = guarded(name, "write a change", || journal.write_batch(one));
                ack.send(result, name, change);
            }
        }
    }
    changes.clear();
    acks.clear();
}

/// Runs a journal call, turning a panic into an error.
fn guarded<T>(
    name: &str,
    action: &str,
    f: impl FnOnce() -> Result<T, JournalError>,
) -> Result<T, JournalError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(JournalError::new(
            name,
            action,
            format!("the journal panicked: {}", panic_text(payload.as_ref())),
        )),
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic".to_owned()
    }
}

/// An error and its sources, joined by `: `, for a log line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A task's link to its journal entry: the entry to remove after delivery.
pub(crate) struct JournalLink {
    pub(crate) writer: Arc<JournalWriter>,
    pub(crate) entry_id: String,
}

impl fmt::Debug for JournalLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournalLink")
            .field("entry_id", &self.entry_id)
            .finish()
    }
}

/// Whether the request itself makes it safe to send again, whatever the
/// configuration: such a request needs no started mark.
pub(crate) fn resendable_by_itself(request: &Request) -> bool {
    request.method().is_idempotent()
        || request.has_idempotency_key()
        || request
            .request_options()
            .retry
            .as_ref()
            .and_then(|r| r.retry_unsafe)
            == Some(true)
}

/// Whether sending the request again is allowed under the engine's
/// configuration: by itself, or by its upstream's `retry_unsafe` (unless
/// the request's options turn it off).
pub(crate) fn resendable(engine: &Engine, request: &Request) -> bool {
    if resendable_by_itself(request) {
        return true;
    }
    let options = request.request_options();
    if let Some(own) = options.retry.as_ref().and_then(|r| r.retry_unsafe) {
        return own;
    }
    let key = match &options.upstream_key {
        Some(key) => std::borrow::Cow::Borrowed(key.as_str()),
        None => upstream_key_ref(request.url()),
    };
    engine
        .resilience
        .policy_for(&key)
        .retry()
        .unwrap_or(&engine.default_retry)
        .retry_unsafe()
}

/// What recovery does with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Run it again.
    Rerun,
    /// Hand it to `retry`.
    Retry,
    /// End it with an `Interrupted` error.
    Interrupted,
}

/// Decides the fate of the entries left by an earlier run; an entry whose
/// task does not load is logged and left in the journal.
pub(crate) fn recover(
    engine: &Engine,
    recovery: JournalRecovery,
    journal: &str,
    entries: Vec<JournalEntry>,
) -> Vec<(JournalEntry, Task, Fate)> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let task = match entry.to_task() {
            Ok(task) => task,
            Err(e) => {
                tracing::error!(
                    journal = %journal,
                    entry = %entry.id,
                    task_id = %entry.task_id,
                    error = %error_chain(&e),
                    "a task in the journal does not load; it is left in the journal"
                );
                continue;
            }
        };
        let fate = if entry.started && !resendable(engine, &task.request) {
            Fate::Interrupted
        } else {
            match recovery {
                JournalRecovery::Rerun => Fate::Rerun,
                JournalRecovery::Retry => Fate::Retry,
            }
        };
        out.push((entry, task, fate));
    }
    out
}

/// The error of a task that had started before a crash and is not safe to
/// send again.
pub(crate) fn interrupted_error(engine: &Engine, task: &Task) -> patient_wire::TaskError {
    let method = task.request.method().as_str();
    engine.task_error(
        task,
        tokio::time::Instant::now(),
        ErrorType::Unknown,
        INTERRUPTED_CLASS,
        format!(
            "the process ended while this {method} request may have been in flight; it is not \
             sent again because {method} is not idempotent and the request has no idempotency \
             key and no retry_unsafe"
        ),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use patient_wire::RetryOptions;
    use serde_json::json;

    use super::*;

    #[test]
    fn an_entry_keeps_the_task_in_the_wire_format_and_loads_it_back() {
        let request = Request::post("https://api.example.com/v1/items?x=1")
            .secret_header("authorization", "api_key")
            .json(&json!({"name": "Ada"}))
            .build()
            .unwrap();
        let mut args = CallbackArgs::new();
        args.insert("user_id", 7);
        let task = Task::new(request, "ItemCallback")
            .with_callback_args(args)
            .with_raise_error_responses(true)
            .with_id("task-1");
        let entry = JournalEntry::for_task(&task);
        assert_eq!(entry.task_id, "task-1");
        assert!(!entry.started);
        assert_eq!(entry.id.len(), 32);
        assert_ne!(JournalEntry::for_task(&task).id, entry.id);

        let value: Value = serde_json::from_str(&entry.task).unwrap();
        assert_eq!(value["id"], "task-1");
        assert_eq!(value["callback"], "ItemCallback");
        assert_eq!(value["callback_args"], json!({"user_id": 7}));
        assert_eq!(value["raise_error_responses"], true);
        assert_eq!(value["request"], task.request.to_json());
        assert_eq!(
            value["request"]["headers"]["authorization"],
            json!({"$secret": "api_key"})
        );

        let back = entry.to_task().unwrap();
        assert_eq!(back.id, task.id);
        assert_eq!(back.request, task.request);
        assert_eq!(back.callback, task.callback);
        assert_eq!(back.callback_args, task.callback_args);
        assert_eq!(back.raise_error_responses, Some(true));

        let default = Task::new(Request::get("https://a.example/").build().unwrap(), "C");
        let loaded = JournalEntry::for_task(&default).to_task().unwrap();
        assert_eq!(loaded.raise_error_responses, None);
        assert!(loaded.callback_args.is_empty());
    }

    #[test]
    fn an_entry_that_does_not_load_names_the_field() {
        let mut entry = JournalEntry::for_task(&Task::new(
            Request::get("https://a.example/").build().unwrap(),
            "C",
        ));
        entry.task =
            r#"{"id": "t", "callback": "C", "request": {"http_method": "get", "url": "ftp://x/"}}"#
                .into();
        let e = entry.to_task().unwrap_err();
        assert_eq!(e.field(), "request.url");
        assert!(e.to_string().contains(&entry.id), "{e}");

        entry.task = r#"{"id": 5}"#.into();
        assert_eq!(entry.to_task().unwrap_err().field(), "id");
        entry.task = "not json".into();
        assert_eq!(entry.to_task().unwrap_err().field(), "");
    }

    #[test]
    fn requests_safe_to_send_again_by_themselves() {
        let get = Request::get("https://a.example/").build().unwrap();
        let post = Request::post("https://a.example/").build().unwrap();
        let keyed = Request::post("https://a.example/")
            .idempotency_key("k")
            .build()
            .unwrap();
        let header = Request::post("https://a.example/")
            .header("Idempotency-Key", "k")
            .build()
            .unwrap();
        let opted = Request::post("https://a.example/")
            .request_options(patient_wire::RequestOptions {
                retry: Some(RetryOptions {
                    retry_unsafe: Some(true),
                    ..RetryOptions::default()
                }),
                ..Default::default()
            })
            .build()
            .unwrap();
        assert!(resendable_by_itself(&get));
        assert!(!resendable_by_itself(&post));
        assert!(resendable_by_itself(&keyed));
        assert!(resendable_by_itself(&header));
        assert!(resendable_by_itself(&opted));
    }
}
