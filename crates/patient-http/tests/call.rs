//! `CallPolicy`: retries, breaker, attempt timeout and deadline around calls
//! that are not HTTP, against a real line-protocol server on loopback and on
//! tokio's paused clock.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use patient_http::{
    breaker::{BreakerPolicy, BreakerState, CircuitBreaker},
    call::{CallError, CallPolicy},
    retry::{LinearBackoff, RetryBudget, RetryPolicy},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    time::Instant,
};

fn retry(attempts: u32, base_ms: u64) -> RetryPolicy {
    RetryPolicy::builder()
        .max_attempts(attempts)
        .backoff(
            LinearBackoff::new(
                Duration::from_millis(base_ms),
                Duration::from_millis(base_ms * 10),
            )
            .unwrap(),
        )
        .build()
        .unwrap()
}

/// A line server: answers `PONG <n>` to each `PING`, except that the first
/// `refuse` connections are closed before an answer.
async fn ping_server(refuse: u32) -> (std::net::SocketAddr, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                if n <= refuse {
                    return; // dropped: the client reads EOF
                }
                let (read, mut write) = socket.split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_ok() && line == "PING\n" {
                    let _ = write.write_all(format!("PONG {n}\n").as_bytes()).await;
                }
            });
        }
    });
    (addr, seen)
}

async fn ping(addr: std::net::SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream
        .write_all(b"PING\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    if line.is_empty() {
        return Err("connection closed".into());
    }
    Ok(line.trim_end().to_owned())
}

