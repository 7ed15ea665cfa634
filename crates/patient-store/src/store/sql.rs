//! [`SqlStore`]: payloads in a SQLite or PostgreSQL table.

use std::{str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::{
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions},
    AssertSqlSafe, Row,
};

use super::PayloadStore;
use crate::StoreError;

/// The migration creating the table and its index on SQLite.
const SQLITE_MIGRATION: &str =
    include_str!("../../migrations/sqlite/0001_create_patient_http_payloads.sql");
/// The migration creating the table and its index on PostgreSQL.
const POSTGRES_MIGRATION: &str =
    include_str!("../../migrations/postgres/0001_create_patient_http_payloads.sql");

/// How long a SQLite connection waits for another writer's lock.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections reading a SQLite file at once (writes go through one).
const SQLITE_READERS: u32 = 4;
/// Connections to a PostgreSQL server.
const POSTGRES_CONNECTIONS: u32 = 10;

/// The current UTC time as SQLite text (`YYYY-MM-DD HH:MM:SS.SSS`).
const SQLITE_NOW: &str = "strftime('%Y-%m-%d %H:%M:%f', 'now')";
/// The current UTC time as a PostgreSQL `timestamp without time zone`.
const POSTGRES_NOW: &str = "(now() AT TIME ZONE 'UTC')";

/// Keeps payloads in a SQL table — SQLite or PostgreSQL.
///
/// The table has the columns `key` (primary key), `data` (the JSON text),
/// `created_at` and `updated_at` (UTC), with an index on `created_at` for
/// cleaning up old payloads ([`delete_older_than`](Self::delete_older_than)).
/// It is the table of the Ruby gem's ActiveRecord store, so an application
/// using the gem can read what this store writes. [`migrate`](Self::migrate)
/// creates it from the migration files shipped in the crate's `migrations/`
/// directory (one for SQLite, one for PostgreSQL), which also work with other
/// migration tools when the table has its default name.
///
/// On SQLite the database runs in WAL mode with a busy timeout, writes go
/// through a single connection and reads through a small pool, so concurrent
/// writers queue instead of failing with "database is locked".
///
/// Cloning is cheap: clones share the connection pools.
///
/// ```no_run
/// # async fn example() -> Result<(), patient_store::StoreError> {
/// use patient_store::{store::SqlStore, PayloadStore};
///
/// let store = SqlStore::connect("sqlite:/var/lib/patient/payloads.db", SqlStore::DEFAULT_TABLE).await?;
/// store.migrate().await?;
/// store.store("a-key", r#"{"status":200}"#).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Db,
    table: Arc<str>,
    upsert: Arc<str>,
    select: Arc<str>,
    delete: Arc<str>,
    delete_older: Arc<str>,
}

#[derive(Debug, Clone)]
enum Db {
    Sqlite {
        /// One connection: SQLite has a single writer anyway.
        writer: SqlitePool,
        reader: SqlitePool,
    },
    Postgres(PgPool),
}

impl Db {
    fn kind(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }
}

impl SqlStore {
    /// The table's default name, the one of the Ruby gem's migration.
    pub const DEFAULT_TABLE: &'static str = "patient_http_payloads";

