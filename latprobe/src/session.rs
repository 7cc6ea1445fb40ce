//! When a tracing run ends: after `--secs`, on Ctrl-C, SIGTERM or SIGHUP (an
//! SSH session dropping mid-incident), or when the traced command exits.
//! Every command ends through here, so every ending gets its final report and
//! its probes detached.

use std::{process::ExitStatus, time::Duration};

use anyhow::{Context, Result};
use tokio::{
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
}

/// The end conditions of one run. Create it before loading anything, so a
/// Ctrl-C during setup is not lost.
pub struct Session {
    deadline: Option<Instant>,
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Session {
    pub fn new(secs: Option<u64>) -> Result<Self> {
        let listen = |kind: SignalKind| signal(kind).context("installing signal handlers");
        Ok(Self {
            deadline: secs.map(|s| Instant::now() + Duration::from_secs(s)),
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
        })
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
        tokio::select! {
            () = deadline => End::Deadline,
            _ = self.interrupt.recv() => End::Signal("SIGINT"),
            _ = self.terminate.recv() => End::Signal("SIGTERM"),
            _ = self.hangup.recv() => End::Signal("SIGHUP"),
            Some(status) = exited => End::CommandExited(status),
        }
    }
}
