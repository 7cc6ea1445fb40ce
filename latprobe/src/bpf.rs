//! The embedded kernel object, the checks to run before loading it
//! (privileges, kernel BTF, locked-memory limits), and load errors on one
//! line.

use std::{fs, sync::OnceLock};

use anyhow::{bail, Context, Result};
use aya::{programs::ProgramError, Ebpf, EbpfLoader};

/// latprobe-ebpf's programs for fn, runqlat, runqslower and flame, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe"));
/// latprobe-ebpf's programs for lock.
static LOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-lock"));
/// latprobe-ebpf's programs for tcp.
static TCP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe-tcp"));

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
    Ok(())
}

/// Loads the object's maps with `configure` applied (globals, map sizes).
/// Programs are loaded one by one by the command that needs them.
pub fn load<'a>(configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    // aya has no userspace type for task storage; the kernel side needs none.
    loader.allow_unsupported_maps();
    configure(&mut loader);
    loader.load(OBJECT).context("loading latprobe's BPF maps failed (task-local storage needs Linux 5.11 or newer)")
}

/// Loads the lock object's maps with `configure` applied.
pub fn load_lock<'a>(configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    load_own_object(LOCK_OBJECT, "lock", configure)
}

/// Loads the tcp object's maps with `configure` applied.
pub fn load_tcp<'a>(configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    load_own_object(TCP_OBJECT, "tcp", configure)
}

/// Loads the maps of a command's own object (no task storage in it).
fn load_own_object<'a>(object: &[u8], command: &str, configure: impl FnOnce(&mut EbpfLoader<'a>)) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    configure(&mut loader);
    loader.load(object).with_context(|| format!("loading latprobe's BPF maps for {command} failed"))
}

/// How many times the kernel skipped program `fd` because it would have
/// re-entered itself on one CPU (`bpf_prog_info.recursion_misses`, Linux
/// 5.12+; a preempted program on PREEMPT_RT counts too). None if unknown.
pub fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: bpf_prog_info is plain integers and u64-encoded pointers:
    // all zeros is a valid value, and what the kernel expects unset.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    // `union bpf_attr`'s `info` member: bpf_fd, info_len, info.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = [0u8; 128];
    let wanted = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<aya_obj::generated::bpf_prog_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` is larger than InfoAttr; an unaligned write of plain integers.
    unsafe { std::ptr::write_unaligned(attr.as_mut_ptr().cast::<InfoAttr>(), wanted) };
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD writes at most info_len bytes into
    // `info`, which lives across the call; `attr` holds its size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), attr.len()) };
    (r == 0).then_some(info.recursion_misses)
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

    #[test]
    fn every_name_userspace_uses_is_in_the_object() {
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
        names.extend(sched::maps::ALL);
        names.extend(sched::globals::ALL);
        names.extend(sched::programs::TP_BTF.iter().chain(&sched::programs::RAW_TP).map(|(p, _)| *p));
        names.extend(flame::maps::ALL);
        names.extend(flame::globals::ALL);
        names.extend(flame::programs::ALL);
        let missing = missing_from(super::OBJECT, &names);
        assert!(missing.is_empty(), "names missing from the kernel object: {missing:?}");
    }

    #[test]
    fn every_lock_name_userspace_uses_is_in_the_lock_object() {
        use latprobe_common::lock;
        let mut names: Vec<&str> = Vec::new();
        names.extend(lock::maps::ALL);
        names.extend(lock::globals::ALL);
        names.extend(lock::programs::ALL.iter().map(|(p, _)| *p));
        names.extend(lock::programs::DURING_FENTRY.iter().chain(&lock::programs::DURING_KPROBE));
        let missing = missing_from(super::LOCK_OBJECT, &names);
        assert!(missing.is_empty(), "names missing from the lock kernel object: {missing:?}");
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
        let missing = missing_from(super::TCP_OBJECT, &names);
        assert!(missing.is_empty(), "names missing from the tcp kernel object: {missing:?}");
    }
}
