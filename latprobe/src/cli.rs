//! Command-line interface: one subcommand per investigation.

use clap::{Args, Parser, Subcommand};

use crate::{attach::AttachMode, duration, report::Format, sched_probes::TpMode};

const EXAMPLES: &str = "\
Examples:
  latprobe doctor                              what this kernel allows, what each command uses here
  latprobe fn net_rx_action --secs 30          p99.9 and max of the NET_RX softirq work
  latprobe fn net_rx_action tcp_collapse --slower 5ms --stacks
                                               which calls were slow, and from where
  latprobe fn /usr/sbin/nginx:ngx_process_events_and_timers --pid 4242
  latprobe fn do_nanosleep -- ./my-benchmark   trace only the command's process
  latprobe runqslower 50ms --secs 60           which task held the CPU while others waited
  latprobe runqlat --per-cpu --secs 10         run-queue latency percentiles per CPU
  latprobe tcp --port 443 --secs 30            where connections wait, and where packets are lost
  latprobe lock --secs 10                      which kernel locks were contended, and who waited
  latprobe merge web-*.json                    the same function across hosts, the sick ones first";

/// What `--hdr-log` writes, said once for every command that has it.
const HDR_LOG_HELP: &str = "Also write each interval's histograms to FILE as an HdrHistogram interval log \
(one tagged entry per histogram per --interval, or one for the whole run), for HdrHistogram's tools and \
`latprobe merge`";

/// What `--listen` serves, said once for every command that has it.
const LISTEN_HELP: &str = "Serve /metrics at ADDR:PORT while running, for Prometheus: each histogram \
(cumulative since the start, buckets from 1us to 60s), untimed calls and latprobe's own cost. \
A bare :PORT is 127.0.0.1:PORT; any other address only as typed (0.0.0.0:PORT for all)";

/// Longest run `--secs` accepts: 100 days.
pub const MAX_SECS: u64 = 100 * 24 * 3600;

/// What happens to `-- COMMAND`, said once for every command's help.
const COMMAND_HELP: &str = "Run COMMAND, trace only its process, and stop when it exits. Under sudo it \
runs as the invoking user; its stdout goes to latprobe's stderr (so latprobe's output stays parseable); \
if latprobe ends first, COMMAND gets SIGTERM";

/// Flags every command has: how long a run lasts and whom it traces.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Stop after N seconds (default: until Ctrl-C, SIGTERM or SIGHUP, or the traced process exits)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub secs: Option<u64>,
    /// Only this process; stop when it exits
    #[arg(long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<u32>,
    /// Most of all CPUs' time latprobe's own probes may take (their programs, and a uprobe's traps),
    /// judged each second: over it, the costliest function (fn) or every probe (other commands, which
    /// then end) is detached and said so; the report covers what was measured until then [default: 5;
    /// `off` for none]
    #[arg(long, value_name = "PCT", value_parser = crate::budget::parse_limit)]
    pub max_overhead: Option<crate::budget::Limit>,
    #[arg(last = true, value_name = "COMMAND", help = COMMAND_HELP)]
    pub command: Vec<String>,
}

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
    /// Each wait for a CPU longer than THRESHOLD, and the task that held the CPU
    #[command(after_help = RUNQSLOWER_EXAMPLES)]
    Runqslower(RunqslowerArgs),
    /// Run-queue latency: HDR percentiles and log2 histogram, per CPU or process
    #[command(after_help = RUNQLAT_EXAMPLES)]
    Runqlat(RunqlatArgs),
    /// Flame graph of where CPUs spent their time (on-CPU) or tasks waited (--offcpu)
    #[command(after_help = FLAME_EXAMPLES)]
    Flame(FlameArgs),
    /// Where connections wait (softirq, handshake, accept queue, receive queue) and packets are lost
    #[command(after_help = TCP_EXAMPLES)]
    Tcp(TcpArgs),
    /// Which kernel locks tasks waited on, how long, and who waited
    #[command(after_help = LOCK_EXAMPLES)]
    Lock(LockArgs),
    /// Merge histograms from many hosts (a JSON report or HDR log per host): the sick hosts first
    #[command(after_help = MERGE_EXAMPLES)]
    Merge(MergeArgs),
    /// What this kernel allows, and which mechanism each command uses here and why
    #[command(after_help = DOCTOR_EXAMPLES)]
    Doctor(DoctorArgs),
    /// Shell completions or the man page, from these definitions (`cargo xtask dist` packs them)
    #[command(hide = true)]
    Generate(GenerateArgs),
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[arg(value_enum)]
    pub what: Generated,
    /// With `man`: the page of this subcommand (latprobe-SUBCOMMAND)
    #[arg(long, value_name = "SUBCOMMAND")]
    pub command: Option<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Generated {
    Bash,
    Zsh,
    Fish,
    /// The man page, roff
    Man,
    /// The subcommands that have a man page, one per line
    Commands,
}

