//! [`ClientConfig`]: every setting of the transport, with its default.

use std::{fmt, time::Duration};

use super::{error::ClientConfigError, proxy::ProxyConfig};

/// Which HTTP versions the client speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HttpVersionPref {
    /// HTTP/2 or HTTP/1.1 chosen by ALPN on TLS; HTTP/1.1 on plain `http`.
    #[default]
    Auto,
    /// HTTP/1.1 only (ALPN offers only `http/1.1`).
    Http1Only,
    /// HTTP/2 only: ALPN offers only `h2` on TLS; on plain `http` the client
    /// speaks h2c with prior knowledge.
    Http2Only,
}

/// Settings of an [`HttpClient`](super::HttpClient).
///
/// Fields are public; the owned setters of the same names chain:
///
/// ```
/// # use std::time::Duration;
/// # use patient_http::client::ClientConfig;
/// let config = ClientConfig::default()
///     .request_timeout(Duration::from_secs(30))
///     .connection_pool_size(10);
/// assert_eq!(config.connection_pool_size, 10);
/// ```
#[derive(Clone)]
#[must_use]
pub struct ClientConfig {
    /// Timeout of a whole request: connect, send and reading the whole body
    /// (for a streaming request: until the response head). Default 60 s. A
    /// request's own timeout overrides it.
    pub request_timeout: Duration,
    /// Timeout of establishing a connection (TCP, proxy tunnel, TLS).
    /// Default `None`: only the request timeout applies.
    pub connection_timeout: Option<Duration>,
    /// Idle time of a TCP connection before keepalive probes are sent
    /// (`SO_KEEPALIVE`), so a dead peer is noticed on a connection waiting
    /// for a slow response. Default 15 s; `None` turns keepalive off.
    pub tcp_keepalive: Option<Duration>,
    /// Longest wait for the next piece of a response body (an idle-read
    /// limit, apart from the whole-request timeout, for long responses that
    /// trickle). Default `None`: only the request timeout applies.
    pub stall_timeout: Option<Duration>,
    /// Largest response body accepted by [`send`](super::HttpClient::send),
    /// in bytes (after decompression when decompressing). Default 1 MiB.
    /// Must be greater than 0. Streaming requests carry their own limit
    /// ([`StreamingRequest::max_response_size`](super::StreamingRequest::max_response_size)).
    pub max_response_size: usize,
    /// `User-Agent` sent unless the request sets one. Default `PatientHttp`.
    pub user_agent: String,
    /// Number of host pools kept (one per scheme, host, port and proxy); the
    /// least recently used is evicted. Default 100.
    pub connection_pool_size: usize,
    /// Idle keep-alive connections older than this are closed. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per host pool. Default 1024.
    pub pool_max_idle_per_host: usize,
    /// A connection is closed after this many requests. Default `None`
    /// (unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// HTTP versions spoken. Default [`HttpVersionPref::Auto`]. An HTTP/2
    /// connection carries as many concurrent requests as the server's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` allows (100 until the server has
    /// said); beyond that the client opens another connection rather than
    /// queue requests.
    pub http_version: HttpVersionPref,
    /// Extra trusted root certificates (PEM, each string may hold several),
    /// added to the webpki roots. Default none.
    pub extra_root_certs_pem: Vec<String>,
    /// Client certificate chain and private key (both PEM) for mutual TLS.
    /// Default `None`.
    pub client_identity: Option<(String, String)>,
    /// Proxy for every request. Default `None`.
    pub proxy: Option<ProxyConfig>,
    /// Read `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` (or their lower-case
    /// forms) when [`proxy`](Self::proxy) is not set. Default `false`.
    pub proxy_from_env: bool,
    /// Ask for and decode gzip, deflate and br responses; the decoded size
    /// counts against `max_response_size`. Default `false`.
    pub decompress: bool,
    /// Gzip request bodies of 1 KiB or more that have no `content-encoding`.
    /// Default `false`.
    pub request_compression: bool,
    /// Connection-level retries when a pooled connection turns out to be
    /// stale: always when nothing was sent, for idempotent methods also when
    /// the connection closed before any response byte. Default 3.
    pub retries: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(60),
            connection_timeout: None,
            tcp_keepalive: Some(Duration::from_secs(15)),
            stall_timeout: None,
            max_response_size: 1024 * 1024,
            user_agent: "PatientHttp".to_owned(),
            connection_pool_size: 100,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 1024,
            max_requests_per_connection: None,
            http_version: HttpVersionPref::Auto,
            extra_root_certs_pem: Vec::new(),
            client_identity: None,
            proxy: None,
            proxy_from_env: false,
            decompress: false,
            request_compression: false,
            retries: 3,
        }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("request_timeout", &self.request_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("tcp_keepalive", &self.tcp_keepalive)
            .field("stall_timeout", &self.stall_timeout)
            .field("max_response_size", &self.max_response_size)
            .field("user_agent", &self.user_agent)
            .field("connection_pool_size", &self.connection_pool_size)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field(
                "max_requests_per_connection",
                &self.max_requests_per_connection,
            )
            .field("http_version", &self.http_version)
            .field("extra_root_certs_pem", &self.extra_root_certs_pem.len())
            .field(
                "client_identity",
                &self.client_identity.as_ref().map(|_| "<redacted>"),
            )
            .field("proxy", &self.proxy)
            .field("proxy_from_env", &self.proxy_from_env)
            .field("decompress", &self.decompress)
            .field("request_compression", &self.request_compression)
            .field("retries", &self.retries)
            .finish()
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl ClientConfig {
    /// The defaults (same as [`Default`]).
    pub fn new() -> Self {
        Self::default()
    }

    setter!(
        /// Sets [`request_timeout`](Self::request_timeout) (default 60 s).
        request_timeout: Duration
    );
    setter!(
        /// Sets [`connection_timeout`](Self::connection_timeout) (default `None`).
        connection_timeout: Option<Duration>
    );
    setter!(
        /// Sets [`tcp_keepalive`](Self::tcp_keepalive) (default 15 s).
        tcp_keepalive: Option<Duration>
    );
    setter!(
        /// Sets [`stall_timeout`](Self::stall_timeout) (default `None`).
        stall_timeout: Option<Duration>
    );
    setter!(
        /// Sets [`max_response_size`](Self::max_response_size) (default 1 MiB).
        max_response_size: usize
    );
    setter!(
        /// Sets [`connection_pool_size`](Self::connection_pool_size) (default 100).
        connection_pool_size: usize
    );
    setter!(
        /// Sets [`pool_idle_timeout`](Self::pool_idle_timeout) (default 90 s).
        pool_idle_timeout: Duration
    );
    setter!(
        /// Sets [`pool_max_idle_per_host`](Self::pool_max_idle_per_host) (default 1024).
        pool_max_idle_per_host: usize
    );
    setter!(
        /// Sets [`max_requests_per_connection`](Self::max_requests_per_connection) (default `None`).
        max_requests_per_connection: Option<u32>
    );
    setter!(
        /// Sets [`http_version`](Self::http_version) (default `Auto`).
        http_version: HttpVersionPref
    );
    setter!(
        /// Sets [`client_identity`](Self::client_identity) (default `None`).
        client_identity: Option<(String, String)>
    );
    setter!(
        /// Sets [`proxy`](Self::proxy) (default `None`).
        proxy: Option<ProxyConfig>
    );
    setter!(
        /// Sets [`proxy_from_env`](Self::proxy_from_env) (default `false`).
        proxy_from_env: bool
    );
    setter!(
        /// Sets [`decompress`](Self::decompress) (default `false`).
        decompress: bool
    );
    setter!(
        /// Sets [`request_compression`](Self::request_compression) (default `false`).
        request_compression: bool
    );
    setter!(
        /// Sets [`retries`](Self::retries) (default 3).
        retries: u32
    );

    /// Sets [`user_agent`](Self::user_agent) (default `PatientHttp`).
    pub fn user_agent(mut self, value: impl Into<String>) -> Self {
        self.user_agent = value.into();
        self
    }

    /// Adds PEM root certificates to [`extra_root_certs_pem`](Self::extra_root_certs_pem).
    pub fn add_root_certificate_pem(mut self, pem: impl Into<String>) -> Self {
        self.extra_root_certs_pem.push(pem.into());
        self
    }

    /// Checks every setting that can be checked without building TLS state.
    pub fn validate(&self) -> Result<(), ClientConfigError> {
        if self.request_timeout.is_zero() {
            return Err(ClientConfigError::new(
                "request_timeout",
                "must be greater than 0",
            ));
        }
        if self.connection_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ClientConfigError::new(
                "connection_timeout",
                "must be greater than 0",
            ));
        }
        if self.tcp_keepalive.is_some_and(|d| d.is_zero()) {
            return Err(ClientConfigError::new(
                "tcp_keepalive",
                "must be greater than 0 (None turns it off)",
            ));
        }
        if self.stall_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ClientConfigError::new(
                "stall_timeout",
                "must be greater than 0",
            ));
        }
        if self.max_response_size == 0 {
            return Err(ClientConfigError::new(
                "max_response_size",
                "must be greater than 0",
            ));
        }
        if self.connection_pool_size == 0 {
            return Err(ClientConfigError::new(
                "connection_pool_size",
                "must be greater than 0",
            ));
        }
        if self.pool_idle_timeout.is_zero() {
            return Err(ClientConfigError::new(
                "pool_idle_timeout",
                "must be greater than 0",
            ));
        }
        if self.max_requests_per_connection == Some(0) {
            return Err(ClientConfigError::new(
                "max_requests_per_connection",
                "must be greater than 0",
            ));
        }
        if http::HeaderValue::from_str(&self.user_agent).is_err() {
            return Err(ClientConfigError::new(
                "user_agent",
                "is not a valid header value",
            ));
        }
        Ok(())
    }
}
