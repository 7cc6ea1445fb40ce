//! What one scrape returns: per series a histogram of seconds at fixed,
//! log-spaced bounds, its untimed and undelivered counts, and latprobe's own
//! cost; encoded by `prometheus-client` as OpenMetrics text.
//!
//! Bounds are four per power of two of nanoseconds (2^k × 1, 1.25, 1.5,
//! 1.75) from 2^10 ns (1.02 µs) to 1.75 × 2^35 ns (60 s). They fall on
//! edges of the kernel's HDR buckets (128 per power of two), so every
//! bucket's count is exact, and they are close enough (at most 25% apart)
//! that `histogram_quantile` resolves a p99.9.

use std::{collections::HashMap, fmt::Write, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder, NoLabelSet},
    metrics::{counter::ConstCounter, exemplar::Exemplar, MetricType},
    registry::{Registry, Unit},
};

use crate::{cost::Cost, histogram::Latencies};

/// Bucket bounds per power of two.
const PER_POWER: u32 = 4;
/// The first bound is 2^FIRST_POWER ns, the last below 2^(LAST_POWER + 1).
const FIRST_POWER: u32 = 10;
const LAST_POWER: u32 = 35;

/// The upper bounds of the buckets, in nanoseconds, ascending; a last one,
/// +Inf, follows in the exposition.
pub fn bounds_ns() -> impl Iterator<Item = u64> {
    (FIRST_POWER..=LAST_POWER)
        .flat_map(|k| (0..PER_POWER).map(move |m| (1u64 << k) + m as u64 * ((1u64 << k) / PER_POWER as u64)))
}

/// One histogram as the measuring loop hands it over: cumulative since the
/// start of tracing.
pub struct Series<'a> {
    /// The function, stage (`tcp:accept`) or command (`runqlat`), as in the
    /// JSON reports' `function`.
    pub function: String,
    /// `cpu=3`, `port=443`, …, as in the JSON reports' `key`.
    pub key: Option<String>,
    pub latencies: &'a Latencies,
    /// Calls or waits that happened but could not be timed.
    pub untimed: u64,
    /// Outliers that never reached userspace.
    pub outliers_lost: u64,
}

/// One value of a labelled counter beside the histograms: what a command
/// could not measure, or what it counted without timing (tcp's losses).
#[derive(Clone, Debug)]
pub struct Counter {
    /// The family, without `_total` (the encoder adds it).
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: u64,
}

impl Counter {
    /// `latprobe_lost_total{what=…}`: `what` is named as in the JSON report.
    pub fn lost(what: &'static str, value: u64) -> Counter {
        Counter {
            name: "latprobe_lost",
            help: "What could not be measured, by what it was (as the JSON report names it)",
            labels: vec![("what", what.to_string())],
            value,
        }
    }
}

/// A series reduced to what the exposition needs.
#[derive(Debug, Clone)]
struct Histogram {
    function: String,
    key: Option<String>,
    sum_seconds: f64,
    count: u64,
    /// Per-bucket (not cumulative) counts at `bounds_ns()`, then +Inf.
    buckets: Vec<(f64, u64)>,
    untimed: u64,
    outliers_lost: u64,
}

/// Everything one scrape shows, immutable once published.
#[derive(Debug, Default)]
pub struct Exposition {
    histograms: Vec<Histogram>,
    /// Counters beside the per-series ones, families in first-seen order.
    counters: Vec<Counter>,
    /// Program runs and their nanoseconds since the start, when measured.
    cost: Option<(u64, u64)>,
}

impl Exposition {
    pub fn of(series: &[Series], counters: &[Counter], cost: Option<&Cost>) -> Exposition {
        let histograms = series.iter().map(Histogram::of).collect();
        Exposition { histograms, counters: counters.to_vec(), cost: cost.map(|c| (c.runs, c.run_ns)) }
    }
}

/// The OpenMetrics text of `exposition`, `# EOF` included.
pub fn encode(exposition: Arc<Exposition>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(exposition)));
    let mut out = String::new();
    text::encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

