//! `latprobe flame`: on-CPU and off-CPU flame graphs.
//!
//! Loads the flame programs, attaches a perf event per CPU (on-CPU) or the
//! scheduler switch tracepoint (off-CPU), waits for the end of the run while
//! reading the mappings of every process that shows up (so processes that
//! exit before the end are still symbolized), then folds the kernel's counts
//! into stacks and renders them with inferno.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, StackTraceMap},
    programs::{
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        BtfTracePoint, PerfEvent,
    },
    Btf, Ebpf,
};
use latprobe_common::{
    flame::{globals, maps, programs, Drops, StackKey, MAX_KEYS, MAX_PENDING, MAX_STACKS},
    func::{self, MAX_FUNCS},
};

use crate::{
    attach::{Attacher, BtfLater, FrameStore, Target, NET_RX_FUNCTION},
    bpf, btf_offsets,
    cli::FlameArgs,
    cost::{self, SelfCost},
    duration::format_ns,
    folded::{self, Stack},
    kallsyms::{self, KernelSymbols},
    output::{self, files::OutputFile, text},
    report::Format,
    run::{Ring, Run, Step, BATCH},
    usyms::UserSymbols,
};

/// Tasks tracked at once off-CPU where task storage cannot be used.
const OFF_CPU_TASKS: u32 = 16384;
/// Threads inside a `--during` call at once where task storage cannot be
/// used (about 1.3 KiB each).
const DURING_TASKS: u32 = 4096;

/// Ring buffer for new keys with user stacks: 8k keys between two reads.
const NEW_KEYS_BYTES: u32 = 256 << 10;

/// Where the results go, opened before anything is attached.
struct Outputs {
    svg: Option<OutputFile>,
    folded: Option<OutputFile>,
    /// No file named and stdout is not a terminal: the SVG goes to stdout.
    svg_to_stdout: bool,
}

impl Outputs {
    fn open(args: &FlameArgs) -> Result<Self> {
        let open = |p: &Path| OutputFile::create(p);
        let svg_path = match (&args.output, &args.folded) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(_)) => None,
            (None, None) if std::io::stdout().is_terminal() => Some(PathBuf::from("flame.svg")),
            (None, None) => None,
        };
        Ok(Self {
            svg: svg_path.as_deref().map(open).transpose()?,
            folded: args.folded.as_deref().map(open).transpose()?,
            svg_to_stdout: args.output.is_none() && args.folded.is_none() && svg_path.is_none(),
        })
    }
}

