//! Benchmarks of patient's processor against a bare hyper-util client.
//!
//! The programs in `src/bin/` include:
//!
//! * `throughput` — enqueue → `on_complete` through the processor versus a
//!   bare hyper-util client loop, same upstream route and concurrency;
//! * `scale` — thousands of requests in flight at once against a slow route;
//! * `enqueue_latency` — how long `Processor::enqueue` takes on application
//!   threads while the processor is busy;
//! * `overhead` — every resilience layer enabled but not triggering versus
//!   the bare processor;
//! * `hedging` — tail latency against a bimodal upstream with and without
//!   hedged attempts, and the extra requests hedging costs;
//! * `outage` — the load an upstream that answers 503 to everything receives
//!   with and without the retry budget and circuit breaker;
//! * `rate_limit` — the rate a per-upstream rate limit lets through when
//!   twice as much is offered;
//! * `encryption` — payload encryption (envelope, Base64, JSON) versus the raw
//!   AES-256-GCM primitive of ring on the same bytes;
//! * `stores` — store then fetch round trips of 1 KiB, 64 KiB and 1 MiB
//!   payloads against each payload store (directory, SQLite, PostgreSQL,
//!   Redis, S3), one after another, in one process;
//! * `gateway` — the daemon's gateway against nginx as reverse proxies to
//!   the same upstream (wrk on `/fast` and 64 KiB bodies, the latency an
//!   event stream gains, 1,000 streams held at once), each server a process
//!   of its own ([`external`], [`wrk`]), with a bare hyper reverse proxy
//!   ([`bare_proxy`]) as the floor of the gateway's own stack.
//!
//! `overhead` to `rate_limit` share [`resilience`]: named variants of one
//! processor configuration, each in a child process of its own.
//!
//! Each of the first nine programs but `encryption` and `stores`
//! re-executes itself: once as the upstream server (`--upstream-child`, see
//! [`upstream`]), and once per measured side (`--side patient|hyper`, see
//! [`harness`]), so that the upstream's sockets and each side's peak RSS
//! are counted in a process of their own. Every child prints one `key=value` line ([`report`]); the
//! parent prints those lines and a ratio line.
//!
//! ```
//! use patient_bench::{report::Line, stats::Summary};
//!
//! let summary = Summary::from_nanos(vec![1_000_000, 2_000_000, 3_000_000]);
//! let line = Line::new("throughput")
//!     .text("side", "patient")
//!     .fixed("p50_ms", summary.p50_ms(), 3);
//! assert_eq!(line.to_string(), "bench=throughput side=patient p50_ms=2.000");
//! ```

pub mod args;
pub mod bare;
pub mod bare_proxy;
pub mod external;
pub mod harness;
pub mod patient_side;
pub mod report;
pub mod resilience;
pub mod rss;
pub mod stats;
pub mod upstream;
pub mod wrk;
