//! `latprobe flame`: on-CPU and off-CPU flame graphs.
//!
//! Loads the flame programs, attaches a perf event per CPU (on-CPU) or the
//! scheduler switch tracepoint (off-CPU), waits for the end of the run while
//! reading the mappings of every process that shows up (so processes that
//! exit before the end are still symbolized), then folds the kernel's counts
//! into stacks and renders them with inferno.

use std::{
    collections::HashSet,
    fs,
    io::{IsTerminal, Write},
    path::PathBuf,
    pin::pin,
    time::{Duration, Instant},
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
    flame::{globals, Drops, StackKey, MAX_KEYS, MAX_PENDING, MAX_STACKS},
    func::{globals as func_globals, MAX_FUNCS},
};

use crate::{
    attach::{Attacher, Target, NET_RX_FUNCTION},
    bpf, btf_offsets,
    cli::FlameArgs,
    duration::format_ns,
    folded::{self, Stack},
    kallsyms::{self, KernelSymbols},
    launch::GatedChild,
    output::emit,
    session::Session,
    usyms::UserSymbols,
};

/// Tasks tracked at once off-CPU where task storage cannot be used.
const OFF_CPU_TASKS: u32 = 16384;

pub async fn run(args: FlameArgs, verbose: bool) -> Result<()> {
    let mut session = Session::new(args.secs)?;
    let (kernel, user) = match (args.kernel, args.user) {
        (false, false) => (true, true),
        chosen => chosen,
    };
    if args.freq == 0 || args.freq > 10_000 {
        bail!("--freq {}: choose between 1 and 10000 samples per second", args.freq);
    }
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e).context("listing online CPUs")?;
    if let Some(cpu) = args.cpu {
        if !cpus.contains(&cpu) {
            bail!("--cpu {cpu}: not an online CPU (online: {})", describe_cpus(&cpus));
        }
    }
    crate::session::check_targets(None, args.pid, None)?;
    bpf::preflight()?;
    if let Some(pid) = args.pid {
        session.watch_process(pid);
    }
    let mut child = if args.command.is_empty() { None } else { Some(GatedChild::spawn(&args.command)?) };
    let tgid = args.pid.or(child.as_ref().map(|c| c.pid)).unwrap_or(0);
    let (k, u, min_block) = (u32::from(kernel), u32::from(user), args.min_block.unwrap_or(0));
    let during = args.during.as_deref().map(Target::parse).transpose()?;
    // --during times FUNC with `fn`'s programs in slot 0, filtered like the samples.
    let during_slot = if during.is_some() { 0u32 } else { u32::MAX };
    let during_slower = args.slower.unwrap_or(0);
    let softirq_slot = match &during {
        Some(Target::Kernel(name)) if name == NET_RX_FUNCTION => 0u32,
        _ => MAX_FUNCS as u32,
    };
    // Off-CPU starts live in task storage, unless this kernel's task storage
    // would allocate under the run-queue lock (see btf_offsets).
    let (use_hash, pid_offset) = if args.offcpu {
        let btf = btf_offsets::Btf::from_sys_fs()?;
        let offsets = btf_offsets::TaskOffsets::from_btf(&btf)?;
        (u32::from(!btf_offsets::task_storage_safe_in_scheduler(&btf)), offsets.pid)
    } else {
        (0, 0)
    };
    if verbose && args.offcpu {
        let store = if use_hash == 1 { "a preallocated hash by tid" } else { "task storage" };
        eprintln!("latprobe: off-CPU start times in {store}");
    }
    let hash_entries = if use_hash == 1 { OFF_CPU_TASKS } else { 1 };
    let mut ebpf = bpf::load(|loader| {
        loader
            .override_global("FL_USE_HASH", &use_hash, true)
            .override_global("FL_TASK_PID_OFF", &pid_offset, true)
            .map_max_entries("FL_OFF_HASH", hash_entries)
            .override_global(func_globals::TARGET_TGID, &tgid, true)
            .override_global(func_globals::SOFTIRQ_SLOT, &softirq_slot, true)
            .override_global(globals::DURING_SLOT, &during_slot, true)
            .override_global(globals::DURING_SLOWER_NS, &during_slower, true)
            .override_global(globals::TGID, &tgid, true)
            .override_global(globals::KERNEL, &k, true)
            .override_global(globals::USER, &u, true)
            .override_global(globals::MIN_BLOCK_NS, &min_block, true)
            .map_max_entries("FL_COUNTS", MAX_KEYS)
            .map_max_entries("FL_STACKS", MAX_STACKS);
    })?;
    let mut gate = String::new();
    if let Some(target) = &during {
        let mechanism = Attacher {
            ebpf: &mut ebpf,
            btf: Btf::from_sys_fs().ok(),
            mode: args.attach,
            pid: (tgid != 0).then_some(tgid),
            verbose,
        }
        .attach(0, target)?;
        gate = format!(", during {} calls over {} ({mechanism})", target.name(), format_ns(during_slower));
    }
    if args.offcpu {
        attach_offcpu(&mut ebpf)?;
    } else {
        let on: Vec<u32> = match args.cpu {
            Some(cpu) => vec![cpu],
            None => cpus.clone(),
        };
        attach_oncpu(&mut ebpf, &on, args.freq)?;
    }
    let what = describe(&args, kernel, user, &cpus) + &gate;
    eprintln!("latprobe: sampling {what}; Ctrl-C to end");
    if verbose && args.offcpu {
        eprintln!("latprobe: off-CPU time from tp_btf sched_switch, weighted in microseconds");
    }

    let counts: HashMap<MapData, StackKey, u64> =
        HashMap::try_from(ebpf.take_map("FL_COUNTS").context("map FL_COUNTS missing")?)?;
    let mut usyms = UserSymbols::default();
    if let Some(c) = child.as_mut() {
        c.release()?;
    }
    session.start_clock(args.secs);
    let started = Instant::now();
    {
        let mut ended = pin!(session.ended(child.as_mut().map(|c| &mut c.child)));
        // Often enough to read the mappings of short-lived processes.
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = &mut ended => break,
                _ = poll.tick() => remember_processes(&counts, &mut usyms, user),
            }
        }
    }
    // Stop counting before reading, so the picture is one instant's.
    drop_programs(&mut ebpf);
    crate::attach::detach_entries(&mut ebpf);
    let elapsed = started.elapsed();
    remember_processes(&counts, &mut usyms, user);

    let stacks = StackTraceMap::try_from(ebpf.take_map("FL_STACKS").context("map FL_STACKS missing")?)?;
    let drops: PerCpuArray<MapData, Drops> =
        PerCpuArray::try_from(ebpf.take_map("FL_DROPS").context("map FL_DROPS missing")?)?;
    let ksyms = if kernel { KernelSymbols::load().ok() } else { None };
    let lines = fold_counts(&counts, &stacks, ksyms.as_ref(), &mut usyms)?;
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
    if dropped.stack_collisions + dropped.stack_errors + dropped.keys_full + dropped.pending_full > 0 {
        eprintln!(
            "latprobe: DROPPED {} stacks that collided in the stack map, {} that could not be taken, \
             {} for a full counts map, {} beyond {MAX_PENDING} per slow call (of {} events)",
            dropped.stack_collisions,
            dropped.stack_errors,
            dropped.keys_full,
            dropped.pending_full,
            dropped.events
        );
    }
    if let Some(path) = &args.folded {
        fs::write(path, lines.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let svg_path = match (&args.output, &args.folded) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(_)) => None,
        (None, None) if std::io::stdout().is_terminal() => Some(PathBuf::from("flame.svg")),
        (None, None) => {
            emit(&render(&lines, &title, unit)?)?;
            None
        }
    };
    if let Some(path) = svg_path {
        fs::write(&path, render(&lines, &title, unit)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("latprobe: wrote {} ({title})", path.display());
    }
    Ok(())
}

