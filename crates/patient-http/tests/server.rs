//! The server half of propagation: `PropagationLayer` in real axum services.
//! Refusing and bounding by the caller's deadline, server metrics, and a
//! chain of services whose outgoing calls inherit the deadline and priority.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{MatchedPath, State},
    http::{Request as HttpRequest, StatusCode},
    routing::get,
    Extension, Json, Router,
};
use patient_http::{
    propagation::{
        self, DeadlineRejection, PropagationLayer, RequestContext, ServerMetrics, OTHER_LABEL,
    },
    AwaitableClient, Dispatch, DispatchOptions, InlineExecutor, Outcome, Processor, Request,
    Response, Task, TaskError, TaskHandler,
};
use patient_testkit::Upstream;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Notify},
    time::Instant,
};
use tower::ServiceExt;

const WAIT: Duration = Duration::from_secs(10);

/// Serves `app` on an ephemeral loopback port.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// Sends one request over a fresh connection with extra header lines; the
/// status and the body as text.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("the server answers")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a full response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// A route that counts the calls that reached it.
fn counting_app(layer: PropagationLayer) -> (Router, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/",
            get(|State(calls): State<Arc<AtomicUsize>>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                "handled"
            }),
        )
        .with_state(Arc::clone(&calls))
        .layer(layer);
    (app, calls)
}

