//! `latprobe tcp`: where a connection's time goes between the wire and the
//! application, and where packets are lost.
//!
//! Each stage's waits go into in-kernel per-CPU HDR histograms (the layout of
//! `fn`), one per stage and key (a local port, a remote port for outgoing
//! handshakes, or a process); only waits over `--slower` and loss events
//! leave the kernel one by one. The programs live in an object of their own
//! (`latprobe-tcp`), so no other command loads their maps.

use crate::COMM_LEN;

/// The stages, in the order they are printed.
pub mod stage {
    /// NET_RX raised on a CPU → `net_rx_action` starts there.
    pub const SOFTIRQ: u32 = 0;
    /// SYN sent → established (outgoing connections), SYN received →
    /// established (a listener's: from its first SYN-ACK, which answers the
    /// SYN at once, to the handshake's last ACK).
    pub const HANDSHAKE: u32 = 1;
    /// Established → returned by `accept()`: time in the accept queue.
    pub const ACCEPT: u32 = 2;
    /// Data received on an established socket → copied to the process.
    pub const RXQUEUE: u32 = 3;
    /// A socket's receive queue pruned: the kernel's first `tcp_collapse`
    /// of one `tcp_prune_queue` → the end of the prune (`tcp_prune_queue`
    /// is inlined into `tcp_try_rmem_schedule`, whose return ends it). The
    /// collapses of out-of-order ranges and of the receive queue in one
    /// prune are one wait, the packet that found the buffer full waiting
    /// through all of them.
    pub const COLLAPSE: u32 = 4;
    pub const COUNT: u32 = 5;
    pub const NAMES: [&str; COUNT as usize] = ["softirq", "handshake", "accept", "rxqueue", "collapse"];
}

/// The histogram of `stage` for key slot `slot` (0 is "other"), with
/// `key_slots` slots handed out at most. softirq has one histogram (it
/// belongs to no connection); every other stage one per key slot.
#[inline(always)]
pub fn histogram_index(stage: u32, slot: usize, key_slots: usize) -> usize {
    if stage == stage::SOFTIRQ {
        0
    } else {
        1 + (stage as usize - 1) * (key_slots + 1) + slot
    }
}

/// How many histograms `histogram_index` needs.
pub fn histograms(key_slots: usize) -> usize {
    1 + (stage::COUNT as usize - 1) * (key_slots + 1)
}

/// Loss and retransmit events, counted per key slot.
pub mod loss {
    /// A SYN retransmitted by a connecting socket.
    pub const SYN_RETRANS: u32 = 0;
    /// A SYN-ACK retransmitted by a listener (the client's ACK did not come).
    pub const SYNACK_RETRANS: u32 = 1;
    /// A data (or FIN) segment retransmitted.
    pub const RETRANS: u32 = 2;
    /// A reset sent.
    pub const RESET_SENT: u32 = 3;
    /// A reset received.
    pub const RESET_RECEIVED: u32 = 4;
    /// A SYN or a handshake's last ACK dropped by a listener whose accept
    /// queue was full (the kernel's ListenOverflows).
    pub const LISTEN_OVERFLOW: u32 = 5;
    /// A received segment merged away while its receive queue was
    /// collapsed (`tcp_collapse_one`, the kernel's TCPRcvCollapsed): not a
    /// loss, but the work a prune did.
    pub const COLLAPSED: u32 = 6;
    /// A TCP packet of the connection the kernel dropped (tp_btf
    /// `kfree_skb`, any reason): known by its socket, else by its TCP
    /// header (a received segment: its destination is the local port).
    pub const DROPPED: u32 = 7;
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] = [
        "syn_retransmits",
        "synack_retransmits",
        "retransmits",
        "resets_sent",
        "resets_received",
        "listen_overflows",
        "collapsed_skbs",
        "drops",
    ];
}

/// How waits are keyed (`globals::BY`).
pub mod by {
    /// By local port (remote port for outgoing handshakes).
    pub const PORT: u32 = 0;
    /// By process (tgid).
    pub const PID: u32 = 1;
}

