//! The error returned when JSON does not hold a valid wire value.

use std::{error::Error as StdError, fmt};

use crate::{
    callback_args::CallbackArgsError, limits::LimitError, request::RequestValidationError,
};

/// JSON that could not be loaded as a wire value.
///
/// Names the field that is wrong with a path such as `body.value`,
/// `response.status` or `redirects[1]` (empty for the value itself), and says
/// what is wrong with it through [`WireError::kind`].
#[derive(Debug)]
pub struct WireError {
    path: String,
    kind: WireErrorKind,
}

/// What is wrong with the field a [`WireError`] names.
#[derive(Debug)]
#[non_exhaustive]
pub enum WireErrorKind {
    /// A required key is absent (or `null` where a value is required).
    Missing,
    /// The value has the wrong JSON type.
    WrongType {
        /// The JSON type the field must have.
        expected: &'static str,
        /// The JSON type found.
        found: &'static str,
    },
    /// A string is not one of the names the field allows.
    UnknownValue {
        /// The string found.
        value: String,
        /// The allowed names.
        expected: &'static [&'static str],
    },
    /// A number is outside the range the field allows.
    OutOfRange {
        /// The number found, as JSON text.
        value: String,
    },
    /// A Base64 value does not decode.
    Base64(base64::DecodeError),
    /// A gzipped payload does not decompress.
    Gzip(std::io::Error),
    /// A payload decodes to more bytes than [`Payload::decode_limited`]
    /// allows.
    ///
    /// [`Payload::decode_limited`]: crate::Payload::decode_limited
    TooLarge {
        /// The most bytes allowed.
        limit: usize,
    },
    /// A value is outside one of the [`WireLimits`](crate::WireLimits): a
    /// duration, a count, a length, a body size or a nesting depth.
    Limit(LimitError),
    /// The loaded request breaks a request rule.
    Request(RequestValidationError),
    /// The callback arguments are not JSON-native.
    CallbackArgs(CallbackArgsError),
}

impl WireError {
    pub(crate) fn new(path: impl Into<String>, kind: WireErrorKind) -> Self {
        Self {
            path: path.into(),
            kind,
        }
    }

    pub(crate) fn missing(path: impl Into<String>) -> Self {
        Self::new(path, WireErrorKind::Missing)
    }

    pub(crate) fn wrong_type(
        path: impl Into<String>,
        expected: &'static str,
        found: &serde_json::Value,
    ) -> Self {
        Self::new(
            path,
            WireErrorKind::WrongType {
                expected,
                found: json_type_name(found),
            },
        )
    }

    /// The path of the offending field, like `body.encoding` or
    /// `response.headers.content-type`; empty when the whole value is wrong.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong with the field.
    pub fn kind(&self) -> &WireErrorKind {
        &self.kind
    }

    /// Whether a required field is absent.
    pub fn is_missing(&self) -> bool {
        matches!(self.kind, WireErrorKind::Missing)
    }

    /// The broken bound, when a value is outside one of the
    /// [`WireLimits`](crate::WireLimits).
    pub fn limit(&self) -> Option<&LimitError> {
        match &self.kind {
            WireErrorKind::Limit(e) => Some(e),
            WireErrorKind::Request(RequestValidationError::Limit(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether a value is outside one of the [`WireLimits`](crate::WireLimits).
    pub fn is_limit(&self) -> bool {
        self.limit().is_some()
    }
}

impl From<LimitError> for WireError {
    /// The error at the limit error's field.
    fn from(e: LimitError) -> Self {
        Self::new(e.field().to_owned(), WireErrorKind::Limit(e))
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "invalid wire value: {}", self.kind)
        } else {
            write!(f, "invalid `{}`: {}", self.path, self.kind)
        }
    }
}

impl StdError for WireError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.kind {
            WireErrorKind::Base64(e) => Some(e),
            WireErrorKind::Gzip(e) => Some(e),
            WireErrorKind::Request(e) => Some(e),
            WireErrorKind::CallbackArgs(e) => Some(e),
            WireErrorKind::Limit(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for WireErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("is missing"),
            Self::WrongType { expected, found } => write!(f, "expected {expected}, found {found}"),
            Self::UnknownValue { value, expected } => {
                write!(f, "unknown value {value:?}, expected one of ")?;
                for (i, name) in expected.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{name:?}")?;
                }
                Ok(())
            }
            Self::OutOfRange { value } => write!(f, "{value} is out of range"),
            Self::Base64(e) => write!(f, "invalid Base64: {e}"),
            Self::Gzip(e) => write!(f, "invalid gzip data: {e}"),
            Self::TooLarge { limit } => write!(f, "decodes to more than {limit} bytes"),
            Self::Limit(e) => e.describe(f),
            Self::Request(e) => write!(f, "{e}"),
            Self::CallbackArgs(e) => write!(f, "{e}"),
        }
    }
}

/// The JSON type name of a value, for error messages.
pub(crate) fn json_type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
