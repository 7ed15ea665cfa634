//! The HTTP transport: pooled keep-alive HTTP/1.1 and HTTP/2 connections over
//! TCP or rustls, through an optional proxy, with connect and request
//! timeouts and a response size limit.
//!
//! [`HttpClient::send`] performs one request (one redirect hop); redirects,
//! secrets, retries of failed responses and error wrapping live above it.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use patient_http::client::{ClientConfig, HttpClient, OutgoingRequest};
//!
//! let client = HttpClient::new(ClientConfig::default())?;
//! let request = OutgoingRequest::new(http::Method::GET, "https://example.com/".parse()?);
//! let response = client.send(request).await?;
//! println!("{} {} bytes", response.status, response.body.len());
//! # Ok(())
//! # }
//! ```

mod body;
mod config;
mod connect;
mod error;
mod pool;
mod proxy;
mod tls;

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Uri, Version};
use http_body_util::Full;
use tokio::time::Instant;
use url::{Position, Url};

pub use self::{
    config::{ClientConfig, HttpVersionPref},
    error::{ClientConfigError, ErrorType, TransportError},
    pool::PoolStats,
    proxy::ProxyConfig,
};
use self::{
    error::Phase,
    pool::{Checkout, Conn, H1Conn, H2Conn, LeaderGuard, Pool, PoolKey},
    proxy::{Proxies, ProxyEndpoint},
    tls::TlsConnectors,
};

/// A request as the transport sends it.
#[derive(Clone, Debug)]
pub struct OutgoingRequest {
    /// The method.
    pub method: Method,
    /// The absolute `http` or `https` URL; credentials in it become basic
    /// `Authorization` unless the request has one; the fragment is not sent.
    pub url: Url,
    /// Headers sent as given; `User-Agent` and (for HTTP/1.1) `Host` are added
    /// when missing.
    pub headers: HeaderMap,
    /// The body; empty for none.
    pub body: Bytes,
    /// Timeout of the whole request (connect, send, reading the whole body);
    /// `None` uses the client's `request_timeout`.
    pub timeout: Option<Duration>,
    /// Longest wait for the next piece of the body; `None` uses the client's
    /// `stall_timeout`.
    pub stall_timeout: Option<Duration>,
}

impl OutgoingRequest {
    /// A request without headers, body or timeout of its own.
    pub fn new(method: Method, url: Url) -> Self {
        OutgoingRequest {
            method,
            url,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            timeout: None,
            stall_timeout: None,
        }
    }
}

/// A response read in full.
#[derive(Clone, Debug)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The headers (without `content-encoding` and `content-length` when the
    /// body was decompressed).
    pub headers: HeaderMap,
    /// The whole body (decompressed when decompression is on).
    pub body: Bytes,
    /// The HTTP version spoken.
    pub version: Version,
}

/// A pooled HTTP/1.1 and HTTP/2 client; cheap to clone (clones share the
/// pool).
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    pub(crate) pool: Arc<Pool>,
    pub(crate) tls: TlsConnectors,
    proxies: Proxies,
    user_agent: HeaderValue,
}

/// The origin a request goes to; the same value keys its host pool.
pub(crate) type Target = PoolKey;

impl PoolKey {
    /// `host:port` (IPv6 in brackets), for messages, SNI-less contexts and
    /// `CONNECT`.
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

const PHASE_CONNECT: u8 = 0;
const PHASE_REQUEST: u8 = 1;
const PHASE_BODY: u8 = 2;

fn phase_of(phase: &AtomicU8) -> Phase {
    match phase.load(Ordering::Relaxed) {
        PHASE_CONNECT => Phase::Connect,
        PHASE_REQUEST => Phase::Request,
        _ => Phase::Body,
    }
}

/// A request ready to be sent, possibly several times.
struct Prepared {
    key: PoolKey,
    proxy: Option<Arc<ProxyEndpoint>>,
    method: Method,
    uri: Uri,
    host: HeaderValue,
    headers: HeaderMap,
    body: Bytes,
    stall_timeout: Option<Duration>,
}

impl Prepared {
    fn origin_form(&self) -> Uri {
        match self.uri.path_and_query() {
            Some(pq) => Uri::from(pq.clone()),
            None => Uri::from_static("/"),
        }
    }
}

/// A connection in use by one request.
enum InUse {
    H1(H1Conn),
    H2(H2Conn),
}

/// How one attempt failed.
enum AttemptError {
    /// On a reused connection that turned out stale: safe to try again on a
    /// fresh connection.
    Retry(TransportError),
    Fatal(TransportError),
}

impl HttpClient {
    /// Builds a client; fails with the name of the first invalid setting.
    /// Works inside or outside a tokio runtime (requests must run inside one).
    pub fn new(config: ClientConfig) -> Result<HttpClient, ClientConfigError> {
        config.validate()?;
        let tls = tls::build(&config)?;
        let proxies = Proxies::new(config.proxy.as_ref(), config.proxy_from_env)?;
        let user_agent = HeaderValue::from_str(&config.user_agent)
            .map_err(|_| ClientConfigError::new("user_agent", "is not a valid header value"))?;
        let pool = Arc::new(Pool::new(
            config.connection_pool_size,
            config.pool_max_idle_per_host,
            config.pool_idle_timeout,
            config.max_requests_per_connection,
        ));
        Ok(HttpClient {
            inner: Arc::new(Inner {
                config,
                pool,
                tls,
                proxies,
                user_agent,
            }),
        })
    }

