//! `latprobe lock`: which kernel locks tasks waited on, how long, and who
//! waited.
//!
//! The `lock_` programs (raw_tp on `lock:contention_begin/end`) add every
//! wait to its lock's per-CPU totals in the kernel and, for the first
//! `--max-locks` locks, to an HDR histogram; only waits over `--slower` come
//! through the ring buffer. Reports rank locks by total wait and name each
//! one: its kernel symbol when it is a static lock, else its kind and the
//! first function of its waiters' stack outside locking code.

use std::{collections::HashMap, fmt::Write as _, time::Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, StackTraceMap},
    programs::Program,
    Ebpf,
};
use latprobe_common::{
    hdr,
    lock::{
        flags, globals, maps, programs, CallCounts, LockEvent, LockStats, Lost, WaiterKey, WaiterStats, LOCK_ENTRIES,
        STACK_ENTRIES, TASK_ENTRIES, WAITER_ENTRIES,
    },
    COMM_LEN,
};
use serde::Serialize;

use crate::{
    attach::BtfLater,
    bpf, btf_offsets,
    cli::LockArgs,
    clock::WallClock,
    cost::{self, SelfCost},
    duration::format_ns,
    histogram::{Latencies, QUANTILES},
    kallsyms::{self, SymbolsLater},
    kernel_features,
    kernel_hist::HistMaps,
    lock_waiters::{self, Waiters},
    metrics::{self, Counter, Exporter, Series},
    output::{
        self,
        hdr_log::{series_tag, HdrLog},
        text,
    },
    report::{frames_json, Format, Period},
    run::{Ring, Run, Step, BATCH, SETTLE_TIME},
    sched_probes::comm_prefix,
};

/// How far into a data symbol a lock may be and still be named after it
/// (a lock inside a static struct: `init_mm+0x68`).
const MAX_DATA_OFFSET: u64 = 1024;

/// Function-name prefixes of the locking code itself: a waiter's stack is
/// named after its first frame outside them.
const LOCKING_FRAMES: [&str; 23] = [
    "_raw_",
    "raw_spin_",
    "do_raw_",
    "queued_",
    "native_queued_",
    "__pv_queued_",
    "pv_",
    "mutex_",
    "__mutex_",
    "down_",
    "__down_",
    "rwsem_",
    "rt_mutex",
    "__rt_mutex",
    "rt_spin",
    "rtlock_",
    "rwbase_",
    "__rwbase_",
    "percpu_down_",
    "__percpu_down_",
    "rt_read_",
    "rt_write_",
    "lock_",
];

/// The kind of lock a wait was on, from its `LCB_F_*` flags.
fn kind(f: u32) -> &'static str {
    let rw = |r: &'static str, w: &'static str, other: &'static str| {
        if f & flags::READ != 0 {
            r
        } else if f & flags::WRITE != 0 {
            w
        } else {
            other
        }
    };
    if f & flags::MUTEX != 0 {
        "mutex"
    } else if f & flags::PERCPU != 0 {
        rw("percpu-rwsem:R", "percpu-rwsem:W", "percpu-rwsem")
    } else if f & flags::RT != 0 {
        // PREEMPT_RT builds rwsems and rwlocks alike on `rwbase_rt`, and
        // flags them alike.
        rw("rwbase-rt:R", "rwbase-rt:W", "rt_mutex")
    } else if f & flags::SPIN != 0 {
        rw("rwlock:R", "rwlock:W", "spinlock")
    } else {
        rw("rwsem:R", "rwsem:W", "rwsem")
    }
}

/// `--during`'s calls: those counted, and those whose entry or return the
/// kernel ran no program for (it never re-enters a program on one CPU).
struct Calls {
    counts: CallCounts,
    entries_missed: u64,
    exits_missed: u64,
}

/// Who waited on each lock, and who held it meanwhile.
struct Who {
    waiters: Waiters,
    holders: Waiters,
}

impl Who {
    fn read(source: &Source) -> Result<Self> {
        Ok(Self { waiters: Waiters::read(&source.waiters)?, holders: Waiters::read(&source.holders)? })
    }
}

/// One lock's waits since tracing began (or over an interval).
#[derive(Clone, Debug)]
struct LockRow {
    addr: u64,
    count: u64,
    total_ns: u64,
    max_ns: u64,
    flags: u32,
}

/// The maps and symbols a report is read from.
struct Source {
    locks: PerCpuHashMap<MapData, u64, LockStats>,
    slots: BpfHashMap<MapData, u64, u32>,
    hist: HistMaps,
    stacks: StackTraceMap<MapData>,
    lost: PerCpuArray<MapData, Lost>,
    calls: PerCpuArray<MapData, CallCounts>,
    waiters: BpfHashMap<MapData, WaiterKey, WaiterStats>,
    holders: BpfHashMap<MapData, WaiterKey, WaiterStats>,
    /// `--during` FUNC and its slow-call threshold.
    during: Option<(String, u64)>,
    symbols: SymbolsLater,
    max_locks: usize,
}

