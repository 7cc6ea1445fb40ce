//! `--max-overhead`: the share of the machine's CPU time latprobe's own
//! probes may take, judged every [`WINDOW`]: their programs' time from the
//! kernel's own accounting (see `cost`), and for uprobes the traps around
//! them, measured at start (see `probe_cost`); and what is shed when they
//! take more.
//!
//! Pure: the limit's parsing and the verdict over one window; `cost` feeds
//! it the programs' times and the commands detach what it names.

use std::time::Duration;

use anyhow::{bail, Result};

/// How often the budget is judged, over the time since the last judgement.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The limit when `--max-overhead` is not given: 5% of all CPUs' time, in
/// the programs and, for uprobes, the traps around them (a trampoline's or
/// a kprobe's entry cost is not weighed).
pub const DEFAULT_PERCENT: f64 = 5.0;

/// `--max-overhead`'s value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// Never shed anything.
    Off,
    /// Percent of all online CPUs' time, in (0, 100].
    Percent(f64),
}

impl Limit {
    /// `5`, `5%`, `0.5` or `off`.
    pub fn parse(text: &str) -> Result<Limit> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
            return Ok(Limit::Off);
        }
        let number = t.strip_suffix('%').unwrap_or(t).trim();
        match number.parse::<f64>() {
            Ok(p) if p.is_finite() && p > 0.0 && p <= 100.0 => Ok(Limit::Percent(p)),
            _ => bail!(
                "{text:?} is not a share of the machine's CPU time: give a percent above 0 and at most 100 \
                 (e.g. 5 or 0.5%), or off"
            ),
        }
    }
}

/// clap's parser for `--max-overhead`.
pub fn parse_limit(text: &str) -> Result<Limit, String> {
    Limit::parse(text).map_err(|e| e.to_string())
}

/// What to shed after one window: the costliest unit, and what all units
/// took together.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    /// Index of the unit whose programs took the most time.
    pub costliest: usize,
    /// Percent of all CPUs' time the units took over the window.
    pub used_percent: f64,
}

/// Judges one window: `run_ns[i]` is what unit `i`'s programs ran for
/// during `window` on a machine of `cpus` CPUs. Over `limit_percent`, the
/// costliest unit is named (the first of equals).
pub fn judge(run_ns: &[u64], window: Duration, cpus: usize, limit_percent: f64) -> Option<Verdict> {
    if window.is_zero() {
        return None;
    }
    let used_percent = percent_of(run_ns.iter().sum(), window, cpus);
    if used_percent <= limit_percent {
        return None;
    }
    let costliest = run_ns.iter().enumerate().rev().max_by_key(|(_, ns)| **ns).map(|(i, _)| i)?;
    Some(Verdict { costliest, used_percent })
}

/// `ns` of CPU time as a percent of what `cpus` CPUs had over `window`.
pub fn percent_of(ns: u64, window: Duration, cpus: usize) -> f64 {
    let capacity_ns = window.as_secs_f64() * 1e9 * cpus.max(1) as f64;
    if capacity_ns <= 0.0 {
        return 0.0;
    }
    100.0 * ns as f64 / capacity_ns
}

/// One thing shed over budget: when, and what the programs took then.
#[derive(Clone, Debug)]
pub struct Shed {
    /// What was detached: a function's name, or every probe of the command.
    pub what: String,
    /// Whether nothing is left attached after it (the run ends).
    pub last: bool,
    /// Time traced before it was detached.
    pub after: Duration,
    /// What the probes took over the last window: their programs, and
    /// the uprobe traps around them (see `probe_cost`).
    pub used_percent: f64,
    /// Of that, the programs alone.
    pub programs_percent: f64,
    pub limit_percent: f64,
    pub cpus: usize,
}

impl Shed {
    /// One line for stderr: what was detached, why, and what the report covers.
    pub fn describe(&self) -> String {
        // Traps count only where they were measured: say so when they did.
        let traps = self.used_percent - self.programs_percent;
        let whose = if traps >= 0.05 {
            format!("latprobe's probes ({:.1}% in its programs, the rest in uprobe traps)", self.programs_percent)
        } else {
            "latprobe's programs".to_string()
        };
        let why = format!(
            "{whose} took {:.1}% of {} CPUs' time over the last second, above --max-overhead {}%",
            self.used_percent, self.cpus, self.limit_percent
        );
        let after = self.after.as_secs_f64();
        if self.last {
            format!(
                "{why}: detached {} after {after:.1}s and ended the run; the report covers those {after:.1}s \
                 (--max-overhead with a higher percent, or off, lets it run on)",
                self.what
            )
        } else {
            format!(
                "{why}: detached {}, the costliest, after {after:.1}s; its report covers those {after:.1}s",
                self.what
            )
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "detached": self.what,
            "after_s": (self.after.as_secs_f64() * 1000.0).round() / 1000.0,
            "cpu_percent": self.used_percent,
            "programs_cpu_percent": self.programs_percent,
            "limit_percent": self.limit_percent,
            "ended_run": self.last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_as_percent_or_off() {
        assert_eq!(Limit::parse("5").unwrap(), Limit::Percent(5.0));
        assert_eq!(Limit::parse("0.5%").unwrap(), Limit::Percent(0.5));
        assert_eq!(Limit::parse("100").unwrap(), Limit::Percent(100.0));
        assert_eq!(Limit::parse("off").unwrap(), Limit::Off);
        for bad in ["0", "-1", "101", "NaN", "inf", "5x", "", "%"] {
            let e = Limit::parse(bad).unwrap_err().to_string();
            assert!(e.contains("percent above 0"), "{bad}: {e}");
        }
    }

    #[test]
    fn within_the_limit_nothing_is_shed() {
        // 2 CPUs for 1 s: 2e9 ns; 5% is 1e8.
        assert_eq!(judge(&[50_000_000, 50_000_000], WINDOW, 2, 5.0), None);
        assert_eq!(judge(&[], WINDOW, 2, 5.0), None);
        assert_eq!(judge(&[1], Duration::ZERO, 2, 5.0), None);
    }

    #[test]
    fn over_the_limit_the_costliest_unit_is_named() {
        let v = judge(&[30_000_000, 90_000_000, 10_000_000], WINDOW, 2, 5.0).unwrap();
        assert_eq!(v.costliest, 1);
        assert!((v.used_percent - 6.5).abs() < 1e-9, "{v:?}");
        // Ties go to the first unit.
        assert_eq!(judge(&[80_000_000, 80_000_000], WINDOW, 2, 5.0).unwrap().costliest, 0);
    }

    #[test]
    fn a_shed_says_what_it_covers() {
        let shed = Shed {
            what: "vfs_read".into(),
            last: false,
            after: Duration::from_millis(2100),
            used_percent: 7.26,
            programs_percent: 7.26,
            limit_percent: 5.0,
            cpus: 2,
        };
        let line = shed.describe();
        assert!(line.contains("latprobe's programs took 7.3% of 2 CPUs' time"), "{line}");
        assert!(line.contains("detached vfs_read, the costliest, after 2.1s"), "{line}");
        let last = Shed { last: true, what: "every probe".into(), ..shed };
        assert!(last.describe().contains("ended the run"), "{}", last.describe());
        assert_eq!(last.to_json()["after_s"], 2.1);
        assert_eq!(last.to_json()["ended_run"], true);
        let trapped = Shed { programs_percent: 1.3, ..last };
        assert!(
            trapped.describe().contains("probes (1.3% in its programs, the rest in uprobe traps) took 7.3%"),
            "{}",
            trapped.describe()
        );
    }
}
