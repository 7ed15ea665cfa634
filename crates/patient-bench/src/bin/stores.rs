//! Payload store round trips: `store` then `fetch` (and a length check) of
//! JSON text of 1 KiB, 64 KiB and 1 MiB, one after another, against every
//! payload store: a directory, a SQLite file, PostgreSQL, Redis and S3.
//!
//! ```text
//! eval "$(scripts/services.sh start)"
//! cargo run --release -p patient-bench --bin stores [-- --sizes 1024,65536,1048576 --round-trips 500,200,50 --cell-s 10]
//! scripts/services.sh stop
//! ```
//!
//! The file and SQLite stores live in a fresh temporary directory, removed
//! at the end. PostgreSQL, Redis and S3 are measured only when
//! `PATIENT_TEST_POSTGRES_URL`, `PATIENT_TEST_REDIS_URL` and
//! `PATIENT_TEST_S3_ENDPOINT` are set (as `scripts/services.sh start`
//! prints them); otherwise their line says `skipped=true`.
//!
//! Prints one line per store and size: `round_trips` done, `round_trips_s`,
//! `mb_s` (payload bytes per second, each round trip counting the payload
//! once), `p50_ms` and `p99_ms` of one round trip (store + fetch),
//! `timed_s` (the sum of the round trips' times, which the rates divide by)
//! and `capped=true` when the time cap per cell ended it early. Every payload
//! gets a new key and is deleted after its round trip (not timed). Past the
//! program's deadline (`--timeout-s`) the remaining lines say `timeout=true`
//! and the program exits non-zero.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use patient_bench::{
    args::Args,
    harness::{BoxError, Completion, Watchdog},
    report::Line,
    stats::Summary,
};
use patient_store::{
    store::{FileStore, RedisStore, S3Config, S3Store, SqlStore},
    PayloadStore,
};

const BENCH: &str = "stores";
const MB: f64 = 1_000_000.0;
const DEFAULT_TIMEOUT_S: u64 = 240;
const ALL_STORES: &[&str] = &["file", "sqlite", "postgres", "redis", "s3"];

const USAGE: &str = "usage: stores [--stores file,sqlite,postgres,redis,s3] [--sizes BYTES,…]
              [--round-trips N,…] [--cell-s S] [--timeout-s S]

Stores then fetches payloads whose JSON text is BYTES long (default
1024,65536,1048576), one round trip after another, N times per size (default
500,200,50; one value applies to every size), each store and size stopping
after S seconds at most (default 10). PostgreSQL, Redis and S3 need
PATIENT_TEST_POSTGRES_URL, PATIENT_TEST_REDIS_URL and PATIENT_TEST_S3_ENDPOINT
(bucket patient-test, credentials test/test, path-style, as moto takes them);
without them their line says skipped=true. The whole program stops after
--timeout-s seconds (default 240).";

struct Settings {
    stores: Vec<String>,
    sizes: Vec<usize>,
    round_trips: Vec<u64>,
    cell: Duration,
    timeout: Duration,
}

