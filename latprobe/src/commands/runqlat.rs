//! `latprobe runqlat`: how long runnable tasks wait for a CPU, as HDR
//! percentiles and a log2 histogram, for the whole machine, per CPU or per
//! process.
//!
//! The `rq_` programs (see `sched_probes`) add every wait to this CPU's
//! histogram in the kernel, in `fn`'s HDR bucket layout; nothing per context
//! switch leaves the kernel. --per-cpu reads each CPU's copy of the per-CPU
//! histogram separately; --per-pid gives the first `--max-pids` processes a
//! histogram slot each, and counts the rest in slot 0, "other".

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use latprobe_common::sched::{hist, maps};

use crate::{
    cli::RunqlatArgs,
    cost::{self, Cost, SelfCost},
    histogram::Latencies,
    kernel_hist::{HistMaps, Totals},
    metrics::{self, Exporter, Series},
    output::{
        self,
        hdr_log::{series_tag, HdrLog},
        text,
    },
    report::{Format, FunctionReport},
    run::{Run, Step},
    sched_probes::{self, Config, Probes},
};

/// How waits are grouped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Grouping {
    All,
    PerCpu,
    PerPid,
}

/// One histogram to print.
struct Row {
    /// `cpu=N`, `pid=N`, `other`; None for the whole machine.
    key: Option<String>,
    comm: Option<String>,
    totals: Totals,
}

/// Where the rows come from.
struct Source {
    grouping: Grouping,
    maps: HistMaps,
    pid_slots: Option<BpfHashMap<MapData, u32, u32>>,
    cpus: usize,
    /// Names of processes seen, kept after they exit.
    comms: HashMap<u32, String>,
}

impl Source {
    /// The processes that have a slot, as (tgid, slot).
    fn slots(&self) -> Result<Vec<(u32, u32)>> {
        match &self.pid_slots {
            Some(map) => map.iter().collect::<Result<_, _>>().with_context(|| format!("reading {}", maps::PID_SLOTS)),
            None => Ok(Vec::new()),
        }
    }

    /// Notes the name of every process with a slot while it still runs:
    /// by the final report, short-lived ones are gone from /proc.
    fn remember_comms(&mut self) -> Result<()> {
        for (tgid, _) in self.slots()? {
            self.comm(tgid);
        }
        Ok(())
    }

    fn comm(&mut self, tgid: u32) -> String {
        self.comms.entry(tgid).or_insert_with(|| text::read_comm(tgid)).clone()
    }

    fn rows(&mut self, probes: &Probes) -> Result<Vec<Row>> {
        let lost = probes.lost_per_cpu()?;
        let lost_total: u64 = lost.iter().map(|l| l.no_start).sum();
        let mut rows = Vec::new();
        match self.grouping {
            Grouping::All => {
                let mut totals = self.maps.totals(0)?;
                totals.missed = lost_total;
                rows.push(Row { key: None, comm: None, totals });
            }
            Grouping::PerCpu => {
                for (cpu, mut totals) in self.maps.totals_per_cpu(0, self.cpus)?.into_iter().enumerate() {
                    totals.missed = lost.get(cpu).map_or(0, |l| l.no_start);
                    if totals.latencies.count() > 0 || totals.missed > 0 {
                        rows.push(Row { key: Some(format!("cpu={cpu}")), comm: None, totals });
                    }
                }
            }
            Grouping::PerPid => {
                for (tgid, slot) in self.slots()? {
                    let comm = self.comm(tgid);
                    let totals = self.maps.totals(slot as usize)?;
                    rows.push(Row { key: Some(format!("pid={tgid}")), comm: Some(comm), totals });
                }
                rows.sort_by_key(|r| std::cmp::Reverse(r.totals.latencies.count()));
                // Untimed waits belong to no known process: "other" carries them.
                let mut other = self.maps.totals(0)?;
                other.missed = lost_total;
                if other.latencies.count() > 0 || other.missed > 0 {
                    rows.push(Row { key: Some("other".into()), comm: None, totals: other });
                }
            }
        }
        Ok(rows)
    }
}

