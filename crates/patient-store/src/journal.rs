//! [`SqliteJournal`]: the processor's task journal in a SQLite file, for
//! crash recovery in library mode (see [`patient_http::journal`]).
//!
//! ```no_run
//! use std::sync::mpsc;
//!
//! use patient_http::{Outcome, Processor, Request, Task};
//! use patient_store::journal::SqliteJournal;
//!
//! let (tx, rx) = mpsc::channel::<Outcome>();
//! let processor = Processor::builder()
//!     .journal(SqliteJournal::open("/var/lib/my-app/patient-journal.db")?)
//!     .build(tx)?;
//! // Takes up whatever a crashed predecessor left in the journal.
//! processor.start()?;
//! // Returns once the task is on disk.
//! processor.enqueue(Task::new(Request::get("https://example.com/").build()?, "Cb"))?;
//! println!("{:?}", rx.recv()?);
//! processor.stop(None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    future::Future,
    panic::resume_unwind,
    path::{Path, PathBuf},
    time::Duration,
};

use patient_http::{JournalChange, JournalEntry, JournalError, TaskJournal};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous},
    AssertSqlSafe, Connection, Row,
};

/// The table of the journal (also written out in `CREATE`).
const TABLE: &str = "patient_task_journal";

const CREATE: &str = "CREATE TABLE IF NOT EXISTS patient_task_journal (
    seq INTEGER PRIMARY KEY,
    entry_id TEXT NOT NULL UNIQUE,
    task_id TEXT NOT NULL,
    task TEXT NOT NULL,
    started INTEGER NOT NULL DEFAULT 0,
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
)";
const PENDING: &str =
    "SELECT entry_id, task_id, task, started FROM patient_task_journal ORDER BY seq";

/// SQLite's page size, to turn a size limit into pages.
const PAGE_SIZE: u64 = 4096;

/// A [`TaskJournal`] in a SQLite file: one row per accepted task in the table
/// `patient_task_journal` (`seq`, `entry_id`, `task_id`, `task` — the task's
/// JSON —, `started`, `recorded_at`), created when the journal is opened.
///
/// The file runs in WAL mode and, by default, with `synchronous = FULL`:
/// every commit waits for `fsync`, so a task recorded survives a power cut as
/// well as a killed process. The processor hands it every change waiting at
/// once, which it writes in one transaction (`BEGIN IMMEDIATE`, one commit,
/// one `fsync`): threads enqueuing at the same time share a commit.
///
/// Its methods block until their write is done; the processor calls them
/// from a thread of its own. Called from inside an async runtime (opening it
/// in `async fn main`, say), they run on a short-lived thread of their own
/// rather than on the runtime's thread.
///
/// One processor uses one journal file at a time.
pub struct SqliteJournal {
    name: String,
    path: PathBuf,
    conn: Option<SqliteConnection>,
    /// Dropped after `conn` (fields drop in order), which `Drop` closes on it.
    runtime: OwnRuntime,
}

/// The journal's own runtime. Dropping a runtime blocks, which panics inside
/// another runtime, so it is shut down in the background instead.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn get(&self) -> &tokio::runtime::Runtime {
        // Only `Drop` takes it out.
        match &self.0 {
            Some(runtime) => runtime,
            None => unreachable!("the journal's runtime is only taken when dropped"),
        }
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for SqliteJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteJournal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Options of a [`SqliteJournal`]; [`open`](Self::open) opens it.
#[must_use]
#[derive(Debug, Clone)]
pub struct SqliteJournalBuilder {
    path: PathBuf,
    busy_timeout: Duration,
    max_size: Option<u64>,
    sync_on_commit: bool,
}

impl SqliteJournalBuilder {
    /// How long a write waits for another connection's lock on the file
    /// (default 10 s).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The largest the database may grow, in bytes (default: no limit but
    /// the disk's). Past it every record fails as a full disk does, and the
    /// processor refuses new tasks until removals make room. Rounded down to
    /// whole pages of 4 KiB, at least 2.
    pub fn max_size(mut self, bytes: u64) -> Self {
        self.max_size = Some(bytes);
        self
    }