fn main() -> ExitCode {
    let args = match Args::parse(
        std::env::args().skip(1),
        &["--stores", "--sizes", "--round-trips", "--cell-s"],
        &[],
    ) {
        Ok(args) => args,
        Err(error) => {
            eprintln!("{error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.has("--help") || args.has("-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let settings = match settings(&args) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("{error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    let deadline = Instant::now() + settings.timeout;
    let progress = Arc::new(Completion::new(u64::MAX));
    let _watchdog = Watchdog::arm(deadline, progress.clone(), Line::new(BENCH));

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            println!("{}", Line::new(BENCH).text("error", error));
            return ExitCode::from(3);
        }
    };
    let dir = temp_dir();
    let ok = runtime.block_on(run(&settings, &dir, deadline, &progress));
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn settings(args: &Args) -> Result<Settings, String> {
    let stores: Vec<String> = args
        .list(
            "--stores",
            &ALL_STORES.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .map_err(|e| e.to_string())?;
    if let Some(unknown) = stores.iter().find(|s| !ALL_STORES.contains(&s.as_str())) {
        return Err(format!("--stores: unknown store {unknown:?}"));
    }
    let sizes: Vec<usize> = args
        .list("--sizes", &[1024usize, 65_536, 1_048_576])
        .map_err(|e| e.to_string())?;
    if sizes.iter().any(|&s| s < MIN_SIZE) {
        return Err(format!("--sizes: each size must be at least {MIN_SIZE}"));
    }
    let round_trips: Vec<u64> = args
        .list("--round-trips", &[500u64, 200, 50])
        .map_err(|e| e.to_string())?;
    if round_trips.is_empty() || (round_trips.len() != 1 && round_trips.len() < sizes.len()) {
        return Err("--round-trips: one value, or one per size".to_owned());
    }
    let cell_s: f64 = args.get("--cell-s", 10.0).map_err(|e| e.to_string())?;
    let timeout_s: u64 = args
        .get("--timeout-s", DEFAULT_TIMEOUT_S)
        .map_err(|e| e.to_string())?;
    if !(cell_s.is_finite() && cell_s > 0.0) {
        return Err("--cell-s must be a positive number".to_owned());
    }
    Ok(Settings {
        stores,
        sizes,
        round_trips,
        cell: Duration::from_secs_f64(cell_s),
        timeout: Duration::from_secs(timeout_s.max(1)),
    })
}

/// A new directory under the system's temporary directory.
fn temp_dir() -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(
        "patient-bench-stores-{}-{nanos}",
        std::process::id()
    ))
}

/// A prefix for keys in shared servers, unique to this run.
fn run_prefix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("patient-bench-{}-{nanos}/", std::process::id())
}

async fn run(
    settings: &Settings,
    dir: &std::path::Path,
    deadline: Instant,
    progress: &Completion,
) -> bool {
    let mut all_ok = true;
    for name in &settings.stores {
        let store = match open(name, dir).await {
            Opened::Store(store) => store,
            Opened::Skipped(var) => {
                println!(
                    "{}",
                    Line::new(BENCH)
                        .text("store", name)
                        .text("skipped", true)
                        .text("reason", format!("{var}_unset"))
                );
                continue;
            }
            Opened::Failed(error) => {
                all_ok = false;
                println!(
                    "{}",
                    Line::new(BENCH).text("store", name).text("error", error)
                );
                continue;
            }
        };
        for (i, &size) in settings.sizes.iter().enumerate() {
            let n = settings
                .round_trips
                .get(i)
                .or(settings.round_trips.first())
                .copied()
                .unwrap_or(1);
            let cap = (Instant::now() + settings.cell).min(deadline);
            let mut cell = measure(&*store, size, n, cap, progress).await;
            cell.timeout = cell.capped && cap >= deadline;
            all_ok &= cell.error.is_none() && !cell.timeout;
            println!("{}", cell.line(name, size));
        }
    }
    all_ok
}

enum Opened {
    Store(Box<dyn PayloadStore>),
    /// The environment variable that is not set.
    Skipped(&'static str),
    Failed(String),
}

/// How long connecting to a server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

async fn open(name: &str, dir: &std::path::Path) -> Opened {
    let env = |var: &'static str| std::env::var(var).ok().filter(|v| !v.is_empty());
    let opened = async {
        let store: Box<dyn PayloadStore> = match name {
            "file" => Box::new(FileStore::new(dir.join("files"))?),
            "sqlite" => {
                std::fs::create_dir_all(dir)?;
                let url = format!("sqlite:{}", dir.join("payloads.db").display());
                let store = SqlStore::connect(&url, SqlStore::DEFAULT_TABLE).await?;
                store.migrate().await?;
                Box::new(store)
            }
            "postgres" => {
                let Some(url) = env("PATIENT_TEST_POSTGRES_URL") else {
                    return Ok(Opened::Skipped("PATIENT_TEST_POSTGRES_URL"));
                };
                let store = SqlStore::connect(&url, SqlStore::DEFAULT_TABLE).await?;
                store.migrate().await?;
                Box::new(store)
            }
            "redis" => {
                let Some(url) = env("PATIENT_TEST_REDIS_URL") else {
                    return Ok(Opened::Skipped("PATIENT_TEST_REDIS_URL"));
                };
                let store = RedisStore::connect(&url)
                    .await?
                    .key_prefix(run_prefix())
                    .ttl(Some(Duration::from_secs(3600)));
                Box::new(store)
            }
            "s3" => {
                let Some(endpoint) = env("PATIENT_TEST_S3_ENDPOINT") else {
                    return Ok(Opened::Skipped("PATIENT_TEST_S3_ENDPOINT"));
                };
                let store = S3Store::new(S3Config {
                    endpoint,
                    bucket: "patient-test".into(),
                    prefix: run_prefix(),
                    region: "us-east-1".into(),
                    access_key_id: "test".into(),
                    secret_access_key: "test".into(),
                    path_style: true,
                })?;
                store.create_bucket().await?;
                Box::new(store)
            }
            other => return Err(format!("unknown store {other:?}").into()),
        };
        Ok::<_, BoxError>(Opened::Store(store))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, opened).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(error)) => Opened::Failed(error.to_string()),
        Err(_) => Opened::Failed(format!("not ready after {CONNECT_TIMEOUT:?}")),
    }
}