const DOCTOR_EXAMPLES: &str = "\
The first thing to run on an unknown box. Prints the kernel's facts (release,
PREEMPT_RT, BTF, lockdown, privileges, the BPF and perf sysctls), then runs
each command for a second under -v and shows what it chose (fentry or
kprobe, task storage or a hash, tp_btf or raw_tp), what it fell back from,
or the one line saying why it cannot run here. Takes about 10-20 seconds.

Examples:
  sudo latprobe doctor
  sudo latprobe doctor --format json | jq -r 'select(.type==\"doctor_check\") | [.command, .works] | @tsv'";

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

const MERGE_EXAMPLES: &str = "\
Each FILE is one host, named by the file (web-07.json is host web-07): the
JSON of `--format json` (its final histograms) or an HdrHistogram interval
log (`--hdr-log`, all its intervals). Histograms are merged by adding their
buckets: the merged percentiles are those of every call on every host.
Merged JSON (`--format json`) can itself be merged again.

Examples:
  latprobe fn net_rx_action --secs 60 --format json > $(hostname).json   on each host, then:
  latprobe merge web-*.json
  latprobe merge --format json region-a.json region-b.json | jq 'select(.type==\"histogram\")'
  latprobe merge *.hlog";

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// One file per host: JSON reports or HdrHistogram interval logs
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<std::path::PathBuf>,
    /// text for people, json for one JSON object per line
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

const LOCK_EXAMPLES: &str = "\
Every wait on a contended kernel lock (the lock:contention_begin/end
tracepoints, Linux 5.19+: they fire only on a lock's slow path) is added to
its lock's totals in the kernel, per CPU. Locks are named by their kernel
symbol when they are static (rtnl_mutex), else by kind and by where they are
taken: the first function outside locking code of the stacks its waiters
waited from longest. Each lock lists the processes that waited on it, most
waited first. The first --max-locks locks seen get HDR percentiles of their
waits.

Examples:
  latprobe lock --secs 10
  latprobe lock --pid 4242 --top 5 --secs 30
  latprobe lock --stacks --top 3                each lock's most waited-from stacks
  latprobe lock --slower 10ms --stacks          every wait over 10 ms, with its stack
  latprobe lock --during apparmor_socket_sendmsg --slower 10ms
                                                the locks inside the slow calls only
  latprobe lock --comm nginx --format json | jq 'select(.type==\"lock\")'
  latprobe lock -- ./my-benchmark";

#[derive(Args, Debug)]
pub struct LockArgs {
    /// Locks in each report, by total wait
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
    /// Locks that get HDR percentiles (the first seen)
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=latprobe_common::lock::MAX_LOCK_SLOTS as i64))]
    pub max_locks: u32,
    /// Only tasks whose name (comm) starts with PREFIX
    #[arg(long, value_name = "PREFIX")]
    pub comm: Option<String>,
    /// Only waits on this CPU
    #[arg(long, value_name = "N")]
    pub cpu: Option<u32>,
    /// Print every wait longer than DUR (e.g. 10ms) as it ends; with
    /// --during, what counts as a slow call of FUNC
    #[arg(long, value_name = "DUR", value_parser = duration::parse_arg)]
    pub slower: Option<u64>,
    /// Each lock's waiters' kernel stacks, most waited from first (the top
    /// 3); with --slower, also each slow wait's stack
    #[arg(long)]
    pub stacks: bool,
    /// Count only the waits inside calls of kernel function FUNC that took
    /// at least --slower: which lock made the slow calls slow
    #[arg(long, value_name = "FUNC", requires = "slower")]
    pub during: Option<String>,
    /// Also print a report of each interval, e.g. 10s
    #[arg(long, value_name = "DUR", value_parser = duration::parse_interval)]
    pub interval: Option<u64>,
    /// text for people, json for one JSON object per line
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[arg(long, value_name = "FILE", help = HDR_LOG_HELP)]
    pub hdr_log: Option<std::path::PathBuf>,
    #[arg(long, value_name = "ADDR:PORT", help = LISTEN_HELP)]
    pub listen: Option<crate::metrics::ListenAddr>,
    #[command(flatten)]
    pub run: RunArgs,
}

