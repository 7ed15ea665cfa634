//! [`PayloadCodec`]: encryption and external storage in one call, the path a
//! job-queue integration takes.
//!
//! The task handler's side turns an outcome into the JSON to enqueue with
//! [`PayloadCodec::encode_outcome`]; the worker on the other side loads it
//! back with [`PayloadCodec::decode_response`] or
//! [`PayloadCodec::decode_error`]. Those load the decoded JSON within the
//! codec's [`WireLimits`], so a fetched or decrypted payload whose gzipped
//! body would inflate past [`WireLimits::max_body_size`] is refused as soon as
//! it does, without inflating the rest.
//!
//! ```
//! # async fn example() -> Result<(), patient_store::codec::CodecError> {
//! use std::sync::Arc;
//!
//! use patient_store::{store::FileStore, Encryptor, PayloadCodec, PayloadStores};
//! use serde_json::json;
//!
//! let codec = PayloadCodec::new()
//!     .with_stores(Arc::new(
//!         PayloadStores::new()
//!             .with_threshold(1024)
//!             .with_store("files", Arc::new(FileStore::new(std::env::temp_dir().join("codec-example"))?)),
//!     ))
//!     .with_encryptor(Arc::new(Encryptor::aes_gcm(&["a secret of at least 16 bytes"])?));
//!
//! let payload = json!({"body": "x".repeat(4096)});
//! let sent = codec.encode(&payload).await?; // encrypted, then stored: a `$ref`
//! assert!(PayloadStores::is_storage_ref(&sent));
//! assert_eq!(codec.decode(&sent).await?, payload);
//! codec.delete(&sent).await?;
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;

use patient_http::Outcome;
use patient_wire::{Response, TaskError, WireError, WireLimits};
use serde_json::Value;

use crate::{Encryptor, PayloadStores, StoreError};

/// Why a payload could not be encoded or loaded back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Storing, fetching, encrypting or decrypting failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The decoded JSON is not a valid response or error, or breaks the
    /// codec's [`WireLimits`]; the error names the field.
    #[error("the decoded payload is not valid: {0}")]
    Wire(#[from] WireError),
}

impl CodecError {
    /// Whether a store, encryption or decryption failed.
    pub fn is_store(&self) -> bool {
        matches!(self, CodecError::Store(_))
    }

    /// Whether decryption failed (wrong key, tampered or truncated data).
    pub fn is_decrypt(&self) -> bool {
        matches!(self, CodecError::Store(StoreError::Decrypt(_)))
    }

    /// Whether the decoded JSON is not the wire type asked for (or breaks
    /// the codec's [`WireLimits`]).
    pub fn is_wire(&self) -> bool {
        matches!(self, CodecError::Wire(_))
    }

    /// Whether the decoded JSON breaks the codec's [`WireLimits`] (a body
    /// that decodes to too many bytes, say).
    pub fn is_limit(&self) -> bool {
        matches!(self, CodecError::Wire(e) if e.is_limit())
    }
}

/// Encryption and external storage of payloads in one call.
///
/// [`encode`](Self::encode) encrypts (when an [`Encryptor`] is configured),
/// then moves the result to a store when its JSON is larger than the stores'
/// threshold (when [`PayloadStores`] are configured): what is stored is the
/// encrypted envelope, so nothing is kept in clear. [`decode`](Self::decode)
/// undoes both. Either part may be left out; with neither, values pass
/// through unchanged.
///
/// Cheap to clone.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct PayloadCodec {
    stores: Option<Arc<PayloadStores>>,
    encryptor: Option<Arc<Encryptor>>,
    max_size: Option<usize>,
    wire_limits: WireLimits,
}

impl PayloadCodec {
    /// A codec that neither encrypts nor stores (values pass through).
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves large payloads to `stores` (default: none; payloads stay inline).
    pub fn with_stores(mut self, stores: Arc<PayloadStores>) -> Self {
        self.stores = Some(stores);
        self
    }

