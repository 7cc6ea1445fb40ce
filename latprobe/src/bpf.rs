//! The embedded kernel object, the checks to run before loading it
//! (privileges, kernel BTF, locked-memory limits), and load errors on one
//! line.

use std::{
    fs,
    sync::{Mutex, OnceLock},
    thread::JoinHandle,
};

use anyhow::{bail, Context, Result};
use aya::{programs::ProgramError, Ebpf, EbpfLoader};

use crate::kernel_features;

/// latprobe-ebpf's objects, built by build.rs: one per command (fn and flame
/// share one, as flame's `--during` runs on fn's programs; so do runqlat and
/// runqslower), and each again (`-compat`) for kernels before 5.12.
static FN_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-fn"));
static FN_COMPAT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-fn-compat"));
static SCHED_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-sched"));
static SCHED_COMPAT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-sched-compat"));
static TCP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-tcp"));
static TCP_COMPAT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-tcp-compat"));
static LOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-lock"));
static LOCK_COMPAT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-lock-compat"));

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails with the fix when latprobe lacks the privileges to load programs.
pub fn check_privileges() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    bail!(
        "latprobe needs root, or the capabilities CAP_BPF and CAP_PERFMON (Linux 5.8+; \
         CAP_SYS_ADMIN on older kernels): run it with sudo, or grant them with \
         `sudo setcap cap_bpf,cap_perfmon+ep $(command -v latprobe)` — which lets every user \
         who can run that binary trace the whole machine"
    )
}

/// latprobe's programs find `current` and kernel functions through BTF.
pub fn check_btf() -> Result<()> {
    if fs::metadata("/sys/kernel/btf/vmlinux").is_ok() {
        return Ok(());
    }
    bail!(
        "this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing): latprobe needs a \
         kernel built with CONFIG_DEBUG_INFO_BTF=y (the default on Debian 11+, Ubuntu 20.10+, \
         RHEL 8.2+, Fedora 31+)"
    )
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use
/// memory cgroups. Raising it is best effort: without CAP_SYS_RESOURCE it
/// fails, which only matters on those old kernels.
pub fn raise_memlock() {
    original_memlock();
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit struct for setrlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// RLIMIT_MEMLOCK as latprobe found it (soft, hard), before raising it:
/// what `-- COMMAND` gets back.
pub fn original_memlock() -> (u64, u64) {
    static ORIGINAL: OnceLock<(u64, u64)> = OnceLock::new();
    *ORIGINAL.get_or_init(|| {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid out-pointer for getrlimit.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
            return (8 << 20, 8 << 20);
        }
        (limit.rlim_cur, limit.rlim_max)
    })
}

/// The kernel's page size: the smallest ring buffer.
pub fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096).max(4096)
}

/// Runs every check that must pass before anything is loaded.
pub fn preflight() -> Result<()> {
    check_privileges()?;
    check_btf()?;
    raise_memlock();
    prepare_loader();
    Ok(())
}

/// latprobe's kernel objects.
#[derive(Clone, Copy, Debug)]
pub enum Object {
    /// fn, and flame (on-CPU, off-CPU, `--during`).
    Fn,
    /// runqlat and runqslower.
    Sched,
    Tcp,
    Lock,
}

impl Object {
    fn name(self) -> &'static str {
        match self {
            Object::Fn => "fn and flame",
            Object::Sched => "runqlat and runqslower",
            Object::Tcp => "tcp",
            Object::Lock => "lock",
        }
    }

    /// The build for this kernel. The loader creates every map of an object
    /// and the verifier scans every instruction, so a kernel before 5.12
    /// gets the `-compat` build: no task-storage map (5.11; the per-task
    /// values go to the hashes by tid) and no `BPF_FETCH` atomics (5.12).
    fn bytes(self) -> &'static [u8] {
        match (self, compat()) {
            (Object::Fn, false) => FN_OBJECT,
            (Object::Fn, true) => FN_COMPAT_OBJECT,
            (Object::Sched, false) => SCHED_OBJECT,
            (Object::Sched, true) => SCHED_COMPAT_OBJECT,
            (Object::Tcp, false) => TCP_OBJECT,
            (Object::Tcp, true) => TCP_COMPAT_OBJECT,
            (Object::Lock, false) => LOCK_OBJECT,
            (Object::Lock, true) => LOCK_COMPAT_OBJECT,
        }
    }
}

