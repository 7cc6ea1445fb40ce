//! `--max-overhead`: latprobe holds its own programs to a share of the
//! machine's CPU, detaching what costs most and saying so, and still
//! reports exactly what it measured.
//!
//! Runs on the host and, through `xtask vm-test`, inside every kernel of the
//! VM matrix (uprobes and tracepoints work on all of them).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The workload's `workload: hot N calls in NS ns` lines: calls per second.
fn hot_rates(stderr: &str) -> Vec<f64> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("workload: hot ")?;
            let (calls, rest) = rest.split_once(" calls in ")?;
            let ns: f64 = rest.strip_suffix(" ns")?.parse().ok()?;
            Some(calls.parse::<f64>().ok()? * 1e9 / ns)
        })
        .collect()
}

fn final_cost(run: &Run) -> Value {
    run.records()
        .into_iter()
        .find(|r| r["type"] == "cost" && r["period"] == "final")
        .unwrap_or_else(|| panic!("no final cost record:\n{}\n{}", run.stdout, run.stderr))
}

/// Two user functions, one called as fast as the workload can (each call a
/// uprobe trap and two program runs) and one called three times. Over a
/// tiny budget the hot one is detached, the other traced to the end: its
/// three calls are all counted, and the workload runs many times faster
/// once latprobe's probes are off it.
#[test]
fn the_costliest_function_is_detached_and_the_workload_recovers() {
    if let Some(why) = bpf_unavailable() {
        return skip("the_costliest_function_is_detached_and_the_workload_recovers", &why);
    }
    let w = workload();
    let (hot, cold) = (format!("{w}:latprobe_workload_hot"), format!("{w}:latprobe_workload_recurse"));
    let run = latprobe(&[
        "fn",
        &hot,
        &cold,
        "--max-overhead",
        "0.1",
        "--format",
        "json",
        "--",
        &w,
        "hot",
        "10s",
        "250ms",
        "recurse",
        "3",
        "1",
        "10ms",
    ]);
    run.assert_success();
    assert!(
        run.stderr.contains(&format!("above --max-overhead 0.1%: detached {hot}, the costliest")),
        "{}",
        run.stderr
    );

    let h = run.final_histogram(&hot);
    assert_eq!(h["over_budget"], true, "{h}");
    assert!(u64_of(&h, "count") > 0, "{h}");
    let traced = h["seconds"].as_f64().unwrap();
    assert!((0.9..5.0).contains(&traced), "detached after its first judged second or so: {h}");
    let c = run.final_histogram(&cold);
    assert_eq!(u64_of(&c, "count"), 3, "the cheap function is traced to the end: {c}");
    assert!(c.get("over_budget").is_none(), "{c}");

    let cost = final_cost(&run);
    assert_eq!(cost["limit_percent"], 0.1, "{cost}");
    let shed = &cost["over_budget"][0];
    assert_eq!(shed["detached"], hot.as_str(), "{cost}");
    assert_eq!(shed["ended_run"], false, "{cost}");
    assert!(shed["cpu_percent"].as_f64().unwrap() > 0.1, "{cost}");
    // The run's cost still counts the detached function's calls: two
    // program runs each (fewer only for a call in flight at the end).
    assert!(u64_of(&cost, "runs") >= 2 * u64_of(&h, "count") + 6, "{cost}\n{h}");

    // Windows of 250 ms: the first two traced, the last full ones after
    // both probes of the hot function are gone (its return probe goes one
    // judged second after its entry). Inside emulated 6.1-rt, removing a
    // uprobe that a flood keeps hitting takes the kernel up to 3 s each.
    let rates = hot_rates(&run.stderr);
    assert!(rates.len() >= 36, "{}", run.stderr);
    let before = rates[0].max(rates[1]);
    let after = rates[rates.len() - 3].min(rates[rates.len() - 2]);
    eprintln!("{}: hot calls/s traced {before:.0}, after detaching {after:.0}", kernel_name());
    assert!(after > 5.0 * before, "throughput recovers: {rates:?}");
}

/// For a short user function the uprobe's trap, not its programs, is most
/// of what tracing it costs, and the budget counts it (measured at start on
/// latprobe's own code): the hot function goes over 10% of the machine in
/// all, however little of that its programs took, and the shed says both.
#[test]
fn a_uprobes_trap_counts_against_the_budget() {
    if let Some(why) = bpf_unavailable() {
        return skip("a_uprobes_trap_counts_against_the_budget", &why);
    }
    let w = workload();
    let hot = format!("{w}:latprobe_workload_hot");
    let run = latprobe(&["fn", &hot, "--max-overhead", "10", "--format", "json", "--", &w, "hot", "20s", "250ms"]);
    run.assert_success();
    let shed = &final_cost(&run)["over_budget"][0];
    assert_eq!(shed["detached"], hot.as_str(), "{shed}\n{}", run.stderr);
    let all = shed["cpu_percent"].as_f64().unwrap();
    let programs = shed["programs_cpu_percent"].as_f64().unwrap();
    eprintln!("{}: hot function's probes took {all:.1}% of the CPUs, {programs:.1}% in programs", kernel_name());
    assert!(all > 10.0, "{shed}");
    assert!(all > 2.0 * programs, "the traps are counted, and outweigh the programs: {shed}");
    assert!(run.stderr.contains("in its programs, the rest in uprobe traps) took"), "{}", run.stderr);
    let h = run.final_histogram(&hot);
    assert_eq!(h["over_budget"], true, "{h}");
    assert!(h["seconds"].as_f64().unwrap() < 10.0, "ended over budget, long before the workload's 20 s: {h}");
}

/// A command whose probes are one whole (runqlat) ends over budget, as if
/// its time were up: exit 0, the report of what it measured, the reason on
/// stderr and in the JSON, and the command it ran stopped.
#[test]
fn a_command_over_budget_ends_with_its_report() {
    if let Some(why) = bpf_unavailable() {
        return skip("a_command_over_budget_ends_with_its_report", &why);
    }
    let w = workload();
    let started = Instant::now();
    let run = latprobe(&[
        "runqlat",
        "--max-overhead",
        "0.001",
        "--secs",
        "60",
        "--format",
        "json",
        "--",
        &w,
        "pingpong",
        "100000000",
    ]);
    let took = started.elapsed();
    run.assert_success();
    assert!(took < Duration::from_secs(30), "ended over budget, long before --secs 60: {took:?}\n{}", run.stderr);
    assert!(run.stderr.contains("above --max-overhead 0.001%: detached every probe"), "{}", run.stderr);
    assert!(run.stderr.contains("ended the run"), "{}", run.stderr);
    let h = run
        .records()
        .into_iter()
        .find(|r| r["type"] == "histogram" && r["period"] == "final")
        .unwrap_or_else(|| panic!("no final histogram:\n{}\n{}", run.stdout, run.stderr));
    assert!(u64_of(&h, "count") > 0, "{h}");
    let shed = &final_cost(&run)["over_budget"][0];
    assert_eq!(shed["detached"], "every probe", "{shed}");
    assert_eq!(shed["ended_run"], true, "{shed}");
}

#[test]
fn a_bad_budget_is_refused_in_one_line() {
    for bad in ["0", "150", "5x", "-3"] {
        let run = latprobe(&["runqlat", &format!("--max-overhead={bad}")]);
        assert_one_line_error(&run, "give a percent above 0 and at most 100");
    }
}
