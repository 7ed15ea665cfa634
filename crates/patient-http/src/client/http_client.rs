//! [`HttpClient`]: the client handle and its two calls, buffered
//! ([`send`](HttpClient::send)) and streaming
//! ([`send_streaming`](HttpClient::send_streaming)), over one exchange path.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    config::ClientConfig,
    error::{ClientConfigError, TransportError},
    exchange::{Limits, Prepared, Progress, Transport},
    pool::PoolStats,
    request::{OutgoingRequest, RequestBody, StreamingRequest},
    response::{RawResponse, StreamingResponse},
};

/// A pooled HTTP/1.1 and HTTP/2 client; cheap to clone (clones share the
/// pool).
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Transport>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Builds a client over a configuration checked by
    /// [`ClientConfigBuilder::build`](super::ClientConfigBuilder::build).
    /// Fails, naming the setting, when the TLS material
    /// (`root_certificates_pem`, `client_identity`) does not parse or the
    /// proxy environment variables (`proxy_from_env`) hold an invalid URL.
    /// Works inside or outside a tokio runtime (requests must run inside one).
    pub fn new(config: ClientConfig) -> Result<HttpClient, ClientConfigError> {
        Ok(HttpClient {
            inner: Arc::new(Transport::new(config)?),
        })
    }

    /// The client's configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Sends one request and reads the whole response.
    ///
    /// The request timeout covers connecting, sending and reading the body;
    /// the body may not exceed [`ClientConfig::max_response_size`]. A stale
    /// pooled connection is replaced transparently (see
    /// [`ClientConfig::retries`]). Redirects are not followed.
    pub async fn send(&self, request: OutgoingRequest) -> Result<RawResponse, TransportError> {
        let transport = &*self.inner;
        let (timeout, deadline) = self.start(request.timeout);
        let OutgoingRequest {
            method,
            url,
            headers,
            body,
            timeout: _,
            stall_timeout,
        } = request;
        let limits = Limits {
            stall_timeout: stall_timeout.or(transport.config.stall_timeout()),
            max_response_size: Some(transport.config.max_response_size()),
        };
        let mut prepared =
            transport.prepare(method, url, headers, RequestBody::full(body), limits)?;
        let progress = Progress::new();
        // Boxed: the exchange is the largest state machine of the request path,
        // and every layer above would otherwise carry (and copy) it.
        let exchange = Box::pin(async {
            let mut response = transport.exchange(&mut prepared, &progress).await?;
            let body = response.body.read_all().await?;
            Ok(RawResponse {
                status: response.status.as_u16(),
                headers: response.headers,
                body,
                version: response.version,
            })
        });
        let result = tokio::time::timeout_at(deadline, exchange).await;
        finish(result, &prepared, &progress, timeout)
    }

    /// Sends one request and returns as soon as the response head has
    /// arrived; the body is read from [`StreamingResponse::body`] as it
    /// comes.
    ///
    /// The request timeout (the request's own, or
    /// [`ClientConfig::request_timeout`]) covers connecting, sending and
    /// waiting for the head; after that only the stall timeout (between two
    /// frames) and the request's `max_response_size` bound the body. The
    /// request body may be a stream ([`RequestBody::stream`]); a stale
    /// pooled connection is replaced as for [`send`](Self::send) when the
    /// body is a buffer, or when nothing of the request was written.
    /// Decompression, proxies, HTTP/2 and the pool work as for `send`.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use http_body_util::BodyExt;
    /// use patient_http::client::{ClientConfig, HttpClient, StreamingRequest};
    ///
    /// let client = HttpClient::new(ClientConfig::default())?;
    /// let mut request = StreamingRequest::new(
    ///     http::Method::GET,
    ///     "https://example.com/events".parse()?,
    /// );
    /// request.stall_timeout = Some(std::time::Duration::from_secs(30));
    /// let mut response = client.send_streaming(request).await?;
    /// println!("{}", response.status);
    /// while let Some(frame) = response.body.frame().await {
    ///     if let Some(chunk) = frame?.data_ref() {
    ///         println!("{} bytes", chunk.len());
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_streaming(
        &self,
        request: StreamingRequest,
    ) -> Result<StreamingResponse, TransportError> {
        let transport = &*self.inner;
        let (timeout, deadline) = self.start(request.timeout);
        let StreamingRequest {
            method,
            url,
            headers,
            body,
            timeout: _,
            stall_timeout,
            max_response_size,
        } = request;
        let limits = Limits {
            stall_timeout: stall_timeout.or(transport.config.stall_timeout()),
            max_response_size: max_response_size.filter(|&n| n > 0),
        };
        let mut prepared = transport.prepare(method, url, headers, body, limits)?;
        let progress = Progress::new();
        let exchange = Box::pin(transport.exchange(&mut prepared, &progress));
        let result = tokio::time::timeout_at(deadline, exchange).await;
        finish(result, &prepared, &progress, timeout)
    }

    /// The start of a call: the pool's sweeper running, the call's timeout
    /// (its own or the client's) and the deadline it gives.
    fn start(&self, own: Option<Duration>) -> (Duration, Instant) {
        let transport = &*self.inner;
        transport.pool.ensure_sweeper();
        let timeout = own.unwrap_or(transport.config.request_timeout());
        (
            timeout,
            crate::time::saturating_after(Instant::now(), timeout),
        )
    }

    /// Host pools, idle and open connections.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }
}

/// The result of a call, or the timeout that cut it.
fn finish<T>(
    result: Result<Result<T, TransportError>, tokio::time::error::Elapsed>,
    prepared: &Prepared,
    progress: &Progress,
    timeout: Duration,
) -> Result<T, TransportError> {
    match result {
        Ok(result) => result,
        Err(_) => Err(TransportError::timeout(
            "Timeout",
            &prepared.authority(),
            progress.phase(),
            timeout,
        )),
    }
}
