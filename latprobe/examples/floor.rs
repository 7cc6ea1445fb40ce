//! The benchmark's floor: attaches empty programs (latprobe-ebpf's
//! `latprobe-floor` object) where latprobe's commands attach theirs, and
//! holds them until SIGINT or SIGTERM. `cargo xtask bench` times the same
//! workload under it, so each command's cost reads as a ratio to the least
//! any program there can cost. A bench tool, kept out of latprobe's binary.
//!
//! ```text
//! floor fn FUNC       empty fentry + fexit on kernel function FUNC
//! floor timed FUNC    fentry + fexit that only time FUNC: a clock read at
//!                     each end, the start kept in task storage
//! floor kprobe FUNC   empty kprobe + kretprobe on FUNC
//! floor sched         empty tp_btf programs on sched_wakeup,
//!                     sched_wakeup_new and sched_switch
//! floor timed-sched   tp_btf programs there that only time run-queue
//!                     waits: a clock read and a start in task storage
//! ```

use std::{env, process::exit};

use anyhow::{Context, Result};
use aya::{
    programs::{BtfTracePoint, FEntry, FExit, KProbe},
    Btf, Ebpf, EbpfLoader,
};
use latprobe_common::floor::programs;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-floor"));

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).with_context(|| format!("{name} is missing from the floor object"))?;
    Ok(prog.try_into()?)
}

fn attach(ebpf: &mut Ebpf, what: &[String]) -> Result<String> {
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    match what {
        [kind, func] if kind == "fn" || kind == "timed" => {
            let (pair, what) = match kind.as_str() {
                "fn" => ((programs::FENTRY, programs::FEXIT), "empty"),
                _ => ((programs::TIMED_FENTRY, programs::TIMED_FEXIT), "timing-only"),
            };
            let entry: &mut FEntry = program(ebpf, pair.0)?;
            entry.load(func, &btf).with_context(|| format!("loading the {what} fentry"))?;
            entry.attach().with_context(|| format!("attaching the {what} fentry"))?;
            let exit: &mut FExit = program(ebpf, pair.1)?;
            exit.load(func, &btf).with_context(|| format!("loading the {what} fexit"))?;
            exit.attach().with_context(|| format!("attaching the {what} fexit"))?;
            Ok(format!("{what} fentry+fexit on {func}"))
        }
        [kind, func] if kind == "kprobe" => {
            for (name, what) in [(programs::KPROBE, "kprobe"), (programs::KRETPROBE, "kretprobe")] {
                let probe: &mut KProbe = program(ebpf, name)?;
                probe.load().with_context(|| format!("loading the empty {what}"))?;
                probe.attach(func.as_str(), 0).with_context(|| format!("attaching the empty {what}"))?;
            }
            Ok(format!("empty kprobe+kretprobe on {func}"))
        }
        [kind] if kind == "sched" || kind == "timed-sched" => {
            let (set, what) = match kind.as_str() {
                "sched" => (programs::SCHED, "empty"),
                _ => (programs::TIMED_SCHED, "timing-only"),
            };
            for (name, event) in set {
                let tp: &mut BtfTracePoint = program(ebpf, name)?;
                tp.load(event, &btf).with_context(|| format!("loading the {what} tp_btf {event}"))?;
                tp.attach().with_context(|| format!("attaching the {what} tp_btf {event}"))?;
            }
            Ok(format!("{what} tp_btf on sched_wakeup, sched_wakeup_new, sched_switch"))
        }
        _ => {
            eprintln!("usage: floor fn FUNC | floor timed FUNC | floor kprobe FUNC | floor sched | floor timed-sched");
            exit(2);
        }
    }
}

/// Blocks SIGINT and SIGTERM, then waits for one: the programs stay
/// attached until then, and are detached as `ebpf` drops.
fn wait_for_signal() {
    // SAFETY: a zeroed sigset_t is initialised by sigemptyset before use;
    // the calls only read and write that set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut got = 0;
        libc::sigwait(&set, &mut got);
    }
}

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let mut ebpf = match EbpfLoader::new().allow_unsupported_maps().load(OBJECT) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("floor: loading the floor object failed: {e}");
            exit(1);
        }
    };
    match attach(&mut ebpf, &args) {
        Ok(what) => eprintln!("floor: tracing with {what}; Ctrl-C to end"),
        Err(e) => {
            eprintln!("floor: {e:#}");
            exit(1);
        }
    }
    wait_for_signal();
}
