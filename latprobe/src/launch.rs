//! `latprobe … -- COMMAND`: start a command that waits at a gate until its
//! probes are attached, so not one of its calls is missed and only its
//! process is traced.
//!
//! The gate cannot sit between fork and exec: `spawn` waits for the exec to
//! learn whether it failed. So the child first execs latprobe itself in a
//! hidden gate mode, which keeps the pid, waits for one byte on an inherited
//! pipe, and only then execs COMMAND.

use std::{
    ffi::{CString, OsString},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// First argument of latprobe's hidden gate mode.
const GATE_FLAG: &str = "--latprobe-internal-gate";

/// A started command, held at the gate until [`GatedChild::release`].
pub struct GatedChild {
    pub child: Child,
    pub pid: u32,
    gate: Option<OwnedFd>,
}

impl GatedChild {
    pub fn spawn(argv: &[String]) -> Result<Self> {
        if argv.is_empty() {
            bail!("empty command after --");
        }
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error()).context("creating the start gate pipe");
        }
        // SAFETY: pipe2 just returned these two fds, owned by nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let read_fd = read_end.as_raw_fd();
        let mut command = Command::new("/proc/self/exe");
        command.arg(GATE_FLAG).arg(read_fd.to_string()).arg("--").args(argv);
        // SAFETY: only fcntl, async-signal-safe, runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Let the read end (only) survive into the gate.
                if libc::fcntl(read_fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("starting the command")?;
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

/// In gate mode (`latprobe --latprobe-internal-gate FD -- COMMAND…`), waits
/// for the byte and execs COMMAND; never returns. Otherwise returns.
pub fn run_gate_if_asked() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != GATE_FLAG) {
        return;
    }
    let fd: RawFd = args.get(2).and_then(|a| a.to_str()?.parse().ok()).unwrap_or(-1);
    let argv = &args[4.min(args.len())..];
    // Until exec, this process is the command: name it so (profiles and
    // outliers of the first instants then carry the command's name).
    if let Some(name) = argv.first().and_then(|a| std::path::Path::new(a).file_name()) {
        let name = CString::new(name.as_bytes()).unwrap_or_default();
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes).
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    let mut byte = 0u8;
    // SAFETY: reading one byte into a valid buffer from the inherited fd.
    let got = unsafe { libc::read(fd, (&raw mut byte).cast(), 1) };
    if got != 1 || argv.is_empty() {
        // latprobe died before tracing began: do not run untraced.
        std::process::exit(125);
    }
    // SAFETY: closing our own inherited fd.
    unsafe { libc::close(fd) };
    let c_args: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
        .collect();
    let mut ptrs: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: a NUL-terminated array of valid C strings.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    eprintln!(
        "latprobe: error: cannot run {}: {}",
        argv[0].to_string_lossy(),
        io::Error::last_os_error()
    );
    std::process::exit(127);
}
