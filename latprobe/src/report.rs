//! How `latprobe fn` and `latprobe runqlat` print: a text report for people,
//! newline-delimited JSON for programs. Pure formatting; nothing here touches
//! the kernel.

use serde::Serialize;

use crate::{
    duration::format_ns,
    hdr_codec,
    histogram::{log2_unit, Latencies, QUANTILES},
};

/// Output format chosen with `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// What one report covers.
pub struct Period {
    /// `interval` or `final`.
    pub name: &'static str,
    pub elapsed: std::time::Duration,
    /// Records measured but not printed (stdout too slow, or the run ended).
    pub unprinted: u64,
}

/// One function's latencies (or, for runqlat, run-queue waits) over one
/// report period.
pub struct FunctionReport<'a> {
    pub function: &'a str,
    /// What this histogram is of, when a run has several per function:
    /// `cpu=3`, `pid=4242`, `other` (runqlat --per-cpu/--per-pid).
    pub key: Option<&'a str>,
    /// The process name behind a `pid=` key.
    pub comm: Option<&'a str>,
    /// What is counted: `calls` for fn, `waits` for runqlat.
    pub noun: &'a str,
    pub attach: &'a str,
    /// `interval` for a periodic report, `final` for the whole run.
    pub period: &'a str,
    pub seconds: f64,
    pub latencies: &'a Latencies,
    /// Calls that ran but could not be timed.
    pub missed: u64,
    /// Outliers that did not reach userspace.
    pub outliers_lost: u64,
    /// Outliers that reached userspace but were not printed: stdout could
    /// not keep up, or the run ended with them still queued.
    pub outliers_unprinted: u64,
    /// Detached over `--max-overhead` before the period ended: `seconds`
    /// is how long it was traced.
    pub over_budget: bool,
}

#[derive(Serialize)]
struct HistogramJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<&'a str>,
    attach: &'a str,
    period: &'a str,
    seconds: f64,
    #[serde(flatten)]
    summary: SummaryJson,
    lost: u64,
    missed: u64,
    outliers_lost: u64,
    outliers_unprinted: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    over_budget: bool,
    log2_ns: Vec<Log2Json>,
    /// The whole histogram, HdrHistogram's compressed V2 in base64: what
    /// `latprobe merge` adds up across hosts.
    hdr: String,
}

/// Count, extremes, sum and percentiles of a histogram: the fields every
/// JSON histogram record has (reports, and `merge`'s rows).
#[derive(Serialize)]
pub struct SummaryJson {
    count: u64,
    min_ns: u64,
    mean_ns: u64,
    max_ns: u64,
    sum_ns: u64,
    p50_ns: u64,
    p90_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
    p9999_ns: u64,
}

impl SummaryJson {
    pub fn of(l: &Latencies) -> Self {
        let q = |i: usize| l.quantile_ns(QUANTILES[i].0);
        SummaryJson {
            count: l.count(),
            min_ns: l.min_ns(),
            mean_ns: l.mean_ns(),
            max_ns: l.max_ns(),
            sum_ns: l.sum_ns(),
            p50_ns: q(0),
            p90_ns: q(1),
            p99_ns: q(2),
            p999_ns: q(3),
            p9999_ns: q(4),
        }
    }
}

#[derive(Serialize)]
struct Log2Json {
    low_ns: u64,
    high_ns: u64,
    count: u64,
}

