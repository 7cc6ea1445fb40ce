//! `latprobe runqslower` and `latprobe runqlat`: time from a task becoming
//! runnable to it getting a CPU.
//!
//! A wait begins at `sched_wakeup`/`sched_wakeup_new`, or at `sched_switch`
//! when the task switched out is still runnable (preempted); it ends when
//! `sched_switch` switches the task in. The start time lives in task-local
//! storage of the waiting task: no lock shared with other CPUs, freed with the
//! task. The end either goes into this CPU's HDR histogram (runqlat) or, when
//! over the threshold, through the ring buffer (runqslower): no event per
//! context switch leaves the kernel.
//!
//! Two program sets share that logic: tp_btf (`rq_wakeup`, `rq_switch`, …),
//! whose task arguments are BTF pointers the task-storage helper accepts, and
//! raw_tp (`rq_raw_*`), the fallback, whose arguments are plain integers.
//! Where wait starts live in the tid-keyed hash map instead (raw_tp, or
//! kernels whose task storage cannot be used in the scheduler), `rq_exit` /
//! `rq_raw_exit` remove an exiting task's record, which nothing else frees.
//! Rust eBPF has no CO-RE, so every `task_struct` field is read at an offset
//! userspace found in the running kernel's BTF and set as a load-time global.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_get_stack,
    },
    macros::{btf_map, btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
    EbpfContext,
};
use latprobe_common::{
    func::{BucketGroup, FuncStats, MAX_STACK},
    sched::{hist, Lost, RunqEvent, TaskStart},
    COMM_LEN,
};

use crate::helpers::{self, add, field, global, Writers};

// Load-time globals (see `latprobe_common::sched::globals`).
#[unsafe(no_mangle)]
static RQ_TARGET_TGID: u32 = 0;
#[unsafe(no_mangle)]
static RQ_TARGET_TID: u32 = 0;
#[unsafe(no_mangle)]
static RQ_TARGET_CPU: u32 = u32::MAX;
#[unsafe(no_mangle)]
static RQ_COMM_PREFIX: [u8; COMM_LEN] = [0; COMM_LEN];
#[unsafe(no_mangle)]
static RQ_COMM_PREFIX_LEN: u32 = 0;
#[unsafe(no_mangle)]
static RQ_THRESHOLD_NS: u64 = u64::MAX;
#[unsafe(no_mangle)]
static RQ_STACKS: u32 = 0;
#[unsafe(no_mangle)]
static RQ_HIST: u32 = hist::NONE;
#[unsafe(no_mangle)]
static RQ_PID_SLOTS_N: u32 = 0;
#[unsafe(no_mangle)]
static RQ_USE_HASH: u32 = 0;
#[unsafe(no_mangle)]
static RQ_TASK_PID_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_TASK_TGID_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_TASK_COMM_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_TASK_STATE_OFF: u32 = 0;

// Maps are declared at their smallest; runqlat and runqslower size the ones
// they use before load.

per_task_map!(
    /// Wakeup times, one per waiting task.
    RQ_START: TaskStart
);

/// Wakeup times keyed by tid, for the raw_tp fallback: its task pointers are
/// plain integers, which `bpf_task_storage_get` refuses. A preallocated hash
/// map takes a bucket lock per update, but needs no allocation under the
/// run-queue lock, and is bounded (`START_HASH_ENTRIES`).
#[btf_map]
static RQ_START_HASH: HashMap<u32, TaskStart, 1> = HashMap::new();

#[btf_map]
static RQ_LOST: PerCpuArray<Lost, 1> = PerCpuArray::new();

/// Running totals per histogram slot.
#[btf_map]
static RQ_STATS: PerCpuArray<FuncStats, 1> = PerCpuArray::new();

/// Keyed by `slot * hdr::GROUPS + group`, as `fn`'s BUCKETS.
#[btf_map]
static RQ_BUCKETS: PerCpuArray<BucketGroup, 1> = PerCpuArray::new();

/// tgid → histogram slot (1..=N) for `--per-pid`; slot 0 is "other".
#[btf_map]
static RQ_PID_SLOTS: HashMap<u32, u32, 1> = HashMap::new();

/// The last slot handed out.
#[btf_map]
static RQ_NEXT_SLOT: Array<u64, 1> = Array::new();

#[btf_map]
static RQ_EVENTS: RingBuf<RunqEvent, 4096> = RingBuf::new();

#[inline(always)]
fn lost() -> Option<&'static mut Lost> {
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    RQ_LOST.get_ptr_mut(0).and_then(|p| unsafe { p.as_mut() })
}

#[inline(always)]
fn uses_hash<const BTF: bool>() -> bool {
    !BTF || global(&RQ_USE_HASH) != 0
}

