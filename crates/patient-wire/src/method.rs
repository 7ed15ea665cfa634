//! HTTP request methods.

use std::{fmt, str::FromStr};

/// An HTTP request method.
///
/// Displays in upper case (`GET`); serializes as the lower-case string the
/// wire format uses (`"get"`); parses from any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// `GET`
    Get,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `DELETE`
    Delete,
    /// `HEAD`
    Head,
    /// `OPTIONS`
    Options,
}

impl Method {
    /// Every method, in declaration order.
    pub const ALL: [Method; 7] = [
        Method::Get,
        Method::Post,
        Method::Put,
        Method::Patch,
        Method::Delete,
        Method::Head,
        Method::Options,
    ];

    /// The lower-case wire names of every method.
    pub(crate) const LOWER_NAMES: &'static [&'static str] =
        &["get", "post", "put", "patch", "delete", "head", "options"];

    /// The upper-case name, as sent on the wire of HTTP itself: `"GET"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
        }
    }

    /// The lower-case name the JSON wire format uses: `"get"`.
    pub fn as_lower(&self) -> &'static str {
        match self {
            Method::Get => "get",
            Method::Post => "post",
            Method::Put => "put",
            Method::Patch => "patch",
            Method::Delete => "delete",
            Method::Head => "head",
            Method::Options => "options",
        }
    }

    /// Whether repeating the request has the same effect as sending it once
    /// (RFC 9110 §9.2.2): true for GET, PUT, DELETE, HEAD and OPTIONS.
    pub fn is_idempotent(&self) -> bool {
        !matches!(self, Method::Post | Method::Patch)
    }

    /// Whether a request with this method may carry a body: false for GET,
    /// DELETE, HEAD and OPTIONS.
    pub fn allows_body(&self) -> bool {
        matches!(self, Method::Post | Method::Put | Method::Patch)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not one of the supported HTTP methods.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported HTTP method {method:?}")]
pub struct ParseMethodError {
    /// The string that was given.
    pub method: String,
}

impl FromStr for Method {
    type Err = ParseMethodError;

    /// Parses a method name in any case (`get`, `GET`, `Get`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseMethodError {
                method: s.to_owned(),
            })
    }
}

impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_lower())
    }
}

impl<'de> serde::Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_case_and_names_unknown_methods() {
        assert_eq!("get".parse::<Method>(), Ok(Method::Get));
        assert_eq!("Options".parse::<Method>(), Ok(Method::Options));
        let err = "TRACE".parse::<Method>().unwrap_err();
        assert_eq!(err.method, "TRACE");
        assert!(err.to_string().contains("TRACE"));
    }

    #[test]
    fn names_and_predicates() {
        for m in Method::ALL {
            assert_eq!(m.as_str().to_ascii_lowercase(), m.as_lower());
            assert_eq!(m.to_string(), m.as_str());
        }
        assert!(!Method::Get.allows_body());
        assert!(!Method::Delete.allows_body());
        assert!(!Method::Head.allows_body());
        assert!(!Method::Options.allows_body());
        assert!(Method::Post.allows_body());
        assert!(Method::Put.is_idempotent());
        assert!(!Method::Post.is_idempotent());
        assert!(!Method::Patch.is_idempotent());
    }

    #[test]
    fn serde_uses_lower_case() {
        assert_eq!(serde_json::to_string(&Method::Patch).unwrap(), "\"patch\"");
        let m: Method = serde_json::from_str("\"DELETE\"").unwrap();
        assert_eq!(m, Method::Delete);
    }
}
