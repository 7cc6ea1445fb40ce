//! The signals that end a run: SIGINT (Ctrl-C), SIGTERM, and SIGHUP (the
//! SSH session dropped) — unless SIGHUP was ignored when latprobe started
//! (`nohup latprobe … &`), in which case it stays ignored: a handler would
//! replace nohup's SIG_IGN and end the run at logout.
//!
//! SIGINT is caught even when ignored at start (a background job of a
//! script), but that it was ignored is remembered so that `-- COMMAND`
//! inherits it, as it would have without latprobe in between. (SIGTERM is
//! not passed on ignored: it is how latprobe ends its command.)

use std::sync::OnceLock;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Option<Signal>,
}

/// Whether `signo` is ignored right now (inherited SIG_IGN).
fn ignored(signo: libc::c_int) -> bool {
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null new action
    // only queries the current one.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signo, std::ptr::null(), &mut current) == 0 && current.sa_sigaction == libc::SIG_IGN
    }
}

/// The signals latprobe catches that were ignored when it started.
static IGNORED_AT_START: OnceLock<Vec<libc::c_int>> = OnceLock::new();

/// Which of the signals latprobe catches were ignored before it caught them.
pub fn ignored_at_start() -> Vec<libc::c_int> {
    IGNORED_AT_START.get_or_init(caught_and_ignored).clone()
}

fn caught_and_ignored() -> Vec<libc::c_int> {
    [libc::SIGINT].into_iter().filter(|&s| ignored(s)).collect()
}

impl Signals {
    /// Starts listening. Call before loading anything, so a Ctrl-C during
    /// set-up is not lost.
    pub fn listen() -> Result<Self> {
        IGNORED_AT_START.get_or_init(caught_and_ignored);
        let listen = |kind: SignalKind| signal(kind).context("installing signal handlers");
        let hangup = if ignored(libc::SIGHUP) { None } else { Some(listen(SignalKind::hangup())?) };
        Ok(Self { interrupt: listen(SignalKind::interrupt())?, terminate: listen(SignalKind::terminate())?, hangup })
    }

    /// Resolves with the name of the next ending signal.
    pub async fn next(&mut self) -> &'static str {
        let hangup = async {
            match self.hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = hangup => "SIGHUP",
        }
    }
}