    /// Connects to `url` and keeps payloads in `table` (see
    /// [`DEFAULT_TABLE`](Self::DEFAULT_TABLE)); call [`migrate`](Self::migrate)
    /// to create the table.
    ///
    /// `url` is a SQLite URL (`sqlite:path/to/file.db`, `sqlite://…`,
    /// `sqlite::memory:`; the file is created if missing) or a PostgreSQL URL
    /// (`postgres://user:password@host:port/database`, `postgresql://…`).
    /// `table` is an identifier (`[A-Za-z_][A-Za-z0-9_]*`), optionally
    /// qualified by a schema (`schema.table`).
    pub async fn connect(url: &str, table: impl Into<String>) -> Result<Self, StoreError> {
        let table = table.into();
        validate_table(&table)?;
        let db = if url.starts_with("sqlite:") {
            connect_sqlite(url).await?
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url).map_err(|e| {
                StoreError::Config(format!("invalid PostgreSQL URL for the SQL store: {e}"))
            })?;
            let pool = PgPoolOptions::new()
                .max_connections(POSTGRES_CONNECTIONS)
                .connect_with(options)
                .await
                .map_err(|e| StoreError::backend("postgres", "cannot connect", e))?;
            Db::Postgres(pool)
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(StoreError::Config(format!(
                "the SQL store's URL must start with sqlite: or postgres://, not {scheme:?}"
            )));
        };
        Ok(Self::with_db(db, table))
    }

    /// A store over an existing PostgreSQL pool, keeping payloads in `table`.
    pub fn from_postgres_pool(pool: PgPool, table: impl Into<String>) -> Result<Self, StoreError> {
        let table = table.into();
        validate_table(&table)?;
        Ok(Self::with_db(Db::Postgres(pool), table))
    }

    /// A store over an existing SQLite pool (used for reads and writes),
    /// keeping payloads in `table`. The pool's options are used as they are:
    /// WAL mode and a busy timeout are up to the caller.
    pub fn from_sqlite_pool(
        pool: SqlitePool,
        table: impl Into<String>,
    ) -> Result<Self, StoreError> {
        let table = table.into();
        validate_table(&table)?;
        Ok(Self::with_db(
            Db::Sqlite {
                writer: pool.clone(),
                reader: pool,
            },
            table,
        ))
    }

    fn with_db(db: Db, table: String) -> Self {
        let (p1, p2, now) = match db {
            Db::Sqlite { .. } => ("?1", "?2", SQLITE_NOW),
            Db::Postgres(_) => ("$1", "$2", POSTGRES_NOW),
        };
        let upsert = format!(
            "INSERT INTO {table} (key, data, created_at, updated_at) VALUES ({p1}, {p2}, {now}, {now}) \
             ON CONFLICT (key) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at"
        );
        let select = format!("SELECT data FROM {table} WHERE key = {p1}");
        let delete = format!("DELETE FROM {table} WHERE key = {p1}");
        let delete_older = match db {
            Db::Sqlite { .. } => format!(
                "DELETE FROM {table} WHERE created_at < strftime('%Y-%m-%d %H:%M:%f', 'now', ?1)"
            ),
            Db::Postgres(_) => format!(
                "DELETE FROM {table} WHERE created_at < {POSTGRES_NOW} - make_interval(secs => $1)"
            ),
        };
        Self {
            db,
            table: table.into(),
            upsert: upsert.into(),
            select: select.into(),
            delete: delete.into(),
            delete_older: delete_older.into(),
        }
    }

    /// The table holding the payloads.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table and its index if they do not exist, from the
    /// migration shipped for the database (`migrations/sqlite/…` or
    /// `migrations/postgres/…`). Safe to call on every start, from several
    /// processes at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let kind = self.db.kind();
        let failed = |e: sqlx::Error| {
            StoreError::backend(kind, format!("cannot migrate table {}", self.table), e)
        };
        match &self.db {
            Db::Sqlite { writer, .. } => {
                let sql = migration_for(SQLITE_MIGRATION, &self.table);
                let mut tx = writer.begin().await.map_err(failed)?;
                sqlx::raw_sql(AssertSqlSafe(sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
                tx.commit().await.map_err(failed)?;
            }
            Db::Postgres(pool) => {
                let sql = migration_for(POSTGRES_MIGRATION, &self.table);
                let mut tx = pool.begin().await.map_err(failed)?;
                // `IF NOT EXISTS` alone races when two processes migrate at once.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(format!("patient-store migrate {}", self.table))
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
                sqlx::raw_sql(AssertSqlSafe(sql))
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
                tx.commit().await.map_err(failed)?;
            }
        }
        Ok(())
    }

    /// Deletes payloads created more than `age` ago (abandoned by jobs that
    /// never finished); returns how many were deleted.
    pub async fn delete_older_than(&self, age: Duration) -> Result<u64, StoreError> {
        let sql = AssertSqlSafe(self.delete_older.clone());
        let result = match &self.db {
            Db::Sqlite { writer, .. } => sqlx::query(sql)
                .bind(format!("-{:.3} seconds", age.as_secs_f64()))
                .execute(writer)
                .await
                .map(|r| r.rows_affected()),
            Db::Postgres(pool) => sqlx::query(sql)
                .bind(age.as_secs_f64())
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        };
        result.map_err(|e| self.query_failed("delete old payloads", e))
    }

    fn query_failed(&self, action: &str, e: sqlx::Error) -> StoreError {
        StoreError::backend(
            self.db.kind(),
            format!("cannot {action} in table {}", self.table),
            e,
        )
    }
}

#[async_trait]
impl PayloadStore for SqlStore {
    async fn store(&self, key: &str, json: &str) -> Result<(), StoreError> {
        let sql = AssertSqlSafe(self.upsert.clone());
        let result = match &self.db {
            Db::Sqlite { writer, .. } => sqlx::query(sql)
                .bind(key)
                .bind(json)
                .execute(writer)
                .await
                .map(drop),
            Db::Postgres(pool) => sqlx::query(sql)
                .bind(key)
                .bind(json)
                .execute(pool)
                .await
                .map(drop),
        };
        result.map_err(|e| self.query_failed(&format!("store key {key:?}"), e))
    }