impl Source {
    fn rows(&self) -> Result<Vec<LockRow>> {
        let mut rows = Vec::new();
        for entry in self.locks.iter() {
            let (addr, per_cpu) = entry.context("reading LOCK_LOCKS")?;
            let mut row = LockRow { addr, count: 0, total_ns: 0, max_ns: 0, flags: 0 };
            for s in per_cpu.iter().filter(|s| s.count > 0) {
                row.count += s.count;
                row.total_ns += s.total_ns;
                row.max_ns = row.max_ns.max(s.max_ns);
                row.flags = s.flags;
            }
            if row.count > 0 {
                rows.push(row);
            }
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.total_ns));
        Ok(rows)
    }

    fn lost(&self) -> Result<Lost> {
        let values: PerCpuValues<Lost> = self.lost.get(&0, 0).context("reading LOCK_LOST")?;
        Ok(values.iter().fold(Lost::default(), |a, l| Lost {
            no_task_entry: a.no_task_entry + l.no_task_entry,
            too_deep: a.too_deep + l.too_deep,
            no_lock_entry: a.no_lock_entry + l.no_lock_entry,
            no_waiter_entry: a.no_waiter_entry + l.no_waiter_entry,
            events: a.events + l.events,
        }))
    }

    /// `--during`'s calls so far. Read while the programs are loaded: the
    /// calls the kernel skipped are their programs' recursion misses.
    fn calls(&self, ebpf: &Ebpf) -> Result<Calls> {
        let values: PerCpuValues<CallCounts> = self.calls.get(&0, 0).context("reading LOCK_CALL_COUNTS")?;
        let counts = values.iter().fold(CallCounts::default(), |a, c| CallCounts {
            calls: a.calls + c.calls,
            slow_calls: a.slow_calls + c.slow_calls,
            waits_dropped: a.waits_dropped + c.waits_dropped,
            untimed: a.untimed + c.untimed,
        });
        let [entry, exit] = programs::DURING_FENTRY;
        let [kprobe, kretprobe] = programs::DURING_KPROBE;
        Ok(Calls {
            counts,
            entries_missed: recursion_misses(ebpf, [entry, kprobe]),
            exits_missed: recursion_misses(ebpf, [exit, kretprobe]),
        })
    }

    /// The waiter's stack, symbolized, innermost first, without the
    /// tracer's frames.
    fn stack(&self, id: i32) -> Vec<(u64, Option<String>)> {
        if id < 0 {
            return Vec::new();
        }
        let ips: Vec<u64> =
            self.stacks.get(&(id as u32), 0).map(|s| s.frames().iter().map(|f| f.ip).collect()).unwrap_or_default();
        kallsyms::symbolize_stack(&ips, self.symbols.text())
    }

    /// Where a lock is taken: the first function outside locking code.
    fn caller(&self, stack_id: i32) -> Option<String> {
        self.stack(stack_id).into_iter().find_map(|(_, s)| {
            let s = s?;
            let function = s.split('+').next().unwrap_or_default().to_string();
            (!LOCKING_FRAMES.iter().any(|p| function.starts_with(p))).then_some(function)
        })
    }

    /// Where a lock is taken: the caller its waiters waited from longest.
    fn main_caller(&self, waiters: &[lock_waiters::Waiter]) -> Option<String> {
        lock_waiters::main_caller(waiters, |id| self.caller(id))
    }

    fn name(&self, addr: u64) -> Option<String> {
        self.symbols.data().and_then(|d| d.data_at(addr, MAX_DATA_OFFSET))
    }

    /// Each lock with a histogram slot, cumulative since the start, keyed
    /// `lock=NAME` (its kernel symbol) or `lock=0xADDR` (as the JSON's
    /// `name` and `lock`): the series of `--hdr-log` and `--listen`.
    fn histograms(&self, rows: &[LockRow]) -> Result<Vec<(u64, String, Latencies)>> {
        rows.iter()
            .filter_map(|r| Some((r.addr, self.slot_of(r.addr)?)))
            .map(|(addr, slot)| {
                let key = format!("lock={}", self.name(addr).unwrap_or_else(|| format!("{addr:#x}")));
                Ok((addr, key, self.hist.totals(slot)?.latencies))
            })
            .collect()
    }

    /// HDR percentiles of a lock with a histogram slot.
    fn slot_of(&self, addr: u64) -> Option<usize> {
        self.slots.get(&addr, 0).ok().map(|s| s as usize).filter(|&s| s >= 1 && s <= self.max_locks)
    }
}

