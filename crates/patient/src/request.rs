//! `patient request`: one request, inline, outcome JSON on stdout.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
    sync::mpsc,
    time::Duration,
};

use clap::Args;
use patient_http::{
    client::HttpVersionPref, retry::RetryPolicy, CallbackArgs, Config, InlineExecutor, Method,
    Outcome, Request, ResilienceConfig, Task,
};

/// Exit status of a response outcome.
pub(crate) const EXIT_RESPONSE: u8 = 0;
/// Exit status of an error outcome (HTTP error, request error or redirect error).
pub(crate) const EXIT_ERROR: u8 = 1;
/// Exit status of bad arguments or a bad request file.
pub(crate) const EXIT_USAGE: u8 = 2;

const AFTER_HELP: &str = "\
Output:
  One line of JSON on stdout, in the PatientHttp wire format: the Response
  object, or the error object (HTTP error, request error or redirect error).

Exit status:
  0  the request produced a response (any status, unless --raise-error-responses)
  1  the request ended in an error: timeout, connection, ssl, response_too_large,
     unknown, a redirect error, or an HTTP error with --raise-error-responses
  2  bad arguments or an unreadable request file (one line on stderr)

Examples:
  patient request https://httpbin.org/get
  patient request POST https://api.example.com/v1/items --json '{\"name\":\"a\"}' -H 'authorization: Bearer x'
  patient request --from request.json
  patient request https://api.example.com/v1/items --timeout 10 --retries 2 --deadline 30
  echo '{\"http_method\":\"get\",\"url\":\"http://127.0.0.1:8080/\",\"headers\":{},\"body\":null,\"timeout\":null,\"max_redirects\":null}' | patient request --from -";

/// The flags that make a request, shared by `patient request` and
/// `patient submit`.
#[derive(Debug, Args)]
pub(crate) struct RequestSpec {
    /// The method and the URL: `[METHOD] URL` (GET when only a URL is given).
    #[arg(value_name = "METHOD URL", num_args = 0..=2)]
    target: Vec<String>,

    /// A request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,

    /// The request body, as given.
    #[arg(long, value_name = "TEXT", conflicts_with = "json")]
    body: Option<String>,

    /// A JSON request body (sets content-type application/json unless given).
    #[arg(long, value_name = "JSON")]
    json: Option<String>,

    /// A query parameter, `name=value`, appended form-encoded (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,

    /// The timeout of one attempt in seconds, from connecting to the last
    /// byte of the response (default 60). With retries the whole request can
    /// take longer: bound it with --deadline.
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    timeout: Option<f64>,

    /// Redirects followed (default 5; 0 disables).
    #[arg(long, value_name = "N")]
    max_redirects: Option<u32>,

    /// A JSON object returned with the outcome as `callback_args`.
    #[arg(long, value_name = "JSON")]
    callback_args: Option<String>,

    /// Turn non-2xx responses into an HTTP error outcome (exit status 1).
    #[arg(long)]
    pub(crate) raise_error_responses: bool,

    /// Take the request from FILE, a serialized Request (wire-format JSON),
    /// or `-` for stdin.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["target", "body", "json", "params"])]
    from: Option<PathBuf>,
}

impl RequestSpec {
    /// The request: read from `--from`, or built from the flags.
    pub(crate) fn request(&self) -> Result<Request, UsageError> {
        match &self.from {
            Some(path) => read_request(path),
            None => build_request(self),
        }
    }

    /// The `--callback-args` object (none when not given).
    pub(crate) fn callback_args(&self) -> Result<CallbackArgs, UsageError> {
        let Some(json) = &self.callback_args else {
            return Ok(CallbackArgs::new());
        };
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| UsageError(format!("--callback-args is not valid JSON: {e}")))?;
        CallbackArgs::from_value(value).map_err(|e| UsageError(format!("--callback-args: {e}")))
    }
}

/// Arguments of `patient request`.
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub(crate) struct RequestArgs {
    #[command(flatten)]
    spec: RequestSpec,

    /// Retries after the first attempt, so up to N + 1 attempts in all, on
    /// timeouts, connection errors and statuses 408, 429, 500, 502, 503 and
    /// 504, with exponential backoff (default 0: one attempt). POST and PATCH
    /// are retried only with an Idempotency-Key or X-Idempotency-Key header.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u32).range(0..=99)
    )]
    retries: Option<u32>,

    /// The deadline of the whole request in seconds, every attempt and wait
    /// between them included; attempts share what is left of it (default:
    /// none).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    deadline: Option<f64>,

    /// A secret for `{"$secret": NAME}` references, read from an environment
    /// variable: `NAME=VAR` (repeatable).
    #[arg(long = "secret-env", value_name = "NAME=VAR")]
    secret_env: Vec<String>,

    /// Connect timeout in seconds (default: the attempt's --timeout applies).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    connect_timeout: Option<f64>,

    /// Largest response body read, in bytes (default 1048576).
    #[arg(long, value_name = "BYTES")]
    max_response_size: Option<usize>,

    /// Extra trusted root certificate(s), PEM file (repeatable).
    #[arg(long = "cacert", value_name = "FILE")]
    ca_certs: Vec<PathBuf>,

    /// Forward proxy URL, `http://user:pass@host:port`.
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,

    /// Use only HTTP/1.1.
    #[arg(long, conflicts_with = "http2")]
    http1: bool,

    /// Use only HTTP/2 (h2c prior knowledge on http URLs).
    #[arg(long)]
    http2: bool,

    /// Ask for and decode compressed responses (gzip, deflate, br).
    #[arg(long)]
    compressed: bool,

    /// Pretty-print the JSON.
    #[arg(long)]
    pretty: bool,
}