    /// Encrypts payloads with `encryptor` (default: none; payloads stay in
    /// clear, and decoding refuses encrypted ones).
    pub fn with_encryptor(mut self, encryptor: Arc<Encryptor>) -> Self {
        self.encryptor = Some(encryptor);
        self
    }

    /// Moves a payload to the stores when its JSON is larger than `bytes`
    /// instead of the stores' own threshold (default `None`: the stores'
    /// threshold, 64 KiB unless set there).
    pub fn with_max_size(mut self, bytes: Option<usize>) -> Self {
        self.max_size = bytes;
        self
    }

    /// Loads responses and errors within `limits` (default:
    /// [`WireLimits::default`], so bodies of at most 64 MiB once decoded).
    pub fn with_wire_limits(mut self, limits: WireLimits) -> Self {
        self.wire_limits = limits;
        self
    }

    /// The limits responses and errors are loaded within.
    pub fn wire_limits(&self) -> &WireLimits {
        &self.wire_limits
    }

    /// The stores, when configured.
    pub fn stores(&self) -> Option<&Arc<PayloadStores>> {
        self.stores.as_ref()
    }

    /// The encryptor, when configured.
    pub fn encryptor(&self) -> Option<&Arc<Encryptor>> {
        self.encryptor.as_ref()
    }

    /// `value` encrypted (when an encryptor is configured) and then, when its
    /// JSON exceeds the threshold, stored and replaced by a `$ref` (when
    /// stores are configured). The threshold applies to the encrypted
    /// envelope, about 4/3 of the JSON's size.
    pub async fn encode(&self, value: &Value) -> Result<Value, StoreError> {
        let encrypted;
        let value = match &self.encryptor {
            Some(encryptor) => {
                encrypted = encryptor.encrypt(value)?;
                &encrypted
            }
            None => value,
        };
        match &self.stores {
            Some(stores) => stores.store(value, self.max_size).await,
            None => Ok(value.clone()),
        }
    }

    /// `value` loaded back: fetched when it is a reference (it has a `$ref`
    /// key), then decrypted when it is an encrypted envelope. Anything else
    /// (an outcome small enough to stay inline, or data written before
    /// encryption or storage was switched on) is returned unchanged: unlike
    /// [`PayloadStores::fetch`], which refuses a value that is not a
    /// reference, decoding loads plain payloads as they are.
    ///
    /// Fails with the stores' errors (a reference to an unknown store or a
    /// missing key names both; a reference with no stores configured is
    /// [`StoreError::UnknownStore`]) or [`StoreError::Decrypt`] (also for an
    /// encrypted envelope when no encryptor is configured).
    pub async fn decode(&self, value: &Value) -> Result<Value, StoreError> {
        let fetched;
        let value = match &self.stores {
            Some(stores) if PayloadStores::has_ref(value) => {
                fetched = stores.fetch(value).await?;
                &fetched
            }
            // Never offloaded: the payload itself.
            Some(_) => value,
            None => {
                if let Ok(reference) = patient_wire::StorageRef::from_json(value) {
                    return Err(StoreError::UnknownStore {
                        store: reference.store,
                    });
                }
                value
            }
        };
        match &self.encryptor {
            Some(encryptor) => encryptor.decrypt(value),
            None if Encryptor::is_encrypted(value) => Err(StoreError::Decrypt(
                "the payload is encrypted but no encryptor is configured".to_owned(),
            )),
            None => Ok(value.clone()),
        }
    }

    /// Deletes the stored payload `value` refers to, once it has been
    /// consumed; a value that is not a reference (or no stores configured)
    /// is a no-op.
    pub async fn delete(&self, value: &Value) -> Result<(), StoreError> {
        match &self.stores {
            Some(stores) => stores.delete(value).await,
            None => Ok(()),
        }
    }

    /// The outcome's wire JSON ([`Outcome::to_json`]: the Response or error
    /// JSON; a retry gives the request's JSON), [encoded](Self::encode).
    pub async fn encode_outcome(&self, outcome: &Outcome) -> Result<Value, StoreError> {
        self.encode(&outcome.to_json()).await
    }

