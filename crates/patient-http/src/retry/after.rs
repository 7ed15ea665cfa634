//! Server-given delays: `Retry-After` and rate-limit reset headers.
//!
//! Every parser here is total: a value that does not parse is skipped, never
//! an error and never a panic, because these headers come from the network.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header::RETRY_AFTER, HeaderMap};

const NANOS_PER_SEC: u128 = 1_000_000_000;
const NANOS_PER_MILLI: u128 = 1_000_000;
const NANOS_PER_MICRO: u128 = 1_000;

/// An `x-ratelimit-reset` value above this many seconds is a Unix time, not
/// a delay (1,000,000,000 s is September 2001).
const EPOCH_THRESHOLD_SECS: u128 = 1_000_000_000;

/// The IETF draft header: seconds until the quota resets.
const RATELIMIT_RESET: &str = "ratelimit-reset";
/// GitHub, Twitter and many others: a Unix time, or seconds on some servers.
const X_RATELIMIT_RESET: &str = "x-ratelimit-reset";
/// OpenAI: a Go duration until the request quota resets.
const X_RATELIMIT_RESET_REQUESTS: &str = "x-ratelimit-reset-requests";
/// OpenAI: a Go duration until the token quota resets.
const X_RATELIMIT_RESET_TOKENS: &str = "x-ratelimit-reset-tokens";

/// How long the server asked us to wait, if it said.
///
/// The `Retry-After` header when it holds a usable value
/// ([`retry_after_header`]), otherwise the largest of the rate-limit reset
/// headers ([`rate_limit_reset`]). `now` is the wall-clock time the response
/// arrived, for the headers that carry a date.
///
/// ```
/// use std::time::{Duration, SystemTime};
///
/// use http::HeaderMap;
/// use patient_http::retry::retry_after;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "120".parse()?);
/// assert_eq!(retry_after(&headers, SystemTime::now()), Some(Duration::from_secs(120)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    retry_after_header(headers, now).or_else(|| rate_limit_reset(headers, now))
}

/// The `Retry-After` header alone: delta-seconds (`"120"`, fractions
/// tolerated) or an HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`, and the
/// obsolete RFC 850 and asctime forms). A date in the past means zero. The
/// first value that parses wins; the rest are skipped.
pub fn retry_after_header(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    headers
        .get_all(RETRY_AFTER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(|value| parse_retry_after(value.trim(), now))
}

/// The largest delay among the rate-limit reset headers present:
///
/// * `ratelimit-reset`: delta seconds;
/// * `x-ratelimit-reset`: a Unix time in seconds when above 1,000,000,000,
///   otherwise delta seconds (fractions allowed in both; a past time means
///   zero);
/// * `x-ratelimit-reset-requests` and `x-ratelimit-reset-tokens`: a Go
///   duration as OpenAI sends them (`"1s"`, `"6m0s"`, `"250ms"`,
///   `"1h2m3.5s"`).
///
/// Values that do not parse are skipped.
pub fn rate_limit_reset(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let ietf = values(headers, RATELIMIT_RESET).filter_map(parse_seconds);
    let x_reset = values(headers, X_RATELIMIT_RESET).filter_map(|v| parse_reset(v, now));
    let openai = values(headers, X_RATELIMIT_RESET_REQUESTS)
        .chain(values(headers, X_RATELIMIT_RESET_TOKENS))
        .filter_map(parse_go_duration);
    ietf.chain(x_reset).chain(openai).max()
}

/// The trimmed, visible-ASCII values of header `name`.
fn values<'a>(headers: &'a HeaderMap, name: &'static str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
}

fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Some(delay) = parse_seconds(value) {
        return Some(delay);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(until(at, now))
}

/// `x-ratelimit-reset`: epoch seconds above the threshold, else delta seconds.
fn parse_reset(value: &str, now: SystemTime) -> Option<Duration> {
    let nanos = parse_decimal(value, NANOS_PER_SEC)?;
    if nanos > EPOCH_THRESHOLD_SECS * NANOS_PER_SEC {
        let at = UNIX_EPOCH.checked_add(duration_from_nanos(nanos))?;
        Some(until(at, now))
    } else {
        Some(duration_from_nanos(nanos))
    }
}

/// Non-negative decimal seconds: `"30"`, `"1.5"`.
fn parse_seconds(value: &str) -> Option<Duration> {
    parse_decimal(value, NANOS_PER_SEC).map(duration_from_nanos)
}

