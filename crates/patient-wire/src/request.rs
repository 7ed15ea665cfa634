//! HTTP requests, validated when built, and their JSON form.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use serde_json::{Map, Value};
use url::Url;

use crate::{
    fields::{join, serde_via_json, Fields},
    headers::{HeaderValue, Headers},
    method::Method,
    options::{Priority, RequestOptions, Strategy},
    payload::{load_body, Payload},
    secret::SecretRef,
    wire_error::{WireError, WireErrorKind},
};

/// The content type a [`RequestBuilder::json`] body gets when none was given.
pub const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// A request that breaks a request rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestValidationError {
    /// A body was given for a method that takes none (GET, DELETE, HEAD,
    /// OPTIONS).
    #[error("a {method} request cannot have a body")]
    BodyNotAllowed {
        /// The method of the request.
        method: Method,
    },
    /// Both a body and a JSON body were given.
    #[error("a request cannot have both a body and a JSON body")]
    BodyAndJson,
    /// The URL does not parse.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL that was given.
        url: String,
        /// Why it does not parse.
        reason: url::ParseError,
    },
    /// The URL's scheme is neither `http` nor `https`.
    #[error("unsupported URL scheme {scheme:?} (only http and https)")]
    UnsupportedScheme {
        /// The scheme of the URL.
        scheme: String,
    },
    /// A header name is empty or holds characters a header name cannot.
    #[error("invalid header name {name:?}")]
    InvalidHeaderName {
        /// The name that was given.
        name: String,
    },
    /// A header value holds a control character (such as CR or LF).
    #[error("invalid value for header {name:?}")]
    InvalidHeaderValue {
        /// The name of the header.
        name: String,
    },
    /// The timeout is zero.
    #[error("the timeout must be greater than zero")]
    InvalidTimeout,
    /// A secret reference (in a header or a query parameter) has an empty name.
    #[error("empty secret name for {target:?}")]
    EmptySecretName {
        /// The header or query parameter that refers to the secret.
        target: String,
    },
    /// A preprocessor name is empty.
    #[error("preprocessor names cannot be empty")]
    EmptyPreprocessorName,
}

/// An HTTP request to hand off: method, URL (query parameters included),
/// headers, body, timeout, redirect limit, secret query parameters and named
/// preprocessors.
///
/// Built and validated with [`RequestBuilder`]; loaded with the same checks by
/// [`Request::from_json`]. Serializes as the wire format's request object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: Method,
    url: Url,
    headers: Headers,
    body: Option<Bytes>,
    timeout: Option<Duration>,
    max_redirects: Option<u32>,
    secret_params: BTreeMap<String, SecretRef>,
    preprocessors: Vec<String>,
    options: RequestOptions,
}

