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
        let mut all = self.collect(slot, |_| 0, 1)?;
        Ok(all.pop().expect("one group"))
    }

    /// The counts of `slot` on each possible CPU, indexed by CPU number. Each
    /// map value is read once for all CPUs: the kernel returns every CPU's
    /// copy in one call.
    pub fn totals_per_cpu(&self, slot: usize, cpus: usize) -> Result<Vec<Totals>> {
        self.collect(slot, |cpu| cpu, cpus)
    }

    /// Sums the counts of `slot` into `groups` totals, CPU `c` into
    /// `group_of(c)` (CPUs mapped past the end are skipped), reading only
    /// histogram groups that saw a value.
    ///
    /// Order matters: the programs raise min/max before they count a bucket,
    /// and the stats are read again after the buckets, so no value in the
    /// buckets read can be above the max reported (p99.99 is clamped to it).
    fn collect(&self, slot: usize, group_of: impl Fn(usize) -> usize, groups: usize) -> Result<Vec<Totals>> {
        let (stats_name, buckets_name) = self.names;
        let read_stats = || self.stats.get(&(slot as u32), 0).with_context(|| format!("reading {stats_name}"));
        // Which histogram groups saw a value, on any CPU.
        let mut seen = [false; GROUP_COUNT_SLOTS];
        for s in read_stats()?.iter() {
            for (g, &c) in seen.iter_mut().zip(&s.group_counts) {
                *g |= c > 0;
            }
        }
        let mut latencies: Vec<Latencies> = (0..groups).map(|_| Latencies::new()).collect();
        for (group, _) in seen.iter().enumerate().take(hdr::GROUPS).filter(|(_, &s)| s) {
            let key = (slot * hdr::GROUPS + group) as u32;
            let per_cpu = self.buckets.get(&key, 0).with_context(|| format!("reading {buckets_name}"))?;
            let mut counts = vec![[0u64; hdr::GROUP_BUCKETS]; groups];
            for (cpu, g) in per_cpu.iter().enumerate() {
                let Some(total) = counts.get_mut(group_of(cpu)) else { continue };
                for (t, c) in total.iter_mut().zip(g.counts) {
                    *t += c;
                }
            }
            for (l, total) in latencies.iter_mut().zip(&counts) {
                for (i, &c) in total.iter().enumerate().filter(|(_, &c)| c > 0) {
                    l.add_bucket(group * hdr::GROUP_BUCKETS + i, c)?;
                }
            }
        }
        let mut sums = vec![(0u64, u64::MAX, 0u64, 0u64, 0u64); groups];
        for (cpu, s) in read_stats()?.iter().enumerate() {
            let Some((sum, min, max, missed, lost)) = sums.get_mut(group_of(cpu)) else { continue };
            *sum += s.sum_ns;
            if s.count > 0 {
                *min = (*min).min(s.min_ns);
            }
            *max = (*max).max(s.max_ns);
            *missed += s.missed;
            *lost += s.outliers_lost;
        }
        // A CPU may count a value between the reads of its buckets and its
        // stats: the histogram can trail the kernel's count by a few.
        Ok(latencies
            .into_iter()
            .zip(sums)
            .map(|(mut latencies, (sum, min, max, missed, lost))| {
                latencies.set_totals(sum, min, max);
                Totals { latencies, missed, outliers_lost: lost }
            })
            .collect())
    }
}

/// What `histograms` per-CPU histograms hold in the kernel: per-CPU maps
/// take room on every possible CPU.
pub fn memory(histograms: usize, what: &str) -> String {
    let cpus = aya::util::nr_cpus().unwrap_or(1);
    let bytes = histograms * hdr::HISTOGRAM_BYTES * cpus;
    format!(
        "{histograms} histograms hold {} KiB of kernel memory ({} KiB per {what} per CPU, {cpus} possible CPUs)",
        bytes >> 10,
        hdr::HISTOGRAM_BYTES >> 10
    )
}
