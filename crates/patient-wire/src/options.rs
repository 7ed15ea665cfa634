//! Per-request resilience options: optional keys beside the gem's request
//! JSON, under `"options"`.
//!
//! A request without options serializes exactly as the gem's; the gem ignores
//! the key when it loads one with options. Every field is optional: what a
//! request leaves out comes from the upstream's or the processor's settings.
//! Durations, counts and keys are bounded by [`WireLimits`] (the `deadline`
//! by [`WireLimits::max_deadline`], each delay by [`WireLimits::max_delay`],
//! …), whether loaded or set in Rust and checked by
//! [`RequestBuilder::build`](crate::RequestBuilder::build).
//!
//! ```json
//! "options": {
//!   "retry": {"max_attempts": 3, "base_delay": 0.1, "factor": 2.0, "max_delay": 10.0,
//!             "statuses": [429, 503], "retry_unsafe": false},
//!   "strategy": "hedged",
//!   "hedge_delays": [0.05, 0.1],
//!   "deadline": 30.0,
//!   "deadline_mode": "split",
//!   "priority": "high",
//!   "idempotency_key": "order-17",
//!   "upstream_key": "openai"
//! }
//! ```

use std::{fmt, str::FromStr, time::Duration};

use serde_json::{Map, Value};

use crate::{
    fields::{bounded_seconds_from_json, index, join, seconds_to_json, Fields, Joined},
    limits::{Bound, LimitError, WireLimits},
    wire_error::{WireError, WireErrorKind},
};

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// Every accepted name, in order.
            pub const NAMES: &'static [&'static str] = &[$($text),*];

            /// The wire name.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($text => Ok($name::$variant),)*
                    _ => Err(format!(
                        "unknown {} {s:?} (expected one of {})",
                        stringify!($name).to_ascii_lowercase(),
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// How urgent a request is: orders dispatch when the processor is
    /// saturated, and travels upstream as `X-Request-Priority`.
    Priority {
        /// Dispatched before the others.
        High => "high",
        /// The default.
        Normal => "normal",
        /// Dispatched after the others.
        Low => "low",
    }
}

// The variants come from a macro, which cannot carry `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for Priority {
    fn default() -> Self {
        Priority::Normal
    }
}

wire_enum! {
    /// How the attempts of a request are made.
    Strategy {
        /// One attempt, never retried.
        Single => "single",
        /// Attempts one after another, with backoff between them.
        Sequential => "sequential",
        /// Attempt i starts after hedge delay i unless one has already
        /// succeeded; the first acceptable result wins, the rest are cancelled.
        Hedged => "hedged",
    }
}

wire_enum! {
    /// How a deadline is shared between attempts.
    DeadlineMode {
        /// Each attempt gets the remaining time divided by the attempts left.
        Split => "split",
        /// Each attempt may use all the remaining time.
        PassThrough => "pass_through",
    }
}

/// Retry settings of one request; unset fields come from the defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RetryOptions {
    /// Attempts in all, the first included (1 = no retries); at most
    /// [`WireLimits::max_attempts`].
    pub max_attempts: Option<u32>,
    /// Backoff before the first retry, before jitter; at most
    /// [`WireLimits::max_delay`].
    pub base_delay: Option<Duration>,
    /// Backoff growth per retry (at least 1).
    pub factor: Option<f64>,
    /// Largest backoff; at most [`WireLimits::max_delay`].
    pub max_delay: Option<Duration>,
    /// Response statuses that are retried.
    pub statuses: Option<Vec<u16>>,
    /// Retry methods that are not idempotent (POST, PATCH).
    pub retry_unsafe: Option<bool>,
}

