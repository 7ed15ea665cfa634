//! Bounds on what a wire value may hold, checked when one is loaded or built.
//!
//! Every field of a request, response, error or payload can come from the
//! network, so loading refuses values that would later cost unbounded memory
//! or time, or overflow: a timeout of 10¹⁹ seconds, a million hedges, a
//! gzipped body that inflates to gigabytes. [`WireLimits`] holds the bounds;
//! the default loaders ([`Request::from_json`](crate::Request::from_json),
//! [`Response::from_json`](crate::Response::from_json), …) and
//! [`RequestBuilder::build`](crate::RequestBuilder::build) use
//! [`WireLimits::default`], and the `*_with_limits` variants take others.
//!
//! ```
//! use patient_wire::{Request, WireLimits};
//! use serde_json::json;
//!
//! let wire = json!({"http_method": "get", "url": "https://a.example/", "timeout": 1.8e19});
//! let error = Request::from_json(&wire).unwrap_err();
//! assert_eq!(error.path(), "timeout");
//! assert_eq!(error.limit().map(|l| l.limit()), Some("max_timeout"));
//!
//! // A daemon that takes bodies of up to 1 MiB only:
//! let limits = WireLimits::default().with_max_body_size(1 << 20);
//! let big = json!({"http_method": "post", "url": "https://a.example/",
//!     "body": {"encoding": "text", "value": "x".repeat(2 << 20)}});
//! assert_eq!(Request::from_json_with_limits(&big, &limits).unwrap_err().path(), "body.value");
//! ```

use std::{fmt, time::Duration};

const MIB: usize = 1 << 20;
const KIB: usize = 1 << 10;
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The bounds a wire value must keep to, checked when a value is loaded
/// ([`Request::from_json_with_limits`](crate::Request::from_json_with_limits)
/// and the other `*_with_limits` loaders) or built
/// ([`RequestBuilder::build_with_limits`](crate::RequestBuilder::build_with_limits)).
/// A value outside them is refused with a [`LimitError`] naming the field,
/// the bound and the setting here that sets it.
///
/// Start from [`WireLimits::default`] and change what you need with the
/// `with_*` setters (or by assigning the fields). Sizes are in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WireLimits {
    /// The longest request `timeout`. Default: 1 day.
    pub max_timeout: Duration,
    /// The longest `options.deadline`. Default: 30 days.
    pub max_deadline: Duration,
    /// The longest delay of each `options.hedge_delays` entry and of
    /// `options.retry.base_delay` and `options.retry.max_delay`. Default: 1 day.
    pub max_delay: Duration,
    /// The most `options.hedge_delays`. Default: 10.
    pub max_hedge_delays: usize,
    /// The largest `options.retry.max_attempts`. Default: 100.
    pub max_attempts: u32,
    /// The largest request `max_redirects`. Default: 100.
    pub max_redirects: u32,
    /// The largest body, counted once decoded (after Base64 and gzip): a
    /// request's or a response's. A gzipped payload stops inflating as soon
    /// as it passes this. Default: 64 MiB.
    pub max_body_size: usize,
    /// The most request headers. Default: 256.
    pub max_headers: usize,
    /// The most bytes of all request header names and plain values
    /// together. Default: 64 KiB.
    pub max_headers_size: usize,
    /// The longest request header name. Default: 256 bytes.
    pub max_header_name_len: usize,
    /// The longest plain request header value. Default: 16 KiB.
    pub max_header_value_len: usize,
    /// The longest request URL, query included. Default: 64 KiB.
    pub max_url_len: usize,
    /// The most `secret_params`. Default: 64.
    pub max_secret_params: usize,
    /// The most `preprocessors`. Default: 16.
    pub max_preprocessors: usize,
    /// The longest `options.idempotency_key` and `options.upstream_key`.
    /// Default: 256 bytes.
    pub max_key_len: usize,
    /// The deepest nesting of arrays and objects in callback arguments (the
    /// arguments object itself is level 1). Default: 64.
    pub max_callback_args_depth: usize,
    /// The most bytes of callback arguments, as compact JSON. Default: 1 MiB.
    pub max_callback_args_size: usize,
}

