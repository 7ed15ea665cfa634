//! The transport against real servers: the testkit upstream, forward proxy and
//! certificates, plus small raw-TCP servers for stale-connection cases.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Version};
use patient_http::client::{
    ClientConfig, ClientConfigBuilder, ErrorType, HttpClient, HttpVersionPref, OutgoingRequest,
    ProxyConfig, RawResponse, TransportError,
};
use patient_testkit::{Fault, ForwardProxy, TestCert, Upstream, UpstreamOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

fn client(config: ClientConfigBuilder) -> HttpClient {
    HttpClient::new(config.build().unwrap()).unwrap()
}

fn request(method: Method, url: &str) -> OutgoingRequest {
    OutgoingRequest::new(method, url.parse().unwrap())
}

async fn get(client: &HttpClient, url: &str) -> Result<RawResponse, TransportError> {
    client.send(request(Method::GET, url)).await
}

async fn conn_id(client: &HttpClient, upstream: &Upstream) -> String {
    let response = get(client, &upstream.url("/conn")).await.unwrap();
    assert_eq!(response.status, 200);
    String::from_utf8(response.body.to_vec()).unwrap()
}

fn echo_json(response: &RawResponse) -> serde_json::Value {
    serde_json::from_slice(&response.body).unwrap()
}

fn tls_config(cert: &TestCert) -> ClientConfigBuilder {
    ClientConfig::builder().add_root_certificate_pem(cert.ca_pem.clone())
}

// ---------------------------------------------------------------- pool

#[tokio::test]
async fn keep_alive_reuses_the_connection() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder());
    let first = conn_id(&client, &upstream).await;
    let second = conn_id(&client, &upstream).await;
    assert_eq!(first, second);
    assert_eq!(upstream.connections(), 1);
    let stats = client.pool_stats();
    assert_eq!(stats.hosts, 1);
    assert_eq!(stats.idle_connections, 1);
    assert_eq!(stats.open_connections, 1);
}

#[tokio::test]
async fn max_requests_per_connection_opens_a_new_connection() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().max_requests_per_connection(Some(2)));
    let a = conn_id(&client, &upstream).await;
    let b = conn_id(&client, &upstream).await;
    let c = conn_id(&client, &upstream).await;
    let d = conn_id(&client, &upstream).await;
    assert_eq!(a, b);
    assert_ne!(b, c);
    assert_eq!(c, d);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn a_full_origin_queues_requests_on_its_connections() {
    let upstream = Upstream::start().await.unwrap();
    let url = upstream.url("/delay?ms=40");
    let limited = client(ClientConfig::builder().max_connections_per_host(Some(2)));
    let results = futures_util::future::join_all((0..10).map(|_| get(&limited, &url))).await;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 200)));
    assert_eq!(
        upstream.connections(),
        2,
        "ten requests over two connections"
    );

    // Unlimited (the default), the same burst opens a connection each.
    let other = Upstream::start().await.unwrap();
    let url = other.url("/delay?ms=40");
    let unlimited = client(ClientConfig::builder());
    let results = futures_util::future::join_all((0..10).map(|_| get(&unlimited, &url))).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(other.connections(), 10);
}

#[tokio::test]
async fn pool_wait_timeout_fails_a_request_that_finds_no_free_connection() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(
        ClientConfig::builder()
            .max_connections_per_host(Some(1))
            .pool_wait_timeout(Some(Duration::from_millis(50))),
    );
    let slow_url = upstream.url("/delay?ms=1000");
    let slow = get(&client, &slow_url);
    let waiting = async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        get(&client, &upstream.url("/fast")).await
    };
    let (slow, waiting) = tokio::join!(slow, waiting);
    assert_eq!(slow.unwrap().status, 200);
    let error = waiting.unwrap_err();
    assert_eq!(error.kind(), ErrorType::Timeout);
    assert_eq!(error.class_name(), "PoolTimeout");
    assert!(!error.request_sent(), "nothing was sent: {error}");
    assert!(
        error.to_string().contains("waiting for a free connection"),
        "{error}"
    );
    assert_eq!(upstream.connections(), 1);
    // The slot came back with the connection: the next request reuses it.
    assert_eq!(
        get(&client, &upstream.url("/fast")).await.unwrap().status,
        200
    );
    assert_eq!(upstream.connections(), 1);
}

