//! `latprobe lock`: time from `lock:contention_begin` to `contention_end`,
//! per lock.
//!
//! Both tracepoints fire in the waiting task, only on a lock's slow path. The
//! begin pushes (lock, time, flags, stack) on the task's small stack of waits
//! in a preallocated tid-keyed hash (a sleeping lock's waiter can move to
//! another CPU, so per-CPU state would not do); the end pops it and adds the
//! wait to the lock's per-CPU totals (a per-CPU hash keyed by the lock's
//! address) and, for the first `LOCK_SLOTS_N` locks seen, to its HDR
//! histogram. A mutex reports a begin when it starts spinning and another
//! when it goes to sleep, then one end: a begin on the lock already on top
//! of the stack continues that wait. No lock of latprobe's own is taken but
//! the hash maps' bucket locks, and a program that would recurse through one
//! is skipped by the kernel (counted in its `missed`), never deadlocked.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::bpf_get_stack,
    },
    macros::{btf_map, fentry, fexit, kprobe, kretprobe, raw_tracepoint},
    programs::{
        tracing::StackIdContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext,
    },
    EbpfContext,
};
use latprobe_common::{
    func::{BucketGroup, FuncStats, MAX_STACK},
    lock::{
        flags, Call, CallCounts, Frame, HeldWait, LockEvent, LockStats, Lost, TaskWaits, WaiterKey, WaiterStats,
        Waiting, IDLE_KEY, MAX_CALL_WAITS, MAX_DEPTH, MAX_FRAMES, NO_FIELD, OWNER_FLAGS, RETURN_SLACK,
        RWSEM_READER_OWNED,
    },
    COMM_LEN,
};

use crate::helpers::{self, add, field, global, masked, Writers};

// Load-time globals (see `latprobe_common::lock::globals`).
#[unsafe(no_mangle)]
static LOCK_TARGET_TGID: u32 = 0;
#[unsafe(no_mangle)]
static LOCK_TARGET_CPU: u32 = u32::MAX;
#[unsafe(no_mangle)]
static LOCK_COMM_PREFIX: [u8; COMM_LEN] = [0; COMM_LEN];
#[unsafe(no_mangle)]
static LOCK_COMM_PREFIX_LEN: u32 = 0;
#[unsafe(no_mangle)]
static LOCK_THRESHOLD_NS: u64 = u64::MAX;
#[unsafe(no_mangle)]
static LOCK_STACKS: u32 = 0;
#[unsafe(no_mangle)]
static LOCK_SLOTS_N: u32 = 0;
#[unsafe(no_mangle)]
static LOCK_DURING: u32 = 0;
#[unsafe(no_mangle)]
static LOCK_DURING_SLOWER_NS: u64 = 0;
#[unsafe(no_mangle)]
static LOCK_MUTEX_OWNER_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static LOCK_RWSEM_OWNER_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static LOCK_RT_MUTEX_OWNER_OFF: u32 = NO_FIELD;
#[unsafe(no_mangle)]
static LOCK_TASK_TGID_OFF: u32 = 0;
#[unsafe(no_mangle)]
static LOCK_TASK_COMM_OFF: u32 = 0;

#[btf_map]
static LOCK_TASKS: HashMap<u32, TaskWaits, 1> = HashMap::new();

#[btf_map]
static LOCK_LOCKS: PerCpuHashMap<u64, LockStats, 1> = PerCpuHashMap::new();

#[btf_map]
static LOCK_SLOT_OF: HashMap<u64, u32, 1> = HashMap::new();

#[btf_map]
static LOCK_NEXT_SLOT: Array<u64, 1> = Array::new();

#[btf_map]
static LOCK_STATS: PerCpuArray<FuncStats, 1> = PerCpuArray::new();

#[btf_map]
static LOCK_BUCKETS: PerCpuArray<BucketGroup, 1> = PerCpuArray::new();

