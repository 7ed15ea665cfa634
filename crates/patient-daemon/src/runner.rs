//! The workers: claim due tasks, run one step of each with the engine's
//! decision API, and store what comes next (an outcome with its delivery,
//! or the time of the next step). No backoff lives in memory: a restart
//! resumes every task where the database says.
//!
//! Each step runs in a `tracing` span `task` (level INFO) with the fields
//! `task.id`, `callback`, `attempts_so_far` (attempts made before this
//! step), `attempt` (the number of the attempt it makes), `owner` (this
//! node) and, when it ends, `state`: `completed`, `failed`, or `scheduled`
//! for a retry or a wait. The engine's `attempt` spans are its children.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use patient_http::{AwaitableClient, Decision, LimitWait, Task, TaskProgress};
use patient_store::StoreError;
use patient_wire::{
    Attempt, CallbackArgs, ErrorType, Request, RequestError, Response, TaskError, WireLimits,
};
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

use crate::{
    db::{Db, DbError, Finish, Reschedule},
    metrics::DaemonMetrics,
    model::{message_id, now_ms, rfc3339, system_time, unix_ms, Deliver, TaskRecord, TaskState},
    payloads::Payloads,
};

/// How long a step may wait for the upstream's limits before the task is
/// parked until they free up.
const LIMIT_WAIT: Duration = Duration::from_millis(100);

/// The longest sleep of an idle worker loop between looks at the queue.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Claims per round trip to the database.
const CLAIM_BATCH: usize = 256;

/// Stale tasks recovered per query.
const RECOVER_BATCH: usize = 256;

/// How long a stop waits for the attempts it cut off to end (they end at
/// their next poll; this bounds a runtime too busy to poll them).
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// How long a task whose stored request cannot be fetched from the payload
/// store (the store is unreachable) waits before it is tried again.
const STORE_RETRY: Duration = Duration::from_secs(5);

/// The outcome event of a finished task.
pub fn outcome_event(
    record_id: &str,
    callback: &str,
    args: &Value,
    result: &Result<Response, TaskError>,
) -> Value {
    let (kind, response, error) = match result {
        Ok(response) => ("task.completed", response.to_json(), Value::Null),
        Err(error) => ("task.failed", Value::Null, error.to_json()),
    };
    json!({
        "task_id": record_id,
        "type": kind,
        "callback": callback,
        "callback_args": args,
        "response": response,
        "error": error,
    })
}

/// The error type a failed task is counted under on the dashboard and in
/// `patient_task_errors_total`: the request error's type, `http_error` for
/// an error response, `redirect` for too many redirects or a loop.
pub fn error_kind(error: &TaskError) -> &'static str {
    match error {
        TaskError::Http(_) => "http_error",
        TaskError::Request(e) => e.error_type.as_str(),
        TaskError::Redirect(_) => "redirect",
    }
}

