//! `latprobe tcp`: the waits of a connection's stages, and its losses.
//!
//! - softirq: per CPU, the first `softirq_raise` of NET_RX since it last ran
//!   is remembered; `softirq_entry` of NET_RX ends the wait. No shared state.
//! - handshake: `inet_sock_set_state` to SYN_SENT stores the socket's start,
//!   SYN_SENT → ESTABLISHED ends it.
//!   A listener's handshakes end at `inet_csk_complete_hashdance` (fentry),
//!   timed from the request's first SYN-ACK, which the kernel stamps.
//! - accept: SYN_RECV → ESTABLISHED (the server's new socket, now in the
//!   accept queue) stores the start, fexit of `inet_csk_accept` ends it.
//! - rxqueue: `tcp_probe` (every segment an established socket receives)
//!   stores a data segment's arrival by `sk_buff` address, the first
//!   `skb_copy_datagram_iovec` of that segment ends it.
//! - collapse: fentry (else a kprobe) on `tcp_collapse` stores, for the
//!   first collapse of a prune, its start by socket address; fexit of
//!   `tcp_try_rmem_schedule` (which `tcp_prune_queue` is inlined into) ends
//!   it, so the collapses of one prune are one wait. fentry on
//!   `tcp_collapse_one` counts the segments merged away (TCPRcvCollapsed).
//!   Nothing runs per packet but that fexit, which reads one shared counter
//!   of prunes under way and returns when there is none.
//! - losses: the `tcp_retransmit_*` and reset tracepoints count per port and
//!   send the connection through the ring buffer; fentry and fexit where a
//!   listener takes a SYN or a last ACK count those it drops with a full
//!   accept queue.
//!
//! Socket starts live in a preallocated hash map (per-bucket locks, no global
//! lock, no allocation on the packet path), removed when the wait ends or the
//! socket closes; segment arrivals in a per-CPU-list LRU map, as a segment
//! merged into another or pruned is never copied under its own address.
//! Rust eBPF has no CO-RE: every `sock` and `sk_buff` field is read at an
//! offset userspace found in the running kernel's BTF.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_COMMON_LRU, BPF_NOEXIST},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{btf_map, btf_tracepoint, fentry, fexit, kprobe, kretprobe, raw_tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext,
    },
};
use latprobe_common::{
    func::{BucketGroup, FuncStats},
    tcp::{
        by, event, histogram_index, loss, stage, start, state, ListenCheck, LossCounts, Lost, SkbStart, SockStart,
        TcpEvent, MAX_DROP_REASONS, MAX_PORTS, PID_KEY, REMOTE_PORT,
    },
    COMM_LEN,
};

use crate::helpers::{self, add, field, global, masked, Writers};

// Load-time globals (see `latprobe_common::tcp::globals`).
#[unsafe(no_mangle)]
static TCP_TARGET_TGID: u32 = 0;
#[unsafe(no_mangle)]
static TCP_PORTS: [u32; MAX_PORTS] = [0; MAX_PORTS];
#[unsafe(no_mangle)]
static TCP_PORTS_N: u32 = 0;
#[unsafe(no_mangle)]
static TCP_BY: u32 = by::PORT;
#[unsafe(no_mangle)]
static TCP_KEY_SLOTS_N: u32 = 0;
#[unsafe(no_mangle)]
static TCP_THRESHOLD_NS: u64 = u64::MAX;
#[unsafe(no_mangle)]
static TCP_LOSS_EVENTS: u32 = 0;
#[unsafe(no_mangle)]
static TCP_EPHEMERAL_LO: u32 = 32768;
#[unsafe(no_mangle)]
static TCP_EPHEMERAL_HI: u32 = 60999;
#[unsafe(no_mangle)]
static TCP_SK_FAMILY_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_NUM_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_DPORT_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_RCV_SADDR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_DADDR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_V6_RCV_SADDR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_V6_DADDR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_STATE_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_PROTOCOL_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SKB_CB_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_ACK_BACKLOG_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_MAX_ACK_BACKLOG_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_DROPS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_REQ_SNT_SYNACK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SK_RCVBUF_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SKB_SK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SKB_HEAD_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SKB_PROTOCOL_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SKB_NETWORK_HEADER_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TCP_SKB_TRANSPORT_HEADER_OFF: u32 = 0;

/// Running totals per stage and key slot.
#[btf_map]
static TCP_STATS: PerCpuArray<FuncStats, 1> = PerCpuArray::new();

/// Keyed by `histogram * hdr::GROUPS + group`, as `fn`'s BUCKETS.
#[btf_map]
static TCP_BUCKETS: PerCpuArray<BucketGroup, 1> = PerCpuArray::new();

/// Key → slot (1..=N); slot 0 is "other".
#[btf_map]
static TCP_KEY_SLOTS: HashMap<u32, u32, 1> = HashMap::new();

#[btf_map]
static TCP_NEXT_SLOT: Array<u64, 1> = Array::new();

