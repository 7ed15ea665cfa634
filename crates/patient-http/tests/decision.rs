//! The step-by-step decision API a durable queue runs on, against the test
//! upstream: done, retry not before T, refused until T, with the attempt
//! history, the retry budget and "was the request sent" carried by the
//! caller's progress.

use std::time::{Duration, SystemTime};

use patient_http::{
    breaker::BreakerPolicy,
    interceptor::{InterceptContext, RequestFn},
    limit::LimitConfig,
    preprocess::PreparedRequest,
    resilience::ResilienceConfigBuilder,
    retry::{RetryBudget, RetryPolicy},
    AwaitableClient, Builder, Decision, LimitWait, Refusal, Request, RequestOptions,
    ResilienceConfig, Response, RetryOptions, Task, TaskError, TaskProgress,
};
use patient_testkit::Upstream;

const NOW: LimitWait = LimitWait::UpTo(Duration::ZERO);

fn client(
    edit: impl FnOnce(ResilienceConfigBuilder) -> ResilienceConfigBuilder,
) -> AwaitableClient {
    let config = edit(ResilienceConfig::builder()).build().unwrap();
    Builder::new().resilience(config).build_awaitable().unwrap()
}

fn task(url: impl AsRef<str>) -> Task {
    Task::new(Request::get(url).build().unwrap(), "Callback")
}

fn fixed_backoff(max_attempts: u32, delay_ms: u64) -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(max_attempts)
        .base_delay(Duration::from_millis(delay_ms))
        .max_delay(Duration::from_millis(delay_ms))
        .build()
        .unwrap()
}

fn done(decision: Decision) -> Result<Response, TaskError> {
    match decision {
        Decision::Done(result) => result,
        other => panic!("expected done, got {other:?}"),
    }
}

#[tokio::test]
async fn a_first_attempt_that_succeeds_is_done_at_once() {
    let up = Upstream::start().await.unwrap();
    let client = client(|c| c);
    let task = task(up.url("/fast"));
    let mut progress = client.progress(&task, SystemTime::now());
    assert_eq!(progress, TaskProgress::new(None));
    let response = done(client.step(&task, &mut progress, NOW).await).unwrap();
    assert_eq!(response.status, 200);
    assert!(response.attempts.is_empty());
    assert_eq!(progress.next_attempt, 2);
    assert!(progress.request_sent);
    assert_eq!(progress.attempts.len(), 1);
    assert_eq!(progress.attempts[0].status, Some(200));
}

#[tokio::test]
async fn a_503_gives_retry_not_before_the_backoff_then_done_with_both_attempts() {
    let up = Upstream::start().await.unwrap();
    let client = client(|c| c.defaults(|p| p.retry(Some(fixed_backoff(3, 400)))));
    let task = task(up.url("/sequence?key=d&steps=503,200"));
    let mut progress = client.progress(&task, SystemTime::now());
    let before = SystemTime::now();
    let (not_before, delay) = match client.step(&task, &mut progress, NOW).await {
        Decision::Retry {
            not_before,
            delay,
            last,
        } => {
            assert_eq!(last.unwrap().status, 503);
            (not_before, delay)
        }
        other => panic!("expected a retry, got {other:?}"),
    };
    // Full jitter: anywhere up to the fixed 400 ms.
    assert!(delay <= Duration::from_millis(400), "{delay:?}");
    assert!(not_before >= before + delay && not_before <= SystemTime::now() + delay);
    assert_eq!(progress.next_attempt, 2);
    assert_eq!(up.sequence_count("d"), 1);

    // A durable queue stores the progress; a restarted engine resumes it.
    let stored = progress.clone();
    let restarted = client_like(&up);
    let mut progress = stored;
    let response = done(restarted.step(&task, &mut progress, NOW).await).unwrap();
    assert_eq!(response.status, 200);
    let numbers: Vec<_> = response
        .attempts
        .iter()
        .map(|a| (a.number, a.status))
        .collect();
    assert_eq!(numbers, [(1, Some(503)), (2, Some(200))]);
    assert_eq!(progress.next_attempt, 3);
}

fn client_like(_: &Upstream) -> AwaitableClient {
    client(|c| c.defaults(|p| p.retry(Some(fixed_backoff(3, 400)))))
}

