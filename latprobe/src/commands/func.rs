//! `latprobe fn`: latency of kernel and user functions.
//!
//! Loads the `fn` programs with the filters as load-time globals, attaches
//! them per function (see `attach`), then prints outliers as they arrive and
//! a report per function every `--interval` and at the end.

use std::{
    pin::pin,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{MapData, RingBuf},
    Btf,
};
use latprobe_common::func::{globals, Outlier, GROUPS_PER_FUNC, MAX_FUNCS};
use tokio::io::unix::AsyncFd;

use crate::{
    attach::{self, Attacher, Mechanism, Target, NET_RX_FUNCTION},
    bpf,
    cli::FnArgs,
    clock::WallClock,
    histogram::Latencies,
    kallsyms::{self, KernelSymbols},
    kernel_hist::{HistMaps, Totals},
    launch::GatedChild,
    output::emit,
    report::{Format, FunctionReport, OutlierReport},
    session::{End, Session},
};

/// One traced function and where its counts live.
struct Traced {
    name: String,
    mechanism: Mechanism,
    /// The previous interval's cumulative counts, for per-interval reports.
    previous: Latencies,
}

pub async fn run(args: FnArgs, verbose: bool) -> Result<()> {
    let mut session = Session::new(args.secs)?;
    if args.functions.len() > MAX_FUNCS {
        bail!("at most {MAX_FUNCS} functions can be traced at once ({} given)", args.functions.len());
    }
    let targets = args.functions.iter().map(|f| Target::parse(f)).collect::<Result<Vec<_>>>()?;
    crate::session::check_targets(args.cpu, args.pid, None)?;
    bpf::preflight()?;
    if let Some(pid) = args.pid {
        session.watch_process(pid);
    }

    let mut child = if args.command.is_empty() { None } else { Some(GatedChild::spawn(&args.command)?) };
    let tgid = args.pid.or(child.as_ref().map(|c| c.pid)).unwrap_or(0);
    let softirq_slot = targets
        .iter()
        .position(|t| *t == Target::Kernel(NET_RX_FUNCTION.into()))
        .unwrap_or(MAX_FUNCS) as u32;
    let (cpu, slower, stacks) = (args.cpu.unwrap_or(u32::MAX), args.slower.unwrap_or(u64::MAX), u32::from(args.stacks));
    let buckets_len = (targets.len() * GROUPS_PER_FUNC) as u32;
    // Room for bursts of outliers when they are asked for; one page otherwise.
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
    let ring_bytes: u32 = if args.slower.is_some() { 4 << 20 } else { page };
    let mut ebpf = bpf::load(|loader| {
        loader
            .override_global(globals::TARGET_TGID, &tgid, true)
            .override_global(globals::TARGET_CPU, &cpu, true)
            .override_global(globals::SLOWER_NS, &slower, true)
            .override_global(globals::STACKS, &stacks, true)
            .override_global(globals::SOFTIRQ_SLOT, &softirq_slot, true)
            .map_max_entries("BUCKETS", buckets_len)
            .map_max_entries("OUTLIERS", ring_bytes);
    })?;

    // Kernel symbols are only needed to print stacks; they take megabytes.
    let symbols = if args.stacks { KernelSymbols::load().ok() } else { None };
    if args.stacks && !symbols.as_ref().is_some_and(KernelSymbols::addresses_visible) {
        eprintln!(
            "latprobe: kernel addresses are hidden (/proc/sys/kernel/kptr_restrict), so stacks \
             print as raw addresses: run as root, or set kptr_restrict to 0"
        );
    }
    let mut traced = Vec::new();
    {
        let mut attacher = Attacher {
            ebpf: &mut ebpf,
            btf: Btf::from_sys_fs().ok(),
            mode: args.attach,
            pid: (tgid != 0).then_some(tgid),
            verbose,
        };
        for (slot, target) in targets.iter().enumerate() {
            let mechanism = attacher.attach(slot, target)?;
            if verbose {
                eprintln!("latprobe: {} attached with {mechanism}", target.name());
            }
            traced.push(Traced { name: target.name(), mechanism, previous: Latencies::new() });
        }
    }
    let maps = HistMaps::take(&mut ebpf, "STATS", "BUCKETS")?;
    let ring = RingBuf::try_from(ebpf.take_map("OUTLIERS").context("map OUTLIERS missing")?)?;
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until
    // both drop together.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the outlier ring buffer: {e}"))?;
    let clock = WallClock::new();
    let names: Vec<String> = traced.iter().map(|t| t.name.clone()).collect();
    let printer = OutlierPrinter { names: &names, symbols: symbols.as_ref(), clock, format: args.format };

    let described: Vec<String> = traced.iter().map(|t| format!("{} ({})", t.name, t.mechanism)).collect();
    eprintln!("latprobe: tracing {}; Ctrl-C to end", described.join(", "));
    if let Some(c) = child.as_mut() {
        c.release()?;
    }
    session.start_clock(args.secs);
    let started = Instant::now();
    let mut last_report = started;
    let mut ticker = args.interval.map(|ns| {
        let period = Duration::from_nanos(ns.max(1_000_000));
        tokio::time::interval_at(tokio::time::Instant::now() + period, period)
    });

    let end = {
        let mut ended = pin!(session.ended(child.as_mut().map(|c| &mut c.child)));
        loop {
            tokio::select! {
                end = &mut ended => break end,
                _ = async { ticker.as_mut().unwrap().tick().await }, if ticker.is_some() => {
                    let now = Instant::now();
                    for (slot, t) in traced.iter_mut().enumerate() {
                        let totals = maps.totals(slot)?;
                        let delta = totals.latencies.since(&t.previous)?;
                        print_report(&t.name, t.mechanism, "interval", now - last_report, &delta, &totals, args.format)?;
                        t.previous = totals.latencies;
                    }
                    last_report = now;
                }
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("waiting for outliers")?;
                    printer.drain(guard.get_inner_mut())?;
                    guard.clear_ready();
                }
            }
        }
    };

    // Stop new calls from being timed, then collect what is in flight.
    attach::detach_entries(&mut ebpf);
    printer.drain(ring.get_mut())?;
    let elapsed = started.elapsed();
    for (slot, t) in traced.iter().enumerate() {
        let totals = maps.totals(slot)?;
        print_report(&t.name, t.mechanism, "final", elapsed, &totals.latencies, &totals, args.format)?;
    }
    match end {
        End::CommandExited(status) if !status.success() => {
            eprintln!("latprobe: {} exited with {status}", args.command[0]);
        }
        End::Signal(name) if verbose => eprintln!("latprobe: ended by {name}"),
        End::ProcessExited(pid) => eprintln!("latprobe: process {pid} exited"),
        _ => {}
    }
    Ok(())
}