const TCP_EXAMPLES: &str = "\
Stages, each an HDR histogram per port (or per process with --by pid):
  softirq    NET_RX raised on a CPU -> the softirq starts running there
  handshake  SYN sent -> established (connections this machine makes), and
             SYN received -> established (a listener's; needs fentry)
  accept     established -> returned by accept() (time in the accept queue)
  rxqueue    data received -> first copied to the process (time in the receive queue)
  collapse   a prune of a socket's receive buffer (tcp_collapse), first collapse
             -> the prune's end; with --losses each prune and the socket's rcvbuf
Losses per port: SYN and SYN-ACK retransmits, retransmits, resets sent and
received, listen overflows (SYNs and last ACKs dropped by a full accept queue;
needs fentry or kprobes), dropped packets, and segments merged by collapses.
A stage the kernel cannot show (accept needs fexit) is listed as unavailable,
with the reason; the others still run.

Examples:
  latprobe tcp --secs 30
  latprobe tcp --port 80 --port 443 --interval 10s
  latprobe tcp --by pid --port 8080 --secs 60       which worker accepted how many, how late
  latprobe tcp --slower 50ms --losses --format json  every wait over 50 ms, and every loss
  latprobe tcp --port 9092 --slower 5ms             waits over 5 ms, receive-buffer prunes among them
  latprobe tcp -- ./load-test";

/// How `latprobe tcp` keys its histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcpBy {
    /// The local port (the remote port for connections this machine makes)
    Port,
    /// The process that accepted, read or connected
    Pid,
}

#[derive(Args, Debug)]
pub struct TcpArgs {
    /// Only connections with this local or remote port; up to 8
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Vec<u16>,
    /// What each histogram is of
    #[arg(long, value_enum, default_value_t = TcpBy::Port)]
    pub by: TcpBy,
    /// Ports or processes that get their own histograms, the rest as "other"
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=latprobe_common::tcp::MAX_KEY_SLOTS as i64))]
    pub max_keys: u32,
    /// Print every wait slower than DUR (e.g. 50ms) as it ends, with its connection
    #[arg(long, value_name = "DUR", value_parser = duration::parse_arg)]
    pub slower: Option<u64>,
    /// Print every loss (retransmit, reset) as it happens, with its connection
    #[arg(long)]
    pub losses: bool,
    /// How to attach to the kernel functions of collapse and of listen
    /// overflows (accept and a listener's handshakes need fexit and fentry)
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Also print a report of each interval, e.g. 10s
    #[arg(long, value_name = "DUR", value_parser = duration::parse_interval)]
    pub interval: Option<u64>,
    /// text for people, json for one JSON object per line
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[arg(long, value_name = "FILE", help = HDR_LOG_HELP)]
    pub hdr_log: Option<std::path::PathBuf>,
    #[arg(long, value_name = "ADDR:PORT", help = LISTEN_HELP)]
    pub listen: Option<crate::metrics::ListenAddr>,
    #[command(flatten)]
    pub run: RunArgs,
}

const FLAME_EXAMPLES: &str = "\
Stacks are counted in the kernel; stacks that could not be captured (stack
map collisions, a full map) are counted and reported, never folded in.
Without -o or --folded, the SVG goes to stdout (to flame.svg on a terminal).

