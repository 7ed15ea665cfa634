//! Outage: an upstream that answers 503 to everything, at a steady offered
//! load, with and without the retry budget and the circuit breaker; how many
//! requests the upstream receives for each task offered.
//!
//! ```text
//! cargo run --release -p patient-bench --bin outage [-- --rate 200 --seconds 10]
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
    report::Line,
    resilience::{
        outcome_list, pace, push_count, run_variant, variant_of, variants_wanted, BreakerCounter,
        Sent, VariantRun, VARIANTS_FLAG, VARIANT_FLAG,
    },
    stats::Summary,
};
use patient_http::{
    breaker::BreakerPolicy,
    retry::{RetryBudget, RetryPolicy},
    Config, Processor, Request, ResilienceConfig, Strategy,
};

const BENCH: &str = "outage";
const TARGET_RATIO: f64 = 1.2;
const TARGET: &str = "ratio<=1.2";

/// Default retries, a retry budget and a circuit breaker.
const PROTECTED: &str = "protected";
/// Default retries only.
const UNPROTECTED: &str = "unprotected";
/// Default retries and the retry budget, no breaker.
const BUDGET_ONLY: &str = "budget_only";
const VARIANTS: &[&str] = &[PROTECTED, UNPROTECTED, BUDGET_ONLY];

const USAGE: &str = "usage: outage [--rate R] [--seconds S] [--variants protected,unprotected,budget_only] [--url BASE] [--timeout-s S]

Offers R tasks a second (default 200) for S seconds (default 10), paced by
a timer on an application thread (open loop), each a GET of BASE/status/503,
to three processors, each in a process of its own:
  protected    the default retry policy (3 attempts, 503 retried, backoff
               100 ms doubling, full jitter), a retry budget (ratio 0.2,
               10 per second, 10 s window) and a circuit breaker (failure
               ratio 0.5 over 10 s once 20 calls were seen, or 5 failures in
               a row; open for 2 s; closes after 2 probe successes);
  unprotected  the default retry policy alone;
  budget_only  the default retry policy and the retry budget, no breaker.
Requests sent upstream are counted by the processor (attempts_total: tasks
failed fast by an open breaker send nothing) and, without --url, by the
upstream child too. ratio = upstream requests / tasks offered, the same as
upstream rate / offered rate over the offering window. Target (protected):
ratio <= 1.2. The whole program stops after --timeout-s seconds (default 120).";

fn main() -> ExitCode {
    main_with(Program {
        bench: BENCH,
        usage: USAGE,
        value_flags: &["--rate", "--seconds", VARIANT_FLAG, VARIANTS_FLAG],
        parent,
        side,
    })
}

fn parent(harness: &mut Harness, args: &Args) -> Result<(), BoxError> {
    let rate: f64 = args.get("--rate", 200.0)?;
    let seconds: f64 = args.get("--seconds", 10.0)?;
    let flags = [
        ("--rate", rate.to_string()),
        ("--seconds", seconds.to_string()),
    ];
    let runs: Vec<VariantRun> = variants_wanted(args, VARIANTS)?
        .into_iter()
        .map(|variant| run_variant(harness, variant, &flags))
        .collect();
    for run in &runs {
        let record = &run.record;
        let offered = record.number("offered");
        let client_ratio = record.number("ratio");
        let server_ratio = run
            .server_requests
            .zip(offered)
            .filter(|(_, offered)| *offered > 0.0)
            .map(|(sent, offered)| sent as f64 / offered);
        let worst = match (client_ratio, server_ratio) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let line = Line::new(BENCH).text("variant", run.variant);
        let line = match client_ratio {
            Some(r) => line.fixed("ratio", r, 3),
            None => line.text("ratio", "na"),
        };
        let line = push_count(line, "server_requests", run.server_requests);
        let line = match server_ratio {
            Some(r) => line.fixed("server_ratio", r, 3),
            None => line.text("server_ratio", "na"),
        };
        let line = if run.variant == PROTECTED {
            let pass = record.is_complete() && worst.is_some_and(|r| r <= TARGET_RATIO);
            line.text("target", TARGET).text("pass", pass)
        } else {
            line.text("target", "none_(comparison)")
        };
        harness.emit(line);
    }
    Ok(())
}

