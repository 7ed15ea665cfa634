//! Regression tests for the engine's defences: panics in engine code, hedges
//! refused by the breaker, credentials on cross-origin redirects, signing the
//! body that is sent, and bounded per-upstream state.

use std::{
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use patient_http::{
    breaker::{BreakerPolicy, BreakerState},
    interceptor::{InterceptContext, RequestFn},
    limit::LimitConfig,
    preprocess::{AwsCredentials, PreparedRequest},
    retry::RetryPolicy,
    AwaitableClient, Builder, HedgeDelay, Outcome, ProcessorObserver, Request, RequestError,
    RequestOptions, ResilienceConfig, Response, Secret, SigV4, Strategy, Task, TaskError,
};
use patient_testkit::Upstream;
use serde_json::Value;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

fn get(url: impl AsRef<str>) -> Request {
    Request::get(url).build().unwrap()
}

fn request_error(result: Result<Response, TaskError>) -> RequestError {
    match result {
        Err(TaskError::Request(e)) => e,
        other => panic!("expected a request error, got {other:?}"),
    }
}

fn body_json(response: &Response) -> Value {
    serde_json::from_slice(response.body.as_deref().unwrap_or_default()).unwrap()
}

fn metric(client: &AwaitableClient, line_start: &str) -> Option<String> {
    client
        .metrics()
        .render()
        .lines()
        .find(|l| l.starts_with(line_start))
        .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
}

// 2. A panic inside the engine ends the task as a request error.

fn panicking_interceptor() -> RequestFn<
    impl Fn(&mut PreparedRequest, &InterceptContext<'_>) -> Result<(), String> + Send + Sync + 'static,
> {
    RequestFn::new(
        "boom",
        |_: &mut PreparedRequest, _: &InterceptContext<'_>| -> Result<(), String> {
            panic!("interceptor exploded")
        },
    )
}

#[test]
fn an_interceptor_panic_fails_the_task_on_the_processor_instead_of_retrying_it() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let up = runtime.block_on(Upstream::start()).unwrap();
    let (tx, rx) = mpsc::channel::<Outcome>();
    let processor = Builder::new()
        .interceptor(panicking_interceptor())
        .build(tx)
        .unwrap();
    processor.start().unwrap();
    for _ in 0..3 {
        processor
            .enqueue(Task::new(get(up.url("/fast")), "Callback"))
            .unwrap();
    }
    for _ in 0..3 {
        match rx.recv_timeout(WAIT).unwrap() {
            Outcome::Failed {
                error: TaskError::Request(e),
                ..
            } => {
                assert_eq!(e.class_name, "Panic");
                assert!(e.message.contains("interceptor exploded"), "{}", e.message);
            }
            other => panic!("expected a Panic request error, got {other:?}"),
        }
    }
    assert!(processor.wait_for_idle(WAIT));
    let counts = processor.counts();
    assert_eq!((counts.failed, counts.retried), (3, 0));
    assert_eq!(counts.panics, 3);
    assert!(processor.metrics().render().contains("\npanics_total 3\n"));
    // Nothing was sent, and the processor keeps running.
    assert_eq!(up.requests(), 0);
    assert!(processor.is_running());
    processor.stop(None);
}

#[tokio::test]
async fn preprocessor_secret_and_retry_predicate_panics_end_the_task_as_panic_errors() {
    let up = Upstream::start().await.unwrap();

    let preprocessor = Builder::new()
        .preprocessor("explode", |_: &mut PreparedRequest| -> Result<(), String> {
            panic!("preprocessor exploded")
        })
        .build_awaitable()
        .unwrap();
    let request = Request::get(up.url("/fast"))
        .preprocessor("explode")
        .build()
        .unwrap();
    let e = request_error(preprocessor.send(request).await);
    assert_eq!(e.class_name, "Panic");
    assert!(e.message.contains("preprocessor exploded"));

    let secret = Builder::new()
        .secret(
            "vault",
            Secret::computed(|| -> Result<String, String> { panic!("vault exploded") }),
        )
        .build_awaitable()
        .unwrap();
    let request = Request::get(up.url("/fast"))
        .secret_header("authorization", "vault")
        .build()
        .unwrap();
    let e = request_error(secret.send(request).await);
    assert_eq!(e.class_name, "Panic");
    assert!(e.message.contains("vault exploded"));

    let retry = RetryPolicy::builder()
        .max_attempts(3)
        .retry_if(|_| panic!("predicate exploded"))
        .build()
        .unwrap();
    let resilience = ResilienceConfig::builder()
        .defaults(|p| p.retry(Some(retry)))
        .build()
        .unwrap();
    let predicate = Builder::new()
        .resilience(resilience)
        .build_awaitable()
        .unwrap();
    // A 404 matches none of the default conditions, so the predicate is asked.
    let e = request_error(predicate.send(get(up.url("/status/404"))).await);
    assert_eq!(e.class_name, "Panic");
    assert!(e.message.contains("predicate exploded"));
    assert_eq!(metric(&predicate, "panics_total").as_deref(), Some("1"));
}

