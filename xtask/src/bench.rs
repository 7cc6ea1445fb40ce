//! `xtask bench`: what latprobe costs the traced code, next to the peers it
//! replaces, measured in the same VM run. Every tool times the same function
//! (`vfs_read`) while the same workload makes the same calls; the table gives
//! nanoseconds added per call and memory held, and the ratio of each peer's
//! overhead to latprobe's. Times come from software emulation: compare the
//! ratios, not the absolute numbers.

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::vm::{self, kernels::workspace_root};

const TARGET: &str = "x86_64-unknown-linux-musl";

/// The measurement, run inside the VM by busybox sh.
const SCRIPT: &str = r#"
N=${LATPROBE_BENCH_CALLS:-100000}
ROUNDS=${LATPROBE_BENCH_ROUNDS:-5}
once() { workload read "$N" report 2>&1 >/dev/null | sed -n 's/^elapsed_ns=//p'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rounds() { i=0; while [ $i -lt $ROUNDS ]; do once; i=$((i+1)); done | median; }
memlock_kib() { cat /proc/$1/fdinfo/* 2>/dev/null | awk '/^memlock:/ {s+=$2} END {print int(s/1024)}'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' /proc/$1/status; }

# measure NAME COMMAND...: start a tracer, wait until it says it is attached,
# time the workload, read its memory, stop it.
measure() {
  name=$1; shift
  : >/tmp/out.$name
  "$@" >/tmp/out.$name 2>&1 &
  pid=$!
  # Ready when it says so, or (funclatency buffers its banner when piped)
  # when it has been up for 8 s holding BPF links.
  i=0
  until grep -qE 'racing|Attaching' /tmp/out.$name || { [ $i -ge 40 ] && grep -qs link_id /proc/$pid/fdinfo/*; }; do
    sleep 0.2; i=$((i+1))
    if [ $i -gt 300 ] || ! kill -0 $pid 2>/dev/null; then
      echo "$name: did not start:"; cat /tmp/out.$name; echo "$name - - -" >>/tmp/results
      kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; return
    fi
  done
  sleep 1
  t=$(rounds)
  echo "$name $t $(rss_kib $pid) $(memlock_kib $pid)" >>/tmp/results
  kill -INT $pid; wait $pid 2>/dev/null
}

: >/tmp/results
echo "baseline $(rounds) - -" >>/tmp/results
measure latprobe-fentry latprobe fn vfs_read
measure latprobe-kprobe latprobe fn vfs_read --attach kprobe
[ -x /bin/funclatency ] && measure funclatency funclatency vfs_read
[ -x /bin/bpftrace ] && measure bpftrace-kprobe bpftrace -e 'kprobe:vfs_read { @s[tid] = nsecs; } kretprobe:vfs_read /@s[tid]/ { @ns = hist(nsecs - @s[tid]); delete(@s[tid]); }'
[ -x /bin/bpftrace ] && measure bpftrace-kfunc bpftrace -e 'kfunc:vfs_read { @s[tid] = nsecs; } kretfunc:vfs_read /@s[tid]/ { @ns = hist(nsecs - @s[tid]); delete(@s[tid]); }'
echo "baseline-again $(rounds) - -" >>/tmp/results

echo "kernel $(uname -r), $N vfs_read calls per round, median of $ROUNDS rounds"
awk -v n="$N" '
  $1 == "baseline" { base = $2 }
  { name[NR] = $1; t[NR] = $2; rss[NR] = $3; mem[NR] = $4 }
  $1 == "latprobe-fentry" { ours = ($2 - base) / n }
  END {
    printf "%-18s %10s %12s %12s %9s %12s\n", "tool", "ns/call", "added ns", "vs latprobe", "RSS KiB", "BPF maps KiB"
    for (i = 1; i <= NR; i++) {
      if (t[i] == "-") { printf "%-18s %10s\n", name[i], "failed"; continue }
      per = t[i] / n; added = (t[i] - base) / n
      ratio = (name[i] ~ /^baseline/ || ours <= 0) ? "" : sprintf("%.2fx", added / ours)
      printf "%-18s %10.0f %12.0f %12s %9s %12s\n", name[i], per, added, ratio, rss[i], mem[i]
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
    let mut adds = vec![release.join("latprobe"), release.join("examples/workload")];
    for peer in ["/usr/sbin/funclatency", "/usr/bin/bpftrace"] {
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
