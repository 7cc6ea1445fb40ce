//! `latprobe fn`: latency of kernel and user functions.
//!
//! Loads the `fn` programs with the filters as load-time globals, attaches
//! them per function (see `attach`), then prints outliers as they arrive and
//! a report per function every `--interval` and at the end.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use latprobe_common::func::{globals, maps, Outlier, GROUPS_PER_FUNC, MAX_FUNCS};

use crate::{
    attach::{self, Attacher, BtfLater, FrameStore, Mechanism, Target, NET_RX_FUNCTION},
    bpf,
    cli::FnArgs,
    clock::WallClock,
    cost::{self, SelfCost, Unit},
    duration::format_ns,
    histogram::Latencies,
    kallsyms::{self, SymbolsLater},
    kernel_hist::{self, HistMaps, Totals},
    kretprobe::ReturnProbe,
    metrics::{self, Exporter, Series},
    output::{
        self,
        hdr_log::{series_tag, HdrLog},
        text,
    },
    probe_cost,
    report::{Format, FunctionReport, OutlierReport, Period},
    run::{End, Ring, Run, Step, BATCH, SETTLE_TIME},
};

/// One traced function and where its counts live.
struct Traced {
    name: String,
    mechanism: Mechanism,
    /// The previous interval's cumulative counts, for per-interval reports.
    previous: Latencies,
    /// Its return probe, when made in tracefs (kprobe mode).
    returns: Option<ReturnProbe>,
    /// Detached over budget, after this long traced.
    shed_after: Option<Duration>,
    /// Its entry is detached and its return not yet: calls in flight get
    /// one budget window to return.
    draining: bool,
}

impl Traced {
    /// Calls not timed: deeper than tracked or without task storage (the
    /// kernel side counts those), or whose return the kernel dropped.
    fn missed(&self, totals: &Totals) -> u64 {
        totals.missed + self.returns.as_ref().map_or(0, ReturnProbe::missed)
    }
}

/// Ring buffer bytes with `--slower`: room for bursts of outliers.
const OUTLIER_RING_BYTES: u32 = 4 << 20;

