//! Boots one kernel under QEMU and runs one command in it. Software emulation
//! (TCG) only: KVM is present on the build machines but fails. The command's
//! stdout and stderr travel on their own (PCI) serial ports, ttyS1 and ttyS2, which
//! QEMU writes to files that we stream, so kernel messages, which stay on the
//! console (ttyS0), never mix into them. The console also carries the start
//! and exit markers written by /init, and is kept for error reports.

use std::{
    fs,
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    initramfs::{self, EXIT_MARKER, START_MARKER},
    kernels::{cache_dir, Kernel},
};

/// Kernel command line. `quiet loglevel=3` keeps the console to errors;
/// `oops=panic`, `softlockup_panic=1` and `panic=-1` with QEMU's `-no-reboot`
/// turn a crashed or wedged kernel into an immediate exit that we report,
/// instead of a VM that sits until the timeout. The soft-lockup threshold is
/// raised to 60 s because an emulated CPU starved by a busy host can look
/// stuck for a while. `printk.devkmsg=on`: /init's markers written to
/// /dev/kmsg are never rate-limited away. `nokaslr`: kernel addresses are
/// those recorded at the kernel's first boot, so where a hung guest's CPUs
/// are can be named.
const APPEND: &str = "console=ttyS0 quiet loglevel=3 oops=panic softlockup_panic=1 watchdog_thresh=30 \
                      panic=-1 printk.devkmsg=on nokaslr rdinit=/init";

/// How one run went.
pub struct Outcome {
    /// The command's exit status.
    pub code: i32,
    /// Wall time from starting QEMU until /init started the command.
    pub boot: Option<Duration>,
    /// Wall time from starting QEMU until it exited.
    pub total: Duration,
}

