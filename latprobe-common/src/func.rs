//! `latprobe fn`: per-function latency, aggregated in the kernel per CPU.

use crate::{hdr, COMM_LEN};

/// Functions one run can trace at once. Each gets a slot with its own
/// programs, statistics and histogram.
pub const MAX_FUNCS: usize = 8;
/// Nested or recursive calls of one function tracked per task. Deeper calls
/// are still counted as `missed`, never as wrong durations.
pub const MAX_DEPTH: usize = 8;
/// Kernel stack frames kept per outlier.
pub const MAX_STACK: usize = 48;
/// Histogram groups per function slot (a per-CPU value each).
pub const GROUPS_PER_FUNC: usize = hdr::GROUPS;

/// Length of `FuncStats::group_counts`: `hdr::GROUPS` rounded up to a power of two.
pub const GROUP_COUNT_SLOTS: usize = hdr::GROUPS.next_power_of_two();

/// One in-flight call: when and where it started.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Frame {
    pub start_ns: u64,
    pub cpu: u32,
    pub _pad: u32,
}

/// Start times of one task's in-flight calls, in task-local storage: the task
/// carries them across sleeps and CPU migrations, and no lock is shared with
/// any other task.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TaskFrames {
    pub depth: [u32; MAX_FUNCS],
    pub frames: [[Frame; MAX_DEPTH]; MAX_FUNCS],
}

/// Per-CPU running totals of one function slot.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FuncStats {
    pub count: u64,
    pub sum_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
    /// Calls that finished but could not be timed: nesting deeper than
    /// `MAX_DEPTH`, or task storage unavailable (BPF recursion on this CPU).
    pub missed: u64,
    /// Outliers that did not fit in the ring buffer.
    pub outliers_lost: u64,
    /// Values counted per histogram group, so userspace reads only those.
    /// A power of two long, so the kernel side can mask the index into range
    /// in a way the verifier follows.
    pub group_counts: [u64; GROUP_COUNT_SLOTS],
}

impl Default for FuncStats {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
            missed: 0,
            outliers_lost: 0,
            group_counts: [0; GROUP_COUNT_SLOTS],
        }
    }
}

/// One histogram group of one slot: the per-CPU value of the bucket map, keyed
/// by `slot * GROUPS_PER_FUNC + group`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BucketGroup {
    pub counts: [u64; hdr::GROUP_BUCKETS],
}

/// A call slower than `--slower`, sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Outlier {
    /// CLOCK_MONOTONIC time the call ended.
    pub end_ns: u64,
    pub duration_ns: u64,
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    pub slot: u32,
    pub comm: [u8; COMM_LEN],
    /// Number of valid entries in `stack` (0 without `--stacks`).
    pub stack_len: u32,
    pub _pad: u32,
    pub stack: [u64; MAX_STACK],
}

/// `irq:softirq_entry/exit` vector of NET_RX (include/linux/interrupt.h).
pub const NET_RX_SOFTIRQ: u32 = 3;

/// Names of the load-time globals of the `fn` programs.
pub mod globals {
    /// tgid to trace, 0 for all.
    pub const TARGET_TGID: &str = "FN_TARGET_TGID";
    /// CPU to trace, `u32::MAX` for all.
    pub const TARGET_CPU: &str = "FN_TARGET_CPU";
    /// Outlier threshold in ns, `u64::MAX` for none.
    pub const SLOWER_NS: &str = "FN_SLOWER_NS";
    /// Non-zero to capture kernel stacks of outliers.
    pub const STACKS: &str = "FN_STACKS";
    /// Slot fed by the softirq tracepoints.
    pub const SOFTIRQ_SLOT: &str = "FN_SOFTIRQ_SLOT";
    /// Non-zero to keep start times in `FRAMES_HASH` instead of task storage.
    pub const USE_HASH: &str = "FN_USE_HASH";

    pub const ALL: [&str; 6] = [TARGET_TGID, TARGET_CPU, SLOWER_NS, STACKS, SOFTIRQ_SLOT, USE_HASH];
}

/// Names of the `fn` maps.
pub mod maps {
    /// Task storage: `TaskFrames` of each task with calls in flight.
    pub const FRAMES: &str = "FN_FRAMES";
    /// Per-CPU `FuncStats` per slot.
    pub const STATS: &str = "FN_STATS";
    /// Per-CPU `BucketGroup`s, keyed by `slot * GROUPS_PER_FUNC + group`.
    pub const BUCKETS: &str = "FN_BUCKETS";
    /// Ring buffer of `Outlier`s.
    pub const OUTLIERS: &str = "FN_OUTLIERS";
    /// Preallocated hash of `TaskFrames` by thread, where task storage
    /// cannot be created safely wherever a traced function runs.
    pub const FRAMES_HASH: &str = "FN_FRAMES_HASH";
    /// One zeroed `TaskFrames`: the first value of a `FRAMES_HASH` entry.
    pub const EMPTY_FRAMES: &str = "FN_EMPTY_FRAMES";

    pub const ALL: [&str; 6] = [FRAMES, STATS, BUCKETS, OUTLIERS, FRAMES_HASH, EMPTY_FRAMES];
}

/// Names of the `fn` programs: one of each kind per slot.
pub mod programs {
    use super::MAX_FUNCS;

    macro_rules! per_slot {
        ($kind:literal) => {
            [
                concat!("fn_", $kind, "_0"),
                concat!("fn_", $kind, "_1"),
                concat!("fn_", $kind, "_2"),
                concat!("fn_", $kind, "_3"),
                concat!("fn_", $kind, "_4"),
                concat!("fn_", $kind, "_5"),
                concat!("fn_", $kind, "_6"),
                concat!("fn_", $kind, "_7"),
            ]
        };
    }

    pub const FENTRY: [&str; MAX_FUNCS] = per_slot!("fentry");
    pub const FEXIT: [&str; MAX_FUNCS] = per_slot!("fexit");
    pub const KPROBE: [&str; MAX_FUNCS] = per_slot!("kprobe");
    pub const KRETPROBE: [&str; MAX_FUNCS] = per_slot!("kretprobe");
    pub const UPROBE: [&str; MAX_FUNCS] = per_slot!("uprobe");
    pub const URETPROBE: [&str; MAX_FUNCS] = per_slot!("uretprobe");
    /// `irq:softirq_entry`/`softirq_exit`, timing NET_RX where nothing else works.
    pub const SOFTIRQ_ENTRY: &str = "fn_softirq_entry";
    pub const SOFTIRQ_EXIT: &str = "fn_softirq_exit";
    /// `sched:sched_process_exit`: drops the exiting thread's `FRAMES_HASH` entry.
    pub const TASK_EXIT: &str = "fn_task_exit";
}

/// `FRAMES_HASH` key of the idle task of CPU `cpu`: every idle task is tid
/// 0, and interrupts on idle CPUs run on top of them. Above any tid.
pub const IDLE_FRAMES_KEY: u32 = 1 << 31;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; any bit
    // pattern is valid.
    unsafe impl aya::Pod for FuncStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BucketGroup {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Outlier {}
}

const _: () = assert!(core::mem::size_of::<Frame>() == 16);
const _: () = assert!(core::mem::size_of::<Outlier>() == 8 * 2 + 4 * 4 + COMM_LEN + 8 + 8 * MAX_STACK);
const _: () = assert!(core::mem::size_of::<BucketGroup>() <= 32 * 1024);