pub async fn run(args: FnArgs) -> Result<()> {
    if args.functions.len() > MAX_FUNCS {
        bail!("at most {MAX_FUNCS} functions can be traced at once ({} given)", args.functions.len());
    }
    let targets = args.functions.iter().map(|f| Target::parse(f)).collect::<Result<Vec<_>>>()?;
    let mut run = Run::prepare(&args.run, args.cpu, None)?;
    let mut hdr_log = args.hdr_log.as_deref().map(HdrLog::create).transpose()?;
    let exporter = args.listen.as_ref().map(Exporter::start).transpose()?;
    let btf = BtfLater::start();

    let tgid = run.tgid();
    let softirq_slot =
        targets.iter().position(|t| *t == Target::Kernel(NET_RX_FUNCTION.into())).unwrap_or(MAX_FUNCS) as u32;
    let (cpu, slower, stacks) = (args.cpu.unwrap_or(u32::MAX), args.slower.unwrap_or(u64::MAX), u32::from(args.stacks));
    let buckets_len = (targets.len() * GROUPS_PER_FUNC) as u32;
    // One page when no outlier is asked for.
    let ring_bytes = if args.slower.is_some() { OUTLIER_RING_BYTES } else { bpf::page_size() };
    let mut cost = cost::start(args.run.max_overhead)?;
    let store = FrameStore::choose();
    output::verbose(store.describe());
    let mut ebpf = bpf::load(bpf::Object::Fn, |loader| {
        store.configure(loader);
        loader
            .override_global(globals::TARGET_TGID, &tgid, true)
            .override_global(globals::TARGET_CPU, &cpu, true)
            .override_global(globals::SLOWER_NS, &slower, true)
            .override_global(globals::STACKS, &stacks, true)
            .override_global(globals::SOFTIRQ_SLOT, &softirq_slot, true)
            .map_max_entries(maps::BUCKETS, buckets_len)
            .map_max_entries(maps::OUTLIERS, ring_bytes);
    })?;

    store.attach_cleanup(&mut ebpf)?;
    let btf = btf.get();
    let mut traced = Vec::new();
    {
        let mut attacher = Attacher {
            ebpf: &mut ebpf,
            btf: btf.as_ref(),
            mode: args.attach,
            pid: (tgid != 0).then_some(tgid),
            returns: Vec::new(),
        };
        for (slot, target) in targets.iter().enumerate() {
            let mechanism = attacher.attach(slot, target)?;
            output::verbose(&format!("{} attached with {mechanism}", text::printable(&target.name())));
            let returns = attacher.returns.iter().position(|(s, _)| *s == slot).map(|i| attacher.returns.remove(i).1);
            traced.push(Traced {
                name: text::printable(&target.name()).into_owned(),
                mechanism,
                previous: Latencies::new(),
                returns,
                shed_after: None,
                draining: false,
            });
        }
    }
    // Everything is attached: the parsed BTF (megabytes) is not kept.
    drop(btf);
    output::verbose(&kernel_hist::memory(targets.len(), "function"));
    let maps = HistMaps::take(&mut ebpf, maps::STATS, maps::BUCKETS)?;
    let mut ring: Ring<Outlier> = Ring::take(&mut ebpf, maps::OUTLIERS)?;
    // Kernel symbols are only needed to print stacks; they take megabytes.
    let symbols = args.stacks.then(|| SymbolsLater::start(false));
    let names: Vec<String> = traced.iter().map(|t| t.name.clone()).collect();
    let printer =
        OutlierPrinter { names: &names, symbols: symbols.as_ref(), clock: WallClock::new(), format: args.format };

    let described: Vec<String> = traced.iter().map(|t| format!("{} ({})", t.name, t.mechanism)).collect();
    output::say(&format!("tracing {}; Ctrl-C to end", described.join(", ")));
    run.report_every(args.interval);
    if let Some(period) = metrics::poll_period(exporter.as_ref(), None) {
        run.poll_every(period);
    }
    run.judge_budget_every(cost.as_ref().and_then(SelfCost::budget_window));
    run.activate()?;
    // Measured once every probe is attached (it takes the kernel tens of
    // milliseconds), before the first judgement of the budget.
    let trap_ns_per_run = uprobe_trap_ns_per_run(&mut ebpf, &traced, cost.as_ref());
    if let Some(log) = hdr_log.as_mut() {
        log.begin(&format!("fn {}", described.join(", ")));
    }
    let mut last_report = Instant::now();
    let end = loop {
        match run.next(Some(&mut ring)).await? {
            Step::Ended(end) => break end,
            Step::Budget => {
                if let Some(end) = judge_budget(&mut traced, trap_ns_per_run, cost.as_mut(), &mut ebpf, &run) {
                    break end;
                }
            }
            Step::Records => {
                ring.drain(BATCH, |o| printer.print(&o))?;
            }
            Step::Interval => {
                let now = Instant::now();
                let mut deltas = Vec::new();
                let all = all_totals(&maps, traced.len())?;
                if let Some(exporter) = exporter.as_ref() {
                    exporter.publish(&series(&traced, &all), &[], cost.as_ref().map(|c| c.whole_run(&ebpf)).as_ref());
                }
                for (t, totals) in traced.iter_mut().zip(all) {
                    let delta = totals.latencies.since(&t.previous)?;
                    let period = Period { name: "interval", elapsed: now - last_report, unprinted: 0 };
                    output::report(render(t, &period, &delta, &totals, args.format));
                    t.previous = totals.latencies;
                    deltas.push((series_tag(&t.name, None), delta));
                }
                if let Some(log) = hdr_log.as_mut() {
                    log.interval(&deltas);
                }
                if let Some(cost) = cost.as_mut() {
                    output::report(cost.since_last(&ebpf).render("interval", args.format));
                }
                last_report = now;
            }
            Step::Poll => {
                if let Some(exporter) = exporter.as_ref() {
                    let all = all_totals(&maps, traced.len())?;
                    exporter.publish(&series(&traced, &all), &[], cost.as_ref().map(|c| c.whole_run(&ebpf)).as_ref());
                }
            }
        }
    };

    run.end(&end);
    // Before detaching: a detached program's counts go with it.
    let final_cost = cost.as_ref().map(|c| c.whole_run(&ebpf));
    // Stop new calls from being timed, then collect what is in flight.
    attach::detach_entries(&mut ebpf);
    let discarded = ring.drain_until(run.drain_deadline(), |o| printer.print(&o))?;
    let period = Period {
        name: "final",
        elapsed: run.elapsed(),
        unprinted: discarded + output::settle_records(run.drain_deadline() + SETTLE_TIME),
    };
    let mut deltas = Vec::new();
    let all = all_totals(&maps, traced.len())?;
    if let Some(exporter) = exporter.as_ref() {
        exporter.publish(&series(&traced, &all), &[], final_cost.as_ref());
    }
    for (t, totals) in traced.iter().zip(&all) {
        output::report(render(t, &period, &totals.latencies, totals, args.format));
        deltas.push((series_tag(&t.name, None), totals.latencies.since(&t.previous)?));
    }
    if let Some(cost) = final_cost {
        output::report(cost.render("final", args.format));
    }
    hdr_log.map_or(Ok(()), |log| log.end(&deltas))
}