/// Runs tasks from the queue.
pub struct Runner {
    db: Db,
    client: AwaitableClient,
    owner: String,
    lease: Duration,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    wake: Arc<Notify>,
    /// Woken after each outcome stored with a delivery (the deliverer).
    on_outcome: std::sync::OnceLock<Arc<Notify>>,
    stopping: AtomicBool,
    stopped: Notify,
    running: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    limits: WireLimits,
    metrics: DaemonMetrics,
    payloads: Payloads,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner for this node (`owner`), at most `max_in_flight` tasks at
    /// once; stored requests and outcomes go through `payloads`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: Db,
        client: AwaitableClient,
        owner: String,
        lease: Duration,
        max_in_flight: usize,
        limits: WireLimits,
        metrics: DaemonMetrics,
        payloads: Payloads,
    ) -> Arc<Runner> {
        Arc::new(Runner {
            db,
            client,
            owner,
            lease,
            slots: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            wake: Arc::new(Notify::new()),
            on_outcome: std::sync::OnceLock::new(),
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
            running: Mutex::new(HashMap::new()),
            limits,
            metrics,
            payloads,
        })
    }

    /// Wakes `notify` after each outcome stored with a delivery (set once).
    pub fn on_outcome(&self, notify: Arc<Notify>) {
        let _ = self.on_outcome.set(notify);
    }

    /// Wakes the loop (after a submit).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Tasks running on this node now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.slots.available_permits()
    }

    /// Cancels the task's attempt if it runs here.
    pub fn abort(&self, id: &str) {
        if let Some(handle) = lock(&self.running).remove(id) {
            handle.abort();
        }
    }

    /// Recovers the tasks a crash left `running`: back to the queue when
    /// the request may be sent again (an idempotent method, an idempotency
    /// key or `retry_unsafe`); otherwise finished as failed with a request
    /// error `Interrupted`, so that a call that may or may not have reached
    /// the upstream is never sent twice silently. Returns (requeued, failed).
    ///
    /// On SQLite this runs at the start, on every task left running; on
    /// PostgreSQL also every third of the lease, on the tasks whose lease
    /// ran out (a node that crashed), whichever node notices first.
    pub async fn recover(&self) -> Result<(usize, usize), DbError> {
        let mut counts = (0, 0);
        loop {
            let batch = self.db.stale(RECOVER_BATCH).await?;
            let before = counts;
            let full = batch.len() == RECOVER_BATCH;
            self.recover_batch(batch, &mut counts).await?;
            if !full || counts == before {
                return Ok(counts);
            }
        }
    }

    async fn recover_batch(
        &self,
        batch: Vec<TaskRecord>,
        counts: &mut (usize, usize),
    ) -> Result<(), DbError> {
        for record in batch {
            let request = self.stored_request(&record).await;
            if may_resend(request.as_ref()) {
                if self.db.requeue(&record.id).await? {
                    counts.0 += 1;
                }
            } else if self.interrupt(&record, request.as_ref(), None).await? {
                counts.1 += 1;
            }
        }
        Ok(())
    }

    /// The request of a task as stored, or `None` when it cannot be loaded
    /// back (then it is not known to be safe to send again).
    async fn stored_request(&self, record: &TaskRecord) -> Option<Request> {
        match self.payloads.decode(&record.request).await {
            Ok(json) => Request::from_json_with_limits(&json, &self.limits).ok(),
            Err(error) => {
                tracing::error!(task = %record.id, %error, "cannot load a stored request");
                None
            }
        }
    }

    /// Finishes a running task whose request may have reached its upstream
    /// and may not be sent again as failed with a request error
    /// `Interrupted`, its delivery queued like any outcome's. `owner`: the
    /// node holding it (a stop), or `None` for a node that is gone
    /// (recovery). Whether it was finished here (false: it had finished or
    /// moved on meanwhile).
    async fn interrupt(
        &self,
        record: &TaskRecord,
        request: Option<&Request>,
        owner: Option<String>,
    ) -> Result<bool, DbError> {
        let error = TaskError::Request(RequestError {
            class_name: "Interrupted".into(),
            message: "the daemon stopped while this request was in flight; it may or may not have reached the upstream, and a request that is not idempotent is not sent twice".into(),
            backtrace: Vec::new(),
            request_id: record.id.clone(),
            error_type: ErrorType::Unknown,
            duration: Duration::ZERO,
            url: request.map(|r| r.url().to_string()).unwrap_or_default(),
            method: request.map_or(patient_wire::Method::Post, Request::method),
            callback_args: CallbackArgs::from_json(&record.callback_args).unwrap_or_default(),
            attempts: Vec::new(),
        });
        let kind = error_kind(&error);
        let event = outcome_event(
            &record.id,
            &record.callback,
            &record.callback_args,
            &Err(error),
        );
        let event = self
            .payloads
            .encode_outcome(event)
            .await
            .map_err(|e| DbError::Backend(format!("cannot encode the outcome: {e}")))?;
        let refs = Payloads::references(&event);
        let finished = self
            .db
            .finish(Finish {
                id: record.id.clone(),
                owner,
                state: TaskState::Failed,
                outcome: event,
                attempts: record.attempts.clone(),
                request_sent: true,
                finished_at: now_ms(),
                delivery: (record.deliver != Deliver::None).then(message_id),
            })
            .await?;
        if finished {
            self.metrics.outcome("failed");
            self.metrics.error(kind);
            if record.deliver != Deliver::None {
                if let Some(deliverer) = self.on_outcome.get() {
                    deliverer.notify_one();
                }
            }
        } else {
            self.payloads.delete_outcome(&refs).await;
        }
        Ok(finished)
    }

    /// Claims and runs tasks until [`stop_claiming`](Self::stop_claiming),
    /// and renews this node's leases (its tasks' and its deliveries') until
    /// the task running it is aborted: what drains during a stop stays this
    /// node's, so abort it once [`stop`](Self::stop) and the deliverer's
    /// stop have ended.
    pub async fn run(self: Arc<Self>) {
        let _heartbeat = AbortOnDrop(tokio::spawn(Arc::clone(&self).heartbeat()));
        // Other nodes' submits wake this loop too (PostgreSQL).
        let _listening = self
            .db
            .listen_for_tasks(Arc::clone(&self.wake))
            .map(AbortOnDrop);
        while !self.stopping.load(Ordering::Acquire) {
            let free = self.slots.available_permits().min(CLAIM_BATCH);
            let mut claimed = 0;
            if free > 0 {
                match self.db.claim(&self.owner, now_ms(), self.lease, free).await {
                    Ok(tasks) => {
                        claimed = tasks.len();
                        for task in tasks {
                            self.spawn(task);
                        }
                    }
                    Err(error) => tracing::error!(%error, "cannot claim tasks"),
                }
            }
            if claimed == free && free > 0 {
                continue; // more may be due
            }
            let sleep = match self.db.next_due().await {
                Ok(Some(at)) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)),
                _ => IDLE_POLL,
            }
            .min(IDLE_POLL);
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                () = self.stopped.notified() => {}
            }
        }
        std::future::pending::<()>().await;
    }

    fn spawn(self: &Arc<Self>, record: TaskRecord) {
        let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
            // Cannot happen: claims never exceed the free slots. Release it.
            let db = self.db.clone();
            let id = record.id.clone();
            tokio::spawn(async move {
                let _ = db.requeue(&id).await;
            });
            return;
        };
        let runner = Arc::clone(self);
        let id = record.id.clone();
        let span = tracing::info_span!(
            "task",
            "task.id" = %record.id,
            callback = %record.callback,
            attempts_so_far = record.attempts.len(),
            attempt = record.next_attempt.max(1),
            owner = %self.owner,
            state = tracing::field::Empty,
        );
        let mut running = lock(&self.running);
        let handle = tokio::spawn(
            async move {
                let _permit = permit;
                let id = record.id.clone();
                if let Err(error) = runner.step(record).await {
                    tracing::error!(task = %id, %error, "cannot store a step's result; the task stays leased and resumes after a restart");
                }
                lock(&runner.running).remove(&id);
                runner.wake.notify_one();
            }
            .instrument(span),
        );
        running.insert(id, handle.abort_handle());
    }

    /// Runs one step of a claimed task and stores what comes next.
    async fn step(&self, record: TaskRecord) -> Result<(), DbError> {
        let step_started = SystemTime::now();
        let request_json = match self.payloads.decode(&record.request).await {
            Ok(json) => json,
            Err(e @ StoreError::Backend { .. }) => {
                // The store is unreachable: try again shortly, nothing sent.
                tracing::warn!(task = %record.id, error = %e, "cannot fetch a stored request; the task waits");
                let mut progress = TaskProgress::new(record.deadline.map(system_time));
                progress.next_attempt = record.next_attempt;
                progress.request_sent = record.request_sent;
                return self
                    .reschedule(
                        &record,
                        &progress,
                        record.attempts.clone(),
                        SystemTime::now() + STORE_RETRY,
                    )
                    .await;
            }
            Err(e) => {
                // Missing from the store, or not decryptable with the
                // configured secrets: it never will be.
                let error = stored_request_error(&record, &Value::Null, &e.to_string());
                return self
                    .finish(&record, Err(error), record.attempts.clone(), false)
                    .await;
            }
        };
        let request = match Request::from_json_with_limits(&request_json, &self.limits) {
            Ok(request) => request,
            Err(e) => {
                // Checked at submit; a stored request that no longer loads
                // (limits lowered since) ends the task instead of looping.
                let error = stored_request_error(&record, &request_json, &e.to_string());
                return self
                    .finish(&record, Err(error), record.attempts.clone(), false)
                    .await;
            }
        };
        let task = Task {
            id: record.id.clone(),
            request,
            callback: record.callback.clone(),
            callback_args: CallbackArgs::from_json(&record.callback_args).unwrap_or_default(),
            raise_error_responses: Some(record.raise_error_responses),
        };
        let mut progress = TaskProgress::new(record.deadline.map(system_time));
        progress.next_attempt = record.next_attempt;
        progress.request_sent = record.request_sent;
        progress.attempts = record
            .attempts
            .iter()
            .filter_map(|a| Attempt::from_json(a).ok())
            .collect();
        let before = progress.attempts.len();
        let decision = self
            .client
            .step(&task, &mut progress, LimitWait::UpTo(LIMIT_WAIT))
            .await;
        let mut attempts = record.attempts.clone();
        for attempt in progress.attempts.iter().skip(before) {
            let mut json = attempt.to_json();
            json["started_at"] = rfc3339(unix_ms(step_started)).into();
            attempts.push(json);
        }
        match decision {
            Decision::Done(result) => {
                self.finish(&record, result, attempts, progress.request_sent)
                    .await
            }
            Decision::Retry { not_before, .. } => {
                self.metrics.retry();
                self.reschedule(&record, &progress, attempts, not_before)
                    .await
            }
            Decision::Refused { until, error, .. } => {
                let past_deadline = record.deadline.is_some_and(|d| unix_ms(until) >= d);
                if past_deadline {
                    self.finish(&record, Err(error), attempts, progress.request_sent)
                        .await
                } else {
                    self.reschedule(&record, &progress, attempts, until).await
                }
            }
            _ => {
                let error = stored_request_error(
                    &record,
                    &request_json,
                    "the engine gave an unknown decision",
                );
                self.finish(&record, Err(error), attempts, progress.request_sent)
                    .await
            }
        }
    }

    async fn reschedule(
        &self,
        record: &TaskRecord,
        progress: &TaskProgress,
        attempts: Vec<Value>,
        not_before: SystemTime,
    ) -> Result<(), DbError> {
        self.db
            .reschedule(Reschedule {
                id: record.id.clone(),
                owner: self.owner.clone(),
                not_before: unix_ms(not_before),
                next_attempt: progress.next_attempt,
                request_sent: progress.request_sent,
                attempts,
            })
            .await?;
        tracing::Span::current().record("state", TaskState::Scheduled.as_str());
        Ok(())
    }

    async fn finish(
        &self,
        record: &TaskRecord,
        result: Result<Response, TaskError>,
        attempts: Vec<Value>,
        request_sent: bool,
    ) -> Result<(), DbError> {
        let state = if result.is_ok() {
            TaskState::Completed
        } else {
            TaskState::Failed
        };
        let event = outcome_event(&record.id, &record.callback, &record.callback_args, &result);
        let event = self
            .payloads
            .encode_outcome(event)
            .await
            .map_err(|e| DbError::Backend(format!("cannot encode the outcome: {e}")))?;
        let refs = Payloads::references(&event);
        let finished_at = now_ms();
        let stored = self
            .db
            .finish(Finish {
                id: record.id.clone(),
                owner: Some(self.owner.clone()),
                state,
                outcome: event,
                attempts,
                request_sent,
                finished_at,
                delivery: (record.deliver != Deliver::None).then(message_id),
            })
            .await?;
        if stored {
            tracing::Span::current().record("state", state.as_str());
            if record.deliver != Deliver::None {
                if let Some(deliverer) = self.on_outcome.get() {
                    deliverer.notify_one();
                }
            }
            self.metrics.outcome(state.as_str());
            if let Err(error) = &result {
                self.metrics.error(error_kind(error));
            }
            self.metrics.end_to_end(Duration::from_millis(
                u64::try_from(finished_at - record.created_at).unwrap_or(0),
            ));
        } else {
            // Finished elsewhere (cancelled, or the lease was lost): what
            // this outcome stored is nobody's.
            self.payloads.delete_outcome(&refs).await;
        }
        Ok(())
    }

    async fn heartbeat(self: Arc<Self>) {
        let every = self.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            if let Err(error) = self.db.renew(&self.owner, self.lease).await {
                tracing::error!(%error, "cannot renew leases");
            }
            if self.db.is_shared() {
                match self.recover().await {
                    Ok((0, 0)) => {}
                    Ok((requeued, failed)) => tracing::warn!(
                        requeued,
                        interrupted = failed,
                        "took up the tasks of a node whose lease ran out"
                    ),
                    Err(error) => tracing::error!(%error, "cannot recover stale tasks"),
                }
            }
        }
    }

    /// Stops claiming new tasks at once (the attempts in flight go on):
    /// the first step of a stop, as soon as the signal arrives.
    pub fn stop_claiming(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.notify_waiters();
        // A permit, in case the loop is between its check and its wait.
        self.wake.notify_one();
    }

    /// Stops claiming, waits up to `timeout` for the attempts in flight,
    /// then cuts off the rest and settles every task this node still holds
    /// as a crash would ([`recover`](Self::recover)): back to the queue with
    /// its attempt count unchanged, except a task whose request may have
    /// reached its upstream and may not be sent again, which ends failed
    /// with `Interrupted` (its delivery queued, for the next start or
    /// another node: the deliverer stops with the runner).
    pub async fn stop(&self, timeout: Duration) -> Result<Stopped, DbError> {
        self.stop_claiming();
        let all = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(timeout, self.slots.acquire_many(all)).await;
        if drained.is_err() {
            let handles: Vec<_> = lock(&self.running).drain().map(|(_, h)| h).collect();
            for handle in handles {
                handle.abort();
            }
            // A cut-off attempt gives its slot back once its future is
            // dropped: wait for that, so that none writes after what follows.
            let _ = tokio::time::timeout(ABORT_GRACE, self.slots.acquire_many(all)).await;
        }
        let mut interrupted = 0;
        for record in self.db.held(&self.owner).await? {
            let request = self.stored_request(&record).await;
            if !may_resend(request.as_ref())
                && self
                    .interrupt(&record, request.as_ref(), Some(self.owner.clone()))
                    .await?
            {
                interrupted += 1;
            }
        }
        let released = self.db.release(&self.owner).await?;
        Ok(Stopped {
            released,
            interrupted,
        })
    }
}

