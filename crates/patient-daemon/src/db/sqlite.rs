//! The SQLite backend: WAL mode, every write through one connection that
//! commits in groups.
//!
//! A write is a job sent to the writer task. The writer takes every job
//! waiting (up to [`GROUP`]), runs them in one `BEGIN IMMEDIATE`
//! transaction, each inside its own savepoint (a failing job rolls back
//! alone), commits once, and only then answers each job: a submit is
//! acknowledged after its row is on disk, and many submits share one fsync
//! (`synchronous = FULL`). Reads go through a small pool of their own.

use std::{path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::{
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
    },
    Connection, Row, SqliteConnection, SqlitePool,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    lease_ms, select_task, sql, task_of, Batch, DbError, DeliveryResult, DueDelivery, Finish,
    ListQuery, NewTask, Reschedule,
};
use crate::model::{now_ms, TaskRecord, TaskState};

super::columns_for!(SqliteRow);

/// Rows per multi-row insert (12 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 64;

/// The most jobs one transaction commits.
pub(super) const GROUP: usize = 512;

const MIGRATION: &str = include_str!("../../migrations/sqlite/0001_tasks.sql");

type Run = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, bool> + Send>;

/// A write for the writer's next transaction.
enum Job {
    /// Any write: `run` does it inside the transaction (false: roll it
    /// back), `done` answers the caller once the transaction has ended (or
    /// without running, when it could not start).
    Run {
        run: Run,
        done: Box<dyn FnOnce(Result<(), DbError>) + Send>,
    },
    /// A task's outcome: the finishes of one transaction are written
    /// together, a few statements for all of them rather than four round
    /// trips to SQLite's thread each.
    Finish {
        finish: Finish,
        done: oneshot::Sender<Result<bool, DbError>>,
    },
    /// A delivery try's result, written together like finishes.
    Delivered {
        task_id: String,
        message_id: String,
        owner: String,
        result: DeliveryResult,
        done: oneshot::Sender<Result<(), DbError>>,
    },
}

/// The SQLite queue. Cheap to clone.
#[derive(Clone)]
pub struct SqliteDb {
    jobs: mpsc::Sender<Job>,
    reader: SqlitePool,
    writes: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for SqliteDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteDb").finish_non_exhaustive()
    }
}

