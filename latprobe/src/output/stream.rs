//! stdout and stderr, each written by a thread of its own, so that a reader
//! that stalls (a paused terminal, a pipe nobody drains, a dropped SSH
//! session) never blocks a run: tracing goes on, the run ends on time, and
//! what could not be written is counted and said.
//!
//! Records (one outlier, one wait) are dropped when the queue is full and
//! counted; reports (histograms, summaries) are kept up to a hard cap. A
//! closed stdout (`latprobe … | head`) ends the run quietly; a failing
//! stderr (EIO once the terminal is gone) is ignored rather than allowed to
//! panic the run before its files are written.

use std::{
    fs::File,
    io::{self, Write},
    mem::ManuallyDrop,
    os::fd::FromRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, Receiver, Sender},
        Arc, LazyLock, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

/// Queued bytes beyond which records are dropped: small enough for a
/// starved writer to get through by the end of a run.
const RECORD_QUEUE_BYTES: usize = 1 << 20;
/// Queued bytes beyond which even reports are dropped (a stdout stalled for
/// hours under `--interval` must not grow without bound).
const REPORT_QUEUE_BYTES: usize = 64 << 20;

/// A writer blocked this long in one write is stalled. A writer that is
/// merely not scheduled (a busy or emulated machine) is not: it is waited
/// for until the deadline.
const STALL_TIME: Duration = Duration::from_millis(100);

/// Nanoseconds since the first call: a clock two threads can share
/// through an atomic.
fn since_epoch_ns() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

enum Message {
    Text {
        text: Vec<u8>,
        record: bool,
    },
    /// Acknowledged once everything queued before it is written.
    Flush(mpsc::SyncSender<()>),
}

/// What a stream's writer thread has seen.
#[derive(Default)]
struct State {
    queued: AtomicUsize,
    dropped_records: AtomicU64,
    dropped_reports: AtomicU64,
    /// Records queued and not yet written or dropped.
    pending_records: AtomicU64,
    /// Drop queued records instead of writing them: the run is ending and
    /// its final report must not wait behind them.
    discard_records: AtomicBool,
    /// Messages the writer has finished with (written or dropped): its
    /// progress, whatever gets queued meanwhile.
    done: AtomicUsize,
    /// `done` + 1 when a wait last found the writer stuck (0: never).
    stuck_at: AtomicUsize,
    /// When the write under way began, as `since_epoch_ns` + 1 (0: none).
    writing_since: AtomicU64,
    /// The reader went away (EPIPE).
    closed: AtomicBool,
    /// A write failed otherwise (EIO, ENOSPC, …).
    failed: Mutex<Option<io::Error>>,
}

/// One output stream and the thread that writes it.
pub struct Stream {
    /// `Sender` is `Sync`: every thread queues through it without a lock.
    sender: Sender<Message>,
    state: Arc<State>,
}

/// How a stream ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub dropped_records: u64,
    pub dropped_reports: u64,
}

impl Stream {
    /// A stream writing to file descriptor `fd` (1 or 2), which it never closes.
    pub fn new(fd: i32, name: &'static str) -> Self {
        let (sender, receiver) = mpsc::channel();
        let state = Arc::new(State::default());
        let writer_state = Arc::clone(&state);
        // If the thread cannot start, messages queue up unwritten and the
        // run still ends on time: nothing here may fail a run.
        let _ = thread::Builder::new()
            .name(format!("latprobe-{name}"))
            .spawn(move || write_loop(fd, &receiver, &writer_state));
        Self { sender, state }
    }

    fn queue(&self, text: Vec<u8>, record: bool) -> bool {
        let limit = if record { RECORD_QUEUE_BYTES } else { REPORT_QUEUE_BYTES };
        let state = &self.state;
        if state.closed.load(Ordering::Relaxed)
            || (record && state.discard_records.load(Ordering::Relaxed))
            || state.queued.load(Ordering::Relaxed) + text.len() > limit
        {
            return false;
        }
        state.queued.fetch_add(text.len(), Ordering::Relaxed);
        if record {
            state.pending_records.fetch_add(1, Ordering::Relaxed);
        }
        self.sender.send(Message::Text { text, record }).is_ok()
    }