#[tokio::test]
async fn a_429_with_retry_after_is_stored_as_its_delay_and_cools_the_upstream_down() {
    let up = Upstream::start().await.unwrap();
    let client = client(|c| c.defaults(|p| p.retry(Some(fixed_backoff(3, 1)))));
    let task = task(up.url("/status/429?retry_after=30"));
    let mut progress = client.progress(&task, SystemTime::now());
    match client.step(&task, &mut progress, NOW).await {
        Decision::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(30)),
        other => panic!("expected a retry, got {other:?}"),
    }
    // Every other task of the upstream is refused until the cool-down ends,
    // without sending anything and without using up an attempt.
    let other = self::task(up.url("/fast"));
    let mut other_progress = client.progress(&other, SystemTime::now());
    match client.step(&other, &mut other_progress, NOW).await {
        Decision::Refused {
            refusal,
            retry_in,
            until,
            error,
        } => {
            assert_eq!(refusal, Refusal::CoolingDown);
            assert!(retry_in > Duration::from_secs(29) && retry_in <= Duration::from_secs(30));
            assert!(until > SystemTime::now() + Duration::from_secs(29));
            match error {
                TaskError::Request(e) => assert_eq!(e.class_name, "CoolingDown"),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(other_progress, TaskProgress::new(None));
    assert_eq!(up.requests_to("/fast"), 0);
}

#[tokio::test]
async fn an_open_breaker_refuses_until_its_break_ends() {
    let up = Upstream::start().await.unwrap();
    let client = client(|c| {
        c.defaults(|p| {
            p.retry(Some(RetryPolicy::none())).breaker(Some(
                BreakerPolicy::builder()
                    .consecutive_failures(Some(1))
                    .minimum_throughput(1000)
                    .break_duration(Duration::from_secs(60))
                    .build()
                    .unwrap(),
            ))
        })
    });
    let failing = task(up.url("/status/503"));
    let mut progress = client.progress(&failing, SystemTime::now());
    assert_eq!(
        done(client.step(&failing, &mut progress, NOW).await)
            .unwrap()
            .status,
        503
    );

    let next = task(up.url("/fast"));
    let mut progress = client.progress(&next, SystemTime::now());
    match client.step(&next, &mut progress, LimitWait::Wait).await {
        Decision::Refused {
            refusal, retry_in, ..
        } => {
            assert_eq!(refusal, Refusal::CircuitOpen);
            assert!(retry_in > Duration::from_secs(59), "{retry_in:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(progress.next_attempt, 1, "a refusal uses no attempt");
    assert!(!progress.request_sent);
    assert_eq!(up.requests_to("/fast"), 0);
}

#[tokio::test]
async fn a_busy_rate_limit_is_waited_for_up_to_the_given_bound() {
    let up = Upstream::start().await.unwrap();
    let client =
        client(|c| c.defaults(|p| p.limits(LimitConfig::builder().rate(5.0, 1).build().unwrap())));
    let t = task(up.url("/fast"));
    let mut p = client.progress(&t, SystemTime::now());
    assert!(done(client.step(&t, &mut p, NOW).await).is_ok());
    // No token now: refused with when one is free...
    let mut p = client.progress(&t, SystemTime::now());
    match client.step(&t, &mut p, NOW).await {
        Decision::Refused {
            refusal, retry_in, ..
        } => {
            assert_eq!(refusal, Refusal::RateLimited);
            assert!(retry_in <= Duration::from_millis(200), "{retry_in:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // ...or waited for, when the caller allows that long.
    let response = done(
        client
            .step(&t, &mut p, LimitWait::UpTo(Duration::from_secs(1)))
            .await,
    );
    assert_eq!(response.unwrap().status, 200);
}

#[tokio::test]
async fn a_connection_refused_was_not_sent_and_a_deadline_in_the_past_sends_nothing() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/", listener.local_addr().unwrap());
    drop(listener);
    let client = client(|c| c.defaults(|p| p.retry(Some(fixed_backoff(2, 1)))));
    let t = task(&dead);
    let mut progress = client.progress(&t, SystemTime::now());
    match client.step(&t, &mut progress, NOW).await {
        Decision::Retry { last, .. } => match last {
            Err(TaskError::Request(e)) => {
                assert_eq!(e.error_type, patient_http::ErrorType::Connection)
            }
            other => panic!("expected a connection error, got {other:?}"),
        },
        other => panic!("expected a retry, got {other:?}"),
    }
    assert!(!progress.request_sent, "a refused connection sent nothing");

    let up = Upstream::start().await.unwrap();
    let t = task(up.url("/fast"));
    let mut progress = TaskProgress::new(Some(SystemTime::now() - Duration::from_secs(1)));
    match done(client.step(&t, &mut progress, NOW).await) {
        Err(TaskError::Request(e)) => assert_eq!(e.class_name, "DeadlineExceeded"),
        other => panic!("expected a deadline error, got {other:?}"),
    }
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn the_deadline_is_counted_from_acceptance_and_ends_retries() {
    let up = Upstream::start().await.unwrap();
    let client = client(|c| c.defaults(|p| p.retry(Some(fixed_backoff(5, 1)))));
    let request = Request::get(up.url("/status/429?retry_after=2"))
        .deadline(Duration::from_millis(500))
        .build()
        .unwrap();
    let t = Task::new(request, "Callback");
    let accepted = SystemTime::now();
    let mut progress = client.progress(&t, accepted);
    assert_eq!(
        progress.deadline,
        Some(accepted + Duration::from_millis(500))
    );
    // The 2 s the upstream asks for cannot fit in a 500 ms deadline: done
    // with the 429 instead of a retry that could never be made.
    let response = done(client.step(&t, &mut progress, NOW).await).unwrap();
    assert_eq!(response.status, 429);
}

#[tokio::test]
async fn a_post_is_done_after_one_attempt_unless_it_may_be_retried() {
    let up = Upstream::start().await.unwrap();
    let client = client(|c| c.defaults(|p| p.retry(Some(fixed_backoff(3, 1)))));
    let post = Task::new(
        Request::post(up.url("/status/503"))
            .body("x")
            .build()
            .unwrap(),
        "Callback",
    );
    let mut progress = client.progress(&post, SystemTime::now());
    assert_eq!(
        done(client.step(&post, &mut progress, NOW).await)
            .unwrap()
            .status,
        503
    );

    let keyed = Task::new(
        Request::post(up.url("/status/503"))
            .body("x")
            .idempotency_key("k-1")
            .build()
            .unwrap(),
        "Callback",
    );
    let mut progress = client.progress(&keyed, SystemTime::now());
    assert!(matches!(
        client.step(&keyed, &mut progress, NOW).await,
        Decision::Retry { .. }
    ));
}

#[tokio::test]
async fn the_retry_budget_is_spent_by_retry_decisions() {
    let up = Upstream::start().await.unwrap();
    let budget = std::sync::Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap());
    let client = client(|c| {
        c.defaults(|p| p.retry(Some(fixed_backoff(3, 1))))
            .retry_budget(Some(budget))
    });
    let t = task(up.url("/status/503"));
    let mut progress = client.progress(&t, SystemTime::now());
    // No budget for a retry: done with the 503 rather than a retry decision.
    assert_eq!(
        done(client.step(&t, &mut progress, NOW).await)
            .unwrap()
            .status,
        503
    );
}

#[tokio::test]
async fn a_panic_in_engine_code_ends_the_task() {
    let up = Upstream::start().await.unwrap();
    let client = Builder::new()
        .interceptor(RequestFn::new(
            "boom",
            |_: &mut PreparedRequest, _: &InterceptContext<'_>| -> Result<(), String> {
                panic!("boom")
            },
        ))
        .build_awaitable()
        .unwrap();
    let t = task(up.url("/fast"));
    let mut progress = client.progress(&t, SystemTime::now());
    match done(client.step(&t, &mut progress, NOW).await) {
        Err(TaskError::Request(e)) => assert_eq!(e.class_name, "Panic"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn retry_options_of_the_request_apply_per_step() {
    let up = Upstream::start().await.unwrap();
    let client = client(|c| c);
    let request = Request::get(up.url("/status/503"))
        .request_options(RequestOptions {
            retry: Some(RetryOptions {
                max_attempts: Some(1),
                ..RetryOptions::default()
            }),
            ..RequestOptions::default()
        })
        .build()
        .unwrap();
    let t = Task::new(request, "Callback");
    let mut progress = client.progress(&t, SystemTime::now());
    assert_eq!(
        done(client.step(&t, &mut progress, NOW).await)
            .unwrap()
            .status,
        503
    );
}
