//! One run of any command, in named phases. Every command goes through the
//! same lifecycle, so they agree on when the clock starts, how a run ends and
//! what the user is told:
//!
//! 1. **prepare** ([`Run::prepare`]) — before anything is loaded: listen for
//!    signals, check `--cpu`/`--pid`/`--tid` and privileges, start
//!    `-- COMMAND` held at its gate. Output files are opened here too, by the
//!    commands that write them.
//! 2. **load and attach** — the command's own: set its globals and map sizes,
//!    load its programs, attach them.
//! 3. **activate** ([`Run::activate`]) — start the clock, then release the
//!    command, so a command that hogs the CPU cannot delay the start.
//! 4. **trace** ([`Run::next`]) — interval reports, periodic polls, the
//!    budget's judgement (`--max-overhead`) and ring buffer records, a
//!    bounded batch at a time, until the run ends: `--secs`, a signal, the
//!    traced process or command exits, stdout's reader goes, or latprobe's
//!    own programs went over budget with nothing left to shed.
//! 5. **end** ([`Run::end`]) — stop the command if it still runs, say why the
//!    run ended; the command detaches, drains what is left within
//!    [`Run::drain_deadline`] and prints its final report; `main` gives the
//!    output a bounded time to be written.

pub mod child;
mod ring;
mod signals;

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{unix::AsyncFd, Interest},
    time::{interval_at, sleep_until, Interval, MissedTickBehavior},
};

pub use ring::{Ring, BATCH};

use crate::{
    bpf,
    cli::RunArgs,
    cost::SelfCost,
    output::{self, countdown},
};
use child::GatedChild;
use signals::Signals;

/// How long records left in a ring buffer may be printed after the end.
const DRAIN_TIME: Duration = Duration::from_millis(250);
/// The least time a drain gets, however late it starts.
const LEAST_DRAIN: Duration = Duration::from_millis(50);
/// How long after that the records queued for stdout may take to be
/// written, before they are dropped for the final report.
pub const SETTLE_TIME: Duration = Duration::from_millis(250);

/// When latprobe started: [`Run::activate`] says (with -v) how long it took
/// from here to having every probe attached.
static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Notes latprobe's start; called first thing in `main`.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

/// Why a run ended.
#[derive(Debug)]
pub enum End {
    Deadline,
    Signal(&'static str),
    CommandExited(ExitStatus),
    ProcessExited(u32),
    StdoutClosed,
    /// Over `--max-overhead`: every probe was detached (already said).
    OverBudget,
}

/// What [`Run::next`] woke up for.
pub enum Step {
    Ended(End),
    /// `--interval` elapsed: print an interval report.
    Interval,
    /// The command's periodic poll (see [`Run::poll_every`]).
    Poll,
    /// Time to judge latprobe's own cost against its budget (see
    /// [`Run::judge_budget_every`]).
    Budget,
    /// The ring buffer has records: drain a batch.
    Records,
}

/// Becomes readable when a process exits (`pidfd_open`, Linux 5.3+).
struct PidFd(OwnedFd);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn pidfd(pid: u32) -> Option<AsyncFd<PidFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd; we own it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: the pidfd is owned by the PidFd inside the AsyncFd; they drop together.
    unsafe { AsyncFd::register_with_interest(PidFd(owned), Interest::READABLE) }.ok()
}

/// One run: its end conditions, its clock and the command it traces.
pub struct Run {
    signals: Signals,
    secs: Option<u64>,
    deadline: Option<Instant>,
    child: Option<GatedChild>,
    /// `--pid`: the run ends when that process does.
    watched: Option<(u32, AsyncFd<PidFd>)>,
    interval: Option<Interval>,
    poll: Option<Interval>,
    budget: Option<Interval>,
    /// Once a second, the countdown on stderr (see `output::countdown`).
    countdown: Option<Interval>,
    started: Instant,
    ended: Option<Instant>,
}

impl Run {
    /// Phase 1. `cpu` and `tid` are the command's own filters, if it has them.
    pub fn prepare(args: &RunArgs, cpu: Option<u32>, tid: Option<u32>) -> Result<Self> {
        let signals = Signals::listen()?;
        check_targets(cpu, args.pid, tid)?;
        bpf::preflight()?;
        let watched = match args.pid {
            Some(pid) => pidfd(pid).map(|fd| (pid, fd)),
            None => None,
        };
        let child = if args.command.is_empty() { None } else { Some(GatedChild::spawn(&args.command)?) };
        Ok(Self {
            signals,
            secs: args.secs,
            deadline: None,
            child,
            watched,
            interval: None,
            poll: None,
            budget: None,
            countdown: None,
            started: Instant::now(),
            ended: None,
        })
    }