pub async fn run(args: LockArgs) -> Result<()> {
    let mut run = Run::prepare(&args.run, args.cpu, None)?;
    // The kernel's BTF for --during's fentry, parsed meanwhile.
    let btf = args.during.is_some().then(BtfLater::start);
    if args.top == 0 {
        bail!("--top must be at least 1");
    }
    let mut hdr_log = args.hdr_log.as_deref().map(HdrLog::create).transpose()?;
    let exporter = args.listen.as_ref().map(Exporter::start).transpose()?;
    let comm = match &args.comm {
        Some(c) => comm_prefix(c)?,
        None => [0; COMM_LEN],
    };
    let comm_len = args.comm.as_ref().map_or(0, |c| c.len() as u32);
    let (tgid, cpu) = (run.tgid(), args.cpu.unwrap_or(u32::MAX));
    // With --during, --slower is about calls of FUNC, not single waits.
    let threshold = if args.during.is_some() { u64::MAX } else { args.slower.unwrap_or(u64::MAX) };
    let during = u32::from(args.during.is_some());
    let during_slower = args.slower.unwrap_or(0);
    if let Some(func) = &args.during {
        if !crate::kretprobe::is_symbol(func) {
            bail!("--during {}: not a kernel function name", text::printable(func));
        }
    }
    let stacks = u32::from(args.stacks);
    let slots = args.max_locks + 1;
    let ring_bytes = if threshold != u64::MAX { latprobe_common::lock::EVENTS_RING_BYTES } else { bpf::page_size() };
    let kernel_btf = btf_offsets::Btf::from_sys_fs()?;
    let task = btf_offsets::TaskOffsets::from_btf(&kernel_btf)?;
    let owners = btf_offsets::LockOwnerOffsets::from_btf(&kernel_btf);
    drop(kernel_btf);
    output::verbose(&format!("lock owner offsets from BTF: {owners:?}"));
    let mut cost = cost::start(args.run.max_overhead)?;
    let mut ebpf = bpf::load_lock(|loader| {
        loader
            .override_global(globals::TARGET_TGID, &tgid, true)
            .override_global(globals::TARGET_CPU, &cpu, true)
            .override_global(globals::COMM_PREFIX, &comm, true)
            .override_global(globals::COMM_PREFIX_LEN, &comm_len, true)
            .override_global(globals::THRESHOLD_NS, &threshold, true)
            .override_global(globals::STACKS, &stacks, true)
            .override_global(globals::LOCK_SLOTS, &args.max_locks, true)
            .override_global(globals::DURING, &during, true)
            .override_global(globals::DURING_SLOWER_NS, &during_slower, true)
            .override_global(globals::MUTEX_OWNER_OFF, &owners.mutex, true)
            .override_global(globals::RWSEM_OWNER_OFF, &owners.rwsem, true)
            .override_global(globals::RT_MUTEX_OWNER_OFF, &owners.rt_mutex, true)
            .override_global(globals::TASK_TGID_OFF, &task.tgid, true)
            .override_global(globals::TASK_COMM_OFF, &task.comm, true)
            .map_max_entries(maps::CALLS, TASK_ENTRIES)
            .map_max_entries(maps::TASKS, TASK_ENTRIES)
            .map_max_entries(maps::LOCKS, LOCK_ENTRIES)
            .map_max_entries(maps::SLOTS, args.max_locks)
            .map_max_entries(latprobe_common::SLOT_OWNERS, bpf::slot_owners(args.max_locks))
            .map_max_entries(maps::STATS, slots)
            .map_max_entries(maps::BUCKETS, slots * hdr::GROUPS as u32)
            .map_max_entries(maps::STACKS, STACK_ENTRIES)
            .map_max_entries(maps::WAITERS, WAITER_ENTRIES)
            .map_max_entries(maps::HOLDERS, WAITER_ENTRIES)
            .map_max_entries(maps::EVENTS, ring_bytes);
    })?;
    attach(&mut ebpf)?;
    let btf = btf.and_then(BtfLater::get);
    let during_how = match &args.during {
        Some(func) => Some(attach_during(&mut ebpf, btf.as_ref(), func)?),
        None => None,
    };
    // Everything is attached: the parsed BTF (megabytes) is not kept.
    drop(btf);
    let take = |ebpf: &mut Ebpf, name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
    let source = Source {
        locks: PerCpuHashMap::try_from(take(&mut ebpf, maps::LOCKS)?).context("map LOCK_LOCKS")?,
        slots: BpfHashMap::try_from(take(&mut ebpf, maps::SLOTS)?).context("map LOCK_SLOT_OF")?,
        hist: HistMaps::take(&mut ebpf, maps::STATS, maps::BUCKETS)?,
        stacks: StackTraceMap::try_from(take(&mut ebpf, maps::STACKS)?).context("map LOCK_STACK_MAP")?,
        lost: PerCpuArray::try_from(take(&mut ebpf, maps::LOST)?).context("map LOCK_LOST")?,
        calls: PerCpuArray::try_from(take(&mut ebpf, maps::CALL_COUNTS)?).context("map LOCK_CALL_COUNTS")?,
        waiters: BpfHashMap::try_from(take(&mut ebpf, maps::WAITERS)?).context("map LOCK_WAITERS")?,
        holders: BpfHashMap::try_from(take(&mut ebpf, maps::HOLDERS)?).context("map LOCK_HOLDERS")?,
        during: args.during.clone().zip(args.slower),
        symbols: SymbolsLater::start(true),
        max_locks: args.max_locks as usize,
    };
    let mut ring: Ring<LockEvent> = Ring::take(&mut ebpf, maps::EVENTS)?;
    let printer = EventPrinter { clock: WallClock::new(), format: args.format, source: &source, stacks: args.stacks };

    let inside = match (&args.during, &during_how, args.slower) {
        (Some(func), Some(how), Some(slower)) => {
            format!(", inside calls of {func} ({how}) that take {} or more", format_ns(slower))
        }
        _ => String::new(),
    };
    output::say(&format!("tracing lock contention (raw_tp contention_begin, contention_end){inside}; Ctrl-C to end"));
    run.report_every(args.interval);
    if let Some(period) = metrics::poll_period(exporter.as_ref(), None) {
        run.poll_every(period);
    }
    run.judge_budget_every(cost.as_ref().and_then(SelfCost::budget_window));
    run.activate()?;
    if let Some(log) = hdr_log.as_mut() {
        log.begin(&format!("lock (raw_tp contention_begin, contention_end){inside}"));
    }
    let mut last_report = Instant::now();
    let mut previous: HashMap<u64, LockRow> = HashMap::new();
    let mut logged = Logged::default();
    let end = loop {
        match run.next(Some(&mut ring)).await? {
            Step::Ended(end) => break end,
            Step::Budget => {
                if let Some(end) = run.over_budget(cost.as_mut(), &ebpf) {
                    break end;
                }
            }
            Step::Records => {
                ring.drain(BATCH, |e| printer.print(&e))?;
            }
            Step::Interval => {
                let now = Instant::now();
                let rows = source.rows()?;
                let delta = since(&rows, &previous);
                let period = Period { name: "interval", elapsed: now - last_report, unprinted: 0 };
                let (lost, calls) = (source.lost()?, source.calls(&ebpf)?);
                let who = Who::read(&source)?;
                output::report(render(&delta, &source, &who, &lost, &calls, &period, &args, false));
                let histograms = source.histograms(&rows)?;
                if let Some(exporter) = exporter.as_ref() {
                    let cost = cost.as_ref().map(|c| c.whole_run(&ebpf));
                    exporter.publish(&series(&histograms), &lost_counts(&lost), cost.as_ref());
                }
                if let Some(log) = hdr_log.as_mut() {
                    log.interval(&logged.since(&histograms)?);
                }
                if let Some(cost) = cost.as_mut() {
                    output::report(cost.since_last(&ebpf).render("interval", args.format));
                }
                previous = rows.into_iter().map(|r| (r.addr, r)).collect();
                last_report = now;
            }
            Step::Poll => {
                if let Some(exporter) = exporter.as_ref() {
                    let histograms = source.histograms(&source.rows()?)?;
                    let cost = cost.as_ref().map(|c| c.whole_run(&ebpf));
                    exporter.publish(&series(&histograms), &lost_counts(&source.lost()?), cost.as_ref());
                }
            }
        }
    };

    run.end(&end);
    let final_cost = cost.as_ref().map(|c| c.whole_run(&ebpf));
    let calls = source.calls(&ebpf)?;
    unload_all(&mut ebpf);
    let discarded = ring.drain_until(run.drain_deadline(), |e| printer.print(&e))?;
    let unprinted = discarded + output::settle_records(run.drain_deadline() + SETTLE_TIME);
    let period = Period { name: "final", elapsed: run.elapsed(), unprinted };
    let (rows, lost) = (source.rows()?, source.lost()?);
    let histograms = source.histograms(&rows)?;
    if let Some(exporter) = exporter.as_ref() {
        exporter.publish(&series(&histograms), &lost_counts(&lost), final_cost.as_ref());
    }
    let who = Who::read(&source)?;
    output::report(render(&rows, &source, &who, &lost, &calls, &period, &args, true));
    if let Some(cost) = final_cost {
        output::report(cost.render("final", args.format));
    }
    let last = logged.since(&histograms)?;
    hdr_log.map_or(Ok(()), |log| log.end(&last))
}

