//! Attaching `latprobe fn`'s programs to the functions the user named.
//!
//! Kernel functions get fentry/fexit when the kernel allows it (cheapest: a
//! direct call from the function's trampoline), else kprobe/kretprobe. User
//! functions (`BINARY:SYMBOL`) get uprobes. On a kernel with neither fentry nor
//! kprobes, `net_rx_action` is still timed through the NET_RX softirq
//! tracepoints, which bracket exactly one call of it. Return probes are
//! attached before entry probes, so that no call is seen entering without
//! being seen leaving.

use std::{
    fmt,
    num::NonZeroU32,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    programs::{uprobe::UProbeScope, FEntry, FExit, KProbe, ProgramError, RawTracePoint, UProbe},
    Btf, Ebpf, EbpfLoader,
};
use aya_obj::btf::BtfKind;

use latprobe_common::func::{globals, maps, programs};

use crate::{
    bpf, btf_offsets,
    kallsyms::{self, KernelSymbols},
    kretprobe::{self, ReturnProbe},
    output,
};

/// What the user asked to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Kernel(String),
    User { binary: PathBuf, symbol: String },
}

impl Target {
    /// `FUNC` is a kernel function; `BINARY:SYMBOL` a user function.
    pub fn parse(text: &str) -> Result<Self> {
        match text.split_once(':') {
            None if text.is_empty() => bail!("empty function name"),
            None => Ok(Target::Kernel(text.to_string())),
            Some((binary, symbol)) => {
                if binary.is_empty() || symbol.is_empty() {
                    bail!("{text:?}: a user function is written BINARY:SYMBOL, e.g. /usr/sbin/nginx:ngx_process_events_and_timers");
                }
                let binary = resolve_binary(binary)?;
                Ok(Target::User { binary, symbol: symbol.to_string() })
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Target::Kernel(name) => name.clone(),
            Target::User { binary, symbol } => format!("{}:{symbol}", binary.display()),
        }
    }
}

/// A path, or a bare name looked up in PATH like a shell would.
fn resolve_binary(binary: &str) -> Result<PathBuf> {
    let path = Path::new(binary);
    if binary.contains('/') {
        if path.is_file() {
            return Ok(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
        }
        bail!("binary {binary} does not exist");
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("binary {binary} does not exist and is not in PATH"))
}

/// `--attach`: which mechanism to use for kernel functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// fentry/fexit, falling back to kprobes
    Auto,
    Fentry,
    Kprobe,
}

/// How one function ended up traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Fentry,
    Kprobe,
    Uprobe,
    NetRxSoftirq,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::Fentry => "fentry",
            Mechanism::Kprobe => "kprobe",
            Mechanism::Uprobe => "uprobe",
            Mechanism::NetRxSoftirq => "softirq-tracepoint",
        })
    }
}

impl Mechanism {
    /// The programs that time `slot` this way: (entry, return).
    pub fn programs(self, slot: usize) -> (&'static str, &'static str) {
        match self {
            Mechanism::Fentry => (programs::FENTRY[slot], programs::FEXIT[slot]),
            Mechanism::Kprobe => (programs::KPROBE[slot], programs::KRETPROBE[slot]),
            Mechanism::Uprobe => (programs::UPROBE[slot], programs::URETPROBE[slot]),
            Mechanism::NetRxSoftirq => (programs::SOFTIRQ_ENTRY, programs::SOFTIRQ_EXIT),
        }
    }
}

/// The function whose calls the NET_RX softirq brackets.
pub const NET_RX_FUNCTION: &str = "net_rx_action";

/// Why one mechanism could not attach: the message, and whether the kernel
/// refused outright (EPERM: lockdown or a BPF LSM policy).
struct Refusal {
    text: String,
    denied: bool,
}

impl Refusal {
    fn of(err: &ProgramError) -> Self {
        let errno = bpf::errno(err);
        let hint = match errno {
            Some(libc::EPERM) => "the kernel refused (EPERM: lockdown or a BPF LSM policy)",
            Some(libc::ENOENT) | Some(libc::ESRCH) => {
                "not in the kernel's BTF (static or inlined functions may be missing)"
            }
            Some(libc::EINVAL) | Some(libc::EBUSY) => {
                "the kernel cannot probe this function (marked notrace, on the kprobe blocklist, or inlined at its \
                 call sites)"
            }
            _ => "",
        };
        let detail = bpf::describe(err);
        let text = if hint.is_empty() { detail } else { format!("{hint} [{detail}]") };
        Self { text, denied: errno == Some(libc::EPERM) }
    }