pub async fn run(args: FlameArgs) -> Result<()> {
    let (kernel, user) = match (args.kernel, args.user) {
        (false, false) => (true, true),
        chosen => chosen,
    };
    if args.freq == 0 || args.freq > 10_000 {
        bail!("--freq {}: choose between 1 and 10000 samples per second", args.freq);
    }
    let during = args.during.as_deref().map(Target::parse).transpose()?;
    let outputs = Outputs::open(&args)?;
    let mut run = Run::prepare(&args.run, args.cpu, None)?;
    // The kernel's BTF for --during's fentry and the tp_btf programs, parsed meanwhile.
    let btf = (during.is_some() || args.offcpu).then(BtfLater::start);
    let mut cost = cost::start(args.run.max_overhead)?;
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e).context("listing online CPUs")?;
    let tgid = run.tgid();
    let (k, u, min_block) = (u32::from(kernel), u32::from(user), args.min_block.unwrap_or(0));
    // --during times FUNC with `fn`'s programs in slot 0, filtered like the samples.
    let during_slot = if during.is_some() { 0u32 } else { u32::MAX };
    let during_slower = args.slower.unwrap_or(0);
    let softirq_slot = match &during {
        Some(Target::Kernel(name)) if name == NET_RX_FUNCTION => 0u32,
        _ => MAX_FUNCS as u32,
    };
    // Off-CPU starts and --during's held stacks live in task storage, unless
    // this kernel has none (the compat objects) or its task storage would
    // allocate where it is created: under the run-queue lock (off-CPU), or
    // in the traced function (--during, as fn's own start times; see
    // btf_offsets).
    let sys_btf = if args.offcpu || during.is_some() { Some(btf_offsets::Btf::from_sys_fs()?) } else { None };
    let use_hash =
        u32::from(bpf::compat() || sys_btf.as_ref().is_some_and(|b| !btf_offsets::task_storage_safe_in_scheduler(b)));
    let (pid_offset, state_offset) = match &sys_btf {
        Some(b) => {
            let offsets = btf_offsets::TaskOffsets::from_btf(b)?;
            (offsets.pid, offsets.state)
        }
        None => (0, 0),
    };
    drop(sys_btf);
    let store = if use_hash == 1 { "a preallocated hash by tid" } else { "task storage" };
    if args.offcpu {
        output::verbose(&format!("off-CPU start times in {store}"));
    }
    if during.is_some() {
        output::verbose(&format!("stacks held during a call in {store}"));
    }
    let hash_entries = if use_hash == 1 && args.offcpu { OFF_CPU_TASKS } else { 1 };
    let pending_entries = if use_hash == 1 && during.is_some() { DURING_TASKS } else { 1 };
    let new_keys_bytes = if user { NEW_KEYS_BYTES } else { bpf::page_size() };
    // --during times calls with `fn`'s programs, which keep start times
    // where `fn` does.
    let store = FrameStore::choose();
    if during.is_some() {
        output::verbose(store.describe());
    }
    let mut ebpf = bpf::load(bpf::Object::Fn, |loader| {
        store.configure(loader);
        loader
            .override_global(globals::USE_HASH, &use_hash, true)
            .override_global(globals::TASK_PID_OFF, &pid_offset, true)
            .override_global(globals::TASK_STATE_OFF, &state_offset, true)
            .map_max_entries(maps::OFF_HASH, hash_entries)
            .map_max_entries(maps::PENDING_HASH, pending_entries)
            .override_global(func::globals::TARGET_TGID, &tgid, true)
            .override_global(func::globals::SOFTIRQ_SLOT, &softirq_slot, true)
            .override_global(globals::DURING_SLOT, &during_slot, true)
            .override_global(globals::DURING_SLOWER_NS, &during_slower, true)
            .override_global(globals::TGID, &tgid, true)
            .override_global(globals::KERNEL, &k, true)
            .override_global(globals::USER, &u, true)
            .override_global(globals::MIN_BLOCK_NS, &min_block, true)
            .map_max_entries(maps::COUNTS, MAX_KEYS)
            .map_max_entries(maps::NEW_KEYS, new_keys_bytes)
            .map_max_entries(maps::STACKS, MAX_STACKS);
    })?;
    let btf = btf.and_then(BtfLater::get);
    let mut gate = String::new();
    // The gate's return probe, if made in tracefs: kept until the end.
    let mut _gate_returns = Vec::new();
    if use_hash == 1 && (args.offcpu || during.is_some()) {
        // Before anything that stores an entry.
        attach_exit(&mut ebpf, btf.as_ref())?;
    }
    if let Some(target) = &during {
        store.attach_cleanup(&mut ebpf)?;
        let mut attacher = Attacher {
            ebpf: &mut ebpf,
            btf: btf.as_ref(),
            mode: args.attach,
            pid: (tgid != 0).then_some(tgid),
            returns: Vec::new(),
        };
        let mechanism = attacher.attach(0, target)?;
        _gate_returns = attacher.returns;
        gate = format!(
            ", during {} calls over {} ({mechanism})",
            text::printable(&target.name()),
            format_ns(during_slower)
        );
    }
    if args.offcpu {
        attach_offcpu(&mut ebpf, btf.as_ref())?;
    } else {
        let on: Vec<u32> = match args.cpu {
            Some(cpu) => vec![cpu],
            None => cpus.clone(),
        };
        attach_oncpu(&mut ebpf, &on, args.freq)?;
    }
    // Everything is attached: the parsed BTF (megabytes) is not kept.
    drop(btf);
    let what = describe(&args, kernel, user, &cpus) + &gate;
    output::say(&format!("sampling {what}; Ctrl-C to end"));
    if args.offcpu {
        output::verbose("off-CPU time from tp_btf sched_switch, weighted in microseconds");
    }

    let counts: HashMap<MapData, StackKey, u64> =
        HashMap::try_from(ebpf.take_map(maps::COUNTS).context("map FL_COUNTS missing")?)?;
    let mut new_keys: Ring<StackKey> = Ring::take(&mut ebpf, maps::NEW_KEYS)?;
    // The traced process, while it may still be latprobe's gate for the
    // command (see `Processes::gate`).
    let mut processes = Processes { gate: (tgid != 0).then_some(tgid), ..Processes::default() };
    run.judge_budget_every(cost.as_ref().and_then(SelfCost::budget_window));
    run.activate()?;
    let end = loop {
        match run.next(Some(&mut new_keys)).await? {
            Step::Ended(end) => break end,
            Step::Budget => {
                if let Some(end) = run.over_budget(cost.as_mut(), &ebpf) {
                    break end;
                }
            }
            Step::Records => {
                new_keys.drain(BATCH, |k| {
                    processes.seen(&k);
                    Ok(())
                })?;
            }
            Step::Interval | Step::Poll => {}
        }
    };
    run.end(&end);
    if let Some(cost) = cost.as_ref().map(|c| c.whole_run(&ebpf)) {
        output::say(cost.render("final", Format::Text).trim_end());
    }
    // Stop counting before reading, so the picture is one instant's.
    drop_programs(&mut ebpf);
    crate::attach::detach_entries(&mut ebpf);
    let elapsed = run.elapsed();
    // Processes whose notice was lost, if they still live.
    if user {
        for key in counts.keys().filter_map(Result::ok) {
            processes.seen(&key);
        }
    }

    let stacks = StackTraceMap::try_from(ebpf.take_map(maps::STACKS).context("map FL_STACKS missing")?)?;
    let drops: PerCpuArray<MapData, Drops> =
        PerCpuArray::try_from(ebpf.take_map(maps::DROPS).context("map FL_DROPS missing")?)?;
    let ksyms = if kernel { KernelSymbols::load().ok() } else { None };
    let lines = fold_counts(&counts, &stacks, ksyms.as_ref(), &mut processes.usyms)?;
    let dropped = total_drops(&drops)?;
    let total = folded::total(&lines);
    let unit = if args.offcpu { "us" } else { "samples" };
    let title = args.title.clone().unwrap_or_else(|| {
        let amount = if args.offcpu {
            format!("{} blocked", format_ns(total.saturating_mul(1000)))
        } else {
            format!("{total} samples")
        };
        format!("{what}, {:.1} s, {amount}", elapsed.as_secs_f64())
    });
    if dropped.stack_collisions + dropped.stack_errors + dropped.keys_full + dropped.pending_full + dropped.tasks_full
        > 0
    {
        output::say(&format!(
            "DROPPED {} stacks that collided in the stack map, {} that could not be taken, \
             {} for a full counts map, {} beyond {MAX_PENDING} per slow call, {} for a full task table \
             (of {} events)",
            dropped.stack_collisions,
            dropped.stack_errors,
            dropped.keys_full,
            dropped.pending_full,
            dropped.tasks_full,
            dropped.events
        ));
    }
    if let Some(file) = outputs.folded {
        let path = file.path().display().to_string();
        file.commit((lines.join("\n") + "\n").as_bytes())?;
        output::say(&format!("wrote {path}"));
    }
    if outputs.svg.is_some() || outputs.svg_to_stdout {
        let svg = render(&lines, &title, unit)?;
        match outputs.svg {
            Some(file) => {
                let path = file.path().display().to_string();
                file.commit(svg.as_bytes())?;
                output::say(&format!("wrote {path} ({title})"));
            }
            None => output::report(svg),
        }
    }
    Ok(())
}