/// What `--listen` serves of each lock's histogram.
fn series(histograms: &[(u64, String, Latencies)]) -> Vec<Series<'_>> {
    histograms
        .iter()
        .map(|(_, key, latencies)| Series {
            function: "lock".into(),
            key: Some(key.clone()),
            latencies,
            untimed: 0,
            outliers_lost: 0,
        })
        .collect()
}

/// What could not be measured, named as in the JSON summary.
fn lost_counts(lost: &Lost) -> [Counter; 5] {
    [
        Counter::lost("untimed_task_table_full", lost.no_task_entry),
        Counter::lost("untimed_too_deep", lost.too_deep),
        Counter::lost("uncounted_lock_table_full", lost.no_lock_entry),
        Counter::lost("unattributed_waits", lost.no_waiter_entry),
        Counter::lost("events_lost", lost.events),
    ]
}

/// Each lock's histogram as of the previous `--hdr-log` entry.
#[derive(Default)]
struct Logged(HashMap<u64, Latencies>);

impl Logged {
    /// Each lock's waits since the previous entry, tagged `lock[lock=…]`.
    fn since(&mut self, histograms: &[(u64, String, Latencies)]) -> Result<Vec<(String, Latencies)>> {
        let mut entries = Vec::new();
        for (addr, key, latencies) in histograms {
            let delta = match self.0.get(addr) {
                Some(before) => latencies.since(before)?,
                None => latencies.clone(),
            };
            entries.push((series_tag("lock", Some(key)), delta));
            self.0.insert(*addr, latencies.clone());
        }
        Ok(entries)
    }
}

