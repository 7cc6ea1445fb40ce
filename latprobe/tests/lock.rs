//! `latprobe lock` against real kernels, with workloads that contend on
//! known kernel locks: a directory's inode lock (threads creating and
//! unlinking files in it) and a process's mmap lock (threads mapping and
//! unmapping memory).
//!
//! Runs on the host and, through `xtask vm-test`, inside every kernel of the
//! VM matrix. Tests share kernel state: run them with `--test-threads=1`.
//!
//! The runs that must see their whole workload have `--max-overhead off`:
//! under emulation these contended workloads cost more than the default
//! budget (5–9% of 2 CPUs on 6.1-rt), which would end them early. The
//! spinlock storm keeps the budget: it ends after a second, as on a server.

mod common;

use common::*;
use serde_json::Value;

fn locks(run: &Run) -> Vec<Value> {
    run.records().into_iter().filter(|r| r["type"] == "lock" && r["period"] == "final").collect()
}

/// The final summary: every wait counted, what was lost.
fn summary(run: &Run) -> Value {
    run.records()
        .into_iter()
        .find(|r| r["type"] == "lock_summary" && r["period"] == "final")
        .unwrap_or_else(|| panic!("no final lock_summary:\n{}\n{}", run.stdout, run.stderr))
}

/// Whether a lock is a read/write semaphore: `rwsem`, or on PREEMPT_RT the
/// `rwbase-rt` it is built on, or the `rt_mutex` inside that, which is what
/// the contention tracepoints report for a writer there.
fn is_rwsem(lock: &Value) -> bool {
    lock["lock_kind"].as_str().is_some_and(|k| k.starts_with("rwsem") || k.starts_with("rwbase-rt") || k == "rt_mutex")
}

/// The contended locks whose waiters were in one of `callers`.
fn taken_in<'a>(locks: &'a [Value], callers: &[&str]) -> Vec<&'a Value> {
    locks.iter().filter(|l| l["caller"].as_str().is_some_and(|c| callers.iter().any(|want| c.contains(want)))).collect()
}

/// Why `lock` cannot trace here: the contention tracepoints came in Linux
/// 5.19 (its own test below checks the error it gives without them).
fn contention_unavailable() -> Option<String> {
    bpf_unavailable().or_else(|| {
        // Every tracepoint has a `btf_trace_<name>` type in the kernel's BTF
        // (kallsyms lists the tracepoint itself only with KALLSYMS_ALL).
        let btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap_or_default();
        let needle = b"btf_trace_contention_begin\0";
        (!btf.windows(needle.len()).any(|w| w == needle))
            .then(|| format!("kernel {} has no lock:contention_begin tracepoint (Linux 5.19+)", kernel_name()))
    })
}

/// `lock --top 50 --format json FLAGS -- workload STEPS…`, without a budget
/// (see above): a run that must see its whole workload.
fn lock_whole(flags: &[&str], steps: &[&str]) -> Run {
    let w = workload();
    let mut args = vec!["lock", "--top", "50", "--format", "json", "--max-overhead", "off"];
    args.extend(flags);
    args.extend(["--", w.as_str()]);
    args.extend(steps);
    latprobe(&args)
}

#[test]
fn lock_without_contention_tracepoints_fails_in_one_line() {
    if let Some(why) = bpf_unavailable() {
        return skip("lock_without_contention_tracepoints_fails_in_one_line", &why);
    }
    if contention_unavailable().is_none() {
        return skip("lock_without_contention_tracepoints_fails_in_one_line", "this kernel has the tracepoints");
    }
    let run = latprobe(&["lock", "--secs", "1"]);
    assert_one_line_error(&run, "the lock contention tracepoints need Linux 5.19 or newer");
}

