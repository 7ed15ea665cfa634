//! HTTP requests, validated when built, and their JSON form.

use std::{collections::BTreeMap, fmt, time::Duration};

use bytes::Bytes;
use serde_json::{Map, Value};
use url::Url;

use crate::{
    credentials::{redact_userinfo, UrlCredentials},
    fields::{join, serde_via_json, Fields},
    headers::{HeaderValue, Headers},
    limits::{Bound, LimitError, WireLimits},
    method::Method,
    options::{Priority, RequestOptions, Strategy},
    payload::{load_body, Payload},
    secret::SecretRef,
    wire_error::{WireError, WireErrorKind},
};

/// The content type a [`RequestBuilder::json`] body gets when none was given.
pub const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// The request headers that carry an idempotency key, lower-cased:
/// `idempotency-key` and `x-idempotency-key` (see
/// [`Request::has_idempotency_key`]).
pub const IDEMPOTENCY_KEY_HEADERS: [&str; 2] = ["idempotency-key", "x-idempotency-key"];

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
        /// The URL that was given, any user name and password in it replaced
        /// by `***`.
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
    /// The user name or password of the URL is not UTF-8 once
    /// percent-decoded.
    #[error("the user name or password of the URL is not UTF-8 once percent-decoded")]
    InvalidUrlCredentials,
    /// The resilience options hold a value their JSON form would refuse
    /// (an empty idempotency key, a backoff factor below 1, a status code out
    /// of range, zero attempts…): what builds is what loads.
    #[error("invalid {reason}")]
    InvalidOptions {
        /// The loader's message, naming the option.
        reason: String,
    },
    /// A value is outside one of the [`WireLimits`]; the error names the
    /// field and the bound.
    #[error("{0}")]
    Limit(LimitError),
}

impl From<LimitError> for RequestValidationError {
    fn from(e: LimitError) -> Self {
        RequestValidationError::Limit(e)
    }
}