fn attach(ebpf: &mut Ebpf) -> Result<()> {
    for (name, tracepoint) in programs::ALL {
        let Some(Program::RawTracePoint(p)) = ebpf.program_mut(name) else {
            bail!("program {name} is missing from the lock object");
        };
        let described = |e: aya::programs::ProgramError| anyhow!("{tracepoint}: {}", bpf::describe(&e));
        p.load().map_err(described)?;
        p.attach(tracepoint).map_err(|e| {
            anyhow!(
                "cannot attach to lock:{tracepoint} ({}): the lock contention tracepoints need Linux 5.19 or newer",
                bpf::describe(&e)
            )
        })?;
    }
    Ok(())
}

/// Attaches `--during`'s programs to FUNC: fentry/fexit, else
/// kprobe/kretprobe. Returns the mechanism.
fn attach_during(ebpf: &mut Ebpf, btf: Option<&aya::Btf>, func: &str) -> Result<&'static str> {
    let fentry = (|| -> Result<()> {
        let btf = btf.context("reading kernel BTF (/sys/kernel/btf/vmlinux) failed")?;
        let [entry, exit] = programs::DURING_FENTRY;
        let Some(Program::FEntry(p)) = ebpf.program_mut(entry) else { bail!("program {entry} missing") };
        p.load(func, btf).map_err(|e| anyhow!("{}", bpf::describe(&e)))?;
        p.attach().map_err(|e| anyhow!("{}", bpf::describe(&e)))?;
        let Some(Program::FExit(p)) = ebpf.program_mut(exit) else { bail!("program {exit} missing") };
        p.load(func, btf).map_err(|e| anyhow!("{}", bpf::describe(&e)))?;
        p.attach().map_err(|e| anyhow!("{}", bpf::describe(&e)))?;
        Ok(())
    })();
    let Err(fentry_error) = fentry else { return Ok("fentry") };
    output::verbose(&format!("--during {func}: fentry/fexit unavailable: {fentry_error:#}"));
    unload_during(ebpf);
    let kprobe = (|| -> Result<()> {
        for name in programs::DURING_KPROBE {
            let Some(Program::KProbe(p)) = ebpf.program_mut(name) else { bail!("program {name} missing") };
            p.load().map_err(|e| anyhow!("{}", bpf::describe(&e)))?;
            p.attach(func, 0).map_err(|e| anyhow!("{}", bpf::describe(&e)))?;
        }
        Ok(())
    })();
    match kprobe {
        Ok(()) => Ok("kprobe"),
        Err(kprobe_error) => bail!(
            "cannot trace --during {}: fentry: {fentry_error:#}; kprobe: {kprobe_error:#} (is it a kernel \
             function? `grep -w NAME /proc/kallsyms`)",
            text::printable(func)
        ),
    }
}

/// How many runs of `names` the kernel skipped (see `kernel_features::recursion_misses`).
fn recursion_misses(ebpf: &Ebpf, names: [&str; 2]) -> u64 {
    use std::os::fd::AsFd;
    let misses = |name: &str| {
        let fd = match ebpf.program(name)? {
            Program::FEntry(p) => p.fd().ok()?,
            Program::FExit(p) => p.fd().ok()?,
            Program::KProbe(p) => p.fd().ok()?,
            _ => return None,
        };
        kernel_features::recursion_misses(fd.as_fd())
    };
    names.iter().filter_map(|name| misses(name)).sum()
}

fn unload_during(ebpf: &mut Ebpf) {
    for name in programs::DURING_FENTRY.iter().chain(&programs::DURING_KPROBE) {
        let _ = match ebpf.program_mut(name) {
            Some(Program::FEntry(p)) => p.unload(),
            Some(Program::FExit(p)) => p.unload(),
            Some(Program::KProbe(p)) => p.unload(),
            _ => Ok(()),
        };
    }
}

