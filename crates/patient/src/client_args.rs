//! What the daemon's client commands (`patient submit`, `patient tasks`)
//! share: where the daemon is, the output format, exit statuses, error
//! lines, and the human-readable rendering of tasks.

use std::{io::Write, process::ExitCode, time::Duration};

use clap::{Args, ValueEnum};
use patient_client::{
    ClientError, DaemonClient, Deliver, TaskInfo, DEFAULT_URL, TOKEN_ENV, URL_ENV,
};
use patient_http::{wire::TaskError, Response};
use serde_json::Value;

/// Exit status: done (for `submit --wait`: the task completed).
pub(crate) const EXIT_OK: u8 = 0;
/// Exit status: the task failed or was cancelled (`submit --wait`), or the
/// daemon was unreachable or unavailable.
pub(crate) const EXIT_FAILED: u8 = 1;
/// Exit status: bad arguments, or the daemon refused the call as it is (4xx).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit status: `--wait-timeout` passed before the task finished.
pub(crate) const EXIT_WAIT_TIMEOUT: u8 = 3;

/// The environment and exit statuses, for the `--help` of every client
/// command; `$extra` is the command's own text, first.
macro_rules! client_help {
    ($extra:literal) => {
        concat!(
            $extra,
            "Environment:
  PATIENT_URL        the daemon's URL (default http://127.0.0.1:8750); --url overrides it
  PATIENT_API_TOKEN  the daemon's api_token, sent as a bearer token; --token overrides it
                     (prefer the variable: a flag shows in the process list)

Output:
  A table by default; --output json (or --json on `tasks`) prints the API's
  JSON, for scripts; --output outcome prints the outcome's Response or Error
  JSON (the wire format of `patient request`), null until the task finishes
  (`tasks list`: one line per task).

Exit status:
  0  done (submit --wait: the task completed)
  1  submit --wait: the task failed or was cancelled; or the daemon could not
     be reached or answered 5xx (one line on stderr)
  2  bad arguments, or the daemon refused the call (4xx: invalid_request,
     egress_denied, unauthorized, not_found, conflict, ...), one line on stderr
     with the API's code and message
  3  submit --wait-timeout passed before the task finished (it goes on)"
        )
    };
}
pub(crate) use client_help;

/// Where the daemon is: `--url` and `--token`, over `PATIENT_URL` and
/// `PATIENT_API_TOKEN`.
#[derive(Debug, Args)]
pub(crate) struct DaemonArgs {
    /// The daemon's URL [default: $PATIENT_URL, else http://127.0.0.1:8750].
    #[arg(long, value_name = "URL", global = true)]
    url: Option<String>,

    /// The daemon's API token [default: $PATIENT_API_TOKEN].
    #[arg(long, value_name = "TOKEN", global = true)]
    token: Option<String>,
}

impl DaemonArgs {
    /// The client of the daemon these arguments (or the environment) name;
    /// the error names the flag or variable that is wrong.
    pub(crate) fn client(&self) -> Result<DaemonClient, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (url, url_from) = match (&self.url, var(URL_ENV)) {
            (Some(url), _) => (url.clone(), "--url"),
            (None, Some(url)) => (url, URL_ENV),
            (None, None) => (DEFAULT_URL.to_owned(), "the default URL"),
        };
        let (token, token_from) = match (&self.token, var(TOKEN_ENV)) {
            (Some(token), _) => (Some(token.clone()), "--token"),
            (None, token) => (token, TOKEN_ENV),
        };
        DaemonClient::new(url, token).map_err(|e| {
            let from = match e.field() {
                Some("token") => token_from,
                _ => url_from,
            };
            format!("{from}: {}", e.message())
        })
    }
}

/// How a command prints what the daemon answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, one document on one line.
    Json,
    /// The outcome's Response or Error JSON (null until finished).
    Outcome,
}

