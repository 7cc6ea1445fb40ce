//! A hung latprobe must fail its test, not the whole run: the watchdog kills
//! a latprobe that has not ended in time, after printing what each of its
//! threads and every running task was doing, which is what a hang report
//! needs.

use std::{
    fmt::Write as _,
    fs,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::Duration,
};

/// The longest any latprobe run in the tests may take, emulation included.
pub const HUNG_AFTER: Duration = Duration::from_secs(120);

#[derive(Default)]
struct State {
    disarmed: bool,
    fired: bool,
}

pub struct Watchdog {
    state: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Watches process `pid` for [`HUNG_AFTER`].
    pub fn arm(pid: u32) -> Watchdog {
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let watched = state.clone();
        let thread = std::thread::spawn(move || {
            let (lock, cvar) = &*watched;
            let guard = lock.lock().expect("watchdog lock");
            let (mut guard, timeout) =
                cvar.wait_timeout_while(guard, HUNG_AFTER, |s| !s.disarmed).expect("watchdog lock");
            if timeout.timed_out() {
                eprintln!("latprobe (pid {pid}) still running after {HUNG_AFTER:?}:\n{}", describe(pid));
                // SAFETY: kill on a pid of our own child, not yet reaped (the
                // owner reaps it only after disarming).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                guard.fired = true;
            }
        });
        Watchdog { state, thread: Some(thread) }
    }

    /// Stops watching; true when the watchdog had to kill latprobe.
    pub fn disarm(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        let (lock, cvar) = &*self.state;
        lock.lock().expect("watchdog lock").disarmed = true;
        cvar.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        lock.lock().expect("watchdog lock").fired
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `command` to its end with stdout and stderr captured, under a
/// watchdog; panics if it hung.
pub fn output_of(command: &mut Command) -> Output {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start latprobe");
    wait_output(child)
}

/// [`output_of`] for a child already started with piped output.
pub fn wait_output(child: Child) -> Output {
    let watchdog = Watchdog::arm(child.id());
    let output = child.wait_with_output().expect("latprobe ends");
    assert_not_hung(watchdog, &output.stderr);
    output
}

/// Disarms `watchdog`, panicking with what latprobe printed if it fired.
pub fn assert_not_hung(watchdog: Watchdog, stderr: &[u8]) {
    if watchdog.disarm() {
        panic!(
            "latprobe hung and was killed (its threads are described above); it said:\n{}",
            String::from_utf8_lossy(stderr)
        );
    }
}

/// What process `pid`'s threads are doing, and which tasks of the machine are
/// running or blocked uninterruptibly.
fn describe(pid: u32) -> String {
    let mut out = String::new();
    let read = |p: String| fs::read_to_string(p).unwrap_or_default();
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.filter_map(Result::ok).collect::<Vec<_>>());
    for task in tasks.unwrap_or_default() {
        let dir = task.path().display().to_string();
        let (name, state, cpu) = stat_fields(&read(format!("{dir}/stat")));
        let _ = writeln!(
            out,
            "  thread {} {name}: state {state}, {cpu} ticks on CPU, wchan {}, syscall {}",
            task.file_name().to_string_lossy(),
            read(format!("{dir}/wchan")).trim(),
            read(format!("{dir}/syscall")).split_whitespace().next().unwrap_or("?"),
        );
        for frame in read(format!("{dir}/stack")).lines().take(16) {
            let _ = writeln!(out, "      {frame}");
        }
    }
    let _ = writeln!(out, "  load: {}", read("/proc/loadavg".into()).trim());
    for proc in fs::read_dir("/proc").into_iter().flatten().filter_map(Result::ok) {
        let Ok(p) = proc.file_name().to_string_lossy().parse::<u32>() else { continue };
        for task in fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().filter_map(Result::ok) {
            let (name, state, cpu) = stat_fields(&read(format!("{}/stat", task.path().display())));
            if state == "R" || state == "D" {
                let _ =
                    writeln!(out, "  task {}/{} {name}: {state}, {cpu} ticks", p, task.file_name().to_string_lossy());
            }
        }
    }
    out
}

/// Name, state and user+system ticks from a /proc stat line.
fn stat_fields(stat: &str) -> (String, String, u64) {
    let Some((head, rest)) = stat.rsplit_once(") ") else { return ("?".into(), "?".into(), 0) };
    let name = head.split_once(" (").map_or("?", |(_, n)| n).to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // After the name: state is field 0, utime 11, stime 12.
    (name, fields.first().unwrap_or(&"?").to_string(), ticks(11) + ticks(12))
}
