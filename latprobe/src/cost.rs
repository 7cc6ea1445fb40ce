//! What latprobe's own programs cost the machine, as the kernel measures it,
//! and the budget (`--max-overhead`) it is held to.
//!
//! `BPF_ENABLE_STATS` makes the kernel time every BPF program run (two clock
//! reads each) for as long as the returned fd is open: closed with latprobe,
//! whatever way it ends, unlike the `kernel.bpf_stats_enabled` sysctl, which
//! a killed tool would leave on. Each report then says how many times
//! latprobe's programs ran, their nanoseconds per run, and their share of
//! the machine's CPU time. That is the programs' own time: the probe
//! mechanism's entry cost (a trampoline call, a breakpoint) comes on top.

use std::{
    cell::RefCell,
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use aya::{sys::Stats, Ebpf};
use serde_json::json;

use crate::{
    attach,
    budget::{self, Limit, Shed},
    duration::format_ns,
    kernel_features, output,
    report::Format,
};

/// Starts counting, before anything is attached, held to `limit` (the
/// default budget when `None`). Without the kernel's counting: `None`, said
/// with -v, or an error when a budget was asked for by name.
pub fn start(limit: Option<Limit>) -> Result<Option<SelfCost>> {
    let limit_percent = match limit.unwrap_or(Limit::Percent(budget::DEFAULT_PERCENT)) {
        Limit::Off => None,
        Limit::Percent(p) => Some(p),
    };
    match SelfCost::start(limit_percent) {
        Ok(cost) => {
            if let Some(p) = limit_percent {
                output::verbose(&format!("--max-overhead {p}%: judged every {}s", budget::WINDOW.as_secs()));
            }
            Ok(Some(cost))
        }
        Err(why) if matches!(limit, Some(Limit::Percent(_))) => bail!(
            "--max-overhead needs the kernel to time latprobe's programs, and it refused ({why}): that takes \
             Linux 5.8+ and CAP_SYS_ADMIN; run without --max-overhead, or with --max-overhead off"
        ),
        Err(why) => {
            output::verbose(&format!("latprobe's own cost is not measured, nor held to a budget: {why}"));
            Ok(None)
        }
    }
}

/// Counting is on while this lives.
pub struct SelfCost {
    _stats: OwnedFd,
    cpus: usize,
    first: Sample,
    last: Sample,
    /// `--max-overhead`, in percent of all CPUs' time; `None` when off.
    limit_percent: Option<f64>,
    /// Each program's (runs, run ns) at the last judgement of the budget,
    /// and when.
    judged: HashMap<String, (u64, u64)>,
    judged_at: Instant,
    sheds: Vec<Shed>,
    /// Each program's (runs, run ns) when last read: a program detached
    /// over budget keeps counting in the whole run's cost.
    seen: RefCell<HashMap<String, (u64, u64)>>,
}

/// Program runs and their total time, at one instant.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    runs: u64,
    run_ns: u64,
}

/// What the budget weighs against each other: probes detached together.
pub struct Unit<'a> {
    /// What a shed says it detached.
    pub name: String,
    pub programs: Vec<&'a str>,
    /// What each run of those programs costs beyond its own run time (a
    /// uprobe's trap: see `probe_cost`), in ns; 0 where that is not known
    /// to matter.
    pub entry_ns_per_run: u64,
}

impl SelfCost {
    /// `None` (and why) when the kernel refuses: it needs CAP_SYS_ADMIN and
    /// Linux 5.8.
    fn start(limit_percent: Option<f64>) -> Result<SelfCost, String> {
        let stats = aya::sys::enable_stats(Stats::RunTime).map_err(|e| e.to_string())?;
        let cpus = aya::util::online_cpus().map_or(1, |c| c.len().max(1));
        let now = Instant::now();
        let zero = Sample { at: now, runs: 0, run_ns: 0 };
        Ok(SelfCost {
            _stats: stats,
            cpus,
            first: zero,
            last: zero,
            limit_percent,
            judged: HashMap::new(),
            judged_at: now,
            sheds: Vec::new(),
            seen: RefCell::new(HashMap::new()),
        })
    }

    /// The cost since the last call (or since counting started). Programs
    /// must still be loaded: take the final one before detaching.
    pub fn since_last(&mut self, ebpf: &Ebpf) -> Cost {
        let now = self.sample(ebpf);
        let cost = self.between(self.last, now);
        self.last = now;
        cost
    }

    /// The cost of the whole run so far.
    pub fn whole_run(&self, ebpf: &Ebpf) -> Cost {
        self.between(self.first, self.sample(ebpf))
    }

    /// Unloads program `name`, its runs counted to the last: detaching a
    /// uprobe waits out an RCU grace period (hundreds of milliseconds in
    /// an emulated guest), during which the probe still fires, so its
    /// counts are read after, through a descriptor kept for that.
    pub fn unload_counted(&self, ebpf: &mut Ebpf, name: &str) {
        let kept = ebpf.program(name).and_then(|p| p.fd().ok()).and_then(|fd| fd.try_clone().ok());
        attach::unload(ebpf, name);
        if let Some(stats) = kept.and_then(|fd| kernel_features::run_stats(fd.as_fd())) {
            self.seen.borrow_mut().insert(name.to_string(), stats);
        }
    }

