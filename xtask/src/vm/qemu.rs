//! Boots one kernel under QEMU (software emulation: KVM fails on the build
//! machines) and streams the command's stdout and stderr, which travel on
//! their own serial ports so kernel messages never mix into them.

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

use super::{initramfs, kernels::Kernel};

/// Runs `command` as root inside `kernel`; returns its exit status.
pub fn run_in_vm(
    kernel: &Kernel,
    adds: &[PathBuf],
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<i32> {
    which("qemu-system-x86_64", "qemu-system-x86")?;
    let vmlinuz = kernel.fetch()?;
    let work = super::kernels::cache_dir().join("run").join(format!("{}-{}", kernel.name, std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let initrd = work.join("initrd.gz");
    let mut env = env.to_vec();
    env.push(("LATPROBE_VM_KERNEL".into(), kernel.name.into()));
    initramfs::build(&initrd, adds, command, &env)?;
    let (console, out, err) = (work.join("console.log"), work.join("stdout"), work.join("stderr"));
    for f in [&console, &out, &err] {
        fs::write(f, b"")?;
    }
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "2048", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet loglevel=3 oops=panic softlockup_panic=1 panic=-1 rdinit=/init"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", out.display()))
        .arg("-serial")
        .arg(format!("file:{}", err.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;

    let done = Arc::new(AtomicBool::new(false));
    let streams = [(out.clone(), false), (err.clone(), true)].map(|(path, is_err)| {
        let done = done.clone();
        thread::spawn(move || follow(&path, is_err, &done))
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = qemu.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    done.store(true, Ordering::SeqCst);
    for s in streams {
        let _ = s.join();
    }
    let log = fs::read_to_string(&console).unwrap_or_default();
    let mut qemu_err = String::new();
    if let Some(mut e) = qemu.stderr.take() {
        let _ = e.read_to_string(&mut qemu_err);
    }
    let result = match status {
        None => bail!("kernel {}: the VM did not finish within {} s; console:\n{}", kernel.name, timeout.as_secs(), tail(&log)),
        // oops=panic, softlockup_panic=1: an oops or a CPU stuck in the kernel
        // ends the VM at once instead of hanging the test run.
        Some(_) if log.contains("Kernel panic") => {
            bail!("kernel {}: kernel panic; console:\n{}", kernel.name, tail(&log))
        }
        Some(s) => match log.lines().find_map(|l| l.trim().strip_prefix("LATPROBE_VM_EXIT=")) {
            Some(code) => code.trim().parse::<i32>().with_context(|| format!("bad exit marker {code:?}"))?,
            None => bail!(
                "kernel {}: the VM stopped ({s}) before the command finished; qemu said: {}\nconsole:\n{}",
                kernel.name,
                qemu_err.trim(),
                tail(&log)
            ),
        },
    };
    let _ = fs::remove_dir_all(&work);
    Ok(result)
}

/// Copies what appears in `path` to our stdout or stderr until `done`.
fn follow(path: &Path, to_stderr: bool, done: &AtomicBool) {
    let Ok(mut file) = fs::File::open(path) else { return };
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let finished = done.load(Ordering::SeqCst);
        let _ = file.seek(SeekFrom::Start(pos));
        let n = file.read(&mut buf).unwrap_or(0);
        if n > 0 {
            pos += n as u64;
            // Serial lines may carry CRLF; keep LF.
            let data: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
            if to_stderr {
                let _ = std::io::stderr().write_all(&data);
            } else {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&data);
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

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn which(program: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .any(|d| d.join(program).is_file());
    if !found {
        bail!("{program} not found: run scripts/setup (or apt-get install {package})");
    }
    Ok(())
}
