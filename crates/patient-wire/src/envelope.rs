//! The envelope of encrypted data.

use base64::{engine::general_purpose, Engine as _};
use serde_json::{Map, Value};

use crate::{
    fields::{serde_via_json, Fields},
    wire_error::{WireError, WireErrorKind},
};

/// The JSON key that marks encrypted data.
pub const ENCRYPTED_KEY: &str = "__encrypted__";

/// Encrypted data: the Base64 of the ciphertext of a JSON text.
///
/// Serializes as `{"__encrypted__": true, "value": "<Base64>"}`. Data without
/// the marker is not encrypted (see [`is_encrypted`]) and loads unchanged, so
/// data written before encryption was switched on still loads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EncryptedEnvelope {
    /// The ciphertext in standard Base64.
    pub value: String,
}

impl EncryptedEnvelope {
    /// An envelope for ciphertext bytes (stored as standard Base64).
    pub fn from_ciphertext(ciphertext: &[u8]) -> Self {
        Self {
            value: general_purpose::STANDARD.encode(ciphertext),
        }
    }

    /// The ciphertext bytes.
    pub fn ciphertext(&self) -> Result<Vec<u8>, WireError> {
        general_purpose::STANDARD
            .decode(self.value.as_bytes())
            .map_err(|e| WireError::new("value", WireErrorKind::Base64(e)))
    }

    /// `{"__encrypted__": true, "value": ..}`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert(ENCRYPTED_KEY.into(), Value::Bool(true));
        map.insert("value".into(), self.value.clone().into());
        Value::Object(map)
    }

    /// Loads an envelope; `__encrypted__` must be `true`.
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        let fields = Fields::new(value, "")?;
        match fields.value(ENCRYPTED_KEY) {
            Some(Value::Bool(true)) => {}
            Some(other) => {
                return Err(WireError::wrong_type(ENCRYPTED_KEY, "true", other));
            }
            None => return Err(WireError::missing(ENCRYPTED_KEY)),
        }
        Ok(Self {
            value: fields.string("value")?.to_owned(),
        })
    }
}

/// Whether `value` is an encrypted envelope: an object whose `__encrypted__`
/// is `true`.
pub fn is_encrypted(value: &Value) -> bool {
    value.get(ENCRYPTED_KEY) == Some(&Value::Bool(true))
}

serde_via_json!(EncryptedEnvelope);