    /// The client's configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Sends one request and reads the whole response.
    ///
    /// The request timeout covers connecting, sending and reading the body.
    /// A stale pooled connection is replaced transparently (see
    /// [`ClientConfig::retries`]). Redirects are not followed.
    pub async fn send(&self, request: OutgoingRequest) -> Result<RawResponse, TransportError> {
        let inner = &*self.inner;
        inner.pool.ensure_sweeper();
        let timeout = request.timeout.unwrap_or(inner.config.request_timeout);
        let deadline = Instant::now() + timeout;
        let mut prepared = inner.prepare(request)?;
        let phase = AtomicU8::new(PHASE_CONNECT);
        // Boxed: the exchange is the largest state machine of the request path,
        // and every layer above would otherwise carry (and copy) it.
        let result =
            tokio::time::timeout_at(deadline, Box::pin(inner.execute(&mut prepared, &phase))).await;
        match result {
            Ok(result) => result,
            Err(_) => Err(TransportError::timeout(
                "Timeout",
                &prepared.key.authority(),
                phase_of(&phase),
                timeout,
            )),
        }
    }

    /// Host pools, idle and open connections.
    pub fn pool_stats(&self) -> PoolStats {
        self.inner.pool.stats()
    }
}

impl Inner {
    fn prepare(&self, request: OutgoingRequest) -> Result<Prepared, TransportError> {
        let OutgoingRequest {
            method,
            url,
            mut headers,
            mut body,
            timeout: _,
            stall_timeout,
        } = request;
        let stall_timeout = stall_timeout.or(self.config.stall_timeout);
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(TransportError::new(
                    ErrorType::Unknown,
                    "UnsupportedScheme",
                    format!("unsupported URL scheme `{other}` in {url}"),
                ))
            }
        };
        let Some(host_str) = url.host_str().filter(|h| !h.is_empty()) else {
            return Err(TransportError::new(
                ErrorType::Unknown,
                "InvalidUrl",
                format!("URL {url} has no host"),
            ));
        };
        let port = url
            .port_or_known_default()
            .unwrap_or(if https { 443 } else { 80 });
        let host = host_str.trim_start_matches('[').trim_end_matches(']');
        let invalid_url = |e: &dyn std::fmt::Display| {
            TransportError::new(
                ErrorType::Unknown,
                "InvalidUrl",
                format!("URL {url} cannot be sent: {e}"),
            )
        };
        let authority_in_url = &url[Position::BeforeHost..Position::AfterPort];
        let has_userinfo = !url.username().is_empty() || url.password().is_some();
        let uri = if has_userinfo || url.fragment().is_some() {
            let text = format!(
                "{}://{}{}",
                url.scheme(),
                authority_in_url,
                &url[Position::BeforePath..Position::AfterQuery]
            );
            Uri::try_from(text).map_err(|e| invalid_url(&e))?
        } else {
            Uri::try_from(url.as_str()).map_err(|e| invalid_url(&e))?
        };
        let host_header = HeaderValue::from_str(authority_in_url).map_err(|e| invalid_url(&e))?;

