//! `xtask vm`: run a command as root inside a real Debian kernel, booted
//! under QEMU, with latprobe's needs (tracefs, debugfs, bpffs, loopback) set
//! up. Other tasks (`vm-test`, `bench`) call [`run_in_vm`] or [`run_on`].

pub mod initramfs;
pub mod kernels;
mod monitor;
pub mod qemu;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{ensure, Result};

pub use kernels::{select, Kernel, MATRIX};
pub use qemu::run_in_vm;

/// `xtask vm` with its command-line arguments.
pub fn cli(
    kernel: &str,
    list: bool,
    fetch: bool,
    adds: &[PathBuf],
    timeout: Duration,
    command: &[String],
) -> Result<ExitCode> {
    if fetch {
        for k in MATRIX {
            k.fetch()?;
        }
    }
    if list || fetch {
        print_list();
        return Ok(ExitCode::SUCCESS);
    }
    ensure!(!command.is_empty(), "nothing to run: add `-- COMMAND [ARGS...]` (or --list, --fetch)");
    let kernels = select(kernel)?;
    let env = forwarded_env();
    // latprobe itself is always inside: the static binary, built now.
    let mut adds = adds.to_vec();
    adds.insert(0, crate::vm_test::build_static_latprobe()?);
    let adds = &adds[..];
    if let [kernel] = kernels[..] {
        // One kernel: its status is ours, and nothing but its output is printed.
        let code = run_in_vm(kernel, adds, command, &env, timeout)?;
        return Ok(ExitCode::from(code.clamp(0, 255) as u8));
    }
    let failed = run_on(&kernels, adds, command, &env, timeout)?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `LATPROBE_*` variables of our environment, passed into the VM (except
/// the cache location, which means nothing there, and names a shell cannot
/// export).
pub fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("LATPROBE_") && k != "LATPROBE_VM_CACHE" && initramfs::is_shell_name(k))
        .collect()
}

/// Runs `command` on each kernel in turn, with a header line before each and
/// a summary at the end on stderr; returns how many failed.
pub fn run_on(
    kernels: &[&Kernel],
    adds: &[PathBuf],
    command: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<usize> {
    let mut summary = Vec::new();
    let mut failed = 0;
    for kernel in kernels {
        kernel.fetch()?;
        eprintln!("== kernel {} ({}) ==", kernel.name, kernel.cached_package().unwrap_or_default());
        let line = match qemu::boot(kernel, adds, command, env, timeout) {
            Ok(o) => {
                let times = match o.boot {
                    Some(boot) => {
                        format!("boot {:.1} s, command {:.1} s", boot.as_secs_f64(), (o.total - boot).as_secs_f64())
                    }
                    None => format!("{:.1} s in all", o.total.as_secs_f64()),
                };
                if o.code == 0 {
                    format!("ok; {times}")
                } else {
                    failed += 1;
                    format!("FAILED (exit {}); {times}", o.code)
                }
            }
            Err(e) => {
                // The full story (console tail) now; its first line in the summary.
                eprintln!("xtask: error: {e:#}");
                failed += 1;
                let first = format!("{e:#}");
                let first = first.lines().next().unwrap_or_default();
                let first = first.strip_prefix(&format!("kernel {}: ", kernel.name)).unwrap_or(first);
                format!("FAILED ({first})")
            }
        };
        summary.push(format!("{}: {line}", kernel.name));
    }
    eprintln!("== summary ==");
    for line in &summary {
        eprintln!("{line}");
    }
    Ok(failed)
}

/// `xtask vm --list`: name, package (the cached one, or the one a fetch
/// would download now) and whether it is cached.
pub fn print_list() {
    for k in MATRIX {
        let (package, state) = match k.cached_package() {
            Some(p) => (p, "cached".to_string()),
            None => match k.newest_known() {
                Ok(Some(p)) => (p, "not fetched (--fetch)".to_string()),
                Ok(None) => {
                    ("?".to_string(), format!("not fetched; no package in the apt lists ({})", k.update_hint()))
                }
                Err(e) => ("?".to_string(), format!("not fetched; {e:#}")),
            },
        };
        println!("{:<8} {:<48} {:<21} {}", k.name, package, state, k.description);
    }
}