#[btf_map]
static LOCK_STACK_MAP: StackTrace<1> = StackTrace::new();

#[btf_map]
static LOCK_LOST: PerCpuArray<Lost, 1> = PerCpuArray::new();

#[btf_map]
static LOCK_EVENTS: RingBuf<LockEvent, 4096> = RingBuf::new();

/// `--during`: each task's call of the function in flight.
#[btf_map]
static LOCK_CALLS: HashMap<u32, Call, 1> = HashMap::new();

#[btf_map]
static LOCK_CALL_COUNTS: PerCpuArray<CallCounts, 1> = PerCpuArray::new();

/// A `Call` of zeroes, never written: what a task's first call is inserted
/// from (a `Call` is too big for the BPF stack).
#[btf_map]
static LOCK_CALL_ZERO: Array<Call, 1> = Array::new();

/// Who waited on each lock and from where: what names a lock and lists its
/// waiters and their stacks. One entry for all CPUs (its counts are added
/// atomically), as a per-CPU copy of every waiter would not fit 256 CPUs.
#[btf_map]
static LOCK_WAITERS: HashMap<WaiterKey, WaiterStats, 1> = HashMap::new();

/// The tasks that held each lock as others began to wait, and those waits.
#[btf_map]
static LOCK_HOLDERS: HashMap<WaiterKey, WaiterStats, 1> = HashMap::new();

#[inline(always)]
fn lost() -> Option<&'static mut Lost> {
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    LOCK_LOST.get_ptr_mut(0).and_then(|p| unsafe { p.as_mut() })
}

/// The current task's key in `LOCK_TASKS`: its tid, or, for the idle tasks
/// (all tid 0), its CPU.
#[inline(always)]
fn task_key(tid: u32, cpu: u32) -> u32 {
    if tid == 0 {
        IDLE_KEY | cpu
    } else {
        tid
    }
}

#[inline(always)]
fn wanted(tgid: u32, cpu: u32) -> bool {
    let want_tgid = global(&LOCK_TARGET_TGID);
    let want_cpu = global(&LOCK_TARGET_CPU);
    if (want_tgid != 0 && tgid != want_tgid) || (want_cpu != u32::MAX && cpu != want_cpu) {
        return false;
    }
    let len = global(&LOCK_COMM_PREFIX_LEN) as usize;
    len == 0
        || crate::comm::comm_has_prefix(
            &bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
            &global(&LOCK_COMM_PREFIX),
            len,
        )
}

// raw_tp `contention_begin(void *lock, unsigned int flags)`.
#[raw_tracepoint(tracepoint = "contention_begin")]
pub fn lock_begin(ctx: RawTracePointContext) -> i32 {
    let lock: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if !wanted((pid_tgid >> 32) as u32, cpu) {
        return 0;
    }
    let key = task_key(pid_tgid as u32, cpu);
    let waits = match LOCK_TASKS.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            if LOCK_TASKS.insert(key, TaskWaits::default(), u64::from(BPF_NOEXIST)).is_err() {
                if let Some(l) = lost() {
                    add(&mut l.no_task_entry, 1);
                }
                return 0;
            }
            let Some(p) = LOCK_TASKS.get_ptr_mut(key) else { return 0 };
            p
        }
    };
    // SAFETY: a live value of our map, only ever touched by this task (or an
    // interrupt on its CPU, which pushes and pops before it returns).
    let waits = unsafe { &mut *waits };
    let depth = waits.depth as usize;
    if depth > 0 {
        // SAFETY: masked into range.
        let top = unsafe { waits.waits.get_unchecked_mut(masked(depth - 1, MAX_DEPTH)) };
        if top.lock == lock {
            // A mutex going from spinning to sleeping: the same wait.
            top.flags = flags as u32;
            return 0;
        }
    }
    if depth >= MAX_DEPTH {
        waits.depth += 1;
        return 0;
    }
    let stack_id = match ctx.get_stackid(&LOCK_STACK_MAP, 0) {
        Ok(id) => id as i32,
        Err(e) => e,
    };
    // SAFETY: masked into range.
    let slot = unsafe { waits.waits.get_unchecked_mut(masked(depth, MAX_DEPTH)) };
    *slot = Waiting {
        lock,
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        flags: flags as u32,
        stack_id,
        holder: owner(lock, flags as u32),
    };
    waits.depth += 1;
    0
}

