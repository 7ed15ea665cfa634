//! The queue's storage, behind one API with two backends:
//!
//! * [SQLite](sqlite) (the default, one node): WAL mode, every write through
//!   one connection that commits in groups, so many submits share one fsync.
//! * [PostgreSQL](postgres) (several nodes sharing one queue): each write its
//!   own transaction on a pool; claims take rows `FOR UPDATE SKIP LOCKED`, so
//!   nodes never claim the same task, and a task or delivery whose lease ran
//!   out (its node crashed) is taken up by another node.
//!
//! Both store the same rows (the migrations in `migrations/`), JSON as text,
//! times as milliseconds since the Unix epoch, and read them back through
//! one [`task_of`].
//!
//! Two clocks, each for what it is good at. Schedules (`not_before`,
//! `next_at`, `finished_at`) are the caller's times, given as `now`. Leases
//! are given as a duration and kept on the database's clock: on PostgreSQL
//! every lease is set, renewed and judged expired against `now()` in SQL,
//! so nodes whose clocks disagree never take each other's live work for a
//! dead node's (SQLite has one node: its clock is this process's).

pub mod postgres;
pub mod sqlite;

use std::time::Duration;

use serde_json::Value;

use crate::model::{Deliver, DeliveryRecord, DeliveryState, TaskRecord, TaskState};

/// The columns of a task with its delivery; a macro so that queries built
/// from it stay literals.
macro_rules! select_task {
    () => {
        "SELECT t.id, t.state, t.request, t.callback, t.callback_args, \
    t.raise_error_responses, t.deliver, t.idempotency_key, t.priority, t.created_at, t.not_before, \
    t.deadline, t.finished_at, t.next_attempt, t.request_sent, t.attempts, t.outcome, \
    d.state AS d_state, d.attempts AS d_attempts, d.last_error AS d_last_error, \
    d.message_id AS d_message_id, d.next_at AS d_next_at \
    FROM patient_tasks t LEFT JOIN patient_deliveries d ON d.task_id = t.id"
    };
}
pub(crate) use select_task;

/// The statements both backends run as they are (the rest differ in
/// dialect: casts, `SKIP LOCKED`, bulk forms).
pub(crate) mod sql {
    /// Cancels a task that has not finished.
    pub(crate) const CANCEL: &str = "UPDATE patient_tasks SET state = 'cancelled', finished_at = $1, lease_owner = NULL, lease_until = NULL WHERE id = $2 AND state IN ('scheduled', 'queued', 'running')";
    /// The tasks a node holds running (`$1`: the node).
    pub(crate) const HELD: &str = concat!(
        select_task!(),
        " WHERE t.state = 'running' AND t.lease_owner = $1"
    );
    /// Tasks by state as the API shows it at `$1`.
    pub(crate) const COUNTS: &str = "SELECT CASE WHEN state IN ('scheduled', 'queued') THEN (CASE WHEN not_before > $1 THEN 'scheduled' ELSE 'queued' END) ELSE state END AS state, COUNT(*) AS n FROM patient_tasks GROUP BY 1";
    /// Deletes a task's delivery.
    pub(crate) const DELETE_DELIVERY: &str = "DELETE FROM patient_deliveries WHERE task_id = $1";
    /// The task with an idempotency key.
    pub(crate) const ID_BY_KEY: &str = "SELECT id FROM patient_tasks WHERE idempotency_key = $1";
    /// Queues a finished task's delivery.
    pub(crate) const INSERT_DELIVERY: &str = "INSERT INTO patient_deliveries (task_id, state, attempts, next_at, message_id) VALUES ($1, 'pending', 0, $2, $3)";
    /// A stored setting.
    pub(crate) const META_GET: &str = "SELECT value FROM patient_meta WHERE key = $1";
    /// Stores a setting unless one is there.
    pub(crate) const META_INSERT: &str =
        "INSERT INTO patient_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";
    /// When the next pending delivery may be claimed.
    pub(crate) const NEXT_DELIVERY: &str = "SELECT MIN(CASE WHEN lease_until IS NOT NULL AND lease_until >= $1 THEN lease_until ELSE next_at END) AS at FROM patient_deliveries WHERE state = 'pending'";
    /// The earliest `not_before` of a waiting task.
    pub(crate) const NEXT_DUE: &str =
        "SELECT MIN(not_before) AS at FROM patient_tasks WHERE state IN ('scheduled', 'queued')";
    /// Queues a delivery again with a fresh count of tries.
    pub(crate) const REDELIVER: &str = "UPDATE patient_deliveries SET state = 'pending', attempts = 0, next_at = $1, last_error = NULL, lease_owner = NULL, lease_until = NULL WHERE task_id = $2";
    /// Frees a node's delivery leases.
    pub(crate) const RELEASE_DELIVERIES: &str = "UPDATE patient_deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1";
    /// Puts a node's running tasks back in the queue.
    pub(crate) const RELEASE_TASKS: &str = "UPDATE patient_tasks SET state = 'queued', lease_owner = NULL, lease_until = NULL WHERE state = 'running' AND lease_owner = $1";
    /// Extends a node's delivery leases (SQLite; PostgreSQL sets them on its
    /// own clock).
    pub(crate) const RENEW_DELIVERIES: &str =
        "UPDATE patient_deliveries SET lease_until = $1 WHERE lease_owner = $2";
    /// Extends a node's task leases (SQLite; PostgreSQL sets them on its own
    /// clock).
    pub(crate) const RENEW_TASKS: &str =
        "UPDATE patient_tasks SET lease_until = $1 WHERE state = 'running' AND lease_owner = $2";
    /// Puts a running task back to wait for its next step.
    pub(crate) const RESCHEDULE: &str = "UPDATE patient_tasks SET state = 'scheduled', not_before = $1, next_attempt = $2, request_sent = $3, attempts = $4, lease_owner = NULL, lease_until = NULL WHERE id = $5 AND state = 'running' AND lease_owner = $6";
}

