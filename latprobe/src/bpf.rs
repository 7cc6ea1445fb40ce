//! The embedded kernel object, and the checks to run before loading it:
//! privileges, kernel BTF, locked-memory limits.

use std::fs;

use anyhow::{bail, Context, Result};
use aya::{Ebpf, EbpfLoader};

/// latprobe-ebpf, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/latprobe"));

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
         CAP_SYS_ADMIN on older kernels): run it with sudo, or grant them once with \
         `sudo setcap cap_bpf,cap_perfmon+ep $(command -v latprobe)`"
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
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit struct for setrlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
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
    loader
        .load(OBJECT)
        .context("loading latprobe's BPF maps failed (task-local storage needs Linux 5.11 or newer)")
}
