//! Turns the kernel's bucket counts into percentiles and a log2 histogram.
//!
//! The kernel counts in exactly the buckets of an HDR histogram with two
//! significant digits (see `latprobe_common::hdr`), so replaying them into
//! `hdrhistogram` loses nothing. Exact count, sum, min and max come from the
//! kernel's running totals.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use latprobe_common::hdr;

/// The quantiles every report shows, and their JSON names.
pub const QUANTILES: [(f64, &str); 5] =
    [(0.50, "p50"), (0.90, "p90"), (0.99, "p99"), (0.999, "p999"), (0.9999, "p9999")];

/// Latencies of one function over one period.
#[derive(Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
    /// Exact sum of all durations, for the mean.
    sum_ns: u64,
    /// Exact extremes when known (the kernel tracks them over the whole run);
    /// otherwise taken from the histogram.
    exact_min_max: Option<(u64, u64)>,
}

impl Latencies {
    pub fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, hdr::MAX_TRACKED_NS, hdr::SIGNIFICANT_DIGITS)
            .expect("static HDR bounds are valid");
        Self { hist, sum_ns: 0, exact_min_max: None }
    }

    /// Adds `count` values that fell into kernel bucket `index`.
    pub fn add_bucket(&mut self, index: usize, count: u64) -> Result<()> {
        // Bucket 0 holds zero-length calls; HDR's lowest value is 1 ns.
        let value = hdr::bucket_low(index).max(1);
        self.hist.record_n(value, count).with_context(|| format!("recording {count} values of {value} ns"))
    }

    /// The kernel's exact sum, min and max. The max is never below the
    /// lowest value of the highest bucket counted, so a max read a moment
    /// before its outlier's bucket cannot hide that outlier.
    pub fn set_totals(&mut self, sum_ns: u64, min_ns: u64, max_ns: u64) {
        self.sum_ns = sum_ns;
        let counted = if self.count() > 0 { self.hist.lowest_equivalent(self.hist.max()) } else { 0 };
        let max_ns = max_ns.max(counted);
        self.exact_min_max = (min_ns <= max_ns).then_some((min_ns, max_ns));
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn min_ns(&self) -> u64 {
        match self.exact_min_max {
            Some((min, _)) => min,
            None if self.count() == 0 => 0,
            None => self.hist.min(),
        }
    }

    pub fn max_ns(&self) -> u64 {
        match self.exact_min_max {
            Some((_, max)) => max,
            None if self.count() == 0 => 0,
            None => self.hist.max(),
        }
    }

    pub fn mean_ns(&self) -> u64 {
        self.sum_ns.checked_div(self.count()).unwrap_or(0)
    }

    /// The value at quantile `q`: the highest value of the bucket it falls in
    /// (less than 0.8% above the true value), never above the exact max.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.count() == 0 {
            return 0;
        }
        self.hist.value_at_quantile(q).min(self.max_ns())
    }

    /// What happened between `earlier` (a snapshot of the same run) and now.
    /// Min and max come from the histogram: the kernel's are for the whole run.
    pub fn since(&self, earlier: &Latencies) -> Result<Latencies> {
        let mut hist = self.hist.clone();
        hist.subtract(&earlier.hist).context("subtracting the previous report")?;
        Ok(Latencies { hist, sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns), exact_min_max: None })
    }

    /// The HDR histogram itself, for encoding (`hdr_codec`).
    pub fn hdr(&self) -> &Histogram<u64> {
        &self.hist
    }

    /// Adds `other`'s counts bucket by bucket: merging is exact. `exact` is
    /// its exact `(sum, min, max)` when known; the merged sum and extremes
    /// stay exact only while every part's are, else they come from the
    /// buckets. Values past the tracked range count as its top.
    pub fn merge(&mut self, other: &Histogram<u64>, exact: Option<(u64, u64, u64)>) -> Result<()> {
        if other.is_empty() {
            return Ok(());
        }
        let exact_so_far = self.count() == 0 || self.exact_min_max.is_some();
        let mut bucket_sum = 0u64;
        for v in other.iter_recorded() {
            let value = v.value_iterated_to().clamp(1, hdr::MAX_TRACKED_NS);
            let count = v.count_at_value();
            self.hist.record_n(value, count).with_context(|| format!("adding {count} values of {value} ns"))?;
            bucket_sum = bucket_sum.saturating_add(self.hist.median_equivalent(value).saturating_mul(count));
        }
        match exact.filter(|_| exact_so_far) {
            Some((sum, min, max)) => {
                let (old_min, old_max) = self.exact_min_max.unwrap_or((u64::MAX, 0));
                self.sum_ns = self.sum_ns.saturating_add(sum);
                self.exact_min_max = Some((old_min.min(min), old_max.max(max)));
            }
            None => {
                self.sum_ns = self.sum_ns.saturating_add(bucket_sum);
                self.exact_min_max = None;
            }
        }
        Ok(())
    }

    pub fn sum_ns(&self) -> u64 {
        self.sum_ns
    }

    /// The exact `(sum, min, max)`, when known: what [`Latencies::merge`]
    /// keeps exact.
    pub fn exact_totals(&self) -> Option<(u64, u64, u64)> {
        self.exact_min_max.map(|(min, max)| (self.sum_ns, min, max))
    }

    /// Counts per power-of-two range of `value / unit_ns`, as SystemTap and bcc
    /// print them: `(low, high, count)` from the first non-empty range to the
    /// last. Exact, since no kernel bucket straddles a power of two of ns; with
    /// a coarser unit, each bucket is placed by its lowest value.
    pub fn log2_buckets(&self, unit_ns: u64) -> Vec<(u64, u64, u64)> {
        let mut slots = [0u64; 64];
        for v in self.hist.iter_recorded() {
            let scaled = v.value_iterated_to() / unit_ns;
            // As bcc: slot 0 holds 0 and 1, slot k holds [2^k, 2^(k+1)).
            let slot = if scaled <= 1 { 0 } else { 63 - scaled.leading_zeros() as usize };
            slots[slot] += v.count_at_value();
        }
        let Some(first) = slots.iter().position(|&c| c > 0) else {
            return Vec::new();
        };
        let last = slots.iter().rposition(|&c| c > 0).unwrap_or(first);
        (first..=last)
            .map(|slot| {
                let (low, high) = if slot == 0 { (0, 1) } else { (1u64 << slot, (1u64 << (slot + 1)) - 1) };
                (low, high, slots[slot])
            })
            .collect()
    }
}

