//! `latprobe flame`: count stacks in the kernel.
//!
//! On-CPU, a perf event fires on every CPU at the sampling frequency and adds
//! one to the count of (thread, kernel stack, user stack). Off-CPU, the
//! scheduler switch records, on the task leaving the CPU (task storage, no
//! shared lock), when it left and its stacks; when the task comes back, the
//! time it was away is added to that stack's count. Stack ids come from a
//! stack map; a capture that fails (a hash collision with another stack, a
//! full map) is counted in `FL_DROPS`, never silently folded in.
//!
//! Where task storage cannot be used, the starts go to a preallocated hash by
//! tid instead, which nothing frees when a thread exits: a thread's last
//! switch (to TASK_DEAD) stores nothing, and `fl_exit` removes what is left.
//! `--during`'s stacks held for a call in flight go to a second hash there,
//! each entry removed when its call ends (or its thread exits).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf, StackTrace},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_map, btf_tracepoint, perf_event},
    programs::{tracing::StackIdContext, BtfTracePointContext, PerfEventContext},
};
use latprobe_common::flame::{Drops, OffCpuStart, Pending, StackKey, MAX_PENDING};

use crate::helpers::{add, field, global, masked};

#[unsafe(no_mangle)]
static FL_TGID: u32 = 0;
#[unsafe(no_mangle)]
static FL_KERNEL: u32 = 1;
#[unsafe(no_mangle)]
static FL_USER: u32 = 0;
#[unsafe(no_mangle)]
static FL_MIN_BLOCK_NS: u64 = 0;
#[unsafe(no_mangle)]
static FL_DURING_SLOT: u32 = u32::MAX;
/// Non-zero where task storage must not allocate under the run-queue lock
/// (kernels before BPF's own allocator backed it) or does not exist (before
/// 5.11): off-CPU starts and `--during`'s held stacks then go to
/// preallocated hash maps keyed by tid.
#[unsafe(no_mangle)]
static FL_USE_HASH: u32 = 0;
/// Offset of `task_struct.pid`, from the running kernel's BTF.
#[unsafe(no_mangle)]
static FL_TASK_PID_OFF: u32 = 0;
/// Offset of `task_struct.__state` (`state` before 5.14), from BTF.
#[unsafe(no_mangle)]
static FL_TASK_STATE_OFF: u32 = 0;
#[unsafe(no_mangle)]
static FL_DURING_SLOWER_NS: u64 = 0;

// Maps are declared at their smallest, so that other commands loading this
// object pay nothing for them; `latprobe flame` sizes them before load.

/// Samples (on-CPU) or microseconds blocked (off-CPU) per key.
#[btf_map]
static FL_COUNTS: HashMap<StackKey, u64, 1> = HashMap::new();

#[btf_map]
static FL_STACKS: StackTrace<1> = StackTrace::new();

#[btf_map]
static FL_DROPS: PerCpuArray<Drops, 1> = PerCpuArray::new();

per_task_map!(FL_OFF_START: OffCpuStart);

per_task_map!(FL_PENDING: Pending);

/// Off-CPU starts by tid where `FL_USE_HASH` is set; sized before load.
#[btf_map]
static FL_OFF_HASH: HashMap<u32, OffCpuStart, 1> = HashMap::new();

/// `--during`'s held stacks by tid (`fn`'s key: the idle task's per CPU)
/// where `FL_USE_HASH` is set; sized before load.
#[btf_map]
static FL_PENDING_HASH: HashMap<u32, Pending, 1> = HashMap::new();

/// Zeroes: the first value of a `FL_PENDING_HASH` entry, too big for the stack.
#[btf_map]
static FL_EMPTY_PENDING: Array<Pending, 1> = Array::new();

/// Each key when first counted, with user stacks: userspace reads a new
/// process's mappings while it lives. One record per new key, not per sample.
#[btf_map]
static FL_NEW_KEYS: RingBuf<StackKey, 4096> = RingBuf::new();

/// Whether `--during` gates the counts.
#[inline(always)]
fn during() -> bool {
    global(&FL_DURING_SLOT) != u32::MAX
}

/// `fn` calls this when the outermost call of `slot` starts on this task.
#[inline(always)]
pub fn call_started(slot: usize) {
    if global(&FL_DURING_SLOT) as usize != slot {
        return;
    }
    if let Some(p) = pending(None, true) {
        p.active = 1;
        p.len = 0;
    }
}