#[tokio::test]
async fn a_flaky_tcp_service_is_retried_until_it_answers() {
    let (addr, seen) = ping_server(2).await;
    let policy = CallPolicy::builder().retry(retry(3, 1)).build();
    let answer = policy.run(|_| ping(addr)).await;
    assert_eq!(answer, Ok("PONG 3".to_owned()));
    assert_eq!(seen.load(Ordering::SeqCst), 3);

    // Two attempts are not enough for a server refusing two connections.
    let (addr, seen) = ping_server(2).await;
    let policy = CallPolicy::builder().retry(retry(2, 1)).build();
    let error = policy.run(|_| ping(addr)).await.unwrap_err();
    // Closed before an answer: EOF or a reset, depending on timing.
    assert!(
        matches!(&error, CallError::Failed { attempts: 2, .. }),
        "{error:?}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn backoff_sleeps_between_attempts_on_tokio_time() {
    let started = Instant::now();
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let policy = CallPolicy::builder().retry(retry(4, 1000)).build();
    let log = Arc::clone(&times);
    let error = policy
        .run(move |_| {
            log.lock().unwrap().push(started.elapsed());
            async { Err::<(), _>("down") }
        })
        .await
        .unwrap_err();
    assert_eq!(error.attempts(), 4);
    assert_eq!(error.last_error(), Some(&"down"));
    let times = times.lock().unwrap().clone();
    assert_eq!(times.len(), 4);
    assert_eq!(times[0], Duration::ZERO);
    // Linear, jittered in [0, base × (retry + 1)]: 1 s, 2 s, 3 s at most.
    for (i, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        assert!(gap <= Duration::from_secs(i as u64 + 1), "gap {i}: {gap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_error_the_predicate_refuses_ends_the_run_at_once() {
    let calls = AtomicU32::new(0);
    let policy = CallPolicy::builder().retry(retry(5, 10)).build();
    let result: Result<(), _> = policy
        .run_if(
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err("not found") }
            },
            |e: &&str| *e == "busy",
        )
        .await;
    assert_eq!(
        result,
        Err(CallError::Failed {
            error: "not found",
            attempts: 1
        })
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Drops record that the attempt's future was cancelled.
struct DropFlag(Arc<AtomicU32>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_hanging_attempt_is_cancelled_at_its_timeout_and_retried() {
    let dropped = Arc::new(AtomicU32::new(0));
    let policy = CallPolicy::builder()
        .retry(retry(3, 1))
        .attempt_timeout(Duration::from_secs(2))
        .build();
    let started = Instant::now();
    let flag = Arc::clone(&dropped);
    let value = policy
        .run(move |attempt| {
            let guard = DropFlag(Arc::clone(&flag));
            async move {
                let _guard = guard;
                if attempt < 3 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, ()>(attempt)
            }
        })
        .await;
    assert_eq!(value, Ok(3));
    assert_eq!(dropped.load(Ordering::SeqCst), 3, "every attempt ended");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(4) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );

    // Every attempt hanging: the last timeout is the error.
    let error = policy
        .run(|_| std::future::pending::<Result<(), ()>>())
        .await
        .unwrap_err();
    assert_eq!(
        error,
        CallError::Timeout {
            attempts: 3,
            timeout: Duration::from_secs(2)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_attempts_and_backoffs() {
    let policy = CallPolicy::builder()
        .retry(retry(100, 1000))
        .deadline(Duration::from_secs(10))
        .build();
    let started = Instant::now();
    let calls = AtomicU32::new(0);
    let error = policy
        .run(|_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("busy") }
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            CallError::DeadlineExceeded {
                last: Some("busy"),
                ..
            }
        ),
        "{error:?}"
    );
    assert!(started.elapsed() <= Duration::from_secs(10));
    let made = calls.load(Ordering::SeqCst);
    assert!((2..100).contains(&made), "{made} attempts");

    // An attempt running into the deadline is cut there.
    let started = Instant::now();
    let error = policy
        .run(|_| std::future::pending::<Result<(), ()>>())
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert_eq!(
        error,
        CallError::DeadlineExceeded {
            attempts: 1,
            last: None
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_shared_breaker_opens_and_then_fails_fast_without_calling() {
    let breaker = Arc::new(CircuitBreaker::new(
        BreakerPolicy::builder()
            .consecutive_failures(Some(3))
            .break_duration(Duration::from_secs(30))
            .build()
            .unwrap(),
    ));
    let policy = CallPolicy::builder()
        .retry(retry(2, 1))
        .breaker(Arc::clone(&breaker))
        .build();
    let calls = AtomicU32::new(0);
    let failing = |_| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>("down") }
    };
    // Two attempts, then one more: the third failure opens the breaker.
    assert_eq!(policy.run(failing).await.unwrap_err().attempts(), 2);
    let error = policy.run(failing).await.unwrap_err();
    assert!(
        matches!(
            error,
            CallError::BreakerOpen {
                attempts: 1,
                last: Some("down"),
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // While open, nothing is called.
    let error = policy.run(failing).await.unwrap_err();
    assert!(
        matches!(
            error,
            CallError::BreakerOpen {
                attempts: 0,
                last: None,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Errors the predicate refuses do not count against the dependency.
    let breaker = Arc::new(CircuitBreaker::new(
        BreakerPolicy::builder()
            .consecutive_failures(Some(2))
            .build()
            .unwrap(),
    ));
    let policy = CallPolicy::builder()
        .retry(RetryPolicy::none())
        .breaker(Arc::clone(&breaker))
        .build();
    for _ in 0..5 {
        let _ = policy
            .run_if(|_| async { Err::<(), _>("bad input") }, |_| false)
            .await;
    }
    assert_eq!(breaker.state(), BreakerState::Closed);

    // After the break, a probe that succeeds closes it again.
    tokio::time::advance(Duration::from_secs(31)).await;
    let closed = CallPolicy::builder()
        .breaker(Arc::clone(&breaker))
        .build()
        .run(|_| async { Ok::<_, ()>(()) })
        .await;
    assert_eq!(closed, Ok(()));
}

#[tokio::test(start_paused = true)]
async fn a_spent_retry_budget_ends_the_run_with_its_last_error() {
    let budget = Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.0).unwrap());
    let policy = CallPolicy::builder()
        .retry(retry(5, 1))
        .budget(budget)
        .build();
    let calls = AtomicU32::new(0);
    let error = policy
        .run(|_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("down") }
        })
        .await
        .unwrap_err();
    assert_eq!(
        error,
        CallError::Failed {
            error: "down",
            attempts: 1
        }
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_run_inside_a_served_request_ends_at_that_requests_deadline() {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-request-timeout", http::HeaderValue::from_static("3"));
    let ctx = patient_http::propagation::RequestContext::from_headers(&headers);
    let policy = CallPolicy::builder()
        .retry(retry(100, 1))
        .deadline(Duration::from_secs(60))
        .build();
    let started = Instant::now();
    let error = patient_http::propagation::scope(
        ctx,
        policy.run(|_| std::future::pending::<Result<(), ()>>()),
    )
    .await
    .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert!(
        matches!(error, CallError::DeadlineExceeded { attempts: 1, .. }),
        "{error:?}"
    );

    // Outside, the policy's own deadline applies.
    let started = Instant::now();
    let _ = policy
        .run(|_| std::future::pending::<Result<(), ()>>())
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(60));
}
