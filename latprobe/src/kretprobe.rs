//! Return probes with room for every call in flight.
//!
//! A kretprobe needs one "instance" per call in flight; the pool holds
//! `maxactive` of them and a return beyond it is dropped by the kernel, which
//! only counts it. perf's kprobe PMU (what aya attaches through) always gets
//! the default pool, max(10, 2 × CPUs): ten tasks sleeping in a traced
//! function and the eleventh call's return is lost, its start time never
//! popped. A kretprobe defined in tracefs `kprobe_events` takes `maxactive`
//! up to the kernel's limit, and `kprobe_profile` reports what it missed, so
//! that is how `fn` makes its return probes; the program is attached through
//! a tracepoint perf event it owns.
//!
//! A definition outlives a latprobe killed with SIGKILL (the probe itself is
//! disabled once the perf event closes); the next latprobe removes
//! definitions whose process is gone.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// Instances per return probe: the kernel's maximum (KRETPROBE_MAXACTIVE_MAX),
/// a few hundred KiB of kernel memory for calls that can sleep in any number
/// of tasks at once.
pub const MAXACTIVE: u32 = 4096;

/// The tracefs group all of latprobe's definitions live in.
const GROUP: &str = "latprobe";

/// One kretprobe defined in tracefs, with a program attached.
pub struct ReturnProbe {
    tracefs: PathBuf,
    event: String,
    /// The perf event carrying the program; closing it detaches.
    perf: Option<OwnedFd>,
}

/// Where tracefs is mounted, if it is.
pub fn tracefs() -> Option<PathBuf> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(PathBuf::from)
        .find(|d| d.join("kprobe_events").is_file())
}

impl ReturnProbe {
    /// Defines a kretprobe on kernel `function` for `slot` and attaches
    /// `program` (a loaded kprobe program) to it.
    pub fn attach(tracefs: &Path, function: &str, slot: usize, program: BorrowedFd<'_>) -> Result<ReturnProbe> {
        // The name goes into a command line of kprobe_events: a space or a
        // newline in it would define or delete other probes.
        if !is_symbol(function) {
            bail!("{function:?} is not a kernel symbol name");
        }
        remove_stale(tracefs);
        let event = format!("latprobe_{}_{slot}", std::process::id());
        define(tracefs, &format!("r{MAXACTIVE}:{GROUP}/{event} {function}"))
            .with_context(|| format!("defining a return probe on {function} in {}", tracefs.display()))?;
        // From here on, drop removes the definition.
        let mut probe = ReturnProbe { tracefs: tracefs.to_path_buf(), event, perf: None };
        let id_path = tracefs.join("events").join(GROUP).join(&probe.event).join("id");
        let id: u64 = fs::read_to_string(&id_path)
            .with_context(|| format!("reading {}", id_path.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} is not a number", id_path.display()))?;
        probe.perf = Some(open_tracepoint(id, program)?);
        Ok(probe)
    }

    /// Detaches the program; the definition stays (and its missed count
    /// with it) until drop.
    pub fn detach(&mut self) {
        drop(self.perf.take());
    }

    /// Returns the kernel dropped (pool exhausted, or the probe hit while
    /// another kprobe ran on that CPU), per `kprobe_profile`.
    pub fn missed(&self) -> u64 {
        let profile = fs::read_to_string(self.tracefs.join("kprobe_profile")).unwrap_or_default();
        profile
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(self.event.as_str())).then(|| f.nth(1)?.parse().ok())?
            })
            .unwrap_or(0)
    }
}

impl Drop for ReturnProbe {
    fn drop(&mut self) {
        // Detach first: a definition in use cannot be removed.
        drop(self.perf.take());
        let _ = define(&self.tracefs, &format!("-:{GROUP}/{}", self.event));
    }
}