#[test]
fn a_zero_connection_limit_is_refused_by_name() {
    let error = ClientConfig::builder()
        .max_connections_per_host(Some(0))
        .build()
        .unwrap_err();
    assert_eq!(error.field(), "max_connections_per_host");
}

#[tokio::test]
async fn idle_connections_expire() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().pool_idle_timeout(Duration::from_millis(120)));
    let first = conn_id(&client, &upstream).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    // The sweep already closed it.
    assert_eq!(client.pool_stats().idle_connections, 0);
    let second = conn_id(&client, &upstream).await;
    assert_ne!(first, second);
}

#[tokio::test]
async fn least_recently_used_host_pool_is_evicted() {
    let a = Upstream::start().await.unwrap();
    let b = Upstream::start().await.unwrap();
    let c = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().connection_pool_size(2));
    let a1 = conn_id(&client, &a).await;
    let b1 = conn_id(&client, &b).await;
    let a2 = conn_id(&client, &a).await; // a is now more recent than b
    conn_id(&client, &c).await; // evicts b
    assert_eq!(client.pool_stats().hosts, 2);
    let a3 = conn_id(&client, &a).await;
    let b2 = conn_id(&client, &b).await;
    assert_eq!(a1, a2);
    assert_eq!(a2, a3);
    assert_ne!(b1, b2);
    assert_eq!(a.connections(), 1);
    assert_eq!(b.connections(), 2);
}

#[tokio::test]
async fn timed_out_connection_is_not_reused() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder());
    let first = conn_id(&client, &upstream).await;
    let mut slow = request(Method::GET, &upstream.url("/delay?ms=2000"));
    slow.timeout = Some(Duration::from_millis(100));
    let err = client.send(slow).await.unwrap_err();
    assert_eq!(err.kind(), ErrorType::Timeout);
    assert_eq!(err.class_name(), "Timeout");
    assert!(err.request_sent());
    let next = conn_id(&client, &upstream).await;
    assert_ne!(first, next);
}

#[tokio::test]
async fn dropped_request_future_does_not_return_the_connection() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder());
    let first = conn_id(&client, &upstream).await;
    let slow = client.send(request(Method::GET, &upstream.url("/delay?ms=2000")));
    assert!(tokio::time::timeout(Duration::from_millis(100), slow)
        .await
        .is_err());
    let next = conn_id(&client, &upstream).await;
    assert_ne!(first, next);
}

#[tokio::test]
async fn too_large_response_connection_is_not_reused() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().max_response_size(1000));
    let first = conn_id(&client, &upstream).await;
    let err = get(&client, &upstream.url("/bytes?n=5000&chunked=1"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorType::ResponseTooLarge);
    let next = conn_id(&client, &upstream).await;
    assert_ne!(first, next);
}

/// A raw HTTP/1.1 server answering one request per connection with the
/// connection number as body. With `close_after`, it closes each connection
/// that long after answering; otherwise it keeps it open and closes it,
/// without answering, when a second request arrives.
async fn one_response_per_connection(
    close_after: Option<Duration>,
) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let id = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                if !read_head(&mut stream).await {
                    return;
                }
                let body = id.to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                match close_after {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => {
                        let _ = read_head(&mut stream).await;
                    }
                }
                drop(stream);
            });
        }
    });
    (addr, connections)
}

/// Reads until the end of a request head (bodies are small and arrive with it).
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return true;
        }
    }
}

