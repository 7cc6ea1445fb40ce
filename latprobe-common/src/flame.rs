//! `latprobe flame`: stacks counted in the kernel, on-CPU (perf sampling) or
//! off-CPU (time blocked, from scheduler switches).

use crate::COMM_LEN;

/// Distinct (task, stack) pairs kept; more are counted as dropped.
pub const MAX_KEYS: u32 = 16384;
/// Distinct stacks kept in the stack map.
pub const MAX_STACKS: u32 = 16384;

/// What a count belongs to: a thread and its kernel and user stacks (stack
/// map ids, or a negative errno when the stack could not be taken).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tgid: u32,
    pub pid: u32,
    pub kernel_stack: i32,
    pub user_stack: i32,
    pub comm: [u8; COMM_LEN],
}

/// What could not be counted, per CPU; printed, never hidden.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Drops {
    /// Samples (on-CPU) or switches (off-CPU) seen.
    pub events: u64,
    /// A different stack already held the slot this one hashes to (-EEXIST).
    pub stack_collisions: u64,
    /// Other stack-capture failures (stack map full, fault).
    pub stack_errors: u64,
    /// The counts map was full.
    pub keys_full: u64,
    /// `--during`: stacks of one call beyond `MAX_PENDING`.
    pub pending_full: u64,
    /// With the hashes by tid (no task storage): an off-CPU block or a
    /// `--during` call not timed because its hash was full.
    pub tasks_full: u64,
    /// New keys userspace was not told of (its ring full): their processes'
    /// mappings are read only at the end, if they still live.
    pub notices_lost: u64,
}

/// `--during`: stacks held per task while a call of FUNC is in flight,
/// committed to the counts if it turns out slow, dropped otherwise.
pub const MAX_PENDING: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingEntry {
    pub key: StackKey,
    pub count: u64,
}

/// The stacks sampled during the current task's in-flight call of FUNC.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    /// Non-zero while a call is in flight.
    pub active: u32,
    pub len: u32,
    pub entries: [PendingEntry; MAX_PENDING],
}

/// Off-CPU: when and where the current task left the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OffCpuStart {
    pub start_ns: u64,
    pub key: StackKey,
}

impl Default for StackKey {
    fn default() -> Self {
        Self { tgid: 0, pid: 0, kernel_stack: -1, user_stack: -1, comm: [0; COMM_LEN] }
    }
}

/// Names of the load-time globals of the flame programs.
pub mod globals {
    /// tgid to sample, 0 for all.
    pub const TGID: &str = "FL_TGID";
    /// Non-zero to take kernel stacks.
    pub const KERNEL: &str = "FL_KERNEL";
    /// Non-zero to take user stacks.
    pub const USER: &str = "FL_USER";
    /// Off-CPU: ignore blocks shorter than this (ns).
    pub const MIN_BLOCK_NS: &str = "FL_MIN_BLOCK_NS";
    /// `--during`: the `fn` slot whose calls gate what is counted
    /// (`u32::MAX`: none, count everything).
    pub const DURING_SLOT: &str = "FL_DURING_SLOT";
    /// `--during`: calls at least this slow keep their stacks.
    pub const DURING_SLOWER_NS: &str = "FL_DURING_SLOWER_NS";
    /// Non-zero: off-CPU starts and `--during`'s held stacks in the hashes
    /// by tid, not task storage.
    pub const USE_HASH: &str = "FL_USE_HASH";
    /// Offset of `task_struct.pid`, from the running kernel's BTF.
    pub const TASK_PID_OFF: &str = "FL_TASK_PID_OFF";
    /// Offset of `task_struct.__state` (`state` before 5.14), from BTF.
    pub const TASK_STATE_OFF: &str = "FL_TASK_STATE_OFF";

    pub const ALL: [&str; 9] =
        [TGID, KERNEL, USER, MIN_BLOCK_NS, DURING_SLOT, DURING_SLOWER_NS, USE_HASH, TASK_PID_OFF, TASK_STATE_OFF];
}

/// Names of the flame maps.
pub mod maps {
    /// `StackKey` → samples (on-CPU) or microseconds (off-CPU).
    pub const COUNTS: &str = "FL_COUNTS";
    pub const STACKS: &str = "FL_STACKS";
    pub const DROPS: &str = "FL_DROPS";
    /// Task storage: where each task left the CPU.
    pub const OFF_START: &str = "FL_OFF_START";
    /// Task storage: `--during` stacks held until the call ends.
    pub const PENDING: &str = "FL_PENDING";
    /// Off-CPU starts by tid, where task storage cannot be used.
    pub const OFF_HASH: &str = "FL_OFF_HASH";
    /// `--during`'s held stacks by tid, where task storage cannot be used.
    pub const PENDING_HASH: &str = "FL_PENDING_HASH";
    /// One zeroed `Pending`: the first value of a `PENDING_HASH` entry.
    pub const EMPTY_PENDING: &str = "FL_EMPTY_PENDING";
    /// Ring buffer of each `StackKey` when first counted, with user stacks:
    /// how userspace learns of a process while it lives, to read its
    /// mappings, without walking the counts map.
    pub const NEW_KEYS: &str = "FL_NEW_KEYS";

    pub const ALL: [&str; 9] =
        [COUNTS, STACKS, DROPS, OFF_START, PENDING, OFF_HASH, PENDING_HASH, EMPTY_PENDING, NEW_KEYS];
}

/// Names of the flame programs.
pub mod programs {
    /// perf event: on-CPU samples.
    pub const SAMPLE: &str = "fl_sample";
    /// tp_btf `sched_switch`: off-CPU time.
    pub const SWITCH: &str = "fl_switch";
    /// tp_btf `sched_process_exit`: frees an exiting thread's entries in the
    /// hashes by tid; attached only where they are used.
    pub const EXIT: &str = "fl_exit";

    pub const ALL: [&str; 3] = [SAMPLE, SWITCH, EXIT];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with no padding; any bit pattern is valid.
    unsafe impl aya::Pod for StackKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Drops {}
}

const _: () = assert!(core::mem::size_of::<StackKey>() == 32);
const _: () = assert!(core::mem::size_of::<Drops>() == 8 * 7);
