//! The daemon's settings: defaults, then a TOML file, then `PATIENT_*`
//! environment variables, then command-line flags, each layer over the one
//! before, and every value checked with an error naming the setting and
//! where it came from.
//!
//! Every setting has an environment name: `PATIENT_` and its path in upper
//! case, nested keys joined with `__` (`egress.allow` is
//! `PATIENT_EGRESS__ALLOW`). An environment value takes the type of the
//! setting it sets: numbers for numbers, `true`/`false` for flags, a
//! comma-separated list for lists. `docs/patient.toml` is the commented
//! example of every setting with its default.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use crate::gateway::settings::{check_routes, RouteSettings};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Environment variables read by the command line's client commands, not
/// settings of the daemon: they are left alone by [`Settings::load`].
pub const CLIENT_ENV: [&str; 1] = ["PATIENT_URL"];

/// Where a setting's value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The TOML file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the default"),
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Env(name) => f.write_str(name),
            Origin::Flag(flag) => f.write_str(flag),
        }
    }
}

/// A setting that could not be read or is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting `{setting}` (from {origin}): {message}")]
pub struct SettingsError {
    /// The setting's path (`lease`, `egress.allow`, `retry.max_attempts`).
    pub setting: String,
    /// Where its value came from.
    pub origin: Origin,
    /// What is wrong.
    pub message: String,
}

impl SettingsError {
    fn new(setting: impl Into<String>, origin: Origin, message: impl Into<String>) -> Self {
        SettingsError {
            setting: setting.into(),
            origin,
            message: message.into(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The egress guard's exemptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EgressSettings {
    /// CIDRs (`10.0.0.0/8`, `::1/128`) or host names exempt from the guard.
    pub allow: Vec<String>,
}

/// The retry policy of submitted tasks (a task's `request.options.retry`
/// overrides it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts per task, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry, seconds (doubled by `factor` each
    /// retry, full jitter).
    pub base_delay: f64,
    /// Backoff growth per retry.
    pub factor: f64,
    /// Longest backoff, seconds.
    pub max_delay: f64,
    /// Longest `Retry-After` (or rate-limit reset) honoured, seconds; a
    /// longer one ends the task.
    pub max_retry_after: f64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 5,
            base_delay: 1.0,
            factor: 2.0,
            max_delay: 600.0,
            max_retry_after: 3600.0,
        }
    }
}

/// Outcome delivery, on every channel (webhook, Redis, Sidekiq).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// Seconds a webhook delivery may take before it counts as failed.
    pub timeout: f64,
    /// Deliveries tried per outcome before `delivery.state` is `failed`.
    pub max_attempts: u32,
    /// Seconds before the first redelivery, doubled each time.
    pub base_delay: f64,
    /// Longest wait between deliveries, seconds.
    pub max_delay: f64,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            timeout: 10.0,
            max_attempts: 12,
            base_delay: 5.0,
            max_delay: 3600.0,
        }
    }
}

/// Where a named secret's value is read from when the daemon starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// An environment variable holding the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A file holding the value (one trailing newline is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The hosts a submitted task may send it to with `{"$secret": NAME}`
    /// (exact names, or `*.suffix` for every name under a domain). Without
    /// it the secret serves route credentials, payload stores and
    /// encryption, never a submitted task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
}

/// Where payloads larger than `threshold` go (`[payload_store]`): stored
/// requests, outcomes and the payloads of Redis and Sidekiq deliveries are
/// replaced by `{"$ref": {"store": name, "key": …}}`. No store unless `kind`
/// is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PayloadStoreSettings {
    /// `file`, `redis`, `s3` or `sql`; unset: no payload store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The store's name in references (default: the kind).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// JSON larger than this many bytes goes to the store.
    pub threshold: u64,
    /// file: the directory (default `<data_dir>/payloads`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// redis: the server (default `redis_url`); sql: `sqlite:…` or
    /// `postgres://…` (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// redis: the key prefix; s3: the object key prefix (both default to the
    /// gem's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// redis: seconds a payload is kept (default: until deleted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<f64>,
    /// s3: the bucket (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// s3: the service's URL (default AWS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// s3: the signing region (default `us-east-1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// s3: path-style URLs (default: with an `endpoint`, yes; on AWS, no).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// s3: the name of the `[secrets]` entry holding the access key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// s3: the name of the `[secrets]` entry holding the secret access key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<String>,
    /// sql: the table (default `patient_http_payloads`, the gem's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
}

impl Default for PayloadStoreSettings {
    fn default() -> Self {
        PayloadStoreSettings {
            kind: None,
            name: None,
            threshold: 64 * 1024,
            dir: None,
            url: None,
            prefix: None,
            ttl: None,
            bucket: None,
            endpoint: None,
            region: None,
            path_style: None,
            access_key_id: None,
            secret_access_key: None,
            table: None,
        }
    }
}

/// The payload store kinds and the keys of `[payload_store]` each one
/// takes besides `kind`, `name` and `threshold`.
const STORE_KEYS: [(&str, &[&str]); 4] = [
    ("file", &["dir"]),
    ("redis", &["url", "prefix", "ttl"]),
    (
        "s3",
        &[
            "bucket",
            "prefix",
            "endpoint",
            "region",
            "path_style",
            "access_key_id",
            "secret_access_key",
        ],
    ),
    ("sql", &["url", "table"]),
];

