//! Reading the kernel's per-CPU HDR histograms: a stats map of
//! `FuncStats` per slot and a bucket map of `BucketGroup`s keyed by
//! `slot * hdr::GROUPS + group`. `fn` keeps one slot per function, runqlat
//! one for the whole machine or one per process.

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    Ebpf,
};
use latprobe_common::{
    func::{BucketGroup, FuncStats, GROUP_COUNT_SLOTS},
    hdr,
};

use crate::histogram::Latencies;

/// The maps a histogram is read from.
pub struct HistMaps {
    stats: PerCpuArray<MapData, FuncStats>,
    buckets: PerCpuArray<MapData, BucketGroup>,
    names: (&'static str, &'static str),
}

/// Everything counted in one slot (on some CPUs) since tracing began.
pub struct Totals {
    pub latencies: Latencies,
    pub missed: u64,
    pub outliers_lost: u64,
}

impl HistMaps {
    pub fn take(ebpf: &mut Ebpf, stats: &'static str, buckets: &'static str) -> Result<Self> {
        let s = ebpf.take_map(stats).with_context(|| format!("map {stats} missing"))?;
        let b = ebpf.take_map(buckets).with_context(|| format!("map {buckets} missing"))?;
        Ok(Self {
            stats: PerCpuArray::try_from(s).with_context(|| format!("map {stats}"))?,
            buckets: PerCpuArray::try_from(b).with_context(|| format!("map {buckets}"))?,
            names: (stats, buckets),
        })
    }

    /// Every CPU's counts of `slot`, summed.
    pub fn totals(&self, slot: usize) -> Result<Totals> {
        self.collect(slot, |_| true)
    }

    /// The counts of `slot` on each possible CPU, indexed by CPU number.
    pub fn totals_per_cpu(&self, slot: usize, cpus: usize) -> Result<Vec<Totals>> {
        (0..cpus).map(|cpu| self.collect(slot, |c| c == cpu)).collect()
    }

    /// Sums the counts of `slot` on the CPUs `want` accepts, reading only
    /// histogram groups that saw a value.
    fn collect(&self, slot: usize, want: impl Fn(usize) -> bool) -> Result<Totals> {
        let (stats_name, buckets_name) = self.names;
        let per_cpu = self.stats.get(&(slot as u32), 0).with_context(|| format!("reading {stats_name}"))?;
        let mut latencies = Latencies::new();
        let (mut sum, mut min, mut max, mut missed, mut lost) = (0, u64::MAX, 0, 0, 0);
        let mut groups = [0u64; GROUP_COUNT_SLOTS];
        for (_, s) in per_cpu.iter().enumerate().filter(|(cpu, _)| want(*cpu)) {
            sum += s.sum_ns;
            if s.count > 0 {
                min = min.min(s.min_ns);
            }
            max = max.max(s.max_ns);
            missed += s.missed;
            lost += s.outliers_lost;
            for (g, c) in groups.iter_mut().zip(s.group_counts) {
                *g += c;
            }
        }
        for (group, _) in groups.iter().enumerate().take(hdr::GROUPS).filter(|(_, &c)| c > 0) {
            let key = (slot * hdr::GROUPS + group) as u32;
            let per_cpu = self.buckets.get(&key, 0).with_context(|| format!("reading {buckets_name}"))?;
            let mut counts = [0u64; hdr::GROUP_BUCKETS];
            for (_, g) in per_cpu.iter().enumerate().filter(|(cpu, _)| want(*cpu)) {
                for (total, c) in counts.iter_mut().zip(g.counts) {
                    *total += c;
                }
            }
            for (i, &c) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
                latencies.add_bucket(group * hdr::GROUP_BUCKETS + i, c)?;
            }
        }
        // A CPU may count a value between the reads of its stats and its
        // buckets: the histogram can trail the kernel's count by a few.
        latencies.set_totals(sum, min, max);
        Ok(Totals { latencies, missed, outliers_lost: lost })
    }
}
