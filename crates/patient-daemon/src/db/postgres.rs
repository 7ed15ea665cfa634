//! The PostgreSQL backend: one queue shared by several nodes.
//!
//! Every write is its own transaction on a connection pool (PostgreSQL
//! flushes concurrent commits together itself). A claim takes due rows
//! `FOR UPDATE SKIP LOCKED`, so two nodes never claim the same task or
//! delivery and neither waits for the other. A node renews its leases every
//! third of the lease; a task whose lease ran out (its node crashed or lost
//! the database) is [stale](PgDb::stale), and the recovery rule of the
//! runner applies to it on any node, guarded by the same expiry, so a node
//! that renews late keeps its task and two nodes never both recover it.
//!
//! Every lease is set, renewed and judged against the database's clock
//! (`db_now!`), never a node's: a node whose clock runs ahead would take
//! the others' live leases for expired (and finish their POSTs as
//! `Interrupted`), one whose clock runs behind would hand out leases that
//! are expired already.
//!
//! A node wakes the others when it makes a task claimable (a submit, a
//! retry, a task released or taken back): `NOTIFY` on one channel with the
//! schema as payload, committed with the change, and every node
//! [listens](PgDb::listen) and wakes its claim loop at once; the loop's
//! polling stays as the fallback for a notification lost with a connection.

use std::{
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::Value;
use sqlx::{
    postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow},
    PgConnection, PgPool, Row,
};

use super::{
    lease_ms, select_task, sql, task_of, Batch, DbError, DeliveryResult, DueDelivery, Finish,
    ListQuery, NewTask, Reschedule,
};
use crate::model::{TaskRecord, TaskState};

super::columns_for!(PgRow);

const MIGRATION: &str = include_str!("../../migrations/postgres/0001_tasks.sql");

/// Rows per multi-row insert (12 parameters each).
const INSERT_CHUNK: usize = 256;

/// The connections one node keeps (besides its listener's).
const POOL: u32 = 16;

/// The channel on which a node says that tasks became claimable; the
/// payload is the queue's schema (nodes of other queues in the same
/// database ignore it).
const TASKS_CHANNEL: &str = "patient_tasks_ready";

/// How long a listener whose connection failed waits before connecting
/// again (the claim loops poll meanwhile).
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// The database's clock in milliseconds since the Unix epoch (the
/// transaction's start), against which every lease is set and judged.
macro_rules! db_now {
    () => {
        "(EXTRACT(EPOCH FROM now()) * 1000)::bigint"
    };
}

/// The columns of a claimed task (an unfinished task has no delivery).
macro_rules! returning_task {
    () => {
        " RETURNING id, state, request, callback, callback_args, raise_error_responses, \
         deliver, idempotency_key, priority, created_at, not_before, deadline, finished_at, \
         next_attempt, request_sent, attempts, outcome, \
         NULL::text AS d_state, NULL::bigint AS d_attempts, NULL::text AS d_last_error, \
         NULL::text AS d_message_id, NULL::bigint AS d_next_at"
    };
}

/// The PostgreSQL queue. Cheap to clone.
#[derive(Clone)]
pub struct PgDb {
    pool: PgPool,
    options: PgConnectOptions,
    /// The schema the queue's tables are in: the payload of its
    /// notifications.
    schema: Arc<str>,
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDb").finish_non_exhaustive()
    }
}

fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

