//! Runs a patient-testkit upstream in its own process, for load tests that
//! need more file descriptors than one process may hold.
//!
//! ```text
//! patient-upstream [--listen ADDR] [--fault-listen ADDR] [--h2c-only | --http1-only]
//! ```
//!
//! Prints one line `listening=ADDR fault=ADDR` on stdout, then serves until
//! stdin reaches end of file or the process is killed.

use std::{
    io::{self, Read, Write},
    net::SocketAddr,
    process::ExitCode,
};

use patient_testkit::{Upstream, UpstreamOptions};

const USAGE: &str =
    "usage: patient-upstream [--listen ADDR] [--fault-listen ADDR] [--h2c-only | --http1-only]\n\
\n\
Serves the patient-testkit upstream routes. Prints `listening=ADDR fault=ADDR`\n\
and serves until stdin is closed. ADDR defaults to 127.0.0.1:0.";

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("patient-upstream: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("patient-upstream: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patient-upstream: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: UpstreamOptions) -> io::Result<()> {
    let upstream = Upstream::start_with(options).await?;
    {
        let mut stdout = io::stdout().lock();
        writeln!(
            stdout,
            "listening={} fault={}",
            upstream.addr(),
            upstream.fault_addr()
        )?;
        stdout.flush()?;
    }
    // Blocking stdin read on a plain thread; EOF (or an error) ends the server.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut sink = [0u8; 1024];
            let mut stdin = io::stdin().lock();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            let _ = done_tx.send(());
        })?;
    let _ = done_rx.await;
    drop(upstream);
    Ok(())
}

/// `Ok(None)` when help was asked for.
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<UpstreamOptions>, String> {
    let mut options = UpstreamOptions::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<SocketAddr, String> {
            let raw = inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs an address"))?;
            raw.parse()
                .map_err(|_| format!("{name}: invalid socket address {raw:?}"))
        };
        options = match flag.as_str() {
            "--listen" => options.listen(value("--listen")?),
            "--fault-listen" => options.fault_listen(value("--fault-listen")?),
            "--h2c-only" | "--http2-only" => options.http2_only(),
            "--http1-only" => options.http1_only(),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        };
    }
    Ok(Some(options))
}
