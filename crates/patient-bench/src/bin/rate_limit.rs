//! Rate limit: twice the configured rate offered to an upstream with a
//! per-upstream rate limit; the rate the processor achieves, and how long the
//! backlog takes to drain once the offering stops.
//!
//! ```text
//! cargo run --release -p patient-bench --bin rate_limit [-- --limit 200 --burst 10 --rate 400 --seconds 10]
//! ```

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use patient_bench::{
    args::Args,
    harness::{main_with, BoxError, Harness, Program, SideContext, SideReport, Watchdog},
    patient_side::BenchHandler,
    report::Line,
    resilience::{outcome_list, pace, push_count, run_variant, variant_of, Sent, VARIANT_FLAG},
    stats::Summary,
};
use patient_http::{
    limit::LimitConfig, resilience::upstream_key, Config, Processor, Request, ResilienceConfig,
};

const BENCH: &str = "rate_limit";
const TARGET_TOLERANCE: f64 = 0.05;
const TARGET: &str = "|ratio-1|<=0.05,errors=0";

/// The upstream's policy carries the rate limit.
const LIMITED: &str = "limited";
const VARIANTS: &[&str] = &[LIMITED];

/// The start of the offering window left out of the steady part.
const WARM_UP: Duration = Duration::from_secs(1);

const USAGE: &str = "usage: rate_limit [--limit L] [--burst B] [--rate R] [--seconds S] [--url BASE] [--timeout-s S]

Configures a rate limit of L requests a second (default 200) with a burst of
B (default 10) on the upstream's own policy (LimitConfig::builder().rate(L,
B) for the key scheme://host:port), then offers R tasks a second (default
400) for S seconds (default 10), paced by a timer on an application thread
(open loop), each a GET of BASE/fast; max_connections is large enough for
every offered task to wait its turn. Runs in a child process; without --url
the upstream runs in another.
achieved_rps counts the outcomes from 1 s after the first enqueue to the end
of the offering window (the limiter is saturated all along); drain_s is how
long after the offering window the last outcome came. Target: achieved_rps
within 5 % of L, no errors. The whole program stops after --timeout-s
seconds (default 120).";

fn main() -> ExitCode {
    main_with(Program {
        bench: BENCH,
        usage: USAGE,
        value_flags: &["--limit", "--burst", "--rate", "--seconds", VARIANT_FLAG],
        parent,
        side,
    })
}

fn parent(harness: &mut Harness, args: &Args) -> Result<(), BoxError> {
    let limit: f64 = args.get("--limit", 200.0)?;
    let flags = [
        ("--limit", limit.to_string()),
        ("--burst", args.get::<u32>("--burst", 10)?.to_string()),
        ("--rate", args.get::<f64>("--rate", 400.0)?.to_string()),
        ("--seconds", args.get::<f64>("--seconds", 10.0)?.to_string()),
    ];
    let run = run_variant(harness, LIMITED, &flags);
    let record = &run.record;
    let achieved = record.number("achieved_rps");
    let ratio = achieved.map(|a| a / limit);
    let errors = record.number("errors");
    let pass = record.is_complete()
        && ratio.is_some_and(|r| (r - 1.0).abs() <= TARGET_TOLERANCE)
        && errors == Some(0.0);
    let line = Line::new(BENCH).text("limit_rps", limit);
    let line = match ratio {
        Some(r) => line.fixed("ratio", r, 3),
        None => line.text("ratio", "na"),
    };
    let line = line.text("errors", record.get("errors").unwrap_or("na"));
    let line = push_count(line, "server_requests", run.server_requests);
    harness.emit(line.text("target", TARGET).text("pass", pass));
    Ok(())
}