impl RetryOptions {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == RetryOptions::default()
    }

    fn to_json(&self) -> Value {
        let mut map = Map::new();
        if let Some(n) = self.max_attempts {
            map.insert("max_attempts".into(), n.into());
        }
        if let Some(d) = self.base_delay {
            map.insert("base_delay".into(), seconds_to_json(d));
        }
        if let Some(f) = self.factor {
            map.insert("factor".into(), f.into());
        }
        if let Some(d) = self.max_delay {
            map.insert("max_delay".into(), seconds_to_json(d));
        }
        if let Some(s) = &self.statuses {
            map.insert("statuses".into(), s.clone().into());
        }
        if let Some(b) = self.retry_unsafe {
            map.insert("retry_unsafe".into(), b.into());
        }
        Value::Object(map)
    }

    /// Checks the options set in Rust against `limits`; `path` is where they
    /// sit, like `options.retry`.
    fn check_limits(&self, path: &str, limits: &WireLimits) -> Result<(), LimitError> {
        if let Some(n) = self.max_attempts {
            WireLimits::check_number(
                join(path, "max_attempts"),
                "max_attempts",
                limits.max_attempts.into(),
                n.into(),
            )?;
        }
        for (key, delay) in [
            ("base_delay", self.base_delay),
            ("max_delay", self.max_delay),
        ] {
            if let Some(d) = delay {
                WireLimits::check_duration(join(path, key), "max_delay", limits.max_delay, d)?;
            }
        }
        Ok(())
    }

    fn load(value: &Value, path: &str, limits: &WireLimits) -> Result<RetryOptions, WireError> {
        let fields = Fields::new(value, path)?;
        let max_attempts = match fields.opt_u64("max_attempts")? {
            None => None,
            Some(0) => return Err(out_of_range(fields.path_of("max_attempts"), 0)),
            Some(n) => {
                WireLimits::check_number(
                    fields.path_of("max_attempts"),
                    "max_attempts",
                    limits.max_attempts.into(),
                    n,
                )?;
                u32::try_from(n).ok()
            }
        };
        let factor = match fields.value("factor") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(f) if (1.0..=100.0).contains(&f) => Some(f),
                Some(f) => return Err(out_of_range(fields.path_of("factor"), f)),
                None => {
                    return Err(WireError::wrong_type(
                        fields.path_of("factor"),
                        "a number",
                        v,
                    ))
                }
            },
        };
        let statuses = match fields.value("statuses") {
            None => None,
            Some(Value::Array(items)) => {
                let path = fields.path_of("statuses");
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item.as_u64() {
                        Some(s @ 100..=599) => out.push(s as u16),
                        Some(s) => return Err(out_of_range(index(&path, i), s)),
                        None => {
                            return Err(WireError::wrong_type(
                                index(&path, i),
                                "a status code",
                                item,
                            ))
                        }
                    }
                }
                Some(out)
            }
            Some(v) => {
                return Err(WireError::wrong_type(
                    fields.path_of("statuses"),
                    "an array of status codes",
                    v,
                ))
            }
        };
        let retry_unsafe = match fields.value("retry_unsafe") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                return Err(WireError::wrong_type(
                    fields.path_of("retry_unsafe"),
                    "a boolean",
                    v,
                ))
            }
        };
        Ok(RetryOptions {
            max_attempts,
            base_delay: fields.opt_bounded_seconds("base_delay", "max_delay", limits.max_delay)?,
            factor,
            max_delay: fields.opt_bounded_seconds("max_delay", "max_delay", limits.max_delay)?,
            statuses,
            retry_unsafe,
        })
    }
}

// `factor` is a float, but loading and the policies reject NaN, so equality is total.
impl Eq for RetryOptions {}

/// The resilience options of one request. Every field is optional.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestOptions {
    /// Retry settings.
    pub retry: Option<RetryOptions>,
    /// How attempts are made; the default depends on the method.
    pub strategy: Option<Strategy>,
    /// Delays before each hedged attempt after the first (for `hedged`): at
    /// most [`WireLimits::max_hedge_delays`] of them, each at most
    /// [`WireLimits::max_delay`].
    pub hedge_delays: Vec<Duration>,
    /// One budget for the whole task: queue wait and every attempt; at most
    /// [`WireLimits::max_deadline`].
    pub deadline: Option<Duration>,
    /// How the deadline is shared between attempts.
    pub deadline_mode: Option<DeadlineMode>,
    /// Dispatch priority, sent upstream as `X-Request-Priority`.
    pub priority: Option<Priority>,
    /// An idempotency key: sent as `Idempotency-Key` (unless the request
    /// has that header already), and makes a non-idempotent method safe to
    /// retry, as a caller-set `Idempotency-Key` or `X-Idempotency-Key`
    /// header does too (see [`Request::has_idempotency_key`](crate::Request::has_idempotency_key)). At most
    /// [`WireLimits::max_key_len`] bytes.
    pub idempotency_key: Option<String>,
    /// The key of the upstream settings (breaker, limits, policy) this request
    /// uses instead of its scheme, host and port. At most
    /// [`WireLimits::max_key_len`] bytes.
    pub upstream_key: Option<String>,
}

impl Eq for RequestOptions {}

impl RequestOptions {
    /// Whether nothing is set (the request serializes without `options`).
    pub fn is_empty(&self) -> bool {
        *self == RequestOptions::default()
    }