impl PayloadStoreSettings {
    /// The keys set besides `kind`, `name` and `threshold`, in the order of
    /// the table.
    fn set_keys(&self) -> Vec<&'static str> {
        [
            ("dir", self.dir.is_some()),
            ("url", self.url.is_some()),
            ("prefix", self.prefix.is_some()),
            ("ttl", self.ttl.is_some()),
            ("bucket", self.bucket.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("region", self.region.is_some()),
            ("path_style", self.path_style.is_some()),
            ("access_key_id", self.access_key_id.is_some()),
            ("secret_access_key", self.secret_access_key.is_some()),
            ("table", self.table.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }

    /// The store's name in references: `name`, or the kind.
    pub fn store_name(&self) -> Option<&str> {
        self.name.as_deref().or(self.kind.as_deref())
    }
}

/// Encryption of stored requests, outcomes and delivered payloads
/// (`[encryption]`); off while `secrets` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionSettings {
    /// Names of `[secrets]` entries: the first encrypts, every one decrypts.
    pub secrets: Vec<String>,
    /// `aes-gcm` or `active_support` (the PatientHttp gem's format).
    pub format: String,
    /// active_support: `marshal` (the gem's, the default) or `json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serializer: Option<String>,
    /// active_support: the digest the Ruby side's `KeyGenerator` derives
    /// keys with, `sha1` (the default) or `sha256` (Rails 7 apps, whose
    /// `load_defaults` set `key_generator_hash_digest_class` to SHA-256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_digest: Option<String>,
}

impl Default for EncryptionSettings {
    fn default() -> Self {
        EncryptionSettings {
            secrets: Vec::new(),
            format: "aes-gcm".to_owned(),
            serializer: None,
            key_digest: None,
        }
    }
}

/// Every setting of `patient serve`; see the module docs for how they are
/// layered and `docs/patient.toml` for each one's meaning and default.
///
/// Its `Debug` output leaves out the values that may be secret
/// (`api_token`, `webhook_secret`, passwords in URLs).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// API, dashboard, metrics and proxy routes (`127.0.0.1:8750`).
    pub listen: String,
    /// SQLite file and local state (`./patient-data`). With the SQLite
    /// queue in it, a running daemon holds it (an OS lock on the file
    /// `patient.lock` there, which names its pid): a second daemon on it
    /// refuses to start.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://…`; SQLite in `data_dir` when unset.
    /// A SQLite file elsewhere locks the directory of that file instead of
    /// `data_dir` (one daemon per SQLite queue); PostgreSQL locks nothing
    /// (several nodes share it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Bearer token for `/v1/*`; required to listen on a non-loopback
    /// address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
    /// `whsec_<base64>` webhook signing secret; generated once and stored in
    /// the database when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// For Redis and Sidekiq delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// The egress guard's exemptions.
    pub egress: EgressSettings,
    /// Seconds SIGTERM waits for in-flight attempts before releasing them
    /// to the queue (a request that may have reached its upstream and may
    /// not be sent again ends `Interrupted` instead).
    pub shutdown_timeout: f64,
    /// Largest API request body, bytes.
    pub max_body: u64,
    /// `Host` values the daemon answers (DNS rebinding); others get
    /// `403 forbidden`. An entry is a host name or address, with `:PORT` to
    /// allow that port only (any port without), `*.suffix` for every name
    /// under a domain, or `*` for any host. Unset: on a loopback listener
    /// `localhost`, `127.0.0.1` and `[::1]` (any port); elsewhere any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_hosts: Option<Vec<String>>,
    /// Seconds a client may take to send a request head (10); a kept-alive
    /// connection idle that long is closed too.
    pub header_timeout: f64,
    /// Seconds a request body may go without sending anything (30), on the
    /// API and on proxy routes: `408` and the connection is closed.
    pub body_timeout: f64,
    /// Seconds a response may wait for the client to take more of it (60):
    /// past it the connection is closed.
    pub send_timeout: f64,
    /// Open client connections at most; at the cap, the one that has waited
    /// longest for its request head is closed to make room. Unset: 10000,
    /// or half the open-files limit when that is less.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    /// Largest batch of `POST /v1/tasks/batch`.
    pub max_batch: u64,
    /// Seconds a claimed task or delivery stays with its node without a
    /// renewal (renewed every third of it).
    pub lease: f64,
    /// Seconds finished tasks are kept before they are purged.
    pub retention: f64,
    /// Requests in flight at once.
    pub max_in_flight: u64,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// The retry policy of submitted tasks.
    pub retry: RetrySettings,
    /// Outcome delivery.
    pub delivery: DeliverySettings,
    /// Named secrets requests refer to with `{"$secret": NAME}`.
    pub secrets: BTreeMap<String, SecretSource>,
    /// Where large payloads go.
    pub payload_store: PayloadStoreSettings,
    /// Encryption of stored and delivered payloads.
    pub encryption: EncryptionSettings,
    /// Proxy routes of the gateway, matched in order before the API.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSettings>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |set: bool| if set { Some("<redacted>") } else { None };
        let mut payload_store = self.payload_store.clone();
        payload_store.url = payload_store.url.as_deref().map(redact_url);
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("api_token", &hidden(self.api_token.is_some()))
            .field("webhook_secret", &hidden(self.webhook_secret.is_some()))
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("egress", &self.egress)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("max_body", &self.max_body)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_batch", &self.max_batch)
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .field("max_in_flight", &self.max_in_flight)
            .field("log_format", &self.log_format)
            .field("retry", &self.retry)
            .field("delivery", &self.delivery)
            .field("secrets", &self.secrets)
            .field("payload_store", &payload_store)
            .field("encryption", &self.encryption)
            .field("routes", &self.routes)
            .finish()
    }
}

/// `url` with its password replaced, for `Debug` output.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("<redacted>"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8750".to_owned(),
            data_dir: PathBuf::from("./patient-data"),
            database_url: None,
            api_token: None,
            webhook_secret: None,
            redis_url: None,
            egress: EgressSettings::default(),
            shutdown_timeout: 30.0,
            max_body: 16 * 1024 * 1024,
            allowed_hosts: None,
            header_timeout: 10.0,
            body_timeout: 30.0,
            send_timeout: 60.0,
            max_connections: None,
            max_batch: 1000,
            lease: 30.0,
            retention: 7.0 * 24.0 * 3600.0,
            max_in_flight: 1024,
            log_format: LogFormat::Text,
            retry: RetrySettings::default(),
            delivery: DeliverySettings::default(),
            secrets: BTreeMap::new(),
            payload_store: PayloadStoreSettings::default(),
            encryption: EncryptionSettings::default(),
            routes: Vec::new(),
        }
    }
}