/// The most keys (ports or processes) with histograms of their own; later
/// ones share slot 0, "other". Each key costs 4 histograms (one per stage
/// but softirq) of `hdr::GROUPS` 1 KiB groups per CPU.
pub const MAX_KEY_SLOTS: usize = 32;
/// Ports `--port` can name.
pub const MAX_PORTS: usize = 8;
/// Key bit of a remote port (outgoing handshakes), next to local ports.
pub const REMOTE_PORT: u32 = 1 << 16;
/// Key bit of a process (`by::PID`), next to ports.
pub const PID_KEY: u32 = 1 << 30;
/// Sockets whose start (SYN sent, established awaiting accept) can be held
/// at once. Beyond it, waits are counted as untimed, never mistimed.
pub const SOCK_ENTRIES: u32 = 16_384;
/// Received segments whose arrival time can be held at once. The table is
/// least-recently-used: a segment never copied (merged into another, pruned,
/// or its socket closed) makes room for newer ones.
pub const SKB_ENTRIES: u32 = 65_536;
/// Sockets whose receive queue can be in a prune at once (one per CPU
/// doing a prune, in practice). Beyond it, prunes are counted as untimed.
pub const COLLAPSE_ENTRIES: u32 = 1024;
/// Drop reasons counted (`enum skb_drop_reason` has about 120 in 6.12);
/// a larger reason is counted in the last slot.
pub const MAX_DROP_REASONS: usize = 256;
/// Bytes of the event ring buffer.
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// The TCP states the programs look at (include/net/tcp_states.h).
pub mod state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const CLOSE: i32 = 7;
}

/// What is waiting on a socket.
pub mod start {
    /// SYN sent: the handshake is under way.
    pub const CONNECT: u32 = 1;
    /// Established on the server side, not yet accepted.
    pub const ACCEPT: u32 = 2;
}

/// A socket's pending start, keyed by its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockStart {
    pub ts_ns: u64,
    /// One of `start::*`.
    pub kind: u32,
    /// The connecting process (CONNECT only).
    pub tgid: u32,
}

/// The listener a CPU is taking a SYN or a last ACK for, and its
/// `sk_drops` then.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ListenCheck {
    pub sk: u64,
    pub drops: u32,
    pub _pad: u32,
}

/// A received segment's arrival, keyed by its `sk_buff` address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbStart {
    pub ts_ns: u64,
    /// Its socket, alive until the copy that ends the wait.
    pub sk: u64,
    /// The key of its connection's port (see `REMOTE_PORT`).
    pub port: u32,
    pub _pad: u32,
}

/// Per-CPU counts of what could not be measured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Lost {
    /// A socket start not stored: `SOCK_ENTRIES` sockets were waiting.
    pub sock_table_full: u64,
    /// Events that did not fit in the ring buffer.
    pub events: u64,
    /// A prune not timed: `COLLAPSE_ENTRIES` sockets were being pruned.
    pub collapse_table_full: u64,
}

/// Per-CPU loss counts of one key slot, indexed by `loss::*`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LossCounts {
    pub counts: [u64; 8],
}

/// What an event is (`TcpEvent::kind`).
pub mod event {
    /// A stage wait over `--slower` (or, with `--losses`, any prune);
    /// `detail` is the stage.
    pub const SLOW: u32 = 1;
    /// A loss; `detail` is one of `loss::*`.
    pub const LOSS: u32 = 2;
}

/// One slow wait or one loss, with its connection.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpEvent {
    /// CLOCK_MONOTONIC time of the event.
    pub ts_ns: u64,
    pub duration_ns: u64,
    pub kind: u32,
    pub detail: u32,
    pub tgid: u32,
    pub cpu: u32,
    /// `AF_INET` or `AF_INET6`; 0 when the connection is unknown.
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// TCP state of the socket at the event.
    pub state: u16,
    /// IPv4 addresses in the first 4 bytes, network order.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    /// The socket's receive buffer (`sk_rcvbuf`) in bytes at the event.
    pub rcvbuf: u32,
    /// A drop's reason (`enum skb_drop_reason`), else 0.
    pub reason: u32,
}