#[test]
fn lock_names_a_directorys_inode_lock_and_its_waiters() {
    if let Some(why) = contention_unavailable() {
        return skip("lock_names_a_directorys_inode_lock_and_its_waiters", &why);
    }
    let run = lock_whole(&[], &["dir-churn", "4", "3000"]);
    run.assert_success();
    let locks = locks(&run);
    // Creating takes the directory's lock for writing in filename_create or,
    // through open(O_CREAT), in open_last_lookups; unlinking in do_unlinkat.
    let inode = taken_in(&locks, &["filename_create", "open_last_lookups", "do_unlinkat", "path_openat"]);
    let rwsem: Vec<&&Value> = inode.iter().filter(|l| is_rwsem(l)).collect();
    assert!(!rwsem.is_empty(), "no rwsem contention in the create/unlink path:\n{}", run.stdout);
    // Only the workload was traced: it is every lock's one waiting
    // process, and its waits there are the lock's, exactly.
    let s = summary(&run);
    assert_eq!(u64_of(&s, "unattributed_waits"), 0, "{s}");
    let pids: Vec<u64> = locks.iter().map(|l| u64_of(&l["waiters"][0], "pid")).collect();
    assert!(pids.windows(2).all(|p| p[0] == p[1]), "one process waited: {pids:?}");
    for lock in &locks {
        assert_eq!(u64_of(lock, "processes"), 1, "{lock}");
        assert_eq!(lock["waiters"][0]["comm"], "workload", "{lock}");
        assert_eq!(u64_of(&lock["waiters"][0], "waits"), u64_of(lock, "count"), "{lock}");
        assert_eq!(u64_of(&lock["waiters"][0], "wait_ns"), u64_of(lock, "total_ns"), "{lock}");
    }
    // The report adds up: the ranked locks are within the summary's totals.
    let counted: u64 = locks.iter().map(|l| u64_of(l, "count")).sum();
    assert!(counted <= u64_of(&s, "waits") && u64_of(&s, "waits") > 0, "{s}");
    assert_eq!(u64_of(&s, "untimed_task_table_full") + u64_of(&s, "uncounted_lock_table_full"), 0, "{s}");
}

#[test]
fn lock_names_the_mmap_lock_by_kind_and_caller() {
    if let Some(why) = contention_unavailable() {
        return skip("lock_names_the_mmap_lock_by_kind_and_caller", &why);
    }
    let run = lock_whole(&["--stacks"], &["mmap-churn", "4", "3000"]);
    run.assert_success();
    let locks = locks(&run);
    // A lock is named after the caller its waiters waited from longest: a
    // map, an unmap, the page fault that touched the new mapping (which
    // takes it for reading), or a worker thread exiting (exit_mm, inlined
    // into do_exit, takes it too).
    let callers = [
        "vm_mmap",
        "vm_munmap",
        "do_mmap",
        "munmap",
        "lock_mm_and_find_vma",
        "do_user_addr_fault",
        "exc_page_fault",
        "exit_mm",
        "do_exit",
    ];
    let mmap = taken_in(&locks, &callers);
    let rwsem: Vec<&&Value> = mmap.iter().filter(|l| is_rwsem(l)).collect();
    assert!(!rwsem.is_empty(), "no rwsem contention in the mmap/munmap path:\n{}", run.stdout);
    // One lock (this process's mm) takes the waits of map, unmap and fault alike.
    let top = rwsem[0];
    assert!(u64_of(top, "count") > 0 && u64_of(top, "max_ns") > 0, "{top}");
    assert!(u64_of(top, "p50_ns") <= u64_of(top, "max_ns"), "{top}");
    // --stacks: its waiters' stacks, most waited first, within its waits,
    // the first of them through the mmap path.
    let stacks = top["stacks"].as_array().unwrap_or_else(|| panic!("no stacks: {top}"));
    assert!(!stacks.is_empty() && stacks.len() <= 3, "{top}");
    let waits: Vec<u64> = stacks.iter().map(|st| u64_of(st, "wait_ns")).collect();
    assert!(waits.windows(2).all(|w| w[0] >= w[1]), "most waited first: {waits:?}");
    assert!(stacks.iter().map(|st| u64_of(st, "waits")).sum::<u64>() <= u64_of(top, "count"), "{top}");
    let frames: Vec<&str> =
        stacks[0]["frames"].as_array().into_iter().flatten().filter_map(|f| f["symbol"].as_str()).collect();
    assert!(
        frames.iter().any(|f| callers.iter().any(|c| f.contains(c))),
        "the most waited stack runs through the mmap path: {frames:?}"
    );
}

