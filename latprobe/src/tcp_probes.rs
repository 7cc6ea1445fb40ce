//! Loading and attaching the `tcp_` programs, stage by stage: a stage whose
//! tracepoint or function the running kernel lacks (or refuses to trace) is
//! listed as unavailable with the reason, and every other stage still runs.

use std::fs;

use anyhow::{anyhow, Context, Result};
use aya::{programs::Program, Btf as AyaBtf, Ebpf};
use latprobe_common::{
    hdr,
    tcp::{
        globals, histograms, maps, programs, stage, COLLAPSE_ENTRIES, MAX_DROP_REASONS, MAX_PORTS, SKB_ENTRIES,
        SOCK_ENTRIES,
    },
};

use crate::{
    attach::{AttachMode, BtfLater},
    bpf,
    btf_offsets::{Btf, SockOffsets},
    output,
};

/// What `latprobe tcp` asked for.
pub struct Config {
    /// Only this process, 0 for all.
    pub tgid: u32,
    pub ports: Vec<u16>,
    /// One of `latprobe_common::tcp::by::*`.
    pub by: u32,
    pub key_slots: u32,
    pub threshold_ns: Option<u64>,
    /// Send every loss to userspace, not only its count.
    pub loss_events: bool,
    /// How to attach to the kernel functions that have a kprobe fallback.
    pub attach: AttachMode,
}

/// How one stage (or the loss counters) is measured on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// Attached, with this mechanism.
    Attached(&'static str),
    /// Not measured, and why.
    Unavailable(String),
}

impl Availability {
    pub fn attached(&self) -> bool {
        matches!(self, Self::Attached(_))
    }
}

pub struct Probes {
    pub ebpf: Ebpf,
    /// Indexed by `stage::*`.
    pub stages: Vec<Availability>,
    pub losses: Availability,
    /// What an attached stage or the losses leave out on this kernel.
    pub partial: Vec<String>,
    /// Names of the kernel's drop reasons by value (`enum skb_drop_reason`
    /// from BTF, without its `SKB_DROP_REASON_` prefix); empty when drops
    /// are not counted.
    pub drop_reasons: Vec<(u32, String)>,
}

