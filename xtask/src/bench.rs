//! `xtask bench`: what latprobe costs the traced code, next to the floor
//! (empty programs on the same attach points, latprobe's `floor` example)
//! and the peers it replaces, measured in the same VM run. Two groups: `fn`
//! and its peers time `vfs_read` under one-byte reads; `runqlat` and
//! `runqslower` and theirs trace the scheduler under a pipe ping-pong. The
//! table gives nanoseconds added per call, the programs' own runs and
//! nanoseconds per run, ratios to the floor and to the best peer, kernel
//! memory now and extrapolated to 64 and 256 CPUs, latprobe's start time
//! and RSS. Times come from software emulation: compare the ratios, not
//! the absolute numbers.

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::vm::{self, kernels::workspace_root};

const TARGET: &str = "x86_64-unknown-linux-musl";

/// The measurement, run inside the VM by busybox sh. Each row: start a tool,
/// wait until it is attached, time the workload ROUNDS times (the fastest is
/// kept), and read from /proc/PID/fdinfo what its BPF programs ran (the
/// kernel's `run_cnt` and `run_time_ns`, counted while
/// `kernel.bpf_stats_enabled` is 1 for the whole benchmark, so every row
/// pays the same two clock reads per run) and the memory its maps hold.
const SCRIPT: &str = r#"
N=${LATPROBE_BENCH_CALLS:-100000}
S=${LATPROBE_BENCH_SWITCHES:-20000}
ROUNDS=${LATPROBE_BENCH_ROUNDS:-7}
# Rows to run (an extended regular expression over their names); baselines
# always run. latprobe runs without its overhead budget, which would detach
# it mid-measurement: the peers have none.
ONLY=${LATPROBE_BENCH_ONLY:-.}
CPUS=$(awk -F- '{print ($2 == "" ? $1 : $2) + 1}' /sys/devices/system/cpu/possible)
STATS=$(cat /proc/sys/kernel/bpf_stats_enabled)
echo 1 >/proc/sys/kernel/bpf_stats_enabled

# The workload of a group: N one-byte reads (N vfs_read calls), or S pipe
# round trips between two threads on CPU 0 (2S wakeups and 2S switches).
once() {
  case $1 in
    read) workload read "$N" report ;;
    sched) workload pin 0 pingpong "$S" report ;;
  esac 2>&1 >/dev/null | sed -n 's/^elapsed_ns=//p'
}
# The fastest of ROUNDS: the host's other work only ever adds time to an
# emulated run (a vCPU thread preempted), so the minimum is the steadiest
# estimate of what the workload itself costs.
fastest() { sort -n | head -n1; }
rounds() { i=0; while [ $i -lt $ROUNDS ]; do once $1; i=$((i+1)); done | fastest; }
rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/$1/status; }
# Runs and run time summed over the process's BPF program fds.
prog_stats() { cat /proc/$1/fdinfo/* 2>/dev/null | awk '/^run_time_ns:/ {t+=$2} /^run_cnt:/ {c+=$2} END {printf "%.0f %.0f", c, t}'; }
# Map memory (fdinfo memlock) now, and at 64 and 256 CPUs: per-CPU maps
# (types 5, 6, 10, 21: percpu hash, array, LRU hash, cgroup storage) hold
# one value per possible CPU, so they scale by CPUS/possible; the others
# (hashes, arrays, ring buffers, stack maps, task storage) do not.
maps_kib() {
  for f in /proc/$1/fdinfo/*; do cat $f 2>/dev/null; echo END; done | awk -v cpus=$CPUS '
    /^map_type:/ {t=$2} /^memlock:/ {m=$2}
    /^END/ { if (t != "") { if (t == 5 || t == 6 || t == 10 || t == 21) p += m; else s += m }; t = ""; m = 0 }
    END { printf "%d %d %d", (s + p) / 1024, (s + p * 64 / cpus) / 1024, (s + p * 256 / cpus) / 1024 }'
}

# measure GROUP NAME FLOOR COMMAND...: time GROUP's workload alone (the
# row's own baseline: the emulated machine's speed drifts with the host's
# load), start a tool, wait until it says it is attached, time the workload
# again, read its programs' runs and memory, stop it. FLOOR names the floor
# row its overhead is compared with.
measure() {
  group=$1; name=$2; floor=$3; shift 3
  echo "$name" | grep -qE "$ONLY" || return 0
  base=$(rounds $group)
  : >/tmp/out.$name
  "$@" >/tmp/out.$name 2>&1 &
  pid=$!
  # Ready when it says so, or (libbpf-tools buffer their banner when piped)
  # when it has been up for 8 s holding BPF links.
  i=0
  until grep -qE 'racing|Attaching' /tmp/out.$name || { [ $i -ge 40 ] && grep -qs link_id /proc/$pid/fdinfo/*; }; do
    sleep 0.2; i=$((i+1))
    if [ $i -gt 300 ] || ! kill -0 $pid 2>/dev/null; then
      echo "$name: did not start:"; cat /tmp/out.$name; echo "$group $name $floor - - - - - - - - - -" >>/tmp/results
      kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; return
    fi
  done
  sleep 1
  before=$(prog_stats $pid)
  t=$(rounds $group)
  after=$(prog_stats $pid)
  if ! kill -0 $pid 2>/dev/null; then
    echo "$name: ended during the measurement:"; cat /tmp/out.$name; echo "$group $name $floor - - - - - - - - - -" >>/tmp/results
    wait $pid 2>/dev/null; return
  fi
  start=$(sed -n 's/.*attached \([0-9.]*\)ms after start.*/\1/p' /tmp/out.$name | head -n1)
  echo "$group $name $floor $t $(rss_kib $pid) $(maps_kib $pid) ${start:--} $before $after $base" >>/tmp/results
  kill -INT $pid; wait $pid 2>/dev/null
}
baseline() { t=$(rounds $1); echo "$1 $2 - $t - - - - - 0 0 0 0 $t" >>/tmp/results; }