Examples:
  latprobe flame --kernel --secs 30 -o out.svg
  latprobe flame --pid 4242 --freq 199 --folded out.folded -o out.svg
  latprobe flame --offcpu --min-block 1ms --secs 10 -o offcpu.svg
  latprobe flame --kernel --during net_rx_action --slower 5ms -o tail.svg
  latprobe flame --user --kernel -o bench.svg -- ./my-benchmark";

#[derive(Args, Debug)]
pub struct FlameArgs {
    /// Kernel stacks (default: kernel and user)
    #[arg(long)]
    pub kernel: bool,
    /// User stacks (default: kernel and user)
    #[arg(long)]
    pub user: bool,
    /// Time blocked off-CPU instead of on-CPU samples
    #[arg(long)]
    pub offcpu: bool,
    /// With --offcpu: ignore waits shorter than DUR
    #[arg(long, value_name = "DUR", value_parser = duration::parse_arg, requires = "offcpu")]
    pub min_block: Option<u64>,
    /// On-CPU samples per second per CPU
    #[arg(long, value_name = "HZ", default_value_t = 99)]
    pub freq: u64,
    /// Only this CPU (on-CPU sampling)
    #[arg(long, value_name = "N")]
    pub cpu: Option<u32>,
    /// Write the SVG here
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
    /// Write the folded stacks here (for other flame-graph tools)
    #[arg(long, value_name = "FILE")]
    pub folded: Option<std::path::PathBuf>,
    /// Keep only stacks taken while a call of FUNC was in flight on that task
    /// and turned out slower than --slower: what the slow calls were doing
    #[arg(long, value_name = "FUNC", requires = "slower")]
    pub during: Option<String>,
    /// With --during: what counts as a slow call, e.g. 5ms
    #[arg(long, value_name = "DUR", value_parser = duration::parse_arg, requires = "during")]
    pub slower: Option<u64>,
    /// With --during: how to attach to a kernel FUNC
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Title of the SVG (default: what was sampled, where, how long)
    #[arg(long, value_name = "TEXT")]
    pub title: Option<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

const FN_EXAMPLES: &str = "\
Each function gets its own histogram, aggregated in the kernel per CPU; only
calls slower than --slower are sent to userspace one by one. Reports end at
--secs, Ctrl-C, SIGTERM, SIGHUP, or when COMMAND exits. Each second latprobe
weighs its probes' time (their programs, and a uprobe's traps, measured at
start) against --max-overhead (5% of all CPUs): over it, the costliest
function is detached, said on stderr, and the rest traced on.

Examples:
  latprobe fn net_rx_action --secs 30
  latprobe fn net_rx_action tcp_collapse --interval 10s --slower 10ms --stacks
  latprobe fn tcp_v4_rcv --cpu 3 --format json | jq .p999_ns
  latprobe fn inet_csk_accept --attach kprobe
  latprobe fn /usr/sbin/nginx:ngx_process_events_and_timers --pid 4242
  latprobe fn do_nanosleep -- sleep 1
  latprobe fn tcp_v4_rcv --interval 10s --hdr-log $(hostname).hlog
  latprobe fn tcp_v4_rcv --listen :9464        /metrics for Prometheus, on 127.0.0.1
  latprobe fn tcp_v4_rcv tcp_collapse --max-overhead 1   shed what costs over 1% of the CPUs";

#[derive(Args, Debug)]
pub struct FnArgs {
    /// Kernel function (net_rx_action) or user function (BINARY:SYMBOL); up to 8
    #[arg(required = true, value_name = "FUNC")]
    pub functions: Vec<String>,
    /// Also print a report of each interval, e.g. 10s
    #[arg(long, value_name = "DUR", value_parser = duration::parse_interval)]
    pub interval: Option<u64>,
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
    #[arg(long, value_name = "FILE", help = HDR_LOG_HELP)]
    pub hdr_log: Option<std::path::PathBuf>,
    #[arg(long, value_name = "ADDR:PORT", help = LISTEN_HELP)]
    pub listen: Option<crate::metrics::ListenAddr>,
    #[command(flatten)]
    pub run: RunArgs,
}