#[tokio::test]
async fn connection_closed_while_idle_is_replaced() {
    let (addr, connections) = one_response_per_connection(Some(Duration::from_millis(30))).await;
    let client = client(ClientConfig::builder());
    let url = format!("http://{addr}/");
    assert_eq!(get(&client, &url).await.unwrap().body, "1");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(get(&client, &url).await.unwrap().body, "2");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn stale_connection_is_retried_for_idempotent_requests() {
    let (addr, connections) = one_response_per_connection(None).await;
    let client = client(ClientConfig::builder());
    let url = format!("http://{addr}/");
    assert_eq!(get(&client, &url).await.unwrap().body, "1");
    // The pooled connection looks alive but is closed when used.
    assert_eq!(get(&client, &url).await.unwrap().body, "2");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn stale_connection_is_not_retried_for_post() {
    let (addr, connections) = one_response_per_connection(None).await;
    let client = client(ClientConfig::builder());
    let url = format!("http://{addr}/");
    let post = || {
        let mut r = request(Method::POST, &url);
        r.body = Bytes::from_static(b"x");
        r
    };
    assert_eq!(client.send(post()).await.unwrap().body, "1");
    let err = client.send(post()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorType::Connection);
    assert_eq!(err.class_name(), "IncompleteMessage");
    assert!(err.request_sent());
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn stale_retries_can_be_disabled() {
    let (addr, _) = one_response_per_connection(None).await;
    let client = client(ClientConfig::builder().retries(0));
    let url = format!("http://{addr}/");
    get(&client, &url).await.unwrap();
    let err = get(&client, &url).await.unwrap_err();
    assert_eq!(err.class_name(), "IncompleteMessage");
}

// ---------------------------------------------------------------- TLS and HTTP versions

#[tokio::test]
async fn tls_with_trusted_root_negotiates_http2() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    let client = client(tls_config(&cert));
    let response = get(&client, &upstream.url("/fast")).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.version, Version::HTTP_2);
    // By host name too (SNI and certificate name).
    let by_name = format!("https://localhost:{}/fast", upstream.addr().port());
    assert_eq!(get(&client, &by_name).await.unwrap().status, 200);
}

#[tokio::test]
async fn untrusted_certificate_is_an_ssl_error() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    let client = client(ClientConfig::builder());
    let err = get(&client, &upstream.url("/fast")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorType::Ssl);
    assert_eq!(err.class_name(), "TlsError");
    assert!(err.is_tls());
    assert!(!err.request_sent());
    assert!(err.message().contains("127.0.0.1"), "{}", err.message());
    assert!(std::error::Error::source(&err).is_some());
}

/// A client built with `config` while events are captured: the client and
/// each event logged, as `LEVEL message`.
fn client_logging(config: ClientConfigBuilder) -> (HttpClient, String) {
    let capture = Capture::default();
    let client = tracing::subscriber::with_default(capture.clone(), || client(config));
    let logged = capture.0.lock().unwrap().join("\n");
    (client, logged)
}

/// A subscriber that keeps the level and message of every event.
#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<String>>>);

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        let line = format!("{} {}", event.metadata().level(), message.0);
        self.0.lock().unwrap().push(line);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn danger_accept_invalid_certs_accepts_an_untrusted_certificate_and_warns() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();

    // Refused by default, without a word about certificates being ignored.
    let (strict, logged) = client_logging(ClientConfig::builder());
    assert!(!logged.contains("danger_accept_invalid_certs"), "{logged}");
    let err = get(&strict, &upstream.url("/fast")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorType::Ssl);
    assert!(err.is_tls());

    // Accepted with the option, over HTTP/2 as with a trusted root, and the
    // build logged a warning.
    let (lax, logged) = client_logging(ClientConfig::builder().danger_accept_invalid_certs(true));
    assert!(logged.starts_with("WARN "), "{logged}");
    assert!(logged.contains("danger_accept_invalid_certs"), "{logged}");
    assert!(logged.contains("not verified"), "{logged}");
    let response = get(&lax, &upstream.url("/fast")).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.version, Version::HTTP_2);
    let by_name = format!("https://localhost:{}/fast", upstream.addr().port());
    assert_eq!(get(&lax, &by_name).await.unwrap().status, 200);
}

