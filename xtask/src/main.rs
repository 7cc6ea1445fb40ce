//! latprobe's developer tasks: the VM kernel matrix and the tests run in it.

mod bench;
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
    #[command(after_help = "Examples:\n  cargo xtask vm --list\n  cargo xtask vm --kernel 6.12 --add target/x86_64-unknown-linux-musl/release/latprobe -- latprobe fn net_rx_action --secs 5\n  cargo xtask vm --kernel all -- uname -r")]
    Vm {
        /// Kernel to boot: a name from --list, or all
        #[arg(long, default_value = "6.12")]
        kernel: String,
        /// List the kernel matrix and what is cached
        #[arg(long)]
        list: bool,
        /// Download every kernel of the matrix, boot nothing
        #[arg(long)]
        fetch: bool,
        /// Copy this executable into the VM's /bin (its shared libraries come along)
        #[arg(long, value_name = "PATH")]
        add: Vec<PathBuf>,
        /// Give up on a VM after this many seconds
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// The command to run inside
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Measure latprobe's overhead and memory next to funclatency and bpftrace, in a VM
    Bench {
        #[arg(long, default_value = "6.12")]
        kernel: String,
    },
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
        Task::Vm { list: true, .. } => vm::list(),
        Task::Vm { fetch: true, .. } => {
            for k in vm::MATRIX {
                k.fetch()?;
            }
            vm::list();
        }
        Task::Vm { kernel, add, timeout, command, .. } => {
            anyhow::ensure!(!command.is_empty(), "nothing to run: add `-- COMMAND`");
            let kernels = vm::select(&kernel)?;
            let env = vm::forwarded_env();
            if kernels.len() == 1 {
                let code = vm::run_in_vm(kernels[0], &add, &command, &env, Duration::from_secs(timeout))?;
                return Ok(ExitCode::from(code.clamp(0, 255) as u8));
            }
            let failed = vm::run_on(&kernels, &add, &command, &env, Duration::from_secs(timeout))?;
            return Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        Task::VmTest { kernel, filter } => return vm_test::run(&kernel, filter.as_deref()),
        Task::Bench { kernel } => return bench::run(&kernel),
    }
    Ok(ExitCode::SUCCESS)
}
