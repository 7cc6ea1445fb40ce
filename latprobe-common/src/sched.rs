//! `latprobe runqslower` and `latprobe runqlat`: how long runnable tasks wait
//! for a CPU, measured from wakeup (or involuntary switch-out) to switch-in.
//!
//! Both commands load the same `rq_*` programs; runqlat aggregates every wait
//! into in-kernel per-CPU HDR histograms (`func::FuncStats` and
//! `func::BucketGroup`, the layout of `latprobe fn`), runqslower sends only
//! waits over its threshold through the ring buffer.

use crate::{func::MAX_STACK, COMM_LEN};

/// The most processes `runqlat --per-pid` gives a histogram of their own.
/// Each costs `hdr::GROUPS` 1 KiB groups per CPU, so the cap bounds memory
/// however many processes come and go; later ones share the "other" row.
pub const MAX_PID_SLOTS: usize = 64;
/// Entries of the tid-keyed hash map that holds wakeup times when task-local
/// storage cannot be used (raw_tp fallback). Wakeups beyond it are counted
/// as lost, never mistimed.
pub const START_HASH_ENTRIES: u32 = 16_384;
/// Bytes of the runqslower ring buffer: about 2000 events with stacks.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// When one task began waiting for a CPU: kept per task, in task-local
/// storage (or the fallback hash map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskStart {
    /// CLOCK_MONOTONIC time of the wakeup or switch-out; 0 when not waiting.
    pub ts_ns: u64,
    /// The task's tgid, read at wakeup when a filter or `--per-pid` needs it.
    pub tgid: u32,
    pub _pad: u32,
}

/// Per-CPU counts of waits that could not be measured or reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Lost {
    /// A wakeup whose time could not be stored (task storage refused, or the
    /// fallback hash map full).
    pub no_start: u64,
    /// A delay over the threshold that did not fit in the ring buffer.
    pub events: u64,
}

/// One wait longer than runqslower's threshold.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RunqEvent {
    /// CLOCK_MONOTONIC time the task got the CPU.
    pub ts_ns: u64,
    pub delay_ns: u64,
    pub cpu: u32,
    /// The task that waited.
    pub tid: u32,
    pub tgid: u32,
    /// The task that ran on that CPU just before it: the culprit.
    pub prev_tid: u32,
    pub prev_tgid: u32,
    /// Valid entries of `stack` (the culprit's kernel stack at switch-out).
    pub stack_len: u32,
    pub comm: [u8; COMM_LEN],
    pub prev_comm: [u8; COMM_LEN],
    pub stack: [u64; MAX_STACK],
}

/// What the programs aggregate into histograms (`globals::HIST`).
pub mod hist {
    /// No histogram (runqslower).
    pub const NONE: u32 = 0;
    /// One histogram, slot 0: runqlat, and runqlat --per-cpu, which reads
    /// each CPU's copy of the per-CPU values separately.
    pub const ONE: u32 = 1;
    /// Slot per process, slot 0 for "other": runqlat --per-pid.
    pub const PER_PID: u32 = 2;
}