impl FunctionReport<'_> {
    pub fn lost(&self) -> u64 {
        self.missed + self.outliers_lost
    }

    pub fn to_json(&self) -> String {
        let l = self.latencies;
        let json = HistogramJson {
            kind: "histogram",
            function: self.function,
            key: self.key,
            comm: self.comm,
            attach: self.attach,
            period: self.period,
            seconds: (self.seconds * 1000.0).round() / 1000.0,
            summary: SummaryJson::of(l),
            lost: self.lost(),
            missed: self.missed,
            outliers_lost: self.outliers_lost,
            outliers_unprinted: self.outliers_unprinted,
            over_budget: self.over_budget,
            log2_ns: l
                .log2_buckets(1)
                .into_iter()
                .map(|(low_ns, high_ns, count)| Log2Json { low_ns, high_ns, count })
                .collect(),
            hdr: hdr_codec::encode(l.hdr()),
        };
        serde_json::to_string(&json).expect("report serializes")
    }

    pub fn to_text(&self) -> String {
        let l = self.latencies;
        let mut name = self.function.to_string();
        if let Some(key) = self.key {
            name += &format!(" {key}");
        }
        if let Some(comm) = self.comm {
            name += &format!(" ({comm})");
        }
        let detached = if self.over_budget { ", detached over budget" } else { "" };
        let mut out = format!(
            "{name} [{}{detached}] {} {:.1}s: {} {}",
            self.attach,
            self.period,
            self.seconds,
            l.count(),
            self.noun
        );
        if self.lost() > 0 {
            out += &format!(
                ", LOST {} ({} {} untimed, {} outliers undelivered)",
                self.lost(),
                self.missed,
                self.noun,
                self.outliers_lost
            );
        }
        if self.outliers_unprinted > 0 {
            out += &format!(
                ", {} outliers not printed (stdout too slow, or still queued at the end)",
                self.outliers_unprinted
            );
        }
        out.push('\n');
        if l.count() == 0 {
            return out;
        }
        out += &format!(
            "  min {}  mean {}  max {}\n ",
            format_ns(l.min_ns()),
            format_ns(l.mean_ns()),
            format_ns(l.max_ns())
        );
        for (q, name) in QUANTILES {
            let label = match name {
                "p999" => "p99.9".to_string(),
                "p9999" => "p99.99".to_string(),
                other => other.to_string(),
            };
            out += &format!(" {label} {}", format_ns(l.quantile_ns(q)));
        }
        out.push('\n');
        out += &log2_text(l);
        out
    }
}

/// A bcc-style log2 histogram, in the unit that suits the largest value.
fn log2_text(l: &Latencies) -> String {
    let (unit_ns, unit) = log2_unit(l.max_ns());
    let buckets = l.log2_buckets(unit_ns);
    let peak = buckets.iter().map(|b| b.2).max().unwrap_or(0).max(1);
    let mut out = format!("  {unit:>22} : {:<10} distribution\n", "count");
    for (low, high, count) in buckets {
        let bar_len = ((count as f64 / peak as f64) * 40.0).ceil() as usize;
        out += &format!("  {:>9} -> {:<9} : {:<10} |{:<40}|\n", low, high, count, "*".repeat(bar_len.min(40)));
    }
    out
}

/// One call slower than `--slower`.
pub struct OutlierReport<'a> {
    pub time: String,
    pub function: &'a str,
    pub duration_ns: u64,
    pub cpu: u32,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// Symbolized kernel frames, innermost first (empty without `--stacks`).
    pub stack: Vec<(u64, Option<String>)>,
}

#[derive(Serialize)]
struct OutlierJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: &'a str,
    function: &'a str,
    duration_ns: u64,
    cpu: u32,
    pid: u32,
    tid: u32,
    comm: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stack: Vec<FrameJson>,
}

/// One kernel stack frame in JSON: its address and, when known, symbol.
#[derive(Serialize)]
pub struct FrameJson {
    addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    symbol: Option<String>,
}

/// A symbolized stack, innermost frame first, as JSON frames.
pub fn frames_json(stack: &[(u64, Option<String>)]) -> Vec<FrameJson> {
    stack.iter().map(|(addr, symbol)| FrameJson { addr: format!("{addr:#x}"), symbol: symbol.clone() }).collect()
}

