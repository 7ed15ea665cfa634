//! The resilience pipeline end to end against the test upstream: retries,
//! `Retry-After`, the retry budget, hedging, deadlines, circuit breakers,
//! rate and concurrency limits, priority, interceptors, fallbacks, the stall
//! timeout and metrics.
//!
//! Timing tests run on tokio's paused clock with an [`AwaitableClient`]: the
//! upstream is started inside the same runtime and sleeps with tokio, so its
//! delays follow the paused clock too and elapsed times are exact. Tests of
//! the processor's own behaviour (priority, queue wait) use real time.

use std::{
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use patient_http::{
    breaker::{BreakerPolicy, BreakerState},
    interceptor::{RequestFn, RequestIdInterceptor, ServiceNameInterceptor},
    limit::LimitConfig,
    metrics::BREAKER_OPEN,
    resilience::UpstreamPolicyBuilder,
    retry::{BackoffKind, RetryBudget, RetryPolicy},
    AwaitableClient, Builder, Config, DeadlineMode, ErrorType, Fallback, HedgeDelay, Outcome,
    Priority, Processor, ProcessorObserver, Request, RequestEnd, RequestError, RequestOptions,
    RequestStart, ResilienceConfig, Response, RetryOptions, Strategy, Task, TaskError,
};
use patient_testkit::Upstream;
use serde_json::{json, Value};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

/// What an observer saw, in order.
#[derive(Default)]
struct Seen {
    starts: Vec<String>,
    ends: usize,
    in_flight: usize,
    max_in_flight: usize,
    retries: Vec<(u32, Duration)>,
    transitions: Vec<(String, BreakerState, BreakerState)>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Seen>>);

impl Recorder {
    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.0.lock().unwrap())
    }
}

impl ProcessorObserver for Recorder {
    fn on_request_start(&self, event: &RequestStart<'_>) {
        let mut seen = self.0.lock().unwrap();
        seen.starts.push(event.url.to_owned());
        seen.in_flight += 1;
        seen.max_in_flight = seen.max_in_flight.max(seen.in_flight);
    }

    fn on_request_end(&self, _: &RequestEnd<'_>) {
        let mut seen = self.0.lock().unwrap();
        seen.ends += 1;
        seen.in_flight -= 1;
    }

    fn on_retry(&self, _: &str, attempt: u32, delay: Duration) {
        self.0.lock().unwrap().retries.push((attempt, delay));
    }

    fn on_breaker_state_change(&self, upstream: &str, from: BreakerState, to: BreakerState) {
        self.0
            .lock()
            .unwrap()
            .transitions
            .push((upstream.to_owned(), from, to));
    }
}

fn client(resilience: ResilienceConfig) -> AwaitableClient {
    Builder::new()
        .resilience(resilience)
        .build_awaitable()
        .unwrap()
}

fn observed_client(resilience: ResilienceConfig) -> (AwaitableClient, Recorder) {
    let recorder = Recorder::default();
    let client = Builder::new()
        .resilience(resilience)
        .observer(recorder.clone())
        .build_awaitable()
        .unwrap();
    (client, recorder)
}

fn get(url: impl AsRef<str>) -> Request {
    Request::get(url).build().unwrap()
}

/// The upstream key of the test upstream: `http://127.0.0.1:PORT`.
fn key(up: &Upstream) -> String {
    format!("http://{}", up.addr())
}

fn body_json(response: &Response) -> Value {
    serde_json::from_slice(response.body.as_deref().unwrap_or_default()).unwrap()
}

fn request_error(result: Result<Response, TaskError>) -> RequestError {
    match result {
        Err(TaskError::Request(e)) => e,
        other => panic!("expected a request error, got {other:?}"),
    }
}

fn statuses(response: &Response) -> Vec<Option<u16>> {
    response.attempts.iter().map(|a| a.status).collect()
}

/// Retries with a fixed, tiny backoff, so elapsed times are the upstream's.
fn quick_retries(max_attempts: u32) -> RetryOptions {
    RetryOptions {
        max_attempts: Some(max_attempts),
        base_delay: Some(Duration::from_millis(1)),
        max_delay: Some(Duration::from_millis(1)),
        ..RetryOptions::default()
    }
}

/// The retrying policy ([`RetryPolicy::default`]: 3 attempts) as the
/// default of every upstream; without one a request makes one attempt.
fn retrying() -> ResilienceConfig {
    with_defaults(|p| p.retry(Some(RetryPolicy::default())))
}

/// A policy edit applied to the defaults of a resilience config.
fn with_defaults(
    edit: impl FnOnce(UpstreamPolicyBuilder) -> UpstreamPolicyBuilder,
) -> ResilienceConfig {
    ResilienceConfig::builder().defaults(edit).build().unwrap()
}

// 1. A 503 storm.