/// "on-CPU, kernel+user stacks, all CPUs, 99 Hz" and the like.
fn describe(args: &FlameArgs, kernel: bool, user: bool, cpus: &[u32]) -> String {
    let stacks = match (kernel, user) {
        (true, true) => "kernel+user stacks",
        (true, false) => "kernel stacks",
        _ => "user stacks",
    };
    let whom = match (args.run.pid, args.run.command.first()) {
        (Some(pid), _) => format!("pid {pid}"),
        (None, Some(cmd)) => text::printable(cmd).into_owned(),
        (None, None) => "all processes".into(),
    };
    if args.offcpu {
        let min = args.min_block.map(|n| format!(", waits over {}", format_ns(n))).unwrap_or_default();
        return format!("off-CPU time, {stacks}, {whom}{min}");
    }
    let where_ = match args.cpu {
        Some(c) => format!("CPU {c}"),
        None => format!("all {} CPUs", cpus.len()),
    };
    format!("on-CPU, {stacks}, {whom}, {where_}, {} Hz", args.freq)
}

fn attach_oncpu(ebpf: &mut Ebpf, cpus: &[u32], freq: u64) -> Result<()> {
    let prog: &mut PerfEvent = ebpf.program_mut(programs::SAMPLE).context("fl_sample missing")?.try_into()?;
    prog.load().map_err(|e| anyhow::anyhow!("loading the sampling program: {}", bpf::describe(&e)))?;
    for &cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Frequency(freq),
            false,
        )
        .with_context(|| {
            format!("opening a perf event on CPU {cpu} (perf_event_paranoid, or no PMU in a container?)")
        })?;
    }
    Ok(())
}