/// The held stacks of `task` (the current task when `None`), created empty
/// when `create` is set: in task storage, or in the hash by tid.
#[inline(always)]
fn pending(task: Option<*mut c_void>, create: bool) -> Option<&'static mut Pending> {
    if global(&FL_USE_HASH) == 0 {
        return match task {
            None => FL_PENDING.current(create),
            // SAFETY: a task argument of a tp_btf program is trusted.
            Some(t) => unsafe { FL_PENDING.get(t, create) },
        };
    }
    let key = match task {
        None => crate::func::frames_key(),
        Some(t) => task_tid(t)?,
    };
    if let Some(p) = FL_PENDING_HASH.get_ptr_mut(key) {
        // SAFETY: a live value of our map, valid for this program run.
        return unsafe { p.as_mut() };
    }
    if !create {
        return None;
    }
    if FL_PENDING_HASH.insert(key, FL_EMPTY_PENDING.get(0)?, BPF_NOEXIST as u64).is_err() {
        // The table is full: this call's stacks go uncounted.
        if let Some(d) = drops() {
            add(&mut d.tasks_full, 1);
        }
        return None;
    }
    // SAFETY: as above.
    FL_PENDING_HASH.get_ptr_mut(key).and_then(|p| unsafe { p.as_mut() })
}

/// The tid of a task the tracepoint handed us (`FL_TASK_PID_OFF` is set
/// wherever the hash is used with tasks other than the current one).
#[inline(always)]
fn task_tid(task: *mut c_void) -> Option<u32> {
    field::<u32>(task, &FL_TASK_PID_OFF)
}

/// `fn` calls this when that call ends: its stacks count if it was slow.
#[inline(always)]
pub fn call_ended(slot: usize, duration: u64) {
    if global(&FL_DURING_SLOT) as usize != slot {
        return;
    }
    let Some(p) = pending(None, false) else { return };
    if p.active == 0 {
        return;
    }
    p.active = 0;
    let len = p.len as usize;
    p.len = 0;
    if duration >= global(&FL_DURING_SLOWER_NS) {
        for i in 0..MAX_PENDING {
            if i >= len {
                break;
            }
            // SAFETY: masked to MAX_PENDING.
            let e = *unsafe { p.entries.get_unchecked(masked(i, MAX_PENDING)) };
            count(&e.key, e.count);
        }
    }
    // The hash holds only threads with a call in flight.
    if global(&FL_USE_HASH) != 0 {
        let _ = FL_PENDING_HASH.remove(crate::func::frames_key());
    }
}

/// Counts `n` for `key` — or, with `--during`, holds it on `task` (the
/// current task when `None`) until its in-flight call ends.
#[inline(always)]
fn count_or_hold(key: &StackKey, n: u64, task: Option<*mut c_void>) {
    if !during() {
        count(key, n);
        return;
    }
    let Some(p) = pending(task, false) else { return };
    if p.active == 0 {
        return;
    }
    let len = p.len as usize;
    if len >= MAX_PENDING {
        if let Some(d) = drops() {
            add(&mut d.pending_full, 1);
        }
        return;
    }
    // SAFETY: masked to MAX_PENDING.
    let e = unsafe { p.entries.get_unchecked_mut(masked(len, MAX_PENDING)) };
    e.key = *key;
    e.count = n;
    p.len = (len + 1) as u32;
}

const EEXIST: i32 = 17;
/// No user stack to take (kernel threads): not a loss.
const EFAULT: i32 = 14;

#[inline(always)]
fn drops() -> Option<&'static mut Drops> {
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    FL_DROPS.get_ptr_mut(0).and_then(|p| unsafe { p.as_mut() })
}

/// A stack id, or the negative errno of a failed capture (counted).
#[inline(always)]
fn stack_id<C: StackIdContext>(ctx: &C, enabled: u32, flags: u64) -> i32 {
    if enabled == 0 {
        return -1;
    }
    match ctx.get_stackid(&FL_STACKS, flags) {
        Ok(id) => id as i32,
        Err(err) => {
            if let Some(d) = drops() {
                if err == -EEXIST {
                    add(&mut d.stack_collisions, 1);
                } else if err != -EFAULT {
                    add(&mut d.stack_errors, 1);
                }
            }
            err
        }
    }
}

/// The current thread and its stacks, if it passes the tgid filter.
#[inline(always)]
fn current_key<C: StackIdContext>(ctx: &C) -> Option<StackKey> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let want = global(&FL_TGID);
    if want != 0 && tgid != want {
        return None;
    }
    Some(StackKey {
        tgid,
        pid: pid_tgid as u32,
        kernel_stack: stack_id(ctx, global(&FL_KERNEL), 0),
        user_stack: stack_id(ctx, global(&FL_USER), BPF_F_USER_STACK as u64),
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    })
}

