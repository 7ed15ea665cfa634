//! Preprocessors: named hooks that see the final outgoing request.
//!
//! A preprocessor runs after secrets are resolved and interceptors ran, just
//! before each send, and again on every redirect hop to the same origin (a
//! cross-origin hop drops them) and on a replay a response hook asked for
//! (so a signature is computed again over what the replay sends). It may
//! set headers and add query parameters, for example to sign the request
//! ([`SigV4`] ships built in).
//!
//! [`Preprocessor::process`] is async: a preprocessor that needs I/O (a
//! credential from a vault, a signing service) awaits it without blocking a
//! runtime worker, and the time it takes counts against the attempt's
//! timeout. A plain closure `Fn(&mut PreparedRequest) -> Result<(), String>`
//! is a preprocessor as it is; an async one implements the trait with
//! [`async_trait`](crate::async_trait):
//!
//! ```
//! use patient_http::{async_trait, preprocess::{PreparedRequest, Preprocessor}, Builder};
//!
//! /// Adds a query parameter read from somewhere that must be awaited.
//! struct Tenant;
//!
//! #[async_trait]
//! impl Preprocessor for Tenant {
//!     async fn process(&self, request: &mut PreparedRequest) -> Result<(), String> {
//!         let tenant = async { "acme" }.await; // e.g. a lookup over the network
//!         request.add_query_param("tenant", tenant);
//!         Ok(())
//!     }
//! }
//!
//! let builder = Builder::new()
//!     .preprocessor("tenant", Tenant)
//!     .preprocessor("version", |request: &mut PreparedRequest| {
//!         request.set_header("x-api-version", "2")
//!     });
//! ```

mod sigv4;

use std::{collections::HashMap, fmt, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method};
pub use sigv4::{AwsCredentials, SigV4, SignatureParts};
use url::Url;

/// Why a preprocessor refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("preprocessor {name:?} failed: {reason}")]
pub struct PreprocessError {
    /// The preprocessor's registered name.
    pub name: String,
    /// What went wrong.
    pub reason: String,
}

/// The request as it will be sent: what a preprocessor sees and may change.
#[derive(Debug)]
pub struct PreparedRequest {
    pub(crate) method: Method,
    pub(crate) url: Url,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) extensions: Extensions,
}

impl PreparedRequest {
    /// A request to prepare (used by tests and custom executors).
    pub fn new(method: Method, url: Url, headers: HeaderMap, body: Bytes) -> Self {
        PreparedRequest {
            method,
            url,
            headers,
            body,
            extensions: Extensions::new(),
        }
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The final URL, with query parameters and secret parameters.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The headers, with secrets resolved.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The headers, to change.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }

    /// The body (empty when there is none).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Values the hooks keep with this request and never send: a request
    /// hook stores one here and the response hooks find it in
    /// [`SentRequest::extensions`](crate::interceptor::SentRequest::extensions)
    /// (how [`BearerAuth`](crate::interceptor::BearerAuth) remembers which
    /// token a request carried). Empty at first, on every send.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The extensions, to change.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// Sets a header, replacing any value it had; the name and value are checked.
    pub fn set_header(&mut self, name: &str, value: &str) -> Result<(), String> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name}"))?;
        self.headers.insert(name, value);
        Ok(())
    }

    /// Appends a query parameter, form-encoded.
    pub fn add_query_param(&mut self, name: &str, value: &str) {
        self.url.query_pairs_mut().append_pair(name, value);
    }

    /// Gzips a body of at least `min_size` bytes that has no
    /// `content-encoding` yet (request compression), before preprocessors
    /// run, so that a signature covers the bytes that are sent.
    pub(crate) fn compress_body(&mut self, min_size: usize) {
        if self.body.len() < min_size || self.headers.contains_key(http::header::CONTENT_ENCODING) {
            return;
        }
        if let Ok(compressed) = crate::client::gzip(&self.body) {
            self.body = compressed;
            self.headers.insert(
                http::header::CONTENT_ENCODING,
                HeaderValue::from_static("gzip"),
            );
            self.headers.remove(http::header::CONTENT_LENGTH);
        }
    }

    pub(crate) fn into_parts(self) -> (Method, Url, HeaderMap, Bytes, Extensions) {
        (
            self.method,
            self.url,
            self.headers,
            self.body,
            self.extensions,
        )
    }
}

/// A hook that sees and may change the outgoing request.
///
/// Implement it with [`async_trait`](crate::async_trait); a closure
/// `Fn(&mut PreparedRequest) -> Result<(), String>` implements it already.
#[async_trait]
pub trait Preprocessor: Send + Sync + 'static {
    /// Changes the request, awaiting what it needs; an `Err` ends the task in
    /// a request error that carries the reason (class `PreprocessError`). It
    /// runs within the attempt's timeout: when that passes first, the
    /// attempt ends as a timeout and the future is dropped.
    async fn process(&self, request: &mut PreparedRequest) -> Result<(), String>;
}

#[async_trait]
impl<F> Preprocessor for F
where
    F: Fn(&mut PreparedRequest) -> Result<(), String> + Send + Sync + 'static,
{
    async fn process(&self, request: &mut PreparedRequest) -> Result<(), String> {
        self(request)
    }
}

/// The preprocessors registered on a processor, by name.
#[derive(Clone, Default)]
pub struct Preprocessors {
    map: HashMap<String, Arc<dyn Preprocessor>>,
}

impl fmt::Debug for Preprocessors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl Preprocessors {
    /// No preprocessors.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) a preprocessor under a name.
    pub fn insert(&mut self, name: impl Into<String>, preprocessor: impl Preprocessor) {
        self.map.insert(name.into(), Arc::new(preprocessor));
    }

    /// Whether one of that name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Runs the named preprocessors in order, awaiting each.
    pub(crate) async fn run(
        &self,
        names: &[String],
        request: &mut PreparedRequest,
    ) -> Result<(), PreprocessError> {
        for name in names {
            let p = self.map.get(name).ok_or_else(|| PreprocessError {
                name: name.clone(),
                reason: "not registered".into(),
            })?;
            p.process(request).await.map_err(|reason| PreprocessError {
                name: name.clone(),
                reason,
            })?;
        }
        Ok(())
    }
}