/// Whether this kernel needs the `-compat` objects: it lacks task-local
/// storage (`BPF_MAP_TYPE_TASK_STORAGE`, Linux 5.11) or `BPF_FETCH` atomics
/// (`BPF_CMPXCHG`, atomic fetch-and-add: 5.12). The commands then keep
/// per-task values in their hashes by tid.
pub fn compat() -> bool {
    static COMPAT: OnceLock<bool> = OnceLock::new();
    *COMPAT.get_or_init(|| {
        let task_storage = kernel_features::has_task_storage();
        let fetch_atomics = kernel_features::has_fetch_atomics();
        let compat = !task_storage || !fetch_atomics;
        if compat {
            crate::output::verbose(&format!(
                "kernel objects for kernels before 5.12 (task-local storage: {}, BPF_CMPXCHG: {})",
                if task_storage { "yes" } else { "no, Linux 5.11+" },
                if fetch_atomics { "yes" } else { "no, Linux 5.12+" },
            ));
        }
        compat
    })
}

/// Entries of `SLOT_OWNERS` for a command with `limit` histogram slots: the
/// limit where the `-compat` object claims slots through it, else one.
pub fn slot_owners(limit: u32) -> u32 {
    if compat() {
        limit.max(1)
    } else {
        1
    }
}

/// aya's `EbpfLoader::new` parses the kernel's BTF (tens of milliseconds,
/// hundreds under emulation) before anything can be configured. Made on its
/// own thread from [`preflight`] on, that parse overlaps with latprobe's
/// own BTF parse (offsets), the command's, and its other preparation,
/// instead of following them.
static PREPARED_LOADER: Mutex<Option<JoinHandle<EbpfLoader<'static>>>> = Mutex::new(None);

fn prepare_loader() {
    let mut prepared = PREPARED_LOADER.lock().unwrap_or_else(|e| e.into_inner());
    if prepared.is_none() {
        *prepared = Some(std::thread::spawn(EbpfLoader::new));
    }
}

/// The loader [`prepare_loader`] made, or a new one.
fn loader() -> EbpfLoader<'static> {
    let prepared = PREPARED_LOADER.lock().unwrap_or_else(|e| e.into_inner()).take();
    prepared.and_then(|thread| thread.join().ok()).unwrap_or_default()
}

/// Loads `object`'s maps with `configure` applied (globals, map sizes).
/// Programs are loaded one by one by the command that needs them.
pub fn load<'a>(object: Object, configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    let mut loader = loader();
    // aya has no userspace type for task storage; the kernel side needs none.
    loader.allow_unsupported_maps();
    configure(&mut loader);
    loader.load(object.bytes()).with_context(|| format!("loading latprobe's BPF maps for {} failed", object.name()))
}

/// Loads the lock object's maps with `configure` applied.
pub fn load_lock<'a>(configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    load(Object::Lock, configure)
}

/// Loads the tcp object's maps with `configure` applied.
pub fn load_tcp<'a>(configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    load(Object::Tcp, configure)
}

/// An error and its causes on one line, like anyhow's `{:#}`.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text += &format!(": {e}");
        source = e.source();
    }
    text
}

/// The errno behind an aya program error, if any.
pub fn errno(err: &ProgramError) -> Option<i32> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        source = e.source();
    }
    None
}

