//! Building blocks every command's kernel programs share: reading load-time
//! globals, per-CPU counters, indexing the verifier can follow, and adding a
//! value to an in-kernel HDR histogram.

use core::ptr::read_volatile;

use aya_ebpf::btf_maps::PerCpuArray;
use latprobe_common::{
    func::{BucketGroup, FuncStats, GROUP_COUNT_SLOTS},
    hdr,
};

/// A load-time global (`EbpfLoader::override_global`).
#[inline(always)]
pub fn global<T: Copy>(v: &T) -> T {
    // SAFETY: a plain read of a global the loader may have rewritten; volatile
    // so the compiler does not fold in the build-time default.
    unsafe { read_volatile(v) }
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

/// Adds `duration` to histogram `slot`: its running totals in `stats` and
/// one bucket of its `hdr::GROUPS` groups in `buckets`, keyed by
/// `slot * hdr::GROUPS + group`.
#[inline(always)]
pub fn record<const B: usize>(
    stats: &mut FuncStats,
    buckets: &PerCpuArray<BucketGroup, B>,
    slot: usize,
    duration: u64,
) {
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
        add(bucket, 1);
    }
    add(&mut stats.count, 1);
    add(&mut stats.sum_ns, duration);
    // SAFETY: masked to GROUP_COUNT_SLOTS.
    add(unsafe { stats.group_counts.get_unchecked_mut(masked(group, GROUP_COUNT_SLOTS)) }, 1);
    // Per-CPU values start zeroed, so 0 also means "no value yet".
    if stats.min_ns == 0 || duration < stats.min_ns {
        stats.min_ns = duration;
    }
    if duration > stats.max_ns {
        stats.max_ns = duration;
    }
}
