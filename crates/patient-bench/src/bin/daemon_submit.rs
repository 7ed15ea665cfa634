//! Daemon submits: how many tasks a second `POST /v1/tasks` and
//! `POST /v1/tasks/batch` accept durably (SQLite in WAL mode, fsync on each
//! group commit), and how long each accept takes.
//!
//! ```text
//! cargo run --release -p patient-bench --bin daemon_submit [-- --n 20000 --clients 32 --batches 100 --batch 500]
//! ```
//!
//! The daemon runs in this process on a temporary data directory. The tasks
//! are scheduled an hour ahead, so nothing runs them: the figures are the
//! submit path alone (parse, validate, one durable write, the answer).
//! Prints one line per mode; targets: single ≥ 3,000 tasks/s with p99 ≤ 25 ms,
//! batched ≥ 20,000 tasks/s.

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use patient_bench::{args::number_flag as flag, report::Line, stats::Summary};
use patient_daemon::{Flags, Settings};

const BENCH: &str = "daemon_submit";
const USAGE: &str =
    "usage: daemon_submit [--n N] [--clients C] [--batches B] [--batch S] [--timeout-s T]

C concurrent clients (default 32) submit N tasks (default 20000) one per
request, then B batches (default 100) of S tasks (default 500) go one at a
time. The whole program stops after T seconds (default 300).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let parsed = (|| -> Result<_, String> {
        Ok((
            flag(&args, "--n", 20_000)?,
            flag(&args, "--clients", 32)?.max(1),
            flag(&args, "--batches", 100)?,
            flag(&args, "--batch", 500)?.max(1),
            flag(&args, "--timeout-s", 300)?,
        ))
    })();
    let (n, clients, batches, batch, timeout_s) = match parsed {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{BENCH}: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{BENCH}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = runtime.block_on(async move {
        tokio::time::timeout(
            Duration::from_secs(timeout_s),
            bench(n, clients, batches, batch),
        )
        .await
        .map_err(|_| format!("stopped after {timeout_s} s"))?
    });
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{BENCH}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn task(i: u64) -> serde_json::Value {
    serde_json::json!({
        "request": {"http_method": "post", "url": "https://api.example.com/v1/chat",
                    "headers": {"content-type": "application/json"},
                    "body": {"encoding": "text", "value": format!("{{\"n\":{i}}}"), "charset": "UTF-8"},
                    "timeout": 60, "max_redirects": null},
        "callback": "Bench",
        "callback_args": {"i": i},
        "delay": 3600,
    })
}

async fn bench(n: u64, clients: u64, batches: u64, batch: u64) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("patient-bench-submit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let settings = Settings::load(
        None,
        Vec::new(),
        &Flags {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.clone()),
        },
    )
    .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(patient_daemon::run_until(settings, listener, async {
        let _ = stopped.await;
    }));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::try_from(clients).unwrap_or(64))
        .build_http();
    let client = Arc::new(client);
    let post = |path: &str, body: String| {
        hyper::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())
    };
    // Wait for the listener to answer.
    for _ in 0..100 {
        let ok = client
            .request(
                hyper::Request::get(format!("http://{addr}/readyz"))
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| e.to_string())?,
            )
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Single submits from concurrent clients.
    let per_client = n / clients;
    let started = Instant::now();
    let mut workers = Vec::new();
    for c in 0..clients {
        let client = Arc::clone(&client);
        let requests: Result<Vec<_>, String> = (0..per_client)
            .map(|i| post("/v1/tasks", task(c * per_client + i).to_string()))
            .collect();
        let requests = requests?;
        workers.push(tokio::spawn(async move {
            let mut nanos = Vec::with_capacity(requests.len());
            for request in requests {
                let t = Instant::now();
                let response = client.request(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                let body = response.into_body().collect().await.map(|b| b.to_bytes());
                if status != 201 {
                    let body = body
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    return Err(format!("submit answered {status}: {body}"));
                }
                nanos.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
            Ok::<_, String>(nanos)
        }));
    }
    let mut nanos = Vec::new();
    for worker in workers {
        nanos.extend(worker.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let count = nanos.len();
    let summary = Summary::from_nanos(nanos);
    let rate = count as f64 / elapsed;
    println!(
        "{}",
        Line::new(BENCH)
            .text("mode", "single")
            .text("clients", clients)
            .text("tasks", count)
            .round("tasks_per_s", rate)
            .latency_ms(&summary)
            .text(
                "target",
                if rate >= 3000.0 && summary.p99_ms() <= 25.0 {
                    "met"
                } else {
                    "missed"
                }
            )
    );

    // Batches, one at a time.
    let started = Instant::now();
    let mut nanos = Vec::new();
    for b in 0..batches {
        let items: Vec<_> = (0..batch).map(|i| task(b * batch + i)).collect();
        let body = serde_json::json!({ "tasks": items }).to_string();
        let t = Instant::now();
        let response = client
            .request(post("/v1/tasks/batch", body)?)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        if status != 201 {
            let body = body
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            return Err(format!("batch answered {status}: {body}"));
        }
        nanos.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tasks = batches * batch;
    let rate = tasks as f64 / elapsed;
    let summary = Summary::from_nanos(nanos);
    println!(
        "{}",
        Line::new(BENCH)
            .text("mode", "batch")
            .text("batch", batch)
            .text("tasks", tasks)
            .round("tasks_per_s", rate)
            .latency_ms(&summary)
            .text("target", if rate >= 20_000.0 { "met" } else { "missed" })
            .peak_rss()
    );
    let _ = stop.send(());
    let _ = daemon.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
