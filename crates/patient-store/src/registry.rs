//! [`PayloadStores`]: payload stores registered by name, and the external
//! storage of large payloads (`$ref`).

use std::{fmt, sync::Arc};

use patient_wire::StorageRef;
use serde_json::Value;

use crate::{PayloadStore, StoreError};

/// Payload stores registered by name, and the threshold above which a
/// payload is moved to one of them.
///
/// [`store`](Self::store) writes a payload whose JSON text is larger than the
/// threshold to the **last registered** store and returns a reference,
/// `{"$ref": {"store": "<name>", "key": "<key>"}}`, in its place;
/// [`fetch`](Self::fetch) and [`delete`](Self::delete) follow a reference to
/// **any** registered store. To move from one store to another, register the
/// new one last and keep the old one registered until its references are gone.
///
/// Configure it once, then share it (it is `Clone`, and cheap to clone: the
/// stores are behind `Arc`s).
///
/// ```
/// # async fn example() -> Result<(), patient_store::StoreError> {
/// use std::sync::Arc;
///
/// use patient_store::{store::FileStore, PayloadStores};
/// use serde_json::json;
///
/// let stores = PayloadStores::new()
///     .with_threshold(1024)
///     .with_store("files", Arc::new(FileStore::new(std::env::temp_dir().join("payloads"))?));
///
/// let big = json!({"body": "x".repeat(2048)});
/// let stored = stores.store(&big, None).await?;
/// assert!(PayloadStores::is_storage_ref(&stored));
/// assert_eq!(stores.fetch(&stored).await?, big);
/// stores.delete(&stored).await?;
///
/// let small = json!({"status": 200});
/// assert_eq!(stores.store(&small, None).await?, small);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PayloadStores {
    /// In registration order; the last one takes new payloads.
    stores: Vec<(String, Arc<dyn PayloadStore>)>,
    threshold: usize,
}

impl PayloadStores {
    /// The default threshold: 64 KiB of JSON text.
    pub const DEFAULT_THRESHOLD: usize = 64 * 1024;

    /// No stores, and the default threshold (64 KiB).
    pub fn new() -> Self {
        Self {
            stores: Vec::new(),
            threshold: Self::DEFAULT_THRESHOLD,
        }
    }

    /// No stores, and the threshold of a processor's configuration
    /// ([`Config::payload_store_threshold`](patient_http::Config::payload_store_threshold)),
    /// so that one setting decides, as the gem's `payload_store_threshold`
    /// does, when the payloads of that processor's outcomes go to a store.
    pub fn from_config(config: &patient_http::Config) -> Self {
        Self::new().with_threshold(config.payload_store_threshold())
    }

    /// Sets the size in bytes of JSON text above which [`store`](Self::store)
    /// moves a payload to a store. Default: 64 KiB
    /// ([`DEFAULT_THRESHOLD`](Self::DEFAULT_THRESHOLD)).
    #[must_use]
    pub fn with_threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// Registers `store` under `name` (see [`register`](Self::register)).
    #[must_use]
    pub fn with_store(mut self, name: impl Into<String>, store: Arc<dyn PayloadStore>) -> Self {
        self.register(name, store);
        self
    }

    /// Registers `store` under `name`; it takes new payloads from now on,
    /// and the stores registered before stay readable. Registering a name
    /// again replaces that store and makes it the one taking new payloads.
    pub fn register(&mut self, name: impl Into<String>, store: Arc<dyn PayloadStore>) -> &mut Self {
        let name = name.into();
        self.stores.retain(|(n, _)| *n != name);
        self.stores.push((name, store));
        self
    }

    /// The threshold in bytes (see [`with_threshold`](Self::with_threshold)).
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The name of the store taking new payloads: the last registered.
    pub fn current(&self) -> Option<&str> {
        self.stores.last().map(|(name, _)| name.as_str())
    }

