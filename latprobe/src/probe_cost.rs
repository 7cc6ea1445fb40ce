//! What a uprobe costs each call beyond its programs' own run time: the
//! breakpoint's trap into the kernel, and the return probe's trampoline.
//! The kernel times programs, not the trap around them, and for a short
//! user function the trap is most of what tracing it costs (about 30 times
//! the programs' time on an x86 host), so the budget (`--max-overhead`)
//! would let a uprobe on a hot function take a large share of the machine
//! while its programs alone stayed under. Measured once per run, on a
//! function of latprobe's own, with the programs of a slot no target uses.

use std::{
    fs,
    hint::black_box,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{
        uprobe::{UProbeLink, UProbeScope},
        UProbe,
    },
    Ebpf,
};

use crate::{attach, bpf, usyms};

/// Calls timed per batch, and batches: the fastest batch counts, as the
/// machine's other work only ever adds time to one.
const CALLS: u32 = 100;
const BATCHES: usize = 7;

/// The function the probes are measured on: called only here, out of line
/// so that each call is a real call the uprobe traps.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn latprobe_probe_cost_target(x: u64) -> u64 {
    black_box(x).wrapping_add(1)
}

/// The fastest of `BATCHES` batches of `CALLS` calls.
fn time_calls() -> Duration {
    (0..BATCHES)
        .map(|_| {
            let started = Instant::now();
            let mut x = 0;
            for _ in 0..CALLS {
                x = latprobe_probe_cost_target(black_box(x));
            }
            black_box(x);
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// latprobe's executable and the offset in it of the running code at
/// `addr`, from /proc/self/maps (which works for a stripped binary, unlike
/// its symbols). A binary replaced on disk since latprobe started is
/// refused: its path now names another file.
fn own_file_offset(addr: u64) -> Result<(PathBuf, u64)> {
    let maps = fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    let Some(mapping) = usyms::parse_maps(&maps).into_iter().find(|m| (m.start..m.end).contains(&addr)) else {
        bail!("latprobe's own code at {addr:#x} is in no file mapping");
    };
    if mapping.deleted {
        bail!("latprobe's own binary was replaced on disk since it started");
    }
    Ok((mapping.path.clone(), mapping.file_offset_of(addr)))
}

/// Nanoseconds a uprobe and its return probe add to each call beyond their
/// programs' own time, measured with `entry` and `exit` (the uprobe and
/// uretprobe of a slot no target uses), which are unloaded again before
/// this returns.
pub fn uprobe_pair_ns(ebpf: &mut Ebpf, entry: &str, exit: &str) -> Result<u64> {
    let (file, offset) = own_file_offset(latprobe_probe_cost_target as *const () as usize as u64)?;
    let plain = time_calls();
    let mut links = Vec::new();
    let measured = attach_and_time(ebpf, [exit, entry], &file, offset, &mut links);
    // Removing a uprobe waits out an RCU grace period (about 100 ms each,
    // measured): not in the way of the trace loop. The programs themselves
    // unload at once.
    std::thread::spawn(move || drop(links));
    attach::unload(ebpf, entry);
    attach::unload(ebpf, exit);
    let (probed, programs_ns) = measured?;
    let added = probed.saturating_sub(plain).as_nanos() as u64;
    // The programs ran twice per call in each batch.
    let programs_per_call = programs_ns / (u64::from(CALLS) * BATCHES as u64);
    Ok((added / u64::from(CALLS)).saturating_sub(programs_per_call))
}

/// The fastest batch with both programs attached to latprobe's own
/// function, and the programs' own run time over all batches. The
/// attachments go to `links`, for the caller to drop.
fn attach_and_time(
    ebpf: &mut Ebpf,
    names: [&str; 2],
    file: &Path,
    offset: u64,
    links: &mut Vec<UProbeLink>,
) -> Result<(Duration, u64)> {
    for name in names {
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} is missing"))?
            .try_into()
            .map_err(|e| anyhow!("{name}: {e}"))?;
        prog.load().map_err(|e| anyhow!("loading {name}: {}", bpf::describe(&e)))?;
        let id = prog.attach(offset, file, UProbeScope::CallingProcess).with_context(|| format!("attaching {name}"))?;
        links.push(prog.take_link(id).with_context(|| format!("keeping {name}'s link"))?);
    }
    let run_ns = |ebpf: &Ebpf| -> u64 {
        names.iter().filter_map(|n| ebpf.program(n)?.info().ok()).map(|info| info.run_time().as_nanos() as u64).sum()
    };
    let before = run_ns(ebpf);
    let probed = time_calls();
    Ok((probed, run_ns(ebpf).saturating_sub(before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_its_own_code_in_its_executable() {
        let (file, offset) = own_file_offset(latprobe_probe_cost_target as *const () as usize as u64).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert_eq!(fs::canonicalize(&file).unwrap(), fs::canonicalize(exe).unwrap());
        // The file holds, at that offset, the very code that runs.
        let addr = latprobe_probe_cost_target as *const () as *const [u8; 16];
        // SAFETY: a function's first 16 bytes of code, mapped readable.
        let running = unsafe { addr.read() };
        let on_disk = fs::read(&file).unwrap();
        assert_eq!(on_disk.get(offset as usize..offset as usize + 16), Some(&running[..]), "{offset:#x}");
    }
}
