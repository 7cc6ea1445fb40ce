//! Deterministic workloads for latprobe's tests: each makes an exact number
//! of calls into a known kernel or user function, so tests can assert exact
//! counts and known durations.
//!
//! ```text
//! workload STEP [STEP…]     steps run in order:
//!   getppid N               N getppid() system calls
//!   read N                  N one-byte read()s of /dev/zero (N vfs_read calls)
//!   readfor DUR             one-byte read()s of /dev/zero for DUR (CPU in the kernel)
//!   rare N EVERY DUR        N calls of latprobe_workload_rare: one in EVERY
//!                           reads /dev/zero for DUR (slow, in vfs_read), the
//!                           others stat("/") 50 times (fast, in vfs_statx,
//!                           and plain to see in an on-CPU graph)
//!   sleep N DUR             N nanosleep() calls of DUR (e.g. 5ms); each
//!                           prints `workload: slept NS ns` on stderr
//!   together N DUR          N threads each make one nanosleep() of DUR, all
//!                           at once (N calls in flight together)
//!   recurse N DEPTH DUR     N calls of a function recursing DEPTH deep, the
//!                           innermost sleeping DUR (a uprobe target)
//!   hot DUR EVERY           call latprobe_workload_hot (next to nothing) as
//!                           fast as it can for DUR; every EVERY prints
//!                           `workload: hot N calls in NS ns` on stderr
//!                           (the throughput a tracer leaves it)
//!   stdin                   wait for a line on stdin (a start gate for tests)
//!   pingpong N              N round trips of one byte between the main
//!                           thread and a second one over two pipes: 2N
//!                           wakeups, each followed by a context switch
//!                           (after `pin CPU`, one switch between the two
//!                           threads each; `perf bench sched pipe`'s loop)
//!   udp N                   N UDP datagrams over loopback (NET_RX softirqs)
//!   tcp N                   N TCP connections over loopback, each accepted
//!                           and sent one byte (N inet_csk_accept calls)
//!   accept-queue PORT N DUR N clients connect to 127.0.0.1:PORT at once;
//!                           the server accepts one every DUR (the Kth
//!                           accepted waited about K x DUR in the queue)
//!   rx-delay PORT N DUR     one connection to 127.0.0.1:PORT; N times the
//!                           client sends a message and the server sleeps
//!                           DUR before reading it (each waits about DUR in
//!                           the receive queue), then answers; prints
//!                           `workload: queued NS ns` per message, the time
//!                           from sending it to the server's read
//!   no-accept PORT BACKLOG N DUR
//!                           a listener with BACKLOG that never accepts; N
//!                           clients connect at once, each giving up after
//!                           DUR (those past the full accept queue see
//!                           their SYNs dropped and retransmitted)
//!   no-accept6 PORT BACKLOG N DUR
//!                           the same on [::1]:PORT (IPv6)
//!   workers PORT N SLOW     two worker processes accept on 127.0.0.1:PORT
//!                           (SO_REUSEPORT), one at once, the other SLOW
//!                           after each connection is queued; N clients
//!                           connect one after the other, each waiting to be
//!                           served. Prints `workload: worker pid=P
//!                           delay=NS` per worker
//!   worker PORT DELAY       (a worker of `workers`, run as its own process)
//!   refused PORT N          N connects to 127.0.0.1:PORT, where nothing
//!                           listens (N resets sent and received)
//!   collapse PORT DUR       one connection to 127.0.0.1:PORT whose server
//!                           side's receive queue the kernel collapses: the
//!                           client sends 64 KiB chunks the server reads at
//!                           once (its receive window grows), then for DUR
//!                           1-byte TCP_NODELAY writes while the server reads
//!                           512 bytes every 500 ms (longer, up to 3 x DUR,
//!                           until the kernel has collapsed once). Sets
//!                           net.ipv4.tcp_autocorking to 0 meanwhile (root),
//!                           so each byte is a segment of its own; prints
//!                           `workload: collapse sent N bytes`
//!   dir-churn THREADS N     THREADS threads each create and unlink N files
//!                           in one new directory (its inode lock contended)
//!   mmap-churn THREADS N    THREADS threads each map, touch and unmap
//!                           64 KiB N times (the process's mmap lock contended)
//!   dir-churn-in DIR THREADS N
//!                           the same in directory DIR, which exists (two
//!                           such processes contend on its lock)
//!   futex-churn THREADS DUR 256 threads wait on one futex; for DUR,
//!                           THREADS threads call FUTEX_WAKE_BITSET for a bit
//!                           none waits for: the kernel walks all 256 under
//!                           the futex's hash-bucket spinlock and wakes none
//!                           (the spinlock contended, held most of the time)
//!   spin DUR                burn CPU for DUR
//!   pin CPU                 run the following steps on CPU only
//!   report                  print `elapsed_ns=N` since the workload started,
//!                           on stderr (stdout may be a tracer's JSON)
//!   rename NAME             set the process's name (comm) to NAME, which
//!                           may hold newlines and escapes (hostile names)
//!   contend DUR [MODE]      a run-queue wait of about DUR: the main thread
//!                           ("wakee") and a "spinner" thread pinned to one
//!                           CPU; the spinner wakes the wakee through a pipe,
//!                           then burns the CPU for DUR before letting it
//!                           run. Prints `contend: cpu=C spinner=TID
//!                           wakee=TID` on stderr. MODE (needs root):
//!                             fifo  spinner SCHED_FIFO 3, wakee SCHED_FIFO 2
//!                                   (default: no scheduler lets the wakee in)
//!                             nice  spinner nice -20, wakee nice 19
//!                             idle  spinner SCHED_OTHER, wakee SCHED_IDLE
//! ```
//!
//! Why `fifo` is the default for `contend`: a fair-class wakee cannot
//! preempt on wakeup with `nice` or `idle`, but the fair scheduler still ends
//! the spinner's slice and lets the wakee run within a few ms on CFS kernels
//! (6.1); only a real-time spinner holds the CPU for the whole DUR on every
//! kernel (the fair server of 6.12+ steps in only after ~950 ms). The wakee
//! is real-time too, one priority lower, so it is the very next task to run
//! when the spinner steps down: the task switched out before it is the
//! spinner, every time. Priorities 3 and 2 rather than 2 and 1: PREEMPT_RT
//! kernels run ktimers/N and rcuc/N at SCHED_FIFO 1, and those, starved by
//! the spinner too, would otherwise run between it and the wakee.

