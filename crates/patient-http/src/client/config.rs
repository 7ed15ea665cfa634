//! [`ClientConfig`]: every setting of the transport, built and checked by
//! [`ClientConfigBuilder`], whose setters state the defaults.

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

/// Decides whether the transport may connect to an address: every address
/// a host name resolves to (on every redirect hop, since every hop
/// connects), and every IP literal, is passed to it before a connection is
/// opened; a refusal's reason ends the attempt with an error of class
/// `EgressDenied` naming the address. Addresses refused are never
/// connected to, and the addresses checked are the ones connected to (no
/// second lookup). Connections to a configured proxy are not checked (the
/// proxy resolves the target's name; only a target given as an IP literal
/// is checked then).
#[derive(Clone)]
pub struct AddressFilter(std::sync::Arc<FilterFn>);

type FilterFn = dyn Fn(&str, std::net::IpAddr) -> Result<(), String> + Send + Sync;

impl AddressFilter {
    /// A filter called with the host as the URL names it (a name, or the
    /// literal) and one address it resolved to: `Ok` lets the address
    /// through, `Err(reason)` refuses it.
    pub fn new(
        filter: impl Fn(&str, std::net::IpAddr) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        AddressFilter(std::sync::Arc::new(filter))
    }

    /// Asks the filter about `addr`, an address of `host`.
    pub fn check(&self, host: &str, addr: std::net::IpAddr) -> Result<(), String> {
        (self.0)(host, addr)
    }
}

impl fmt::Debug for AddressFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AddressFilter(..)")
    }
}

/// Settings of an [`HttpClient`](super::HttpClient).
///
/// Build one with [`ClientConfig::builder`]; every setting's default is
/// stated on its [`ClientConfigBuilder`] setter. A `ClientConfig` is always
/// valid: the builder checks every field (the TLS material is parsed by
/// [`HttpClient::new`](super::HttpClient::new)).
///
/// ```
/// # use std::time::Duration;
/// # use patient_http::client::ClientConfig;
/// let config = ClientConfig::builder()
///     .request_timeout(Duration::from_secs(30))
///     .connection_pool_size(10)
///     .build()?;
/// assert_eq!(config.connection_pool_size(), 10);
///
/// // An invalid value is refused; the error names the setting.
/// let error = ClientConfig::builder().max_response_size(0).build().unwrap_err();
/// assert_eq!(error.field(), "max_response_size");
/// # Ok::<(), patient_http::client::ClientConfigError>(())
/// ```
#[derive(Clone)]
pub struct ClientConfig {
    request_timeout: Duration,
    connection_timeout: Option<Duration>,
    tcp_keepalive: Option<Duration>,
    address_filter: Option<AddressFilter>,
    stall_timeout: Option<Duration>,
    max_response_size: usize,
    user_agent: String,
    connection_pool_size: usize,
    pool_idle_timeout: Duration,
    pool_max_idle_per_host: usize,
    max_requests_per_connection: Option<u32>,
    max_connections_per_host: Option<usize>,
    pool_wait_timeout: Option<Duration>,
    http_version: HttpVersionPref,
    root_certificates_pem: Vec<String>,
    danger_accept_invalid_certs: bool,
    client_identity: Option<(String, String)>,
    proxy: Option<ProxyConfig>,
    proxy_from_env: bool,
    decompress: bool,
    request_compression: bool,
    request_compression_min_size: usize,
    retries: u32,
}

impl Default for ClientConfig {
    /// The defaults stated on each [`ClientConfigBuilder`] setter.
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(60),
            connection_timeout: None,
            tcp_keepalive: Some(Duration::from_secs(15)),
            address_filter: None,
            stall_timeout: None,
            max_response_size: 1024 * 1024,
            user_agent: "PatientHttp".to_owned(),
            connection_pool_size: 100,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 1024,
            max_requests_per_connection: None,
            max_connections_per_host: None,
            pool_wait_timeout: None,
            http_version: HttpVersionPref::Auto,
            root_certificates_pem: Vec::new(),
            danger_accept_invalid_certs: false,
            client_identity: None,
            proxy: None,
            proxy_from_env: false,
            decompress: false,
            request_compression: false,
            request_compression_min_size: super::decode::COMPRESS_MIN_SIZE,
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
            .field("address_filter", &self.address_filter.is_some())
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
            .field("max_connections_per_host", &self.max_connections_per_host)
            .field("pool_wait_timeout", &self.pool_wait_timeout)
            .field("http_version", &self.http_version)
            .field("root_certificates_pem", &self.root_certificates_pem.len())
            .field(
                "danger_accept_invalid_certs",
                &self.danger_accept_invalid_certs,
            )
            .field(
                "client_identity",
                &self.client_identity.as_ref().map(|_| "<redacted>"),
            )
            .field("proxy", &self.proxy)
            .field("proxy_from_env", &self.proxy_from_env)
            .field("decompress", &self.decompress)
            .field("request_compression", &self.request_compression)
            .field(
                "request_compression_min_size",
                &self.request_compression_min_size,
            )
            .field("retries", &self.retries)
            .finish()
    }
}