/// Loss counts per key slot.
#[btf_map]
static TCP_LOSSES: PerCpuArray<LossCounts, 1> = PerCpuArray::new();

#[btf_map]
static TCP_LOST: PerCpuArray<Lost, 1> = PerCpuArray::new();

/// Socket address → its pending start.
#[btf_map]
static TCP_SOCKS: HashMap<u64, SockStart, 1> = HashMap::new();

/// `sk_buff` address → the arrival of its data.
#[btf_map]
static TCP_SKBS: LruHashMap<u64, SkbStart, 1, { BPF_F_NO_COMMON_LRU as usize }> = LruHashMap::new();

#[btf_map]
static TCP_KEY_COMMS: PerCpuArray<[u8; COMM_LEN], 1> = PerCpuArray::new();

#[btf_map]
static TCP_DROPS: PerCpuArray<u64, 1> = PerCpuArray::new();

#[btf_map]
static TCP_RAISED: PerCpuArray<u64, 1> = PerCpuArray::new();

#[btf_map]
static TCP_EVENTS: RingBuf<TcpEvent, 4096> = RingBuf::new();

/// Socket address → when its prune's first collapse began.
#[btf_map]
static TCP_COLLAPSES: HashMap<u64, u64, 1> = HashMap::new();

/// Task (see `task_key`) → the socket whose prune it began.
#[btf_map]
static TCP_PRUNING: HashMap<u64, u64, 1> = HashMap::new();

/// The listener whose SYN or last ACK this CPU is taking, and its drops
/// then (see `listen_entry`).
#[btf_map]
static TCP_LISTEN_CHECK: PerCpuArray<ListenCheck, 1> = PerCpuArray::new();

/// Prunes under way, machine-wide: written only when one starts or ends.
#[btf_map]
static TCP_COLLAPSES_OPEN: Array<u64, 1> = Array::new();

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const NET_RX_SOFTIRQ: u32 = 3;

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn lost() -> Option<&'static mut Lost> {
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    TCP_LOST.get_ptr_mut(0).and_then(|p| unsafe { p.as_mut() })
}

/// A socket's ports, local and remote, in host order.
#[inline(always)]
fn ports(sk: *const c_void) -> (u32, u32) {
    let local = field::<u16>(sk, &TCP_SK_NUM_OFF).unwrap_or(0);
    let remote = u16::from_be(field::<u16>(sk, &TCP_SK_DPORT_OFF).unwrap_or(0));
    (u32::from(local), u32::from(remote))
}

#[inline(always)]
fn ephemeral(port: u32) -> bool {
    port >= global(&TCP_EPHEMERAL_LO) && port <= global(&TCP_EPHEMERAL_HI)
}

/// The port a connection is known by: the local one for a server's
/// connections, the remote one (with `REMOTE_PORT`) for a connection this
/// machine made from an ephemeral port to a service port.
#[inline(always)]
fn service_key(local: u32, remote: u32) -> u32 {
    if ephemeral(local) && !ephemeral(remote) && remote != 0 {
        REMOTE_PORT | remote
    } else {
        local
    }
}

