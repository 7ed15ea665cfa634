//! Scale: N requests in flight at once against a slow route, through
//! patient's processor versus a bare hyper-util client.
//!
//! ```text
//! ulimit -n 20000
//! cargo run --release -p patient-bench --bin scale [-- --n 10000 --delay-ms 1000]
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
    report::{push_ratio, ratio, Line},
    rss::warn_if_fewer_files_than,
    stats::Summary,
};
use patient_http::{Config, Processor, Request};

const BENCH: &str = "scale";
const TARGET_WALL: f64 = 1.1;
const TARGET_RSS: f64 = 1.0;

const USAGE: &str =
    "usage: scale [--n N] [--delay-ms MS] [--rounds R] [--url BASE] [--only patient|hyper] [--timeout-s S]

Starts N requests (default 10000) at once against BASE/delay?ms=MS (default
1000), once through patient's processor (all enqueued from one thread) and
once through a bare hyper-util client (N tasks spawned at once), each in a
process of its own. Without --url it starts its own upstream in a child
process. Each process needs about N+100 open files: run under
`ulimit -n 20000`. Prints one key=value line per side and a ratio line;
target: wall time <= 1.1x and peak RSS <= 1.0x bare hyper's. --rounds R
(default 1) repeats the pair, alternating which side goes first. The whole
program stops after --timeout-s seconds (default 120).";

fn main() -> ExitCode {
    main_with(Program {
        bench: BENCH,
        usage: USAGE,
        value_flags: &["--n", "--delay-ms"],
        parent,
        side,
    })
}

fn parent(harness: &mut Harness, args: &Args) -> Result<(), BoxError> {
    let n: u64 = args.get("--n", 10_000)?;
    let delay_ms: u64 = args.get("--delay-ms", 1000)?;
    let rounds: u32 = args.get(ROUNDS_FLAG, 1)?;
    let flags = [("--n", n.to_string()), ("--delay-ms", delay_ms.to_string())];
    for round in 0..rounds {
        let (Some(patient), Some(hyper)) = harness.run_pair(round, &flags) else {
            continue;
        };
        let wall = ratio(patient.number("wall_s"), hyper.number("wall_s"));
        let rss = ratio(patient.number("peak_rss_mb"), hyper.number("peak_rss_mb"));
        let pass = patient.is_complete()
            && hyper.is_complete()
            && wall.is_some_and(|r| r <= TARGET_WALL)
            && rss.is_some_and(|r| r <= TARGET_RSS);
        let mut line = Line::new(BENCH).text("n", n);
        if rounds > 1 {
            line = line.text("round", round + 1);
        }
        let line = push_ratio(
            line,
            "ratio_req_s",
            ratio(patient.number("req_s"), hyper.number("req_s")),
        );
        let line = push_ratio(line, "ratio_wall", wall);
        let line = push_ratio(line, "ratio_rss", rss);
        let line = push_ratio(
            line,
            "ratio_cpu",
            ratio(patient.number("cpu_s"), hyper.number("cpu_s")),
        );
        harness.emit(
            line.text(
                "target",
                format!("ratio_wall<={TARGET_WALL},ratio_rss<={TARGET_RSS}"),
            )
            .text("pass", pass),
        );
    }
    Ok(())
}

fn side(ctx: &SideContext, args: &Args) -> Result<SideReport, BoxError> {
    let n: u64 = args.get("--n", 10_000)?;
    let delay_ms: u64 = args.get("--delay-ms", 1000)?;
    warn_if_fewer_files_than(n + 100);
    let url = format!("{}/delay?ms={delay_ms}", ctx.url);
    let line = ctx.line(BENCH).text("n", n).text("delay_ms", delay_ms);
    let completion;
    let (wall, latencies, complete) = match ctx.side {
        Side::Patient => {
            let handler = BenchHandler::new(Request::get(&url).build()?, n, false);
            completion = handler.completion();
            let _watchdog = Watchdog::arm(ctx.deadline, completion.clone(), line.clone());
            let config = Config::builder().max_connections(n as usize).build()?;
            let processor = Processor::builder().config(config).build(handler.clone())?;
            processor.start()?;
            handler.attach(processor.clone());
            let start = Instant::now();
            handler.issue(n);
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
            let run =
                bare::all_at_once(&runtime, url.parse()?, n, completion.clone(), ctx.deadline)?;
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