#[tokio::test]
async fn danger_accept_invalid_certs_ignores_the_certificate_names() {
    // A certificate for another host entirely, from an unknown CA.
    let cert = TestCert::generate(&["elsewhere.test"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    let trusting = client(tls_config(&cert));
    let err = get(&trusting, &upstream.url("/fast")).await.unwrap_err();
    assert!(err.is_tls(), "trusted CA, wrong name: {err}");

    let lax = client(
        tls_config(&cert)
            .http_version(HttpVersionPref::Http1Only)
            .danger_accept_invalid_certs(true),
    );
    let response = get(&lax, &upstream.url("/fast")).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.version, Version::HTTP_11);
}

#[tokio::test]
async fn http2_connection_is_shared_by_concurrent_requests() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    let client = client(tls_config(&cert));
    // Learn that the origin speaks HTTP/2, then fire concurrently.
    get(&client, &upstream.url("/fast")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = client.clone();
        let url = upstream.url("/delay?ms=50");
        tasks.push(tokio::spawn(async move {
            get(&client, &url).await.map(|r| r.version)
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Version::HTTP_2);
    }
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn http2_first_burst_waits_for_one_connection_when_forced() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    let client = client(tls_config(&cert).http_version(HttpVersionPref::Http2Only));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        let url = upstream.url("/fast");
        tasks.push(tokio::spawn(async move {
            get(&client, &url).await.map(|r| r.version)
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), Version::HTTP_2);
    }
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn http1_can_be_forced_on_tls() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    let client = client(tls_config(&cert).http_version(HttpVersionPref::Http1Only));
    let first = get(&client, &upstream.url("/conn")).await.unwrap();
    let second = get(&client, &upstream.url("/conn")).await.unwrap();
    assert_eq!(first.version, Version::HTTP_11);
    assert_eq!(first.body, second.body);
}

#[tokio::test]
async fn auto_falls_back_to_http1_when_the_server_has_no_h2() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let upstream = Upstream::start_with(UpstreamOptions::new().tls(&cert).http1_only())
        .await
        .unwrap();
    let client = client(tls_config(&cert));
    let response = get(&client, &upstream.url("/fast")).await.unwrap();
    assert_eq!(response.version, Version::HTTP_11);
}

#[tokio::test]
async fn h2c_prior_knowledge_on_plain_http() {
    let upstream = Upstream::start_h2c().await.unwrap();
    let client = client(ClientConfig::builder().http_version(HttpVersionPref::Http2Only));
    let response = get(&client, &upstream.url("/echo")).await.unwrap();
    assert_eq!(response.version, Version::HTTP_2);
    assert_eq!(echo_json(&response)["method"], "GET");
    // Plain http without forcing: HTTP/1.1.
    let plain = Upstream::start().await.unwrap();
    let response = get(
        &HttpClient::new(ClientConfig::default()).unwrap(),
        &plain.url("/fast"),
    )
    .await
    .unwrap();
    assert_eq!(response.version, Version::HTTP_11);
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    use hyper_util::rt::TokioIo;
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

    let server_cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let client_cert = TestCert::generate(&["client.test"]);

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client_roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_cert.ca_pem.as_bytes()) {
        client_roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let chain: Vec<_> = CertificateDer::pem_slice_iter(server_cert.cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(server_cert.key_pem.as_bytes()).unwrap();
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"hello client")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    let url = format!("https://127.0.0.1:{}/", addr.port());

    let with_identity = client(tls_config(&server_cert).client_identity(Some((
        client_cert.cert_pem.clone(),
        client_cert.key_pem.clone(),
    ))));
    assert_eq!(
        get(&with_identity, &url).await.unwrap().body,
        "hello client"
    );

    let without = client(tls_config(&server_cert));
    let err = get(&without, &url).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorType::Ssl | ErrorType::Connection),
        "{err:?}"
    );
}

// ---------------------------------------------------------------- proxy

#[tokio::test]
async fn http_target_through_proxy_with_credentials() {
    let upstream = Upstream::start().await.unwrap();
    let proxy = ForwardProxy::start(Some(("user", "secret"))).await.unwrap();
    let proxy_url = proxy.url().replace("http://", "http://user:secret@");
    let client = client(ClientConfig::builder().proxy(Some(ProxyConfig::new(proxy_url).unwrap())));
    let response = get(&client, &upstream.url("/echo?a=1")).await.unwrap();
    assert_eq!(response.status, 200);
    let echo = echo_json(&response);
    assert_eq!(echo["path"], "/echo");
    assert!(echo["headers"].get("proxy-authorization").is_none());
    assert_eq!(proxy.requests(), 1);
    assert_eq!(proxy.connects(), 0);
}

#[tokio::test]
async fn https_target_through_proxy_uses_connect() {
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let upstream = Upstream::start_tls(&cert).await.unwrap();
    let proxy = ForwardProxy::start(Some(("user", "secret"))).await.unwrap();
    let config = tls_config(&cert).proxy(Some(
        ProxyConfig::new(proxy.url())
            .unwrap()
            .basic_auth("user", "secret"),
    ));
    let client = client(config);
    let first = get(&client, &upstream.url("/conn")).await.unwrap();
    let second = get(&client, &upstream.url("/conn")).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.body, second.body, "the tunnel is kept alive");
    assert_eq!(proxy.connects(), 1);
    assert_eq!(proxy.requests(), 0);
}