/// Letters, digits, `_` and `.` (as in `foo.isra.0`): all a kernel symbol has.
pub fn is_symbol(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Appends one line to `kprobe_events`. Never truncate: that would delete
/// every kprobe on the machine, other tools' too.
fn define(tracefs: &Path, line: &str) -> Result<()> {
    let mut f = OpenOptions::new().append(true).open(tracefs.join("kprobe_events"))?;
    f.write_all(format!("{line}\n").as_bytes())?;
    Ok(())
}

/// Removes definitions left by latprobes that are gone (killed with SIGKILL).
fn remove_stale(tracefs: &Path) {
    let events = fs::read_to_string(tracefs.join("kprobe_events")).unwrap_or_default();
    for name in events.lines().filter_map(|l| stale_event(l, is_latprobe)) {
        let _ = define(tracefs, &format!("-:{GROUP}/{name}"));
    }
}

/// The event name in a `kprobe_events` line ("r4096:latprobe/latprobe_PID_SLOT
/// func") when it is latprobe's and `alive(PID)` is false.
fn stale_event(line: &str, alive: impl Fn(u32) -> bool) -> Option<&str> {
    let (_, rest) = line.split_once(':')?;
    let name = rest.split_whitespace().next()?.strip_prefix(GROUP)?.strip_prefix('/')?;
    let (pid, _slot) = name.strip_prefix("latprobe_")?.split_once('_')?;
    let pid: u32 = pid.parse().ok()?;
    (!alive(pid)).then_some(name)
}

fn is_latprobe(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "latprobe")
}

/// perf_event_attr up to PERF_ATTR_SIZE_VER0, all a tracepoint event needs.
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_DISABLED: u64 = 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
// `libc::Ioctl` is c_ulong with glibc, c_int with musl; both hold these.
const PERF_EVENT_IOC_ENABLE: libc::Ioctl = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::Ioctl = 0x4004_2408;

/// Opens tracepoint event `id` (on one CPU: a kprobe event runs its program
/// wherever it fires) and attaches `program`.
fn open_tracepoint(id: u64, program: BorrowedFd<'_>) -> Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: size_of::<PerfEventAttr>() as u32,
        config: id,
        sample_period: 1,
        sample_type: 0,
        read_format: 0,
        flags: PERF_FLAG_DISABLED,
        wakeup_events: 1,
        bp_type: 0,
        config1: 0,
    };
    // SAFETY: perf_event_open reads `attr`, a complete VER0 attribute; pid -1
    // with cpu 0 is valid for a tracepoint event.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &raw const attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        bail!("perf_event_open on the return probe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    let perf = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for (request, arg, what) in
        [(PERF_EVENT_IOC_SET_BPF, program.as_raw_fd(), "attaching the program"), (PERF_EVENT_IOC_ENABLE, 0, "enabling")]
    {
        // SAFETY: ioctls on our own perf fd with an integer argument.
        if unsafe { libc::ioctl(perf.as_raw_fd(), request, arg) } != 0 {
            bail!("{what} on the return probe: {}", std::io::Error::last_os_error());
        }
    }
    Ok(perf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_latprobes_definitions_are_stale() {
        let dead = |_| false;
        assert_eq!(stale_event("r4096:latprobe/latprobe_12_0 hrtimer_nanosleep", dead), Some("latprobe_12_0"));
        assert_eq!(stale_event("r4096:latprobe/latprobe_12_0 hrtimer_nanosleep", |p| p == 12), None);
        assert_eq!(stale_event("r:kprobes/latprobe_12_0 f", dead), None);
        assert_eq!(stale_event("p:latprobe/other f", dead), None);
        assert_eq!(stale_event("garbage", dead), None);
    }

    #[test]
    fn only_symbol_names_reach_kprobe_events() {
        assert!(is_symbol("tcp_v4_rcv") && is_symbol("tcp_collapse.isra.0"));
        for hostile in ["", "a b", "f\n-:kprobes/other", "f:1", "../x", &"a".repeat(200)] {
            assert!(!is_symbol(hostile), "{hostile:?}");
        }
    }

    #[test]
    fn attribute_is_the_first_published_size() {
        assert_eq!(size_of::<PerfEventAttr>(), 64);
    }
}
