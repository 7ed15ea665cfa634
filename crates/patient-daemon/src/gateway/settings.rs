//! The `[[routes]]` settings of the gateway, and their checks.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

/// One proxy route: which requests it takes, where it sends them and the
/// resilience around them. See `docs/patient.toml` for each setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// The route's name, in metrics and logs.
    pub name: String,
    /// Requests whose path starts with it take this route (matched before
    /// `/v1` and the dashboard). It may not shadow the daemon's own paths
    /// ([`OWN_PATHS`]): be one, start one (`/v`) or lie under one
    /// (`/v1/tasks/`, `/metrics/x`).
    pub path_prefix: String,
    /// Whether the prefix is taken off the path sent upstream (the leading
    /// `/` stays).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Only requests for this `Host` (without port, case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Only requests carrying each of these headers with this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_headers: BTreeMap<String, String>,
    /// The upstreams (`http://` or `https://` origins, optionally with a
    /// base path), each a URL or `{ url, weight }`.
    pub upstreams: Vec<UpstreamSetting>,
    /// How an upstream is picked.
    #[serde(default)]
    pub balance: Balance,
    /// Largest request body, bytes; 0 disables.
    #[serde(default = "default_max_request_body")]
    pub max_request_body: u64,
    /// Largest upstream response body, bytes; 0 disables.
    #[serde(default = "default_max_response_body")]
    pub max_response_body: u64,
    /// Seconds to the response head (each attempt).
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// Seconds between body bytes of a stream, and between two events of
    /// an event stream.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: f64,
    /// Seconds from the head of an event stream to its first content event
    /// (comments do not count); `timeout` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_event_timeout: Option<f64>,
    /// When a request takes the streaming path.
    #[serde(default)]
    pub stream: StreamMode,
    /// What marks the clean end of an event stream.
    #[serde(default)]
    pub stream_end: StreamEnd,
    /// What happens to the upstream request when the client goes away
    /// mid-stream.
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// Seconds a drained stream may go on after its client left.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: f64,
    /// Headers added to (or removed from) every request sent upstream.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    /// Headers added to (or removed from) every response sent back.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
    /// The name of a daemon secret sent upstream as the credential; the
    /// client's own `Authorization` is then not forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The header the credential goes in: `authorization` (as
    /// `Bearer <secret>`) or another name (the secret as is).
    #[serde(default = "default_credential_header")]
    pub credential_header: String,
    /// Who may call the route: `api_token` (the default for a route with a
    /// `credential`) asks for the daemon's API token, as
    /// `Authorization: Bearer TOKEN` (the scheme in any case) or
    /// `x-api-key: TOKEN`, and removes it before forwarding; `none` (the
    /// default without a credential) asks for nothing and forwards the
    /// caller's own `Authorization` as it is. A route with a `credential`
    /// and `auth = "none"` is refused, and so is an `api_token` route on a
    /// daemon without an `api_token`: nobody could call it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RouteAuth>,
    /// Attempts per upstream of a request that may be retried (idempotent
    /// methods; POST with an `Idempotency-Key`); 1 disables retries.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Seconds before the first retry (doubling up to 10 times it).
    #[serde(default = "default_retry_base_delay")]
    pub retry_base_delay: f64,
    /// The longest `Retry-After` waited for before a retry; a longer one
    /// passes the answer back.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after: f64,
    /// Consecutive failures that open an upstream's breaker; 0 disables.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// Seconds an open breaker stays open before a probe.
    #[serde(default = "default_breaker_duration")]
    pub breaker_duration: f64,
    /// Requests per second to each upstream (a token bucket); unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<f64>,
    /// The bucket's burst, with `rate_limit`.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Requests in flight at once to each upstream (streams included);
    /// unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u64>,
}

impl RouteSettings {
    /// Who may call the route, the default resolved: `api_token` with a
    /// `credential`, `none` without.
    pub fn auth(&self) -> RouteAuth {
        self.auth.unwrap_or(if self.credential.is_some() {
            RouteAuth::ApiToken
        } else {
            RouteAuth::None
        })
    }
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteAuth {
    /// The caller presents the daemon's API token (`Authorization: Bearer
    /// TOKEN` or `x-api-key: TOKEN`), which is removed before forwarding.
    ApiToken,
    /// Anyone who reaches the listener; the caller's `Authorization` goes
    /// upstream as it is.
    None,
}

/// An upstream of a route: a URL, or a URL with a weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UpstreamSetting {
    /// A URL of weight 1.
    Url(String),
    /// A URL and its weight.
    Weighted {
        /// The URL.
        url: String,
        /// Its share of requests, 1 to 1000.
        #[serde(default = "default_weight")]
        weight: u32,
    },
}

