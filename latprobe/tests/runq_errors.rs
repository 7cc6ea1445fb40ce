//! Bad input to `latprobe runqslower` and `latprobe runqlat` gets one clear
//! line and a non-zero exit.

mod common;

use common::*;

/// Clap's own usage errors add a usage block after the error line: the
/// error is still the first line.
fn assert_usage_error(run: &Run, needle: &str) {
    assert!(!run.output.status.success(), "should fail: {}", run.stdout);
    let first = run.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("error:") && run.stderr.contains(needle),
        "error should mention {needle:?}: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn threshold_must_be_a_duration() {
    let run = latprobe(&["runqslower", "abc"]);
    assert_one_line_error(&run, "invalid duration \"abc\"");
    assert!(run.stderr.contains("250us, 5ms, 1.5s"), "{}", run.stderr);
    // A bare number is refused: 50 what?
    let run = latprobe(&["runqslower", "50"]);
    assert_one_line_error(&run, "invalid duration \"50\"");
}

#[test]
fn threshold_is_required() {
    let run = latprobe(&["runqslower"]);
    assert_usage_error(&run, "<THRESHOLD>");
}

#[test]
fn unknown_pid_and_tid() {
    let run = latprobe(&["runqslower", "50ms", "--pid", "999999999"]);
    assert_one_line_error(&run, "--pid 999999999: no such process");
    let run = latprobe(&["runqslower", "50ms", "--tid", "999999999"]);
    assert_one_line_error(&run, "--tid 999999999: no such thread");
    let run = latprobe(&["runqlat", "--pid", "999999999"]);
    assert_one_line_error(&run, "--pid 999999999: no such process");
}

#[test]
fn cpu_out_of_range() {
    let run = latprobe(&["runqslower", "50ms", "--cpu", "100000"]);
    assert_one_line_error(&run, "--cpu 100000: not an online CPU (online: 0 to");
}

#[test]
fn comm_prefix_too_long() {
    let run = latprobe(&["runqslower", "50ms", "--comm", "a-name-longer-than-15"]);
    assert_one_line_error(&run, "1 to 15 bytes");
}

#[test]
fn per_pid_cap_is_bounded() {
    let run = latprobe(&["runqlat", "--per-pid", "--max-pids", "100000"]);
    assert_one_line_error(&run, "100000 is not in 1..=64");
    let run = latprobe(&["runqlat", "--per-cpu", "--per-pid"]);
    assert_usage_error(&run, "cannot be used with");
}

#[test]
fn bad_interval() {
    let run = latprobe(&["runqlat", "--interval", "10"]);
    assert_one_line_error(&run, "invalid duration \"10\"");
}
