//! Command-line interface: one subcommand per investigation.

use clap::{Args, Parser, Subcommand};

use crate::{attach::AttachMode, duration, report::Format};

const EXAMPLES: &str = "\
Examples:
  latprobe fn net_rx_action --secs 30          p99.9 and max of the NET_RX softirq work
  latprobe fn net_rx_action tcp_collapse --slower 5ms --stacks
                                               which calls were slow, and from where
  latprobe fn /usr/sbin/nginx:ngx_process_events_and_timers --pid 4242
  latprobe fn do_nanosleep -- ./my-benchmark   trace only the command's process";

#[derive(Parser, Debug)]
#[command(
    name = "latprobe",
    version,
    about = "Find where tail latency comes from on a Linux server",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Say which probe mechanisms were tried and chosen
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Latency of kernel or user functions: HDR percentiles, log2 histogram, slow calls
    #[command(name = "fn", after_help = FN_EXAMPLES)]
    Fn(FnArgs),
}

const FN_EXAMPLES: &str = "\
Each function gets its own histogram, aggregated in the kernel per CPU; only
calls slower than --slower are sent to userspace one by one. Reports end at
--secs, Ctrl-C, SIGTERM, SIGHUP, or when COMMAND exits.

Examples:
  latprobe fn net_rx_action --secs 30
  latprobe fn net_rx_action tcp_collapse --interval 10s --slower 10ms --stacks
  latprobe fn tcp_v4_rcv --cpu 3 --format json | jq .p999_ns
  latprobe fn inet_csk_accept --attach kprobe
  latprobe fn /usr/sbin/nginx:ngx_process_events_and_timers --pid 4242
  latprobe fn do_nanosleep -- sleep 1";

#[derive(Args, Debug)]
pub struct FnArgs {
    /// Kernel function (net_rx_action) or user function (BINARY:SYMBOL); up to 8
    #[arg(required = true, value_name = "FUNC")]
    pub functions: Vec<String>,
    /// Stop after N seconds (default: until Ctrl-C or COMMAND exits)
    #[arg(long, value_name = "N")]
    pub secs: Option<u64>,
    /// Also print a report of each interval, e.g. 10s
    #[arg(long, value_name = "DUR", value_parser = duration::parse_arg)]
    pub interval: Option<u64>,
    /// Only calls made by this process; stop when it exits
    #[arg(long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<u32>,
    /// Only calls that started on this CPU
    #[arg(long, value_name = "N")]
    pub cpu: Option<u32>,
    /// Print every call slower than DUR (e.g. 5ms) as it ends
    #[arg(long, value_name = "DUR", value_parser = duration::parse_arg)]
    pub slower: Option<u64>,
    /// With --slower: the kernel stack of each slow call
    #[arg(long, requires = "slower")]
    pub stacks: bool,
    /// How to attach to kernel functions
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// text for people, json for one JSON object per line
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Run COMMAND, trace only its process, and stop when it exits
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}