use std::{
    env, fs,
    fs::File,
    hint::black_box,
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    process::exit,
    thread,
    thread::sleep,
    time::{Duration, Instant},
};

fn duration(text: &str) -> Duration {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        usage(&format!("bad duration {text}"))
    };
    Duration::from_secs_f64(number.parse::<f64>().unwrap_or_else(|_| usage(text)) * scale)
}

fn usage(why: &str) -> ! {
    eprintln!("workload: {why}; see the doc comment of latprobe/examples/workload.rs");
    exit(2)
}

/// The uprobe target of the recursion tests: kept out of line and unmangled
/// so its symbol is in the binary under this exact name.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn latprobe_workload_recurse(depth: u32, nap_us: u64) -> u64 {
    if depth <= 1 {
        sleep(Duration::from_micros(nap_us));
        return 1;
    }
    black_box(latprobe_workload_recurse(depth - 1, nap_us)) + 1
}

/// Next to nothing, called as often as it can be by `hot`: a uprobe target
/// whose cost is all the tracer's. Out of line and unmangled.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn latprobe_workload_hot(x: u64) -> u64 {
    black_box(x.wrapping_mul(31) + 7)
}

/// `hot DUR EVERY`: calls of `latprobe_workload_hot` for `d`, their
/// number said every `every`.
fn hot(d: Duration, every: Duration) {
    let end = Instant::now() + d;
    let mut window = Instant::now();
    let mut calls = 0u64;
    loop {
        for i in 0..256 {
            black_box(latprobe_workload_hot(i));
        }
        calls += 256;
        let now = Instant::now();
        if now - window >= every || now >= end {
            eprintln!("workload: hot {calls} calls in {} ns", (now - window).as_nanos());
            (window, calls) = (now, 0);
        }
        if now >= end {
            return;
        }
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and
    // sched_setaffinity get valid pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            usage(&format!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error()));
        }
    }
}