    /// Every program's runs and time so far, those detached included (read
    /// when they were unloaded: see [`SelfCost::unload_counted`]).
    fn sample(&self, ebpf: &Ebpf) -> Sample {
        let mut seen = self.seen.borrow_mut();
        for (name, program) in ebpf.programs() {
            if let Ok(info) = program.info() {
                seen.insert(name.to_string(), (info.run_count(), info.run_time().as_nanos() as u64));
            }
        }
        let (runs, run_ns) = seen.values().fold((0, 0), |(r, n), (runs, ns)| (r + runs, n + ns));
        Sample { at: Instant::now(), runs, run_ns }
    }

    fn between(&self, from: Sample, to: Sample) -> Cost {
        Cost {
            elapsed: to.at - from.at,
            runs: to.runs.saturating_sub(from.runs),
            run_ns: to.run_ns.saturating_sub(from.run_ns),
            cpus: self.cpus,
            limit_percent: self.limit_percent,
            sheds: self.sheds.clone(),
        }
    }

    /// How often the budget wants judging: `None` when there is none.
    pub fn budget_window(&self) -> Option<Duration> {
        self.limit_percent.map(|_| budget::WINDOW)
    }

    /// Judges the time since the last judgement over every program of
    /// `ebpf`, as one unit named `what`. Over budget, the run must end: its
    /// probes are all there is to shed.
    pub fn over_budget_whole(&mut self, ebpf: &Ebpf, what: &str, traced: Duration) -> Option<Shed> {
        let programs: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
        let whole = Unit { name: what.to_string(), programs, entry_ns_per_run: 0 };
        self.over_budget(ebpf, &[whole], traced).map(|(_, shed)| shed)
    }

    /// Judges the time since the last judgement over `units` (those still
    /// attached): over budget, the costliest unit's index and the shed,
    /// which the caller detaches. Programs outside `units` are not weighed.
    pub fn over_budget(&mut self, ebpf: &Ebpf, units: &[Unit<'_>], traced: Duration) -> Option<(usize, Shed)> {
        let limit_percent = self.limit_percent?;
        let now = Instant::now();
        let window = now - self.judged_at;
        self.judged_at = now;
        // Each program's (runs, run ns) over the window.
        let mut spent: HashMap<&str, (u64, u64)> = HashMap::new();
        for (name, program) in ebpf.programs() {
            let Ok(info) = program.info() else { continue };
            let total = (info.run_count(), info.run_time().as_nanos() as u64);
            let before = self.judged.insert(name.to_string(), total).unwrap_or((0, 0));
            spent.insert(name, (total.0.saturating_sub(before.0), total.1.saturating_sub(before.1)));
        }
        let programs_ns = |unit: &Unit| -> u64 { unit.programs.iter().filter_map(|n| spent.get(n)).map(|s| s.1).sum() };
        let entries_ns = |unit: &Unit| -> u64 {
            unit.programs.iter().filter_map(|n| spent.get(n)).map(|s| s.0 * unit.entry_ns_per_run).sum()
        };
        let per_unit: Vec<u64> = units.iter().map(|u| programs_ns(u) + entries_ns(u)).collect();
        let verdict = budget::judge(&per_unit, window, self.cpus, limit_percent)?;
        let in_programs: u64 = units.iter().map(programs_ns).sum();
        // The caller detaches what is shed: its counts so far stay in the run's.
        self.sample(ebpf);
        let shed = Shed {
            what: units[verdict.costliest].name.clone(),
            last: units.len() == 1,
            after: traced,
            used_percent: verdict.used_percent,
            programs_percent: budget::percent_of(in_programs, window, self.cpus),
            limit_percent,
            cpus: self.cpus,
        };
        output::say(&shed.describe());
        self.sheds.push(shed.clone());
        Some((verdict.costliest, shed))
    }
}

/// latprobe's own cost over one period.
pub struct Cost {
    pub elapsed: Duration,
    pub runs: u64,
    pub run_ns: u64,
    pub cpus: usize,
    /// `--max-overhead`, when on.
    pub limit_percent: Option<f64>,
    /// What the budget made latprobe detach, so far.
    pub sheds: Vec<Shed>,
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
            Format::Text => {
                let mut line = format!(
                    "latprobe's programs ({period}): {} runs ({:.0}/s), {} per run, {:.3}% of {} CPUs",
                    self.runs,
                    self.runs_per_second(),
                    format_ns(self.ns_per_run()),
                    self.cpu_percent(),
                    self.cpus
                );
                for shed in &self.sheds {
                    line += &format!(
                        "; over --max-overhead {}% ({:.1}%), detached {} after {:.1}s",
                        shed.limit_percent,
                        shed.used_percent,
                        shed.what,
                        shed.after.as_secs_f64()
                    );
                }
                line + "\n"
            }
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
                    "limit_percent": self.limit_percent,
                    "over_budget": self.sheds.iter().map(Shed::to_json).collect::<Vec<_>>(),
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
        let c = Cost {
            elapsed: Duration::from_secs(2),
            runs: 1_000_000,
            run_ns: 100_000_000,
            cpus: 4,
            limit_percent: Some(5.0),
            sheds: Vec::new(),
        };
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
        let c = Cost { elapsed: Duration::ZERO, runs: 0, run_ns: 0, cpus: 1, limit_percent: None, sheds: Vec::new() };
        assert_eq!(c.ns_per_run(), 0);
        assert_eq!(c.cpu_percent(), 0.0);
    }
}