fn describe_cpus(cpus: &[u32]) -> String {
    match (cpus.first(), cpus.last()) {
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "none".into(),
    }
}

/// "on-CPU, kernel+user stacks, all CPUs, 99 Hz" and the like.
fn describe(args: &FlameArgs, kernel: bool, user: bool, cpus: &[u32]) -> String {
    let stacks = match (kernel, user) {
        (true, true) => "kernel+user stacks",
        (true, false) => "kernel stacks",
        _ => "user stacks",
    };
    let whom = match (args.pid, args.command.first()) {
        (Some(pid), _) => format!("pid {pid}"),
        (None, Some(cmd)) => cmd.clone(),
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
    let prog: &mut PerfEvent = ebpf.program_mut("fl_sample").context("fl_sample missing")?.try_into()?;
    prog.load().context("loading the sampling program")?;
    for &cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Frequency(freq),
            false,
        )
        .with_context(|| format!("opening a perf event on CPU {cpu} (perf_event_paranoid, or no PMU in a container?)"))?;
    }
    Ok(())
}

fn attach_offcpu(ebpf: &mut Ebpf) -> Result<()> {
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    let prog: &mut BtfTracePoint = ebpf.program_mut("fl_switch").context("fl_switch missing")?.try_into()?;
    prog.load("sched_switch", &btf).context("loading the sched_switch program (tp_btf, Linux 5.5+)")?;
    prog.attach().context("attaching to sched_switch")?;
    Ok(())
}

