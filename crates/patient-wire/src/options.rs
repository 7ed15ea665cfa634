//! Per-request resilience options: optional keys beside the gem's request
//! JSON, under `"options"`.
//!
//! A request without options serializes exactly as the gem's; the gem ignores
//! the key when it loads one with options. Every field is optional: what a
//! request leaves out comes from the upstream's or the processor's settings.
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
    fields::{index, seconds_from_json, seconds_to_json, Fields},
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
    /// Attempts in all, the first included (1 = no retries).
    pub max_attempts: Option<u32>,
    /// Backoff before the first retry, before jitter.
    pub base_delay: Option<Duration>,
    /// Backoff growth per retry (at least 1).
    pub factor: Option<f64>,
    /// Largest backoff.
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

    fn load(value: &Value, path: &str) -> Result<RetryOptions, WireError> {
        let fields = Fields::new(value, path)?;
        let max_attempts = match fields.opt_u64("max_attempts")? {
            None => None,
            Some(n) if (1..=100).contains(&n) => Some(n as u32),
            Some(n) => return Err(out_of_range(fields.path_of("max_attempts"), n)),
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
            base_delay: fields.opt_seconds("base_delay")?,
            factor,
            max_delay: fields.opt_seconds("max_delay")?,
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
    /// Delays before each hedged attempt after the first (for `hedged`).
    pub hedge_delays: Vec<Duration>,
    /// One budget for the whole task: queue wait and every attempt.
    pub deadline: Option<Duration>,
    /// How the deadline is shared between attempts.
    pub deadline_mode: Option<DeadlineMode>,
    /// Dispatch priority, sent upstream as `X-Request-Priority`.
    pub priority: Option<Priority>,
    /// An idempotency key: sent as `Idempotency-Key`, and makes a
    /// non-idempotent method safe to retry.
    pub idempotency_key: Option<String>,
    /// The key of the upstream settings (breaker, limits, policy) this request
    /// uses instead of its scheme, host and port.
    pub upstream_key: Option<String>,
}

impl Eq for RequestOptions {}

impl RequestOptions {
    /// Whether nothing is set (the request serializes without `options`).
    pub fn is_empty(&self) -> bool {
        *self == RequestOptions::default()
    }

    /// The `options` object; `null` when empty.
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
        Value::Object(map)
    }

    /// Loads an `options` object; the error names the offending path.
    pub fn from_json(value: &Value) -> Result<RequestOptions, WireError> {
        Self::load(value, "options")
    }

    pub(crate) fn load(value: &Value, path: &str) -> Result<RequestOptions, WireError> {
        if value.is_null() {
            return Ok(RequestOptions::default());
        }
        let fields = Fields::new(value, path)?;
        let retry = match fields.value("retry") {
            None => None,
            Some(v) => Some(RetryOptions::load(v, &fields.path_of("retry"))?),
        };
        let hedge_delays = match fields.value("hedge_delays") {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let path = fields.path_of("hedge_delays");
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| seconds_from_json(item, &index(&path, i)))
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
        let idempotency_key = fields.opt_string("idempotency_key")?.map(str::to_owned);
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
            deadline: fields.opt_seconds("deadline")?,
            deadline_mode: named(&fields, "deadline_mode")?,
            priority: named(&fields, "priority")?,
            idempotency_key,
            upstream_key: fields.opt_string("upstream_key")?.map(str::to_owned),
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
