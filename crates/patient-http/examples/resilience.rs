//! The resilience pipeline, one feature at a time, against the local test
//! upstream. Every snippet of the README's "Resilience" section comes from
//! here, so it compiles.
//!
//! ```text
//! cargo run -p patient-http --example resilience
//! ```

use std::{sync::Arc, time::Duration};

use patient_http::{
    breaker::BreakerPolicy,
    interceptor::{RequestIdInterceptor, ServiceNameInterceptor},
    limit::LimitConfig,
    retry::{RetryBudget, RetryPolicy},
    AwaitableClient, Config, Fallback, HedgeDelay, Priority, Request, ResilienceConfig, Strategy,
};
use patient_testkit::Upstream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let upstream = Upstream::start().await?;
    let key = format!("http://{}", upstream.addr()); // scheme://host:port

    // Retry: 4 attempts, exponential backoff with full jitter, Retry-After honoured.
    let retry = RetryPolicy::builder()
        .max_attempts(4)
        .base_delay(Duration::from_millis(50))
        .max_delay(Duration::from_secs(2))
        .statuses([429, 500, 502, 503, 504])
        .build()?;
    // Circuit breaker: open after 5 consecutive failures (or 50 % over 30 s),
    // probe after 10 s.
    let breaker = BreakerPolicy::builder()
        .consecutive_failures(Some(5))
        .break_duration(Duration::from_secs(10))
        .build()?;
    // Rate and concurrency limits: over them a request waits its turn.
    let limits = LimitConfig::builder()
        .rate(50.0, 10)
        .max_in_flight(8)
        .build()?;
    // Hedging delay that follows the observed p95 latency of the upstream.
    let hedge = HedgeDelay::Adaptive {
        percentile: 95.0,
        min: Duration::from_millis(10),
        max: Duration::from_millis(500),
        max_hedges: 1,
    };
    // A fixed answer when the breaker is open or attempts ran out.
    let fallback = Fallback::Response {
        status: 503,
        headers: vec![("content-type".into(), "application/json".into())],
        body: r#"{"error":"upstream unavailable"}"#.into(),
    };

    // Defaults for every upstream, then one upstream's own policy (a copy of
    // the defaults, edited). `build` checks every setting.
    let resilience = ResilienceConfig::builder()
        // Retries and hedges stay under 20 % of first attempts (plus 10/s).
        .retry_budget(Some(Arc::new(RetryBudget::new(
            Duration::from_secs(10),
            10,
            0.2,
        )?)))
        .defaults(|policy| policy.deadline(Some(Duration::from_secs(30))))
        .upstream(key.clone(), |policy| {
            policy
                .retry(Some(retry))
                .breaker(Some(breaker))
                .limits(limits)
                .hedge_delays(hedge)
                .fallback(Some(fallback))
        })
        .build()?;

    // An invalid setting is an error naming it (and its upstream).
    let zero = ResilienceConfig::builder()
        .upstream(&key, |p| p.min_attempt_time(Duration::ZERO))
        .build();
    match zero {
        Err(invalid) => println!("rejected: {invalid}"),
        Ok(_) => return Err("a zero min_attempt_time must be rejected".into()),
    }

    let client = AwaitableClient::builder()
        .config(
            Config::builder()
                .client_with(|c| c.stall_timeout(Some(Duration::from_secs(30))))
                .build()?,
        )
        .resilience(resilience)
        .interceptor(RequestIdInterceptor::new())
        .interceptor(ServiceNameInterceptor::new("billing"))
        .build_awaitable()?;

    // A 503 storm: retried until it succeeds; the attempts are recorded.
    let storm = client
        .send(Request::get(upstream.url("/sequence?key=demo&steps=503,503,200")).build()?)
        .await?;
    println!(
        "storm: {} after {} attempts",
        storm.status,
        storm.attempts.len()
    );

    // Per request: a deadline over queue wait and every attempt, sent upstream
    // as X-Request-Timeout with X-Request-Priority; a hedged strategy.
    let hedged = client
        .send(
            Request::get(upstream.url("/bimodal?slow_pct=50&slow_ms=1000&fast_ms=5"))
                .deadline(Duration::from_secs(5))
                .priority(Priority::High)
                .strategy(Strategy::Hedged)
                .build()?,
        )
        .await?;
    println!("hedged: {} in {:?}", hedged.status, hedged.duration);

    // A POST is retried only with an idempotency key (or retry_unsafe).
    let post = client
        .send(
            Request::post(upstream.url("/sequence?key=pay&steps=503,200"))
                .json(&serde_json::json!({"amount": 10}))
                .idempotency_key("payment-17")
                .build()?,
        )
        .await?;
    println!("post: {}", post.status);

    // Prometheus metrics.
    let text = client.metrics().render();
    println!(
        "{}",
        text.lines()
            .filter(|l| l.starts_with("attempts_total") || l.starts_with("retries_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
