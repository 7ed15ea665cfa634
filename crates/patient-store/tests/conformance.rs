//! One conformance suite for every [`PayloadStore`], each against the real
//! thing: a directory, a SQLite file, and PostgreSQL, Redis and S3-compatible
//! servers.
//!
//! The servers come from `scripts/services.sh start`, which prints the
//! `PATIENT_TEST_*` variables this suite reads. A test whose variable is
//! missing prints a notice and passes, unless `PATIENT_REQUIRE_SERVICES=1`
//! (set by `scripts/test.sh`), in which case it fails naming the service.
//!
//! The suite runs with the default features (every backend); without the
//! `sql` feature it is left out whole.

#![cfg(feature = "sql")]

use std::{
    collections::{HashMap, HashSet},
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use patient_store::{
    store::{FileStore, SqlStore},
    PayloadStore, PayloadStores, StoreError,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------

/// Runs every check of the [`PayloadStore`] contract, and of [`PayloadStores`]
/// on top of it, against `store`; `name` is the store's name in errors and
/// references.
async fn conformance(name: &str, store: Arc<dyn PayloadStore>) {
    round_trip_overwrite_and_delete(name, &*store).await;
    missing_keys(name, &*store).await;
    large_payload(name, &*store).await;
    unicode_payload(name, &*store).await;
    concurrent_writers(name, store.clone()).await;
    generated_keys_are_unique(name, &*store);
    registry_threshold_and_ref_shape(name, store.clone()).await;
    registry_last_registered_writes(name, store.clone()).await;
    registry_errors_name_store_and_key(name, store.clone()).await;
}

async fn round_trip_overwrite_and_delete(name: &str, store: &dyn PayloadStore) {
    let key = store.generate_key();
    let first = r#"{"status":200,"body":"first"}"#;
    store.store(&key, first).await.unwrap();
    assert_eq!(
        store.fetch(&key).await.unwrap().as_deref(),
        Some(first),
        "{name}: fetch returns what was stored"
    );

    let second = r#"{"status":404,"body":"second, longer than the first one"}"#;
    store.store(&key, second).await.unwrap();
    assert_eq!(
        store.fetch(&key).await.unwrap().as_deref(),
        Some(second),
        "{name}: a second store under the same key replaces the payload"
    );
    // A shorter payload must not leave the tail of the longer one behind.
    store.store(&key, "{}").await.unwrap();
    assert_eq!(
        store.fetch(&key).await.unwrap().as_deref(),
        Some("{}"),
        "{name}"
    );

    store.delete(&key).await.unwrap();
    assert_eq!(
        store.fetch(&key).await.unwrap(),
        None,
        "{name}: a deleted payload is gone"
    );
}

async fn missing_keys(name: &str, store: &dyn PayloadStore) {
    let key = store.generate_key();
    assert_eq!(
        store.fetch(&key).await.unwrap(),
        None,
        "{name}: a key never written"
    );
    store.delete(&key).await.unwrap();
    store.delete(&key).await.unwrap();

    store.store(&key, "[1]").await.unwrap();
    store.delete(&key).await.unwrap();
    store
        .delete(&key)
        .await
        .unwrap_or_else(|e| panic!("{name}: deleting twice is not an error: {e}"));
}

async fn large_payload(name: &str, store: &dyn PayloadStore) {
    // 1 MiB of JSON text that does not compress to nothing.
    let mut body = String::with_capacity(1 << 20);
    let mut x: u32 = 0x2545_f491;
    while body.len() < (1 << 20) - 64 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        body.push(char::from(b'a' + (x % 26) as u8));
    }
    let json = json!({ "body": body }).to_string();
    assert!(json.len() >= (1 << 20) - 64, "{}", json.len());

    let key = store.generate_key();
    store.store(&key, &json).await.unwrap();
    let fetched = store.fetch(&key).await.unwrap().expect("large payload");
    assert_eq!(fetched.len(), json.len(), "{name}: 1 MiB payload length");
    assert!(fetched == json, "{name}: 1 MiB payload content");
    store.delete(&key).await.unwrap();
}

async fn unicode_payload(name: &str, store: &dyn PayloadStore) {
    let value = json!({
        "headers": {"content-type": "text/plain; charset=utf-8"},
        "body": "héllo wörld — 世界 🎉👩‍👩‍👧 مرحبا שלום e\u{301} \u{feff}\u{10ffff}",
        "escaped": "tab\tnewline\nquote\"backslash\\nul\u{0}bell\u{7}",
    });
    // serde_json writes non-ASCII as UTF-8 and control characters escaped.
    let json = value.to_string();
    let key = store.generate_key();
    store.store(&key, &json).await.unwrap();
    let fetched = store.fetch(&key).await.unwrap().expect("unicode payload");
    assert_eq!(fetched, json, "{name}: unicode survives byte for byte");
    assert_eq!(serde_json::from_str::<Value>(&fetched).unwrap(), value);
    store.delete(&key).await.unwrap();
}

async fn concurrent_writers(name: &str, store: Arc<dyn PayloadStore>) {
    const WRITERS: usize = 50;

    // 50 tasks, each with its own key.
    let tasks: Vec<_> = (0..WRITERS)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = store.generate_key();
                let json = json!({ "writer": i, "body": "y".repeat(1000 + i) }).to_string();
                store.store(&key, &json).await?;
                let fetched = store.fetch(&key).await?;
                store.delete(&key).await?;
                Ok::<_, StoreError>((json, fetched))
            })
        })
        .collect();
    for task in tasks {
        let (json, fetched) = task.await.unwrap().unwrap();
        assert_eq!(fetched.as_deref(), Some(json.as_str()), "{name}: own key");
    }

    // 50 tasks writing the same key: the payload left is one of theirs, whole.
    let key = store.generate_key();
    let payloads: Vec<String> = (0..WRITERS)
        .map(|i| json!({ "writer": i, "body": "z".repeat(10_000 + 100 * i) }).to_string())
        .collect();
    let tasks: Vec<_> = payloads
        .iter()
        .cloned()
        .map(|json| {
            let store = store.clone();
            let key = key.clone();
            tokio::spawn(async move { store.store(&key, &json).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let fetched = store.fetch(&key).await.unwrap().expect("shared key");
    assert!(
        payloads.contains(&fetched),
        "{name}: concurrent writes of one key leave one whole payload ({} bytes)",
        fetched.len()
    );
    store.delete(&key).await.unwrap();
}

fn generated_keys_are_unique(name: &str, store: &dyn PayloadStore) {
    let keys: HashSet<String> = (0..1000).map(|_| store.generate_key()).collect();
    assert_eq!(keys.len(), 1000, "{name}: generate_key repeats itself");
    assert!(keys.iter().all(|k| !k.is_empty()), "{name}: empty key");
}

/// `{"body": "xxx…"}` whose JSON text is exactly `len` bytes.
fn payload_of_len(len: usize) -> Value {
    let value = json!({ "body": "x".repeat(len - r#"{"body":""}"#.len()) });
    assert_eq!(value.to_string().len(), len);
    value
}

fn ref_key<'a>(name: &str, reference: &'a Value) -> &'a str {
    let inner = reference["$ref"].as_object().expect("$ref object");
    assert_eq!(
        reference.as_object().unwrap().len(),
        1,
        "{name}: {reference}"
    );
    assert_eq!(inner.len(), 2, "{name}: {reference}");
    assert_eq!(inner["store"], name, "{name}: {reference}");
    let key = inner["key"].as_str().expect("string key");
    assert!(!key.is_empty());
    key
}

async fn registry_threshold_and_ref_shape(name: &str, store: Arc<dyn PayloadStore>) {
    // Default threshold: 64 KiB of JSON text.
    let stores = PayloadStores::new().with_store(name, store.clone());
    assert_eq!(stores.threshold(), 64 * 1024);
    let at = payload_of_len(64 * 1024);
    assert_eq!(
        stores.store(&at, None).await.unwrap(),
        at,
        "{name}: at threshold"
    );
    let over = payload_of_len(64 * 1024 + 1);
    let reference = stores.store(&over, None).await.unwrap();
    let key = ref_key(name, &reference).to_owned();
    assert_eq!(reference, json!({"$ref": {"store": name, "key": key}}));
    assert!(PayloadStores::is_storage_ref(&reference));
    assert!(!PayloadStores::is_storage_ref(&over));
    // The store holds the payload's JSON text, readable by anyone.
    let raw = store.fetch(&key).await.unwrap().expect("stored payload");
    assert_eq!(serde_json::from_str::<Value>(&raw).unwrap(), over);
    assert_eq!(stores.fetch(&reference).await.unwrap(), over);
    stores.delete(&reference).await.unwrap();
    stores.delete(&reference).await.unwrap();
    assert_eq!(store.fetch(&key).await.unwrap(), None, "{name}: deleted");

    // A configured threshold, and an explicit max_size that overrides it.
    let stores = PayloadStores::new()
        .with_threshold(100)
        .with_store(name, store.clone());
    let small = payload_of_len(100);
    assert_eq!(stores.store(&small, None).await.unwrap(), small);
    let reference = stores.store(&small, Some(99)).await.unwrap();
    ref_key(name, &reference);
    assert_eq!(stores.fetch(&reference).await.unwrap(), small);
    stores.delete(&reference).await.unwrap();
    let big = payload_of_len(5000);
    assert_eq!(stores.store(&big, Some(5000)).await.unwrap(), big);
    let reference = stores.store(&big, None).await.unwrap();
    assert_eq!(stores.fetch(&reference).await.unwrap(), big);
    stores.delete(&reference).await.unwrap();

    // Fetching a value that is not a reference is an error, as in the gem;
    // deleting one is a no-op.
    for plain in [
        json!({"status": 200, "headers": {}}),
        small.clone(),
        json!(null),
        json!("key"),
        json!([reference]),
    ] {
        let err = stores.fetch(&plain).await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotAReference(_)),
            "{name}: {plain}: {err:?}"
        );
        assert!(err.to_string().contains("not a storage reference"), "{err}");
        stores.delete(&plain).await.unwrap();
    }
}

async fn registry_last_registered_writes(name: &str, store: Arc<dyn PayloadStore>) {
    let other = Arc::new(MemoryStore::default());
    let mut stores = PayloadStores::new()
        .with_threshold(10)
        .with_store("before", other.clone())
        .with_store(name, store.clone());
    assert_eq!(stores.current(), Some(name));
    let old_payload = json!({"old": "payload written before the move"});
    let old_ref = stores.store(&old_payload, None).await.unwrap();
    let old_key = ref_key(name, &old_ref).to_owned();
    assert!(
        other.is_empty(),
        "{name}: only the last registered store writes"
    );

    // Move new writes to another store; the old references stay readable.
    stores.register("after", other.clone());
    assert_eq!(stores.current(), Some("after"));
    let new_payload = json!({"new": "payload written after the move"});
    let new_ref = stores.store(&new_payload, None).await.unwrap();
    let new_key = ref_key("after", &new_ref).to_owned();
    assert_eq!(store.fetch(&new_key).await.unwrap(), None, "{name}");
    assert!(other.contains(&new_key));
    assert_eq!(stores.fetch(&old_ref).await.unwrap(), old_payload, "{name}");
    assert_eq!(stores.fetch(&new_ref).await.unwrap(), new_payload);

    stores.delete(&old_ref).await.unwrap();
    stores.delete(&new_ref).await.unwrap();
    assert_eq!(store.fetch(&old_key).await.unwrap(), None, "{name}");
    assert!(other.is_empty());
}

async fn registry_errors_name_store_and_key(name: &str, store: Arc<dyn PayloadStore>) {
    let stores = PayloadStores::new().with_store(name, store.clone());

    let unknown = json!({"$ref": {"store": "no-such-store", "key": "k-1"}});
    let err = stores.fetch(&unknown).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::UnknownStore { store } if store == "no-such-store"),
        "{name}: {err:?}"
    );
    assert!(err.to_string().contains("no-such-store"), "{err}");
    // Deleting through an unknown store has nothing to delete from.
    stores.delete(&unknown).await.unwrap();

    let missing_key = store.generate_key();
    let missing = json!({"$ref": {"store": name, "key": missing_key}});
    let err = stores.fetch(&missing).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound { store, key } if store == name && *key == missing_key),
        "{name}: {err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(name) && message.contains(&missing_key),
        "{message}"
    );
    stores.delete(&missing).await.unwrap();

    // Stored text that is not JSON.
    let corrupt_key = store.generate_key();
    store.store(&corrupt_key, "{not json").await.unwrap();
    let corrupt = json!({"$ref": {"store": name, "key": corrupt_key}});
    let err = stores.fetch(&corrupt).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { store, key, .. } if store == name && *key == corrupt_key),
        "{name}: {err:?}"
    );
    stores.delete(&corrupt).await.unwrap();

    // A malformed reference.
    let err = stores
        .fetch(&json!({"$ref": {"store": name}}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotAReference(_)),
        "{name}: {err:?}"
    );

    // Nothing registered: small payloads pass, large ones cannot be moved.
    let none = PayloadStores::new().with_threshold(10);
    let small = json!(1);
    assert_eq!(none.store(&small, None).await.unwrap(), small);
    let err = none.store(&payload_of_len(11), None).await.unwrap_err();
    assert!(matches!(err, StoreError::NoStore), "{err:?}");
}