/// A program error on one line: a refused load says why in the last lines
/// of the verifier's log, never the whole log.
pub fn describe(err: &ProgramError) -> String {
    if let ProgramError::LoadError { io_error, verifier_log } = err {
        if io_error.raw_os_error() == Some(libc::EPERM) {
            return "the kernel refused to load it (EPERM: lockdown or a BPF LSM policy)".into();
        }
        let log = verifier_log.to_string();
        let tail: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        if tail.is_empty() {
            return io_error.to_string();
        }
        return format!("{io_error}; the verifier said: {}", tail.join(" | "));
    }
    error_chain(err)
}

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSymbol};

    use latprobe_common::{flame, func, sched};

    /// Every map, global and program name userspace asks for is in the
    /// embedded object: a misspelt or renamed one fails here, not at run time.
    /// The `names` an embedded object lacks.
    fn missing_from<'a>(object: &[u8], names: &[&'a str]) -> Vec<&'a str> {
        let file = object::File::parse(object).expect("the embedded object is ELF");
        let symbols: std::collections::HashSet<&str> = file.symbols().filter_map(|s| s.name().ok()).collect();
        names.iter().copied().filter(|n| !symbols.contains(n)).collect()
    }

    /// The task-storage maps, absent by design from the `-hash` builds.
    const PER_TASK: [&str; 4] = [func::maps::FRAMES, sched::maps::START, flame::maps::OFF_START, flame::maps::PENDING];

    /// `names` are in the full build; in the compat build too, but for the
    /// task-storage maps, which must not be there.
    fn check_both_builds(with: &[u8], without: &[u8], names: &[&str]) {
        let missing = missing_from(with, names);
        assert!(missing.is_empty(), "names missing from the kernel object: {missing:?}");
        let missing = missing_from(without, names);
        let expected: Vec<&str> = names.iter().copied().filter(|n| PER_TASK.contains(n)).collect();
        assert_eq!(missing, expected, "the compat object must lack exactly its task-storage maps");
    }

    /// `BPF_ATOMIC` instructions with `BPF_FETCH` (cmpxchg, fetch-and-add)
    /// in an object's code: a 5.10 verifier refuses the whole object for one.
    fn fetch_atomics(object: &[u8]) -> usize {
        use object::ObjectSection;
        let file = object::File::parse(object).expect("the embedded object is ELF");
        let mut found = 0;
        for section in file.sections().filter(|s| s.kind() == object::SectionKind::Text) {
            let data = section.data().expect("section data");
            for insn in data.chunks_exact(8) {
                let (code, imm) = (insn[0], i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]));
                // BPF_STX class, BPF_ATOMIC mode, an operation beyond plain add.
                if code & 0x07 == 0x03 && code & 0xe0 == 0xc0 && imm != 0 {
                    found += 1;
                }
            }
        }
        found
    }

    #[test]
    fn compat_objects_hold_no_instruction_a_5_10_verifier_refuses() {
        for (name, full, compat) in [
            ("fn", super::FN_OBJECT, super::FN_COMPAT_OBJECT),
            ("sched", super::SCHED_OBJECT, super::SCHED_COMPAT_OBJECT),
            ("tcp", super::TCP_OBJECT, super::TCP_COMPAT_OBJECT),
            ("lock", super::LOCK_OBJECT, super::LOCK_COMPAT_OBJECT),
        ] {
            // The check itself finds them where they are.
            assert!(fetch_atomics(full) > 0, "{name}: the full object has cmpxchg in its min/max updates");
            assert_eq!(fetch_atomics(compat), 0, "{name}: the compat object must hold no BPF_FETCH atomics");
        }
    }

    /// The benchmark's floor object, embedded here only to check its names:
    /// latprobe itself never loads it (the `floor` example does).
    static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-floor"));

    #[test]
    fn every_floor_name_the_bench_uses_is_in_the_floor_object() {
        let missing = missing_from(FLOOR_OBJECT, &latprobe_common::floor::programs::ALL);
        assert!(missing.is_empty(), "names missing from the floor object: {missing:?}");
    }

    #[test]
    fn every_sched_name_userspace_uses_is_in_the_sched_objects() {
        let mut names: Vec<&str> = Vec::new();
        names.extend(sched::maps::ALL);
        names.extend(sched::globals::ALL);
        names.extend(sched::programs::TP_BTF.iter().chain(&sched::programs::RAW_TP).map(|(p, _)| *p));
        names.push(latprobe_common::SLOT_OWNERS);
        check_both_builds(super::SCHED_OBJECT, super::SCHED_COMPAT_OBJECT, &names);
        // Each command's object holds only its own maps.
        let foreign = missing_from(super::SCHED_OBJECT, &[func::maps::STATS, flame::maps::COUNTS]);
        assert_eq!(foreign.len(), 2, "fn's and flame's maps must not be in the sched object");
    }

    #[test]
    fn every_name_userspace_uses_is_in_the_fn_objects() {
        let mut names: Vec<&str> = Vec::new();
        names.extend(func::maps::ALL);
        names.extend(func::globals::ALL);
        for kind in [
            func::programs::FENTRY,
            func::programs::FEXIT,
            func::programs::KPROBE,
            func::programs::KRETPROBE,
            func::programs::UPROBE,
            func::programs::URETPROBE,
        ] {
            names.extend(kind);
        }
        names.extend([func::programs::SOFTIRQ_ENTRY, func::programs::SOFTIRQ_EXIT]);
        names.extend(flame::maps::ALL);
        names.extend(flame::globals::ALL);
        names.extend(flame::programs::ALL);
        check_both_builds(super::FN_OBJECT, super::FN_COMPAT_OBJECT, &names);
        let foreign = missing_from(super::FN_OBJECT, &[sched::maps::START_HASH]);
        assert_eq!(foreign.len(), 1, "the scheduler commands' maps must not be in the fn object");
    }

    #[test]
    fn every_lock_name_userspace_uses_is_in_the_lock_object() {
        use latprobe_common::lock;
        let mut names: Vec<&str> = Vec::new();
        names.extend(lock::maps::ALL);
        names.extend(lock::globals::ALL);
        names.extend(lock::programs::ALL.iter().map(|(p, _)| *p));
        names.extend(lock::programs::DURING_FENTRY.iter().chain(&lock::programs::DURING_KPROBE));
        names.push(latprobe_common::SLOT_OWNERS);
        check_both_builds(super::LOCK_OBJECT, super::LOCK_COMPAT_OBJECT, &names);
    }

    #[test]
    fn every_tcp_name_userspace_uses_is_in_the_tcp_object() {
        use latprobe_common::tcp;
        let mut names: Vec<&str> = Vec::new();
        names.extend(tcp::maps::ALL);
        names.extend(tcp::globals::ALL);
        let programs = tcp::programs::SOFTIRQ
            .iter()
            .chain(&tcp::programs::RXQUEUE)
            .chain(&tcp::programs::LOSSES)
            .chain(&tcp::programs::LISTEN)
            .chain([&tcp::programs::STATE, &tcp::programs::SERVER_HANDSHAKE, &tcp::programs::DROPS])
            .chain([&tcp::programs::COLLAPSE_START, &tcp::programs::COLLAPSED, &tcp::programs::PRUNE_END]);
        names.extend(programs.map(|(p, _)| *p));
        names.extend(tcp::programs::ACCEPT.iter().map(|(_, p)| *p));
        names.push(tcp::programs::LISTEN_ACK_KPROBE);
        names.push(tcp::programs::COLLAPSE_START_KPROBE);
        names.push(tcp::programs::COLLAPSED_KPROBE);
        names.push(tcp::programs::PRUNE_END_KRETPROBE);
        names.push(tcp::programs::LISTEN_SYN_KPROBE);
        names.extend(tcp::programs::LISTEN_EXIT);
        names.push(tcp::programs::LISTEN_KRETPROBE);
        names.push(latprobe_common::SLOT_OWNERS);
        check_both_builds(super::TCP_OBJECT, super::TCP_COMPAT_OBJECT, &names);
    }
}