#[tokio::test]
async fn an_expired_deadline_is_answered_408_without_calling_the_handler() {
    let (app, calls) = counting_app(PropagationLayer::new());
    let addr = serve(app).await;

    let (status, body) = call(addr, "GET", "/", &[("X-Request-Timeout", "0")]).await;
    assert_eq!(status, 408, "{body}");
    let body = json_of(&body);
    assert_eq!(body["error"]["code"], "deadline_expired");
    assert_eq!(
        body["error"]["message"],
        DeadlineRejection::Expired.message()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never ran");

    // The same route with time left is handled.
    let (status, body) = call(addr, "GET", "/", &[("X-Request-Timeout", "5")]).await;
    assert_eq!((status, body.as_str()), (200, "handled"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_deadline_below_the_threshold_is_answered_408() {
    // The default threshold: 5 ms.
    let (app, calls) = counting_app(PropagationLayer::new());
    let addr = serve(app).await;
    let (status, body) = call(addr, "GET", "/", &[("X-Request-Timeout", "0.004")]).await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], "deadline_too_short");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let (status, _) = call(addr, "GET", "/", &[("X-Request-Timeout", "2")]).await;
    assert_eq!(status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A configured one.
    let (app, calls) =
        counting_app(PropagationLayer::new().min_remaining(Duration::from_millis(800)));
    let addr = serve(app).await;
    let (status, body) = call(addr, "GET", "/", &[("X-Request-Timeout", "0.75")]).await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(json_of(&body)["error"]["code"], "deadline_too_short");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let (status, _) = call(addr, "GET", "/", &[("X-Request-Timeout", "3")]).await;
    assert_eq!(status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// What a slow handler got to do.
#[derive(Default)]
struct SlowProbe {
    started: AtomicUsize,
    finished: AtomicUsize,
    dropped_unfinished: AtomicUsize,
    /// The context current inside the handler.
    seen: Mutex<Option<RequestContext>>,
}

/// Counts a handler dropped before it finished.
struct DropProbe(Arc<SlowProbe>, bool);

impl Drop for DropProbe {
    fn drop(&mut self) {
        if !self.1 {
            self.0.dropped_unfinished.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// `/slow` sleeps 10 s before it answers.
fn slow_app(layer: PropagationLayer) -> (Router, Arc<SlowProbe>) {
    let probe = Arc::new(SlowProbe::default());
    let app = Router::new()
        .route(
            "/slow",
            get(|State(probe): State<Arc<SlowProbe>>| async move {
                probe.started.fetch_add(1, Ordering::SeqCst);
                *probe.seen.lock().unwrap() = RequestContext::current();
                let mut guard = DropProbe(Arc::clone(&probe), false);
                tokio::time::sleep(Duration::from_secs(10)).await;
                guard.1 = true;
                probe.finished.fetch_add(1, Ordering::SeqCst);
                "slow answer"
            }),
        )
        .with_state(Arc::clone(&probe))
        .layer(layer);
    (app, probe)
}

fn slow_request(headers: &[(&str, &str)]) -> HttpRequest<Body> {
    let mut builder = HttpRequest::builder().uri("/slow");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::empty()).unwrap()
}

async fn body_text(response: axum::response::Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_is_cancelled_at_the_propagated_deadline() {
    let (app, probe) = slow_app(PropagationLayer::new());

    let start = Instant::now();
    let response = app
        .clone()
        .oneshot(slow_request(&[("X-Request-Timeout", "1.5")]))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(1_500));
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(
        response.extensions().get::<DeadlineRejection>(),
        Some(&DeadlineRejection::Exceeded)
    );
    assert_eq!(
        json_of(&body_text(response).await)["error"]["code"],
        "deadline_exceeded"
    );
    assert_eq!(probe.started.load(Ordering::SeqCst), 1);
    assert_eq!(probe.finished.load(Ordering::SeqCst), 0);
    assert_eq!(
        probe.dropped_unfinished.load(Ordering::SeqCst),
        1,
        "the handler's future was dropped"
    );
    // Nothing of it runs later.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(probe.finished.load(Ordering::SeqCst), 0);

    // With enough time, it answers.
    let start = Instant::now();
    let response = app
        .oneshot(slow_request(&[("X-Request-Timeout", "12")]))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await, "slow answer");
    assert_eq!(probe.finished.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn the_default_timeout_bounds_requests_without_the_header() {
    let (app, probe) =
        slow_app(PropagationLayer::new().default_timeout(Some(Duration::from_secs(3))));

    let start = Instant::now();
    let response = app.clone().oneshot(slow_request(&[])).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(probe.finished.load(Ordering::SeqCst), 0);
    assert_eq!(probe.dropped_unfinished.load(Ordering::SeqCst), 1);
    // The handler (and what it submits) saw the default as its deadline.
    let seen = probe.seen.lock().unwrap().expect("a current context");
    assert_eq!(seen.deadline, Some(start + Duration::from_secs(3)));

    // A propagated deadline takes the default's place.
    let start = Instant::now();
    let response = app
        .clone()
        .oneshot(slow_request(&[("X-Request-Timeout", "20")]))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(response.status(), StatusCode::OK);

    // Without a default, a request without the header is unbounded.
    let (app, probe) = slow_app(PropagationLayer::new());
    let start = Instant::now();
    let response = app.oneshot(slow_request(&[])).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(probe.finished.load(Ordering::SeqCst), 1);
    assert_eq!(probe.seen.lock().unwrap().unwrap().deadline, None);
}

/// Sample lines (`name{labels} value`) of a rendering, by series.
fn samples(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample line has a value");
            (series.to_owned(), value.to_owned())
        })
        .collect()
}

fn matched_path_layer(metrics: &ServerMetrics) -> PropagationLayer {
    PropagationLayer::new()
        .metrics(metrics.clone())
        .route_with(|req| {
            req.extensions()
                .get::<MatchedPath>()
                .map(|p| p.as_str().to_owned())
        })
}

#[tokio::test]
async fn server_metrics_by_caller_route_and_method() {
    let metrics = ServerMetrics::new();
    metrics.set_max_caller_labels(2);
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let app = Router::new()
        .route(
            "/users/{id}",
            get(|| async { "user" }).post(|| async { (StatusCode::CREATED, "made") }),
        )
        .route(
            "/slow",
            get({
                let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
                move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "done"
                }
            }),
        )
        .layer(matched_path_layer(&metrics));
    let addr = serve(app).await;

    let billing = [("X-Service-Name", "billing")];
    assert_eq!(call(addr, "GET", "/users/1", &billing).await.0, 200);
    assert_eq!(call(addr, "GET", "/users/2", &billing).await.0, 200);
    assert_eq!(
        call(
            addr,
            "GET",
            "/users/3",
            &[("X-Service-Name", "billing"), ("X-Request-Timeout", "0")]
        )
        .await
        .0,
        408
    );
    assert_eq!(
        call(addr, "POST", "/users/4", &[("X-Service-Name", "shop")])
            .await
            .0,
        201
    );
    // Past the cap of two callers, and an unusable name: `other`.
    assert_eq!(
        call(addr, "GET", "/users/5", &[("X-Service-Name", "third")])
            .await
            .0,
        200
    );
    assert_eq!(
        call(addr, "GET", "/users/6", &[("X-Service-Name", "a \"b\"")])
            .await
            .0,
        200
    );
    // No route matched, no caller named: `unmatched`, `unknown`.
    assert_eq!(call(addr, "GET", "/nowhere/1", &[]).await.0, 404);
    assert_eq!(call(addr, "GET", "/nowhere/2", &[]).await.0, 404);
    // An extension method: `other`.
    assert_eq!(call(addr, "PURGE", "/users/7", &billing).await.0, 405);

    // In flight while the handler runs, not after.
    let slow = tokio::spawn(async move { call(addr, "GET", "/slow", &billing).await });
    tokio::time::timeout(WAIT, entered.notified())
        .await
        .expect("the slow handler starts");
    let s = samples(&metrics.render());
    let slow_in_flight = r#"server_in_flight{caller="billing",route="/slow",method="GET"}"#;
    assert_eq!(
        s.get(slow_in_flight).map(String::as_str),
        Some("1"),
        "{s:#?}"
    );
    release.notify_one();
    assert_eq!(slow.await.unwrap().0, 200);

    let text = metrics.render();
    let s = samples(&text);
    let get = |k: &str| s.get(k).map(String::as_str);
    let requests = |caller: &str, route: &str, method: &str, status: &str| {
        get(&format!(
            r#"server_requests_total{{caller="{caller}",route="{route}",method="{method}",status="{status}"}}"#
        ))
    };
    assert_eq!(
        requests("billing", "/users/{id}", "GET", "200"),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        requests("billing", "/users/{id}", "GET", "408"),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        requests("shop", "/users/{id}", "POST", "201"),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        requests(OTHER_LABEL, "/users/{id}", "GET", "200"),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        requests("unknown", "unmatched", "GET", "404"),
        Some("2"),
        "{text}"
    );
    assert_eq!(
        requests("billing", "/users/{id}", "other", "405"),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        requests("billing", "/slow", "GET", "200"),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        get(
            r#"server_deadline_rejections_total{caller="billing",route="/users/{id}",method="GET",reason="expired"}"#
        ),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        get(
            r#"server_request_duration_seconds_count{caller="billing",route="/users/{id}",method="GET"}"#
        ),
        Some("3"),
        "{text}"
    );
    assert_eq!(
        get(
            r#"server_request_duration_seconds_count{caller="unknown",route="unmatched",method="GET"}"#
        ),
        Some("2"),
        "{text}"
    );
    assert_eq!(get(slow_in_flight), Some("0"), "{text}");
    // Never a raw path or a caller past the cap.
    for raw in ["/users/1", "/nowhere", "third", "PURGE"] {
        assert!(!text.contains(raw), "{raw} in {text}");
    }
}

#[tokio::test]
async fn callers_and_unmatched_paths_stay_bounded() {
    let metrics = ServerMetrics::new();
    metrics.set_max_caller_labels(3);
    let app = Router::new()
        .route("/items/{id}", get(|| async { "item" }))
        .layer(matched_path_layer(&metrics));
    for i in 0..50 {
        let request = HttpRequest::builder()
            .uri(format!("/items/{i}"))
            .header("x-service-name", format!("caller-{i}"))
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let request = HttpRequest::builder()
            .uri(format!("/random/{i}/path"))
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    let text = metrics.render();
    let s = samples(&text);
    let series: Vec<&String> = s
        .keys()
        .filter(|k| k.starts_with("server_requests_total"))
        .collect();
    assert_eq!(series.len(), 5, "3 callers, other, unknown: {series:#?}");
    let get = |k: &str| s.get(k).map(String::as_str);
    assert_eq!(
        get(
            r#"server_requests_total{caller="other",route="/items/{id}",method="GET",status="200"}"#
        ),
        Some("47"),
        "{text}"
    );
    assert_eq!(
        get(
            r#"server_requests_total{caller="caller-0",route="/items/{id}",method="GET",status="200"}"#
        ),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        get(
            r#"server_requests_total{caller="unknown",route="unmatched",method="GET",status="404"}"#
        ),
        Some("50"),
        "{text}"
    );
}

/// Hands a processor's outcomes to async code.
struct Forward(mpsc::UnboundedSender<Outcome>);

impl TaskHandler for Forward {
    fn on_complete(&self, response: Response, callback: &str) {
        let _ = self.0.send(Outcome::Completed {
            response,
            callback: callback.to_owned(),
        });
    }

    fn on_error(&self, error: TaskError, callback: &str) {
        let _ = self.0.send(Outcome::Failed {
            error,
            callback: callback.to_owned(),
        });
    }

    fn retry(&self, task: Task) {
        let _ = self.0.send(Outcome::Retry(task));
    }
}

/// Service A: calls service B (the test upstream's `/echo`) in a different
/// way on each route, never setting a deadline or a priority unless asked.
struct ServiceA {
    echo: String,
    client: AwaitableClient,
    processor: Processor,
    outcomes: tokio::sync::Mutex<mpsc::UnboundedReceiver<Outcome>>,
    inline: InlineExecutor,
}

/// What B saw of the propagation headers.
fn propagated(response: &Response) -> Json<Value> {
    let echoed: Value = serde_json::from_slice(response.body.as_deref().unwrap_or_default())
        .expect("the echo's JSON");
    Json(json!({
        "timeout": echoed["headers"]["x-request-timeout"],
        "priority": echoed["headers"]["x-request-priority"],
    }))
}

impl ServiceA {
    fn request(&self) -> Request {
        Request::get(&self.echo).build().unwrap()
    }

    async fn processed(&self) -> Response {
        let outcome = tokio::time::timeout(WAIT, self.outcomes.lock().await.recv())
            .await
            .expect("an outcome")
            .expect("the processor runs");
        match outcome {
            Outcome::Completed { response, .. } => response,
            other => panic!("expected a response, got {other:?}"),
        }
    }
}

async fn via_awaitable(State(a): State<Arc<ServiceA>>) -> Json<Value> {
    propagated(&a.client.send(a.request()).await.unwrap())
}

async fn via_awaitable_own_deadline(
    State(a): State<Arc<ServiceA>>,
    axum::extract::Path(millis): axum::extract::Path<u64>,
) -> Json<Value> {
    let request = Request::get(&a.echo)
        .deadline(Duration::from_millis(millis))
        .build()
        .unwrap();
    propagated(&a.client.send(request).await.unwrap())
}

async fn via_processor(State(a): State<Arc<ServiceA>>) -> Json<Value> {
    a.processor.enqueue(Task::new(a.request(), "B")).unwrap();
    propagated(&a.processed().await)
}

async fn via_dispatch(State(a): State<Arc<ServiceA>>) -> Json<Value> {
    a.processor
        .get(&a.echo, "B", DispatchOptions::default())
        .unwrap();
    propagated(&a.processed().await)
}

async fn via_inline(State(a): State<Arc<ServiceA>>) -> Json<Value> {
    match a.inline.run(Task::new(a.request(), "B")) {
        Outcome::Completed { response, .. } => propagated(&response),
        other => panic!("expected a response, got {other:?}"),
    }
}

async fn via_spawn(State(a): State<Arc<ServiceA>>) -> Json<Value> {
    let (client, request) = (a.client.clone(), a.request());
    let response = tokio::spawn(async move { client.send(request).await })
        .await
        .unwrap()
        .unwrap();
    propagated(&response)
}

async fn via_spawn_in_scope(
    State(a): State<Arc<ServiceA>>,
    Extension(ctx): Extension<RequestContext>,
) -> Json<Value> {
    let (client, request) = (a.client.clone(), a.request());
    let response = tokio::spawn(propagation::scope(ctx, async move {
        client.send(request).await
    }))
    .await
    .unwrap()
    .unwrap();
    propagated(&response)
}

/// `X-Request-Timeout` as B received it, in seconds.
fn timeout_seen(body: &Value) -> f64 {
    body["timeout"]
        .as_str()
        .unwrap_or_else(|| panic!("B got no X-Request-Timeout: {body}"))
        .parse()
        .expect("seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_services_inherits_the_deadline_and_priority() {
    let b = Upstream::start().await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let processor = Processor::builder().build(Forward(tx)).unwrap();
    processor.start().unwrap();
    let (unused, _) = mpsc::unbounded_channel();
    let a = Arc::new(ServiceA {
        echo: b.url("/echo"),
        client: AwaitableClient::builder().build_awaitable().unwrap(),
        processor: processor.clone(),
        outcomes: tokio::sync::Mutex::new(rx),
        inline: InlineExecutor::builder()
            .build_inline(Forward(unused))
            .unwrap(),
    });
    let app = Router::new()
        .route("/awaitable", get(via_awaitable))
        .route("/awaitable/own/{millis}", get(via_awaitable_own_deadline))
        .route("/processor", get(via_processor))
        .route("/dispatch", get(via_dispatch))
        .route("/inline", get(via_inline))
        .route("/spawn", get(via_spawn))
        .route("/spawn/scoped", get(via_spawn_in_scope))
        .with_state(a)
        .layer(PropagationLayer::new());
    let addr = serve(app).await;
    let caller = [("X-Request-Timeout", "2"), ("X-Request-Priority", "high")];

    for path in [
        "/awaitable",
        "/processor",
        "/dispatch",
        "/inline",
        "/spawn/scoped",
    ] {
        let (status, body) = call(addr, "GET", path, &caller).await;
        assert_eq!(status, 200, "{path}: {body}");
        let body = json_of(&body);
        let timeout = timeout_seen(&body);
        assert!(
            (1.0..=2.0).contains(&timeout),
            "{path}: B saw the remainder of A's 2 s: {body}"
        );
        assert_eq!(body["priority"], "high", "{path}: {body}");
    }

    // A shorter deadline of the request's own wins; a longer one is capped.
    let (_, body) = call(addr, "GET", "/awaitable/own/500", &caller).await;
    let timeout = timeout_seen(&json_of(&body));
    assert!(timeout <= 0.5, "{body}");
    let (_, body) = call(addr, "GET", "/awaitable/own/60000", &caller).await;
    let timeout = timeout_seen(&json_of(&body));
    assert!((1.0..=2.0).contains(&timeout), "{body}");

    // A spawned task leaves the context behind unless it is set again.
    let (status, body) = call(addr, "GET", "/spawn", &caller).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json_of(&body),
        json!({"timeout": null, "priority": null}),
        "outside the context nothing is inherited"
    );

    // A caller without a deadline: none to inherit, the priority is normal.
    let (status, body) = call(addr, "GET", "/awaitable", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json_of(&body),
        json!({"timeout": null, "priority": "normal"})
    );

    processor.stop_async(None).await;
}
