//! `latprobe tcp` against real kernels, with real loopback traffic from the
//! workload: connections that wait a known time in the accept queue, messages
//! that wait a known time in the receive queue, connections refused.
//!
//! Runs on the host and, through `xtask vm-test`, inside every kernel of the
//! VM matrix. Tests share kernel state: run them with `--test-threads=1`.

mod common;

use common::*;
use serde_json::Value;

/// A port for one test: below the ephemeral range (so a client's connection
/// is known by it), and different for each test process so that sockets left
/// in TIME_WAIT by an earlier run do not matter.
fn test_port(offset: u16) -> u16 {
    20_000 + (std::process::id() % 4_000) as u16 * 2 + offset
}

fn final_stage(run: &Run, stage: &str, key: &str) -> Value {
    run.records()
        .into_iter()
        .find(|r| r["type"] == "histogram" && r["period"] == "final" && r["function"] == stage && r["key"] == key)
        .unwrap_or_else(|| panic!("no final {stage} histogram for {key}:\n{}\n{}", run.stdout, run.stderr))
}

/// Why `stage` is not measured on this kernel, from the final summary.
fn unavailable(run: &Run, stage: &str) -> Option<String> {
    let summary = run
        .records()
        .into_iter()
        .find(|r| r["type"] == "tcp_summary" && r["period"] == "final")
        .unwrap_or_else(|| panic!("no final tcp_summary:\n{}\n{}", run.stdout, run.stderr));
    let stages = summary["stages"].as_array().expect("stages").clone();
    let s = stages.iter().find(|s| s["stage"] == stage).unwrap_or_else(|| panic!("{stage} not in {summary}"));
    s["unavailable"].as_str().map(str::to_string)
}

/// What this kernel hides of `part` (a stage, or "losses"), from the final
/// summary.
fn partial(run: &Run, part: &str) -> Option<String> {
    let summary = run
        .records()
        .into_iter()
        .find(|r| r["type"] == "tcp_summary" && r["period"] == "final")
        .unwrap_or_else(|| panic!("no final tcp_summary:\n{}\n{}", run.stdout, run.stderr));
    let notes = summary["partial"].as_array().cloned().unwrap_or_default();
    notes.iter().find_map(|n| n.as_str()?.strip_prefix(&format!("{part}: ")).map(str::to_string))
}

/// The `workload: queued NS ns` lines: how long each message waited, as the
/// workload saw it.
fn queued(stderr: &str) -> Vec<u64> {
    stderr.lines().filter_map(|l| l.strip_prefix("workload: queued ")?.strip_suffix(" ns")?.parse().ok()).collect()
}

const MS: u64 = 1_000_000;

/// `name` in the kernel's TcpExt counters (/proc/net/netstat).
fn tcp_ext(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").expect("/proc/net/netstat");
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("TcpExt names"), lines.next().expect("TcpExt values"));
    let at = names.split_whitespace().position(|n| n == name).unwrap_or_else(|| panic!("no TcpExt {name}"));
    values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).expect("a TcpExt value")
}

#[test]
fn tcp_accept_queue_waits_grow_in_steps_and_handshakes_are_counted() {
    if let Some(why) = bpf_unavailable() {
        return skip("tcp_accept_queue_waits_grow_in_steps_and_handshakes_are_counted", &why);
    }
    let (w, port) = (workload(), test_port(0).to_string());
    let run = latprobe(&["tcp", "--port", &port, "--format", "json", "--", &w, "accept-queue", &port, "5", "100ms"]);
    run.assert_success();
    // Five connections made to the port: five handshakes, known by the
    // remote port on the connecting side.
    let handshakes = final_stage(&run, "tcp:handshake", &format!("to_port={port}"));
    assert_eq!(u64_of(&handshakes, "count"), 5, "{handshakes}");
    // And five on the listener's side, where the kernel lets fentry time them.
    if partial(&run, "handshake").is_none() {
        let listened = final_stage(&run, "tcp:handshake", &format!("port={port}"));
        assert_eq!(u64_of(&listened, "count"), 5, "{listened}");
        // Loopback handshakes are quick: none waits like an accept (100 ms
        // and more). The emulated guest can stall one now and then (117 ms
        // seen on a loaded host), so the median is what is held to it.
        assert!(u64_of(&listened, "p50_ns") < 50 * MS, "loopback handshakes are quick: {listened}");
        assert!(u64_of(&listened, "max_ns") < 1000 * MS, "loopback handshakes are quick: {listened}");
    }
    if let Some(why) = unavailable(&run, "accept") {
        return skip("tcp_accept_queue_waits_grow_in_steps_and_handshakes_are_counted (accept stage)", &why);
    }
    // The Kth connection accepted waited K sleeps of 100 ms: the first at
    // least 100 ms, the last at least 500 ms (sleeps only ever run long).
    let accepts = final_stage(&run, "tcp:accept", &format!("port={port}"));
    assert_eq!(u64_of(&accepts, "count"), 5, "{accepts}");
    let (min, max) = (u64_of(&accepts, "min_ns"), u64_of(&accepts, "max_ns"));
    assert!((100 * MS..200 * MS).contains(&min), "first accept after one 100 ms sleep: {accepts}");
    assert!((500 * MS..900 * MS).contains(&max), "last accept after five 100 ms sleeps: {accepts}");
    let p50 = u64_of(&accepts, "p50_ns");
    assert!((300 * MS..max).contains(&p50), "the third accept waited three sleeps: {accepts}");
}

