//! Names in the benchmark's floor object (`latprobe-floor`): empty programs
//! on the attach points latprobe's commands use, the least a probe there
//! can cost. Only `cargo xtask bench` loads it, through latprobe's `floor`
//! example.

/// Program names.
pub mod programs {
    /// Empty fentry and fexit on a function chosen at load time (`fn`'s default).
    pub const FENTRY: &str = "floor_fentry";
    pub const FEXIT: &str = "floor_fexit";
    /// The least a latency probe can do on that function: fentry stores the
    /// clock in task storage, fexit reads the clock and subtracts.
    pub const TIMED_FENTRY: &str = "floor_timed_fentry";
    pub const TIMED_FEXIT: &str = "floor_timed_fexit";
    /// Empty kprobe and kretprobe (`fn --attach kprobe`).
    pub const KPROBE: &str = "floor_kprobe";
    pub const KRETPROBE: &str = "floor_kretprobe";
    /// Empty tp_btf programs on the tracepoints runqlat and runqslower use:
    /// (program, tracepoint).
    pub const SCHED: [(&str, &str); 3] =
        [("floor_wakeup", "sched_wakeup"), ("floor_wakeup_new", "sched_wakeup_new"), ("floor_switch", "sched_switch")];
    /// The same tracepoints, with programs that only time run-queue waits:
    /// a clock read and a store in task storage per wakeup, a clock read, a
    /// store and a lookup per switch.
    pub const TIMED_SCHED: [(&str, &str); 3] = [
        ("floor_timed_wakeup", "sched_wakeup"),
        ("floor_timed_wakeup_new", "sched_wakeup_new"),
        ("floor_timed_switch", "sched_switch"),
    ];
    pub const ALL: [&str; 12] = [
        FENTRY,
        FEXIT,
        TIMED_FENTRY,
        TIMED_FEXIT,
        KPROBE,
        KRETPROBE,
        SCHED[0].0,
        SCHED[1].0,
        SCHED[2].0,
        TIMED_SCHED[0].0,
        TIMED_SCHED[1].0,
        TIMED_SCHED[2].0,
    ];
}