impl ClientConfig {
    /// Starts from the defaults ([`ClientConfig::default`]).
    pub fn builder() -> ClientConfigBuilder {
        ClientConfig::default().to_builder()
    }

    /// A builder holding this configuration's settings.
    pub fn to_builder(&self) -> ClientConfigBuilder {
        ClientConfigBuilder {
            config: self.clone(),
        }
    }

    /// The timeout of one attempt; see [`ClientConfigBuilder::request_timeout`].
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The connect timeout, if any; see
    /// [`ClientConfigBuilder::connection_timeout`].
    pub fn connection_timeout(&self) -> Option<Duration> {
        self.connection_timeout
    }

    /// The idle time before TCP keepalive probes, if keepalive is on; see
    /// [`ClientConfigBuilder::tcp_keepalive`].
    pub fn tcp_keepalive(&self) -> Option<Duration> {
        self.tcp_keepalive
    }

    /// The filter of the addresses connected to, if any; see
    /// [`ClientConfigBuilder::address_filter`].
    pub fn address_filter(&self) -> Option<&AddressFilter> {
        self.address_filter.as_ref()
    }

    /// The longest wait for the next piece of a body, if any; see
    /// [`ClientConfigBuilder::stall_timeout`].
    pub fn stall_timeout(&self) -> Option<Duration> {
        self.stall_timeout
    }

    /// The largest response body accepted, in bytes; see
    /// [`ClientConfigBuilder::max_response_size`].
    pub fn max_response_size(&self) -> usize {
        self.max_response_size
    }

    /// The `User-Agent` of requests without one; see
    /// [`ClientConfigBuilder::user_agent`].
    pub fn user_agent(&self) -> &str {
        &self.user_agent
    }

    /// The number of host pools kept; see
    /// [`ClientConfigBuilder::connection_pool_size`].
    pub fn connection_pool_size(&self) -> usize {
        self.connection_pool_size
    }

    /// The idle time after which a kept-alive connection is closed; see
    /// [`ClientConfigBuilder::pool_idle_timeout`].
    pub fn pool_idle_timeout(&self) -> Duration {
        self.pool_idle_timeout
    }

    /// The idle HTTP/1.1 connections kept per host pool; see
    /// [`ClientConfigBuilder::pool_max_idle_per_host`].
    pub fn pool_max_idle_per_host(&self) -> usize {
        self.pool_max_idle_per_host
    }

    /// The requests after which a connection is closed, if limited; see
    /// [`ClientConfigBuilder::max_requests_per_connection`].
    pub fn max_requests_per_connection(&self) -> Option<u32> {
        self.max_requests_per_connection
    }

    /// The HTTP/1.1 connections in use at once per origin, if limited; see
    /// [`ClientConfigBuilder::max_connections_per_host`].
    pub fn max_connections_per_host(&self) -> Option<usize> {
        self.max_connections_per_host
    }

    /// How long a request waits for a connection of a full origin, if
    /// limited; see [`ClientConfigBuilder::pool_wait_timeout`].
    pub fn pool_wait_timeout(&self) -> Option<Duration> {
        self.pool_wait_timeout
    }

    /// The HTTP versions spoken; see [`ClientConfigBuilder::http_version`].
    pub fn http_version(&self) -> HttpVersionPref {
        self.http_version
    }

    /// The extra trusted root certificates (PEM); see
    /// [`ClientConfigBuilder::root_certificates_pem`].
    pub fn root_certificates_pem(&self) -> &[String] {
        &self.root_certificates_pem
    }

    /// Whether server certificates go unverified; see
    /// [`ClientConfigBuilder::danger_accept_invalid_certs`].
    pub fn danger_accept_invalid_certs(&self) -> bool {
        self.danger_accept_invalid_certs
    }