: >/tmp/results
baseline read baseline
measure read floor-fentry - floor fn vfs_read
measure read floor-kprobe - floor kprobe vfs_read
# What timing alone costs (two clock reads, a start per task): the floor of
# any latency tool, which the empty pair leaves out.
measure read floor-timed floor-fentry floor timed vfs_read
measure read latprobe-fentry floor-fentry latprobe -v fn vfs_read --max-overhead off
measure read latprobe-kprobe floor-kprobe latprobe -v fn vfs_read --attach kprobe --max-overhead off
# A second function: its maps' growth is one traced function's memory.
measure read latprobe-2-functions floor-fentry latprobe -v fn vfs_read vfs_write --max-overhead off
[ -x /bin/funclatency ] && measure read funclatency floor-kprobe funclatency vfs_read
[ -x /bin/bpftrace ] && measure read bpftrace-kprobe floor-kprobe bpftrace -e 'kprobe:vfs_read { @s[tid] = nsecs; } kretprobe:vfs_read /@s[tid]/ { @ns = hist(nsecs - @s[tid]); delete(@s[tid]); }'
[ -x /bin/bpftrace ] && measure read bpftrace-kfunc floor-fentry bpftrace -e 'kfunc:vfs_read { @s[tid] = nsecs; } kretfunc:vfs_read /@s[tid]/ { @ns = hist(nsecs - @s[tid]); delete(@s[tid]); }'
baseline read baseline-again
baseline sched baseline
measure sched floor-sched - floor sched
measure sched floor-timed-sched floor-sched floor timed-sched
measure sched latprobe-runqlat floor-sched latprobe -v runqlat --max-overhead off
measure sched latprobe-runqslower floor-sched latprobe -v runqslower 10ms --max-overhead off
[ -x /bin/runqlat ] && measure sched runqlat floor-sched runqlat
[ -x /bin/runqslower ] && measure sched runqslower floor-sched runqslower 10000
[ -x /bin/bpftrace ] && measure sched bpftrace-runqlat floor-sched bpftrace -e 'tracepoint:sched:sched_wakeup,tracepoint:sched:sched_wakeup_new { @q[args->pid] = nsecs; } tracepoint:sched:sched_switch { if (args->prev_state == 0) { @q[args->prev_pid] = nsecs; } $t = @q[args->next_pid]; if ($t) { @us = hist((nsecs - $t) / 1000); delete(@q[args->next_pid]); } }'
[ -x /bin/bpftrace ] && measure sched bpftrace-runqslower floor-sched bpftrace -e 'tracepoint:sched:sched_wakeup,tracepoint:sched:sched_wakeup_new { @q[args->pid] = nsecs; } tracepoint:sched:sched_switch { if (args->prev_state == 0) { @q[args->prev_pid] = nsecs; } $t = @q[args->next_pid]; if ($t) { if (nsecs - $t > 10000000) { printf("%s %d %d\n", args->next_comm, args->next_pid, (nsecs - $t) / 1000); } delete(@q[args->next_pid]); } }'
baseline sched baseline-again
echo $STATS >/proc/sys/kernel/bpf_stats_enabled

