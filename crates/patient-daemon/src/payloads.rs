//! Payload stores and encryption (`[payload_store]`, `[encryption]`) applied
//! to what the daemon keeps and delivers, through one [`PayloadCodec`]
//! built at start and shared:
//!
//! * **Stored requests**: the request JSON is encoded at submit (encrypted
//!   when configured, then replaced by a `$ref` when larger than the
//!   threshold) and decoded when a worker runs the task or the API shows it.
//! * **Outcomes**: the `response` / `error` of the stored outcome event are
//!   encoded the same way at finish and decoded for the API and delivery.
//! * **Deliveries**: each delivery encodes the outcome's `response` /
//!   `error` afresh, as the PatientHttp gem's Sidekiq integration writes
//!   them: the encrypted envelope, and for Redis and Sidekiq a new `$ref`
//!   when large (the receiver's copy: the gem's `CallbackWorker` deletes it
//!   once consumed, so the daemon's own copy stays readable). A webhook
//!   carries its payload inline (encrypted when configured): a receiver over
//!   HTTP has no store to fetch it from.
//! * **Purge**: the stored payloads of a purged task are deleted.
//!
//! The database keeps opaque JSON; nothing here touches it.

use std::borrow::Cow;
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use patient_store::{
    activesupport::{KeyDigest, Options, Serializer},
    encryption::MIN_SECRET_LEN,
    store::{FileStore, RedisStore, S3Config, S3Store, SqlStore},
    Encryptor, PayloadCodec, PayloadStore, PayloadStores, StoreError,
};
use serde_json::Value;

use crate::{error::ServeError, settings::Settings};

/// The fields of an outcome event that hold wire payloads.
const OUTCOME_FIELDS: [&str; 2] = ["response", "error"];

/// The codec of the daemon's payloads. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Payloads {
    /// Stores and encryptor, as configured.
    codec: PayloadCodec,
    /// The encryptor alone: webhook payloads, and outcomes when the store
    /// fails.
    inline: PayloadCodec,
}

/// How a delivered payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Encrypted when configured, never moved to a store (webhooks).
    Inline,
    /// Encrypted when configured, and a fresh `$ref` when large (Redis
    /// lists and streams, Sidekiq jobs).
    Stored,
}

fn settings_error(setting: &str, message: impl std::fmt::Display) -> ServeError {
    ServeError::Settings(format!("setting `{setting}`: {message}"))
}

impl Payloads {
    /// Payloads pass through unchanged: no store, no encryption.
    pub fn none() -> Payloads {
        Payloads::default()
    }

    /// A codec over `stores` and `encryptor` (either optional).
    pub fn new(stores: Option<Arc<PayloadStores>>, encryptor: Option<Arc<Encryptor>>) -> Payloads {
        let mut codec = PayloadCodec::new();
        let mut inline = PayloadCodec::new();
        if let Some(stores) = stores {
            codec = codec.with_stores(stores);
        }
        if let Some(encryptor) = encryptor {
            codec = codec.with_encryptor(Arc::clone(&encryptor));
            inline = inline.with_encryptor(encryptor);
        }
        Payloads { codec, inline }
    }

    /// The codec of the settings' `[payload_store]` and `[encryption]`,
    /// with secret values from `secrets` (read at start, by name) and the
    /// store's threshold from the engine's `config`
    /// ([`PayloadStores::from_config`]). Connects to a Redis or SQL store
    /// (and creates the SQL store's table) before the daemon serves.
    ///
    /// # Errors
    ///
    /// [`ServeError::Settings`] naming the setting whose value cannot work,
    /// or [`ServeError::Store`] when the store cannot be reached.
    pub async fn from_settings(
        settings: &Settings,
        secrets: &BTreeMap<String, String>,
        config: &patient_http::Config,
    ) -> Result<Payloads, ServeError> {
        let stores = store(settings, secrets).await?.map(|(name, store)| {
            Arc::new(PayloadStores::from_config(config).with_store(name, store))
        });
        let encryptor = encryptor(settings, secrets)?.map(Arc::new);
        Ok(Payloads::new(stores, encryptor))
    }

    /// Whether payloads are encrypted.
    pub fn encrypts(&self) -> bool {
        self.codec.encryptor().is_some()
    }

    /// The codec (stores and encryptor as configured).
    pub fn codec(&self) -> &PayloadCodec {
        &self.codec
    }

