//! Starts the test upstream on a loopback port, hands a processor a mix of
//! requests from several application threads, and prints every outcome as
//! wire-format JSON, one line each.
//!
//! ```text
//! cargo run -p patient-http --example demo
//! ```

use std::{sync::mpsc, time::Duration};

use patient_http::{CallbackArgs, Config, Outcome, Processor, Request, Task};
use patient_testkit::{Fault, Upstream};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let upstream = runtime.block_on(Upstream::start())?;
    eprintln!("test upstream on {}", upstream.addr());

    let (tx, rx) = mpsc::channel::<Outcome>();
    let config = Config::builder()
        .request_timeout(Duration::from_secs(2))
        .build()?;
    let processor = Processor::builder()
        .config(config)
        .secret("api_key", "demo-secret")
        .build(tx)?;
    processor.start()?;

    let requests = vec![
        Request::get(upstream.url("/fast")).build()?,
        Request::get(upstream.url("/delay?ms=300")).build()?,
        Request::post(upstream.url("/echo"))
            .secret_header("authorization", "api_key")
            .json(&serde_json::json!({"prompt": "hello"}))
            .build()?,
        Request::get(upstream.url("/redirect/2")).build()?,
        Request::get(upstream.url("/status/503")).build()?,
        Request::get(upstream.url("/delay?ms=5000"))
            .timeout(Duration::from_millis(200))
            .build()?,
        Request::get(upstream.fault_url(Fault::ResetMidBody)).build()?,
    ];
    let count = requests.len();
    // Application threads hand off their requests and return at once.
    std::thread::scope(|s| {
        for (i, request) in requests.into_iter().enumerate() {
            let processor = processor.clone();
            s.spawn(move || {
                let mut args = CallbackArgs::new();
                args.insert("n", i as i64);
                let task = Task::new(request, "DemoCallback").with_callback_args(args);
                if let Err(e) = processor.enqueue(task) {
                    eprintln!("refused: {e}");
                }
            });
        }
    });

    for _ in 0..count {
        let outcome = rx.recv_timeout(Duration::from_secs(10))?;
        let kind = match &outcome {
            Outcome::Completed { .. } => "on_complete",
            Outcome::Failed { .. } => "on_error",
            Outcome::Retry(_) => "retry",
        };
        println!("{kind} {}", outcome.to_json());
    }
    processor.stop(None);
    let counts = processor.counts();
    eprintln!(
        "completed={} failed={} retried={}",
        counts.completed, counts.failed, counts.retried
    );
    Ok(())
}
