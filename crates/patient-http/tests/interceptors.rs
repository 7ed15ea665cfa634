//! Async hooks against a real axum upstream on loopback: async secrets,
//! interceptors and preprocessors, their panics and hangs, the refresh and
//! replay on a `401` (with `BearerAuth` and its single-flight refresh),
//! response bodies transformed by hooks, the interception context, and the
//! logging interceptor's duration and size.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::IntoResponse,
    routing::{any, get},
    Json, Router,
};
use bytes::Bytes;
use patient_http::{
    async_trait,
    client::{HttpClient, OutgoingRequest},
    interceptor::{
        AccessToken, BearerAuth, InterceptContext, Interceptor, LoggingInterceptor, ResponseAction,
        ResponseParts, REDACTED,
    },
    preprocess::{AwsCredentials, PreparedRequest, Preprocessor},
    resilience::upstream_key,
    AwaitableClient, Builder, ErrorType, Request, RequestError, RequestOptions, ResilienceConfig,
    Response, RetryOptions, Secret, SigV4, TaskError,
};
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::Barrier, time::Instant};
use tracing::{
    field::{Field, Visit},
    span, Event, Metadata, Subscriber,
};

// ------------------------------------------------------------------ upstream

/// What the upstream counts and how it answers `/protected`.
struct Upstream {
    /// Requests to `/protected`.
    protected: AtomicU64,
    /// The token `/protected` accepts; `None` refuses every one.
    accepted: Option<&'static str>,
    /// Requests with this token wait until this many arrived, then are
    /// refused together.
    hold: Option<(&'static str, Barrier)>,
    /// Requests to `/vault`.
    vault: AtomicU64,
    /// Requests to `/flaky`.
    flaky: AtomicU64,
}

impl Upstream {
    fn accepting(token: Option<&'static str>) -> Self {
        Upstream {
            protected: AtomicU64::new(0),
            accepted: token,
            hold: None,
            vault: AtomicU64::new(0),
            flaky: AtomicU64::new(0),
        }
    }
}

/// The request as received: method, path and query, headers.
async fn echo(method: axum::http::Method, uri: Uri, headers: HeaderMap) -> Json<Value> {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    Json(json!({
        "method": method.as_str(),
        "uri": uri.to_string(),
        "headers": headers,
    }))
}

async fn protected(State(up): State<Arc<Upstream>>, headers: HeaderMap) -> impl IntoResponse {
    up.protected.fetch_add(1, Ordering::SeqCst);
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    if let Some((held, barrier)) = &up.hold {
        if token == *held
            && tokio::time::timeout(Duration::from_secs(10), barrier.wait())
                .await
                .is_err()
        {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                "never all there".to_owned(),
            );
        }
    }
    if up.accepted == Some(token.as_str()) {
        (StatusCode::OK, format!("welcome {token}"))
    } else {
        (StatusCode::UNAUTHORIZED, format!("refused {token}"))
    }
}

async fn vault(State(up): State<Arc<Upstream>>) -> &'static str {
    up.vault.fetch_add(1, Ordering::SeqCst);
    "vault-token"
}