/// A custom store kept in memory: the second store of the registry checks.
#[derive(Default)]
struct MemoryStore(Mutex<HashMap<String, String>>);

impl MemoryStore {
    fn is_empty(&self) -> bool {
        self.0.lock().unwrap().is_empty()
    }

    fn contains(&self, key: &str) -> bool {
        self.0.lock().unwrap().contains_key(key)
    }
}

#[async_trait]
impl PayloadStore for MemoryStore {
    async fn store(&self, key: &str, json: &str) -> Result<(), StoreError> {
        self.0.lock().unwrap().insert(key.into(), json.into());
        Ok(())
    }

    async fn fetch(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.0.lock().unwrap().get(key).cloned())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.lock().unwrap().remove(key);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

/// The value of `var`, or `None` (with a notice) when the service is not
/// running; with `PATIENT_REQUIRE_SERVICES=1` a missing service fails.
fn service(var: &str, service: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            let hint = "start it with `eval \"$(scripts/services.sh start)\"`";
            if std::env::var("PATIENT_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("{service} is required (PATIENT_REQUIRE_SERVICES=1) but {var} is not set; {hint}");
            }
            // Straight to stderr: the test harness would hide `eprintln!`.
            let _ = writeln!(
                std::io::stderr(),
                "notice: skipping the {service} conformance test: {var} is not set; {hint}"
            );
            None
        }
    }
}

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "patient-store-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A prefix no other run uses, for stores on shared servers.
fn unique_prefix() -> String {
    format!("patient-conformance-{}/", uuid::Uuid::new_v4().simple())
}

