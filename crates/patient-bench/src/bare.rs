//! The peer: a bare hyper-util legacy client on a tokio runtime.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Uri;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::{runtime::Runtime, task::JoinSet};

use crate::harness::{BoxError, Completion};

/// The bare client: `Client::builder(TokioExecutor::new()).build_http()`.
pub type BareClient = Client<HttpConnector, Empty<Bytes>>;

/// A multi-thread runtime with `workers` worker threads.
pub fn runtime(workers: usize) -> std::io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

/// A client with hyper-util's defaults.
pub fn client() -> BareClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One GET of `uri` with its body read to the end; true on a 200.
pub async fn get(client: &BareClient, uri: &Uri) -> bool {
    let request = match hyper::Request::get(uri.clone()).body(Empty::new()) {
        Ok(request) => request,
        Err(_) => return false,
    };
    match client.request(request).await {
        Ok(response) => {
            let ok = response.status() == hyper::StatusCode::OK;
            ok && response.into_body().collect().await.is_ok()
        }
        Err(_) => false,
    }
}

/// What a set of bare requests measured.
#[derive(Debug, Clone)]
pub struct BareRun {
    /// From the first request sent to the last one finished (or the deadline).
    pub wall: Duration,
    /// Latency of every finished request, in nanoseconds.
    pub latencies: Vec<u64>,
    /// Whether every request finished before the deadline.
    pub complete: bool,
}

/// `c` tasks each sending GET `uri` one after another until `n` requests are
/// done in total (or `deadline` passed). Progress is counted in `progress`.
pub fn closed_loop(
    runtime: &Runtime,
    uri: Uri,
    c: usize,
    n: u64,
    progress: Arc<Completion>,
    deadline: Instant,
) -> Result<BareRun, BoxError> {
    let client = client();
    let issued = Arc::new(AtomicU64::new(0));
    Ok(runtime.block_on(async move {
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..c.max(1) {
            let (client, uri, issued, progress) = (
                client.clone(),
                uri.clone(),
                issued.clone(),
                progress.clone(),
            );
            tasks.spawn(async move {
                let mut latencies = Vec::with_capacity((n as usize / c.max(1)) + 1);
                while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < n {
                    let sent = Instant::now();
                    let ok = get(&client, &uri).await;
                    latencies.push(sent.elapsed().as_nanos() as u64);
                    progress.record(ok);
                }
                latencies
            });
        }
        let mut run = collect(tasks, start, deadline).await;
        // The loops also stop at the deadline: finished is not complete.
        run.complete &= progress.is_complete();
        run
    }))
}

/// `n` tasks spawned at once, each sending one GET of `uri`; each latency
/// runs from the task's spawn to the end of its response body.
pub fn all_at_once(
    runtime: &Runtime,
    uri: Uri,
    n: u64,
    progress: Arc<Completion>,
    deadline: Instant,
) -> Result<BareRun, BoxError> {
    let client = client();
    Ok(runtime.block_on(async move {
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..n {
            let (client, uri, progress) = (client.clone(), uri.clone(), progress.clone());
            // Timed from the spawn, as patient's tasks are from `enqueue`.
            let spawned = Instant::now();
            tasks.spawn(async move {
                let ok = get(&client, &uri).await;
                let latency = spawned.elapsed().as_nanos() as u64;
                progress.record(ok);
                vec![latency]
            });
        }
        collect(tasks, start, deadline).await
    }))
}

/// Joins every task (each returns its latencies) or stops at `deadline`.
async fn collect(mut tasks: JoinSet<Vec<u64>>, start: Instant, deadline: Instant) -> BareRun {
    let mut latencies = Vec::new();
    let deadline = tokio::time::Instant::from_std(deadline);
    let mut complete = true;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(mut batch))) => latencies.append(&mut batch),
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    let wall = start.elapsed();
    tasks.abort_all();
    BareRun {
        wall,
        latencies,
        complete,
    }
}
