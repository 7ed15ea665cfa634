//! Hand-parsed command-line arguments: `--flag VALUE`, `--flag=VALUE` and
//! switches, checked against the flags a program knows.

use std::{fmt, str::FromStr};

/// Flags with a value that every benchmark program accepts.
///
/// `--side` and `--deadline-ms` are passed by the parent to its children.
pub const COMMON_VALUE_FLAGS: &[&str] = &[
    "--url",
    "--timeout-s",
    "--only",
    "--rounds",
    "--side",
    "--deadline-ms",
];

/// Switches (flags without a value) that every benchmark program accepts.
pub const COMMON_SWITCHES: &[&str] = &["--upstream-child", "--help", "-h"];

/// Why the arguments were rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArgError {
    /// A flag the program does not know.
    Unknown(String),
    /// A flag that needs a value came last.
    MissingValue(String),
    /// A value that does not parse.
    Invalid {
        /// The flag.
        flag: String,
        /// The value given.
        value: String,
    },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::Unknown(flag) => write!(f, "unknown argument {flag:?}"),
            ArgError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            ArgError::Invalid { flag, value } => write!(f, "{flag}: invalid value {value:?}"),
        }
    }
}

impl std::error::Error for ArgError {}

/// Parsed arguments.
#[derive(Debug, Clone, Default)]
pub struct Args {
    values: Vec<(String, String)>,
    switches: Vec<String>,
}

impl Args {
    /// Parses `args` (without the program name). `value_flags` and `switches`
    /// are added to [`COMMON_VALUE_FLAGS`] and [`COMMON_SWITCHES`].
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        value_flags: &[&str],
        switches: &[&str],
    ) -> Result<Args, ArgError> {
        let takes_value = |f: &str| COMMON_VALUE_FLAGS.contains(&f) || value_flags.contains(&f);
        let is_switch = |f: &str| COMMON_SWITCHES.contains(&f) || switches.contains(&f);
        let mut parsed = Args::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg, None),
            };
            if takes_value(&flag) {
                let value = match inline.or_else(|| args.next()) {
                    Some(value) => value,
                    None => return Err(ArgError::MissingValue(flag)),
                };
                parsed.values.push((flag, value));
            } else if is_switch(&flag) && inline.is_none() {
                parsed.switches.push(flag);
            } else {
                return Err(ArgError::Unknown(flag));
            }
        }
        Ok(parsed)
    }

    /// The last value given for `flag`.
    pub fn value(&self, flag: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(f, _)| f == flag)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the switch `flag` was given.
    pub fn has(&self, flag: &str) -> bool {
        self.switches.iter().any(|s| s == flag)
    }

    /// The value of `flag` parsed as `T`, or `default` when absent.
    pub fn get<T: FromStr>(&self, flag: &str, default: T) -> Result<T, ArgError> {
        match self.value(flag) {
            None => Ok(default),
            Some(raw) => parse_one(flag, raw),
        }
    }

    /// The comma-separated values of `flag`, or `default` when absent.
    pub fn list<T: FromStr + Clone>(&self, flag: &str, default: &[T]) -> Result<Vec<T>, ArgError> {
        match self.value(flag) {
            None => Ok(default.to_vec()),
            Some(raw) => raw
                .split(',')
                .map(|part| parse_one(flag, part.trim()))
                .collect(),
        }
    }
}

fn parse_one<T: FromStr>(flag: &str, raw: &str) -> Result<T, ArgError> {
    raw.parse().map_err(|_| ArgError::Invalid {
        flag: flag.to_owned(),
        value: raw.to_owned(),
    })
}

/// The whole number after `name` in `args` (`--n 5000`), or `default` when
/// the flag is absent; for the programs that take only such flags.
pub fn number_flag(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, ArgError> {
        Args::parse(args.iter().map(|s| s.to_string()), &["--n", "--c"], &[])
    }

    #[test]
    fn values_switches_and_lists() {
        let args = parse(&["--n", "10", "--c=1,2", "--upstream-child"]).unwrap();
        assert_eq!(args.get("--n", 0u64).unwrap(), 10);
        assert_eq!(args.list("--c", &[5usize]).unwrap(), vec![1, 2]);
        assert_eq!(args.get("--timeout-s", 7u64).unwrap(), 7);
        assert!(args.has("--upstream-child"));
    }

    #[test]
    fn rejects_unknown_missing_and_invalid() {
        assert_eq!(
            parse(&["--x"]).unwrap_err(),
            ArgError::Unknown("--x".into())
        );
        assert_eq!(
            parse(&["--n"]).unwrap_err(),
            ArgError::MissingValue("--n".into())
        );
        let args = parse(&["--n", "ten"]).unwrap();
        assert!(matches!(
            args.get("--n", 0u64),
            Err(ArgError::Invalid { .. })
        ));
    }
}
