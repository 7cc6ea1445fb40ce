//! `latprobe fn`: time calls of up to `MAX_FUNCS` functions.
//!
//! Entry pushes a start time on the task's own stack (task storage), exit pops
//! it and adds the duration to this CPU's histogram. Nothing is shared between
//! CPUs on the hot path; only calls slower than `--slower` leave the kernel,
//! one by one, through the ring buffer.
//!
//! Every attach mechanism (fentry/fexit, kprobe/kretprobe, uprobe/uretprobe,
//! the NET_RX softirq tracepoints) is a thin wrapper around [`enter`] and
//! [`exit`], stamped out once per slot so each program knows its slot as a
//! constant.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_get_stack,
    },
    macros::{btf_map, fentry, fexit, kprobe, kretprobe, raw_tracepoint, uprobe, uretprobe},
    programs::{FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext},
    EbpfContext,
};
use latprobe_common::func::{
    BucketGroup, FuncStats, Outlier, TaskFrames, IDLE_FRAMES_KEY, MAX_DEPTH, MAX_FUNCS, MAX_STACK, NET_RX_SOFTIRQ,
};

use crate::{
    flame,
    helpers::{self, add, global, masked, Writers},
};

// Load-time filters (see `latprobe_common::func::globals`).
#[unsafe(no_mangle)]
static FN_TARGET_TGID: u32 = 0;
#[unsafe(no_mangle)]
static FN_TARGET_CPU: u32 = u32::MAX;
#[unsafe(no_mangle)]
static FN_SLOWER_NS: u64 = u64::MAX;
#[unsafe(no_mangle)]
static FN_STACKS: u32 = 0;
#[unsafe(no_mangle)]
static FN_SOFTIRQ_SLOT: u32 = 0;
#[unsafe(no_mangle)]
static FN_USE_HASH: u32 = 0;

per_task_map!(FN_FRAMES: TaskFrames);

/// Start times by thread where creating task storage is not safe in every
/// context a traced function runs in (before Linux 6.4 it is a kmalloc,
/// perhaps under the run-queue lock; see `btf_offsets` in userspace).
/// Preallocated, so nothing allocates; bounded; `fn_task_exit` removes each
/// thread's entry. Sized by userspace when used.
#[btf_map]
static FN_FRAMES_HASH: HashMap<u32, TaskFrames, 1> = HashMap::new();

/// Zeroes: the first value of a `FN_FRAMES_HASH` entry, too big for the stack.
#[btf_map]
static FN_EMPTY_FRAMES: Array<TaskFrames, 1> = Array::new();

/// The current thread's frames, created empty when `create` is set.
#[inline(always)]
fn frames(create: bool) -> Option<&'static mut TaskFrames> {
    if global(&FN_USE_HASH) == 0 {
        return FN_FRAMES.current(create);
    }
    let key = frames_key();
    if let Some(p) = FN_FRAMES_HASH.get_ptr_mut(key) {
        // SAFETY: a live value of our map, valid for this program run.
        return unsafe { p.as_mut() };
    }
    if !create {
        return None;
    }
    FN_FRAMES_HASH.insert(key, FN_EMPTY_FRAMES.get(0)?, BPF_NOEXIST as u64).ok()?;
    // SAFETY: as above.
    FN_FRAMES_HASH.get_ptr_mut(key).and_then(|p| unsafe { p.as_mut() })
}

/// The current thread's `FN_FRAMES_HASH` key: its tid, or for an idle task
/// (tid 0 on every CPU) its CPU's own key.
#[inline(always)]
pub fn frames_key() -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid != 0 {
        return tid;
    }
    // SAFETY: a helper without arguments.
    IDLE_FRAMES_KEY | unsafe { bpf_get_smp_processor_id() }
}

#[btf_map]
static FN_STATS: PerCpuArray<FuncStats, MAX_FUNCS> = PerCpuArray::new();

/// Keyed by `slot * GROUPS_PER_FUNC + group`. Declared at its smallest (as
/// the ring buffer below) so other commands pay nothing; `fn` sizes both.
#[btf_map]
static FN_BUCKETS: PerCpuArray<BucketGroup, 1> = PerCpuArray::new();

#[btf_map]
static FN_OUTLIERS: RingBuf<Outlier, 4096> = RingBuf::new();

#[inline(always)]
fn stats(slot: usize) -> Option<&'static mut FuncStats> {
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    FN_STATS.get_ptr_mut(slot as u32).and_then(|p| unsafe { p.as_mut() })
}

