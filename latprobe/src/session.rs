//! When a tracing run ends: after `--secs`, on Ctrl-C, SIGTERM or SIGHUP (an
//! SSH session dropping mid-incident), or when the traced command exits.
//! Every command ends through here, so every ending gets its final report and
//! its probes detached.

use std::{process::ExitStatus, time::Duration};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{unix::AsyncFd, Interest},
    process::Child,
    signal::unix::{signal, Signal, SignalKind},
    time::{sleep_until, Instant},
};

/// Why a run ended.
#[derive(Debug)]
pub enum End {
    Deadline,
    Signal(&'static str),
    CommandExited(ExitStatus),
    ProcessExited(u32),
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

/// The end conditions of one run. Create it before loading anything, so a
/// Ctrl-C during setup is not lost.
pub struct Session {
    deadline: Option<Instant>,
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    /// `--pid`: the run ends when that process does.
    watched: Option<(u32, AsyncFd<PidFd>)>,
}

impl Session {
    pub fn new(secs: Option<u64>) -> Result<Self> {
        let listen = |kind: SignalKind| signal(kind).context("installing signal handlers");
        Ok(Self {
            deadline: secs.map(|s| Instant::now() + Duration::from_secs(s)),
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
            watched: None,
        })
    }

    /// Ends the run when process `pid` exits (best effort: without pidfd
    /// support the run simply goes on).
    pub fn watch_process(&mut self, pid: u32) {
        self.watched = pidfd(pid).map(|fd| (pid, fd));
    }

    /// Starts the `--secs` clock now (tracing has begun).
    pub fn start_clock(&mut self, secs: Option<u64>) {
        self.deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));
    }

    /// Resolves when the run should end.
    pub async fn ended(&mut self, child: Option<&mut Child>) -> End {
        let deadline = async {
            match self.deadline {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let exited = async {
            match child {
                Some(c) => c.wait().await.ok(),
                None => std::future::pending().await,
            }
        };
        let process_exit = async {
            match &self.watched {
                Some((pid, fd)) => {
                    let _ = fd.readable().await;
                    *pid
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            pid = process_exit => End::ProcessExited(pid),
            () = deadline => End::Deadline,
            _ = self.interrupt.recv() => End::Signal("SIGINT"),
            _ = self.terminate.recv() => End::Signal("SIGTERM"),
            _ = self.hangup.recv() => End::Signal("SIGHUP"),
            Some(status) = exited => End::CommandExited(status),
        }
    }
}

/// Fails with a clear line when `--cpu` or `--pid`/`--tid` name nothing.
pub fn check_targets(cpu: Option<u32>, pid: Option<u32>, tid: Option<u32>) -> Result<()> {
    if let Some(cpu) = cpu {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        if cpu as usize >= cpus {
            bail!("--cpu {cpu}: this machine has CPUs 0 to {}", cpus - 1);
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