/// Runs `command` as root inside `kernel` (fetched first if needed) with
/// `adds` in /bin and `env` exported; returns the command's exit status.
/// Errors when the VM cannot start, panics, or runs past `timeout`.
pub fn run_in_vm(
    kernel: &Kernel,
    adds: &[PathBuf],
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<i32> {
    boot(kernel, adds, command, env, timeout).map(|o| o.code)
}

/// [`run_in_vm`], with timings.
pub fn boot(
    kernel: &Kernel,
    adds: &[PathBuf],
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<Outcome> {
    which("qemu-system-x86_64", "qemu-system-x86")?;
    let vmlinuz = kernel.fetch()?;
    let runs = cache_dir().join("run");
    remove_stale_runs(&runs);
    if !kernel.kallsyms().is_file() {
        if let Err(e) = record_kallsyms(kernel, &vmlinuz, &runs) {
            eprintln!(
                "xtask: kernel {}: its symbols were not recorded ({e:#}); a hang will be reported unnamed",
                kernel.name
            );
        }
    }
    let work = runs.join(format!("{}-{}", kernel.name, std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // A failed run's logs move to failed/NAME (the error names it), where
    // they stay until that kernel fails again; the run directory goes.
    let failed = cache_dir().join("failed").join(kernel.name);
    let mut result = boot_in(kernel, &vmlinuz, &work, adds, command, env, timeout, &failed, true);
    if let Err(e) = &result {
        if let Some(BootPanic { reason, .. }) = e.downcast_ref::<BootPanic>() {
            // TCG has run a stale int3 that the kernel planted while
            // patching code, e.g. when 6.12 marks sched_clock stable during
            // boot, and the kernel oopsed. The command has not run yet, so
            // booting again is safe.
            eprintln!("xtask: kernel {} panicked while booting ({reason}); booting it again", kernel.name);
            result = boot_in(kernel, &vmlinuz, &work, adds, command, env, timeout, &failed, true);
        }
    }
    let _ = fs::remove_file(work.join("initrd.gz"));
    if result.is_err() {
        let _ = fs::remove_dir_all(&failed);
        let _ = fs::create_dir_all(cache_dir().join("failed"));
        let _ = fs::rename(&work, &failed);
    }
    let _ = fs::remove_dir_all(&work);
    result
}

/// Boots `kernel` once to list its text symbols into [`Kernel::kallsyms`]:
/// with `nokaslr` they are where they will be in every later boot.
fn record_kallsyms(kernel: &Kernel, vmlinuz: &Path, runs: &Path) -> Result<()> {
    let work = runs.join(format!("{}-kallsyms-{}", kernel.name, std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // Compressed in the guest: the serial port is slow, on PREEMPT_RT
    // (threaded interrupts) too slow for 2 MB of text in two minutes.
    let command = ["sh".to_string(), "-c".to_string(), "grep ' [tT] ' /proc/kallsyms | gzip -1".to_string()];
    let failed = work.join("failed");
    let result = boot_in(kernel, vmlinuz, &work, &[], &command, &[], Duration::from_secs(300), &failed, false)
        .and_then(|o| if o.code == 0 { Ok(()) } else { bail!("listing /proc/kallsyms exited with {}", o.code) })
        .and_then(|()| gunzip(&work.join("stdout"), &work.join("kallsyms")))
        .and_then(|()| super::kernels::install(&work.join("kallsyms"), &kernel.kallsyms()));
    let _ = fs::remove_dir_all(&work);
    result
}

fn gunzip(from: &Path, to: &Path) -> Result<()> {
    let out = fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let status = Command::new("gzip").arg("-dc").arg(from).stdout(out).status().context("running gzip -dc")?;
    if !status.success() {
        bail!("gzip -dc {} failed ({status})", from.display());
    }
    Ok(())
}

/// One boot in `work`; `echo` copies the command's output to ours as it
/// comes (else it is only kept in `work`).
#[allow(clippy::too_many_arguments)]
fn boot_in(
    kernel: &Kernel,
    vmlinuz: &Path,
    work: &Path,
    adds: &[PathBuf],
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
    failed: &Path,
    echo: bool,
) -> Result<Outcome> {
    let initrd = work.join("initrd.gz");
    let mut env = env.to_vec();
    env.push(("LATPROBE_VM_KERNEL".into(), kernel.name.into()));
    initramfs::build(&initrd, adds, command, &env)?;
    let (console, out, err, qemu_log) =
        (work.join("console.log"), work.join("stdout"), work.join("stderr"), work.join("qemu.log"));
    let monitor = work.join("monitor.sock");
    for f in [&console, &out, &err] {
        fs::write(f, b"").with_context(|| format!("creating {}", f.display()))?;
    }
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        // One host thread for both vCPUs: with a thread each (MTTCG), a vCPU
        // can keep running a stale translation of code another vCPU has just
        // patched. Attaching or detaching a sched_switch program patches the
        // tracepoint's jump inside __schedule through a temporary int3; a
        // 6.1-rt guest was found with both CPUs re-entering that int3 forever,
        // interrupts off, under the run-queue lock (QEMU 7.2): the VM hangs
        // that were once blamed on latprobe. Slower, but the guest's code is
        // coherent.
        .args(["-accel", "tcg,thread=single", "-cpu", "max", "-m", "2048", "-smp", "2"])
        // Not -nographic: that would put the console on our stdout. No
        // default devices: no NIC, VGA or drives to probe; loopback is enough.
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-monitor".into(), format!("unix:{},server=on,wait=off", monitor.display())])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", APPEND])
        // The console on the ISA port ttyS0; the command's stdout and
        // stderr on two PCI serial ports, which the guest numbers ttyS1 and
        // ttyS2. Not the ISA ports 2 and 3: they share IRQs 3 and 4, and
        // PREEMPT_RT kernels disable IRQ 3 early ("nobody cared"), after
        // which writes to ttyS1 crawl.
        .args(["-serial".into(), format!("file:{}", console.display())])
        .args(["-chardev".into(), format!("file,id=out,path={}", out.display())])
        .args(["-device", "pci-serial,chardev=out"])
        .args(["-chardev".into(), format!("file,id=err,path={}", err.display())])
        .args(["-device", "pci-serial,chardev=err"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // A file, not a pipe: nobody reads it until QEMU exits, and a full
        // pipe would stall QEMU.
        .stderr(fs::File::create(&qemu_log).with_context(|| format!("creating {}", qemu_log.display()))?)
        .spawn()
        .context("starting qemu-system-x86_64")?;

    let done = Arc::new(AtomicBool::new(false));
    let streams = [(out, false), (err, true)].map(|(path, is_err)| {
        let done = done.clone();
        thread::spawn(move || echo.then(|| follow(&path, is_err, &done)))
    });
    let mut boot = None;
    let mut cpus = String::new();
    let status = loop {
        if let Some(status) = qemu.try_wait().context("waiting for qemu")? {
            break Some(status);
        }
        if boot.is_none() && read_lossy(&console).contains(START_MARKER) {
            boot = Some(started.elapsed());
        }
        if started.elapsed() > timeout {
            cpus = super::monitor::where_cpus_are(&monitor, &kernel.kallsyms());
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let total = started.elapsed();
    done.store(true, Ordering::SeqCst);
    for s in streams {
        let _ = s.join();
    }

    let log = read_lossy(&console);
    let name = kernel.name;
    let logs = failed.display();
    if let Some(reason) = panic_reason(&log) {
        let message =
            format!("kernel {name}: kernel panic: {reason}\nlogs in {logs}; the console's end:\n{}", tail(&log));
        if !log.contains(START_MARKER) {
            return Err(BootPanic { reason, message }.into());
        }
        bail!(message);
    }
    let Some(status) = status else {
        let stage =
            if boot.is_some() { "the command was still running" } else { "the kernel had not finished booting" };
        bail!(
            "kernel {name}: no result within {} s ({stage}): VM killed, raise --timeout if it needs longer\n\
             where its CPUs were:\n{cpus}logs in {logs}; the console's end:\n{}",
            timeout.as_secs(),
            tail(&log)
        );
    };
    let Some(code) = exit_code(&log) else {
        bail!(
            "kernel {name}: the VM stopped ({status}) before the command finished\nqemu said: {}\nlogs in {logs}; the console's end:\n{}",
            read_lossy(&qemu_log).trim(),
            tail(&log)
        );
    };
    if boot.is_none() && log.contains(START_MARKER) {
        // Booted and finished between two polls.
        boot = Some(total);
    }
    Ok(Outcome { code, boot, total })
}

/// A kernel panic before the command started: worth one more boot.
#[derive(Debug)]
struct BootPanic {
    reason: String,
    message: String,
}

impl std::fmt::Display for BootPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BootPanic {}

/// Why the kernel panicked: the panic message, and the first BUG or Oops
/// line before it, which names the culprit (the panic itself often only says
/// "Fatal exception").
fn panic_reason(log: &str) -> Option<String> {
    let at = log.find("Kernel panic - not syncing")?;
    let message = log[at..].lines().next().unwrap_or_default();
    let message = message.trim_start_matches("Kernel panic - not syncing").trim_start_matches([':', ' ']).trim();
    let cause = log[..at].lines().map(|l| l.split_once("] ").map_or(l, |(_, rest)| rest).trim()).find(|l| {
        l.starts_with("BUG:")
            || l.starts_with("Oops:")
            || l.starts_with("kernel BUG")
            || l.starts_with("watchdog: BUG:")
    });
    Some(match cause {
        Some(cause) if cause != message => format!("{message}, after {cause}"),
        _ => message.to_string(),
    })
}

/// The status in /init's exit marker. The marker is on the console twice
/// and either copy may have a kernel message cut into it, so take the first
/// copy whose digits end the line or are followed by a space.
fn exit_code(log: &str) -> Option<i32> {
    log.lines().find_map(|line| {
        line.match_indices(EXIT_MARKER).find_map(|(i, _)| {
            let rest = &line[i + EXIT_MARKER.len()..];
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let after = rest[digits..].chars().next();
            (digits > 0 && after.is_none_or(char::is_whitespace)).then(|| rest[..digits].parse().ok()).flatten()
        })
    })
}

/// Copies what appears in `path` to our stdout or stderr until `done`, byte
/// for byte (the guest's serial ports are raw, so there is nothing to undo).
fn follow(path: &Path, to_stderr: bool, done: &AtomicBool) {
    let Ok(mut file) = fs::File::open(path) else { return };
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Read `done` before reading the file: once QEMU has exited, one
        // more pass sees everything it wrote.
        let finished = done.load(Ordering::SeqCst);
        let _ = file.seek(SeekFrom::Start(pos));
        let n = file.read(&mut buf).unwrap_or(0);
        if n > 0 {
            pos += n as u64;
            if to_stderr {
                let _ = std::io::stderr().write_all(&buf[..n]);
            } else {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
            continue;
        }
        if finished {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// Deletes run directories (`NAME-PID`) left by xtask processes that died.
fn remove_stale_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else { return };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit_once('-').and_then(|(_, p)| p.parse::<u32>().ok()) else { continue };
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "xtask" {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn which(program: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH").iter().flat_map(std::env::split_paths).any(|d| d.join(program).is_file());
    if !found {
        bail!("{program} not found: run scripts/setup (or apt-get install {package})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_marker_survives_interleaving() {
        assert_eq!(exit_code("[ 1.0] x\nLATPROBE_VM_EXIT=3\n"), Some(3));
        // The direct write cut by the printed copy.
        assert_eq!(exit_code("LATPROBE_VM_EXIT[    5.2] LATPROBE_VM_EXIT=17\n=17\n"), Some(17));
        assert_eq!(exit_code("LATPROBE_VM_EXIT=1[    5.2] boom\n7\n[ 5.3] LATPROBE_VM_EXIT=17\n"), Some(17));
        assert_eq!(exit_code("LATPROBE_VM_EXIT=\r\n"), None);
        assert_eq!(exit_code("LATPROBE_VM_EXIT=0\r\n"), Some(0));
        assert_eq!(exit_code("booting\n"), None);
    }

    #[test]
    fn panic_reason_names_the_culprit() {
        let log = "[ 1.0] ok\n[ 3.1] BUG: kernel NULL pointer dereference, address: 0\n[ 3.2] Oops: 0002 [#1]\n\
                   [ 3.3] Kernel panic - not syncing: Fatal exception\n";
        assert_eq!(
            panic_reason(log).unwrap(),
            "Fatal exception, after BUG: kernel NULL pointer dereference, address: 0"
        );
        assert_eq!(
            panic_reason("[ 3.3] Kernel panic - not syncing: sysrq triggered crash\n").unwrap(),
            "sysrq triggered crash"
        );
        assert_eq!(panic_reason("fine\n"), None);
    }
}
