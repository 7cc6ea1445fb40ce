//! Running the real latprobe binary and the test workload, and reading what
//! latprobe printed. Shared by the integration tests.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::{
    env,
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, ChildStderr, Command, Output, Stdio},
};

use serde_json::Value;

pub mod watchdog;
use watchdog::{assert_not_hung, Watchdog};
#[allow(unused_imports, reason = "each test file uses a different subset")]
pub use watchdog::{output_of, wait_output};

/// latprobe under test: `LATPROBE_BIN` (set inside VMs) or cargo's build.
pub fn latprobe_bin() -> PathBuf {
    env::var_os("LATPROBE_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_latprobe")))
}

/// The deterministic workload (latprobe/examples/workload.rs).
pub fn workload_bin() -> PathBuf {
    if let Some(p) = env::var_os("LATPROBE_WORKLOAD") {
        return PathBuf::from(p);
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_latprobe"));
    bin.parent().expect("binary has a directory").join("examples/workload")
}

pub fn workload() -> String {
    workload_bin().display().to_string()
}

/// Which kernel this is: the VM matrix name, or "host".
pub fn kernel_name() -> String {
    env::var("LATPROBE_VM_KERNEL").unwrap_or_else(|_| "host".into())
}

/// What one latprobe run printed.
pub struct Run {
    pub output: Output,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Every JSON record on stdout; panics on a line that is not JSON.
    pub fn records(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{}", self.stderr)))
            .collect()
    }

    /// The final histogram record of `function`.
    pub fn final_histogram(&self, function: &str) -> Value {
        self.records()
            .into_iter()
            .find(|r| r["type"] == "histogram" && r["period"] == "final" && r["function"] == function)
            .unwrap_or_else(|| panic!("no final histogram for {function}:\n{}\n{}", self.stdout, self.stderr))
    }

    pub fn outliers(&self) -> Vec<Value> {
        self.records().into_iter().filter(|r| r["type"] == "outlier").collect()
    }

    pub fn assert_success(&self) -> &Self {
        assert!(
            self.output.status.success(),
            "latprobe failed ({}):\n{}\n{}",
            self.output.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

impl Run {
    pub fn from_output(output: Output) -> Run {
        let run = Run {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            output,
        };
        // A run its budget cut short measured less than its workload made:
        // said where the test's own output shows it, to tell a test that
        // needs `--max-overhead off` from one that fails for another reason.
        for line in run.stderr.lines().filter(|l| l.contains("above --max-overhead")) {
            eprintln!("{}: {line}", kernel_name());
        }
        run
    }
}

pub fn latprobe(args: &[&str]) -> Run {
    Run::from_output(output_of(Command::new(latprobe_bin()).args(args)))
}

/// Why BPF tests cannot run here, if they cannot.
pub fn bpf_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    None
}

/// Why kernel-function probes (fentry or kprobes) cannot run here.
pub fn kernel_probes_unavailable() -> Option<String> {
    bpf_unavailable().or_else(|| {
        (!std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists())
            .then(|| format!("kernel {} has no kprobes (and no fentry where kprobes are compiled out)", kernel_name()))
    })
}

/// Prints why a test is skipped; `return` after it.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test} on {}: {why}", kernel_name());
}

pub fn u64_of(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} missing in {v}"))
}

/// Sum over CPUs of the NET_RX column of /proc/softirqs.
pub fn net_rx_softirqs() -> u64 {
    let text = std::fs::read_to_string("/proc/softirqs").expect("/proc/softirqs");
    let line = text.lines().find(|l| l.trim_start().starts_with("NET_RX:")).expect("NET_RX row");
    line.split_whitespace().skip(1).map(|n| n.parse::<u64>().expect("count")).sum()
}

/// A latprobe run in the background, past its "tracing" line.
pub struct Tracing {
    pub child: Child,
    stderr: BufReader<ChildStderr>,
    said: String,
    watchdog: Watchdog,
}

/// Starts latprobe with `args` and returns once it says it is tracing.
/// SIGHUP is reset to its default first, as in a terminal session: a test
/// suite started under `nohup` would otherwise hand latprobe an ignored
/// SIGHUP, which latprobe rightly keeps ignored.
pub fn start_tracing(args: &[&str]) -> Tracing {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(latprobe_bin());
    command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: only signal(), async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = command.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", latprobe_bin().display()));
    Tracing::from_child(child)
}

impl Tracing {
    /// Follows a latprobe started with piped stdout and stderr until it says
    /// it is tracing.
    pub fn from_child(mut child: Child) -> Tracing {
        let args = "latprobe";
        let watchdog = Watchdog::arm(child.id());
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut said = String::new();
        // `flame` says "sampling", the others "tracing".
        while !said.contains("tracing") && !said.contains("sampling") {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                let out = child.wait_with_output().expect("latprobe ends");
                assert_not_hung(watchdog, said.as_bytes());
                panic!(
                    "latprobe {args:?} ended before tracing ({}): {said}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            said += &line;
        }
        Tracing { child, stderr, said, watchdog }
    }
}

impl Tracing {
    /// What latprobe printed on stderr up to its "tracing" line.
    pub fn said(&self) -> &str {
        &self.said
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. libc::SIGTERM) to latprobe.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on the pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits up to `limit` for latprobe to end without reading its stdout
    /// (a reader that stalled). Returns its status (None if it still ran:
    /// then it is killed), its stderr, and when its last stderr line came:
    /// the end of latprobe's own work, before the kernel has torn down its
    /// probes (which under emulation takes up to a second more).
    pub fn wait_unread(
        self,
        limit: std::time::Duration,
    ) -> (Option<std::process::ExitStatus>, String, std::time::Instant) {
        // `limit` is this wait's own watchdog.
        let Tracing { mut child, mut stderr, said, watchdog } = self;
        drop(watchdog);
        let lines = std::thread::spawn(move || {
            let (mut text, mut last) = (String::new(), std::time::Instant::now());
            let mut line = String::new();
            while stderr.read_line(&mut line).unwrap_or(0) > 0 {
                last = std::time::Instant::now();
                text += &line;
                line.clear();
            }
            (text, last)
        });
        let until = std::time::Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break Some(status);
            }
            if std::time::Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let (rest, last) = lines.join().expect("stderr reader");
        (status, said + &rest, last)
    }

    /// Waits for latprobe to end and returns what it printed. stdout and
    /// stderr are read at the same time: a reader that stalls one of them
    /// is a different test.
    pub fn finish(self) -> Run {
        self.finish_timed().0
    }

    /// [`Tracing::finish`], and when the last line of stdout came (its
    /// final report): the end of latprobe's own work, before the kernel has
    /// torn down its probes (up to a second more under emulation).
    pub fn finish_timed(self) -> (Run, std::time::Instant) {
        let Tracing { mut child, mut stderr, said, watchdog } = self;
        let rest = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (mut text, mut last, mut line) = (String::new(), std::time::Instant::now(), String::new());
        while stdout.read_line(&mut line).unwrap_or(0) > 0 {
            last = std::time::Instant::now();
            text += &line;
            line.clear();
        }
        let output = child.wait_with_output().expect("latprobe ends");
        let run = Run { stdout: text, stderr: said + &rest.join().expect("stderr reader"), output };
        assert_not_hung(watchdog, run.stderr.as_bytes());
        (run, last)
    }
}

/// latprobe's programs whose names start with `prefix` loaded right now.
pub fn programs_loaded(prefix: &str) -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with(prefix)))
        .count()
}