    /// The process traced: `--pid`, the command's, or 0 for all.
    pub fn tgid(&self) -> u32 {
        self.watched.as_ref().map(|(pid, _)| *pid).or(self.child.as_ref().map(|c| c.pid)).unwrap_or(0)
    }

    /// Wake with [`Step::Interval`] every `ns` once active.
    pub fn report_every(&mut self, ns: Option<u64>) {
        self.interval = ns.map(|ns| ticker(Duration::from_nanos(ns.max(1_000_000))));
    }

    /// Wake with [`Step::Poll`] every `period` once active.
    pub fn poll_every(&mut self, period: Duration) {
        self.poll = Some(ticker(period));
    }

    /// Wake with [`Step::Budget`] every `period` once active (`None`: the
    /// run has no budget, or cannot measure its cost).
    pub fn judge_budget_every(&mut self, period: Option<Duration>) {
        self.budget = period.map(ticker);
    }

    /// At [`Step::Budget`], for a command whose probes are all one unit:
    /// the end of the run when `cost` went over budget (`cost` said why).
    pub fn over_budget(&self, cost: Option<&mut SelfCost>, ebpf: &aya::Ebpf) -> Option<End> {
        cost?.over_budget_whole(ebpf, "every probe", self.elapsed()).map(|_| End::OverBudget)
    }

    /// Phase 3: probes are attached.
    pub fn activate(&mut self) -> Result<()> {
        release_freed_memory();
        self.started = Instant::now();
        if let Some(start) = PROCESS_START.get() {
            let ms = (self.started - *start).as_secs_f64() * 1e3;
            output::verbose(&format!("attached {ms:.1}ms after start"));
        }
        self.deadline = self.secs.map(|s| self.started + Duration::from_secs(s));
        for t in [&mut self.interval, &mut self.poll, &mut self.budget].into_iter().flatten() {
            t.reset();
        }
        // A command's own output goes to stderr: no countdown over it.
        if self.child.is_none() && countdown::wanted(self.secs) {
            self.countdown = Some(interval_at(tokio::time::Instant::now(), Duration::from_secs(1)));
        }
        if let Some(c) = self.child.as_mut() {
            c.release()?;
        }
        Ok(())
    }

    /// Time traced: from activation to the end (or now).
    pub fn elapsed(&self) -> Duration {
        self.ended.unwrap_or_else(Instant::now) - self.started
    }

    /// Phase 4: the next thing to do. Ending comes first, so no flood of
    /// records can hold off a deadline or a signal.
    pub async fn next<T>(&mut self, mut ring: Option<&mut Ring<T>>) -> Result<Step> {
        loop {
            match self.next_or_countdown(ring.as_deref_mut()).await? {
                Some(step) => return Ok(step),
                None => self.draw_countdown(),
            }
        }
    }

