//! Shared settings for many requests to one API.

use std::{fmt, time::Duration};

use url::Url;

use crate::{
    credentials::UrlCredentials,
    headers::{HeaderValue, Headers},
    method::Method,
    request::{parse_http_url, Request, RequestBuilder, RequestValidationError},
};

/// A base URL with default headers, query parameters, timeout and
/// preprocessors, from which requests to one API are built.
///
/// # Joining paths
///
/// A relative path is always joined *under* the base URL's path, whether or
/// not it starts with a slash: with base `https://api.example.com/v1`,
/// both `users/1` and `/users/1` give `https://api.example.com/v1/users/1`
/// (leading slashes are dropped, so `//other.host/x` cannot change the host).
/// A query in the path is appended to any query of the base URL; an empty path
/// gives the base URL itself. A fragment of the base URL is dropped. A path
/// that is an absolute `http://` or `https://` URL is used as is.
///
/// # Headers
///
/// Each request starts with the template's headers; headers set on the
/// returned [`RequestBuilder`] replace them for that request only. The
/// template itself never changes.
///
/// # Credentials
///
/// A user name and password in the base URL (`https://user:pass@host/v1`)
/// are taken out of it, as a [`Request`] does with its own URL: the base URL
/// and every request URL are without them, and each request to a relative
/// path carries them as its [`Request::url_credentials`] (a request to an
/// absolute URL does not).
///
/// ```
/// use patient_wire::RequestTemplate;
///
/// let api = RequestTemplate::new("https://api.example.com/v1")?
///     .header("Accept", "application/json");
/// let request = api.get("users/1").param("fields", "name").build()?;
/// assert_eq!(request.url().as_str(), "https://api.example.com/v1/users/1?fields=name");
/// assert_eq!(request.headers().get_str("accept"), Some("application/json"));
/// # Ok::<(), patient_wire::RequestValidationError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RequestTemplate {
    base_url: Url,
    url_credentials: Option<UrlCredentials>,
    headers: Headers,
    params: Vec<(String, String)>,
    timeout: Option<Duration>,
    preprocessors: Vec<String>,
}