fn unload_all(ebpf: &mut Ebpf) {
    unload_during(ebpf);
    for (name, _) in programs::ALL {
        if let Some(Program::RawTracePoint(p)) = ebpf.program_mut(name) {
            let _ = p.unload();
        }
    }
}

/// Each lock's waits since `previous`.
fn since(rows: &[LockRow], previous: &HashMap<u64, LockRow>) -> Vec<LockRow> {
    let mut delta: Vec<LockRow> = rows
        .iter()
        .filter_map(|r| {
            let mut d = r.clone();
            if let Some(p) = previous.get(&r.addr) {
                d.count = r.count.saturating_sub(p.count);
                d.total_ns = r.total_ns.saturating_sub(p.total_ns);
            }
            (d.count > 0).then_some(d)
        })
        .collect();
    delta.sort_by_key(|r| std::cmp::Reverse(r.total_ns));
    delta
}

#[derive(Serialize)]
struct LockJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    period: &'a str,
    lock: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    lock_kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    caller: Option<String>,
    count: u64,
    total_ns: u64,
    /// Exact over the whole run; in an interval, the run's so far.
    max_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p999_ns: Option<u64>,
    /// The processes that waited, since tracing began, most waited first
    /// (the first `MAX_LISTED`)…
    waiters: Vec<WaiterJson>,
    /// …of this many.
    processes: usize,
    /// The processes whose tasks held the lock as waits began, where the
    /// kernel records a lock's owner (mutex, rwsem held for writing,
    /// rt_mutex), with the waits each caused, since tracing began.
    holders: Vec<WaiterJson>,
    /// With `--stacks`: the waiters' kernel stacks, since tracing began,
    /// most waited first (the first `MAX_STACKS`).
    #[serde(skip_serializing_if = "Option::is_none")]
    stacks: Option<Vec<StackJson>>,
}

/// Processes listed per lock in JSON.
const MAX_LISTED: usize = 8;
/// Stacks shown per lock with `--stacks`.
const MAX_STACKS: usize = 3;

#[derive(Serialize)]
struct WaiterJson {
    pid: u32,
    comm: String,
    waits: u64,
    wait_ns: u64,
}

impl WaiterJson {
    fn of(share: &lock_waiters::Share<(u32, String)>) -> Self {
        Self { pid: share.key.0, comm: share.key.1.clone(), waits: share.count, wait_ns: share.total_ns }
    }
}

#[derive(Serialize)]
struct StackJson {
    waits: u64,
    wait_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    caller: Option<String>,
    frames: Vec<crate::report::FrameJson>,
}

#[derive(Serialize)]
struct LockSummaryJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    period: &'a str,
    seconds: f64,
    locks: usize,
    waits: u64,
    wait_ns: u64,
    untimed_task_table_full: u64,
    untimed_too_deep: u64,
    uncounted_lock_table_full: u64,
    /// Counted on their lock, but not by waiter (the waiter table full).
    unattributed_waits: u64,
    events_lost: u64,
    events_unprinted: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    during: Option<DuringJson<'a>>,
}

#[derive(Serialize)]
struct DuringJson<'a> {
    function: &'a str,
    slower_ns: u64,
    calls: u64,
    slow_calls: u64,
    /// Waits inside slow calls past the ones a call can hold.
    waits_dropped: u64,
    untimed_calls: u64,
    /// Calls whose return, or whose entry, the kernel ran no program for
    /// (a program is never re-entered on its CPU; on PREEMPT_RT a preempted
    /// one blocks the next): not counted in `calls`.
    exits_missed: u64,
    entries_missed: u64,
}

