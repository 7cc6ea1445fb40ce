//! Loading and attaching the `rq_` scheduler programs that runqslower and
//! runqlat share: `task_struct` offsets from BTF, filters and sizes as
//! load-time globals, tp_btf first and raw_tp as the fallback, and the lost
//! counters. Links are fd-based: they go when the process goes, however it
//! ends.

use std::fmt;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{PerCpuArray, PerCpuValues},
    programs::{BtfTracePoint, Program, RawTracePoint},
    Btf as AyaBtf, Ebpf,
};
use latprobe_common::{
    hdr,
    sched::{globals, hist, maps, programs, Lost, START_HASH_ENTRIES},
    COMM_LEN,
};

use crate::{
    attach::BtfLater,
    bpf,
    btf_offsets::{task_storage_safe_in_scheduler, Btf, TaskOffsets},
    output,
};

/// `--attach` of runqslower and runqlat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TpMode {
    /// tp_btf, falling back to raw_tp
    Auto,
    TpBtf,
    RawTp,
}

/// How the programs ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    TpBtf,
    RawTp,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::TpBtf => "tp_btf",
            Mechanism::RawTp => "raw_tp",
        })
    }
}

/// Where wakeup times are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    TaskStorage,
    Hash,
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Store::TaskStorage => "task-storage",
            Store::Hash => "hash",
        })
    }
}

/// What to trace and aggregate.
pub struct Config {
    pub tgid: u32,
    pub tid: u32,
    pub cpu: Option<u32>,
    pub comm: Option<String>,
    pub threshold_ns: Option<u64>,
    pub stacks: bool,
    /// One of `hist::*`.
    pub hist: u32,
    /// Process slots for `hist::PER_PID`.
    pub pid_slots: u32,
    pub ring_bytes: u32,
    pub mode: TpMode,
}

/// The loaded and attached programs.
pub struct Probes {
    pub ebpf: Ebpf,
    pub mechanism: Mechanism,
    pub store: Store,
    lost: PerCpuArray<aya::maps::MapData, Lost>,
}

