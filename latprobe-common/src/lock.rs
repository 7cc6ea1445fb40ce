//! `latprobe lock`: which kernel locks were contended, how long tasks waited
//! on them, and who waited.
//!
//! The `lock:contention_begin/end` tracepoints fire only on a lock's slow
//! path. Each wait is added, per lock, to per-CPU totals in the kernel and,
//! for the first `LOCK_SLOTS_N` locks seen, to an HDR histogram (the layout
//! of `fn`); only waits over `--slower` leave the kernel one by one.

use crate::{func::MAX_STACK, COMM_LEN};

/// `LCB_F_*` of include/trace/events/lock.h: what kind of lock a waiter waits on.
pub mod flags {
    pub const SPIN: u32 = 1 << 0;
    pub const READ: u32 = 1 << 1;
    pub const WRITE: u32 = 1 << 2;
    pub const RT: u32 = 1 << 3;
    pub const PERCPU: u32 = 1 << 4;
    pub const MUTEX: u32 = 1 << 5;
}

/// Waits one task can be in at once: a mutex's spinning and sleeping phases
/// are one wait, but an interrupt can contend on a spinlock while the task
/// it interrupted spins on another. Deeper waits are counted, not timed.
pub const MAX_DEPTH: usize = 4;
/// The most locks with a histogram of their own.
pub const MAX_LOCK_SLOTS: usize = 64;
/// Tasks that can wait at once (the per-task table).
pub const TASK_ENTRIES: u32 = 16_384;
/// Distinct locks whose totals are kept; waits on more are counted as lost.
pub const LOCK_ENTRIES: u32 = 8_192;
/// Distinct waiter stacks kept.
pub const STACK_ENTRIES: u32 = 4_096;
/// Distinct (lock, stack, process) waiters whose totals are kept; waits of
/// more are counted on their lock but not by waiter.
pub const WAITER_ENTRIES: u32 = 16_384;
/// Bytes of the event ring buffer with `--slower`.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// One wait in progress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Waiting {
    pub lock: u64,
    pub ts_ns: u64,
    pub flags: u32,
    /// The waiter's kernel stack in the stack map, negative if not taken.
    pub stack_id: i32,
    /// The `task_struct` that owned the lock when the wait began, where the
    /// kernel records owners (mutex, rwsem held for writing, rt_mutex); 0
    /// otherwise.
    pub holder: u64,
}

/// The waits a task is in, innermost last. Keyed by tid (idle tasks, which
/// share tid 0, by `IDLE_KEY | cpu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskWaits {
    pub depth: u32,
    pub _pad: u32,
    pub waits: [Waiting; MAX_DEPTH],
}

/// An offset global for a field this kernel does not have.
pub const NO_FIELD: u32 = u32::MAX;

/// The low bits of a lock's owner word that are flags, not the task's
/// address (`MUTEX_FLAGS`, `RWSEM_OWNER_FLAGS_MASK`, `RT_MUTEX_HAS_WAITERS`).
pub const OWNER_FLAGS: u64 = 0x7;
/// `RWSEM_READER_OWNED`: the owner word names only the last reader, a hint.
pub const RWSEM_READER_OWNED: u64 = 1;

/// Key bit of an idle task's waits.
pub const IDLE_KEY: u32 = 1 << 31;

/// Per-CPU totals of one lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LockStats {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// The flags of its last wait.
    pub flags: u32,
    pub _pad: u32,
}

/// Who waited on a lock, and from where.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WaiterKey {
    pub lock: u64,
    /// The waiter's kernel stack (see `Waiting::stack_id`).
    pub stack_id: i32,
    pub tgid: u32,
}

/// The waits of one `WaiterKey`, shared by all CPUs (added to atomically).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WaiterStats {
    pub count: u64,
    pub total_ns: u64,
    /// The name of the first of its threads that waited.
    pub comm: [u8; COMM_LEN],
}

/// Waits one call of `--during`'s function can hold until it ends: kept
/// when the call turns out slow, dropped otherwise. More are counted.
pub const MAX_CALL_WAITS: usize = 8;

/// A wait that ended inside a call of `--during`'s function, held until
/// the call ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HeldWait {
    pub lock: u64,
    pub wait_ns: u64,
    pub holder: u64,
    pub flags: u16,
    /// The frame (`Call::frames`, 0 the outermost) whose call holds it.
    pub level: u16,
    pub stack_id: i32,
}