    /// `value` as it is stored: encrypted when configured, a `$ref` when
    /// larger than the threshold.
    pub async fn encode(&self, value: &Value) -> Result<Value, StoreError> {
        self.codec.encode(value).await
    }

    /// A stored `value` loaded back (plain values, written before stores or
    /// encryption were configured, load as they are); borrowed as it is when
    /// neither is configured and it holds no reference or envelope.
    pub async fn decode<'a>(&self, value: &'a Value) -> Result<Cow<'a, Value>, StoreError> {
        if self.passes_through(value) {
            return Ok(Cow::Borrowed(value));
        }
        self.codec.decode(value).await.map(Cow::Owned)
    }

    /// Whether `value` needs no work: no store and no encryption are
    /// configured, and it is neither a reference nor an encrypted envelope
    /// (both of which need one to load).
    fn passes_through(&self, value: &Value) -> bool {
        self.codec.stores().is_none()
            && self.codec.encryptor().is_none()
            && !PayloadStores::is_storage_ref(value)
            && value.get("__encrypted__").is_none()
    }

    /// The outcome event as it is stored: its `response` or `error`
    /// encoded. When the store fails, the payload is kept inline (still
    /// encrypted when configured) rather than lose the outcome.
    pub async fn encode_outcome(&self, event: Value) -> Result<Value, StoreError> {
        if self.codec.stores().is_none() && self.codec.encryptor().is_none() {
            return Ok(event);
        }
        let mut stored = event.clone();
        for field in OUTCOME_FIELDS {
            let Some(payload) = event.get(field).filter(|v| !v.is_null()) else {
                continue;
            };
            let encoded = match self.codec.encode(payload).await {
                Ok(encoded) => encoded,
                Err(error) => {
                    tracing::warn!(%error, "cannot move an outcome to the payload store; it is kept in the database");
                    self.inline.encode(payload).await?
                }
            };
            stored[field] = encoded;
        }
        Ok(stored)
    }

    /// The stored outcome event loaded back: its `response` or `error`
    /// fetched and decrypted.
    pub async fn decode_outcome(&self, stored: &Value) -> Result<Value, StoreError> {
        let mut event = stored.clone();
        for field in OUTCOME_FIELDS {
            if let Some(payload) = stored.get(field).filter(|v| !v.is_null()) {
                event[field] = self.codec.decode(payload).await?;
            }
        }
        Ok(event)
    }

    /// The stored outcome event as a delivery carries it: its `response` or
    /// `error` decoded, then encoded afresh `how` the channel takes it.
    pub async fn outcome_for_delivery<'a>(
        &self,
        stored: &'a Value,
        how: Delivered,
    ) -> Result<Cow<'a, Value>, StoreError> {
        let plain = OUTCOME_FIELDS
            .iter()
            .all(|field| stored.get(*field).is_none_or(|v| self.passes_through(v)));
        if plain {
            return Ok(Cow::Borrowed(stored));
        }
        let event = self.decode_outcome(stored).await?;
        let codec = match how {
            Delivered::Inline => &self.inline,
            Delivered::Stored => &self.codec,
        };
        let mut delivered = event.clone();
        for field in OUTCOME_FIELDS {
            if let Some(payload) = event.get(field).filter(|v| !v.is_null()) {
                delivered[field] = codec.encode(payload).await?;
            }
        }
        Ok(Cow::Owned(delivered))
    }

    /// The references among the `response` and `error` of an encoded
    /// outcome event (an object with only those; empty when both are
    /// inline), to [delete](Self::delete_outcome) them later without
    /// keeping the whole event.
    pub fn references(event: &Value) -> Value {
        let mut refs = serde_json::Map::new();
        for field in OUTCOME_FIELDS {
            if let Some(payload) = event
                .get(field)
                .filter(|v| PayloadStores::is_storage_ref(v))
            {
                refs.insert(field.to_owned(), payload.clone());
            }
        }
        Value::Object(refs)
    }

    /// Deletes what the `response` or `error` of an outcome event refers
    /// to in the store (nothing when it is inline); a failure is logged.
    pub async fn delete_outcome(&self, event: &Value) {
        for field in OUTCOME_FIELDS {
            if let Some(payload) = event.get(field) {
                self.delete(payload).await;
            }
        }
    }

    /// Deletes what `value` refers to in the store (nothing when it is not
    /// a reference); a failure is logged.
    pub async fn delete(&self, value: &Value) {
        if let Err(error) = self.codec.delete(value).await {
            tracing::warn!(%error, "cannot delete a stored payload");
        }
    }
}