#[test]
fn tcp_accepts_are_attributed_to_the_accepting_process() {
    if let Some(why) = bpf_unavailable() {
        return skip("tcp_accepts_are_attributed_to_the_accepting_process", &why);
    }
    let (w, port) = (workload(), test_port(1).to_string());
    let run = latprobe(&[
        "tcp",
        "--port",
        &port,
        "--by",
        "pid",
        "--format",
        "json",
        "--",
        &w,
        "accept-queue",
        &port,
        "3",
        "20ms",
    ]);
    run.assert_success();
    if let Some(why) = unavailable(&run, "accept") {
        return skip("tcp_accepts_are_attributed_to_the_accepting_process", &why);
    }
    let accepts: Vec<Value> = run
        .records()
        .into_iter()
        .filter(|r| r["type"] == "histogram" && r["period"] == "final" && r["function"] == "tcp:accept")
        .collect();
    assert_eq!(accepts.len(), 1, "one process accepted:\n{}", run.stdout);
    assert!(accepts[0]["key"].as_str().unwrap().starts_with("pid="), "{}", accepts[0]);
    assert_eq!(accepts[0]["comm"], "workload", "{}", accepts[0]);
    assert_eq!(u64_of(&accepts[0], "count"), 3, "{}", accepts[0]);
}

#[test]
fn tcp_receive_queue_waits_match_the_readers_delay() {
    if let Some(why) = bpf_unavailable() {
        return skip("tcp_receive_queue_waits_match_the_readers_delay", &why);
    }
    let (w, port) = (workload(), test_port(0).to_string());
    let log = std::env::temp_dir().join(format!("latprobe-tcp-rx-{}.hlog", std::process::id()));
    let log = log.to_str().unwrap();
    let run = latprobe(&[
        "tcp",
        "--port",
        &port,
        "--format",
        "json",
        "--hdr-log",
        log,
        "--",
        &w,
        "rx-delay",
        &port,
        "5",
        "50ms",
    ]);
    run.assert_success();
    // The stages' HDR log holds the same waits, under the same names.
    let merged = latprobe(&["merge", "--format", "json", log]);
    merged.assert_success();
    let _ = std::fs::remove_file(log);
    let from_log = merged
        .records()
        .into_iter()
        .find(|r| r["type"] == "histogram" && r["function"] == format!("tcp:rxqueue[port={port}]"))
        .unwrap_or_else(|| panic!("no rxqueue series in the HDR log:\n{}", merged.stdout));
    assert_eq!(u64_of(&from_log, "count"), 5, "{from_log}");
    let waited = queued(&run.stderr);
    assert_eq!(waited.len(), 5, "{}", run.stderr);
    // Each message waited from its arrival to the server's read: what the
    // workload timed from its send, less the few microseconds of loopback.
    let server = final_stage(&run, "tcp:rxqueue", &format!("port={port}"));
    assert_eq!(u64_of(&server, "count"), 5, "{server}");
    let (lo, hi) = (*waited.iter().min().unwrap(), *waited.iter().max().unwrap());
    let p50 = u64_of(&server, "p50_ns");
    assert!(
        p50 >= 50 * MS && p50 as f64 <= hi as f64 * 1.01,
        "p50 {p50} ns: each message waited 50 ms and the workload saw {lo}..{hi} ns\n{server}"
    );
    // The client read each answer at once: five short waits, on its side.
    let client = final_stage(&run, "tcp:rxqueue", &format!("to_port={port}"));
    assert_eq!(u64_of(&client, "count"), 5, "{client}");
    assert!(u64_of(&client, "max_ns") < 50 * MS, "{client}");
}