/// An HTTP request to hand off: method, URL (query parameters included),
/// headers, body, timeout, redirect limit, secret query parameters and named
/// preprocessors.
///
/// Built and validated with [`RequestBuilder`]; loaded with the same checks by
/// [`Request::from_json`]. Both keep to [`WireLimits`] (the default ones
/// unless given others). Serializes as the wire format's request object.
///
/// # Credentials in the URL
///
/// A user name and password in the URL (`https://user:pass@host/`) are taken
/// out of it when the request is built or loaded: [`Request::url`] and the
/// JSON hold the URL without them, so no outcome (`url`, `redirects`) or
/// error carries them. They are kept beside it as
/// [`Request::url_credentials`], never serialized nor shown by `Debug`, for
/// the engine to send as basic authentication to the request's own origin.
/// So they do not survive a round trip through JSON; to persist credentials,
/// use a secret header (`authorization` set to a [`SecretRef`]).
///
/// ```
/// use patient_wire::Request;
///
/// let request = Request::get("https://ada:s3cret@api.example.com/me").build()?;
/// assert_eq!(request.url().as_str(), "https://api.example.com/me");
/// assert_eq!(request.to_json()["url"], "https://api.example.com/me");
/// let credentials = request.url_credentials().unwrap();
/// assert_eq!((credentials.username(), credentials.password()), ("ada", Some("s3cret")));
/// assert!(!format!("{request:?}").contains("s3cret"));
/// # Ok::<(), patient_wire::RequestValidationError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    method: Method,
    url: Url,
    url_credentials: Option<UrlCredentials>,
    headers: Headers,
    body: Option<Bytes>,
    timeout: Option<Duration>,
    max_redirects: Option<u32>,
    secret_params: BTreeMap<String, SecretRef>,
    preprocessors: Vec<String>,
    options: RequestOptions,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("url", &self.url.as_str())
            .field(
                "url_credentials",
                &self.url_credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("headers", &self.headers)
            .field("body", &self.body)
            .field("timeout", &self.timeout)
            .field("max_redirects", &self.max_redirects)
            .field("secret_params", &self.secret_params)
            .field("preprocessors", &self.preprocessors)
            .field("options", &self.options)
            .finish()
    }
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

    /// The URL, query parameters included (secret parameters are not), and
    /// without any user name or password (see
    /// [`Request::url_credentials`]).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The user name and password that were in the URL, taken out of it
    /// (see [Credentials in the URL](Request#credentials-in-the-url)). To be
    /// sent as `Authorization: Basic …` when no `authorization` header is
    /// set, and only to the origin of [`Request::url`].
    pub fn url_credentials(&self) -> Option<&UrlCredentials> {
        self.url_credentials.as_ref()
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

    /// The timeout of one attempt (each retry gets its own; the `deadline`
    /// option bounds them all); `None` uses the processor's default.
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

    /// Whether the request carries an idempotency key, which makes POST and
    /// PATCH safe to retry: `options.idempotency_key`, or an
    /// `Idempotency-Key` or `X-Idempotency-Key` header set by the caller (a
    /// plain value that is not blank, or a secret reference).
    pub fn has_idempotency_key(&self) -> bool {
        self.options.idempotency_key.is_some()
            || IDEMPOTENCY_KEY_HEADERS.iter().any(|name| {
                self.headers
                    .get(name)
                    .is_some_and(|value| value.as_str().is_none_or(|text| !text.trim().is_empty()))
            })
    }

    /// A builder holding everything this request has, to derive a changed
    /// request (for a redirect hop, say). The URL keeps its query parameters;
    /// the URL's credentials are kept too.
    pub fn to_builder(&self) -> RequestBuilder {
        RequestBuilder {
            method: self.method,
            url: self.url.as_str().to_owned(),
            url_credentials: self.url_credentials.clone(),
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
        let options = self.options.to_json();
        if !options.is_null() {
            map.insert("options".into(), options);
        }
        Value::Object(map)
    }

    /// Loads a request object within [`WireLimits::default`], applying the
    /// same rules as [`RequestBuilder::build`]; the error names the offending
    /// field. A user name and password in the URL are taken out of it (see
    /// [Credentials in the URL](Request#credentials-in-the-url)).
    pub fn from_json(value: &Value) -> Result<Request, WireError> {
        Self::from_json_with_limits(value, &WireLimits::default())
    }

    /// Loads a request object within `limits`, applying the same rules as
    /// [`RequestBuilder::build_with_limits`].
    pub fn from_json_with_limits(value: &Value, limits: &WireLimits) -> Result<Request, WireError> {
        Self::load(value, "", limits)
    }

    pub(crate) fn load(
        value: &Value,
        path: &str,
        limits: &WireLimits,
    ) -> Result<Request, WireError> {
        let fields = Fields::new(value, path)?;
        let method = fields.method("http_method")?;
        let url = fields.string("url")?;
        WireLimits::check_len(
            fields.path_of("url"),
            "max_url_len",
            Bound::Bytes(limits.max_url_len),
            url.len(),
        )?;
        let headers = match fields.value("headers") {
            Some(v) => {
                let headers_path = fields.path_of("headers");
                if let Value::Object(map) = v {
                    WireLimits::check_len(
                        headers_path.as_str(),
                        "max_headers",
                        Bound::Count(limits.max_headers),
                        map.len(),
                    )?;
                }
                Headers::load(v, &headers_path)?
            }
            None => Headers::new(),
        };
        let body = load_body(&fields, "body", headers.get_str("content-type"), limits)?;
        let timeout = fields.opt_bounded_seconds("timeout", "max_timeout", limits.max_timeout)?;
        let max_redirects = match fields.opt_u64("max_redirects")? {
            None => None,
            Some(n) => {
                let path = fields.path_of("max_redirects");
                WireLimits::check_number(
                    path.as_str(),
                    "max_redirects",
                    limits.max_redirects.into(),
                    n,
                )?;
                Some(u32::try_from(n).map_err(|_| {
                    WireError::new(
                        path,
                        WireErrorKind::OutOfRange {
                            value: n.to_string(),
                        },
                    )
                })?)
            }
        };
        let mut secret_params = BTreeMap::new();
        if let Some(v) = fields.value("secret_params") {
            let params_path = fields.path_of("secret_params");
            let params = Fields::new(v, &params_path)?;
            WireLimits::check_len(
                params_path.as_str(),
                "max_secret_params",
                Bound::Count(limits.max_secret_params),
                params.len(),
            )?;
            for (name, v) in params.entries() {
                secret_params.insert(name.clone(), SecretRef::load(v, &join(&params_path, name))?);
            }
        }
        if let Some(Value::Array(items)) = fields.value("preprocessors") {
            WireLimits::check_len(
                fields.path_of("preprocessors"),
                "max_preprocessors",
                Bound::Count(limits.max_preprocessors),
                items.len(),
            )?;
        }
        let preprocessors = fields.strings("preprocessors")?;
        let options = match fields.value("options") {
            Some(v) => RequestOptions::load(v, &fields.path_of("options"), limits)?,
            None => RequestOptions::default(),
        };

        let builder = RequestBuilder {
            method,
            url: url.to_owned(),
            url_credentials: None,
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
        builder.build_with_limits(limits).map_err(|e| {
            let field = match &e {
                RequestValidationError::Limit(limit) => {
                    let field = join(path, limit.field());
                    return WireError::from(limit.clone().at(field));
                }
                RequestValidationError::BodyNotAllowed { .. }
                | RequestValidationError::BodyAndJson => "body".to_owned(),
                RequestValidationError::InvalidUrl { .. }
                | RequestValidationError::UnsupportedScheme { .. }
                | RequestValidationError::InvalidUrlCredentials => "url".to_owned(),
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
                RequestValidationError::InvalidOptions { .. } => "options".to_owned(),
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
/// Setters take and return the builder. Nothing is checked until `build`
/// (the bounds of [`WireLimits`] included).
#[must_use = "a builder does nothing until `build` is called"]
#[derive(Clone)]
pub struct RequestBuilder {
    method: Method,
    url: String,
    /// Credentials taken out of an earlier URL (by [`Request::to_builder`] or
    /// a [`RequestTemplate`](crate::RequestTemplate)); those of `url` win.
    url_credentials: Option<UrlCredentials>,
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

impl fmt::Debug for RequestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBuilder")
            .field("method", &self.method)
            .field("url", &redact_userinfo(&self.url))
            .field(
                "url_credentials",
                &self.url_credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("headers", &self.headers)
            .field("body", &self.body)
            .field("json", &self.json)
            .field("params", &self.params)
            .field("secret_params", &self.secret_params)
            .field("timeout", &self.timeout)
            .field("max_redirects", &self.max_redirects)
            .field("preprocessors", &self.preprocessors)
            .field("options", &self.options)
            .finish()
    }
}

impl RequestBuilder {
    fn new(method: Method, url: String) -> Self {
        Self {
            method,
            url,
            url_credentials: None,
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

    /// Sets the timeout of one attempt (each retry gets its own; the
    /// `deadline` option bounds the whole request). Default: none (the processor's
    /// request timeout applies). Must be greater than zero and at most
    /// [`WireLimits::max_timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the most redirects to follow; 0 disables redirects. Default: none
    /// (the processor's `max_redirects` applies). At most
    /// [`WireLimits::max_redirects`].
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

    /// One budget for the whole task: queue wait and every attempt (none by
    /// default). At most [`WireLimits::max_deadline`].
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.options.deadline = Some(deadline);
        self
    }

    /// An idempotency key, sent as `Idempotency-Key`; it makes a POST or
    /// PATCH safe to retry (none by default). At most
    /// [`WireLimits::max_key_len`] bytes.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.options.idempotency_key = Some(key.into());
        self
    }

    /// How attempts are made (default: by method).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.options.strategy = Some(strategy);
        self
    }

    /// Sets the credentials to send unless the URL has its own.
    pub(crate) fn with_url_credentials(mut self, credentials: Option<UrlCredentials>) -> Self {
        self.url_credentials = credentials;
        self
    }

    /// Validates and builds the request within [`WireLimits::default`].
    ///
    /// Fails when the URL does not parse or is not `http`/`https`, a header
    /// name or value is invalid, a body is given for GET, DELETE, HEAD or
    /// OPTIONS, both a body and JSON are given, the timeout is zero, a
    /// secret or preprocessor name is empty, or a value is outside the
    /// limits ([`RequestValidationError::Limit`]). A user name and password
    /// in the URL are taken out of it (see
    /// [Credentials in the URL](Request#credentials-in-the-url)).
    pub fn build(self) -> Result<Request, RequestValidationError> {
        self.build_with_limits(&WireLimits::default())
    }

    /// Validates and builds the request, as [`RequestBuilder::build`] does,
    /// within `limits`.
    pub fn build_with_limits(self, limits: &WireLimits) -> Result<Request, RequestValidationError> {
        let url_limit = Bound::Bytes(limits.max_url_len);
        WireLimits::check_len("url", "max_url_len", url_limit, self.url.len())?;
        let mut url = parse_http_url(&self.url)?;
        let url_credentials = UrlCredentials::take_from(&mut url)?.or(self.url_credentials);
        if !self.params.is_empty() {
            url.query_pairs_mut().extend_pairs(&self.params);
            WireLimits::check_len("url", "max_url_len", url_limit, url.as_str().len())?;
        }

        WireLimits::check_len(
            "headers",
            "max_headers",
            Bound::Count(limits.max_headers),
            self.headers.len(),
        )?;
        let mut headers = Headers::new();
        let mut headers_size = 0_usize;
        for (name, value) in self.headers {
            WireLimits::check_len(
                "headers",
                "max_header_name_len",
                Bound::Bytes(limits.max_header_name_len),
                name.len(),
            )?;
            validate_header_name(&name)?;
            match &value {
                HeaderValue::Value(v) => {
                    WireLimits::check_len(
                        join("headers", &name.to_ascii_lowercase()),
                        "max_header_value_len",
                        Bound::Bytes(limits.max_header_value_len),
                        v.len(),
                    )?;
                    validate_header_value(&name, v)?;
                    headers_size = headers_size.saturating_add(name.len() + v.len());
                }
                HeaderValue::Secret(s) if s.name.is_empty() => {
                    return Err(RequestValidationError::EmptySecretName {
                        target: name.to_ascii_lowercase(),
                    })
                }
                HeaderValue::Secret(s) => {
                    headers_size = headers_size.saturating_add(name.len() + s.name.len());
                }
            }
            headers.insert(name, value);
        }
        WireLimits::check_len(
            "headers",
            "max_headers_size",
            Bound::Bytes(limits.max_headers_size),
            headers_size,
        )?;

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
        if let Some(body) = &body {
            WireLimits::check_len(
                "body",
                "max_body_size",
                Bound::Bytes(limits.max_body_size),
                body.len(),
            )?;
        }

        if let Some(timeout) = self.timeout {
            if timeout.is_zero() {
                return Err(RequestValidationError::InvalidTimeout);
            }
            WireLimits::check_duration("timeout", "max_timeout", limits.max_timeout, timeout)?;
        }
        if let Some(n) = self.max_redirects {
            WireLimits::check_number(
                "max_redirects",
                "max_redirects",
                limits.max_redirects.into(),
                n.into(),
            )?;
        }
        WireLimits::check_len(
            "secret_params",
            "max_secret_params",
            Bound::Count(limits.max_secret_params),
            self.secret_params.len(),
        )?;
        if let Some((name, _)) = self.secret_params.iter().find(|(_, s)| s.name.is_empty()) {
            return Err(RequestValidationError::EmptySecretName {
                target: name.clone(),
            });
        }
        WireLimits::check_len(
            "preprocessors",
            "max_preprocessors",
            Bound::Count(limits.max_preprocessors),
            self.preprocessors.len(),
        )?;
        if self.preprocessors.iter().any(String::is_empty) {
            return Err(RequestValidationError::EmptyPreprocessorName);
        }
        self.options.check_limits("options", limits)?;
        if !self.options.is_empty() {
            // The loader's rules, so that a request built in Rust loads again
            // from its own JSON.
            RequestOptions::from_json_with_limits(&self.options.to_json(), limits).map_err(
                |e| RequestValidationError::InvalidOptions {
                    reason: e.to_string().trim_start_matches("invalid ").to_owned(),
                },
            )?;
        }

        Ok(Request {
            method: self.method,
            url,
            url_credentials,
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
        url: redact_userinfo(url),
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
