//! The bucket layout of latprobe's in-kernel latency histograms.
//!
//! It is exactly the layout of an HDR histogram with 2 significant digits and a
//! lowest discernible value of 1 ns: values below 256 get one bucket each, and
//! every power of two above gets 128 equal buckets, so a bucket is never wider
//! than 1/128 (0.8%) of the values in it. Userspace can therefore replay the
//! kernel's counts into `hdrhistogram` without losing precision.
//!
//! Why two digits, not three: a histogram is per CPU, and with three digits
//! it took 216 KiB per CPU (55 MiB per traced function on 256 CPUs). Two
//! take 30 KiB per CPU (1.9 MiB per function per 64 CPUs), and every
//! percentile stays within 1% of the exact value.
//!
//! Buckets are grouped 128 at a time so that one per-CPU map value holds one
//! group (1 KiB) and userspace reads only the groups that saw a value.

/// HDR's significant digits for this layout.
pub const SIGNIFICANT_DIGITS: u8 = 2;
/// Buckets per group (and per power of two above 256).
pub const GROUP_BUCKETS: usize = 128;
/// log2(GROUP_BUCKETS).
pub const GROUP_SHIFT: u32 = 7;
/// Largest value tracked exactly: 2^36 ns is about 68.7 s. Longer calls land
/// in the last bucket; their exact duration still reaches `max`.
pub const MAX_TRACKED_NS: u64 = (1 << 36) - 1;
/// Groups per histogram: two for 0..256, then one per power of two up to 2^36.
pub const GROUPS: usize = 2 + (36 - (GROUP_SHIFT as usize + 1));
/// Buckets per histogram.
pub const BUCKETS: usize = GROUPS * GROUP_BUCKETS;
/// Bytes of one histogram on one CPU.
pub const HISTOGRAM_BYTES: usize = BUCKETS * 8;

/// Index of the bucket that counts `value`, in `0..BUCKETS`.
#[inline(always)]
pub fn bucket_index(value: u64) -> usize {
    let v = if value > MAX_TRACKED_NS { MAX_TRACKED_NS } else { value };
    if v < 2 * GROUP_BUCKETS as u64 {
        return v as usize;
    }
    // v in [2^exp, 2^(exp+1)), exp >= 8: keep the 8 most significant bits.
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