// 3. A hedge the breaker refuses does not start and never wins.

fn hedged_breaker(probes: u32) -> ResilienceConfig {
    let breaker = BreakerPolicy::builder()
        .consecutive_failures(Some(1))
        .minimum_throughput(1000)
        .break_duration(Duration::from_secs(1))
        .half_open_probes(probes)
        .success_threshold(1)
        .build()
        .unwrap();
    ResilienceConfig::builder()
        .defaults(|p| {
            p.hedge_delays(HedgeDelay::Fixed(vec![Duration::from_millis(50)]))
                .retry(Some(
                    RetryPolicy::builder().max_attempts(2).build().unwrap(),
                ))
                .breaker(Some(breaker))
        })
        .build()
        .unwrap()
}

#[derive(Clone, Default)]
struct Transitions(Arc<Mutex<Vec<(BreakerState, BreakerState)>>>);

impl ProcessorObserver for Transitions {
    fn on_breaker_state_change(&self, _: &str, from: BreakerState, to: BreakerState) {
        self.0.lock().unwrap().push((from, to));
    }
}

#[tokio::test(start_paused = true)]
async fn a_breaker_opened_by_another_task_does_not_kill_a_healthy_hedged_request() {
    let up = Upstream::start().await.unwrap();
    let client = Builder::new()
        .resilience(hedged_breaker(1))
        .build_awaitable()
        .unwrap();
    let slow = {
        let client = client.clone();
        let request = Request::get(up.url("/delay?ms=300"))
            .strategy(Strategy::Hedged)
            .build()
            .unwrap();
        tokio::spawn(async move { client.send(request).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Another task's failure opens the breaker while the slow one is in flight.
    let failed = client
        .send(
            Request::get(up.url("/status/503"))
                .strategy(Strategy::Single)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(failed.status, 503);

    let started = Instant::now();
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status, 200, "the healthy attempt finished");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The refused hedge never started: one attempt, nothing cancelled.
    assert_eq!(up.requests_to("/delay"), 1);
    assert!(response.attempts.is_empty(), "{:?}", response.attempts);
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_keeps_its_permit_until_its_verdict_closes_the_breaker() {
    let up = Upstream::start().await.unwrap();
    let transitions = Transitions::default();
    let client = Builder::new()
        .resilience(hedged_breaker(1))
        .observer(transitions.clone())
        .build_awaitable()
        .unwrap();
    let single = |path: &str| {
        Request::get(up.url(path))
            .strategy(Strategy::Single)
            .build()
            .unwrap()
    };
    assert_eq!(
        client.send(single("/status/503")).await.unwrap().status,
        503
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Half-open: the hedged task's first attempt is the probe; its hedge is
    // refused (no probe left) and must not cancel it.
    let response = client
        .send(
            Request::get(up.url("/delay?ms=200"))
                .strategy(Strategy::Hedged)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        *transitions.0.lock().unwrap(),
        [
            (BreakerState::Closed, BreakerState::Open),
            (BreakerState::Open, BreakerState::HalfOpen),
            (BreakerState::HalfOpen, BreakerState::Closed),
        ]
    );
    assert_eq!(client.send(single("/fast")).await.unwrap().status, 200);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_is_asked_after_the_rate_limit_wait() {
    let up = Upstream::start().await.unwrap();
    let config = hedged_breaker(1)
        .to_builder()
        .defaults(|p| {
            p.retry(Some(RetryPolicy::none()))
                .limits(LimitConfig::builder().rate(1.0, 1).build().unwrap())
        })
        .build()
        .unwrap();
    let client = Builder::new().resilience(config).build_awaitable().unwrap();
    assert_eq!(
        client
            .send(get(up.url("/status/503")))
            .await
            .unwrap()
            .status,
        503
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Half-open with one probe and one token: the first takes both; the
    // second waits for its token without holding a probe, and by then the
    // probe has closed the breaker.
    let (a, b) = tokio::join!(
        client.send(get(up.url("/fast"))),
        client.send(get(up.url("/fast")))
    );
    assert_eq!(a.unwrap().status, 200);
    assert_eq!(b.unwrap().status, 200);
    assert_eq!(up.requests_to("/fast"), 2);
}

// 4. Credentials never cross origins, not even through interceptors.

#[derive(Clone, Default)]
struct Hops(Arc<Mutex<Vec<(u32, bool)>>>);

#[tokio::test]
async fn an_auth_interceptor_does_not_send_its_token_to_another_origin() {
    let a = Upstream::start().await.unwrap();
    let b = Upstream::start().await.unwrap();
    let hops = Hops::default();
    let seen = hops.clone();
    let client = Builder::new()
        .interceptor(RequestFn::new(
            "auth",
            move |request: &mut PreparedRequest, ctx: &InterceptContext<'_>| {
                seen.0.lock().unwrap().push((ctx.hop, ctx.cross_origin));
                request.set_header("authorization", "Bearer t0ken")?;
                request.set_header("cookie", "session=1")
            },
        ))
        .build_awaitable()
        .unwrap();
    let target = b.url("/echo");
    let to_b = a.url(&format!(
        "/redirect-to?url={}",
        url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
    ));
    let response = client.send(get(&to_b)).await.unwrap();
    assert_eq!(response.status, 200);
    let echoed = body_json(&response);
    assert_eq!(echoed["headers"].get("authorization"), None, "{echoed}");
    assert_eq!(echoed["headers"].get("cookie"), None, "{echoed}");
    assert_eq!(*hops.0.lock().unwrap(), [(1, false), (2, true)]);

    // On the same origin the interceptor's header is kept.
    let same = a.url(&format!(
        "/redirect-to?url={}",
        url::form_urlencoded::byte_serialize(a.url("/echo").as_bytes()).collect::<String>()
    ));
    let echoed = body_json(&client.send(get(&same)).await.unwrap());
    assert_eq!(echoed["headers"]["authorization"], "Bearer t0ken");
}

// 6. SigV4 signs the body that is sent, after request compression.

/// A signer with the AWS test suite's credentials that also sends
/// `x-amz-content-sha256`, so the signed body hash can be checked.
fn example_signer() -> SigV4 {
    SigV4::new(
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        },
        "us-east-1",
        "service",
    )
    .content_sha256_header(true)
}

#[tokio::test]
async fn sigv4_signs_the_compressed_body_that_is_sent() {
    let up = Upstream::start().await.unwrap();
    let signer = example_signer();
    let client = Builder::new()
        .config(
            patient_http::Config::builder()
                .client_with(|c| c.request_compression(true))
                .build()
                .unwrap(),
        )
        .preprocessor("sigv4", signer)
        .build_awaitable()
        .unwrap();
    let body = "x".repeat(4096);
    let request = Request::post(up.url("/echo"))
        .body(body.clone())
        .header("content-type", "text/plain")
        .preprocessor("sigv4")
        .build()
        .unwrap();
    let echoed = body_json(&client.send(request).await.unwrap());
    assert_eq!(echoed["headers"]["content-encoding"], "gzip");
    let sent = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(echoed["body_base64"].as_str().unwrap())
            .unwrap()
    };
    assert!(sent.len() < body.len(), "the body went compressed");
    let digest = ring::digest::digest(&ring::digest::SHA256, &sent);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(echoed["headers"]["x-amz-content-sha256"], hex.as_str());
    let auth = echoed["headers"]["authorization"].as_str().unwrap();
    assert!(auth.contains("x-amz-content-sha256"), "{auth}");
}

#[tokio::test]
async fn the_engine_compresses_from_the_configured_threshold_before_signing() {
    // The signature is computed on the engine's side of compression: if the
    // engine kept its own threshold while the transport used the configured
    // one, the signed digest would not be that of the bytes sent.
    use base64::Engine as _;
    let up = Upstream::start().await.unwrap();
    let signer = example_signer();
    let client = Builder::new()
        .config(
            patient_http::Config::builder()
                .client_with(|c| {
                    c.request_compression(true)
                        .request_compression_min_size(100)
                })
                .build()
                .unwrap(),
        )
        .preprocessor("sigv4", signer)
        .build_awaitable()
        .unwrap();
    for (len, gzipped) in [(99, false), (100, true)] {
        let body = "x".repeat(len);
        let request = Request::post(up.url("/echo"))
            .body(body.clone())
            .header("content-type", "text/plain")
            .preprocessor("sigv4")
            .build()
            .unwrap();
        let echoed = body_json(&client.send(request).await.unwrap());
        let sent = base64::engine::general_purpose::STANDARD
            .decode(echoed["body_base64"].as_str().unwrap())
            .unwrap();
        if gzipped {
            assert_eq!(echoed["headers"]["content-encoding"], "gzip", "{len}");
            assert!(sent.len() < len, "{len}: {} bytes sent", sent.len());
        } else {
            assert!(echoed["headers"].get("content-encoding").is_none(), "{len}");
            assert_eq!(sent, body.as_bytes());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &sent);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            echoed["headers"]["x-amz-content-sha256"],
            hex.as_str(),
            "{len}"
        );
    }
}

// 8. Per-upstream state and metric labels stay bounded whatever the input.

#[tokio::test]
async fn arbitrary_upstream_keys_keep_the_metrics_bounded() {
    let up = Upstream::start().await.unwrap();
    let client = AwaitableClient::builder().build_awaitable().unwrap();
    for i in 0..600 {
        let request = Request::get(up.url("/fast"))
            .request_options(RequestOptions {
                upstream_key: Some(format!("tenant-{i}")),
                ..RequestOptions::default()
            })
            .build()
            .unwrap();
        assert_eq!(client.send(request).await.unwrap().status, 200);
    }
    let text = client.metrics().render();
    let series = text
        .lines()
        .filter(|l| l.starts_with("attempts_total{"))
        .count();
    assert_eq!(
        series,
        patient_http::metrics::DEFAULT_MAX_UPSTREAM_LABELS + 1
    );
    let other = format!(
        "attempts_total{{upstream=\"{}\"}} ",
        patient_http::metrics::OTHER_UPSTREAM
    );
    let line = text.lines().find(|l| l.starts_with(&other)).unwrap();
    assert_eq!(
        line.rsplit(' ').next().unwrap(),
        (600 - patient_http::metrics::DEFAULT_MAX_UPSTREAM_LABELS).to_string()
    );
}

#[tokio::test]
async fn arbitrary_paths_keep_the_endpoint_label_bounded_and_ids_share_one_template() {
    let up = Upstream::start().await.unwrap();
    let client = AwaitableClient::builder().build_awaitable().unwrap();
    let max = patient_http::metrics::DEFAULT_MAX_ENDPOINT_LABELS;
    for i in 0..(max + 300) {
        // Words, not identifiers: each is an endpoint of its own.
        let word: String = format!("{i:04}")
            .bytes()
            .map(|b| char::from(b'a' + (b - b'0')))
            .collect();
        let response = client.send(get(up.url(&format!("/{word}")))).await.unwrap();
        assert_eq!(response.status, 404);
    }
    for id in [200, 201, 404] {
        client
            .send(get(up.url(&format!("/status/{id}"))))
            .await
            .unwrap();
    }
    let text = client.metrics().render();
    let series = text
        .lines()
        .filter(|l| l.starts_with("requests_total{"))
        .count();
    // The budget was spent on the words; the ids went to `other` too, under
    // their own status.
    assert!(series <= max + 1 + 3, "{series} series");
    let other = text
        .lines()
        .find(|l| {
            l.starts_with("requests_total{")
                && l.contains("endpoint=\"other\"")
                && l.contains("status=\"404\"")
        })
        .unwrap_or_else(|| panic!("no other bucket in\n{text}"));
    // 300 words past the budget, and `/status/404`.
    assert_eq!(other.rsplit(' ').next().unwrap(), "301");

    // A fresh client: ids share one template.
    let client = AwaitableClient::builder().build_awaitable().unwrap();
    for id in [200, 201, 404] {
        client
            .send(get(up.url(&format!("/status/{id}"))))
            .await
            .unwrap();
    }
    let text = client.metrics().render();
    let templated: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("requests_total{") && l.contains("GET /status/{id}"))
        .collect();
    assert_eq!(templated.len(), 3, "one series per status: {templated:?}");
}

// 5. Credentials in a URL are sent as basic auth and never written out.

#[tokio::test]
async fn url_credentials_go_as_basic_auth_to_their_origin_only_and_are_never_written_out() {
    let a = Upstream::start().await.unwrap();
    let b = Upstream::start().await.unwrap();
    let client = AwaitableClient::builder().build_awaitable().unwrap();
    let with_credentials =
        |up: &Upstream, path: &str| format!("http://user:pa%20ss@{}{path}", up.addr());

    let request = get(with_credentials(&a, "/echo"));
    let json = request.to_json().to_string();
    assert!(
        !json.contains("pa%20ss") && !json.contains("user:"),
        "{json}"
    );
    let response = client.send(request).await.unwrap();
    let echoed = body_json(&response);
    use base64::Engine as _;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("user:pa ss")
    );
    assert_eq!(echoed["headers"]["authorization"], expected.as_str());
    let written = response.to_json().to_string();
    assert!(
        !written.contains("pa%20ss") && !written.contains("user:"),
        "{written}"
    );
    assert_eq!(response.url, a.url("/echo"));

    // A redirect to another origin carries neither the credentials nor any
    // trace of them in the chain.
    let target = b.url("/echo");
    let hop = with_credentials(
        &a,
        &format!(
            "/redirect-to?url={}",
            url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
        ),
    );
    let response = client.send(get(&hop)).await.unwrap();
    let echoed = body_json(&response);
    assert_eq!(echoed["headers"].get("authorization"), None, "{echoed}");
    let written = response.to_json().to_string();
    assert!(
        !written.contains("pa%20ss") && !written.contains("user:"),
        "{written}"
    );

    // Nor does an error.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://user:secret@{}/", listener.local_addr().unwrap());
    drop(listener);
    let error = client.send(get(&dead)).await.unwrap_err();
    let written = error.to_json().to_string();
    assert!(!written.contains("secret"), "{written}");
    assert!(!error.to_string().contains("secret"), "{error}");
}

// Observers may join a running processor (issue 8, point 12).

#[derive(Clone, Default)]
struct Starts(Arc<Mutex<Vec<String>>>);

impl ProcessorObserver for Starts {
    fn on_request_start(&self, event: &patient_http::RequestStart<'_>) {
        self.0.lock().unwrap().push(event.url.to_owned());
    }

    fn on_breaker_state_change(&self, _: &str, from: BreakerState, to: BreakerState) {
        self.0.lock().unwrap().push(format!("{from}->{to}"));
    }
}

#[test]
fn an_observer_added_to_a_running_processor_sees_what_follows() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let up = runtime.block_on(Upstream::start()).unwrap();
    let mut resilience = ResilienceConfig::builder();
    resilience = resilience.defaults(|p| {
        p.retry(Some(RetryPolicy::none())).breaker(Some(
            BreakerPolicy::builder()
                .consecutive_failures(Some(1))
                .minimum_throughput(1000)
                .build()
                .unwrap(),
        ))
    });
    let (tx, rx) = mpsc::channel::<Outcome>();
    let processor = Builder::new()
        .resilience(resilience.build().unwrap())
        .build(tx)
        .unwrap();
    processor.start().unwrap();
    // The upstream's state (and its breaker) exists before the observer joins.
    processor
        .enqueue(Task::new(get(up.url("/fast")), "Callback"))
        .unwrap();
    rx.recv_timeout(WAIT).unwrap();

    let starts = Starts::default();
    processor.add_observer(starts.clone());
    processor
        .enqueue(Task::new(get(up.url("/status/503")), "Callback"))
        .unwrap();
    rx.recv_timeout(WAIT).unwrap();
    assert!(processor.wait_for_idle(WAIT));
    let seen = starts.0.lock().unwrap().clone();
    assert_eq!(seen, [up.url("/status/503"), "closed->open".to_owned()]);
    processor.stop(None);
}

