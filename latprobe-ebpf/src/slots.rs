//! Handing out histogram slots to keys (a process, a port, a lock), for the
//! objects whose commands keep a histogram per key.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, HashMap},
    macros::btf_map,
};

/// Which slots are taken, for kernels without `BPF_FETCH` atomics (before
/// 5.12): inserting a slot here is how a CPU claims it. Sized by userspace
/// (`latprobe_common::SLOT_OWNERS`) only where used.
#[btf_map]
static SLOT_OWNERS: HashMap<u32, u32, 1> = HashMap::new();

/// Slots one first sight of a key tries to claim before counting as
/// "other", without `BPF_FETCH`: each failure means another CPU claimed
/// that slot at the same moment.
const CLAIM_ATTEMPTS: u64 = 8;

/// The histogram slot of `key` (a process, a port): its own while fewer than
/// `limit` keys have one (slots 1..=limit, in `slots`), else 0 ("other").
/// `next` holds the last slot handed out. Only the first sight of each new
/// key touches shared state; a lookup after that is lockless.
#[inline(always)]
pub fn key_slot<K: Copy, const N: usize>(
    slots: &HashMap<K, u32, N>,
    next: &Array<u64, 1>,
    limit: u32,
    key: K,
) -> usize {
    if let Some(p) = slots.get_ptr(key) {
        // SAFETY: a live value of our map.
        return unsafe { *p } as usize;
    }
    let limit = u64::from(limit);
    let Some(next) = next.get_ptr_mut(0) else { return 0 };
    // SAFETY: `next` points to the array's only value.
    if unsafe { read_volatile(next) } >= limit {
        return 0;
    }
    let Some(mine) = claim(next, limit) else { return 0 };
    if slots.insert(key, mine as u32, u64::from(BPF_NOEXIST)).is_ok() {
        return mine as usize;
    }
    // Another CPU gave this key a slot first: use that one (ours stays
    // unused and userspace skips it).
    // SAFETY: a live value of our map.
    slots.get_ptr(key).map_or(0, |p| unsafe { *p } as usize)
}

/// A slot in 1..=`limit` no other key has, or `None` when all are taken.
#[inline(always)]
fn claim(next: *mut u64, limit: u64) -> Option<u64> {
    if crate::CMPXCHG {
        let mut mine = 1u64;
        // SAFETY: an atomic fetch-and-add on that aligned u64 (BPF_FETCH,
        // Linux 5.12+, as BPF_CMPXCHG: `crate::CMPXCHG` says both).
        unsafe {
            core::arch::asm!(
                "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
                v = inout(reg) mine,
                p = in(reg) next,
            );
        }
        mine += 1;
        return (mine <= limit).then_some(mine);
    }
    // Without BPF_FETCH, an insert that fails if the slot is in the map is
    // the atomic claim; `next` only says where to start looking.
    // SAFETY: `next` points to the array's only value.
    let first = unsafe { read_volatile(next) } + 1;
    for i in 0..CLAIM_ATTEMPTS {
        let mine = first + i;
        if mine > limit {
            return None;
        }
        if SLOT_OWNERS.insert(mine as u32, 1, u64::from(BPF_NOEXIST)).is_ok() {
            // SAFETY: as above; a stale value only costs a later claim one
            // more attempt.
            unsafe {
                if read_volatile(next) < mine {
                    *next = mine;
                }
            }
            return Some(mine);
        }
    }
    None
}
