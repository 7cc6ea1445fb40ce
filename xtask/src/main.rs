//! latprobe's developer tasks: the VM kernel matrix and the tests run in it.

mod bench;
mod dist;
mod vm;
mod vm_test;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "latprobe's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run a command as root inside a Debian kernel booted under QEMU
    #[command(
        after_help = "latprobe itself (the static build) is always in the VM's /bin.\n\nExamples:\n  cargo xtask vm --list\n  cargo xtask vm --kernel 6.12 -- latprobe fn net_rx_action --secs 5\n  cargo xtask vm --kernel all -- uname -r"
    )]
    Vm {
        /// Kernel to boot: 6.1, 6.12, 6.1-rt, 5.10 (see --list) or all, one after the other
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// List the kernel matrix: name, Debian package, cached or not
        #[arg(long)]
        list: bool,
        /// Download and extract every kernel of the matrix (once), boot nothing
        #[arg(long)]
        fetch: bool,
        /// Also copy this executable into the VM's /bin (its shared libraries come along)
        #[arg(long, value_name = "PATH")]
        add: Vec<PathBuf>,
        /// Kill a VM still running after this many seconds
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        timeout: u64,
        /// The command to run inside, as root in /tmp (LATPROBE_* variables are passed in)
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Measure latprobe's overhead and memory next to funclatency and bpftrace, in a VM
    Bench {
        #[arg(long, default_value = "6.12")]
        kernel: String,
    },
    /// Build what a release ships in target/dist: the static binary, completions, man pages, SHA256SUMS
    Dist,
    /// Build latprobe and its tests statically and run the tests inside VMs
    VmTest {
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only tests whose name contains this
        #[arg(long)]
        filter: Option<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.task {
        Task::Vm { kernel, list, fetch, add, timeout, command } => {
            vm::cli(&kernel, list, fetch, &add, Duration::from_secs(timeout), &command)
        }
        Task::VmTest { kernel, filter } => vm_test::run(&kernel, filter.as_deref()),
        Task::Bench { kernel } => bench::run(&kernel),
        Task::Dist => dist::run(),
    }
}