// raw_tp `contention_end(void *lock, int ret)`.
#[raw_tracepoint(tracepoint = "contention_end")]
pub fn lock_end(ctx: RawTracePointContext) -> i32 {
    let lock: u64 = ctx.arg(0);
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let key = task_key(pid_tgid as u32, cpu);
    // Lockless for the tasks that never waited (filtered out, or contended
    // before tracing began).
    let Some(waits) = LOCK_TASKS.get_ptr_mut(key) else { return 0 };
    // SAFETY: as in `lock_begin`.
    let waits = unsafe { &mut *waits };
    let depth = waits.depth as usize;
    if depth == 0 {
        return 0;
    }
    if depth > MAX_DEPTH {
        waits.depth -= 1;
        if let Some(l) = lost() {
            add(&mut l.too_deep, 1);
        }
        return 0;
    }
    // SAFETY: masked into range.
    let top = unsafe { *waits.waits.get_unchecked(masked(depth - 1, MAX_DEPTH)) };
    if top.lock != lock {
        // An end without its begin (tracing started mid-wait): not timed.
        return 0;
    }
    waits.depth -= 1;
    if waits.depth == 0 {
        // Freed when the task waits on nothing: the table holds only tasks
        // that are waiting, never every task that ever waited.
        let _ = LOCK_TASKS.remove(key);
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let wait = now.saturating_sub(top.ts_ns);
    let tgid = (pid_tgid >> 32) as u32;
    if global(&LOCK_DURING) != 0 {
        hold(key, &top, wait);
        return 0;
    }
    count(&top, wait, tgid);
    if wait >= global(&LOCK_THRESHOLD_NS) {
        report(&ctx, &top, now, wait, pid_tgid, cpu);
    }
    0
}

#[inline(always)]
fn call_counts() -> Option<&'static mut CallCounts> {
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    LOCK_CALL_COUNTS.get_ptr_mut(0).and_then(|p| unsafe { p.as_mut() })
}

/// `--during`: a wait that ended inside a call of the function is held by
/// the innermost call in flight until it ends; one outside every call is not
/// counted.
#[inline(always)]
fn hold(key: u32, w: &Waiting, wait: u64) {
    // SAFETY: a live value of our map, only touched by this task.
    let Some(call) = LOCK_CALLS.get_ptr_mut(key).map(|p| unsafe { &mut *p }) else { return };
    let depth = call.depth as usize;
    if depth == 0 {
        return;
    }
    let held = call.held as usize;
    if held >= MAX_CALL_WAITS {
        call.overflow += 1;
        return;
    }
    // SAFETY: masked into range.
    let slot = unsafe { call.waits.get_unchecked_mut(masked(held, MAX_CALL_WAITS)) };
    *slot = HeldWait {
        lock: w.lock,
        wait_ns: wait,
        holder: w.holder,
        flags: w.flags as u16,
        level: (depth - 1) as u16,
        stack_id: w.stack_id,
    };
    call.held += 1;
}

/// What becomes of the waits of the frames being closed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Calls whose return was never seen: their waits are dropped.
    Lost,
    /// A call that ended fast: its waits pass to the call it is nested in
    /// (counted if that one turns out slow), or are dropped.
    Fast,
    /// A call that ended slow: its waits are counted, for process `tgid`.
    Slow(u32),
}