/// The wait record of `task` (thread `tid`, needed only for the hash map).
/// `BTF` is a compile-time constant so that raw_tp programs contain no call
/// of the task-storage helper, which their verifier would refuse.
#[inline(always)]
fn start_of<const BTF: bool>(task: *mut c_void, tid: u32, create: bool) -> Option<&'static mut TaskStart> {
    if !uses_hash::<BTF>() {
        // SAFETY: with BTF, `task` is a tp_btf task argument, trusted.
        return unsafe { RQ_START.get(task, create) };
    }
    if let Some(p) = RQ_START_HASH.get_ptr_mut(tid) {
        // SAFETY: a live value of our map, valid for this program run.
        return unsafe { p.as_mut() };
    }
    if !create {
        return None;
    }
    RQ_START_HASH.insert(tid, TaskStart::default(), BPF_NOEXIST as u64).ok()?;
    // SAFETY: as above.
    RQ_START_HASH.get_ptr_mut(tid).and_then(|p| unsafe { p.as_mut() })
}

#[inline(always)]
fn comm_matches(comm: &[u8; COMM_LEN]) -> bool {
    crate::comm::comm_has_prefix(comm, &global(&RQ_COMM_PREFIX), global(&RQ_COMM_PREFIX_LEN) as usize)
}

/// Starts the wait of `task`.
#[inline(always)]
fn begin_wait<const BTF: bool>(task: *mut c_void, tid: u32, tgid: u32, now: u64) {
    match start_of::<BTF>(task, tid, true) {
        Some(s) => {
            s.ts_ns = now;
            s.tgid = tgid;
        }
        None => {
            if let Some(l) = lost() {
                add(&mut l.no_start, 1);
            }
        }
    }
}

/// `task` was woken: its wait starts, if the filters want it. Fields are read
/// only when a filter or the store needs them.
#[inline(always)]
fn on_wakeup<const BTF: bool>(task: *mut c_void) {
    let want_tgid = global(&RQ_TARGET_TGID);
    let want_tid = global(&RQ_TARGET_TID);
    let tgid = if want_tgid != 0 || global(&RQ_HIST) == hist::PER_PID {
        field::<u32>(task, &RQ_TASK_TGID_OFF).unwrap_or(0)
    } else {
        0
    };
    if want_tgid != 0 && tgid != want_tgid {
        return;
    }
    let tid = if want_tid != 0 || uses_hash::<BTF>() { field::<u32>(task, &RQ_TASK_PID_OFF).unwrap_or(0) } else { 0 };
    if (want_tid != 0 && tid != want_tid) || (uses_hash::<BTF>() && tid == 0) {
        return;
    }
    if global(&RQ_COMM_PREFIX_LEN) != 0 {
        let comm = field::<[u8; COMM_LEN]>(task, &RQ_TASK_COMM_OFF).unwrap_or([0; COMM_LEN]);
        if !comm_matches(&comm) {
            return;
        }
    }
    // SAFETY: a helper without arguments.
    begin_wait::<BTF>(task, tid, tgid, unsafe { bpf_ktime_get_ns() });
}