#[tokio::test(start_paused = true)]
async fn a_503_storm_succeeds_on_the_third_attempt_within_the_backoff_bounds() {
    let up = Upstream::start().await.unwrap();
    let (client, seen) = observed_client(retrying());
    let started = Instant::now();
    let response = client
        .send(get(up.url("/sequence?key=storm&steps=503,503,200")))
        .await
        .unwrap();
    let elapsed = started.elapsed();

    assert_eq!(response.status, 200);
    assert_eq!(body_json(&response)["n"], 2);
    assert_eq!(up.sequence_count("storm"), 3);
    assert_eq!(statuses(&response), [Some(503), Some(503), Some(200)]);
    let numbers: Vec<u32> = response.attempts.iter().map(|a| a.number).collect();
    assert_eq!(numbers, [1, 2, 3]);
    assert!(response.attempts.iter().all(|a| !a.hedged));

    // Full jitter: retry i waits at most min(10 s, 100 ms × 2^i).
    let retries = seen.seen(|s| s.retries.clone());
    assert_eq!(retries.len(), 2, "{retries:?}");
    let backoff = RetryPolicy::default();
    for (i, (attempt, delay)) in retries.iter().enumerate() {
        assert_eq!(*attempt, i as u32 + 2);
        let ceiling = backoff.backoff().ceiling(i as u32);
        assert!(
            *delay <= ceiling,
            "retry {i} waited {delay:?} > {ceiling:?}"
        );
    }
    assert_eq!(
        RetryPolicy::default().backoff().ceiling(0) + RetryPolicy::default().backoff().ceiling(1),
        Duration::from_millis(300)
    );
    let waited: Duration = retries.iter().map(|(_, d)| *d).sum();
    assert!(elapsed >= waited, "{elapsed:?} < {waited:?}");
    assert!(
        elapsed <= waited + Duration::from_millis(5),
        "{elapsed:?} vs {waited:?}"
    );
    assert!(elapsed <= Duration::from_millis(305), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_503_storm_with_linear_backoff_waits_grow_linearly() {
    // Linear, base 100 ms: retry i waits at most 100 ms × (i + 1) — 100,
    // 200, 300 ms, where the exponential default would allow 400 ms for the
    // third. Full jitter makes one wait random, so the storm is repeated and
    // the largest wait of each retry is checked to fill its window.
    const RUNS: usize = 60;
    let up = Upstream::start().await.unwrap();
    let policy = RetryPolicy::builder()
        .max_attempts(4)
        .backoff_kind(BackoffKind::Linear)
        .base_delay(Duration::from_millis(100))
        .build()
        .unwrap();
    let (client, seen) = observed_client(with_defaults(|p| p.retry(Some(policy))));
    for run in 0..RUNS {
        let started = Instant::now();
        let response = client
            .send(get(up.url(&format!(
                "/sequence?key=linear-{run}&steps=503,503,503,200"
            ))))
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(response.status, 200);
        assert_eq!(
            statuses(&response),
            [Some(503), Some(503), Some(503), Some(200)]
        );
        let retries = seen.seen(|s| s.retries[run * 3..].to_vec());
        assert_eq!(retries.len(), 3, "{retries:?}");
        let waited: Duration = retries.iter().map(|(_, d)| *d).sum();
        assert!(elapsed >= waited, "{elapsed:?} < {waited:?}");
        assert!(elapsed <= waited + Duration::from_millis(5), "{elapsed:?}");
    }
    let retries = seen.seen(|s| s.retries.clone());
    assert_eq!(retries.len(), RUNS * 3);
    for i in 0..3u32 {
        let waits: Vec<Duration> = retries
            .iter()
            .filter(|(attempt, _)| *attempt == i + 2)
            .map(|(_, d)| *d)
            .collect();
        assert_eq!(waits.len(), RUNS);
        let ceiling = Duration::from_millis(100) * (i + 1);
        let longest = waits.iter().max().copied().unwrap_or_default();
        assert!(longest <= ceiling, "retry {i}: {longest:?} > {ceiling:?}");
        // 60 uniform draws all under 80% of the window: odds 0.8^60 ≈ 1e-6.
        assert!(
            longest >= ceiling * 8 / 10,
            "retry {i}: longest {longest:?} of {ceiling:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_storm_that_outlasts_the_attempts_ends_in_the_last_503() {
    let up = Upstream::start().await.unwrap();
    let client = client(retrying());
    let response = client
        .send(get(up.url("/sequence?key=long-storm&steps=503")))
        .await
        .unwrap();
    assert_eq!(response.status, 503);
    assert_eq!(statuses(&response), [Some(503); 3]);
    assert_eq!(up.sequence_count("long-storm"), 3);
}

#[tokio::test(start_paused = true)]
async fn a_post_is_retried_only_with_an_idempotency_key_or_retry_unsafe() {
    let up = Upstream::start().await.unwrap();
    let client = client(retrying());
    let post = |key: &str| {
        Request::post(up.url(&format!("/sequence?key={key}&steps=503,200")))
            .json(&json!({"order": 1}))
    };

    let response = client.send(post("plain").build().unwrap()).await.unwrap();
    assert_eq!(response.status, 503);
    assert!(response.attempts.is_empty(), "{:?}", response.attempts);
    assert_eq!(up.sequence_count("plain"), 1);

    let response = client
        .send(post("keyed").idempotency_key("order-1").build().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(statuses(&response), [Some(503), Some(200)]);
    assert_eq!(
        body_json(&response)["headers"]["idempotency-key"],
        "order-1"
    );
    assert_eq!(up.sequence_count("keyed"), 2);

    let options = RequestOptions {
        retry: Some(RetryOptions {
            retry_unsafe: Some(true),
            ..RetryOptions::default()
        }),
        ..RequestOptions::default()
    };
    let response = client
        .send(post("unsafe").request_options(options).build().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(statuses(&response), [Some(503), Some(200)]);
    assert_eq!(up.sequence_count("unsafe"), 2);

    // A configured policy that retries unsafe methods does it for every POST.
    let client = self::client(with_defaults(|p| {
        p.retry(Some(
            RetryPolicy::builder().retry_unsafe(true).build().unwrap(),
        ))
    }));
    let response = client.send(post("policy").build().unwrap()).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(up.sequence_count("policy"), 2);
}

#[tokio::test(start_paused = true)]
async fn an_idempotency_key_header_opts_a_post_in_to_retries() {
    let up = Upstream::start().await.unwrap();
    let client = client(retrying());
    let post = |key: &str| {
        Request::post(up.url(&format!("/sequence?key={key}&steps=503,200")))
            .json(&json!({"order": 1}))
    };

    let response = client.send(post("bare").build().unwrap()).await.unwrap();
    assert_eq!(response.status, 503);
    assert_eq!(up.sequence_count("bare"), 1, "sent once without a key");

    for (key, header) in [
        ("header", "Idempotency-Key"),
        ("x-header", "X-Idempotency-Key"),
    ] {
        let started = Instant::now();
        let response = client
            .send(post(key).header(header, "order-1").build().unwrap())
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{header}");
        assert_eq!(statuses(&response), [Some(503), Some(200)], "{header}");
        assert_eq!(up.sequence_count(key), 2, "{header}");
        if header == "Idempotency-Key" {
            // The caller's header went out as given.
            assert_eq!(
                body_json(&response)["headers"]["idempotency-key"],
                "order-1"
            );
        }
        // One backoff of the retrying policy: at most 100 ms.
        assert!(
            started.elapsed() <= Duration::from_millis(105),
            "{:?}",
            started.elapsed()
        );
    }

    // Without a retry policy the header changes nothing: one attempt.
    let client = self::client(ResilienceConfig::default());
    let response = client
        .send(
            post("no-policy")
                .header("Idempotency-Key", "order-2")
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 503);
    assert_eq!(up.sequence_count("no-policy"), 1);
}

// 2. 429 with Retry-After.

#[tokio::test(start_paused = true)]
async fn a_429_retry_waits_the_servers_delay_and_cools_the_whole_upstream_down() {
    let up = Upstream::start().await.unwrap();
    let client = client(retrying());
    let started = Instant::now();
    let first = {
        let client = client.clone();
        let url = up.url("/sequence?key=cool&steps=429,200&retry_after=2");
        tokio::spawn(async move { client.send(get(url)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(up.sequence_count("cool"), 1, "the 429 came first");

    // Another request to the same upstream, during the cooldown.
    let second_started = Instant::now();
    let second = client
        .send(get(up.url("/sequence?key=cool-other")))
        .await
        .unwrap();
    let second_at = started.elapsed();
    assert_eq!(second.status, 200);
    assert!(
        second_at >= Duration::from_secs(2),
        "the second request ended {second_at:?} after the 429, inside the cooldown"
    );
    assert!(second_started.elapsed() >= Duration::from_millis(1900));

    let first = first.await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert_eq!(first.status, 200);
    assert_eq!(statuses(&first), [Some(429), Some(200)]);
    assert!(first_at >= Duration::from_secs(2), "{first_at:?}");
    assert!(first_at < Duration::from_millis(2100), "{first_at:?}");
    assert_eq!(up.sequence_count("cool"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_max_retry_after_gives_up_at_once() {
    let up = Upstream::start().await.unwrap();
    let client = client(with_defaults(|p| {
        p.retry(Some(
            RetryPolicy::builder()
                .max_retry_after(Duration::from_secs(5))
                .build()
                .unwrap(),
        ))
    }));
    let started = Instant::now();
    let response = client
        .send(get(
            up.url("/sequence?key=later&steps=429,200&retry_after=30")
        ))
        .await
        .unwrap();
    assert_eq!(response.status, 429);
    assert_eq!(response.headers.get_str("retry-after"), Some("30"));
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(up.sequence_count("later"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_503_with_retry_after_waits_that_long_instead_of_the_backoff() {
    let up = Upstream::start().await.unwrap();
    let client = client(retrying());
    let started = Instant::now();
    let response = client
        .send(get(up.url("/sequence?key=busy&steps=503,200&retry_after=3")))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200);
    assert!(elapsed >= Duration::from_secs(3), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(3100), "{elapsed:?}");
}

// 3. X-Do-Not-Retry.

#[tokio::test(start_paused = true)]
async fn x_do_not_retry_stops_retries() {
    let up = Upstream::start().await.unwrap();
    let client = client(retrying());
    let response = client
        .send(get(
            up.url("/sequence?key=dnr&steps=503,200&x_do_not_retry=1")
        ))
        .await
        .unwrap();
    assert_eq!(response.status, 503);
    assert_eq!(response.headers.get_str("x-do-not-retry"), Some("1"));
    assert!(response.attempts.is_empty());
    assert_eq!(up.sequence_count("dnr"), 1);

    // The same sequence without the header is retried.
    let response = client
        .send(get(up.url("/sequence?key=dnr-control&steps=503,200")))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(up.sequence_count("dnr-control"), 2);
}

// 4. Retry budget.

#[tokio::test(start_paused = true)]
async fn the_retry_budget_bounds_retries_during_an_outage() {
    const TASKS: u64 = 100;
    const RATIO: f32 = 0.2;
    const MIN_PER_SEC: u32 = 1;
    let ttl = Duration::from_secs(10);
    let up = Upstream::start().await.unwrap();
    let budget = Arc::new(RetryBudget::new(ttl, MIN_PER_SEC, RATIO).unwrap());
    let client = client(
        ResilienceConfig::builder()
            .retry_budget(Some(budget))
            .defaults(|p| p.retry(Some(RetryPolicy::default())))
            .build()
            .unwrap(),
    );
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let client = client.clone();
            let url = up.url("/sequence?key=outage&steps=503");
            tokio::spawn(async move { client.send(get(url)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status, 503);
    }
    let sent = up.requests_to("/sequence");
    let reserve = u64::from(MIN_PER_SEC) * ttl.as_secs();
    let allowed = (RATIO as f64 * TASKS as f64).round() as u64 + reserve;
    assert!(
        sent <= TASKS + allowed,
        "{sent} requests for {TASKS} tasks: more than {allowed} retries"
    );
    assert!(sent > TASKS, "the budget allowed no retry at all");
    // Without the budget every task would have made 3 attempts.
    assert!(sent < 3 * TASKS);
}

// 5. Hedging.

#[tokio::test(start_paused = true)]
async fn a_hedge_wins_over_a_slow_first_attempt_which_is_cancelled() {
    let up = Upstream::start().await.unwrap();
    let (client, seen) = observed_client(with_defaults(|p| {
        p.hedge_delays(HedgeDelay::Fixed(vec![Duration::from_millis(50)]))
    }));
    let started = Instant::now();
    let response = client
        .send(
            Request::get(up.url("/sequence?key=hedge&steps=200&delays=1000,5"))
                .strategy(Strategy::Hedged)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200);
    assert_eq!(body_json(&response)["n"], 1, "the hedge answered");
    assert!(
        elapsed >= Duration::from_millis(55) && elapsed < Duration::from_millis(70),
        "{elapsed:?}"
    );
    assert_eq!(up.sequence_count("hedge"), 2);
    // Its connection was closed, not put back in the pool: only the
    // hedge's stays open.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(up.open_connections(), 1);

    // The slow attempt never ends: it was dropped, not awaited.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (starts, ends) = seen.seen(|s| (s.starts.len(), s.ends));
    assert_eq!((starts, ends), (2, 1));
    assert_eq!(up.sequence_count("hedge"), 2);
    let metrics = client.metrics().render();
    let hedges = format!("hedges_total{{upstream=\"{}\"}} 1", key(&up));
    assert!(metrics.contains(&hedges), "{metrics}");
}

#[tokio::test(start_paused = true)]
async fn a_hedged_response_records_its_hedged_attempt() {
    let up = Upstream::start().await.unwrap();
    let client = client(with_defaults(|p| {
        p.hedge_delays(HedgeDelay::Fixed(vec![Duration::from_millis(50)]))
    }));
    let response = client
        .send(
            Request::get(up.url("/sequence?key=hedge-rec&steps=200&delays=1000,5"))
                .strategy(Strategy::Hedged)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let hedged: Vec<_> = response.attempts.iter().filter(|a| a.hedged).collect();
    assert_eq!(hedged.len(), 1, "{:?}", response.attempts);
    assert_eq!(hedged[0].number, 2);
    assert_eq!(hedged[0].status, Some(200));
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_attempt_starts_the_hedge_at_once() {
    let up = Upstream::start().await.unwrap();
    let client = client(with_defaults(|p| {
        p.hedge_delays(HedgeDelay::Fixed(vec![Duration::from_millis(50)]))
            .strategy(Some(Strategy::Hedged))
    }));
    let started = Instant::now();
    let response = client
        .send(get(up.url("/sequence?key=hedge-503&steps=503,200")))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(statuses(&response), [Some(503), Some(200)]);
    assert!(response.attempts[1].hedged);
}

#[tokio::test(start_paused = true)]
async fn a_fast_first_attempt_starts_no_hedge() {
    let up = Upstream::start().await.unwrap();
    let client = client(with_defaults(|p| {
        p.hedge_delays(HedgeDelay::Fixed(vec![Duration::from_millis(50)]))
            .strategy(Some(Strategy::Hedged))
    }));
    let started = Instant::now();
    let response = client
        .send(get(up.url("/sequence?key=no-hedge&delays=10")))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert!(started.elapsed() < Duration::from_millis(20));
    assert!(response.attempts.is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.sequence_count("no-hedge"), 1);
}

#[tokio::test(start_paused = true)]
async fn hedging_a_bimodal_upstream_cuts_the_slow_tail() {
    let up = Upstream::start().await.unwrap();
    let client = client(with_defaults(|p| {
        p.hedge_delays(HedgeDelay::Fixed(vec![Duration::from_millis(50)]))
            .strategy(Some(Strategy::Hedged))
    }));
    // A fifth of the requests are slow: about 20 of 100 without hedging. With
    // a hedge after 50 ms an answer is slow only when both attempts are
    // (one in 25).
    let url = up.url("/bimodal?slow_pct=20&slow_ms=1000&fast_ms=5");
    let mut slow = 0;
    for _ in 0..100 {
        let started = Instant::now();
        let response = client.send(get(&url)).await.unwrap();
        assert_eq!(response.status, 200);
        let elapsed = started.elapsed();
        if elapsed >= Duration::from_secs(1) {
            slow += 1;
        } else {
            assert!(elapsed <= Duration::from_millis(55), "{elapsed:?}");
        }
    }
    assert!(slow <= 12, "{slow} of 100 slow despite hedging");
    let sent = up.requests_to("/bimodal");
    assert!(sent > 100 && sent <= 150, "{sent} requests for 100");
}

// 6. Deadlines.

fn deadline_options(deadline_ms: u64, mode: DeadlineMode) -> RequestOptions {
    RequestOptions {
        deadline: Some(Duration::from_millis(deadline_ms)),
        deadline_mode: Some(mode),
        retry: Some(quick_retries(3)),
        ..RequestOptions::default()
    }
}

fn echoed_timeout(response: &Response) -> f64 {
    let value = body_json(response)["headers"]["x-request-timeout"].clone();
    value
        .as_str()
        .unwrap_or_else(|| panic!("no x-request-timeout echoed: {value}"))
        .parse()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_split_deadline_gives_each_attempt_its_share() {
    let up = Upstream::start().await.unwrap();
    let client = client(ResilienceConfig::default());
    let started = Instant::now();
    // Every attempt but the last is too slow.
    let response = client
        .send(
            Request::get(up.url("/sequence?key=split&delays=1000,1000,0"))
                .request_options(deadline_options(300, DeadlineMode::Split))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(up.sequence_count("split"), 3);
    let attempts = &response.attempts;
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    for attempt in &attempts[..2] {
        assert_eq!(attempt.error_type, Some(ErrorType::Timeout), "{attempt:?}");
        assert!(
            attempt.duration >= Duration::from_millis(95)
                && attempt.duration <= Duration::from_millis(101),
            "{attempt:?}"
        );
    }
    assert_eq!(attempts[2].status, Some(200));
    // The last attempt had the rest: about 300 - 2 × 100 - backoff.
    let last = echoed_timeout(&response);
    assert!((0.09..=0.1).contains(&last), "{last}");
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn a_split_deadline_propagates_the_attempts_share() {
    let up = Upstream::start().await.unwrap();
    let client = client(ResilienceConfig::default());
    let response = client
        .send(
            Request::get(up.url("/sequence?key=split-echo"))
                .request_options(deadline_options(300, DeadlineMode::Split))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    // The first of 3 attempts gets a third of 300 ms, and the upstream is told so.
    let sent = echoed_timeout(&response);
    assert!((0.09..=0.1).contains(&sent), "X-Request-Timeout: {sent}");
}

#[tokio::test(start_paused = true)]
async fn a_pass_through_deadline_gives_the_first_attempt_everything() {
    let up = Upstream::start().await.unwrap();
    let client = client(ResilienceConfig::default());
    let response = client
        .send(
            Request::get(up.url("/sequence?key=pass"))
                .request_options(deadline_options(300, DeadlineMode::PassThrough))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let sent = echoed_timeout(&response);
    assert!((0.29..=0.3).contains(&sent), "X-Request-Timeout: {sent}");

    // A slow upstream: the one attempt runs the whole 300 ms, and no retry
    // fits in what is left.
    let started = Instant::now();
    let error = request_error(
        client
            .send(
                Request::get(up.url("/sequence?key=pass-slow&delays=1000"))
                    .request_options(deadline_options(300, DeadlineMode::PassThrough))
                    .build()
                    .unwrap(),
            )
            .await,
    );
    let elapsed = started.elapsed();
    assert_eq!(error.error_type, ErrorType::Timeout);
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed <= Duration::from_millis(305),
        "{elapsed:?}"
    );
    assert_eq!(up.sequence_count("pass-slow"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_below_the_minimum_attempt_time_sends_nothing() {
    let up = Upstream::start().await.unwrap();
    let client = client(with_defaults(|p| {
        p.min_attempt_time(Duration::from_millis(50))
    }));
    let error = request_error(
        client
            .send(
                Request::get(up.url("/sequence?key=late"))
                    .deadline(Duration::from_millis(30))
                    .build()
                    .unwrap(),
            )
            .await,
    );
    assert_eq!(error.class_name, "DeadlineExceeded");
    assert_eq!(error.error_type, ErrorType::Timeout);
    assert!(
        error.message.contains("nothing was sent"),
        "{}",
        error.message
    );
    assert_eq!(up.requests(), 0);
    assert_eq!(up.sequence_count("late"), 0);
}

#[tokio::test(start_paused = true)]
async fn priority_and_deadline_are_propagated_upstream() {
    let up = Upstream::start().await.unwrap();
    let client = client(ResilienceConfig::default());
    let response = client
        .send(
            Request::get(up.url("/sequence?key=prio"))
                .priority(Priority::High)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let headers = &body_json(&response)["headers"];
    assert_eq!(headers["x-request-priority"], "high");
    assert!(headers.get("x-request-timeout").is_none(), "{headers}");

    let response = client
        .send(
            Request::get(up.url("/sequence?key=prio-deadline"))
                .priority(Priority::Low)
                .deadline(Duration::from_secs(2))
                .strategy(Strategy::Single)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let headers = &body_json(&response)["headers"];
    assert_eq!(headers["x-request-priority"], "low");
    assert_eq!(headers["x-request-timeout"], "2");

    // Neither without a deadline or a priority.
    let response = client
        .send(get(up.url("/sequence?key=plain")))
        .await
        .unwrap();
    assert_eq!(body_json(&response)["headers"], json!({}));

    // Nor with propagation off.
    let client = self::client(with_defaults(|p| p.propagate(false)));
    let response = client
        .send(
            Request::get(up.url("/sequence?key=quiet"))
                .priority(Priority::High)
                .deadline(Duration::from_secs(2))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(body_json(&response)["headers"], json!({}));
}

// 7. Circuit breaker.

/// No retries; a breaker that opens after 3 failures in a row for 1 s.
fn breaker_policy(p: UpstreamPolicyBuilder) -> UpstreamPolicyBuilder {
    p.retry(Some(RetryPolicy::none())).breaker(Some(
        BreakerPolicy::builder()
            .consecutive_failures(Some(3))
            .minimum_throughput(1000)
            .break_duration(Duration::from_secs(1))
            .success_threshold(1)
            .build()
            .unwrap(),
    ))
}

fn breaker_config() -> ResilienceConfig {
    with_defaults(breaker_policy)
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_after_three_failures_fails_fast_and_closes_after_a_probe() {
    let up = Upstream::start().await.unwrap();
    let (client, seen) = observed_client(breaker_config());
    let url = up.url("/sequence?key=brk&steps=503,503,503,200");
    for _ in 0..3 {
        assert_eq!(client.send(get(&url)).await.unwrap().status, 503);
    }
    assert_eq!(up.sequence_count("brk"), 3);

    // Open: fail fast, nothing sent, to any path of the upstream.
    let started = Instant::now();
    for path in [url.as_str(), &up.url("/fast")] {
        let error = request_error(client.send(get(path)).await);
        assert_eq!(error.class_name, "CircuitOpen");
        assert!(error.message.contains(&key(&up)), "{}", error.message);
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(up.requests(), 3);
    let gauge = format!("breaker_state{{upstream=\"{}\"}} {BREAKER_OPEN}", key(&up));
    let metrics = client.metrics().render();
    assert!(metrics.contains(&gauge), "{metrics}");

    // After the break one probe goes through; its success closes the breaker.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(client.send(get(&url)).await.unwrap().status, 200);
    assert_eq!(up.sequence_count("brk"), 4);
    assert_eq!(client.send(get(&url)).await.unwrap().status, 200);
    assert_eq!(up.sequence_count("brk"), 5);

    let transitions = seen.seen(|s| s.transitions.clone());
    let k = key(&up);
    assert_eq!(
        transitions,
        [
            (k.clone(), BreakerState::Closed, BreakerState::Open),
            (k.clone(), BreakerState::Open, BreakerState::HalfOpen),
            (k.clone(), BreakerState::HalfOpen, BreakerState::Closed),
        ]
    );
    let metrics = client.metrics().render();
    assert!(
        metrics.contains(&format!("breaker_state{{upstream=\"{k}\"}} 0")),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_opens_the_breaker_again() {
    let up = Upstream::start().await.unwrap();
    let (client, seen) = observed_client(breaker_config());
    let url = up.url("/sequence?key=brk-again&steps=503");
    for _ in 0..3 {
        client.send(get(&url)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(client.send(get(&url)).await.unwrap().status, 503);
    assert_eq!(up.sequence_count("brk-again"), 4);
    let error = request_error(client.send(get(&url)).await);
    assert_eq!(error.class_name, "CircuitOpen");
    assert_eq!(up.sequence_count("brk-again"), 4);
    let states: Vec<_> = seen.seen(|s| s.transitions.iter().map(|t| (t.1, t.2)).collect());
    assert_eq!(
        states,
        [
            (BreakerState::Closed, BreakerState::Open),
            (BreakerState::Open, BreakerState::HalfOpen),
            (BreakerState::HalfOpen, BreakerState::Open),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_on_a_dead_port() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let url = format!("http://{dead}/");
    let (client, seen) = observed_client(breaker_config());
    for _ in 0..3 {
        let error = request_error(client.send(get(&url)).await);
        assert_eq!(error.error_type, ErrorType::Connection, "{error:?}");
        assert_ne!(error.class_name, "CircuitOpen");
    }
    let error = request_error(client.send(get(&url)).await);
    assert_eq!(error.class_name, "CircuitOpen");
    assert_eq!(seen.seen(|s| s.starts.len()), 3, "the fourth was not sent");
    let metrics = client.metrics().render();
    let gauge = format!("breaker_state{{upstream=\"http://{dead}\"}} {BREAKER_OPEN}");
    assert!(metrics.contains(&gauge), "{metrics}");
}

// 8. Rate and concurrency limits.

#[tokio::test(start_paused = true)]
async fn a_rate_limit_spaces_requests_and_fails_none() {
    let up = Upstream::start().await.unwrap();
    let client = client(with_defaults(|p| {
        p.limits(LimitConfig::builder().rate(10.0, 1).build().unwrap())
    }));
    let started = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            let url = up.url("/fast");
            tokio::spawn(async move { client.send(get(url)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status, 200);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1890) && elapsed <= Duration::from_millis(1950),
        "{elapsed:?}"
    );
    assert_eq!(up.requests_to("/fast"), 20);
    let metrics = client.metrics().render();
    let waits = format!("rate_limit_waits_total{{upstream=\"{}\"}} 19", key(&up));
    assert!(metrics.contains(&waits), "{metrics}");
    assert!(
        metrics.contains("rate_limit_wait_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_limit_caps_requests_in_flight() {
    let up = Upstream::start().await.unwrap();
    let (client, seen) = observed_client(with_defaults(|p| {
        p.limits(LimitConfig::builder().max_in_flight(2).build().unwrap())
    }));
    let started = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let client = client.clone();
            let url = up.url("/delay?ms=100");
            tokio::spawn(async move { client.send(get(url)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status, 200);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(320),
        "{elapsed:?}"
    );
    assert_eq!(seen.seen(|s| s.max_in_flight), 2);
}

// 9. Priority.

#[test]
fn a_saturated_processor_dispatches_high_then_normal_then_low() {
    let (up, _rt) = real_time_upstream();
    let (tx, rx) = mpsc::channel();
    let config = Config::builder().max_in_flight(Some(1)).build().unwrap();
    let p = Processor::builder().config(config).build(tx).unwrap();
    p.start().unwrap();
    p.enqueue(Task::new(get(up.url("/delay?ms=300")), "slow"))
        .unwrap();
    assert!(p.wait_for_processing(WAIT));
    for (priority, name) in [
        (Priority::Low, "low"),
        (Priority::Normal, "normal"),
        (Priority::High, "high"),
    ] {
        let request = Request::get(up.url("/delay?ms=20"))
            .priority(priority)
            .build()
            .unwrap();
        p.enqueue(Task::new(request, name)).unwrap();
    }
    let order: Vec<String> = (0..4)
        .map(|_| match rx.recv_timeout(WAIT).unwrap() {
            Outcome::Completed { callback, .. } => callback,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(order, ["slow", "high", "normal", "low"]);
    p.stop(None);
}

#[test]
fn a_deadline_counts_the_time_queued_in_the_processor() {
    let (up, _rt) = real_time_upstream();
    let (tx, rx) = mpsc::channel();
    let config = Config::builder().max_in_flight(Some(1)).build().unwrap();
    let p = Processor::builder().config(config).build(tx).unwrap();
    p.start().unwrap();
    p.enqueue(Task::new(get(up.url("/delay?ms=300")), "slow"))
        .unwrap();
    assert!(p.wait_for_processing(WAIT));
    let request = Request::get(up.url("/sequence?key=queued"))
        .deadline(Duration::from_millis(100))
        .build()
        .unwrap();
    p.enqueue(Task::new(request, "queued")).unwrap();
    let mut outcomes: Vec<Outcome> = (0..2).map(|_| rx.recv_timeout(WAIT).unwrap()).collect();
    outcomes.sort_by_key(|o| o.is_completed());
    match &outcomes[0] {
        Outcome::Failed {
            error: TaskError::Request(e),
            callback,
        } => {
            assert_eq!(callback, "queued");
            assert_eq!(e.class_name, "DeadlineExceeded");
            assert_eq!(e.error_type, ErrorType::Timeout);
        }
        other => panic!("{other:?}"),
    }
    assert!(outcomes[1].is_completed());
    assert_eq!(up.sequence_count("queued"), 0);
    p.stop(None);
}

/// An upstream on a real-time runtime of its own, for processor tests.
fn real_time_upstream() -> (Upstream, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(Upstream::start()).unwrap();
    (up, rt)
}

// 10. Interceptors.

#[tokio::test(start_paused = true)]
async fn request_id_and_service_name_reach_the_upstream() {
    let up = Upstream::start().await.unwrap();
    let client = Builder::new()
        .interceptor(RequestIdInterceptor::new())
        .interceptor(ServiceNameInterceptor::new("billing"))
        .build_awaitable()
        .unwrap();
    let task = Task::new(get(up.url("/echo")), "").with_id("task-42");
    let response = client.execute(&task).await.unwrap();
    let headers = &body_json(&response)["headers"];
    assert_eq!(headers["x-request-id"], "task-42");
    assert_eq!(headers["x-service-name"], "billing");

    // A request's own X-Request-ID wins.
    let request = Request::get(up.url("/sequence?key=rid"))
        .header("x-request-id", "mine")
        .build()
        .unwrap();
    let response = client.send(request).await.unwrap();
    assert_eq!(body_json(&response)["headers"]["x-request-id"], "mine");
}

#[tokio::test(start_paused = true)]
async fn a_refusing_interceptor_ends_the_task_and_sends_nothing() {
    let up = Upstream::start().await.unwrap();
    let client = Builder::new()
        .interceptor(RequestIdInterceptor::new())
        .interceptor(RequestFn::new("deny-all", |_, _| {
            Err("no credentials for this upstream".to_owned())
        }))
        .build_awaitable()
        .unwrap();
    let error = request_error(client.send(get(up.url("/echo"))).await);
    assert_eq!(error.class_name, "InterceptorError");
    assert!(error.message.contains("deny-all"), "{}", error.message);
    assert!(
        error.message.contains("no credentials for this upstream"),
        "{}",
        error.message
    );
    assert!(error.attempts.is_empty(), "a refusal is not retried");
    assert_eq!(up.requests(), 0);
}

// 11. Fallback.

fn fallback() -> Fallback {
    Fallback::Response {
        status: 200,
        headers: vec![("Content-Type".into(), "text/plain".into())],
        body: Bytes::from_static(b"cached"),
    }
}

fn assert_fallback(response: &Response) {
    assert_eq!(response.status, 200);
    assert_eq!(response.body.as_deref(), Some(&b"cached"[..]));
    assert_eq!(response.headers.get_str("x-patient-fallback"), Some("true"));
    assert_eq!(response.headers.get_str("content-type"), Some("text/plain"));
}

#[tokio::test(start_paused = true)]
async fn a_fallback_answers_when_attempts_are_exhausted_or_the_breaker_is_open() {
    let up = Upstream::start().await.unwrap();
    let client = client(with_defaults(|p| {
        breaker_policy(p).fallback(Some(fallback())).retry(Some(
            RetryPolicy::builder()
                .max_attempts(2)
                .base_delay(Duration::from_millis(1))
                .max_delay(Duration::from_millis(1))
                .build()
                .unwrap(),
        ))
    }));
    let url = up.url("/sequence?key=fb&steps=503");
    let raising = || Task::new(get(&url), "").with_raise_error_responses(true);

    // Two attempts each, both 503: exhausted.
    let response = client.execute(&raising()).await.unwrap();
    assert_fallback(&response);
    assert_eq!(up.sequence_count("fb"), 2);
    // The third failure in a row opens the breaker (the fourth attempt is refused).
    let response = client.execute(&raising()).await.unwrap();
    assert_fallback(&response);
    assert_eq!(up.sequence_count("fb"), 3);
    // Open: the fallback, and nothing sent.
    let response = client.execute(&raising()).await.unwrap();
    assert_fallback(&response);
    assert_eq!(up.sequence_count("fb"), 3);
}

#[tokio::test(start_paused = true)]
async fn a_fallback_answers_for_a_dead_port() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let client = client(with_defaults(|p| p.fallback(Some(fallback()))));
    let response = client.send(get(format!("http://{dead}/"))).await.unwrap();
    assert_fallback(&response);

    // A hook sees the error and may decline.
    let client = self::client(with_defaults(|p| {
        p.fallback(Some(Fallback::hook(|_: &Task, error: &TaskError| {
            assert_eq!(error.request_id(), "hooked");
            None
        })))
    }));
    let task = Task::new(get(format!("http://{dead}/")), "").with_id("hooked");
    let error = request_error(client.execute(&task).await);
    assert_eq!(error.error_type, ErrorType::Connection);
}

// 12. Stall timeout.

fn stalling_builder(stall: Duration) -> Builder {
    let config = Config::builder()
        .client_with(|c| c.stall_timeout(Some(stall)))
        .build()
        .unwrap();
    Builder::new()
        .config(config)
        .resilience(with_defaults(|p| p.retry(Some(RetryPolicy::none()))))
}

#[tokio::test(start_paused = true)]
async fn a_stall_timeout_ends_a_trickling_response() {
    let up = Upstream::start().await.unwrap();
    let url = up.url("/sse?events=5&interval_ms=500");

    let client = stalling_builder(Duration::from_millis(200))
        .build_awaitable()
        .unwrap();
    let started = Instant::now();
    let error = request_error(client.send(get(&url)).await);
    assert_eq!(error.error_type, ErrorType::Timeout);
    assert_eq!(error.class_name, "StallTimeout");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_millis(250),
        "{elapsed:?}"
    );

    // Events 500 ms apart stay under a 1 s stall limit, though the whole
    // body takes 2 s.
    let client = stalling_builder(Duration::from_secs(1))
        .build_awaitable()
        .unwrap();
    let started = Instant::now();
    let response = client.send(get(&url)).await.unwrap();
    assert_eq!(response.status, 200);
    let body = std::str::from_utf8(response.body.as_deref().unwrap()).unwrap();
    assert_eq!(body.matches("data: event").count(), 5);
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[test]
fn a_stall_timeout_applies_to_the_processor() {
    let (up, _rt) = real_time_upstream();
    let (tx, rx) = mpsc::channel();
    let p = stalling_builder(Duration::from_millis(200))
        .build(tx)
        .unwrap();
    p.start().unwrap();
    let started = std::time::Instant::now();
    p.enqueue(Task::new(
        get(up.url("/sse?events=5&interval_ms=500")),
        "stalled",
    ))
    .unwrap();
    match rx.recv_timeout(WAIT).unwrap() {
        Outcome::Failed {
            error: TaskError::Request(e),
            ..
        } => {
            assert_eq!(e.class_name, "StallTimeout");
            assert_eq!(e.error_type, ErrorType::Timeout);
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(1500));
    p.stop(None);
}

// 13. Metrics.

#[tokio::test(start_paused = true)]
async fn metrics_count_requests_attempts_retries_and_latency() {
    let up = Upstream::start().await.unwrap();
    let client = client(retrying());
    client.send(get(up.url("/fast"))).await.unwrap();
    client.send(get(up.url("/fast"))).await.unwrap();
    let response = client
        .send(get(up.url("/sequence?key=m&steps=503,200")))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let post = Request::post(up.url("/status/404"))
        .body("x")
        .build()
        .unwrap();
    assert_eq!(client.send(post).await.unwrap().status, 404);

    let k = key(&up);
    let text = client.metrics().render();
    for line in [
        format!("requests_total{{upstream=\"{k}\",endpoint=\"GET /fast\",method=\"GET\",status=\"200\"}} 2"),
        format!("requests_total{{upstream=\"{k}\",endpoint=\"GET /sequence\",method=\"GET\",status=\"200\"}} 1"),
        format!("requests_total{{upstream=\"{k}\",endpoint=\"GET /sequence\",method=\"GET\",status=\"503\"}} 1"),
        format!("requests_total{{upstream=\"{k}\",endpoint=\"POST /status/{{id}}\",method=\"POST\",status=\"404\"}} 1"),
        format!("attempts_total{{upstream=\"{k}\"}} 5"),
        format!("retries_total{{upstream=\"{k}\"}} 1"),
        format!("request_duration_seconds_count{{upstream=\"{k}\",endpoint=\"GET /fast\"}} 2"),
        format!("request_duration_seconds_bucket{{le=\"0.005\",upstream=\"{k}\",endpoint=\"GET /fast\"}}"),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains("# TYPE request_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("in_flight 0"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");

    // Errors are counted by error type.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let client = self::client(with_defaults(|p| p.retry(Some(RetryPolicy::none()))));
    client
        .send(get(format!("http://{dead}/")))
        .await
        .unwrap_err();
    let text = client.metrics().render();
    let line = format!(
        "requests_total{{upstream=\"http://{dead}\",endpoint=\"GET /\",method=\"GET\",status=\"connection\"}} 1"
    );
    assert!(text.contains(&line), "missing {line:?} in\n{text}");
}

#[tokio::test(start_paused = true)]
async fn metrics_count_every_request_sent_with_its_status() {
    let up = Upstream::start().await.unwrap();
    let client = client(retrying());
    let response = client
        .send(get(up.url("/sequence?key=final&steps=503,503,200")))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let k = key(&up);
    let text = client.metrics().render();
    // What the upstream saw: two 503s and a 200, each with its latency.
    let e = "endpoint=\"GET /sequence\"";
    let ok = format!("requests_total{{upstream=\"{k}\",{e},method=\"GET\",status=\"200\"}} 1");
    assert!(text.contains(&ok), "{text}");
    let failed = format!("requests_total{{upstream=\"{k}\",{e},method=\"GET\",status=\"503\"}} 2");
    assert!(text.contains(&failed), "{text}");
    let count = format!("request_duration_seconds_count{{upstream=\"{k}\",{e}}} 3");
    assert!(text.contains(&count), "{text}");
    assert!(
        text.contains(&format!("retries_total{{upstream=\"{k}\"}} 2")),
        "{text}"
    );
    assert!(text.contains(&format!("attempts_total{{upstream=\"{k}\"}} 3")));
}
