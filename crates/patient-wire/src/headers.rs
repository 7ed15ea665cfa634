//! Case-insensitive HTTP headers with lower-cased names.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::{
    fields::{join, serde_via_json},
    secret::{is_secret_ref, SecretRef},
    wire_error::WireError,
};

/// The value of a header: a plain string, or a reference to a secret that is
/// resolved when the request is sent.
///
/// Serializes as a JSON string or as `{"$secret": "<name>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderValue {
    /// A plain value.
    Value(String),
    /// A named secret, resolved at send time.
    Secret(SecretRef),
}

impl HeaderValue {
    /// The plain value, `None` for a secret.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Value(s) => Some(s),
            HeaderValue::Secret(_) => None,
        }
    }

    /// The secret reference, `None` for a plain value.
    pub fn secret(&self) -> Option<&SecretRef> {
        match self {
            HeaderValue::Value(_) => None,
            HeaderValue::Secret(s) => Some(s),
        }
    }

    /// Whether this is a secret reference.
    pub fn is_secret(&self) -> bool {
        matches!(self, HeaderValue::Secret(_))
    }

    /// The JSON form: a string or `{"$secret": name}`.
    pub fn to_json(&self) -> Value {
        match self {
            HeaderValue::Value(s) => Value::String(s.clone()),
            HeaderValue::Secret(s) => s.to_json(),
        }
    }

    /// Loads a string or a `{"$secret": name}` object.
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        Self::load(value, "")
    }

    pub(crate) fn load(value: &Value, path: &str) -> Result<Self, WireError> {
        match value {
            Value::String(s) => Ok(HeaderValue::Value(s.clone())),
            v if is_secret_ref(v) => Ok(HeaderValue::Secret(SecretRef::load(v, path)?)),
            other => Err(WireError::wrong_type(
                path,
                "a string or a secret reference",
                other,
            )),
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(value: &str) -> Self {
        HeaderValue::Value(value.to_owned())
    }
}

impl From<String> for HeaderValue {
    fn from(value: String) -> Self {
        HeaderValue::Value(value)
    }
}

impl From<SecretRef> for HeaderValue {
    fn from(value: SecretRef) -> Self {
        HeaderValue::Secret(value)
    }
}

serde_via_json!(HeaderValue);

/// HTTP headers: names are lower-cased and unique, lookups ignore case, and
/// insertion order is kept.
///
/// Serializes as a JSON object of lower-cased names to values. Equality ignores
/// order, since a JSON object has none.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    entries: Vec<(String, HeaderValue)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of distinct header names.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The value of a header, whatever the case of `name`.
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.position(name).map(|i| &self.entries[i].1)
    }

    /// The plain value of a header; `None` when absent or a secret.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(HeaderValue::as_str)
    }

    /// Sets a header, replacing any value it had; returns the old value.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: impl Into<HeaderValue>,
    ) -> Option<HeaderValue> {
        let mut name = name.into();
        name.make_ascii_lowercase();
        let value = value.into();
        match self.position(&name) {
            Some(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            None => {
                self.entries.push((name, value));
                None
            }
        }
    }

    /// Adds a value to a header: joined to a plain value already there with
    /// `", "`, as a header that appeared several times is carried. A secret
    /// reference cannot be joined, so it is replaced.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let mut name = name.into();
        name.make_ascii_lowercase();
        let value = value.into();
        match self.position(&name) {
            Some(i) => match &mut self.entries[i].1 {
                HeaderValue::Value(existing) => {
                    existing.push_str(", ");
                    existing.push_str(&value);
                }
                secret @ HeaderValue::Secret(_) => *secret = HeaderValue::Value(value),
            },
            None => self.entries.push((name, HeaderValue::Value(value))),
        }
    }

    /// Removes a header; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<HeaderValue> {
        self.position(name).map(|i| self.entries.remove(i).1)
    }

    /// Whether the header is present, whatever the case of `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// The headers in insertion order, names lower-cased.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HeaderValue)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The JSON object of lower-cased names to values.
    pub fn to_json(&self) -> Value {
        let map: Map<String, Value> = self
            .entries
            .iter()
            .map(|(n, v)| (n.clone(), v.to_json()))
            .collect();
        Value::Object(map)
    }

    /// Loads a JSON object of names to values (strings or secret
    /// references). Names are lower-cased; names differing only in case are
    /// joined as [`Headers::append`] does.
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        Self::load(value, "")
    }

    pub(crate) fn load(value: &Value, path: &str) -> Result<Self, WireError> {
        let map = match value {
            Value::Object(map) => map,
            other => return Err(WireError::wrong_type(path, "an object", other)),
        };
        let mut headers = Headers::new();
        // Where each lower-cased name is, so loading many headers takes
        // linear time rather than a scan per header.
        let mut positions: HashMap<String, usize> = HashMap::with_capacity(map.len());
        for (name, v) in map {
            let name = name.to_ascii_lowercase();
            let value = HeaderValue::load(v, &join(path, &name))?;
            match positions.get(&name) {
                // As `append` joins plain values; anything else replaces.
                Some(&i) => match (&mut headers.entries[i].1, value) {
                    (HeaderValue::Value(existing), HeaderValue::Value(more)) => {
                        existing.push_str(", ");
                        existing.push_str(&more);
                    }
                    (slot, value) => *slot = value,
                },
                None => {
                    positions.insert(name.clone(), headers.entries.len());
                    headers.entries.push((name, value));
                }
            }
        }
        Ok(headers)
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(n, v)| other.get(n) == Some(v))
    }
}

