//! References to payloads moved to a payload store.

use serde_json::{Map, Value};

use crate::{
    fields::{serde_via_json, Fields},
    wire_error::WireError,
};

/// The JSON key of a storage reference.
pub const REF_KEY: &str = "$ref";

/// Where a payload moved to a payload store lives; stands in for the payload.
///
/// Serializes as `{"$ref": {"store": "<store name>", "key": "<key>"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorageRef {
    /// The name of the store holding the payload.
    pub store: String,
    /// The payload's key in that store (a UUID unless the store says
    /// otherwise).
    pub key: String,
}

impl StorageRef {
    /// A reference to `key` in `store`.
    pub fn new(store: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            store: store.into(),
            key: key.into(),
        }
    }

    /// `{"$ref": {"store": .., "key": ..}}`.
    pub fn to_json(&self) -> Value {
        let mut inner = Map::new();
        inner.insert("store".into(), self.store.clone().into());
        inner.insert("key".into(), self.key.clone().into());
        let mut map = Map::new();
        map.insert(REF_KEY.into(), Value::Object(inner));
        Value::Object(map)
    }

    /// Loads `{"$ref": {"store": .., "key": ..}}`.
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        let fields = Fields::new(value, "")?;
        let inner_path = fields.path_of(REF_KEY);
        let inner = fields
            .value(REF_KEY)
            .ok_or_else(|| WireError::missing(inner_path.as_str()))?;
        let inner = Fields::new(inner, &inner_path)?;
        Ok(Self::new(inner.string("store")?, inner.string("key")?))
    }
}

/// Whether `value` is a storage reference: an object whose `$ref` is an
/// object with string `store` and `key`.
pub fn is_storage_ref(value: &Value) -> bool {
    value.get(REF_KEY).is_some_and(|inner| {
        inner.get("store").is_some_and(Value::is_string)
            && inner.get("key").is_some_and(Value::is_string)
    })
}

serde_via_json!(StorageRef);
