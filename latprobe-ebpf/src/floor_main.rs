//! Empty programs, for `cargo xtask bench` only: the least a probe can cost
//! (the trampoline or tracepoint call and one `return 0`), measured on the
//! same attach points as latprobe's own programs so the benchmark can print
//! each command's cost as a ratio to this floor. And the least a latency
//! probe can cost: an fentry/fexit pair that reads the clock at both ends
//! and keeps the start per task, nothing else. The normal commands never
//! embed or load this object: only the `floor` example does.
#![no_std]
#![no_main]

use core::ptr::write_volatile;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};

mod runtime;
#[macro_use]
mod task_storage;

// The traced function is chosen at load time, like `fn`'s.

#[fentry]
pub fn floor_fentry(_ctx: FEntryContext) -> i32 {
    0
}

#[fexit]
pub fn floor_fexit(_ctx: FExitContext) -> i32 {
    0
}

// The timed pair: what any tool timing calls must do.

per_task_map!(FLOOR_START: u64);

/// Where the timed exit leaves each duration, so that it is computed.
static mut FLOOR_LAST_NS: u64 = 0;

#[fentry]
pub fn floor_timed_fentry(_ctx: FEntryContext) -> i32 {
    if let Some(start) = FLOOR_START.current(true) {
        // SAFETY: a helper without arguments.
        *start = unsafe { bpf_ktime_get_ns() };
    }
    0
}

#[fexit]
pub fn floor_timed_fexit(_ctx: FExitContext) -> i32 {
    if let Some(start) = FLOOR_START.current(false) {
        // SAFETY: as above; the global is this object's own.
        unsafe { write_volatile(&raw mut FLOOR_LAST_NS, bpf_ktime_get_ns() - *start) };
    }
    0
}

#[kprobe]
pub fn floor_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[kretprobe]
pub fn floor_kretprobe(_ctx: RetProbeContext) -> u32 {
    0
}

// The tracepoints runqlat and runqslower attach to (tp_btf, as they do on
// every kernel with BTF).

#[btf_tracepoint(function = "sched_wakeup")]
pub fn floor_wakeup(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn floor_wakeup_new(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn floor_switch(_ctx: BtfTracePointContext) -> i32 {
    0
}

// The timed scheduler programs: what any run-queue latency tool must do. A
// wakeup stores the clock in the woken task's storage; a switch stores it
// in the task leaving (runqlat checks that it is still runnable, which this
// skips) and reads the start of the task coming in.

#[inline(always)]
fn start_wait(task: *mut core::ffi::c_void, now: u64) {
    // SAFETY: a task argument of a tp_btf program is trusted.
    if let Some(start) = unsafe { FLOOR_START.get(task, true) } {
        *start = now;
    }
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn floor_timed_wakeup(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: a helper without arguments.
    start_wait(ctx.arg(0), unsafe { bpf_ktime_get_ns() });
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn floor_timed_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: as above.
    start_wait(ctx.arg(0), unsafe { bpf_ktime_get_ns() });
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn floor_timed_switch(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: as above.
    let now = unsafe { bpf_ktime_get_ns() };
    start_wait(ctx.arg(1), now);
    // SAFETY: as in `start_wait`.
    if let Some(start) = unsafe { FLOOR_START.get(ctx.arg(2), false) } {
        // SAFETY: the global is this object's own.
        unsafe { write_volatile(&raw mut FLOOR_LAST_NS, now - *start) };
    }
    0
}