/// With the hashes by tid, the exit program that frees an exiting thread's
/// entries: task storage is freed with its task, the hashes are not.
fn attach_exit(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<()> {
    attach_tp_btf(ebpf, btf, programs::EXIT, "sched_process_exit")
}

/// Attaches the switch program (after `attach_exit` where the hash is used).
fn attach_offcpu(ebpf: &mut Ebpf, btf: Option<&Btf>) -> Result<()> {
    attach_tp_btf(ebpf, btf, programs::SWITCH, "sched_switch")
}

/// Loads program `name` as tp_btf on `tracepoint` (Linux 5.5+) and attaches it.
fn attach_tp_btf(ebpf: &mut Ebpf, btf: Option<&Btf>, name: &str, tracepoint: &str) -> Result<()> {
    let btf = btf.context("reading kernel BTF (/sys/kernel/btf/vmlinux) failed")?;
    let prog: &mut BtfTracePoint = ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
    prog.load(tracepoint, btf)
        .map_err(|e| anyhow::anyhow!("loading the {tracepoint} program (tp_btf, Linux 5.5+): {}", bpf::describe(&e)))?;
    prog.attach().with_context(|| format!("attaching to {tracepoint}"))?;
    Ok(())
}

fn drop_programs(ebpf: &mut Ebpf) {
    use aya::programs::Program;
    for name in programs::ALL {
        let _ = match ebpf.program_mut(name) {
            Some(Program::PerfEvent(p)) => p.unload(),
            Some(Program::BtfTracePoint(p)) => p.unload(),
            _ => Ok(()),
        };
    }
}

/// Reads the mappings of processes seen in the counts while they live, and
/// reads them again when a process shows up under a new name (it exec'd, and
/// its old mappings would name the new program's frames wrongly) or with a
/// new stack after a while (it may have mapped a library since).
#[derive(Default)]
struct Processes {
    usyms: UserSymbols,
    /// The name each process had when its mappings were read.
    names: std::collections::HashMap<u32, [u8; latprobe_common::COMM_LEN]>,
    /// `-- COMMAND`'s process until it has exec'd the command: before, it
    /// runs latprobe's gate under the command's name, so its mappings are
    /// not the command's and no change of name would tell the exec.
    gate: Option<u32>,
}

impl Processes {
    /// A key was counted: read its process's mappings if they are new to
    /// us, again if its main thread has a new name (threads have names of
    /// their own: only the main thread's says exec).
    fn seen(&mut self, key: &StackKey) {
        if self.gate == Some(key.tgid) {
            if still_the_gate(key.tgid) {
                return;
            }
            self.gate = None;
            self.names.insert(key.tgid, key.comm);
            self.usyms.refresh(key.tgid);
            return;
        }
        let renamed = key.pid == key.tgid && self.names.insert(key.tgid, key.comm).is_some_and(|c| c != key.comm);
        if renamed {
            self.usyms.refresh(key.tgid);
        } else {
            // A new stack may run in a library mapped since we last looked.
            self.usyms.recheck(key.tgid);
        }
    }
}

/// Whether process `tgid` still runs latprobe's own executable (the gate
/// of `-- COMMAND`, before its exec). A process gone counts as exec'd.
fn still_the_gate(tgid: u32) -> bool {
    let ours = std::fs::read_link("/proc/self/exe");
    let theirs = std::fs::read_link(format!("/proc/{tgid}/exe"));
    matches!((ours, theirs), (Ok(a), Ok(b)) if a == b)
}

fn fold_counts(
    counts: &HashMap<MapData, StackKey, u64>,
    stacks: &StackTraceMap<MapData>,
    ksyms: Option<&KernelSymbols>,
    usyms: &mut UserSymbols,
) -> Result<Vec<String>> {
    let mut resolved = Vec::new();
    for entry in counts.iter() {
        let (key, count) = entry.context("reading FL_COUNTS")?;
        let frames = |id: i32| -> Vec<u64> {
            if id < 0 {
                return Vec::new();
            }
            stacks.get(&(id as u32), 0).map(|s| s.frames().iter().map(|f| f.ip).collect()).unwrap_or_default()
        };
        // Off-CPU stacks are taken inside the tracepoint: drop its glue and
        // our own program from the top, the stack then ends in schedule().
        let kernel: Vec<String> = frames(key.kernel_stack)
            .into_iter()
            .map(|ip| {
                ksyms
                    .and_then(|k| k.symbolize(ip))
                    .map(|s| s.split('+').next().unwrap_or_default().to_string())
                    .unwrap_or_else(|| "[unknown]".into())
            })
            .skip_while(|f| kallsyms::is_tracer_frame(f))
            .collect();
        let user: Vec<String> = frames(key.user_stack).into_iter().map(|ip| usyms.symbolize(key.tgid, ip)).collect();
        resolved.push((text::folded_frame(&text::comm(&key.comm)).into_owned(), user, kernel, count));
    }
    Ok(folded::fold(resolved.iter().map(|(comm, user, kernel, count)| Stack { comm, user, kernel, count: *count })))
}

fn total_drops(drops: &PerCpuArray<MapData, Drops>) -> Result<Drops> {
    let mut total = Drops::default();
    for d in drops.get(&0, 0).context("reading FL_DROPS")?.iter() {
        total.events += d.events;
        total.stack_collisions += d.stack_collisions;
        total.stack_errors += d.stack_errors;
        total.keys_full += d.keys_full;
        total.pending_full += d.pending_full;
        total.tasks_full += d.tasks_full;
    }
    Ok(total)
}

/// The SVG, with inferno's search and zoom.
fn render(lines: &[String], title: &str, unit: &str) -> Result<String> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_string();
    options.count_name = unit.to_string();
    let mut svg = Vec::new();
    if lines.is_empty() {
        bail!("nothing was sampled: no stack matched (is the process running on the sampled CPUs?)");
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg)
        .context("rendering the flame graph")?;
    String::from_utf8(svg).context("inferno produced non-UTF-8 SVG")
}