fn drop_programs(ebpf: &mut Ebpf) {
    use aya::programs::Program;
    for name in ["fl_sample", "fl_switch"] {
        let _ = match ebpf.program_mut(name) {
            Some(Program::PerfEvent(p)) => p.unload(),
            Some(Program::BtfTracePoint(p)) => p.unload(),
            _ => Ok(()),
        };
    }
}

/// Reads the mappings of every process in the counts that is not known yet.
fn remember_processes(counts: &HashMap<MapData, StackKey, u64>, usyms: &mut UserSymbols, user: bool) {
    if !user {
        return;
    }
    let tgids: HashSet<u32> = counts.keys().filter_map(Result::ok).map(|k| k.tgid).collect();
    for tgid in tgids {
        usyms.remember(tgid);
    }
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
            .skip_while(|f| is_tracing_glue(f))
            .collect();
        let user: Vec<String> = frames(key.user_stack).into_iter().map(|ip| usyms.symbolize(key.tgid, ip)).collect();
        let len = key.comm.iter().position(|&b| b == 0).unwrap_or(key.comm.len());
        resolved.push((String::from_utf8_lossy(&key.comm[..len]).into_owned(), user, kernel, count));
    }
    Ok(folded::fold(resolved.iter().map(|(comm, user, kernel, count)| Stack {
        comm,
        user,
        kernel,
        count: *count,
    })))
}

fn is_tracing_glue(frame: &str) -> bool {
    kallsyms::is_bpf_frame(frame)
        || ["bpf_trace_run", "__traceiter_", "__bpf_trace_", "perf_trace_"].iter().any(|p| frame.starts_with(p))
}

fn total_drops(drops: &PerCpuArray<MapData, Drops>) -> Result<Drops> {
    let mut total = Drops::default();
    for d in drops.get(&0, 0).context("reading FL_DROPS")?.iter() {
        total.events += d.events;
        total.stack_collisions += d.stack_collisions;
        total.stack_errors += d.stack_errors;
        total.keys_full += d.keys_full;
        total.pending_full += d.pending_full;
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
    let _ = std::io::stderr().flush();
    String::from_utf8(svg).context("inferno produced non-UTF-8 SVG")
}