#[test]
fn tcp_refused_connections_count_resets_on_their_port() {
    if let Some(why) = bpf_unavailable() {
        return skip("tcp_refused_connections_count_resets_on_their_port", &why);
    }
    let (w, port) = (workload(), test_port(1).to_string());
    let run = latprobe(&["tcp", "--format", "json", "--losses", "--", &w, "refused", &port, "4"]);
    run.assert_success();
    let losses = final_losses(&run, &format!("to_port={port}"));
    assert_eq!(u64_of(&losses, "resets_received"), 4, "{losses}");
    // Each reset also came as an event, with its connection.
    let events: Vec<Value> = run
        .records()
        .into_iter()
        .filter(|r| r["type"] == "tcp_loss" && r["loss"] == "resets_received")
        .filter(|r| r["remote"] == format!("127.0.0.1:{port}"))
        .collect();
    assert_eq!(events.len(), 4, "{}", run.stdout);
    // And each SYN to the closed port was dropped for want of a socket:
    // with that reason where the kernel gives reasons (5.17+).
    if partial(&run, "losses").is_some_and(|p| p.contains("drops")) {
        return skip("tcp_refused_connections_count_resets_on_their_port (drop reasons)", "no drop reasons here");
    }
    let drops = run
        .records()
        .into_iter()
        .find(|r| r["type"] == "tcp_drops" && r["period"] == "final")
        .unwrap_or_else(|| panic!("no drops record:\n{}", run.stdout));
    let no_socket = u64_of(&drops["reasons"], "NO_SOCKET");
    // Other traffic on the machine may add a few (the VMs have none).
    assert!((4..=20).contains(&no_socket), "4 SYNs dropped with no socket: {drops}");
    // And those four on the closed port's row, known by their TCP headers
    // (no socket took them); nothing else of the port was dropped.
    let port_row = final_losses(&run, &format!("port={port}"));
    assert_eq!(u64_of(&port_row, "drops"), 4, "{port_row}");
    // With --losses, each with its connection, from its headers, and its reason.
    let dropped: Vec<Value> = run
        .records()
        .into_iter()
        .filter(|r| r["type"] == "tcp_loss" && r["loss"] == "drops" && r["local"] == format!("127.0.0.1:{port}"))
        .collect();
    assert_eq!(dropped.len(), 4, "{}", run.stdout);
    for d in &dropped {
        assert_eq!(d["reason"], "NO_SOCKET", "{d}");
        assert!(d["remote"].as_str().is_some_and(|r| r.starts_with("127.0.0.1:")), "{d}");
    }
    assert_eq!(u64_of(&losses, "drops"), 0, "the clients' side lost nothing: {losses}");
}

#[test]
fn tcp_listen_overflows_and_syn_retransmits_agree_with_the_kernels_counters() {
    listen_overflows_agree("tcp_listen_overflows_and_syn_retransmits_agree_with_the_kernels_counters", "no-accept");
}

#[test]
fn tcp_ipv6_listen_overflows_agree_with_the_kernels_counters() {
    let name = "tcp_ipv6_listen_overflows_agree_with_the_kernels_counters";
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        return skip(name, "no IPv6 loopback (::1) here");
    }
    listen_overflows_agree(name, "no-accept6");
}