/// `net.ipv4.ip_local_port_range`, or Linux's default.
fn ephemeral_range() -> (u32, u32) {
    let text = fs::read("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let text = String::from_utf8_lossy(&text[..text.len().min(64)]).into_owned();
    let mut numbers = text.split_whitespace().filter_map(|n| n.parse::<u32>().ok());
    match (numbers.next(), numbers.next()) {
        (Some(lo), Some(hi)) if lo <= hi && hi <= 65535 => (lo, hi),
        _ => (32768, 60999),
    }
}

pub fn start(config: &Config) -> Result<Probes> {
    let note = output::verbose;
    // aya's parse (for the loader and the attach calls) runs on its own
    // thread while the offsets are read from latprobe's own, on this one.
    let aya_btf = BtfLater::start();
    let btf = Btf::from_sys_fs()?;
    let offsets = SockOffsets::from_btf(&btf)?;
    note(&format!("sock offsets from BTF: {offsets:?}"));
    // fexit's return value follows the arguments, whose count changed in 6.10.
    let accept_params = btf.function_params(programs::ACCEPT_FUNCTION);
    let accept_program = accept_params.and_then(|n| programs::ACCEPT.iter().find(|(params, _)| *params == n));
    let reasons: Vec<(u32, String)> = btf
        .enum_values("skb_drop_reason")
        .into_iter()
        .map(|(name, value)| (value, name.strip_prefix("SKB_DROP_REASON_").unwrap_or(&name).to_string()))
        .collect();
    drop(btf);

    let mut ports = [0u32; MAX_PORTS];
    for (slot, port) in ports.iter_mut().zip(&config.ports) {
        *slot = u32::from(*port);
    }
    let ports_n = config.ports.len().min(MAX_PORTS) as u32;
    let threshold = config.threshold_ns.unwrap_or(u64::MAX);
    let loss_events = u32::from(config.loss_events);
    let (lo, hi) = ephemeral_range();
    let histograms = histograms(config.key_slots as usize) as u32;
    let page = bpf::page_size();
    let ring_bytes = if config.threshold_ns.is_some() || config.loss_events {
        latprobe_common::tcp::EVENTS_RING_BYTES
    } else {
        64 * page
    };
    let o = &offsets;
    let drops_off = o.drops.unwrap_or(0);
    let mut ebpf = bpf::load_tcp(|loader| {
        loader
            .override_global(globals::TARGET_TGID, &config.tgid, true)
            .override_global(globals::PORTS, &ports, true)
            .override_global(globals::PORTS_N, &ports_n, true)
            .override_global(globals::BY, &config.by, true)
            .override_global(globals::KEY_SLOTS, &config.key_slots, true)
            .override_global(globals::THRESHOLD_NS, &threshold, true)
            .override_global(globals::LOSS_EVENTS, &loss_events, true)
            .override_global(globals::EPHEMERAL_LO, &lo, true)
            .override_global(globals::EPHEMERAL_HI, &hi, true)
            .override_global(globals::SK_FAMILY_OFF, &o.family, true)
            .override_global(globals::SK_NUM_OFF, &o.num, true)
            .override_global(globals::SK_DPORT_OFF, &o.dport, true)
            .override_global(globals::SK_RCV_SADDR_OFF, &o.rcv_saddr, true)
            .override_global(globals::SK_DADDR_OFF, &o.daddr, true)
            .override_global(globals::SK_V6_RCV_SADDR_OFF, &o.v6_rcv_saddr, true)
            .override_global(globals::SK_V6_DADDR_OFF, &o.v6_daddr, true)
            .override_global(globals::SK_STATE_OFF, &o.state, true)
            .override_global(globals::SK_PROTOCOL_OFF, &o.protocol, true)
            .override_global(globals::SKB_CB_OFF, &o.skb_cb, true)
            .override_global(globals::SK_ACK_BACKLOG_OFF, &o.ack_backlog, true)
            .override_global(globals::SK_MAX_ACK_BACKLOG_OFF, &o.max_ack_backlog, true)
            .override_global(globals::SK_DROPS_OFF, &drops_off, true)
            .override_global(globals::REQ_SNT_SYNACK_OFF, &o.snt_synack, true)
            .override_global(globals::SK_RCVBUF_OFF, &o.rcvbuf, true)
            .override_global(globals::SKB_SK_OFF, &o.skb_sk, true)
            .override_global(globals::SKB_HEAD_OFF, &o.skb_head, true)
            .override_global(globals::SKB_PROTOCOL_OFF, &o.skb_protocol, true)
            .override_global(globals::SKB_NETWORK_HEADER_OFF, &o.skb_network_header, true)
            .override_global(globals::SKB_TRANSPORT_HEADER_OFF, &o.skb_transport_header, true)
            .map_max_entries(maps::STATS, histograms)
            .map_max_entries(maps::BUCKETS, histograms * hdr::GROUPS as u32)
            .map_max_entries(maps::KEY_SLOTS, config.key_slots.max(1))
            .map_max_entries(latprobe_common::SLOT_OWNERS, bpf::slot_owners(config.key_slots))
            .map_max_entries(maps::LOSSES, config.key_slots + 1)
            .map_max_entries(maps::KEY_COMMS, config.key_slots + 1)
            .map_max_entries(maps::SOCKS, SOCK_ENTRIES)
            .map_max_entries(maps::SKBS, SKB_ENTRIES)
            .map_max_entries(maps::COLLAPSES, COLLAPSE_ENTRIES)
            .map_max_entries(maps::PRUNING, COLLAPSE_ENTRIES)
            .map_max_entries(maps::EVENTS, ring_bytes)
            .map_max_entries(maps::DROPS, MAX_DROP_REASONS as u32);
    })?;

    let kernel_btf = aya_btf.get().context("reading kernel BTF (/sys/kernel/btf/vmlinux) failed")?;
    let mut attach_all = |names: &[(&'static str, &'static str)]| -> Availability {
        match names.iter().try_for_each(|&(name, target)| attach(&mut ebpf, &kernel_btf, name, target)) {
            Ok(()) => Availability::Attached(mechanism_of(names[0].0)),
            Err(e) => {
                note(&format!("{}: {e:#}", names[0].0));
                Availability::Unavailable(format!("{e:#}"))
            }
        }
    };
    let softirq = attach_all(&programs::SOFTIRQ);
    let state = attach_all(&[programs::STATE]);
    let accept = match (accept_program, state.attached()) {
        (_, false) => state.clone(),
        (Some(&(_, program)), true) => attach_all(&[(program, programs::ACCEPT_FUNCTION)]),
        (None, true) => Availability::Unavailable(format!(
            "{} takes {} parameters in this kernel's BTF, a layout latprobe does not know",
            programs::ACCEPT_FUNCTION,
            accept_params.map_or("no known".to_string(), |n| n.to_string())
        )),
    };
    let rxqueue = attach_all(&programs::RXQUEUE);
    let losses = attach_all(&programs::LOSSES);
    let mut partial = Vec::new();
    let mut state = state;
    if state.attached() {
        match attach_all(&[programs::SERVER_HANDSHAKE]) {
            Availability::Attached(_) => state = Availability::Attached("tp_btf, fentry"),
            Availability::Unavailable(why) => {
                partial.push(format!("handshake: a listener's handshakes are not timed (needs fentry on {why})"));
            }
        }
    }
    // Each drop point on its own: 6.1 refuses fentry on the six-argument
    // tcp_v4_syn_recv_sock (ENOTSUPP), yet takes tcp_conn_request.
    let whats = ["SYNs", "handshakes' last ACKs", "IPv6 handshakes' last ACKs"];
    for (i, what) in whats.into_iter().enumerate() {
        let why = match offsets.drops {
            Some(_) => attach_listen_drop(config.attach, i, &mut attach_all).err(),
            None => Some("sock.sk_drops is not in the kernel's BTF".to_string()),
        };
        if let Some(why) = why {
            partial.push(format!("losses: {what} dropped by a full accept queue are not counted ({why})"));
        }
    }
    let accept = match accept {
        Availability::Unavailable(why) if state.attached() => {
            Availability::Unavailable(format!("needs fexit on {why}"))
        }
        other => other,
    };
    let collapse = attach_collapse(config.attach, &mut attach_all);
    let mut stages = vec![Availability::Unavailable(String::new()); stage::COUNT as usize];
    stages[stage::SOFTIRQ as usize] = softirq;
    stages[stage::HANDSHAKE as usize] = state;
    stages[stage::ACCEPT as usize] = accept;
    stages[stage::RXQUEUE as usize] = rxqueue;
    stages[stage::COLLAPSE as usize] = collapse;
    // Drop reasons came with Linux 5.17 ("net: skb: introduce kfree_skb_reason()"):
    // the drops program reads the tracepoint's reason argument, which a
    // kernel without the enum in its BTF does not have (its verifier's
    // refusal says only "permission denied").
    let drop_reasons = if reasons.is_empty() {
        partial.push(
            "losses: drops are not counted (they need kfree_skb's drop reason, Linux 5.17+; this kernel's BTF \
             has no enum skb_drop_reason)"
                .into(),
        );
        Vec::new()
    } else {
        match attach_all(&[programs::DROPS]) {
            Availability::Attached(_) => reasons,
            Availability::Unavailable(why) => {
                partial.push(format!("losses: drops are not counted ({why})"));
                Vec::new()
            }
        }
    };
    Ok(Probes { ebpf, stages, losses, partial, drop_reasons })
}

/// The collapse stage: its end first (fexit of the function the prune is
/// inlined into, else a kretprobe), then the merged-segment counter, then
/// its start (fentry, else a kprobe), each as `mode` allows; a start without
/// an end would leave prunes open.
fn attach_collapse(
    mode: AttachMode,
    attach_all: &mut impl FnMut(&[(&'static str, &'static str)]) -> Availability,
) -> Availability {
    let parts = [
        (programs::PRUNE_END, programs::PRUNE_END_KRETPROBE, "fexit", "a kretprobe"),
        (programs::COLLAPSED, programs::COLLAPSED_KPROBE, "fentry", "a kprobe"),
        (programs::COLLAPSE_START, programs::COLLAPSE_START_KPROBE, "fentry", "a kprobe"),
    ];
    let mut probed = [false; 3];
    for (i, ((program, target), kprobe, trampoline, probe)) in parts.into_iter().enumerate() {
        let mut refused = Vec::new();
        let mut attached = false;
        if mode != AttachMode::Kprobe {
            match attach_all(&[(program, target)]) {
                Availability::Attached(_) => attached = true,
                Availability::Unavailable(why) => refused.push(format!("{trampoline}: {why}")),
            }
        }
        if !attached && mode != AttachMode::Fentry {
            match attach_all(&[(kprobe, target)]) {
                Availability::Attached(_) => (attached, probed[i]) = (true, true),
                Availability::Unavailable(why) => refused.push(format!("{probe}: {why}")),
            }
        }
        if !attached {
            return Availability::Unavailable(format!(
                "needs {trampoline} or {probe} on {target} ({})",
                refused.join("; ")
            ));
        }
    }
    Availability::Attached(match (probed[2], probed[0]) {
        (false, false) => "fentry, fexit",
        (true, false) => "kprobe, fexit",
        (false, true) => "fentry, kretprobe",
        (true, true) => "kprobe, kretprobe",
    })
}

/// The `i`th of a listener's drop points (`programs::LISTEN`): its return
/// first (fexit, else a kretprobe), then its entry (fentry, else a kprobe),
/// as `mode` allows. Err says what was refused.
fn attach_listen_drop(
    mode: AttachMode,
    i: usize,
    attach_all: &mut impl FnMut(&[(&'static str, &'static str)]) -> Availability,
) -> Result<(), String> {
    let (entry, target) = programs::LISTEN[i];
    let kprobe = if i == 0 { programs::LISTEN_SYN_KPROBE } else { programs::LISTEN_ACK_KPROBE };
    let parts = [
        (programs::LISTEN_EXIT[i], programs::LISTEN_KRETPROBE, "fexit", "a kretprobe"),
        (entry, kprobe, "fentry", "a kprobe"),
    ];
    for (program, probe, trampoline, probe_kind) in parts {
        let mut refused = Vec::new();
        if mode != AttachMode::Kprobe {
            match attach_all(&[(program, target)]) {
                Availability::Attached(_) => continue,
                Availability::Unavailable(why) => refused.push(format!("{trampoline}: {why}")),
            }
        }
        if mode != AttachMode::Fentry {
            match attach_all(&[(probe, target)]) {
                Availability::Attached(_) => continue,
                Availability::Unavailable(why) => refused.push(format!("{probe_kind}: {why}")),
            }
        }
        return Err(format!("needs {trampoline} or {probe_kind} on {target}: {}", refused.join("; ")));
    }
    Ok(())
}

/// The mechanism of a program, by its kind.
fn mechanism_of(program: &str) -> &'static str {
    if programs::SOFTIRQ.iter().any(|(p, _)| *p == program) {
        "raw_tp"
    } else if programs::ACCEPT.iter().any(|(_, p)| *p == program) || programs::LISTEN_EXIT.contains(&program) {
        "fexit"
    } else if program == programs::PRUNE_END_KRETPROBE || program == programs::LISTEN_KRETPROBE {
        "kretprobe"
    } else if [
        programs::LISTEN_ACK_KPROBE,
        programs::LISTEN_SYN_KPROBE,
        programs::COLLAPSE_START_KPROBE,
        programs::COLLAPSED_KPROBE,
    ]
    .contains(&program)
    {
        "kprobe"
    } else if program == programs::SERVER_HANDSHAKE.0
        || program == programs::COLLAPSE_START.0
        || program == programs::COLLAPSED.0
        || programs::LISTEN.iter().any(|(p, _)| *p == program)
    {
        "fentry"
    } else {
        "tp_btf"
    }
}