/// Runs a client command's body on a small runtime.
pub(crate) fn block_on<F: std::future::Future<Output = ExitCode>>(body: F) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(body),
        Err(e) => {
            eprintln!("patient: cannot start the runtime: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Prints the error as one line on stderr and gives the exit status it
/// calls for.
pub(crate) fn fail(error: &ClientError) -> ExitCode {
    let line = error.to_string().replace(['\n', '\r'], " ");
    eprintln!("patient: {line}");
    let code = if error.is_wait_timeout() {
        EXIT_WAIT_TIMEOUT
    } else if error.is_config() || error.is_input() {
        EXIT_USAGE
    } else {
        EXIT_FAILED
    };
    ExitCode::from(code)
}

/// Prints a usage error as one line on stderr: exit status 2.
pub(crate) fn usage(message: &str) -> ExitCode {
    eprintln!("patient: {message}");
    ExitCode::from(EXIT_USAGE)
}

/// Writes `text` and a newline to stdout.
pub(crate) fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Prints a task in the chosen format.
pub(crate) fn print_task(task: &TaskInfo, output: Output) {
    match output {
        Output::Table => print(&detail(task)),
        Output::Json => print(&to_json_line(task)),
        Output::Outcome => print(&outcome_line(task)),
    }
}

/// Compact JSON of any serializable value, keys in the order the daemon
/// writes them (sorted), so a task prints as the API sent it.
pub(crate) fn to_json_line<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .and_then(|value| serde_json::to_string(&value))
        .unwrap_or_else(|_| "null".to_owned())
}

/// The outcome's Response or Error JSON, `null` until the task finishes.
pub(crate) fn outcome_line(task: &TaskInfo) -> String {
    let value = task
        .outcome
        .as_ref()
        .and_then(|o| {
            o.response
                .clone()
                .filter(|v| !v.is_null())
                .or(o.error.clone())
        })
        .unwrap_or(Value::Null);
    to_json_line(&value)
}

/// `webhook=URL`, `redis-list=KEY`, `redis-stream=KEY`,
/// `sidekiq=QUEUE[:WORKER]` (or `sidekiq` for the default queue).
pub(crate) fn parse_deliver(text: &str) -> Result<Deliver, String> {
    let (channel, target) = match text.split_once('=') {
        Some((channel, target)) => (channel, target),
        None if text == "sidekiq" => ("sidekiq", ""),
        None => return Err(deliver_syntax(text)),
    };
    let nonempty = |what: &str| -> Result<String, String> {
        if target.is_empty() {
            Err(format!("{channel}= needs a {what}"))
        } else {
            Ok(target.to_owned())
        }
    };
    match channel {
        "webhook" => Ok(Deliver::webhook(nonempty("URL")?)),
        "redis-list" => Ok(Deliver::redis_list(nonempty("key")?)),
        "redis-stream" => Ok(Deliver::redis_stream(nonempty("key")?)),
        "sidekiq" => {
            // Worker classes have `::` in them: the queue ends at the first `:`.
            let (queue, worker) = match target.split_once(':') {
                Some((queue, worker)) => (queue, Some(worker)),
                None => (target, None),
            };
            if worker.is_some_and(str::is_empty) {
                return Err("sidekiq=QUEUE:WORKER needs a worker class after `:`".into());
            }
            Ok(Deliver::Sidekiq {
                queue: Some(queue.to_owned()).filter(|q| !q.is_empty()),
                worker: worker.map(str::to_owned),
            })
        }
        _ => Err(deliver_syntax(text)),
    }
}

fn deliver_syntax(text: &str) -> String {
    format!(
        "{text:?} is not a delivery target: use webhook=URL, redis-list=KEY, redis-stream=KEY or sidekiq=QUEUE[:WORKER]"
    )
}

/// `key=JSON` of `--callback-arg`.
pub(crate) fn parse_callback_arg(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} must be key=JSON"))?;
    if key.is_empty() {
        return Err(format!("{text:?} has no key before `=`"));
    }
    let value = serde_json::from_str(value).map_err(|e| {
        format!("{key}: {value:?} is not JSON ({e}); quote a string: {key}='\"text\"'")
    })?;
    Ok((key.to_owned(), value))
}

/// Seconds as given on the command line: finite and not negative.
pub(crate) fn parse_seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(value)
        .map_err(|_| format!("{text} is not a number of seconds of 0 or more"))
}

/// Columns padded to their widest cell, two spaces apart.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out
    };
    let mut lines = vec![line(headers.to_vec())];
    for row in rows {
        lines.push(line(row.iter().map(String::as_str).collect()));
    }
    lines.join("\n")
}

/// The columns of a task in a list: id, state, callback, created,
/// attempts, delivery.
pub(crate) const LIST_HEADERS: [&str; 6] =
    ["ID", "STATE", "CALLBACK", "CREATED", "ATTEMPTS", "DELIVERY"];

