//! Reading the fields of a JSON object while keeping track of where they are,
//! so every load error names the offending path.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::{
    callback_args::CallbackArgs,
    limits::{Bound, LimitError, WireLimits},
    method::Method,
    wire_error::{WireError, WireErrorKind},
};

/// `path.key`, or `key` at the root.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// `path.key` as [`join`] makes it, built only when it is needed: the
/// field named by an error, while the check that may raise it passes
/// without allocating.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Joined<'a>(pub(crate) &'a str, pub(crate) &'a str);

impl From<Joined<'_>> for String {
    fn from(joined: Joined<'_>) -> String {
        join(joined.0, joined.1)
    }
}

/// `path[index]`.
pub(crate) fn index(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

/// A JSON object under a known path.
pub(crate) struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

impl<'a> Fields<'a> {
    /// Requires `value` to be an object.
    pub(crate) fn new(value: &'a Value, path: &'a str) -> Result<Self, WireError> {
        match value {
            Value::Object(map) => Ok(Self { map, path }),
            other => Err(WireError::wrong_type(path, "an object", other)),
        }
    }

    /// The path of one of this object's keys.
    pub(crate) fn path_of(&self, key: &str) -> String {
        join(self.path, key)
    }

    /// The number of keys of the object.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The key-value pairs of the object.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&'a String, &'a Value)> {
        self.map.iter()
    }

    /// Whether the key is present at all (even as `null`).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The value of a key, `None` when absent or `null`.
    pub(crate) fn value(&self, key: &str) -> Option<&'a Value> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn required(&self, key: &str) -> Result<&'a Value, WireError> {
        self.value(key)
            .ok_or_else(|| WireError::missing(self.path_of(key)))
    }

    /// A required string.
    pub(crate) fn string(&self, key: &str) -> Result<&'a str, WireError> {
        let v = self.required(key)?;
        v.as_str()
            .ok_or_else(|| WireError::wrong_type(self.path_of(key), "a string", v))
    }

    /// An optional string.
    pub(crate) fn opt_string(&self, key: &str) -> Result<Option<&'a str>, WireError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| WireError::wrong_type(self.path_of(key), "a string", v)),
        }
    }

    /// A required HTTP method (any case).
    pub(crate) fn method(&self, key: &str) -> Result<Method, WireError> {
        let s = self.string(key)?;
        s.parse::<Method>().map_err(|_| {
            WireError::new(
                self.path_of(key),
                WireErrorKind::UnknownValue {
                    value: s.to_owned(),
                    expected: Method::LOWER_NAMES,
                },
            )
        })
    }

    /// A required number of seconds.
    pub(crate) fn seconds(&self, key: &str) -> Result<Duration, WireError> {
        let v = self.required(key)?;
        seconds_from_json(v, &self.path_of(key))
    }

    /// An optional number of seconds from 0 to `max`; anything else (a
    /// negative or larger number) is refused naming `max` and its `limit`.
    pub(crate) fn opt_bounded_seconds(
        &self,
        key: &str,
        limit: &'static str,
        max: Duration,
    ) -> Result<Option<Duration>, WireError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => bounded_seconds_from_json(v, &self.path_of(key), limit, max).map(Some),
        }
    }

    /// A required unsigned integer.
    pub(crate) fn u64(&self, key: &str) -> Result<u64, WireError> {
        let v = self.required(key)?;
        integer_from_json(v, &self.path_of(key))
    }

    /// An optional unsigned integer.
    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>, WireError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => integer_from_json(v, &self.path_of(key)).map(Some),
        }
    }

    /// A list of strings; absent or `null` is empty.
    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>, WireError> {
        let path = self.path_of(key);
        match self.value(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    item.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| WireError::wrong_type(index(&path, i), "a string", item))
                })
                .collect(),
            Some(other) => Err(WireError::wrong_type(path, "an array", other)),
        }
    }

    /// Callback arguments within the limits; absent or `null` is empty.
    pub(crate) fn callback_args(
        &self,
        key: &str,
        limits: &WireLimits,
    ) -> Result<CallbackArgs, WireError> {
        match self.value(key) {
            None => Ok(CallbackArgs::new()),
            Some(v) => CallbackArgs::load(v, &self.path_of(key), limits),
        }
    }
}

/// A number of seconds from 0 to `max`. A number that is negative, larger
/// than `max` or too large for a duration is refused with a
/// [`WireErrorKind::Limit`] naming `max` and its `limit`.
pub(crate) fn bounded_seconds_from_json(
    v: &Value,
    path: &str,
    limit: &'static str,
    max: Duration,
) -> Result<Duration, WireError> {
    let secs = v
        .as_f64()
        .ok_or_else(|| WireError::wrong_type(path, "a number", v))?;
    // The number is compared as written too: a duration keeps nanoseconds,
    // so `86400.00000000001` would round to exactly one day and pass.
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d <= max && secs <= max.as_secs_f64() => Ok(d),
        _ => Err(LimitError::new(path, limit, Bound::Duration(max), Some(v.to_string())).into()),
    }
}

pub(crate) fn seconds_from_json(v: &Value, path: &str) -> Result<Duration, WireError> {
    let secs = v
        .as_f64()
        .ok_or_else(|| WireError::wrong_type(path, "a number", v))?;
    Duration::try_from_secs_f64(secs).map_err(|_| {
        WireError::new(
            path,
            WireErrorKind::OutOfRange {
                value: v.to_string(),
            },
        )
    })
}

fn integer_from_json(v: &Value, path: &str) -> Result<u64, WireError> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            WireError::new(
                path,
                WireErrorKind::OutOfRange {
                    value: n.to_string(),
                },
            )
        }),
        other => Err(WireError::wrong_type(path, "an integer", other)),
    }
}

/// A duration as JSON seconds (a float).
pub(crate) fn seconds_to_json(d: Duration) -> Value {
    Value::from(d.as_secs_f64())
}

/// Implements `Serialize` and `Deserialize` through the type's own
/// `to_json` / `from_json`, so serde and the explicit functions agree.
macro_rules! serde_via_json {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serde::Serialize::serialize(&self.to_json(), serializer)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = <serde_json::Value as serde::Deserialize>::deserialize(deserializer)?;
                <$ty>::from_json(&value).map_err(serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use serde_via_json;