impl SqliteDb {
    /// Opens (creating it and its directory if missing) the SQLite database
    /// at `url` (`sqlite://PATH`, `sqlite:PATH` or `sqlite::memory:`) and
    /// runs the migration.
    pub async fn open(url: &str) -> Result<SqliteDb, DbError> {
        if !url.starts_with("sqlite:") {
            return Err(DbError::Backend(format!("not a SQLite URL: {url}")));
        }
        if let Some(dir) = database_dir(url) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| DbError::Backend(format!("cannot create {}: {e}", dir.display())))?;
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
        Ok(SqliteDb {
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
        let job = Job::Run {
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

    /// See [`Db::claim`](super::Db::claim): one node, whose clock is the
    /// database's.
    pub async fn claim(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, DbError> {
        let owner = owner.to_owned();
        let lease_until = now.saturating_add(lease_ms(lease));
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
        let row = sqlx::query(sql::NEXT_DUE).fetch_one(&self.reader).await?;
        Ok(row.try_get::<Option<i64>, _>("at")?)
    }

    /// See [`Db::renew`](super::Db::renew).
    pub async fn renew(&self, owner: &str, lease: Duration) -> Result<(), DbError> {
        let owner = owner.to_owned();
        let lease_until = now_ms().saturating_add(lease_ms(lease));
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query(sql::RENEW_TASKS)
                    .bind(lease_until)
                    .bind(&owner)
                    .execute(&mut *conn)
                    .await?;
                sqlx::query(sql::RENEW_DELIVERIES)
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
                let done = sqlx::query(sql::RESCHEDULE)
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
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Job::Finish { finish: f, done })
            .await
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)?
    }

    /// See [`Db::release`](super::Db::release).
    pub async fn release(&self, owner: &str) -> Result<u64, DbError> {
        self.release_with(sql::RELEASE_TASKS, owner).await
    }

    /// See [`Db::release_deliveries`](super::Db::release_deliveries).
    pub async fn release_deliveries(&self, owner: &str) -> Result<u64, DbError> {
        self.release_with(sql::RELEASE_DELIVERIES, owner).await
    }

    async fn release_with(&self, statement: &'static str, owner: &str) -> Result<u64, DbError> {
        let owner = owner.to_owned();
        self.write(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(statement)
                    .bind(&owner)
                    .execute(&mut *conn)
                    .await?;
                Ok(done.rows_affected())
            })
        })
        .await
    }

    /// See [`Db::held`](super::Db::held).
    pub async fn held(&self, owner: &str) -> Result<Vec<TaskRecord>, DbError> {
        let rows = sqlx::query(sql::HELD)
            .bind(owner)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(task_of).collect()
    }

    /// Every task left `running` (at the start: by a node that stopped
    /// without releasing it, a crash), up to `limit`.
    pub async fn stale(&self, limit: usize) -> Result<Vec<TaskRecord>, DbError> {
        let rows = sqlx::query(concat!(
            select_task!(),
            " WHERE t.state = 'running' LIMIT $1"
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
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
                let done = sqlx::query(sql::CANCEL)
                    .bind(now)
                    .bind(&id)
                    .execute(&mut *conn)
                    .await?;
                let task = fetch(conn, &id).await?;
                if done.rows_affected() == 0 {
                    return Err(super::cannot_cancel(&task));
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
                super::check_redeliver(&task)?;
                sqlx::query(sql::REDELIVER)
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
                super::check_retry(&task)?;
                sqlx::query(sql::DELETE_DELIVERY)
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

    /// See [`Db::claim_deliveries`](super::Db::claim_deliveries).
    pub async fn claim_deliveries(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, DbError> {
        let owner = owner.to_owned();
        let lease_until = now.saturating_add(lease_ms(lease));
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
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                let ids = rows
                    .iter()
                    .map(|row| row.try_get::<String, _>("task_id"))
                    .collect::<Result<Vec<_>, _>>()?;
                // Every claimed task in one read.
                let tasks = sqlx::query(concat!(
                    select_task!(),
                    " WHERE t.id IN (SELECT value FROM json_each($1)) ORDER BY d.next_at"
                ))
                .bind(Value::from(ids).to_string())
                .fetch_all(&mut *conn)
                .await?;
                let mut due = Vec::with_capacity(tasks.len());
                for row in &tasks {
                    let task = task_of(row)?;
                    if let Some(delivery) = task.delivery.clone() {
                        due.push(DueDelivery { task, delivery });
                    }
                }
                Ok(due)
            })
        })
        .await
    }

    /// See [`Db::next_delivery`](super::Db::next_delivery).
    pub async fn next_delivery(&self, now: i64) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(sql::NEXT_DELIVERY)
            .bind(now)
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("at")?)
    }

    /// See [`Db::delivered`](super::Db::delivered).
    pub async fn delivered(
        &self,
        task_id: &str,
        message_id: &str,
        owner: &str,
        result: DeliveryResult,
    ) -> Result<(), DbError> {
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Job::Delivered {
                task_id: task_id.to_owned(),
                message_id: message_id.to_owned(),
                owner: owner.to_owned(),
                result,
                done,
            })
            .await
            .map_err(|_| DbError::Closed)?;
        answer.await.map_err(|_| DbError::Closed)?
    }

    /// Deletes up to `limit` tasks finished before `before` whose delivery
    /// is not pending; the request and outcome JSON of each one deleted (so
    /// that the caller can delete what they refer to).
    pub async fn purge(
        &self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<(Value, Option<Value>)>, DbError> {
        self.write(move |conn| {
            Box::pin(async move {
                let rows = sqlx::query(
                    "DELETE FROM patient_tasks WHERE id IN (SELECT t.id FROM patient_tasks t \
                     LEFT JOIN patient_deliveries d ON d.task_id = t.id WHERE t.finished_at IS NOT NULL \
                     AND t.finished_at < $1 AND (d.state IS NULL OR d.state <> 'pending') LIMIT $2) \
                     RETURNING request, outcome",
                )
                .bind(before)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&mut *conn)
                .await?;
                rows.iter().map(super::purged).collect()
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
                sqlx::query(sql::META_INSERT)
                    .bind(&key)
                    .bind(&value)
                    .execute(&mut *conn)
                    .await?;
                let row = sqlx::query(sql::META_GET)
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
        let rows = sqlx::query(sql::COUNTS)
            .bind(now)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    // --- The dashboard ---------------------------------------------------

    /// See [`Db::recent_failures`](super::Db::recent_failures).
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

/// The database file a SQLite URL (`sqlite://PATH`, `sqlite:PATH`) names;
/// `None` for another URL or an in-memory database.
pub fn database_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory =
        path.is_empty() || path == ":memory:" || query.split('&').any(|pair| pair == "mode=memory");
    (!in_memory).then(|| PathBuf::from(path))
}

/// The directory of the database file a SQLite URL names (`.` for a bare
/// file name); `None` for another URL or an in-memory database.
pub fn database_dir(url: &str) -> Option<PathBuf> {
    let file = database_file(url)?;
    Some(match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    })
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
        let mut runs = Vec::new();
        let mut finishes = Vec::new();
        let mut delivered = Vec::new();
        for job in jobs {
            match job {
                Job::Run { run, done } => runs.push((run, done)),
                Job::Finish { finish, done } => finishes.push((finish, done)),
                Job::Delivered {
                    task_id,
                    message_id,
                    owner,
                    result,
                    done,
                } => delivered.push((
                    DeliveryTry {
                        task_id,
                        message_id,
                        owner,
                        result,
                    },
                    done,
                )),
            }
        }
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await {
            let error = DbError::from(e);
            tracing::error!(%error, "cannot begin a transaction");
            // The jobs never ran: answer each with the error.
            for (_, done) in runs {
                done(Err(error.clone()));
            }
            for (_, done) in finishes {
                let _ = done.send(Err(error.clone()));
            }
            for (_, done) in delivered {
                let _ = done.send(Err(error.clone()));
            }
            continue;
        }
        // The jobs of one transaction come from callers that are not
        // waiting for each other (each answer comes after the commit), so
        // any order is a valid one: the writes of any kind first, each in
        // its own savepoint, then the finishes and the delivery results in
        // bulk.
        let mut dones = Vec::with_capacity(runs.len());
        let mut broken = None;
        for (run, done) in runs {
            if broken.is_none() {
                if let Err(e) = in_savepoint(&mut conn, run).await {
                    broken = Some(e);
                }
            }
            dones.push(done);
        }
        let mut finished = Vec::new();
        if broken.is_none() && !finishes.is_empty() {
            let items: Vec<&Finish> = finishes.iter().map(|(f, _)| f).collect();
            match finish_all(&mut conn, &items).await {
                Ok(answers) => finished = answers,
                Err(e) => broken = Some(e),
            }
        }
        if broken.is_none() && !delivered.is_empty() {
            let items: Vec<_> = delivered.iter().map(|(d, _)| d.clone()).collect();
            if let Err(e) = deliveries_done(&mut conn, items).await {
                broken = Some(e);
            }
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
        for (i, (_, done)) in finishes.into_iter().enumerate() {
            let answer = match &committed {
                Ok(()) => finished.get(i).cloned().unwrap_or(Err(DbError::Closed)),
                Err(e) => Err(e.clone()),
            };
            let _ = done.send(answer);
        }
        for (_, done) in delivered {
            let _ = done.send(committed.clone());
        }
    }
}

/// Runs one job inside a savepoint of the open transaction: a job that
/// fails rolls back alone. An error here is the transaction's own (it
/// cannot go on).
async fn in_savepoint(conn: &mut SqliteConnection, run: Run) -> Result<(), DbError> {
    sqlx::query("SAVEPOINT job").execute(&mut *conn).await?;
    let ok = run(conn).await;
    let end = if ok {
        "RELEASE SAVEPOINT job"
    } else {
        "ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job"
    };
    sqlx::raw_sql(end).execute(&mut *conn).await?;
    Ok(())
}

/// Finishes in bulk: one `UPDATE … FROM` per chunk marks the tasks still
/// held as finished and names them, one insert queues their deliveries.
/// Should the bulk write fail (it should not: a repeated task, a
/// constraint), it is rolled back and each finish is written alone, so a
/// bad one fails only itself. Each finish's answer, in order.
async fn finish_all(
    conn: &mut SqliteConnection,
    items: &[&Finish],
) -> Result<Vec<Result<bool, DbError>>, DbError> {
    sqlx::query("SAVEPOINT bulk").execute(&mut *conn).await?;
    match finish_bulk(conn, items).await {
        Ok(answers) => {
            sqlx::query("RELEASE SAVEPOINT bulk")
                .execute(&mut *conn)
                .await?;
            Ok(answers.into_iter().map(Ok).collect())
        }
        Err(error) => {
            tracing::warn!(%error, "a bulk finish failed; writing each alone");
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT bulk; RELEASE SAVEPOINT bulk")
                .execute(&mut *conn)
                .await?;
            let mut answers = Vec::with_capacity(items.len());
            for &f in items {
                sqlx::query("SAVEPOINT job").execute(&mut *conn).await?;
                let answer = finish_task(conn, f).await;
                let end = if answer.is_ok() {
                    "RELEASE SAVEPOINT job"
                } else {
                    "ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job"
                };
                sqlx::raw_sql(end).execute(&mut *conn).await?;
                answers.push(answer);
            }
            Ok(answers)
        }
    }
}

/// Rows per bulk statement (seven parameters each).
const BULK_CHUNK: usize = 256;

async fn finish_bulk(conn: &mut SqliteConnection, items: &[&Finish]) -> Result<Vec<bool>, DbError> {
    let mut done = std::collections::HashSet::new();
    for chunk in items.chunks(BULK_CHUNK) {
        let mut update = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "WITH v (v_id, v_state, v_outcome, v_attempts, v_sent, v_at, v_owner) AS (",
        );
        update.push_values(chunk, |mut row, f| {
            row.push_bind(f.id.clone())
                .push_bind(f.state.as_str())
                .push_bind(f.outcome.to_string())
                .push_bind(attempts_json(&f.attempts))
                .push_bind(f.request_sent)
                .push_bind(f.finished_at)
                .push_bind(f.owner.clone());
        });
        update.push(
            ") UPDATE patient_tasks SET state = v.v_state, outcome = v.v_outcome, \
             attempts = v.v_attempts, request_sent = v.v_sent, finished_at = v.v_at, \
             lease_owner = NULL, lease_until = NULL FROM v WHERE patient_tasks.id = v.v_id \
             AND patient_tasks.state = 'running' \
             AND (v.v_owner IS NULL OR patient_tasks.lease_owner = v.v_owner) RETURNING id",
        );
        for row in update.build().fetch_all(&mut *conn).await? {
            done.insert(row.try_get::<String, _>("id")?);
        }
    }
    let deliveries: Vec<&Finish> = items
        .iter()
        .copied()
        .filter(|f| f.delivery.is_some() && done.contains(&f.id))
        .collect();
    for chunk in deliveries.chunks(BULK_CHUNK) {
        let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO patient_deliveries (task_id, state, attempts, next_at, message_id) ",
        );
        insert.push_values(chunk, |mut row, f| {
            row.push_bind(f.id.clone())
                .push_bind("pending")
                .push_bind(0_i64)
                .push_bind(f.finished_at)
                .push_bind(f.delivery.clone());
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(items.iter().map(|f| done.contains(&f.id)).collect())
}

/// A delivery try to record: the task, the message tried, the node that
/// claimed it, and how it went.
#[derive(Clone)]
struct DeliveryTry {
    task_id: String,
    message_id: String,
    owner: String,
    result: DeliveryResult,
}

/// Delivery results in bulk, one `UPDATE … FROM` per chunk; each counts
/// only for its own message (see [`Db::delivered`](super::Db::delivered)).
async fn deliveries_done(
    conn: &mut SqliteConnection,
    items: Vec<DeliveryTry>,
) -> Result<(), DbError> {
    for chunk in items.chunks(BULK_CHUNK) {
        let mut update = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "WITH v (v_id, v_message, v_owner, v_state, v_next, v_error) AS (",
        );
        update.push_values(chunk, |mut row, t| {
            let (state, next_at, error) = match &t.result {
                DeliveryResult::Delivered => ("delivered", None, None),
                DeliveryResult::Retry { error, next_at } => {
                    ("pending", Some(*next_at), Some(error.clone()))
                }
                DeliveryResult::Failed { error } => ("failed", None, Some(error.clone())),
            };
            row.push_bind(t.task_id.clone())
                .push_bind(t.message_id.clone())
                .push_bind(t.owner.clone())
                .push_bind(state)
                .push_bind(next_at)
                .push_bind(error);
        });
        update.push(
            ") UPDATE patient_deliveries SET state = v.v_state, attempts = attempts + 1, \
             next_at = v.v_next, last_error = COALESCE(v.v_error, last_error), \
             lease_owner = NULL, lease_until = NULL FROM v WHERE task_id = v.v_id \
             AND message_id = v.v_message AND lease_owner = v.v_owner AND state = 'pending'",
        );
        update.build().execute(&mut *conn).await?;
    }
    Ok(())
}

async fn fetch(conn: &mut SqliteConnection, id: &str) -> Result<TaskRecord, DbError> {
    let row = sqlx::query(concat!(select_task!(), " WHERE t.id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| DbError::NotFound(id.to_owned()))?;
    task_of(&row)
}

async fn insert_tasks(
    conn: &mut SqliteConnection,
    tasks: Vec<NewTask>,
) -> Result<Vec<(TaskRecord, bool)>, DbError> {
    let Batch {
        len,
        fresh,
        repeats,
    } = Batch::new(tasks);
    let mut answers = Vec::with_capacity(fresh.len());
    let mut insert = Vec::with_capacity(fresh.len());
    for (place, t) in fresh {
        if let Some(key) = &t.idempotency_key {
            let existing = sqlx::query(sql::ID_BY_KEY)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(row) = existing {
                let id: String = row.try_get("id")?;
                answers.push((place, (fetch(conn, &id).await?, false)));
                continue;
            }
        }
        insert.push((place, t));
    }
    // Many rows per statement: one round trip to SQLite's thread per chunk.
    for chunk in insert.chunks(INSERT_CHUNK) {
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
    answers.extend(insert.into_iter().map(|(place, t)| (place, (t, true))));
    Batch::answer(len, &repeats, answers)
}

/// The attempt records as the row keeps them (a JSON array).
fn attempts_json(attempts: &[Value]) -> String {
    serde_json::to_string(attempts).unwrap_or_else(|_| "[]".to_owned())
}

async fn finish_task(conn: &mut SqliteConnection, f: &Finish) -> Result<bool, DbError> {
    let done = sqlx::query(
        "UPDATE patient_tasks SET state = $1, outcome = $2, attempts = $3, request_sent = $4, \
         finished_at = $5, lease_owner = NULL, lease_until = NULL \
         WHERE id = $6 AND state = 'running' AND ($7 IS NULL OR lease_owner = $7)",
    )
    .bind(f.state.as_str())
    .bind(f.outcome.to_string())
    .bind(attempts_json(&f.attempts))
    .bind(f.request_sent)
    .bind(f.finished_at)
    .bind(&f.id)
    .bind(&f.owner)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    if let Some(message_id) = &f.delivery {
        sqlx::query(sql::INSERT_DELIVERY)
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
    use super::*;

    #[test]
    fn the_database_directory_of_each_spelling_of_a_sqlite_url() {
        let dir = |url: &str| database_dir(url).map(|d| d.display().to_string());
        assert_eq!(
            dir("sqlite:///var/lib/p/q.db").as_deref(),
            Some("/var/lib/p")
        );
        assert_eq!(
            dir("sqlite:///var/lib/p/q.db?mode=rwc").as_deref(),
            Some("/var/lib/p")
        );
        assert_eq!(dir("sqlite://data/q.db").as_deref(), Some("data"));
        assert_eq!(dir("sqlite:q.db").as_deref(), Some("."));
        assert_eq!(dir("sqlite::memory:"), None);
        assert_eq!(dir("sqlite://:memory:"), None);
        assert_eq!(dir("sqlite://q.db?mode=memory&cache=shared"), None);
        assert_eq!(dir("postgres://h/db"), None);
    }
}