/// The store of `[payload_store]`, with its name, when a kind is set.
async fn store(
    settings: &Settings,
    secrets: &BTreeMap<String, String>,
) -> Result<Option<(String, Arc<dyn PayloadStore>)>, ServeError> {
    let s = &settings.payload_store;
    let (Some(kind), Some(name)) = (s.kind.as_deref(), s.store_name()) else {
        return Ok(None);
    };
    let opened = |e: StoreError| ServeError::Store(format!("payload store {name:?}: {e}"));
    let store: Arc<dyn PayloadStore> = match kind {
        "file" => {
            let dir = s
                .dir
                .clone()
                .unwrap_or_else(|| settings.data_dir.join("payloads"));
            Arc::new(FileStore::new(dir).map_err(opened)?)
        }
        "redis" => {
            let url = s
                .url
                .as_deref()
                .or(settings.redis_url.as_deref())
                .ok_or_else(|| settings_error("payload_store.url", "is required"))?;
            let mut store = RedisStore::connect(url).await.map_err(|e| match e {
                StoreError::Config(message) => settings_error("payload_store.url", message),
                other => opened(other),
            })?;
            if let Some(prefix) = &s.prefix {
                store = store.key_prefix(prefix.clone());
            }
            Arc::new(store.ttl(s.ttl.map(Duration::from_secs_f64)))
        }
        "s3" => {
            let secret = |setting: &str, name: &Option<String>| {
                name.as_ref()
                    .and_then(|n| secrets.get(n))
                    .cloned()
                    .ok_or_else(|| settings_error(setting, "names no secret in [secrets]"))
            };
            let mut config = S3Config {
                endpoint: s.endpoint.clone().unwrap_or_default(),
                bucket: s.bucket.clone().unwrap_or_default(),
                access_key_id: secret("payload_store.access_key_id", &s.access_key_id)?,
                secret_access_key: secret("payload_store.secret_access_key", &s.secret_access_key)?,
                path_style: s.path_style.unwrap_or(s.endpoint.is_some()),
                ..S3Config::default()
            };
            if let Some(prefix) = &s.prefix {
                config.prefix.clone_from(prefix);
            }
            if let Some(region) = &s.region {
                config.region.clone_from(region);
            }
            Arc::new(S3Store::new(config).map_err(|e| match e {
                // The message names the S3 field (`S3 bucket: …`).
                StoreError::Config(message) => settings_error("payload_store", message),
                other => opened(other),
            })?)
        }
        _ => {
            let url = s
                .url
                .as_deref()
                .ok_or_else(|| settings_error("payload_store.url", "is required"))?;
            let table = s.table.as_deref().unwrap_or(SqlStore::DEFAULT_TABLE);
            let store = SqlStore::connect(url, table).await.map_err(|e| match e {
                StoreError::Config(message) => settings_error("payload_store", message),
                other => opened(other),
            })?;
            store.migrate().await.map_err(opened)?;
            Arc::new(store)
        }
    };
    Ok(Some((name.to_owned(), store)))
}