    fn plain(text: impl Into<String>) -> Self {
        Self { text: text.into(), denied: false }
    }
}

/// Where the `fn` programs keep the start times of calls in flight.
///
/// Task storage when creating it is safe wherever a traced function runs;
/// before Linux 6.4 creating it is a kmalloc, which inside the scheduler
/// (`fn enqueue_task_fair`) can deadlock on the run-queue lock and on
/// PREEMPT_RT sleeps in atomic context. There, a preallocated hash by thread:
/// nothing allocates, at the price of a lookup per call and an exit program
/// that removes each thread's entry. The rule is the scheduler commands' own.
#[derive(Clone, Copy, Debug)]
pub struct FrameStore {
    /// The `USE_HASH` global: 1 for the hash.
    use_hash: u32,
}

/// Threads with calls in flight at once, in the hash (about 1 KiB each).
const HASHED_THREADS: u32 = 8192;

impl FrameStore {
    pub fn choose() -> FrameStore {
        let safe = btf_offsets::Btf::from_sys_fs().is_ok_and(|btf| btf_offsets::task_storage_safe_in_scheduler(&btf));
        // The compat objects have no task storage at all.
        FrameStore { use_hash: u32::from(!safe || bpf::compat()) }
    }

    /// Sets the programs' globals and sizes the hash before load.
    pub fn configure<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        loader.override_global(globals::USE_HASH, &self.use_hash, true);
        if self.hashed() {
            loader.map_max_entries(maps::FRAMES_HASH, HASHED_THREADS);
        }
    }

    /// After load: attaches the exit program that keeps the hash clean.
    pub fn attach_cleanup(&self, ebpf: &mut Ebpf) -> Result<()> {
        if !self.hashed() {
            return Ok(());
        }
        let prog: &mut RawTracePoint = program(ebpf, programs::TASK_EXIT).map_err(|e| anyhow!(e))?;
        prog.load().map_err(|e| anyhow!("loading {}: {}", programs::TASK_EXIT, bpf::describe(&e)))?;
        prog.attach("sched_process_exit").context("attaching to raw tracepoint sched:sched_process_exit")?;
        Ok(())
    }

    fn hashed(&self) -> bool {
        self.use_hash != 0
    }

    pub fn describe(&self) -> &'static str {
        if self.hashed() && bpf::compat() {
            "call start times in a preallocated hash by thread (the objects for this kernel have no task storage)"
        } else if self.hashed() {
            "call start times in a preallocated hash by thread (task storage would allocate in the traced context)"
        } else {
            "call start times in task storage"
        }
    }
}

/// The kernel's BTF for attaching fentry programs, parsed on its own thread
/// from the start of a run: aya's loader parses its own copy meanwhile, and
/// each parse takes tens of milliseconds.
pub struct BtfLater(std::thread::JoinHandle<Option<Btf>>);

impl BtfLater {
    pub fn start() -> BtfLater {
        BtfLater(std::thread::spawn(|| Btf::from_sys_fs().ok()))
    }

    pub fn get(self) -> Option<Btf> {
        self.0.join().ok().flatten()
    }
}

/// Everything needed to attach programs, gathered once.
pub struct Attacher<'a> {
    pub ebpf: &'a mut Ebpf,
    pub btf: Option<&'a Btf>,
    pub mode: AttachMode,
    pub pid: Option<u32>,
    /// The return probes made in tracefs, by slot: they live as long as the
    /// run, and say what the kernel missed.
    pub returns: Vec<(usize, ReturnProbe)>,
}

