//! `patient serve`: the daemon, on its embedded defaults unless told.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::Args;
use patient_daemon::{settings::LogFormat, Flags, Settings};

use crate::request::EXIT_USAGE;

const AFTER_HELP: &str = "\
Settings come from the defaults, then the TOML file (--config), then PATIENT_*
environment variables (nested keys joined with __: PATIENT_EGRESS__ALLOW), then
these flags. With none it runs on embedded defaults: SQLite in ./patient-data,
the API on 127.0.0.1:8750. docs/patient.toml documents every setting:

  listen            PATIENT_LISTEN            127.0.0.1:8750
  data_dir          PATIENT_DATA_DIR          ./patient-data
  database_url      PATIENT_DATABASE_URL      SQLite in data_dir (or postgres://… for several nodes)
  api_token         PATIENT_API_TOKEN         none (required off loopback)
  webhook_secret    PATIENT_WEBHOOK_SECRET    generated once, kept in the database
  redis_url         PATIENT_REDIS_URL         none (Redis and Sidekiq delivery)
  egress.allow      PATIENT_EGRESS__ALLOW     none (CIDRs or host names)
  shutdown_timeout  PATIENT_SHUTDOWN_TIMEOUT  30 (seconds)
  max_body          PATIENT_MAX_BODY          16777216 (bytes)
  allowed_hosts     PATIENT_ALLOWED_HOSTS     loopback listener: localhost, 127.0.0.1, [::1]; else any
  header_timeout    PATIENT_HEADER_TIMEOUT    10 (seconds; also the keep-alive idle limit)
  body_timeout      PATIENT_BODY_TIMEOUT      30 (seconds between reads of a body)
  send_timeout      PATIENT_SEND_TIMEOUT      60 (seconds a response waits for its client)
  max_connections   PATIENT_MAX_CONNECTIONS   10000, or half the open-files limit
  max_batch         PATIENT_MAX_BATCH         1000
  lease             PATIENT_LEASE             30 (seconds)
  retention         PATIENT_RETENTION         604800 (seconds: 7 days)
  max_in_flight     PATIENT_MAX_IN_FLIGHT     1024
  log_format        PATIENT_LOG_FORMAT        text (or json)
  retry.*           PATIENT_RETRY__*          max_attempts 5, base_delay 1, factor 2,
                                              max_delay 600, max_retry_after 3600
  delivery.*        PATIENT_DELIVERY__*       timeout 10, max_attempts 12,
                                              base_delay 5, max_delay 3600
  secrets.NAME      PATIENT_SECRETS__NAME__ENV / __FILE, __HOSTS (where a task may send it)
  payload_store.*   PATIENT_PAYLOAD_STORE__*  none: kind file|redis|s3|sql, threshold 65536,
                                              name, dir, url, prefix, ttl, bucket, endpoint,
                                              region, path_style, access_key_id,
                                              secret_access_key (secret names), table
  encryption.*      PATIENT_ENCRYPTION__*     off: secrets (names, first encrypts),
                                              format aes-gcm|active_support, serializer,
                                              key_digest sha1|sha256 (sha256: Rails 7+)
  [[routes]]        (file only)               none: proxy routes (name, path_prefix, upstreams,
                                              strip_prefix, caps, timers, retries, credential…)

Once the listener is bound and the store is open it prints one line on stderr:
  patient: listening on http://127.0.0.1:8750
The dashboard is the page at that address (with api_token set, it asks for the
token in a form).
SIGTERM (or Ctrl-C) stops claiming tasks and accepting connections at once,
lets attempts in flight and requests in progress finish up to
shutdown_timeout, releases the rest to the queue (a POST/PATCH that may not be
sent again ends Interrupted instead) and exits 0. SIGHUP reads the
settings again and replaces the proxy routes (the rest needs a restart).

Exit status:
  0  stopped by a signal
  1  the daemon could not start or failed while serving (one line on stderr)
  2  a bad setting or argument (one line on stderr naming it)";

/// Arguments of `patient serve`.
#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub(crate) struct ServeArgs {
    /// A TOML settings file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// The address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// The directory of the SQLite file and local state.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

pub(crate) fn run(args: ServeArgs) -> ExitCode {
    let flags = Flags {
        listen: args.listen.clone(),
        data_dir: args.data_dir.clone(),
    };
    let settings = match Settings::load(args.config.as_deref(), std::env::vars(), &flags) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("patient: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("patient: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let addr = settings
            .listen_addr()
            .ok_or_else(|| format!("setting `listen`: {:?} is not an address", settings.listen))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        // SIGHUP reads the same file, environment and flags again.
        let config = args.config.clone();
        let reload: patient_daemon::server::Reload = Arc::new(move || {
            Settings::load(config.as_deref(), std::env::vars(), &flags).map_err(|e| e.to_string())
        });
        patient_daemon::server::run_reloading(settings, listener, reload)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("patient: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PATIENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