impl PgDb {
    /// Connects to `url` (`postgres://…`; `?options[search_path]=SCHEMA`
    /// puts the tables in a schema) and runs the migration, one node at a
    /// time (an advisory lock), so that nodes starting together do not trip
    /// over each other's `CREATE`.
    pub async fn open(url: &str) -> Result<PgDb, DbError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| DbError::Backend(format!("invalid PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('patient_daemon_migration'))")
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(MIGRATION).execute(&mut *tx).await?;
        tx.commit().await?;
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        Ok(PgDb {
            pool,
            options,
            schema: schema.unwrap_or_else(|| "public".to_owned()).into(),
            commits: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Transactions committed by this node so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    fn committed(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Tells every node listening on this queue that tasks became
    /// claimable, once `conn`'s transaction commits (at once outside one).
    async fn notify_tasks(&self, conn: &mut PgConnection) -> Result<(), DbError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(TASKS_CHANNEL)
            .bind(&*self.schema)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Listens for the notifications of [`notify_tasks`](Self::notify_tasks)
    /// on a connection of its own until aborted, and wakes `wake` on each
    /// (and after each reconnection, for what a lost connection missed).
    pub fn listen(&self, wake: Arc<tokio::sync::Notify>) -> tokio::task::JoinHandle<()> {
        let (options, schema) = (self.options.clone(), Arc::clone(&self.schema));
        tokio::spawn(async move {
            loop {
                if let Err(error) = listen_once(&options, &schema, &wake).await {
                    tracing::warn!(%error, "cannot listen for new tasks; polling meanwhile");
                }
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        })
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// See [`Db::insert`](super::Db::insert).
    pub async fn insert(&self, tasks: Vec<NewTask>) -> Result<Vec<(TaskRecord, bool)>, DbError> {
        let claimable = tasks.iter().any(|t| t.record.state == TaskState::Queued);
        let mut tx = self.pool.begin().await?;
        let answer = insert_tasks(&mut tx, tasks).await?;
        if claimable {
            self.notify_tasks(&mut tx).await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(answer)
    }

    /// One task.
    pub async fn get(&self, id: &str) -> Result<Option<TaskRecord>, DbError> {
        let row = sqlx::query(concat!(select_task!(), " WHERE t.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| task_of(&r)).transpose()
    }

    /// See [`Db::list`](super::Db::list).
    pub async fn list(&self, query: &ListQuery) -> Result<Vec<TaskRecord>, DbError> {
        let sql = concat!(
            select_task!(),
            " WHERE ($1::text IS NULL OR $1::text = CASE \
             WHEN $6::bigint IS NOT NULL AND t.state IN ('scheduled', 'queued') \
             THEN CASE WHEN t.not_before <= $6::bigint THEN 'queued' ELSE 'scheduled' END \
             ELSE t.state END) \
             AND ($2::text IS NULL OR t.callback = $2::text) \
             AND ($3::bigint IS NULL OR t.created_at < $3::bigint \
             OR (t.created_at = $3::bigint AND t.id < $4::text)) \
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
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(task_of).collect()
    }

    /// See [`Db::claim`](super::Db::claim): rows another node is claiming
    /// at the same moment are skipped, not waited for.
    pub async fn claim(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, DbError> {
        let rows = sqlx::query(concat!(
            "UPDATE patient_tasks SET state = 'running', lease_owner = $1, lease_until = ",
            db_now!(),
            " + $2 \
             WHERE id IN (SELECT id FROM patient_tasks WHERE state IN ('scheduled', 'queued') \
             AND not_before <= $3 ORDER BY priority, not_before LIMIT $4 FOR UPDATE SKIP LOCKED)",
            returning_task!()
        ))
        .bind(owner)
        .bind(lease_ms(lease))
        .bind(now)
        .bind(limit_of(limit))
        .fetch_all(&self.pool)
        .await?;
        self.committed();
        let mut tasks = rows.iter().map(task_of).collect::<Result<Vec<_>, _>>()?;
        tasks.sort_by_key(|t| (t.priority, t.not_before));
        Ok(tasks)
    }

    /// The earliest `not_before` of a waiting task, if any.
    pub async fn next_due(&self) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(sql::NEXT_DUE).fetch_one(&self.pool).await?;
        Ok(row.try_get::<Option<i64>, _>("at")?)
    }

    /// See [`Db::renew`](super::Db::renew).
    pub async fn renew(&self, owner: &str, lease: Duration) -> Result<(), DbError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(concat!(
            "UPDATE patient_tasks SET lease_until = ",
            db_now!(),
            " + $1 WHERE state = 'running' AND lease_owner = $2"
        ))
        .bind(lease_ms(lease))
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        sqlx::query(concat!(
            "UPDATE patient_deliveries SET lease_until = ",
            db_now!(),
            " + $1 WHERE lease_owner = $2"
        ))
        .bind(lease_ms(lease))
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.committed();
        Ok(())
    }

    /// See [`Db::reschedule`](super::Db::reschedule).
    pub async fn reschedule(&self, r: Reschedule) -> Result<bool, DbError> {
        let done = sqlx::query(sql::RESCHEDULE)
            .bind(r.not_before)
            .bind(i64::from(r.next_attempt))
            .bind(r.request_sent)
            .bind(Value::Array(r.attempts).to_string())
            .bind(&r.id)
            .bind(&r.owner)
            .execute(&self.pool)
            .await?;
        self.committed();
        Ok(done.rows_affected() == 1)
    }

    /// See [`Db::finish`](super::Db::finish).
    pub async fn finish(&self, f: Finish) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        // Recovery (no owner) finishes a task only once its lease has run
        // out: a node that is merely slow keeps it.
        let done = sqlx::query(concat!(
            "UPDATE patient_tasks SET state = $1, outcome = $2, attempts = $3, request_sent = $4, \
             finished_at = $5, lease_owner = NULL, lease_until = NULL \
             WHERE id = $6 AND state = 'running' AND (($7::text IS NULL AND lease_until < ",
            db_now!(),
            ") OR lease_owner = $7::text)"
        ))
        .bind(f.state.as_str())
        .bind(f.outcome.to_string())
        .bind(Value::Array(f.attempts).to_string())
        .bind(f.request_sent)
        .bind(f.finished_at)
        .bind(&f.id)
        .bind(&f.owner)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        if let Some(message_id) = f.delivery {
            sqlx::query(sql::INSERT_DELIVERY)
                .bind(&f.id)
                .bind(f.finished_at)
                .bind(message_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(true)
    }

    /// See [`Db::release`](super::Db::release).
    pub async fn release(&self, owner: &str) -> Result<u64, DbError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(sql::RELEASE_TASKS)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() > 0 {
            self.notify_tasks(&mut tx).await?;
        }
        tx.commit().await?;
        self.committed();
        Ok(done.rows_affected())
    }

    /// See [`Db::release_deliveries`](super::Db::release_deliveries).
    pub async fn release_deliveries(&self, owner: &str) -> Result<u64, DbError> {
        let done = sqlx::query(sql::RELEASE_DELIVERIES)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        self.committed();
        Ok(done.rows_affected())
    }

    /// See [`Db::held`](super::Db::held).
    pub async fn held(&self, owner: &str) -> Result<Vec<TaskRecord>, DbError> {
        let rows = sqlx::query(sql::HELD)
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(task_of).collect()
    }

    /// Up to `limit` running tasks whose lease has run out by the
    /// database's clock.
    pub async fn stale(&self, limit: usize) -> Result<Vec<TaskRecord>, DbError> {
        let rows = sqlx::query(concat!(
            select_task!(),
            " WHERE t.state = 'running' AND t.lease_until < ",
            db_now!(),
            " ORDER BY t.lease_until LIMIT $1"
        ))
        .bind(limit_of(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(task_of).collect()
    }

    /// Nothing to do: an expired delivery lease is claimable as it is.
    pub async fn recover_deliveries(&self) -> Result<u64, DbError> {
        Ok(0)
    }

    /// Puts a running task whose lease has run out by the database's clock
    /// back in the queue.
    pub async fn requeue(&self, id: &str) -> Result<bool, DbError> {
        let done = sqlx::query(concat!(
            "UPDATE patient_tasks SET state = 'queued', lease_owner = NULL, lease_until = NULL \
             WHERE id = $1 AND state = 'running' AND lease_until < ",
            db_now!()
        ))
        .bind(id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            let mut conn = self.pool.acquire().await?;
            self.notify_tasks(&mut conn).await?;
        }
        self.committed();
        Ok(done.rows_affected() == 1)
    }

    /// See [`Db::cancel`](super::Db::cancel).
    pub async fn cancel(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(sql::CANCEL)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let task = fetch(&mut tx, id).await?;
        if done.rows_affected() == 0 {
            return Err(super::cannot_cancel(&task));
        }
        tx.commit().await?;
        self.committed();
        Ok(task)
    }

    /// See [`Db::redeliver`](super::Db::redeliver).
    pub async fn redeliver(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        let mut tx = self.pool.begin().await?;
        let task = fetch_locked(&mut tx, id).await?;
        super::check_redeliver(&task)?;
        sqlx::query(sql::REDELIVER)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let task = fetch(&mut tx, id).await?;
        tx.commit().await?;
        self.committed();
        Ok(task)
    }

    /// See [`Db::retry`](super::Db::retry).
    pub async fn retry(&self, id: &str, now: i64) -> Result<TaskRecord, DbError> {
        let mut tx = self.pool.begin().await?;
        let task = fetch_locked(&mut tx, id).await?;
        super::check_retry(&task)?;
        sqlx::query(sql::DELETE_DELIVERY)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE patient_tasks SET state = 'queued', not_before = $1, finished_at = NULL, \
             next_attempt = 1, request_sent = FALSE, attempts = '[]', outcome = NULL, \
             lease_owner = NULL, lease_until = NULL WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        self.notify_tasks(&mut tx).await?;
        let task = fetch(&mut tx, id).await?;
        tx.commit().await?;
        self.committed();
        Ok(task)
    }

    /// See [`Db::claim_deliveries`](super::Db::claim_deliveries): a
    /// delivery whose lease ran out (its node is gone) is due again.
    pub async fn claim_deliveries(
        &self,
        owner: &str,
        now: i64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, DbError> {
        let rows = sqlx::query(concat!(
            "UPDATE patient_deliveries d SET lease_owner = $1, lease_until = ",
            db_now!(),
            " + $2 FROM patient_tasks t WHERE t.id = d.task_id AND d.task_id IN \
             (SELECT task_id FROM patient_deliveries WHERE state = 'pending' AND next_at <= $3 \
             AND (lease_until IS NULL OR lease_until < ",
            db_now!(),
            ") ORDER BY next_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING t.id, t.state, t.request, t.callback, t.callback_args, \
             t.raise_error_responses, t.deliver, t.idempotency_key, t.priority, t.created_at, \
             t.not_before, t.deadline, t.finished_at, t.next_attempt, t.request_sent, t.attempts, \
             t.outcome, d.state AS d_state, d.attempts AS d_attempts, \
             d.last_error AS d_last_error, d.message_id AS d_message_id, d.next_at AS d_next_at"
        ))
        .bind(owner)
        .bind(lease_ms(lease))
        .bind(now)
        .bind(limit_of(limit))
        .fetch_all(&self.pool)
        .await?;
        self.committed();
        let mut due = Vec::with_capacity(rows.len());
        for row in &rows {
            let task = task_of(row)?;
            if let Some(delivery) = task.delivery.clone() {
                due.push(DueDelivery { task, delivery });
            }
        }
        due.sort_by_key(|d| d.delivery.next_at);
        Ok(due)
    }

    /// See [`Db::next_delivery`](super::Db::next_delivery).
    pub async fn next_delivery(&self, now: i64) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(sql::NEXT_DELIVERY)
            .bind(now)
            .fetch_one(&self.pool)
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
        let (state, next_at, error) = match result {
            DeliveryResult::Delivered => ("delivered", None, None),
            DeliveryResult::Retry { error, next_at } => ("pending", Some(next_at), Some(error)),
            DeliveryResult::Failed { error } => ("failed", None, Some(error)),
        };
        sqlx::query(
            "UPDATE patient_deliveries SET state = $1, attempts = attempts + 1, next_at = $2, \
             last_error = COALESCE($3, last_error), lease_owner = NULL, lease_until = NULL \
             WHERE task_id = $4 AND message_id = $5 AND lease_owner = $6 AND state = 'pending'",
        )
        .bind(state)
        .bind(next_at)
        .bind(error)
        .bind(task_id)
        .bind(message_id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        self.committed();
        Ok(())
    }

    /// See [`Db::purge`](super::Db::purge).
    pub async fn purge(
        &self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<(Value, Option<Value>)>, DbError> {
        let rows = sqlx::query(
            "DELETE FROM patient_tasks WHERE id IN (SELECT t.id FROM patient_tasks t \
             LEFT JOIN patient_deliveries d ON d.task_id = t.id WHERE t.finished_at IS NOT NULL \
             AND t.finished_at < $1 AND (d.state IS NULL OR d.state <> 'pending') LIMIT $2 \
             FOR UPDATE OF t SKIP LOCKED) RETURNING request, outcome",
        )
        .bind(before)
        .bind(limit_of(limit))
        .fetch_all(&self.pool)
        .await?;
        self.committed();
        rows.iter().map(super::purged).collect()
    }

    /// The value stored under `key`, storing `value` first when there is
    /// none (the first node's choice wins).
    pub async fn meta_or_insert(&self, key: &str, value: String) -> Result<String, DbError> {
        sqlx::query(sql::META_INSERT)
            .bind(key)
            .bind(&value)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query(sql::META_GET)
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    /// Tasks by state as the API shows it at `now`.
    pub async fn counts(&self, now: i64) -> Result<Vec<(String, i64)>, DbError> {
        let rows = sqlx::query(sql::COUNTS)
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }
}

impl PgDb {
    /// See [`Db::recent_failures`](super::Db::recent_failures).
    pub async fn recent_failures(&self, limit: u32) -> Result<Vec<TaskRecord>, DbError> {
        let rows = sqlx::query(concat!(
            select_task!(),
            " WHERE t.finished_at IS NOT NULL AND (t.state = 'failed' OR d.state = 'failed') \
             ORDER BY t.finished_at DESC, t.id DESC LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(task_of).collect()
    }
}

/// One listening connection's life: `LISTEN`, then a wake per notification
/// of this queue's schema and after each reconnection; an error when the
/// connection fails for good.
async fn listen_once(
    options: &PgConnectOptions,
    schema: &str,
    wake: &tokio::sync::Notify,
) -> Result<(), DbError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(TASKS_CHANNEL).await?;
    // Anything made claimable before this listened.
    wake.notify_one();
    loop {
        match listener.try_recv().await? {
            Some(notification) if notification.payload() == schema => wake.notify_one(),
            Some(_) => {}
            // Reconnected: what came meanwhile was lost.
            None => wake.notify_one(),
        }
    }
}

async fn fetch(conn: &mut PgConnection, id: &str) -> Result<TaskRecord, DbError> {
    let row = sqlx::query(concat!(select_task!(), " WHERE t.id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| DbError::NotFound(id.to_owned()))?;
    task_of(&row)
}

/// The task, its row locked until the transaction ends (a change that
/// depends on its state).
async fn fetch_locked(conn: &mut PgConnection, id: &str) -> Result<TaskRecord, DbError> {
    sqlx::query("SELECT id FROM patient_tasks WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| DbError::NotFound(id.to_owned()))?;
    fetch(conn, id).await
}

async fn insert_tasks(
    conn: &mut PgConnection,
    tasks: Vec<NewTask>,
) -> Result<Vec<(TaskRecord, bool)>, DbError> {
    let Batch {
        len,
        fresh,
        repeats,
    } = Batch::new(tasks);
    let mut answers = Vec::with_capacity(fresh.len());
    // A key another node inserts at the same moment: `ON CONFLICT` waits for
    // that node's transaction and skips the row; it is then read back as
    // the existing task.
    let mut taken = Vec::new();
    for chunk in fresh.chunks(INSERT_CHUNK) {
        let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
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
        insert.push(" ON CONFLICT (idempotency_key) DO NOTHING RETURNING id");
        let inserted: std::collections::HashSet<String> = insert
            .build()
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        for (place, t) in chunk {
            if inserted.contains(&t.id) {
                answers.push((*place, (t.clone(), true)));
            } else {
                taken.push((*place, t.idempotency_key.clone()));
            }
        }
    }
    for (place, key) in taken {
        let Some(key) = key else {
            return Err(DbError::Backend(
                "a task without an idempotency key was not inserted".into(),
            ));
        };
        let row = sqlx::query(sql::ID_BY_KEY)
            .bind(&key)
            .fetch_one(&mut *conn)
            .await?;
        let id: String = row.try_get("id")?;
        answers.push((place, (fetch(conn, &id).await?, false)));
    }
    Batch::answer(len, &repeats, answers)
}