impl Default for WireLimits {
    fn default() -> Self {
        Self {
            max_timeout: DAY,
            max_deadline: DAY * 30,
            max_delay: DAY,
            max_hedge_delays: 10,
            max_attempts: 100,
            max_redirects: 100,
            max_body_size: 64 * MIB,
            max_headers: 256,
            max_headers_size: 64 * KIB,
            max_header_name_len: 256,
            max_header_value_len: 16 * KIB,
            max_url_len: 64 * KIB,
            max_secret_params: 64,
            max_preprocessors: 16,
            max_key_len: 256,
            max_callback_args_depth: 64,
            max_callback_args_size: MIB,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $setter:ident => $field:ident: $ty:ty;)*) => {
        $($(#[$doc])*
        pub fn $setter(mut self, value: $ty) -> Self {
            self.$field = value;
            self
        })*
    };
}

impl WireLimits {
    setters! {
        /// Sets [`WireLimits::max_timeout`].
        with_max_timeout => max_timeout: Duration;
        /// Sets [`WireLimits::max_deadline`].
        with_max_deadline => max_deadline: Duration;
        /// Sets [`WireLimits::max_delay`].
        with_max_delay => max_delay: Duration;
        /// Sets [`WireLimits::max_hedge_delays`].
        with_max_hedge_delays => max_hedge_delays: usize;
        /// Sets [`WireLimits::max_attempts`].
        with_max_attempts => max_attempts: u32;
        /// Sets [`WireLimits::max_redirects`].
        with_max_redirects => max_redirects: u32;
        /// Sets [`WireLimits::max_body_size`].
        with_max_body_size => max_body_size: usize;
        /// Sets [`WireLimits::max_headers`].
        with_max_headers => max_headers: usize;
        /// Sets [`WireLimits::max_headers_size`].
        with_max_headers_size => max_headers_size: usize;
        /// Sets [`WireLimits::max_header_name_len`].
        with_max_header_name_len => max_header_name_len: usize;
        /// Sets [`WireLimits::max_header_value_len`].
        with_max_header_value_len => max_header_value_len: usize;
        /// Sets [`WireLimits::max_url_len`].
        with_max_url_len => max_url_len: usize;
        /// Sets [`WireLimits::max_secret_params`].
        with_max_secret_params => max_secret_params: usize;
        /// Sets [`WireLimits::max_preprocessors`].
        with_max_preprocessors => max_preprocessors: usize;
        /// Sets [`WireLimits::max_key_len`].
        with_max_key_len => max_key_len: usize;
        /// Sets [`WireLimits::max_callback_args_depth`].
        with_max_callback_args_depth => max_callback_args_depth: usize;
        /// Sets [`WireLimits::max_callback_args_size`].
        with_max_callback_args_size => max_callback_args_size: usize;
    }

    /// Checks a duration set in Rust against the bound of its field.
    pub(crate) fn check_duration(
        field: impl Into<String>,
        limit: &'static str,
        max: Duration,
        value: Duration,
    ) -> Result<(), LimitError> {
        if value <= max {
            return Ok(());
        }
        Err(LimitError::new(
            field,
            limit,
            Bound::Duration(max),
            Some(seconds_text(value)),
        ))
    }

    /// Checks a count or a size against its bound.
    pub(crate) fn check_len(
        field: impl Into<String>,
        limit: &'static str,
        bound: Bound,
        found: usize,
    ) -> Result<(), LimitError> {
        let within = match bound {
            Bound::Count(n) | Bound::Bytes(n) | Bound::Depth(n) => found <= n,
            Bound::Number(n) => u64::try_from(found).is_ok_and(|found| found <= n),
            Bound::Duration(_) => true,
        };
        if within {
            return Ok(());
        }
        Err(LimitError::new(
            field,
            limit,
            bound,
            Some(found.to_string()),
        ))
    }