/// Flags of `patient serve` that override settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    /// `--listen ADDR`.
    pub listen: Option<String>,
    /// `--data-dir DIR`.
    pub data_dir: Option<PathBuf>,
}

/// Which settings paths have numeric, boolean or list values, read from
/// the defaults: an environment value is parsed as that type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Float,
    Bool,
    List,
    Text,
}

/// The settings that have no default value (so are absent from the
/// defaults' JSON), with the type an environment value of each takes.
const OPTIONAL: &[(&str, Kind)] = &[
    ("database_url", Kind::Text),
    ("allowed_hosts", Kind::List),
    ("max_connections", Kind::Integer),
    ("api_token", Kind::Text),
    ("webhook_secret", Kind::Text),
    ("redis_url", Kind::Text),
    ("payload_store.kind", Kind::Text),
    ("payload_store.name", Kind::Text),
    ("payload_store.dir", Kind::Text),
    ("payload_store.url", Kind::Text),
    ("payload_store.prefix", Kind::Text),
    ("payload_store.ttl", Kind::Float),
    ("payload_store.bucket", Kind::Text),
    ("payload_store.endpoint", Kind::Text),
    ("payload_store.region", Kind::Text),
    ("payload_store.path_style", Kind::Bool),
    ("payload_store.access_key_id", Kind::Text),
    ("payload_store.secret_access_key", Kind::Text),
    ("payload_store.table", Kind::Text),
    ("encryption.serializer", Kind::Text),
    ("encryption.key_digest", Kind::Text),
];

/// The optional setting at `path`, if it is one.
fn optional_kind(path: &[String]) -> Option<Kind> {
    let dotted = path.join(".");
    OPTIONAL
        .iter()
        .find(|(name, _)| *name == dotted)
        .map(|(_, kind)| *kind)
}

fn kind_at(defaults: &Value, path: &[String]) -> Kind {
    if path.len() == 3 && path[0] == "secrets" && path[2] == "hosts" {
        return Kind::List;
    }
    if let Some(kind) = optional_kind(path) {
        return kind;
    }
    let mut node = defaults;
    for key in path {
        match node.get(key) {
            Some(next) => node = next,
            None => return Kind::Text,
        }
    }
    match node {
        Value::Bool(_) => Kind::Bool,
        Value::Number(n) if n.is_f64() => Kind::Float,
        Value::Number(_) => Kind::Integer,
        Value::Array(_) => Kind::List,
        _ => Kind::Text,
    }
}

/// Whether `path` names a setting (or a key under the secrets table).
fn is_setting(defaults: &Value, path: &[String]) -> bool {
    let Some(first) = path.first() else {
        return false;
    };
    if first == "secrets" {
        return path.len() == 3 && matches!(path[2].as_str(), "env" | "file" | "hosts");
    }
    let Some(Value::Object(top)) = Some(defaults) else {
        return false;
    };
    if optional_kind(path).is_some() {
        return true;
    }
    if path.len() == 1 {
        return top.contains_key(first);
    }
    matches!(top.get(first), Some(Value::Object(inner)) if path.len() == 2 && inner.contains_key(&path[1]))
}

