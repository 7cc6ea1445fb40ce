//! `latprobe doctor`: its kernel facts are this kernel's, and what it says
//! of each command is what the command does when run on its own.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn doctor_says_what_each_command_does_on_this_kernel() {
    let name = "doctor_says_what_each_command_does_on_this_kernel";
    if let Some(why) = bpf_unavailable() {
        return skip(name, &why);
    }
    let run = latprobe(&["doctor", "--format", "json"]);
    run.assert_success();
    let records = run.records();
    let kernel = records.iter().find(|r| r["type"] == "doctor_kernel").expect("the kernel's facts");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_eq!(kernel["release"], release.trim(), "{kernel}");
    let rt = std::fs::read_to_string("/sys/kernel/realtime").is_ok_and(|r| r.trim() == "1");
    assert_eq!(kernel["preempt_rt"], rt, "{kernel}");
    assert!(u64_of(kernel, "btf_bytes") > 0, "{kernel}");
    assert_eq!(kernel["root"], true, "{kernel}");

    let checks: Vec<&Value> = records.iter().filter(|r| r["type"] == "doctor_check").collect();
    assert_eq!(checks.len(), 9, "{}", run.stdout);
    let dir = std::env::temp_dir().join(format!("latprobe-doctor-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("test directory");
    let mut summary = Vec::new();
    for check in &checks {
        // The same command, run on its own (output files in our directory).
        let args: Vec<String> = check["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| {
                let a = a.as_str().expect("an argument");
                match a.strip_suffix(".svg").and_then(|p| p.rsplit('/').next()) {
                    Some(file) => dir.join(format!("{file}.svg")).display().to_string(),
                    None => a.to_string(),
                }
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let alone = latprobe(&args);
        let works = check["works"].as_bool().expect("works");
        // A flame graph that attached but sampled nothing in its second
        // fails so, alone as under doctor.
        let alone_works = alone.output.status.success() || alone.stderr.contains("nothing was sampled");
        assert_eq!(
            alone_works,
            works,
            "doctor says {} {} here, but on its own it exited {}:\n{}\ndoctor: {check}",
            check["command"],
            if works { "works" } else { "does not run" },
            alone.output.status,
            alone.stderr
        );
        // What it said: a failing command's one-line error is among them.
        let says: Vec<&str> = check["says"].as_array().expect("says").iter().filter_map(Value::as_str).collect();
        if !works {
            assert!(says.iter().any(|l| l.starts_with("latprobe: error:")), "no error line: {check}");
        }
        summary.push(format!("{} {}", check["command"].as_str().unwrap_or("?"), if works { "works" } else { "no" }));
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("doctor on {}: {}", kernel_name(), summary.join(", "));
}