/// Names of the load-time globals of the `tcp_` programs.
pub mod globals {
    /// Only waits of this process (the accepting, reading or connecting one), 0 for all.
    pub const TARGET_TGID: &str = "TCP_TARGET_TGID";
    /// Local ports to keep (`[u32; MAX_PORTS]`)…
    pub const PORTS: &str = "TCP_PORTS";
    /// …of which this many count; 0 for all.
    pub const PORTS_N: &str = "TCP_PORTS_N";
    /// One of `by::*`.
    pub const BY: &str = "TCP_BY";
    /// Key slots handed out (at most `MAX_KEY_SLOTS`).
    pub const KEY_SLOTS: &str = "TCP_KEY_SLOTS_N";
    /// Waits at least this long go through the ring buffer; `u64::MAX` for none.
    pub const THRESHOLD_NS: &str = "TCP_THRESHOLD_NS";
    /// Non-zero: send every loss through the ring buffer too.
    pub const LOSS_EVENTS: &str = "TCP_LOSS_EVENTS";
    /// `net.ipv4.ip_local_port_range`: a connection from a port in it to a
    /// port outside it is known by its remote port.
    pub const EPHEMERAL_LO: &str = "TCP_EPHEMERAL_LO";
    pub const EPHEMERAL_HI: &str = "TCP_EPHEMERAL_HI";
    /// Offsets in `struct sock` and `struct sk_buff`, read from the running
    /// kernel's BTF.
    pub const SK_FAMILY_OFF: &str = "TCP_SK_FAMILY_OFF";
    pub const SK_NUM_OFF: &str = "TCP_SK_NUM_OFF";
    pub const SK_DPORT_OFF: &str = "TCP_SK_DPORT_OFF";
    pub const SK_RCV_SADDR_OFF: &str = "TCP_SK_RCV_SADDR_OFF";
    pub const SK_DADDR_OFF: &str = "TCP_SK_DADDR_OFF";
    pub const SK_V6_RCV_SADDR_OFF: &str = "TCP_SK_V6_RCV_SADDR_OFF";
    pub const SK_V6_DADDR_OFF: &str = "TCP_SK_V6_DADDR_OFF";
    pub const SK_STATE_OFF: &str = "TCP_SK_STATE_OFF";
    pub const SK_PROTOCOL_OFF: &str = "TCP_SK_PROTOCOL_OFF";
    pub const SKB_CB_OFF: &str = "TCP_SKB_CB_OFF";
    pub const SK_ACK_BACKLOG_OFF: &str = "TCP_SK_ACK_BACKLOG_OFF";
    pub const SK_MAX_ACK_BACKLOG_OFF: &str = "TCP_SK_MAX_ACK_BACKLOG_OFF";
    pub const SK_DROPS_OFF: &str = "TCP_SK_DROPS_OFF";
    /// `tcp_request_sock.snt_synack`: when its first SYN-ACK left, in µs.
    pub const REQ_SNT_SYNACK_OFF: &str = "TCP_REQ_SNT_SYNACK_OFF";
    pub const SK_RCVBUF_OFF: &str = "TCP_SK_RCVBUF_OFF";
    /// `sk_buff` fields a dropped packet is attributed to a port by: its
    /// socket, else its headers.
    pub const SKB_SK_OFF: &str = "TCP_SKB_SK_OFF";
    pub const SKB_HEAD_OFF: &str = "TCP_SKB_HEAD_OFF";
    pub const SKB_PROTOCOL_OFF: &str = "TCP_SKB_PROTOCOL_OFF";
    pub const SKB_NETWORK_HEADER_OFF: &str = "TCP_SKB_NETWORK_HEADER_OFF";
    pub const SKB_TRANSPORT_HEADER_OFF: &str = "TCP_SKB_TRANSPORT_HEADER_OFF";