macro_rules! method_constructors {
    ($($(#[$doc:meta])* $name:ident => $method:ident;)*) => {
        $($(#[$doc])*
        pub fn $name(url: impl AsRef<str>) -> RequestBuilder {
            Self::builder(Method::$method, url)
        })*
    };
}

impl Request {
    /// Starts a request with this method and URL.
    pub fn builder(method: Method, url: impl AsRef<str>) -> RequestBuilder {
        RequestBuilder::new(method, url.as_ref().to_owned())
    }

    method_constructors! {
        /// Starts a GET request.
        get => Get;
        /// Starts a POST request.
        post => Post;
        /// Starts a PUT request.
        put => Put;
        /// Starts a PATCH request.
        patch => Patch;
        /// Starts a DELETE request.
        delete => Delete;
        /// Starts a HEAD request.
        head => Head;
        /// Starts an OPTIONS request.
        options => Options;
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The URL, query parameters included (secret parameters are not).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The `content-type` header, when it is a plain value.
    pub fn content_type(&self) -> Option<&str> {
        self.headers.get_str("content-type")
    }

    /// The body; `None` when there is none (an empty body counts as none).
    pub fn body(&self) -> Option<&Bytes> {
        self.body.as_ref()
    }

    /// The timeout of the whole request; `None` uses the processor's default.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The most redirects to follow; `None` uses the processor's default,
    /// `Some(0)` disables redirects.
    pub fn max_redirects(&self) -> Option<u32> {
        self.max_redirects
    }

    /// Query parameters whose values are secrets, resolved at send time:
    /// parameter name to secret reference.
    pub fn secret_params(&self) -> &BTreeMap<String, SecretRef> {
        &self.secret_params
    }

    /// Names of the preprocessors to run on the outgoing request, in order.
    pub fn preprocessors(&self) -> &[String] {
        &self.preprocessors
    }

    /// The resilience options (empty unless set).
    pub fn request_options(&self) -> &RequestOptions {
        &self.options
    }

    /// A builder holding everything this request has, to derive a changed
    /// request (for a redirect hop, say). The URL keeps its query parameters.
    pub fn to_builder(&self) -> RequestBuilder {
        RequestBuilder {
            method: self.method,
            url: self.url.as_str().to_owned(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.to_owned(), v.clone()))
                .collect(),
            body: self.body.clone(),
            json: None,
            params: Vec::new(),
            secret_params: self.secret_params.clone(),
            timeout: self.timeout,
            max_redirects: self.max_redirects,
            preprocessors: self.preprocessors.clone(),
            options: self.options.clone(),
        }
    }

    /// The wire format's request object. `secret_params` and `preprocessors`
    /// are left out when empty; the body is a [`Payload`] encoded for the
    /// request's content type, or `null`.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("http_method".into(), self.method.as_lower().into());
        map.insert("url".into(), self.url.as_str().into());
        map.insert("headers".into(), self.headers.to_json());
        map.insert(
            "body".into(),
            self.body.as_ref().map_or(Value::Null, |b| {
                Payload::encode(b, self.content_type()).to_json()
            }),
        );
        map.insert(
            "timeout".into(),
            self.timeout.map_or(Value::Null, timeout_to_json),
        );
        map.insert(
            "max_redirects".into(),
            self.max_redirects.map_or(Value::Null, Value::from),
        );
        if !self.secret_params.is_empty() {
            let params: Map<String, Value> = self
                .secret_params
                .iter()
                .map(|(name, secret)| (name.clone(), secret.to_json()))
                .collect();
            map.insert("secret_params".into(), Value::Object(params));
        }
        if !self.preprocessors.is_empty() {
            map.insert("preprocessors".into(), self.preprocessors.clone().into());
        }
        if !self.options.is_empty() {
            map.insert("options".into(), self.options.to_json());
        }
        Value::Object(map)
    }

    /// Loads a request object, applying the same rules as
    /// [`RequestBuilder::build`]; the error names the offending field.
    pub fn from_json(value: &Value) -> Result<Request, WireError> {
        Self::load(value, "")
    }

    pub(crate) fn load(value: &Value, path: &str) -> Result<Request, WireError> {
        let fields = Fields::new(value, path)?;
        let method = fields.method("http_method")?;
        let url = fields.string("url")?;
        let headers = match fields.value("headers") {
            Some(v) => Headers::load(v, &fields.path_of("headers"))?,
            None => Headers::new(),
        };
        let body = load_body(&fields, "body", headers.get_str("content-type"))?;
        let timeout = fields.opt_seconds("timeout")?;
        let max_redirects = fields
            .opt_u64("max_redirects")?
            .map(|n| {
                u32::try_from(n).map_err(|_| {
                    WireError::new(
                        fields.path_of("max_redirects"),
                        WireErrorKind::OutOfRange {
                            value: n.to_string(),
                        },
                    )
                })
            })
            .transpose()?;
        let mut secret_params = BTreeMap::new();
        if let Some(v) = fields.value("secret_params") {
            let params_path = fields.path_of("secret_params");
            let params = Fields::new(v, &params_path)?;
            for (name, v) in params.entries() {
                secret_params.insert(name.clone(), SecretRef::load(v, &join(&params_path, name))?);
            }
        }
        let preprocessors = fields.strings("preprocessors")?;
        let options = match fields.value("options") {
            Some(v) => RequestOptions::load(v, &fields.path_of("options"))?,
            None => RequestOptions::default(),
        };

        let builder = RequestBuilder {
            method,
            url: url.to_owned(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_owned(), v.clone()))
                .collect(),
            body,
            json: None,
            params: Vec::new(),
            secret_params,
            timeout,
            max_redirects,
            preprocessors,
            options,
        };
        builder.build().map_err(|e| {
            let field = match &e {
                RequestValidationError::BodyNotAllowed { .. }
                | RequestValidationError::BodyAndJson => "body".to_owned(),
                RequestValidationError::InvalidUrl { .. }
                | RequestValidationError::UnsupportedScheme { .. } => "url".to_owned(),
                RequestValidationError::InvalidHeaderName { .. } => "headers".to_owned(),
                RequestValidationError::InvalidHeaderValue { name } => join("headers", name),
                RequestValidationError::InvalidTimeout => "timeout".to_owned(),
                RequestValidationError::EmptySecretName { target } => {
                    if headers.contains(target) {
                        join("headers", target)
                    } else {
                        join("secret_params", target)
                    }
                }
                RequestValidationError::EmptyPreprocessorName => "preprocessors".to_owned(),
            };
            WireError::new(join(path, &field), WireErrorKind::Request(e))
        })
    }
}

serde_via_json!(Request);

/// Whole seconds as a JSON integer (`30`), anything else as a float (`1.5`).
fn timeout_to_json(d: Duration) -> Value {
    if d.subsec_nanos() == 0 {
        Value::from(d.as_secs())
    } else {
        Value::from(d.as_secs_f64())
    }
}

/// Builds a [`Request`]; [`RequestBuilder::build`] validates it.
///
/// Setters take and return the builder. Nothing is checked until `build`.
#[must_use = "a builder does nothing until `build` is called"]
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    method: Method,
    url: String,
    headers: Vec<(String, HeaderValue)>,
    body: Option<Bytes>,
    json: Option<String>,
    params: Vec<(String, String)>,
    secret_params: BTreeMap<String, SecretRef>,
    timeout: Option<Duration>,
    max_redirects: Option<u32>,
    preprocessors: Vec<String>,
    options: RequestOptions,
}