impl Histogram {
    fn of(s: &Series) -> Histogram {
        let bounds: Vec<u64> = bounds_ns().collect();
        let mut counts = vec![0u64; bounds.len() + 1];
        for v in s.latencies.hdr().iter_recorded() {
            // A kernel bucket's values are recorded at its lowest value; the
            // bounds are edges of kernel buckets, so the whole bucket is
            // below the first bound above that value.
            let low = s.latencies.hdr().lowest_equivalent(v.value_iterated_to());
            counts[bounds.partition_point(|&b| b <= low)] += v.count_at_value();
        }
        let buckets = bounds.iter().map(|&b| b as f64 / 1e9).chain(std::iter::once(f64::MAX)).zip(counts).collect();
        Histogram {
            function: s.function.clone(),
            key: s.key.clone(),
            sum_seconds: s.latencies.sum_ns() as f64 / 1e9,
            count: s.latencies.count(),
            buckets,
            untimed: s.untimed,
            outliers_lost: s.outliers_lost,
        }
    }

    fn labels(&self) -> Vec<(&'static str, Label<'_>)> {
        let mut labels = vec![("function", Label(&self.function))];
        if let Some(key) = &self.key {
            labels.push(("key", Label(key)));
        }
        labels
    }
}

/// A label value escaped as OpenMetrics requires (`\\`, `\"`, `\n`):
/// `prometheus-client` 0.23 writes values as they are, and names come from
/// the kernel and from processes.
#[derive(Debug)]
struct Label<'a>(&'a str);

impl EncodeLabelValue for Label<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A counter per series: its name, help, and how to read it.
type CounterOf = (&'static str, &'static str, fn(&Histogram) -> u64);