#[tokio::test]
async fn proxy_authentication_failure_is_an_error() {
    let upstream = Upstream::start().await.unwrap();
    let cert = TestCert::generate(&["localhost", "127.0.0.1"]);
    let tls_upstream = Upstream::start_tls(&cert).await.unwrap();
    let proxy = ForwardProxy::start(Some(("user", "secret"))).await.unwrap();
    let config = tls_config(&cert).proxy(Some(
        ProxyConfig::new(proxy.url())
            .unwrap()
            .basic_auth("user", "wrong"),
    ));
    let client = client(config);

    let err = get(&client, &upstream.url("/fast")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorType::Connection);
    assert_eq!(err.class_name(), "ProxyAuthenticationRequired");

    let err = get(&client, &tls_upstream.url("/fast")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorType::Connection);
    assert_eq!(err.class_name(), "ProxyAuthenticationRequired");
    assert!(!err.request_sent());
    assert_eq!(proxy.rejected(), 2);
}

#[tokio::test]
async fn proxy_from_env_only_when_enabled() {
    let upstream = Upstream::start().await.unwrap();
    let proxy = ForwardProxy::start(None).await.unwrap();
    // Only this test reads these variables (clients read them at construction).
    std::env::set_var("http_proxy", proxy.url());
    std::env::set_var("no_proxy", "example.invalid");
    let from_env = HttpClient::new(
        ClientConfig::builder()
            .proxy_from_env(true)
            .build()
            .unwrap(),
    )
    .unwrap();
    let ignoring = HttpClient::new(ClientConfig::default()).unwrap();
    std::env::set_var("no_proxy", "127.0.0.1");
    let bypassing = HttpClient::new(
        ClientConfig::builder()
            .proxy_from_env(true)
            .build()
            .unwrap(),
    )
    .unwrap();
    std::env::remove_var("http_proxy");
    std::env::remove_var("no_proxy");

    get(&ignoring, &upstream.url("/fast")).await.unwrap();
    assert_eq!(proxy.requests(), 0);
    get(&bypassing, &upstream.url("/fast")).await.unwrap();
    assert_eq!(proxy.requests(), 0);
    get(&from_env, &upstream.url("/fast")).await.unwrap();
    assert_eq!(proxy.requests(), 1);
}

// ---------------------------------------------------------------- timeouts

#[tokio::test]
async fn connect_timeout_is_separate_from_the_request_timeout() {
    // Accepts TCP but never answers the TLS handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let client = client(
        ClientConfig::builder()
            .connection_timeout(Some(Duration::from_millis(100)))
            .request_timeout(Duration::from_secs(10)),
    );
    let started = std::time::Instant::now();
    let err = get(&client, &format!("https://127.0.0.1:{}/", addr.port()))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(err.kind(), ErrorType::Timeout);
    assert_eq!(err.class_name(), "ConnectTimeout");
    assert!(!err.request_sent());

    // The connect timeout does not cut a slow response.
    let upstream = Upstream::start().await.unwrap();
    let response = get(&client, &upstream.url("/delay?ms=300")).await.unwrap();
    assert_eq!(response.status, 200);
}

#[tokio::test]
async fn request_timeout_covers_the_connect_without_a_connect_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let client = client(ClientConfig::builder().request_timeout(Duration::from_millis(150)));
    let err = get(&client, &format!("https://127.0.0.1:{}/", addr.port()))
        .await
        .unwrap_err();
    assert_eq!(err.class_name(), "Timeout");
    assert!(!err.request_sent());
}

#[tokio::test]
async fn connection_refused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let client = client(ClientConfig::builder());
    let err = get(&client, &format!("http://127.0.0.1:{port}/"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorType::Connection);
    assert_eq!(err.class_name(), "ConnectionRefused");
    assert!(
        err.message().contains(&format!("127.0.0.1:{port}")),
        "{}",
        err.message()
    );
    assert!(!err.request_sent());
}

// ---------------------------------------------------------------- bodies

#[tokio::test]
async fn max_response_size_by_content_length_and_running_count() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().max_response_size(1000));
    assert_eq!(
        get(&client, &upstream.url("/bytes?n=1000"))
            .await
            .unwrap()
            .body
            .len(),
        1000
    );
    assert_eq!(
        get(&client, &upstream.url("/bytes?n=1000&chunked=1"))
            .await
            .unwrap()
            .body
            .len(),
        1000
    );

    let err = get(&client, &upstream.url("/bytes?n=1001"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorType::ResponseTooLarge);
    assert_eq!(err.class_name(), "ResponseTooLarge");
    assert!(
        err.message().contains("content-length"),
        "{}",
        err.message()
    );

    let err = get(&client, &upstream.url("/bytes?n=100000&chunked=1"))
        .await
        .unwrap_err();
    assert!(err.is_too_large());
    assert!(err.message().contains("bytes read"), "{}", err.message());
}