macro_rules! method_shortcuts {
    ($($(#[$doc:meta])* $name:ident => $method:ident;)*) => {
        $($(#[$doc])*
        pub fn $name(&self, path: &str) -> RequestBuilder {
            self.request(Method::$method, path)
        })*
    };
}

impl fmt::Debug for RequestTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestTemplate")
            .field("base_url", &self.base_url.as_str())
            .field(
                "url_credentials",
                &self.url_credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("headers", &self.headers)
            .field("params", &self.params)
            .field("timeout", &self.timeout)
            .field("preprocessors", &self.preprocessors)
            .finish()
    }
}

impl RequestTemplate {
    /// A template for requests under `base_url`, which must be an absolute
    /// `http` or `https` URL. A user name and password in it are taken out
    /// (see [Credentials](RequestTemplate#credentials)).
    pub fn new(base_url: impl AsRef<str>) -> Result<Self, RequestValidationError> {
        let mut base_url = parse_http_url(base_url.as_ref())?;
        let url_credentials = UrlCredentials::take_from(&mut base_url)?;
        Ok(Self {
            base_url,
            url_credentials,
            headers: Headers::new(),
            params: Vec::new(),
            timeout: None,
            preprocessors: Vec::new(),
        })
    }

    /// Adds a default header (replacing an earlier one of the same name).
    /// None by default. Checked when a request is built.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value.into());
        self
    }

    /// Adds a default header whose value is the secret registered under
    /// `secret_name`.
    pub fn secret_header(
        mut self,
        name: impl Into<String>,
        secret_name: impl Into<String>,
    ) -> Self {
        self.headers
            .insert(name, crate::secret::SecretRef::new(secret_name));
        self
    }

    /// Adds a default query parameter, appended before the request's own.
    /// None by default.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.push((name.into(), value.into()));
        self
    }

    /// Sets the default timeout. Default: none (the processor's request
    /// timeout applies); a request may set its own.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Adds a default preprocessor, run before the request's own. None by
    /// default.
    pub fn preprocessor(mut self, name: impl Into<String>) -> Self {
        self.preprocessors.push(name.into());
        self
    }

    /// The base URL, without any user name or password.
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// The user name and password taken out of the base URL.
    pub fn url_credentials(&self) -> Option<&UrlCredentials> {
        self.url_credentials.as_ref()
    }

    /// The default headers.
    pub fn default_headers(&self) -> &Headers {
        &self.headers
    }

    /// The default timeout.
    pub fn default_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The URL a path resolves to (see the type's documentation).
    pub fn url_for(&self, path: &str) -> String {
        if has_http_scheme(path) {
            return path.to_owned();
        }
        let (rest, fragment) = match path.split_once('#') {
            Some((rest, fragment)) => (rest, Some(fragment)),
            None => (path, None),
        };
        let (rel_path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };

        let mut url = self.base_url.clone();
        if !rel_path.is_empty() {
            let joined = format!(
                "{}/{}",
                url.path().trim_end_matches('/'),
                rel_path.trim_start_matches('/')
            );
            url.set_path(&joined);
        }
        if let Some(query) = query.filter(|q| !q.is_empty()) {
            let combined = match url.query().filter(|q| !q.is_empty()) {
                Some(base) => format!("{base}&{query}"),
                None => query.to_owned(),
            };
            url.set_query(Some(&combined));
        }
        url.set_fragment(fragment);
        url.into()
    }

    /// A builder for a request with this method to `path`, with the
    /// template's defaults applied (and the base URL's credentials, for a
    /// relative path).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut builder = Request::builder(method, self.url_for(path));
        if !has_http_scheme(path) {
            builder = builder.with_url_credentials(self.url_credentials.clone());
        }
        for (name, value) in self.headers.iter() {
            builder = match value {
                HeaderValue::Value(v) => builder.header(name, v.as_str()),
                HeaderValue::Secret(s) => builder.secret_header(name, s.name.as_str()),
            };
        }
        for (name, value) in &self.params {
            builder = builder.param(name.as_str(), value.as_str());
        }
        if let Some(timeout) = self.timeout {
            builder = builder.timeout(timeout);
        }
        for name in &self.preprocessors {
            builder = builder.preprocessor(name.as_str());
        }
        builder
    }

    method_shortcuts! {
        /// A GET request to `path`.
        get => Get;
        /// A POST request to `path`.
        post => Post;
        /// A PUT request to `path`.
        put => Put;
        /// A PATCH request to `path`.
        patch => Patch;
        /// A DELETE request to `path`.
        delete => Delete;
        /// A HEAD request to `path`.
        head => Head;
        /// An OPTIONS request to `path`.
        options => Options;
    }
}

fn has_http_scheme(path: &str) -> bool {
    let lower = |n: usize| path.get(..n).map(str::to_ascii_lowercase);
    lower(7).as_deref() == Some("http://") || lower(8).as_deref() == Some("https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(base: &str, path: &str) -> String {
        RequestTemplate::new(base).unwrap().url_for(path)
    }

    #[test]
    fn joins_under_the_base_path() {
        assert_eq!(url("https://h/v1", "users/1"), "https://h/v1/users/1");
        assert_eq!(url("https://h/v1", "/users/1"), "https://h/v1/users/1");
        assert_eq!(url("https://h/v1/", "users/1"), "https://h/v1/users/1");
        assert_eq!(url("https://h/v1/", "/users/1"), "https://h/v1/users/1");
        assert_eq!(url("https://h", "users"), "https://h/users");
        assert_eq!(url("https://h/", "/users"), "https://h/users");
        assert_eq!(url("https://h/v1", ""), "https://h/v1");
        assert_eq!(
            url("https://h/v1", "//evil.example/x"),
            "https://h/v1/evil.example/x"
        );
    }

    #[test]
    fn joins_queries_and_keeps_absolute_urls() {
        assert_eq!(
            url("https://h/v1?key=1", "users?page=2"),
            "https://h/v1/users?key=1&page=2"
        );
        assert_eq!(
            url("https://h/v1", "users?page=2#top"),
            "https://h/v1/users?page=2#top"
        );
        assert_eq!(url("https://h/v1", "HTTPS://other/x"), "HTTPS://other/x");
        assert_eq!(url("https://h/v1", "a b"), "https://h/v1/a%20b");
    }

    #[test]
    fn rejects_bad_base_urls() {
        assert!(matches!(
            RequestTemplate::new("ftp://h"),
            Err(RequestValidationError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            RequestTemplate::new("/relative"),
            Err(RequestValidationError::InvalidUrl { .. })
        ));
    }
}
