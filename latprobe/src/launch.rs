//! `latprobe … -- COMMAND`: start a command that waits, held at a gate,
//! until its probes are attached, so not one of its calls is missed and only
//! its process is traced.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::Stdio,
};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// A started command, blocked before `exec` until [`GatedChild::release`].
pub struct GatedChild {
    pub child: Child,
    pub pid: u32,
    gate: Option<OwnedFd>,
}

impl GatedChild {
    pub fn spawn(argv: &[String]) -> Result<Self> {
        let Some((program, args)) = argv.split_first() else {
            bail!("empty command after --");
        };
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error()).context("creating the start gate pipe");
        }
        // SAFETY: pipe2 just returned these two fds, owned by nobody else.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (read_fd, write_fd) = (read_end.as_raw_fd(), write_end.as_raw_fd());
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::inherit()).kill_on_drop(false);
        // SAFETY: only async-signal-safe calls (close, read) run between fork
        // and exec.
        unsafe {
            command.pre_exec(move || {
                libc::close(write_fd);
                let mut byte = 0u8;
                // EOF instead of a byte: latprobe died before attaching; do not run.
                if libc::read(read_fd, (&raw mut byte).cast(), 1) != 1 {
                    return Err(io::Error::other("latprobe exited before tracing started"));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot run {program}"))?;
        drop(read_end);
        let pid = child.id().context("the command exited at once")?;
        Ok(Self { child, pid, gate: Some(write_end) })
    }

    /// Lets the command run.
    pub fn release(&mut self) -> Result<()> {
        if let Some(gate) = self.gate.take() {
            let byte = 1u8;
            // SAFETY: writing one byte from a valid buffer to our pipe end.
            let n = unsafe { libc::write(gate.as_raw_fd(), (&raw const byte).cast(), 1) };
            if n != 1 {
                return Err(io::Error::last_os_error()).context("releasing the command");
            }
        }
        Ok(())
    }
}