/// The top locks by total wait, and what was lost.
#[allow(clippy::too_many_arguments)]
fn render(
    rows: &[LockRow],
    source: &Source,
    who: &Who,
    lost: &Lost,
    calls: &Calls,
    period: &Period,
    args: &LockArgs,
    whole_run: bool,
) -> String {
    let top: Vec<&LockRow> = rows.iter().take(args.top).collect();
    let percentiles = |r: &LockRow| -> Option<[u64; 3]> {
        // Histograms are cumulative: their percentiles describe the whole run.
        if !whole_run {
            return None;
        }
        let slot = source.slot_of(r.addr)?;
        let l = source.hist.totals(slot).ok()?.latencies;
        (l.count() > 0)
            .then(|| [l.quantile_ns(QUANTILES[0].0), l.quantile_ns(QUANTILES[2].0), l.quantile_ns(QUANTILES[3].0)])
    };
    let waits: u64 = rows.iter().map(|r| r.count).sum();
    let wait_ns: u64 = rows.iter().map(|r| r.total_ns).sum();
    match args.format {
        Format::Json => {
            let mut out = String::new();
            for r in &top {
                let p = percentiles(r);
                let of_lock = who.waiters.of(r.addr);
                let processes = lock_waiters::processes(of_lock);
                let holders = lock_waiters::processes(who.holders.of(r.addr));
                let stacks = args.stacks.then(|| {
                    lock_waiters::stacks(of_lock)
                        .into_iter()
                        .take(MAX_STACKS)
                        .map(|s| StackJson {
                            waits: s.count,
                            wait_ns: s.total_ns,
                            caller: source.caller(s.key),
                            frames: frames_json(&source.stack(s.key)),
                        })
                        .collect()
                });
                let json = LockJson {
                    kind: "lock",
                    period: period.name,
                    lock: format!("{:#x}", r.addr),
                    name: source.name(r.addr),
                    lock_kind: kind(r.flags),
                    caller: source.main_caller(of_lock),
                    count: r.count,
                    total_ns: r.total_ns,
                    max_ns: r.max_ns,
                    p50_ns: p.map(|p| p[0]),
                    p99_ns: p.map(|p| p[1]),
                    p999_ns: p.map(|p| p[2]),
                    waiters: processes.iter().take(MAX_LISTED).map(WaiterJson::of).collect(),
                    processes: processes.len(),
                    holders: holders.iter().take(MAX_LISTED).map(WaiterJson::of).collect(),
                    stacks,
                };
                out += &serde_json::to_string(&json).expect("lock serializes");
                out.push('\n');
            }
            let summary = LockSummaryJson {
                kind: "lock_summary",
                period: period.name,
                seconds: (period.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                locks: rows.len(),
                waits,
                wait_ns,
                untimed_task_table_full: lost.no_task_entry,
                untimed_too_deep: lost.too_deep,
                uncounted_lock_table_full: lost.no_lock_entry,
                unattributed_waits: lost.no_waiter_entry,
                events_lost: lost.events,
                events_unprinted: period.unprinted,
                during: source.during.as_ref().map(|(function, slower_ns)| DuringJson {
                    function,
                    slower_ns: *slower_ns,
                    calls: calls.counts.calls,
                    slow_calls: calls.counts.slow_calls,
                    waits_dropped: calls.counts.waits_dropped,
                    untimed_calls: calls.counts.untimed,
                    exits_missed: calls.exits_missed,
                    entries_missed: calls.entries_missed,
                }),
            };
            out += &serde_json::to_string(&summary).expect("summary serializes");
            out.push('\n');
            out
        }
        Format::Text => {
            let mut out = format!(
                "lock {} {:.1}s: {waits} waits on {} locks, {} waited in all\n",
                period.name,
                period.elapsed.as_secs_f64(),
                rows.len(),
                format_ns(wait_ns)
            );
            if let Some((function, slower_ns)) = &source.during {
                let _ = writeln!(
                    out,
                    "  only inside calls of {function} that took {} or more: {} of {} calls{}",
                    format_ns(*slower_ns),
                    calls.counts.slow_calls,
                    calls.counts.calls,
                    if calls.counts.waits_dropped + calls.counts.untimed + calls.exits_missed + calls.entries_missed > 0
                    {
                        format!(
                            " (LOST: {} waits past {} per call, {} calls untimed, {} calls whose entry and {} whose \
                             return the kernel skipped)",
                            calls.counts.waits_dropped,
                            latprobe_common::lock::MAX_CALL_WAITS,
                            calls.counts.untimed,
                            calls.entries_missed,
                            calls.exits_missed
                        )
                    } else {
                        String::new()
                    }
                );
            }
            if top.is_empty() {
                return out + "  no contention seen\n\n";
            }
            let _ = writeln!(
                out,
                "  {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}  {:<14} {:<32} waiters",
                "total", "waits", "max", "p50", "p99", "p99.9", "kind", "lock"
            );
            for r in top {
                let p = percentiles(r);
                let q = |i: usize| p.map_or("-".to_string(), |p| format_ns(p[i]));
                let of_lock = who.waiters.of(r.addr);
                let holders = lock_waiters::processes(who.holders.of(r.addr));
                let held_by = match holders.is_empty() {
                    true => String::new(),
                    false => format!("; held by {}", waiters_text(&holders)),
                };
                let name = source
                    .name(r.addr)
                    .or_else(|| source.main_caller(of_lock).map(|c| format!("in {c}")))
                    .unwrap_or_else(|| format!("{:#x}", r.addr));
                let _ = writeln!(
                    out,
                    "  {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}  {:<14} {:<32} {}{held_by}",
                    format_ns(r.total_ns),
                    r.count,
                    format_ns(r.max_ns),
                    q(0),
                    q(1),
                    q(2),
                    kind(r.flags),
                    name,
                    waiters_text(&lock_waiters::processes(of_lock))
                );
                if args.stacks {
                    stacks_text(&mut out, source, of_lock);
                }
            }
            if lost.no_task_entry + lost.too_deep + lost.no_lock_entry > 0 {
                let _ = writeln!(
                    out,
                    "  LOST: {} waits untimed ({TASK_ENTRIES} tasks already waiting), {} nested too deep, {} on \
                     locks past the first {LOCK_ENTRIES}",
                    lost.no_task_entry, lost.too_deep, lost.no_lock_entry
                );
            }
            if lost.no_waiter_entry > 0 {
                let _ = writeln!(
                    out,
                    "  {} waits counted on their lock but not by waiter (past {WAITER_ENTRIES} waiters)",
                    lost.no_waiter_entry
                );
            }
            if lost.events > 0 || period.unprinted > 0 {
                let _ = writeln!(
                    out,
                    "  slow waits: {} lost (ring buffer full), {} not printed (stdout too slow, or still queued at \
                     the end)",
                    lost.events, period.unprinted
                );
            }
            out + "\n"
        }
    }
}

/// A lock's waiting processes, most waited first: `pid=156 (workload)`,
/// or `pid=156 (workload) 81%, 2 more`.
fn waiters_text(processes: &[lock_waiters::Share<(u32, String)>]) -> String {
    let Some(first) = processes.first() else { return "-".to_string() };
    let mut line = format!("pid={} ({})", first.key.0, first.key.1);
    if processes.len() > 1 {
        let all: u64 = processes.iter().map(|p| p.total_ns).sum();
        let share = (first.total_ns as f64 * 100.0 / all.max(1) as f64).round();
        let _ = write!(line, " {share}%, {} more", processes.len() - 1);
    }
    line
}

/// `--stacks`: a lock's most waited-from stacks, under its row.
fn stacks_text(out: &mut String, source: &Source, waiters: &[lock_waiters::Waiter]) {
    let stacks = lock_waiters::stacks(waiters);
    let shown = stacks.len().min(MAX_STACKS);
    for (i, s) in stacks.iter().take(MAX_STACKS).enumerate() {
        let _ =
            writeln!(out, "      stack {} of {}: {} waits, {}", i + 1, stacks.len(), s.count, format_ns(s.total_ns));
        let frames = source.stack(s.key);
        if frames.is_empty() {
            let _ = writeln!(out, "        (not recorded: the stack table was full)");
        }
        for (addr, symbol) in frames {
            let _ = writeln!(out, "        {}", symbol.unwrap_or_else(|| format!("{addr:#x}")));
        }
    }
    if stacks.len() > shown {
        let _ = writeln!(out, "      ({} more stacks)", stacks.len() - shown);
    }
}

/// Prints waits over `--slower` from the ring buffer.
struct EventPrinter<'a> {
    clock: WallClock,
    format: Format,
    source: &'a Source,
    stacks: bool,
}