/// The shortest payload [`payload`] can make.
const MIN_SIZE: usize = 16;

/// `{"body":"…"}` whose JSON text is exactly `size` bytes: letters, digits
/// and spaces that do not compress to nothing.
fn payload(size: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      ";
    let shell = r#"{"body":""}"#.len();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let body: String = (0..size.saturating_sub(shell))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(ALPHABET[(state % ALPHABET.len() as u64) as usize])
        })
        .collect();
    let json = serde_json::json!({ "body": body }).to_string();
    debug_assert_eq!(json.len(), size);
    json
}

struct Cell {
    latencies: Vec<u64>,
    bytes: usize,
    wall: Duration,
    capped: bool,
    /// Capped by the deadline of the whole program.
    timeout: bool,
    error: Option<String>,
}

impl Cell {
    fn line(&self, store: &str, size: usize) -> Line {
        let done = self.latencies.len();
        let secs = self.wall.as_secs_f64();
        let per_s = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
        let line = Line::new(BENCH)
            .text("store", store)
            .text("size", size_label(size))
            .text("round_trips", done)
            .fixed("round_trips_s", per_s(done as f64), 1)
            .fixed("mb_s", per_s((done * self.bytes) as f64 / MB), 2)
            .latency_ms(&Summary::from_nanos(self.latencies.clone()))
            .fixed("timed_s", secs, 3)
            .text("capped", self.capped);
        let line = if self.timeout {
            line.text("timeout", true)
        } else {
            line
        };
        match &self.error {
            Some(error) => line.text("error", error),
            None => line,
        }
    }
}

fn size_label(size: usize) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{}MiB", size >> 20)
    } else if size >= 1 << 10 && size.is_multiple_of(1 << 10) {
        format!("{}KiB", size >> 10)
    } else {
        format!("{size}B")
    }
}

/// Up to `n` round trips of a `size`-byte payload, stopping at `cap`; one
/// untimed round trip first.
async fn measure(
    store: &dyn PayloadStore,
    size: usize,
    n: u64,
    cap: Instant,
    progress: &Completion,
) -> Cell {
    let json = payload(size);
    let mut cell = Cell {
        latencies: Vec::with_capacity(n.min(100_000) as usize),
        bytes: json.len(),
        wall: Duration::ZERO,
        capped: false,
        timeout: false,
        error: None,
    };
    if Instant::now() >= cap {
        cell.capped = true;
        return cell;
    }
    if let Err(error) = round_trip(store, &json, cap).await {
        cell.error = Some(format!("warm-up: {error}"));
        return cell;
    }
    let mut timed = Duration::ZERO;
    for _ in 0..n {
        if Instant::now() >= cap {
            cell.capped = true;
            break;
        }
        match round_trip(store, &json, cap).await {
            Ok(took) => {
                timed += took;
                cell.latencies.push(took.as_nanos().max(1) as u64);
                progress.record(true);
            }
            Err(error) => {
                progress.record(false);
                cell.error = Some(error);
                break;
            }
        }
    }
    cell.wall = timed;
    cell
}

/// Stores `json` under a new key, fetches it and checks its length; returns
/// the time that took. The key is then deleted (not counted).
async fn round_trip(
    store: &dyn PayloadStore,
    json: &str,
    cap: Instant,
) -> Result<Duration, String> {
    let key = store.generate_key();
    // A round trip already under way may overrun the cap by this much.
    let limit = cap.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
    let timed = async {
        let start = Instant::now();
        store.store(&key, json).await.map_err(|e| e.to_string())?;
        let fetched = store.fetch(&key).await.map_err(|e| e.to_string())?;
        let took = start.elapsed();
        match fetched {
            Some(fetched) if fetched.len() == json.len() => Ok(took),
            Some(fetched) => Err(format!(
                "fetched {} bytes, stored {}",
                fetched.len(),
                json.len()
            )),
            None => Err("fetch found nothing".to_owned()),
        }
    };
    let took = match tokio::time::timeout(limit, timed).await {
        Ok(result) => result?,
        Err(_) => return Err(format!("round trip not done after {limit:?}")),
    };
    tokio::time::timeout(Duration::from_secs(5), store.delete(&key))
        .await
        .map_err(|_| "delete timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(took)
}