    /// Queues the record `make` writes, unless the reader is slower than
    /// the events: then it is counted as dropped without being made, so a
    /// stalled stdout costs no formatting.
    pub fn record_with(&self, make: impl FnOnce() -> String) {
        let state = &self.state;
        let full = state.closed.load(Ordering::Relaxed)
            || state.discard_records.load(Ordering::Relaxed)
            || state.queued.load(Ordering::Relaxed) >= RECORD_QUEUE_BYTES;
        if full || !self.queue(make().into_bytes(), true) {
            state.dropped_records.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a report: kept unless the queue is past its hard cap.
    pub fn report(&self, text: String) {
        if !self.queue(text.into_bytes(), false) {
            self.state.dropped_reports.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the records: waits until those queued are written, or
    /// `deadline`, then drops any left. Returns how many records were not
    /// written, now and earlier; none will be from now on.
    pub fn settle_records(&self, deadline: Instant) -> u64 {
        self.flush_until(deadline);
        self.state.discard_records.store(true, Ordering::Relaxed);
        self.state.dropped_records.load(Ordering::Relaxed) + self.state.pending_records.load(Ordering::Relaxed)
    }

    pub fn closed(&self) -> bool {
        self.state.closed.load(Ordering::Relaxed)
    }

    /// The error that stopped the writer, other than a closed reader.
    pub fn failure(&self) -> Option<String> {
        let failed = self.state.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.as_ref().map(ToString::to_string)
    }

    /// Waits until everything queued is written, or `deadline`. Returns
    /// false when the reader did not take it all in time.
    pub fn flush_until(&self, deadline: Instant) -> bool {
        let (ack, acked) = mpsc::sync_channel(1);
        if self.sender.send(Message::Flush(ack)).is_err() {
            return self.state.queued.load(Ordering::Relaxed) == 0;
        }
        let done = self.state.done.load(Ordering::Relaxed);
        // Stuck at the last wait and not one message finished since (more
        // may have been queued): waiting again only delays the end.
        if self.state.queued.load(Ordering::Relaxed) != 0 && self.state.stuck_at.load(Ordering::Relaxed) == done + 1 {
            return false;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if acked.recv_timeout(left.min(STALL_TIME)).is_ok() {
                return true;
            }
            // Late but nothing left unwritten (the writer was not scheduled
            // in time to answer): not a stall.
            if self.state.queued.load(Ordering::Relaxed) == 0 {
                return true;
            }
            if self.blocked_in_write() || Instant::now() >= deadline {
                self.state.stuck_at.store(self.state.done.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                return false;
            }
        }
    }

    /// Whether the writer has been inside one write for `STALL_TIME`: its
    /// reader is not reading, and waiting longer only delays the end.
    fn blocked_in_write(&self) -> bool {
        let since = self.state.writing_since.load(Ordering::Relaxed);
        since != 0 && since_epoch_ns().saturating_sub(since - 1) >= STALL_TIME.as_nanos() as u64
    }

    pub fn tally(&self) -> Tally {
        Tally {
            dropped_records: self.state.dropped_records.load(Ordering::Relaxed),
            dropped_reports: self.state.dropped_reports.load(Ordering::Relaxed),
        }
    }
}

fn write_loop(fd: i32, receiver: &Receiver<Message>, state: &State) {
    // SAFETY: fd 1 or 2 stays open for the life of the process; ManuallyDrop
    // keeps this File from closing it.
    let mut out = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    let mut broken = false;
    while let Ok(message) = receiver.recv() {
        match message {
            Message::Text { text, record } => {
                let len = text.len();
                let discard = record && state.discard_records.load(Ordering::Relaxed);
                if !broken && !discard {
                    state.writing_since.store(since_epoch_ns() + 1, Ordering::Relaxed);
                    let written = out.write_all(&text);
                    state.writing_since.store(0, Ordering::Relaxed);
                    if let Err(e) = written {
                        broken = true;
                        if e.kind() == io::ErrorKind::BrokenPipe {
                            state.closed.store(true, Ordering::Relaxed);
                            super::wake_on_close();
                        } else {
                            *state.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        }
                    }
                }
                state.queued.fetch_sub(len, Ordering::Relaxed);
                state.done.fetch_add(1, Ordering::Relaxed);
                if record {
                    // Written or not, it is no longer pending: a record not
                    // written is counted as dropped.
                    if broken || discard {
                        state.dropped_records.fetch_add(1, Ordering::Relaxed);
                    }
                    state.pending_records.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Message::Flush(ack) => {
                let _ = ack.try_send(());
            }
        }
    }
}
