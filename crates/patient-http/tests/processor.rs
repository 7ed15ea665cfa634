//! The processor, the inline executor and the awaitable client against a real
//! upstream server.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

use patient_http::{
    Body, CallbackArgs, Config, Dispatch, DispatchOptions, ErrorType, InlineExecutor, Outcome,
    Processor, ProcessorObserver, ProcessorState, RedirectErrorKind, Request, RequestEnd,
    RequestStart, Response, Task, TaskError, TaskHandler,
};
use patient_testkit::{Fault, Upstream};

const WAIT: Duration = Duration::from_secs(10);

/// Starts an upstream on a runtime of its own that lives as long as the test.
fn upstream() -> (Upstream, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(Upstream::start()).unwrap();
    (up, rt)
}

fn processor(config: Config) -> (Processor, mpsc::Receiver<Outcome>) {
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder().config(config).build(tx).unwrap();
    p.start().unwrap();
    (p, rx)
}

fn task(url: &str) -> Task {
    Task::new(Request::get(url).build().unwrap(), "TestCallback")
}

fn completed(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Completed { response, .. } => response,
        other => panic!("expected a response, got {other:?}"),
    }
}

fn failed(outcome: Outcome) -> TaskError {
    match outcome {
        Outcome::Failed { error, .. } => error,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn echo_json(response: &Response) -> serde_json::Value {
    serde_json::from_slice(response.body.as_deref().unwrap_or_default()).unwrap()
}

#[test]
fn enqueue_completes_with_the_response_and_callback_args() {
    let (up, _rt) = upstream();
    let (p, rx) = processor(Config::default());
    let mut args = CallbackArgs::new();
    args.insert("user_id", 123);
    let t = task(&up.url("/fast")).with_callback_args(args.clone());
    let id = t.id.clone();
    p.enqueue(t).unwrap();
    match rx.recv_timeout(WAIT).unwrap() {
        Outcome::Completed { response, callback } => {
            assert_eq!(callback, "TestCallback");
            assert_eq!(response.status, 200);
            assert_eq!(response.body.as_deref(), Some(&b"ok"[..]));
            assert_eq!(response.request_id, id);
            assert_eq!(response.url, up.url("/fast"));
            assert_eq!(response.callback_args, args);
            assert!(response.redirects.is_empty());
            assert!(response.duration > Duration::ZERO);
        }
        other => panic!("{other:?}"),
    }
    assert!(p.wait_for_idle(WAIT));
    let counts = p.counts();
    assert_eq!((counts.completed, counts.pending), (1, 0));
    p.stop(None);
    assert_eq!(p.state(), ProcessorState::Stopped);
}

#[test]
fn enqueue_fails_fast_when_not_running_and_gives_the_task_back() {
    let (tx, _rx) = mpsc::channel();
    let p = Processor::builder().build(tx).unwrap();
    let t = task("http://127.0.0.1:1/");
    let id = t.id.clone();
    let err = p.enqueue(t).unwrap_err();
    assert!(err.is_not_running(), "{err}");
    assert!(err.to_string().contains("stopped"), "{err}");
    assert_eq!(err.into_task().id, id);
}

#[derive(Default)]
struct Events {
    starts: AtomicUsize,
    stops: AtomicUsize,
    request_starts: AtomicUsize,
    request_ends: AtomicUsize,
    errors: AtomicUsize,
    capacity: AtomicUsize,
}

struct Recorder(Arc<Events>);

impl ProcessorObserver for Recorder {
    fn on_start(&self) {
        self.0.starts.fetch_add(1, Ordering::SeqCst);
    }
    fn on_stop(&self) {
        self.0.stops.fetch_add(1, Ordering::SeqCst);
    }
    fn on_request_start(&self, _: &RequestStart<'_>) {
        self.0.request_starts.fetch_add(1, Ordering::SeqCst);
    }
    fn on_request_end(&self, e: &RequestEnd<'_>) {
        assert!(e.duration > Duration::ZERO);
        self.0.request_ends.fetch_add(1, Ordering::SeqCst);
    }
    fn on_request_error(&self, _: &TaskError) {
        self.0.errors.fetch_add(1, Ordering::SeqCst);
    }
    fn on_capacity_exceeded(&self, _: &Task) {
        self.0.capacity.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn capacity_counts_queued_and_in_flight_tasks() {
    let (up, _rt) = upstream();
    let events = Arc::new(Events::default());
    let (tx, rx) = mpsc::channel();
    let config = Config::builder().max_connections(2).build().unwrap();
    let p = Processor::builder()
        .config(config)
        .observer(Recorder(events.clone()))
        .build(tx)
        .unwrap();
    p.start().unwrap();
    p.enqueue(task(&up.url("/delay?ms=300"))).unwrap();
    p.enqueue(task(&up.url("/delay?ms=300"))).unwrap();
    let err = p.enqueue(task(&up.url("/fast"))).unwrap_err();
    assert!(err.is_at_capacity(), "{err}");
    assert!(err.to_string().contains("max capacity (2"), "{err}");
    assert_eq!(events.capacity.load(Ordering::SeqCst), 1);
    completed(rx.recv_timeout(WAIT).unwrap());
    completed(rx.recv_timeout(WAIT).unwrap());
    assert!(p.wait_for_idle(WAIT));
    p.enqueue(task(&up.url("/fast"))).unwrap();
    completed(rx.recv_timeout(WAIT).unwrap());
    p.stop(None);
    assert_eq!(events.starts.load(Ordering::SeqCst), 1);
    assert_eq!(events.stops.load(Ordering::SeqCst), 1);
    assert_eq!(events.request_starts.load(Ordering::SeqCst), 3);
    assert_eq!(events.request_ends.load(Ordering::SeqCst), 3);
}

#[test]
fn stop_hands_unfinished_tasks_to_retry() {
    let (up, _rt) = upstream();
    let (p, rx) = processor(Config::default());
    let mut ids = Vec::new();
    for _ in 0..20 {
        let t = task(&up.url("/delay?ms=5000"));
        ids.push(t.id.clone());
        p.enqueue(t).unwrap();
    }
    p.enqueue(task(&up.url("/fast"))).unwrap();
    assert!(p.wait_for_processing(WAIT));
    std::thread::sleep(Duration::from_millis(100));
    p.stop(Some(Duration::from_millis(200)));
    let outcomes: Vec<Outcome> = rx.try_iter().collect();
    assert_eq!(outcomes.len(), 21, "every task has exactly one outcome");
    let mut retried: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Retry(t) => Some(t.id.clone()),
            _ => None,
        })
        .collect();
    retried.sort();
    ids.sort();
    assert_eq!(retried, ids);
    let counts = p.counts();
    assert_eq!(
        (counts.retried, counts.completed, counts.pending),
        (20, 1, 0)
    );
}

#[test]
fn drain_refuses_new_tasks_and_finishes_the_rest() {
    let (up, _rt) = upstream();
    let (p, rx) = processor(Config::default());
    p.enqueue(task(&up.url("/delay?ms=200"))).unwrap();
    p.drain();
    assert_eq!(p.state(), ProcessorState::Draining);
    let err = p.enqueue(task(&up.url("/fast"))).unwrap_err();
    assert!(err.is_not_running());
    assert!(err.to_string().contains("draining"));
    // Starting while draining is refused, not a second runtime.
    assert!(p.start().is_err());
    completed(rx.recv_timeout(WAIT).unwrap());
    assert!(p.wait_for_idle(WAIT));
    assert!(p.is_drained());
    p.stop(None);
    assert!(p.is_stopped());
    // And it starts again after a stop.
    p.start().unwrap();
    p.enqueue(task(&up.url("/fast"))).unwrap();
    completed(rx.recv_timeout(WAIT).unwrap());
    p.stop(None);
}

#[test]
fn raise_error_responses_turns_non_2xx_into_http_errors() {
    let (up, _rt) = upstream();
    let config = Config::builder()
        .raise_error_responses(true)
        .build()
        .unwrap();
    let (p, rx) = processor(config);
    p.enqueue(task(&up.url("/status/404"))).unwrap();
    let e = failed(rx.recv_timeout(WAIT).unwrap());
    match &e {
        TaskError::Http(h) => {
            assert!(h.is_client_error());
            assert_eq!(h.response.status, 404);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.message(),
        format!("HTTP 404 response from GET {}", up.url("/status/404"))
    );
    // Per task it can be switched off again.
    p.enqueue(task(&up.url("/status/503")).with_raise_error_responses(false))
        .unwrap();
    assert_eq!(completed(rx.recv_timeout(WAIT).unwrap()).status, 503);
    p.stop(None);
}

#[test]
fn redirects_are_followed_and_recorded() {
    let (up, _rt) = upstream();
    let (p, rx) = processor(Config::default());
    p.enqueue(task(&up.url("/redirect/3"))).unwrap();
    let r = completed(rx.recv_timeout(WAIT).unwrap());
    assert_eq!(r.status, 200);
    assert_eq!(r.redirects.len(), 3, "{:?}", r.redirects);
    assert_eq!(r.redirects[0], up.url("/redirect/3"));
    assert!(r.url.contains("/echo"), "{}", r.url);

    // Too many.
    let t = Task::new(
        Request::get(up.url("/redirect/3"))
            .max_redirects(2)
            .build()
            .unwrap(),
        "C",
    );
    p.enqueue(t).unwrap();
    match failed(rx.recv_timeout(WAIT).unwrap()) {
        TaskError::Redirect(e) => {
            assert_eq!(e.kind, RedirectErrorKind::TooManyRedirects);
            assert_eq!(e.redirects.len(), 3);
        }
        other => panic!("{other:?}"),
    }

    // A loop.
    p.enqueue(task(&up.url("/redirect-loop"))).unwrap();
    match failed(rx.recv_timeout(WAIT).unwrap()) {
        TaskError::Redirect(e) => assert_eq!(e.kind, RedirectErrorKind::RecursiveRedirect),
        other => panic!("{other:?}"),
    }

    // max_redirects 0: the redirect itself is the response.
    let t = Task::new(
        Request::get(up.url("/redirect/1"))
            .max_redirects(0)
            .build()
            .unwrap(),
        "C",
    );
    p.enqueue(t).unwrap();
    let r = completed(rx.recv_timeout(WAIT).unwrap());
    assert!(r.is_redirect(), "{}", r.status);
    p.stop(None);
}

#[test]
fn redirect_method_rules_and_cross_origin_header_stripping() {
    let (up, rt) = upstream();
    let other = rt.block_on(Upstream::start()).unwrap();
    let (p, rx) = processor(Config::default());
    let echo = other.url("/echo");
    let post = |status: u16, target: &str| {
        Task::new(
            Request::post(up.url(&format!(
                "/redirect-to?status={status}&url={}",
                urlencode(target)
            )))
            .header("authorization", "Bearer t")
            .header("cookie", "a=b")
            .header("x-keep", "yes")
            .body("payload")
            .build()
            .unwrap(),
            "C",
        )
    };
    // 303: GET without body; cross-origin: authorization and cookie dropped.
    p.enqueue(post(303, &echo)).unwrap();
    let r = completed(rx.recv_timeout(WAIT).unwrap());
    let j = echo_json(&r);
    assert_eq!(j["method"], "GET");
    assert!(j["body"].is_null() || j["body"] == "", "{j}");
    assert!(j["headers"].get("authorization").is_none(), "{j}");
    assert!(j["headers"].get("cookie").is_none(), "{j}");
    assert_eq!(j["headers"]["x-keep"], "yes");
    assert_eq!(r.method, patient_http::Method::Get);

    // 307 to the same origin keeps method, body and credentials.
    p.enqueue(post(307, &up.url("/echo"))).unwrap();
    let j = echo_json(&completed(rx.recv_timeout(WAIT).unwrap()));
    assert_eq!(j["method"], "POST");
    assert_eq!(j["body"], "payload");
    assert_eq!(j["headers"]["authorization"], "Bearer t");
    assert_eq!(j["headers"]["cookie"], "a=b");
    p.stop(None);
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[test]
fn secrets_are_resolved_at_send_time_and_never_serialized() {
    let (up, _rt) = upstream();
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .secret("api_key", "s3cr3t-value")
        .secret(
            "token",
            patient_http::Secret::computed(|| Ok("computed-token".into())),
        )
        .build(tx)
        .unwrap();
    p.start().unwrap();
    let request = Request::get(up.url("/echo"))
        .secret_header("x-api-key", "api_key")
        .secret_param("token", "token")
        .build()
        .unwrap();
    let serialized = request.to_json().to_string();
    assert!(!serialized.contains("s3cr3t"));
    p.enqueue(Task::new(request, "C")).unwrap();
    let r = completed(rx.recv_timeout(WAIT).unwrap());
    let j = echo_json(&r);
    assert_eq!(j["headers"]["x-api-key"], "s3cr3t-value");
    assert!(j["query"].to_string().contains("computed-token"), "{j}");
    // The response's own JSON carries the URL without the secret parameter.
    assert!(!r.url.contains("computed-token"), "{}", r.url);

    // An unknown secret is a request error naming it.
    let request = Request::get(up.url("/echo"))
        .secret_header("x-api-key", "missing")
        .build()
        .unwrap();
    p.enqueue(Task::new(request, "C")).unwrap();
    match failed(rx.recv_timeout(WAIT).unwrap()) {
        TaskError::Request(e) => {
            assert_eq!(e.error_type, ErrorType::Unknown);
            assert!(e.message.contains("missing"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    p.stop(None);
}

#[test]
fn preprocessors_run_on_same_origin_hops_and_are_dropped_cross_origin() {
    let (up, rt) = upstream();
    let other = rt.block_on(Upstream::start()).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .preprocessor(
            "sign",
            move |req: &mut patient_http::preprocess::PreparedRequest| {
                c.fetch_add(1, Ordering::SeqCst);
                let sig = format!("{}:{}", req.method(), req.body().len());
                req.set_header("x-signature", &sig)?;
                req.add_query_param("signed", "1");
                Ok(())
            },
        )
        .build(tx)
        .unwrap();
    p.start().unwrap();
    let req = |url: String| {
        Request::post(url)
            .body("abc")
            .preprocessor("sign")
            .build()
            .unwrap()
    };
    p.enqueue(Task::new(req(up.url("/echo")), "C")).unwrap();
    let j = echo_json(&completed(rx.recv_timeout(WAIT).unwrap()));
    assert_eq!(j["headers"]["x-signature"], "POST:3");
    assert!(j["query"].to_string().contains("signed"), "{j}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Same origin redirect (307): run again on the hop.
    let target = urlencode(&up.url("/echo"));
    p.enqueue(Task::new(
        req(up.url(&format!("/redirect-to?status=307&url={target}"))),
        "C",
    ))
    .unwrap();
    let j = echo_json(&completed(rx.recv_timeout(WAIT).unwrap()));
    assert_eq!(j["headers"]["x-signature"], "POST:3");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Cross-origin: dropped.
    let target = urlencode(&other.url("/echo"));
    p.enqueue(Task::new(
        req(up.url(&format!("/redirect-to?status=307&url={target}"))),
        "C",
    ))
    .unwrap();
    let j = echo_json(&completed(rx.recv_timeout(WAIT).unwrap()));
    assert!(j["headers"].get("x-signature").is_none(), "{j}");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    p.stop(None);
}

#[test]
fn timeouts_and_faults_become_typed_request_errors() {
    let (up, _rt) = upstream();
    let (p, rx) = processor(Config::default());
    let timed = Task::new(
        Request::get(up.url("/delay?ms=3000"))
            .timeout(Duration::from_millis(100))
            .build()
            .unwrap(),
        "C",
    );
    p.enqueue(timed).unwrap();
    match failed(rx.recv_timeout(WAIT).unwrap()) {
        TaskError::Request(e) => {
            assert_eq!(e.error_type, ErrorType::Timeout);
            assert!(e.duration < Duration::from_secs(2));
        }
        other => panic!("{other:?}"),
    }
    for (fault, expected) in [
        (Fault::ResetMidBody, ErrorType::Connection),
        (Fault::CloseBeforeHeaders, ErrorType::Connection),
        (Fault::MalformedChunked, ErrorType::Connection),
        (Fault::ShortBody, ErrorType::Connection),
        (Fault::OversizedHeaders, ErrorType::ResponseTooLarge),
    ] {
        p.enqueue(task(&up.fault_url(fault))).unwrap();
        match failed(rx.recv_timeout(WAIT).unwrap()) {
            TaskError::Request(e) => assert_eq!(e.error_type, expected, "{fault:?}: {e:?}"),
            other => panic!("{fault:?}: {other:?}"),
        }
    }
    let trickle = Task::new(
        Request::get(up.fault_url(Fault::TrickleHeaders))
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap(),
        "C",
    );
    p.enqueue(trickle).unwrap();
    match failed(rx.recv_timeout(WAIT).unwrap()) {
        TaskError::Request(e) => assert_eq!(e.error_type, ErrorType::Timeout),
        other => panic!("{other:?}"),
    }
    // A dead port.
    p.enqueue(task("http://127.0.0.1:1/")).unwrap();
    match failed(rx.recv_timeout(WAIT).unwrap()) {
        TaskError::Request(e) => assert_eq!(e.error_type, ErrorType::Connection),
        other => panic!("{other:?}"),
    }
    p.stop(None);
}

/// A handler that panics on some tasks.
struct Panicky {
    outcomes: Mutex<Vec<String>>,
}

impl TaskHandler for Panicky {
    fn on_complete(&self, response: Response, _callback: &str) {
        if response.url.contains("panic") {
            panic!("handler failure");
        }
        self.outcomes.lock().unwrap().push(response.request_id);
    }
    fn on_error(&self, error: TaskError, _callback: &str) {
        self.outcomes
            .lock()
            .unwrap()
            .push(error.request_id().to_owned());
    }
    fn retry(&self, task: Task) {
        self.outcomes.lock().unwrap().push(task.id);
    }
}

struct PanickyObserver;

impl ProcessorObserver for PanickyObserver {
    fn on_request_start(&self, _: &RequestStart<'_>) {
        panic!("observer failure");
    }
}

#[test]
fn a_panicking_handler_or_observer_does_not_kill_the_processor() {
    let (up, _rt) = upstream();
    let handler = Arc::new(Panicky {
        outcomes: Mutex::new(Vec::new()),
    });
    struct Shared(Arc<Panicky>);
    impl TaskHandler for Shared {
        fn on_complete(&self, r: Response, c: &str) {
            self.0.on_complete(r, c)
        }
        fn on_error(&self, e: TaskError, c: &str) {
            self.0.on_error(e, c)
        }
        fn retry(&self, t: Task) {
            self.0.retry(t)
        }
    }
    let p = Processor::builder()
        .observer(PanickyObserver)
        .build(Shared(handler.clone()))
        .unwrap();
    p.start().unwrap();
    for i in 0..10 {
        let path = if i % 2 == 0 { "/fast?panic=1" } else { "/fast" };
        p.enqueue(task(&up.url(path))).unwrap();
    }
    assert!(p.wait_for_idle(WAIT));
    let counts = p.counts();
    assert_eq!(counts.completed, 10);
    assert_eq!(
        counts.panics,
        5 + 10,
        "5 handler panics, 10 observer panics"
    );
    assert_eq!(handler.outcomes.lock().unwrap().len(), 5);
    p.stop(None);
}

/// An observer that calls back into its processor.
struct Reentrant {
    processor: Mutex<Option<Processor>>,
    seen: AtomicUsize,
}

struct ReentrantObserver(Arc<Reentrant>);

impl ProcessorObserver for ReentrantObserver {
    fn on_request_end(&self, _: &RequestEnd<'_>) {
        if let Some(p) = self.0.processor.lock().unwrap().clone() {
            let _ = p.counts();
            let _ = p.state();
            self.0.seen.fetch_add(1, Ordering::SeqCst);
            // Stopping from inside is allowed too; it completes elsewhere.
            p.stop(Some(Duration::from_secs(5)));
        }
    }
}

#[test]
fn an_observer_may_call_back_into_the_processor() {
    let (up, _rt) = upstream();
    let obs = Arc::new(Reentrant {
        processor: Mutex::new(None),
        seen: AtomicUsize::new(0),
    });
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .observer(ReentrantObserver(obs.clone()))
        .build(tx)
        .unwrap();
    *obs.processor.lock().unwrap() = Some(p.clone());
    p.start().unwrap();
    p.enqueue(task(&up.url("/fast"))).unwrap();
    completed(rx.recv_timeout(WAIT).unwrap());
    let deadline = std::time::Instant::now() + WAIT;
    while !p.is_stopped() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(p.is_stopped());
    assert!(obs.seen.load(Ordering::SeqCst) >= 1);
    obs.processor.lock().unwrap().take();
}

#[test]
fn enqueue_from_many_threads() {
    let (up, _rt) = upstream();
    let config = Config::builder().max_connections(10_000).build().unwrap();
    let (p, rx) = processor(config);
    let url = up.url("/fast");
    std::thread::scope(|s| {
        for _ in 0..8 {
            let p = p.clone();
            let url = url.clone();
            s.spawn(move || {
                for _ in 0..100 {
                    p.enqueue(task(&url)).unwrap();
                }
            });
        }
    });
    for _ in 0..800 {
        completed(rx.recv_timeout(WAIT).unwrap());
    }
    assert!(p.wait_for_idle(WAIT));
    assert_eq!(p.counts().completed, 800);
    p.stop(None);
}

#[test]
fn inline_executor_runs_the_full_lifecycle_on_the_calling_thread() {
    let (up, rt) = upstream();
    let (tx, rx) = mpsc::channel();
    let inline = InlineExecutor::builder().build_inline(tx).unwrap();
    let r = completed(inline.run(task(&up.url("/redirect/2"))));
    assert_eq!(r.redirects.len(), 2);
    // Through the handler.
    inline.execute(task(&up.url("/status/500")));
    assert_eq!(completed(rx.try_recv().unwrap()).status, 500);
    // Inside an async context it still works.
    let outcome = rt.block_on(async { inline.run(task(&up.url("/fast"))) });
    assert!(outcome.is_completed());
}

#[test]
fn dispatch_is_the_same_for_the_processor_and_inline_execution() {
    let (up, _rt) = upstream();
    let (p, rx) = processor(Config::default());
    let (tx2, rx2) = mpsc::channel();
    let inline = InlineExecutor::builder().build_inline(tx2).unwrap();
    fn call(d: &dyn Dispatch, url: &str) -> String {
        let mut args = CallbackArgs::new();
        args.insert("n", 1);
        d.post(
            url,
            Body::Json(serde_json::json!({"a": 1})),
            "Cb",
            DispatchOptions {
                callback_args: args,
                headers: vec![("x-h".into(), "v".into())],
                ..Default::default()
            },
        )
        .unwrap()
    }
    let id = call(&p, &up.url("/echo"));
    let id2 = call(&inline, &up.url("/echo"));
    for (rx, id) in [(&rx, id), (&rx2, id2)] {
        match rx.recv_timeout(WAIT).unwrap() {
            Outcome::Completed { response, callback } => {
                assert_eq!(callback, "Cb");
                assert_eq!(response.request_id, id);
                let j = echo_json(&response);
                assert_eq!(j["method"], "POST");
                assert_eq!(j["headers"]["x-h"], "v");
                assert!(j["headers"]["content-type"]
                    .as_str()
                    .unwrap()
                    .starts_with("application/json"));
            }
            other => panic!("{other:?}"),
        }
    }
    p.stop(None);
}

#[tokio::test(start_paused = true)]
async fn awaitable_client_times_out_on_the_paused_clock() {
    let up = Upstream::start().await.unwrap();
    let client = patient_http::AwaitableClient::builder()
        .build_awaitable()
        .unwrap();
    let ok = client
        .send(Request::get(up.url("/fast")).build().unwrap())
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let started = tokio::time::Instant::now();
    let err = client
        .send(
            Request::get(up.url("/delay?ms=60000"))
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        )
        .await
        .unwrap_err();
    match err {
        TaskError::Request(e) => assert_eq!(e.error_type, ErrorType::Timeout),
        other => panic!("{other:?}"),
    }
    // The paused clock jumped the 30 s; no real wait.
    assert!(started.elapsed() >= Duration::from_secs(30));
}

#[test]
fn invalid_configuration_names_the_field() {
    let cases: Vec<(patient_http::ConfigBuilder, &str)> = vec![
        (Config::builder().max_connections(0), "max_connections"),
        (Config::builder().worker_threads(0), "worker_threads"),
        (
            Config::builder().payload_store_threshold(0),
            "payload_store_threshold",
        ),
        (
            Config::builder().request_timeout(Duration::ZERO),
            "request_timeout",
        ),
        (Config::builder().max_response_size(0), "max_response_size"),
        (
            Config::builder().connection_pool_size(0),
            "connection_pool_size",
        ),
        (
            Config::builder().connection_timeout(Some(Duration::ZERO)),
            "connection_timeout",
        ),
        (Config::builder().user_agent("bad\nagent"), "user_agent"),
        (
            Config::builder().client_with(|c| c.stall_timeout(Some(Duration::ZERO))),
            "stall_timeout",
        ),
        (
            Config::builder().client_with(|c| c.add_root_certificate_pem("not a pem")),
            "root_certificates_pem",
        ),
    ];
    for (builder, field) in cases {
        let err = match builder.build() {
            Ok(config) => match Processor::builder().config(config).build(mpsc::channel().0) {
                Ok(_) => panic!("{field}: accepted"),
                Err(e) => e,
            },
            Err(e) => e,
        };
        assert_eq!(err.field(), field, "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
    let d = Config::default();
    assert_eq!(d.max_connections(), 256);
    assert_eq!(d.request_timeout(), Duration::from_secs(60));
    assert_eq!(d.shutdown_timeout(), Duration::from_secs(30));
    assert_eq!(d.client().max_response_size(), 1024 * 1024);
    assert_eq!(d.client().user_agent(), "PatientHttp");
    assert!(!d.raise_error_responses());
    assert_eq!(d.max_redirects(), 5);
    assert_eq!(d.client().connection_pool_size(), 100);
    assert_eq!(d.client().connection_timeout(), None);
    assert!(d.client().proxy().is_none());
    assert_eq!(d.client().retries(), 3);
    assert_eq!(d.payload_store_threshold(), 64 * 1024);
}

#[test]
fn sigv4_signs_the_request_as_sent() {
    let (up, _rt) = upstream();
    let (tx, rx) = mpsc::channel();
    let signer = patient_http::SigV4::new(
        patient_http::preprocess::AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "secret".into(),
            session_token: Some("session".into()),
        },
        "us-east-1",
        "execute-api",
    );
    let p = Processor::builder()
        .preprocessor("sigv4", signer)
        .build(tx)
        .unwrap();
    p.start().unwrap();
    let request = Request::post(up.url("/echo?b=2&a=1"))
        .json(&serde_json::json!({"x": 1}))
        .preprocessor("sigv4")
        .build()
        .unwrap();
    p.enqueue(Task::new(request, "C")).unwrap();
    let j = echo_json(&completed(rx.recv_timeout(WAIT).unwrap()));
    let auth = j["headers"]["authorization"].as_str().unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
        "{auth}"
    );
    assert!(
        auth.contains("/us-east-1/execute-api/aws4_request"),
        "{auth}"
    );
    assert!(
        auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token"),
        "{auth}"
    );
    assert_eq!(j["headers"]["x-amz-security-token"], "session");
    assert!(j["headers"]["x-amz-date"].as_str().unwrap().ends_with('Z'));
    p.stop(None);
}

#[test]
fn outcomes_round_trip_through_the_wire_format() {
    let (up, _rt) = upstream();
    let (p, rx) = processor(Config::default());
    let mut args = CallbackArgs::new();
    args.insert("tags", serde_json::json!(["a", 1, null, {"k": 2.5}]));
    p.enqueue(task(&up.url("/redirect/1")).with_callback_args(args.clone()))
        .unwrap();
    p.enqueue(task(&up.url("/bytes?n=10000")).with_callback_args(args.clone()))
        .unwrap();
    p.enqueue(task("http://127.0.0.1:1/").with_callback_args(args))
        .unwrap();
    for _ in 0..3 {
        match rx.recv_timeout(WAIT).unwrap() {
            Outcome::Completed { response, .. } => {
                let json = response.to_json();
                let back = Response::from_json(&json).unwrap();
                assert_eq!(back.to_json(), json);
                assert_eq!(back.body, response.body);
                assert_eq!(back.redirects, response.redirects);
            }
            Outcome::Failed { error, .. } => {
                let json = error.to_json();
                let back = TaskError::load(&json).unwrap();
                assert_eq!(back.to_json(), json);
                assert_eq!(back.request_id(), error.request_id());
            }
            Outcome::Retry(t) => panic!("{t:?}"),
        }
    }
    p.stop(None);
}

/// A handler that hands every outcome to a closure.
struct OnOutcome<F>(F);

impl<F: Fn(Outcome) + Send + Sync + 'static> TaskHandler for OnOutcome<F> {
    fn on_complete(&self, response: Response, callback: &str) {
        (self.0)(Outcome::Completed {
            response,
            callback: callback.to_owned(),
        })
    }
    fn on_error(&self, error: TaskError, callback: &str) {
        (self.0)(Outcome::Failed {
            error,
            callback: callback.to_owned(),
        })
    }
    fn retry(&self, task: Task) {
        (self.0)(Outcome::Retry(task))
    }
}

/// A processor handle for handlers and observers, set once the processor is
/// built and cleared at the end of the test (it would keep itself alive).
type Slot = Arc<Mutex<Option<Processor>>>;

fn from_slot(slot: &Slot) -> Option<Processor> {
    slot.lock().unwrap().clone()
}

/// Runs `scenario` on a thread of its own and returns its result; fails the
/// test, instead of hanging it, when the scenario takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, scenario: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(scenario());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the scenario hung for {limit:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the scenario panicked"),
    }
}

struct StopOnCapacity(Slot);

impl ProcessorObserver for StopOnCapacity {
    fn on_capacity_exceeded(&self, _: &Task) {
        if let Some(p) = from_slot(&self.0) {
            p.stop(Some(Duration::from_millis(100)));
        }
    }
}

#[test]
fn an_observer_may_stop_the_processor_from_on_capacity_exceeded() {
    let (up, _rt) = upstream();
    let slot = Slot::default();
    let (tx, rx) = mpsc::channel();
    let config = Config::builder().max_connections(1).build().unwrap();
    let p = Processor::builder()
        .config(config)
        .observer(StopOnCapacity(slot.clone()))
        .build(tx)
        .unwrap();
    *slot.lock().unwrap() = Some(p.clone());
    p.start().unwrap();
    p.enqueue(task(&up.url("/delay?ms=5000"))).unwrap();
    // The refused enqueue comes from an application thread; its observer stops
    // the processor, which runs to its end right there.
    let q = p.clone();
    let url = up.url("/fast");
    let err = within(WAIT, move || q.enqueue(task(&url)).unwrap_err());
    assert!(err.is_at_capacity(), "{err}");
    assert!(p.is_stopped());
    assert!(matches!(rx.try_recv().unwrap(), Outcome::Retry(_)));
    slot.lock().unwrap().take();
}

struct CallsBackOnStop {
    processor: Slot,
    state_seen: Mutex<Option<ProcessorState>>,
}

struct CallsBackOnStopObserver(Arc<CallsBackOnStop>);

impl ProcessorObserver for CallsBackOnStopObserver {
    fn on_stop(&self) {
        if let Some(p) = from_slot(&self.0.processor) {
            // Stopping a stopped processor returns at once.
            p.stop(None);
            *self.0.state_seen.lock().unwrap() = Some(p.state());
        }
    }
}

#[test]
fn an_observer_may_call_back_into_the_processor_from_on_stop() {
    let obs = Arc::new(CallsBackOnStop {
        processor: Slot::default(),
        state_seen: Mutex::new(None),
    });
    let p = Processor::builder()
        .observer(CallsBackOnStopObserver(obs.clone()))
        .build(mpsc::channel().0)
        .unwrap();
    *obs.processor.lock().unwrap() = Some(p.clone());
    p.start().unwrap();
    let q = p.clone();
    within(WAIT, move || q.stop(None));
    assert_eq!(
        *obs.state_seen.lock().unwrap(),
        Some(ProcessorState::Stopped)
    );
    obs.processor.lock().unwrap().take();
}

#[test]
fn a_handler_calling_start_while_the_processor_stops_is_refused_without_stalling_it() {
    let (up, _rt) = upstream();
    let slot = Slot::default();
    let (started_tx, started_rx) = mpsc::channel();
    let s = slot.clone();
    let p = Processor::builder()
        .build(OnOutcome(move |outcome| {
            if let (Outcome::Retry(_), Some(p)) = (outcome, from_slot(&s)) {
                // Handed back by `stop`: try to start again right away.
                let _ = started_tx.send(p.start().map_err(|e| e.to_string()));
            }
        }))
        .unwrap();
    *slot.lock().unwrap() = Some(p.clone());
    p.start().unwrap();
    p.enqueue(task(&up.url("/delay?ms=5000"))).unwrap();
    assert!(p.wait_for_processing(WAIT));
    let q = p.clone();
    let took = within(WAIT, move || {
        let began = std::time::Instant::now();
        q.stop(Some(Duration::from_millis(50)));
        began.elapsed()
    });
    assert!(took < Duration::from_secs(3), "stop took {took:?}");
    let err = started_rx.try_recv().unwrap().unwrap_err();
    assert!(err.contains("stopping"), "{err}");
    assert!(p.is_stopped());
    slot.lock().unwrap().take();
}

#[test]
fn stop_waits_for_a_handler_however_long_it_blocks() {
    let (up, _rt) = upstream();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let (tx, rx) = mpsc::channel();
    let config = Config::builder().worker_threads(1).build().unwrap();
    let p = Processor::builder()
        .config(config)
        .build(OnOutcome(move |outcome| {
            if matches!(&outcome, Outcome::Completed { callback, .. } if callback == "Block") {
                let _ = entered_tx.send(());
                let _ = release_rx.lock().unwrap().recv_timeout(3 * WAIT);
            }
            let _ = tx.send(outcome);
        }))
        .unwrap();
    p.start().unwrap();
    p.enqueue(Task::new(
        Request::get(up.url("/fast")).build().unwrap(),
        "Block",
    ))
    .unwrap();
    entered_rx.recv_timeout(WAIT).unwrap();
    // Queued behind the blocked handler on the one worker thread.
    p.enqueue(task(&up.url("/fast"))).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let q = p.clone();
    std::thread::spawn(move || {
        q.stop(Some(Duration::from_millis(50)));
        let _ = done_tx.send(());
    });
    // Longer than any fixed limit the runtime's shutdown used to apply.
    assert!(
        done_rx.recv_timeout(Duration::from_secs(6)).is_err(),
        "stop returned while a handler still held an outcome"
    );
    assert_eq!(p.state(), ProcessorState::Stopping);
    release_tx.send(()).unwrap();
    done_rx.recv_timeout(WAIT).unwrap();
    let outcomes: Vec<Outcome> = rx.try_iter().collect();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert!(outcomes[0].is_completed(), "{:?}", outcomes[0]);
    let counts = p.counts();
    assert_eq!((counts.total(), counts.pending), (2, 0));
    assert!(p.is_stopped());
}

#[test]
fn stop_and_the_wait_helpers_accept_any_timeout() {
    let (p, _rx) = processor(Config::default());
    let q = p.clone();
    within(WAIT, move || {
        assert!(q.wait_for_idle(Duration::MAX));
        q.stop(Some(Duration::MAX));
    });
    assert!(p.is_stopped());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn inline_run_inside_a_multi_thread_runtime_lets_its_worker_go() {
    // The upstream is served by this runtime's only worker thread.
    let up = Upstream::start().await.unwrap();
    let inline = Arc::new(
        InlineExecutor::builder()
            .build_inline(mpsc::channel().0)
            .unwrap(),
    );
    let i = inline.clone();
    let request = Request::get(up.url("/delay?ms=100"))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let outcome = tokio::spawn(async move { i.run(Task::new(request, "C")) })
        .await
        .unwrap();
    assert_eq!(completed(outcome).status, 200);
    // Dropping it here, inside the runtime, is fine too.
    drop(inline);
}

#[tokio::test]
async fn an_inline_executor_may_be_dropped_inside_a_runtime() {
    let inline = InlineExecutor::builder()
        .build_inline(mpsc::channel().0)
        .unwrap();
    drop(inline);
}

/// Counts ticks of a task on the current runtime until aborted.
fn ticker() -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let ticks = Arc::new(AtomicUsize::new(0));
    let t = ticks.clone();
    let handle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            t.fetch_add(1, Ordering::SeqCst);
        }
    });
    (ticks, handle)
}

fn assert_send<T: Send>(value: T) -> T {
    value
}

#[tokio::test(flavor = "current_thread")]
async fn stop_async_lets_the_callers_runtime_run_while_it_waits() {
    // Served by this runtime's only thread: the task in flight can only end
    // if the runtime keeps running while the stop waits for it.
    let up = Upstream::start().await.unwrap();
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder().build(tx).unwrap();
    p.start().unwrap();
    p.enqueue(task(&up.url("/delay?ms=300"))).unwrap();
    while p.counts().in_flight == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (ticks, ticking) = ticker();
    let began = std::time::Instant::now();
    assert_send(p.stop_async(Some(WAIT))).await;
    ticking.abort();
    assert!(began.elapsed() < WAIT, "{:?}", began.elapsed());
    assert!(p.is_stopped());
    // Finished, not handed to retry at the timeout: the upstream answered.
    assert_eq!(completed(rx.try_recv().unwrap()).status, 200);
    assert!(
        ticks.load(Ordering::SeqCst) >= 10,
        "the runtime was blocked"
    );
}

#[test]
fn stop_async_awaited_on_the_processors_own_runtime_still_stops_it() {
    let (up, _rt) = upstream();
    let slot = Slot::default();
    let (tx, rx) = mpsc::channel();
    let s = slot.clone();
    let p = Processor::builder()
        .build(OnOutcome(move |outcome| {
            if let Some(p) = from_slot(&s) {
                // Handlers run inside the processor's runtime.
                tokio::spawn(async move { p.stop_async(None).await });
            }
            let _ = tx.send(outcome);
        }))
        .unwrap();
    *slot.lock().unwrap() = Some(p.clone());
    p.start().unwrap();
    p.enqueue(task(&up.url("/fast"))).unwrap();
    completed(rx.recv_timeout(WAIT).unwrap());
    let deadline = std::time::Instant::now() + WAIT;
    while !p.is_stopped() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(p.is_stopped());
    slot.lock().unwrap().take();
}

#[test]
fn a_dropped_stop_async_still_stops_and_the_processor_starts_again() {
    let (up, _rt) = upstream();
    let (p, rx) = processor(Config::default());
    p.enqueue(task(&up.url("/delay?ms=300"))).unwrap();
    assert!(p.wait_for_processing(WAIT));
    let caller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let waited = caller.block_on(async {
        tokio::time::timeout(Duration::from_millis(20), p.stop_async(Some(WAIT))).await
    });
    assert!(waited.is_err(), "the stop should still be waiting");
    // A second stop waits for the first one to finish: every outcome is in.
    p.stop(None);
    assert!(p.is_stopped());
    assert_eq!(completed(rx.try_recv().unwrap()).status, 200);
    p.start().unwrap();
    p.enqueue(task(&up.url("/fast"))).unwrap();
    completed(rx.recv_timeout(WAIT).unwrap());
    p.stop(None);
    assert_eq!(p.counts().total(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn inline_run_async_lets_a_current_thread_runtime_run_while_it_waits() {
    // Served by this runtime's only thread too.
    let up = Upstream::start().await.unwrap();
    let inline = InlineExecutor::builder()
        .build_inline(mpsc::channel().0)
        .unwrap();
    let request = Request::get(up.url("/delay?ms=300"))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (ticks, ticking) = ticker();
    let outcome = assert_send(inline.run_async(Task::new(request, "C"))).await;
    ticking.abort();
    assert_eq!(completed(outcome).status, 200);
    assert!(
        ticks.load(Ordering::SeqCst) >= 10,
        "the runtime was blocked"
    );
}

#[test]
fn inline_run_and_run_async_share_the_pool_across_runtimes() {
    let (up, _rt) = upstream();
    let inline = InlineExecutor::builder()
        .build_inline(mpsc::channel().0)
        .unwrap();
    let timeout = Duration::from_secs(3);
    let t = || {
        let request = Request::get(up.url("/fast"))
            .timeout(timeout)
            .build()
            .unwrap();
        Task::new(request, "C")
    };
    // Each call is answered at once: none waits out its timeout on a pooled
    // connection that nothing drives (and then succeeds on a retry).
    let quick = |outcome: Outcome, began: std::time::Instant| {
        assert!(began.elapsed() < timeout, "took {:?}", began.elapsed());
        assert_eq!(completed(outcome).status, 200);
    };
    // Opens a connection and pools it.
    let began = std::time::Instant::now();
    quick(inline.run(t()), began);
    let caller = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Reuses it from another runtime, between two `run`s.
    for _ in 0..2 {
        let began = std::time::Instant::now();
        quick(caller.block_on(inline.run_async(t())), began);
    }
    drop(caller);
    // And back, after the caller's runtime (and whatever it drove) is gone.
    let began = std::time::Instant::now();
    quick(inline.run(t()), began);
}

/// Each face (processor, inline executor, awaitable client) sends one GET to
/// `/status/503` and returns its status.
fn send_once_by_each_face(up: &Upstream, resilience: patient_http::ResilienceConfig) -> [u16; 3] {
    let url = up.url("/status/503");
    let (tx, rx) = mpsc::channel();
    let p = Processor::builder()
        .resilience(resilience.clone())
        .build(tx)
        .unwrap();
    p.start().unwrap();
    p.enqueue(task(&url)).unwrap();
    let by_processor = completed(rx.recv_timeout(WAIT).unwrap()).status;
    p.stop(None);

    let inline = InlineExecutor::builder()
        .resilience(resilience.clone())
        .build_inline(mpsc::channel().0)
        .unwrap();
    let by_inline = completed(inline.run(task(&url))).status;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let by_awaitable = rt.block_on(async {
        let client = patient_http::AwaitableClient::builder()
            .resilience(resilience)
            .build_awaitable()
            .unwrap();
        client
            .send(Request::get(&url).build().unwrap())
            .await
            .unwrap()
            .status
    });
    [by_processor, by_inline, by_awaitable]
}

#[test]
fn a_get_is_sent_once_by_default_and_retried_with_a_retry_policy() {
    let (up, _rt) = upstream();
    let statuses = send_once_by_each_face(&up, patient_http::ResilienceConfig::default());
    assert_eq!(statuses, [503; 3]);
    // One attempt each, as the gem makes.
    assert_eq!(up.requests_to("/status/503"), 3);

    let retry = patient_http::retry::RetryPolicy::builder()
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(1))
        .build()
        .unwrap();
    assert_eq!(retry.max_attempts(), 3, "the retrying policy's default");
    let resilience = patient_http::ResilienceConfig::builder()
        .defaults(|p| p.retry(Some(retry)))
        .build()
        .unwrap();
    let statuses = send_once_by_each_face(&up, resilience);
    assert_eq!(statuses, [503; 3]);
    // Three attempts each.
    assert_eq!(up.requests_to("/status/503"), 3 + 3 * 3);
}
