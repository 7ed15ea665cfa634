//! The one exchange path of both calls: a request is prepared, gets a
//! connection (pooled, shared HTTP/2, or new), is sent, and its response
//! head comes back with a [`ResponseBody`] that holds the connection until
//! the body ends.

use std::{
    sync::{
        atomic::{AtomicU8, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri, Version};
use hyper::body::Incoming;
use url::{Position, Url};

use super::{
    config::{ClientConfig, HttpVersionPref},
    conn::{Conn, H1Conn, H2Stream},
    connect::Connector,
    decode::{self, Decoder},
    error::{ClientConfigError, ErrorType, Phase, TransportError},
    origin::Origin,
    pool::{Checkout, Handoff, LeaderGuard, Pool},
    proxy::{Proxies, ProxyEndpoint},
    request::{BodyFailure, RequestBody},
    response::{Extras, Held, ResponseBody, StreamingResponse},
};

/// How far a request got, for the message of a timeout that cuts it.
pub(crate) struct Progress(AtomicU8);

impl Progress {
    const CONNECT: u8 = 0;
    const REQUEST: u8 = 1;
    const BODY: u8 = 2;
    const POOL: u8 = 3;

    pub(crate) fn new() -> Progress {
        Progress(AtomicU8::new(Self::CONNECT))
    }

    fn set(&self, phase: Phase) {
        let value = match phase {
            Phase::Connect => Self::CONNECT,
            Phase::Request => Self::REQUEST,
            Phase::Body => Self::BODY,
            Phase::Pool => Self::POOL,
        };
        self.0.store(value, Ordering::Relaxed);
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.0.load(Ordering::Relaxed) {
            Self::CONNECT => Phase::Connect,
            Self::REQUEST => Phase::Request,
            Self::POOL => Phase::Pool,
            _ => Phase::Body,
        }
    }
}

/// What a request asks of the transport besides its method, URL, headers
/// and body.
pub(crate) struct Limits {
    /// Longest gap between two frames of the response body.
    pub(crate) stall_timeout: Option<Duration>,
    /// Largest response body, `None` for no limit.
    pub(crate) max_response_size: Option<usize>,
}

/// A request ready to be sent, possibly several times.
pub(crate) struct Prepared {
    origin: Origin,
    proxy: Option<Arc<ProxyEndpoint>>,
    method: Method,
    uri: Uri,
    host: HeaderValue,
    headers: HeaderMap,
    body: RequestBody,
    limits: Limits,
}

impl Prepared {
    /// `host:port` of the target, for messages.
    pub(crate) fn authority(&self) -> String {
        self.origin.authority()
    }

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
    H2(H2Stream),
}

/// A request ready for one connection.
struct Outgoing {
    request: http::Request<RequestBody>,
    /// Whether `Prepared` kept a copy to send again.
    keep_copy: bool,
    /// Where a streamed body records its failure.
    request_failure: Option<Arc<BodyFailure>>,
}

/// How one attempt failed.
enum AttemptError {
    /// On a reused connection that turned out stale: safe to try again on a
    /// fresh connection.
    Retry(TransportError),
    Fatal(TransportError),
}

/// The shared state of a client: settings, pool, connector and proxies.
pub(crate) struct Transport {
    pub(crate) config: ClientConfig,
    pub(crate) pool: Arc<Pool>,
    connector: Connector,
    proxies: Proxies,
    user_agent: HeaderValue,
}

impl Transport {
    pub(crate) fn new(config: ClientConfig) -> Result<Transport, ClientConfigError> {
        let proxies = Proxies::new(config.proxy(), config.proxy_from_env())?;
        let user_agent = HeaderValue::from_str(config.user_agent())
            .map_err(|_| ClientConfigError::new("user_agent", "is not a valid header value"))?;
        let open = Arc::new(AtomicUsize::new(0));
        let connector = Connector::new(&config, Arc::clone(&open))?;
        let pool = Arc::new(Pool::new(
            config.connection_pool_size(),
            config.pool_max_idle_per_host(),
            config.pool_idle_timeout(),
            config.max_requests_per_connection(),
            config.max_connections_per_host(),
            open,
        ));
        Ok(Transport {
            config,
            pool,
            connector,
            proxies,
            user_agent,
        })
    }

    pub(crate) fn prepare(
        &self,
        method: Method,
        url: Url,
        mut headers: HeaderMap,
        mut body: RequestBody,
        limits: Limits,
    ) -> Result<Prepared, TransportError> {
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
        if self.config.decompress() && !headers.contains_key(header::ACCEPT_ENCODING) {
            headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("gzip, deflate, br"),
            );
        }
        if self.config.request_compression() && !headers.contains_key(header::CONTENT_ENCODING) {
            let compressed = body
                .as_full()
                .filter(|data| data.len() >= self.config.request_compression_min_size())
                .and_then(|data| decode::gzip(data).ok());
            if let Some(compressed) = compressed {
                body = RequestBody::full(compressed);
                headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                headers.remove(header::CONTENT_LENGTH);
            }
        }

        let proxy = self.proxies.for_target(https, host).cloned();
        Ok(Prepared {
            origin: Origin {
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
            limits,
        })
    }

    /// Whether the origin may speak HTTP/2, and whether it certainly does.
    fn h2_for(&self, origin: &Origin) -> (bool, bool) {
        match self.config.http_version() {
            HttpVersionPref::Http1Only => (false, false),
            HttpVersionPref::Auto => (origin.https, false),
            HttpVersionPref::Http2Only => {
                let possible = origin.https || !origin.proxied;
                (possible, possible)
            }
        }
    }

    /// Sends the request (again on a fresh connection when a pooled one
    /// turns out stale) and returns the response head with its body.
    pub(crate) async fn exchange(
        &self,
        p: &mut Prepared,
        progress: &Progress,
    ) -> Result<StreamingResponse, TransportError> {
        let mut retries_left = self.config.retries();
        let mut fresh = false;
        loop {
            let (mut conn, reused) = self.acquire(p, fresh, progress).await?;
            let outgoing = self.request_for(p, &conn, reused, retries_left > 0);
            progress.set(Phase::Request);
            let sent = match &mut conn {
                InUse::H1(c) => {
                    c.requests += 1;
                    c.sender.try_send_request(outgoing.request).await
                }
                InUse::H2(s) => s.sender.try_send_request(outgoing.request).await,
            };
            let error = match sent {
                Ok(response) => {
                    progress.set(Phase::Body);
                    return self.receive(p, conn, response, outgoing.request_failure);
                }
                Err(e) => self.send_failed(
                    p,
                    &conn,
                    reused,
                    outgoing.keep_copy,
                    outgoing.request_failure,
                    e,
                ),
            };
            match error {
                AttemptError::Retry(err) if retries_left > 0 => {
                    tracing::debug!(upstream = %p.origin.authority(), error = %err, "stale pooled connection; retrying on a fresh one");
                    retries_left -= 1;
                    fresh = true;
                }
                AttemptError::Retry(err) | AttemptError::Fatal(err) => return Err(err),
            }
        }
    }

    /// Opens a connection, within the connect timeout when one is set.
    async fn connect(&self, p: &Prepared) -> Result<Conn, TransportError> {
        let h2_streams = self.pool.h2_streams_hint(&p.origin);
        let fut = self
            .connector
            .connect(&p.origin, p.proxy.as_deref(), h2_streams);
        match self.config.connection_timeout() {
            None => fut.await,
            Some(limit) => match tokio::time::timeout(limit, fut).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::timeout(
                    "ConnectTimeout",
                    &p.origin.authority(),
                    Phase::Connect,
                    limit,
                )),
            },
        }
    }

    /// A ready connection and whether it was reused from the pool, within
    /// the origin's connection limit when there is one.
    async fn acquire(
        &self,
        p: &Prepared,
        fresh: bool,
        progress: &Progress,
    ) -> Result<(InUse, bool), TransportError> {
        let slot = match self.pool.connection_slots(&p.origin) {
            None => None,
            Some(slots) => {
                progress.set(Phase::Pool);
                Some(self.connection_slot(p, slots).await?)
            }
        };
        progress.set(Phase::Connect);
        let (mut conn, reused) = self.checkout(p, fresh).await?;
        if let InUse::H1(c) = &mut conn {
            c.slot = slot;
        }
        Ok((conn, reused))
    }

    /// One of the origin's connection slots, waiting up to
    /// `pool_wait_timeout` for one to come free.
    async fn connection_slot(
        &self,
        p: &Prepared,
        slots: Arc<tokio::sync::Semaphore>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, TransportError> {
        let slots = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => return Ok(slot),
            Err(_) => slots,
        };
        let closed = || {
            TransportError::timeout(
                "PoolTimeout",
                &p.origin.authority(),
                Phase::Pool,
                Duration::ZERO,
            )
        };
        match self.config.pool_wait_timeout() {
            None => slots.acquire_owned().await.map_err(|_| closed()),
            Some(limit) => match tokio::time::timeout(limit, slots.acquire_owned()).await {
                Ok(slot) => slot.map_err(|_| closed()),
                Err(_) => Err(TransportError::timeout(
                    "PoolTimeout",
                    &p.origin.authority(),
                    Phase::Pool,
                    limit,
                )),
            },
        }
    }

    /// A connection from the pool, or a new one.
    async fn checkout(&self, p: &Prepared, fresh: bool) -> Result<(InUse, bool), TransportError> {
        let (h2_possible, h2_known) = self.h2_for(&p.origin);
        let mut must_connect = fresh;
        loop {
            let checkout = if must_connect {
                Checkout::Connect { leader: false }
            } else {
                self.pool.checkout(&p.origin, h2_possible, h2_known)
            };
            match checkout {
                Checkout::H1(mut conn) => {
                    if conn.sender.ready().await.is_ok() {
                        return Ok((InUse::H1(conn), true));
                    }
                    // Closed while idle: drop it and look again.
                }
                Checkout::H2(stream) => return Ok((InUse::H2(stream), true)),
                Checkout::Wait(rx) => match rx.await {
                    Ok(Handoff::Stream(stream)) => return Ok((InUse::H2(stream), false)),
                    Ok(Handoff::Full) => {} // look again: opens another connection
                    Err(_) => must_connect = true,
                },
                Checkout::Connect { leader } => {
                    let mut guard = LeaderGuard {
                        pool: &self.pool,
                        key: &p.origin,
                        armed: leader,
                    };
                    // Boxed: connecting (TCP, proxy, TLS, handshake) is a large
                    // state machine that pooled requests should not carry.
                    match Box::pin(self.connect(p)).await? {
                        Conn::H2(conn) => {
                            guard.armed = false;
                            let stream = self.pool.h2_ready(&p.origin, &conn);
                            return Ok((InUse::H2(stream), false));
                        }
                        Conn::H1(mut conn) => {
                            guard.armed = false;
                            if leader {
                                self.pool.h2_abandon(&p.origin, false);
                            } else if h2_possible {
                                self.pool.note_h1(&p.origin);
                            }
                            conn.sender.ready().await.map_err(|e| {
                                TransportError::from_hyper(e, &p.origin.authority(), Phase::Connect)
                            })?;
                            return Ok((InUse::H1(conn), false));
                        }
                    }
                }
            }
        }
    }

    /// The request to send on `conn` (a copy of the headers and body is
    /// kept only when the request may be sent again after bytes of it went
    /// out, never for a streamed body).
    fn request_for(
        &self,
        p: &mut Prepared,
        conn: &InUse,
        reused: bool,
        can_retry: bool,
    ) -> Outgoing {
        let is_h2 = matches!(conn, InUse::H2(_));
        let absolute = is_h2 || (p.proxy.is_some() && !p.origin.https);
        let uri = if absolute {
            p.uri.clone()
        } else {
            p.origin_form()
        };
        let replay = if reused && can_retry && p.method.is_idempotent() {
            p.body.replay()
        } else {
            None
        };
        let keep_copy = replay.is_some();
        let mut headers = if keep_copy {
            p.headers.clone()
        } else {
            std::mem::take(&mut p.headers)
        };
        let body = replay.unwrap_or_else(|| std::mem::take(&mut p.body));
        let request_failure = body.failure();
        if !is_h2 && !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, p.host.clone());
        }
        if absolute && !is_h2 {
            if let Some(auth) = p.proxy.as_ref().and_then(|proxy| proxy.auth.clone()) {
                headers.insert(header::PROXY_AUTHORIZATION, auth);
            }
        }
        let mut request = http::Request::new(body);
        *request.method_mut() = p.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        *request.version_mut() = if is_h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        Outgoing {
            request,
            keep_copy,
            request_failure,
        }
    }

    /// Why sending failed, and whether another connection may be tried.
    fn send_failed(
        &self,
        p: &mut Prepared,
        conn: &InUse,
        reused: bool,
        keep_copy: bool,
        request_failure: Option<Arc<BodyFailure>>,
        mut e: hyper::client::conn::TrySendError<http::Request<RequestBody>>,
    ) -> AttemptError {
        let returned = e.take_message();
        let authority = p.origin.authority();
        if let Some(source) = request_failure.as_ref().and_then(|f| f.take()) {
            return AttemptError::Fatal(TransportError::request_body(source, &authority));
        }
        if let InUse::H2(s) = conn {
            self.pool.retire_h2(&p.origin, s.slot.conn_id());
        }
        let err = TransportError::from_hyper(e.into_error(), &authority, Phase::Request);
        if let Some(request) = returned {
            // Never written: restore the headers and body and try again.
            let (parts, body) = request.into_parts();
            p.headers = parts.headers;
            p.body = body;
            let err = err.sent(false);
            return if reused {
                AttemptError::Retry(err)
            } else {
                AttemptError::Fatal(err)
            };
        }
        let stale = matches!(
            err.class_name(),
            "IncompleteMessage" | "ConnectionReset" | "ConnectionClosed"
        );
        if keep_copy && stale {
            AttemptError::Retry(err)
        } else {
            AttemptError::Fatal(err)
        }
    }

    /// The response head with a body holding the connection.
    fn receive(
        &self,
        p: &Prepared,
        conn: InUse,
        response: http::Response<Incoming>,
        request_failure: Option<Arc<BodyFailure>>,
    ) -> Result<StreamingResponse, TransportError> {
        let is_h2 = matches!(conn, InUse::H2(_));
        let absolute = is_h2 || (p.proxy.is_some() && !p.origin.https);
        let (parts, incoming) = response.into_parts();
        let status = parts.status;
        let no_body = p.method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status.is_informational();
        let limit = p.limits.max_response_size;
        let content_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let (false, Some(limit), Some(length)) = (no_body, limit, content_length) {
            if length > limit as u64 {
                // Dropping the body and the connection closes it: never drained.
                return Err(TransportError::too_large(
                    &p.origin.authority(),
                    limit,
                    &format!("content-length {length}"),
                ));
            }
        }
        if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED && absolute && !is_h2 {
            if let Some(proxy) = &p.proxy {
                return Err(TransportError::new(
                    ErrorType::Connection,
                    "ProxyAuthenticationRequired",
                    format!(
                        "proxy {} requires authentication (407) for {}",
                        proxy.authority,
                        p.origin.authority()
                    ),
                )
                .sent(true));
            }
        }

        let mut headers = parts.headers;
        let decoder = if self.config.decompress() && !no_body && content_length != Some(0) {
            decode::response_coding(&headers).map(|coding| Decoder::new(coding, limit))
        } else {
            None
        };
        if decoder.is_some() {
            headers.remove(header::CONTENT_ENCODING);
            headers.remove(header::CONTENT_LENGTH);
        }
        let held = match conn {
            InUse::H1(c) => Held::H1(c),
            InUse::H2(s) => Held::H2(s.slot),
        };
        let body = ResponseBody::new(
            (!no_body).then_some(incoming),
            held,
            Arc::clone(&self.pool),
            p.origin.clone(),
            limit,
            content_length,
            Extras::new(decoder, p.limits.stall_timeout, request_failure),
        );
        Ok(StreamingResponse {
            status,
            headers,
            version: parts.version,
            body,
        })
    }
}