impl Settings {
    /// The settings from the defaults, the TOML file at `file` (if any),
    /// the environment `env` (name and value pairs; pass
    /// `std::env::vars()`) and `flags`, checked.
    ///
    /// # Errors
    ///
    /// [`SettingsError`] naming the first bad setting and where it came from.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Flags,
    ) -> Result<Settings, SettingsError> {
        let defaults = serde_json::to_value(Settings::default()).unwrap_or(Value::Null);
        let mut merged = defaults.clone();
        let mut origins: BTreeMap<String, Origin> = BTreeMap::new();

        if let Some(path) = file {
            let origin = Origin::File(path.to_owned());
            let text = std::fs::read_to_string(path).map_err(|e| {
                SettingsError::new(
                    "config",
                    origin.clone(),
                    format!("cannot read the file: {e}"),
                )
            })?;
            let table: toml::Table = toml::from_str(&text).map_err(|e| {
                SettingsError::new("config", origin.clone(), one_line(&e.to_string()))
            })?;
            let value = serde_json::to_value(table)
                .map_err(|e| SettingsError::new("config", origin.clone(), e.to_string()))?;
            let mut paths = Vec::new();
            leaf_paths(&value, &mut Vec::new(), &mut paths);
            for path in paths {
                origins.insert(path, origin.clone());
            }
            merge(&mut merged, value);
        }

        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| {
                name.starts_with("PATIENT_") && !CLIENT_ENV.contains(&name.as_str())
            })
            .collect();
        env.sort();
        for (name, raw) in env {
            let path: Vec<String> = name["PATIENT_".len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            let dotted = path.join(".");
            let origin = Origin::Env(name.clone());
            if !is_setting(&defaults, &path) {
                tracing::warn!(variable = %name, "not a setting of patient serve; ignored");
                continue;
            }
            let value = typed(&raw, kind_at(&defaults, &path))
                .map_err(|message| SettingsError::new(dotted.clone(), origin.clone(), message))?;
            set_path(&mut merged, &path, value);
            origins.insert(dotted, origin);
        }

        if let Some(listen) = &flags.listen {
            merged["listen"] = Value::String(listen.clone());
            origins.insert("listen".into(), Origin::Flag("--listen"));
        }
        if let Some(dir) = &flags.data_dir {
            merged["data_dir"] = Value::String(dir.display().to_string());
            origins.insert("data_dir".into(), Origin::Flag("--data-dir"));
        }

        let origin_of = |setting: &str| {
            origins
                .get(setting)
                .cloned()
                .or_else(|| {
                    // A whole table from the file: the file.
                    origins
                        .iter()
                        .find(|(k, _)| k.starts_with(&format!("{setting}.")))
                        .map(|(_, o)| o.clone())
                })
                .unwrap_or(Origin::Default)
        };
        let settings: Settings = serde_json::from_value(merged.clone()).map_err(|e| {
            let message = e.to_string();
            let setting =
                failing_setting(&defaults, &merged).unwrap_or_else(|| "config".to_owned());
            SettingsError::new(setting.clone(), origin_of(&setting), message)
        })?;
        settings.check(&origin_of)?;
        Ok(settings)
    }

    /// Checks ranges and formats; `origin_of` says where a setting came from.
    fn check(&self, origin_of: &dyn Fn(&str) -> Origin) -> Result<(), SettingsError> {
        let fail = |setting: &str, message: String| {
            Err(SettingsError::new(setting, origin_of(setting), message))
        };
        if let Err((setting, message)) = check_routes(
            &self.routes,
            &|name| self.secrets.contains_key(name),
            self.api_token.is_some(),
        ) {
            return Err(SettingsError::new(setting, origin_of("routes"), message));
        }
        if let Err(e) = self.listen.parse::<SocketAddr>() {
            return fail(
                "listen",
                format!(
                    "{:?} is not an address and port such as 127.0.0.1:8750 ({e})",
                    self.listen
                ),
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            return fail("data_dir", "must not be empty".into());
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                return fail(
                    "database_url",
                    "must start with sqlite: or postgres:// (the value is not repeated here: it may hold a password)".into(),
                );
            }
        }
        if self.api_token.as_deref() == Some("") {
            return fail(
                "api_token",
                "must not be empty (leave it unset for no token)".into(),
            );
        }
        if let Some(secret) = &self.webhook_secret {
            if let Err(message) = crate::webhook_secret::decode(secret) {
                return fail("webhook_secret", message);
            }
        }
        if let Some(url) = &self.redis_url {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
            {
                return fail(
                    "redis_url",
                    "must start with redis://, rediss:// or unix://".into(),
                );
            }
        }
        for (i, entry) in self.allowed_hosts.iter().flatten().enumerate() {
            if let Err(message) = crate::access::check_host_pattern(entry, true) {
                return fail("allowed_hosts", format!("entry {i} {entry:?}: {message}"));
            }
        }
        for (i, entry) in self.egress.allow.iter().enumerate() {
            if let Err(message) = check_allow_entry(entry) {
                return fail("egress.allow", format!("entry {i} {entry:?}: {message}"));
            }
        }
        for (setting, value, min, max) in [
            ("shutdown_timeout", self.shutdown_timeout, 0.0, 86_400.0),
            ("header_timeout", self.header_timeout, 0.001, 3600.0),
            ("body_timeout", self.body_timeout, 0.001, 86_400.0),
            ("send_timeout", self.send_timeout, 0.001, 86_400.0),
            ("lease", self.lease, 1.0, 86_400.0),
            ("retention", self.retention, 0.0, 10.0 * 365.0 * 86_400.0),
            ("retry.base_delay", self.retry.base_delay, 0.0, 86_400.0),
            ("retry.factor", self.retry.factor, 1.0, 100.0),
            (
                "retry.max_delay",
                self.retry.max_delay,
                0.0,
                30.0 * 86_400.0,
            ),
            (
                "retry.max_retry_after",
                self.retry.max_retry_after,
                0.0,
                30.0 * 86_400.0,
            ),
            ("delivery.timeout", self.delivery.timeout, 0.001, 3600.0),
            (
                "delivery.base_delay",
                self.delivery.base_delay,
                0.0,
                86_400.0,
            ),
            (
                "delivery.max_delay",
                self.delivery.max_delay,
                0.0,
                30.0 * 86_400.0,
            ),
        ] {
            if !(value.is_finite() && (min..=max).contains(&value)) {
                return fail(setting, format!("{value} is outside {min} to {max}"));
            }
        }
        for (setting, value, min, max) in [
            ("max_body", self.max_body, 1024, 1 << 32),
            ("max_batch", self.max_batch, 1, 100_000),
            ("max_in_flight", self.max_in_flight, 1, 1_000_000),
            (
                "max_connections",
                self.max_connections.unwrap_or(1),
                1,
                10_000_000,
            ),
            (
                "retry.max_attempts",
                u64::from(self.retry.max_attempts),
                1,
                1000,
            ),
            (
                "delivery.max_attempts",
                u64::from(self.delivery.max_attempts),
                1,
                1000,
            ),
        ] {
            if !(min..=max).contains(&value) {
                return fail(setting, format!("{value} is outside {min} to {max}"));
            }
        }
        for (name, source) in &self.secrets {
            let setting = format!("secrets.{name}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return fail(
                    &setting,
                    "a secret's name is letters, digits, '_' and '-'".into(),
                );
            }
            match (&source.env, &source.file) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return fail(
                        &setting,
                        "give exactly one of env = \"VAR\" or file = \"PATH\"".into(),
                    )
                }
            }
            for (i, host) in source.hosts.iter().flatten().enumerate() {
                if let Err(message) = crate::access::check_host_pattern(host, false) {
                    return fail(
                        &format!("{setting}.hosts"),
                        format!("entry {i} {host:?}: {message}"),
                    );
                }
            }
        }
        self.check_payload_store(&fail)?;
        self.check_encryption(&fail)
    }

    /// Checks `[payload_store]`: a known kind, only its own keys, the
    /// values each needs.
    fn check_payload_store(
        &self,
        fail: &dyn Fn(&str, String) -> Result<(), SettingsError>,
    ) -> Result<(), SettingsError> {
        let store = &self.payload_store;
        let set = store.set_keys();
        let Some(kind) = store.kind.as_deref() else {
            if let Some(key) = set.first() {
                return fail(
                    &format!("payload_store.{key}"),
                    "needs payload_store.kind (file, redis, s3 or sql)".into(),
                );
            }
            if store.name.is_some() {
                return fail(
                    "payload_store.name",
                    "needs payload_store.kind (file, redis, s3 or sql)".into(),
                );
            }
            return Ok(());
        };
        let Some((_, keys)) = STORE_KEYS.iter().find(|(k, _)| *k == kind) else {
            return fail(
                "payload_store.kind",
                format!("{kind:?} is not one of file, redis, s3 or sql"),
            );
        };
        if let Some(key) = set.iter().find(|key| !keys.contains(key)) {
            return fail(
                &format!("payload_store.{key}"),
                format!(
                    "does not apply to kind = {kind:?} (its keys: {})",
                    keys.join(", ")
                ),
            );
        }
        if !(1..=1 << 30).contains(&store.threshold) {
            return fail(
                "payload_store.threshold",
                format!("{} is outside 1 to {}", store.threshold, 1u64 << 30),
            );
        }
        if let Some(name) = &store.name {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                return fail(
                    "payload_store.name",
                    "is 1 to 64 letters, digits, '_', '-' and '.'".into(),
                );
            }
        }
        let no_password = "(the value is not repeated here: it may hold a password)";
        match kind {
            "file" => {
                if store.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
                    return fail("payload_store.dir", "must not be empty".into());
                }
            }
            "redis" => {
                match (&store.url, &self.redis_url) {
                    (Some(url), _) => {
                        if !(url.starts_with("redis://")
                            || url.starts_with("rediss://")
                            || url.starts_with("unix://"))
                        {
                            return fail(
                                "payload_store.url",
                                format!(
                                    "must start with redis://, rediss:// or unix:// {no_password}"
                                ),
                            );
                        }
                    }
                    (None, Some(_)) => {}
                    (None, None) => {
                        return fail(
                            "payload_store.url",
                            "is required for kind = \"redis\" unless redis_url is set".into(),
                        )
                    }
                }
                if let Some(ttl) = store.ttl {
                    if !(ttl.is_finite() && (0.001..=10.0 * 365.0 * 86_400.0).contains(&ttl)) {
                        return fail(
                            "payload_store.ttl",
                            format!(
                                "{ttl} is outside 0.001 to {} seconds",
                                10.0 * 365.0 * 86_400.0
                            ),
                        );
                    }
                }
            }
            "s3" => {
                if store.bucket.as_deref().is_none_or(str::is_empty) {
                    return fail(
                        "payload_store.bucket",
                        "is required for kind = \"s3\"".into(),
                    );
                }
                if let Some(endpoint) = &store.endpoint {
                    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                        return fail(
                            "payload_store.endpoint",
                            "must be an http:// or https:// URL".into(),
                        );
                    }
                }
                if store.region.as_deref().is_some_and(str::is_empty) {
                    return fail("payload_store.region", "must not be empty".into());
                }
                for (key, name) in [
                    ("access_key_id", &store.access_key_id),
                    ("secret_access_key", &store.secret_access_key),
                ] {
                    let setting = format!("payload_store.{key}");
                    match name {
                        None => {
                            return fail(
                                &setting,
                                "is required for kind = \"s3\": the name of a [secrets] entry"
                                    .into(),
                            )
                        }
                        Some(name) if !self.secrets.contains_key(name) => {
                            return fail(&setting, format!("{name:?} is not a secret in [secrets]"))
                        }
                        Some(_) => {}
                    }
                }
            }
            _ => {
                let Some(url) = &store.url else {
                    return fail(
                        "payload_store.url",
                        "is required for kind = \"sql\": sqlite:PATH or postgres://…".into(),
                    );
                };
                if !(url.starts_with("sqlite:")
                    || url.starts_with("postgres://")
                    || url.starts_with("postgresql://"))
                {
                    return fail(
                        "payload_store.url",
                        format!("must start with sqlite: or postgres:// {no_password}"),
                    );
                }
            }
        }
        Ok(())
    }

    /// Checks `[encryption]`: a known format, a known serializer and key
    /// digest for `active_support` only, and secret names of `[secrets]`.
    fn check_encryption(
        &self,
        fail: &dyn Fn(&str, String) -> Result<(), SettingsError>,
    ) -> Result<(), SettingsError> {
        let encryption = &self.encryption;
        if !matches!(encryption.format.as_str(), "aes-gcm" | "active_support") {
            return fail(
                "encryption.format",
                format!(
                    "{:?} is not \"aes-gcm\" or \"active_support\"",
                    encryption.format
                ),
            );
        }
        if let Some(serializer) = &encryption.serializer {
            if encryption.format != "active_support" {
                return fail(
                    "encryption.serializer",
                    "applies only to format = \"active_support\"".into(),
                );
            }
            if !matches!(serializer.as_str(), "marshal" | "json") {
                return fail(
                    "encryption.serializer",
                    format!("{serializer:?} is not \"marshal\" or \"json\""),
                );
            }
        }
        if let Some(digest) = &encryption.key_digest {
            if encryption.format != "active_support" {
                return fail(
                    "encryption.key_digest",
                    "applies only to format = \"active_support\"".into(),
                );
            }
            if let Err(unknown) = digest.parse::<patient_store::activesupport::KeyDigest>() {
                return fail("encryption.key_digest", unknown.to_string());
            }
        }
        if encryption.secrets.is_empty()
            && (encryption.format != "aes-gcm"
                || encryption.serializer.is_some()
                || encryption.key_digest.is_some())
        {
            return fail(
                "encryption.secrets",
                "is empty: name the [secrets] entries that encrypt (the first) and decrypt".into(),
            );
        }
        for (i, name) in encryption.secrets.iter().enumerate() {
            if !self.secrets.contains_key(name) {
                return fail(
                    "encryption.secrets",
                    format!("{name:?} is not a secret in [secrets]"),
                );
            }
            if encryption.secrets[..i].contains(name) {
                return fail("encryption.secrets", format!("{name:?} is listed twice"));
            }
        }
        Ok(())
    }

    /// The listen address (checked by [`load`](Self::load)).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    /// `shutdown_timeout` as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_timeout)
    }

    /// `header_timeout` as a duration.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.header_timeout)
    }

    /// `body_timeout` as a duration.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.body_timeout)
    }

    /// `send_timeout` as a duration.
    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.send_timeout)
    }

    /// `max_connections`, or its default for this process's open-files
    /// limit.
    pub fn max_connections(&self) -> u64 {
        self.max_connections
            .unwrap_or_else(crate::listener::default_max_connections)
    }

    /// `lease` as a duration.
    pub fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease)
    }

    /// `retention` as a duration.
    pub fn retention(&self) -> Duration {
        Duration::from_secs_f64(self.retention)
    }

    /// The database URL: `database_url`, or the SQLite file in `data_dir`.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("patient.db").display()),
        }
    }

    /// Whether the listen address needs an API token (it is not loopback).
    pub fn needs_token(&self) -> bool {
        self.listen_addr().is_some_and(|a| !a.ip().is_loopback())
    }
}