impl Eq for Headers {}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    /// Collects plain headers; repeated names are joined with `", "`.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        headers.extend(iter);
        headers
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Headers {
    /// Appends plain headers; repeated names are joined with `", "`.
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (name, value) in iter {
            self.append(name, value);
        }
    }
}

serde_via_json!(Headers);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_are_lower_cased_and_lookups_ignore_case() {
        let mut h = Headers::new();
        h.insert("Content-Type", "text/plain");
        assert_eq!(h.get_str("content-type"), Some("text/plain"));
        assert_eq!(h.get_str("CONTENT-TYPE"), Some("text/plain"));
        assert_eq!(h.iter().next().map(|(n, _)| n), Some("content-type"));
        let old = h.insert("content-TYPE", "application/json");
        assert_eq!(old, Some(HeaderValue::from("text/plain")));
        assert_eq!(h.len(), 1);
        assert!(h.contains("Content-type"));
        assert_eq!(h.remove("CONTENT-TYPE"), Some("application/json".into()));
        assert!(h.is_empty());
    }

    #[test]
    fn append_joins_duplicates() {
        let h: Headers = [("Set-Cookie", "a=1"), ("set-cookie", "b=2")]
            .into_iter()
            .collect();
        assert_eq!(h.get_str("set-cookie"), Some("a=1, b=2"));
        assert_eq!(h.to_json(), json!({"set-cookie": "a=1, b=2"}));
    }

    #[test]
    fn secrets_serialize_as_references() {
        let mut h = Headers::new();
        h.insert("Authorization", SecretRef::new("api_key"));
        h.insert("Accept", "application/json");
        let json = h.to_json();
        assert_eq!(
            json,
            json!({"authorization": {"$secret": "api_key"}, "accept": "application/json"})
        );
        assert_eq!(h.get_str("authorization"), None);
        assert!(h.get("authorization").is_some_and(HeaderValue::is_secret));
        assert_eq!(Headers::from_json(&json).unwrap(), h);
    }

    #[test]
    fn load_names_the_bad_header() {
        let err = Headers::from_json(&json!({"X-Count": 3})).unwrap_err();
        assert_eq!(err.path(), "x-count");
        let err = Headers::from_json(&json!(["a"])).unwrap_err();
        assert_eq!(err.path(), "");
    }
}