    /// A [`Response`] from what [`encode_outcome`](Self::encode_outcome)
    /// made of a completed outcome, loaded within the codec's
    /// [`WireLimits`].
    pub async fn decode_response(&self, value: &Value) -> Result<Response, CodecError> {
        let json = self.decode(value).await?;
        Ok(Response::from_json_with_limits(&json, &self.wire_limits)?)
    }

    /// A [`TaskError`] from what [`encode_outcome`](Self::encode_outcome)
    /// made of a failed outcome, loaded within the codec's [`WireLimits`].
    pub async fn decode_error(&self, value: &Value) -> Result<TaskError, CodecError> {
        let json = self.decode(value).await?;
        Ok(TaskError::load_with_limits(&json, &self.wire_limits)?)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Mutex, PoisonError},
    };

    use async_trait::async_trait;
    use serde_json::json;

    use super::*;
    use crate::PayloadStore;

    /// Payloads in a map, for tests.
    #[derive(Default)]
    struct MemoryStore {
        map: Mutex<HashMap<String, String>>,
    }

    impl MemoryStore {
        fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
            self.map.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    #[async_trait]
    impl PayloadStore for MemoryStore {
        async fn store(&self, key: &str, json: &str) -> Result<(), StoreError> {
            self.map().insert(key.to_owned(), json.to_owned());
            Ok(())
        }

        async fn fetch(&self, key: &str) -> Result<Option<String>, StoreError> {
            Ok(self.map().get(key).cloned())
        }

        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.map().remove(key);
            Ok(())
        }
    }

    const SECRET: &str = "a secret of at least sixteen bytes";

    fn setup(threshold: usize) -> (PayloadCodec, Arc<MemoryStore>) {
        let memory = Arc::new(MemoryStore::default());
        let stores = PayloadStores::new()
            .with_threshold(threshold)
            .with_store("memory", memory.clone());
        let codec = PayloadCodec::new()
            .with_stores(Arc::new(stores))
            .with_encryptor(Arc::new(Encryptor::aes_gcm(&[SECRET]).unwrap()));
        (codec, memory)
    }

    fn response_json(body: &str) -> Value {
        json!({
            "status": 200,
            "headers": {"content-type": "text/plain"},
            "body": {"encoding": "text", "value": body, "charset": "UTF-8"},
            "duration": 0.25,
            "request_id": "req-1",
            "url": "https://api.example.com/users",
            "http_method": "get",
            "callback_args": {"user_id": 7},
            "redirects": []
        })
    }

    fn error_json() -> Value {
        json!({
            "class_name": "Errno::ECONNREFUSED",
            "message": "connection refused",
            "backtrace": [],
            "request_id": "req-2",
            "error_type": "connection",
            "duration": 0.01,
            "url": "https://api.example.com/users",
            "http_method": "post",
            "callback_args": {}
        })
    }

    #[tokio::test]
    async fn small_payloads_are_encrypted_inline() {
        let (codec, memory) = setup(64 * 1024);
        let value = response_json("small and secret");
        let encoded = codec.encode(&value).await.unwrap();
        assert!(Encryptor::is_encrypted(&encoded));
        assert!(!encoded.to_string().contains("small and secret"));
        assert!(memory.map().is_empty());
        assert_eq!(codec.decode(&encoded).await.unwrap(), value);
    }

    #[tokio::test]
    async fn large_payloads_are_encrypted_then_stored() {
        let (codec, memory) = setup(1024);
        let value = response_json(&"confidential ".repeat(1000));
        let encoded = codec.encode(&value).await.unwrap();
        assert!(PayloadStores::is_storage_ref(&encoded));
        assert_eq!(encoded["$ref"]["store"], "memory");

        // What is stored is the encrypted envelope: nothing in clear.
        let stored = memory.map().values().next().cloned().unwrap();
        assert!(!stored.contains("confidential"));
        let stored: Value = serde_json::from_str(&stored).unwrap();
        assert!(Encryptor::is_encrypted(&stored));

        assert_eq!(codec.decode(&encoded).await.unwrap(), value);
        codec.delete(&encoded).await.unwrap();
        assert!(memory.map().is_empty());
        match codec.decode(&encoded).await {
            Err(StoreError::NotFound { store, .. }) => assert_eq!(store, "memory"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn explicit_max_size_overrides_the_threshold() {
        let (codec, memory) = setup(1 << 20);
        let codec = codec.with_max_size(Some(10));
        let encoded = codec.encode(&json!({"a": 1})).await.unwrap();
        assert!(PayloadStores::is_storage_ref(&encoded));
        assert_eq!(memory.map().len(), 1);
    }

    #[tokio::test]
    async fn data_from_before_encryption_and_storage_still_loads() {
        let (codec, memory) = setup(16);
        let plain = response_json("written in clear");
        assert_eq!(codec.decode(&plain).await.unwrap(), plain);
        // Decoding loads a plain payload as it is; fetching it explicitly
        // from the stores is an error, as in the gem.
        let stores = codec.stores().unwrap();
        match stores.fetch(&plain).await {
            Err(StoreError::NotAReference(message)) => {
                assert!(message.contains("an object without"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(memory.map().is_empty());

        // A reference to a payload stored in clear, before encryption.
        memory.map().insert("old".into(), plain.to_string());
        let reference = json!({"$ref": {"store": "memory", "key": "old"}});
        assert_eq!(codec.decode(&reference).await.unwrap(), plain);

        // A malformed reference is not a plain payload: decoding refuses it.
        match codec.decode(&json!({"$ref": {"store": "memory"}})).await {
            Err(StoreError::NotAReference(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn inline_outcomes_decode_without_fetching() {
        // Small outcomes stay inline (encrypted or not) and decode as they
        // are; only offloaded ones are fetched.
        let memory = Arc::new(MemoryStore::default());
        let store_only = PayloadCodec::new().with_stores(Arc::new(
            PayloadStores::new()
                .with_threshold(1 << 20)
                .with_store("memory", memory.clone()),
        ));
        let response = Response::from_json(&response_json("inline")).unwrap();
        let outcome = Outcome::Completed {
            response: response.clone(),
            callback: "Callback".into(),
        };
        let encoded = store_only.encode_outcome(&outcome).await.unwrap();
        assert!(!PayloadStores::is_storage_ref(&encoded));
        assert!(memory.map().is_empty());
        assert_eq!(
            store_only.decode_response(&encoded).await.unwrap(),
            response
        );
        store_only.delete(&encoded).await.unwrap();

        let (full, memory) = setup(1 << 20);
        let encoded = full.encode_outcome(&outcome).await.unwrap();
        assert!(Encryptor::is_encrypted(&encoded));
        assert!(memory.map().is_empty());
        assert_eq!(full.decode_response(&encoded).await.unwrap(), response);
    }

    #[tokio::test]
    async fn outcomes_round_trip() {
        let (codec, _memory) = setup(512);
        for body in ["short", &"long body ".repeat(200)] {
            let response = Response::from_json(&response_json(body)).unwrap();
            let outcome = Outcome::Completed {
                response: response.clone(),
                callback: "Callback".into(),
            };
            let encoded = codec.encode_outcome(&outcome).await.unwrap();
            assert_eq!(codec.decode_response(&encoded).await.unwrap(), response);
            let wrong = codec.decode_error(&encoded).await;
            assert!(wrong.as_ref().is_err_and(CodecError::is_wire), "{wrong:?}");
        }

        let error = TaskError::load(&error_json()).unwrap();
        let outcome = Outcome::Failed {
            error: error.clone(),
            callback: "Callback".into(),
        };
        let encoded = codec.encode_outcome(&outcome).await.unwrap();
        let decoded = codec.decode_error(&encoded).await.unwrap();
        assert_eq!(decoded.to_json(), error.to_json());
    }

    /// A response whose gzipped body inflates to 256 MiB of `0`s: sixteen
    /// gzip members of 16 MiB each (a multi-member stream inflates to their
    /// concatenation), about 256 KiB of gzip.
    fn gzip_bomb_response() -> Value {
        use base64::{engine::general_purpose::STANDARD, Engine as _};

        let member = patient_wire::Payload::text(&"0".repeat(16 << 20));
        assert_eq!(member.encoding, patient_wire::PayloadEncoding::Gzipped);
        let gz = STANDARD.decode(&member.value).unwrap().repeat(16);
        assert!(gz.len() < 1 << 20, "{} bytes of gzip", gz.len());
        let mut response = response_json("");
        response["body"] = json!({
            "encoding": "gzipped",
            "value": STANDARD.encode(gz),
            "charset": "UTF-8"
        });
        response
    }

    #[tokio::test]
    async fn fetched_and_decrypted_gzip_bombs_are_refused() {
        let (codec, memory) = setup(1024);
        let bomb = gzip_bomb_response();
        let encoded = codec.encode(&bomb).await.unwrap();
        assert!(PayloadStores::is_storage_ref(&encoded));
        assert_eq!(memory.map().len(), 1);

        for (codec, max) in [
            (codec.clone(), 64 << 20),
            (
                codec.with_wire_limits(WireLimits::default().with_max_body_size(1 << 20)),
                1 << 20,
            ),
        ] {
            let error = codec.decode_response(&encoded).await.unwrap_err();
            assert!(error.is_limit(), "{error}");
            let CodecError::Wire(wire) = &error else {
                panic!("{error:?}")
            };
            assert_eq!(wire.path(), "body.value");
            let limit = wire.limit().unwrap();
            assert_eq!(limit.limit(), "max_body_size");
            assert_eq!(limit.max(), patient_wire::Bound::Bytes(max));
            assert!(error.to_string().contains(&max.to_string()), "{error}");

            let error = codec
                .decode_error(&codec.encode(&json!({"response": bomb})).await.unwrap())
                .await
                .unwrap_err();
            assert!(error.is_limit(), "{error}");
        }
    }

    #[tokio::test]
    async fn wrong_key_is_a_decrypt_error() {
        let (codec, memory) = setup(1024);
        let encoded = codec
            .encode(&response_json(&"x".repeat(4000)))
            .await
            .unwrap();
        let stores = PayloadStores::new().with_store("memory", memory.clone());
        let other = PayloadCodec::new()
            .with_stores(Arc::new(stores))
            .with_encryptor(Arc::new(
                Encryptor::aes_gcm(&["another secret, sixteen+ bytes"]).unwrap(),
            ));
        let error = other.decode_response(&encoded).await.unwrap_err();
        assert!(error.is_decrypt(), "{error}");
        assert!(error.is_store());
    }

    #[tokio::test]
    async fn partial_configurations() {
        let value = response_json("v");
        let plain = PayloadCodec::new();
        assert_eq!(plain.encode(&value).await.unwrap(), value);
        assert_eq!(plain.decode(&value).await.unwrap(), value);
        plain.delete(&value).await.unwrap();

        let (full, _memory) = setup(1 << 20);
        let encrypted = full.encode(&value).await.unwrap();
        match plain.decode(&encrypted).await {
            Err(StoreError::Decrypt(message)) => assert!(message.contains("no encryptor")),
            other => panic!("{other:?}"),
        }
        let reference = json!({"$ref": {"store": "s3", "key": "k"}});
        match plain.decode(&reference).await {
            Err(StoreError::UnknownStore { store }) => assert_eq!(store, "s3"),
            other => panic!("{other:?}"),
        }

        let memory = Arc::new(MemoryStore::default());
        let store_only = PayloadCodec::new().with_stores(Arc::new(
            PayloadStores::new()
                .with_threshold(8)
                .with_store("memory", memory.clone()),
        ));
        let stored = store_only.encode(&value).await.unwrap();
        assert!(PayloadStores::is_storage_ref(&stored));
        assert!(memory.map().values().any(|s| s.contains("\"v\"")));
        assert_eq!(store_only.decode(&stored).await.unwrap(), value);
    }
}