#[tokio::test]
async fn head_responses_have_no_body() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().max_response_size(10));
    let response = client
        .send(request(Method::HEAD, &upstream.url("/bytes?n=5000")))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert!(response.body.is_empty());
    // The connection is still usable.
    get(&client, &upstream.url("/fast")).await.unwrap();
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn decompresses_gzip_deflate_and_br() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().decompress(true));
    let plain = get(&client, &upstream.url("/compressed?encoding=identity"))
        .await
        .unwrap()
        .body;
    assert!(!plain.is_empty());
    for encoding in ["gzip", "deflate", "br"] {
        let response = get(
            &client,
            &upstream.url(&format!("/compressed?encoding={encoding}")),
        )
        .await
        .unwrap();
        assert_eq!(response.body, plain, "{encoding}");
        assert!(response.headers.get("content-encoding").is_none());
    }
    let echo = echo_json(&get(&client, &upstream.url("/echo")).await.unwrap());
    assert_eq!(echo["headers"]["accept-encoding"], "gzip, deflate, br");

    // Off by default: the body stays encoded.
    let raw = HttpClient::new(ClientConfig::default()).unwrap();
    let response = get(&raw, &upstream.url("/compressed?encoding=gzip"))
        .await
        .unwrap();
    assert_eq!(response.headers["content-encoding"], "gzip");
    assert_ne!(response.body, plain);

    // The decompressed size is limited too.
    let small = HttpClient::new(
        ClientConfig::builder()
            .decompress(true)
            .max_response_size(plain.len() - 1)
            .build()
            .unwrap(),
    )
    .unwrap();
    let err = get(&small, &upstream.url("/compressed?encoding=gzip"))
        .await
        .unwrap_err();
    assert!(err.is_too_large());
}

#[tokio::test]
async fn request_compression_gzips_large_bodies() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder().request_compression(true));
    let mut large = request(Method::POST, &upstream.url("/echo"));
    large.body = Bytes::from(vec![b'a'; 4096]);
    let echo = echo_json(&client.send(large).await.unwrap());
    assert_eq!(echo["headers"]["content-encoding"], "gzip");
    assert!(
        echo["headers"]["content-length"]
            .as_str()
            .unwrap()
            .parse::<usize>()
            .unwrap()
            < 4096
    );

    let mut small = request(Method::POST, &upstream.url("/echo"));
    small.body = Bytes::from_static(b"tiny");
    let echo = echo_json(&client.send(small).await.unwrap());
    assert!(echo["headers"].get("content-encoding").is_none());
    assert_eq!(echo["body"], "tiny");
}

/// The body the upstream received (decoded from base64) and its
/// `content-encoding`, for a POST of `len` bytes through `client`.
async fn echoed_post(
    client: &HttpClient,
    upstream: &Upstream,
    len: usize,
) -> (Option<String>, Vec<u8>) {
    use base64::Engine as _;
    let mut post = request(Method::POST, &upstream.url("/echo"));
    post.body = Bytes::from(vec![b'a'; len]);
    let echo = echo_json(&client.send(post).await.unwrap());
    let encoding = echo["headers"]
        .get("content-encoding")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let body = base64::engine::general_purpose::STANDARD
        .decode(echo["body_base64"].as_str().unwrap())
        .unwrap();
    (encoding, body)
}

#[tokio::test]
async fn request_compression_starts_at_the_configured_threshold() {
    let upstream = Upstream::start().await.unwrap();

    // The default threshold: 1 KiB.
    let default = client(ClientConfig::builder().request_compression(true));
    let (encoding, body) = echoed_post(&default, &upstream, 1023).await;
    assert_eq!(encoding, None);
    assert_eq!(body, vec![b'a'; 1023]);
    let (encoding, body) = echoed_post(&default, &upstream, 1024).await;
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert!(body.len() < 1024, "{}", body.len());

    // A threshold of 100 bytes.
    let low = client(
        ClientConfig::builder()
            .request_compression(true)
            .request_compression_min_size(100),
    );
    let (encoding, body) = echoed_post(&low, &upstream, 99).await;
    assert_eq!(encoding, None);
    assert_eq!(body, vec![b'a'; 99]);
    let (encoding, body) = echoed_post(&low, &upstream, 100).await;
    assert_eq!(encoding.as_deref(), Some("gzip"));
    assert_eq!(body[..2], [0x1f, 0x8b], "a gzip member");
    assert!(body.len() < 100, "{}", body.len());

    // A threshold above the default leaves a 2 KiB body alone.
    let high = client(
        ClientConfig::builder()
            .request_compression(true)
            .request_compression_min_size(4096),
    );
    let (encoding, body) = echoed_post(&high, &upstream, 2048).await;
    assert_eq!(encoding, None);
    assert_eq!(body.len(), 2048);
}

