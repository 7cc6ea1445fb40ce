//! `xtask vm`: run a command as root inside a real Debian kernel, booted
//! under QEMU, with latprobe's needs (tracefs, debugfs, bpffs, loopback) set up.

pub mod initramfs;
pub mod kernels;
pub mod qemu;

use std::{path::PathBuf, time::Duration};

use anyhow::Result;

pub use kernels::{select, Kernel, MATRIX};
pub use qemu::run_in_vm;

/// `LATPROBE_*` variables of our environment, passed into the VM.
pub fn forwarded_env() -> Vec<(String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with("LATPROBE_") && k != "LATPROBE_VM_CACHE").collect()
}

/// Runs `command` on each kernel in turn; returns how many failed.
pub fn run_on(kernels: &[&Kernel], adds: &[PathBuf], command: &[String], env: &[(String, String)], timeout: Duration) -> Result<usize> {
    let mut summary = Vec::new();
    for kernel in kernels {
        kernel.fetch()?;
        eprintln!("== kernel {} ({}) ==", kernel.name, kernel.cached_package().unwrap_or_default());
        let started = std::time::Instant::now();
        let outcome = match run_in_vm(kernel, adds, command, env, timeout) {
            Ok(0) => "ok".to_string(),
            Ok(code) => format!("FAILED (exit {code})"),
            Err(e) => format!("FAILED ({e:#})"),
        };
        summary.push(format!("{}: {outcome} in {:.0} s", kernel.name, started.elapsed().as_secs_f64()));
    }
    eprintln!("== summary ==");
    for line in &summary {
        eprintln!("{line}");
    }
    Ok(summary.iter().filter(|l| l.contains("FAILED")).count())
}

/// `xtask vm --list`.
pub fn list() {
    for k in MATRIX {
        let cached = k.cached_package().unwrap_or_else(|| "not fetched yet".into());
        println!("{:<8} {:<36} {}", k.name, k.description, cached);
    }
}
