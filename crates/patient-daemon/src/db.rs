//! The queue's storage: SQLite in WAL mode, every write through one
//! connection that commits in groups.
//!
//! A write is a job sent to the writer task. The writer takes every job
//! waiting (up to [`GROUP`]), runs them in one `BEGIN IMMEDIATE`
//! transaction, each inside its own savepoint (a failing job rolls back
//! alone), commits once, and only then answers each job: a submit is
//! acknowledged after its row is on disk, and many submits share one fsync
//! (`synchronous = FULL`). Reads go through a small pool of their own.

use std::{path::Path, str::FromStr, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::{
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
    Connection, Row, SqliteConnection, SqlitePool,
};
use tokio::sync::{mpsc, oneshot};

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

/// Rows per multi-row insert (12 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 64;

/// The most jobs one transaction commits.
pub const GROUP: usize = 512;

const MIGRATION: &str = include_str!("../migrations/sqlite/0001_tasks.sql");

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

type Run = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, bool> + Send>;

/// A write: `run` does it inside the writer's transaction (false: roll it
/// back), `done` answers the caller once the transaction has ended (or
/// without running, when it could not start).
struct Job {
    run: Run,
    done: Box<dyn FnOnce(Result<(), DbError>) + Send>,
}

/// The queue's database. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    jobs: mpsc::Sender<Job>,
    reader: SqlitePool,
    writes: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
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

impl Db {
    /// Opens (creating it and its directory if missing) the SQLite database
    /// at `url` (`sqlite://PATH`, `sqlite:PATH` or `sqlite::memory:`) and
    /// runs the migration.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        let path_part = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| DbError::Backend(format!("not a SQLite URL: {url}")))?;
        if path_part != ":memory:" {
            if let Some(parent) = Path::new(path_part).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        DbError::Backend(format!("cannot create {}: {e}", parent.display()))
                    })?;
                }
            }
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| DbError::Backend(format!("invalid SQLite URL: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let mut writer = SqliteConnection::connect_with(&options).await?;
        sqlx::raw_sql(MIGRATION).execute(&mut writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let (jobs, rx) = mpsc::channel::<Job>(4 * GROUP);
        let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(write_loop(writer, rx, Arc::clone(&writes)));
        Ok(Db {
            jobs,
            reader,
            writes,
        })
    }

    /// Transactions committed so far (a figure for group commit).
    pub fn commits(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` in the writer's next transaction; its result comes back
    /// once that transaction has committed.
    async fn write<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, Result<T, DbError>>
            + Send
            + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let slot = Arc::new(std::sync::Mutex::new(None::<Result<T, DbError>>));
        let filled = Arc::clone(&slot);
        let job = Job {
            run: Box::new(move |conn| {
                Box::pin(async move {
                    let result = f(conn).await;
                    let ok = result.is_ok();
                    *filled.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                    ok
                })
            }),
            done: Box::new(move |end| {
                let result = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                let _ = tx.send(match (result, end) {
                    (Some(Ok(value)), Ok(())) => Ok(value),
                    (Some(Err(e)), _) | (_, Err(e)) => Err(e),
                    (None, Ok(())) => Err(DbError::Closed),
                });
            }),
        };
        self.jobs.send(job).await.map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    /// Inserts tasks, all or none. A task whose idempotency key is taken is
    /// not inserted: the existing task comes back instead, with `false`.
    pub async fn insert(&self, tasks: Vec<NewTask>) -> Result<Vec<(TaskRecord, bool)>, DbError> {
        self.write(move |conn| Box::pin(insert_tasks(conn, tasks)))
            .await
    }

    /// One task.
    pub async fn get(&self, id: &str) -> Result<Option<TaskRecord>, DbError> {
        let row = sqlx::query(concat!(select_task!(), " WHERE t.id = $1"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| task_of(&r)).transpose()
    }

    /// A page of tasks, newest first.
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<TaskRecord>, DbError> {
        let sql = concat!(
            select_task!(),
            " WHERE ($1 IS NULL OR $1 = CASE \
             WHEN $6 IS NOT NULL AND t.state IN ('scheduled', 'queued') \
             THEN CASE WHEN t.not_before <= $6 THEN 'queued' ELSE 'scheduled' END \
             ELSE t.state END) \
             AND ($2 IS NULL OR t.callback = $2) \
             AND ($3 IS NULL OR t.created_at < $3 OR (t.created_at = $3 AND t.id < $4)) \
             ORDER BY t.created_at DESC, t.id DESC LIMIT $5"
        );
        let (cursor_at, cursor_id) = match &query.cursor {
            Some((at, id)) => (Some(*at), id.clone()),
            None => (None, String::new()),
        };
        let rows = sqlx::query(sql)
            .bind(query.state.map(TaskState::as_str))
            .bind(query.callback.as_deref())
            .bind(cursor_at)
            .bind(cursor_id)
            .bind(i64::from(query.limit))
            .bind(query.at)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(task_of).collect()
    }

    /// Claims up to `limit` due tasks for `owner` until `lease_until`,
    /// highest priority first, then oldest due.
    pub async fn claim(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, DbError> {
        let owner = owner.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "UPDATE patient_tasks SET state = 'running', lease_owner = $1, lease_until = $2 \
                     WHERE id IN (SELECT id FROM patient_tasks WHERE state IN ('scheduled', 'queued') \
                     AND not_before <= $3 ORDER BY priority, not_before LIMIT $4) \
                     RETURNING id, state, request, callback, callback_args, raise_error_responses, \
                     deliver, idempotency_key, priority, created_at, not_before, deadline, finished_at, \
                     next_attempt, request_sent, attempts, outcome, \
                     NULL AS d_state, NULL AS d_attempts, NULL AS d_last_error, \
                     NULL AS d_message_id, NULL AS d_next_at",
                )
                .bind(&owner)
                .bind(lease_until)
                .bind(now)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&mut *conn)
                .await?;
                // The whole row comes back with the claim (an unfinished task
                // has no delivery yet): no second read per task.
                let mut tasks = rows.iter().map(task_of).collect::<Result<Vec<_>, _>>()?;
                tasks.sort_by_key(|t| (t.priority, t.not_before));
                Ok(tasks)
            })
        })
        .await
    }

    /// The earliest `not_before` of a waiting task, if any.
    pub async fn next_due(&self) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(
            "SELECT MIN(not_before) AS at FROM patient_tasks WHERE state IN ('scheduled', 'queued')",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(row.try_get::<Option<i64>, _>("at")?)
    }

    /// Extends the leases `owner` holds on running tasks and deliveries.
    pub async fn renew(&self, owner: &str, lease_until: i64) -> Result<(), DbError> {
        let owner = owner.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE patient_tasks SET lease_until = $1 WHERE state = 'running' AND lease_owner = $2",
                )
                .bind(lease_until)
                .bind(&owner)
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "UPDATE patient_deliveries SET lease_until = $1 WHERE lease_owner = $2",
                )
                .bind(lease_until)
                .bind(&owner)
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Puts a running task back to wait for its next step; false when this
    /// node no longer holds it (cancelled meanwhile).
    pub async fn reschedule(&self, r: Reschedule) -> Result<bool, DbError> {
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE patient_tasks SET state = 'scheduled', not_before = $1, next_attempt = $2, \
                     request_sent = $3, attempts = $4, lease_owner = NULL, lease_until = NULL \
                     WHERE id = $5 AND state = 'running' AND lease_owner = $6",
                )
                .bind(r.not_before)
                .bind(i64::from(r.next_attempt))
                .bind(r.request_sent)
                .bind(Value::Array(r.attempts).to_string())
                .bind(&r.id)
                .bind(&r.owner)
                .execute(&mut *conn)
                .await?;
                Ok(done.rows_affected() == 1)
            })
        })
        .await
    }

    /// Finishes a task and queues its delivery in the same transaction;
    /// false when the task was no longer this node's (or already finished).
    pub async fn finish(&self, f: Finish) -> Result<bool, DbError> {
        self.write(move |conn| Box::pin(finish_task(conn, f))).await
    }

    /// Releases every task `owner` holds back to the queue (a stop), with
    /// their deliveries' leases.
    pub async fn release(&self, owner: &str) -> Result<u64, DbError> {
        let owner = owner.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE patient_tasks SET state = 'queued', lease_owner = NULL, lease_until = NULL \
                     WHERE state = 'running' AND lease_owner = $1",
                )
                .bind(&owner)
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "UPDATE patient_deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
                )
                .bind(&owner)
                .execute(&mut *conn)
                .await?;
                Ok(done.rows_affected())
            })
        })
        .await
    }

    /// Every task left `running` (by a node that stopped without releasing
    /// it: a crash).
    pub async fn running(&self) -> Result<Vec<TaskRecord>, DbError> {
        let rows = sqlx::query(concat!(select_task!(), " WHERE t.state = 'running'"))
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(task_of).collect()
    }

    /// Frees the deliveries a stopped node left claimed, so that they are
    /// sent at this start rather than once their lease runs out (SQLite has
    /// one node: any lease found at start is a stopped node's). How many.
    pub async fn recover_deliveries(&self) -> Result<u64, DbError> {
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE patient_deliveries SET lease_owner = NULL, lease_until = NULL \
                     WHERE lease_owner IS NOT NULL",
                )
                .execute(&mut *conn)
                .await?;
                Ok(done.rows_affected())
            })
        })
        .await
    }

    /// Puts a task left running by a crash back in the queue.
    pub async fn requeue(&self, id: &str) -> Result<bool, DbError> {
        let id = id.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE patient_tasks SET state = 'queued', lease_owner = NULL, lease_until = NULL \
                     WHERE id = $1 AND state = 'running'",
                )
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                Ok(done.rows_affected() == 1)
            })
        })
        .await
    }

    /// Cancels a task that has not finished; its delivery (if any) is not
    /// queued. The task as it is now.
    pub async fn cancel(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        let id = id.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE patient_tasks SET state = 'cancelled', finished_at = $1, lease_owner = NULL, \
                     lease_until = NULL WHERE id = $2 AND state IN ('scheduled', 'queued', 'running')",
                )
                .bind(now)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                let task = fetch(conn, &id).await?;
                if done.rows_affected() == 0 {
                    return Err(DbError::Conflict(format!(
                        "task {id} is {}; only a task that has not finished can be cancelled",
                        task.state.as_str()
                    )));
                }
                Ok(task)
            })
        })
        .await
    }

    /// Queues a finished task's delivery again, with a fresh count of tries
    /// (the same message id).
    pub async fn redeliver(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        let id = id.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let task = fetch(conn, &id).await?;
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
                sqlx::query(
                    "UPDATE patient_deliveries SET state = 'pending', attempts = 0, next_at = $1, \
                     last_error = NULL, lease_owner = NULL, lease_until = NULL WHERE task_id = $2",
                )
                .bind(now)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                fetch(conn, &id).await
            })
        })
        .await
    }

    /// Runs a failed task again as a new series of attempts.
    pub async fn retry(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        let id = id.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let task = fetch(conn, &id).await?;
                if task.state != TaskState::Failed {
                    return Err(DbError::Conflict(format!(
                        "task {id} is {}; only a failed task can be retried",
                        task.state.as_str()
                    )));
                }
                sqlx::query("DELETE FROM patient_deliveries WHERE task_id = $1")
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query(
                    "UPDATE patient_tasks SET state = 'queued', not_before = $1, finished_at = NULL, \
                     next_attempt = 1, request_sent = 0, attempts = '[]', outcome = NULL, \
                     lease_owner = NULL, lease_until = NULL WHERE id = $2",
                )
                .bind(now)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                fetch(conn, &id).await
            })
        })
        .await
    }

    /// Claims up to `limit` due deliveries for `owner`.
    pub async fn claim_deliveries(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, DbError> {
        let owner = owner.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "UPDATE patient_deliveries SET lease_owner = $1, lease_until = $2 WHERE task_id IN \
                     (SELECT task_id FROM patient_deliveries WHERE state = 'pending' AND next_at <= $3 \
                     AND (lease_until IS NULL OR lease_until < $3) ORDER BY next_at LIMIT $4) RETURNING task_id",
                )
                .bind(&owner)
                .bind(lease_until)
                .bind(now)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&mut *conn)
                .await?;
                let mut due = Vec::with_capacity(rows.len());
                for row in rows {
                    let id: String = row.try_get("task_id")?;
                    let task = fetch(conn, &id).await?;
                    if let Some(delivery) = task.delivery.clone() {
                        due.push(DueDelivery { task, delivery });
                    }
                }
                Ok(due)
            })
        })
        .await
    }

    /// The earliest `next_at` of a pending delivery, if any.
    pub async fn next_delivery(&self) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(
            "SELECT MIN(next_at) AS at FROM patient_deliveries WHERE state = 'pending'",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(row.try_get::<Option<i64>, _>("at")?)
    }

    /// Records a delivery try.
    pub async fn delivered(
        &self,
        task_id: &str,
        owner: &str,
        result: DeliveryResult,
    ) -> Result<(), DbError> {
        let (task_id, owner) = (task_id.to_owned(), owner.to_owned());
        self.write(move |conn| {
            Box::pin(async move {
                let (state, next_at, error) = match result {
                    DeliveryResult::Delivered => ("delivered", None, None),
                    DeliveryResult::Retry { error, next_at } => ("pending", Some(next_at), Some(error)),
                    DeliveryResult::Failed { error } => ("failed", None, Some(error)),
                };
                sqlx::query(
                    "UPDATE patient_deliveries SET state = $1, attempts = attempts + 1, next_at = $2, \
                     last_error = COALESCE($3, last_error), lease_owner = NULL, lease_until = NULL \
                     WHERE task_id = $4 AND lease_owner = $5 AND state = 'pending'",
                )
                .bind(state)
                .bind(next_at)
                .bind(error)
                .bind(&task_id)
                .bind(&owner)
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .await
    }

    /// Deletes up to `limit` tasks finished before `before` whose delivery
    /// is not pending; how many went.
    pub async fn purge(&self, before: i64, limit: usize) -> Result<u64, DbError> {
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "DELETE FROM patient_tasks WHERE id IN (SELECT t.id FROM patient_tasks t \
                     LEFT JOIN patient_deliveries d ON d.task_id = t.id WHERE t.finished_at IS NOT NULL \
                     AND t.finished_at < $1 AND (d.state IS NULL OR d.state <> 'pending') LIMIT $2)",
                )
                .bind(before)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .execute(&mut *conn)
                .await?;
                Ok(done.rows_affected())
            })
        })
        .await
    }

    /// The value stored under `key`, storing `value` first when there is
    /// none (the first node's choice wins).
    pub async fn meta_or_insert(&self, key: &str, value: String) -> Result<String, DbError> {
        let key = key.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query("INSERT INTO patient_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
                    .bind(&key)
                    .bind(&value)
                    .execute(&mut *conn)
                    .await?;
                let row = sqlx::query("SELECT value FROM patient_meta WHERE key = $1")
                    .bind(&key)
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(row.try_get("value")?)
            })
        })
        .await
    }

    /// Tasks by state as the API shows it at `now` (a waiting task is
    /// `scheduled` until its time, then `queued`).
    pub async fn counts(&self, now: i64) -> Result<Vec<(String, i64)>, DbError> {
        let rows = sqlx::query(
            "SELECT CASE WHEN state IN ('scheduled', 'queued') THEN \
             (CASE WHEN not_before > $1 THEN 'scheduled' ELSE 'queued' END) ELSE state END AS state, \
             COUNT(*) AS n FROM patient_tasks GROUP BY 1",
        )
        .bind(now)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    // --- The dashboard ---------------------------------------------------

    /// The latest `limit` failures, newest finished first: tasks that
    /// failed and finished tasks whose delivery failed.
    pub async fn recent_failures(&self, limit: u32) -> Result<Vec<TaskRecord>, DbError> {
        let rows = sqlx::query(concat!(
            select_task!(),
            " WHERE t.finished_at IS NOT NULL AND (t.state = 'failed' OR d.state = 'failed') \
             ORDER BY t.finished_at DESC, t.id DESC LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(task_of).collect()
    }
}

async fn write_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Job>,
    commits: Arc<std::sync::atomic::AtomicU64>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await {
            let error = DbError::from(e);
            tracing::error!(%error, "cannot begin a transaction");
            // The jobs never ran: answer each with the error.
            for job in jobs {
                (job.done)(Err(error.clone()));
            }
            continue;
        }
        let mut dones = Vec::with_capacity(jobs.len());
        let mut broken = None;
        for job in jobs {
            if broken.is_some() {
                dones.push(job.done);
                continue;
            }
            if let Err(e) = sqlx::query("SAVEPOINT job").execute(&mut conn).await {
                broken = Some(DbError::from(e));
                dones.push(job.done);
                continue;
            }
            let ok = (job.run)(&mut conn).await;
            let done = job.done;
            let end = if ok {
                "RELEASE SAVEPOINT job"
            } else {
                "ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job"
            };
            if let Err(e) = sqlx::raw_sql(end).execute(&mut conn).await {
                broken = Some(DbError::from(e));
            }
            dones.push(done);
        }
        let committed = match broken {
            Some(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut conn).await;
                Err(e)
            }
            None => match sqlx::query("COMMIT").execute(&mut conn).await {
                Ok(_) => {
                    commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => {
                    let _ = sqlx::query("ROLLBACK").execute(&mut conn).await;
                    Err(DbError::from(e))
                }
            },
        };
        if let Err(error) = &committed {
            tracing::error!(%error, "a transaction failed; its writes were rolled back");
        }
        for done in dones {
            done(committed.clone());
        }
    }
}

async fn fetch(conn: &mut SqliteConnection, id: &str) -> Result<TaskRecord, DbError> {
    let row = sqlx::query(concat!(select_task!(), " WHERE t.id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| DbError::NotFound(id.to_owned()))?;
    task_of(&row)
}

fn json_column(row: &SqliteRow, column: &str) -> Result<Value, DbError> {
    let text: String = row.try_get(column)?;
    serde_json::from_str(&text)
        .map_err(|e| DbError::Backend(format!("column {column} holds invalid JSON: {e}")))
}

fn task_of(row: &SqliteRow) -> Result<TaskRecord, DbError> {
    let state: String = row.try_get("state")?;
    let state = TaskState::from_name(&state)
        .ok_or_else(|| DbError::Backend(format!("unknown task state {state:?}")))?;
    let deliver = json_column(row, "deliver")?;
    let deliver = Deliver::from_json(Some(&deliver))
        .map_err(|(field, message)| DbError::Backend(format!("stored {field}: {message}")))?;
    let attempts = match json_column(row, "attempts")? {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    let outcome: Option<String> = row.try_get("outcome")?;
    let outcome = outcome
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| DbError::Backend(format!("column outcome holds invalid JSON: {e}")))?;
    let delivery = match row.try_get::<Option<String>, _>("d_state")? {
        None => None,
        Some(name) => Some(DeliveryRecord {
            state: DeliveryState::from_name(&name)
                .ok_or_else(|| DbError::Backend(format!("unknown delivery state {name:?}")))?,
            attempts: u32::try_from(row.try_get::<i64, _>("d_attempts")?).unwrap_or(0),
            last_error: row.try_get("d_last_error")?,
            message_id: row.try_get("d_message_id")?,
            next_at: row.try_get("d_next_at")?,
        }),
    };
    Ok(TaskRecord {
        id: row.try_get("id")?,
        state,
        request: json_column(row, "request")?,
        callback: row.try_get("callback")?,
        callback_args: json_column(row, "callback_args")?,
        raise_error_responses: row.try_get("raise_error_responses")?,
        deliver,
        idempotency_key: row.try_get("idempotency_key")?,
        priority: row.try_get("priority")?,
        created_at: row.try_get("created_at")?,
        not_before: row.try_get("not_before")?,
        deadline: row.try_get("deadline")?,
        finished_at: row.try_get("finished_at")?,
        next_attempt: u32::try_from(row.try_get::<i64, _>("next_attempt")?).unwrap_or(1),
        request_sent: row.try_get("request_sent")?,
        attempts,
        outcome,
        delivery,
    })
}

async fn insert_tasks(
    conn: &mut SqliteConnection,
    tasks: Vec<NewTask>,
) -> Result<Vec<(TaskRecord, bool)>, DbError> {
    let mut out: Vec<Option<(TaskRecord, bool)>> = Vec::with_capacity(tasks.len());
    let mut fresh: Vec<(usize, TaskRecord)> = Vec::with_capacity(tasks.len());
    for NewTask { record: t } in tasks {
        if let Some(key) = &t.idempotency_key {
            let existing = sqlx::query("SELECT id FROM patient_tasks WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(row) = existing {
                let id: String = row.try_get("id")?;
                out.push(Some((fetch(conn, &id).await?, false)));
                continue;
            }
            // The same key twice in one batch: the first one wins.
            if let Some((_, first)) = fresh
                .iter()
                .find(|(_, f)| f.idempotency_key.as_deref() == Some(key.as_str()))
            {
                out.push(Some((first.clone(), false)));
                continue;
            }
        }
        fresh.push((out.len(), t));
        out.push(None);
    }
    // Many rows per statement: one round trip to SQLite's thread per chunk.
    for chunk in fresh.chunks(INSERT_CHUNK) {
        let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO patient_tasks (id, state, request, callback, callback_args, raise_error_responses, \
             deliver, idempotency_key, priority, created_at, not_before, deadline) ",
        );
        insert.push_values(chunk, |mut row, (_, t)| {
            row.push_bind(t.id.clone())
                .push_bind(t.state.as_str())
                .push_bind(t.request.to_string())
                .push_bind(t.callback.clone())
                .push_bind(t.callback_args.to_string())
                .push_bind(t.raise_error_responses)
                .push_bind(t.deliver.to_json().to_string())
                .push_bind(t.idempotency_key.clone())
                .push_bind(t.priority)
                .push_bind(t.created_at)
                .push_bind(t.not_before)
                .push_bind(t.deadline);
        });
        insert.build().execute(&mut *conn).await?;
    }
    for (index, record) in fresh {
        out[index] = Some((record, true));
    }
    Ok(out.into_iter().flatten().collect())
}

async fn finish_task(conn: &mut SqliteConnection, f: Finish) -> Result<bool, DbError> {
    let done = sqlx::query(
        "UPDATE patient_tasks SET state = $1, outcome = $2, attempts = $3, request_sent = $4, \
         finished_at = $5, lease_owner = NULL, lease_until = NULL \
         WHERE id = $6 AND state = 'running' AND ($7 IS NULL OR lease_owner = $7)",
    )
    .bind(f.state.as_str())
    .bind(f.outcome.to_string())
    .bind(Value::Array(f.attempts).to_string())
    .bind(f.request_sent)
    .bind(f.finished_at)
    .bind(&f.id)
    .bind(&f.owner)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    if let Some(message_id) = f.delivery {
        sqlx::query(
            "INSERT INTO patient_deliveries (task_id, state, attempts, next_at, message_id) \
             VALUES ($1, 'pending', 0, $2, $3)",
        )
        .bind(&f.id)
        .bind(f.finished_at)
        .bind(message_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{message_id, task_id};

    async fn db(label: &str) -> (Db, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "patient-db-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let url = format!("sqlite://{}", dir.join("q.db").display());
        (Db::open(&url).await.unwrap(), dir)
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

    #[tokio::test]
    async fn a_task_goes_from_submit_to_delivered() {
        let (db, dir) = db("life").await;
        let inserted = db.insert(vec![task(Some("k1"), 1000, 1)]).await.unwrap();
        assert!(inserted[0].1);
        let id = inserted[0].0.id.clone();
        // The same key gives the first task back.
        let again = db.insert(vec![task(Some("k1"), 2000, 1)]).await.unwrap();
        assert_eq!((again[0].0.id.as_str(), again[0].1), (id.as_str(), false));

        assert!(
            db.claim("n1", 999, 5000, 10).await.unwrap().is_empty(),
            "not due yet"
        );
        let claimed = db.claim("n1", 1000, 5000, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].state, TaskState::Running);
        assert!(
            db.claim("n2", 1000, 5000, 10).await.unwrap().is_empty(),
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

        db.claim("n1", 3000, 9000, 10).await.unwrap();
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

        let due = db.claim_deliveries("n1", 4000, 9000, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        db.delivered(
            &id,
            "n1",
            DeliveryResult::Retry {
                error: "503".into(),
                next_at: 5000,
            },
        )
        .await
        .unwrap();
        assert!(db
            .claim_deliveries("n1", 4500, 9000, 10)
            .await
            .unwrap()
            .is_empty());
        db.claim_deliveries("n1", 5000, 9000, 10).await.unwrap();
        db.delivered(
            &id,
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
            db.purge(10_000, 100).await.unwrap(),
            0,
            "its delivery is pending"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn deliveries_a_stopped_node_left_claimed_are_taken_back_at_start() {
        let (db, dir) = db("recover").await;
        let t = task(None, 1, 1);
        let id = t.record.id.clone();
        db.insert(vec![t]).await.unwrap();
        db.claim("gone", 10, 100_000, 10).await.unwrap();
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
        assert_eq!(
            db.claim_deliveries("gone", 20, 100_000, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        // The node is killed; the next start's node cannot claim it...
        assert!(db
            .claim_deliveries("next", 30, 100_000, 10)
            .await
            .unwrap()
            .is_empty());
        // ... until the recovery at start frees it.
        assert_eq!(db.recover_deliveries().await.unwrap(), 1);
        let due = db.claim_deliveries("next", 30, 100_000, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].task.id, id);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn claims_follow_priority_then_due_time_and_release_requeues() {
        let (db, dir) = db("order").await;
        let low = task(None, 100, 2);
        let normal_late = task(None, 200, 1);
        let high = task(None, 300, 0);
        let ids = [
            high.record.id.clone(),
            normal_late.record.id.clone(),
            low.record.id.clone(),
        ];
        db.insert(vec![low, normal_late, high]).await.unwrap();
        let claimed = db.claim("n", 1000, 2000, 10).await.unwrap();
        let order: Vec<&str> = claimed.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(order, ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(db.release("n").await.unwrap(), 3);
        assert_eq!(db.claim("m", 1000, 2000, 2).await.unwrap().len(), 2);
        assert_eq!(db.running().await.unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_batch_is_all_or_nothing_and_submits_share_commits() {
        let (db, dir) = db("batch").await;
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
        assert!(commits < 200, "200 submits in {commits} commits");
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
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn counts_show_a_due_scheduled_task_as_queued() {
        let (db, dir) = db("counts").await;
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
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn cancel_retry_and_purge() {
        let (db, dir) = db("cancel").await;
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
        db.claim("n", 10, 100, 10).await.unwrap();
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

        assert_eq!(db.purge(6, 100).await.unwrap(), 1, "the cancelled one");
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
        let _ = std::fs::remove_dir_all(dir);
    }
}
