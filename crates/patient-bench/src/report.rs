//! The `key=value` lines the programs print, and reading them back.

use std::fmt::{self, Display};

use crate::stats::Summary;

/// One output line: `bench=NAME key=value …`, fields in insertion order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Line {
    fields: Vec<(String, String)>,
}

impl Line {
    /// A line starting with `bench=NAME`.
    pub fn new(bench: &str) -> Line {
        Line {
            fields: vec![("bench".to_owned(), bench.to_owned())],
        }
    }

    /// Appends `key=value` with `value` as displayed (spaces become `_`).
    pub fn text(mut self, key: &str, value: impl Display) -> Line {
        self.fields
            .push((key.to_owned(), value.to_string().replace(' ', "_")));
        self
    }

    /// Appends `key=value` with `decimals` digits after the point.
    pub fn fixed(self, key: &str, value: f64, decimals: usize) -> Line {
        self.text(key, format!("{value:.decimals$}"))
    }

    /// Appends `key=value` rounded to an integer.
    pub fn round(self, key: &str, value: f64) -> Line {
        self.text(key, format!("{value:.0}"))
    }

    /// Appends the peak RSS of this process as `peak_rss_mb` (`na` without `/proc`).
    pub fn peak_rss(self) -> Line {
        match crate::rss::peak_rss_mb() {
            Some(mb) => self.fixed("peak_rss_mb", mb, 1),
            None => self.text("peak_rss_mb", "na"),
        }
    }

    /// Appends `p50_ms` and `p99_ms` of `summary` (`na` when it is empty).
    pub fn latency_ms(self, summary: &Summary) -> Line {
        if summary.count == 0 {
            return self.text("p50_ms", "na").text("p99_ms", "na");
        }
        self.fixed("p50_ms", summary.p50_ms(), 3)
            .fixed("p99_ms", summary.p99_ms(), 3)
    }

    /// Appends the CPU time (user + system) this process used so far as
    /// `cpu_s` (`na` without `/proc`).
    pub fn cpu(self) -> Line {
        match crate::rss::cpu_seconds() {
            Some(s) => self.fixed("cpu_s", s, 2),
            None => self.text("cpu_s", "na"),
        }
    }
}

impl Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

/// A line read back: its `key=value` fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    fields: Vec<(String, String)>,
}

impl Record {
    /// Reads the `key=value` words of `line`; other words are ignored.
    pub fn parse(line: &str) -> Record {
        Record {
            fields: line
                .split_whitespace()
                .filter_map(|word| word.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key` as a number.
    pub fn number(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(|v| v.parse().ok())
    }

    /// Whether the run finished: no `timeout=true` and no `error=` field.
    pub fn is_complete(&self) -> bool {
        self.get("timeout") != Some("true") && self.get("error").is_none()
    }
}

/// `a / b` for the ratio line, `None` when either is missing or `b` is zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// Appends `key=ratio` with three decimals, or `key=na`.
pub fn push_ratio(line: Line, key: &str, value: Option<f64>) -> Line {
    match value {
        Some(v) => line.fixed(key, v, 3),
        None => line.text(key, "na"),
    }
}

/// Appends `ratio_<name>=a/b` for each `(name, key)`: the value of `key` in
/// record `a` over its value in record `b`.
pub fn push_ratios(mut line: Line, a: &Record, b: &Record, pairs: &[(&str, &str)]) -> Line {
    for (name, key) in pairs {
        line = push_ratio(line, name, ratio(a.number(key), b.number(key)));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trips() {
        let line = Line::new("scale")
            .text("side", "hyper")
            .round("req_s", 1234.6)
            .fixed("wall_s", 2.5, 3)
            .text("note", "a b");
        let text = line.to_string();
        assert_eq!(
            text,
            "bench=scale side=hyper req_s=1235 wall_s=2.500 note=a_b"
        );
        let record = Record::parse(&text);
        assert_eq!(record.number("wall_s"), Some(2.5));
        assert_eq!(record.get("side"), Some("hyper"));
        assert!(record.is_complete());
        assert!(!Record::parse("bench=x timeout=true").is_complete());
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(1.0), Some(2.0)), Some(0.5));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(
            push_ratio(Line::new("x"), "r", None).to_string(),
            "bench=x r=na"
        );
    }
}