    /// The `options` object; `null` when it would hold nothing (no option
    /// set, or only an empty `retry`).
    pub fn to_json(&self) -> Value {
        if self.is_empty() {
            return Value::Null;
        }
        let mut map = Map::new();
        if let Some(r) = self.retry.as_ref().filter(|r| !r.is_empty()) {
            map.insert("retry".into(), r.to_json());
        }
        if let Some(s) = self.strategy {
            map.insert("strategy".into(), s.as_str().into());
        }
        if !self.hedge_delays.is_empty() {
            map.insert(
                "hedge_delays".into(),
                Value::Array(
                    self.hedge_delays
                        .iter()
                        .map(|d| seconds_to_json(*d))
                        .collect(),
                ),
            );
        }
        if let Some(d) = self.deadline {
            map.insert("deadline".into(), seconds_to_json(d));
        }
        if let Some(m) = self.deadline_mode {
            map.insert("deadline_mode".into(), m.as_str().into());
        }
        if let Some(p) = self.priority {
            map.insert("priority".into(), p.as_str().into());
        }
        if let Some(k) = &self.idempotency_key {
            map.insert("idempotency_key".into(), k.clone().into());
        }
        if let Some(k) = &self.upstream_key {
            map.insert("upstream_key".into(), k.clone().into());
        }
        if map.is_empty() {
            return Value::Null;
        }
        Value::Object(map)
    }

    /// Loads an `options` object within [`WireLimits::default`]; the error
    /// names the offending path.
    pub fn from_json(value: &Value) -> Result<RequestOptions, WireError> {
        Self::from_json_with_limits(value, &WireLimits::default())
    }

    /// Loads an `options` object within `limits`.
    pub fn from_json_with_limits(
        value: &Value,
        limits: &WireLimits,
    ) -> Result<RequestOptions, WireError> {
        Self::load(value, "options", limits)
    }

    /// Checks options set in Rust against `limits`; `path` is where they sit
    /// (`options` in a request).
    pub(crate) fn check_limits(&self, path: &str, limits: &WireLimits) -> Result<(), LimitError> {
        if let Some(retry) = &self.retry {
            retry.check_limits(&join(path, "retry"), limits)?;
        }
        if !self.hedge_delays.is_empty() {
            let hedges_path = join(path, "hedge_delays");
            WireLimits::check_len(
                hedges_path.as_str(),
                "max_hedge_delays",
                Bound::Count(limits.max_hedge_delays),
                self.hedge_delays.len(),
            )?;
            for (i, d) in self.hedge_delays.iter().enumerate() {
                WireLimits::check_duration(
                    index(&hedges_path, i),
                    "max_delay",
                    limits.max_delay,
                    *d,
                )?;
            }
        }
        if let Some(d) = self.deadline {
            WireLimits::check_duration(
                Joined(path, "deadline"),
                "max_deadline",
                limits.max_deadline,
                d,
            )?;
        }
        for (key, value) in [
            ("idempotency_key", &self.idempotency_key),
            ("upstream_key", &self.upstream_key),
        ] {
            if let Some(k) = value {
                WireLimits::check_len(
                    Joined(path, key),
                    "max_key_len",
                    Bound::Bytes(limits.max_key_len),
                    k.len(),
                )?;
            }
        }
        Ok(())
    }