    /// Whether each commit waits for `fsync` (default true, SQLite's
    /// `synchronous = FULL`): recorded tasks survive a power cut. False is
    /// `synchronous = NORMAL` in WAL mode: commits reach the operating
    /// system but not the disk, so a killed process loses nothing while a
    /// power cut or kernel crash may lose the last commits; commits are then
    /// much faster.
    pub fn sync_on_commit(mut self, sync: bool) -> Self {
        self.sync_on_commit = sync;
        self
    }

    /// Opens the file (creating it and its table when missing).
    pub fn open(self) -> Result<SqliteJournal, JournalError> {
        let name = format!("sqlite:{}", self.path.display());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| JournalError::new(&name, "start its runtime", e))?;
        let runtime = OwnRuntime(Some(runtime));
        let mut options = SqliteConnectOptions::new()
            .filename(&self.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if self.sync_on_commit {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(self.busy_timeout);
        if let Some(bytes) = self.max_size {
            let pages = (bytes / PAGE_SIZE).max(2);
            options = options.pragma("max_page_count", pages.to_string());
        }
        let conn = block(runtime.get(), async move {
            let mut conn = SqliteConnection::connect_with(&options).await?;
            sqlx::raw_sql(CREATE).execute(&mut conn).await?;
            Ok::<_, sqlx::Error>(conn)
        })
        .map_err(|e| JournalError::new(&name, "open", e))?;
        Ok(SqliteJournal {
            name,
            path: self.path,
            runtime,
            conn: Some(conn),
        })
    }
}

impl SqliteJournal {
    /// Opens the journal in the file at `path` with the default options
    /// (creating the file and its table when missing).
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteJournal, JournalError> {
        SqliteJournal::builder(path).open()
    }

    /// Options for the journal in the file at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteJournalBuilder {
        SqliteJournalBuilder {
            path: path.as_ref().to_owned(),
            busy_timeout: Duration::from_secs(10),
            max_size: None,
            sync_on_commit: true,
        }
    }

    /// The file it writes to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table it keeps its entries in.
    pub fn table(&self) -> &'static str {
        TABLE
    }

    /// Runs one database call on the connection, which `call` takes and
    /// gives back.
    fn with_conn<T, F, Fut>(
        &mut self,
        action: impl FnOnce() -> String,
        call: F,
    ) -> Result<T, JournalError>
    where
        T: Send,
        F: FnOnce(SqliteConnection) -> Fut,
        Fut: Future<Output = (SqliteConnection, Result<T, sqlx::Error>)> + Send,
    {
        let Some(conn) = self.conn.take() else {
            return Err(JournalError::new(
                &self.name,
                action(),
                "the connection is closed",
            ));
        };
        let (conn, result) = block(self.runtime.get(), call(conn));
        self.conn = Some(conn);
        result.map_err(|e| JournalError::new(&self.name, action(), e))
    }
}

/// Runs `future` to completion on `runtime`: on this thread, or on a scoped
/// thread of its own when this one is already inside an async runtime
/// (where blocking on another runtime is not allowed).
fn block<F>(runtime: &tokio::runtime::Runtime, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime.block_on(future);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime.block_on(future))
            .join()
            .unwrap_or_else(|panic| resume_unwind(panic))
    })
}

/// Rows written by one statement at most: a run of changes of one kind goes
/// in statements of these sizes (largest first), so few distinct statements
/// are prepared and cached.
const STATEMENT_ROWS: [usize; 4] = [64, 16, 4, 1];

/// The statement for `rows` changes of the kind of `change`.
fn statement(change: &JournalChange, rows: usize) -> String {
    let list = |each: &str| vec![each; rows].join(", ");
    match change {
        JournalChange::Record(_) => format!(
            "INSERT INTO {TABLE} (entry_id, task_id, task) VALUES {} \
             ON CONFLICT (entry_id) DO UPDATE SET task_id = excluded.task_id, \
             task = excluded.task, started = 0",
            list("(?, ?, ?)")
        ),
        JournalChange::Started(_) => format!(
            "UPDATE {TABLE} SET started = 1 WHERE entry_id IN ({})",
            list("?")
        ),
        JournalChange::Remove(_) => {
            format!("DELETE FROM {TABLE} WHERE entry_id IN ({})", list("?"))
        }
    }
}

