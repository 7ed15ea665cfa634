//! HTTP responses and their JSON form.

use std::{borrow::Cow, time::Duration};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{
    attempt::{insert_attempts, load_attempts, Attempt},
    callback_args::CallbackArgs,
    fields::{seconds_to_json, serde_via_json, Fields},
    headers::Headers,
    limits::WireLimits,
    method::Method,
    payload::{declared_encoding, load_body, Payload},
    wire_error::{WireError, WireErrorKind},
};

/// The answer to a request, with what the task needs to hand it back.
///
/// Serializes as the wire format's response object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The response headers; repeated headers joined with `", "`.
    pub headers: Headers,
    /// The body as received, `None` when there was none.
    pub body: Option<Bytes>,
    /// How long the request took.
    pub duration: Duration,
    /// The task's id.
    pub request_id: String,
    /// The URL that produced this response (the last one of a redirect chain).
    pub url: String,
    /// The method of the request.
    pub method: Method,
    /// The callback arguments of the task.
    pub callback_args: CallbackArgs,
    /// The URLs visited before `url`, oldest first; empty without redirects.
    pub redirects: Vec<String>,
    /// Every attempt when the request was retried or hedged (serialized only
    /// when there was more than one).
    pub attempts: Vec<Attempt>,
}

/// Why [`Response::json`] could not give the body as JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseJsonError {
    /// The content type is not JSON (`application/json`, `application/*+json`
    /// or `text/json`).
    #[error("response content type is not JSON (got {})", content_type.as_deref().map_or_else(|| "none".to_owned(), |ct| format!("{ct:?}")))]
    NotJson {
        /// The content type of the response, if any.
        content_type: Option<String>,
    },
    /// The response has no body.
    #[error("response has no body")]
    MissingBody,
    /// The body does not parse as the requested type.
    #[error("response body is not valid JSON for the requested type: {0}")]
    Parse(#[source] serde_json::Error),
}

impl ResponseJsonError {
    /// Whether the content type was not JSON.
    pub fn is_not_json(&self) -> bool {
        matches!(self, ResponseJsonError::NotJson { .. })
    }
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Whether the status is 3xx.
    pub fn is_redirect(&self) -> bool {
        (300..400).contains(&self.status)
    }

    /// Whether the status is 4xx.
    pub fn is_client_error(&self) -> bool {
        (400..500).contains(&self.status)
    }

    /// Whether the status is 5xx.
    pub fn is_server_error(&self) -> bool {
        (500..600).contains(&self.status)
    }

    /// Whether the status is 400 or above.
    pub fn is_error(&self) -> bool {
        self.status >= 400
    }

    /// The `content-type` header.
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get_str("content-type")
    }

    /// A header's value, whatever the case of `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get_str(name)
    }

    /// Whether the content type is JSON: `application/json`,
    /// `application/<anything>+json` (or other `application/…json` types), or
    /// `text/json`.
    pub fn is_json(&self) -> bool {
        self.content_type().is_some_and(is_json_content_type)
    }

    /// The body as text, decoded from the charset the content type declares
    /// (UTF-8 otherwise); undecodable bytes become U+FFFD. `None` without a
    /// body.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        let body = self.body.as_ref()?;
        Some(match self.content_type().and_then(declared_encoding) {
            Some(enc) => enc.decode_without_bom_handling(body).0,
            None => String::from_utf8_lossy(body),
        })
    }

    /// The body parsed as JSON into `T`. Refuses a response whose content
    /// type is not JSON (see [`Response::is_json`]).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ResponseJsonError> {
        if !self.is_json() {
            return Err(ResponseJsonError::NotJson {
                content_type: self.content_type().map(str::to_owned),
            });
        }
        let text = self.text().ok_or(ResponseJsonError::MissingBody)?;
        serde_json::from_str(&text).map_err(ResponseJsonError::Parse)
    }

    /// The wire format's response object; the body is a [`Payload`] encoded
    /// for the response's content type, or `null`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("status".into(), self.status.into());
        map.insert("headers".into(), self.headers.to_json());
        map.insert(
            "body".into(),
            self.body.as_ref().map_or(Value::Null, |b| {
                Payload::encode(b, self.content_type()).to_json()
            }),
        );
        map.insert("duration".into(), seconds_to_json(self.duration));
        map.insert("request_id".into(), self.request_id.clone().into());
        map.insert("url".into(), self.url.clone().into());
        map.insert("http_method".into(), self.method.as_lower().into());
        map.insert("callback_args".into(), self.callback_args.to_json());
        map.insert("redirects".into(), self.redirects.clone().into());
        insert_attempts(&mut map, &self.attempts);
        Value::Object(map)
    }

    /// Loads a response object within [`WireLimits::default`]; the error
    /// names the offending field. `callback_args` and `redirects` may be
    /// absent or `null` (empty).
    ///
    /// The bounds that apply are [`WireLimits::max_body_size`] (a gzipped
    /// body stops inflating as soon as it passes it) and the callback-args
    /// bounds.
    pub fn from_json(value: &Value) -> Result<Response, WireError> {
        Self::from_json_with_limits(value, &WireLimits::default())
    }

    /// Loads a response object within `limits`.
    pub fn from_json_with_limits(
        value: &Value,
        limits: &WireLimits,
    ) -> Result<Response, WireError> {
        Self::load(value, "", limits)
    }

    pub(crate) fn load(
        value: &Value,
        path: &str,
        limits: &WireLimits,
    ) -> Result<Response, WireError> {
        let fields = Fields::new(value, path)?;
        let status = fields.u64("status")?;
        let status = u16::try_from(status)
            .ok()
            .filter(|s| (100..=999).contains(s))
            .ok_or_else(|| {
                WireError::new(
                    fields.path_of("status"),
                    WireErrorKind::OutOfRange {
                        value: status.to_string(),
                    },
                )
            })?;
        let headers = match fields.value("headers") {
            Some(v) => Headers::load(v, &fields.path_of("headers"))?,
            None => Headers::new(),
        };
        let body = load_body(&fields, "body", headers.get_str("content-type"), limits)?;
        Ok(Response {
            status,
            body,
            duration: fields.seconds("duration")?,
            request_id: fields.string("request_id")?.to_owned(),
            url: fields.string("url")?.to_owned(),
            method: fields.method("http_method")?,
            callback_args: fields.callback_args("callback_args", limits)?,
            redirects: fields.strings("redirects")?,
            attempts: load_attempts(&fields)?,
            headers,
        })
    }
}

serde_via_json!(Response);

/// `application/…json` (such as `application/problem+json`) or `text/json`.
fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "text/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/problem+json"));
        assert!(is_json_content_type("text/json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/jsonp-ish"));
    }
}