    /// The client certificate chain and private key (PEM), if any; see
    /// [`ClientConfigBuilder::client_identity`].
    pub fn client_identity(&self) -> Option<(&str, &str)> {
        self.client_identity
            .as_ref()
            .map(|(chain, key)| (chain.as_str(), key.as_str()))
    }

    /// The proxy of every request, if any; see [`ClientConfigBuilder::proxy`].
    pub fn proxy(&self) -> Option<&ProxyConfig> {
        self.proxy.as_ref()
    }

    /// Whether the proxy environment variables are read; see
    /// [`ClientConfigBuilder::proxy_from_env`].
    pub fn proxy_from_env(&self) -> bool {
        self.proxy_from_env
    }

    /// Whether responses are decompressed; see
    /// [`ClientConfigBuilder::decompress`].
    pub fn decompress(&self) -> bool {
        self.decompress
    }

    /// Whether request bodies are compressed; see
    /// [`ClientConfigBuilder::request_compression`].
    pub fn request_compression(&self) -> bool {
        self.request_compression
    }

    /// The smallest request body that is compressed, in bytes; see
    /// [`ClientConfigBuilder::request_compression_min_size`].
    pub fn request_compression_min_size(&self) -> usize {
        self.request_compression_min_size
    }

    /// The connection-level retries on a stale pooled connection; see
    /// [`ClientConfigBuilder::retries`].
    pub fn retries(&self) -> u32 {
        self.retries
    }
}

/// Builds a [`ClientConfig`]; [`build`](Self::build) checks every field.
#[derive(Debug, Clone)]
#[must_use]
pub struct ClientConfigBuilder {
    config: ClientConfig,
}

