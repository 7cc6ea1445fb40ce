//! What latprobe's own programs cost the machine, as the kernel measures it.
//!
//! `BPF_ENABLE_STATS` makes the kernel time every BPF program run (two clock
//! reads each) for as long as the returned fd is open: closed with latprobe,
//! whatever way it ends, unlike the `kernel.bpf_stats_enabled` sysctl, which
//! a killed tool would leave on. Each report then says how many times
//! latprobe's programs ran, their nanoseconds per run, and their share of
//! the machine's CPU time. That is the programs' own time: the probe
//! mechanism's entry cost (a trampoline call, a breakpoint) comes on top.

use std::{
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use aya::{sys::Stats, Ebpf};
use serde_json::json;

use crate::{duration::format_ns, output, report::Format};

/// [`SelfCost::start`], or None after saying (with -v) why not.
pub fn start_or_explain() -> Option<SelfCost> {
    SelfCost::start().map_err(|why| output::verbose(&format!("latprobe's own cost is not measured: {why}"))).ok()
}

/// Counting is on while this lives.
pub struct SelfCost {
    _stats: OwnedFd,
    cpus: usize,
    first: Sample,
    last: Sample,
}

/// Program runs and their total time, at one instant.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    runs: u64,
    run_ns: u64,
}

impl SelfCost {
    /// Starts counting, before anything is attached. `None` (and why) when
    /// the kernel refuses: it needs CAP_SYS_ADMIN and Linux 5.8.
    pub fn start() -> Result<SelfCost, String> {
        let stats = aya::sys::enable_stats(Stats::RunTime).map_err(|e| e.to_string())?;
        let cpus = aya::util::online_cpus().map_or(1, |c| c.len().max(1));
        let zero = Sample { at: Instant::now(), runs: 0, run_ns: 0 };
        Ok(SelfCost { _stats: stats, cpus, first: zero, last: zero })
    }

    /// The cost since the last call (or since counting started). Programs
    /// must still be loaded: take the final one before detaching.
    pub fn since_last(&mut self, ebpf: &Ebpf) -> Cost {
        let now = sample(ebpf);
        let cost = self.between(self.last, now);
        self.last = now;
        cost
    }

    /// The cost of the whole run so far.
    pub fn whole_run(&self, ebpf: &Ebpf) -> Cost {
        self.between(self.first, sample(ebpf))
    }

    fn between(&self, from: Sample, to: Sample) -> Cost {
        Cost {
            elapsed: to.at - from.at,
            runs: to.runs.saturating_sub(from.runs),
            run_ns: to.run_ns.saturating_sub(from.run_ns),
            cpus: self.cpus,
        }
    }
}

fn sample(ebpf: &Ebpf) -> Sample {
    let (mut runs, mut run_ns) = (0, 0);
    for info in ebpf.programs().filter_map(|(_, p)| p.info().ok()) {
        runs += info.run_count();
        run_ns += info.run_time().as_nanos() as u64;
    }
    Sample { at: Instant::now(), runs, run_ns }
}

/// latprobe's own cost over one period.
pub struct Cost {
    pub elapsed: Duration,
    pub runs: u64,
    pub run_ns: u64,
    pub cpus: usize,
}

impl Cost {
    pub fn ns_per_run(&self) -> u64 {
        self.run_ns.checked_div(self.runs).unwrap_or(0)
    }

    pub fn runs_per_second(&self) -> f64 {
        self.runs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Percent of all online CPUs' time over the period.
    pub fn cpu_percent(&self) -> f64 {
        100.0 * self.run_ns as f64 / (self.elapsed.as_secs_f64().max(1e-9) * 1e9 * self.cpus as f64)
    }

    pub fn render(&self, period: &str, format: Format) -> String {
        match format {
            Format::Text => format!(
                "latprobe's programs ({period}): {} runs ({:.0}/s), {} per run, {:.3}% of {} CPUs\n",
                self.runs,
                self.runs_per_second(),
                format_ns(self.ns_per_run()),
                self.cpu_percent(),
                self.cpus
            ),
            Format::Json => format!(
                "{}\n",
                json!({
                    "type": "cost",
                    "period": period,
                    "seconds": self.elapsed.as_secs_f64(),
                    "runs": self.runs,
                    "runs_per_s": self.runs_per_second(),
                    "ns_per_run": self.ns_per_run(),
                    "cpu_percent": self.cpu_percent(),
                    "cpus": self.cpus,
                })
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_of_the_machine() {
        let c = Cost { elapsed: Duration::from_secs(2), runs: 1_000_000, run_ns: 100_000_000, cpus: 4 };
        assert_eq!(c.ns_per_run(), 100);
        assert_eq!(c.runs_per_second(), 500_000.0);
        // 0.1 s of program time over 2 s on 4 CPUs: 1.25%.
        assert!((c.cpu_percent() - 1.25).abs() < 1e-9);
        let v: serde_json::Value = serde_json::from_str(&c.render("final", Format::Json)).unwrap();
        assert_eq!(v["type"], "cost");
        assert_eq!(v["ns_per_run"], 100);
        assert!(c.render("final", Format::Text).contains("100ns per run"), "{}", c.render("final", Format::Text));
    }

    #[test]
    fn no_runs_costs_nothing() {
        let c = Cost { elapsed: Duration::ZERO, runs: 0, run_ns: 0, cpus: 1 };
        assert_eq!(c.ns_per_run(), 0);
        assert_eq!(c.cpu_percent(), 0.0);
    }
}