/// Aborts a spawned task when dropped (its owner ended or was aborted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a [`Runner::stop`] did with the tasks still running at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stopped {
    /// Put back in the queue, to run again on the next start (or on another
    /// node).
    pub released: u64,
    /// Finished as failed with `Interrupted`: their request may have reached
    /// the upstream and may not be sent again.
    pub interrupted: usize,
}

/// Whether a task left running may be sent again: its request loaded back
/// and is idempotent (by method), carries an idempotency key or opts in
/// with `retry_unsafe`. The one rule for a crash and a stop.
fn may_resend(request: Option<&Request>) -> bool {
    request.is_some_and(|r| {
        r.method().is_idempotent()
            || r.has_idempotency_key()
            || r.request_options()
                .retry
                .as_ref()
                .and_then(|o| o.retry_unsafe)
                .unwrap_or(false)
    })
}

/// The error of a task whose stored request (`request`, as loaded back, or
/// null) cannot run.
fn stored_request_error(record: &TaskRecord, request: &Value, message: &str) -> TaskError {
    TaskError::Request(RequestError {
        class_name: "InvalidStoredRequest".into(),
        message: message.to_owned(),
        backtrace: Vec::new(),
        request_id: record.id.clone(),
        error_type: ErrorType::Unknown,
        duration: Duration::ZERO,
        url: request["url"].as_str().unwrap_or_default().to_owned(),
        method: patient_wire::Method::Get,
        callback_args: CallbackArgs::from_json(&record.callback_args).unwrap_or_default(),
        attempts: Vec::new(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