/// Names of the load-time globals of the `rq_` programs.
pub mod globals {
    /// Only tasks of this tgid, 0 for all.
    pub const TARGET_TGID: &str = "RQ_TARGET_TGID";
    /// Only this thread, 0 for all.
    pub const TARGET_TID: &str = "RQ_TARGET_TID";
    /// Only waits that ended on this CPU, `u32::MAX` for all.
    pub const TARGET_CPU: &str = "RQ_TARGET_CPU";
    /// Only tasks whose comm starts with these bytes (`[u8; 16]`)…
    pub const COMM_PREFIX: &str = "RQ_COMM_PREFIX";
    /// …of which this many count; 0 for all.
    pub const COMM_PREFIX_LEN: &str = "RQ_COMM_PREFIX_LEN";
    /// Waits at least this long go through the ring buffer; `u64::MAX` for none.
    pub const THRESHOLD_NS: &str = "RQ_THRESHOLD_NS";
    /// Non-zero to capture the culprit's kernel stack with each event.
    pub const STACKS: &str = "RQ_STACKS";
    /// One of `hist::*`.
    pub const HIST: &str = "RQ_HIST";
    /// Process slots for `hist::PER_PID` (at most `MAX_PID_SLOTS`).
    pub const PID_SLOTS: &str = "RQ_PID_SLOTS_N";
    /// Non-zero: keep wakeup times in the tid-keyed hash map even in the
    /// tp_btf programs (kernels where task storage cannot allocate in the
    /// scheduler; see latprobe's `btf_offsets`).
    pub const USE_HASH: &str = "RQ_USE_HASH";
    /// Offsets in `struct task_struct`, read from the running kernel's BTF.
    pub const TASK_PID_OFF: &str = "RQ_TASK_PID_OFF";
    pub const TASK_TGID_OFF: &str = "RQ_TASK_TGID_OFF";
    pub const TASK_COMM_OFF: &str = "RQ_TASK_COMM_OFF";
    pub const TASK_STATE_OFF: &str = "RQ_TASK_STATE_OFF";

    pub const ALL: [&str; 14] = [
        TARGET_TGID,
        TARGET_TID,
        TARGET_CPU,
        COMM_PREFIX,
        COMM_PREFIX_LEN,
        THRESHOLD_NS,
        STACKS,
        HIST,
        PID_SLOTS,
        USE_HASH,
        TASK_PID_OFF,
        TASK_TGID_OFF,
        TASK_COMM_OFF,
        TASK_STATE_OFF,
    ];
}

/// Names of the `rq_` maps.
pub mod maps {
    /// Task storage: wait start of each waiting task.
    pub const START: &str = "RQ_START";
    /// The same by tid, where task storage cannot be used.
    pub const START_HASH: &str = "RQ_START_HASH";
    pub const LOST: &str = "RQ_LOST";
    pub const STATS: &str = "RQ_STATS";
    pub const BUCKETS: &str = "RQ_BUCKETS";
    /// tgid → histogram slot, for `--per-pid`.
    pub const PID_SLOTS: &str = "RQ_PID_SLOTS";
    pub const NEXT_SLOT: &str = "RQ_NEXT_SLOT";
    /// Ring buffer of `RunqEvent`s.
    pub const EVENTS: &str = "RQ_EVENTS";

    pub const ALL: [&str; 8] = [START, START_HASH, LOST, STATS, BUCKETS, PID_SLOTS, NEXT_SLOT, EVENTS];
}

/// Names of the `rq_` programs, as (program, tracepoint), in attach order:
/// the exit first, so that no record in the hash map outlives its task; the
/// wakeups before the switch, so that every wait the switch program sees
/// ending was seen starting.
pub mod programs {
    /// The tracepoint of the programs that only remove an exiting task's
    /// record from the tid-keyed hash map: attached only where that map is
    /// used (raw_tp always, tp_btf with `globals::USE_HASH`).
    pub const EXIT_EVENT: &str = "sched_process_exit";

    pub const TP_BTF: [(&str, &str); 4] = [
        ("rq_exit", EXIT_EVENT),
        ("rq_wakeup", "sched_wakeup"),
        ("rq_wakeup_new", "sched_wakeup_new"),
        ("rq_switch", "sched_switch"),
    ];
    pub const RAW_TP: [(&str, &str); 4] = [
        ("rq_raw_exit", EXIT_EVENT),
        ("rq_raw_wakeup", "sched_wakeup"),
        ("rq_raw_wakeup_new", "sched_wakeup_new"),
        ("rq_raw_switch", "sched_switch"),
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; any bit
    // pattern is valid.
    unsafe impl aya::Pod for Lost {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TaskStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RunqEvent {}
}

const _: () = assert!(core::mem::size_of::<TaskStart>() == 16);
const _: () = assert!(core::mem::size_of::<Lost>() == 16);
const _: () = assert!(core::mem::size_of::<RunqEvent>() == 8 * 2 + 4 * 6 + 2 * COMM_LEN + 8 * MAX_STACK);