echo "kernel $(uname -r), $CPUS CPUs; fastest of $ROUNDS rounds of: read = $N vfs_read calls, sched = $S pipe round trips on one CPU (2 wakeups, 2 switches each)"
echo "ns/call: whole workload per call; added: over the same workload timed alone just before the tool started; x floor: added / the floor row's added; x best peer: added / the lowest peer's added"
echo "runs/call and prog ns: the tool's BPF program runs per call and ns per run (kernel.bpf_stats_enabled); maps KiB at $CPUS CPUs, @64/@256: per-CPU maps scaled by CPUs"
awk -v n="$N" -v s="$S" -v rounds="$ROUNDS" '
  { k = NR; g[k] = $1; name[k] = $2; fl[k] = $3; t[k] = $4; rss[k] = $5; mem[k] = $6; m64[k] = $7; m256[k] = $8; st[k] = $9
    calls = ($1 == "read") ? n : s
    if ($4 != "-") {
      if ($2 == "baseline") base[$1] = $4 / calls
      per[k] = $4 / calls; add[k] = per[k] - $14 / calls; added[$2] = add[k]
      runs[k] = ($12 - $10) / (calls * rounds); nsrun[k] = ($12 > $10) ? ($13 - $11) / ($12 - $10) : 0
      if ($2 !~ /^(baseline|floor|latprobe)/ && (!($1 in best) || add[k] < best[$1])) best[$1] = add[k]
    }
  }
  END {
    printf "%-20s %8s %7s %7s %11s %9s %7s %8s %8s %8s %9s %8s\n", "tool", "ns/call", "added", "x floor", "x best peer", "runs/call", "prog ns", "RSS KiB", "maps KiB", "@64 CPUs", "@256 CPUs", "start ms"
    for (i = 1; i <= k; i++) {
      if (i > 1 && g[i] != g[i-1]) print ""
      if (t[i] == "-") { printf "%-20s %8s\n", name[i], "failed"; continue }
      xf = (fl[i] in added && added[fl[i]] > 0) ? sprintf("%.2fx", add[i] / added[fl[i]]) : ""
      xp = (name[i] !~ /^(baseline|floor)/ && best[g[i]] > 0) ? sprintf("%.2fx", add[i] / best[g[i]]) : ""
      if (name[i] ~ /^baseline/) { printf "%-20s %8.0f %7.0f\n", name[i], per[i], per[i] - base[g[i]]; continue }
      printf "%-20s %8.0f %7.0f %7s %11s %9.2f %7.0f %8s %8s %8s %9s %8s\n", name[i], per[i], add[i], xf, xp, runs[i], nsrun[i], rss[i], mem[i], m64[i], m256[i], st[i]
      row[name[i]] = i
    }
    split("latprobe-fentry floor-timed latprobe-runqlat floor-timed-sched latprobe-runqslower floor-timed-sched", over)
    for (j = 1; j < 6; j += 2) {
      a = row[over[j]]; b = row[over[j+1]]
      if (a && b && add[b] > 0 && nsrun[b] > 0) {
        if (!said++) print ""
        printf "%s over the timing-only floor (%s): %.2fx the time added, %.2fx the program ns per run\n", over[j], over[j+1], add[a] / add[b], nsrun[a] / nsrun[b]
      }
    }
    if (("latprobe-fentry" in row) && ("latprobe-2-functions" in row)) {
      a = row["latprobe-fentry"]; b = row["latprobe-2-functions"]
      printf "\none more traced function (latprobe-2-functions - latprobe-fentry): %d KiB of maps, %d KiB at 64 CPUs, %d KiB at 256 CPUs\n", mem[b] - mem[a], m64[b] - m64[a], m256[b] - m256[a]
    }
  }' /tmp/results
"#;

pub fn run(kernel: &str) -> Result<ExitCode> {
    let kernels = vm::select(kernel)?;
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--target", TARGET, "-p", "latprobe", "--bin", "latprobe", "--examples"])
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("building latprobe for {TARGET} failed");
    }
    let release = workspace_root().join("target").join(TARGET).join("release");
    let mut adds = vec![release.join("latprobe"), release.join("examples/workload"), release.join("examples/floor")];
    for peer in ["/usr/sbin/funclatency", "/usr/sbin/runqlat", "/usr/sbin/runqslower", "/usr/bin/bpftrace"] {
        let p = PathBuf::from(peer);
        if p.is_file() {
            adds.push(p);
        } else {
            eprintln!("xtask: {peer} is not installed (scripts/setup installs it): not measured");
        }
    }
    let command = vec!["sh".to_string(), "-c".to_string(), SCRIPT.to_string()];
    let failed = vm::run_on(&kernels, &adds, &command, &vm::forwarded_env(), Duration::from_secs(3600))?;
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