    /// Checks a number (`max_redirects`, `max_attempts`) against its bound.
    pub(crate) fn check_number(
        field: impl Into<String>,
        limit: &'static str,
        max: u64,
        found: u64,
    ) -> Result<(), LimitError> {
        if found <= max {
            return Ok(());
        }
        Err(LimitError::new(
            field,
            limit,
            Bound::Number(max),
            Some(found.to_string()),
        ))
    }
}

/// A bound of [`WireLimits`], as a [`LimitError`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Bound {
    /// A number of seconds from 0 to this duration.
    Duration(Duration),
    /// At most this many entries (headers, hedge delays, …).
    Count(usize),
    /// A number at most this large (`max_redirects`, `max_attempts`).
    Number(u64),
    /// At most this many bytes.
    Bytes(usize),
    /// Nested at most this many levels deep.
    Depth(usize),
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Duration(d) => write!(f, "{} seconds", seconds_text(*d)),
            Bound::Count(n) => write!(f, "{n}"),
            Bound::Number(n) => write!(f, "{n}"),
            Bound::Bytes(n) => write!(f, "{n} bytes"),
            Bound::Depth(n) => write!(f, "{n} levels"),
        }
    }
}

/// A value outside one of the [`WireLimits`]: names the field, the bound,
/// and the [`WireLimits`] setting that sets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError {
    field: String,
    limit: &'static str,
    max: Bound,
    found: Option<String>,
}

impl LimitError {
    pub(crate) fn new(
        field: impl Into<String>,
        limit: &'static str,
        max: Bound,
        found: Option<String>,
    ) -> Self {
        Self {
            field: field.into(),
            limit,
            max,
            found,
        }
    }

    /// The same error for a field at another path.
    pub(crate) fn at(mut self, field: impl Into<String>) -> Self {
        self.field = field.into();
        self
    }

    /// The offending field, like `timeout`, `options.hedge_delays[2]`,
    /// `headers.x-long` or `body`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The name of the [`WireLimits`] field whose bound was broken, like
    /// `"max_timeout"`.
    pub fn limit(&self) -> &'static str {
        self.limit
    }

    /// The bound that was broken.
    pub fn max(&self) -> Bound {
        self.max
    }

    /// What was found, as text (seconds, a count or a size), when known: a
    /// gzipped body is not inflated past the bound, so its size is not.
    pub fn found(&self) -> Option<&str> {
        self.found.as_deref()
    }

    /// What is wrong, without the field's name.
    pub(crate) fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = self.limit;
        match (&self.max, &self.found) {
            (Bound::Duration(_), Some(found)) => write!(
                f,
                "{found} seconds is not between 0 and the maximum of {} (`{limit}`)",
                self.max
            ),
            (Bound::Duration(_), None) => write!(
                f,
                "must be between 0 and the maximum of {} (`{limit}`)",
                self.max
            ),
            (Bound::Count(_), Some(found)) => write!(
                f,
                "{found} entries are more than the maximum of {} (`{limit}`)",
                self.max
            ),
            (Bound::Number(_), Some(found)) => write!(
                f,
                "{found} is more than the maximum of {} (`{limit}`)",
                self.max
            ),
            (Bound::Bytes(_), Some(found)) => write!(
                f,
                "{found} bytes are more than the maximum of {} (`{limit}`)",
                self.max
            ),
            (Bound::Depth(_), _) => write!(
                f,
                "nests deeper than the maximum of {} (`{limit}`)",
                self.max
            ),
            (_, _) => write!(f, "is larger than the maximum of {} (`{limit}`)", self.max),
        }
    }
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: ", self.field)?;
        self.describe(f)
    }
}

impl std::error::Error for LimitError {}

/// Seconds as the shortest text: `86400`, `0.25`, `18000000000000000000`.
fn seconds_text(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        d.as_secs_f64().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_field_the_bound_and_the_setting() {
        let e = WireLimits::check_duration(
            "timeout",
            "max_timeout",
            DAY,
            Duration::from_secs(18_000_000_000_000_000_000),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`timeout`: 18000000000000000000 seconds is not between 0 and the maximum of \
             86400 seconds (`max_timeout`)"
        );
        let e =
            WireLimits::check_len("headers", "max_headers", Bound::Count(256), 300).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`headers`: 300 entries are more than the maximum of 256 (`max_headers`)"
        );
        assert!(WireLimits::check_len("url", "max_url_len", Bound::Bytes(10), 10).is_ok());
        let e = LimitError::new("body.value", "max_body_size", Bound::Bytes(1024), None);
        assert_eq!(
            e.to_string(),
            "`body.value`: is larger than the maximum of 1024 bytes (`max_body_size`)"
        );
    }
}
