//! `latprobe … -- COMMAND`: the command to trace, started so that not one of
//! its calls is missed, and run as the user would have run it.
//!
//! The gate cannot sit between fork and exec: `spawn` waits for the exec to
//! learn whether it failed. So the child first execs latprobe itself in a
//! hidden gate mode, which keeps the pid, waits for one byte on an inherited
//! pipe, undoes what latprobe's own process changed (see [`Restore`]), and
//! only then execs COMMAND.
//!
//! What the command gets:
//! - the invoking user's uid, gid and groups when latprobe runs through sudo
//!   (SUDO_UID/SUDO_GID): a benchmark must not run as root because its
//!   tracer does;
//! - default signal dispositions but those ignored when latprobe started
//!   (nohup's SIGHUP, a background job's SIGINT), SIGPIPE default though Rust
//!   ignores it, an empty signal mask, and the RLIMIT_MEMLOCK
//!   latprobe started with;
//! - latprobe's stderr as its stdout, so latprobe's stdout (JSON lines, an
//!   SVG) stays parseable;
//! - SIGTERM when latprobe ends first (`--secs`, Ctrl-C), or dies.

use std::{
    ffi::{CString, OsString},
    io::{self, Write},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    process::ExitStatus,
};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

/// First argument of latprobe's hidden gate mode.
const GATE_FLAG: &str = "--latprobe-internal-gate";

/// The user who ran `sudo latprobe …`, when latprobe runs as root through sudo.
pub fn invoking_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |var: &str| std::env::var(var).ok()?.parse::<u32>().ok();
    match (id("SUDO_UID")?, id("SUDO_GID")?) {
        (0, _) => None,
        ids => Some(ids),
    }
}

/// What the gate restores before it execs the command.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Restore {
    /// (uid, gid) to become, or None to stay.
    user: Option<(u32, u32)>,
    memlock: (u64, u64),
    /// latprobe's pid: the gate ends if latprobe is gone before it can
    /// ask to be told of latprobe's death.
    parent: u32,
    /// Signals latprobe catches that were ignored when it started: the
    /// command ignores them too.
    ignored: Vec<i32>,
}

impl Restore {
    /// How many arguments `to_args` makes.
    const ARGS: usize = 6;

    fn to_args(&self) -> Vec<String> {
        let (uid, gid) = self.user.map_or(("-".into(), "-".into()), |(u, g)| (u.to_string(), g.to_string()));
        let ignored: Vec<String> = self.ignored.iter().map(ToString::to_string).collect();
        let ignored = if ignored.is_empty() { "-".to_string() } else { ignored.join(",") };
        vec![uid, gid, self.memlock.0.to_string(), self.memlock.1.to_string(), self.parent.to_string(), ignored]
    }

    fn from_args(args: &[OsString]) -> Option<Self> {
        let text: Vec<&str> = args.iter().map(|a| a.to_str()).collect::<Option<_>>()?;
        let [uid, gid, cur, max, parent, ignored] = text[..] else { return None };
        let ignored = match ignored {
            "-" => Vec::new(),
            list => list.split(',').map(str::parse).collect::<Result<_, _>>().ok()?,
        };
        let user = match (uid, gid) {
            ("-", "-") => None,
            (u, g) => Some((u.parse().ok()?, g.parse().ok()?)),
        };
        Some(Self { user, memlock: (cur.parse().ok()?, max.parse().ok()?), parent: parent.parse().ok()?, ignored })
    }
}

/// A started command, held at the gate until [`GatedChild::release`].
pub struct GatedChild {
    pub child: Child,
    pub pid: u32,
    /// argv[0], for messages.
    pub name: String,
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
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let read_fd = read_end.as_raw_fd();
        let restore = Restore {
            user: invoking_user(),
            memlock: crate::bpf::original_memlock(),
            parent: std::process::id(),
            ignored: super::signals::ignored_at_start(),
        };
        let stdout = io::stderr().as_fd().try_clone_to_owned().context("duplicating stderr for the command")?;
        let mut command = Command::new("/proc/self/exe");
        command.arg(GATE_FLAG).arg(read_fd.to_string()).args(restore.to_args()).arg("--").args(argv).stdout(stdout);
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
        let child = command.spawn().with_context(|| format!("starting {}", argv[0]))?;
        drop(read_end);
        let pid = child.id().context("the command exited at once")?;
        Ok(Self { child, pid, name: crate::output::text::printable(&argv[0]).into_owned(), gate: Some(write_end) })
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

