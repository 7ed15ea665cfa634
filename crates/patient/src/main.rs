//! The `patient` command line: thin glue over the `patient-http` library.

mod client_args;
mod request;
mod serve;
mod submit;
mod tasks;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// mimalloc rather than glibc's malloc: the daemon allocates on every
// worker thread at once, and glibc's arenas contend (and grow) under it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hand off slow HTTP calls; get every answer back.
#[derive(Debug, Parser)]
#[command(name = "patient", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one request inline with the full lifecycle and print the outcome as JSON.
    Request(request::RequestArgs),
    /// Run the daemon: a durable request queue with an HTTP API.
    Serve(serve::ServeArgs),
    /// Submit a request to a running daemon as a durable task.
    Submit(submit::SubmitArgs),
    /// List, show, cancel, redeliver or retry the tasks of a running daemon.
    Tasks(tasks::TasksArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cli.command {
        Command::Request(args) => request::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Submit(args) => submit::run(args),
        Command::Tasks(args) => tasks::run(args),
    }
}

/// Prints help and version as clap does; any other argument error as one line.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(request::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let text = e.to_string();
            let mut lines = text.lines();
            let first = lines.next().unwrap_or("invalid arguments");
            let mut line = first.strip_prefix("error: ").unwrap_or(first).to_owned();
            // "...were not provided:" lists the arguments on the lines after it.
            if line.ends_with(':') {
                let listed: Vec<&str> = lines
                    .take_while(|l| l.starts_with("  "))
                    .map(str::trim)
                    .collect();
                line = format!("{line} {}", listed.join(", "));
            }
            eprintln!("patient: {line}");
            ExitCode::from(request::EXIT_USAGE)
        }
    }
}