/// Calls of `--during`'s function one task can be inside at once: nested
/// ones, and ones whose return the kernel did not run the program for.
pub const MAX_FRAMES: usize = 4;

/// One call of `--during`'s function in flight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Frame {
    /// Where the probe's context sat on the kernel stack at the call's
    /// entry. The return of the same call sits at the same place (fexit), or
    /// within `RETURN_SLACK` of it (kretprobe); a call nested in it, lower.
    /// Not a depth: the kernel moves each syscall's stack by a random
    /// offset (CONFIG_RANDOMIZE_KSTACK_OFFSET).
    pub stack_at: u64,
    pub start_ns: u64,
}

/// How far a kretprobe's context may sit from its kprobe's.
pub const RETURN_SLACK: u64 = 256;

/// One task's calls of `--during`'s function in flight, and the waits they
/// hold.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Call {
    /// Valid entries of `frames`, outermost first, each lower on the stack
    /// than the one before.
    pub depth: u32,
    /// Valid entries of `waits`.
    pub held: u32,
    /// Waits that did not fit in `waits`, counted as dropped if a slow call
    /// ends before the outermost does.
    pub overflow: u64,
    pub frames: [Frame; MAX_FRAMES],
    pub waits: [HeldWait; MAX_CALL_WAITS],
}

/// Per-CPU counts of `--during`'s calls.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CallCounts {
    pub calls: u64,
    /// Calls at least `--slower` long: their waits are counted.
    pub slow_calls: u64,
    /// Waits inside a slow call beyond `MAX_CALL_WAITS`.
    pub waits_dropped: u64,
    /// Calls whose start could not be stored (the call table full).
    pub untimed: u64,
}

/// Per-CPU counts of waits that could not be measured or reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Lost {
    /// A wait whose start could not be stored (the task table full).
    pub no_task_entry: u64,
    /// Waits nested deeper than `MAX_DEPTH`.
    pub too_deep: u64,
    /// A wait on a lock past `LOCK_ENTRIES` distinct ones.
    pub no_lock_entry: u64,
    /// A wait counted on its lock but not by waiter or holder (past
    /// `WAITER_ENTRIES`).
    pub no_waiter_entry: u64,
    /// Waits over the threshold that did not fit in the ring buffer.
    pub events: u64,
}

/// One wait longer than `--slower`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LockEvent {
    /// CLOCK_MONOTONIC time the wait ended.
    pub ts_ns: u64,
    pub wait_ns: u64,
    pub lock: u64,
    pub flags: u32,
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// Valid entries of `stack`.
    pub stack_len: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
    pub stack: [u64; MAX_STACK],
}

/// Names of the load-time globals of the `lock_` programs.
pub mod globals {
    /// Only waits of this tgid, 0 for all.
    pub const TARGET_TGID: &str = "LOCK_TARGET_TGID";
    /// Only waits on this CPU, `u32::MAX` for all.
    pub const TARGET_CPU: &str = "LOCK_TARGET_CPU";
    /// Only tasks whose comm starts with these bytes (`[u8; 16]`)…
    pub const COMM_PREFIX: &str = "LOCK_COMM_PREFIX";
    /// …of which this many count; 0 for all.
    pub const COMM_PREFIX_LEN: &str = "LOCK_COMM_PREFIX_LEN";
    /// Waits at least this long go through the ring buffer; `u64::MAX` for none.
    pub const THRESHOLD_NS: &str = "LOCK_THRESHOLD_NS";
    /// Non-zero to send the waiter's kernel stack with each event.
    pub const STACKS: &str = "LOCK_STACKS";
    /// Locks given a histogram (at most `MAX_LOCK_SLOTS`).
    pub const LOCK_SLOTS: &str = "LOCK_SLOTS_N";
    /// Non-zero: count only waits inside calls of `--during`'s function that
    /// last at least `DURING_SLOWER_NS`.
    pub const DURING: &str = "LOCK_DURING";
    pub const DURING_SLOWER_NS: &str = "LOCK_DURING_SLOWER_NS";
    /// Offsets of the owner word in `struct mutex`, `struct rw_semaphore`
    /// and `struct rt_mutex_base` (`NO_FIELD` where the kernel has none),
    /// and of `task_struct.tgid` and `.comm`.
    pub const MUTEX_OWNER_OFF: &str = "LOCK_MUTEX_OWNER_OFF";
    pub const RWSEM_OWNER_OFF: &str = "LOCK_RWSEM_OWNER_OFF";
    pub const RT_MUTEX_OWNER_OFF: &str = "LOCK_RT_MUTEX_OWNER_OFF";
    pub const TASK_TGID_OFF: &str = "LOCK_TASK_TGID_OFF";
    pub const TASK_COMM_OFF: &str = "LOCK_TASK_COMM_OFF";