#[derive(Serialize)]
struct WaitJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: &'a str,
    lock: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    lock_kind: &'static str,
    wait_ns: u64,
    cpu: u32,
    pid: u32,
    tid: u32,
    comm: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stack: Vec<crate::report::FrameJson>,
}

impl EventPrinter<'_> {
    fn print(&self, e: &LockEvent) -> Result<()> {
        output::record(|| {
            let time = self.clock.format(e.ts_ns);
            let comm = text::comm(&e.comm);
            let ips = &e.stack[..(e.stack_len as usize).min(e.stack.len())];
            let stack =
                if self.stacks { kallsyms::symbolize_stack(ips, self.source.symbols.text()) } else { Vec::new() };
            let json = WaitJson {
                kind: "lock_wait",
                time: &time,
                lock: format!("{:#x}", e.lock),
                name: self.source.name(e.lock),
                lock_kind: kind(e.flags),
                wait_ns: e.wait_ns,
                cpu: e.cpu,
                pid: e.tgid,
                tid: e.tid,
                comm: &comm,
                stack: frames_json(&stack),
            };
            match self.format {
                Format::Json => format!("{}\n", serde_json::to_string(&json).expect("wait serializes")),
                Format::Text => {
                    let name = json.name.clone().unwrap_or_else(|| json.lock.clone());
                    let mut line = format!(
                        "{time} {} {} {name} cpu={} pid={} tid={} comm={comm}\n",
                        format_ns(e.wait_ns),
                        json.lock_kind,
                        e.cpu,
                        e.tgid,
                        e.tid
                    );
                    for (addr, symbol) in &stack {
                        let _ = writeln!(line, "    {}", symbol.clone().unwrap_or_else(|| format!("{addr:#x}")));
                    }
                    line
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_kernels_flags() {
        assert_eq!(kind(flags::SPIN), "spinlock");
        assert_eq!(kind(flags::SPIN | flags::READ), "rwlock:R");
        assert_eq!(kind(flags::WRITE), "rwsem:W");
        assert_eq!(kind(flags::READ), "rwsem:R");
        assert_eq!(kind(flags::MUTEX | flags::SPIN), "mutex");
        assert_eq!(kind(flags::RT), "rt_mutex");
        assert_eq!(kind(flags::PERCPU | flags::WRITE), "percpu-rwsem:W");
    }
}
