//! From one host to many: `--hdr-log` interval logs and `latprobe merge`,
//! with exact counts from the deterministic workload (a user function, so
//! these run wherever uprobes do: the host and every VM kernel).

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("latprobe-fleet-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `fn` on the workload's recursive function for `calls` calls that
/// each sleep `nap`, as one "host": its JSON report and HDR log in `dir`.
fn host_run(dir: &Path, host: &str, calls: &str, nap: &str) -> String {
    let w = workload();
    let func = format!("{w}:latprobe_workload_recurse");
    let log = dir.join(format!("{host}.hlog"));
    let log = log.to_str().unwrap();
    let run = latprobe(&[
        "fn",
        &func,
        "--interval",
        "1s",
        "--format",
        "json",
        "--hdr-log",
        log,
        "--",
        &w,
        "recurse",
        calls,
        "1",
        nap,
    ]);
    run.assert_success();
    std::fs::write(dir.join(format!("{host}.json")), &run.stdout).unwrap();
    func
}

fn merged(run: &Run) -> Vec<serde_json::Value> {
    run.assert_success();
    run.records()
}

/// 6 calls of 400 ms on one host, 40 of 2 ms on the other: merged, 46 calls,
/// the slow host on top, the extremes those of the hosts; the HDR logs'
/// intervals add up to the same counts as the final JSON reports.
#[test]
fn two_hosts_merge_exactly_from_json_and_from_hdr_logs() {
    if let Some(why) = bpf_unavailable() {
        return skip("two_hosts_merge_exactly_from_json_and_from_hdr_logs", &why);
    }
    let dir = scratch("two");
    let func = host_run(&dir, "slow-host", "6", "400ms");
    host_run(&dir, "fast-host", "40", "2ms");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();

    let rows = merged(&latprobe(&["merge", "--format", "json", &path("fast-host.json"), &path("slow-host.json")]));
    assert_eq!(rows.len(), 3, "two host rows and the merged one: {rows:?}");
    assert_eq!(rows[0]["host"], "slow-host", "the host with the worse p99.9 first: {rows:?}");
    assert_eq!(u64_of(&rows[0], "count"), 6);
    assert_eq!(u64_of(&rows[1], "count"), 40);
    let all = &rows[2];
    assert_eq!((all["type"].as_str(), all["period"].as_str()), (Some("histogram"), Some("merged")));
    assert_eq!(all["function"], func.as_str());
    assert_eq!(u64_of(all, "count"), 46);
    assert_eq!(u64_of(all, "max_ns"), u64_of(&rows[0], "max_ns"), "the slow host's max: {all}");
    assert_eq!(u64_of(all, "min_ns"), u64_of(&rows[1], "min_ns"), "the fast host's min: {all}");
    assert_eq!(u64_of(all, "sum_ns"), u64_of(&rows[0], "sum_ns") + u64_of(&rows[1], "sum_ns"));
    // 40 of the 46 calls are the fast host's: the merged p50 is one of them,
    // the merged p99 one of the slow host's.
    assert!(u64_of(all, "p50_ns") <= u64_of(&rows[1], "max_ns"), "{all}");
    assert!(u64_of(all, "p99_ns") >= 400_000_000, "{all}");

    let rows = merged(&latprobe(&["merge", "--format", "json", &path("fast-host.hlog"), &path("slow-host.hlog")]));
    let counts: Vec<u64> = rows.iter().map(|r| u64_of(r, "count")).collect();
    assert_eq!(counts, [6, 40, 46], "every interval of each log, summed: {rows:?}");

    // A merged result merges again, as a host of its own.
    let region = latprobe(&["merge", "--format", "json", &path("fast-host.json"), &path("slow-host.json")]);
    std::fs::write(dir.join("region-a.json"), &region.stdout).unwrap();
    let rows = merged(&latprobe(&["merge", "--format", "json", &path("region-a.json"), &path("fast-host.json")]));
    assert_eq!(u64_of(rows.last().unwrap(), "count"), 86, "{rows:?}");

    let text = latprobe(&["merge", &path("fast-host.json"), &path("slow-host.hlog")]);
    text.assert_success();
    assert!(text.stdout.contains(": 2 hosts, 46 in all"), "{}", text.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_hdr_log_path_fails_before_tracing() {
    let w = workload();
    let func = format!("{w}:latprobe_workload_recurse");
    let run = latprobe(&["fn", &func, "--hdr-log", "/nonexistent/dir/x.hlog", "--", &w, "recurse", "1", "1", "0us"]);
    assert_one_line_error(&run, "directory /nonexistent/dir does not exist");
    assert!(!run.stderr.contains("tracing"), "failed before attaching: {}", run.stderr);
}

#[test]
fn merge_refuses_what_is_not_a_report() {
    let dir = scratch("refuse");
    let text = dir.join("notes.txt");
    std::fs::write(&text, "net_rx_action [fentry] final 1.0s: 3 calls\n").unwrap();
    assert_one_line_error(&latprobe(&["merge", text.to_str().unwrap()]), "neither a JSON report");
    assert_one_line_error(&latprobe(&["merge", "/dev/zero"]), "not a regular file");
    assert_one_line_error(&latprobe(&["merge", "/nonexistent.json"]), "cannot open");
    let _ = std::fs::remove_dir_all(&dir);
}