#[tokio::test]
async fn user_agent_and_host_headers() {
    let upstream = Upstream::start().await.unwrap();
    let client = client(ClientConfig::builder());
    let echo = echo_json(&get(&client, &upstream.url("/echo")).await.unwrap());
    assert_eq!(echo["headers"]["user-agent"], "PatientHttp");
    assert_eq!(echo["headers"]["host"], upstream.addr().to_string());

    let mut custom = request(Method::GET, &upstream.url("/echo"));
    custom
        .headers
        .insert("user-agent", HeaderValue::from_static("mine/1.0"));
    let echo = echo_json(&client.send(custom).await.unwrap());
    assert_eq!(echo["headers"]["user-agent"], "mine/1.0");
}

// ---------------------------------------------------------------- faults

async fn fault(upstream: &Upstream, fault: Fault) -> TransportError {
    let client = client(ClientConfig::builder().request_timeout(Duration::from_secs(1)));
    get(&client, &upstream.fault_url(fault)).await.unwrap_err()
}

#[tokio::test]
async fn fault_modes_map_to_error_types() {
    let upstream = Upstream::start().await.unwrap();
    let cases = [
        (
            Fault::ResetMidBody,
            ErrorType::Connection,
            "ConnectionReset",
        ),
        (
            Fault::CloseBeforeHeaders,
            ErrorType::Connection,
            "IncompleteMessage",
        ),
        (Fault::TrickleHeaders, ErrorType::Timeout, "Timeout"),
        (
            Fault::MalformedChunked,
            ErrorType::Connection,
            "InvalidResponse",
        ),
        (
            Fault::OversizedHeaders,
            ErrorType::ResponseTooLarge,
            "ResponseHeadTooLarge",
        ),
        (Fault::ShortBody, ErrorType::Connection, "IncompleteMessage"),
    ];
    for (mode, kind, class_name) in cases {
        let err = fault(&upstream, mode).await;
        assert_eq!(err.kind(), kind, "{mode:?}: {err:?}");
        assert_eq!(err.class_name(), class_name, "{mode:?}: {err:?}");
        assert!(
            err.message().contains("127.0.0.1"),
            "{mode:?}: {}",
            err.message()
        );
    }
}

// ---------------------------------------------------------------- config

/// The settings `build` cannot check (TLS material) are refused by
/// `HttpClient::new`, naming the setting; the others are refused by
/// `ClientConfigBuilder::build` (unit tests of the `config` module).
#[test]
fn invalid_tls_settings_name_the_field() {
    let cases = [
        (
            ClientConfig::builder().add_root_certificate_pem("not a pem"),
            "root_certificates_pem",
        ),
        (
            ClientConfig::builder().root_certificates_pem(["not a pem"]),
            "root_certificates_pem",
        ),
        (
            ClientConfig::builder().client_identity(Some(("x".into(), "y".into()))),
            "client_identity",
        ),
    ];
    for (builder, field) in cases {
        let config = builder.build().unwrap();
        let err = HttpClient::new(config).unwrap_err();
        assert_eq!(err.field(), field, "{err}");
        assert!(err.to_string().contains(field));
    }
    assert_eq!(
        ProxyConfig::new("ftp://proxy:21").unwrap_err().field(),
        "proxy"
    );
}

#[test]
fn client_is_built_outside_a_runtime() {
    let client = HttpClient::new(ClientConfig::default()).unwrap();
    assert_eq!(client.pool_stats().hosts, 0);
}

/// A body that trickles: the stall timeout ends it, the request timeout alone does not.
#[tokio::test(start_paused = true)]
async fn stall_timeout_ends_a_trickling_body() {
    let up = Upstream::start().await.unwrap();
    let client = HttpClient::new(
        ClientConfig::builder()
            .stall_timeout(Some(Duration::from_millis(200)))
            .build()
            .unwrap(),
    )
    .unwrap();
    let url = url::Url::parse(&up.url("/sse?events=5&interval_ms=500")).unwrap();
    let err = client
        .send(OutgoingRequest::new(Method::GET, url.clone()))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.class_name(), "StallTimeout");

    // Per request, a longer stall limit lets the same body through.
    let mut request = OutgoingRequest::new(Method::GET, url);
    request.stall_timeout = Some(Duration::from_secs(1));
    let response = client.send(request).await.unwrap();
    assert_eq!(response.status, 200);
    assert!(String::from_utf8_lossy(&response.body).contains("event 4"));
}

