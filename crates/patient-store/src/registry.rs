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

    /// The payload a reference points to; a value that is not a reference is
    /// returned unchanged.
    ///
    /// Fails with [`StoreError::UnknownStore`] when the reference names a
    /// store that is not registered, [`StoreError::NotFound`] (naming store
    /// and key) when the store has nothing under the key,
    /// [`StoreError::Corrupt`] when the stored text is not JSON, and
    /// [`StoreError::NotAReference`] when `$ref` is malformed.
    pub async fn fetch(&self, value: &Value) -> Result<Value, StoreError> {
        let Some(reference) = self.reference(value)? else {
            return Ok(value.clone());
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
        if value.get(patient_wire::REF_KEY).is_none() {
            return Ok(None);
        }
        StorageRef::from_json(value)
            .map(Some)
            .map_err(|e| StoreError::NotAReference(e.to_string()))
    }

    fn store_for(&self, reference: &StorageRef) -> Result<&Arc<dyn PayloadStore>, StoreError> {
        self.get(&reference.store)
            .ok_or_else(|| StoreError::UnknownStore {
                store: reference.store.clone(),
            })
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