#[inline(always)]
fn enter(slot: usize) {
    // The helper only when filtering: every call pays for this program.
    let want = global(&FN_TARGET_TGID);
    if want != 0 && (bpf_get_current_pid_tgid() >> 32) as u32 != want {
        return;
    }
    let slot = masked(slot, MAX_FUNCS);
    let Some(frames) = frames(true) else {
        if let Some(s) = stats(slot) {
            add(&mut s.missed, 1);
        }
        return;
    };
    // SAFETY: `slot` is masked to its power-of-two array length (as is the
    // depth index below).
    let (depth, stack) = unsafe { (frames.depth.get_unchecked_mut(slot), frames.frames.get_unchecked_mut(slot)) };
    let d = *depth as usize;
    if d < MAX_DEPTH {
        // SAFETY: masked to MAX_DEPTH.
        let frame = unsafe { stack.get_unchecked_mut(masked(d, MAX_DEPTH)) };
        // SAFETY: helpers without arguments.
        frame.cpu = unsafe { bpf_get_smp_processor_id() };
        // Read the clock last, to leave our own bookkeeping out of the call.
        // SAFETY: as above.
        frame.start_ns = unsafe { bpf_ktime_get_ns() };
    }
    *depth = (d + 1) as u32;
    if d == 0 {
        flame::call_started(slot);
    }
}

/// Who else can be recording into this CPU's histograms while an fexit or
/// kretprobe runs: nobody, where the kernel guards each program against
/// running twice on a CPU (kprobes always; fentry/fexit from 5.11, and the
/// objects with `BPF_CMPXCHG` are for 5.12+ only).
const RETURN_WRITERS: Writers = if crate::CMPXCHG { Writers::One } else { Writers::Many };

#[inline(always)]
fn exit<C: EbpfContext>(ctx: &C, slot: usize, writers: Writers) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let slot = masked(slot, MAX_FUNCS);
    // Calls that entered before we attached have no frame: skip them.
    let Some(frames) = frames(false) else {
        return;
    };
    // SAFETY: `slot` is masked to MAX_FUNCS.
    let (depth, stack) = unsafe { (frames.depth.get_unchecked_mut(slot), frames.frames.get_unchecked(slot)) };
    if *depth == 0 {
        return;
    }
    let d = *depth as usize - 1;
    *depth = d as u32;
    if d >= MAX_DEPTH {
        if let Some(s) = stats(slot) {
            add(&mut s.missed, 1);
        }
        return;
    }
    // SAFETY: masked to MAX_DEPTH.
    let frame = *unsafe { stack.get_unchecked(masked(d, MAX_DEPTH)) };
    let want_cpu = global(&FN_TARGET_CPU);
    if want_cpu != u32::MAX && frame.cpu != want_cpu {
        return;
    }
    let duration = now.saturating_sub(frame.start_ns);
    if d == 0 {
        flame::call_ended(slot, duration);
    }
    record(slot, duration, writers);
    if duration >= global(&FN_SLOWER_NS) {
        report_outlier(ctx, slot, now, duration, frame.cpu);
    }
}

#[inline(always)]
fn record(slot: usize, duration: u64, writers: Writers) {
    if let Some(s) = stats(slot) {
        helpers::record(writers, s, &FN_BUCKETS, slot, duration);
    }
}

#[inline(always)]
fn report_outlier<C: EbpfContext>(ctx: &C, slot: usize, now: u64, duration: u64, cpu: u32) {
    let Some(mut entry) = FN_OUTLIERS.reserve(0) else {
        if let Some(s) = stats(slot) {
            add(&mut s.outliers_lost, 1);
        }
        return;
    };
    let out = entry.as_mut_ptr();
    // SAFETY: `out` points to a reserved ring-buffer record of our size; every
    // field is written before submit.
    unsafe {
        let pid_tgid = bpf_get_current_pid_tgid();
        (*out).end_ns = now;
        (*out).duration_ns = duration;
        (*out).tgid = (pid_tgid >> 32) as u32;
        (*out).tid = pid_tgid as u32;
        (*out).cpu = cpu;
        (*out).slot = slot as u32;
        (*out).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*out)._pad = 0;
        (*out).stack_len = 0;
        if global(&FN_STACKS) != 0 {
            let size = (MAX_STACK * 8) as u32;
            let got = bpf_get_stack(ctx.as_ptr(), (*out).stack.as_mut_ptr().cast::<c_void>(), size, 0);
            if got > 0 {
                (*out).stack_len = (got / 8) as u32;
            }
        }
    }
    entry.submit(0);
}

