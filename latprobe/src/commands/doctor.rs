//! `latprobe doctor`: what this kernel allows, and which mechanism each
//! command uses on it and why. The facts are read from /proc and /sys; the
//! mechanisms are found the only way that cannot disagree with the commands:
//! each command runs for a second under `-v`, and says what it chose, what it
//! fell back from, or why it cannot run.

use std::{
    fs,
    io::Read,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{cli::DoctorArgs, output, output::text, report::Format};

/// What each command is run as, after `latprobe -v`; `{dir}` is a private
/// directory for output files.
const CHECKS: [(&str, &[&str]); 9] = [
    ("fn", &["fn", "--secs", "1", "vfs_read"]),
    ("fn --attach kprobe", &["fn", "--attach", "kprobe", "--secs", "1", "vfs_read"]),
    ("runqlat", &["runqlat", "--secs", "1"]),
    ("runqslower", &["runqslower", "--secs", "1", "10ms"]),
    ("flame", &["flame", "--secs", "1", "-o", "{dir}/on.svg"]),
    ("flame --offcpu", &["flame", "--offcpu", "--secs", "1", "-o", "{dir}/off.svg"]),
    ("flame --during", &["flame", "--during", "vfs_read", "--slower", "1us", "--secs", "1", "-o", "{dir}/during.svg"]),
    ("tcp", &["tcp", "--secs", "1"]),
    ("lock", &["lock", "--secs", "1"]),
];

/// How long one check may take before it is killed (a command ends at
/// `--secs 1`; loading and detaching take the rest).
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
/// What is kept of a check's stderr, and of its lines.
const MAX_STDERR: u64 = 64 << 10;
const MAX_LINES: usize = 24;

#[derive(Serialize)]
struct KernelJson {
    #[serde(rename = "type")]
    kind: &'static str,
    release: String,
    machine: String,
    cpus: usize,
    preempt_rt: bool,
    /// Bytes of /sys/kernel/btf/vmlinux, if the kernel has it.
    btf_bytes: Option<u64>,
    /// The lockdown mode in force (`none`, `integrity`, `confidentiality`).
    lockdown: Option<String>,
    root: bool,
    bpf_stats_enabled: Option<String>,
    perf_event_paranoid: Option<String>,
    unprivileged_bpf_disabled: Option<String>,
}

#[derive(Serialize)]
struct CheckJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    command: &'a str,
    /// The command as run, after `latprobe -v`.
    args: Vec<String>,
    works: bool,
    /// It attached, but had nothing to report in its second (a flame graph
    /// with no stack in it is an error).
    saw_nothing: bool,
    exit_code: Option<i32>,
    /// What it said on stderr (`latprobe: …` lines, escaped), first to last.
    says: Vec<String>,
}

pub async fn run(args: DoctorArgs) -> Result<()> {
    let kernel = kernel_facts();
    let dir = PrivateDir::create()?;
    let exe = std::env::current_exe().context("finding latprobe's own binary")?;
    output::say(&format!("running each command for a second under -v ({} checks)", CHECKS.len()));
    // One after another: a check's cost line would count the others' runs.
    let results: Vec<(Vec<String>, Check)> = CHECKS
        .iter()
        .map(|(_, argv)| {
            let argv: Vec<String> = argv.iter().map(|a| a.replace("{dir}", &dir.0.display().to_string())).collect();
            let check = run_check(&exe, &argv);
            (argv, check)
        })
        .collect();
    let mut out = String::new();
    match args.format {
        Format::Json => {
            out += &serde_json::to_string(&kernel).expect("kernel facts serialize");
            out.push('\n');
            for ((name, _), (argv, check)) in CHECKS.iter().zip(&results) {
                let json = CheckJson {
                    kind: "doctor_check",
                    command: name,
                    args: argv.clone(),
                    works: check.works(),
                    saw_nothing: check.saw_nothing(),
                    exit_code: check.exit_code,
                    says: check.says.clone(),
                };
                out += &serde_json::to_string(&json).expect("check serializes");
                out.push('\n');
            }
        }
        Format::Text => {
            out += &render_kernel(&kernel);
            for ((name, _), (_, check)) in CHECKS.iter().zip(&results) {
                let verdict = match (check.works(), check.exit_code) {
                    (true, _) if check.saw_nothing() => "works (attached; nothing to draw in its second)".to_string(),
                    (true, _) => "works".to_string(),
                    (false, Some(code)) => format!("does not run here (exit {code})"),
                    (false, None) => format!("did not finish in {} s: killed", CHECK_TIMEOUT.as_secs()),
                };
                out += &format!("\n{name}: {verdict}\n");
                for line in &check.says {
                    out += &format!("  {line}\n");
                }
            }
        }
    }
    output::report(out);
    Ok(())
}