    /// The store registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn PayloadStore>> {
        self.stores
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, store)| store)
    }

    /// The registered names, in registration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.stores.iter().map(|(name, _)| name.as_str())
    }

    /// Whether `value` is a storage reference:
    /// `{"$ref": {"store": "<name>", "key": "<key>"}}`.
    pub fn is_storage_ref(value: &Value) -> bool {
        patient_wire::is_storage_ref(value)
    }

    /// Moves `value` to the current store when its JSON text is longer than
    /// `max_size` bytes (when given) or the [threshold](Self::with_threshold),
    /// and returns the reference; otherwise returns `value` unchanged.
    ///
    /// Fails with [`StoreError::NoStore`] when the payload must be moved and
    /// no store is registered, or with the store's error.
    pub async fn store(&self, value: &Value, max_size: Option<usize>) -> Result<Value, StoreError> {
        let limit = max_size.unwrap_or(self.threshold);
        let json = value.to_string();
        if json.len() <= limit {
            return Ok(value.clone());
        }
        let (name, store) = self.stores.last().ok_or(StoreError::NoStore)?;
        let key = store.generate_key();
        store.store(&key, &json).await?;
        tracing::debug!(store = %name, key = %key, bytes = json.len(), "payload moved to store");
        Ok(StorageRef::new(name.as_str(), key).to_json())
    }

    /// The payload a reference points to.
    ///
    /// Fails with [`StoreError::NotAReference`] when `value` is not a
    /// reference (as the gem's `fetch` does: a plain payload is not passed
    /// through; check with [`is_storage_ref`](Self::is_storage_ref) first, or
    /// use [`PayloadCodec::decode`](crate::PayloadCodec::decode), which loads
    /// plain payloads as they are) or its `$ref` is malformed,
    /// [`StoreError::UnknownStore`] when the reference names a store that is
    /// not registered, [`StoreError::NotFound`] (naming store and key) when
    /// the store has nothing under the key, and [`StoreError::Corrupt`] when
    /// the stored text is not JSON.
    pub async fn fetch(&self, value: &Value) -> Result<Value, StoreError> {
        let Some(reference) = self.reference(value)? else {
            return Err(StoreError::NotAReference(format!(
                r#"expected {{"$ref": {{"store": …, "key": …}}}}, got {}"#,
                describe(value)
            )));
        };
        let store = self.store_for(&reference)?;
        let json = store
            .fetch(&reference.key)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                store: reference.store.clone(),
                key: reference.key.clone(),
            })?;
        serde_json::from_str(&json).map_err(|e| StoreError::Corrupt {
            store: reference.store,
            key: reference.key,
            message: e.to_string(),
        })
    }

    /// Deletes the payload a reference points to. Idempotent: deleting a
    /// missing payload, or passing a value that is not a reference, does
    /// nothing. A reference to a store that is not registered is ignored too
    /// (with a warning), as the Ruby gem does: there is nothing to delete it
    /// from. Fails with [`StoreError::NotAReference`] when `$ref` is
    /// malformed, or with the store's error.
    pub async fn delete(&self, value: &Value) -> Result<(), StoreError> {
        let Some(reference) = self.reference(value)? else {
            return Ok(());
        };
        match self.store_for(&reference) {
            Ok(store) => store.delete(&reference.key).await,
            Err(_) => {
                tracing::warn!(
                    store = %reference.store,
                    key = %reference.key,
                    "cannot delete payload: store is not registered"
                );
                Ok(())
            }
        }
    }

    /// The reference in `value`: `None` when `value` has no `$ref`, an error
    /// when its `$ref` is malformed.
    fn reference(&self, value: &Value) -> Result<Option<StorageRef>, StoreError> {
        if !Self::has_ref(value) {
            return Ok(None);
        }
        StorageRef::from_json(value)
            .map(Some)
            .map_err(|e| StoreError::NotAReference(e.to_string()))
    }

    /// Whether `value` has a `$ref` key: a reference, well-formed or not.
    pub(crate) fn has_ref(value: &Value) -> bool {
        value.get(patient_wire::REF_KEY).is_some()
    }

    fn store_for(&self, reference: &StorageRef) -> Result<&Arc<dyn PayloadStore>, StoreError> {
        self.get(&reference.store)
            .ok_or_else(|| StoreError::UnknownStore {
                store: reference.store.clone(),
            })
    }
}