/// Closes `call`'s frames from `level` on.
#[inline(always)]
fn close_frames(call: &mut Call, level: usize, how: Closing) {
    let held = call.held as usize;
    let mut kept = 0usize;
    let mut i = 0;
    while i < MAX_CALL_WAITS {
        if i < held {
            // SAFETY: masked into range.
            let mut h = unsafe { *call.waits.get_unchecked(masked(i, MAX_CALL_WAITS)) };
            let keep = if (h.level as usize) < level {
                true
            } else if let Closing::Slow(tgid) = how {
                let flags = u32::from(h.flags);
                let w = Waiting { lock: h.lock, ts_ns: 0, flags, stack_id: h.stack_id, holder: h.holder };
                count(&w, h.wait_ns, tgid);
                false
            } else if how == Closing::Fast && level > 0 {
                h.level = (level - 1) as u16;
                true
            } else {
                false
            };
            if keep {
                // SAFETY: masked into range; `kept` <= `i`.
                unsafe { *call.waits.get_unchecked_mut(masked(kept, MAX_CALL_WAITS)) = h };
                kept += 1;
            }
        }
        i += 1;
    }
    call.held = kept as u32;
    call.depth = level as u32;
}

/// How many of `call`'s innermost frames sit below `limit` on the stack
/// (lower addresses), from the innermost out.
#[inline(always)]
fn frames_below(call: &Call, limit: u64) -> usize {
    let depth = (call.depth as usize).min(MAX_FRAMES);
    let mut below = 0;
    let mut i = 0;
    while i < MAX_FRAMES {
        if below < depth {
            // SAFETY: masked into range.
            let f = unsafe { call.frames.get_unchecked(masked(depth - 1 - below, MAX_FRAMES)) };
            if f.stack_at < limit {
                below += 1;
            }
        }
        i += 1;
    }
    below
}

/// `--during`: the current task enters the function; `stack_at` is where
/// the probe's context sits on its kernel stack.
#[inline(always)]
fn call_entry(stack_at: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if !wanted((pid_tgid >> 32) as u32, cpu) {
        return;
    }
    let key = task_key(pid_tgid as u32, cpu);
    let untimed = || {
        if let Some(c) = call_counts() {
            add(&mut c.untimed, 1);
        }
    };
    if LOCK_CALLS.get_ptr_mut(key).is_none() {
        let Some(zero) = LOCK_CALL_ZERO.get(0) else { return untimed() };
        if LOCK_CALLS.insert(key, zero, u64::from(BPF_NOEXIST)).is_err() {
            return untimed();
        }
    }
    // SAFETY: a live value of our map, only touched by this task.
    let Some(call) = LOCK_CALLS.get_ptr_mut(key).map(|p| unsafe { &mut *p }) else { return untimed() };
    // A call in flight sits higher on the stack than one it calls: frames
    // at or below this one are calls whose return the kernel skipped (it
    // never re-enters a program on one CPU; on PREEMPT_RT a preempted run
    // blocks the next), which userspace reads in the exit's misses.
    let stale = frames_below(call, stack_at.saturating_add(1));
    let depth = call.depth as usize - stale.min(call.depth as usize);
    if stale > 0 {
        close_frames(call, depth, Closing::Lost);
    }
    if depth >= MAX_FRAMES {
        return untimed();
    }
    // SAFETY: a helper without arguments.
    let start_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: masked into range.
    unsafe { *call.frames.get_unchecked_mut(masked(depth, MAX_FRAMES)) = Frame { stack_at, start_ns } };
    call.depth = depth as u32 + 1;
}

