//! Durations as users type them (`250us`, `5ms`, `1.5s`) and as latprobe
//! prints them (three significant digits, unit chosen to fit).

use std::fmt;

/// A duration parse failure, naming the input and the accepted forms.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseDurationError(String);

impl fmt::Display for ParseDurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: expected a number and a unit, like 250us, 5ms, 1.5s \
             (units: ns, us, ms, s, m)",
            self.0
        )
    }
}

impl std::error::Error for ParseDurationError {}

/// Parses `NUMBER UNIT` into nanoseconds. A bare number is refused: whether
/// `50` meant ms or us is exactly the ambiguity that misleads during an incident.
pub fn parse_ns(text: &str) -> Result<u64, ParseDurationError> {
    let err = || ParseDurationError(text.to_string());
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
    let (number, unit) = t.split_at(split);
    let scale: f64 = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        _ => return Err(err()),
    };
    let value: f64 = number.parse().map_err(|_| err())?;
    let ns = value * scale;
    if !ns.is_finite() || ns < 0.0 || ns > u64::MAX as f64 {
        return Err(err());
    }
    Ok(ns.round() as u64)
}

/// For clap: a duration argument in nanoseconds.
pub fn parse_arg(text: &str) -> Result<u64, String> {
    parse_ns(text).map_err(|e| e.to_string())
}

/// For clap: a report interval, between 1 ms and `cli::MAX_SECS`.
pub fn parse_interval(text: &str) -> Result<u64, String> {
    let ns = parse_arg(text)?;
    let max = crate::cli::MAX_SECS * 1_000_000_000;
    if !(1_000_000..=max).contains(&ns) {
        return Err(format!("interval {text:?} must be between 1ms and {} days", crate::cli::MAX_SECS / 86_400));
    }
    Ok(ns)
}

/// Formats nanoseconds with three significant digits: `812ns`, `4.10us`,
/// `23.1ms`, `1.50s`.
pub fn format_ns(ns: u64) -> String {
    let (value, unit) = match ns {
        0..=999 => return format!("{ns}ns"),
        1_000..=999_999 => (ns as f64 / 1e3, "us"),
        1_000_000..=999_999_999 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    let text = if value >= 99.95 {
        format!("{value:.0}")
    } else if value >= 9.995 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    };
    format!("{text}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_ns("250us"), Ok(250_000));
        assert_eq!(parse_ns("5ms"), Ok(5_000_000));
        assert_eq!(parse_ns("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_ns("100ns"), Ok(100));
        assert_eq!(parse_ns("2m"), Ok(120_000_000_000));
        assert_eq!(parse_ns(" 50ms "), Ok(50_000_000));
    }

    #[test]
    fn refuses_ambiguous_or_malformed() {
        for bad in ["50", "", "ms", "abc", "5 parsecs", "1.2.3ms", "-5ms"] {
            assert!(parse_ns(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_ns("abc").unwrap_err().to_string().contains("250us"));
    }

    #[test]
    fn formats_three_significant_digits() {
        assert_eq!(format_ns(812), "812ns");
        assert_eq!(format_ns(4_100), "4.10us");
        assert_eq!(format_ns(23_100_000), "23.1ms");
        assert_eq!(format_ns(1_500_000_000), "1.50s");
        assert_eq!(format_ns(999_999), "1000us");
        assert_eq!(format_ns(123_456), "123us");
    }
}
