//! Hedging: tail latency against an upstream where 5 % of requests take 1 s
//! and the rest 5 ms, without hedging and with hedged attempts (a fixed delay
//! and an adaptive one), and how many extra requests the hedges cost.
//!
//! ```text
//! cargo run --release -p patient-bench --bin hedging [-- --n 2000 --c 32]
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
    report::{push_ratio, ratio, Line},
    resilience::{
        outcome_list, push_count, run_variant, variant_of, variants_wanted, Sent, VariantRun,
        VARIANTS_FLAG, VARIANT_FLAG,
    },
    stats::Summary,
};
use patient_http::{
    retry::{RetryBudget, RetryPolicy},
    Config, HedgeDelay, Processor, Request, ResilienceConfig, Strategy,
};

const BENCH: &str = "hedging";
const TARGET_P99_RATIO: f64 = 5.0;
const TARGET_EXTRA_PCT: f64 = 10.0;
const TARGET: &str = "p99_ratio>=5,extra_requests_pct<=10";

/// Sequential, one attempt.
const UNHEDGED: &str = "unhedged";
/// One hedge after a fixed delay.
const FIXED: &str = "fixed";
/// One hedge after a percentile of the observed latency.
const ADAPTIVE: &str = "adaptive";
const VARIANTS: &[&str] = &[UNHEDGED, FIXED, ADAPTIVE];

const USAGE: &str = "usage: hedging [--n N] [--c C] [--slow-pct P] [--slow-ms MS] [--fast-ms MS]
               [--hedge-ms MS] [--percentile P] [--adaptive-min-ms MS] [--adaptive-max-ms MS]
               [--budget-ratio R] [--budget-min-per-s M] [--variants unhedged,fixed,adaptive]
               [--url BASE] [--timeout-s S]

Sends N GETs (default 2000) of BASE/bimodal?slow_pct=5&slow_ms=1000&fast_ms=5
with C outstanding at a time (default 32), each outcome's handler enqueueing
the next task, through three processors, each in a process of its own:
  unhedged  strategy sequential, RetryPolicy::none();
  fixed     strategy hedged, HedgeDelay::Fixed([MS]) (default 20 ms);
  adaptive  strategy hedged, HedgeDelay::Adaptive at percentile P (default
            95) of the upstream's recent latencies, clamped to [min, max]
            (default 5 ms, 100 ms), one hedge at most.
All three have RetryPolicy::none() (whose conditions decide which result is
acceptable) and a retry budget of ratio R (default 0.1) with a reserve of
M per second (default 1) over a 10 s window, which caps the hedges.
Upstream requests are counted by the processor (attempts_total) and, without
--url, by the upstream child too. Prints one key=value line per variant and
one comparison line per hedged variant; target: p99 >= 5x lower than
unhedged with <= 10 % extra upstream requests.
The whole program stops after --timeout-s seconds (default 120).";

const VALUE_FLAGS: &[&str] = &[
    "--n",
    "--c",
    "--slow-pct",
    "--slow-ms",
    "--fast-ms",
    "--hedge-ms",
    "--percentile",
    "--adaptive-min-ms",
    "--adaptive-max-ms",
    "--budget-ratio",
    "--budget-min-per-s",
    VARIANT_FLAG,
    VARIANTS_FLAG,
];

fn main() -> ExitCode {
    main_with(Program {
        bench: BENCH,
        usage: USAGE,
        value_flags: VALUE_FLAGS,
        parent,
        side,
    })
}

/// Every flag the sides need, as given (defaults are applied in the side).
fn passed_flags(args: &Args) -> Vec<(&'static str, String)> {
    VALUE_FLAGS
        .iter()
        .filter(|flag| **flag != VARIANT_FLAG && **flag != VARIANTS_FLAG)
        .filter_map(|flag| args.value(flag).map(|v| (*flag, v.to_owned())))
        .collect()
}

fn parent(harness: &mut Harness, args: &Args) -> Result<(), BoxError> {
    let n: u64 = args.get("--n", 2_000)?;
    let flags = passed_flags(args);
    let runs: Vec<VariantRun> = variants_wanted(args, VARIANTS)?
        .into_iter()
        .map(|variant| run_variant(harness, variant, &flags))
        .collect();
    let Some(unhedged) = runs.iter().find(|r| r.variant == UNHEDGED) else {
        return Ok(());
    };
    for hedged in runs.iter().filter(|r| r.variant != UNHEDGED) {
        let (u, h) = (&unhedged.record, &hedged.record);
        let p99_ratio = ratio(u.number("p99_ms"), h.number("p99_ms"));
        let p50_ratio = ratio(u.number("p50_ms"), h.number("p50_ms"));
        // Extra requests: the hedged side's attempts beyond one per task.
        let extra = h
            .number("attempts")
            .map(|attempts| (attempts - n as f64) / n as f64 * 100.0);
        let server_extra = hedged
            .server_requests
            .map(|sent| (sent as f64 - n as f64) / n as f64 * 100.0);
        let worst_extra = match (extra, server_extra) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let pass = u.is_complete()
            && h.is_complete()
            && p99_ratio.is_some_and(|r| r >= TARGET_P99_RATIO)
            && worst_extra.is_some_and(|e| e <= TARGET_EXTRA_PCT);
        let line = Line::new(BENCH).text("hedged", hedged.variant);
        let line = push_ratio(line, "p99_ratio", p99_ratio);
        let line = push_ratio(line, "p50_ratio", p50_ratio);
        let line = match extra {
            Some(e) => line.fixed("extra_requests_pct", e, 2),
            None => line.text("extra_requests_pct", "na"),
        };
        let line = push_count(line, "server_requests_unhedged", unhedged.server_requests);
        let line = push_count(line, "server_requests_hedged", hedged.server_requests);
        let line = match server_extra {
            Some(e) => line.fixed("server_extra_pct", e, 2),
            None => line.text("server_extra_pct", "na"),
        };
        harness.emit(line.text("target", TARGET).text("pass", pass));
    }
    Ok(())
}

