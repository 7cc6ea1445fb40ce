//! Empty programs, for `cargo xtask bench` only: the least a probe can cost
//! (the trampoline or tracepoint call and one `return 0`), measured on the
//! same attach points as latprobe's own programs so the benchmark can print
//! each command's cost as a ratio to this floor. The normal commands never
//! embed or load this object: only the `floor` example does.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};

mod runtime;

// The traced function is chosen at load time, like `fn`'s.

#[fentry]
pub fn floor_fentry(_ctx: FEntryContext) -> i32 {
    0
}

#[fexit]
pub fn floor_fexit(_ctx: FExitContext) -> i32 {
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
