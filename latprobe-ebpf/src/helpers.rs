//! Building blocks every command's kernel programs share: reading load-time
//! globals and kernel fields at their offsets, per-CPU counters, indexing the verifier can follow, and adding a
//! value to an in-kernel HDR histogram.

use core::ptr::read_volatile;

use aya_ebpf::btf_maps::PerCpuArray;
use latprobe_common::{
    func::{BucketGroup, FuncStats, GROUP_COUNT_SLOTS},
    hdr,
};

/// A field of a kernel object at the offset in load-time global `off`
/// (Rust eBPF has no CO-RE: userspace found the offset in the kernel's BTF).
#[inline(always)]
pub fn field<T>(object: *const core::ffi::c_void, off: &u32) -> Option<T> {
    let at = object.cast::<u8>().wrapping_add(global(off) as usize);
    // SAFETY: the helper reads kernel memory and fails cleanly on a bad
    // address; `object` is a kernel pointer a probe handed us.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(at.cast::<T>()).ok() }
}

/// A load-time global (`EbpfLoader::override_global`).
#[inline(always)]
pub fn global<T: Copy>(v: &T) -> T {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile
    // so the compiler does not fold in the build-time default.
    unsafe { read_volatile(v) }
}

/// Who can write a program's per-CPU values at the same time, which says
/// whether its updates must be atomic.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Only the run in progress: the kernel never starts a second run of
    /// the program on a CPU while one is there (fentry/fexit's per-program
    /// guard, 5.11+; kprobes' per-CPU `bpf_prog_active`; a second run is
    /// skipped and counted as missed). Plain loads and stores suffice.
    One,
    /// A run can be preempted by another run of the same program on its
    /// CPU: uprobes (migration disabled, preemption not), and on
    /// PREEMPT_RT nearly everything.
    #[allow(dead_code, reason = "the scheduler commands' object records from sched_switch only")]
    Many,
}

/// `*counter += n`, atomic unless `writers` says no other run can
/// interleave (an uncontended atomic still costs a locked instruction
/// natively, and a helper call under emulation).
#[inline(always)]
pub fn bump(writers: Writers, counter: &mut u64, n: u64) {
    match writers {
        Writers::One => *counter += n,
        Writers::Many => add(counter, n),
    }
}

#[inline(always)]
pub fn add(counter: &mut u64, n: u64) {
    // Atomic even though the slot is per CPU: on PREEMPT_RT a program can be
    // preempted by another run of itself on the same CPU. Uncontended, so it
    // costs about as much as a plain add.
    // SAFETY: `counter` is a valid, aligned u64 in a map value. The BPF
    // target lacks 64-bit atomics in `core`, so emit BPF_ATOMIC|BPF_ADD
    // (the old BPF_XADD, supported by every kernel) directly.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) += {n}",
            ptr = in(reg) core::ptr::from_mut(counter),
            n = in(reg) n,
        );
    }
}

/// Bounds an index so that older verifiers (6.1, 6.12) can follow it.
/// LLVM drops a plain `& (len - 1)` after a range check and may index with a
/// register other than the one it checked; those verifiers then lose the
/// bound. The AND is emitted in assembly so it survives, right before use.
/// `len` must be a power of two.
#[inline(always)]
pub fn masked(index: usize, len: usize) -> usize {
    let mut i = index;
    // SAFETY: a register-only AND; no memory is touched.
    unsafe {
        core::arch::asm!("{i} &= {m}", i = inout(reg) i, m = in(reg) len - 1, options(pure, nomem, nostack));
    }
    i
}

/// Attempts at a compare-and-exchange before giving up on a min/max update.
/// Only a run of the same program that preempted this one on this CPU
/// (PREEMPT_RT) can interleave, so a second attempt nearly always succeeds;
/// the bound is for the verifier.
const CAS_ATTEMPTS: usize = 4;