/// A listener with backlog 1 that never accepts (workload `step`, IPv4 or
/// IPv6) and six clients: overflows and SYN retransmits as the kernel counts
/// them.
fn listen_overflows_agree(name: &str, step: &str) {
    if let Some(why) = bpf_unavailable() {
        return skip(name, &why);
    }
    let (w, port) = (workload(), test_port(0).to_string());
    let (overflows, retransmits) = (tcp_ext("ListenOverflows"), tcp_ext("TCPSynRetrans"));
    // Backlog 1: two connections fit (the queue is full past its backlog),
    // the SYNs of the other four are dropped, and retransmitted after 1 s.
    let run = latprobe(&["tcp", "--port", &port, "--format", "json", "--", &w, step, &port, "1", "6", "1500ms"]);
    run.assert_success();
    let (overflows, retransmits) = (tcp_ext("ListenOverflows") - overflows, tcp_ext("TCPSynRetrans") - retransmits);
    let summary = run
        .records()
        .into_iter()
        .find(|r| r["type"] == "tcp_summary" && r["period"] == "final")
        .expect("a final summary");
    // Drops not counted (before 5.17) leave the overflows counted.
    fn not_counted(note: &Value) -> Option<&str> {
        note.as_str()?.strip_prefix("losses: ").filter(|why| why.contains("full accept queue"))
    }
    if let Some(why) = summary["partial"].as_array().and_then(|p| p.iter().find_map(not_counted)) {
        return skip(name, why);
    }
    let losses = |key: String| final_losses(&run, &key);
    let listener = losses(format!("port={port}"));
    let clients = losses(format!("to_port={port}"));
    eprintln!(
        "{step} on {}: listen overflows {} (ListenOverflows {overflows}), SYN retransmits {}",
        kernel_name(),
        u64_of(&listener, "listen_overflows"),
        u64_of(&clients, "syn_retransmits")
    );
    assert!(overflows >= 4, "four SYNs dropped at least, the kernel says {overflows}");
    assert_eq!(u64_of(&listener, "listen_overflows"), overflows, "as the kernel counted: {listener}");
    // The kernel counts SYN and SYN-ACK retransmits together.
    let ours = u64_of(&clients, "syn_retransmits") + u64_of(&listener, "synack_retransmits");
    assert_eq!(ours, retransmits, "as the kernel counted:\n{listener}\n{clients}");
    // How many rejected clients retransmit before they give up depends on
    // the machine's speed (an emulated PREEMPT_RT guest is slow): the exact
    // check is the kernel's own counter, above.
    assert!(u64_of(&clients, "syn_retransmits") > 0, "{clients}");
}

/// The final `tcp_losses` record of `key`.
fn final_losses(run: &Run, key: &str) -> Value {
    run.records()
        .into_iter()
        .find(|r| r["type"] == "tcp_losses" && r["period"] == "final" && r["key"] == key)
        .unwrap_or_else(|| panic!("no losses for {key}:\n{}", run.stdout))
}

/// The `workload: worker pid=P delay=NS` lines: each worker's pid and delay.
fn workers(stderr: &str) -> Vec<(u64, u64)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("workload: worker pid=")?;
            let (pid, delay) = rest.split_once(" delay=")?;
            Some((pid.parse().ok()?, delay.parse().ok()?))
        })
        .collect()
}

#[test]
fn tcp_by_pid_splits_the_accepts_of_two_workers_on_one_port() {
    if let Some(why) = bpf_unavailable() {
        return skip("tcp_by_pid_splits_the_accepts_of_two_workers_on_one_port", &why);
    }
    let (w, port) = (workload(), test_port(1).to_string());
    // Two processes, so latprobe watches the port, not one process.
    let t = start_tracing(&["tcp", "--port", &port, "--by", "pid", "--format", "json"]);
    let ran = std::process::Command::new(&w).args(["workers", &port, "20", "50ms"]).output().expect("run workload");
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    t.signal(libc::SIGINT);
    let run = t.finish();
    run.assert_success();
    if let Some(why) = unavailable(&run, "accept") {
        return skip("tcp_by_pid_splits_the_accepts_of_two_workers_on_one_port", &why);
    }
    let told = workers(&String::from_utf8_lossy(&ran.stderr));
    assert_eq!(told.len(), 2, "{}", String::from_utf8_lossy(&ran.stderr));
    let row = |pid: u64| {
        run.records().into_iter().find(|r| {
            r["type"] == "histogram"
                && r["period"] == "final"
                && r["function"] == "tcp:accept"
                && r["key"] == format!("pid={pid}")
        })
    };
    let (fast, slow) = (row(told[0].0), row(told[1].0));
    let count = |r: &Option<Value>| r.as_ref().map_or(0, |r| u64_of(r, "count"));
    // The kernel spreads the 20 connections over both listeners by hash:
    // every one is counted, with the worker that took it.
    assert_eq!(count(&fast) + count(&slow), 20, "{}", run.stdout);
    if let Some(slow) = &slow {
        assert!(u64_of(slow, "min_ns") >= 50 * MS, "the slow worker served each 50 ms late: {slow}");
        assert_eq!(slow["comm"], "workload", "{slow}");
    }
    if let Some(fast) = &fast {
        assert!(u64_of(fast, "p50_ns") < 50 * MS, "the fast worker served at once: {fast}");
    }
}