    async fn fetch(&self, key: &str) -> Result<Option<String>, StoreError> {
        let sql = AssertSqlSafe(self.select.clone());
        let result = match &self.db {
            Db::Sqlite { reader, .. } => sqlx::query(sql)
                .bind(key)
                .fetch_optional(reader)
                .await
                .and_then(|row| row.map(|row| row.try_get::<String, _>(0)).transpose()),
            Db::Postgres(pool) => sqlx::query(sql)
                .bind(key)
                .fetch_optional(pool)
                .await
                .and_then(|row| row.map(|row| row.try_get::<String, _>(0)).transpose()),
        };
        result.map_err(|e| self.query_failed(&format!("fetch key {key:?}"), e))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let sql = AssertSqlSafe(self.delete.clone());
        let result = match &self.db {
            Db::Sqlite { writer, .. } => sqlx::query(sql).bind(key).execute(writer).await.map(drop),
            Db::Postgres(pool) => sqlx::query(sql).bind(key).execute(pool).await.map(drop),
        };
        result.map_err(|e| self.query_failed(&format!("delete key {key:?}"), e))
    }
}

async fn connect_sqlite(url: &str) -> Result<Db, StoreError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| {
            StoreError::Config(format!("invalid SQLite URL {url:?} for the SQL store: {e}"))
        })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT);
    let connect = |options: SqliteConnectOptions, pool: SqlitePoolOptions| async move {
        pool.connect_with(options)
            .await
            .map_err(|e| StoreError::backend("sqlite", format!("cannot open {url:?}"), e))
    };
    if url.contains(":memory:") || url.contains("mode=memory") {
        // Every connection to an in-memory database sees its own database:
        // keep exactly one, forever.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
        let pool = connect(options, pool).await?;
        return Ok(Db::Sqlite {
            writer: pool.clone(),
            reader: pool,
        });
    }
    let writer = connect(options.clone(), SqlitePoolOptions::new().max_connections(1)).await?;
    let reader = connect(
        options,
        SqlitePoolOptions::new().max_connections(SQLITE_READERS),
    )
    .await?;
    Ok(Db::Sqlite { writer, reader })
}

/// Checks that `table` is a plain identifier, optionally schema-qualified,
/// so it can be put into SQL text.
fn validate_table(table: &str) -> Result<(), StoreError> {
    let parts: Vec<&str> = table.split('.').collect();
    let valid = parts.len() <= 2
        && parts.iter().all(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if valid {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "invalid SQL store table name {table:?}: use letters, digits and `_`, optionally `schema.table`"
        )))
    }
}

/// The shipped migration with the default table name replaced by `table`.
fn migration_for(migration: &str, table: &str) -> String {
    let default = SqlStore::DEFAULT_TABLE;
    let index = format!("index_{}_on_created_at", table.replace('.', "_"));
    migration
        .replace(&format!("index_{default}_on_created_at"), &index)
        .replace(default, table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated() {
        for ok in ["payloads", "_p1", "app.payloads"] {
            validate_table(ok).unwrap();
        }
        for bad in ["", "1x", "a-b", "a;drop", "a.b.c", "a.", "p ayloads"] {
            let err = validate_table(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn migrations_follow_the_table_name() {
        let sql = migration_for(POSTGRES_MIGRATION, "app.payloads");
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS app.payloads ("));
        assert!(sql.contains("index_app_payloads_on_created_at"));
        assert!(sql.contains("ON app.payloads (created_at)"));
        assert!(!sql.contains(SqlStore::DEFAULT_TABLE));
        assert_eq!(
            migration_for(SQLITE_MIGRATION, SqlStore::DEFAULT_TABLE),
            SQLITE_MIGRATION
        );
    }

    #[tokio::test]
    async fn in_memory_sqlite_round_trip_and_cleanup() {
        let store = SqlStore::connect("sqlite::memory:", "payloads")
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        store.store("k", "{\"a\":1}").await.unwrap();
        assert_eq!(
            store.fetch("k").await.unwrap().as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(
            store
                .delete_older_than(Duration::from_secs(60))
                .await
                .unwrap(),
            0
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.delete_older_than(Duration::ZERO).await.unwrap(), 1);
        assert_eq!(store.fetch("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn unknown_url_schemes_are_config_errors() {
        let err = SqlStore::connect("mysql://localhost/db", "payloads")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{err}");
        assert!(err.to_string().contains("\"mysql\""), "{err}");
    }
}
