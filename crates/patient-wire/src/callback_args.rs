//! Arguments handed back to a callback with the outcome of a task.

use serde::{
    ser::{self, Serialize},
    Deserialize, Serializer,
};
use serde_json::{Map, Value};

use crate::{
    limits::{Bound, LimitError, WireLimits},
    wire_error::{json_type_name, WireError, WireErrorKind},
};

/// A JSON object of JSON-native values that travels with a task and comes
/// back to the callback with its outcome.
///
/// Values can only be null, booleans, strings, numbers, arrays and objects
/// with string keys; [`CallbackArgs::from_serialize`] rejects anything else
/// with an error naming the offending path.
///
/// Arguments from JSON ([`CallbackArgs::from_value`],
/// [`CallbackArgs::from_json`], `Deserialize`, and the loaders of responses
/// and errors) must also keep to the callback-args bounds of [`WireLimits`]:
/// [`WireLimits::max_callback_args_depth`] and
/// [`WireLimits::max_callback_args_size`] (of the default limits unless
/// loaded with others).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallbackArgs(Map<String, Value>);

/// A value that cannot be callback arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid callback args{}: {reason}", display_path(.path))]
pub struct CallbackArgsError {
    /// Where the offending value is, like `user.tags[2]`; empty for the
    /// arguments as a whole.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" at `{path}`")
    }
}

impl CallbackArgs {
    /// No arguments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets an argument, replacing any earlier value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.0.insert(key.into(), value.into());
    }

    /// The value of an argument.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// The number of arguments.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no arguments.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The arguments as a JSON map.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.0
    }

    /// The arguments as a JSON object.
    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }

    /// The arguments as a JSON object, cloned.
    pub fn to_json(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// Arguments from a JSON value, which must be an object within the
    /// callback-args bounds of [`WireLimits::default`].
    pub fn from_value(value: Value) -> Result<Self, CallbackArgsError> {
        match value {
            Value::Object(map) => {
                check_limits(&map, "", &WireLimits::default()).map_err(|e| CallbackArgsError {
                    path: e.field().to_owned(),
                    reason: LimitReason(&e).to_string(),
                })?;
                Ok(Self(map))
            }
            other => Err(CallbackArgsError {
                path: String::new(),
                reason: format!("must be a JSON object, found {}", json_type_name(&other)),
            }),
        }
    }

    /// Loads arguments from JSON within the callback-args bounds of
    /// [`WireLimits::default`]; the error names the offending path.
    pub fn from_json(value: &Value) -> Result<Self, WireError> {
        Self::from_json_with_limits(value, &WireLimits::default())
    }

    /// Loads arguments from JSON within the callback-args bounds of
    /// `limits`: [`WireLimits::max_callback_args_depth`] and
    /// [`WireLimits::max_callback_args_size`].
    pub fn from_json_with_limits(value: &Value, limits: &WireLimits) -> Result<Self, WireError> {
        Self::load(value, "", limits)
    }

    pub(crate) fn load(value: &Value, path: &str, limits: &WireLimits) -> Result<Self, WireError> {
        match value {
            Value::Object(map) => {
                check_limits(map, path, limits)?;
                Ok(Self(map.clone()))
            }
            other => Err(WireError::new(
                path,
                WireErrorKind::CallbackArgs(CallbackArgsError {
                    path: path.to_owned(),
                    reason: format!("must be a JSON object, found {}", json_type_name(other)),
                }),
            )),
        }
    }

    /// Arguments from any serializable value, which must serialize to a map
    /// or struct of JSON-native values. Non-finite floats, non-string map
    /// keys, byte strings and integers beyond 64 bits are rejected with the
    /// path of the offending value, like `user.tags[2]`.
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> Result<Self, CallbackArgsError> {
        let value =
            value
                .serialize(ValueSerializer { path: "" })
                .map_err(|e| CallbackArgsError {
                    path: e.path.unwrap_or_default(),
                    reason: e.reason,
                })?;
        Self::from_value(value)
    }
}

impl From<Map<String, Value>> for CallbackArgs {
    fn from(map: Map<String, Value>) -> Self {
        Self(map)
    }
}