    pub const ALL: [&str; 29] = [
        TARGET_TGID,
        PORTS,
        PORTS_N,
        BY,
        KEY_SLOTS,
        THRESHOLD_NS,
        LOSS_EVENTS,
        EPHEMERAL_LO,
        EPHEMERAL_HI,
        SK_FAMILY_OFF,
        SK_NUM_OFF,
        SK_DPORT_OFF,
        SK_RCV_SADDR_OFF,
        SK_DADDR_OFF,
        SK_V6_RCV_SADDR_OFF,
        SK_V6_DADDR_OFF,
        SK_STATE_OFF,
        SK_PROTOCOL_OFF,
        SKB_CB_OFF,
        SK_ACK_BACKLOG_OFF,
        SK_MAX_ACK_BACKLOG_OFF,
        SK_DROPS_OFF,
        REQ_SNT_SYNACK_OFF,
        SK_RCVBUF_OFF,
        SKB_SK_OFF,
        SKB_HEAD_OFF,
        SKB_PROTOCOL_OFF,
        SKB_NETWORK_HEADER_OFF,
        SKB_TRANSPORT_HEADER_OFF,
    ];
}

/// Names of the `tcp_` maps.
pub mod maps {
    pub const STATS: &str = "TCP_STATS";
    pub const BUCKETS: &str = "TCP_BUCKETS";
    /// Key (port, `REMOTE_PORT | port`, or tgid) → slot.
    pub const KEY_SLOTS: &str = "TCP_KEY_SLOTS";
    pub const NEXT_SLOT: &str = "TCP_NEXT_SLOT";
    pub const LOSSES: &str = "TCP_LOSSES";
    pub const LOST: &str = "TCP_LOST";
    pub const SOCKS: &str = "TCP_SOCKS";
    pub const SKBS: &str = "TCP_SKBS";
    /// When NET_RX was first raised on this CPU since it last ran.
    pub const RAISED: &str = "TCP_RAISED";
    pub const EVENTS: &str = "TCP_EVENTS";
    /// With `by::PID`: the name of each key slot's process, as its programs
    /// last saw it (per CPU), so that a process gone by the report is named.
    pub const KEY_COMMS: &str = "TCP_KEY_COMMS";
    /// Packets dropped, per CPU, by the kernel's drop reason.
    pub const DROPS: &str = "TCP_DROPS";
    /// Socket address → the start of its prune's first collapse.
    pub const COLLAPSES: &str = "TCP_COLLAPSES";
    /// How many prunes are under way: the end of every `tcp_try_rmem_schedule`
    /// looks at the table only when there is one.
    pub const COLLAPSES_OPEN: &str = "TCP_COLLAPSES_OPEN";
    /// Task → the socket whose prune it began: what a return probe, which
    /// has no arguments, ends.
    pub const PRUNING: &str = "TCP_PRUNING";

    pub const ALL: [&str; 15] = [
        STATS,
        BUCKETS,
        KEY_SLOTS,
        NEXT_SLOT,
        LOSSES,
        LOST,
        SOCKS,
        SKBS,
        RAISED,
        EVENTS,
        KEY_COMMS,
        DROPS,
        COLLAPSES,
        COLLAPSES_OPEN,
        PRUNING,
    ];
}

