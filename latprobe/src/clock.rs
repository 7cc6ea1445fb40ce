//! Kernel timestamps (CLOCK_MONOTONIC, as `bpf_ktime_get_ns` returns them)
//! turned into wall-clock time users can line up with their logs.

/// Maps monotonic nanoseconds to Unix-epoch nanoseconds.
#[derive(Clone, Copy)]
pub struct WallClock {
    offset_ns: i128,
}

fn now(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl WallClock {
    pub fn new() -> Self {
        Self { offset_ns: now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC) }
    }

    /// RFC 3339 UTC time with microseconds.
    pub fn format(&self, monotonic_ns: u64) -> String {
        format_unix_ns((monotonic_ns as i128 + self.offset_ns).max(0) as u64)
    }
}

/// RFC 3339 UTC, e.g. `2026-11-22T11:34:23.123456Z`.
pub fn format_unix_ns(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_unix_ns(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_unix_ns(1_795_347_263_123_456_789), "2026-11-22T11:34:23.123456Z");
        assert_eq!(format_unix_ns(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
    }
}