/// A lease's length in milliseconds, as the rows keep times.
pub(crate) fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis()).unwrap_or(i64::MAX)
}

/// The most jobs one SQLite transaction commits.
pub const GROUP: usize = sqlite::GROUP;

/// A storage failure or a refused change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// The database failed.
    #[error("database: {0}")]
    Backend(String),
    /// No task with this id.
    #[error("no task {0}")]
    NotFound(String),
    /// The change does not apply to the task as it is.
    #[error("{0}")]
    Conflict(String),
    /// The writer has stopped.
    #[error("the database writer has stopped")]
    Closed,
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        DbError::Backend(e.to_string())
    }
}

/// The queue's database: SQLite or PostgreSQL. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db(Backend);

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(sqlite::SqliteDb),
    Postgres(postgres::PgDb),
}

/// Calls the same method on whichever backend this is.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.0 {
            Backend::Sqlite(db) => db.$method($($arg),*).await,
            Backend::Postgres(db) => db.$method($($arg),*).await,
        }
    };
}

impl Db {
    /// Opens the database at `url`, creating what is missing, and runs the
    /// migration: `sqlite://PATH` (`sqlite:PATH`, `sqlite::memory:`) or
    /// `postgres://…` (`postgresql://…`).
    pub async fn open(url: &str) -> Result<Db, DbError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Db(Backend::Postgres(postgres::PgDb::open(url).await?)))
        } else {
            Ok(Db(Backend::Sqlite(sqlite::SqliteDb::open(url).await?)))
        }
    }

    /// Whether several nodes may share this queue (PostgreSQL): then a
    /// task is recovered once its lease runs out, not at a start.
    pub fn is_shared(&self) -> bool {
        matches!(self.0, Backend::Postgres(_))
    }

    /// Transactions committed so far (a figure for group commit).
    pub fn commits(&self) -> u64 {
        match &self.0 {
            Backend::Sqlite(db) => db.commits(),
            Backend::Postgres(db) => db.commits(),
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        dispatch!(self.ping())
    }

    /// Wakes `wake` whenever another node (or this one) makes tasks
    /// claimable, until the returned task is aborted: on PostgreSQL a
    /// `LISTEN` on a connection of its own. `None` on SQLite, where every
    /// change comes through this process and wakes the loop itself.
    pub fn listen_for_tasks(
        &self,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        match &self.0 {
            Backend::Sqlite(_) => None,
            Backend::Postgres(db) => Some(db.listen(wake)),
        }
    }

    /// Inserts tasks, all or none. A task whose idempotency key is taken is
    /// not inserted: the existing task comes back instead, with `false`.
    pub async fn insert(&self, tasks: Vec<NewTask>) -> Result<Vec<(TaskRecord, bool)>, DbError> {
        dispatch!(self.insert(tasks))
    }

    /// One task.
    pub async fn get(&self, id: &str) -> Result<Option<TaskRecord>, DbError> {
        dispatch!(self.get(id))
    }

    /// A page of tasks, newest first.
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<TaskRecord>, DbError> {
        dispatch!(self.list(query))
    }

    /// Claims up to `limit` tasks due at `now` for `owner`, for `lease` on
    /// the database's clock, highest priority first, then oldest due.
    pub async fn claim(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, DbError> {
        dispatch!(self.claim(owner, now, lease, limit))
    }

    /// The earliest `not_before` of a waiting task, if any.
    pub async fn next_due(&self) -> Result<Option<i64>, DbError> {
        dispatch!(self.next_due())
    }

    /// Extends the leases `owner` holds on running tasks and deliveries to
    /// `lease` from now on the database's clock.
    pub async fn renew(&self, owner: &str, lease: Duration) -> Result<(), DbError> {
        dispatch!(self.renew(owner, lease))
    }

    /// Puts a running task back to wait for its next step; false when this
    /// node no longer holds it (cancelled meanwhile).
    pub async fn reschedule(&self, r: Reschedule) -> Result<bool, DbError> {
        dispatch!(self.reschedule(r))
    }

    /// Finishes a task and queues its delivery in the same transaction;
    /// false when the task was no longer this node's (or already finished).
    /// With `owner` `None` (recovery) it finishes a task whose node is gone:
    /// on SQLite any running task (recovery runs at the start, before any
    /// claim), on PostgreSQL only one whose lease has run out by the
    /// database's clock.
    pub async fn finish(&self, f: Finish) -> Result<bool, DbError> {
        dispatch!(self.finish(f))
    }

    /// Releases every task `owner` holds back to the queue (a stop, once
    /// its attempts have ended). How many.
    pub async fn release(&self, owner: &str) -> Result<u64, DbError> {
        dispatch!(self.release(owner))
    }

    /// Frees the deliveries `owner` holds (a stop, once its deliveries in
    /// flight have ended), so that the next start or another node sends
    /// them. How many.
    pub async fn release_deliveries(&self, owner: &str) -> Result<u64, DbError> {
        dispatch!(self.release_deliveries(owner))
    }

    /// Every task `owner` holds `running` (at a stop, once its attempts
    /// have ended or been cut off).
    pub async fn held(&self, owner: &str) -> Result<Vec<TaskRecord>, DbError> {
        dispatch!(self.held(owner))
    }

    /// Up to `limit` tasks left `running` by a node that is gone (a crash):
    /// on SQLite every running task (asked at the start, when no node runs
    /// any), on PostgreSQL those whose lease has run out by the database's
    /// clock.
    pub async fn stale(&self, limit: usize) -> Result<Vec<TaskRecord>, DbError> {
        dispatch!(self.stale(limit))
    }

    /// Frees the deliveries a stopped node left claimed, so that they are
    /// sent at this start rather than once their lease runs out. SQLite
    /// only (one node: any lease found at the start is a stopped node's);
    /// on PostgreSQL an expired delivery lease is claimable anyway. How many.
    pub async fn recover_deliveries(&self) -> Result<u64, DbError> {
        dispatch!(self.recover_deliveries())
    }

    /// Puts a task left running by a node that is gone back in the queue
    /// (as [`stale`](Self::stale) judges it).
    pub async fn requeue(&self, id: &str) -> Result<bool, DbError> {
        dispatch!(self.requeue(id))
    }

    /// Cancels a task that has not finished; its delivery (if any) is not
    /// queued. The task as it is now.
    pub async fn cancel(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        dispatch!(self.cancel(id, now))
    }

    /// Queues a finished task's delivery again, with a fresh count of tries
    /// (the same message id).
    pub async fn redeliver(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        dispatch!(self.redeliver(id, now))
    }

    /// Runs a failed task again as a new series of attempts.
    pub async fn retry(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        dispatch!(self.retry(id, now))
    }

    /// Claims up to `limit` deliveries due at `now` for `owner`, for `lease`
    /// on the database's clock; a delivery whose lease has run out (its
    /// node is gone) is due again.
    pub async fn claim_deliveries(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, DbError> {
        dispatch!(self.claim_deliveries(owner, now, lease, limit))
    }

    /// When the next pending delivery may be claimed, if any: its
    /// `next_at`, or for one claimed now (in flight) the end of its lease.
    /// A hint for a sleep: on PostgreSQL a lease end is on the database's
    /// clock, `now` on the caller's.
    pub async fn next_delivery(&self, now: i64) -> Result<Option<i64>, DbError> {
        dispatch!(self.next_delivery(now))
    }

    /// Records a try of the delivery of message `message_id` (its
    /// `webhook-id`) that `owner` claimed. It counts only while that message
    /// is still the task's delivery: the answer to an earlier outcome's
    /// message (before a retry made a new outcome) changes nothing.
    pub async fn delivered(
        &self,
        task_id: &str,
        message_id: &str,
        owner: &str,
        result: DeliveryResult,
    ) -> Result<(), DbError> {
        dispatch!(self.delivered(task_id, message_id, owner, result))
    }

    /// Deletes up to `limit` tasks finished before `before` whose delivery
    /// is not pending; the request and outcome JSON of each one deleted (so
    /// that the caller can delete what they refer to).
    pub async fn purge(
        &self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<(Value, Option<Value>)>, DbError> {
        dispatch!(self.purge(before, limit))
    }

    /// The value stored under `key`, storing `value` first when there is
    /// none (the first node's choice wins).
    pub async fn meta_or_insert(&self, key: &str, value: String) -> Result<String, DbError> {
        dispatch!(self.meta_or_insert(key, value))
    }

    /// Tasks by state as the API shows it at `now` (a waiting task is
    /// `scheduled` until its time, then `queued`).
    pub async fn counts(&self, now: i64) -> Result<Vec<(String, i64)>, DbError> {
        dispatch!(self.counts(now))
    }

    /// The latest `limit` failures, newest finished first: tasks that
    /// failed and finished tasks whose delivery failed.
    pub async fn recent_failures(&self, limit: u32) -> Result<Vec<TaskRecord>, DbError> {
        dispatch!(self.recent_failures(limit))
    }
}

/// A task to insert.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// The record as it starts (state `scheduled` or `queued`).
    pub record: TaskRecord,
}

/// What a reschedule writes after a step that did not finish the task.
#[derive(Debug, Clone)]
pub struct Reschedule {
    /// The task.
    pub id: String,
    /// Only while this node holds it.
    pub owner: String,
    /// When it may run again (ms).
    pub not_before: i64,
    /// The next attempt's number.
    pub next_attempt: u32,
    /// Whether a request may have reached the upstream.
    pub request_sent: bool,
    /// The attempt records so far.
    pub attempts: Vec<Value>,
}

/// What finishing a task writes: its outcome and its delivery, together.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The task.
    pub id: String,
    /// Only while this node holds it; `None` for recovery at start.
    pub owner: Option<String>,
    /// `completed` or `failed`.
    pub state: TaskState,
    /// The outcome event.
    pub outcome: Value,
    /// The attempt records.
    pub attempts: Vec<Value>,
    /// Whether a request may have reached the upstream.
    pub request_sent: bool,
    /// When (ms).
    pub finished_at: i64,
    /// The delivery to queue, with its message id, unless the task has no
    /// channel.
    pub delivery: Option<String>,
}

/// A delivery claimed for sending.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    /// The task (its outcome and channel).
    pub task: TaskRecord,
    /// The delivery.
    pub delivery: DeliveryRecord,
}

