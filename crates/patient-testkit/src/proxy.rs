//! A forward HTTP proxy for testing proxy support of clients.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, uri::Authority, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::watch, task::JoinHandle};

use crate::listener;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Headers that apply to one hop and are not forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

#[derive(Debug)]
struct State {
    /// `user:password` that `Proxy-Authorization: Basic` must carry.
    credentials: Option<String>,
    requests: AtomicU64,
    connects: AtomicU64,
    rejected: AtomicU64,
    /// Closed when the proxy is dropped; tunnels watch it.
    shutdown: watch::Receiver<()>,
}

/// An HTTP/1.1 forward proxy on `127.0.0.1:0`.
///
/// It tunnels `CONNECT host:port` (used for `https://` targets) and forwards
/// absolute-form requests such as `GET http://127.0.0.1:8080/fast`
/// (used for `http://` targets), opening a new upstream connection for each.
/// It only connects to `127.0.0.1` or `localhost` and answers `403` for any
/// other host, `502` when the target refuses the connection.
///
/// With credentials, every request without a matching
/// `Proxy-Authorization: Basic …` header gets `407` with
/// `Proxy-Authenticate: Basic realm="patient-testkit"`.
///
/// Dropping the proxy closes its listener, its connections and its tunnels.
#[derive(Debug)]
pub struct ForwardProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
    _shutdown: watch::Sender<()>,
}

impl ForwardProxy {
    /// Starts a proxy; with `Some((user, password))` it requires Basic
    /// proxy authentication.
    pub async fn start(credentials: Option<(&str, &str)>) -> io::Result<ForwardProxy> {
        let listener = listener::bind(listener::loopback())?;
        let addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let state = Arc::new(State {
            credentials: credentials.map(|(user, password)| format!("{user}:{password}")),
            requests: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            shutdown: shutdown_rx,
        });
        let task = {
            let state = state.clone();
            tokio::spawn(listener::accept_loop(listener, move |stream, _| {
                serve_connection(stream, state.clone())
            }))
        };
        Ok(ForwardProxy {
            addr,
            state,
            task,
            _shutdown: shutdown_tx,
        })
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the proxy URL to give a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Non-`CONNECT` (absolute-form) requests received so far, including
    /// rejected ones.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// `CONNECT` requests received so far, including rejected ones.
    pub fn connects(&self) -> u64 {
        self.state.connects.load(Ordering::Relaxed)
    }

    /// Requests of either kind answered `407` for missing or wrong
    /// credentials.
    pub fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::Relaxed)
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    let service = service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(request, state).await) }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
}

async fn handle(request: Request<Incoming>, state: Arc<State>) -> Response<ProxyBody> {
    let is_connect = request.method() == Method::CONNECT;
    let counter = if is_connect {
        &state.connects
    } else {
        &state.requests
    };
    counter.fetch_add(1, Ordering::Relaxed);

    if let Some(expected) = &state.credentials {
        let presented = request
            .headers()
            .get(header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(decode_basic);
        if presented.as_deref() != Some(expected.as_str()) {
            state.rejected.fetch_add(1, Ordering::Relaxed);
            let mut response = simple(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "proxy authentication required",
            );
            response.headers_mut().insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"patient-testkit\""),
            );
            return response;
        }
    }

    let authority = match target_authority(request.uri(), is_connect) {
        Ok(authority) => authority,
        Err(response) => return *response,
    };
    let port = authority.port_u16().unwrap_or(80);
    let target = match authority.host() {
        "127.0.0.1" | "localhost" => SocketAddr::from(([127, 0, 0, 1], port)),
        other => {
            return simple(
                StatusCode::FORBIDDEN,
                format!("this proxy only connects to 127.0.0.1, not {other}"),
            )
        }
    };
    let upstream = match TcpStream::connect(target).await {
        Ok(stream) => stream,
        Err(e) => return simple(StatusCode::BAD_GATEWAY, format!("connect {target}: {e}")),
    };
    let _ = upstream.set_nodelay(true);

    if is_connect {
        tunnel(request, upstream, state.shutdown.clone());
        Response::new(empty())
    } else {
        forward(request, upstream, &authority).await
    }
}

/// The target of a `CONNECT` (`host:port`) or an absolute-form `http://` URI.
fn target_authority(uri: &Uri, is_connect: bool) -> Result<Authority, Box<Response<ProxyBody>>> {
    let reject = |message: &str| Box::new(simple(StatusCode::BAD_REQUEST, message.to_owned()));
    if !is_connect && uri.scheme_str() != Some("http") {
        return Err(reject("expected an absolute-form http:// request target"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| reject("request target has no host"))?;
    if is_connect && authority.port_u16().is_none() {
        return Err(reject("CONNECT target needs a port"));
    }
    Ok(authority)
}

/// Copies bytes both ways once the client's connection is upgraded.
fn tunnel(request: Request<Incoming>, mut upstream: TcpStream, mut shutdown: watch::Receiver<()>) {
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(request).await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            _ = shutdown.changed() => {}
        }
    });
}

/// Sends an absolute-form request to the target in origin form.
async fn forward(
    request: Request<Incoming>,
    upstream: TcpStream,
    authority: &Authority,
) -> Response<ProxyBody> {
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(pair) => pair,
            Err(e) => return simple(StatusCode::BAD_GATEWAY, format!("handshake: {e}")),
        };
    tokio::spawn(connection);

    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    parts.uri = match path.parse() {
        Ok(uri) => uri,
        Err(_) => return simple(StatusCode::BAD_REQUEST, "invalid path"),
    };
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
    }
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => simple(StatusCode::BAD_GATEWAY, format!("upstream: {e}")),
    }
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// `user:password` from a `Basic` credential, if well formed.
fn decode_basic(value: &str) -> Option<String> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    String::from_utf8(decoded).ok()
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn simple(status: StatusCode, message: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(message.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_basic_credentials() {
        assert_eq!(
            decode_basic("Basic dXNlcjpwYXNz").as_deref(),
            Some("user:pass")
        );
        assert_eq!(
            decode_basic("basic dXNlcjpwYXNz").as_deref(),
            Some("user:pass")
        );
        assert_eq!(decode_basic("Bearer dXNlcjpwYXNz"), None);
        assert_eq!(decode_basic("Basic !!!"), None);
    }
}