/// The `tcp_` programs, as (program, tracepoint or function), by the stage
/// they serve.
pub mod programs {
    pub const SOFTIRQ: [(&str, &str); 2] =
        [("tcp_softirq_raise", "softirq_raise"), ("tcp_softirq_entry", "softirq_entry")];
    /// Socket state changes: handshakes start and end, accepts start,
    /// closed sockets are forgotten.
    pub const STATE: (&str, &str) = ("tcp_state", "inet_sock_set_state");
    /// The function that hands an established connection to `accept()`.
    pub const ACCEPT_FUNCTION: &str = "inet_csk_accept";
    /// fexit programs on it by its parameter count (fexit reads the return
    /// value after the arguments): 4 before Linux 6.10, 2 since
    /// ("net: accept() and inet_csk_accept() take a proto_accept_arg").
    pub const ACCEPT: [(usize, &str); 2] = [(4, "tcp_accept_4"), (2, "tcp_accept_2")];
    pub const RXQUEUE: [(&str, &str); 2] = [("tcp_rcv", "tcp_probe"), ("tcp_copy", "skb_copy_datagram_iovec")];
    /// fentry on the end of a listener's handshake (the connection is
    /// created and queued for accept): the server side of `handshake`.
    pub const SERVER_HANDSHAKE: (&str, &str) = ("tcp_server_handshake", "inet_csk_complete_hashdance");
    /// fentry where a listener takes a SYN (IPv4 and IPv6 alike) and where
    /// it takes a handshake's last ACK (IPv4, IPv6): each drops it when its
    /// accept queue is full.
    pub const LISTEN: [(&str, &str); 3] = [
        ("tcp_listen_syn", "tcp_conn_request"),
        ("tcp_listen_ack", "tcp_v4_syn_recv_sock"),
        ("tcp_listen_ack6", "tcp_v6_syn_recv_sock"),
    ];
    /// fexit of each of `LISTEN`'s functions, in the same order: where the
    /// drop is seen.
    pub const LISTEN_EXIT: [&str; 3] = ["tcp_listen_syn_exit", "tcp_listen_ack_exit", "tcp_listen_ack6_exit"];
    /// The kretprobe taken where fexit there is refused, for any of them.
    pub const LISTEN_KRETPROBE: &str = "tcp_listen_kretprobe";
    /// The kprobe taken where fentry on a last-ACK drop point is refused,
    /// attached to each that needs it.
    pub const LISTEN_ACK_KPROBE: &str = "tcp_listen_ack_kprobe";
    /// tp_btf `kfree_skb`: every packet the kernel drops, with its reason
    /// (Linux 5.17+).
    pub const DROPS: (&str, &str) = ("tcp_drop", "kfree_skb");
    /// fentry on each collapse of a socket's receive queue (or of an
    /// out-of-order range of it): the first of a prune starts its wait.
    pub const COLLAPSE_START: (&str, &str) = ("tcp_collapse_start", "tcp_collapse");
    /// The kprobe taken where fentry there is refused (6.1: tcp_collapse
    /// takes 7 arguments, more than its trampolines carry before 6.6).
    pub const COLLAPSE_START_KPROBE: &str = "tcp_collapse_start_kprobe";
    /// fentry on each segment merged away by a collapse, and its kprobe.
    pub const COLLAPSED: (&str, &str) = ("tcp_collapsed", "tcp_collapse_one");
    pub const COLLAPSED_KPROBE: &str = "tcp_collapsed_kprobe";
    /// fexit of the function `tcp_prune_queue` is inlined into: the prune
    /// is over; and its kretprobe.
    pub const PRUNE_END: (&str, &str) = ("tcp_prune_end", "tcp_try_rmem_schedule");
    pub const PRUNE_END_KRETPROBE: &str = "tcp_prune_end_kretprobe";
    /// The kprobe on `tcp_conn_request` (`LISTEN[0]`).
    pub const LISTEN_SYN_KPROBE: &str = "tcp_listen_syn_kprobe";
    pub const LOSSES: [(&str, &str); 4] = [
        ("tcp_retransmit", "tcp_retransmit_skb"),
        ("tcp_retransmit_synack", "tcp_retransmit_synack"),
        ("tcp_send_reset", "tcp_send_reset"),
        ("tcp_receive_reset", "tcp_receive_reset"),
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding; any bit
    // pattern is valid.
    unsafe impl aya::Pod for SockStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SkbStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lost {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LossCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TcpEvent {}
}

const _: () = assert!(core::mem::size_of::<SockStart>() == 16);
const _: () = assert!(core::mem::size_of::<SkbStart>() == 24);
const _: () = assert!(core::mem::size_of::<Lost>() == 24);
const _: () = assert!(core::mem::size_of::<LossCounts>() == 64);
const _: () = assert!(core::mem::size_of::<TcpEvent>() == 8 * 2 + 4 * 4 + 2 * 4 + 16 * 2 + COMM_LEN + 4 * 2);
const _: () = assert!(loss::COUNT as usize <= 8);