    pub(crate) fn load(
        value: &Value,
        path: &str,
        limits: &WireLimits,
    ) -> Result<RequestOptions, WireError> {
        if value.is_null() {
            return Ok(RequestOptions::default());
        }
        let fields = Fields::new(value, path)?;
        let retry = match fields.value("retry") {
            None => None,
            Some(v) => Some(RetryOptions::load(v, &fields.path_of("retry"), limits)?),
        };
        let hedge_delays = match fields.value("hedge_delays") {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let path = fields.path_of("hedge_delays");
                WireLimits::check_len(
                    path.as_str(),
                    "max_hedge_delays",
                    Bound::Count(limits.max_hedge_delays),
                    items.len(),
                )?;
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        bounded_seconds_from_json(
                            item,
                            &index(&path, i),
                            "max_delay",
                            limits.max_delay,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            Some(v) => {
                return Err(WireError::wrong_type(
                    fields.path_of("hedge_delays"),
                    "an array of seconds",
                    v,
                ))
            }
        };
        let key = |name: &str| -> Result<Option<String>, WireError> {
            let key = fields.opt_string(name)?;
            if let Some(k) = key {
                WireLimits::check_len(
                    fields.path_of(name),
                    "max_key_len",
                    Bound::Bytes(limits.max_key_len),
                    k.len(),
                )?;
            }
            Ok(key.map(str::to_owned))
        };
        let idempotency_key = key("idempotency_key")?;
        if idempotency_key.as_deref() == Some("") {
            return Err(WireError::new(
                fields.path_of("idempotency_key"),
                WireErrorKind::OutOfRange {
                    value: "\"\"".into(),
                },
            ));
        }
        Ok(RequestOptions {
            retry,
            strategy: named(&fields, "strategy")?,
            hedge_delays,
            deadline: fields.opt_bounded_seconds(
                "deadline",
                "max_deadline",
                limits.max_deadline,
            )?,
            deadline_mode: named(&fields, "deadline_mode")?,
            priority: named(&fields, "priority")?,
            idempotency_key,
            upstream_key: key("upstream_key")?,
        })
    }
}

fn named<T: FromStr + NamedValue>(fields: &Fields<'_>, key: &str) -> Result<Option<T>, WireError> {
    match fields.opt_string(key)? {
        None => Ok(None),
        Some(s) => s.parse::<T>().map(Some).map_err(|_| {
            WireError::new(
                fields.path_of(key),
                WireErrorKind::UnknownValue {
                    value: s.to_owned(),
                    expected: T::names(),
                },
            )
        }),
    }
}

trait NamedValue {
    fn names() -> &'static [&'static str];
}

impl NamedValue for Priority {
    fn names() -> &'static [&'static str] {
        Priority::NAMES
    }
}

impl NamedValue for Strategy {
    fn names() -> &'static [&'static str] {
        Strategy::NAMES
    }
}

impl NamedValue for DeadlineMode {
    fn names() -> &'static [&'static str] {
        DeadlineMode::NAMES
    }
}

fn out_of_range(path: String, value: impl fmt::Display) -> WireError {
    WireError::new(
        path,
        WireErrorKind::OutOfRange {
            value: value.to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn round_trip_and_empty() {
        assert_eq!(RequestOptions::default().to_json(), Value::Null);
        let v = json!({
            "retry": {"max_attempts": 4, "base_delay": 0.25, "factor": 2.0, "max_delay": 5,
                      "statuses": [429, 503], "retry_unsafe": true},
            "strategy": "hedged",
            "hedge_delays": [0.05, 0.1],
            "deadline": 30,
            "deadline_mode": "pass_through",
            "priority": "high",
            "idempotency_key": "k-1",
            "upstream_key": "openai"
        });
        let o = RequestOptions::from_json(&v).unwrap();
        assert_eq!(o.strategy, Some(Strategy::Hedged));
        assert_eq!(
            o.hedge_delays,
            vec![Duration::from_millis(50), Duration::from_millis(100)]
        );
        assert_eq!(o.retry.as_ref().unwrap().max_attempts, Some(4));
        assert_eq!(o.priority, Some(Priority::High));
        assert_eq!(RequestOptions::from_json(&o.to_json()).unwrap(), o);
    }

    #[test]
    fn options_that_write_nothing_are_left_out() {
        let empty_retry = RequestOptions {
            retry: Some(RetryOptions::default()),
            ..RequestOptions::default()
        };
        assert_eq!(empty_retry.to_json(), Value::Null);
        let request = crate::Request::get("http://h.example/")
            .request_options(empty_retry)
            .build()
            .unwrap();
        let wire = request.to_json();
        assert!(wire.get("options").is_none(), "{wire}");
        let again = crate::Request::from_json(&wire).unwrap();
        assert_eq!(again.to_json(), wire);
    }

    #[test]
    fn bad_values_name_their_path() {
        for (v, path) in [
            (json!({"priority": "urgent"}), "options.priority"),
            (json!({"strategy": 3}), "options.strategy"),
            (
                json!({"retry": {"max_attempts": 0}}),
                "options.retry.max_attempts",
            ),
            (json!({"retry": {"factor": 0.5}}), "options.retry.factor"),
            (
                json!({"retry": {"statuses": [200, 42]}}),
                "options.retry.statuses[1]",
            ),
            (
                json!({"hedge_delays": [0.1, "x"]}),
                "options.hedge_delays[1]",
            ),
            (json!({"deadline": -1}), "options.deadline"),
            (json!({"idempotency_key": ""}), "options.idempotency_key"),
        ] {
            let e = RequestOptions::from_json(&v).unwrap_err();
            assert_eq!(e.path(), path, "{v}: {e}");
        }
    }
}