/// Writes changes of one kind, in order, in few statements.
async fn apply_run(conn: &mut SqliteConnection, run: &[JournalChange]) -> Result<(), sqlx::Error> {
    let mut rest = run;
    while let Some(first) = rest.first() {
        let rows = STATEMENT_ROWS
            .into_iter()
            .find(|&n| n <= rest.len())
            .unwrap_or(1);
        let (chunk, after) = rest.split_at(rows);
        let sql = statement(first, rows);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for change in chunk {
            query = match change {
                JournalChange::Record(entry) => query
                    .bind(entry.id.as_str())
                    .bind(entry.task_id.as_str())
                    .bind(entry.task.as_str()),
                JournalChange::Started(id) | JournalChange::Remove(id) => query.bind(id.as_str()),
            };
        }
        query.execute(&mut *conn).await?;
        rest = after;
    }
    Ok(())
}

fn same_kind(a: &JournalChange, b: &JournalChange) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

impl TaskJournal for SqliteJournal {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn record(&mut self, entry: &JournalEntry) -> Result<(), JournalError> {
        self.write_batch(&[JournalChange::Record(entry.clone())])
    }

    fn mark_started(&mut self, entry_id: &str) -> Result<(), JournalError> {
        self.write_batch(&[JournalChange::Started(entry_id.to_owned())])
    }

    fn remove(&mut self, entry_id: &str) -> Result<(), JournalError> {
        self.write_batch(&[JournalChange::Remove(entry_id.to_owned())])
    }

    fn pending(&mut self) -> Result<Vec<JournalEntry>, JournalError> {
        self.with_conn(
            || "read pending tasks".to_owned(),
            |mut conn| async move {
                let result = read_pending(&mut conn).await;
                (conn, result)
            },
        )
    }

    /// One transaction for the whole batch: one commit, one `fsync`.
    fn write_batch(&mut self, changes: &[JournalChange]) -> Result<(), JournalError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.with_conn(
            || describe(changes),
            |mut conn| async move {
                let result = write(&mut conn, changes).await;
                (conn, result)
            },
        )
    }
}

async fn read_pending(conn: &mut SqliteConnection) -> Result<Vec<JournalEntry>, sqlx::Error> {
    let rows = sqlx::query(PENDING).fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|row| {
            Ok(JournalEntry {
                id: row.try_get(0)?,
                task_id: row.try_get(1)?,
                task: row.try_get(2)?,
                started: row.try_get::<i64, _>(3)? != 0,
            })
        })
        .collect()
}

/// Writes the changes: a run of one kind on its own, anything more in one
/// transaction.
async fn write(conn: &mut SqliteConnection, changes: &[JournalChange]) -> Result<(), sqlx::Error> {
    if changes.len() <= 1 {
        return apply_run(conn, changes).await;
    }
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    for run in changes.chunk_by(same_kind) {
        if let Err(e) = apply_run(&mut tx, run).await {
            let _ = tx.rollback().await;
            return Err(e);
        }
    }
    tx.commit().await
}

/// What a batch does, for its error.
fn describe(changes: &[JournalChange]) -> String {
    match changes {
        [JournalChange::Record(entry)] => format!("record task {}", entry.task_id),
        [JournalChange::Started(id)] => format!("mark entry {id} started"),
        [JournalChange::Remove(id)] => format!("remove entry {id}"),
        _ => format!("write a batch of {} changes", changes.len()),
    }
}

impl Drop for SqliteJournal {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // A clean close checkpoints the WAL into the database file.
            if let Err(e) = block(self.runtime.get(), conn.close()) {
                tracing::warn!(journal = %self.name, error = %e, "closing the task journal failed");
            }
        }
    }
}