/// A finished delivery try.
#[derive(Debug, Clone)]
pub enum DeliveryResult {
    /// Delivered.
    Delivered,
    /// Not delivered; try again at `next_at` (ms).
    Retry {
        /// Why.
        error: String,
        /// When.
        next_at: i64,
    },
    /// Not delivered and no tries left.
    Failed {
        /// Why.
        error: String,
    },
}

/// A page of the task list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks with this callback.
    pub callback: Option<String>,
    /// At most this many.
    pub limit: u32,
    /// After this `(created_at, id)`, newest first.
    pub cursor: Option<(i64, String)>,
    /// Judge `state` as the task JSON shows it at this time (ms): a waiting
    /// task whose `not_before` has come is `queued`, one still waiting for
    /// it `scheduled`, whatever the row says. `None`: as stored.
    pub at: Option<i64>,
}

/// The refusal of a cancel of a task that has already finished.
pub(crate) fn cannot_cancel(task: &TaskRecord) -> DbError {
    DbError::Conflict(format!(
        "task {} is {}; only a task that has not finished can be cancelled",
        task.id,
        task.state.as_str()
    ))
}

/// Whether a task's outcome may be delivered again: it has finished, has a
/// channel and no delivery pending.
pub(crate) fn check_redeliver(task: &TaskRecord) -> Result<(), DbError> {
    let id = &task.id;
    if !matches!(task.state, TaskState::Completed | TaskState::Failed) {
        return Err(DbError::Conflict(format!(
            "task {id} is {}; only a finished task's outcome can be delivered again",
            task.state.as_str()
        )));
    }
    if task.deliver == Deliver::None {
        return Err(DbError::Conflict(format!(
            "task {id} has no delivery channel; poll it instead"
        )));
    }
    if task
        .delivery
        .as_ref()
        .is_some_and(|d| d.state == DeliveryState::Pending)
    {
        return Err(DbError::Conflict(format!(
            "task {id}'s delivery is already pending"
        )));
    }
    Ok(())
}