/// The resilience settings of `variant`.
fn resilience(variant: &str) -> Result<ResilienceConfig, BoxError> {
    let config = ResilienceConfig::builder().defaults(|p| {
        p.retry(Some(RetryPolicy::default()))
            .strategy(Some(Strategy::Sequential))
    });
    if variant == UNPROTECTED {
        return Ok(config.build()?);
    }
    let config = config.retry_budget(Some(Arc::new(RetryBudget::new(
        Duration::from_secs(10),
        10,
        0.2,
    )?)));
    if variant == BUDGET_ONLY {
        return Ok(config.build()?);
    }
    let breaker = BreakerPolicy::builder()
        .failure_ratio(0.5)
        .sampling_window(Duration::from_secs(10))
        .minimum_throughput(20)
        .break_duration(Duration::from_secs(2))
        .build()?;
    Ok(config.defaults(|p| p.breaker(Some(breaker))).build()?)
}

fn side(ctx: &SideContext, args: &Args) -> Result<SideReport, BoxError> {
    let variant = variant_of(args, VARIANTS)?;
    let rate: f64 = args.get("--rate", 200.0)?;
    let seconds: f64 = args.get("--seconds", 10.0)?;
    if !(rate > 0.0 && seconds > 0.0) {
        return Err("--rate and --seconds must be positive".into());
    }
    let planned = (rate * seconds).round() as u64;
    let url = format!("{}/status/503", ctx.url);
    let line = ctx
        .line(BENCH)
        .text("variant", variant)
        .text("rate", rate)
        .text("seconds", seconds);

    let handler = BenchHandler::new(Request::get(&url).build()?, planned, false);
    let completion = handler.completion();
    let _watchdog = Watchdog::arm(ctx.deadline, completion.clone(), line.clone());
    let breaker = BreakerCounter::new();
    // Never refuse a task: every offered task may be in flight at once.
    let config = Config::builder()
        .max_connections(planned as usize + 16)
        .build()?;
    let processor = Processor::builder()
        .config(config)
        .resilience(resilience(variant)?)
        .observer_arc(breaker.clone())
        .build(handler.clone())?;
    processor.start()?;
    handler.attach(processor.clone());

    let start = Instant::now();
    let paced = pace(rate, Duration::from_secs_f64(seconds), ctx.deadline, || {
        handler.issue(1);
        true
    });
    let complete = completion.wait(ctx.deadline);
    let wall = start.elapsed();
    handler.halt();
    let sent = Sent::from_metrics(processor.metrics());
    processor.stop(Some(Duration::from_secs(1)));

    let window_s = paced.window.as_secs_f64();
    let offered = paced.offered;
    let summary = Summary::from_nanos(handler.latencies());
    let line = line
        .text("offered", offered)
        .fixed("offered_rps", offered as f64 / window_s, 1)
        .text("upstream_requests", sent.attempts)
        .fixed("upstream_rps", sent.attempts as f64 / window_s, 1)
        .fixed("ratio", sent.attempts as f64 / (offered.max(1) as f64), 3)
        .fixed("max_lag_ms", paced.max_lag.as_secs_f64() * 1e3, 1)
        .fixed("wall_s", wall.as_secs_f64(), 3)
        .latency_ms(&summary)
        .peak_rss()
        .cpu()
        .text("ok", completion.done() - completion.errors())
        .text("errors", completion.errors())
        .text("outcomes", outcome_list(&handler.other_outcomes()));
    let line = breaker.push(sent.push(line));
    let mut line = line;
    if !complete {
        line = line.text("done", completion.done()).text("timeout", true);
    }
    Ok(SideReport { line, complete })
}