impl OutlierReport<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(&OutlierJson {
            kind: "outlier",
            time: &self.time,
            function: self.function,
            duration_ns: self.duration_ns,
            cpu: self.cpu,
            pid: self.pid,
            tid: self.tid,
            comm: &self.comm,
            stack: frames_json(&self.stack),
        })
        .expect("outlier serializes")
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} {} {} cpu={} pid={} tid={} comm={}\n",
            self.time,
            self.function,
            format_ns(self.duration_ns),
            self.cpu,
            self.pid,
            self.tid,
            self.comm
        );
        for (addr, symbol) in &self.stack {
            match symbol {
                Some(s) => out += &format!("    {s}\n"),
                None => out += &format!("    {addr:#x}\n"),
            }
        }
        out
    }
}

#[cfg(test)]
impl<'a> FunctionReport<'a> {
    /// A final report of one second with nothing lost, for tests.
    pub fn final_of(function: &'a str, latencies: &'a Latencies) -> Self {
        FunctionReport {
            function,
            key: None,
            comm: None,
            noun: "calls",
            attach: "fentry",
            period: "final",
            seconds: 1.0,
            latencies,
            missed: 0,
            outliers_lost: 0,
            outliers_unprinted: 0,
            over_budget: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields() {
        let l = Latencies::of(&[1000, 2000, 3000, 4000]);
        let r = FunctionReport { missed: 1, outliers_lost: 2, ..FunctionReport::final_of("net_rx_action", &l) };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["type"], "histogram");
        assert_eq!(v["function"], "net_rx_action");
        assert_eq!(v["attach"], "fentry");
        assert_eq!(v["count"], 4);
        assert_eq!(v["min_ns"], 1000);
        assert_eq!(v["mean_ns"], 2500);
        assert_eq!(v["max_ns"], 4000);
        // The highest value of the bucket 2000 falls in (8 ns wide there).
        assert_eq!(v["p50_ns"], 2007);
        assert_eq!(v["p999_ns"], 4000);
        assert_eq!(v["lost"], 3);
        assert_eq!(v["log2_ns"][0]["low_ns"], 512);
        assert_eq!(v["sum_ns"], 10_000);
        let back = hdr_codec::decode(v["hdr"].as_str().unwrap()).unwrap();
        assert_eq!(back.len(), 4, "the encoded histogram holds every call");
    }

    #[test]
    fn text_report_matches_expected() {
        let l = Latencies::of(&[5_000_000, 5_000_000, 5_100_000, 23_000_000]);
        let r = FunctionReport {
            function: "do_nanosleep",
            key: None,
            comm: None,
            noun: "calls",
            attach: "kprobe",
            period: "final",
            seconds: 2.0,
            latencies: &l,
            missed: 0,
            outliers_lost: 0,
            outliers_unprinted: 0,
            over_budget: false,
        };
        let expected = "\
do_nanosleep [kprobe] final 2.0s: 4 calls
  min 5.00ms  mean 9.53ms  max 23.0ms
  p50 5.01ms p90 23.0ms p99 23.0ms p99.9 23.0ms p99.99 23.0ms
                   usecs : count      distribution
       4096 -> 8191      : 3          |****************************************|
       8192 -> 16383     : 0          |                                        |
      16384 -> 32767     : 1          |**************                          |
";
        assert_eq!(r.to_text(), expected);
    }

    #[test]
    fn outlier_text_and_json() {
        let o = OutlierReport {
            time: "2026-11-22T11:34:23.123456Z".into(),
            function: "tcp_collapse",
            duration_ns: 21_000_000,
            cpu: 3,
            pid: 10,
            tid: 11,
            comm: "nginx".into(),
            stack: vec![(0xffffffff81a00410, Some("tcp_collapse+0x10".into())), (0x1, None)],
        };
        assert_eq!(
            o.to_text(),
            "2026-11-22T11:34:23.123456Z tcp_collapse 21.0ms cpu=3 pid=10 tid=11 comm=nginx\n    tcp_collapse+0x10\n    0x1\n"
        );
        let v: serde_json::Value = serde_json::from_str(&o.to_json()).unwrap();
        assert_eq!(v["type"], "outlier");
        assert_eq!(v["duration_ns"], 21_000_000);
        assert_eq!(v["stack"][0]["symbol"], "tcp_collapse+0x10");
    }
}