/// Waits (up to 5 s: the kernel frees programs once their last fd closes)
/// until no program whose name starts with `prefix` is loaded; panics
/// naming `what` otherwise.
pub fn wait_until_unloaded(prefix: &str, what: &str) {
    for _ in 0..50 {
        if programs_loaded(prefix) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{prefix} programs left loaded after {what}");
}

/// Asserts a failed run printed one error line mentioning `needle` (clap adds
/// a "try --help" hint after its own).
pub fn assert_one_line_error(run: &Run, needle: &str) {
    assert!(!run.output.status.success(), "should fail: {}", run.stdout);
    let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!run.stderr.contains("panicked") && !run.stderr.contains("RUST_BACKTRACE"), "{}", run.stderr);
    assert!(lines.len() <= 2, "one error line expected: {}", run.stderr);
    assert!(lines.iter().any(|l| l.contains(needle)), "error should mention {needle:?}: {}", run.stderr);
}

/// Sum of the counts in a bcc/libbpf-tools log2 histogram.
pub fn histogram_total(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains("->") && l.contains(':'))
        .filter_map(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A libbpf-tools peer: /usr/sbin on Debian, /bin inside the test VMs.
pub fn libbpf_tool(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/sbin"))
        .chain(std::iter::once(PathBuf::from("/bin")))
        .chain(env::split_paths(&path))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `GET path` over plain HTTP/1.1 to `addr` (`127.0.0.1:PORT`), as a
/// scraper does: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// [`http_get`], with an error for a server not (yet) there.
pub fn try_http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| format!("not HTTP: {response}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    Ok((status.ok_or_else(|| format!("no status: {head}"))?, body.to_string()))
}

/// Where latprobe said it serves /metrics (`127.0.0.1:PORT`).
pub fn metrics_address(stderr: &str) -> String {
    let line = stderr.lines().find(|l| l.contains("serving metrics on")).unwrap_or_else(|| panic!("{stderr}"));
    let url = line.split("http://").nth(1).unwrap_or_else(|| panic!("{line}"));
    url.trim_end_matches("/metrics").to_string()
}

/// The value of the sample `name{labels…}` whose labels contain `having`.
pub fn sample(metrics: &str, name: &str, having: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| l.contains(having))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
