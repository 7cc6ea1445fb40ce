//! A one-line countdown on stderr for a long `--secs` run, when stderr is a
//! terminal that shows nothing else meanwhile (stdout goes elsewhere: a
//! file, a pipe, another terminal). It is redrawn in place each second and
//! erased before any other line on stderr, which goes through the same
//! writer, so the two never mix; nothing is written when stderr is not a
//! terminal.

use std::{
    os::fd::RawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// Runs shorter than this end before a countdown helps.
pub const LEAST_SECS: u64 = 5;

/// Erases the line in place: back to its start, clear to its end.
const ERASE: &str = "\r\x1b[K";

static SHOWN: AtomicBool = AtomicBool::new(false);

/// Whether a run of `secs` gets a countdown here.
pub fn wanted(secs: Option<u64>) -> bool {
    secs.is_some_and(|s| s >= LEAST_SECS) && is_tty(2) && !(is_tty(1) && same_file(1, 2))
}

/// Draws `left` of the run in place of the previous line.
pub fn show(left: Duration, of: Duration) {
    SHOWN.store(true, Ordering::Relaxed);
    super::stderr_raw(format!("{ERASE}latprobe: {}s of {}s left", left.as_secs(), of.as_secs()));
}

/// What a line about to be written on stderr starts with: the erasure of a
/// countdown drawn there, if any.
pub fn erase_prefix() -> &'static str {
    if SHOWN.swap(false, Ordering::Relaxed) {
        ERASE
    } else {
        ""
    }
}

/// Erases the countdown at the end of the run.
pub fn clear() {
    if SHOWN.swap(false, Ordering::Relaxed) {
        super::stderr_raw(ERASE.to_string());
    }
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Whether two descriptors are the same file (the same terminal).
fn same_file(a: RawFd, b: RawFd) -> bool {
    let stat = |fd: RawFd| {
        // SAFETY: fstat fills the struct it is given.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor number and out-pointer.
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino, st.st_rdev))
    };
    matches!((stat(a), stat(b)), (Some(x), Some(y)) if x == y)
}