impl UpstreamSetting {
    /// The URL.
    pub fn url(&self) -> &str {
        match self {
            UpstreamSetting::Url(url) | UpstreamSetting::Weighted { url, .. } => url,
        }
    }

    /// The weight.
    pub fn weight(&self) -> u32 {
        match self {
            UpstreamSetting::Url(_) => 1,
            UpstreamSetting::Weighted { weight, .. } => *weight,
        }
    }
}

/// How a route picks an upstream. Upstreams whose breaker is open are
/// skipped either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// In turn, as often as their weights say (smooth weighted round
    /// robin).
    #[default]
    RoundRobin,
    /// The one with the fewest requests in flight (ties in turn).
    LeastInFlight,
}

/// When a request takes the streaming path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamMode {
    /// When its JSON body has `"stream": true` or it accepts
    /// `text/event-stream`.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never (every body is buffered).
    Never,
}

/// What marks the clean end of an event stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamEnd {
    /// A `data: [DONE]` event or a `finish_reason` (OpenAI style): a stream
    /// ending without one was cut, and the client gets an error event.
    #[default]
    Openai,
    /// The end of the body.
    Any,
}

/// What happens to the upstream request when the client leaves mid-stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// Cancelled at once (its connection closed).
    #[default]
    Cancel,
    /// Read on for up to `drain_timeout` seconds (and `max_response_body`
    /// bytes) so that its usage is still counted.
    Drain,
}

/// Headers to add and remove.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderRules {
    /// Set (replacing any value).
    pub add: BTreeMap<String, String>,
    /// Removed.
    pub remove: Vec<String>,
}

impl HeaderRules {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

fn default_max_request_body() -> u64 {
    1 << 20
}
fn default_max_response_body() -> u64 {
    8 << 20
}
fn default_timeout() -> f64 {
    60.0
}
fn default_idle_timeout() -> f64 {
    30.0
}
fn default_drain_timeout() -> f64 {
    30.0
}
fn default_credential_header() -> String {
    "authorization".to_owned()
}
fn default_max_attempts() -> u32 {
    2
}
fn default_retry_base_delay() -> f64 {
    0.1
}
fn default_max_retry_after() -> f64 {
    10.0
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_duration() -> f64 {
    10.0
}
fn default_burst() -> u32 {
    1
}
fn default_weight() -> u32 {
    1
}

/// The daemon's own paths, which no route may take: a prefix may be none
/// of them, a beginning of one (`/v`), or a path under one (`/v1/tasks/`,
/// `/metrics/x`). `/` is the dashboard, and a prefix of everything.
pub const OWN_PATHS: [&str; 6] = [
    "/",
    "/v1",
    "/metrics",
    "/healthz",
    "/readyz",
    "/openapi.json",
];

/// The daemon's path that `prefix` would shadow, if any.
fn shadowed(prefix: &str) -> Option<&'static str> {
    OWN_PATHS.into_iter().find(|own| {
        own.starts_with(prefix) || (*own != "/" && prefix.starts_with(&format!("{own}/")))
    })
}

/// Seconds as a duration, for a value [`check_routes`] accepted.
pub(crate) fn secs(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::MAX)
}

