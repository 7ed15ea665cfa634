//! End to end through the daemon: tasks submitted over HTTP, run against
//! the upstream's `/fast`, each outcome delivered into a Redis list or to a
//! webhook receiver; against the library processor on the same upstream in
//! the same run.
//!
//! ```text
//! eval "$(scripts/services.sh start)"   # Redis, for the list mode
//! cargo run --release -p patient-bench --bin daemon_e2e [-- --n 20000 --c 256 --batch 500]
//! ```
//!
//! The upstream runs in a child process. The library side enqueues N
//! requests with C outstanding and counts `on_complete`. Each daemon side
//! starts `patient_daemon::run_until` in this process on a fresh SQLite data
//! directory, submits N tasks in batches of B from four clients at once and
//! stops the clock when the N-th outcome has arrived (`LLEN` of the list,
//! or the receiver's count). Prints one line per side and the ratio of each
//! daemon side's tasks/s to the library's; target: ≥ 0.3×.

use std::{
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use patient_bench::{
    args::number_flag as flag,
    patient_side::BenchHandler,
    report::Line,
    upstream::{run_upstream_child, UpstreamProcess, UPSTREAM_CHILD_FLAG},
};
use patient_daemon::{Flags, Settings};
use patient_http::{Config, Processor, Request};

const BENCH: &str = "daemon_e2e";
const TARGET_RATIO: f64 = 0.3;
const SUBMITTERS: u64 = 4;
const USAGE: &str = "usage: daemon_e2e [--n N] [--c C] [--batch B] [--timeout-s T] [--postgres URL]

N tasks (default 20000) to the upstream's /fast: through the library
processor with C outstanding (default 256), then through the daemon with
outcomes delivered to a Redis list (PATIENT_TEST_REDIS_URL; skipped without
it) and to a webhook receiver, submitted in batches of B (default 500).
Each side stops after T seconds (default 120). The daemon's queue is SQLite
in a fresh data directory, or with --postgres URL a fresh schema of that
PostgreSQL database (dropped afterwards).";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == UPSTREAM_CHILD_FLAG) {
        return run_upstream_child();
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let parsed = (|| -> Result<_, String> {
        Ok((
            flag(&args, "--n", 20_000)?.max(1),
            flag(&args, "--c", 256)?.max(1),
            flag(&args, "--batch", 500)?.max(1),
            flag(&args, "--timeout-s", 120)?,
        ))
    })();
    let (n, c, batch, timeout_s) = match parsed {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{BENCH}: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let postgres = args
        .iter()
        .position(|a| a == "--postgres")
        .and_then(|i| args.get(i + 1))
        .cloned();
    match bench(n, c, batch, Duration::from_secs(timeout_s), postgres) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("{BENCH}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(
    n: u64,
    c: u64,
    batch: u64,
    timeout: Duration,
    postgres: Option<String>,
) -> Result<bool, BoxError> {
    let exe = std::env::current_exe()?;
    let upstream = UpstreamProcess::spawn(&exe)?;
    let url = format!("{}/fast", upstream.base_url());

    // The library processor, closed loop with C outstanding.
    let library = {
        let handler = BenchHandler::new(Request::get(&url).build()?, n, true);
        let completion = handler.completion();
        let config = Config::builder()
            .max_connections(usize::try_from(c * 2)?)
            .build()?;
        let processor = Processor::builder().config(config).build(handler.clone())?;
        processor.start()?;
        handler.attach(processor.clone());
        let start = Instant::now();
        handler.issue(c);
        let complete = completion.wait(start + timeout);
        let wall = start.elapsed().as_secs_f64();
        handler.halt();
        processor.stop(Some(Duration::from_secs(1)));
        let rate = completion.done() as f64 / wall;
        println!(
            "{}",
            Line::new(BENCH)
                .text("side", "library")
                .text("n", n)
                .text("c", c)
                .round("tasks_per_s", rate)
                .fixed("wall_s", wall, 3)
                .text("errors", completion.errors())
                .text("complete", complete)
        );
        rate
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut pass = true;
    let redis_url = std::env::var("PATIENT_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let modes: [(&str, Option<String>); 2] = [("redis_list", redis_url), ("webhook", None)];
    for (mode, redis) in modes {
        if mode == "redis_list" && redis.is_none() {
            println!(
                "{}",
                Line::new(BENCH)
                    .text("side", "daemon")
                    .text("delivery", mode)
                    .text("skipped", "PATIENT_TEST_REDIS_URL is not set")
            );
            continue;
        }
        let run = runtime.block_on(async {
            tokio::time::timeout(
                timeout,
                daemon_side(&url, n, batch, redis.as_deref(), postgres.as_deref()),
            )
            .await
            .map_err(|_| format!("the daemon side did not finish in {timeout:?}"))?
        });
        let (rate, wall) = run?;
        let ratio = rate / library;
        pass &= ratio >= TARGET_RATIO;
        println!(
            "{}",
            Line::new(BENCH)
                .text("side", "daemon")
                .text("delivery", mode)
                .text(
                    "queue",
                    if postgres.is_some() {
                        "postgres"
                    } else {
                        "sqlite"
                    }
                )
                .text("n", n)
                .text("batch", batch)
                .round("tasks_per_s", rate)
                .fixed("wall_s", wall, 3)
                .fixed("ratio_to_library", ratio, 3)
                .text("target", format!("ratio>={TARGET_RATIO}"))
                .text("pass", ratio >= TARGET_RATIO)
                .peak_rss()
        );
    }
    drop(upstream);
    Ok(pass)
}

/// Submits `n` tasks to a fresh daemon and waits for `n` delivered
/// outcomes; (tasks/s, wall seconds).
async fn daemon_side(
    url: &str,
    n: u64,
    batch: u64,
    redis: Option<&str>,
    postgres: Option<&str>,
) -> Result<(f64, f64), BoxError> {
    let dir = std::env::temp_dir().join(format!(
        "patient-bench-e2e-{}-{}",
        std::process::id(),
        redis.is_some()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let received = Arc::new(AtomicU64::new(0));
    let list = format!("patient-bench-e2e-{}", std::process::id());
    let (deliver, redis_conn) = match redis {
        Some(redis_url) => {
            let client = redis::Client::open(redis_url)?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("DEL")
                .arg(&list)
                .query_async::<()>(&mut conn)
                .await?;
            (serde_json::json!({"redis": {"list": list}}), Some(conn))
        }
        None => {
            let hook = receiver(Arc::clone(&received)).await?;
            (serde_json::json!({"webhook": {"url": hook}}), None)
        }
    };
    let mut env = vec![
        ("PATIENT_EGRESS__ALLOW".to_owned(), "127.0.0.1".to_owned()),
        ("PATIENT_LOG".to_owned(), "error".to_owned()),
    ];
    if let Some(redis_url) = redis {
        env.push(("PATIENT_REDIS_URL".to_owned(), redis_url.to_owned()));
    }
    // A fresh schema for this side's queue, dropped at the end.
    let schema = match postgres {
        Some(base) => {
            let name = format!(
                "bench_e2e_{}_{}",
                std::process::id(),
                u8::from(redis.is_some())
            );
            let pool = sqlx::PgPool::connect(base).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
            )))
            .execute(&pool)
            .await?;
            let separator = if base.contains('?') { '&' } else { '?' };
            env.push((
                "PATIENT_DATABASE_URL".to_owned(),
                format!("{base}{separator}options[search_path]={name}"),
            ));
            Some((pool, name))
        }
        None => None,
    };
    let settings = Settings::load(
        None,
        env,
        &Flags {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.clone()),
        },
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(patient_daemon::run_until(settings, listener, async {
        let _ = stopped.await;
    }));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for _ in 0..250 {
        let ready = client
            .request(
                hyper::Request::get(format!("http://{addr}/readyz"))
                    .body(Full::new(Bytes::new()))?,
            )
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let batches = n.div_ceil(batch);
    let next = Arc::new(AtomicU64::new(0));
    let mut submitters = Vec::new();
    for _ in 0..SUBMITTERS {
        let (client, next, deliver, url) = (
            client.clone(),
            Arc::clone(&next),
            deliver.clone(),
            url.to_owned(),
        );
        submitters.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    return Ok::<_, BoxError>(());
                }
                let items: Vec<_> = (b * batch..((b + 1) * batch).min(n))
                    .map(|i| {
                        serde_json::json!({
                            "request": {"http_method": "get", "url": url},
                            "callback": "Bench",
                            "callback_args": {"i": i},
                            "deliver": deliver,
                        })
                    })
                    .collect();
                let body = serde_json::json!({ "tasks": items }).to_string();
                let response = client
                    .request(
                        hyper::Request::post(format!("http://{addr}/v1/tasks/batch"))
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))?,
                    )
                    .await?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                if status != 201 {
                    return Err(format!(
                        "batch answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    )
                    .into());
                }
            }
        }));
    }
    for submitter in submitters {
        submitter.await??;
    }
    let mut redis_conn = redis_conn;
    loop {
        let arrived = match &mut redis_conn {
            Some(conn) => {
                redis::cmd("LLEN")
                    .arg(&list)
                    .query_async::<u64>(conn)
                    .await?
            }
            None => received.load(Ordering::Relaxed),
        };
        if arrived >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    if let Some(conn) = &mut redis_conn {
        redis::cmd("DEL").arg(&list).query_async::<()>(conn).await?;
    }
    let _ = stop.send(());
    let _ = daemon.await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Some((pool, name)) = schema {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {name} CASCADE")))
            .execute(&pool)
            .await?;
    }
    Ok((n as f64 / wall, wall))
}

/// A webhook receiver on `127.0.0.1:0` that answers 204 and counts; its URL.
async fn receiver(count: Arc<AtomicU64>) -> Result<String, BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    let count = Arc::clone(&count);
                    async move {
                        let _ = BodyExt::collect(request.into_body()).await;
                        count.fetch_add(1, Ordering::Relaxed);
                        hyper::Response::builder()
                            .status(204)
                            .body(Full::new(Bytes::new()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(url)
}