/// A Go duration (`"1h2m3.5s"`, `"250ms"`, `"0"`), non-negative only; a bare
/// number is taken as seconds.
fn parse_go_duration(value: &str) -> Option<Duration> {
    let value = value.strip_prefix('+').unwrap_or(value);
    if value.is_empty() {
        return None;
    }
    if let Some(delay) = parse_seconds(value) {
        return Some(delay);
    }
    let is_number = |c: char| c.is_ascii_digit() || c == '.';
    let mut total: u128 = 0;
    let mut rest = value;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !is_number(c)).unwrap_or(rest.len());
        if number_end == 0 {
            return None;
        }
        let (number, after) = rest.split_at(number_end);
        let unit_end = after.find(is_number).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let unit_nanos = match unit {
            "h" => 3_600 * NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "s" => NANOS_PER_SEC,
            "ms" => NANOS_PER_MILLI,
            "us" | "\u{b5}s" | "\u{3bc}s" => NANOS_PER_MICRO,
            "ns" => 1,
            _ => return None,
        };
        total = total.saturating_add(parse_decimal(number, unit_nanos)?);
        rest = next;
    }
    Some(duration_from_nanos(total))
}

/// A non-negative decimal number of `unit_nanos` units, in nanoseconds,
/// without going through floating point. Saturates instead of overflowing;
/// fraction digits past the 18th are ignored.
fn parse_decimal(value: &str, unit_nanos: u128) -> Option<u128> {
    let (whole, fraction) = match value.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (value, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let whole_units = whole.bytes().fold(0u128, |acc, b| {
        acc.saturating_mul(10).saturating_add(u128::from(b - b'0'))
    });
    let fraction = &fraction[..fraction.len().min(18)];
    let (numerator, denominator) = fraction.bytes().fold((0u128, 1u128), |(n, d), b| {
        (n * 10 + u128::from(b - b'0'), d * 10)
    });
    Some(
        whole_units
            .saturating_mul(unit_nanos)
            .saturating_add(numerator * unit_nanos / denominator),
    )
}

fn duration_from_nanos(nanos: u128) -> Duration {
    match u64::try_from(nanos / NANOS_PER_SEC) {
        // The remainder is below 10⁹, so it fits.
        Ok(secs) => Duration::new(secs, (nanos % NANOS_PER_SEC) as u32),
        Err(_) => Duration::MAX,
    }
}

/// The time from `now` to `at`, zero when `at` has passed.
fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    /// 2026-11-15T12:00:00Z.
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_794_744_000)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn after(pairs: &[(&'static str, &str)]) -> Option<Duration> {
        retry_after(&headers(pairs), now())
    }

    fn secs(n: u64) -> Option<Duration> {
        Some(Duration::from_secs(n))
    }

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn no_headers_no_delay() {
        assert_eq!(after(&[]), None);
        assert_eq!(after(&[("content-type", "text/plain")]), None);
    }

    #[test]
    fn retry_after_delta_seconds() {
        assert_eq!(after(&[("retry-after", "120")]), secs(120));
        assert_eq!(after(&[("retry-after", "0")]), secs(0));
        assert_eq!(after(&[("retry-after", " 7 ")]), secs(7));
        assert_eq!(after(&[("retry-after", "1.5")]), ms(1500));
    }

    #[test]
    fn retry_after_http_date() {
        let at = now() + Duration::from_secs(90);
        let date = httpdate::fmt_http_date(at);
        assert_eq!(after(&[("retry-after", &date)]), secs(90));
        // The obsolete forms the RFC still asks recipients to accept.
        assert_eq!(
            after(&[("retry-after", "Sunday, 15-Nov-26 12:01:00 GMT")]),
            secs(60)
        );
        assert_eq!(
            after(&[("retry-after", "Sun Nov 15 12:00:30 2026")]),
            secs(30)
        );
    }

    #[test]
    fn retry_after_date_in_the_past_is_zero() {
        let date = httpdate::fmt_http_date(now() - Duration::from_secs(3_600));
        assert_eq!(after(&[("retry-after", &date)]), secs(0));
    }

    #[test]
    fn retry_after_garbage_is_ignored() {
        for garbage in [
            "",
            "soon",
            "-5",
            "1e3",
            "12abc",
            ".",
            "1..2",
            "+3",
            "Wed, 99 Foo 2015",
        ] {
            assert_eq!(after(&[("retry-after", garbage)]), None, "{garbage:?}");
        }
        // Non-ASCII bytes are not a `str`.
        let mut map = HeaderMap::new();
        map.insert(RETRY_AFTER, HeaderValue::from_bytes(b"\xff10").unwrap());
        assert_eq!(retry_after(&map, now()), None);
    }

    #[test]
    fn retry_after_garbage_falls_through_to_reset_headers() {
        assert_eq!(
            after(&[("retry-after", "later"), ("ratelimit-reset", "4")]),
            secs(4)
        );
    }

    #[test]
    fn first_usable_retry_after_wins() {
        assert_eq!(
            after(&[
                ("retry-after", "nope"),
                ("retry-after", "3"),
                ("retry-after", "9")
            ]),
            secs(3)
        );
    }

    #[test]
    fn huge_retry_after_saturates() {
        assert_eq!(
            after(&[("retry-after", "99999999999999999999999999999999999999999")]),
            Some(Duration::MAX)
        );
    }

    #[test]
    fn retry_after_beats_reset_headers() {
        assert_eq!(
            after(&[("retry-after", "2"), ("x-ratelimit-reset-requests", "1m")]),
            secs(2)
        );
    }

    #[test]
    fn ietf_ratelimit_reset_is_delta_seconds() {
        assert_eq!(after(&[("ratelimit-reset", "50")]), secs(50));
        assert_eq!(after(&[("ratelimit-reset", "0.25")]), ms(250));
        assert_eq!(after(&[("ratelimit-reset", "x")]), None);
    }

    #[test]
    fn x_ratelimit_reset_epoch_seconds() {
        let epoch = (now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 42).to_string();
        assert_eq!(after(&[("x-ratelimit-reset", &epoch)]), secs(42));
        let fractional = format!("{epoch}.5");
        assert_eq!(after(&[("x-ratelimit-reset", &fractional)]), ms(42_500));
        let past = (now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 10).to_string();
        assert_eq!(after(&[("x-ratelimit-reset", &past)]), secs(0));
    }

    #[test]
    fn x_ratelimit_reset_small_values_are_delta_seconds() {
        assert_eq!(after(&[("x-ratelimit-reset", "30")]), secs(30));
        assert_eq!(after(&[("x-ratelimit-reset", "1.25")]), ms(1250));
        assert_eq!(
            after(&[("x-ratelimit-reset", "1000000000")]),
            secs(1_000_000_000)
        );
        assert_eq!(after(&[("x-ratelimit-reset", "-1")]), None);
    }

    #[test]
    fn openai_reset_requests_and_tokens() {
        assert_eq!(after(&[("x-ratelimit-reset-requests", "1s")]), secs(1));
        assert_eq!(after(&[("x-ratelimit-reset-requests", "6m0s")]), secs(360));
        assert_eq!(after(&[("x-ratelimit-reset-tokens", "250ms")]), ms(250));
        assert_eq!(
            after(&[("x-ratelimit-reset-tokens", "1h2m3.5s")]),
            ms(3_723_500)
        );
    }

    #[test]
    fn go_durations() {
        let go = |s: &str| parse_go_duration(s);
        assert_eq!(go("0"), Some(Duration::ZERO));
        assert_eq!(go("0s"), Some(Duration::ZERO));
        assert_eq!(go("+2s"), secs(2));
        assert_eq!(go("1.5h"), secs(5_400));
        assert_eq!(go("17ms"), ms(17));
        assert_eq!(go("20us"), Some(Duration::from_micros(20)));
        assert_eq!(go("20\u{b5}s"), Some(Duration::from_micros(20)));
        assert_eq!(go("20\u{3bc}s"), Some(Duration::from_micros(20)));
        assert_eq!(go("5ns"), Some(Duration::from_nanos(5)));
        assert_eq!(go("2.5"), ms(2_500));
        assert_eq!(go("1m30s500ms"), ms(90_500));
        for garbage in [
            "", "s", "1x", "1m30", "-1s", "1 s", "h1", "1.2.3s", "..s", "∞",
        ] {
            assert_eq!(go(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn the_largest_reset_header_wins() {
        assert_eq!(
            after(&[
                ("x-ratelimit-reset-requests", "2s"),
                ("x-ratelimit-reset-tokens", "6m0s"),
                ("ratelimit-reset", "30"),
                ("x-ratelimit-reset", "45"),
            ]),
            secs(360)
        );
        assert_eq!(
            after(&[
                ("x-ratelimit-reset-requests", "garbage"),
                ("x-ratelimit-reset-tokens", "3s"),
            ]),
            secs(3)
        );
    }

    #[test]
    fn retry_after_header_ignores_reset_headers() {
        let map = headers(&[("ratelimit-reset", "5")]);
        assert_eq!(retry_after_header(&map, now()), None);
        assert_eq!(rate_limit_reset(&map, now()), secs(5));
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_decimal("0.1", NANOS_PER_SEC), Some(100_000_000));
        assert_eq!(parse_decimal("3.", NANOS_PER_SEC), Some(3 * NANOS_PER_SEC));
        assert_eq!(parse_decimal(".5", NANOS_PER_SEC), Some(NANOS_PER_SEC / 2));
        assert_eq!(
            parse_decimal("0.1234567891234567891234", NANOS_PER_SEC),
            Some(123_456_789)
        );
        assert_eq!(parse_decimal("", NANOS_PER_SEC), None);
        assert_eq!(parse_decimal(".", NANOS_PER_SEC), None);
    }
}