/// A one-line argument error.
pub(crate) struct UsageError(pub(crate) String);

impl<E: std::fmt::Display> From<E> for UsageError {
    fn from(e: E) -> Self {
        UsageError(e.to_string())
    }
}

pub(crate) fn run(args: RequestArgs) -> ExitCode {
    match prepare(&args) {
        Ok((executor, task)) => {
            let outcome = executor.run(task);
            let code = match &outcome {
                Outcome::Completed { .. } => EXIT_RESPONSE,
                _ => EXIT_ERROR,
            };
            let json = outcome.to_json();
            let text = if args.pretty {
                serde_json::to_string_pretty(&json)
            } else {
                serde_json::to_string(&json)
            }
            .unwrap_or_default();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
            ExitCode::from(code)
        }
        Err(UsageError(message)) => {
            eprintln!("patient: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

pub(crate) fn seconds(name: &str, value: f64) -> Result<Duration, UsageError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            UsageError(format!(
                "{name} must be a positive number of seconds, got {value}"
            ))
        })
}

fn prepare(args: &RequestArgs) -> Result<(InlineExecutor, Task), UsageError> {
    let request = args.spec.request()?;
    let mut config = Config::builder();
    if let Some(t) = args.connect_timeout {
        config = config.connection_timeout(Some(seconds("--connect-timeout", t)?));
    }
    if let Some(n) = args.max_response_size {
        config = config.max_response_size(n);
    }
    if args.http1 {
        config = config.http_version(HttpVersionPref::Http1Only);
    }
    if args.http2 {
        config = config.http_version(HttpVersionPref::Http2Only);
    }
    if let Some(proxy) = &args.proxy {
        let proxy = patient_http::client::ProxyConfig::new(proxy)
            .map_err(|e| UsageError(format!("--proxy {proxy:?}: {e}")))?;
        config = config.proxy(Some(proxy));
    }
    let mut pems = Vec::new();
    for path in &args.ca_certs {
        pems.push(
            std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("--cacert {}: {e}", path.display())))?,
        );
    }
    config = config.client_with(|c| c.root_certificates_pem(pems).decompress(args.compressed));
    let config = config.build()?;

    let mut builder = InlineExecutor::builder()
        .config(config)
        .resilience(resilience(args)?);
    for spec in &args.secret_env {
        let (name, var) = spec
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--secret-env {spec:?} must be NAME=VAR")))?;
        let value = std::env::var(var).map_err(|_| {
            UsageError(format!(
                "--secret-env {name}: environment variable {var} is not set"
            ))
        })?;
        builder = builder.secret(name, value);
    }
    let (tx, _rx) = mpsc::channel::<Outcome>();
    let executor = builder.build_inline(tx)?;

    let mut task =
        Task::new(request, "patient request").with_callback_args(args.spec.callback_args()?);
    if args.spec.raise_error_responses {
        task.raise_error_responses = Some(true);
    }
    Ok((executor, task))
}

/// The executor's default policy from `--retries` and `--deadline`; a
/// request file's own `options` apply over it.
fn resilience(args: &RequestArgs) -> Result<ResilienceConfig, UsageError> {
    let retry = match args.retries {
        None | Some(0) => None,
        Some(retries) => Some(
            RetryPolicy::builder()
                .max_attempts(retries.saturating_add(1))
                .build()
                .map_err(|e| UsageError(format!("--retries {retries}: {e}")))?,
        ),
    };
    let deadline = match args.deadline {
        None => None,
        Some(d) => Some(seconds("--deadline", d)?),
    };
    ResilienceConfig::builder()
        .defaults(|p| p.retry(retry).deadline(deadline))
        .build()
        .map_err(|e| match (e.field(), args.deadline) {
            ("deadline", Some(d)) => UsageError(format!("--deadline {d}: {}", e.reason())),
            _ => UsageError(e.to_string()),
        })
}

fn read_request(path: &PathBuf) -> Result<Request, UsageError> {
    let mut text = String::new();
    let source = if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| UsageError(format!("--from -: cannot read stdin: {e}")))?;
        "stdin".to_owned()
    } else {
        text = std::fs::read_to_string(path)
            .map_err(|e| UsageError(format!("--from {}: {e}", path.display())))?;
        path.display().to_string()
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| UsageError(format!("--from {source}: not valid JSON: {e}")))?;
    Request::from_json(&value).map_err(|e| UsageError(format!("--from {source}: {e}")))
}

fn build_request(args: &RequestSpec) -> Result<Request, UsageError> {
    let (method, url) = match args.target.as_slice() {
        [url] => (Method::Get, url.as_str()),
        [method, url] => (
            method
                .parse::<Method>()
                .map_err(|e| UsageError(e.to_string()))?,
            url.as_str(),
        ),
        _ => return Err(UsageError("a URL is required (or --from FILE)".into())),
    };
    let mut builder = Request::builder(method, url);
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| UsageError(format!("header {header:?} must be `Name: value`")))?;
        builder = builder.header(name.trim(), value.trim());
    }
    for param in &args.params {
        let (name, value) = param
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--param {param:?} must be name=value")))?;
        builder = builder.param(name, value);
    }
    if let Some(body) = &args.body {
        builder = builder.body(body.clone().into_bytes());
    }
    if let Some(json) = &args.json {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| UsageError(format!("--json is not valid JSON: {e}")))?;
        builder = builder.json(&value);
    }
    if let Some(t) = args.timeout {
        builder = builder.timeout(seconds("--timeout", t)?);
    }
    if let Some(n) = args.max_redirects {
        builder = builder.max_redirects(n);
    }
    Ok(builder.build()?)
}