/// The collector of one scrape.
#[derive(Debug)]
struct Scrape(Arc<Exposition>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &self.0;
        if !e.histograms.is_empty() {
            let mut family = encoder.encode_descriptor(
                "latprobe_latency",
                "Latency of each function, stage or key, cumulative since tracing started",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for h in &e.histograms {
                let labels = h.labels();
                family.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    h.sum_seconds,
                    h.count,
                    &h.buckets,
                    None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
                )?;
            }
            let counters: [CounterOf; 2] = [
                ("latprobe_untimed", "Calls or waits that happened but could not be timed", |h| h.untimed),
                ("latprobe_outliers_lost", "Outliers (slower than --slower) that never reached latprobe", |h| {
                    h.outliers_lost
                }),
            ];
            for (name, help, value) in counters {
                let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for h in &e.histograms {
                    let labels = h.labels();
                    ConstCounter::new(value(h)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut families: Vec<&Counter> = Vec::new();
        for c in &e.counters {
            if !families.iter().any(|f| f.name == c.name) {
                families.push(c);
            }
        }
        for first in families {
            let mut family = encoder.encode_descriptor(first.name, first.help, None, MetricType::Counter)?;
            for c in e.counters.iter().filter(|c| c.name == first.name) {
                let labels: Vec<(&str, Label)> = c.labels.iter().map(|(k, v)| (*k, Label(v))).collect();
                ConstCounter::new(c.value).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some((runs, run_ns)) = e.cost {
            let runs_help = "Runs of latprobe's BPF programs, as the kernel counts them";
            ConstCounter::new(runs).encode(encoder.encode_descriptor(
                "latprobe_bpf_runs",
                runs_help,
                None,
                MetricType::Counter,
            )?)?;
            ConstCounter::new(run_ns as f64 / 1e9).encode(encoder.encode_descriptor(
                "latprobe_bpf_run",
                "Time spent in latprobe's BPF programs, as the kernel times them",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str, prefix: &str) -> Vec<String> {
        text.lines().filter(|l| l.starts_with(prefix)).map(str::to_string).collect()
    }

    #[test]
    fn bounds_are_ascending_and_on_kernel_bucket_edges() {
        let bounds: Vec<u64> = bounds_ns().collect();
        assert_eq!(bounds.len(), 104);
        assert_eq!((bounds[0], bounds[1], bounds[4]), (1024, 1280, 2048));
        assert!(bounds.windows(2).all(|w| w[0] < w[1] && w[1] as f64 / w[0] as f64 <= 1.25 + 1e-9));
        assert!(*bounds.last().unwrap() <= latprobe_common::hdr::MAX_TRACKED_NS);
        for b in bounds {
            let index = latprobe_common::hdr::bucket_index(b);
            assert_eq!(latprobe_common::hdr::bucket_low(index), b, "{b} ns starts a kernel bucket");
        }
    }

    #[test]
    fn buckets_are_cumulative_and_match_the_histogram_exactly() {
        // 3 values under 1.024 µs, 2 in [1.024, 1.28) µs, one at 1.28 µs
        // exactly (it starts the next bucket), 1 of 5 ms, 1 past 60 s.
        let values = [10, 500, 1_000, 1_100, 1_279, 1_280, 5_000_000, 65_000_000_000];
        let l = Latencies::of(&values);
        let sum: u64 = values.iter().sum();
        let series =
            [Series { function: "do_nanosleep".into(), key: None, latencies: &l, untimed: 2, outliers_lost: 1 }];
        let text = encode(Arc::new(Exposition::of(&series, &[], None)));
        let buckets = lines(&text, "latprobe_latency_seconds_bucket{");
        assert_eq!(buckets.len(), 105, "{text}");
        let counts: Vec<u64> = buckets.iter().map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "cumulative: {counts:?}");
        assert_eq!((counts[0], counts[1], counts[2]), (3, 5, 6));
        // 5 ms lies below 1.25 × 2^22 ns = 5.24 ms: bucket 12 × 4 + 1.
        assert_eq!((counts[12 * 4], counts[12 * 4 + 1]), (6, 7));
        assert_eq!((counts[103], counts[104]), (7, 8));
        assert!(buckets[104].contains("le=\"+Inf\""), "{}", buckets[104]);
        assert_eq!(buckets[0], "latprobe_latency_seconds_bucket{le=\"0.000001024\",function=\"do_nanosleep\"} 3");
        assert_eq!(
            lines(&text, "latprobe_latency_seconds_count"),
            ["latprobe_latency_seconds_count{function=\"do_nanosleep\"} 8"]
        );
        let sum_line = &lines(&text, "latprobe_latency_seconds_sum")[0];
        let sum_s: f64 = sum_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(sum_s, sum as f64 / 1e9);
        assert_eq!(lines(&text, "latprobe_untimed_total"), ["latprobe_untimed_total{function=\"do_nanosleep\"} 2"]);
        assert_eq!(
            lines(&text, "latprobe_outliers_lost_total"),
            ["latprobe_outliers_lost_total{function=\"do_nanosleep\"} 1"]
        );
        assert!(text.contains("# TYPE latprobe_latency_seconds histogram\n# UNIT latprobe_latency_seconds seconds\n"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn labels_are_escaped_and_keys_kept() {
        let l = Latencies::of(&[2_000]);
        let series = [Series {
            function: "a\"b\\c\nd".into(),
            key: Some("cpu=3".into()),
            latencies: &l,
            untimed: 0,
            outliers_lost: 0,
        }];
        let text = encode(Arc::new(Exposition::of(&series, &[], None)));
        let count = &lines(&text, "latprobe_latency_seconds_count")[0];
        assert_eq!(count, "latprobe_latency_seconds_count{function=\"a\\\"b\\\\c\\nd\",key=\"cpu=3\"} 1");
    }

    #[test]
    fn cost_is_counted_and_nothing_traced_is_valid() {
        let cost = Cost {
            elapsed: std::time::Duration::from_secs(1),
            runs: 1234,
            run_ns: 5_000_000,
            cpus: 2,
            limit_percent: None,
            sheds: Vec::new(),
        };
        let text = encode(Arc::new(Exposition::of(
            &[],
            &[Counter::lost("events_lost", 3), Counter::lost("untimed_prunes", 0)],
            Some(&cost),
        )));
        assert_eq!(
            lines(&text, "latprobe_lost_total"),
            ["latprobe_lost_total{what=\"events_lost\"} 3", "latprobe_lost_total{what=\"untimed_prunes\"} 0"]
        );
        assert_eq!(text.matches("# TYPE latprobe_lost counter").count(), 1, "{text}");
        assert_eq!(lines(&text, "latprobe_bpf_runs_total"), ["latprobe_bpf_runs_total 1234"]);
        assert_eq!(lines(&text, "latprobe_bpf_run_seconds_total"), ["latprobe_bpf_run_seconds_total 0.005"]);
        assert_eq!(encode(Arc::default()), "# EOF\n");
    }
}