/// The bytes of a `--comm` prefix, checked against TASK_COMM_LEN.
pub fn comm_prefix(comm: &str) -> Result<[u8; COMM_LEN]> {
    let bytes = comm.as_bytes();
    if bytes.is_empty() || bytes.len() >= COMM_LEN {
        bail!(
            "--comm {comm:?}: a command name prefix is 1 to {} bytes (the kernel keeps only {} of a \
             task's name)",
            COMM_LEN - 1,
            COMM_LEN - 1
        );
    }
    let mut out = [0u8; COMM_LEN];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

/// Loads the object with `config` and attaches the `rq_` programs.
pub fn start(config: &Config) -> Result<Probes> {
    let note = output::verbose;
    // aya's parse (for the loader and tp_btf) runs on its own thread while
    // the offsets are read from latprobe's own, on this one.
    let aya_btf = BtfLater::start();
    let btf = Btf::from_sys_fs()?;
    let offsets = TaskOffsets::from_btf(&btf)?;
    note(&format!(
        "task_struct offsets from BTF: pid {} tgid {} comm {} __state {}",
        offsets.pid, offsets.tgid, offsets.comm, offsets.state
    ));
    let storage_safe = task_storage_safe_in_scheduler(&btf);
    drop(btf);

    let comm = match &config.comm {
        Some(c) => comm_prefix(c)?,
        None => [0; COMM_LEN],
    };
    let comm_len = config.comm.as_ref().map_or(0, |c| c.len() as u32);
    // The compat objects have no task storage at all.
    let use_hash = u32::from(!storage_safe || bpf::compat());
    let cpu = config.cpu.unwrap_or(u32::MAX);
    let threshold = config.threshold_ns.unwrap_or(u64::MAX);
    let stacks = u32::from(config.stacks);
    let slots = match config.hist {
        hist::PER_PID => config.pid_slots + 1,
        _ => 1,
    };
    let page = bpf::page_size();
    let mut ebpf = bpf::load(bpf::Object::Sched, |loader| {
        loader
            .override_global(globals::TARGET_TGID, &config.tgid, true)
            .override_global(globals::TARGET_TID, &config.tid, true)
            .override_global(globals::TARGET_CPU, &cpu, true)
            .override_global(globals::COMM_PREFIX, &comm, true)
            .override_global(globals::COMM_PREFIX_LEN, &comm_len, true)
            .override_global(globals::THRESHOLD_NS, &threshold, true)
            .override_global(globals::STACKS, &stacks, true)
            .override_global(globals::HIST, &config.hist, true)
            .override_global(globals::PID_SLOTS, &config.pid_slots, true)
            .override_global(globals::USE_HASH, &use_hash, true)
            .override_global(globals::TASK_PID_OFF, &offsets.pid, true)
            .override_global(globals::TASK_TGID_OFF, &offsets.tgid, true)
            .override_global(globals::TASK_COMM_OFF, &offsets.comm, true)
            .override_global(globals::TASK_STATE_OFF, &offsets.state, true)
            .map_max_entries(maps::START_HASH, START_HASH_ENTRIES)
            .map_max_entries(maps::STATS, slots)
            .map_max_entries(maps::BUCKETS, slots * hdr::GROUPS as u32)
            .map_max_entries(maps::PID_SLOTS, config.pid_slots.max(1))
            .map_max_entries(latprobe_common::SLOT_OWNERS, bpf::slot_owners(config.pid_slots))
            .map_max_entries(maps::EVENTS, config.ring_bytes.max(page));
    })?;

    let aya_btf = aya_btf.get();
    let mut failures = Vec::new();
    let mut chosen = None;
    if config.mode != TpMode::RawTp {
        match attach_tp_btf(&mut ebpf, aya_btf.as_ref(), use_hash != 0) {
            Ok(()) => chosen = Some(Mechanism::TpBtf),
            Err(e) => {
                note(&format!("tp_btf unavailable: {e:#}"));
                failures.push(format!("tp_btf: {e:#}"));
                unload_all(&mut ebpf);
            }
        }
    }
    if chosen.is_none() && config.mode != TpMode::TpBtf {
        match attach_raw_tp(&mut ebpf) {
            Ok(()) => chosen = Some(Mechanism::RawTp),
            Err(e) => {
                note(&format!("raw_tp unavailable: {e:#}"));
                failures.push(format!("raw_tp: {e:#}"));
                unload_all(&mut ebpf);
            }
        }
    }
    let Some(mechanism) = chosen else {
        bail!("cannot attach to the scheduler tracepoints: {}", failures.join("; "));
    };
    // raw_tp task pointers are plain integers, which the task-storage helper
    // refuses: that fallback always keeps wakeup times in the hash map.
    let store = if use_hash == 0 && mechanism == Mechanism::TpBtf { Store::TaskStorage } else { Store::Hash };
    let exit = if store == Store::Hash { ", sched_process_exit" } else { "" };
    note(&format!("sched_wakeup, sched_wakeup_new, sched_switch{exit} attached with {mechanism}"));
    note(&match (store, storage_safe) {
        (Store::TaskStorage, _) => "wakeup times kept in task-local storage".to_string(),
        (Store::Hash, true) => {
            format!("wakeup times kept in a hash map of {START_HASH_ENTRIES} tids (raw_tp cannot use task storage)")
        }
        (Store::Hash, false) if bpf::compat() => format!(
            "wakeup times kept in a hash map of {START_HASH_ENTRIES} tids: the objects for this kernel \
             have no task-local storage"
        ),
        (Store::Hash, false) => format!(
            "wakeup times kept in a hash map of {START_HASH_ENTRIES} tids: this kernel's task storage \
             allocates with kmalloc, unsafe under the run-queue lock"
        ),
    });
    let lost =
        PerCpuArray::try_from(ebpf.take_map(maps::LOST).context("map RQ_LOST missing")?).context("map RQ_LOST")?;
    Ok(Probes { ebpf, mechanism, store, lost })
}

/// Attaches the tp_btf programs; the exit one only with the hash map
/// (`use_hash`), as task storage is freed with its task.
fn attach_tp_btf(ebpf: &mut Ebpf, btf: Option<&AyaBtf>, use_hash: bool) -> Result<()> {
    let btf = btf.context("reading kernel BTF (/sys/kernel/btf/vmlinux) failed")?;
    for (name, event) in programs::TP_BTF {
        if event == programs::EXIT_EVENT && !use_hash {
            continue;
        }
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing from the embedded object"))?
            .try_into()?;
        prog.load(event, btf).map_err(|e| describe(name, e))?;
        prog.attach().with_context(|| format!("attaching {name} to {event}"))?;
    }
    Ok(())
}

/// Attaches the raw_tp programs, the exit one included: raw_tp always keeps
/// wakeup times in the hash map.
fn attach_raw_tp(ebpf: &mut Ebpf) -> Result<()> {
    for (name, event) in programs::RAW_TP {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} is missing from the embedded object"))?
            .try_into()?;
        prog.load().map_err(|e| describe(name, e))?;
        prog.attach(event).with_context(|| format!("attaching {name} to raw tracepoint sched:{event}"))?;
    }
    Ok(())
}

fn describe(name: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    anyhow!("loading {name}: {}", bpf::describe(&e))
}

/// Unloads every `rq_` program, detaching its links; safe to call twice.
pub fn unload_all(ebpf: &mut Ebpf) {
    for (name, _) in programs::TP_BTF.iter().chain(programs::RAW_TP.iter()) {
        let _ = match ebpf.program_mut(name) {
            Some(Program::BtfTracePoint(p)) => p.unload(),
            Some(Program::RawTracePoint(p)) => p.unload(),
            _ => Ok(()),
        };
    }
}

impl Probes {
    /// Detaches everything.
    pub fn stop(&mut self) {
        unload_all(&mut self.ebpf);
    }

    /// Lost counts per possible CPU.
    pub fn lost_per_cpu(&self) -> Result<Vec<Lost>> {
        let values: PerCpuValues<Lost> = self.lost.get(&0, 0).context("reading RQ_LOST")?;
        Ok(values.iter().copied().collect())
    }

    /// Lost counts summed over CPUs.
    pub fn lost(&self) -> Result<Lost> {
        Ok(self
            .lost_per_cpu()?
            .iter()
            .fold(Lost::default(), |a, l| Lost { no_start: a.no_start + l.no_start, events: a.events + l.events }))
    }
}