/// The settings a side runs with.
struct Settings {
    hedge: Duration,
    percentile: f64,
    adaptive_min: Duration,
    adaptive_max: Duration,
    budget_ratio: f32,
    budget_min_per_s: u32,
}

impl Settings {
    fn from_args(args: &Args) -> Result<Settings, BoxError> {
        Ok(Settings {
            hedge: Duration::from_millis(args.get("--hedge-ms", 20)?),
            percentile: args.get("--percentile", 95.0)?,
            adaptive_min: Duration::from_millis(args.get("--adaptive-min-ms", 5)?),
            adaptive_max: Duration::from_millis(args.get("--adaptive-max-ms", 100)?),
            budget_ratio: args.get("--budget-ratio", 0.1)?,
            budget_min_per_s: args.get("--budget-min-per-s", 1)?,
        })
    }

    /// The resilience settings of `variant`.
    fn resilience(&self, variant: &str) -> Result<ResilienceConfig, BoxError> {
        let (strategy, hedge) = match variant {
            FIXED => (Strategy::Hedged, HedgeDelay::Fixed(vec![self.hedge])),
            ADAPTIVE => (
                Strategy::Hedged,
                HedgeDelay::Adaptive {
                    percentile: self.percentile,
                    min: self.adaptive_min,
                    max: self.adaptive_max,
                    max_hedges: 1,
                },
            ),
            _ => (Strategy::Sequential, HedgeDelay::default()),
        };
        let budget = RetryBudget::new(
            Duration::from_secs(10),
            self.budget_min_per_s,
            self.budget_ratio,
        )?;
        Ok(ResilienceConfig::builder()
            .defaults(|p| {
                p.retry(Some(RetryPolicy::none()))
                    .strategy(Some(strategy))
                    .hedge_delays(hedge)
            })
            .retry_budget(Some(Arc::new(budget)))
            .build()?)
    }

    /// How the variant hedges, for its line.
    fn describe(&self, variant: &str) -> String {
        match variant {
            FIXED => format!("fixed_{}ms", self.hedge.as_millis()),
            ADAPTIVE => format!(
                "p{}_{}-{}ms",
                self.percentile,
                self.adaptive_min.as_millis(),
                self.adaptive_max.as_millis()
            ),
            _ => "none".to_owned(),
        }
    }
}

fn side(ctx: &SideContext, args: &Args) -> Result<SideReport, BoxError> {
    let variant = variant_of(args, VARIANTS)?;
    let n: u64 = args.get("--n", 2_000)?;
    let c: usize = args.get("--c", 32)?;
    let slow_pct: f64 = args.get("--slow-pct", 5.0)?;
    let slow_ms: u64 = args.get("--slow-ms", 1000)?;
    let fast_ms: u64 = args.get("--fast-ms", 5)?;
    let settings = Settings::from_args(args)?;
    let url = format!(
        "{}/bimodal?slow_pct={slow_pct}&slow_ms={slow_ms}&fast_ms={fast_ms}",
        ctx.url
    );
    let line = ctx
        .line(BENCH)
        .text("variant", variant)
        .text("hedge", settings.describe(variant))
        .text("budget_ratio", settings.budget_ratio)
        .text("c", c)
        .text("n", n);

    let handler = BenchHandler::new(Request::get(&url).build()?, n, true);
    let completion = handler.completion();
    let _watchdog = Watchdog::arm(ctx.deadline, completion.clone(), line.clone());
    // Room for the hedges: two attempts per task at most.
    let config = Config::builder().max_connections(c * 2).build()?;
    let processor = Processor::builder()
        .config(config)
        .resilience(settings.resilience(variant)?)
        .build(handler.clone())?;
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
        .fixed("p999_ms", summary.p999 as f64 / 1e6, 3)
        .fixed("max_ms", summary.max as f64 / 1e6, 3)
        .peak_rss()
        .cpu()
        .text("errors", completion.errors())
        .text("other_outcomes", outcome_list(&handler.other_outcomes()));
    let mut line = sent.push(line);
    if !complete {
        line = line.text("done", completion.done()).text("timeout", true);
    }
    Ok(SideReport { line, complete })
}