/// 503 on the first request, the echo after.
async fn flaky(
    State(up): State<Arc<Upstream>>,
    method: axum::http::Method,
    uri: Uri,
    headers: HeaderMap,
) -> axum::response::Response {
    if up.flaky.fetch_add(1, Ordering::SeqCst) == 0 {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    echo(method, uri, headers).await.into_response()
}

async fn data() -> impl IntoResponse {
    (
        [("content-type", "application/json")],
        r#"{"data":{"id":1,"name":"ada"}}"#,
    )
}

async fn start(up: Arc<Upstream>) -> SocketAddr {
    let app = Router::new()
        .route("/echo", any(echo))
        .route("/protected", get(protected))
        .route("/vault", get(vault))
        .route("/flaky", get(flaky))
        .route("/data", get(data))
        .with_state(up);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

fn body_json(response: &Response) -> Value {
    serde_json::from_slice(response.body.as_deref().unwrap_or_default()).unwrap()
}

fn body_text(response: &Response) -> &str {
    std::str::from_utf8(response.body.as_deref().unwrap_or_default()).unwrap()
}

fn request_error(result: Result<Response, TaskError>) -> RequestError {
    match result {
        Err(TaskError::Request(e)) => e,
        other => panic!("expected a request error, got {other:?}"),
    }
}

/// GETs `url` with the plain HTTP client: what an async hook awaits.
async fn fetch_text(client: &HttpClient, url: &str) -> Result<String, String> {
    let request = OutgoingRequest::new(http::Method::GET, url.parse().map_err(|_| "bad url")?);
    let response = client.send(request).await.map_err(|e| e.to_string())?;
    String::from_utf8(response.body.to_vec()).map_err(|e| e.to_string())
}

fn http_client() -> Arc<HttpClient> {
    Arc::new(HttpClient::new(Default::default()).unwrap())
}

// ------------------------------------------------------------ async hooks

#[tokio::test]
async fn an_async_secret_awaits_a_vault_served_by_the_same_single_thread() {
    // One thread runs the upstream, the vault and the client: the secret's
    // lookup completes only because it awaits instead of blocking it.
    let up = Arc::new(Upstream::accepting(None));
    let addr = start(up.clone()).await;
    let vault = http_client();
    let vault_url = url(addr, "/vault");
    let client = Builder::new()
        .secret(
            "vault",
            Secret::computed_async(move || {
                let vault = vault.clone();
                let vault_url = vault_url.clone();
                async move { fetch_text(&vault, &vault_url).await }
            }),
        )
        .build_awaitable()
        .unwrap();
    let request = Request::get(url(addr, "/echo"))
        .secret_header("authorization", "vault")
        .secret_param("key", "vault")
        .build()
        .unwrap();
    let response = client.send(request).await.unwrap();
    let echoed = body_json(&response);
    assert_eq!(echoed["headers"]["authorization"], "vault-token");
    assert_eq!(echoed["uri"], "/echo?key=vault-token");
    // Once for the header, once for the parameter.
    assert_eq!(up.vault.load(Ordering::SeqCst), 2);
    // The outcome's URL carries no secret.
    assert!(!response.url.contains("vault-token"), "{}", response.url);
}

/// Sets `x-tenant` to what the vault says, awaiting it.
struct TenantFromVault {
    client: Arc<HttpClient>,
    url: String,
}

#[async_trait]
impl Interceptor for TenantFromVault {
    async fn on_request(
        &self,
        request: &mut PreparedRequest,
        _ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        let tenant = fetch_text(&self.client, &self.url).await?;
        request.set_header("x-tenant", &tenant)
    }
}

/// Adds `sig=<vault>` to the query, awaiting it.
struct SignFromVault {
    client: Arc<HttpClient>,
    url: String,
}

#[async_trait]
impl Preprocessor for SignFromVault {
    async fn process(&self, request: &mut PreparedRequest) -> Result<(), String> {
        let sig = fetch_text(&self.client, &self.url).await?;
        request.add_query_param("sig", &sig);
        Ok(())
    }
}

#[tokio::test]
async fn async_interceptors_and_preprocessors_await_and_change_what_is_sent() {
    let up = Arc::new(Upstream::accepting(None));
    let addr = start(up.clone()).await;
    let aws_secret = Secret::computed_async(|| async {
        tokio::task::yield_now().await;
        Ok("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned())
    });
    let signer = SigV4::new(
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: aws_secret,
            session_token: None,
        },
        "us-east-1",
        "execute-api",
    );
    let client = Builder::new()
        .interceptor(TenantFromVault {
            client: http_client(),
            url: url(addr, "/vault"),
        })
        .preprocessor(
            "sign",
            SignFromVault {
                client: http_client(),
                url: url(addr, "/vault"),
            },
        )
        .preprocessor("sigv4", signer.clone())
        .build_awaitable()
        .unwrap();
    let request = Request::get(url(addr, "/echo"))
        .preprocessor("sign")
        .preprocessor("sigv4")
        .build()
        .unwrap();
    let echoed = body_json(&client.send(request).await.unwrap());
    assert_eq!(echoed["headers"]["x-tenant"], "vault-token");
    assert_eq!(echoed["uri"], "/echo?sig=vault-token");
    let authorization = echoed["headers"]["authorization"].as_str().unwrap();
    assert!(
        authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
        "{authorization}"
    );
    assert_eq!(up.vault.load(Ordering::SeqCst), 2);

    // The synchronous signer cannot await the secret, and says so.
    let mut prepared = PreparedRequest::new(
        http::Method::GET,
        url::Url::parse("https://example.amazonaws.com/").unwrap(),
        http::HeaderMap::new(),
        Bytes::new(),
    );
    let err = signer
        .sign(&mut prepared, std::time::SystemTime::now())
        .unwrap_err();
    assert!(err.contains("asynchronously"), "{err}");
}

/// Panics after an `await`, in the hook that `at` names.
struct PanicsLater {
    at: &'static str,
}

#[async_trait]
impl Interceptor for PanicsLater {
    async fn on_request(
        &self,
        _request: &mut PreparedRequest,
        _ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        tokio::task::yield_now().await;
        assert_ne!(self.at, "request", "request hook exploded");
        Ok(())
    }

    async fn on_response(
        &self,
        _response: &mut ResponseParts,
        _ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        tokio::task::yield_now().await;
        assert_ne!(self.at, "response", "response hook exploded");
        ResponseAction::Continue
    }
}

#[async_trait]
impl Preprocessor for PanicsLater {
    async fn process(&self, _request: &mut PreparedRequest) -> Result<(), String> {
        tokio::task::yield_now().await;
        panic!("preprocessor exploded");
    }
}

#[tokio::test]
async fn a_panic_in_an_async_hook_after_an_await_fails_the_task_as_a_panic() {
    let up = Arc::new(Upstream::accepting(None));
    let addr = start(up.clone()).await;
    let target = url(addr, "/vault");

    let clients = [
        (
            "request hook exploded",
            Builder::new().interceptor(PanicsLater { at: "request" }),
            Request::get(&target).build().unwrap(),
        ),
        (
            "response hook exploded",
            Builder::new().interceptor(PanicsLater { at: "response" }),
            Request::get(&target).build().unwrap(),
        ),
        (
            "preprocessor exploded",
            Builder::new().preprocessor("boom", PanicsLater { at: "none" }),
            Request::get(&target).preprocessor("boom").build().unwrap(),
        ),
        (
            "vault exploded",
            Builder::new().secret(
                "vault",
                Secret::computed_async(|| explode("vault exploded")),
            ),
            Request::get(&target)
                .secret_header("authorization", "vault")
                .build()
                .unwrap(),
        ),
    ];
    for (message, builder, request) in clients {
        let client = builder.build_awaitable().unwrap();
        let e = request_error(client.send(request).await);
        assert_eq!(e.class_name, "Panic", "{message}: {e:?}");
        assert!(e.message.contains(message), "{message}: {}", e.message);
        assert!(client.metrics().render().contains("\npanics_total 1\n"));
    }
    // Only the response hook's request was sent.
    assert_eq!(up.vault.load(Ordering::SeqCst), 1);
}

/// Panics after an `await`, as a secret provider.
async fn explode(message: &'static str) -> Result<String, String> {
    tokio::task::yield_now().await;
    panic!("{message}")
}

/// Never finishes its request hook.
struct Hangs;

#[async_trait]
impl Interceptor for Hangs {
    async fn on_request(
        &self,
        _request: &mut PreparedRequest,
        _ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        std::future::pending().await
    }
}

#[async_trait]
impl Preprocessor for Hangs {
    async fn process(&self, _request: &mut PreparedRequest) -> Result<(), String> {
        std::future::pending().await
    }
}

/// `send`'s outcome, or a failure when it is still running after an hour
/// (on a paused clock, at once): a hook the engine does not bound.
async fn bounded(
    send: impl std::future::Future<Output = Result<Response, TaskError>>,
) -> Result<Response, TaskError> {
    tokio::time::timeout(Duration::from_secs(3600), send)
        .await
        .expect("the hanging hook is bounded by the attempt's timeout")
}

/// `elapsed` is `expected`, give or take the timer's millisecond.
fn assert_within(elapsed: Duration, expected: Duration, what: &str) {
    assert!(
        elapsed >= expected && elapsed <= expected + Duration::from_millis(2),
        "{what}: {elapsed:?} instead of {expected:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hanging_request_hook_ends_the_attempt_at_its_timeout_or_the_deadline() {
    // Nothing is ever sent: the port is never connected to.
    let target = "http://127.0.0.1:9/never";
    let hanging = [
        (
            "interceptor",
            Builder::new().interceptor(Hangs),
            Request::get(target),
        ),
        (
            "preprocessor",
            Builder::new().preprocessor("hang", Hangs),
            Request::get(target).preprocessor("hang"),
        ),
        (
            "secret",
            Builder::new().secret(
                "vault",
                Secret::computed_async(std::future::pending::<Result<String, String>>),
            ),
            Request::get(target).secret_header("authorization", "vault"),
        ),
    ];
    for (hook, builder, request) in hanging {
        let client = builder.build_awaitable().unwrap();

        let started = Instant::now();
        let request_with_timeout = request
            .clone()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let e = request_error(bounded(client.send(request_with_timeout)).await);
        assert_within(started.elapsed(), Duration::from_secs(2), hook);
        assert_eq!(
            (e.error_type, e.class_name.as_str()),
            (ErrorType::Timeout, "Timeout"),
            "{hook}"
        );
        assert!(e.message.contains("was not sent"), "{hook}: {}", e.message);

        // A deadline shorter than the timeout bounds it too.
        let started = Instant::now();
        let request_with_deadline = request
            .timeout(Duration::from_secs(30))
            .deadline(Duration::from_secs(1))
            .build()
            .unwrap();
        let e = request_error(bounded(client.send(request_with_deadline)).await);
        assert_within(started.elapsed(), Duration::from_secs(1), hook);
        assert_eq!(e.error_type, ErrorType::Timeout, "{hook}");
    }
}

/// Stops the clock once the response is in, then never finishes.
struct HangsOnResponse;

#[async_trait]
impl Interceptor for HangsOnResponse {
    async fn on_response(
        &self,
        _response: &mut ResponseParts,
        _ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        // From here on the clock is paused and jumps to the next timer: the
        // attempt's timeout, unless nothing bounds this hook.
        tokio::time::pause();
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_hanging_response_hook_ends_the_attempt_at_its_timeout() {
    let up = Arc::new(Upstream::accepting(None));
    let addr = start(up.clone()).await;
    let client = Builder::new()
        .interceptor(HangsOnResponse)
        .build_awaitable()
        .unwrap();
    let started = Instant::now();
    let request = Request::get(url(addr, "/vault"))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let e = request_error(bounded(client.send(request)).await);
    assert_eq!(
        (e.error_type, e.class_name.as_str()),
        (ErrorType::Timeout, "Timeout")
    );
    assert!(e.message.contains("response interceptors"), "{}", e.message);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(30) && elapsed < Duration::from_secs(31),
        "{elapsed:?}"
    );
    assert_eq!(up.vault.load(Ordering::SeqCst), 1);
}

// ------------------------------------------------------ refresh on a 401

/// A token source that hands out `t1`, `t2`, … and counts its fetches.
fn numbered_tokens(fetches: &Arc<AtomicU64>) -> BearerAuth {
    let fetches = fetches.clone();
    BearerAuth::new(move || {
        let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::task::yield_now().await;
            Ok::<_, String>(AccessToken::new(format!("t{n}")))
        }
    })
}

/// Counts its runs, as a signer would recompute its signature.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicU64>);

impl Counter {
    fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Preprocessor for Counter {
    async fn process(&self, request: &mut PreparedRequest) -> Result<(), String> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        request.set_header("x-signature", &format!("sig-{n}"))
    }
}

/// A client with `auth`, a counting preprocessor and a counting computed
/// secret, whose breaker counts 401s as failures.
fn auth_client(auth: BearerAuth, runs: &Counter, resolutions: &Counter) -> AwaitableClient {
    let resolved = resolutions.0.clone();
    Builder::new()
        .interceptor(auth)
        .preprocessor("sign", runs.clone())
        .secret(
            "api_key",
            Secret::computed(move || {
                resolved.fetch_add(1, Ordering::SeqCst);
                Ok("k".into())
            }),
        )
        .resilience(
            ResilienceConfig::builder()
                .defaults(|p| p.breaker_failure_statuses([401]))
                .build()
                .unwrap(),
        )
        .build_awaitable()
        .unwrap()
}

/// A GET with the counting preprocessor and secret, and one attempt only.
fn protected_request(addr: SocketAddr) -> Request {
    Request::get(url(addr, "/protected"))
        .preprocessor("sign")
        .secret_header("x-api-key", "api_key")
        .request_options(RequestOptions {
            retry: Some(RetryOptions {
                max_attempts: Some(1),
                ..RetryOptions::default()
            }),
            ..RequestOptions::default()
        })
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_401_refreshes_the_token_and_replays_once_within_the_attempt() {
    let up = Arc::new(Upstream::accepting(Some("t2")));
    let addr = start(up.clone()).await;
    let fetches = Arc::new(AtomicU64::new(0));
    let (runs, resolutions) = (Counter::default(), Counter::default());
    let client = auth_client(numbered_tokens(&fetches), &runs, &resolutions);

    let response = client.send(protected_request(addr)).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(body_text(&response), "welcome t2");
    assert_eq!(up.protected.load(Ordering::SeqCst), 2);
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // The replay ran the secrets and preprocessors again.
    assert_eq!((runs.get(), resolutions.get()), (2, 2));
    // One attempt, not a retry: the breaker saw one success.
    assert!(response.attempts.len() <= 1, "{:?}", response.attempts);
    let health = client.upstream_health(&format!("http://{addr}")).unwrap();
    assert_eq!((health.recent_attempts, health.recent_failures), (1, 0));

    // The new token is cached: the next task is sent once.
    let response = client.send(protected_request(addr)).await.unwrap();
    assert_eq!(body_text(&response), "welcome t2");
    assert_eq!(up.protected.load(Ordering::SeqCst), 3);
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_second_401_is_the_outcome_without_a_loop() {
    let up = Arc::new(Upstream::accepting(None));
    let addr = start(up.clone()).await;
    let fetches = Arc::new(AtomicU64::new(0));
    let (runs, resolutions) = (Counter::default(), Counter::default());
    let client = auth_client(numbered_tokens(&fetches), &runs, &resolutions);

    let response = client.send(protected_request(addr)).await.unwrap();
    assert_eq!(response.status, 401);
    assert_eq!(body_text(&response), "refused t2");
    assert_eq!(up.protected.load(Ordering::SeqCst), 2);
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    assert_eq!(runs.get(), 2);
    // The attempt failed once, as the breaker counts it.
    let health = client.upstream_health(&format!("http://{addr}")).unwrap();
    assert_eq!((health.recent_attempts, health.recent_failures), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tasks_refused_together_share_one_refresh() {
    const TASKS: usize = 50;
    let mut up = Upstream::accepting(Some("t2"));
    // Every request with t1 waits until all fifty arrived.
    up.hold = Some(("t1", Barrier::new(TASKS)));
    let up = Arc::new(up);
    let addr = start(up.clone()).await;
    let fetches = Arc::new(AtomicU64::new(0));
    let auth = Arc::new(numbered_tokens(&fetches));
    let client = Builder::new().interceptor(auth).build_awaitable().unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let client = client.clone();
        let request = Request::get(url(addr, "/protected")).build().unwrap();
        tasks.spawn(async move { client.send(request).await });
    }
    while let Some(result) = tasks.join_next().await {
        let response = result.unwrap().unwrap();
        assert_eq!((response.status, body_text(&response)), (200, "welcome t2"));
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    assert_eq!(up.protected.load(Ordering::SeqCst), 2 * TASKS as u64);
}

// ------------------------------------------------------------ bodies

/// Unwraps `{"data": …}` and says so in a header.
struct UnwrapData;

#[async_trait]
impl Interceptor for UnwrapData {
    async fn on_response(
        &self,
        response: &mut ResponseParts,
        _ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        if let Ok(Value::Object(mut envelope)) = serde_json::from_slice(&response.body) {
            if let Some(inner) = envelope.remove("data") {
                response.body = Bytes::from(inner.to_string());
                response
                    .headers
                    .insert("x-unwrapped", http::HeaderValue::from_static("data"));
                response.headers.remove("content-length");
            }
        }
        ResponseAction::Continue
    }
}

#[tokio::test]
async fn a_response_hook_transforms_the_body_and_headers_of_the_outcome() {
    let up = Arc::new(Upstream::accepting(None));
    let addr = start(up).await;
    let client = Builder::new()
        .interceptor(UnwrapData)
        .build_awaitable()
        .unwrap();
    let response = client
        .send(Request::get(url(addr, "/data")).build().unwrap())
        .await
        .unwrap();
    assert_eq!(body_json(&response), json!({"id": 1, "name": "ada"}));
    assert_eq!(response.headers.get_str("x-unwrapped"), Some("data"));
    assert_eq!(
        response.headers.get_str("content-type"),
        Some("application/json")
    );
}

// ------------------------------------------------------------ context

/// What a hook saw of its context.
#[derive(Debug, Clone)]
struct Seen {
    phase: &'static str,
    attempt: u32,
    hop: u32,
    replay: bool,
    request: Option<(String, url::Url, http::HeaderMap)>,
    task_elapsed: Duration,
    attempt_elapsed: Duration,
    exchange: Duration,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl Recorder {
    fn push(&self, phase: &'static str, ctx: &InterceptContext<'_>, exchange: Duration) {
        self.0.lock().unwrap().push(Seen {
            phase,
            attempt: ctx.attempt,
            hop: ctx.hop,
            replay: ctx.replay,
            request: ctx
                .request
                .map(|r| (r.method.to_string(), r.url.clone(), r.headers.clone())),
            task_elapsed: ctx.task_elapsed(),
            attempt_elapsed: ctx.attempt_elapsed(),
            exchange,
        });
    }
}

#[async_trait]
impl Interceptor for Recorder {
    async fn on_request(
        &self,
        _request: &mut PreparedRequest,
        ctx: &InterceptContext<'_>,
    ) -> Result<(), String> {
        self.push("request", ctx, Duration::ZERO);
        Ok(())
    }

    async fn on_response(
        &self,
        response: &mut ResponseParts,
        ctx: &InterceptContext<'_>,
    ) -> ResponseAction {
        self.push("response", ctx, response.duration);
        ResponseAction::Continue
    }
}

#[tokio::test]
async fn the_context_carries_the_request_as_sent_and_the_elapsed_times() {
    let up = Arc::new(Upstream::accepting(None));
    let addr = start(up).await;
    let recorder = Recorder::default();
    let client = Builder::new()
        .secret("api_key", "s3cr3t")
        .interceptor(recorder.clone())
        .build_awaitable()
        .unwrap();
    let request = Request::get(url(addr, "/flaky"))
        .param("page", "1")
        .secret_param("key", "api_key")
        .secret_header("authorization", "api_key")
        .header("x-plain", "yes")
        .request_options(RequestOptions {
            retry: Some(RetryOptions {
                max_attempts: Some(2),
                base_delay: Some(Duration::from_millis(1)),
                max_delay: Some(Duration::from_millis(1)),
                ..RetryOptions::default()
            }),
            ..RequestOptions::default()
        })
        .build()
        .unwrap();
    let response = client.send(request).await.unwrap();
    // The upstream got the secrets.
    let echoed = body_json(&response);
    assert_eq!(echoed["uri"], "/flaky?page=1&key=s3cr3t");
    assert_eq!(echoed["headers"]["authorization"], "s3cr3t");

    let seen = recorder.0.lock().unwrap().clone();
    let phases: Vec<_> = seen.iter().map(|s| (s.phase, s.attempt, s.hop)).collect();
    assert_eq!(
        phases,
        [
            ("request", 1, 1),
            ("response", 1, 1),
            ("request", 2, 1),
            ("response", 2, 1)
        ]
    );
    for s in &seen {
        assert!(!s.replay);
        assert!(s.task_elapsed >= s.attempt_elapsed, "{s:?}");
        match s.phase {
            "request" => assert!(s.request.is_none(), "{s:?}"),
            _ => {
                let (method, url, headers) = s.request.clone().unwrap();
                assert_eq!(method, "GET");
                assert_eq!(url.path(), "/flaky");
                let query: Vec<(String, String)> = url.query_pairs().into_owned().collect();
                assert_eq!(
                    query,
                    [
                        ("page".to_owned(), "1".to_owned()),
                        ("key".to_owned(), REDACTED.to_owned())
                    ]
                );
                assert_eq!(headers["authorization"], REDACTED);
                assert_eq!(headers["x-plain"], "yes");
                assert!(s.attempt_elapsed >= s.exchange, "{s:?}");
                assert!(!s.exchange.is_zero(), "{s:?}");
            }
        }
    }
    // The second attempt began after the whole first one.
    let (first, second) = (&seen[1], &seen[3]);
    assert!(second.task_elapsed - second.attempt_elapsed >= first.attempt_elapsed);
    assert!(second.task_elapsed > second.attempt_elapsed);
}

// ------------------------------------------------------------ logging

/// Keeps the fields of every "response received" event as text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<HashMap<String, String>>>>);

struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(HashMap::new());
        event.record(&mut fields);
        if fields.0.get("message").map(String::as_str) == Some("response received") {
            self.0.lock().unwrap().push(fields.0);
        }
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[tokio::test]
async fn the_logging_interceptor_records_duration_and_size() {
    // A current-thread runtime: the subscriber set here sees the engine.
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let up = Arc::new(Upstream::accepting(None));
    let addr = start(up).await;
    let client = Builder::new()
        .interceptor(LoggingInterceptor::new())
        .interceptor(UnwrapData)
        .build_awaitable()
        .unwrap();
    let started = Instant::now();
    let response = client
        .send(Request::get(url(addr, "/data")).build().unwrap())
        .await
        .unwrap();
    let elapsed = started.elapsed();

    let events = capture.0.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event["status"], "200");
    assert_eq!(event["method"], "GET");
    assert_eq!(event["url"], url(addr, "/data"));
    // The size of the body the inner hook left, as the outcome has it.
    let size = response.body.as_deref().unwrap_or_default().len();
    assert_eq!(size, r#"{"id":1,"name":"ada"}"#.len());
    assert_eq!(event["size"], size.to_string());
    let duration_ms: f64 = event["duration_ms"].parse().unwrap();
    assert!(duration_ms > 0.0, "{event:?}");
    assert!(duration_ms <= elapsed.as_secs_f64() * 1000.0, "{event:?}");
    assert_eq!(
        upstream_key(&url::Url::parse(&event["url"]).unwrap()),
        format!("http://{addr}")
    );
}
