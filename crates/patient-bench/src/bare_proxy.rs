//! The gateway benchmark's second peer: a bare hyper reverse proxy, the
//! floor of a proxy written on the same stack as the gateway (tokio,
//! hyper's HTTP/1.1 server, hyper-util's pooled client) with nothing else
//! on the request path: no routing table, no header rules, no engine.
//!
//! It takes every request, replaces the URI's authority with the
//! upstream's (dropping a leading `/up` as the gateway's route does), drops
//! the hop-by-hop `Connection` header both ways and streams both bodies
//! through as they come. Its best configuration for this load: a
//! multi-thread runtime with one worker per core, `TCP_NODELAY` on both
//! sides, an unlimited idle pool to the upstream, HTTP/1.1 only.
//!
//! Run as a child of the benchmark (`--bare-proxy-child UPSTREAM`): it
//! prints `listening=ADDR` on its first line and serves until it is
//! stopped (`SIGTERM`), so its CPU and memory count in a process of their
//! own.

use std::{convert::Infallible, io::Write, net::SocketAddr};

use http_body_util::combinators::BoxBody;
use hyper::{body::Incoming, header, service::service_fn, Request, Response, Uri};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};

use crate::harness::BoxError;

/// The flag that runs the benchmark program as the bare proxy.
pub const BARE_PROXY_CHILD_FLAG: &str = "--bare-proxy-child";

type ProxyBody = BoxBody<bytes::Bytes, hyper::Error>;

/// Serves as the bare proxy to `upstream` until the process is stopped.
pub fn run_bare_proxy_child(upstream: SocketAddr) -> Result<(), BoxError> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening={}", listener.local_addr()?)?;
        stdout.flush()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
        let authority = upstream.to_string();
        accept_loop(listener, client, authority).await;
        Ok(())
    })
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    client: Client<HttpConnector, Incoming>,
    authority: String,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let service =
                service_fn(move |request| forward(client.clone(), authority.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    authority: String,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    use http_body_util::BodyExt;
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = path.strip_prefix("/up").unwrap_or(path);
    let uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build();
    let Ok(uri) = uri else {
        return Ok(status(hyper::StatusCode::BAD_REQUEST));
    };
    parts.uri = uri;
    parts.headers.remove(header::CONNECTION);
    parts.headers.remove(header::HOST);
    match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            parts.headers.remove(header::CONNECTION);
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Err(_) => Ok(status(hyper::StatusCode::BAD_GATEWAY)),
    }
}

fn status(code: hyper::StatusCode) -> Response<ProxyBody> {
    use http_body_util::{BodyExt, Empty};
    let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *response.status_mut() = code;
    response
}