#[cfg(test)]
impl Latencies {
    /// Latencies of exactly these values, as the kernel would count them.
    pub fn of(values: &[u64]) -> Latencies {
        let mut l = Latencies::new();
        for &v in values {
            l.add_bucket(hdr::bucket_index(v), 1).unwrap();
        }
        let (min, max) = (values.iter().min().copied().unwrap_or(0), values.iter().max().copied().unwrap_or(0));
        l.set_totals(values.iter().sum(), min, max);
        l
    }
}

/// The unit a log2 histogram is drawn in: the coarsest that keeps the largest
/// value's range readable, like bcc's `-u`/`-m`.
pub fn log2_unit(max_ns: u64) -> (u64, &'static str) {
    match max_ns {
        0..=99_999 => (1, "nsecs"),
        100_000..=9_999_999_999 => (1_000, "usecs"),
        _ => (1_000_000, "msecs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_buckets_match_hdr_buckets() {
        let hist = Histogram::<u64>::new_with_bounds(1, hdr::MAX_TRACKED_NS, hdr::SIGNIFICANT_DIGITS).unwrap();
        for v in [1u64, 255, 256, 257, 511, 512, 2047, 2048, 4096, 5_000_000, 5_123_456, 60_000_000_000] {
            let i = hdr::bucket_index(v);
            assert!(hdr::bucket_low(i) <= v && v <= hdr::bucket_high(i), "{v} not in bucket {i}");
            assert_eq!(hist.lowest_equivalent(v), hdr::bucket_low(i), "low of {v}");
            assert_eq!(hist.highest_equivalent(v), hdr::bucket_high(i), "high of {v}");
        }
        assert_eq!(hdr::bucket_index(u64::MAX), hdr::BUCKETS - 1);
    }

    #[test]
    fn percentiles_are_within_one_percent() {
        // 1000 calls of 5 ms and one of 23 ms: the tail that averages hide.
        let mut values = vec![5_000_000u64; 999];
        values.push(23_000_000);
        let l = Latencies::of(&values);
        assert_eq!(l.count(), 1000);
        let p50 = l.quantile_ns(0.5);
        assert!((5_000_000..=5_050_000).contains(&p50), "p50 {p50}");
        assert_eq!(l.quantile_ns(0.9999), 23_000_000);
        assert_eq!(l.max_ns(), 23_000_000);
        assert_eq!(l.min_ns(), 5_000_000);
        assert_eq!(l.mean_ns(), (999 * 5_000_000 + 23_000_000) / 1000);
    }

    /// Against the exact percentiles of sorted samples spread over nine
    /// orders of magnitude, through the kernel's buckets.
    #[test]
    fn percentiles_match_exact_sorted_samples_within_one_percent() {
        // A fixed xorshift sequence, log-uniform from 10 ns to 10 s.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut values: Vec<u64> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let exponent = 1.0 + 8.0 * (x % 1_000_000) as f64 / 1_000_000.0;
                10f64.powf(exponent) as u64
            })
            .collect();
        let l = Latencies::of(&values);
        values.sort_unstable();
        for (q, name) in QUANTILES {
            let exact = values[((q * values.len() as f64).ceil() as usize).max(1) - 1];
            let got = l.quantile_ns(q);
            let error = got.abs_diff(exact) as f64 / exact as f64;
            assert!(error <= 0.01, "{name}: {got} ns vs exact {exact} ns ({:.3}%)", error * 100.0);
        }
    }

    #[test]
    fn log2_buckets_are_exact_and_contiguous() {
        let l = Latencies::of(&[3, 5, 6, 7, 900]);
        let b = l.log2_buckets(1);
        assert_eq!(b.first(), Some(&(2, 3, 1)));
        assert_eq!(Latencies::of(&[1, 2]).log2_buckets(1), vec![(0, 1, 1), (2, 3, 1)]);
        assert_eq!(b[1], (4, 7, 3));
        assert_eq!(b.last(), Some(&(512, 1023, 1)));
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), 5);
        let us = Latencies::of(&[5_000_000, 5_100_000]).log2_buckets(1000);
        assert_eq!(us, vec![(4096, 8191, 2)]);
    }

    /// Two hosts with known distributions merge to the known combined
    /// percentiles, counts and extremes: 900 calls of 1 ms on one, 100 of
    /// 50 ms on the other → p50 1 ms, p90 1 ms, p99 50 ms, max 50 ms.
    #[test]
    fn merging_two_hosts_is_exact() {
        let a = Latencies::of(&vec![1_000_000; 900]);
        let b = Latencies::of(&vec![50_000_000; 100]);
        let mut merged = Latencies::new();
        merged.merge(a.hdr(), Some((a.sum_ns(), a.min_ns(), a.max_ns()))).unwrap();
        merged.merge(b.hdr(), Some((b.sum_ns(), b.min_ns(), b.max_ns()))).unwrap();
        assert_eq!(merged.count(), 1000);
        assert_eq!((merged.min_ns(), merged.max_ns()), (1_000_000, 50_000_000));
        assert_eq!(merged.mean_ns(), (900 * 1_000_000 + 100 * 50_000_000) / 1000);
        assert!((1_000_000..=1_008_000).contains(&merged.quantile_ns(0.5)));
        assert!((1_000_000..=1_008_000).contains(&merged.quantile_ns(0.9)));
        assert_eq!(merged.quantile_ns(0.99), 50_000_000);
        // A part read back from its buckets alone makes the extremes approximate.
        merged.merge(a.hdr(), None).unwrap();
        assert_eq!(merged.count(), 1900);
        assert!(merged.max_ns() >= 50_000_000 && merged.max_ns() <= 50_400_000, "{}", merged.max_ns());
    }

    #[test]
    fn since_subtracts_an_earlier_snapshot() {
        let before = Latencies::of(&[1000, 2000]);
        let after = Latencies::of(&[1000, 2000, 3000, 3000]);
        let delta = after.since(&before).unwrap();
        assert_eq!(delta.count(), 2);
        assert_eq!(delta.mean_ns(), 3000);
        // An interval's min comes from its buckets: within one bucket (0.8%).
        assert!((2976..=3000).contains(&delta.min_ns()), "{}", delta.min_ns());
    }
}
