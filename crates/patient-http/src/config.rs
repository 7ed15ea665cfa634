//! Processor configuration with validated defaults.

use std::time::Duration;

use crate::client::{ClientConfig, ClientConfigBuilder, HttpVersionPref, ProxyConfig};

/// Why a configuration was rejected. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }

    /// The name of the rejected setting, as in [`ConfigBuilder`].
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with its value.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// The settings of a processor, an inline executor or an awaitable client.
///
/// Build one with [`Config::builder`]; every setting's default is stated on its
/// setter (the transport's on [`ClientConfigBuilder`]). A `Config` is always
/// valid: the builder checks every field.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) max_connections: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) raise_error_responses: bool,
    pub(crate) max_redirects: u32,
    pub(crate) payload_store_threshold: usize,
    pub(crate) worker_threads: usize,
    pub(crate) max_in_flight: Option<usize>,
    pub(crate) client: ClientConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 256,
            shutdown_timeout: Duration::from_secs(30),
            raise_error_responses: false,
            max_redirects: 5,
            payload_store_threshold: 64 * 1024,
            worker_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            max_in_flight: None,
            client: ClientConfig::default(),
        }
    }
}

impl Config {
    /// Starts from the defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
            client: ClientConfig::builder(),
        }
    }

    /// Most tasks queued or in flight at once; `enqueue` fails with *at capacity* past it.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// How long `stop` waits for tasks in flight before handing them to `retry`.
    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout
    }

    /// Whether non-2xx responses become HTTP errors for tasks that do not say.
    pub fn raise_error_responses(&self) -> bool {
        self.raise_error_responses
    }

    /// Redirects followed for requests that do not say.
    pub fn max_redirects(&self) -> u32 {
        self.max_redirects
    }

    /// Size in bytes of a serialized payload above which it goes to a payload
    /// store: the threshold of the stores made with
    /// `patient_store::PayloadStores::from_config`, which the codec that
    /// serializes this processor's outcomes (`PayloadCodec::encode_outcome`)
    /// then applies.
    pub fn payload_store_threshold(&self) -> usize {
        self.payload_store_threshold
    }

    /// Number of runtime threads the processor owns.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads
    }

    /// Most tasks executing at once; the rest wait, high priority first.
    pub fn max_in_flight(&self) -> Option<usize> {
        self.max_in_flight
    }

    /// Whole-request timeout for requests that do not set one; see
    /// [`ConfigBuilder::request_timeout`].
    pub fn request_timeout(&self) -> Duration {
        self.client.request_timeout()
    }

    /// The transport settings.
    pub fn client(&self) -> &ClientConfig {
        &self.client
    }
}

/// Builds a [`Config`]; `build` validates every field.
///
/// The transport settings the gem names at this level (`request_timeout`,
/// `max_response_size`, `user_agent`, `connection_pool_size`,
/// `connection_timeout`, `proxy`, `retries`, `http_version`) have setters
/// here that forward to [`ClientConfigBuilder`], where their defaults are
/// stated; the others are set with [`client_with`](Self::client_with).
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    /// Every setting but the transport's (`config.client` is replaced by
    /// `client` in `build`).
    config: Config,
    client: ClientConfigBuilder,
}

