//! The bucket layout of latprobe's in-kernel latency histograms.
//!
//! It is exactly the layout of an HDR histogram with 3 significant digits and a
//! lowest discernible value of 1 ns: values below 2048 get one bucket each, and
//! every power of two above gets 1024 equal buckets. Userspace can therefore
//! replay the kernel's counts into `hdrhistogram` without losing precision.
//!
//! Buckets are grouped 1024 at a time so that one per-CPU map value holds one
//! group (8 KiB, well under the kernel's 32 KiB per-CPU value limit) and
//! userspace reads only the groups that saw a value.

/// Buckets per group (and per power of two above 2048).
pub const GROUP_BUCKETS: usize = 1024;
/// log2(GROUP_BUCKETS).
pub const GROUP_SHIFT: u32 = 10;
/// Largest value tracked exactly: 2^36 ns is about 68.7 s. Longer calls land
/// in the last bucket; their exact duration still reaches `max`.
pub const MAX_TRACKED_NS: u64 = (1 << 36) - 1;
/// Groups per histogram: two for 0..2048, then one per power of two up to 2^36.
pub const GROUPS: usize = 2 + (36 - 11);
/// Buckets per histogram.
pub const BUCKETS: usize = GROUPS * GROUP_BUCKETS;

/// Index of the bucket that counts `value`, in `0..BUCKETS`.
#[inline(always)]
pub fn bucket_index(value: u64) -> usize {
    let v = if value > MAX_TRACKED_NS { MAX_TRACKED_NS } else { value };
    if v < 2 * GROUP_BUCKETS as u64 {
        return v as usize;
    }
    // v in [2^exp, 2^(exp+1)), exp >= 11: keep the 11 most significant bits.
    let exp = 63 - v.leading_zeros();
    let shift = exp - GROUP_SHIFT;
    let sub = (v >> shift) as usize - GROUP_BUCKETS;
    2 * GROUP_BUCKETS + (shift as usize - 1) * GROUP_BUCKETS + sub
}

/// The smallest value that lands in bucket `index` (the inverse of
/// [`bucket_index`] up to bucket width).
pub fn bucket_low(index: usize) -> u64 {
    if index < 2 * GROUP_BUCKETS {
        return index as u64;
    }
    let shift = (index - 2 * GROUP_BUCKETS) / GROUP_BUCKETS + 1;
    let sub = (index % GROUP_BUCKETS) as u64;
    (GROUP_BUCKETS as u64 + sub) << shift
}

/// The largest value that lands in bucket `index`.
pub fn bucket_high(index: usize) -> u64 {
    if index < 2 * GROUP_BUCKETS {
        return index as u64;
    }
    let shift = (index - 2 * GROUP_BUCKETS) / GROUP_BUCKETS + 1;
    bucket_low(index) + (1u64 << shift) - 1
}
