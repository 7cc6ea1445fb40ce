//! Everything latprobe says, in one place: results on stdout (records and
//! reports), messages on stderr (`say`, `verbose`, `warn`), files written
//! whole or not at all, and text from the kernel or from users' processes
//! made safe to print.
//!
//! Both streams are written by threads of their own (see `stream`): no write
//! can block a run, and no write error can panic it.

pub mod countdown;
pub mod files;
pub mod hdr_log;
mod stream;
pub mod text;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use stream::Stream;
pub use stream::Tally;

static STDOUT: OnceLock<Stream> = OnceLock::new();
static STDERR: OnceLock<Stream> = OnceLock::new();
static VERBOSE: AtomicBool = AtomicBool::new(false);
static CLOSED: Notify = Notify::const_new();
/// When tracing ended: the output's time to be written counts from here.
static ENDED: OnceLock<Instant> = OnceLock::new();

/// Output still queued after this long past the end of tracing is given up
/// (and said): with the final drain inside it, a run ends within a second.
const WIND_DOWN: Duration = Duration::from_millis(600);

/// Notes that tracing ended now.
pub fn mark_end() {
    let _ = ENDED.set(Instant::now());
}

/// Until when the output may be written: `WIND_DOWN` after the end of
/// tracing (from now when a run failed before it traced), and at least
/// `GRACE` from now.
pub fn deadline() -> Instant {
    let now = Instant::now();
    // Work done after the end (folding and rendering a flame graph) does
    // not eat the writer's time: it always gets a moment.
    (ENDED.get().copied().unwrap_or(now) + WIND_DOWN).max(now + GRACE)
}

/// The least time the writer gets once everything is queued.
const GRACE: Duration = Duration::from_millis(200);

fn stdout() -> &'static Stream {
    STDOUT.get_or_init(|| Stream::new(1, "stdout"))
}

fn stderr() -> &'static Stream {
    STDERR.get_or_init(|| Stream::new(2, "stderr"))
}

/// Turns on `-v` messages.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn is_verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// One line on stderr, prefixed `latprobe: `.
pub fn say(text: &str) {
    stderr().report(format!("{}latprobe: {text}\n", countdown::erase_prefix()));
}

/// Text on stderr as it is (the countdown's own).
fn stderr_raw(text: String) {
    stderr().report(text);
}

/// A `-v` line: which mechanism was tried and chosen, and why.
pub fn verbose(text: &str) {
    if is_verbose() {
        say(text);
    }
}

/// Something the user must know that does not stop the run.
pub fn warn(text: &str) {
    stderr().report(format!("{}latprobe: warning: {text}\n", countdown::erase_prefix()));
}

/// An error line, as the run ends.
pub fn error(text: &str) {
    stderr().report(format!("{}latprobe: error: {text}\n", countdown::erase_prefix()));
}

/// A result that may be dropped (and counted) when stdout cannot keep up:
/// one outlier, one slow wait.
pub fn record(make: impl FnOnce() -> String) {
    stdout().record_with(make);
}

/// A result that must reach stdout: a histogram, a summary, an SVG.
pub fn report(text: String) {
    stdout().report(text);
}

/// Ends the records of a run: waits for those queued until `deadline`,
/// drops the rest, and returns how many were never written. Call it before
/// the final report, which then goes out without waiting behind them.
pub fn settle_records(deadline: Instant) -> u64 {
    stdout().settle_records(deadline)
}

/// Whether the reader of stdout went away (`latprobe … | head`).
pub fn stdout_closed() -> bool {
    stdout().closed()
}

/// Resolves once stdout's reader goes away.
pub async fn stdout_closed_wait() {
    loop {
        let notified = CLOSED.notified();
        if stdout_closed() {
            return;
        }
        notified.await;
    }
}

fn wake_on_close() {
    CLOSED.notify_waiters();
}

/// How the output of a run ended.
#[derive(Debug, Default)]
pub struct Finished {
    /// stdout did not take everything by the deadline.
    pub stdout_stalled: bool,
    /// stdout failed (other than its reader going away).
    pub stdout_failure: Option<String>,
    /// stdout's reader went away: what was not written is not a loss.
    pub stdout_closed: bool,
    pub stdout: Tally,
}

/// Waits until both streams are written out, or `deadline`.
pub fn finish(deadline: Instant) -> Finished {
    let out = stdout();
    let stdout_stalled = !out.flush_until(deadline);
    // stderr gets whatever time is left; a stalled terminal is not an error.
    stderr().flush_until(deadline);
    Finished { stdout_stalled, stdout_failure: out.failure(), stdout_closed: out.closed(), stdout: out.tally() }
}