#[test]
fn tcp_collapses_are_counted_on_their_port_as_the_kernel_counts_them() {
    collapses_agree("tcp_collapses_are_counted_on_their_port_as_the_kernel_counts_them", "auto");
}

#[test]
fn tcp_collapses_traced_by_kprobes_are_counted_alike() {
    collapses_agree("tcp_collapses_traced_by_kprobes_are_counted_alike", "kprobe");
}

/// The workload's collapse mode traced with `--attach attach`: prunes,
/// merged segments and events as the kernel and `fn` count them.
fn collapses_agree(name: &str, attach: &str) {
    if let Some(why) = bpf_unavailable() {
        return skip(name, &why);
    }
    let (w, port) = (workload(), test_port(0).to_string());
    // `fn` beside it counts every call of tcp_collapse, as a second witness,
    // where kernel functions can be traced at all.
    let calls =
        kernel_probes_unavailable().is_none().then(|| start_tracing(&["fn", "tcp_collapse", "--format", "json"]));
    let (collapsed, prunes) = (tcp_ext("TCPRcvCollapsed"), tcp_ext("PruneCalled"));
    // Compared with the kernel's counters over the whole workload: its flood
    // of one-byte segments can cost more than the default budget under
    // emulation (6.1-rt: 5.4% of 2 CPUs), which would end the run first.
    let run = latprobe(&[
        "tcp",
        "--port",
        &port,
        "--attach",
        attach,
        "--losses",
        "--format",
        "json",
        "--max-overhead",
        "off",
        "--",
        &w,
        "collapse",
        &port,
        "3s",
    ]);
    let (collapsed, prunes) = (tcp_ext("TCPRcvCollapsed") - collapsed, tcp_ext("PruneCalled") - prunes);
    let calls = calls.map(|c| {
        c.signal(libc::SIGINT);
        c.finish()
    });
    run.assert_success();
    if let Some(why) = unavailable(&run, "collapse") {
        return skip(name, &why);
    }
    let key = format!("port={port}");
    let pruned = final_stage(&run, "tcp:collapse", &key);
    let episodes = u64_of(&pruned, "count");
    assert!(episodes > 0, "the workload makes the kernel collapse: {pruned}\n{}", run.stderr);
    // Every segment merged away, as the kernel counted it (no other socket
    // on the machine collapses meanwhile).
    let losses = final_losses(&run, &key);
    assert_eq!(u64_of(&losses, "collapsed_skbs"), collapsed, "TCPRcvCollapsed is {collapsed}: {losses}");
    // The kernel counts a prune each time the buffer fills, also when it only
    // grows the buffer (tcp_clamp_window) and collapses nothing.
    assert!(episodes <= prunes, "{episodes} prunes that collapsed, PruneCalled {prunes}");
    // In order, on loopback, a prune collapses only the receive queue: one
    // call of tcp_collapse each.
    let calls = calls.expect("the collapse stage is measured only where kernel functions can be traced");
    calls.assert_success();
    let called = calls.final_histogram("tcp_collapse");
    assert_eq!(u64_of(&called, "count"), episodes, "fn counted {called}\n{pruned}");
    // And each prune came as an event, with its connection and buffer.
    let events: Vec<Value> =
        run.records().into_iter().filter(|r| r["type"] == "tcp_slow" && r["stage"] == "collapse").collect();
    assert_eq!(events.len() as u64, episodes, "{}", run.stdout);
    for e in &events {
        assert_eq!(e["local"], format!("127.0.0.1:{port}"), "{e}");
        assert!(u64_of(e, "rcvbuf") > 64 * 1024, "the bulk phase grew the buffer: {e}");
    }
    let summary = run.records().into_iter().find(|r| r["type"] == "tcp_summary" && r["period"] == "final").unwrap();
    let how =
        summary["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "collapse").unwrap()["attach"].clone();
    if attach == "kprobe" {
        assert_eq!(how, "kprobe, kretprobe", "{summary}");
    }
    eprintln!(
        "collapse on {} ({how}): {episodes} prunes, {} segments merged; TCPRcvCollapsed {collapsed}, PruneCalled \
         {prunes}, fn counted {} tcp_collapse calls",
        kernel_name(),
        u64_of(&losses, "collapsed_skbs"),
        u64_of(&called, "count")
    );
    let longest = events.iter().map(|e| u64_of(e, "duration_ns")).max().unwrap();
    assert_eq!(longest, u64_of(&pruned, "max_ns"), "{pruned}");
}

#[test]
fn tcp_listener_handshakes_agree_with_libbpf_tools_tcpsynbl() {
    let name = "tcp_listener_handshakes_agree_with_libbpf_tools_tcpsynbl";
    if let Some(why) = bpf_unavailable() {
        return skip(name, &why);
    }
    let Some(peer_bin) = libbpf_tool("tcpsynbl") else {
        return skip(name, "libbpf-tools' tcpsynbl is not installed (Debian package libbpf-tools)");
    };
    // tcpsynbl records the accept queue's length at every handshake's last
    // ACK (tcp_v4_syn_recv_sock): one entry per handshake a listener ends.
    let peer_programs = || programs_loaded("tcp_v4_syn_recv");
    let before = peer_programs();
    let peer = std::process::Command::new(&peer_bin)
        .arg("-4")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start tcpsynbl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while peer_programs() <= before {
        if std::time::Instant::now() > deadline {
            panic!("{} loaded nothing in 60 s", peer_bin.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        if peer_programs() <= before && !alive(peer.id()) {
            let out = peer.wait_with_output().expect("tcpsynbl ends");
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let why = format!("tcpsynbl cannot run here: {}", err.lines().last().unwrap_or(""));
            return skip(name, &why);
        }
    }
    // Loaded, then attached.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (w, port) = (workload(), test_port(1).to_string());
    let run = latprobe(&["tcp", "--port", &port, "--format", "json", "--", &w, "accept-queue", &port, "5", "20ms"]);
    // SAFETY: kill on our own child.
    unsafe { libc::kill(peer.id() as i32, libc::SIGINT) };
    let out = peer.wait_with_output().expect("tcpsynbl ends");
    let peer_text = String::from_utf8_lossy(&out.stdout).into_owned();
    run.assert_success();
    if let Some(why) = partial(&run, "handshake") {
        return skip(name, &why);
    }
    let ours = u64_of(&final_stage(&run, "tcp:handshake", &format!("port={port}")), "count");
    let theirs = histogram_total(&peer_text);
    eprintln!("listener handshakes on {}: latprobe {ours}, tcpsynbl {theirs}", kernel_name());
    assert_eq!(ours, 5, "five clients connected: {}", run.stdout);
    // Nothing else on the machine makes connections meanwhile (the VMs).
    assert_eq!(theirs, ours, "tcpsynbl saw:\n{peer_text}");
}

/// Whether process `pid` still runs (not yet a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// `tcp --listen` serves each key's losses as they happen: 4 connects
/// refused are `resets_received` 4 for their port in a scrape taken while
/// the run goes on, as in the final report.
#[test]
fn tcp_serves_each_keys_losses_on_listen() {
    if let Some(why) = bpf_unavailable() {
        return skip("tcp_serves_each_keys_losses_on_listen", &why);
    }
    let (w, port) = (workload(), test_port(1).to_string());
    let tracing = start_tracing(&["tcp", "--listen", ":0", "--format", "json", "--secs", "300"]);
    let addr = metrics_address(tracing.said());
    // Refused before the first scrape, so that the port is among the first
    // keys seen (scrapes are connections too).
    let status = std::process::Command::new(&w).args(["refused", &port, "4"]).status().unwrap();
    assert!(status.success(), "workload refused: {status}");
    let key = format!("key=\"to_port={port}\",kind=\"resets_received\"");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let metrics = loop {
        let (code, metrics) = http_get(&addr, "/metrics");
        assert_eq!(code, 200, "{metrics}");
        if sample(&metrics, "latprobe_tcp_losses_total", &key) == Some(4.0) || std::time::Instant::now() > until {
            break metrics;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(sample(&metrics, "latprobe_tcp_losses_total", &key), Some(4.0), "{metrics}");
    assert_eq!(sample(&metrics, "latprobe_lost_total", "untimed_sockets"), Some(0.0), "{metrics}");
    tracing.signal(libc::SIGINT);
    let run = tracing.finish();
    run.assert_success();
    let losses = final_losses(&run, &format!("to_port={port}"));
    assert_eq!(u64_of(&losses, "resets_received"), 4, "{losses}");
}