        if has_userinfo && !headers.contains_key(header::AUTHORIZATION) {
            use base64::Engine as _;
            let user = url.username();
            let pass = url.password().unwrap_or("");
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            if let Ok(mut value) = HeaderValue::from_str(&format!("Basic {token}")) {
                value.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, value);
            }
        }
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(header::USER_AGENT, self.user_agent.clone());
        }
        if self.config.decompress && !headers.contains_key(header::ACCEPT_ENCODING) {
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("gzip, deflate, br"),
            );
        }
        if self.config.request_compression
            && body.len() >= body::COMPRESS_MIN_SIZE
            && !headers.contains_key(header::CONTENT_ENCODING)
        {
            if let Ok(compressed) = body::gzip(&body) {
                body = compressed;
                headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                headers.remove(header::CONTENT_LENGTH);
            }
        }

        let proxy = self.proxies.for_target(https, host).cloned();
        Ok(Prepared {
            key: PoolKey {
                https,
                proxied: proxy.is_some(),
                port,
                host: host.into(),
            },
            proxy,
            method,
            uri,
            host: host_header,
            headers,
            body,
            stall_timeout,
        })
    }

    /// Whether the origin may speak HTTP/2, and whether it certainly does.
    fn h2_for(&self, key: &PoolKey) -> (bool, bool) {
        match self.config.http_version {
            HttpVersionPref::Http1Only => (false, false),
            HttpVersionPref::Auto => (key.https, false),
            HttpVersionPref::Http2Only => {
                let possible = key.https || !key.proxied;
                (possible, possible)
            }
        }
    }

    async fn execute(
        &self,
        p: &mut Prepared,
        phase: &AtomicU8,
    ) -> Result<RawResponse, TransportError> {
        let mut retries_left = self.config.retries;
        let mut fresh = false;
        loop {
            phase.store(PHASE_CONNECT, Ordering::Relaxed);
            let (conn, reused) = self.acquire(p, fresh).await?;
            match self.attempt(p, conn, reused, retries_left > 0, phase).await {
                Ok(response) => return Ok(response),
                Err(AttemptError::Retry(err)) if retries_left > 0 => {
                    tracing::debug!(upstream = %p.key.authority(), error = %err, "stale pooled connection; retrying on a fresh one");
                    retries_left -= 1;
                    fresh = true;
                }
                Err(AttemptError::Retry(err) | AttemptError::Fatal(err)) => return Err(err),
            }
        }
    }

    /// Opens a connection, within the connect timeout when one is set.
    async fn connect(&self, p: &Prepared) -> Result<Conn, TransportError> {
        let fut = connect::establish(self, &p.key, p.proxy.as_deref());
        match self.config.connect_timeout {
            None => fut.await,
            Some(limit) => match tokio::time::timeout(limit, fut).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::timeout(
                    "ConnectTimeout",
                    &p.key.authority(),
                    Phase::Connect,
                    limit,
                )),
            },
        }
    }

    /// A ready connection and whether it was reused from the pool.
    async fn acquire(&self, p: &Prepared, fresh: bool) -> Result<(InUse, bool), TransportError> {
        let (h2_possible, h2_known) = self.h2_for(&p.key);
        let mut must_connect = fresh;
        loop {
            let checkout = if must_connect {
                Checkout::Connect { leader: false }
            } else {
                self.pool.checkout(&p.key, h2_possible, h2_known)
            };
            match checkout {
                Checkout::H1(mut conn) => {
                    if conn.sender.ready().await.is_ok() {
                        return Ok((InUse::H1(conn), true));
                    }
                    // Closed while idle: drop it and look again.
                }
                Checkout::H2(conn) => return Ok((InUse::H2(conn), true)),
                Checkout::Wait(rx) => match rx.await {
                    Ok(conn) => return Ok((InUse::H2(conn), false)),
                    Err(_) => must_connect = true,
                },
                Checkout::Connect { leader } => {
                    let mut guard = LeaderGuard {
                        pool: &self.pool,
                        key: &p.key,
                        armed: leader,
                    };
                    // Boxed: connecting (TCP, proxy, TLS, handshake) is a large
                    // state machine that pooled requests should not carry.
                    match Box::pin(self.connect(p)).await? {
                        Conn::H2(conn) => {
                            guard.armed = false;
                            self.pool.h2_ready(&p.key, &conn);
                            return Ok((InUse::H2(conn), false));
                        }
                        Conn::H1(mut conn) => {
                            guard.armed = false;
                            if leader {
                                self.pool.h2_abandon(&p.key, false);
                            } else if h2_possible {
                                self.pool.note_h1(&p.key);
                            }
                            conn.sender.ready().await.map_err(|e| {
                                TransportError::from_hyper(e, &p.key.authority(), Phase::Connect)
                            })?;
                            return Ok((InUse::H1(conn), false));
                        }
                    }
                }
            }
        }
    }

    async fn attempt(
        &self,
        p: &mut Prepared,
        mut conn: InUse,
        reused: bool,
        can_retry: bool,
        phase: &AtomicU8,
    ) -> Result<RawResponse, AttemptError> {
        let is_h2 = matches!(conn, InUse::H2(_));
        let absolute = is_h2 || (p.proxy.is_some() && !p.key.https);
        let uri = if absolute {
            p.uri.clone()
        } else {
            p.origin_form()
        };
        let keep_copy = reused && can_retry && p.method.is_idempotent();
        let mut headers = if keep_copy {
            p.headers.clone()
        } else {
            std::mem::take(&mut p.headers)
        };
        if !is_h2 && !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, p.host.clone());
        }
        if absolute && !is_h2 {
            if let Some(auth) = p.proxy.as_ref().and_then(|proxy| proxy.auth.clone()) {
                headers.insert(header::PROXY_AUTHORIZATION, auth);
            }
        }
        let mut request = http::Request::new(Full::new(p.body.clone()));
        *request.method_mut() = p.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        *request.version_mut() = if is_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };

        phase.store(PHASE_REQUEST, Ordering::Relaxed);
        let sent = match &mut conn {
            InUse::H1(c) => {
                c.requests += 1;
                c.sender.try_send_request(request).await
            }
            InUse::H2(c) => c.sender.try_send_request(request).await,
        };
        let response = match sent {
            Ok(response) => response,
            Err(mut e) => {
                let returned = e.take_message();
                if let InUse::H2(c) = &conn {
                    self.pool.retire_h2(&p.key, c.id);
                }
                let err =
                    TransportError::from_hyper(e.into_error(), &p.key.authority(), Phase::Request);
                if let Some(request) = returned {
                    // Never written: restore the headers and try again.
                    p.headers = request.into_parts().0.headers;
                    let err = err.sent(false);
                    return Err(if reused {
                        AttemptError::Retry(err)
                    } else {
                        AttemptError::Fatal(err)
                    });
                }
                let stale = matches!(
                    err.class_name(),
                    "IncompleteMessage" | "ConnectionReset" | "ConnectionClosed"
                );
                return Err(if keep_copy && stale {
                    AttemptError::Retry(err)
                } else {
                    AttemptError::Fatal(err)
                });
            }
        };

        phase.store(PHASE_BODY, Ordering::Relaxed);
        let (parts, incoming) = response.into_parts();
        let status = parts.status.as_u16();
        let no_body = p.method == Method::HEAD
            || status == 204
            || status == 304
            || (100..200).contains(&status);
        let limit = self.config.max_response_size;
        let content_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if !no_body {
            if let Some(length) = content_length.filter(|&n| n > limit as u64) {
                // Dropping the body and the connection closes it: never drained.
                return Err(AttemptError::Fatal(TransportError::too_large(
                    &p.key.authority(),
                    limit,
                    &format!("content-length {length}"),
                )));
            }
        }
        let data = match body::read_limited(incoming, limit, content_length, p.stall_timeout).await
        {
            Ok(data) => data,
            Err(body::ReadError::Stalled { after }) => {
                if let InUse::H2(c) = &conn {
                    self.pool.retire_h2(&p.key, c.id);
                }
                return Err(AttemptError::Fatal(TransportError::timeout(
                    "StallTimeout",
                    &p.key.authority(),
                    Phase::Body,
                    after,
                )));
            }
            Err(body::ReadError::TooLarge { read }) => {
                return Err(AttemptError::Fatal(TransportError::too_large(
                    &p.key.authority(),
                    limit,
                    &format!("{read} bytes read"),
                )))
            }
            Err(body::ReadError::Hyper(e)) => {
                if let InUse::H2(c) = &conn {
                    self.pool.retire_h2(&p.key, c.id);
                }
                return Err(AttemptError::Fatal(TransportError::from_hyper(
                    e,
                    &p.key.authority(),
                    Phase::Body,
                )));
            }
        };
        if let InUse::H1(c) = conn {
            self.pool.checkin(&p.key, c);
        }
        if status == 407 && absolute && !is_h2 {
            if let Some(proxy) = &p.proxy {
                return Err(AttemptError::Fatal(
                    TransportError::new(
                        ErrorType::Connection,
                        "ProxyAuthenticationRequired",
                        format!(
                            "proxy {} requires authentication (407) for {}",
                            proxy.authority,
                            p.key.authority()
                        ),
                    )
                    .sent(true),
                ));
            }
        }

        let mut headers = parts.headers;
        let mut data = data;
        if self.config.decompress && !data.is_empty() {
            if let Some(coding) = body::response_coding(&headers) {
                data = match body::decode(coding, &data, limit) {
                    Ok(decoded) => decoded,
                    Err(body::DecodeError::TooLarge) => {
                        return Err(AttemptError::Fatal(TransportError::too_large(
                            &p.key.authority(),
                            limit,
                            "after decompression",
                        )))
                    }
                    Err(body::DecodeError::Invalid(e)) => {
                        return Err(AttemptError::Fatal(
                            TransportError::new(
                                ErrorType::Connection,
                                "DecompressionError",
                                format!(
                                    "invalid {coding:?} response body from {}: {e}",
                                    p.key.authority()
                                ),
                            )
                            .sent(true)
                            .with_source(e),
                        ))
                    }
                };
                headers.remove(header::CONTENT_ENCODING);
                headers.remove(header::CONTENT_LENGTH);
            }
        }
        Ok(RawResponse {
            status,
            headers,
            body: data,
            version: parts.version,
        })
    }
}
