//! latprobe: find where tail latency comes from on a Linux server.

mod attach;
mod bpf;
mod btf_offsets;
mod budget;
mod cli;
mod clock;
mod commands;
mod cost;
mod duration;
mod folded;
mod hdr_codec;
mod histogram;
mod kallsyms;
mod kernel_features;
mod kernel_hist;
mod kretprobe;
mod lock_waiters;
mod merge_input;
mod metrics;
mod output;
mod probe_cost;
mod report;
mod run;
mod sched_probes;
mod tcp_probes;
mod usyms;

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;
use output::text;

fn main() -> ExitCode {
    run::mark_process_start();
    run::child::run_gate_if_asked();
    let cli = cli::Cli::parse();
    output::set_verbose(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            output::error(&format!("cannot start the runtime: {e}"));
            output::finish(Instant::now() + Duration::from_secs(1));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            cli::Command::Fn(args) => commands::func::run(args).await,
            cli::Command::Runqslower(args) => commands::runqslower::run(args).await,
            cli::Command::Runqlat(args) => commands::runqlat::run(args).await,
            cli::Command::Flame(args) => commands::flame::run(args).await,
            cli::Command::Tcp(args) => commands::tcp::run(args).await,
            cli::Command::Lock(args) => commands::lock::run(args).await,
            cli::Command::Merge(args) => commands::merge::run(args).await,
            cli::Command::Doctor(args) => commands::doctor::run(args).await,
            cli::Command::Generate(args) => commands::generate::run(&args),
        }
    });
    // Probes are detached by now; what is left is writing out. A stalled
    // reader cannot hold latprobe: the time left counts from the end of
    // tracing, the final drain included.
    let finished = output::finish(output::deadline());
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::error(&text::printable(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    };
    if let Some(failure) = &finished.stdout_failure {
        output::error(&format!("writing to stdout failed: {failure}"));
        return finish_with(ExitCode::FAILURE);
    }
    if !finished.stdout_closed && (finished.stdout_stalled || finished.stdout.dropped_reports > 0) {
        output::error(&format!(
            "stdout did not take the output in time ({} records and {} reports not printed): is the \
             reader of the pipe stopped?",
            finished.stdout.dropped_records, finished.stdout.dropped_reports
        ));
        return finish_with(ExitCode::FAILURE);
    }
    finish_with(code)
}

/// Gives stderr a moment for the last line, then exits.
fn finish_with(code: ExitCode) -> ExitCode {
    output::finish(Instant::now() + Duration::from_millis(100));
    code
}