/// Whether a task may be run again as a new series of attempts: it failed.
pub(crate) fn check_retry(task: &TaskRecord) -> Result<(), DbError> {
    if task.state != TaskState::Failed {
        return Err(DbError::Conflict(format!(
            "task {} is {}; only a failed task can be retried",
            task.id,
            task.state.as_str()
        )));
    }
    Ok(())
}

/// What [`task_of`] reads from a row of either backend.
pub(crate) trait Columns {
    /// A text column.
    fn text(&self, column: &str) -> Result<String, DbError>;
    /// A text column that may be NULL.
    fn opt_text(&self, column: &str) -> Result<Option<String>, DbError>;
    /// An integer column.
    fn int(&self, column: &str) -> Result<i64, DbError>;
    /// An integer column that may be NULL.
    fn opt_int(&self, column: &str) -> Result<Option<i64>, DbError>;
    /// A boolean column (an integer on SQLite).
    fn flag(&self, column: &str) -> Result<bool, DbError>;
}

/// Implements [`Columns`] for a sqlx row type.
macro_rules! columns_for {
    ($row:ty) => {
        impl $crate::db::Columns for $row {
            fn text(&self, column: &str) -> Result<String, $crate::db::DbError> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn opt_text(&self, column: &str) -> Result<Option<String>, $crate::db::DbError> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn int(&self, column: &str) -> Result<i64, $crate::db::DbError> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn opt_int(&self, column: &str) -> Result<Option<i64>, $crate::db::DbError> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
            fn flag(&self, column: &str) -> Result<bool, $crate::db::DbError> {
                Ok(sqlx::Row::try_get(self, column)?)
            }
        }
    };
}
pub(crate) use columns_for;

/// The request and outcome JSON of a purged row (`RETURNING request,
/// outcome`).
pub(crate) fn purged(row: &impl Columns) -> Result<(Value, Option<Value>), DbError> {
    let parse = |text: Option<String>| text.and_then(|j| serde_json::from_str(&j).ok());
    Ok((
        parse(row.opt_text("request")?).unwrap_or(Value::Null),
        parse(row.opt_text("outcome")?),
    ))
}

fn json_column(row: &impl Columns, column: &str) -> Result<Value, DbError> {
    let text = row.text(column)?;
    serde_json::from_str(&text)
        .map_err(|e| DbError::Backend(format!("column {column} holds invalid JSON: {e}")))
}

/// A task (with its delivery, when the row has one) from a row of
/// [`select_task!`]'s columns.
pub(crate) fn task_of(row: &impl Columns) -> Result<TaskRecord, DbError> {
    let state = row.text("state")?;
    let state = state
        .parse::<TaskState>()
        .ok()
        .ok_or_else(|| DbError::Backend(format!("unknown task state {state:?}")))?;
    let deliver = json_column(row, "deliver")?;
    let deliver = Deliver::from_json(Some(&deliver))
        .map_err(|(field, message)| DbError::Backend(format!("stored {field}: {message}")))?;
    let attempts = match json_column(row, "attempts")? {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    let outcome = row
        .opt_text("outcome")?
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| DbError::Backend(format!("column outcome holds invalid JSON: {e}")))?;
    let delivery = match row.opt_text("d_state")? {
        None => None,
        Some(name) => Some(DeliveryRecord {
            state: name
                .parse::<DeliveryState>()
                .ok()
                .ok_or_else(|| DbError::Backend(format!("unknown delivery state {name:?}")))?,
            attempts: u32::try_from(row.int("d_attempts")?).unwrap_or(0),
            last_error: row.opt_text("d_last_error")?,
            message_id: row.text("d_message_id")?,
            next_at: row.opt_int("d_next_at")?,
        }),
    };
    Ok(TaskRecord {
        id: row.text("id")?,
        state,
        request: json_column(row, "request")?,
        callback: row.text("callback")?,
        callback_args: json_column(row, "callback_args")?,
        raise_error_responses: row.flag("raise_error_responses")?,
        deliver,
        idempotency_key: row.opt_text("idempotency_key")?,
        priority: row.int("priority")?,
        created_at: row.int("created_at")?,
        not_before: row.int("not_before")?,
        deadline: row.opt_int("deadline")?,
        finished_at: row.opt_int("finished_at")?,
        next_attempt: u32::try_from(row.int("next_attempt")?).unwrap_or(1),
        request_sent: row.flag("request_sent")?,
        attempts,
        outcome,
        delivery,
    })
}

