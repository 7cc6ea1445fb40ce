//! Running the real latprobe binary and the test workload, and reading what
//! latprobe printed. Shared by the integration tests.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::{
    env,
    path::PathBuf,
    process::{Command, Output},
};

use serde_json::Value;

/// latprobe under test: `LATPROBE_BIN` (set inside VMs) or cargo's build.
pub fn latprobe_bin() -> PathBuf {
    env::var_os("LATPROBE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_latprobe")))
}

/// The deterministic workload (latprobe/examples/workload.rs).
pub fn workload_bin() -> PathBuf {
    if let Some(p) = env::var_os("LATPROBE_WORKLOAD") {
        return PathBuf::from(p);
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_latprobe"));
    bin.parent().expect("binary has a directory").join("examples/workload")
}

pub fn workload() -> String {
    workload_bin().display().to_string()
}

/// Which kernel this is: the VM matrix name, or "host".
pub fn kernel_name() -> String {
    env::var("LATPROBE_VM_KERNEL").unwrap_or_else(|_| "host".into())
}

/// What one latprobe run printed.
pub struct Run {
    pub output: Output,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Every JSON record on stdout; panics on a line that is not JSON.
    pub fn records(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{}", self.stderr)))
            .collect()
    }

    /// The final histogram record of `function`.
    pub fn final_histogram(&self, function: &str) -> Value {
        self.records()
            .into_iter()
            .find(|r| r["type"] == "histogram" && r["period"] == "final" && r["function"] == function)
            .unwrap_or_else(|| panic!("no final histogram for {function}:\n{}\n{}", self.stdout, self.stderr))
    }

    pub fn outliers(&self) -> Vec<Value> {
        self.records().into_iter().filter(|r| r["type"] == "outlier").collect()
    }

    pub fn assert_success(&self) -> &Self {
        assert!(self.output.status.success(), "latprobe failed ({}):\n{}\n{}", self.output.status, self.stdout, self.stderr);
        self
    }
}

pub fn latprobe(args: &[&str]) -> Run {
    let output = Command::new(latprobe_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", latprobe_bin().display()));
    Run {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        output,
    }
}

/// Why BPF tests cannot run here, if they cannot.
pub fn bpf_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    None
}

/// Why kernel-function probes (fentry or kprobes) cannot run here.
pub fn kernel_probes_unavailable() -> Option<String> {
    bpf_unavailable().or_else(|| {
        (!std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists()).then(|| {
            format!("kernel {} has no kprobes (and no fentry where kprobes are compiled out)", kernel_name())
        })
    })
}

/// Prints why a test is skipped; `return` after it.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test} on {}: {why}", kernel_name());
}

pub fn u64_of(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} missing in {v}"))
}

/// Sum over CPUs of the NET_RX column of /proc/softirqs.
pub fn net_rx_softirqs() -> u64 {
    let text = std::fs::read_to_string("/proc/softirqs").expect("/proc/softirqs");
    let line = text.lines().find(|l| l.trim_start().starts_with("NET_RX:")).expect("NET_RX row");
    line.split_whitespace().skip(1).map(|n| n.parse::<u64>().expect("count")).sum()
}