/// Whether `--port` keeps a connection with these ports.
#[inline(always)]
fn port_wanted(local: u32, remote: u32) -> bool {
    let n = global(&TCP_PORTS_N) as usize;
    if n == 0 {
        return true;
    }
    let wanted = global(&TCP_PORTS);
    let mut i = 0;
    while i < MAX_PORTS {
        if i < n && (wanted[i] == local || wanted[i] == remote) {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn tgid_wanted(tgid: u32) -> bool {
    let want = global(&TCP_TARGET_TGID);
    want == 0 || want == tgid
}

#[inline(always)]
fn is_tcp(sk: *const c_void) -> bool {
    field::<u16>(sk, &TCP_SK_PROTOCOL_OFF) == Some(IPPROTO_TCP)
}

#[inline(always)]
fn slot_of(key: u32) -> usize {
    crate::slots::key_slot(&TCP_KEY_SLOTS, &TCP_NEXT_SLOT, global(&TCP_KEY_SLOTS_N), key)
}

/// The histogram slot of a wait of process `tgid` on a connection known by
/// `port_key`, as `--by` asks.
#[inline(always)]
fn wait_slot(port_key: u32, tgid: u32) -> usize {
    if global(&TCP_BY) == by::PID {
        let slot = slot_of(PID_KEY | tgid);
        // The waits of a process end in it (accept, read), but for a
        // handshake's, which end in softirq: name it only from within.
        let current = (bpf_get_current_pid_tgid() >> 32) as u32;
        if slot != 0 && current == tgid {
            // SAFETY: per-CPU array slots are valid for the program's lifetime.
            if let Some(comm) = TCP_KEY_COMMS.get_ptr_mut(slot as u32).and_then(|p| unsafe { p.as_mut() }) {
                if let Ok(c) = bpf_get_current_comm() {
                    *comm = c;
                }
            }
        }
        slot
    } else {
        slot_of(port_key)
    }
}

/// Adds a wait of `duration` to `stage`'s histogram of key slot `slot`.
#[inline(always)]
fn record(stage: u32, slot: usize, duration: u64) {
    let histogram = histogram_index(stage, slot, global(&TCP_KEY_SLOTS_N) as usize);
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    if let Some(s) = TCP_STATS.get_ptr_mut(histogram as u32).and_then(|p| unsafe { p.as_mut() }) {
        helpers::record(Writers::Many, s, &TCP_BUCKETS, histogram, duration);
    }
}

/// Sends one event, with the connection of `sk` when there is one.
#[inline(always)]
fn send(sk: *const c_void, kind: u32, detail: u32, duration: u64, tgid: u32) {
    emit(if sk.is_null() { Conn::None } else { Conn::Sock(sk) }, kind, detail, duration, tgid, 0);
}

/// Where an event's connection is read from.
#[derive(Clone, Copy)]
enum Conn {
    None,
    Sock(*const c_void),
    /// A received packet no socket holds: its IP header (`family`), and its
    /// ports, destination first.
    Packet {
        family: u16,
        ip: *const u8,
        local: u32,
        remote: u32,
    },
}

/// Sends one event with its connection, and a drop's `reason`.
#[inline(always)]
fn emit(conn: Conn, kind: u32, detail: u32, duration: u64, tgid: u32, reason: u32) {
    let Some(mut entry) = TCP_EVENTS.reserve(0) else {
        if let Some(l) = lost() {
            add(&mut l.events, 1);
        }
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved ring-buffer record of our size; every
    // field is written before submit.
    unsafe {
        (*e).ts_ns = now();
        (*e).duration_ns = duration;
        (*e).kind = kind;
        (*e).detail = detail;
        (*e).tgid = tgid;
        (*e).cpu = bpf_get_smp_processor_id();
        (*e).comm = if tgid != 0 { bpf_get_current_comm().unwrap_or([0; COMM_LEN]) } else { [0; COMM_LEN] };
        (*e).family = 0;
        (*e).local_port = 0;
        (*e).remote_port = 0;
        (*e).state = 0;
        (*e).local_addr = [0; 16];
        (*e).remote_addr = [0; 16];
        (*e).rcvbuf = 0;
        (*e).reason = reason;
        if let Conn::Packet { family, ip, local, remote } = conn {
            (*e).family = family;
            (*e).local_port = local as u16;
            (*e).remote_port = remote as u16;
            // Received: the destination is this machine's end.
            let (to, from, len) = if family == AF_INET6 { (24, 8, 16) } else { (16, 12, 4) };
            let mut l = [0u8; 16];
            let mut r = [0u8; 16];
            if len == 16 {
                l = bpf_probe_read_kernel(ip.wrapping_add(to).cast::<[u8; 16]>()).unwrap_or([0; 16]);
                r = bpf_probe_read_kernel(ip.wrapping_add(from).cast::<[u8; 16]>()).unwrap_or([0; 16]);
            } else {
                let l4 = bpf_probe_read_kernel(ip.wrapping_add(to).cast::<[u8; 4]>()).unwrap_or([0; 4]);
                let r4 = bpf_probe_read_kernel(ip.wrapping_add(from).cast::<[u8; 4]>()).unwrap_or([0; 4]);
                l[..4].copy_from_slice(&l4);
                r[..4].copy_from_slice(&r4);
            }
            (*e).local_addr = l;
            (*e).remote_addr = r;
        }
        if let Conn::Sock(sk) = conn {
            let family = field::<u16>(sk, &TCP_SK_FAMILY_OFF).unwrap_or(0);
            let (local, remote) = ports(sk);
            (*e).family = family;
            (*e).local_port = local as u16;
            (*e).remote_port = remote as u16;
            (*e).state = u16::from(field::<u8>(sk, &TCP_SK_STATE_OFF).unwrap_or(0));
            // A request socket (SYN-ACK retransmits) ends before sk_rcvbuf:
            // only prunes print it.
            if kind == event::SLOW && detail == stage::COLLAPSE {
                (*e).rcvbuf = field::<u32>(sk, &TCP_SK_RCVBUF_OFF).unwrap_or(0);
            }
            if family == AF_INET6 {
                (*e).local_addr = field::<[u8; 16]>(sk, &TCP_SK_V6_RCV_SADDR_OFF).unwrap_or([0; 16]);
                (*e).remote_addr = field::<[u8; 16]>(sk, &TCP_SK_V6_DADDR_OFF).unwrap_or([0; 16]);
            } else if family == AF_INET {
                let l = field::<[u8; 4]>(sk, &TCP_SK_RCV_SADDR_OFF).unwrap_or([0; 4]);
                let r = field::<[u8; 4]>(sk, &TCP_SK_DADDR_OFF).unwrap_or([0; 4]);
                (*e).local_addr = [l[0], l[1], l[2], l[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                (*e).remote_addr = [r[0], r[1], r[2], r[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            }
        }
    }
    entry.submit(0);
}

/// Ends a stage's wait that began at `start_ns` on connection `sk`.
#[inline(always)]
fn end_wait(stage: u32, sk: *const c_void, start_ns: u64, port_key: u32, tgid: u32) {
    let duration = now().saturating_sub(start_ns);
    record(stage, wait_slot(port_key, tgid), duration);
    if duration >= global(&TCP_THRESHOLD_NS) {
        send(sk, event::SLOW, stage, duration, tgid);
    }
}

// softirq: raw_tp `softirq_raise(unsigned int vec_nr)`, `softirq_entry(unsigned int vec_nr)`.

#[raw_tracepoint(tracepoint = "softirq_raise")]
pub fn tcp_softirq_raise(ctx: RawTracePointContext) -> i32 {
    let vec: u64 = ctx.arg(0);
    if vec as u32 != NET_RX_SOFTIRQ {
        return 0;
    }
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    if let Some(raised) = TCP_RAISED.get_ptr_mut(0).and_then(|p| unsafe { p.as_mut() }) {
        // The first raise since the softirq last ran starts the wait; more
        // raises before it runs join the same wait.
        if *raised == 0 {
            *raised = now();
        }
    }
    0
}

#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn tcp_softirq_entry(ctx: RawTracePointContext) -> i32 {
    let vec: u64 = ctx.arg(0);
    if vec as u32 != NET_RX_SOFTIRQ {
        return 0;
    }
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    let Some(raised) = TCP_RAISED.get_ptr_mut(0).and_then(|p| unsafe { p.as_mut() }) else { return 0 };
    let start_ns = *raised;
    *raised = 0;
    if start_ns != 0 {
        let duration = now().saturating_sub(start_ns);
        record(stage::SOFTIRQ, 0, duration);
        if duration >= global(&TCP_THRESHOLD_NS) {
            send(core::ptr::null(), event::SLOW, stage::SOFTIRQ, duration, 0);
        }
    }
    0
}

// tp_btf `inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)`.

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn tcp_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if sk.is_null() || !is_tcp(sk) {
        return 0;
    }
    let key = sk as u64;
    if new == state::SYN_SENT {
        // The connecting process is current: connect() sends the SYN.
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if tgid_wanted(tgid) {
            store_start(key, start::CONNECT, tgid);
        }
    } else if new == state::ESTABLISHED && old == state::SYN_RECV {
        // A server's new connection, queued for accept(). Softirq context:
        // the process that will accept it is not known yet.
        store_start(key, start::ACCEPT, 0);
    } else if new == state::ESTABLISHED && old == state::SYN_SENT {
        if let Some(s) = take_start(key) {
            if s.kind == start::CONNECT {
                let (local, remote) = ports(sk);
                if port_wanted(local, remote) {
                    end_wait(stage::HANDSHAKE, sk, s.ts_ns, REMOTE_PORT | remote, s.tgid);
                }
            }
        }
    } else if new == state::CLOSE {
        // A handshake that failed, a connection closed before accept().
        let _ = take_start(key);
    }
    0
}

#[inline(always)]
fn store_start(key: u64, kind: u32, tgid: u32) {
    let value = SockStart { ts_ns: now(), kind, tgid };
    if TCP_SOCKS.insert(key, value, u64::from(BPF_ANY)).is_err() {
        if let Some(l) = lost() {
            add(&mut l.sock_table_full, 1);
        }
    }
}

/// Removes and returns a socket's start. The lookup is lockless: only a
/// socket that has one takes the bucket lock.
#[inline(always)]
fn take_start(key: u64) -> Option<SockStart> {
    // SAFETY: a live value of our map, copied out before removal.
    let start = unsafe { *TCP_SOCKS.get_ptr(key)? };
    let _ = TCP_SOCKS.remove(key);
    Some(start)
}

// fexit `inet_csk_accept`: 6.1 `(struct sock *sk, int flags, int *err, bool
// kern)`, 6.10+ `(struct sock *sk, struct proto_accept_arg *arg)`; the return
// value follows the arguments. One program per layout: the verifier allows
// context reads at constant offsets only, within the function's arguments.

#[fexit(function = "inet_csk_accept")]
pub fn tcp_accept_4(ctx: FExitContext) -> i32 {
    on_accept(ctx.arg(4));
    0
}

#[fexit(function = "inet_csk_accept")]
pub fn tcp_accept_2(ctx: FExitContext) -> i32 {
    on_accept(ctx.arg(2));
    0
}

/// `accept()` returns connection `sk`: its wait in the accept queue ends.
#[inline(always)]
fn on_accept(sk: *const c_void) {
    if sk.is_null() {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !tgid_wanted(tgid) {
        return;
    }
    let Some(s) = take_start(sk as u64) else { return };
    if s.kind != start::ACCEPT {
        return;
    }
    let (local, remote) = ports(sk);
    if port_wanted(local, remote) {
        end_wait(stage::ACCEPT, sk, s.ts_ns, local, tgid);
    }
}

// tp_btf `tcp_probe(struct sock *sk, struct sk_buff *skb)`: every segment
// `tcp_rcv_established` processes, pure ACKs included.

#[btf_tracepoint(function = "tcp_probe")]
pub fn tcp_rcv(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let skb: *const c_void = ctx.arg(1);
    // `struct tcp_skb_cb` opens with seq and end_seq: data makes them differ
    // (a SYN or FIN by one, never on an established socket's data path).
    let Some([seq, end_seq]) = field::<[u32; 2]>(skb, &TCP_SKB_CB_OFF) else { return 0 };
    if seq == end_seq {
        return 0;
    }
    let (local, remote) = ports(sk);
    if !port_wanted(local, remote) {
        return 0;
    }
    let value = SkbStart { ts_ns: now(), sk: sk as u64, port: service_key(local, remote), _pad: 0 };
    let _ = TCP_SKBS.insert(skb as u64, value, u64::from(BPF_ANY));
    0
}

// tp_btf `skb_copy_datagram_iovec(const struct sk_buff *skb, int len)`: in
// the reading process, for each copy out of a segment.

#[btf_tracepoint(function = "skb_copy_datagram_iovec")]
pub fn tcp_copy(ctx: BtfTracePointContext) -> i32 {
    let skb: *const c_void = ctx.arg(0);
    let key = skb as u64;
    // SAFETY: a live value of our map, copied out before removal.
    let Some(start) = TCP_SKBS.get_ptr(key).map(|p| unsafe { *p }) else { return 0 };
    // The first copy ends the wait; later copies of the rest of the segment
    // find nothing.
    let _ = TCP_SKBS.remove(key);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid_wanted(tgid) {
        let sk = start.sk as *const c_void;
        let duration = now().saturating_sub(start.ts_ns);
        record(stage::RXQUEUE, wait_slot(start.port, tgid), duration);
        if duration >= global(&TCP_THRESHOLD_NS) {
            send(sk, event::SLOW, stage::RXQUEUE, duration, tgid);
        }
    }
    0
}

/// Counts a loss on connection `sk` (or on no known one) and sends it.
#[inline(always)]
fn count_loss(sk: *const c_void, what: u32) {
    if count(sk, what) && global(&TCP_LOSS_EVENTS) != 0 {
        send(sk, event::LOSS, what, 0, 0);
    }
}

/// Adds one to counter `what` of connection `sk`'s key (or "other"), if
/// `--port` keeps it; whether it did.
#[inline(always)]
fn count(sk: *const c_void, what: u32) -> bool {
    if sk.is_null() {
        count_slot(0, what);
        return true;
    }
    let (local, remote) = ports(sk);
    count_ports(local, remote, what)
}

/// Adds one to counter `what` of the key of a connection with these ports,
/// if `--port` keeps it; whether it did.
#[inline(always)]
fn count_ports(local: u32, remote: u32, what: u32) -> bool {
    if !port_wanted(local, remote) {
        return false;
    }
    count_slot(slot_of(service_key(local, remote)), what);
    true
}

#[inline(always)]
fn count_slot(slot: usize, what: u32) {
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    if let Some(c) = TCP_LOSSES.get_ptr_mut(slot as u32).and_then(|p| unsafe { p.as_mut() }) {
        // SAFETY: masked to the array's length.
        add(unsafe { c.counts.get_unchecked_mut(masked(what as usize, 8)) }, 1);
    }
}

// tp_btf `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb)`.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit(ctx: BtfTracePointContext) -> i32 {
    let sk: *const c_void = ctx.arg(0);
    let syn = field::<u8>(sk, &TCP_SK_STATE_OFF) == Some(state::SYN_SENT as u8);
    count_loss(sk, if syn { loss::SYN_RETRANS } else { loss::RETRANS });
    0
}

// tp_btf `tcp_retransmit_synack(const struct sock *sk, const struct
// request_sock *req)`: `req` opens with a `sock_common`, so the connection's
// addresses are read from it at the same offsets.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: BtfTracePointContext) -> i32 {
    let req: *const c_void = ctx.arg(1);
    count_loss(req, loss::SYNACK_RETRANS);
    0
}

// tp_btf `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, …)`:
// `sk` is NULL for a reset to a segment no socket wanted.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    count_loss(ctx.arg(0), loss::RESET_SENT);
    0
}

// tp_btf `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    count_loss(ctx.arg(0), loss::RESET_RECEIVED);
    0
}

// fentry `inet_csk_complete_hashdance(struct sock *sk, struct sock *child,
// struct request_sock *req, bool own_req)`: a listener's handshake is done.
// `req` is a `tcp_request_sock`, whose `snt_synack` is when the first SYN-ACK
// left (tcp_clock_us(), the monotonic clock in µs): the SYN's arrival, as the
// SYN-ACK answers it at once, and retransmitted SYN-ACKs do not move it.
#[fentry(function = "inet_csk_complete_hashdance")]
pub fn tcp_server_handshake(ctx: FEntryContext) -> i32 {
    let listener: *const c_void = ctx.arg(0);
    let req: *const c_void = ctx.arg(2);
    let Some(synack_us) = field::<u64>(req, &TCP_REQ_SNT_SYNACK_OFF) else { return 0 };
    // Never stamped (a SYN cookie's request): no start to time from.
    if synack_us == 0 {
        return 0;
    }
    let (local, _) = ports(listener);
    let (_, remote) = ports(req);
    if !port_wanted(local, remote) {
        return 0;
    }
    // A listener's handshakes end in softirq: no process to key them by.
    let slot = if global(&TCP_BY) == by::PID { 0 } else { slot_of(local) };
    // A plain multiply: `saturating_mul` needs 128-bit helpers BPF lacks,
    // and µs since boot times 1000 fits in 64 bits for 584 years.
    let duration = now().saturating_sub(synack_us.wrapping_mul(1000));
    record(stage::HANDSHAKE, slot, duration);
    if duration >= global(&TCP_THRESHOLD_NS) {
        send(req, event::SLOW, stage::HANDSHAKE, duration, 0);
    }
    0
}

/// Whether listener `sk`'s accept queue is full (`sk_acceptq_is_full`).
#[inline(always)]
fn accept_queue_full(sk: *const c_void) -> bool {
    let queued = field::<u32>(sk, &TCP_SK_ACK_BACKLOG_OFF).unwrap_or(0);
    let room = field::<u32>(sk, &TCP_SK_MAX_ACK_BACKLOG_OFF).unwrap_or(u32::MAX);
    queued > room
}

// A listener drops a SYN (`tcp_conn_request`) or a handshake's last ACK
// (`tcp_v4_syn_recv_sock`, `tcp_v6_syn_recv_sock`) when its accept queue is
// full. The queue is read at the function's return, when the kernel has
// decided: read at its entry, a connection another CPU queued meanwhile
// would hide the drop. A drop also adds one to the listener's `sk_drops`
// (`tcp_listendrop`), which tells it from a call that succeeded just before
// another filled the queue. The entry remembers, per CPU, the listener and
// its drops: these functions run in softirq (or with bottom halves off), so
// one CPU runs one of them at a time.

// fentry `tcp_conn_request(struct request_sock_ops *rsk_ops, const struct
// tcp_request_sock_ops *af_ops, struct sock *sk, struct sk_buff *skb)`.
#[fentry(function = "tcp_conn_request")]
pub fn tcp_listen_syn(ctx: FEntryContext) -> i32 {
    listen_entry(ctx.arg(2));
    0
}

/// The same as a kprobe.
#[kprobe]
pub fn tcp_listen_syn_kprobe(ctx: ProbeContext) -> i32 {
    if let Some(sk) = ctx.arg::<*const c_void>(2) {
        listen_entry(sk);
    }
    0
}

// fentry `tcp_v4_syn_recv_sock(const struct sock *sk, struct sk_buff *skb,
// struct request_sock *req, …)`.
#[fentry(function = "tcp_v4_syn_recv_sock")]
pub fn tcp_listen_ack(ctx: FEntryContext) -> i32 {
    listen_entry(ctx.arg(0));
    0
}

// fentry `tcp_v6_syn_recv_sock`, the IPv6 twin with the same arguments.
#[fentry(function = "tcp_v6_syn_recv_sock")]
pub fn tcp_listen_ack6(ctx: FEntryContext) -> i32 {
    listen_entry(ctx.arg(0));
    0
}

/// Either as a kprobe, where the kernel refuses fentry there (6.1:
/// ENOTSUPP).
#[kprobe]
pub fn tcp_listen_ack_kprobe(ctx: ProbeContext) -> i32 {
    if let Some(sk) = ctx.arg::<*const c_void>(0) {
        listen_entry(sk);
    }
    0
}

// The returns of the three, as fexit (one program each: a trampoline is
// per function) or as one kretprobe for all.
#[fexit(function = "tcp_conn_request")]
pub fn tcp_listen_syn_exit(_ctx: FExitContext) -> i32 {
    listen_exit();
    0
}

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn tcp_listen_ack_exit(_ctx: FExitContext) -> i32 {
    listen_exit();
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn tcp_listen_ack6_exit(_ctx: FExitContext) -> i32 {
    listen_exit();
    0
}

#[kretprobe]
pub fn tcp_listen_kretprobe(_ctx: RetProbeContext) -> i32 {
    listen_exit();
    0
}

#[inline(always)]
fn listen_check() -> Option<&'static mut ListenCheck> {
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    TCP_LISTEN_CHECK.get_ptr_mut(0).and_then(|p| unsafe { p.as_mut() })
}

/// Listener `sk` takes a SYN or a last ACK on this CPU.
#[inline(always)]
fn listen_entry(sk: *const c_void) {
    if let Some(check) = listen_check() {
        check.sk = sk as u64;
        check.drops = field::<u32>(sk, &TCP_SK_DROPS_OFF).unwrap_or(0);
    }
}

/// The call that `listen_entry` saw returns: a drop with the queue full
/// is an overflow.
#[inline(always)]
fn listen_exit() {
    let Some(check) = listen_check() else { return };
    let sk = check.sk as *const c_void;
    check.sk = 0;
    if sk.is_null() {
        // Its entry was not seen (tracing began inside the call).
        return;
    }
    let dropped = field::<u32>(sk, &TCP_SK_DROPS_OFF).is_some_and(|d| d != check.drops);
    if dropped && accept_queue_full(sk) {
        count_loss(sk, loss::LISTEN_OVERFLOW);
    }
}

// tp_btf `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason
// reason, …)`: a dropped packet, of any protocol; counted per reason, per CPU.
#[btf_tracepoint(function = "kfree_skb")]
pub fn tcp_drop(ctx: BtfTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    let slot = masked((reason as usize).min(MAX_DROP_REASONS - 1), MAX_DROP_REASONS) as u32;
    // SAFETY: per-CPU array slots are valid for the program's lifetime.
    if let Some(count) = TCP_DROPS.get_ptr_mut(slot).and_then(|p| unsafe { p.as_mut() }) {
        add(count, 1);
    }
    let skb: *const c_void = ctx.arg(0);
    // Ports 0 and 0: the kernel's own control socket (resets it sends for
    // no connection), which no key stands for.
    let Some((conn, local, remote)) = dropped_conn(skb).filter(|&(_, l, r)| l != 0 || r != 0) else { return 0 };
    if count_ports(local, remote, loss::DROPPED) && global(&TCP_LOSS_EVENTS) != 0 {
        emit(conn, event::LOSS, loss::DROPPED, 0, 0, reason as u32);
    }
    0
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP_BYTE: u8 = 6;
/// `skb->transport_header` when no header was set (`(u16)~0U`).
const NO_HEADER: u16 = 0xffff;
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// The TCP connection a dropped packet belongs to, and its (local, remote)
/// ports: its socket's, else, for a packet no socket took (a SYN to a
/// closed port), its headers', destination first.
#[inline(always)]
fn dropped_conn(skb: *const c_void) -> Option<(Conn, u32, u32)> {
    let sk = field::<u64>(skb, &TCP_SKB_SK_OFF).unwrap_or(0) as *const c_void;
    if !sk.is_null() {
        let family = field::<u16>(sk, &TCP_SK_FAMILY_OFF)?;
        if family != AF_INET && family != AF_INET6 {
            return None;
        }
        // TIME_WAIT and request sockets are TCP's alone, and end after
        // `sock_common`: only a full socket has a protocol to check.
        let state = field::<u8>(sk, &TCP_SK_STATE_OFF)?;
        if state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV || is_tcp(sk) {
            let (local, remote) = ports(sk);
            return Some((Conn::Sock(sk), local, remote));
        }
        return None;
    }
    let head = field::<u64>(skb, &TCP_SKB_HEAD_OFF)? as *const u8;
    let network = field::<u16>(skb, &TCP_SKB_NETWORK_HEADER_OFF)?;
    let transport = field::<u16>(skb, &TCP_SKB_TRANSPORT_HEADER_OFF)?;
    if transport == NO_HEADER || transport <= network {
        return None;
    }
    // The IPv4 protocol byte, or the IPv6 next header (no extension headers).
    let (family, protocol_at) = match u16::from_be(field::<u16>(skb, &TCP_SKB_PROTOCOL_OFF)?) {
        ETH_P_IP => (AF_INET, 9),
        ETH_P_IPV6 => (AF_INET6, 6),
        _ => return None,
    };
    let ip = head.wrapping_add(usize::from(network));
    // SAFETY: the helper reads kernel memory and fails cleanly on a bad
    // address; `head` and the header offsets are the skb's own.
    let protocol = unsafe { bpf_probe_read_kernel(ip.wrapping_add(protocol_at)) }.ok()?;
    if protocol != IPPROTO_TCP_BYTE {
        return None;
    }
    // SAFETY: as above; a TCP header opens with source and destination ports.
    let tcp: [u16; 2] = unsafe { bpf_probe_read_kernel(head.wrapping_add(usize::from(transport)).cast()) }.ok()?;
    let (local, remote) = (u32::from(u16::from_be(tcp[1])), u32::from(u16::from_be(tcp[0])));
    Some((Conn::Packet { family, ip, local, remote }, local, remote))
}

/// Adds `n` (wrapping: `u64::MAX` takes one away) to the count of prunes
/// under way.
#[inline(always)]
fn prunes_open(n: u64) {
    if let Some(open) = TCP_COLLAPSES_OPEN.get_ptr_mut(0) {
        // SAFETY: the array's only value, valid for the program's lifetime.
        add(unsafe { &mut *open }, n);
    }
}

/// A collapse of `sk`'s receive queue (or an out-of-order range of it)
/// begins: the first of its prune starts the wait.
#[inline(always)]
fn on_collapse(sk: *const c_void) {
    let (local, remote) = ports(sk);
    if !port_wanted(local, remote) {
        return;
    }
    // A later collapse of the same prune: its wait is already running.
    if TCP_COLLAPSES.get_ptr(sk as u64).is_some() {
        return;
    }
    if TCP_COLLAPSES.insert(sk as u64, now(), u64::from(BPF_NOEXIST)).is_ok() {
        prunes_open(1);
        // For a return probe, which has no arguments to find the socket by.
        let _ = TCP_PRUNING.insert(task_key(), sk as u64, u64::from(BPF_ANY));
    } else if let Some(l) = lost() {
        add(&mut l.collapse_table_full, 1);
    }
}

// fentry `tcp_collapse(struct sock *sk, struct sk_buff_head *list, struct
// rb_root *root, struct sk_buff *head, struct sk_buff *tail, u32 start, u32
// end)`: called by the prune for each out-of-order range, then for the
// receive queue.
#[fentry(function = "tcp_collapse")]
pub fn tcp_collapse_start(ctx: FEntryContext) -> i32 {
    on_collapse(ctx.arg(0));
    0
}

/// The same as a kprobe, where fentry is refused (6.1: seven arguments).
#[kprobe]
pub fn tcp_collapse_start_kprobe(ctx: ProbeContext) -> i32 {
    if let Some(sk) = ctx.arg::<*const c_void>(0) {
        on_collapse(sk);
    }
    0
}

/// `tcp_collapse_one` as a kprobe.
#[kprobe]
pub fn tcp_collapsed_kprobe(ctx: ProbeContext) -> i32 {
    if let Some(sk) = ctx.arg::<*const c_void>(0) {
        let _ = count(sk, loss::COLLAPSED);
    }
    0
}

// fentry `tcp_collapse_one(struct sock *sk, struct sk_buff *skb, …)`: one
// segment merged away, where the kernel counts TCPRcvCollapsed.
#[fentry(function = "tcp_collapse_one")]
pub fn tcp_collapsed(ctx: FEntryContext) -> i32 {
    let _ = count(ctx.arg(0), loss::COLLAPSED);
    0
}

// fexit `tcp_try_rmem_schedule(struct sock *sk, const struct sk_buff *skb,
// unsigned int size)`: where `tcp_prune_queue` is inlined; once it returns,
// the prune of `sk` (if it collapsed anything) is over.
#[fexit(function = "tcp_try_rmem_schedule")]
pub fn tcp_prune_end(ctx: FExitContext) -> i32 {
    if prunes_under_way() {
        end_prune(ctx.arg(0));
    }
    0
}

/// The same as a kretprobe, where fexit is refused or not asked for: the
/// return has no arguments, so the socket is the one whose prune this task
/// began.
#[kretprobe]
pub fn tcp_prune_end_kretprobe(_ctx: RetProbeContext) -> i32 {
    if !prunes_under_way() {
        return 0;
    }
    // SAFETY: a live value of our map, copied out.
    if let Some(sk) = TCP_PRUNING.get_ptr(task_key()).map(|p| unsafe { *p }) {
        end_prune(sk as *const c_void);
    }
    0
}

/// Every segment taken the slow way into the receive queue ends in a prune
/// end: with no prune under way anywhere, one read of a shared, rarely
/// written counter is all it costs.
#[inline(always)]
fn prunes_under_way() -> bool {
    let Some(open) = TCP_COLLAPSES_OPEN.get_ptr(0) else { return false };
    // SAFETY: the array's only value; volatile, as other CPUs write it.
    unsafe { core::ptr::read_volatile(open) != 0 }
}

/// The running task, or on an idle CPU (pid 0 on every CPU) the CPU: what a
/// return probe finds its prune by.
#[inline(always)]
fn task_key() -> u64 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid != 0 {
        u64::from(tid)
    } else {
        // SAFETY: a helper without arguments.
        (1 << 63) | u64::from(unsafe { bpf_get_smp_processor_id() })
    }
}

/// The prune of `sk`, if one is under way, is over.
#[inline(always)]
fn end_prune(sk: *const c_void) {
    // SAFETY: a live value of our map, copied out before removal.
    let Some(start_ns) = TCP_COLLAPSES.get_ptr(sk as u64).map(|p| unsafe { *p }) else { return };
    if TCP_COLLAPSES.remove(sk as u64).is_err() {
        return;
    }
    let _ = TCP_PRUNING.remove(task_key());
    prunes_open(u64::MAX);
    let duration = now().saturating_sub(start_ns);
    let (local, remote) = ports(sk);
    // In softirq, or in the process that releases the socket: no process to
    // key a prune by.
    let slot = if global(&TCP_BY) == by::PID { 0 } else { slot_of(service_key(local, remote)) };
    record(stage::COLLAPSE, slot, duration);
    if duration >= global(&TCP_THRESHOLD_NS) || global(&TCP_LOSS_EVENTS) != 0 {
        send(sk, event::SLOW, stage::COLLAPSE, duration, 0);
    }
}
