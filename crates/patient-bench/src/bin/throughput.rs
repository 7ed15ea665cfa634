//! Throughput: enqueue → `on_complete` through patient's processor versus a
//! bare hyper-util client loop, same upstream route (`/fast`), same
//! concurrency.
//!
//! ```text
//! cargo run --release -p patient-bench --bin throughput [-- --n 50000 --c 64,256]
//! ```

use std::{
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use patient_bench::{
    args::Args,
    bare,
    harness::{
        main_with, BoxError, Completion, Harness, Program, Side, SideContext, SideReport, Watchdog,
        ROUNDS_FLAG,
    },
    patient_side::BenchHandler,
    report::{push_ratio, push_ratios, ratio, Line},
    stats::{median, Summary},
};
use patient_http::{Config, Processor, Request};

const BENCH: &str = "throughput";
const TARGET_RATIO: f64 = 0.9;
const TARGET: &str = "ratio_req_s>=0.9";

const USAGE: &str =
    "usage: throughput [--n N] [--c C1,C2] [--rounds R] [--url BASE] [--only patient|hyper] [--timeout-s S]

Sends N requests (default 50000) to BASE/fast with C outstanding at a time
(default 64,256: both are run), once through patient's processor and once
through a bare hyper-util client, each in a process of its own. Without
--url it starts its own upstream in a child process. Prints one key=value
line per run and a ratio line; target: patient req/s >= 0.9x bare hyper.
With --rounds R (default 1) each pair is measured R times, alternating
which side goes first, followed by the median ratio.
The whole program stops after --timeout-s seconds (default 120).";

fn main() -> ExitCode {
    main_with(Program {
        bench: BENCH,
        usage: USAGE,
        value_flags: &["--n", "--c"],
        parent,
        side,
    })
}

fn parent(harness: &mut Harness, args: &Args) -> Result<(), BoxError> {
    let n: u64 = args.get("--n", 50_000)?;
    let concurrencies: Vec<usize> = args.list("--c", &[64, 256])?;
    let rounds: u32 = args.get(ROUNDS_FLAG, 1)?;
    for c in concurrencies {
        let flags = [("--n", n.to_string()), ("--c", c.to_string())];
        let mut ratios = Vec::new();
        let mut all_pass = true;
        for round in 0..rounds {
            let (Some(patient), Some(hyper)) = harness.run_pair(round, &flags) else {
                continue;
            };
            let req_s = ratio(patient.number("req_s"), hyper.number("req_s"));
            let pass = patient.is_complete()
                && hyper.is_complete()
                && req_s.is_some_and(|r| r >= TARGET_RATIO);
            all_pass &= pass;
            ratios.extend(req_s);
            let mut line = Line::new(BENCH).text("c", c);
            if rounds > 1 {
                line = line.text("round", round + 1);
            }
            let line = push_ratio(line, "ratio_req_s", req_s);
            let line = push_ratios(
                line,
                &patient,
                &hyper,
                &[
                    ("ratio_wall", "wall_s"),
                    ("ratio_rss", "peak_rss_mb"),
                    ("ratio_cpu", "cpu_s"),
                ],
            );
            harness.emit(line.text("target", TARGET).text("pass", pass));
        }
        if rounds > 1 && !ratios.is_empty() {
            let median = median(ratios);
            let pass = all_pass || median.is_some_and(|r| r >= TARGET_RATIO);
            let line = Line::new(BENCH).text("c", c).text("rounds", rounds);
            let line = push_ratio(line, "median_ratio_req_s", median);
            harness.emit(line.text("target", TARGET).text("pass", pass));
        }
    }
    Ok(())
}

fn side(ctx: &SideContext, args: &Args) -> Result<SideReport, BoxError> {
    let n: u64 = args.get("--n", 50_000)?;
    let c: usize = args.get("--c", 64)?;
    let url = format!("{}/fast", ctx.url);
    let line = ctx.line(BENCH).text("c", c).text("n", n);
    let completion;
    let (wall, latencies, complete) = match ctx.side {
        Side::Patient => {
            let handler = BenchHandler::new(Request::get(&url).build()?, n, true);
            completion = handler.completion();
            let _watchdog = Watchdog::arm(ctx.deadline, completion.clone(), line.clone());
            let config = Config::builder().max_connections(c * 2).build()?;
            let processor = Processor::builder().config(config).build(handler.clone())?;
            processor.start()?;
            handler.attach(processor.clone());
            let start = Instant::now();
            handler.issue(c as u64);
            let complete = completion.wait(ctx.deadline);
            let wall = start.elapsed();
            handler.halt();
            processor.stop(Some(Duration::from_secs(1)));
            (wall, handler.latencies(), complete)
        }
        Side::Hyper => {
            completion = Arc::new(Completion::new(n));
            let _watchdog = Watchdog::arm(ctx.deadline, completion.clone(), line.clone());
            let runtime = bare::runtime(SideContext::workers())?;
            let run = bare::closed_loop(
                &runtime,
                url.parse()?,
                c,
                n,
                completion.clone(),
                ctx.deadline,
            )?;
            runtime.shutdown_background();
            (run.wall, run.latencies, run.complete)
        }
    };
    let summary = Summary::from_nanos(latencies);
    let wall_s = wall.as_secs_f64();
    let mut line = line
        .round("req_s", completion.done() as f64 / wall_s)
        .fixed("wall_s", wall_s, 3)
        .latency_ms(&summary)
        .peak_rss()
        .cpu()
        .text("errors", completion.errors());
    if !complete {
        line = line.text("done", completion.done()).text("timeout", true);
    }
    Ok(SideReport { line, complete })
}