/// What one command said and how it ended.
struct Check {
    exit_code: Option<i32>,
    says: Vec<String>,
}

/// The error of a flame graph that attached and sampled no stack.
const NOTHING_SAMPLED: &str = "nothing was sampled";

impl Check {
    fn works(&self) -> bool {
        self.exit_code == Some(0) || self.saw_nothing()
    }

    fn saw_nothing(&self) -> bool {
        self.exit_code.is_some_and(|c| c != 0) && self.says.iter().any(|l| l.contains(NOTHING_SAMPLED))
    }
}

fn run_check(exe: &Path, argv: &[String]) -> Check {
    let spawned = Command::new(exe)
        .arg("-v")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Check { exit_code: None, says: vec![format!("could not start: {e}")] },
    };
    let stderr = child.stderr.take().map(|s| {
        thread::spawn(move || {
            let mut text = Vec::new();
            let _ = s.take(MAX_STDERR).read_to_end(&mut text);
            text
        })
    });
    let exit_code = wait_or_kill(&mut child, CHECK_TIMEOUT);
    let text = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    let says = String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.starts_with("latprobe"))
        .take(MAX_LINES)
        .map(|l| text::printable(l).into_owned())
        .collect();
    Check { exit_code, says }
}

/// The child's exit code, or None if it had to be killed.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status.code().unwrap_or(128 + 9)),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                // SIGINT first: it detaches and exits cleanly.
                // SAFETY: signals a child we spawned and have not reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                thread::sleep(Duration::from_secs(2));
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// A fresh 0700 directory for the flame checks' output, removed after.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> Result<Self> {
        let base = std::env::temp_dir();
        for attempt in 0..16u32 {
            let path = base.join(format!("latprobe-doctor-{}-{attempt}", std::process::id()));
            let made = std::fs::DirBuilder::new().mode(0o700).create(&path);
            match made {
                Ok(()) => return Ok(Self(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        anyhow::bail!("could not create a private directory under {}", base.display())
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A short /proc or /sys file, trimmed.
fn read_small(path: &str) -> Option<String> {
    let mut text = String::new();
    fs::File::open(path).ok()?.take(4096).read_to_string(&mut text).ok()?;
    Some(text.trim().to_string())
}

fn kernel_facts() -> KernelJson {
    // SAFETY: uname fills the struct it is given.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::uname(&mut uts) };
    let field = |f: &[libc::c_char]| {
        // SAFETY: uname's fields are NUL-terminated within their arrays.
        let c = unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) };
        text::printable(&c.to_string_lossy()).into_owned()
    };
    // The mode in force is the bracketed one: "none [integrity] confidentiality".
    let lockdown = read_small("/sys/kernel/security/lockdown")
        .and_then(|l| Some(l.split('[').nth(1)?.split(']').next()?.to_string()));
    KernelJson {
        kind: "doctor_kernel",
        release: field(&uts.release),
        machine: field(&uts.machine),
        cpus: thread::available_parallelism().map_or(1, |n| n.get()),
        preempt_rt: read_small("/sys/kernel/realtime").as_deref() == Some("1"),
        btf_bytes: fs::metadata("/sys/kernel/btf/vmlinux").ok().map(|m| m.len()),
        lockdown,
        // SAFETY: geteuid has no preconditions.
        root: unsafe { libc::geteuid() } == 0,
        bpf_stats_enabled: read_small("/proc/sys/kernel/bpf_stats_enabled"),
        perf_event_paranoid: read_small("/proc/sys/kernel/perf_event_paranoid"),
        unprivileged_bpf_disabled: read_small("/proc/sys/kernel/unprivileged_bpf_disabled"),
    }
}

fn render_kernel(k: &KernelJson) -> String {
    let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
    format!(
        "kernel {} ({}), {} CPUs, PREEMPT_RT: {}\nBTF: {}\nlockdown: {}\nroot: {}\nkernel.bpf_stats_enabled = {}, \
         kernel.perf_event_paranoid = {}, kernel.unprivileged_bpf_disabled = {}\n",
        k.release,
        k.machine,
        k.cpus,
        if k.preempt_rt { "yes" } else { "no" },
        k.btf_bytes.map_or("missing (/sys/kernel/btf/vmlinux): no command can run".to_string(), |b| format!(
            "/sys/kernel/btf/vmlinux, {} KiB",
            b / 1024
        )),
        k.lockdown.clone().unwrap_or_else(|| "not reported (no /sys/kernel/security/lockdown)".into()),
        if k.root { "yes" } else { "no (the commands need root, or CAP_BPF and CAP_PERFMON)" },
        or_unknown(&k.bpf_stats_enabled),
        or_unknown(&k.perf_event_paranoid),
        or_unknown(&k.unprivileged_bpf_disabled),
    )
}
