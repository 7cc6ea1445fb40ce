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

/// Runs the workload's recursive function `calls` times, each sleeping `nap`.
fn workload_calls(calls: &str, nap: &str) {
    let status = std::process::Command::new(workload()).args(["recurse", calls, "1", nap]).status().unwrap();
    assert!(status.success(), "workload recurse {calls} 1 {nap}: {status}");
}

/// Scrapes `addr` until `function`'s `_count` is `want` (what a scrape sees
/// is refreshed twice a second), or 30 s have passed; returns the last scrape.
fn scrape_until_count(addr: &str, function: &str, want: u64) -> String {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, metrics) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{metrics}");
        let count = sample(&metrics, "latprobe_latency_seconds_count", function);
        if count == Some(want as f64) || std::time::Instant::now() > until {
            return metrics;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `fn --listen :0` on the workload's function, traced system-wide: 25 calls
/// made while it runs are 25 in a scrape, in the +Inf bucket too, before the
/// run ends; the final report agrees. A client that connects and never
/// sends holds no scrape up and is let go.
#[test]
fn listen_serves_the_exact_count_while_running() {
    if let Some(why) = bpf_unavailable() {
        return skip("listen_serves_the_exact_count_while_running", &why);
    }
    let func = format!("{}:latprobe_workload_recurse", workload());
    let tracing = start_tracing(&["fn", &func, "--listen", ":0", "--secs", "300", "--format", "json"]);
    let addr = metrics_address(tracing.said());
    assert!(addr.starts_with("127.0.0.1:"), "a bare :PORT is loopback: {addr}");
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();

    let (status, before) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert!(before.ends_with("# EOF\n"), "{before}");
    workload_calls("25", "1ms");
    let metrics = scrape_until_count(&addr, "latprobe_workload_recurse", 25);
    let count = sample(&metrics, "latprobe_latency_seconds_count", "latprobe_workload_recurse");
    assert_eq!(count, Some(25.0), "{metrics}");
    assert_eq!(sample(&metrics, "latprobe_latency_seconds_bucket", "le=\"+Inf\""), Some(25.0), "{metrics}");
    assert_eq!(sample(&metrics, "latprobe_untimed_total", "latprobe_workload_recurse"), Some(0.0), "{metrics}");
    // Every call sleeps 1 ms: none is counted at or below 1 ms.
    assert_eq!(sample(&metrics, "latprobe_latency_seconds_bucket", "le=\"0.000917504\""), Some(0.0), "{metrics}");
    assert_eq!(http_get(&addr, "/").0, 404);
    // A request head past 8 KiB is refused (431), not buffered.
    use std::io::{Read, Write};
    let mut big = std::net::TcpStream::connect(&addr).unwrap();
    big.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let pad = "a".repeat(16 << 10);
    let _ = write!(big, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nX-Pad: {pad}\r\n\r\n");
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(!answer.starts_with("HTTP/1.1 200"), "a 16 KiB head was served: {}", &answer[..answer.len().min(200)]);

    idle.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut byte = [0u8; 1];
    let closed = matches!(idle.read(&mut byte), Ok(0) | Err(_));
    assert!(closed, "a client that sends nothing is let go");

    tracing.signal(libc::SIGINT);
    let run = tracing.finish();
    run.assert_success();
    assert_eq!(u64_of(&run.final_histogram(&func), "count"), 25);
}

/// A real Prometheus scrapes `fn --listen` every second: 90 calls of 1 ms
/// and 10 of 20 ms, and `histogram_quantile(0.99, …)` over its HTTP API
/// lands in the same bucket as latprobe's own p99, so within its width.
#[test]
fn prometheus_quantile_agrees_with_latprobes_p99() {
    const TEST: &str = "prometheus_quantile_agrees_with_latprobes_p99";
    if let Some(why) = bpf_unavailable() {
        return skip(TEST, &why);
    }
    let Some(prometheus) = ["/usr/bin/prometheus", "/bin/prometheus"].into_iter().find(|p| Path::new(p).is_file())
    else {
        return skip(TEST, "no prometheus binary (Debian's prometheus package)");
    };
    let dir = scratch("prometheus");
    let func = format!("{}:latprobe_workload_recurse", workload());
    let tracing = start_tracing(&["fn", &func, "--listen", ":0", "--secs", "300", "--format", "json"]);
    let addr = metrics_address(tracing.said());
    workload_calls("90", "1ms");
    workload_calls("10", "20ms");
    let scraped = scrape_until_count(&addr, "latprobe_workload_recurse", 100);

    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: latprobe\n    \
             static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let mut server = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let query = |promql: &str| -> Option<f64> {
        let path = format!("/api/v1/query?query={}", url_encoded(promql));
        let (status, body) = try_http_get(&web.to_string(), &path).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let value = v["data"]["result"][0]["value"][1].as_str()?.parse().ok();
        (status == 200).then_some(value).flatten()
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let count = "latprobe_latency_seconds_count{function=~\".*latprobe_workload_recurse\"}";
    while query(count) != Some(100.0) && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let seen = query(count);
    let promql = "histogram_quantile(0.99, latprobe_latency_seconds_bucket{function=~\".*latprobe_workload_recurse\"})";
    let quantile = query(promql);
    let _ = server.kill();
    let _ = server.wait();
    let prometheus_log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    assert_eq!(seen, Some(100.0), "Prometheus saw all 100 calls:\n{prometheus_log}");
    let quantile = quantile.unwrap_or_else(|| panic!("no answer to {promql}:\n{prometheus_log}"));

    tracing.signal(libc::SIGINT);
    let run = tracing.finish();
    run.assert_success();
    let report = run.final_histogram(&func);
    assert_eq!(u64_of(&report, "count"), 100);
    let p99 = u64_of(&report, "p99_ns") as f64 / 1e9;
    // The bucket latprobe's p99 falls in, from the bounds it serves.
    let bounds: Vec<f64> = scraped
        .lines()
        .filter(|l| l.starts_with("latprobe_latency_seconds_bucket{le=\"") && !l.contains("+Inf"))
        .filter_map(|l| l.split('"').nth(1)?.parse().ok())
        .collect();
    let upper = bounds.iter().position(|&b| b >= p99).unwrap_or_else(|| panic!("p99 {p99}s past the bounds"));
    let (low, high) = (bounds[upper.saturating_sub(1)], bounds[upper]);
    println!("{promql} = {quantile}; latprobe's p99 = {p99}; bucket ({low}, {high}]");
    assert!(p99 >= 0.020, "10 of 100 calls slept 20 ms: {report}");
    assert!(quantile > low && quantile <= high, "{quantile} outside ({low}, {high}], latprobe's p99 {p99}");
    assert!((quantile - p99).abs() <= high - low);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `s` with everything but unreserved characters percent-encoded.
fn url_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// A taken port, or an address that is not one, fails in one line before
/// anything is attached.
#[test]
fn a_bad_listen_address_fails_before_tracing() {
    if let Some(why) = bpf_unavailable() {
        return skip("a_bad_listen_address_fails_before_tracing", &why);
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for command in [&["runqlat"][..], &["lock"], &["tcp"], &["fn", "do_nanosleep"]] {
        let run = latprobe(&[command, &["--listen", &addr, "--secs", "1"]].concat());
        assert_one_line_error(&run, &format!("--listen {addr}: cannot listen there (a port in use?"));
        assert!(!run.stderr.contains("tracing"), "failed before attaching: {}", run.stderr);
    }
    let run = latprobe(&["runqlat", "--listen", "example.com:9464", "--secs", "1"]);
    assert_one_line_error(&run, "is not ADDR:PORT");
}