impl RequestBuilder {
    fn new(method: Method, url: String) -> Self {
        Self {
            method,
            url,
            headers: Vec::new(),
            body: None,
            json: None,
            params: Vec::new(),
            secret_params: BTreeMap::new(),
            timeout: None,
            max_redirects: None,
            preprocessors: Vec::new(),
            options: RequestOptions::default(),
        }
    }

    fn set_header(mut self, name: String, value: HeaderValue) -> Self {
        match self
            .headers
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            Some(entry) => *entry = (name, value),
            None => self.headers.push((name, value)),
        }
        self
    }

    /// Sets a header, replacing any value set earlier under the same name
    /// (whatever its case). Names are lower-cased. No headers by default.
    pub fn header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_header(name.into(), HeaderValue::Value(value.into()))
    }

    /// Sets a header to the secret registered under `secret_name`, resolved
    /// when the request is sent; replaces any earlier value.
    pub fn secret_header(self, name: impl Into<String>, secret_name: impl Into<String>) -> Self {
        self.set_header(
            name.into(),
            HeaderValue::Secret(SecretRef::new(secret_name)),
        )
    }

    /// Sets several headers, as [`RequestBuilder::header`] does for each.
    pub fn headers<I, K, V>(self, headers: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        headers
            .into_iter()
            .fold(self, |builder, (name, value)| builder.header(name, value))
    }

    /// Sets the body. No body by default; an empty body counts as none.
    /// Not allowed on GET, DELETE, HEAD and OPTIONS, nor together with
    /// [`RequestBuilder::json`].
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets a JSON body: `value` serialized, with `content-type:
    /// application/json; charset=utf-8` unless a content type is set. Not
    /// allowed together with [`RequestBuilder::body`].
    pub fn json(mut self, value: &Value) -> Self {
        self.json = Some(value.to_string());
        self
    }

    /// Adds a query parameter, form-encoded and appended to the URL (after
    /// any query it already has) when the request is built.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// Adds a query parameter whose value is the secret registered under
    /// `secret_name`; it is kept out of the URL and resolved at send time.
    pub fn secret_param(mut self, name: impl Into<String>, secret_name: impl Into<String>) -> Self {
        self.secret_params
            .insert(name.into(), SecretRef::new(secret_name));
        self
    }

    /// Sets the timeout of the whole request. Default: none (the processor's
    /// request timeout applies). Must be greater than zero.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the most redirects to follow; 0 disables redirects. Default: none
    /// (the processor's `max_redirects` applies).
    pub fn max_redirects(mut self, max_redirects: u32) -> Self {
        self.max_redirects = Some(max_redirects);
        self
    }

    /// Adds a named preprocessor, run on the outgoing request after those
    /// added before it. None by default.
    pub fn preprocessor(mut self, name: impl Into<String>) -> Self {
        self.preprocessors.push(name.into());
        self
    }

    /// Sets every resilience option at once (none by default).
    pub fn request_options(mut self, options: RequestOptions) -> Self {
        self.options = options;
        self
    }

    /// Dispatch priority, also sent upstream as `X-Request-Priority` (default normal).
    pub fn priority(mut self, priority: Priority) -> Self {
        self.options.priority = Some(priority);
        self
    }

    /// One budget for the whole task: queue wait and every attempt (none by default).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.options.deadline = Some(deadline);
        self
    }

    /// An idempotency key, sent as `Idempotency-Key`; it makes a POST or
    /// PATCH safe to retry (none by default).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.options.idempotency_key = Some(key.into());
        self
    }

    /// How attempts are made (default: by method).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.options.strategy = Some(strategy);
        self
    }

    /// Validates and builds the request.
    ///
    /// Fails when the URL does not parse or is not `http`/`https`, a header
    /// name or value is invalid, a body is given for GET, DELETE, HEAD or
    /// OPTIONS, both a body and JSON are given, the timeout is zero, or a
    /// secret or preprocessor name is empty.
    pub fn build(self) -> Result<Request, RequestValidationError> {
        let mut url = parse_http_url(&self.url)?;
        if !self.params.is_empty() {
            url.query_pairs_mut().extend_pairs(&self.params);
        }

        let mut headers = Headers::new();
        for (name, value) in self.headers {
            validate_header_name(&name)?;
            match &value {
                HeaderValue::Value(v) => validate_header_value(&name, v)?,
                HeaderValue::Secret(s) if s.name.is_empty() => {
                    return Err(RequestValidationError::EmptySecretName {
                        target: name.to_ascii_lowercase(),
                    })
                }
                HeaderValue::Secret(_) => {}
            }
            headers.insert(name, value);
        }

        let body = match (self.body.filter(|b| !b.is_empty()), self.json) {
            (Some(_), Some(_)) => return Err(RequestValidationError::BodyAndJson),
            (Some(body), None) => Some(body),
            (None, Some(json)) => {
                if !headers.contains("content-type") {
                    headers.insert("content-type", JSON_CONTENT_TYPE);
                }
                Some(Bytes::from(json))
            }
            (None, None) => None,
        };
        if body.is_some() && !self.method.allows_body() {
            return Err(RequestValidationError::BodyNotAllowed {
                method: self.method,
            });
        }

        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(RequestValidationError::InvalidTimeout);
        }
        if let Some((name, _)) = self.secret_params.iter().find(|(_, s)| s.name.is_empty()) {
            return Err(RequestValidationError::EmptySecretName {
                target: name.clone(),
            });
        }
        if self.preprocessors.iter().any(String::is_empty) {
            return Err(RequestValidationError::EmptyPreprocessorName);
        }

        Ok(Request {
            method: self.method,
            url,
            headers,
            body,
            timeout: self.timeout,
            max_redirects: self.max_redirects,
            secret_params: self.secret_params,
            preprocessors: self.preprocessors,
            options: self.options,
        })
    }
}

/// Parses an absolute `http` or `https` URL.
pub(crate) fn parse_http_url(url: &str) -> Result<Url, RequestValidationError> {
    let parsed = Url::parse(url).map_err(|reason| RequestValidationError::InvalidUrl {
        url: url.to_owned(),
        reason,
    })?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        other => Err(RequestValidationError::UnsupportedScheme {
            scheme: other.to_owned(),
        }),
    }
}

/// A header name must be a non-empty RFC 9110 token.
fn validate_header_name(name: &str) -> Result<(), RequestValidationError> {
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(RequestValidationError::InvalidHeaderName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// A header value must not hold control characters other than tab.
fn validate_header_value(name: &str, value: &str) -> Result<(), RequestValidationError> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(RequestValidationError::InvalidHeaderValue {
            name: name.to_ascii_lowercase(),
        });
    }
    Ok(())
}