/// A task's row in a list.
pub(crate) fn list_row(task: &TaskInfo) -> Vec<String> {
    vec![
        task.id.clone(),
        task.state.to_string(),
        dash(&task.callback),
        task.created_at.clone(),
        task.attempts.len().to_string(),
        delivery(task),
    ]
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// `none`, or the channel and its state: `webhook delivered`.
fn delivery(task: &TaskInfo) -> String {
    let d = &task.delivery;
    match d.channel {
        patient_client::DeliveryChannel::None => "none".to_owned(),
        channel => format!("{channel} {}", d.state),
    }
}

/// One line about the outcome: `response 200`, `error timeout: …`, or `-`.
fn outcome_summary(task: &TaskInfo) -> String {
    let Some(outcome) = &task.outcome else {
        return "-".to_owned();
    };
    if let Ok(Some(response)) = outcome.response() {
        return response_summary(&response);
    }
    match outcome.error() {
        Ok(Some(TaskError::Request(e))) => {
            format!("error {} ({}): {}", e.error_type, e.class_name, e.message)
        }
        Ok(Some(e)) => format!("error: {}", e.message()),
        Ok(None) => "-".to_owned(),
        Err(e) => format!("(unreadable outcome: {e})"),
    }
}

fn response_summary(response: &Response) -> String {
    format!("response {}", response.status)
}

/// A task for people: its fields, one a line, then its attempts.
pub(crate) fn detail(task: &TaskInfo) -> String {
    let d = &task.delivery;
    let mut delivery_text = delivery(task);
    if d.attempts > 0 {
        let tries = if d.attempts == 1 { "try" } else { "tries" };
        delivery_text.push_str(&format!(" ({} {tries})", d.attempts));
    }
    if let Some(error) = &d.last_error {
        delivery_text.push_str(&format!(", last error: {error}"));
    }
    let mut fields: Vec<(&str, String)> = vec![
        ("id", task.id.clone()),
        ("state", task.state.to_string()),
        ("callback", dash(&task.callback)),
        ("created", task.created_at.clone()),
        ("not before", task.not_before.clone()),
        (
            "finished",
            task.finished_at.clone().unwrap_or_else(|| "-".into()),
        ),
        ("outcome", outcome_summary(task)),
        ("delivery", delivery_text),
    ];
    if let Some(key) = task.idempotency_key() {
        fields.push(("idempotency key", key.to_owned()));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}"))
        .collect();
    if !task.attempts.is_empty() {
        let rows: Vec<Vec<String>> = task
            .attempts
            .iter()
            .map(|a| {
                vec![
                    a.attempt.to_string(),
                    a.status.map_or("-".to_owned(), |s| s.to_string()),
                    a.error_type.clone().unwrap_or_else(|| "-".into()),
                    format!("{:.3} s", a.duration),
                    a.started_at.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push(String::new());
        out.push(table(
            &["ATTEMPT", "STATUS", "ERROR", "DURATION", "STARTED"],
            &rows,
        ));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_targets_parse_into_the_contract_shapes() {
        assert_eq!(
            parse_deliver("webhook=http://127.0.0.1:9/hook").unwrap(),
            Deliver::webhook("http://127.0.0.1:9/hook")
        );
        assert_eq!(
            parse_deliver("redis-list=out").unwrap(),
            Deliver::redis_list("out")
        );
        assert_eq!(
            parse_deliver("redis-stream=events").unwrap(),
            Deliver::redis_stream("events")
        );
        assert_eq!(
            parse_deliver("sidekiq=llm:PatientHttp::Sidekiq::CallbackWorker").unwrap(),
            Deliver::sidekiq_worker("llm", "PatientHttp::Sidekiq::CallbackWorker")
        );
        assert_eq!(
            parse_deliver("sidekiq=llm").unwrap(),
            Deliver::sidekiq("llm")
        );
        assert_eq!(
            parse_deliver("sidekiq").unwrap(),
            Deliver::Sidekiq {
                queue: None,
                worker: None
            }
        );
        for bad in ["email=a@b", "webhook=", "redis-list", "sidekiq=q:", "nope"] {
            assert!(parse_deliver(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn callback_args_are_json_values() {
        assert_eq!(
            parse_callback_arg("id=7").unwrap(),
            ("id".to_owned(), serde_json::json!(7))
        );
        assert_eq!(
            parse_callback_arg(r#"tags=["a",1]"#).unwrap().1,
            serde_json::json!(["a", 1])
        );
        assert_eq!(
            parse_callback_arg(r#"name="x=y""#).unwrap().1,
            serde_json::json!("x=y")
        );
        let e = parse_callback_arg("name=plain").unwrap_err();
        assert!(e.contains("not JSON") && e.contains("name"), "{e}");
        assert!(parse_callback_arg("=1").is_err());
        assert!(parse_callback_arg("novalue").is_err());
    }

    #[test]
    fn tables_align_every_column() {
        let text = table(
            &["ID", "STATE", "LAST"],
            &[
                vec!["tsk_1".into(), "queued".into(), "x".into()],
                vec!["tsk_22".into(), "completed".into(), "y".into()],
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ID      STATE      LAST");
        assert_eq!(lines[1], "tsk_1   queued     x");
        assert_eq!(lines[2], "tsk_22  completed  y");
    }
}