/// `--during`: the current task returns from the function, its context at
/// `stack_at`, within `slack` of its entry's. The call is counted; when it
/// was slow, the waits it held are; when fast, they pass to the call it is
/// nested in.
#[inline(always)]
fn call_exit(stack_at: u64, slack: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let key = task_key(pid_tgid as u32, cpu);
    // SAFETY: a live value of our map, only touched by this task.
    let Some(call) = LOCK_CALLS.get_ptr_mut(key).map(|p| unsafe { &mut *p }) else { return };
    // Frames below this return's entry are calls it made whose return the
    // kernel skipped.
    let stale = frames_below(call, stack_at.saturating_sub(slack));
    let depth = call.depth as usize - stale.min(call.depth as usize);
    if stale > 0 {
        close_frames(call, depth, Closing::Lost);
    }
    if depth == 0 || depth > MAX_FRAMES {
        // Its entry was not seen (skipped, or before tracing began).
        return;
    }
    let level = depth - 1;
    // SAFETY: masked into range.
    let frame = unsafe { *call.frames.get_unchecked(masked(level, MAX_FRAMES)) };
    if frame.stack_at > stack_at.saturating_add(slack) {
        // The innermost call in flight is an outer one: this call's entry
        // was not seen.
        return;
    }
    // SAFETY: a helper without arguments.
    let took = unsafe { bpf_ktime_get_ns() }.saturating_sub(frame.start_ns);
    let slow = took >= global(&LOCK_DURING_SLOWER_NS);
    close_frames(call, level, if slow { Closing::Slow((pid_tgid >> 32) as u32) } else { Closing::Fast });
    let overflow = call.overflow;
    if slow || level == 0 {
        call.overflow = 0;
    }
    if level == 0 {
        // Freed when no call is in flight: the table holds only tasks
        // inside the function.
        let _ = LOCK_CALLS.remove(key);
    }
    if let Some(c) = call_counts() {
        add(&mut c.calls, 1);
        if slow {
            add(&mut c.slow_calls, 1);
            add(&mut c.waits_dropped, overflow);
        }
    }
}

// `--during`'s function, attached by name at load time.

// The context of fentry/fexit is an array of the arguments on the
// trampoline's stack frame, that of kprobes the saved registers on the
// probed task's kernel stack: either way its address says how deep the call is.

#[fentry]
pub fn lock_call_entry(ctx: FEntryContext) -> i32 {
    call_entry(ctx.as_ptr() as u64);
    0
}

#[fexit]
pub fn lock_call_exit(ctx: FExitContext) -> i32 {
    call_exit(ctx.as_ptr() as u64, 0);
    0
}

#[kprobe]
pub fn lock_call_kprobe(ctx: ProbeContext) -> i32 {
    call_entry(ctx.as_ptr() as u64);
    0
}

#[kretprobe]
pub fn lock_call_kretprobe(ctx: RetProbeContext) -> i32 {
    call_exit(ctx.as_ptr() as u64, RETURN_SLACK);
    0
}

/// Adds a wait to its lock's totals and histogram.
#[inline(always)]
fn count(w: &Waiting, wait: u64, tgid: u32) {
    let stats = match LOCK_LOCKS.get_ptr_mut(w.lock) {
        Some(p) => p,
        None => {
            let _ = LOCK_LOCKS.insert(w.lock, LockStats::default(), u64::from(BPF_NOEXIST));
            match LOCK_LOCKS.get_ptr_mut(w.lock) {
                Some(p) => p,
                None => {
                    if let Some(l) = lost() {
                        add(&mut l.no_lock_entry, 1);
                    }
                    return;
                }
            }
        }
    };
    // SAFETY: this CPU's value of a live entry of our per-CPU hash.
    let s = unsafe { &mut *stats };
    add(&mut s.count, 1);
    add(&mut s.total_ns, wait);
    if wait > s.max_ns {
        s.max_ns = wait;
    }
    s.flags = w.flags;
    let waiter = WaiterKey { lock: w.lock, stack_id: w.stack_id, tgid };
    count_in(&LOCK_WAITERS, waiter, wait, || bpf_get_current_comm().unwrap_or([0; COMM_LEN]));
    let holder = w.holder as *const core::ffi::c_void;
    if !holder.is_null() {
        if let Some(tgid) = field::<u32>(holder, &LOCK_TASK_TGID_OFF) {
            let comm = || field::<[u8; COMM_LEN]>(holder, &LOCK_TASK_COMM_OFF).unwrap_or([0; COMM_LEN]);
            count_in(&LOCK_HOLDERS, WaiterKey { lock: w.lock, stack_id: 0, tgid }, wait, comm);
        }
    }
    let slot = crate::slots::key_slot(&LOCK_SLOT_OF, &LOCK_NEXT_SLOT, global(&LOCK_SLOTS_N), w.lock);
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    if let Some(h) = LOCK_STATS.get_ptr_mut(slot as u32).and_then(|p| unsafe { p.as_mut() }) {
        helpers::record(Writers::Many, h, &LOCK_BUCKETS, slot, wait);
    }
}

