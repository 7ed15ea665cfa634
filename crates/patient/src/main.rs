//! The `patient` command line: thin glue over the `patient-http` library.

mod request;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cli.command {
        Command::Request(args) => request::run(args),
        Command::Serve(args) => serve::run(args),
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
            let line = text.lines().next().unwrap_or("invalid arguments");
            let line = line.strip_prefix("error: ").unwrap_or(line);
            eprintln!("patient: {line}");
            ExitCode::from(request::EXIT_USAGE)
        }
    }
}