impl TryFrom<Value> for CallbackArgs {
    type Error = CallbackArgsError;

    fn try_from(value: Value) -> Result<Self, Self::Error> {
        Self::from_value(value)
    }
}

impl From<CallbackArgs> for Value {
    fn from(args: CallbackArgs) -> Self {
        args.into_value()
    }
}

impl Serialize for CallbackArgs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CallbackArgs {
    /// Deserializes an object within the callback-args bounds of
    /// [`WireLimits::default`].
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = Map::deserialize(deserializer)?;
        check_limits(&map, "", &WireLimits::default()).map_err(serde::de::Error::custom)?;
        Ok(Self(map))
    }
}

/// A [`LimitError`] without its field, for a [`CallbackArgsError`] reason.
struct LimitReason<'a>(&'a LimitError);

impl std::fmt::Display for LimitReason<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.describe(f)
    }
}

/// Checks the nesting depth of the arguments (the object itself is level
/// 1), then their size as compact JSON; neither walk goes deeper than the
/// depth bound nor writes more than the size bound.
fn check_limits(
    map: &Map<String, Value>,
    path: &str,
    limits: &WireLimits,
) -> Result<(), LimitError> {
    let max_depth = limits.max_callback_args_depth;
    let too_deep = || {
        LimitError::new(
            path,
            "max_callback_args_depth",
            Bound::Depth(max_depth),
            None,
        )
    };
    if max_depth == 0 {
        return Err(too_deep());
    }
    // Iterative, so a value nested deeper than the stack allows (one built
    // in Rust rather than parsed) cannot overflow it here.
    let mut stack: Vec<(&Value, usize)> = map.values().map(|v| (v, 2)).collect();
    while let Some((value, depth)) = stack.pop() {
        let is_container = matches!(value, Value::Array(_) | Value::Object(_));
        if is_container && depth > max_depth {
            return Err(too_deep());
        }
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
            _ => {}
        }
    }

    let max_size = limits.max_callback_args_size;
    let mut counter = SizeCounter {
        written: 0,
        max: max_size,
    };
    if serde_json::to_writer(&mut counter, map).is_err() || counter.written > max_size {
        return Err(LimitError::new(
            path,
            "max_callback_args_size",
            Bound::Bytes(max_size),
            None,
        ));
    }
    Ok(())
}

/// Counts the bytes written and fails once they pass `max`.
struct SizeCounter {
    written: usize,
    max: usize,
}

impl std::io::Write for SizeCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written = self.written.saturating_add(buf.len());
        if self.written > self.max {
            return Err(std::io::Error::other("over the size limit"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// A serializer into `serde_json::Value` that accepts only JSON-native data
// and reports where the first value that is not sits.

#[derive(Debug)]
struct SerError {
    /// `None` until the innermost serializer that knows the path sets it.
    path: Option<String>,
    reason: String,
}

impl SerError {
    fn at(path: &str, reason: impl Into<String>) -> Self {
        Self {
            path: Some(path.to_owned()),
            reason: reason.into(),
        }
    }

    fn or_at(mut self, path: &str) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_owned());
        }
        self
    }
}

impl std::fmt::Display for SerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for SerError {}

impl ser::Error for SerError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self {
            path: None,
            reason: msg.to_string(),
        }
    }
}

fn key_path(path: &str, key: &str) -> String {
    crate::fields::join(path, key)
}

fn serialize_at<T: Serialize + ?Sized>(value: &T, path: &str) -> Result<Value, SerError> {
    value
        .serialize(ValueSerializer { path })
        .map_err(|e| e.or_at(path))
}

struct ValueSerializer<'p> {
    path: &'p str,
}

impl<'p> Serializer for ValueSerializer<'p> {
    type Ok = Value;
    type Error = SerError;
    type SerializeSeq = SeqSerializer;
    type SerializeTuple = SeqSerializer;
    type SerializeTupleStruct = SeqSerializer;
    type SerializeTupleVariant = VariantSerializer<SeqSerializer>;
    type SerializeMap = MapSerializer;
    type SerializeStruct = MapSerializer;
    type SerializeStructVariant = VariantSerializer<MapSerializer>;