// ---------------------------------------------------------------------------
// One test per backend
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store() {
    let dir = TempDir::new("file");
    let store = Arc::new(FileStore::new(dir.0.join("payloads")).unwrap());
    conformance("files", store.clone()).await;

    // Atomic writes leave no temporary files behind, and a payload file is
    // `<key>.json`, as in the Ruby gem.
    store.store("interop", "{}").await.unwrap();
    let names: Vec<String> = std::fs::read_dir(store.dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["interop.json"]);

    for key in ["../escape", "a/b", "a\\b", ".."] {
        let err = store.store(key, "{}").await.unwrap_err();
        assert!(err.to_string().contains(&format!("{key:?}")), "{err}");
        assert!(store.fetch(key).await.is_err());
        assert!(store.delete(key).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store() {
    let dir = TempDir::new("sqlite");
    let path = dir.0.join("payloads.db");
    let url = format!("sqlite:{}", path.display());
    let store = SqlStore::connect(&url, "patient_payloads_custom")
        .await
        .unwrap();
    store.migrate().await.unwrap();
    conformance("sqlite", Arc::new(store.clone())).await;

    // A second connection (another process, say) writing the same file at
    // the same time waits for the lock instead of failing.
    let other = SqlStore::connect(&url, "patient_payloads_custom")
        .await
        .unwrap();
    other.migrate().await.unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = if i % 2 == 0 {
                store.clone()
            } else {
                other.clone()
            };
            tokio::spawn(async move {
                let key = format!("shared-{i}");
                store.store(&key, &format!("[{i}]")).await?;
                store.fetch(&key).await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), Some(format!("[{i}]")));
    }

    // WAL mode, and the table layout of the Ruby gem.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let (data, created, updated): (String, String, String) = sqlx::query_as(
        "SELECT data, created_at, updated_at FROM patient_payloads_custom WHERE key = 'shared-3'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(data, "[3]");
    assert!(
        created.len() >= 19 && updated >= created,
        "{created} {updated}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store() {
    let Some(url) = service("PATIENT_TEST_POSTGRES_URL", "PostgreSQL") else {
        return;
    };
    let store = SqlStore::connect(&url, SqlStore::DEFAULT_TABLE)
        .await
        .unwrap();
    // Several processes starting at once all migrate.
    let migrations: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for migration in migrations {
        migration.await.unwrap().unwrap();
    }
    conformance("postgres", Arc::new(store.clone())).await;

    // The table layout of the Ruby gem: key, data, created_at, updated_at.
    store.store("interop-check", "{\"a\":1}").await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let (data, newer): (String, bool) = sqlx::query_as(
        "SELECT data, updated_at >= created_at FROM patient_http_payloads WHERE key = 'interop-check'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(data, "{\"a\":1}");
    assert!(newer);
    store.delete("interop-check").await.unwrap();
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store() {
    use std::time::Duration;

    use patient_store::store::RedisStore;

    let Some(url) = service("PATIENT_TEST_REDIS_URL", "Redis") else {
        return;
    };
    let prefix = unique_prefix();
    let store = RedisStore::connect(&url)
        .await
        .unwrap()
        .key_prefix(prefix.clone());
    conformance("redis", Arc::new(store.clone())).await;
    let with_ttl = store.clone().ttl(Some(Duration::from_secs(3600)));
    conformance("redis", Arc::new(with_ttl.clone())).await;

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pttl_conn = conn.clone();
    let pttl = |key: String| {
        let mut conn = pttl_conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(&key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };

    // Keys live under the prefix and, by default, never expire (PTTL -1):
    // a job retried days later still finds its payload.
    store.store("interop-check", "{}").await.unwrap();
    let full_key = format!("{prefix}interop-check");
    let value: Option<String> = redis::cmd("GET")
        .arg(&full_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value.as_deref(), Some("{}"));
    assert_eq!(pttl(full_key.clone()).await, -1, "no expiry by default");

    // Through the registry too: the payload behind a reference is kept.
    let stores = PayloadStores::new()
        .with_threshold(10)
        .with_store("redis", Arc::new(store.clone()));
    let reference = stores
        .store(&json!({"kept": "until deleted"}), None)
        .await
        .unwrap();
    let key = ref_key("redis", &reference).to_owned();
    assert_eq!(pttl(format!("{prefix}{key}")).await, -1);
    stores.delete(&reference).await.unwrap();
    assert_eq!(pttl(format!("{prefix}{key}")).await, -2, "deleted");

    // A configured TTL is applied; storing again without one clears it.
    with_ttl.store("interop-check", "{}").await.unwrap();
    let ttl_ms = pttl(full_key.clone()).await;
    assert!(ttl_ms > 3_500_000 && ttl_ms <= 3_600_000, "{ttl_ms}");
    store.store("interop-check", "{}").await.unwrap();
    assert_eq!(pttl(full_key.clone()).await, -1);
    store.delete("interop-check").await.unwrap();
}

#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store() {
    use patient_store::store::{S3Config, S3Store};

    let Some(endpoint) = service("PATIENT_TEST_S3_ENDPOINT", "S3 (moto)") else {
        return;
    };
    let store = S3Store::new(S3Config {
        endpoint,
        bucket: "patient-test".into(),
        prefix: unique_prefix(),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        path_style: true,
    })
    .unwrap();
    store.create_bucket().await.unwrap();
    // Creating an existing bucket is fine (every run creates it).
    store.create_bucket().await.unwrap();
    conformance("s3", Arc::new(store)).await;
}