// Upstream health on demand (issue 8, point 9).

#[tokio::test(start_paused = true)]
async fn upstream_health_reports_breaker_limits_cool_down_and_recent_errors() {
    let up = Upstream::start().await.unwrap();
    let key = format!("http://{}", up.addr());
    let config = ResilienceConfig::builder()
        .defaults(|p| {
            p.retry(Some(RetryPolicy::none()))
                .breaker(Some(
                    BreakerPolicy::builder()
                        .consecutive_failures(Some(2))
                        .minimum_throughput(1000)
                        .break_duration(Duration::from_secs(5))
                        .build()
                        .unwrap(),
                ))
                .limits(LimitConfig::builder().max_in_flight(4).build().unwrap())
        })
        .build()
        .unwrap();
    let client = Builder::new().resilience(config).build_awaitable().unwrap();
    assert_eq!(client.upstream_health(&key), None, "nothing known yet");

    assert_eq!(client.send(get(up.url("/fast"))).await.unwrap().status, 200);
    let health = client.upstream_health(&key).unwrap();
    assert_eq!(health.breaker, Some(BreakerState::Closed));
    assert_eq!((health.in_flight, health.max_in_flight), (Some(0), Some(4)));
    assert_eq!((health.recent_attempts, health.recent_failures), (1, 0));
    assert!(health.is_available());

    for _ in 0..2 {
        assert_eq!(
            client
                .send(get(up.url("/status/503")))
                .await
                .unwrap()
                .status,
            503
        );
    }
    let health = client.upstream_health(&key).unwrap();
    assert_eq!(health.breaker, Some(BreakerState::Open));
    assert_eq!((health.recent_attempts, health.recent_failures), (3, 2));
    assert!((health.error_rate() - 2.0 / 3.0).abs() < 1e-9);
    assert!(!health.is_available());

    // A 429 with Retry-After cools another upstream down.
    let other = Request::get(up.url("/status/429?retry_after=30"))
        .request_options(RequestOptions {
            upstream_key: Some("tenant-a".into()),
            ..RequestOptions::default()
        })
        .build()
        .unwrap();
    assert_eq!(client.send(other).await.unwrap().status, 429);
    let summary = client.health();
    assert_eq!(summary.upstreams.len(), 2);
    assert_eq!((summary.open_breakers(), summary.cooling_down()), (1, 1));
    assert!(!summary.is_healthy());
    let tenant = client.upstream_health("tenant-a").unwrap();
    assert!(tenant.cooldown_remaining.unwrap() > Duration::from_secs(29));

    // A minute later the counts have aged out.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let health = client.upstream_health(&key).unwrap();
    assert_eq!((health.recent_attempts, health.recent_failures), (0, 0));
    assert_eq!(health.error_rate(), 0.0);
}