    /// The next step, or None when it is time to redraw the countdown.
    async fn next_or_countdown<T>(&mut self, ring: Option<&mut Ring<T>>) -> Result<Option<Step>> {
        // The clock is read here too: under a flood the timer driver may be
        // the last thing the runtime gets to.
        if self.deadline.is_some_and(|at| Instant::now() >= at) {
            return Ok(Some(Step::Ended(End::Deadline)));
        }
        // Async blocks capture whole variables: borrow each field apart.
        let (deadline_at, child, watched) = (self.deadline, self.child.as_mut(), self.watched.as_ref());
        let (signals, interval, poll, budget, countdown) =
            (&mut self.signals, &mut self.interval, &mut self.poll, &mut self.budget, &mut self.countdown);
        let deadline = async {
            match deadline_at {
                Some(at) => sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let exited = async {
            match child {
                Some(c) => c.exited().await,
                None => std::future::pending().await,
            }
        };
        let process_exit = async {
            match watched {
                Some((pid, fd)) => {
                    let _ = fd.readable().await;
                    *pid
                }
                None => std::future::pending().await,
            }
        };
        let records = async {
            match ring {
                Some(r) => r.ready().await,
                None => std::future::pending().await,
            }
        };
        Ok(tokio::select! {
            biased;
            () = deadline => Some(Step::Ended(End::Deadline)),
            signal = signals.next() => Some(Step::Ended(End::Signal(signal))),
            Some(status) = exited => Some(Step::Ended(End::CommandExited(status))),
            pid = process_exit => Some(Step::Ended(End::ProcessExited(pid))),
            () = output::stdout_closed_wait() => Some(Step::Ended(End::StdoutClosed)),
            () = tick(interval) => Some(Step::Interval),
            () = tick(poll) => Some(Step::Poll),
            () = tick(budget) => Some(Step::Budget),
            () = tick(countdown) => None,
            ready = records => {
                ready?;
                Some(Step::Records)
            }
        })
    }

    fn draw_countdown(&self) {
        if let (Some(at), Some(secs)) = (self.deadline, self.secs) {
            // Rounded up: "1s left" until the end, never "0s".
            let left = at.saturating_duration_since(Instant::now()) + Duration::from_millis(999);
            countdown::show(Duration::from_secs(left.as_secs()), Duration::from_secs(secs));
        }
    }

    /// [`Run::next`] for a command without a ring buffer.
    pub async fn next_tick(&mut self) -> Result<Step> {
        self.next::<()>(None).await
    }

    /// Phase 5: the clock stops; a command still running is sent SIGTERM
    /// (it would run on untraced); the user is told why the run ended.
    pub fn end(&mut self, end: &End) {
        self.ended = Some(Instant::now());
        output::mark_end();
        self.countdown = None;
        countdown::clear();
        if let Some(c) = self.child.as_mut() {
            if c.terminate() {
                output::say(&format!("{} was still running: sent it SIGTERM", c.name));
            }
        }
        match end {
            End::CommandExited(status) if !status.success() => {
                let name = self.child.as_ref().map_or("the command", |c| c.name.as_str());
                output::say(&format!("{name} exited with {status}"));
            }
            End::ProcessExited(pid) => output::say(&format!("process {pid} exited")),
            End::Signal(name) => output::verbose(&format!("ended by {name}")),
            _ => {}
        }
    }

    /// Until when records left in a ring buffer are printed after the end:
    /// `DRAIN_TIME` after it, and at least `LEAST_DRAIN` from now. Detaching
    /// can outlast `DRAIN_TIME` (uprobes and trampolines are torn down
    /// slowly on an emulated PREEMPT_RT kernel: the last outlier of a calm
    /// run was discarded unread); what is already in the ring still gets
    /// its moment, and a flood is still cut short.
    pub fn drain_deadline(&self) -> Instant {
        (self.ended.unwrap_or_else(Instant::now) + DRAIN_TIME).max(Instant::now() + LEAST_DRAIN)
    }
}

/// Loading and attaching parsed the kernel's BTF, tens of megabytes freed
/// by now, some of it on threads whose glibc arenas keep freed pages: hand
/// them back, so the memory a run holds while it traces is what it uses.
/// (musl, the static binary's libc, returns them by itself.)
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of glibc's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn ticker(period: Duration) -> Interval {
    let mut t = interval_at(tokio::time::Instant::now() + period, period);
    // A report that took long is not followed by a burst of catch-up reports.
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

async fn tick(t: &mut Option<Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Fails with a clear line when `--cpu` or `--pid`/`--tid` name nothing.
pub fn check_targets(cpu: Option<u32>, pid: Option<u32>, tid: Option<u32>) -> Result<()> {
    if let Some(cpu) = cpu {
        let online = aya::util::online_cpus().map_err(|(_, e)| e).context("listing online CPUs")?;
        if !online.contains(&cpu) {
            let range = match (online.first(), online.last()) {
                (Some(a), Some(b)) => format!("{a} to {b}"),
                _ => "none".into(),
            };
            bail!("--cpu {cpu}: not an online CPU (online: {range})");
        }
    }
    if let Some(pid) = pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("--pid {pid}: no such process");
        }
    }
    if let Some(tid) = tid {
        // /proc/TID exists for every thread, though only leaders are listed.
        if !std::path::Path::new(&format!("/proc/{tid}/stat")).exists() {
            bail!("--tid {tid}: no such thread");
        }
    }
    Ok(())
}
