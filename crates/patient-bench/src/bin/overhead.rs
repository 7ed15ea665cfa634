//! Overhead: every resilience layer enabled but not triggering, versus the
//! bare processor, same upstream route (`/fast`), same concurrency, same
//! closed loop as `throughput`.
//!
//! ```text
//! cargo run --release -p patient-bench --bin overhead [-- --n 50000 --c 64 --rounds 3]
//! ```

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use patient_bench::{
    args::Args,
    harness::{main_with, BoxError, Harness, Program, SideContext, SideReport, Watchdog},
    patient_side::BenchHandler,
    report::{push_ratio, push_ratios, ratio, Line},
    resilience::{
        push_count, run_variant, variant_of, variants_wanted, Sent, VariantRun, VARIANTS_FLAG,
        VARIANT_FLAG,
    },
    stats::{median, Summary},
};
use patient_http::{
    breaker::BreakerPolicy,
    interceptor::{RequestIdInterceptor, ServiceNameInterceptor},
    limit::LimitConfig,
    retry::{RetryBudget, RetryPolicy},
    Config, Processor, Request, ResilienceConfig, Strategy, UpstreamPolicy,
};

const BENCH: &str = "overhead";
const TARGET_RATIO: f64 = 0.95;
const TARGET: &str = "ratio_req_s>=0.95";

/// The processor with `RetryPolicy::none()` and nothing else.
const BARE: &str = "bare";
/// Every layer on, none triggering.
const LAYERS: &str = "layers";
/// The variants run by default.
const DEFAULT_VARIANTS: &[&str] = &[BARE, LAYERS];
/// Every variant: the two above, and the bare processor plus one layer each,
/// to see what each layer costs.
const VARIANTS: &[&str] = &[
    BARE,
    LAYERS,
    "retry",
    "budget",
    "breaker",
    "rate",
    "concurrency",
    "deadline",
    "interceptors",
];

const USAGE: &str = "usage: overhead [--n N] [--c C] [--rounds R] [--variants bare,layers,…] [--url BASE] [--timeout-s S]

Sends N requests (default 50000) to BASE/fast with C outstanding at a time
(default 64), each outcome's handler enqueueing the next task, through two
processors, each in a process of its own:
  bare    ResilienceConfig with RetryPolicy::none(), no breaker, no limits,
          no interceptors;
  layers  the default retry policy and a retry budget, a circuit breaker
          with generous thresholds, a rate limit of 1,000,000/s and a
          concurrency limit of 2*C on the upstream, RequestIdInterceptor and
          ServiceNameInterceptor, a 30 s deadline (propagated upstream).
Metrics are recorded on both (the processor always records them).
--variants also accepts retry, budget, breaker, rate, concurrency,
deadline and interceptors: the bare processor plus that one layer, each
compared with bare on a line of its own.
Without --url it starts its own upstream in a child process. Prints one
key=value line per run and a ratio line (layers / bare); target: req/s
ratio >= 0.95. With --rounds R (default 1) the pair is measured R times,
alternating which goes first, followed by the median ratio.
The whole program stops after --timeout-s seconds (default 120).";

fn main() -> ExitCode {
    main_with(Program {
        bench: BENCH,
        usage: USAGE,
        value_flags: &["--n", "--c", VARIANT_FLAG, VARIANTS_FLAG],
        parent,
        side,
    })
}

fn parent(harness: &mut Harness, args: &Args) -> Result<(), BoxError> {
    let n: u64 = args.get("--n", 50_000)?;
    let c: usize = args.get("--c", 64)?;
    let rounds: u32 = args.get("--rounds", 1)?;
    let wanted = match args.value(VARIANTS_FLAG) {
        Some(_) => variants_wanted(args, VARIANTS)?,
        None => DEFAULT_VARIANTS.to_vec(),
    };
    let flags = [("--n", n.to_string()), ("--c", c.to_string())];
    let mut ratios: Vec<(&str, f64)> = Vec::new();
    let mut all_pass = true;
    for round in 0..rounds {
        let mut order = wanted.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        let runs: Vec<VariantRun> = order
            .iter()
            .map(|variant| run_variant(harness, variant, &flags))
            .collect();
        let Some(bare) = runs.iter().find(|r| r.variant == BARE) else {
            continue;
        };
        for other in runs.iter().filter(|r| r.variant != BARE) {
            let (b, l) = (&bare.record, &other.record);
            let req_s = ratio(l.number("req_s"), b.number("req_s"));
            let complete = b.is_complete() && l.is_complete();
            let mut line = Line::new(BENCH).text("variant", other.variant).text("c", c);
            if rounds > 1 {
                line = line.text("round", round + 1);
            }
            let line = push_ratio(line, "ratio_req_s", req_s);
            let line = push_ratios(
                line,
                l,
                b,
                &[
                    ("ratio_cpu", "cpu_s"),
                    ("ratio_p50", "p50_ms"),
                    ("ratio_p99", "p99_ms"),
                ],
            );
            let line = push_count(line, "server_requests_bare", bare.server_requests);
            let line = push_count(line, "server_requests", other.server_requests);
            if let Some(r) = req_s {
                ratios.push((other.variant, r));
            }
            if other.variant == LAYERS {
                let pass = complete && req_s.is_some_and(|r| r >= TARGET_RATIO);
                all_pass &= pass;
                harness.emit(line.text("target", TARGET).text("pass", pass));
            } else {
                if !complete {
                    harness.fail();
                }
                harness.emit(line);
            }
        }
    }
    if rounds > 1 {
        for variant in wanted.iter().filter(|v| **v != BARE) {
            let of_variant: Vec<f64> = ratios
                .iter()
                .filter(|(v, _)| v == variant)
                .map(|(_, r)| *r)
                .collect();
            if of_variant.is_empty() {
                continue;
            }
            let median = median(of_variant);
            let line = Line::new(BENCH)
                .text("variant", variant)
                .text("c", c)
                .text("rounds", rounds);
            let line = push_ratio(line, "median_ratio_req_s", median);
            if *variant == LAYERS {
                let pass = all_pass || median.is_some_and(|r| r >= TARGET_RATIO);
                harness.emit(line.text("target", TARGET).text("pass", pass));
            } else {
                harness.emit(line);
            }
        }
    }
    Ok(())
}