/// Checks every route; the error names the setting (`routes[1].upstreams`)
/// and says what is wrong. `secrets` are the names of the configured
/// secrets; `api_token` says whether the daemon has an API token.
pub fn check_routes(
    routes: &[RouteSettings],
    secrets: &dyn Fn(&str) -> bool,
    api_token: bool,
) -> Result<(), (String, String)> {
    let mut names = std::collections::BTreeSet::new();
    for (i, route) in routes.iter().enumerate() {
        let at = |field: &str| format!("routes[{i}].{field}");
        let fail = |field: &str, message: String| Err((at(field), message));
        if route.name.is_empty() {
            return fail("name", "must not be empty".into());
        }
        if !names.insert(route.name.as_str()) {
            return fail("name", format!("{:?} names two routes", route.name));
        }
        if !route.path_prefix.starts_with('/') {
            return fail(
                "path_prefix",
                format!("{:?} must start with /", route.path_prefix),
            );
        }
        if let Some(own) = shadowed(&route.path_prefix) {
            return fail(
                "path_prefix",
                format!(
                    "route {:?}: {:?} would take requests meant for the daemon's own {own}; give the route a prefix of its own",
                    route.name, route.path_prefix
                ),
            );
        }
        if route.upstreams.is_empty() {
            return fail("upstreams", "needs at least one upstream URL".into());
        }
        for (j, upstream) in route.upstreams.iter().enumerate() {
            let field = format!("upstreams[{j}]");
            match url::Url::parse(upstream.url()) {
                Ok(url)
                    if matches!(url.scheme(), "http" | "https")
                        && url.host_str().is_some_and(|h| !h.is_empty())
                        && url.query().is_none()
                        && url.fragment().is_none()
                        && url.username().is_empty() => {}
                Ok(_) => {
                    return fail(
                        &field,
                        format!(
                            "{:?} must be an http:// or https:// URL with a host and no query, fragment or credentials",
                            upstream.url()
                        ),
                    )
                }
                Err(e) => return fail(&field, format!("{:?} is not a URL: {e}", upstream.url())),
            }
            if !(1..=1000).contains(&upstream.weight()) {
                return fail(
                    &format!("{field}.weight"),
                    format!("{} is not from 1 to 1000", upstream.weight()),
                );
            }
        }
        for (field, value, min, max) in [
            ("timeout", route.timeout, 0.001, 86_400.0),
            ("idle_timeout", route.idle_timeout, 0.001, 86_400.0),
            (
                "first_event_timeout",
                route.first_event_timeout.unwrap_or(1.0),
                0.001,
                86_400.0,
            ),
            ("drain_timeout", route.drain_timeout, 0.0, 3600.0),
            ("retry_base_delay", route.retry_base_delay, 0.0, 60.0),
            ("max_retry_after", route.max_retry_after, 0.0, 3600.0),
            ("breaker_duration", route.breaker_duration, 0.001, 86_400.0),
            (
                "rate_limit",
                route.rate_limit.unwrap_or(1.0),
                0.001,
                1_000_000.0,
            ),
        ] {
            if !(value.is_finite() && (min..=max).contains(&value)) {
                return fail(field, format!("{value} is not from {min} to {max} seconds"));
            }
        }
        if !(1..=10).contains(&route.max_attempts) {
            return fail(
                "max_attempts",
                format!("{} is not from 1 to 10", route.max_attempts),
            );
        }
        if route.burst == 0 {
            return fail("burst", "must be at least 1".into());
        }
        if route.max_concurrency == Some(0) {
            return fail(
                "max_concurrency",
                "must be at least 1 (unset for no limit)".into(),
            );
        }
        for (field, rules) in [
            ("request_headers", &route.request_headers),
            ("response_headers", &route.response_headers),
        ] {
            for (name, value) in &rules.add {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return fail(
                        &format!("{field}.add"),
                        format!("{name:?} is not a header name"),
                    );
                }
                if http::HeaderValue::from_str(value).is_err() {
                    return fail(
                        &format!("{field}.add.{name}"),
                        "is not a valid header value".into(),
                    );
                }
            }
            for name in &rules.remove {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return fail(
                        &format!("{field}.remove"),
                        format!("{name:?} is not a header name"),
                    );
                }
            }
        }
        if let Some(secret) = &route.credential {
            if !secrets(secret) {
                return fail(
                    "credential",
                    format!("{secret:?} is not a configured secret (add it under [secrets])"),
                );
            }
        }
        match (route.auth(), &route.credential) {
            (RouteAuth::None, Some(secret)) => {
                return fail(
                    "auth",
                    format!(
                        "route {:?} sends the credential {secret:?} upstream but asks its callers for nothing (auth = \"none\"): anyone who reaches the listener would use the key; use auth = \"api_token\" (the default with a credential)",
                        route.name
                    ),
                )
            }
            (RouteAuth::ApiToken, _) if !api_token => {
                let why = if route.auth.is_some() {
                    "auth = \"api_token\""
                } else {
                    "auth = \"api_token\", the default for a route with a credential"
                };
                return fail(
                    "auth",
                    format!(
                        "route {:?} asks its callers for the daemon's API token ({why}), but api_token is not set, so nobody could call it; set api_token (PATIENT_API_TOKEN)",
                        route.name
                    ),
                );
            }
            _ => {}
        }
        if http::HeaderName::from_bytes(route.credential_header.as_bytes()).is_err() {
            return fail(
                "credential_header",
                format!("{:?} is not a header name", route.credential_header),
            );
        }
        for (name, value) in &route.match_headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                return fail(
                    "match_headers",
                    format!("{name:?} = {value:?} is not a header"),
                );
            }
        }
    }
    Ok(())
}