// 9. A response head is bounded: over 64 KiB it fails the task, typed, once.

#[tokio::test]
async fn a_response_head_over_64_kib_fails_the_task_as_too_large_without_a_retry() {
    let h1 = Upstream::start().await.unwrap();
    let retry = RetryPolicy::builder()
        .max_attempts(3)
        .base_delay(Duration::from_millis(1))
        .build()
        .unwrap();
    let client = Builder::new()
        .resilience(
            ResilienceConfig::builder()
                .defaults(|p| p.retry(Some(retry)))
                .build()
                .unwrap(),
        )
        .build_awaitable()
        .unwrap();
    // One field of 70,000 bytes; forty of 2,000 (80 KB in all).
    for query in ["n=1&size=70000", "n=40&size=2000"] {
        let before = h1.requests_to("/headers");
        let e = request_error(client.send(get(h1.url(&format!("/headers?{query}")))).await);
        assert_eq!(
            e.error_type,
            patient_http::ErrorType::ResponseTooLarge,
            "{query}: {e:?}"
        );
        assert_eq!(
            e.class_name,
            patient_http::client::RESPONSE_HEAD_TOO_LARGE,
            "{query}"
        );
        assert!(e.message.contains("65536"), "{}", e.message);
        assert_eq!(
            h1.requests_to("/headers") - before,
            1,
            "{query}: the same head would come again; not retried"
        );
    }
    // Under the bound: read whole.
    let response = client
        .send(get(h1.url("/headers?n=1&size=60000")))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
}
