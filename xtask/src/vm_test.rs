//! `xtask vm-test`: the integration tests, built static (musl) and run as
//! root inside every kernel of the matrix, one test at a time.

use std::{
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::vm::{self, kernels::workspace_root};

const TARGET: &str = "x86_64-unknown-linux-musl";

/// Peer tools compared against inside the VM, when installed on the host.
const PEERS: &[&str] = &["/usr/sbin/funclatency", "/usr/sbin/runqlat", "/usr/sbin/runqslower", "/usr/sbin/tcpsynbl"];

/// Builds latprobe as a static (musl) binary, the one to copy to servers,
/// and returns its path.
pub fn build_static_latprobe() -> Result<PathBuf> {
    cargo(&["build", "--release", "--target", TARGET, "-p", "latprobe", "--bin", "latprobe"])?;
    Ok(workspace_root().join("target").join(TARGET).join("release").join("latprobe"))
}

pub fn run(kernel: &str, filter: Option<&str>) -> Result<ExitCode> {
    let kernels = vm::select(kernel)?;
    let root = workspace_root();
    cargo(&["build", "--release", "--target", TARGET, "-p", "latprobe", "--bin", "latprobe", "--examples"])?;
    let tests = test_executables()?;
    let release = root.join("target").join(TARGET).join("release");
    let mut adds = vec![release.join("latprobe"), release.join("examples/workload")];
    adds.extend(tests.iter().cloned());
    adds.extend(PEERS.iter().map(PathBuf::from).filter(|p| p.is_file()));

    let names: Vec<String> =
        tests.iter().map(|t| t.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string()).collect();
    let filter = filter.map(|f| format!(" {}", vm::initramfs::shell_quote(f))).unwrap_or_default();
    let script = format!(
        "fail=0; for t in {}; do echo \"--- $t\" >&2; $t --test-threads=1 --nocapture{filter} || fail=1; done; exit $fail",
        names.join(" ")
    );
    let mut env = vm::forwarded_env();
    env.push(("LATPROBE_BIN".into(), "/bin/latprobe".into()));
    env.push(("LATPROBE_WORKLOAD".into(), "/bin/workload".into()));
    let command = vec!["sh".to_string(), "-c".to_string(), script];
    let failed = vm::run_on(&kernels, &adds, &command, &env, Duration::from_secs(900))?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn cargo(args: &[&str]) -> Result<()> {
    let status =
        Command::new(env!("CARGO")).args(args).current_dir(workspace_root()).status().context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

/// Builds the integration tests for musl and returns their executables.
fn test_executables() -> Result<Vec<PathBuf>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "test",
            "--release",
            "--target",
            TARGET,
            "-p",
            "latprobe",
            "--tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("building the tests")?;
    if !out.status.success() {
        bail!("building the tests for {TARGET} failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let is_test = msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe)) = (is_test, msg["executable"].as_str()) {
            tests.push(PathBuf::from(exe));
        }
    }
    if tests.is_empty() {
        bail!("no integration test executables were built");
    }
    Ok(tests)
}