    pub const ALL: [&str; 14] = [
        TARGET_TGID,
        TARGET_CPU,
        COMM_PREFIX,
        COMM_PREFIX_LEN,
        THRESHOLD_NS,
        STACKS,
        LOCK_SLOTS,
        DURING,
        DURING_SLOWER_NS,
        MUTEX_OWNER_OFF,
        RWSEM_OWNER_OFF,
        RT_MUTEX_OWNER_OFF,
        TASK_TGID_OFF,
        TASK_COMM_OFF,
    ];
}

/// Names of the `lock_` maps.
pub mod maps {
    /// tid → `TaskWaits`.
    pub const TASKS: &str = "LOCK_TASKS";
    /// Lock address → per-CPU `LockStats`.
    pub const LOCKS: &str = "LOCK_LOCKS";
    /// Lock address → histogram slot (1..=N; 0 is "other").
    pub const SLOTS: &str = "LOCK_SLOT_OF";
    pub const NEXT_SLOT: &str = "LOCK_NEXT_SLOT";
    pub const STATS: &str = "LOCK_STATS";
    pub const BUCKETS: &str = "LOCK_BUCKETS";
    /// Waiters' kernel stacks.
    pub const STACKS: &str = "LOCK_STACK_MAP";
    pub const LOST: &str = "LOCK_LOST";
    pub const EVENTS: &str = "LOCK_EVENTS";
    /// tid → `Call` of `--during`'s function.
    pub const CALLS: &str = "LOCK_CALLS";
    pub const CALL_COUNTS: &str = "LOCK_CALL_COUNTS";
    /// `WaiterKey` → `WaiterStats`.
    pub const WAITERS: &str = "LOCK_WAITERS";
    /// `WaiterKey` of the holder (its `stack_id` 0) → `WaiterStats` of the
    /// waits it made others wait.
    pub const HOLDERS: &str = "LOCK_HOLDERS";
    /// One `Call` of zeroes, what a task's first call is made from.
    pub const CALL_ZERO: &str = "LOCK_CALL_ZERO";

    pub const ALL: [&str; 14] = [
        TASKS,
        LOCKS,
        SLOTS,
        NEXT_SLOT,
        STATS,
        BUCKETS,
        STACKS,
        LOST,
        EVENTS,
        CALLS,
        CALL_COUNTS,
        WAITERS,
        HOLDERS,
        CALL_ZERO,
    ];
}

/// The `lock_` programs, as (program, raw tracepoint).
pub mod programs {
    pub const ALL: [(&str, &str); 2] = [("lock_begin", "contention_begin"), ("lock_end", "contention_end")];
    /// `--during`'s function: entered and returned, as fentry/fexit or, where
    /// the kernel refuses those, kprobe/kretprobe.
    pub const DURING_FENTRY: [&str; 2] = ["lock_call_entry", "lock_call_exit"];
    pub const DURING_KPROBE: [&str; 2] = ["lock_call_kprobe", "lock_call_kretprobe"];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; any bit
    // pattern is valid.
    unsafe impl aya::Pod for LockStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lost {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LockEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CallCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for WaiterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for WaiterStats {}
}

const _: () = assert!(core::mem::size_of::<Waiting>() == 32);
const _: () = assert!(core::mem::size_of::<TaskWaits>() == 8 + 32 * MAX_DEPTH);
const _: () = assert!(core::mem::size_of::<LockStats>() == 8 * 3 + 4 * 2);
const _: () = assert!(core::mem::size_of::<WaiterKey>() == 16);
const _: () = assert!(core::mem::size_of::<WaiterStats>() == 16 + COMM_LEN);
const _: () = assert!(core::mem::size_of::<Lost>() == 40);
const _: () = assert!(core::mem::size_of::<LockEvent>() == 8 * 3 + 4 * 6 + COMM_LEN + 8 * MAX_STACK);
const _: () = assert!(core::mem::size_of::<HeldWait>() == 32);
const _: () = assert!(core::mem::size_of::<Call>() == 16 + 16 * MAX_FRAMES + 32 * MAX_CALL_WAITS);
const _: () = assert!(core::mem::size_of::<CallCounts>() == 32);