/// Whether `variant` has `layer`: `layers` has them all, `bare` none, any
/// other variant its own.
fn has(variant: &str, layer: &str) -> bool {
    variant == LAYERS || variant == layer
}

/// The resilience settings of `variant` at concurrency `c`.
fn resilience(variant: &str, c: usize) -> Result<ResilienceConfig, BoxError> {
    let mut policy = UpstreamPolicy::builder().retry(Some(RetryPolicy::none()));
    if has(variant, "retry") {
        policy = policy
            .retry(Some(RetryPolicy::default()))
            .strategy(Some(Strategy::Sequential));
    }
    if has(variant, "breaker") {
        policy = policy.breaker(Some(
            BreakerPolicy::builder()
                .failure_ratio(0.9)
                .minimum_throughput(1_000)
                .consecutive_failures(Some(1_000))
                .build()?,
        ));
    }
    let mut limits = LimitConfig::builder();
    if has(variant, "rate") {
        limits = limits.rate(1_000_000.0, 100_000);
    }
    if has(variant, "concurrency") {
        limits = limits.max_in_flight(c * 2);
    }
    policy = policy.limits(limits.build()?);
    if has(variant, "deadline") {
        policy = policy.deadline(Some(Duration::from_secs(30)));
    }
    let retry_budget = has(variant, "budget").then(|| Arc::new(RetryBudget::default()));
    Ok(ResilienceConfig::builder()
        .defaults(|_| policy)
        .retry_budget(retry_budget)
        .build()?)
}

fn side(ctx: &SideContext, args: &Args) -> Result<SideReport, BoxError> {
    let variant = variant_of(args, VARIANTS)?;
    let n: u64 = args.get("--n", 50_000)?;
    let c: usize = args.get("--c", 64)?;
    let url = format!("{}/fast", ctx.url);
    let line = ctx
        .line(BENCH)
        .text("variant", variant)
        .text("c", c)
        .text("n", n);

    let handler = BenchHandler::new(Request::get(&url).build()?, n, true);
    let completion = handler.completion();
    let _watchdog = Watchdog::arm(ctx.deadline, completion.clone(), line.clone());
    let config = Config::builder().max_connections(c * 2).build()?;
    let mut builder = Processor::builder()
        .config(config)
        .resilience(resilience(variant, c)?);
    if has(variant, "interceptors") {
        builder = builder
            .interceptor(RequestIdInterceptor::new())
            .interceptor(ServiceNameInterceptor::try_new("patient-bench")?);
    }
    let processor = builder.build(handler.clone())?;
    processor.start()?;
    handler.attach(processor.clone());

    let start = Instant::now();
    handler.issue(c as u64);
    let complete = completion.wait(ctx.deadline);
    let wall = start.elapsed();
    handler.halt();
    let sent = Sent::from_metrics(processor.metrics());
    processor.stop(Some(Duration::from_secs(1)));

    let summary = Summary::from_nanos(handler.latencies());
    let wall_s = wall.as_secs_f64();
    let line = line
        .round("req_s", completion.done() as f64 / wall_s)
        .fixed("wall_s", wall_s, 3)
        .latency_ms(&summary)
        .peak_rss()
        .cpu()
        .text("errors", completion.errors());
    let mut line = sent.push(line);
    if !complete {
        line = line.text("done", completion.done()).text("timeout", true);
    }
    Ok(SideReport { line, complete })
}