impl ClientConfigBuilder {
    /// Timeout of one attempt of a request: connect, send and reading the
    /// whole body (for a streaming request: until the response head). A
    /// request's own timeout overrides it. Each retry gets its own; the whole
    /// task, every attempt and wait included, is bounded by a deadline
    /// instead ([`UpstreamPolicyBuilder::deadline`](crate::resilience::UpstreamPolicyBuilder::deadline)
    /// or the request's `deadline` option). Must be greater than 0. Default
    /// 60 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Timeout of establishing a connection (TCP, proxy tunnel, TLS), apart
    /// from the request timeout. Must be greater than 0. Default `None`: only
    /// the request timeout applies.
    pub fn connection_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.connection_timeout = timeout;
        self
    }

    /// Checks every address before connecting to it (an egress guard); see
    /// [`AddressFilter`]. Default `None`: every address may be connected to.
    pub fn address_filter(mut self, filter: Option<AddressFilter>) -> Self {
        self.config.address_filter = filter;
        self
    }

    /// Idle time of a TCP connection before keepalive probes are sent
    /// (`SO_KEEPALIVE`), so a dead peer is noticed on a connection waiting
    /// for a slow response; `None` turns keepalive off. Must be greater
    /// than 0. Default 15 s.
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.config.tcp_keepalive = idle;
        self
    }

    /// Longest wait for the next piece of a response body (an idle-read
    /// limit, apart from the attempt timeout, for long responses that
    /// trickle); a request's own stall timeout overrides it. Must be greater
    /// than 0. Default `None`: only the request timeout applies.
    pub fn stall_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.stall_timeout = timeout;
        self
    }

    /// Largest response body accepted by [`send`](super::HttpClient::send),
    /// in bytes (after decompression when decompressing); a larger one ends
    /// in a `response_too_large` error and its connection is dropped.
    /// Streaming requests carry their own limit
    /// ([`StreamingRequest::max_response_size`](super::StreamingRequest::max_response_size)).
    /// Must be greater than 0. Default 1 MiB (1,048,576).
    pub fn max_response_size(mut self, bytes: usize) -> Self {
        self.config.max_response_size = bytes;
        self
    }

    /// `User-Agent` sent unless the request sets one. Must be a valid header
    /// value. Default `PatientHttp`.
    pub fn user_agent(mut self, agent: impl Into<String>) -> Self {
        self.config.user_agent = agent.into();
        self
    }

    /// Number of host pools of kept-alive connections (one per scheme, host,
    /// port and proxy); past it the least recently used is closed. Must be
    /// greater than 0. Default 100.
    pub fn connection_pool_size(mut self, hosts: usize) -> Self {
        self.config.connection_pool_size = hosts;
        self
    }

    /// Idle keep-alive connections older than this are closed. Must be
    /// greater than 0. Default 90 s.
    pub fn pool_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.pool_idle_timeout = timeout;
        self
    }

    /// Idle HTTP/1.1 connections kept per host pool. Default 1024.
    pub fn pool_max_idle_per_host(mut self, connections: usize) -> Self {
        self.config.pool_max_idle_per_host = connections;
        self
    }

    /// A connection is closed after this many requests. Must be greater
    /// than 0. Default `None` (unlimited).
    pub fn max_requests_per_connection(mut self, requests: Option<u32>) -> Self {
        self.config.max_requests_per_connection = requests;
        self
    }

    /// At most this many HTTP/1.1 connections in use at once per origin;
    /// a request past it waits for one to come free (reusing it) for up to
    /// [`pool_wait_timeout`](Self::pool_wait_timeout). Requests over
    /// HTTP/2 share connections and are bounded by the server's stream
    /// limit instead. Must be greater than 0. Default `None` (unlimited).
    pub fn max_connections_per_host(mut self, connections: Option<usize>) -> Self {
        self.config.max_connections_per_host = connections;
        self
    }

    /// How long a request waits for a connection when its origin is at
    /// [`max_connections_per_host`](Self::max_connections_per_host); past
    /// it the attempt fails with a timeout error of class `PoolTimeout`,
    /// nothing sent (so it may be retried). `Some(Duration::ZERO)` fails at
    /// once. Default `None`: wait within the request timeout.
    pub fn pool_wait_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.pool_wait_timeout = timeout;
        self
    }

    /// HTTP versions spoken. An HTTP/2 connection carries as many concurrent
    /// requests as the server's `SETTINGS_MAX_CONCURRENT_STREAMS` allows (100
    /// until the server has said); beyond that the client opens another
    /// connection rather than queue requests. Default
    /// [`HttpVersionPref::Auto`]: ALPN on TLS, HTTP/1.1 on plain `http`.
    pub fn http_version(mut self, pref: HttpVersionPref) -> Self {
        self.config.http_version = pref;
        self
    }

    /// Extra trusted root certificates, added to the webpki roots; each
    /// string is PEM and may hold several certificates. Replaces the list;
    /// [`add_root_certificate_pem`](Self::add_root_certificate_pem) adds one
    /// entry. Each entry is parsed by
    /// [`HttpClient::new`](super::HttpClient::new). Default none.
    pub fn root_certificates_pem<I>(mut self, pems: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.config.root_certificates_pem = pems.into_iter().map(Into::into).collect();
        self
    }

    /// Adds one entry (PEM, possibly several certificates) to
    /// [`root_certificates_pem`](Self::root_certificates_pem).
    pub fn add_root_certificate_pem(mut self, pem: impl Into<String>) -> Self {
        self.config.root_certificates_pem.push(pem.into());
        self
    }

    /// **Dangerous: for tests only.** Disables server certificate
    /// verification entirely: any certificate is accepted — self-signed,
    /// issued by anyone, expired, or for another host — so anyone on the
    /// path can impersonate any server and read or change the traffic. The
    /// handshake signature is still checked against the presented
    /// certificate, and [`root_certificates_pem`](Self::root_certificates_pem)
    /// is not used while this is on. A warning is logged when a client is
    /// built with it. Default `false`.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.config.danger_accept_invalid_certs = accept;
        self
    }

    /// Client certificate chain and private key (both PEM) for mutual TLS,
    /// parsed by [`HttpClient::new`](super::HttpClient::new). Default `None`.
    pub fn client_identity(mut self, identity: Option<(String, String)>) -> Self {
        self.config.client_identity = identity;
        self
    }

    /// Proxy for every request. Default `None`.
    pub fn proxy(mut self, proxy: Option<ProxyConfig>) -> Self {
        self.config.proxy = proxy;
        self
    }

    /// Read `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` (or their lower-case
    /// forms) when [`proxy`](Self::proxy) is not set. Default `false`.
    pub fn proxy_from_env(mut self, enabled: bool) -> Self {
        self.config.proxy_from_env = enabled;
        self
    }

    /// Ask for and decode gzip, deflate and br responses; the decoded size
    /// counts against [`max_response_size`](Self::max_response_size).
    /// Default `false`.
    pub fn decompress(mut self, enabled: bool) -> Self {
        self.config.decompress = enabled;
        self
    }

    /// Gzip request bodies that have no `content-encoding` and are at least
    /// [`request_compression_min_size`](Self::request_compression_min_size)
    /// long. Default `false`.
    pub fn request_compression(mut self, enabled: bool) -> Self {
        self.config.request_compression = enabled;
        self
    }

    /// With [`request_compression`](Self::request_compression) on, the
    /// smallest body that is gzipped, in bytes; a shorter one is sent as it
    /// is (0 compresses every body). Default 1024.
    pub fn request_compression_min_size(mut self, bytes: usize) -> Self {
        self.config.request_compression_min_size = bytes;
        self
    }

    /// Connection-level retries when a pooled connection turns out to be
    /// stale: always when nothing was sent, for idempotent methods also when
    /// the connection closed before any response byte. Default 3.
    pub fn retries(mut self, retries: u32) -> Self {
        self.config.retries = retries;
        self
    }

    /// Checks every setting that can be checked without building TLS state
    /// and returns the configuration, or names the first invalid field.
    pub fn build(self) -> Result<ClientConfig, ClientConfigError> {
        let c = &self.config;
        if c.request_timeout.is_zero() {
            return Err(ClientConfigError::new(
                "request_timeout",
                "must be greater than 0",
            ));
        }
        if c.connection_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ClientConfigError::new(
                "connection_timeout",
                "must be greater than 0",
            ));
        }
        if c.tcp_keepalive.is_some_and(|d| d.is_zero()) {
            return Err(ClientConfigError::new(
                "tcp_keepalive",
                "must be greater than 0 (None turns it off)",
            ));
        }
        if c.stall_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ClientConfigError::new(
                "stall_timeout",
                "must be greater than 0",
            ));
        }
        if c.max_response_size == 0 {
            return Err(ClientConfigError::new(
                "max_response_size",
                "must be greater than 0",
            ));
        }
        if c.connection_pool_size == 0 {
            return Err(ClientConfigError::new(
                "connection_pool_size",
                "must be greater than 0",
            ));
        }
        if c.pool_idle_timeout.is_zero() {
            return Err(ClientConfigError::new(
                "pool_idle_timeout",
                "must be greater than 0",
            ));
        }
        if c.max_connections_per_host == Some(0) {
            return Err(ClientConfigError::new(
                "max_connections_per_host",
                "must be greater than 0 (None leaves it unlimited)",
            ));
        }
        if c.max_requests_per_connection == Some(0) {
            return Err(ClientConfigError::new(
                "max_requests_per_connection",
                "must be greater than 0",
            ));
        }
        if http::HeaderValue::from_str(&c.user_agent).is_err() {
            return Err(ClientConfigError::new(
                "user_agent",
                "is not a valid header value",
            ));
        }
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_invalid_setting_is_refused_by_name() {
        let cases = [
            (
                ClientConfig::builder().request_timeout(Duration::ZERO),
                "request_timeout",
            ),
            (
                ClientConfig::builder().connection_timeout(Some(Duration::ZERO)),
                "connection_timeout",
            ),
            (
                ClientConfig::builder().tcp_keepalive(Some(Duration::ZERO)),
                "tcp_keepalive",
            ),
            (
                ClientConfig::builder().stall_timeout(Some(Duration::ZERO)),
                "stall_timeout",
            ),
            (
                ClientConfig::builder().max_response_size(0),
                "max_response_size",
            ),
            (
                ClientConfig::builder().connection_pool_size(0),
                "connection_pool_size",
            ),
            (
                ClientConfig::builder().pool_idle_timeout(Duration::ZERO),
                "pool_idle_timeout",
            ),
            (
                ClientConfig::builder().max_requests_per_connection(Some(0)),
                "max_requests_per_connection",
            ),
            (
                ClientConfig::builder().user_agent("bad\nagent"),
                "user_agent",
            ),
        ];
        for (builder, field) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().contains(field), "{err}");
            assert!(!err.reason().is_empty(), "{err}");
        }
    }

    #[test]
    fn the_limits_of_each_check_are_accepted() {
        let config = ClientConfig::builder()
            .request_timeout(Duration::from_nanos(1))
            .connection_timeout(Some(Duration::from_nanos(1)))
            .tcp_keepalive(None)
            .stall_timeout(Some(Duration::from_nanos(1)))
            .max_response_size(1)
            .connection_pool_size(1)
            .pool_idle_timeout(Duration::from_nanos(1))
            .max_requests_per_connection(Some(1))
            .retries(0)
            .build()
            .unwrap();
        assert_eq!(config.tcp_keepalive(), None);
        assert_eq!(config.max_response_size(), 1);
        assert_eq!(config.max_requests_per_connection(), Some(1));
    }

    #[test]
    fn default_builds_and_holds_the_documented_defaults() {
        let built = ClientConfig::builder().build().unwrap();
        for config in [ClientConfig::default(), built] {
            assert_eq!(config.request_timeout(), Duration::from_secs(60));
            assert_eq!(config.connection_timeout(), None);
            assert_eq!(config.tcp_keepalive(), Some(Duration::from_secs(15)));
            assert_eq!(config.stall_timeout(), None);
            assert_eq!(config.max_response_size(), 1024 * 1024);
            assert_eq!(config.user_agent(), "PatientHttp");
            assert_eq!(config.connection_pool_size(), 100);
            assert_eq!(config.pool_idle_timeout(), Duration::from_secs(90));
            assert_eq!(config.pool_max_idle_per_host(), 1024);
            assert_eq!(config.max_requests_per_connection(), None);
            assert_eq!(config.http_version(), HttpVersionPref::Auto);
            assert!(config.root_certificates_pem().is_empty());
            assert!(!config.danger_accept_invalid_certs());
            assert!(config.client_identity().is_none());
            assert!(config.proxy().is_none());
            assert!(!config.proxy_from_env());
            assert!(!config.decompress());
            assert!(!config.request_compression());
            assert_eq!(config.request_compression_min_size(), 1024);
            assert_eq!(config.retries(), 3);
        }
        assert!(ClientConfig::default().to_builder().build().is_ok());
    }

    #[test]
    fn to_builder_round_trips_every_setting() {
        let proxy = ProxyConfig::new("http://proxy.test:3128").unwrap();
        let config = ClientConfig::builder()
            .request_timeout(Duration::from_secs(5))
            .connection_timeout(Some(Duration::from_secs(2)))
            .tcp_keepalive(None)
            .stall_timeout(Some(Duration::from_secs(3)))
            .max_response_size(10)
            .user_agent("agent/1")
            .connection_pool_size(7)
            .pool_idle_timeout(Duration::from_secs(4))
            .pool_max_idle_per_host(8)
            .max_requests_per_connection(Some(9))
            .http_version(HttpVersionPref::Http2Only)
            .root_certificates_pem(["first"])
            .add_root_certificate_pem("second")
            .danger_accept_invalid_certs(true)
            .client_identity(Some(("chain".into(), "key".into())))
            .proxy(Some(proxy))
            .proxy_from_env(true)
            .decompress(true)
            .request_compression(true)
            .request_compression_min_size(300)
            .retries(1)
            .build()
            .unwrap();
        let again = config.to_builder().build().unwrap();
        for c in [&config, &again] {
            assert_eq!(c.request_timeout(), Duration::from_secs(5));
            assert_eq!(c.connection_timeout(), Some(Duration::from_secs(2)));
            assert_eq!(c.tcp_keepalive(), None);
            assert_eq!(c.stall_timeout(), Some(Duration::from_secs(3)));
            assert_eq!(c.max_response_size(), 10);
            assert_eq!(c.user_agent(), "agent/1");
            assert_eq!(c.connection_pool_size(), 7);
            assert_eq!(c.pool_idle_timeout(), Duration::from_secs(4));
            assert_eq!(c.pool_max_idle_per_host(), 8);
            assert_eq!(c.max_requests_per_connection(), Some(9));
            assert_eq!(c.http_version(), HttpVersionPref::Http2Only);
            assert_eq!(c.root_certificates_pem(), ["first", "second"]);
            assert!(c.danger_accept_invalid_certs());
            assert_eq!(c.client_identity(), Some(("chain", "key")));
            assert!(c.proxy().is_some());
            assert!(c.proxy_from_env());
            assert!(c.decompress());
            assert!(c.request_compression());
            assert_eq!(c.request_compression_min_size(), 300);
            assert_eq!(c.retries(), 1);
        }
        assert_eq!(format!("{config:?}"), format!("{again:?}"));

        // Replacing the root certificates drops the ones added before.
        let replaced = config
            .to_builder()
            .root_certificates_pem(Vec::<String>::new())
            .build()
            .unwrap();
        assert!(replaced.root_certificates_pem().is_empty());
    }

    #[test]
    fn debug_redacts_the_client_identity() {
        let config = ClientConfig::builder()
            .client_identity(Some(("chain".into(), "private key".into())))
            .build()
            .unwrap();
        let shown = format!("{config:?} {:?}", config.to_builder());
        assert!(!shown.contains("private key"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
