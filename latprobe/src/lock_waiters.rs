//! Who waited on each lock: the kernel keeps totals per (lock, waiter's
//! stack, process); this groups them by lock, then by process or by stack,
//! biggest total wait first. A lock is named after the caller its waiters
//! waited from longest, not after whichever waiter came last.

use std::collections::HashMap;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use latprobe_common::lock::{WaiterKey, WaiterStats};

use crate::output::text;

/// The waits of one process on one lock from one stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub stack_id: i32,
    pub tgid: u32,
    pub comm: String,
    pub count: u64,
    pub total_ns: u64,
}

/// The waits of one process on a lock, or of one stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share<K> {
    pub key: K,
    pub count: u64,
    pub total_ns: u64,
}

/// Every lock's waiters, read from the kernel at one report.
#[derive(Default)]
pub struct Waiters {
    by_lock: HashMap<u64, Vec<Waiter>>,
}

impl Waiters {
    /// Reads the whole table (bounded by its `WAITER_ENTRIES`).
    pub fn read(map: &BpfHashMap<MapData, WaiterKey, WaiterStats>) -> Result<Self> {
        let mut waiters = Self::default();
        for entry in map.iter() {
            let (key, stats) = entry.context("reading LOCK_WAITERS")?;
            waiters.add(key, &stats);
        }
        Ok(waiters)
    }

    fn add(&mut self, key: WaiterKey, stats: &WaiterStats) {
        if stats.count == 0 {
            return;
        }
        self.by_lock.entry(key.lock).or_default().push(Waiter {
            stack_id: key.stack_id,
            tgid: key.tgid,
            comm: text::comm(&stats.comm),
            count: stats.count,
            total_ns: stats.total_ns,
        });
    }

    pub fn of(&self, lock: u64) -> &[Waiter] {
        self.by_lock.get(&lock).map_or(&[], Vec::as_slice)
    }
}

/// `waiters` grouped by `key`, biggest total wait first (ties: the smaller
/// key first, so reports are stable).
fn group<K: Clone + Ord + std::hash::Hash>(waiters: &[Waiter], key: impl Fn(&Waiter) -> K) -> Vec<Share<K>> {
    let mut groups: HashMap<K, (u64, u64)> = HashMap::new();
    for w in waiters {
        let g = groups.entry(key(w)).or_default();
        g.0 += w.count;
        g.1 += w.total_ns;
    }
    let mut shares: Vec<Share<K>> =
        groups.into_iter().map(|(key, (count, total_ns))| Share { key, count, total_ns }).collect();
    shares.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then_with(|| a.key.cmp(&b.key)));
    shares
}

/// Per process (tgid, and the name of its first waiting thread).
pub fn processes(waiters: &[Waiter]) -> Vec<Share<(u32, String)>> {
    let names: HashMap<u32, &str> = waiters.iter().map(|w| (w.tgid, w.comm.as_str())).collect();
    group(waiters, |w| w.tgid)
        .into_iter()
        .map(|s| Share {
            key: (s.key, names.get(&s.key).copied().unwrap_or_default().to_string()),
            count: s.count,
            total_ns: s.total_ns,
        })
        .collect()
}

/// Per kernel stack (negative ids, stacks not taken, count as one).
pub fn stacks(waiters: &[Waiter]) -> Vec<Share<i32>> {
    group(waiters, |w| w.stack_id.max(-1))
}

/// The caller the waiters waited from longest, given each stack's caller.
pub fn main_caller(waiters: &[Waiter], caller_of: impl Fn(i32) -> Option<String>) -> Option<String> {
    let callers: Vec<Waiter> = stacks(waiters)
        .into_iter()
        .filter_map(|s| {
            let comm = caller_of(s.key)?;
            Some(Waiter { stack_id: 0, tgid: 0, comm, count: s.count, total_ns: s.total_ns })
        })
        .collect();
    group(&callers, |w| w.comm.clone()).into_iter().next().map(|s| s.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(stack_id: i32, tgid: u32, count: u64, total_ns: u64) -> Waiter {
        Waiter { stack_id, tgid, comm: format!("p{tgid}"), count, total_ns }
    }

    #[test]
    fn processes_and_stacks_add_up_biggest_first() {
        let w = [waiter(1, 10, 2, 100), waiter(2, 10, 1, 50), waiter(1, 20, 5, 400), waiter(-14, 30, 1, 1)];
        let p = processes(&w);
        assert_eq!(p[0], Share { key: (20, "p20".to_string()), count: 5, total_ns: 400 });
        assert_eq!(p[1], Share { key: (10, "p10".to_string()), count: 3, total_ns: 150 });
        assert_eq!(p.len(), 3);
        let s = stacks(&w);
        assert_eq!(s[0], Share { key: 1, count: 7, total_ns: 500 });
        assert_eq!(s[1], Share { key: 2, count: 1, total_ns: 50 });
        assert_eq!(s[2], Share { key: -1, count: 1, total_ns: 1 });
    }

    #[test]
    fn a_lock_is_named_after_the_caller_waited_from_longest() {
        // Stacks 1 and 2 share a caller, which outweighs stack 3's alone,
        // though stack 3 is the single biggest; stack 4 has no caller.
        let w = [waiter(1, 10, 1, 30), waiter(2, 10, 1, 30), waiter(3, 10, 1, 50), waiter(4, 10, 9, 900)];
        let caller = |id: i32| match id {
            1 | 2 => Some("vm_mmap_pgoff".to_string()),
            3 => Some("__vm_munmap".to_string()),
            _ => None,
        };
        assert_eq!(main_caller(&w, caller).as_deref(), Some("vm_mmap_pgoff"));
        assert_eq!(main_caller(&[], caller), None);
    }
}