const RUNQSLOWER_EXAMPLES: &str = "\
A wait starts when a task is woken (sched_wakeup, sched_wakeup_new) or is
switched out while still runnable (preempted), and ends when it is switched in.
Each wait over THRESHOLD is printed with the task that ran on that CPU just
before (the culprit); the run ends with the delays summed per culprit. With
--stacks, each line carries the culprit's kernel stack as it was switched out.
Reports end at --secs, Ctrl-C, SIGTERM, SIGHUP, or when COMMAND exits.

Examples:
  latprobe runqslower 50ms --secs 60
  latprobe runqslower 10ms --comm nginx --stacks
  latprobe runqslower 5ms --pid 4242 --cpu 3 --format json | jq .prev_comm
  latprobe runqslower 50ms -- ./my-benchmark";

#[derive(Args, Debug)]
pub struct RunqslowerArgs {
    /// Print waits at least this long, e.g. 50ms (a unit is required)
    #[arg(value_name = "THRESHOLD", value_parser = duration::parse_arg)]
    pub threshold: u64,
    /// Only this thread
    #[arg(long, value_name = "TID", conflicts_with_all = ["command", "pid"])]
    pub tid: Option<u32>,
    /// Only tasks whose name (comm) starts with PREFIX
    #[arg(long, value_name = "PREFIX")]
    pub comm: Option<String>,
    /// Only waits that ended on this CPU
    #[arg(long, value_name = "N")]
    pub cpu: Option<u32>,
    /// The culprit's kernel stack with each wait
    #[arg(long)]
    pub stacks: bool,
    /// How to attach to the scheduler tracepoints
    #[arg(long, value_enum, default_value_t = TpMode::Auto)]
    pub attach: TpMode,
    /// text for people, json for one JSON object per line
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub run: RunArgs,
}

const RUNQLAT_EXAMPLES: &str = "\
Every wait for a CPU (from wakeup or preemption to switch-in) is counted in
the kernel, per CPU, in HDR buckets (within 1%); nothing per
context switch leaves the kernel. --per-pid gives the first --max-pids
processes seen a histogram each and counts the rest as \"other\", so memory
stays bounded: (max-pids + 1) x 30 KiB per CPU.

Examples:
  latprobe runqlat --secs 10
  latprobe runqlat --per-cpu --interval 1s --secs 10
  latprobe runqlat --per-pid --max-pids 8 --secs 30 --format json
  latprobe runqlat --pid 4242 --secs 10
  latprobe runqlat --secs 60 --format json > $(hostname).json   then: latprobe merge *.json
  latprobe runqlat --per-cpu --listen :9464    /metrics for Prometheus, on 127.0.0.1
  latprobe runqlat -- ./my-benchmark";

#[derive(Args, Debug)]
pub struct RunqlatArgs {
    /// One histogram per CPU (the CPU the wait ended on)
    #[arg(long, conflicts_with = "per_pid")]
    pub per_cpu: bool,
    /// One histogram per process, up to --max-pids, the rest as "other"
    #[arg(long)]
    pub per_pid: bool,
    /// Processes that get their own histogram with --per-pid
    #[arg(long, value_name = "N", default_value_t = 16, requires = "per_pid",
          value_parser = clap::value_parser!(u32).range(1..=latprobe_common::sched::MAX_PID_SLOTS as i64))]
    pub max_pids: u32,
    /// Also print a report of each interval, e.g. 10s
    #[arg(long, value_name = "DUR", value_parser = duration::parse_interval)]
    pub interval: Option<u64>,
    /// How to attach to the scheduler tracepoints
    #[arg(long, value_enum, default_value_t = TpMode::Auto)]
    pub attach: TpMode,
    /// text for people, json for one JSON object per line
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[arg(long, value_name = "FILE", help = HDR_LOG_HELP)]
    pub hdr_log: Option<std::path::PathBuf>,
    #[arg(long, value_name = "ADDR:PORT", help = LISTEN_HELP)]
    pub listen: Option<crate::metrics::ListenAddr>,
    #[command(flatten)]
    pub run: RunArgs,
}