/// Stores `new` in `*slot` if it still holds `expected`; returns what it held.
/// Atomic where the object's kernels have `BPF_CMPXCHG` (`crate::CMPXCHG`,
/// a constant, so the other branch is not in the object at all: a 5.10
/// verifier refuses an object holding the instruction even where it cannot
/// run). Without it, a plain compare and store: there, only a PREEMPT_RT
/// kernel can preempt a program by another run of itself, and a lost race
/// loses one min/max update.
#[inline(always)]
fn cmpxchg(slot: &mut u64, expected: u64, new: u64) -> u64 {
    if !crate::CMPXCHG {
        // SAFETY: `slot` is a valid, aligned u64 in a map value.
        let old = unsafe { read_volatile(slot) };
        if old == expected {
            *slot = new;
        }
        return old;
    }
    let mut old = expected;
    // SAFETY: `slot` is a valid, aligned u64 in a map value. BPF_ATOMIC |
    // BPF_CMPXCHG (Linux 5.12+; 5.10 lacks it and its verifier rejects the
    // program): r0 holds the expected value and receives the one found.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({ptr} + 0, r0, {new})",
            ptr = in(reg) core::ptr::from_mut(slot),
            new = in(reg) new,
            inout("r0") old,
        );
    }
    old
}

/// Stores `value` in `*slot` unless `keeps(seen, value)` says the value
/// there already wins, atomically against a run of the same program
/// preempting this one (PREEMPT_RT). A bounded number of attempts: the
/// verifier needs the bound, and losing races that often needs several
/// preemptions on one CPU within one update.
#[inline(always)]
fn store_unless(writers: Writers, slot: &mut u64, value: u64, keeps: impl Fn(u64, u64) -> bool) {
    // SAFETY: a plain read of a valid, aligned u64; the exchange below
    // checks it.
    let mut seen = unsafe { read_volatile(slot) };
    if writers == Writers::One {
        if !keeps(seen, value) {
            *slot = value;
        }
        return;
    }
    for _ in 0..CAS_ATTEMPTS {
        if keeps(seen, value) {
            return;
        }
        let found = cmpxchg(slot, seen, value);
        if found == seen {
            return;
        }
        seen = found;
    }
}

/// Adds `duration` to histogram `slot`: its running totals in `stats` and
/// one bucket of its `hdr::GROUPS` groups in `buckets`, keyed by
/// `slot * hdr::GROUPS + group`.
#[inline(always)]
pub fn record<const B: usize>(
    writers: Writers,
    stats: &mut FuncStats,
    buckets: &PerCpuArray<BucketGroup, B>,
    slot: usize,
    duration: u64,
) {
    // Min and max first: userspace reads the stats after the buckets, so a
    // value it finds in a bucket is already within them, and the reported
    // max (which clamps the top percentiles) cannot miss the outlier.
    // Per-CPU values start zeroed, so 0 also means "no value yet".
    store_unless(writers, &mut stats.min_ns, duration, |seen, v| seen != 0 && seen <= v);
    store_unless(writers, &mut stats.max_ns, duration, |seen, v| seen >= v);
    let index = hdr::bucket_index(duration);
    let group = index / hdr::GROUP_BUCKETS;
    let key = (slot * hdr::GROUPS + group) as u32;
    let sub = masked(index, hdr::GROUP_BUCKETS);
    if let Some(bucket) = buckets
        .get_ptr_mut(key)
        // SAFETY: per-CPU array slots are valid for the program's lifetime.
        .and_then(|p| unsafe { p.as_mut() })
        // SAFETY: `sub` is masked to GROUP_BUCKETS.
        .map(|g| unsafe { g.counts.get_unchecked_mut(sub) })
    {
        bump(writers, bucket, 1);
    }
    bump(writers, &mut stats.count, 1);
    bump(writers, &mut stats.sum_ns, duration);
    // SAFETY: masked to GROUP_COUNT_SLOTS.
    bump(writers, unsafe { stats.group_counts.get_unchecked_mut(masked(group, GROUP_COUNT_SLOTS)) }, 1);
}
