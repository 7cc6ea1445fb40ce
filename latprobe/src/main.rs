//! latprobe: find where tail latency comes from on a Linux server.

mod attach;
mod bpf;
mod btf_offsets;
mod cli;
mod clock;
mod commands;
mod duration;
mod folded;
mod histogram;
mod kallsyms;
mod kernel_hist;
mod launch;
mod output;
mod report;
mod sched_probes;
mod session;
mod usyms;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    launch::run_gate_if_asked();
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("latprobe: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            cli::Command::Fn(args) => commands::func::run(args, cli.verbose).await,
            cli::Command::Runqslower(args) => commands::runqslower::run(args, cli.verbose).await,
            cli::Command::Runqlat(args) => commands::runqlat::run(args, cli.verbose).await,
            cli::Command::Flame(args) => commands::flame::run(args, cli.verbose).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<output::BrokenPipe>() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latprobe: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
