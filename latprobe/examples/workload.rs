//! Deterministic workloads for latprobe's tests: each makes an exact number
//! of calls into a known kernel or user function, so tests can assert exact
//! counts and known durations.
//!
//! ```text
//! workload STEP [STEP…]     steps run in order:
//!   getppid N               N getppid() system calls
//!   read N                  N one-byte read()s of /dev/zero (N vfs_read calls)
//!   readfor DUR             one-byte read()s of /dev/zero for DUR (CPU in the kernel)
//!   sleep N DUR             N nanosleep() calls of DUR (e.g. 5ms)
//!   recurse N DEPTH DUR     N calls of a function recursing DEPTH deep, the
//!                           innermost sleeping DUR (a uprobe target)
//!   udp N                   N UDP datagrams over loopback (NET_RX softirqs)
//!   tcp N                   N TCP connections over loopback, each accepted
//!                           and sent one byte (N inet_csk_accept calls)
//!   spin DUR                burn CPU for DUR
//!   pin CPU                 run the following steps on CPU only
//!   report                  print `elapsed_ns=N` since the workload started
//! ```

use std::{
    env,
    fs::File,
    hint::black_box,
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    process::exit,
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

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity get
    // valid pointers to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            usage(&format!("cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error()));
        }
    }
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
            ("readfor", [d, tail @ ..]) => {
                let zero = File::open("/dev/zero").expect("open /dev/zero");
                let mut byte = [0u8; 1];
                let until = Instant::now() + duration(d);
                while Instant::now() < until {
                    for _ in 0..1000 {
                        (&zero).read_exact(&mut byte).expect("read /dev/zero");
                    }
                }
                tail
            }
            ("sleep", [n, d, tail @ ..]) => {
                let d = duration(d);
                for _ in 0..number(n) {
                    sleep(d);
                }
                tail
            }
            ("recurse", [n, depth, d, tail @ ..]) => {
                let nap = duration(d).as_micros() as u64;
                for _ in 0..number(n) {
                    black_box(latprobe_workload_recurse(number(depth) as u32, nap));
                }
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
            ("spin", [d, tail @ ..]) => {
                let until = Instant::now() + duration(d);
                while Instant::now() < until {
                    black_box(0);
                }
                tail
            }
            ("pin", [cpu, tail @ ..]) => {
                pin_to(number(cpu) as usize);
                tail
            }
            ("report", tail) => {
                println!("elapsed_ns={}", started.elapsed().as_nanos());
                tail
            }
            _ => usage(&format!("unknown or incomplete step at {step:?}")),
        };
    }
}