#[inline(always)]
fn count(key: &StackKey, n: u64) {
    if let Some(total) = FL_COUNTS.get_ptr_mut(key) {
        // SAFETY: a live value of our map, valid for this program run.
        add(unsafe { &mut *total }, n);
        return;
    }
    if FL_COUNTS.insert(key, n, BPF_NOEXIST as u64).is_err() {
        // Another CPU inserted the key meanwhile, or the map is full.
        if let Some(total) = FL_COUNTS.get_ptr_mut(key) {
            // SAFETY: as above.
            add(unsafe { &mut *total }, n);
        } else if let Some(d) = drops() {
            add(&mut d.keys_full, 1);
        }
        return;
    }
    if global(&FL_USER) != 0 && FL_NEW_KEYS.output(key, 0).is_err() {
        if let Some(d) = drops() {
            add(&mut d.notices_lost, 1);
        }
    }
}

/// On-CPU sample.
#[perf_event]
pub fn fl_sample(ctx: PerfEventContext) -> u32 {
    if let Some(d) = drops() {
        add(&mut d.events, 1);
    }
    if let Some(key) = current_key(&ctx) {
        count_or_hold(&key, 1, None);
    }
    0
}

/// The state of a task in its last switch (TASK_DEAD, 0x80 in every kernel
/// latprobe supports).
const TASK_DEAD: u32 = 0x80;

/// sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next):
/// `prev` is the current task, leaving; `next` is coming back. (The
/// `prev_state` argument came in Linux 5.18; `prev`'s own state field says
/// the same for TASK_DEAD on every kernel: a dying task's state stays
/// TASK_DEAD through its last switch.)
#[btf_tracepoint(function = "sched_switch")]
pub fn fl_switch(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(d) = drops() {
        add(&mut d.events, 1);
    }
    let prev: *mut c_void = ctx.arg(1);
    let next: *mut c_void = ctx.arg(2);
    let prev_state = field::<u32>(prev, &FL_TASK_STATE_OFF).unwrap_or(0);
    // No start for the idle task (tid 0, one per CPU: "blocked" would be the
    // time the CPU was busy, and the hash would mix all CPUs' under one key),
    // nor for a task's last switch: it never comes back, and in the hash its
    // entry would outlive it (`fl_exit` has already run).
    let leaving =
        if bpf_get_current_pid_tgid() as u32 != 0 && prev_state & TASK_DEAD == 0 { current_key(&ctx) } else { None };
    if global(&FL_USE_HASH) != 0 {
        switch_with_hash(leaving, next, now);
    } else {
        switch_with_task_storage(leaving, prev, next, now);
    }
    0
}

/// sched_process_exit(struct task_struct *p, …), `p` the current task: drops
/// its entries from the hashes, if any are left, before its tid can be reused.
/// Attached only where the hash is used. The lookup is lockless: only an
/// entry found takes the bucket lock.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn fl_exit(_ctx: BtfTracePointContext) -> i32 {
    if global(&FL_USE_HASH) == 0 {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid != 0 && FL_OFF_HASH.get_ptr(tid).is_some() {
        let _ = FL_OFF_HASH.remove(tid);
    }
    // A thread that exits inside a `--during` call.
    if tid != 0 && FL_PENDING_HASH.get_ptr(tid).is_some() {
        let _ = FL_PENDING_HASH.remove(tid);
    }
    0
}

#[inline(always)]
fn switch_with_task_storage(leaving: Option<StackKey>, prev: *mut c_void, next: *mut c_void, now: u64) {
    if let Some(key) = leaving {
        // SAFETY: a task argument of a tp_btf program is trusted.
        if let Some(start) = unsafe { FL_OFF_START.get(prev, true) } {
            start.start_ns = now;
            start.key = key;
        }
    }
    // SAFETY: as above.
    if let Some(start) = unsafe { FL_OFF_START.get(next, false) } {
        if start.start_ns != 0 {
            let blocked = now.saturating_sub(start.start_ns);
            start.start_ns = 0;
            blocked_for(&start.key, blocked, next);
        }
    }
}

#[inline(always)]
fn switch_with_hash(leaving: Option<StackKey>, next: *mut c_void, now: u64) {
    if let Some(key) = leaving {
        let start = OffCpuStart { start_ns: now, key };
        if FL_OFF_HASH.insert(key.pid, start, 0).is_err() {
            // The task table is full (or busy): this block goes uncounted.
            if let Some(d) = drops() {
                add(&mut d.tasks_full, 1);
            }
        }
    }
    let Some(tid) = task_tid(next) else { return };
    // The idle task never has an entry (see `fl_switch`).
    if tid == 0 {
        return;
    }
    // SAFETY: a live value of our map, valid for this program run.
    let Some(start) = FL_OFF_HASH.get_ptr(tid).map(|p| unsafe { *p }) else { return };
    let _ = FL_OFF_HASH.remove(tid);
    blocked_for(&start.key, now.saturating_sub(start.start_ns), next);
}

#[inline(always)]
fn blocked_for(key: &StackKey, blocked: u64, next: *mut c_void) {
    if blocked >= global(&FL_MIN_BLOCK_NS) {
        count_or_hold(key, blocked / 1000, Some(next));
    }
}