impl Attacher<'_> {
    pub fn attach(&mut self, slot: usize, target: &Target) -> Result<Mechanism> {
        match target {
            Target::Kernel(name) => self.attach_kernel(slot, name),
            Target::User { binary, symbol } => {
                self.attach_uprobe(slot, binary, symbol)?;
                Ok(Mechanism::Uprobe)
            }
        }
    }

    fn attach_kernel(&mut self, slot: usize, name: &str) -> Result<Mechanism> {
        // A function in BTF exists; only one missing there is looked for in
        // /proc/kallsyms, whose reading takes tens of ms (static functions
        // can lack BTF and still take a kprobe).
        let in_btf = self.btf.as_ref().is_some_and(|b| b.id_by_type_name_kind(name, BtfKind::Func).is_ok());
        if !in_btf && kallsyms::kernel_has_function(name) == Some(false) {
            if let Ok(symbols) = KernelSymbols::load() {
                let close = symbols.suggest(name, 5);
                let hint = if close.is_empty() {
                    String::from(" It may have been inlined by the compiler, leaving nothing to attach to: trace a caller instead.")
                } else {
                    format!(" Did you mean: {}?", close.join(", "))
                };
                bail!("unknown kernel function {name}: not in /proc/kallsyms.{hint}");
            }
        }
        let mut failures: Vec<(&str, Refusal)> = Vec::new();
        if self.mode != AttachMode::Kprobe {
            match self.attach_fentry(slot, name) {
                Ok(()) => return Ok(Mechanism::Fentry),
                Err(e) => {
                    output::verbose(&format!("{name}: fentry unavailable: {}", e.text));
                    failures.push(("fentry", e));
                }
            }
        }
        if self.mode != AttachMode::Fentry {
            match self.attach_kprobe(slot, name) {
                Ok(()) => return Ok(Mechanism::Kprobe),
                Err(e) => {
                    output::verbose(&format!("{name}: kprobe unavailable: {}", e.text));
                    failures.push(("kprobe", e));
                }
            }
        }
        if self.mode == AttachMode::Auto && name == NET_RX_FUNCTION {
            self.attach_softirq()?;
            output::say(&format!(
                "{name}: neither fentry nor kprobes work on this kernel; timing the NET_RX softirq \
                 instead (irq:softirq_entry/exit bracket exactly one {name} call)"
            ));
            return Ok(Mechanism::NetRxSoftirq);
        }
        let described: Vec<String> = failures.iter().map(|(how, e)| format!("{how}: {}", e.text)).collect();
        let mut message = format!("cannot trace kernel function {name}: {}", described.join("; "));
        if !kprobes_available() && failures.iter().any(|(_, e)| e.denied) {
            message += ". This kernel allows neither fentry nor kprobes; what still works here: \
                        `latprobe fn net_rx_action` (through softirq tracepoints), user functions \
                        (BINARY:SYMBOL), and commands built on tracepoints and perf events";
        }
        bail!(message)
    }

    fn attach_fentry(&mut self, slot: usize, name: &str) -> Result<(), Refusal> {
        let btf = self.btf.as_ref().ok_or_else(|| Refusal::plain("kernel BTF could not be read"))?;
        let fexit: &mut FExit = program(self.ebpf, programs::FEXIT[slot]).map_err(Refusal::plain)?;
        fexit.load(name, btf).map_err(|e| Refusal::of(&e))?;
        fexit.attach().map_err(|e| Refusal::of(&e))?;
        let fentry: &mut FEntry = program(self.ebpf, programs::FENTRY[slot]).map_err(Refusal::plain)?;
        fentry.load(name, btf).map_err(|e| Refusal::of(&e))?;
        fentry.attach().map_err(|e| Refusal::of(&e))?;
        Ok(())
    }

    fn attach_kprobe(&mut self, slot: usize, name: &str) -> Result<(), Refusal> {
        if !kprobes_available() {
            return Err(Refusal::plain("kprobes are not available (CONFIG_KPROBES is not set)"));
        }
        let ret: &mut KProbe = program(self.ebpf, programs::KRETPROBE[slot]).map_err(Refusal::plain)?;
        ret.load().map_err(|e| Refusal::of(&e))?;
        match kretprobe::tracefs() {
            Some(tracefs) => {
                let fd = ret.fd().map_err(|e| Refusal::of(&e))?.as_fd();
                let probe =
                    ReturnProbe::attach(&tracefs, name, slot, fd).map_err(|e| Refusal::plain(format!("{e:#}")))?;
                self.returns.push((slot, probe));
            }
            None => {
                ret.attach(name, 0).map_err(|e| Refusal::of(&e))?;
                output::say(&format!(
                    "{name}: tracefs is not mounted, so its return probe has the kernel's default room for calls \
                     in flight (10 or 2 per CPU): returns beyond it go uncounted. To count every call: \
                     mount -t tracefs tracefs /sys/kernel/tracing"
                ));
            }
        }
        let entry: &mut KProbe = program(self.ebpf, programs::KPROBE[slot]).map_err(Refusal::plain)?;
        entry.load().map_err(|e| Refusal::of(&e))?;
        entry.attach(name, 0).map_err(|e| Refusal::of(&e))?;
        Ok(())
    }

    fn attach_uprobe(&mut self, slot: usize, binary: &Path, symbol: &str) -> Result<()> {
        let scope = match self.pid.and_then(NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        for prog_name in [programs::URETPROBE[slot], programs::UPROBE[slot]] {
            let prog: &mut UProbe = program(self.ebpf, prog_name).map_err(|e| anyhow!(e))?;
            prog.load().map_err(|e| anyhow!("loading {prog_name}: {}", bpf::describe(&e)))?;
            prog.attach(symbol, binary, scope).map_err(|e| {
                anyhow!(
                    "cannot attach to {symbol} in {}: {:#} (is the symbol exported, and the binary \
                     not stripped? `nm -D {0}` and `nm {0}` list its symbols)",
                    binary.display(),
                    anyhow::Error::new(e)
                )
            })?;
        }
        Ok(())
    }

    fn attach_softirq(&mut self) -> Result<()> {
        for (prog_name, event) in [(programs::SOFTIRQ_EXIT, "softirq_exit"), (programs::SOFTIRQ_ENTRY, "softirq_entry")]
        {
            let prog: &mut RawTracePoint = program(self.ebpf, prog_name).map_err(|e| anyhow!(e))?;
            prog.load().map_err(|e| anyhow!("loading {prog_name}: {}", bpf::describe(&e)))?;
            prog.attach(event).with_context(|| format!("attaching to raw tracepoint irq:{event}"))?;
        }
        Ok(())
    }
}

