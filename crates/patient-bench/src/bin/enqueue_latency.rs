//! Enqueue latency: how long `Processor::enqueue` takes on application
//! threads while the processor is busy with requests in flight.
//!
//! ```text
//! cargo run --release -p patient-bench --bin enqueue_latency [-- --n 20000 --threads 8]
//! ```

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use patient_bench::{
    args::Args,
    harness::{main_with, BoxError, Harness, Program, Side, SideContext, SideReport, Watchdog},
    patient_side::BenchHandler,
    report::Line,
    stats::Summary,
};
use patient_http::{Config, Processor, Request};

const BENCH: &str = "enqueue_latency";
const TARGET_P99_US: f64 = 10.0;

const USAGE: &str = "usage: enqueue_latency [--n N] [--threads T] [--delay-ms MS] [--in-flight F] [--url BASE] [--timeout-s S]

T application threads (default 8) enqueue N tasks in all (default 20000)
into one processor, each task a GET of BASE/delay?ms=MS (default 20), and
time every enqueue() call. A thread waits (untimed) while F tasks (default
2000) are queued or in flight, so the processor stays busy without running
out of sockets. Without --url it starts its own upstream in a child
process. Prints the processor's line and a summary line; target: p99 <= 10
us. The whole program stops after --timeout-s seconds (default 120).";

fn main() -> ExitCode {
    main_with(Program {
        bench: BENCH,
        usage: USAGE,
        value_flags: &["--n", "--threads", "--delay-ms", "--in-flight"],
        parent,
        side,
    })
}

fn parent(harness: &mut Harness, args: &Args) -> Result<(), BoxError> {
    let n: u64 = args.get("--n", 20_000)?;
    let threads: u64 = args.get("--threads", 8)?;
    let delay_ms: u64 = args.get("--delay-ms", 20)?;
    let in_flight: u64 = args.get("--in-flight", 2000)?;
    let flags = [
        ("--n", n.to_string()),
        ("--threads", threads.to_string()),
        ("--delay-ms", delay_ms.to_string()),
        ("--in-flight", in_flight.to_string()),
    ];
    if !harness.wants(Side::Patient) {
        return Ok(());
    }
    let record = harness.run(Side::Patient, &flags);
    let p99 = record.number("p99_us");
    let pass = record.is_complete() && p99.is_some_and(|p| p <= TARGET_P99_US);
    let line = Line::new(BENCH)
        .text("threads", threads)
        .text("peer", "none");
    let line = match p99 {
        Some(p99) => line.fixed("p99_us", p99, 2),
        None => line.text("p99_us", "na"),
    };
    harness.emit(
        line.text("target", format!("p99_us<={TARGET_P99_US}"))
            .text("pass", pass),
    );
    Ok(())
}

fn side(ctx: &SideContext, args: &Args) -> Result<SideReport, BoxError> {
    if ctx.side != Side::Patient {
        return Err("enqueue_latency measures patient only".into());
    }
    let n: u64 = args.get("--n", 20_000)?;
    let threads: u64 = args.get::<u64>("--threads", 8)?.max(1);
    let delay_ms: u64 = args.get("--delay-ms", 20)?;
    let in_flight: u64 = args.get::<u64>("--in-flight", 2000)?.max(1);
    let url = format!("{}/delay?ms={delay_ms}", ctx.url);
    let line = ctx
        .line(BENCH)
        .text("threads", threads)
        .text("n", n)
        .text("delay_ms", delay_ms)
        .text("in_flight", in_flight);

    let handler = BenchHandler::new(Request::get(&url).build()?, n, false);
    let completion = handler.completion();
    let _watchdog = Watchdog::arm(ctx.deadline, completion.clone(), line.clone());
    // Room for the waiting threads' race past the in-flight check.
    let config = Config::builder()
        .max_connections((in_flight + threads) as usize)
        .build()?;
    let processor = Processor::builder().config(config).build(handler.clone())?;
    processor.start()?;

    let start = Instant::now();
    let per_thread = n.div_ceil(threads);
    let mut enqueue_nanos = Vec::with_capacity(n as usize);
    let mut out_of_time = false;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (handler, processor) = (&handler, &processor);
                let seqs = (t * per_thread)..((t + 1) * per_thread).min(n);
                scope.spawn(move || {
                    let mut nanos = Vec::with_capacity(seqs.clone().count());
                    for seq in seqs {
                        // Keep about `in_flight` tasks outstanding (not timed).
                        while processor.counts().pending as u64 >= in_flight {
                            if Instant::now() >= ctx.deadline {
                                return (nanos, true);
                            }
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        let task = handler.task(seq);
                        let before = Instant::now();
                        let result = processor.enqueue(task);
                        nanos.push(before.elapsed().as_nanos() as u64);
                        if result.is_err() {
                            handler.refused(seq);
                        }
                    }
                    (nanos, false)
                })
            })
            .collect();
        for worker in workers {
            match worker.join() {
                Ok((mut nanos, late)) => {
                    enqueue_nanos.append(&mut nanos);
                    out_of_time |= late;
                }
                Err(_) => out_of_time = true,
            }
        }
    });
    let enqueue_wall = start.elapsed();
    let complete = !out_of_time && completion.wait(ctx.deadline);
    let wall = start.elapsed();
    processor.stop(Some(Duration::from_secs(1)));

    let enqueue = Summary::from_nanos(enqueue_nanos);
    let tasks = Summary::from_nanos(handler.latencies());
    let wall_s = wall.as_secs_f64();
    let us = |nanos: u64| nanos as f64 / 1e3;
    let mut line = line
        .fixed("p50_us", us(enqueue.p50), 2)
        .fixed("p99_us", us(enqueue.p99), 2)
        .fixed("p999_us", us(enqueue.p999), 2)
        .fixed("max_us", us(enqueue.max), 2)
        .text("enqueues", enqueue.count)
        .fixed("enqueue_wall_s", enqueue_wall.as_secs_f64(), 3)
        .text("refused", handler.refusals())
        .round("req_s", completion.done() as f64 / wall_s)
        .fixed("wall_s", wall_s, 3)
        .latency_ms(&tasks)
        .peak_rss()
        .cpu()
        .text("errors", completion.errors());
    if !complete {
        line = line.text("done", completion.done()).text("timeout", true);
    }
    Ok(SideReport { line, complete })
}