impl ConfigBuilder {
    /// Most tasks queued or in flight at once (default 256). Must be at least 1.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n;
        self
    }

    /// Whole-request timeout, for requests that do not set their own; it
    /// covers connecting, sending, every redirect hop and reading the body.
    /// Sets [`ClientConfigBuilder::request_timeout`], which states the default.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.client = self.client.request_timeout(timeout);
        self
    }

    /// How long `stop` waits for tasks in flight before handing the rest to
    /// `retry` (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Largest response body read, in bytes. Sets
    /// [`ClientConfigBuilder::max_response_size`], which states the default.
    pub fn max_response_size(mut self, bytes: usize) -> Self {
        self.client = self.client.max_response_size(bytes);
        self
    }

    /// `User-Agent` sent when a request has none. Sets
    /// [`ClientConfigBuilder::user_agent`], which states the default.
    pub fn user_agent(mut self, agent: impl Into<String>) -> Self {
        self.client = self.client.user_agent(agent);
        self
    }

    /// Whether non-2xx responses become HTTP errors when a task does not say
    /// (default false).
    pub fn raise_error_responses(mut self, raise: bool) -> Self {
        self.config.raise_error_responses = raise;
        self
    }

    /// Redirects followed when a request does not say (default 5; 0 disables).
    pub fn max_redirects(mut self, n: u32) -> Self {
        self.config.max_redirects = n;
        self
    }

    /// Most hosts with a pool of kept-alive connections. Sets
    /// [`ClientConfigBuilder::connection_pool_size`], which states the default.
    pub fn connection_pool_size(mut self, hosts: usize) -> Self {
        self.client = self.client.connection_pool_size(hosts);
        self
    }

    /// Connect timeout, apart from the request timeout. Sets
    /// [`ClientConfigBuilder::connection_timeout`], which states the default.
    pub fn connection_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.client = self.client.connection_timeout(timeout);
        self
    }

    /// Forward proxy for every request. Sets [`ClientConfigBuilder::proxy`],
    /// which states the default.
    pub fn proxy(mut self, proxy: Option<ProxyConfig>) -> Self {
        self.client = self.client.proxy(proxy);
        self
    }

    /// Connection-level retries on a stale pooled connection. Sets
    /// [`ClientConfigBuilder::retries`], which states the default.
    pub fn retries(mut self, n: u32) -> Self {
        self.client = self.client.retries(n);
        self
    }

    /// Size in bytes of a serialized payload above which it is moved to a payload
    /// store (default 64 KiB, 65,536).
    pub fn payload_store_threshold(mut self, bytes: usize) -> Self {
        self.config.payload_store_threshold = bytes;
        self
    }

    /// Runtime threads owned by a processor (default: the number of CPUs).
    pub fn worker_threads(mut self, n: usize) -> Self {
        self.config.worker_threads = n;
        self
    }

    /// Most tasks executing at once (default none: every accepted task runs).
    /// When set below `max_connections`, accepted tasks beyond it wait and are
    /// dispatched by priority (high, normal, low), in arrival order within one.
    pub fn max_in_flight(mut self, n: Option<usize>) -> Self {
        self.config.max_in_flight = n;
        self
    }

    /// HTTP versions spoken. Sets [`ClientConfigBuilder::http_version`],
    /// which states the default.
    pub fn http_version(mut self, pref: HttpVersionPref) -> Self {
        self.client = self.client.http_version(pref);
        self
    }

    /// Replaces every transport setting at once, those set by the forwarding
    /// setters before it included.
    pub fn client(mut self, client: ClientConfig) -> Self {
        self.client = client.to_builder();
        self
    }

    /// Edits the transport settings: `edit` gets the [`ClientConfigBuilder`]
    /// holding them so far and returns it; [`build`](Self::build) checks them.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use patient_http::Config;
    /// let config = Config::builder()
    ///     .request_timeout(Duration::from_secs(30))
    ///     .client_with(|c| c.stall_timeout(Some(Duration::from_secs(5))).decompress(true))
    ///     .build()?;
    /// assert_eq!(config.request_timeout(), Duration::from_secs(30));
    /// assert!(config.client().decompress());
    /// # Ok::<(), patient_http::ConfigError>(())
    /// ```
    pub fn client_with(
        mut self,
        edit: impl FnOnce(ClientConfigBuilder) -> ClientConfigBuilder,
    ) -> Self {
        self.client = edit(self.client);
        self
    }

    /// Checks every field, the transport's included (with
    /// [`ClientConfigBuilder::build`]; its error becomes a [`ConfigError`]
    /// naming the same setting), and returns the configuration.
    pub fn build(mut self) -> Result<Config, ConfigError> {
        let c = &self.config;
        if c.max_connections == 0 {
            return Err(ConfigError::new("max_connections", "must be at least 1"));
        }
        if c.worker_threads == 0 {
            return Err(ConfigError::new("worker_threads", "must be at least 1"));
        }
        if c.max_in_flight == Some(0) {
            return Err(ConfigError::new("max_in_flight", "must be at least 1"));
        }
        if c.payload_store_threshold == 0 {
            return Err(ConfigError::new(
                "payload_store_threshold",
                "must be at least 1 byte",
            ));
        }
        if c.shutdown_timeout > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::new(
                "shutdown_timeout",
                "must be at most 24 hours",
            ));
        }
        self.config.client = self
            .client
            .build()
            .map_err(|e| ConfigError::new(e.field(), e.reason().to_string()))?;
        Ok(self.config)
    }
}