/// Loads and attaches one program (unless an earlier stage did).
fn attach(ebpf: &mut Ebpf, btf: &AyaBtf, name: &str, target: &str) -> Result<()> {
    let program = ebpf.program_mut(name).with_context(|| format!("program {name} is missing from the tcp object"))?;
    let described = |e: aya::programs::ProgramError| anyhow!("{target}: {}", bpf::describe(&e));
    match program {
        Program::RawTracePoint(p) => {
            p.load().map_err(described)?;
            p.attach(target).map_err(described)?;
        }
        Program::BtfTracePoint(p) => {
            p.load(target, btf).map_err(described)?;
            p.attach().map_err(described)?;
        }
        Program::FExit(p) => {
            p.load(target, btf).map_err(described)?;
            p.attach().map_err(described)?;
        }
        Program::FEntry(p) => {
            p.load(target, btf).map_err(described)?;
            p.attach().map_err(described)?;
        }
        Program::KProbe(p) => {
            // One kprobe program may serve several functions: loaded once.
            if p.fd().is_err() {
                p.load().map_err(described)?;
            }
            p.attach(target, 0).map_err(described)?;
        }
        _ => return Err(anyhow!("program {name} has an unexpected kind")),
    }
    Ok(())
}

/// Unloads every `tcp_` program, detaching its links; safe to call twice.
pub fn unload_all(ebpf: &mut Ebpf) {
    let all = programs::SOFTIRQ.iter().chain(&programs::RXQUEUE).chain(&programs::LOSSES).chain(&programs::LISTEN);
    let listen_exits = programs::LISTEN_EXIT.iter().copied();
    let accept = programs::ACCEPT.iter().map(|(_, p)| *p);
    let single = [
        &programs::STATE,
        &programs::SERVER_HANDSHAKE,
        &programs::DROPS,
        &programs::COLLAPSE_START,
        &programs::COLLAPSED,
        &programs::PRUNE_END,
    ];
    let kprobe = [
        programs::LISTEN_ACK_KPROBE,
        programs::LISTEN_SYN_KPROBE,
        programs::COLLAPSE_START_KPROBE,
        programs::COLLAPSED_KPROBE,
        programs::PRUNE_END_KRETPROBE,
        programs::LISTEN_KRETPROBE,
    ];
    for name in all.chain(single).map(|(p, _)| *p).chain(accept).chain(listen_exits).chain(kprobe) {
        let _ = match ebpf.program_mut(name) {
            Some(Program::BtfTracePoint(p)) => p.unload(),
            Some(Program::RawTracePoint(p)) => p.unload(),
            Some(Program::FExit(p)) => p.unload(),
            Some(Program::FEntry(p)) => p.unload(),
            Some(Program::KProbe(p)) => p.unload(),
            _ => Ok(()),
        };
    }
}