/// A batch to insert, its repeats set aside: the same idempotency key twice
/// in one batch makes one task, and the repeat is answered with the first
/// one's task.
pub(crate) struct Batch {
    /// How many tasks came.
    pub len: usize,
    /// The tasks to insert (or to find by key), with their place.
    pub fresh: Vec<(usize, TaskRecord)>,
    /// (place, place of the first task with its key).
    pub repeats: Vec<(usize, usize)>,
}

impl Batch {
    pub(crate) fn new(tasks: Vec<NewTask>) -> Batch {
        let len = tasks.len();
        let mut fresh: Vec<(usize, TaskRecord)> = Vec::with_capacity(len);
        let mut repeats = Vec::new();
        for (place, NewTask { record }) in tasks.into_iter().enumerate() {
            let first = record.idempotency_key.as_deref().and_then(|key| {
                fresh
                    .iter()
                    .find(|(_, f)| f.idempotency_key.as_deref() == Some(key))
                    .map(|(first, _)| *first)
            });
            match first {
                Some(first) => repeats.push((place, first)),
                None => fresh.push((place, record)),
            }
        }
        Batch {
            len,
            fresh,
            repeats,
        }
    }

    /// The answer in the batch's order, from each fresh task's answer
    /// (`true`: inserted, `false`: an existing task with its key).
    pub(crate) fn answer(
        len: usize,
        repeats: &[(usize, usize)],
        answers: Vec<(usize, (TaskRecord, bool))>,
    ) -> Result<Vec<(TaskRecord, bool)>, DbError> {
        let mut out: Vec<Option<(TaskRecord, bool)>> = vec![None; len];
        for (place, answer) in answers {
            out[place] = Some(answer);
        }
        for &(place, first) in repeats {
            out[place] = out[first].as_ref().map(|(t, _)| (t.clone(), false));
        }
        out.into_iter()
            .map(|a| a.ok_or_else(|| DbError::Backend("a batch task got no answer".into())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{message_id, task_id};

    /// The lease of the claims of these tests, unless one says otherwise.
    const LEASE: Duration = Duration::from_secs(100);

    /// A database of each backend for one test: SQLite in a fresh
    /// directory, and PostgreSQL (`PATIENT_TEST_POSTGRES_URL`, from
    /// `scripts/services.sh`) in a fresh schema.
    struct Fixture {
        db: Db,
        dir: Option<std::path::PathBuf>,
        schema: Option<(String, String)>,
    }

    impl Fixture {
        async fn cleanup(self) {
            if let Some(dir) = self.dir {
                let _ = std::fs::remove_dir_all(dir);
            }
            if let Some((url, schema)) = self.schema {
                let pool = sqlx::PgPool::connect(&url).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
    }

    /// A fresh schema in the test PostgreSQL and the URL that puts a
    /// queue's tables in it; `None` when no PostgreSQL was started (a
    /// failure with `PATIENT_REQUIRE_SERVICES=1`).
    pub(crate) async fn pg_schema(label: &str) -> Option<(String, String, String)> {
        let Ok(url) = std::env::var("PATIENT_TEST_POSTGRES_URL") else {
            assert!(
                std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "PATIENT_TEST_POSTGRES_URL is required (PATIENT_REQUIRE_SERVICES=1); start it with `eval \"$(scripts/services.sh start)\"`"
            );
            return None;
        };
        let schema = format!("q_{label}_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await
            .unwrap();
        let separator = if url.contains('?') { '&' } else { '?' };
        let queue = format!("{url}{separator}options[search_path]={schema}");
        Some((url, schema, queue))
    }

    async fn fixtures(label: &str) -> Vec<Fixture> {
        let dir = std::env::temp_dir().join(format!(
            "patient-db-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let url = format!("sqlite://{}", dir.join("q.db").display());
        let mut all = vec![Fixture {
            db: Db::open(&url).await.unwrap(),
            dir: Some(dir),
            schema: None,
        }];
        if let Some((url, schema, queue)) = pg_schema(label).await {
            all.push(Fixture {
                db: Db::open(&queue).await.unwrap(),
                dir: None,
                schema: Some((url, schema)),
            });
        }
        all
    }

    /// A test run on each backend.
    macro_rules! on_each_backend {
        ($name:ident, $case:ident) => {
            #[tokio::test]
            async fn $name() {
                for fixture in fixtures(stringify!($name)).await {
                    $case(&fixture.db).await;
                    fixture.cleanup().await;
                }
            }
        };
    }

    fn task(key: Option<&str>, not_before: i64, priority: i64) -> NewTask {
        NewTask {
            record: TaskRecord {
                id: task_id(),
                state: TaskState::Queued,
                request: json!({"http_method": "get", "url": "http://127.0.0.1:1/"}),
                callback: "Cb".into(),
                callback_args: json!({"n": 1}),
                raise_error_responses: false,
                deliver: Deliver::Webhook {
                    url: "http://127.0.0.1:1/hook".into(),
                },
                idempotency_key: key.map(str::to_owned),
                priority,
                created_at: not_before,
                not_before,
                deadline: None,
                finished_at: None,
                next_attempt: 1,
                request_sent: false,
                attempts: Vec::new(),
                outcome: None,
                delivery: None,
            },
        }
    }

    async fn a_task_goes_from_submit_to_delivered_case(db: &Db) {
        let inserted = db.insert(vec![task(Some("k1"), 1000, 1)]).await.unwrap();
        assert!(inserted[0].1);
        let id = inserted[0].0.id.clone();
        // The same key gives the first task back.
        let again = db.insert(vec![task(Some("k1"), 2000, 1)]).await.unwrap();
        assert_eq!((again[0].0.id.as_str(), again[0].1), (id.as_str(), false));

        assert!(
            db.claim("n1", 999, LEASE, 10).await.unwrap().is_empty(),
            "not due yet"
        );
        let claimed = db.claim("n1", 1000, LEASE, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].state, TaskState::Running);
        assert!(
            db.claim("n2", 1000, LEASE, 10).await.unwrap().is_empty(),
            "held"
        );

        assert!(db
            .reschedule(Reschedule {
                id: id.clone(),
                owner: "n1".into(),
                not_before: 3000,
                next_attempt: 2,
                request_sent: true,
                attempts: vec![json!({"attempt": 1, "status": 503})],
            })
            .await
            .unwrap());
        let t = db.get(&id).await.unwrap().unwrap();
        assert_eq!(
            (t.state, t.next_attempt, t.not_before),
            (TaskState::Scheduled, 2, 3000)
        );
        assert_eq!(db.next_due().await.unwrap(), Some(3000));

        db.claim("n1", 3000, LEASE, 10).await.unwrap();
        let message = message_id();
        assert!(db
            .finish(Finish {
                id: id.clone(),
                owner: Some("n1".into()),
                state: TaskState::Completed,
                outcome: json!({"task_id": id, "type": "task.completed"}),
                attempts: vec![],
                request_sent: true,
                finished_at: 4000,
                delivery: Some(message.clone()),
            })
            .await
            .unwrap());
        let t = db.get(&id).await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Completed);
        let d = t.delivery.unwrap();
        assert_eq!(
            (d.state, d.message_id.as_str()),
            (DeliveryState::Pending, message.as_str())
        );

        let due = db.claim_deliveries("n1", 4000, LEASE, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        db.delivered(
            &id,
            &message,
            "n1",
            DeliveryResult::Retry {
                error: "503".into(),
                next_at: 5000,
            },
        )
        .await
        .unwrap();
        assert!(db
            .claim_deliveries("n1", 4500, LEASE, 10)
            .await
            .unwrap()
            .is_empty());
        db.claim_deliveries("n1", 5000, LEASE, 10).await.unwrap();
        db.delivered(
            &id,
            &message,
            "n1",
            DeliveryResult::Failed {
                error: "gone".into(),
            },
        )
        .await
        .unwrap();
        let t = db.get(&id).await.unwrap().unwrap();
        let d = t.delivery.unwrap();
        assert_eq!(
            (d.state, d.attempts, d.last_error.as_deref()),
            (DeliveryState::Failed, 2, Some("gone"))
        );

        let t = db.redeliver(&id, 6000).await.unwrap();
        assert_eq!(t.delivery.unwrap().state, DeliveryState::Pending);
        assert!(matches!(
            db.redeliver(&id, 6000).await,
            Err(DbError::Conflict(_))
        ));

        assert!(matches!(
            db.cancel(&id, 7000).await,
            Err(DbError::Conflict(_))
        ));
        assert!(matches!(
            db.retry(&id, 7000).await,
            Err(DbError::Conflict(_))
        ));
        assert_eq!(
            db.purge(10_000, 100).await.unwrap().len(),
            0,
            "its delivery is pending"
        );
    }

    async fn deliveries_a_stopped_node_left_claimed_are_taken_back_at_start_case(db: &Db) {
        let t = task(None, 1, 1);
        let id = t.record.id.clone();
        db.insert(vec![t]).await.unwrap();
        db.claim("gone", 10, LEASE, 10).await.unwrap();
        db.finish(Finish {
            id: id.clone(),
            owner: Some("gone".into()),
            state: TaskState::Completed,
            outcome: json!({}),
            attempts: vec![],
            request_sent: true,
            finished_at: 20,
            delivery: Some(message_id()),
        })
        .await
        .unwrap();
        // Leases run on the database's clock: a short one on PostgreSQL,
        // where the test waits for it to run out.
        let lease = if db.is_shared() {
            Duration::from_millis(300)
        } else {
            LEASE
        };
        assert_eq!(
            db.claim_deliveries("gone", 20, lease, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        // The node is killed; the next start's node cannot claim it...
        assert!(db
            .claim_deliveries("next", 30, LEASE, 10)
            .await
            .unwrap()
            .is_empty());
        // ... until the recovery at start frees it (SQLite: one node), or
        // the lease runs out (PostgreSQL: the node may only be slow).
        if db.is_shared() {
            assert_eq!(db.recover_deliveries().await.unwrap(), 0);
            assert!(db
                .claim_deliveries("next", 30, LEASE, 10)
                .await
                .unwrap()
                .is_empty());
            tokio::time::sleep(Duration::from_millis(400)).await;
        } else {
            assert_eq!(db.recover_deliveries().await.unwrap(), 1);
        }
        let due = db.claim_deliveries("next", 30, LEASE, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].task.id, id);
    }

    async fn a_delivery_result_counts_only_for_its_own_message_case(db: &Db) {
        let t = task(None, 1, 1);
        let id = t.record.id.clone();
        db.insert(vec![t]).await.unwrap();
        db.claim("n", 10, LEASE, 10).await.unwrap();
        let old = message_id();
        assert!(db
            .finish(Finish {
                id: id.clone(),
                owner: Some("n".into()),
                state: TaskState::Failed,
                outcome: json!({"type": "task.failed"}),
                attempts: vec![],
                request_sent: true,
                finished_at: 20,
                delivery: Some(old.clone()),
            })
            .await
            .unwrap());
        let due = db.claim_deliveries("n", 20, LEASE, 10).await.unwrap();
        assert_eq!(due[0].delivery.message_id, old);

        // While the old outcome's message is in flight the task runs again
        // and its new outcome's message is claimed by the same node.
        db.retry(&id, 30).await.unwrap();
        db.claim("n", 30, LEASE, 10).await.unwrap();
        let new = message_id();
        assert!(db
            .finish(Finish {
                id: id.clone(),
                owner: Some("n".into()),
                state: TaskState::Completed,
                outcome: json!({"type": "task.completed"}),
                attempts: vec![],
                request_sent: true,
                finished_at: 40,
                delivery: Some(new.clone()),
            })
            .await
            .unwrap());
        let due = db.claim_deliveries("n", 40, LEASE, 10).await.unwrap();
        assert_eq!(due[0].delivery.message_id, new);

        // The old message's answer changes nothing...
        db.delivered(&id, &old, "n", DeliveryResult::Delivered)
            .await
            .unwrap();
        let d = db.get(&id).await.unwrap().unwrap().delivery.unwrap();
        assert_eq!(
            (d.state, d.attempts, d.message_id.as_str()),
            (DeliveryState::Pending, 0, new.as_str()),
            "the old message's answer settled the new one"
        );
        // ... the new one's counts.
        db.delivered(
            &id,
            &new,
            "n",
            DeliveryResult::Retry {
                error: "the webhook answered 500".into(),
                next_at: 50,
            },
        )
        .await
        .unwrap();
        let d = db.get(&id).await.unwrap().unwrap().delivery.unwrap();
        assert_eq!((d.state, d.attempts), (DeliveryState::Pending, 1));
    }

    /// Leases on PostgreSQL are the database's: a node whose clock is
    /// wrong neither hands out leases that others take for expired nor
    /// takes others' live leases for expired. (SQLite has one node.)
    async fn leases_run_on_the_databases_clock_case(db: &Db) {
        if !db.is_shared() {
            return;
        }
        let hour = 3_600_000;
        let now = crate::model::now_ms();
        let (late, early) = (task(None, now - 2 * hour, 1), task(None, now - 2 * hour, 1));
        let (late_id, early_id) = (late.record.id.clone(), early.record.id.clone());
        db.insert(vec![late]).await.unwrap();
        // Node A's clock is an hour behind: its lease nonetheless runs from
        // now.
        let claimed = db.claim("a", now - hour, LEASE, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        // Node B's clock is right: nothing of A's has expired.
        assert!(
            db.stale(10).await.unwrap().is_empty(),
            "A's lease taken for expired"
        );
        assert!(!db.requeue(&late_id).await.unwrap());
        // Node C's clock is an hour ahead: neither.
        db.insert(vec![early]).await.unwrap();
        db.claim("b", now, LEASE, 10).await.unwrap();
        assert!(
            db.stale(10).await.unwrap().is_empty(),
            "a live lease taken for expired"
        );
        assert!(!db.requeue(&early_id).await.unwrap());
        assert!(!db
            .finish(Finish {
                id: early_id.clone(),
                owner: None,
                state: TaskState::Failed,
                outcome: json!({}),
                attempts: vec![],
                request_sent: true,
                finished_at: now + hour,
                delivery: None,
            })
            .await
            .unwrap());
        // The same for deliveries: B's, claimed with its lease, is not C's.
        assert!(db
            .finish(Finish {
                id: early_id.clone(),
                owner: Some("b".into()),
                state: TaskState::Completed,
                outcome: json!({}),
                attempts: vec![],
                request_sent: true,
                finished_at: now,
                delivery: Some(message_id()),
            })
            .await
            .unwrap());
        assert_eq!(
            db.claim_deliveries("b", now, LEASE, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(
            db.claim_deliveries("c", now + hour, LEASE, 10)
                .await
                .unwrap()
                .is_empty(),
            "a delivery in flight taken for expired"
        );
        // And A renews by the database's clock too.
        db.renew("a", LEASE).await.unwrap();
        assert!(
            db.stale(10).await.unwrap().is_empty(),
            "a renewal in the past"
        );
        // A lease runs out when the database's clock says so, not before,
        // whoever claimed it.
        let short = task(None, now - 2 * hour, 1);
        let short_id = short.record.id.clone();
        db.insert(vec![short]).await.unwrap();
        db.claim("d", now + hour, Duration::from_millis(300), 10)
            .await
            .unwrap();
        assert!(db.stale(10).await.unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let stale: Vec<String> = db
            .stale(10)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(stale, [short_id]);
    }

    async fn claims_follow_priority_then_due_time_and_release_requeues_case(db: &Db) {
        let low = task(None, 100, 2);
        let normal_late = task(None, 200, 1);
        let high = task(None, 300, 0);
        let ids = [
            high.record.id.clone(),
            normal_late.record.id.clone(),
            low.record.id.clone(),
        ];
        db.insert(vec![low, normal_late, high]).await.unwrap();
        let claimed = db.claim("n", 1000, LEASE, 10).await.unwrap();
        let order: Vec<&str> = claimed.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(order, ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(db.release("n").await.unwrap(), 3);
        // Leases that run out at once: stale a moment later (on SQLite,
        // every running task is, at a start).
        assert_eq!(
            db.claim("m", 1000, Duration::ZERO, 2).await.unwrap().len(),
            2
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(db.stale(100).await.unwrap().len(), 2);
    }

    async fn a_batch_is_all_or_nothing_and_submits_share_commits_case(db: &Db) {
        let good = task(None, 1, 1);
        let mut bad = task(None, 1, 1);
        bad.record.id = good.record.id.clone(); // a duplicate primary key
        assert!(db.insert(vec![good, bad]).await.is_err());
        assert!(db
            .list(&ListQuery {
                limit: 10,
                ..ListQuery::default()
            })
            .await
            .unwrap()
            .is_empty());

        let before = db.commits();
        let inserts = (0..200).map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.insert(vec![task(None, 1, 1)]).await.map(|_| ()) })
        });
        for result in futures_util::future::join_all(inserts).await {
            result.unwrap().unwrap();
        }
        let commits = db.commits() - before;
        if !db.is_shared() {
            assert!(commits < 200, "200 submits in {commits} commits");
        }
        let page = db
            .list(&ListQuery {
                limit: 150,
                ..ListQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(page.len(), 150);
        let last = page.last().unwrap();
        let rest = db
            .list(&ListQuery {
                limit: 150,
                cursor: Some((last.created_at, last.id.clone())),
                ..ListQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(rest.len(), 50);
    }

    async fn counts_show_a_due_scheduled_task_as_queued_case(db: &Db) {
        let mut waiting = task(None, 5000, 1);
        waiting.record.state = TaskState::Scheduled;
        db.insert(vec![waiting, task(None, 100, 1)]).await.unwrap();
        let at = |counts: Vec<(String, i64)>, state: &str| {
            counts
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n)
        };
        let early = db.counts(1000).await.unwrap();
        assert_eq!(
            (at(early.clone(), "scheduled"), at(early, "queued")),
            (1, 1)
        );
        let late = db.counts(6000).await.unwrap();
        assert_eq!((at(late.clone(), "scheduled"), at(late, "queued")), (0, 2));
    }

    async fn cancel_retry_and_purge_case(db: &Db) {
        let t = task(None, 1, 1);
        let id = t.record.id.clone();
        db.insert(vec![t]).await.unwrap();
        let cancelled = db.cancel(&id, 5).await.unwrap();
        assert_eq!(cancelled.state, TaskState::Cancelled);
        assert!(matches!(
            db.cancel("tsk_nope", 5).await,
            Err(DbError::NotFound(_))
        ));

        let t = task(None, 1, 1);
        let failed = t.record.id.clone();
        db.insert(vec![t]).await.unwrap();
        db.claim("n", 10, LEASE, 10).await.unwrap();
        db.finish(Finish {
            id: failed.clone(),
            owner: Some("n".into()),
            state: TaskState::Failed,
            outcome: json!({}),
            attempts: vec![],
            request_sent: false,
            finished_at: 20,
            delivery: None,
        })
        .await
        .unwrap();
        let again = db.retry(&failed, 30).await.unwrap();
        assert_eq!(
            (again.state, again.next_attempt, again.outcome.clone()),
            (TaskState::Queued, 1, None)
        );

        assert_eq!(
            db.purge(6, 100).await.unwrap().len(),
            1,
            "the cancelled one"
        );
        assert!(db.get(&id).await.unwrap().is_none());
        assert_eq!(
            db.meta_or_insert("webhook_secret", "a".into())
                .await
                .unwrap(),
            "a"
        );
        assert_eq!(
            db.meta_or_insert("webhook_secret", "b".into())
                .await
                .unwrap(),
            "a",
            "the first value stays"
        );
    }
    on_each_backend!(
        a_task_goes_from_submit_to_delivered,
        a_task_goes_from_submit_to_delivered_case
    );
    on_each_backend!(
        deliveries_a_stopped_node_left_claimed_are_taken_back_at_start,
        deliveries_a_stopped_node_left_claimed_are_taken_back_at_start_case
    );
    on_each_backend!(
        claims_follow_priority_then_due_time_and_release_requeues,
        claims_follow_priority_then_due_time_and_release_requeues_case
    );
    on_each_backend!(
        a_batch_is_all_or_nothing_and_submits_share_commits,
        a_batch_is_all_or_nothing_and_submits_share_commits_case
    );
    on_each_backend!(
        counts_show_a_due_scheduled_task_as_queued,
        counts_show_a_due_scheduled_task_as_queued_case
    );
    on_each_backend!(cancel_retry_and_purge, cancel_retry_and_purge_case);
    on_each_backend!(
        leases_run_on_the_databases_clock,
        leases_run_on_the_databases_clock_case
    );
    on_each_backend!(
        a_delivery_result_counts_only_for_its_own_message,
        a_delivery_result_counts_only_for_its_own_message_case
    );
}