/// What a uprobe's trap adds to each run of its programs, where uprobes are
/// traced under a budget (see `probe_cost`): measured with the programs of
/// the first slot no function uses. 0 when there is no budget, no uprobe,
/// or no spare slot.
fn uprobe_trap_ns_per_run(ebpf: &mut aya::Ebpf, traced: &[Traced], cost: Option<&SelfCost>) -> u64 {
    if cost.and_then(SelfCost::budget_window).is_none() || !traced.iter().any(|t| t.mechanism == Mechanism::Uprobe) {
        return 0;
    }
    let unweighed = "--max-overhead weighs the uprobes' programs alone, not their traps";
    if traced.len() >= MAX_FUNCS {
        output::verbose(&format!("{MAX_FUNCS} functions leave no slot to measure a uprobe's trap with: {unweighed}"));
        return 0;
    }
    let (entry, exit) = Mechanism::Uprobe.programs(traced.len());
    match probe_cost::uprobe_pair_ns(ebpf, entry, exit) {
        Ok(ns) => {
            output::verbose(&format!(
                "a uprobe and its return probe cost {} a call beyond their programs (measured on latprobe's \
                 own code): --max-overhead counts it",
                format_ns(ns)
            ));
            // Each call runs the entry program and the return program once.
            ns / 2
        }
        Err(e) => {
            output::verbose(&format!("a uprobe's trap was not measured ({e:#}): {unweighed}"));
            0
        }
    }
}

/// At [`Step::Budget`]: detaches the returns of functions shed a window
/// ago, then, over budget, the entry of the costliest function still
/// traced (a uprobe's runs weighed with `trap_ns_per_run` each). The end
/// of the run when none is left.
fn judge_budget(
    traced: &mut [Traced],
    trap_ns_per_run: u64,
    cost: Option<&mut SelfCost>,
    ebpf: &mut aya::Ebpf,
    run: &Run,
) -> Option<End> {
    let cost = cost?;
    for (slot, t) in traced.iter_mut().enumerate().filter(|(_, t)| t.draining) {
        if let Some(r) = t.returns.as_mut() {
            r.detach();
        }
        cost.unload_counted(ebpf, t.mechanism.programs(slot).1);
        t.draining = false;
    }
    let live: Vec<usize> = (0..traced.len()).filter(|&slot| traced[slot].shed_after.is_none()).collect();
    let units: Vec<Unit> = live
        .iter()
        .map(|&slot| {
            let t = &traced[slot];
            let (entry, exit) = t.mechanism.programs(slot);
            let entry_ns_per_run = if t.mechanism == Mechanism::Uprobe { trap_ns_per_run } else { 0 };
            Unit { name: t.name.clone(), programs: vec![entry, exit], entry_ns_per_run }
        })
        .collect();
    let (unit, shed) = cost.over_budget(ebpf, &units, run.elapsed())?;
    let slot = live[unit];
    cost.unload_counted(ebpf, traced[slot].mechanism.programs(slot).0);
    traced[slot].shed_after = Some(shed.after);
    traced[slot].draining = !shed.last;
    shed.last.then_some(End::OverBudget)
}

/// Every traced function's counts since the start, in slot order.
fn all_totals(maps: &HistMaps, functions: usize) -> Result<Vec<Totals>> {
    (0..functions).map(|slot| maps.totals(slot)).collect()
}

/// What `--listen` serves: each function's counts since the start.
fn series<'a>(traced: &'a [Traced], totals: &'a [Totals]) -> Vec<Series<'a>> {
    traced
        .iter()
        .zip(totals)
        .map(|(t, totals)| Series {
            function: t.name.clone(),
            key: None,
            latencies: &totals.latencies,
            untimed: t.missed(totals),
            outliers_lost: totals.outliers_lost,
        })
        .collect()
}

fn render(t: &Traced, period: &Period, latencies: &Latencies, totals: &Totals, format: Format) -> String {
    let report = FunctionReport {
        function: &t.name,
        key: None,
        comm: None,
        noun: "calls",
        attach: &t.mechanism.to_string(),
        period: period.name,
        seconds: t.shed_after.filter(|_| period.name == "final").unwrap_or(period.elapsed).as_secs_f64(),
        latencies,
        missed: t.missed(totals),
        outliers_lost: totals.outliers_lost,
        outliers_unprinted: period.unprinted,
        over_budget: t.shed_after.is_some(),
    };
    match format {
        Format::Text => format!("{}\n", report.to_text()),
        Format::Json => format!("{}\n", report.to_json()),
    }
}

/// Prints outliers from the ring buffer.
struct OutlierPrinter<'a> {
    names: &'a [String],
    symbols: Option<&'a SymbolsLater>,
    clock: WallClock,
    format: Format,
}

impl OutlierPrinter<'_> {
    fn print(&self, o: &Outlier) -> Result<()> {
        let Some(name) = self.names.get(o.slot as usize) else { return Ok(()) };
        output::record(|| {
            let stack = &o.stack[..(o.stack_len as usize).min(o.stack.len())];
            let report = OutlierReport {
                time: self.clock.format(o.end_ns),
                function: name,
                duration_ns: o.duration_ns,
                cpu: o.cpu,
                pid: o.tgid,
                tid: o.tid,
                comm: text::comm(&o.comm),
                stack: kallsyms::symbolize_stack(stack, self.symbols.and_then(SymbolsLater::text)),
            };
            match self.format {
                Format::Text => report.to_text(),
                Format::Json => format!("{}\n", report.to_json()),
            }
        });
        Ok(())
    }
}
