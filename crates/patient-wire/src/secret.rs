//! References to named secrets.

use serde_json::{Map, Value};

use crate::{
    fields::{serde_via_json, Fields},
    wire_error::WireError,
};

/// The JSON key of a secret reference.
pub const SECRET_KEY: &str = "$secret";

/// A reference to a secret by name, standing where a header value or a query
/// parameter value would be.
///
/// Serializes as `{"$secret": "<name>"}`. Only the name ever travels; the
/// processor resolves the value from its own registry when the request is
/// sent, so a secret value never appears in any serialized form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretRef {
    /// The name the secret is registered under.
    pub name: String,
}

impl SecretRef {
    /// A reference to the secret registered under `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }

    /// `{"$secret": "<name>"}`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert(SECRET_KEY.to_owned(), Value::String(self.name.clone()));
        Value::Object(map)
    }

    /// Loads `{"$secret": "<name>"}`.
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        Self::load(value, "")
    }

    pub(crate) fn load(value: &Value, path: &str) -> Result<Self, WireError> {
        let fields = Fields::new(value, path)?;
        Ok(Self::new(fields.string(SECRET_KEY)?))
    }
}

/// Whether `value` is a secret reference: an object with a string `$secret`.
pub fn is_secret_ref(value: &Value) -> bool {
    value.get(SECRET_KEY).is_some_and(Value::is_string)
}

serde_via_json!(SecretRef);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn round_trips() {
        let secret = SecretRef::new("api_key");
        assert_eq!(secret.to_json(), json!({"$secret": "api_key"}));
        assert_eq!(SecretRef::from_json(&secret.to_json()).unwrap(), secret);
        assert!(is_secret_ref(&secret.to_json()));
        assert!(!is_secret_ref(&json!("api_key")));
    }

    #[test]
    fn names_the_bad_field() {
        let err = SecretRef::from_json(&json!({"$secret": 1})).unwrap_err();
        assert_eq!(err.path(), "$secret");
    }
}