/// An `egress.allow` entry: a CIDR, an address or a host name.
fn check_allow_entry(entry: &str) -> Result<(), String> {
    if entry.is_empty() {
        return Err("empty".into());
    }
    if let Some((addr, bits)) = entry.split_once('/') {
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits: u8 = bits
            .parse()
            .map_err(|_| format!("{bits:?} is not a prefix length"))?;
        if bits > max {
            return Err(format!("a prefix length is at most {max}"));
        }
        return Ok(());
    }
    if entry.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let valid = entry.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if valid && entry.len() <= 253 {
        Ok(())
    } else {
        Err("neither a CIDR, an IP address nor a host name".into())
    }
}

fn typed(raw: &str, kind: Kind) -> Result<Value, String> {
    let raw_trimmed = raw.trim();
    match kind {
        Kind::Text => Ok(Value::String(raw.to_owned())),
        Kind::Bool => match raw_trimmed {
            "true" | "1" | "yes" => Ok(Value::Bool(true)),
            "false" | "0" | "no" => Ok(Value::Bool(false)),
            _ => Err(format!("{raw:?} is not true or false")),
        },
        Kind::Integer => raw_trimmed
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| format!("{raw:?} is not a whole number")),
        Kind::Float => raw_trimmed
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Value::from)
            .ok_or_else(|| format!("{raw:?} is not a number")),
        Kind::List => Ok(Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        )),
    }
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (key, value) in from {
                match into.get_mut(&key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        merge(existing, value)
                    }
                    _ => {
                        into.insert(key, value);
                    }
                }
            }
        }
        (into, from) => *into = from,
    }
}