/// The current task is exiting: drop its wait record from the hash map. A
/// record can outlive its wait when a wakeup found the task still running
/// (it had not yet switched out), so that no switch-in ever removed it;
/// task storage goes with the task, the hash map keeps it until full. The
/// lookup is lockless: only a record found takes the bucket lock.
#[inline(always)]
fn on_exit<const BTF: bool>() {
    if !uses_hash::<BTF>() {
        return;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid != 0 && RQ_START_HASH.get_ptr(tid).is_some() {
        let _ = RQ_START_HASH.remove(tid);
    }
}

/// The CPU switches from `prev` (the current task: the tracepoint fires
/// before the switch) to `next`.
#[inline(always)]
fn on_switch<const BTF: bool, C: EbpfContext>(ctx: &C, preempt: bool, prev: *mut c_void, next: *mut c_void) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (prev_tid, prev_tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    // Still runnable (TASK_RUNNING == 0, or preempted on its way to sleep):
    // it stays on the run queue, and its wait starts now. The idle task
    // (tid 0) never waits.
    if prev_tid != 0
        && (preempt || field::<u32>(prev, &RQ_TASK_STATE_OFF) == Some(0))
        && current_wanted(prev_tid, prev_tgid)
    {
        begin_wait::<BTF>(prev, prev_tid, prev_tgid, now);
    }
    end_wait::<BTF, C>(ctx, next, now);
}

#[inline(always)]
fn current_wanted(tid: u32, tgid: u32) -> bool {
    let want_tgid = global(&RQ_TARGET_TGID);
    let want_tid = global(&RQ_TARGET_TID);
    if (want_tgid != 0 && tgid != want_tgid) || (want_tid != 0 && tid != want_tid) {
        return false;
    }
    global(&RQ_COMM_PREFIX_LEN) == 0 || comm_matches(&bpf_get_current_comm().unwrap_or([0; COMM_LEN]))
}

/// `next` gets the CPU: its wait, if one was started, ends.
#[inline(always)]
fn end_wait<const BTF: bool, C: EbpfContext>(ctx: &C, next: *mut c_void, now: u64) {
    let hashed = uses_hash::<BTF>();
    let tid = if hashed { field::<u32>(next, &RQ_TASK_PID_OFF).unwrap_or(0) } else { 0 };
    if hashed && tid == 0 {
        return;
    }
    let Some(start) = start_of::<BTF>(next, tid, false) else { return };
    let (ts, tgid) = (start.ts_ns, start.tgid);
    if hashed {
        let _ = RQ_START_HASH.remove(tid);
    } else {
        start.ts_ns = 0;
    }
    if ts == 0 {
        return;
    }
    let delay = now.saturating_sub(ts);
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let want_cpu = global(&RQ_TARGET_CPU);
    if want_cpu != u32::MAX && cpu != want_cpu {
        return;
    }
    let slot = match global(&RQ_HIST) {
        hist::ONE => Some(0),
        hist::PER_PID => Some(pid_slot(tgid)),
        _ => None,
    };
    if let Some(slot) = slot {
        // SAFETY: per-CPU array slots are valid for the program's lifetime.
        if let Some(s) = RQ_STATS.get_ptr_mut(slot as u32).and_then(|p| unsafe { p.as_mut() }) {
            // Only `sched_switch` ends a wait, and the scheduler calls it
            // with interrupts off and the run-queue lock held: nothing
            // else on this CPU can be recording meanwhile, RT or not.
            helpers::record(Writers::One, s, &RQ_BUCKETS, slot, delay);
        }
    }
    if delay >= global(&RQ_THRESHOLD_NS) {
        report(ctx, next, now, delay, cpu, tgid);
    }
}

/// The histogram slot of process `tgid` (see `slots::key_slot`).
#[inline(always)]
fn pid_slot(tgid: u32) -> usize {
    crate::slots::key_slot(&RQ_PID_SLOTS, &RQ_NEXT_SLOT, global(&RQ_PID_SLOTS_N), tgid)
}

/// Sends one slow wait to userspace, with the culprit: the current task.
#[inline(always)]
fn report<C: EbpfContext>(ctx: &C, next: *mut c_void, now: u64, delay: u64, cpu: u32, tgid: u32) {
    let Some(mut entry) = RQ_EVENTS.reserve(0) else {
        if let Some(l) = lost() {
            add(&mut l.events, 1);
        }
        return;
    };
    let e = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `e` points to a reserved ring-buffer record of our size; every
    // field is written before submit.
    unsafe {
        (*e).ts_ns = now;
        (*e).delay_ns = delay;
        (*e).cpu = cpu;
        (*e).tid = field::<u32>(next, &RQ_TASK_PID_OFF).unwrap_or(0);
        (*e).tgid = field::<u32>(next, &RQ_TASK_TGID_OFF).unwrap_or(tgid);
        (*e).comm = field::<[u8; COMM_LEN]>(next, &RQ_TASK_COMM_OFF).unwrap_or([0; COMM_LEN]);
        (*e).prev_tid = pid_tgid as u32;
        (*e).prev_tgid = (pid_tgid >> 32) as u32;
        (*e).prev_comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        (*e).stack_len = 0;
        if global(&RQ_STACKS) != 0 {
            // The culprit's stack as it is switched out: what the task that
            // held the CPU was doing when it finally yielded. The waiting
            // task's own stack says only that it was woken.
            let size = (MAX_STACK * 8) as u32;
            let got = bpf_get_stack(ctx.as_ptr(), (*e).stack.as_mut_ptr().cast::<c_void>(), size, 0);
            if got > 0 {
                (*e).stack_len = (got / 8) as u32;
            }
        }
    }
    entry.submit(0);
}

// tp_btf: `sched_wakeup(struct task_struct *p)`, `sched_switch(bool preempt,
// struct task_struct *prev, struct task_struct *next, unsigned int prev_state)`,
// `sched_process_exit(struct task_struct *p, …)` with `p` the current task.

#[btf_tracepoint(function = "sched_wakeup")]
pub fn rq_wakeup(ctx: BtfTracePointContext) -> i32 {
    on_wakeup::<true>(ctx.arg(0));
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn rq_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    on_wakeup::<true>(ctx.arg(0));
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn rq_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    on_switch::<true, _>(&ctx, preempt & 0xff != 0, ctx.arg(1), ctx.arg(2));
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn rq_exit(_ctx: BtfTracePointContext) -> i32 {
    on_exit::<true>();
    0
}

// raw_tp: the same arguments, as integers.

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn rq_raw_wakeup(ctx: RawTracePointContext) -> i32 {
    on_wakeup::<false>(ctx.arg(0));
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn rq_raw_wakeup_new(ctx: RawTracePointContext) -> i32 {
    on_wakeup::<false>(ctx.arg(0));
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn rq_raw_switch(ctx: RawTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    on_switch::<false, _>(&ctx, preempt & 0xff != 0, ctx.arg(1), ctx.arg(2));
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn rq_raw_exit(_ctx: RawTracePointContext) -> i32 {
    on_exit::<false>();
    0
}