    /// Sends SIGTERM if the command still runs; returns whether it did.
    pub fn terminate(&mut self) -> bool {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return false;
        }
        // SAFETY: kill on the pid of our own unreaped child.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) == 0 }
    }

    /// Resolves when the command exits.
    pub async fn exited(&mut self) -> Option<ExitStatus> {
        self.child.wait().await.ok()
    }
}

/// In gate mode (`latprobe --latprobe-internal-gate FD … -- COMMAND…`),
/// waits for the byte, restores the process, and execs COMMAND; never
/// returns. Otherwise returns.
pub fn run_gate_if_asked() {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != GATE_FLAG) {
        return;
    }
    let fd: RawFd = args.get(2).and_then(|a| a.to_str()?.parse().ok()).unwrap_or(-1);
    let restore = args.get(3..3 + Restore::ARGS).and_then(Restore::from_args);
    // After the restore arguments, "--", then COMMAND.
    let argv = args.get(4 + Restore::ARGS..).unwrap_or_default();
    let (Some(restore), false) = (restore, argv.is_empty()) else {
        gate_fail("malformed gate arguments", 125);
    };
    // Until exec, this process is the command: name it so (profiles and
    // outliers of the first instants then carry the command's name).
    if let Some(name) = std::path::Path::new(&argv[0]).file_name() {
        let name = CString::new(name.as_bytes()).unwrap_or_default();
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes).
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    let mut byte = 0u8;
    // SAFETY: reading one byte into a valid buffer from the inherited fd.
    let got = unsafe { libc::read(fd, (&raw mut byte).cast(), 1) };
    if got != 1 {
        // latprobe died before tracing began: do not run untraced.
        std::process::exit(125);
    }
    // SAFETY: closing our own inherited fd.
    unsafe { libc::close(fd) };
    if let Err(e) = restore_process(restore) {
        gate_fail(&format!("cannot prepare {}: {e}", argv[0].to_string_lossy()), 126);
    }
    let c_args: Vec<CString> = argv.iter().map(|a| CString::new(a.as_bytes()).unwrap_or_default()).collect();
    let mut ptrs: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    // SAFETY: a NUL-terminated array of valid C strings.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    let e = io::Error::last_os_error();
    gate_fail(&format!("cannot run {}: {e}", argv[0].to_string_lossy()), 127);
}

fn gate_fail(text: &str, code: i32) -> ! {
    let _ = writeln!(io::stderr(), "latprobe: error: {}", crate::output::text::printable(text));
    std::process::exit(code)
}

fn check(result: libc::c_int, what: &str) -> io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

/// Undoes latprobe's changes to its own process, then drops to the user.
fn restore_process(restore: Restore) -> io::Result<()> {
    // SAFETY: plain libc calls on valid, initialized arguments.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()), "sigprocmask")?;
        // Rust's runtime ignores SIGPIPE; `cmd | head` needs the default.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        for &signo in &restore.ignored {
            libc::signal(signo, libc::SIG_IGN);
        }
        let limit = libc::rlimit { rlim_cur: restore.memlock.0, rlim_max: restore.memlock.1 };
        check(libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit), "restoring RLIMIT_MEMLOCK")?;
        if let Some((uid, gid)) = restore.user {
            become_user(uid, gid)?;
        }
        // Set last: a change of credentials clears it.
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM), "PR_SET_PDEATHSIG")?;
        if libc::getppid() as u32 != restore.parent {
            return Err(io::Error::other("latprobe ended before the command started"));
        }
    }
    Ok(())
}

fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: getpwuid_r fills caller-owned buffers; the name it points at
    // lives in `buf` for the initgroups call.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let mut buf = vec![0 as libc::c_char; 16384];
        libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found);
        if found.is_null() {
            // A uid without a passwd entry: its primary group only.
            check(libc::setgroups(1, &gid), "setgroups")?;
        } else {
            check(libc::initgroups(pw.pw_name, gid), "initgroups")?;
        }
        check(libc::setgid(gid), "setgid")?;
        check(libc::setuid(uid), "setuid")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_round_trips_through_arguments() {
        for r in [
            Restore { user: Some((1000, 1000)), memlock: (8 << 20, u64::MAX), parent: 42, ignored: vec![2, 15] },
            Restore { user: None, memlock: (0, 0), parent: 1, ignored: vec![] },
        ] {
            let args: Vec<OsString> = r.to_args().into_iter().map(OsString::from).collect();
            assert_eq!(Restore::from_args(&args).as_ref(), Some(&r));
        }
        let bad: Vec<OsString> = ["x", "1", "2", "3", "4", "-"].into_iter().map(OsString::from).collect();
        assert_eq!(Restore::from_args(&bad), None);
    }
}