fn set_path(root: &mut Value, path: &[String], value: Value) {
    let mut node = root;
    for key in &path[..path.len() - 1] {
        if !node.get(key).is_some_and(Value::is_object) {
            node[key.as_str()] = Value::Object(serde_json::Map::new());
        }
        node = &mut node[key.as_str()];
    }
    node[path[path.len() - 1].as_str()] = value;
}

/// The first setting of `merged` that does not load on its own over the
/// defaults: the one a deserialization error is about (an unknown key, a
/// value of the wrong type), with its whole path (`payload_store.threshold`).
fn failing_setting(defaults: &Value, merged: &Value) -> Option<String> {
    let mut paths = Vec::new();
    leaf_paths(merged, &mut Vec::new(), &mut paths);
    paths.into_iter().find(|path| {
        let segments: Vec<String> = path.split('.').map(str::to_owned).collect();
        let mut value = merged;
        for key in &segments {
            value = &value[key.as_str()];
        }
        let mut trial = defaults.clone();
        set_path(&mut trial, &segments, value.clone());
        serde_json::from_value::<Settings>(trial).is_err()
    })
}

fn leaf_paths(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                prefix.push(key.clone());
                leaf_paths(value, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push(prefix.join(".")),
    }
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c.is_whitespace()))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "patient-settings-{}.toml",
            std::process::id() as u64 * 1000 + fastish()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn fastish() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn defaults_need_nothing() {
        let s = Settings::load(None, Vec::new(), &Flags::default()).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.listen, "127.0.0.1:8750");
        assert_eq!(
            s.database_url(),
            format!(
                "sqlite://{}",
                Path::new("./patient-data/patient.db").display()
            )
        );
        assert!(!s.needs_token());
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let path = file(
            "listen = \"127.0.0.1:9000\"\nlease = 12\nmax_batch = 7\n[egress]\nallow = [\"10.0.0.0/8\"]\n[retry]\nmax_attempts = 2\n[secrets.openai]\nenv = \"OPENAI_API_KEY\"\n",
        );
        let s = Settings::load(
            Some(&path),
            env(&[
                ("PATIENT_LEASE", "20"),
                ("PATIENT_EGRESS__ALLOW", "192.168.1.0/24, api.internal"),
                ("PATIENT_API_TOKEN", "12345"),
                ("PATIENT_URL", "http://ignored"),
                ("PATIENT_RETRY__BASE_DELAY", "0.5"),
                ("HOME", "/root"),
            ]),
            &Flags {
                listen: Some("127.0.0.1:0".into()),
                data_dir: None,
            },
        )
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:0");
        assert_eq!(s.lease, 20.0);
        assert_eq!(s.max_batch, 7);
        assert_eq!(s.egress.allow, ["192.168.1.0/24", "api.internal"]);
        assert_eq!(
            s.api_token.as_deref(),
            Some("12345"),
            "a number-looking token stays text"
        );
        assert_eq!(s.retry.max_attempts, 2);
        assert_eq!(s.retry.base_delay, 0.5);
        assert_eq!(
            s.retry.factor, 2.0,
            "the rest of the table keeps its defaults"
        );
        assert_eq!(s.secrets["openai"].env.as_deref(), Some("OPENAI_API_KEY"));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn errors_name_the_setting_and_its_origin() {
        let e =
            Settings::load(None, env(&[("PATIENT_LEASE", "soon")]), &Flags::default()).unwrap_err();
        assert_eq!(e.setting, "lease");
        assert_eq!(e.origin, Origin::Env("PATIENT_LEASE".into()));
        assert!(e.to_string().contains("not a number"), "{e}");

        let e =
            Settings::load(None, env(&[("PATIENT_LEASE", "0")]), &Flags::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "setting `lease` (from PATIENT_LEASE): 0 is outside 1 to 86400"
        );

        let e = Settings::load(
            None,
            Vec::new(),
            &Flags {
                listen: Some("localhost".into()),
                data_dir: None,
            },
        )
        .unwrap_err();
        assert_eq!(
            (e.setting.as_str(), &e.origin),
            ("listen", &Origin::Flag("--listen"))
        );

        let path = file("lease = 5\nmax_bodyy = 3\n");
        let e = Settings::load(Some(&path), Vec::new(), &Flags::default()).unwrap_err();
        assert_eq!(e.setting, "max_bodyy");
        assert_eq!(e.origin, Origin::File(path.clone()));
        assert!(e.message.contains("unknown field"), "{e}");
        let _ = std::fs::remove_file(path);

        let path = file("lease = \"long\"\n");
        let e = Settings::load(Some(&path), Vec::new(), &Flags::default()).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        let _ = std::fs::remove_file(path);

        let path = file("lease = [\n");
        let e = Settings::load(Some(&path), Vec::new(), &Flags::default()).unwrap_err();
        assert_eq!(e.setting, "config");
        assert!(!e.message.contains('\n'), "one line: {e}");
        let _ = std::fs::remove_file(path);

        let e = Settings::load(
            None,
            env(&[("PATIENT_EGRESS__ALLOW", "10.0.0.0/33")]),
            &Flags::default(),
        )
        .unwrap_err();
        assert_eq!(e.setting, "egress.allow");
        assert!(e.message.contains("at most 32"), "{e}");

        let e = Settings::load(
            None,
            env(&[("PATIENT_DATABASE_URL", "mysql://u:hunter2@db/x")]),
            &Flags::default(),
        )
        .unwrap_err();
        assert_eq!(e.setting, "database_url");
        assert!(!e.to_string().contains("hunter2"), "{e}");

        let e = Settings::load(
            None,
            env(&[("PATIENT_WEBHOOK_SECRET", "not-a-secret")]),
            &Flags::default(),
        )
        .unwrap_err();
        assert_eq!(e.setting, "webhook_secret");
    }

    #[test]
    fn the_example_config_documents_every_setting_at_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/patient.toml");
        let loaded = Settings::load(Some(&path), Vec::new(), &Flags::default()).unwrap();
        assert_eq!(
            loaded,
            Settings::default(),
            "the example states the defaults"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = serde_json::to_value(Settings::default()).unwrap();
        let mut paths = Vec::new();
        leaf_paths(&defaults, &mut Vec::new(), &mut paths);
        paths.extend(OPTIONAL.iter().map(|(name, _)| (*name).to_owned()));
        for path in paths {
            let key = path.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("{key} =")) || text.contains(&format!("# {key} =")),
                "docs/patient.toml does not document {path}"
            );
        }
    }

    #[test]
    fn payload_store_and_encryption_settings_load_from_file_and_env() {
        let path = file(
            "[secrets.payload_key]\nenv = \"PAYLOAD_KEY\"\n[secrets.old_key]\nfile = \"/run/old\"\n\
             [payload_store]\nkind = \"redis\"\nurl = \"redis://:hunter2@127.0.0.1:6379/1\"\nttl = 60\n\
             [encryption]\nsecrets = [\"payload_key\"]\n",
        );
        let s = Settings::load(
            Some(&path),
            env(&[
                ("PATIENT_PAYLOAD_STORE__THRESHOLD", "1024"),
                ("PATIENT_PAYLOAD_STORE__TTL", "0.5"),
                ("PATIENT_PAYLOAD_STORE__NAME", "shared"),
                ("PATIENT_ENCRYPTION__SECRETS", "payload_key, old_key"),
                ("PATIENT_ENCRYPTION__FORMAT", "active_support"),
                ("PATIENT_ENCRYPTION__SERIALIZER", "json"),
                ("PATIENT_ENCRYPTION__KEY_DIGEST", "sha256"),
            ]),
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(s.payload_store.kind.as_deref(), Some("redis"));
        assert_eq!(s.payload_store.threshold, 1024);
        assert_eq!(s.payload_store.ttl, Some(0.5));
        assert_eq!(s.payload_store.store_name(), Some("shared"));
        assert_eq!(s.encryption.secrets, ["payload_key", "old_key"]);
        assert_eq!(s.encryption.format, "active_support");
        assert_eq!(s.encryption.serializer.as_deref(), Some("json"));
        assert_eq!(s.encryption.key_digest.as_deref(), Some("sha256"));
        // No password in the Debug output.
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("payload_store"), "{debug}");
        let _ = std::fs::remove_file(path);

        let s = Settings::load(
            None,
            env(&[("PATIENT_PAYLOAD_STORE__KIND", "file")]),
            &Flags::default(),
        )
        .unwrap();
        assert_eq!(s.payload_store.store_name(), Some("file"));
        assert_eq!(s.payload_store.threshold, 65536);
    }

    #[test]
    fn bad_payload_store_and_encryption_settings_name_the_setting() {
        for (pairs, setting, words) in [
            (
                &[("PATIENT_PAYLOAD_STORE__KIND", "floppy")][..],
                "payload_store.kind",
                "\"floppy\" is not one of file, redis, s3 or sql",
            ),
            (
                &[
                    ("PATIENT_PAYLOAD_STORE__KIND", "file"),
                    ("PATIENT_PAYLOAD_STORE__THRESHOLD", "0"),
                ],
                "payload_store.threshold",
                "0 is outside 1 to",
            ),
            (
                &[
                    ("PATIENT_PAYLOAD_STORE__KIND", "file"),
                    ("PATIENT_PAYLOAD_STORE__THRESHOLD", "big"),
                ],
                "payload_store.threshold",
                "not a whole number",
            ),
            (
                &[("PATIENT_PAYLOAD_STORE__DIR", "/tmp/x")],
                "payload_store.dir",
                "needs payload_store.kind",
            ),
            (
                &[
                    ("PATIENT_PAYLOAD_STORE__KIND", "file"),
                    ("PATIENT_PAYLOAD_STORE__BUCKET", "b"),
                ],
                "payload_store.bucket",
                "does not apply to kind = \"file\"",
            ),
            (
                &[("PATIENT_PAYLOAD_STORE__KIND", "redis")],
                "payload_store.url",
                "unless redis_url is set",
            ),
            (
                &[
                    ("PATIENT_PAYLOAD_STORE__KIND", "sql"),
                    ("PATIENT_PAYLOAD_STORE__URL", "mysql://u:hunter2@db/x"),
                ],
                "payload_store.url",
                "must start with sqlite: or postgres://",
            ),
            (
                &[
                    ("PATIENT_PAYLOAD_STORE__KIND", "s3"),
                    ("PATIENT_PAYLOAD_STORE__BUCKET", "b"),
                    ("PATIENT_PAYLOAD_STORE__ACCESS_KEY_ID", "nope"),
                    ("PATIENT_PAYLOAD_STORE__SECRET_ACCESS_KEY", "nope"),
                ],
                "payload_store.access_key_id",
                "\"nope\" is not a secret in [secrets]",
            ),
            (
                &[
                    ("PATIENT_PAYLOAD_STORE__KIND", "redis"),
                    ("PATIENT_REDIS_URL", "redis://127.0.0.1/"),
                    ("PATIENT_PAYLOAD_STORE__TTL", "0"),
                ],
                "payload_store.ttl",
                "outside",
            ),
            (
                &[("PATIENT_ENCRYPTION__SECRETS", "missing")],
                "encryption.secrets",
                "\"missing\" is not a secret in [secrets]",
            ),
            (
                &[("PATIENT_ENCRYPTION__FORMAT", "rot13")],
                "encryption.format",
                "\"rot13\" is not",
            ),
            (
                &[("PATIENT_ENCRYPTION__SERIALIZER", "json")],
                "encryption.serializer",
                "applies only to format = \"active_support\"",
            ),
            (
                &[("PATIENT_ENCRYPTION__FORMAT", "active_support")],
                "encryption.secrets",
                "is empty",
            ),
            (
                &[("PATIENT_ENCRYPTION__KEY_DIGEST", "sha256")],
                "encryption.key_digest",
                "applies only to format = \"active_support\"",
            ),
            (
                &[
                    ("PATIENT_ENCRYPTION__FORMAT", "active_support"),
                    ("PATIENT_ENCRYPTION__KEY_DIGEST", "sha512"),
                ],
                "encryption.key_digest",
                "\"sha512\" is not \"sha1\" or \"sha256\"",
            ),
            (
                &[
                    ("PATIENT_ENCRYPTION__FORMAT", "active_support"),
                    ("PATIENT_ENCRYPTION__KEY_DIGEST", "SHA256"),
                ],
                "encryption.key_digest",
                "\"SHA256\" is not \"sha1\" or \"sha256\"",
            ),
            (
                &[
                    ("PATIENT_ENCRYPTION__FORMAT", "active_support"),
                    ("PATIENT_ENCRYPTION__KEY_DIGEST", "sha256"),
                ],
                "encryption.secrets",
                "is empty",
            ),
        ] {
            let e = Settings::load(None, env(pairs), &Flags::default()).unwrap_err();
            assert_eq!(e.setting, setting, "{pairs:?}: {e}");
            assert!(e.message.contains(words), "{pairs:?}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }

        // A file's unknown key or wrong type names the key with its table.
        let path = file("[payload_store]\nkind = \"file\"\nbuckt = \"x\"\n");
        let e = Settings::load(Some(&path), Vec::new(), &Flags::default()).unwrap_err();
        assert_eq!(e.setting, "payload_store.buckt", "{e}");
        assert_eq!(e.origin, Origin::File(path.clone()));
        let _ = std::fs::remove_file(path);
        let path = file("[payload_store]\nkind = \"file\"\nthreshold = \"big\"\n");
        let e = Settings::load(Some(&path), Vec::new(), &Flags::default()).unwrap_err();
        assert_eq!(e.setting, "payload_store.threshold", "{e}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn debug_output_hides_tokens_and_passwords() {
        let s = Settings::load(
            None,
            env(&[
                ("PATIENT_API_TOKEN", "tok-very-secret"),
                (
                    "PATIENT_WEBHOOK_SECRET",
                    "whsec_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=",
                ),
                ("PATIENT_REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0"),
            ]),
            &Flags::default(),
        )
        .unwrap();
        let debug = format!("{s:?}");
        for secret in ["tok-very-secret", "AQIDBAUGBwgJ", "hunter2"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("127.0.0.1:6379"), "{debug}");
    }

    #[test]
    fn unknown_environment_names_are_ignored_not_fatal() {
        let s = Settings::load(None, env(&[("PATIENT_LISTN", "x")]), &Flags::default()).unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn a_non_loopback_address_needs_a_token() {
        let s = Settings::load(
            None,
            env(&[("PATIENT_LISTEN", "0.0.0.0:8750")]),
            &Flags::default(),
        )
        .unwrap();
        assert!(s.needs_token());
    }
}