/// Sets the calling thread's policy and priority (or nice value, for the
/// fair policies).
fn set_policy(policy: libc::c_int, priority: i32) {
    // SAFETY: all-zero is a valid sched_param (musl's has more fields).
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    param.sched_priority = if policy == libc::SCHED_FIFO { priority } else { 0 };
    // The raw system call: musl's sched_setscheduler() always fails with
    // ENOSYS, since Linux applies it to one thread, not the process.
    // SAFETY: valid pointer to a sched_param; 0 is the calling thread.
    if unsafe { libc::syscall(libc::SYS_sched_setscheduler, 0, policy, &raw const param) } != 0 {
        usage(&format!("cannot set scheduling policy {policy}: {} (needs root)", std::io::Error::last_os_error()));
    }
    if policy != libc::SCHED_FIFO && priority != 0 {
        // SAFETY: setpriority on this thread's own tid.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, priority) } != 0 {
            usage(&format!("cannot set nice {priority}: {} (needs root)", std::io::Error::last_os_error()));
        }
    }
}

/// Whether thread `tid` of this process is asleep (state S).
fn asleep(tid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // The state follows the parenthesised comm, which may contain spaces.
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
}

/// The `contend` step: see the module comment. The calling (main) thread
/// is the wakee, so `--tid PID` selects it; it is renamed "wakee" meanwhile.
fn contend(spin: Duration, mode: &str) {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
    let ((spin_policy, spin_prio), (wake_policy, wake_prio)) = match mode {
        "fifo" => ((libc::SCHED_FIFO, 3), (libc::SCHED_FIFO, 2)),
        "nice" => ((libc::SCHED_OTHER, -20), (libc::SCHED_OTHER, 19)),
        "idle" => ((libc::SCHED_OTHER, 0), (libc::SCHED_IDLE, 0)),
        other => usage(&format!("unknown contend mode {other}")),
    };
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        usage("cannot create a pipe");
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size for this thread's affinity.
    unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut saved) };
    set_name(c"wakee");
    pin(cpu);
    set_policy(wake_policy, wake_prio);
    // SAFETY: gettid has no preconditions.
    let wakee_tid = unsafe { libc::gettid() };
    let spinner = thread::Builder::new()
        .name("spinner".into())
        .spawn(move || {
            pin(cpu);
            // The wakee must be asleep in read() before it is woken.
            while !asleep(wakee_tid) {
                sleep(Duration::from_millis(1));
            }
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            eprintln!("contend: cpu={cpu} spinner={tid} wakee={wakee_tid}");
            set_policy(spin_policy, spin_prio);
            let until = Instant::now() + spin;
            let byte = 0u8;
            // SAFETY: writing one byte from a valid buffer to our pipe: the
            // wakee becomes runnable on this CPU, behind us.
            unsafe { libc::write(write_fd, (&raw const byte).cast(), 1) };
            while Instant::now() < until {
                black_box(0);
            }
            // Stepping down lets the wakee in at once.
            set_policy(libc::SCHED_OTHER, 0);
        })
        .expect("spawn spinner");
    let mut byte = 0u8;
    // SAFETY: reading one byte into a valid buffer from our pipe.
    unsafe { libc::read(read_fd, (&raw mut byte).cast(), 1) };
    spinner.join().expect("spinner");
    set_policy(libc::SCHED_OTHER, 0);
    // SAFETY: restoring the affinity saved above; closing our pipe.
    unsafe {
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &saved);
        libc::close(read_fd);
        libc::close(write_fd);
    }
    set_name(c"workload");
}

/// Renames the calling thread (its comm).
fn set_name(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of up to 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// The `--during` test's function: a fast path and, rarely, a slow one that
/// runs through different kernel functions. Out of line and unmangled.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn latprobe_workload_rare(slow: bool, slow_us: u64) {
    if !slow {
        for _ in 0..50 {
            black_box(std::fs::metadata("/").is_ok());
        }
        return;
    }
    read_zero_for(Duration::from_micros(slow_us));
}

