//! A payload store in Redis: one string key per payload, with a key prefix
//! and an optional expiry.

use std::{fmt, time::Duration};

use async_trait::async_trait;
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Client,
};

use super::PayloadStore;
use crate::StoreError;

/// The key prefix used unless [`RedisStore::key_prefix`] sets another (the
/// gem's default).
pub const DEFAULT_KEY_PREFIX: &str = "patient_http:payloads:";

/// How long [`RedisStore::connect`] waits for a reply to a command (the
/// `redis` crate's own default of 500 ms is too short for large payloads).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`RedisStore::connect`] waits for a connection to be established.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

const STORE: &str = "redis";

/// Payloads in Redis, under `<key prefix><key>` (the gem's layout), kept
/// until deleted or for the TTL set with [`ttl`](Self::ttl).
///
/// Cheap to clone: clones share one multiplexed connection, which reconnects
/// by itself after a failure.
///
/// ```no_run
/// # async fn run() -> Result<(), patient_store::StoreError> {
/// use std::time::Duration;
///
/// use patient_store::store::RedisStore;
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379/0")
///     .await?
///     .key_prefix("myapp:payloads:")
///     .ttl(Some(Duration::from_secs(7 * 24 * 3600)));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct RedisStore {
    connection: ConnectionManager,
    key_prefix: String,
    ttl: Option<Duration>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.key_prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the server at `url` (`redis://[:password@]host[:port][/db]`,
    /// `rediss://…` for TLS when the `redis` crate is built with it) and
    /// checks the connection. Commands time out after [`RESPONSE_TIMEOUT`];
    /// connecting after [`CONNECTION_TIMEOUT`].
    ///
    /// Fails with [`StoreError::Config`] for an invalid URL and
    /// [`StoreError::Backend`] when the server cannot be reached.
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        let client = Client::open(url)
            .map_err(|e| StoreError::Config(format!("invalid Redis URL {}: {e}", redact(url))))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_number_of_retries(3);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| {
                StoreError::backend(STORE, format!("cannot connect to {}", redact(url)), e)
            })?;
        Ok(RedisStore::from_manager(connection))
    }

    /// A store over a connection you configured yourself.
    pub fn from_manager(connection: ConnectionManager) -> RedisStore {
        RedisStore {
            connection,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            ttl: None,
        }
    }

    /// Sets the prefix of every key (default [`DEFAULT_KEY_PREFIX`],
    /// `patient_http:payloads:`, the gem's).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> RedisStore {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets how long payloads are kept: `Some(ttl)` writes each one with
    /// `SET … PX <ttl>` so it expires on its own; `None`, the default (as in
    /// the gem), keeps it until deleted. Set a TTL only if every payload is
    /// consumed well within it: a job retried after its payload expired finds
    /// nothing ([`StoreError::NotFound`]). A TTL is applied in whole
    /// milliseconds, at least 1 ms.
    pub fn ttl(mut self, ttl: Option<Duration>) -> RedisStore {
        self.ttl = ttl;
        self
    }

    /// The Redis key of the payload `key`.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    fn set_command(&self, key: &str, json: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.redis_key(key)).arg(json);
        if let Some(ms) = self.ttl.map(ttl_millis) {
            cmd.arg("PX").arg(ms);
        }
        cmd
    }
}

/// A TTL in whole milliseconds, at least 1 (Redis refuses 0).
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

#[async_trait]
impl PayloadStore for RedisStore {
    async fn store(&self, key: &str, json: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        self.set_command(key, json)
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| {
                StoreError::backend(STORE, format!("SET {} failed", self.redis_key(key)), e)
            })
    }

    async fn fetch(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut connection = self.connection.clone();
        let redis_key = self.redis_key(key);
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&redis_key)
            .query_async(&mut connection)
            .await
            .map_err(|e| StoreError::backend(STORE, format!("GET {redis_key} failed"), e))?;
        bytes
            .map(|bytes| {
                String::from_utf8(bytes).map_err(|e| StoreError::Corrupt {
                    store: STORE.to_owned(),
                    key: key.to_owned(),
                    message: format!("not UTF-8: {e}"),
                })
            })
            .transpose()
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let redis_key = self.redis_key(key);
        redis::cmd("DEL")
            .arg(&redis_key)
            .query_async::<i64>(&mut connection)
            .await
            .map(drop)
            .map_err(|e| StoreError::backend(STORE, format!("DEL {redis_key} failed"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<other>".to_owned(),
            })
            .collect()
    }

    #[test]
    fn ttl_is_whole_milliseconds_at_least_one() {
        assert_eq!(ttl_millis(Duration::from_secs(24 * 3600)), 86_400_000);
        assert_eq!(ttl_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(ttl_millis(Duration::from_micros(10)), 1);
        assert_eq!(ttl_millis(Duration::ZERO), 1);
        assert_eq!(ttl_millis(Duration::MAX), u64::MAX);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:hunter2@127.0.0.1:6379/1"),
            "redis://:***@127.0.0.1:6379/1"
        );
        assert_eq!(redact("redis://127.0.0.1/"), "redis://127.0.0.1/");
        assert_eq!(redact("::"), "<unparsable URL>");
    }

    #[tokio::test]
    async fn invalid_url_is_a_config_error() {
        match RedisStore::connect("http://:secret@example.com").await {
            Err(StoreError::Config(message)) => {
                assert!(message.contains("invalid Redis URL"), "{message}");
                assert!(!message.contains("secret"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn unreachable_server_is_a_backend_error() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let url = format!("redis://:pw@127.0.0.1:{port}/0");
        match RedisStore::connect(&url).await {
            Err(StoreError::Backend {
                store,
                message,
                source,
            }) => {
                assert_eq!(store, "redis");
                assert!(message.contains("cannot connect"), "{message}");
                assert!(!message.contains(":pw@"), "{message}");
                assert!(source.is_some());
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn keys_and_set_command_follow_the_gem_layout() {
        let client = Client::open("redis://127.0.0.1:1/").unwrap();
        let manager =
            ConnectionManager::new_lazy_with_config(client, ConnectionManagerConfig::new())
                .unwrap();
        let store = RedisStore::from_manager(manager);
        assert_eq!(store.redis_key("abc"), "patient_http:payloads:abc");
        assert_eq!(
            args(&store.set_command("abc", "{}")),
            ["SET", "patient_http:payloads:abc", "{}"],
            "no TTL by default: kept until deleted"
        );

        let store = store
            .key_prefix("app:")
            .ttl(Some(Duration::from_millis(1500)));
        assert_eq!(
            args(&store.set_command("k", "[1]")),
            ["SET", "app:k", "[1]", "PX", "1500"]
        );
        let store = store.ttl(None);
        assert_eq!(
            args(&store.set_command("k", "[1]")),
            ["SET", "app:k", "[1]"]
        );
        let debug = format!("{store:?}");
        assert!(debug.contains("app:"), "{debug}");
    }
}