    fn serialize_bool(self, v: bool) -> Result<Value, SerError> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, SerError> {
        Ok(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<Value, SerError> {
        Ok(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<Value, SerError> {
        Ok(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<Value, SerError> {
        Ok(v.into())
    }
    fn serialize_i128(self, v: i128) -> Result<Value, SerError> {
        if let Ok(v) = i64::try_from(v) {
            Ok(v.into())
        } else if let Ok(v) = u64::try_from(v) {
            Ok(v.into())
        } else {
            Err(SerError::at(
                self.path,
                format!("integer {v} does not fit in 64 bits"),
            ))
        }
    }
    fn serialize_u8(self, v: u8) -> Result<Value, SerError> {
        Ok(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<Value, SerError> {
        Ok(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<Value, SerError> {
        Ok(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<Value, SerError> {
        Ok(v.into())
    }
    fn serialize_u128(self, v: u128) -> Result<Value, SerError> {
        u64::try_from(v)
            .map(Value::from)
            .map_err(|_| SerError::at(self.path, format!("integer {v} does not fit in 64 bits")))
    }
    fn serialize_f32(self, v: f32) -> Result<Value, SerError> {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, SerError> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| SerError::at(self.path, format!("{v} is not a finite number")))
    }
    fn serialize_char(self, v: char) -> Result<Value, SerError> {
        Ok(Value::String(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, SerError> {
        Ok(Value::String(v.to_owned()))
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<Value, SerError> {
        Err(SerError::at(
            self.path,
            "byte strings are not JSON-native (use a string or an array of numbers)",
        ))
    }
    fn serialize_none(self) -> Result<Value, SerError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, SerError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, SerError> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, SerError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, SerError> {
        Ok(Value::String(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Value, SerError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, SerError> {
        let inner = serialize_at(value, &key_path(self.path, variant))?;
        let mut map = Map::new();
        map.insert(variant.to_owned(), inner);
        Ok(Value::Object(map))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqSerializer, SerError> {
        Ok(SeqSerializer {
            path: self.path.to_owned(),
            items: Vec::with_capacity(len.unwrap_or(0).min(1024)),
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqSerializer, SerError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<SeqSerializer, SerError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSerializer<SeqSerializer>, SerError> {
        let path = key_path(self.path, variant);
        Ok(VariantSerializer {
            variant,
            inner: ValueSerializer { path: &path }.serialize_seq(Some(len))?,
        })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapSerializer, SerError> {
        Ok(MapSerializer {
            path: self.path.to_owned(),
            map: Map::new(),
            key: None,
        })
    }
    fn serialize_struct(self, _name: &'static str, len: usize) -> Result<MapSerializer, SerError> {
        self.serialize_map(Some(len))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSerializer<MapSerializer>, SerError> {
        let path = key_path(self.path, variant);
        Ok(VariantSerializer {
            variant,
            inner: ValueSerializer { path: &path }.serialize_map(Some(len))?,
        })
    }
}

struct SeqSerializer {
    path: String,
    items: Vec<Value>,
}

impl SeqSerializer {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        let path = crate::fields::index(&self.path, self.items.len());
        self.items.push(serialize_at(value, &path)?);
        Ok(())
    }
}

impl ser::SerializeSeq for SeqSerializer {
    type Ok = Value;
    type Error = SerError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, SerError> {
        Ok(Value::Array(self.items))
    }
}

impl ser::SerializeTuple for SeqSerializer {
    type Ok = Value;
    type Error = SerError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, SerError> {
        Ok(Value::Array(self.items))
    }
}

impl ser::SerializeTupleStruct for SeqSerializer {
    type Ok = Value;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.push(value)
    }
    fn end(self) -> Result<Value, SerError> {
        Ok(Value::Array(self.items))
    }
}

struct MapSerializer {
    path: String,
    map: Map<String, Value>,
    key: Option<String>,
}

impl MapSerializer {
    fn field<T: Serialize + ?Sized>(&mut self, key: String, value: &T) -> Result<(), SerError> {
        let v = serialize_at(value, &key_path(&self.path, &key))?;
        self.map.insert(key, v);
        Ok(())
    }
}

impl ser::SerializeMap for MapSerializer {
    type Ok = Value;
    type Error = SerError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), SerError> {
        self.key = Some(
            key.serialize(KeySerializer)
                .map_err(|e| e.or_at(&self.path))?,
        );
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| SerError::at(&self.path, "map value without a key"))?;
        self.field(key, value)
    }
    fn end(self) -> Result<Value, SerError> {
        Ok(Value::Object(self.map))
    }
}

impl ser::SerializeStruct for MapSerializer {
    type Ok = Value;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SerError> {
        self.field(key.to_owned(), value)
    }
    fn end(self) -> Result<Value, SerError> {
        Ok(Value::Object(self.map))
    }
}

struct VariantSerializer<S> {
    variant: &'static str,
    inner: S,
}

impl<S> VariantSerializer<S> {
    fn wrap(variant: &'static str, value: Value) -> Value {
        let mut map = Map::new();
        map.insert(variant.to_owned(), value);
        Value::Object(map)
    }
}

impl ser::SerializeTupleVariant for VariantSerializer<SeqSerializer> {
    type Ok = Value;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.inner.push(value)
    }
    fn end(self) -> Result<Value, SerError> {
        Ok(Self::wrap(self.variant, Value::Array(self.inner.items)))
    }
}

impl ser::SerializeStructVariant for VariantSerializer<MapSerializer> {
    type Ok = Value;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), SerError> {
        self.inner.field(key.to_owned(), value)
    }
    fn end(self) -> Result<Value, SerError> {
        Ok(Self::wrap(self.variant, Value::Object(self.inner.map)))
    }
}

/// Accepts only keys that are strings (or a char, or a unit enum variant,
/// which serialize as strings).
struct KeySerializer;

fn bad_key(found: &str) -> SerError {
    ser::Error::custom(format!("map keys must be strings, found {found}"))
}

macro_rules! reject_keys {
    ($($method:ident($($arg:ty),*) => $found:expr;)*) => {
        $(fn $method(self, $(_: $arg),*) -> Result<String, SerError> {
            Err(bad_key($found))
        })*
    };
}

impl Serializer for KeySerializer {
    type Ok = String;
    type Error = SerError;
    type SerializeSeq = ser::Impossible<String, SerError>;
    type SerializeTuple = ser::Impossible<String, SerError>;
    type SerializeTupleStruct = ser::Impossible<String, SerError>;
    type SerializeTupleVariant = ser::Impossible<String, SerError>;
    type SerializeMap = ser::Impossible<String, SerError>;
    type SerializeStruct = ser::Impossible<String, SerError>;
    type SerializeStructVariant = ser::Impossible<String, SerError>;

    fn serialize_str(self, v: &str) -> Result<String, SerError> {
        Ok(v.to_owned())
    }
    fn serialize_char(self, v: char) -> Result<String, SerError> {
        Ok(v.to_string())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, SerError> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<String, SerError> {
        value.serialize(self)
    }

    reject_keys! {
        serialize_bool(bool) => "a boolean";
        serialize_i8(i8) => "an integer";
        serialize_i16(i16) => "an integer";
        serialize_i32(i32) => "an integer";
        serialize_i64(i64) => "an integer";
        serialize_i128(i128) => "an integer";
        serialize_u8(u8) => "an integer";
        serialize_u16(u16) => "an integer";
        serialize_u32(u32) => "an integer";
        serialize_u64(u64) => "an integer";
        serialize_u128(u128) => "an integer";
        serialize_f32(f32) => "a float";
        serialize_f64(f64) => "a float";
        serialize_bytes(&[u8]) => "a byte string";
        serialize_none() => "null";
        serialize_unit() => "null";
        serialize_unit_struct(&'static str) => "null";
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<String, SerError> {
        Err(bad_key("an option"))
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, SerError> {
        Err(bad_key("an enum"))
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, SerError> {
        Err(bad_key("a sequence"))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, SerError> {
        Err(bad_key("a tuple"))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, SerError> {
        Err(bad_key("a tuple"))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, SerError> {
        Err(bad_key("an enum"))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, SerError> {
        Err(bad_key("a map"))
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, SerError> {
        Err(bad_key("a struct"))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, SerError> {
        Err(bad_key("an enum"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    #[derive(serde::Serialize)]
    struct User {
        id: u64,
        tags: Vec<f64>,
    }

    #[derive(serde::Serialize)]
    struct Args {
        user: User,
        note: Option<String>,
    }

    #[test]
    fn serializes_json_native_values() {
        let args = CallbackArgs::from_serialize(&Args {
            user: User {
                id: 7,
                tags: vec![1.5, 2.0],
            },
            note: None,
        })
        .unwrap();
        assert_eq!(
            args.into_value(),
            json!({"user": {"id": 7, "tags": [1.5, 2.0]}, "note": null})
        );
    }

    #[test]
    fn names_the_path_of_a_non_finite_float() {
        let err = CallbackArgs::from_serialize(&Args {
            user: User {
                id: 7,
                tags: vec![1.0, 2.0, f64::NAN],
            },
            note: None,
        })
        .unwrap_err();
        assert_eq!(err.path, "user.tags[2]");
        assert!(err.reason.contains("finite"), "{err}");
        assert!(err.to_string().contains("user.tags[2]"));
    }

    #[test]
    fn rejects_non_string_keys_and_bytes() {
        let mut scores = BTreeMap::new();
        scores.insert(1_u32, "a");
        let err = CallbackArgs::from_serialize(&json_map("scores", &scores)).unwrap_err();
        assert_eq!(err.path, "scores");
        assert!(err.reason.contains("keys must be strings"));

        #[derive(serde::Serialize)]
        struct Raw<'a> {
            #[serde(with = "serde_bytes_like")]
            data: &'a [u8],
        }
        mod serde_bytes_like {
            pub(super) fn serialize<S: serde::Serializer>(
                v: &[u8],
                s: S,
            ) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(v)
            }
        }
        let err = CallbackArgs::from_serialize(&Raw { data: b"x" }).unwrap_err();
        assert_eq!(err.path, "data");
    }

    fn json_map<'a, V: Serialize>(key: &'a str, v: &'a V) -> BTreeMap<&'a str, &'a V> {
        let mut m = BTreeMap::new();
        m.insert(key, v);
        m
    }

    #[test]
    fn rejects_non_objects() {
        let err = CallbackArgs::from_serialize(&[1, 2]).unwrap_err();
        assert_eq!(err.path, "");
        let err = CallbackArgs::from_value(json!("x")).unwrap_err();
        assert!(err.reason.contains("object"));
    }

    #[test]
    fn enums_serialize_as_serde_json_does() {
        #[derive(serde::Serialize)]
        enum Kind {
            Plain,
            Wrapped(f32),
        }
        let mut m = BTreeMap::new();
        m.insert("a", Kind::Plain);
        m.insert("b", Kind::Wrapped(1.0));
        let args = CallbackArgs::from_serialize(&m).unwrap();
        assert_eq!(
            args.into_value(),
            json!({"a": "Plain", "b": {"Wrapped": 1.0}})
        );
        let mut m = BTreeMap::new();
        m.insert("b", Kind::Wrapped(f32::INFINITY));
        let err = CallbackArgs::from_serialize(&m).unwrap_err();
        assert_eq!(err.path, "b.Wrapped");
    }

    #[test]
    fn custom_errors_get_the_path_of_their_value() {
        struct Failing;
        impl Serialize for Failing {
            fn serialize<S: Serializer>(&self, _s: S) -> Result<S::Ok, S::Error> {
                Err(ser::Error::custom("nope"))
            }
        }
        let mut m = BTreeMap::new();
        m.insert("list", vec![Failing]);
        let err = CallbackArgs::from_serialize(&m).unwrap_err();
        assert_eq!(err.path, "list[0]");
        assert_eq!(err.reason, "nope");
    }
}