fn side(ctx: &SideContext, args: &Args) -> Result<SideReport, BoxError> {
    let variant = variant_of(args, VARIANTS)?;
    let limit: f64 = args.get("--limit", 200.0)?;
    let burst: u32 = args.get("--burst", 10)?;
    let rate: f64 = args.get("--rate", 400.0)?;
    let seconds: f64 = args.get("--seconds", 10.0)?;
    if !(rate > 0.0 && seconds > WARM_UP.as_secs_f64()) {
        return Err("--rate must be positive and --seconds above 1".into());
    }
    let planned = (rate * seconds).round() as u64;
    let url = format!("{}/fast", ctx.url);
    let request = Request::get(&url).build()?;
    let key = upstream_key(request.url());
    let line = ctx
        .line(BENCH)
        .text("variant", variant)
        .text("limit_rps", limit)
        .text("burst", burst)
        .text("rate", rate)
        .text("seconds", seconds);

    let limits = LimitConfig::builder().rate(limit, burst).build()?;
    let resilience = ResilienceConfig::builder()
        .upstream(key, |policy| policy.limits(limits))
        .build()?;
    let handler = BenchHandler::new(request, planned, false);
    let completion = handler.completion();
    let _watchdog = Watchdog::arm(ctx.deadline, completion.clone(), line.clone());
    // Every offered task may be waiting for its token at once.
    let config = Config::builder()
        .max_connections(planned as usize + 16)
        .build()?;
    let processor = Processor::builder()
        .config(config)
        .resilience(resilience)
        .build(handler.clone())?;
    processor.start()?;
    handler.attach(processor.clone());

    let start = Instant::now();
    let paced = pace(rate, Duration::from_secs_f64(seconds), ctx.deadline, || {
        handler.issue(1);
        true
    });
    let offering_end = start + paced.window;
    let complete = completion.wait(ctx.deadline);
    let wall = start.elapsed();
    handler.halt();
    let sent = Sent::from_metrics(processor.metrics());
    processor.stop(Some(Duration::from_secs(1)));

    // Outcome instants relative to the first enqueue.
    let base = start.saturating_duration_since(handler.origin()).as_nanos() as u64;
    let ends: Vec<u64> = handler
        .spans()
        .into_iter()
        .map(|(_, end)| end.saturating_sub(base))
        .collect();
    let steady_from = WARM_UP.as_nanos() as u64;
    let steady_to = paced.window.as_nanos() as u64;
    let in_steady = ends
        .iter()
        .filter(|&&end| (steady_from..steady_to).contains(&end))
        .count();
    let steady_s = (steady_to - steady_from) as f64 / 1e9;
    let last_end = ends.iter().copied().max().unwrap_or(0);
    let last_end_at = start + Duration::from_nanos(last_end);
    let drain = last_end_at.saturating_duration_since(offering_end);
    // Over the whole run: every outcome beyond the initial burst, up to the last.
    let overall = (ends.len() as f64 - f64::from(burst)).max(0.0) / (last_end as f64 / 1e9);

    let summary = Summary::from_nanos(handler.latencies());
    let line = line
        .text("offered", paced.offered)
        .fixed(
            "offered_rps",
            paced.offered as f64 / paced.window.as_secs_f64(),
            1,
        )
        .fixed("achieved_rps", in_steady as f64 / steady_s, 1)
        .fixed("ratio", in_steady as f64 / steady_s / limit, 3)
        .fixed("overall_rps", overall, 1)
        .fixed("drain_s", drain.as_secs_f64(), 3)
        .fixed("max_lag_ms", paced.max_lag.as_secs_f64() * 1e3, 1)
        .fixed("wall_s", wall.as_secs_f64(), 3)
        .latency_ms(&summary)
        .peak_rss()
        .cpu()
        .text("completed", completion.done() - completion.errors())
        .text("errors", completion.errors())
        .text("refused", handler.refusals())
        .text("other_outcomes", outcome_list(&handler.other_outcomes()));
    let mut line = sent.push(line);
    if !complete {
        line = line.text("done", completion.done()).text("timeout", true);
    }
    Ok(SideReport { line, complete })
}