/// The encryptor of `[encryption]`, when secrets are named.
fn encryptor(
    settings: &Settings,
    secrets: &BTreeMap<String, String>,
) -> Result<Option<Encryptor>, ServeError> {
    let e = &settings.encryption;
    if e.secrets.is_empty() {
        return Ok(None);
    }
    let mut values = Vec::with_capacity(e.secrets.len());
    for name in &e.secrets {
        let value = secrets.get(name).ok_or_else(|| {
            settings_error(
                "encryption.secrets",
                format!("{name:?} is not a secret in [secrets]"),
            )
        })?;
        let short = if e.format == "aes-gcm" {
            value.len() < MIN_SECRET_LEN
        } else {
            value.is_empty()
        };
        if short {
            let need = if e.format == "aes-gcm" {
                format!("at least {MIN_SECRET_LEN} bytes for aes-gcm")
            } else {
                "a non-empty value".to_owned()
            };
            return Err(settings_error(
                "encryption.secrets",
                format!(
                    "the value of secret {name:?} is {} bytes long; it needs {need}",
                    value.len()
                ),
            ));
        }
        values.push(value.as_str());
    }
    let encryptor = if e.format == "active_support" {
        let serializer = match e.serializer.as_deref() {
            Some("json") => Serializer::Json,
            _ => Serializer::Marshal,
        };
        let key_digest = match e.key_digest.as_deref() {
            Some(name) => name
                .parse()
                .map_err(|unknown| settings_error("encryption.key_digest", unknown))?,
            None => KeyDigest::default(),
        };
        Encryptor::active_support_with(
            &values,
            Options::new()
                .with_serializer(serializer)
                .with_key_digest(key_digest),
        )
    } else {
        Encryptor::aes_gcm(&values)
    };
    encryptor
        .map(Some)
        .map_err(|error| settings_error("encryption.secrets", error))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::settings::Flags;

    const SECRET: &str = "a payload secret of 32 bytes or more";

    fn temp_dir(label: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "patient-payloads-{label}-{}",
            uuid::Uuid::new_v4().simple()
        ))
    }

    #[tokio::test]
    async fn the_settings_build_one_codec_whose_debug_output_has_no_secret() {
        let dir = temp_dir("settings");
        let settings = Settings::load(
            None,
            [
                ("PATIENT_PAYLOAD_STORE__KIND", "file"),
                ("PATIENT_PAYLOAD_STORE__THRESHOLD", "100"),
                ("PATIENT_SECRETS__KEY__ENV", "UNUSED_HERE"),
                ("PATIENT_ENCRYPTION__SECRETS", "key"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
            &Flags {
                listen: None,
                data_dir: Some(dir.clone()),
            },
        )
        .unwrap();
        let secrets = BTreeMap::from([("key".to_owned(), SECRET.to_owned())]);
        let config = patient_http::Config::builder()
            .payload_store_threshold(100)
            .build()
            .unwrap();
        let payloads = Payloads::from_settings(&settings, &secrets, &config)
            .await
            .unwrap();
        assert!(payloads.encrypts());
        let stores = payloads.codec().stores().unwrap();
        assert_eq!(stores.threshold(), 100);
        assert_eq!(stores.names().collect::<Vec<_>>(), ["file"]);
        let debug = format!("{payloads:?}");
        assert!(!debug.contains(SECRET), "{debug}");

        let event = json!({"task_id": "tsk_1", "type": "task.completed", "callback": "",
            "callback_args": {}, "response": {"status": 200, "body": "x".repeat(500)}, "error": null});
        let stored = payloads.encode_outcome(event.clone()).await.unwrap();
        assert!(
            PayloadStores::is_storage_ref(&stored["response"]),
            "{stored}"
        );
        assert_eq!(stored["error"], Value::Null);
        assert_eq!(payloads.decode_outcome(&stored).await.unwrap(), event);
        let file = dir.join("payloads").join(format!(
            "{}.json",
            stored["response"]["$ref"]["key"].as_str().unwrap()
        ));
        let held = std::fs::read_to_string(&file).unwrap();
        assert!(
            !held.contains("xxxx"),
            "the store holds the envelope: {held}"
        );
        payloads
            .delete_outcome(&Payloads::references(&stored))
            .await;
        assert!(!file.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_outcome_stays_inline_and_encrypted_when_the_store_fails() {
        let dir = temp_dir("broken");
        let store = FileStore::new(&dir).unwrap();
        // The directory becomes a file: every write fails.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"not a directory").unwrap();
        let payloads = Payloads::new(
            Some(Arc::new(
                PayloadStores::new()
                    .with_threshold(10)
                    .with_store("file", Arc::new(store)),
            )),
            Some(Arc::new(Encryptor::aes_gcm(&[SECRET]).unwrap())),
        );
        let event = json!({"task_id": "tsk_2", "type": "task.failed", "callback": "",
            "callback_args": {}, "response": null, "error": {"class_name": "X", "message": "kept"}});
        // A request is refused (the API answers 503) ...
        assert!(payloads.encode(&event["error"]).await.is_err());
        // ... an outcome is kept in the row, encrypted.
        let stored = payloads.encode_outcome(event.clone()).await.unwrap();
        assert!(Encryptor::is_encrypted(&stored["error"]), "{stored}");
        assert_eq!(payloads.decode_outcome(&stored).await.unwrap(), event);
        let _ = std::fs::remove_file(dir);
    }
}