#[test]
fn lock_names_the_process_holding_a_lock_its_waiters_wait_on() {
    let name = "lock_names_the_process_holding_a_lock_its_waiters_wait_on";
    if let Some(why) = contention_unavailable() {
        return skip(name, &why);
    }
    let w = workload();
    let dir = std::env::temp_dir().join(format!("latprobe-holder-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("test directory");
    let shared = dir.display().to_string();
    // Two processes create and unlink files in one directory: each create
    // and unlink holds the directory's lock. Only the second is traced: some
    // of its waits are on the lock while the first (untraced) one holds it.
    // The other runs for longer than the traced one could; stopped after.
    let mut other = std::process::Command::new(&w)
        .args(["dir-churn-in", &shared, "2", "1000000"])
        .spawn()
        .expect("start the other");
    let run = lock_whole(&[], &["dir-churn-in", &shared, "2", "3000"]);
    let _ = other.kill();
    let _ = other.wait();
    let _ = std::fs::remove_dir_all(&dir);
    run.assert_success();
    let locks = locks(&run);
    let held_by_other: Vec<&Value> = locks
        .iter()
        .filter(|l| l["holders"].as_array().into_iter().flatten().any(|h| u64_of(h, "pid") == u64::from(other.id())))
        .collect();
    assert!(!held_by_other.is_empty(), "no lock held by the other process (pid {}):\n{}", other.id(), run.stdout);
    let lock = held_by_other[0];
    assert!(is_rwsem(lock), "the directory's lock, a rwsem (or an rt_mutex on PREEMPT_RT): {lock}");
    let holders = lock["holders"].as_array().expect("holders");
    let caused: u64 = holders.iter().map(|h| u64_of(h, "waits")).sum();
    assert!(caused > 0 && caused <= u64_of(lock, "count"), "the holders caused at most the lock's waits: {lock}");
    assert!(holders.iter().all(|h| h["comm"] == "workload"), "{lock}");
    eprintln!(
        "dir-churn-in on {}: {} waits on the directory's {}, {caused} while a known task held it",
        kernel_name(),
        u64_of(lock, "count"),
        lock["lock_kind"]
    );
}

#[test]
fn lock_names_a_contended_spinlock_and_where_it_is_taken() {
    if let Some(why) = contention_unavailable() {
        return skip("lock_names_a_contended_spinlock_and_where_it_is_taken", &why);
    }
    let w = workload();
    // For 2 s, four threads ask to wake 256 waiters of a futex that wait for
    // another bit: each call walks them all under the futex's hash-bucket
    // lock. (An emulated guest switches its CPUs only every so often: the
    // lock must be held most of the time to be found held at a switch.)
    let run = latprobe(&["lock", "--top", "50", "--format", "json", "--", &w, "futex-churn", "4", "2s"]);
    run.assert_success();
    let locks = locks(&run);
    let futex = taken_in(&locks, &["futex"]);
    let rt = std::fs::read_to_string("/sys/kernel/realtime").is_ok_and(|r| r.trim() == "1");
    if futex.is_empty() && !rt && kernel_name() != "host" {
        // The test VMs run both CPUs on one host thread, switching between
        // them now and then: a spinlock (never preempted while held) is only
        // contended when a switch lands inside it, which 2 s of this
        // workload did not see on 6.1 or 6.12. PREEMPT_RT's sleeping
        // spinlocks and the host's real CPUs are contended.
        return skip(
            "lock_names_a_contended_spinlock_and_where_it_is_taken",
            "no spinlock was contended: this emulated guest runs its CPUs one at a time",
        );
    }
    assert!(!futex.is_empty(), "no contention in the futex path:\n{}", run.stdout);
    // A spinlock; on PREEMPT_RT a spinlock_t sleeps, built on an rt_mutex.
    let want = if rt { ["rt_mutex", "rwbase-rt"] } else { ["spinlock", "spinlock"] };
    let top = futex[0];
    assert!(want.iter().any(|k| top["lock_kind"] == *k), "a {want:?}: {top}");
    assert_eq!(top["waiters"][0]["comm"], "workload", "{top}");
    eprintln!(
        "futex-churn on {}: {} waits on a {} in {}",
        kernel_name(),
        u64_of(top, "count"),
        top["lock_kind"],
        top["caller"]
    );
}

/// linux-perf's `perf`, where installed (the VM images do not carry it).
fn perf() -> Option<&'static str> {
    ["/usr/bin/perf", "/usr/sbin/perf"].into_iter().find(|p| std::path::Path::new(p).exists())
}

#[test]
fn lock_counts_agree_with_perf_lock_contention() {
    if let Some(why) = contention_unavailable() {
        return skip("lock_counts_agree_with_perf_lock_contention", &why);
    }
    let Some(perf) = perf() else {
        return skip("lock_counts_agree_with_perf_lock_contention", "linux-perf is not installed");
    };
    let dir = std::env::temp_dir().join(format!("latprobe-perf-lock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for perf's data");
    let data = dir.join("perf.data");
    // Both read the same tracepoints over the same workload.
    // latprobe for tasks with the workload's own name on the whole machine
    // (unique, so that no other workload counts), perf for the process it
    // starts and nothing else.
    let name = format!("lkperf{}", std::process::id() % 100_000);
    // perf has no budget: latprobe must not end before the workload either.
    let t = start_tracing(&["lock", "--comm", &name, "--top", "100", "--format", "json", "--max-overhead", "off"]);
    let recorded = std::process::Command::new(perf)
        .args(["lock", "record", "-o", data.to_str().unwrap(), "--", &workload(), "rename", &name])
        .args(["mmap-churn", "4", "6000"])
        .output()
        .expect("run perf lock record");
    assert!(recorded.status.success(), "perf lock record: {}", String::from_utf8_lossy(&recorded.stderr));
    t.signal(libc::SIGINT);
    let run = t.finish();
    run.assert_success();
    let report = std::process::Command::new(perf)
        .args(["lock", "contention", "-i", data.to_str().unwrap(), "-E", "100000"])
        .output()
        .expect("run perf lock contention");
    let text = String::from_utf8_lossy(&report.stdout).into_owned() + &String::from_utf8_lossy(&report.stderr);
    let theirs: u64 = text.lines().filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum();
    let _ = std::fs::remove_dir_all(&dir);
    let ours = u64_of(&summary(&run), "waits");
    assert!(theirs >= 20, "perf saw little contention ({theirs}):\n{text}");
    // perf's own lost events, and its start before the workload's exec,
    // allow a small difference.
    let tolerance = theirs / 20 + 5;
    assert!(
        ours.abs_diff(theirs) <= tolerance,
        "latprobe counted {ours} waits, perf {theirs}:\n{text}\n{}",
        run.stdout
    );
    eprintln!("lock: latprobe counted {ours} waits, perf lock contention {theirs}");
}

#[test]
fn lock_during_counts_only_the_waits_inside_slow_calls() {
    if let Some(why) = kernel_probes_unavailable().or_else(contention_unavailable) {
        return skip("lock_during_counts_only_the_waits_inside_slow_calls", &why);
    }
    // Four threads map, touch and unmap 3000 times each: 12,000 munmap calls,
    // contending on the mmap lock with each other's maps and page faults.
    let during = |slower: &str| {
        // Every call must be counted: no budget (see above).
        let run = lock_whole(&["--during", "__x64_sys_munmap", "--slower", slower], &["mmap-churn", "4", "3000"]);
        run.assert_success();
        run
    };
    // Every munmap call of the workload is counted, or said to be missed:
    // the 12,000 it makes, and the few its runtime makes (thread stacks).
    // A call is missed when the kernel skips latprobe's program at its entry
    // or return (never re-entered on one CPU: on PREEMPT_RT, where programs
    // can be preempted, that happens). The kernel's skip counts include
    // other processes' calls: a few more than the workload's are possible.
    let least = 12_000;
    let accounted = |calls: &Value| {
        let n = u64_of(calls, "calls")
            + u64_of(calls, "entries_missed")
            + u64_of(calls, "exits_missed")
            + u64_of(calls, "untimed_calls");
        eprintln!("--during on {}: {n} munmap calls accounted for: {calls}", kernel_name());
        assert!((least..=12_064).contains(&n), "every munmap call of the workload, or its loss: {calls}");
    };
    let run = during("1us");
    let calls = &summary(&run)["during"];
    accounted(calls);
    let slow = u64_of(calls, "slow_calls");
    assert!(slow > 0 && slow <= u64_of(calls, "calls"), "{calls}");
    // Only waits inside munmap: none taken in mmap or in a page fault.
    let counted = locks(&run);
    assert!(!counted.is_empty(), "munmap calls waited on the mmap lock:\n{}", run.stdout);
    let elsewhere = taken_in(&counted, &["vm_mmap_pgoff", "do_mmap", "exc_page_fault", "do_user_addr_fault"]);
    assert!(elsewhere.is_empty(), "waits outside munmap were counted: {elsewhere:?}");
    // No call is that slow: nothing is counted.
    let run = during("100s");
    let calls = &summary(&run)["during"];
    accounted(calls);
    assert_eq!(u64_of(calls, "slow_calls"), 0, "{calls}");
    assert!(locks(&run).is_empty(), "waits of fast calls were counted:\n{}", run.stdout);
}

/// `lock --listen --hdr-log` over the workload's directory churn, traced
/// by its name on the whole machine: once it has exited, each lock with a
/// histogram has in a scrape exactly the waits of the final report, under
/// the key `lock=NAME` or `lock=0xADDR`, and the interval log adds up to
/// the same waits.
#[test]
fn lock_serves_and_logs_each_locks_histogram() {
    if let Some(why) = contention_unavailable() {
        return skip("lock_serves_and_logs_each_locks_histogram", &why);
    }
    let dir = std::env::temp_dir().join(format!("latprobe-lock-listen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("locks.hlog");
    let log = log.to_str().unwrap();
    // The scrape, the report and the log must agree on every wait: under
    // emulated PREEMPT_RT, this contention costs more than the default budget.
    let args =
        ["lock", "--top", "100", "--comm", "workload", "--listen", ":0", "--hdr-log", log, "--max-overhead", "off"];
    let tracing = start_tracing(&[&args[..], &["--format", "json", "--secs", "300", "--interval", "1s"]].concat());
    let addr = metrics_address(tracing.said());
    let status = std::process::Command::new(workload()).args(["dir-churn", "4", "3000"]).status().unwrap();
    assert!(status.success(), "workload dir-churn: {status}");
    // Published twice a second: after 1.5 s the scrape has every wait.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (code, metrics) = http_get(&addr, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    tracing.signal(libc::SIGINT);
    let run = tracing.finish();
    run.assert_success();

    let with_histograms: Vec<Value> =
        locks(&run).into_iter().filter(|l| l["period"] == "final" && !l["p50_ns"].is_null()).collect();
    assert!(!with_histograms.is_empty(), "the workload contended: {}", run.stdout);
    let mut total = 0;
    for lock in &with_histograms {
        let key = format!("lock={}", lock["name"].as_str().or(lock["lock"].as_str()).unwrap());
        let scraped = sample(&metrics, "latprobe_latency_seconds_count", &format!("key=\"{key}\"}}"));
        assert_eq!(scraped, Some(u64_of(lock, "count") as f64), "{key} in\n{metrics}\n{}", run.stdout);
        total += u64_of(lock, "count");
    }
    let scraped_locks = metrics.lines().filter(|l| l.starts_with("latprobe_latency_seconds_count{")).count();
    assert_eq!(scraped_locks, with_histograms.len(), "{metrics}");
    assert_eq!(sample(&metrics, "latprobe_lost_total", "uncounted_lock_table_full"), Some(0.0), "{metrics}");

    let merged = latprobe(&["merge", "--format", "json", log]);
    merged.assert_success();
    let logged: u64 = merged.records().iter().filter(|r| r["type"] == "histogram").map(|r| u64_of(r, "count")).sum();
    assert_eq!(logged, total, "every interval of the log, summed:\n{}", merged.stdout);
    println!(
        "{}: {} locks with histograms, {total} waits in the scrape, the report and the log",
        kernel_name(),
        scraped_locks
    );
    let _ = std::fs::remove_dir_all(&dir);
}