fn print_report(
    name: &str,
    mechanism: Mechanism,
    period: &str,
    elapsed: Duration,
    latencies: &Latencies,
    totals: &Totals,
    format: Format,
) -> Result<()> {
    let report = FunctionReport {
        function: name,
        key: None,
        comm: None,
        noun: "calls",
        attach: &mechanism.to_string(),
        period,
        seconds: elapsed.as_secs_f64(),
        latencies,
        missed: totals.missed,
        outliers_lost: totals.outliers_lost,
    };
    match format {
        Format::Text => emit(&format!("{}\n", report.to_text())),
        Format::Json => emit(&format!("{}\n", report.to_json())),
    }
}

/// Decodes outliers from the ring buffer and prints them.
struct OutlierPrinter<'a> {
    names: &'a [String],
    symbols: Option<&'a KernelSymbols>,
    clock: WallClock,
    format: Format,
}

impl OutlierPrinter<'_> {
    fn drain(&self, ring: &mut RingBuf<MapData>) -> Result<()> {
        while let Some(item) = ring.next() {
            if item.len() < size_of::<Outlier>() {
                continue;
            }
            // SAFETY: the record is an `Outlier` written by our program; read
            // unaligned since the ring buffer guarantees only 8-byte alignment.
            let o: Outlier = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            let Some(name) = self.names.get(o.slot as usize) else { continue };
            let comm_len = o.comm.iter().position(|&b| b == 0).unwrap_or(o.comm.len());
            // The stack starts inside our own program and its trampoline.
            let stack = o.stack[..(o.stack_len as usize).min(o.stack.len())]
                .iter()
                .map(|&addr| (addr, self.symbols.and_then(|s| s.symbolize(addr))))
                .skip_while(|(_, sym)| sym.as_deref().is_none_or(kallsyms::is_bpf_frame))
                .collect();
            let report = OutlierReport {
                time: self.clock.format(o.end_ns),
                function: name,
                duration_ns: o.duration_ns,
                cpu: o.cpu,
                pid: o.tgid,
                tid: o.tid,
                comm: String::from_utf8_lossy(&o.comm[..comm_len]).into_owned(),
                stack,
            };
            match self.format {
                Format::Text => emit(&report.to_text())?,
                Format::Json => emit(&format!("{}\n", report.to_json()))?,
            }
        }
        Ok(())
    }
}