pub async fn run(args: RunqlatArgs) -> Result<()> {
    let mut run = Run::prepare(&args.run, None, None)?;
    let mut hdr_log = args.hdr_log.as_deref().map(HdrLog::create).transpose()?;
    let exporter = args.listen.as_ref().map(Exporter::start).transpose()?;
    let grouping = if args.per_cpu {
        Grouping::PerCpu
    } else if args.per_pid {
        Grouping::PerPid
    } else {
        Grouping::All
    };
    let config = Config {
        tgid: run.tgid(),
        tid: 0,
        cpu: None,
        comm: None,
        threshold_ns: None,
        stacks: false,
        hist: if grouping == Grouping::PerPid { hist::PER_PID } else { hist::ONE },
        pid_slots: if grouping == Grouping::PerPid { args.max_pids } else { 0 },
        ring_bytes: 0,
        mode: args.attach,
    };
    let mut cost = cost::start(args.run.max_overhead)?;
    let mut probes = sched_probes::start(&config)?;
    let maps = HistMaps::take(&mut probes.ebpf, maps::STATS, maps::BUCKETS)?;
    let pid_slots = if grouping == Grouping::PerPid {
        let map = probes.ebpf.take_map(maps::PID_SLOTS).context("map RQ_PID_SLOTS missing")?;
        Some(BpfHashMap::try_from(map).context("map RQ_PID_SLOTS")?)
    } else {
        None
    };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
    let mut source = Source { grouping, maps, pid_slots, cpus, comms: HashMap::new() };
    let attach = probes.mechanism.to_string();

    output::say(&format!("tracing run-queue latency ({attach}); Ctrl-C to end"));
    run.report_every(args.interval);
    // Names are read while processes live: by the end, short-lived ones are gone.
    let own_poll = (grouping == Grouping::PerPid).then_some(Duration::from_millis(500));
    if let Some(period) = metrics::poll_period(exporter.as_ref(), own_poll) {
        run.poll_every(period);
    }
    run.judge_budget_every(cost.as_ref().and_then(SelfCost::budget_window));
    run.activate()?;
    if let Some(log) = hdr_log.as_mut() {
        log.begin(&format!("runqlat ({attach})"));
    }
    let mut last_report = Instant::now();
    let mut previous: HashMap<Option<String>, Latencies> = HashMap::new();
    let end = loop {
        match run.next_tick().await? {
            Step::Ended(end) => break end,
            Step::Budget => {
                if let Some(end) = run.over_budget(cost.as_mut(), &probes.ebpf) {
                    break end;
                }
            }
            Step::Poll => match exporter.as_ref() {
                Some(exporter) => publish(exporter, &source.rows(&probes)?, cost.as_ref(), &probes),
                None => source.remember_comms()?,
            },
            Step::Interval => {
                let now = Instant::now();
                let mut out = String::new();
                let mut deltas = Vec::new();
                let rows = source.rows(&probes)?;
                if let Some(exporter) = exporter.as_ref() {
                    publish(exporter, &rows, cost.as_ref(), &probes);
                }
                for row in rows {
                    let before = previous.get(&row.key).cloned().unwrap_or_else(Latencies::new);
                    let delta = row.totals.latencies.since(&before)?;
                    out += &render(&row, &delta, &attach, "interval", now - last_report, args.format);
                    deltas.push((series_tag("runqlat", row.key.as_deref()), delta));
                    previous.insert(row.key, row.totals.latencies);
                }
                if let Some(log) = hdr_log.as_mut() {
                    log.interval(&deltas);
                }
                if let Some(cost) = cost.as_mut() {
                    out += &cost.since_last(&probes.ebpf).render("interval", args.format);
                }
                output::report(out);
                last_report = now;
            }
            Step::Records => {}
        }
    };

    run.end(&end);
    let final_cost = cost.as_ref().map(|c| c.whole_run(&probes.ebpf));
    probes.stop();
    let elapsed = run.elapsed();
    let mut out = String::new();
    let rows = source.rows(&probes)?;
    if let Some(exporter) = exporter.as_ref() {
        exporter.publish(&series(&rows), &[], final_cost.as_ref());
    }
    if rows.is_empty() && args.format == Format::Text {
        out += "runqlat: no waits seen\n";
    }
    let mut deltas = Vec::new();
    for row in &rows {
        out += &render(row, &row.totals.latencies, &attach, "final", elapsed, args.format);
        let before = previous.get(&row.key).cloned().unwrap_or_else(Latencies::new);
        deltas.push((series_tag("runqlat", row.key.as_deref()), row.totals.latencies.since(&before)?));
    }
    if let Some(cost) = final_cost {
        out += &cost.render("final", args.format);
    }
    output::report(out);
    hdr_log.map_or(Ok(()), |log| log.end(&deltas))
}

/// The rows, cumulative since the start, as `--listen` serves them.
fn series(rows: &[Row]) -> Vec<Series<'_>> {
    rows.iter()
        .map(|row| Series {
            function: "runqlat".into(),
            key: row.key.clone(),
            latencies: &row.totals.latencies,
            untimed: row.totals.missed,
            outliers_lost: row.totals.outliers_lost,
        })
        .collect()
}

fn publish(exporter: &Exporter, rows: &[Row], cost: Option<&SelfCost>, probes: &Probes) {
    let cost: Option<Cost> = cost.map(|c| c.whole_run(&probes.ebpf));
    exporter.publish(&series(rows), &[], cost.as_ref());
}

fn render(row: &Row, latencies: &Latencies, attach: &str, period: &str, elapsed: Duration, format: Format) -> String {
    let report = FunctionReport {
        function: "runqlat",
        key: row.key.as_deref(),
        comm: row.comm.as_deref(),
        noun: "waits",
        attach,
        period,
        seconds: elapsed.as_secs_f64(),
        latencies,
        missed: row.totals.missed,
        outliers_lost: row.totals.outliers_lost,
        outliers_unprinted: 0,
        over_budget: false,
    };
    match format {
        Format::Text => format!("{}\n", report.to_text()),
        Format::Json => format!("{}\n", report.to_json()),
    }
}