/// One-byte reads of /dev/zero for `d`: CPU time spent in vfs_read.
/// `pingpong N`: each byte the main thread writes wakes the other, which
/// answers on the second pipe, so every round trip is two wakeups and two
/// switches on a context-switch-bound workload.
fn pingpong(n: u64) {
    let (mut to_peer_r, mut to_peer_w) = std::io::pipe().expect("pipe");
    let (mut back_r, mut back_w) = std::io::pipe().expect("pipe");
    let peer = thread::spawn(move || {
        let mut byte = [0u8; 1];
        for _ in 0..n {
            to_peer_r.read_exact(&mut byte).expect("pingpong peer read");
            back_w.write_all(&byte).expect("pingpong peer write");
        }
    });
    let mut byte = [0u8; 1];
    for _ in 0..n {
        to_peer_w.write_all(&byte).expect("pingpong write");
        back_r.read_exact(&mut byte).expect("pingpong read");
    }
    peer.join().expect("pingpong peer");
}

fn read_zero_for(d: Duration) {
    let zero = File::open("/dev/zero").expect("open /dev/zero");
    let mut byte = [0u8; 1];
    let until = Instant::now() + d;
    while Instant::now() < until {
        for _ in 0..100 {
            (&zero).read_exact(&mut byte).expect("read /dev/zero");
        }
    }
}

fn port_number(s: &str) -> u16 {
    s.parse().unwrap_or_else(|_| usage(&format!("bad port {s}")))
}

/// A listener on 127.0.0.1:`port` with room for `backlog` waiting
/// connections, shared with other processes' listeners when `reuse_port`.
fn listen_with(port: u16, backlog: i32, reuse_port: bool) -> TcpListener {
    // std's listen() asks for a backlog of 128; ask for what the step needs.
    // SAFETY: plain socket calls on a descriptor this function owns until
    // it hands it to TcpListener.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        let options: &[libc::c_int] =
            if reuse_port { &[libc::SO_REUSEADDR, libc::SO_REUSEPORT] } else { &[libc::SO_REUSEADDR] };
        for &option in options {
            let size = size_of::<libc::c_int>() as libc::socklen_t;
            libc::setsockopt(fd, libc::SOL_SOCKET, option, (&raw const one).cast(), size);
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be() },
            sin_zero: [0; 8],
        };
        let bound = libc::bind(fd, (&raw const addr).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t);
        assert!(bound == 0, "bind 127.0.0.1:{port}: {}", std::io::Error::last_os_error());
        assert!(libc::listen(fd, backlog) == 0, "listen: {}", std::io::Error::last_os_error());
        std::os::fd::FromRawFd::from_raw_fd(fd)
    }
}

fn listen(port: u16, backlog: i32) -> TcpListener {
    listen_with(port, backlog, false)
}

fn dir_churn(threads: usize, n: u64) {
    let dir = env::temp_dir().join(format!("latprobe-dir-churn-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("create the churn directory");
    churn_in(&dir, threads, n);
    fs::remove_dir(&dir).expect("remove the churn directory");
}

/// THREADS threads each create and unlink N files in `dir`, named by this
/// process and thread so that processes sharing `dir` never collide.
fn churn_in(dir: &std::path::Path, threads: usize, n: u64) {
    let me = std::process::id();
    thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..n {
                    let path = dir.join(format!("{me}-{t}-{i}"));
                    drop(File::create(&path).unwrap_or_else(|e| usage(&format!("create {}: {e}", path.display()))));
                    fs::remove_file(&path).expect("unlink");
                }
            });
        }
    });
}

fn mmap_churn(threads: usize, n: u64) {
    const LEN: usize = 64 << 10;
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(move || {
                for _ in 0..n {
                    // SAFETY: an anonymous private mapping of LEN bytes, written
                    // within its bounds and unmapped once; nothing else sees it.
                    unsafe {
                        let p = libc::mmap(
                            std::ptr::null_mut(),
                            LEN,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        );
                        assert!(p != libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
                        p.cast::<u8>().write_volatile(1);
                        libc::munmap(p, LEN);
                    }
                }
            });
        }
    });
}

