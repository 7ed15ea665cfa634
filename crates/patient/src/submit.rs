//! `patient submit`: a request handed to a running daemon as a durable task.

use std::{process::ExitCode, time::Duration};

use clap::Args;
use patient_client::{Deliver, Submit, TaskState};
use patient_http::{Request, RetryOptions};
use serde_json::Value;

use crate::{
    client_args::{
        self, client_help, parse_callback_arg, parse_deliver, parse_seconds, DaemonArgs, Output,
        EXIT_FAILED, EXIT_OK,
    },
    request::{seconds, RequestSpec, UsageError},
};

const AFTER_HELP: &str = client_help!(
    "Submits the request to the daemon (patient serve) and prints the task. The
daemon runs it with its retry settings (by default 5 attempts, backoff 1 s x 2
up to 10 min; POST and PATCH are retried only with an Idempotency-Key header)
and delivers the outcome as --deliver says, or keeps it for polling (patient
tasks show ID). --idempotency-key is the daemon's own: it makes the submit, not
the request, safe to send twice.

With --wait it polls until the task finishes and exits with its outcome's
status, as `patient request` does.

Examples:
  patient submit https://api.example.com/v1/report --callback ReportReady --deliver webhook=https://app.example.com/hooks/patient
  patient submit POST https://api.example.com/v1/chat --json '{\"prompt\":\"hi\"}' --idempotency-key chat-42 --deliver redis-list=outcomes
  patient submit https://api.example.com/v1/sync --delay 60 --callback-arg account=7
  patient submit https://api.example.com/v1/items --wait --wait-timeout 120 -o outcome

"
);

/// Arguments of `patient submit`.
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    spec: RequestSpec,

    /// Retries after the first attempt, so up to N + 1 attempts in all
    /// (default: the daemon's retry settings, 4 retries); sent as the
    /// request's `options.retry.max_attempts` unless a --from file sets it.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u32).range(0..=99)
    )]
    retries: Option<u32>,

    /// The deadline of the whole task in seconds from its submission, every
    /// attempt and wait included (default: none); sent as the request's
    /// `options.deadline` unless a --from file sets it.
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    deadline: Option<f64>,

    /// Where the outcome goes: webhook=URL, redis-list=KEY,
    /// redis-stream=KEY or sidekiq=QUEUE[:WORKER] (default: nowhere; poll
    /// it with `patient tasks show ID`).
    #[arg(long, value_name = "TARGET", value_parser = parse_deliver)]
    deliver: Option<Deliver>,

    /// The callback's name, returned with the outcome.
    #[arg(long, value_name = "NAME")]
    callback: Option<String>,

    /// A callback argument, `key=JSON` (`id=7`, `tags='["a"]'`,
    /// `name='"Ada"'`); repeatable, over --callback-args.
    #[arg(long = "callback-arg", value_name = "KEY=JSON", value_parser = parse_callback_arg)]
    callback_arg: Vec<(String, Value)>,

    /// Run the task this many seconds from now.
    #[arg(
        long,
        value_name = "SECONDS",
        allow_negative_numbers = true,
        value_parser = parse_seconds,
        conflicts_with = "not_before"
    )]
    delay: Option<Duration>,

    /// Run the task at this RFC 3339 time (`2026-12-01T10:00:00Z`) or later.
    #[arg(long, value_name = "TIME")]
    not_before: Option<String>,

    /// A key the daemon remembers: submitting with it again prints the first
    /// task instead of running another.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,

    /// Wait until the task finishes, then exit with its outcome's status.
    #[arg(long)]
    wait: bool,

    /// Give up waiting after this many seconds (exit status 3; the task goes
    /// on). Default: wait as long as it takes.
    #[arg(
        long,
        value_name = "SECONDS",
        allow_negative_numbers = true,
        value_parser = parse_seconds,
        requires = "wait"
    )]
    wait_timeout: Option<Duration>,

    /// The output format.
    #[arg(short = 'o', long, value_name = "FORMAT", default_value = "table")]
    output: Output,

    #[command(flatten)]
    daemon: DaemonArgs,
}

pub(crate) fn run(args: SubmitArgs) -> ExitCode {
    let submit = match prepare(&args) {
        Ok(submit) => submit,
        Err(UsageError(message)) => return client_args::usage(&message),
    };
    let client = match args.daemon.client() {
        Ok(client) => client,
        Err(message) => return client_args::usage(&message),
    };
    client_args::block_on(async move {
        let task = match client.submit(&submit).await {
            Ok(task) => task,
            Err(e) => return client_args::fail(&e),
        };
        if !args.wait {
            client_args::print_task(&task, args.output);
            return ExitCode::from(EXIT_OK);
        }
        let task = match client.wait(&task.id, args.wait_timeout).await {
            Ok(task) => task,
            Err(e) => return client_args::fail(&e),
        };
        client_args::print_task(&task, args.output);
        ExitCode::from(match task.state {
            TaskState::Completed => EXIT_OK,
            _ => EXIT_FAILED,
        })
    })
}

/// The submit the flags describe.
fn prepare(args: &SubmitArgs) -> Result<Submit, UsageError> {
    let request = with_options(args.spec.request()?, args)?;
    let mut callback_args = args.spec.callback_args()?;
    for (key, value) in &args.callback_arg {
        callback_args.insert(key.clone(), value.clone());
    }
    let callback_args = patient_http::CallbackArgs::from_value(callback_args.into_value())
        .map_err(|e| UsageError(format!("--callback-arg: {e}")))?;
    let mut submit = Submit::new(request).with_callback_args(callback_args);
    submit.callback = args.callback.clone();
    if args.spec.raise_error_responses {
        submit.raise_error_responses = Some(true);
    }
    submit.deliver = args.deliver.clone();
    submit.idempotency_key = args.idempotency_key.clone();
    submit.delay = args.delay;
    submit.not_before = args.not_before.clone();
    Ok(submit)
}

/// `--retries` and `--deadline` as the request's options, where the request
/// (from a file) does not set them itself.
fn with_options(request: Request, args: &SubmitArgs) -> Result<Request, UsageError> {
    if args.retries.is_none() && args.deadline.is_none() {
        return Ok(request);
    }
    let mut options = request.request_options().clone();
    if let Some(retries) = args.retries {
        let retry = options.retry.get_or_insert_with(RetryOptions::default);
        if retry.max_attempts.is_none() {
            retry.max_attempts = Some(retries.saturating_add(1));
        }
    }
    if let Some(deadline) = args.deadline {
        let deadline = seconds("--deadline", deadline)?;
        options.deadline.get_or_insert(deadline);
    }
    request
        .to_builder()
        .request_options(options)
        .build()
        .map_err(|e| match (args.deadline, e.to_string()) {
            (Some(d), text) if text.contains("deadline") => {
                UsageError(format!("--deadline {d}: {text}"))
            }
            (_, text) => UsageError(text),
        })
}