// ---------------------------------------------------------------- address filter

/// Refuses every loopback address but 127.0.0.1 (where the upstream is).
fn only_127_0_0_1() -> patient_http::client::AddressFilter {
    patient_http::client::AddressFilter::new(|_, ip| {
        if ip == std::net::IpAddr::from([127, 0, 0, 1]) {
            Ok(())
        } else {
            Err("not on the list".into())
        }
    })
}

#[tokio::test]
async fn the_address_filter_refuses_literals_and_resolved_names_before_connecting() {
    let upstream = Upstream::start().await.unwrap();
    let port = upstream.addr().port();
    let refuse_all = client(ClientConfig::builder().address_filter(Some(
        patient_http::client::AddressFilter::new(|_, ip| Err(format!("{ip} is loopback"))),
    )));
    let error = get(&refuse_all, &upstream.url("/fast")).await.unwrap_err();
    assert_eq!(error.class_name(), "EgressDenied");
    assert_eq!(
        error.kind(),
        ErrorType::Unknown,
        "not a connection error: not retried"
    );
    assert!(
        error.to_string().contains("127.0.0.1 is loopback"),
        "{error}"
    );
    assert!(!error.request_sent());

    // A name is resolved, then every address it resolves to is checked.
    let error = get(&refuse_all, &format!("http://localhost:{port}/fast"))
        .await
        .unwrap_err();
    assert_eq!(error.class_name(), "EgressDenied");
    assert!(
        error.to_string().contains("localhost resolved to it"),
        "{error}"
    );
    assert_eq!(upstream.connections(), 0, "nothing was connected");

    // Allowed addresses pass.
    let allowed = client(ClientConfig::builder().address_filter(Some(only_127_0_0_1())));
    assert_eq!(
        get(&allowed, &upstream.url("/fast")).await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn the_address_filter_checks_every_redirect_hop() {
    let upstream = Upstream::start().await.unwrap();
    let port = upstream.addr().port();
    let client = patient_http::AwaitableClient::builder()
        .config(
            patient_http::Config::builder()
                .client_with(|c| c.address_filter(Some(only_127_0_0_1())))
                .build()
                .unwrap(),
        )
        .build_awaitable()
        .unwrap();
    let hop = format!("http://127.0.0.2:{port}/echo");
    let request = patient_http::Request::get(upstream.url(&format!("/redirect-to?url={hop}")))
        .build()
        .unwrap();
    let error = client.send(request).await.unwrap_err();
    let patient_http::TaskError::Request(error) = error else {
        panic!("{error:?}");
    };
    assert_eq!(error.class_name, "EgressDenied");
    assert!(error.message.contains("127.0.0.2"), "{}", error.message);
    assert_eq!(upstream.requests_to("/echo"), 0);
}

#[tokio::test]
async fn a_response_head_over_64_kib_is_refused_on_both_protocols() {
    // HTTP/1.1 counts the head's bytes (status line included), HTTP/2 the
    // header list as SETTINGS_MAX_HEADER_LIST_SIZE does (32 bytes more per
    // field); both stop at 64 KiB.
    let h1 = Upstream::start().await.unwrap();
    let h2 = Upstream::start_h2c().await.unwrap();
    for (upstream, config) in [
        (&h1, ClientConfig::builder()),
        (
            &h2,
            ClientConfig::builder().http_version(HttpVersionPref::Http2Only),
        ),
    ] {
        let client = client(config);
        let error = get(&client, &upstream.url("/headers?n=1&size=70000"))
            .await
            .unwrap_err();
        assert!(error.request_sent());
        if upstream.addr() == h1.addr() {
            assert!(
                error.is_too_large() && error.is_head_too_large(),
                "{error:?}"
            );
        } else {
            // h2 resets the stream with a PROTOCOL_ERROR of its own, which
            // says nothing more precise.
            assert!(error.is_connect(), "{error:?}");
        }
        let response = get(&client, &upstream.url("/headers?n=1&size=30000"))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
}