/// Stamps out the programs of one slot for every attach mechanism.
macro_rules! slot_programs {
    ($slot:literal, $fentry:ident, $fexit:ident, $kprobe:ident, $kretprobe:ident, $uprobe:ident, $uretprobe:ident) => {
        #[fentry]
        pub fn $fentry(_ctx: FEntryContext) -> i32 {
            enter($slot);
            0
        }
        #[fexit]
        pub fn $fexit(ctx: FExitContext) -> i32 {
            exit(&ctx, $slot, RETURN_WRITERS);
            0
        }
        #[kprobe]
        pub fn $kprobe(_ctx: ProbeContext) -> u32 {
            enter($slot);
            0
        }
        #[kretprobe]
        pub fn $kretprobe(ctx: RetProbeContext) -> u32 {
            exit(&ctx, $slot, Writers::One);
            0
        }
        #[uprobe]
        pub fn $uprobe(_ctx: ProbeContext) -> u32 {
            enter($slot);
            0
        }
        #[uretprobe]
        pub fn $uretprobe(ctx: RetProbeContext) -> u32 {
            exit(&ctx, $slot, Writers::Many);
            0
        }
    };
}

slot_programs!(0, fn_fentry_0, fn_fexit_0, fn_kprobe_0, fn_kretprobe_0, fn_uprobe_0, fn_uretprobe_0);
slot_programs!(1, fn_fentry_1, fn_fexit_1, fn_kprobe_1, fn_kretprobe_1, fn_uprobe_1, fn_uretprobe_1);
slot_programs!(2, fn_fentry_2, fn_fexit_2, fn_kprobe_2, fn_kretprobe_2, fn_uprobe_2, fn_uretprobe_2);
slot_programs!(3, fn_fentry_3, fn_fexit_3, fn_kprobe_3, fn_kretprobe_3, fn_uprobe_3, fn_uretprobe_3);
slot_programs!(4, fn_fentry_4, fn_fexit_4, fn_kprobe_4, fn_kretprobe_4, fn_uprobe_4, fn_uretprobe_4);
slot_programs!(5, fn_fentry_5, fn_fexit_5, fn_kprobe_5, fn_kretprobe_5, fn_uprobe_5, fn_uretprobe_5);
slot_programs!(6, fn_fentry_6, fn_fexit_6, fn_kprobe_6, fn_kretprobe_6, fn_uprobe_6, fn_uretprobe_6);
slot_programs!(7, fn_fentry_7, fn_fexit_7, fn_kprobe_7, fn_kretprobe_7, fn_uprobe_7, fn_uretprobe_7);

#[inline(always)]
fn is_net_rx(ctx: &RawTracePointContext) -> bool {
    // softirq_entry/exit(unsigned int vec_nr)
    ctx.arg::<u32>(0) == NET_RX_SOFTIRQ
}

/// NET_RX softirq entry: on kernels without fentry or kprobes, these
/// tracepoints bracket exactly one `net_rx_action` call. Raw tracepoints,
/// because they need no tracefs mount and skip the record copy.
#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn fn_softirq_entry(ctx: RawTracePointContext) -> i32 {
    let slot = global(&FN_SOFTIRQ_SLOT) as usize;
    if slot < MAX_FUNCS && is_net_rx(&ctx) {
        enter(slot);
    }
    0
}

#[raw_tracepoint(tracepoint = "softirq_exit")]
pub fn fn_softirq_exit(ctx: RawTracePointContext) -> i32 {
    let slot = global(&FN_SOFTIRQ_SLOT) as usize;
    if slot < MAX_FUNCS && is_net_rx(&ctx) {
        // On PREEMPT_RT softirqs run in preemptible threads.
        exit(&ctx, slot, Writers::Many);
    }
    0
}

/// A thread exits: its frames go with it. Task storage is freed by the
/// kernel; a hash entry stays until removed, and a reused tid would inherit
/// it. The lookup is lockless: only an entry found takes the bucket lock.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn fn_task_exit(_ctx: RawTracePointContext) -> i32 {
    if global(&FN_USE_HASH) != 0 {
        let tid = bpf_get_current_pid_tgid() as u32;
        if tid != 0 && FN_FRAMES_HASH.get_ptr(tid).is_some() {
            let _ = FN_FRAMES_HASH.remove(tid);
        }
    }
    0
}
