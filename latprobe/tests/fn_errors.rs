//! Bad input to `latprobe fn` gets one clear line and a non-zero exit.

mod common;

use std::{os::unix::process::CommandExt, process::Command};

use common::*;

#[test]
fn unknown_function_suggests_close_names() {
    if let Some(why) = bpf_unavailable() {
        return skip("unknown_function_suggests_close_names", &why);
    }
    let run = latprobe(&["fn", "net_rx_acton"]);
    assert_one_line_error(&run, "unknown kernel function net_rx_acton");
    assert!(run.stderr.contains("Did you mean: net_rx_action"), "{}", run.stderr);
}

#[test]
fn malformed_duration_says_what_is_accepted() {
    let run = latprobe(&["fn", "net_rx_action", "--slower", "5parsecs"]);
    assert_one_line_error(&run, "invalid duration \"5parsecs\"");
    assert!(run.stderr.contains("250us, 5ms, 1.5s"));
    let run = latprobe(&["fn", "net_rx_action", "--interval", "10"]);
    assert_one_line_error(&run, "invalid duration \"10\"");
}

#[test]
fn missing_binary_is_named() {
    let run = latprobe(&["fn", "/no/such/nginx:ngx_process_events_and_timers"]);
    assert_one_line_error(&run, "binary /no/such/nginx does not exist");
}

#[test]
fn missing_user_symbol_is_named() {
    if let Some(why) = bpf_unavailable() {
        return skip("missing_user_symbol_is_named", &why);
    }
    let func = format!("{}:no_such_symbol", workload());
    let run = latprobe(&["fn", &func, "--secs", "1"]);
    assert_one_line_error(&run, "no_such_symbol");
}

#[test]
fn no_such_pid() {
    let run = latprobe(&["fn", "net_rx_action", "--pid", "999999999"]);
    assert_one_line_error(&run, "--pid 999999999: no such process");
}

#[test]
fn too_many_functions() {
    let funcs: Vec<String> = (0..9).map(|i| format!("f{i}")).collect();
    let mut args = vec!["fn"];
    args.extend(funcs.iter().map(String::as_str));
    let run = latprobe(&args);
    assert_one_line_error(&run, "at most 8 functions");
}

#[test]
fn unprivileged_user_is_told_which_capabilities() {
    if let Some(why) = bpf_unavailable() {
        return skip("unprivileged_user_is_told_which_capabilities", &why);
    }
    let run = Run::from_output(output_of(
        Command::new(latprobe_bin()).args(["fn", "net_rx_action", "--secs", "1"]).uid(65534).gid(65534),
    ));
    assert_one_line_error(&run, "CAP_BPF and CAP_PERFMON");
}

#[test]
fn help_has_examples() {
    let run = latprobe(&["fn", "--help"]);
    run.assert_success();
    assert!(run.stdout.contains("Examples:"), "{}", run.stdout);
    assert!(run.stdout.contains("latprobe fn net_rx_action --secs 30"));
}