/// perf's kprobe PMU is how kprobes are created without tracefs files that
/// could outlive latprobe; its absence means CONFIG_KPROBES is off.
pub fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

fn program<'e, P>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut P, String>
where
    &'e mut P: TryFrom<&'e mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| format!("program {name} is missing from the embedded object"))?;
    prog.try_into().map_err(|e: ProgramError| e.to_string())
}

/// Detaches the entry side of every slot, so no new call starts being timed
/// while the final report is read. Return probes stay until drop.
pub fn detach_entries(ebpf: &mut Ebpf) {
    for entry in programs::FENTRY.iter().chain(&programs::KPROBE).chain(&programs::UPROBE) {
        unload(ebpf, entry);
    }
    unload(ebpf, programs::SOFTIRQ_ENTRY);
}

/// Unloads a program, detaching its links; a program never loaded is fine.
/// (A return probe made in tracefs is held by its `ReturnProbe` too.)
pub fn unload(ebpf: &mut Ebpf, name: &str) {
    use aya::programs::Program;
    let _ = match ebpf.program_mut(name) {
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        Some(Program::UProbe(p)) => p.unload(),
        Some(Program::RawTracePoint(p)) => p.unload(),
        _ => Ok(()),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_and_user_targets() {
        assert_eq!(Target::parse("net_rx_action").unwrap(), Target::Kernel("net_rx_action".into()));
        let t = Target::parse("/bin/sh:main").unwrap();
        assert!(matches!(t, Target::User { ref symbol, .. } if symbol == "main"));
        let t = Target::parse("sh:main").unwrap();
        assert!(matches!(t, Target::User { ref binary, .. } if binary.is_absolute()));
    }

    #[test]
    fn rejects_missing_binaries_and_malformed_targets() {
        let e = Target::parse("/no/such/binary:main").unwrap_err().to_string();
        assert_eq!(e, "binary /no/such/binary does not exist");
        assert!(Target::parse(":main").is_err());
        assert!(Target::parse("/bin/sh:").is_err());
        assert!(Target::parse("").is_err());
    }
}