fn futex_churn(threads: usize, how_long: Duration) {
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
    const PARKED: usize = 256;
    let word = AtomicU32::new(0);
    let parked = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let futex = |op: i32, val: u32, bitset: u32| {
        // SAFETY: a futex call on a live, aligned u32 of this process, no
        // timeout (null), no second futex.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                op | libc::FUTEX_PRIVATE_FLAG,
                val,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                bitset,
            )
        }
    };
    thread::scope(|s| {
        for _ in 0..PARKED {
            s.spawn(|| {
                parked.fetch_add(1, Ordering::AcqRel);
                while !done.load(Ordering::Acquire) {
                    futex(libc::FUTEX_WAIT_BITSET, 0, 1);
                }
            });
        }
        // The waiters parked (or about to) before the wakers start.
        while parked.load(Ordering::Acquire) < PARKED {
            sleep(Duration::from_millis(10));
        }
        sleep(Duration::from_millis(100));
        let until = Instant::now() + how_long;
        let wakers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    while Instant::now() < until {
                        // No waiter is in bitset 2: the kernel walks them all
                        // under the bucket's lock and wakes none.
                        futex(libc::FUTEX_WAKE_BITSET, i32::MAX as u32, 1 << 1);
                    }
                })
            })
            .collect();
        for w in wakers {
            w.join().expect("waker");
        }
        done.store(true, Ordering::Release);
        word.store(1, Ordering::Release);
        futex(libc::FUTEX_WAKE, i32::MAX as u32, 0);
    });
}

/// A worker of `workers`: serves each connection DELAY after it is queued.
fn worker(port: u16, delay: Duration) -> ! {
    let listener = listen_with(port, 64, true);
    eprintln!("workload: worker pid={} delay={}", std::process::id(), delay.as_nanos());
    println!("ready");
    loop {
        // Wait for a connection to be queued, then make it wait DELAY.
        let mut fds =
            [libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&listener), events: libc::POLLIN, revents: 0 }];
        // SAFETY: one valid pollfd, waited on without a timeout.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
        sleep(delay);
        let (mut served, _) = listener.accept().expect("accept");
        served.write_all(b"k").expect("serve");
    }
}

fn workers(port: u16, n: u64, slow: &str) {
    let me = env::current_exe().expect("own path");
    let mut children: Vec<std::process::Child> = ["0ms", slow]
        .iter()
        .map(|delay| {
            let mut child = std::process::Command::new(&me)
                .args(["worker", &port.to_string(), delay])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start a worker");
            // Its listener is bound once it says so.
            let mut ready = [0u8; 6];
            child.stdout.as_mut().expect("piped").read_exact(&mut ready).expect("worker ready");
            child
        })
        .collect();
    for _ in 0..n {
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).expect("served");
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `n` clients connect to `to` at once, each giving up after `patience`.
fn connect_all(to: std::net::SocketAddr, n: usize, patience: Duration) {
    thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| TcpStream::connect_timeout(&to, patience).ok());
        }
    });
}

fn accept_queue(port: u16, n: usize, every: Duration) {
    let listener = listen(port, n as i32 + 8);
    // Every client is connected (its handshake done, its connection in the
    // accept queue) before the first accept.
    let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect")).collect();
    for _ in 0..n {
        sleep(every);
        let (server, _) = listener.accept().expect("accept");
        drop(server);
    }
    drop(clients);
}

fn rx_delay(port: u16, n: u64, delay: Duration) {
    let listener = listen(port, 8);
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    client.set_nodelay(true).expect("TCP_NODELAY");
    server.set_nodelay(true).expect("TCP_NODELAY");
    let mut byte = [0u8; 1];
    for _ in 0..n {
        let sent = Instant::now();
        client.write_all(b"m").expect("send");
        sleep(delay);
        server.read_exact(&mut byte).expect("server read");
        eprintln!("workload: queued {} ns", sent.elapsed().as_nanos());
        server.write_all(b"a").expect("answer");
        client.read_exact(&mut byte).expect("client read");
    }
}

/// Sets a sysctl under /proc/sys for as long as it lives, then puts the
/// old value back.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let old = fs::read_to_string(path).unwrap_or_else(|e| usage(&format!("{path}: {e}")));
        fs::write(path, value).unwrap_or_else(|e| usage(&format!("{path}: {e} (needs root)")));
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = fs::write(self.path, self.old.trim());
    }
}