/// The task that owns `lock`, a lock of kind `lock_flags`, where the kernel
/// records it: 0 for spinlocks, rwlocks, percpu-rwsems and readers.
#[inline(always)]
fn owner(lock: u64, lock_flags: u32) -> u64 {
    let off = if lock_flags & flags::RT != 0 {
        &LOCK_RT_MUTEX_OWNER_OFF
    } else if lock_flags & flags::MUTEX != 0 {
        &LOCK_MUTEX_OWNER_OFF
    } else if lock_flags & (flags::SPIN | flags::PERCPU) == 0 {
        &LOCK_RWSEM_OWNER_OFF
    } else {
        return 0;
    };
    if global(off) == NO_FIELD {
        return 0;
    }
    let word = field::<u64>(lock as *const core::ffi::c_void, off).unwrap_or(0);
    // An rwsem's owner word names a reader only as a hint.
    if core::ptr::eq(off, &LOCK_RWSEM_OWNER_OFF) && word & RWSEM_READER_OWNED != 0 {
        return 0;
    }
    word & !OWNER_FLAGS
}

/// Adds a wait to `key`'s totals in `table`, created named `comm()` if new.
#[inline(always)]
fn count_in(table: &HashMap<WaiterKey, WaiterStats, 1>, key: WaiterKey, wait: u64, comm: impl Fn() -> [u8; COMM_LEN]) {
    let stats = match table.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            let _ = table.insert(key, WaiterStats { count: 0, total_ns: 0, comm: comm() }, u64::from(BPF_NOEXIST));
            match table.get_ptr_mut(key) {
                Some(p) => p,
                None => {
                    if let Some(l) = lost() {
                        add(&mut l.no_waiter_entry, 1);
                    }
                    return;
                }
            }
        }
    };
    // SAFETY: a live value of our map; its counters are only added to
    // atomically.
    let s = unsafe { &mut *stats };
    add(&mut s.count, 1);
    add(&mut s.total_ns, wait);
}

/// Sends one slow wait to userspace.
#[inline(always)]
fn report<C: EbpfContext>(ctx: &C, w: &Waiting, now: u64, wait: u64, pid_tgid: u64, cpu: u32) {
    let Some(mut entry) = LOCK_EVENTS.reserve(0) else {
        if let Some(l) = lost() {
            add(&mut l.events, 1);
        }
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved ring-buffer record of our size; every
    // field is written before submit.
    unsafe {
        (*e).ts_ns = now;
        (*e).wait_ns = wait;
        (*e).lock = w.lock;
        (*e).flags = w.flags;
        (*e).tgid = (pid_tgid >> 32) as u32;
        (*e).tid = pid_tgid as u32;
        (*e).cpu = cpu;
        (*e)._pad = 0;
        (*e).comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
        (*e).stack_len = 0;
        if global(&LOCK_STACKS) != 0 {
            let size = (MAX_STACK * 8) as u32;
            let got = bpf_get_stack(ctx.as_ptr(), (*e).stack.as_mut_ptr().cast(), size, 0);
            if got > 0 {
                (*e).stack_len = (got / 8) as u32;
            }
        }
    }
    entry.submit(0);
}