/// What kind of JSON value `value` is, for messages (never its content, which
/// may be confidential).
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object without \"$ref\"",
    }
}

impl Default for PayloadStores {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PayloadStores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadStores")
            .field("stores", &self.names().collect::<Vec<_>>())
            .field("threshold", &self.threshold)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::FileStore;

    fn stores(label: &str) -> (PayloadStores, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "patient-registry-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let store = FileStore::new(&dir).unwrap();
        let stores = PayloadStores::new()
            .with_threshold(16)
            .with_store("files", Arc::new(store));
        (stores, dir)
    }

    #[tokio::test]
    async fn the_processor_configuration_sets_the_threshold() {
        let config = patient_http::Config::builder()
            .payload_store_threshold(32)
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!(
            "patient-registry-config-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let stores = PayloadStores::from_config(&config)
            .with_store("files", Arc::new(FileStore::new(&dir).unwrap()));
        assert_eq!(stores.threshold(), 32);
        let small = json!({"status": 200});
        assert_eq!(stores.store(&small, None).await.unwrap(), small);
        let large = json!({"status": 200, "body": "x".repeat(64)});
        let stored = stores.store(&large, None).await.unwrap();
        assert!(PayloadStores::is_storage_ref(&stored), "{stored}");
        assert_eq!(stores.fetch(&stored).await.unwrap(), large);
        assert_eq!(
            PayloadStores::from_config(&patient_http::Config::default()).threshold(),
            PayloadStores::DEFAULT_THRESHOLD
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn fetch_of_a_value_that_is_not_a_reference_is_an_error() {
        let (stores, dir) = stores("not-a-ref");
        for (value, kind) in [
            (json!(null), "null"),
            (json!(true), "a boolean"),
            (json!(42), "a number"),
            (json!("confidential"), "a string"),
            (
                json!([{"$ref": {"store": "files", "key": "k"}}]),
                "an array",
            ),
            (
                json!({"status": 200, "body": "confidential"}),
                "an object without \"$ref\"",
            ),
        ] {
            match stores.fetch(&value).await {
                Err(StoreError::NotAReference(message)) => {
                    assert!(message.contains(kind), "{value}: {message}");
                    assert!(message.contains("$ref"), "{message}");
                    assert!(!message.contains("confidential"), "{message}");
                }
                other => panic!("{value}: {other:?}"),
            }
            // Deleting one stays a no-op, as in the gem.
            stores.delete(&value).await.unwrap();
        }
        // With no store registered too: the value is checked first.
        let error = PayloadStores::new().fetch(&json!({})).await.unwrap_err();
        assert!(matches!(error, StoreError::NotAReference(_)), "{error:?}");
        assert!(
            error.to_string().starts_with("not a storage reference: "),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn fetch_of_what_store_returned_round_trips() {
        let (stores, dir) = stores("round-trip");
        let value = json!({"body": "x".repeat(64)});
        let reference = stores.store(&value, None).await.unwrap();
        assert!(PayloadStores::is_storage_ref(&reference));
        assert_eq!(stores.fetch(&reference).await.unwrap(), value);
        stores.delete(&reference).await.unwrap();

        // A small payload stays inline: it is not something to fetch.
        let small = json!({"a": 1});
        let inline = stores.store(&small, None).await.unwrap();
        assert_eq!(inline, small);
        let error = stores.fetch(&inline).await.unwrap_err();
        assert!(matches!(error, StoreError::NotAReference(_)), "{error:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