/// The kernel's counter `name` of `TcpExt` in /proc/net/netstat (0 where
/// it has none).
fn tcp_ext(name: &str) -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut rows = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Makes the kernel collapse the receive queue of the server's side of one
/// connection on `port`: many 1-byte segments (each an skb whose truesize is
/// hundreds of bytes) fill the receive buffer long before they fill the
/// window a bulk phase grew, so the kernel prunes the queue, collapsing the
/// small skbs into full ones, again each time it fills up.
fn collapse(port: u16, small_for: Duration) {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 64;
    // Autocorking would merge the 1-byte writes into larger segments.
    let _corking = Sysctl::set("/proc/sys/net/ipv4/tcp_autocorking", "0");
    let listener = listen(port, 8);
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = stop.clone();
    let reader = thread::spawn(move || {
        let mut bulk = vec![0u8; CHUNK];
        for _ in 0..CHUNKS {
            server.read_exact(&mut bulk).expect("server read");
        }
        // Slow reads of the small writes, so that they pile up.
        let mut some = [0u8; 512];
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            sleep(Duration::from_millis(500));
            let _ = server.read(&mut some).expect("server read");
        }
        server
    });
    let chunk = vec![b'b'; CHUNK];
    for _ in 0..CHUNKS {
        client.write_all(&chunk).expect("send");
    }
    client.set_nodelay(true).expect("TCP_NODELAY");
    client.set_nonblocking(true).expect("non-blocking");
    // DUR, and then, on a machine too slow to have filled the buffer by
    // then, until the kernel has collapsed once (TCPRcvCollapsed moved),
    // for at most 3 x DUR.
    let collapsed = tcp_ext("TCPRcvCollapsed");
    let (end, last) = (Instant::now() + small_for, Instant::now() + small_for * 3);
    let mut sent = 0u64;
    loop {
        let now = Instant::now();
        if now >= last || (now >= end && tcp_ext("TCPRcvCollapsed") != collapsed) {
            break;
        }
        match client.write(b"s") {
            Ok(n) => sent += n as u64,
            // The window or the send buffer is full: the reader catches up.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sleep(Duration::from_millis(1)),
            Err(e) => panic!("send: {e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let server = reader.join().expect("reader");
    eprintln!("workload: collapse sent {sent} bytes");
    drop((client, server));
}

fn main() {
    let started = Instant::now();
    let args: Vec<String> = env::args().skip(1).collect();
    let mut rest = args.as_slice();
    let number = |s: &str| s.parse::<u64>().unwrap_or_else(|_| usage(&format!("bad number {s}")));
    while let Some((step, tail)) = rest.split_first() {
        rest = match (step.as_str(), tail) {
            ("getppid", [n, tail @ ..]) => {
                for _ in 0..number(n) {
                    // SAFETY: getppid has no preconditions.
                    black_box(unsafe { libc::getppid() });
                }
                tail
            }
            ("read", [n, tail @ ..]) => {
                let zero = File::open("/dev/zero").expect("open /dev/zero");
                let mut byte = [0u8; 1];
                for _ in 0..number(n) {
                    (&zero).read_exact(&mut byte).expect("read /dev/zero");
                }
                tail
            }
            ("pingpong", [n, tail @ ..]) => {
                pingpong(number(n));
                tail
            }
            ("hot", [d, every, tail @ ..]) => {
                hot(duration(d), duration(every));
                tail
            }
            ("readfor", [d, tail @ ..]) => {
                read_zero_for(duration(d));
                tail
            }
            ("rare", [n, every, d, tail @ ..]) => {
                let (every, slow_us) = (number(every).max(1), duration(d).as_micros() as u64);
                for i in 0..number(n) {
                    latprobe_workload_rare(i % every == 0, slow_us);
                }
                tail
            }
            ("sleep", [n, d, tail @ ..]) => {
                let d = duration(d);
                for _ in 0..number(n) {
                    // Each sleep as this process saw it: under emulation a
                    // short sleep can take milliseconds, and tests judge
                    // latprobe against this clock, not against `d`.
                    let started = Instant::now();
                    sleep(d);
                    eprintln!("workload: slept {} ns", started.elapsed().as_nanos());
                }
                tail
            }
            ("together", [n, d, tail @ ..]) => {
                let (n, d) = (number(n) as usize, duration(d));
                let gate = std::sync::Barrier::new(n);
                std::thread::scope(|s| {
                    for _ in 0..n {
                        s.spawn(|| {
                            gate.wait();
                            sleep(d);
                        });
                    }
                });
                tail
            }
            ("recurse", [n, depth, d, tail @ ..]) => {
                let nap = duration(d).as_micros() as u64;
                for _ in 0..number(n) {
                    black_box(latprobe_workload_recurse(number(depth) as u32, nap));
                }
                tail
            }
            ("stdin", tail) => {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).expect("read stdin");
                tail
            }
            ("udp", [n, tail @ ..]) => {
                let rx = UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
                let tx = UdpSocket::bind("127.0.0.1:0").expect("bind sender");
                let mut buf = [0u8; 64];
                for _ in 0..number(n) {
                    tx.send_to(b"latprobe", rx.local_addr().unwrap()).expect("send");
                    rx.recv(&mut buf).expect("receive");
                }
                tail
            }
            ("tcp", [n, tail @ ..]) => {
                let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
                let addr = listener.local_addr().unwrap();
                let mut byte = [0u8; 1];
                for _ in 0..number(n) {
                    let mut client = TcpStream::connect(addr).expect("connect");
                    let (mut server, _) = listener.accept().expect("accept");
                    client.write_all(b"x").expect("send");
                    server.read_exact(&mut byte).expect("receive");
                }
                tail
            }
            ("accept-queue", [port, n, d, tail @ ..]) => {
                accept_queue(port_number(port), number(n) as usize, duration(d));
                tail
            }
            ("rx-delay", [port, n, d, tail @ ..]) => {
                rx_delay(port_number(port), number(n), duration(d));
                tail
            }
            ("no-accept", [port, backlog, n, d, tail @ ..]) => {
                let port = port_number(port);
                let _listener = listen(port, number(backlog) as i32);
                let to = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
                connect_all(to, number(n) as usize, duration(d));
                tail
            }
            ("no-accept6", [port, backlog, n, d, tail @ ..]) => {
                let to = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port_number(port)));
                let listener = TcpListener::bind(to).unwrap_or_else(|e| usage(&format!("bind {to}: {e}")));
                // listen() again sets the backlog std chose (128).
                // SAFETY: listen on a socket the listener owns.
                let relisten =
                    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), number(backlog) as i32) };
                assert!(relisten == 0, "listen: {}", std::io::Error::last_os_error());
                connect_all(to, number(n) as usize, duration(d));
                tail
            }
            ("workers", [port, n, slow, tail @ ..]) => {
                workers(port_number(port), number(n), slow);
                tail
            }
            ("worker", [port, delay]) => worker(port_number(port), duration(delay)),
            ("refused", [port, n, tail @ ..]) => {
                let port = port_number(port);
                for _ in 0..number(n) {
                    let refused = TcpStream::connect(("127.0.0.1", port));
                    assert!(refused.is_err(), "something listens on port {port}");
                }
                tail
            }
            ("collapse", [port, d, tail @ ..]) => {
                collapse(port_number(port), duration(d));
                tail
            }
            ("dir-churn", [threads, n, tail @ ..]) => {
                dir_churn(number(threads) as usize, number(n));
                tail
            }
            ("mmap-churn", [threads, n, tail @ ..]) => {
                mmap_churn(number(threads) as usize, number(n));
                tail
            }
            ("dir-churn-in", [dir, threads, n, tail @ ..]) => {
                churn_in(std::path::Path::new(dir), number(threads) as usize, number(n));
                tail
            }
            ("futex-churn", [threads, d, tail @ ..]) => {
                futex_churn(number(threads) as usize, duration(d));
                tail
            }
            ("spin", [d, tail @ ..]) => {
                let until = Instant::now() + duration(d);
                while Instant::now() < until {
                    black_box(0);
                }
                tail
            }
            ("pin", [cpu, tail @ ..]) => {
                pin(number(cpu) as usize);
                tail
            }
            ("rename", [name, tail @ ..]) => {
                let name = std::ffi::CString::new(name.as_bytes()).unwrap_or_else(|_| usage("NUL in name"));
                set_name(&name);
                tail
            }
            ("report", tail) => {
                eprintln!("elapsed_ns={}", started.elapsed().as_nanos());
                tail
            }
            ("contend", [d, mode, tail @ ..]) if ["fifo", "nice", "idle"].contains(&mode.as_str()) => {
                contend(duration(d), mode);
                tail
            }
            ("contend", [d, tail @ ..]) => {
                contend(duration(d), "fifo");
                tail
            }
            _ => usage(&format!("unknown or incomplete step at {step:?}")),
        };
    }
}
