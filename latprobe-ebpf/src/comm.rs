//! `--comm PREFIX`: matching a task's name in the kernel (for the objects
//! whose commands take it).

use latprobe_common::COMM_LEN;

/// Whether `comm` starts with the first `len` bytes of `prefix` (`--comm`).
/// A loop over the whole name, so the verifier sees a fixed bound.
#[inline(always)]
pub fn comm_has_prefix(comm: &[u8; COMM_LEN], prefix: &[u8; COMM_LEN], len: usize) -> bool {
    let mut i = 0;
    while i < COMM_LEN {
        if i < len && comm[i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}
