//! `latprobe tcp`: where this machine's connections wait (softirq,
//! handshake, accept queue, receive queue) and where packets are lost, per
//! port or per process.
//!
//! The `tcp_` programs (see `tcp_probes`) aggregate every wait into per-CPU
//! HDR histograms in the kernel and count losses per port; only waits over
//! `--slower` and individual losses come through the ring buffer.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use latprobe_common::{
    tcp::{
        by, event, histogram_index, loss, maps, stage, LossCounts, Lost, TcpEvent, COLLAPSE_ENTRIES, MAX_DROP_REASONS,
        MAX_PORTS, PID_KEY, REMOTE_PORT, SOCK_ENTRIES,
    },
    COMM_LEN,
};
use serde::Serialize;

use crate::{
    cli::{TcpArgs, TcpBy},
    clock::WallClock,
    cost::{self, SelfCost},
    duration::format_ns,
    histogram::{Latencies, QUANTILES},
    kernel_hist::{self, HistMaps},
    metrics::{self, Counter, Exporter, Series},
    output::{
        self,
        hdr_log::{series_tag, HdrLog},
        text,
    },
    report::{Format, FunctionReport, Period},
    run::{Ring, Run, Step, BATCH, SETTLE_TIME},
    tcp_probes::{self, Availability, Config, Probes},
};

/// What a key slot stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// Connections to this local port.
    Port(u16),
    /// Connections made to this remote port.
    RemotePort(u16),
    Process(u32),
    /// Keys past `--max-keys`, and waits of no known connection.
    Other,
    /// softirq: the whole machine.
    All,
}

impl Key {
    fn from_raw(raw: u32) -> Self {
        if raw & PID_KEY != 0 {
            Key::Process(raw & !PID_KEY)
        } else if raw & REMOTE_PORT != 0 {
            Key::RemotePort(raw as u16)
        } else {
            Key::Port(raw as u16)
        }
    }

    fn label(&self) -> String {
        match self {
            Key::Port(p) => format!("port={p}"),
            Key::RemotePort(p) => format!("to_port={p}"),
            Key::Process(pid) => format!("pid={pid}"),
            Key::Other => "other".into(),
            Key::All => "all".into(),
        }
    }
}

/// The maps a report is read from.
struct Source {
    hist: HistMaps,
    key_slots: BpfHashMap<MapData, u32, u32>,
    losses: PerCpuArray<MapData, LossCounts>,
    lost: PerCpuArray<MapData, Lost>,
    key_comms: PerCpuArray<MapData, [u8; COMM_LEN]>,
    drops: PerCpuArray<MapData, u64>,
    max_keys: usize,
    /// Names of processes seen, kept after they exit.
    comms: HashMap<u32, String>,
}

/// One stage's histogram for one key.
struct StageRow {
    stage: u32,
    key: Key,
    latencies: Latencies,
}

/// Loss counts of one key.
struct LossRow {
    key: Key,
    counts: [u64; loss::COUNT as usize],
}

/// Everything counted since tracing began.
struct Snapshot {
    stages: Vec<StageRow>,
    losses: Vec<LossRow>,
    /// Dropped packets by drop reason (the index).
    drops: Vec<u64>,
    lost: Lost,
}

impl Source {
    fn take(probes: &mut Probes, max_keys: usize) -> Result<Self> {
        let ebpf = &mut probes.ebpf;
        let map = |ebpf: &mut aya::Ebpf, name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
        let hist = HistMaps::take(ebpf, maps::STATS, maps::BUCKETS)?;
        let key_slots = BpfHashMap::try_from(map(ebpf, maps::KEY_SLOTS)?).context("map TCP_KEY_SLOTS")?;
        let losses = PerCpuArray::try_from(map(ebpf, maps::LOSSES)?).context("map TCP_LOSSES")?;
        let lost = PerCpuArray::try_from(map(ebpf, maps::LOST)?).context("map TCP_LOST")?;
        let key_comms = PerCpuArray::try_from(map(ebpf, maps::KEY_COMMS)?).context("map TCP_KEY_COMMS")?;
        let drops = PerCpuArray::try_from(map(ebpf, maps::DROPS)?).context("map TCP_DROPS")?;
        Ok(Self { hist, key_slots, losses, lost, key_comms, drops, max_keys, comms: HashMap::new() })
    }

    /// (key, slot) of every key handed a slot, "other" first.
    fn keys(&self) -> Result<Vec<(Key, usize)>> {
        let mut keys = vec![(Key::Other, 0)];
        for entry in self.key_slots.iter() {
            let (raw, slot) = entry.context("reading TCP_KEY_SLOTS")?;
            if (slot as usize) <= self.max_keys {
                keys.push((Key::from_raw(raw), slot as usize));
            }
        }
        Ok(keys)
    }

    /// Notes the name of every process with a slot: as the programs saw it
    /// (a process may be gone by now), else from /proc.
    fn remember_comms(&mut self) -> Result<()> {
        for (key, slot) in self.keys()? {
            let Key::Process(pid) = key else { continue };
            if self.comms.contains_key(&pid) {
                continue;
            }
            let seen: PerCpuValues<[u8; COMM_LEN]> =
                self.key_comms.get(&(slot as u32), 0).context("reading TCP_KEY_COMMS")?;
            let comm = match seen.iter().find(|c| c[0] != 0) {
                Some(c) => text::comm(c),
                None => text::read_comm(pid),
            };
            self.comms.insert(pid, comm);
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let keys = self.keys()?;
        let mut stages = Vec::new();
        stages.push(StageRow {
            stage: stage::SOFTIRQ,
            key: Key::All,
            latencies: self.hist.totals(histogram_index(stage::SOFTIRQ, 0, self.max_keys))?.latencies,
        });
        for s in [stage::HANDSHAKE, stage::ACCEPT, stage::RXQUEUE, stage::COLLAPSE] {
            for (key, slot) in &keys {
                let latencies = self.hist.totals(histogram_index(s, *slot, self.max_keys))?.latencies;
                stages.push(StageRow { stage: s, key: key.clone(), latencies });
            }
        }
        let mut losses = Vec::new();
        for (key, slot) in &keys {
            let values: PerCpuValues<LossCounts> = self.losses.get(&(*slot as u32), 0).context("reading TCP_LOSSES")?;
            let mut counts = [0u64; loss::COUNT as usize];
            for cpu in values.iter() {
                for (sum, n) in counts.iter_mut().zip(cpu.counts) {
                    *sum += n;
                }
            }
            losses.push(LossRow { key: key.clone(), counts });
        }
        let mut drops = vec![0u64; MAX_DROP_REASONS];
        for (reason, count) in drops.iter_mut().enumerate() {
            let per_cpu: PerCpuValues<u64> = self.drops.get(&(reason as u32), 0).context("reading TCP_DROPS")?;
            *count = per_cpu.iter().sum();
        }
        let lost_values: PerCpuValues<Lost> = self.lost.get(&0, 0).context("reading TCP_LOST")?;
        let lost = lost_values.iter().fold(Lost::default(), |a, l| Lost {
            sock_table_full: a.sock_table_full + l.sock_table_full,
            events: a.events + l.events,
            collapse_table_full: a.collapse_table_full + l.collapse_table_full,
        });
        Ok(Snapshot { stages, losses, drops, lost })
    }

    fn comm_of(&self, key: &Key) -> Option<&str> {
        match key {
            Key::Process(pid) => self.comms.get(pid).map(String::as_str),
            _ => None,
        }
    }
}

impl Snapshot {
    /// What happened between `earlier` and this one.
    fn since(&self, earlier: &Snapshot) -> Result<Snapshot> {
        let mut stages = Vec::new();
        for row in &self.stages {
            let before = earlier.stages.iter().find(|r| r.stage == row.stage && r.key == row.key);
            let latencies = match before {
                Some(b) => row.latencies.since(&b.latencies)?,
                None => row.latencies.clone(),
            };
            stages.push(StageRow { stage: row.stage, key: row.key.clone(), latencies });
        }
        let losses = self
            .losses
            .iter()
            .map(|row| {
                let before = earlier.losses.iter().find(|r| r.key == row.key);
                let mut counts = row.counts;
                if let Some(b) = before {
                    for (c, was) in counts.iter_mut().zip(b.counts) {
                        *c = c.saturating_sub(was);
                    }
                }
                LossRow { key: row.key.clone(), counts }
            })
            .collect();
        let lost = Lost {
            sock_table_full: self.lost.sock_table_full.saturating_sub(earlier.lost.sock_table_full),
            events: self.lost.events.saturating_sub(earlier.lost.events),
            collapse_table_full: self.lost.collapse_table_full.saturating_sub(earlier.lost.collapse_table_full),
        };
        let drops = self
            .drops
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(earlier.drops.get(i).copied().unwrap_or(0)))
            .collect();
        Ok(Snapshot { stages, losses, drops, lost })
    }

    /// The measured stages' histograms with something in them, named as in
    /// the JSON reports (`tcp:accept[port=8080]`), for `--hdr-log`.
    fn series(&self, probes: &Probes) -> Vec<(String, Latencies)> {
        self.metrics(probes)
            .into_iter()
            .map(|s| (series_tag(&s.function, s.key.as_deref()), s.latencies.clone()))
            .collect()
    }

    /// The same histograms as `--listen` serves them: function and key apart.
    fn metrics(&self, probes: &Probes) -> Vec<Series<'_>> {
        self.stages
            .iter()
            .filter(|row| row.latencies.count() > 0)
            .filter(|row| matches!(probes.stages[row.stage as usize], Availability::Attached(_)))
            .map(|row| Series {
                function: format!("tcp:{}", stage::NAMES[row.stage as usize]),
                key: Some(row.key.label()),
                latencies: &row.latencies,
                untimed: 0,
                outliers_lost: 0,
            })
            .collect()
    }

    /// What `--listen` serves beside the histograms: what could not be
    /// measured, named as in the JSON summary (for all stages at once), and
    /// each key's losses, named as in its `tcp_losses` record, when losses
    /// are counted.
    fn counters(&self, probes: &Probes) -> Vec<Counter> {
        let mut counters = vec![
            Counter::lost("untimed_sockets", self.lost.sock_table_full),
            Counter::lost("untimed_prunes", self.lost.collapse_table_full),
            Counter::lost("events_lost", self.lost.events),
        ];
        if matches!(probes.losses, Availability::Attached(_)) {
            for row in &self.losses {
                for (kind, &count) in loss::NAMES.iter().zip(&row.counts) {
                    counters.push(Counter {
                        name: "latprobe_tcp_losses",
                        help: "Packets and connections lost, per key, by kind (as the tcp_losses JSON record names it)",
                        labels: vec![("key", row.key.label()), ("kind", kind.to_string())],
                        value: count,
                    });
                }
            }
        }
        counters
    }

    fn empty() -> Snapshot {
        Snapshot { stages: Vec::new(), losses: Vec::new(), drops: Vec::new(), lost: Lost::default() }
    }
}

pub async fn run(args: TcpArgs) -> Result<()> {
    if args.port.len() > MAX_PORTS {
        bail!("at most {MAX_PORTS} --port values ({} given)", args.port.len());
    }
    let mut run = Run::prepare(&args.run, None, None)?;
    let mut hdr_log = args.hdr_log.as_deref().map(HdrLog::create).transpose()?;
    let exporter = args.listen.as_ref().map(Exporter::start).transpose()?;
    let config = Config {
        tgid: run.tgid(),
        ports: args.port.clone(),
        by: match args.by {
            TcpBy::Port => by::PORT,
            TcpBy::Pid => by::PID,
        },
        key_slots: args.max_keys,
        threshold_ns: args.slower,
        loss_events: args.losses,
        attach: args.attach,
    };
    let mut cost = cost::start(args.run.max_overhead)?;
    let mut probes = tcp_probes::start(&config)?;
    output::verbose(&kernel_hist::memory(latprobe_common::tcp::histograms(args.max_keys as usize), "histogram"));
    let mut source = Source::take(&mut probes, args.max_keys as usize)?;
    let mut ring: Ring<TcpEvent> = Ring::take(&mut probes.ebpf, maps::EVENTS)?;
    let printer = EventPrinter { clock: WallClock::new(), format: args.format, reasons: probes.drop_reasons.clone() };

    let attached: Vec<String> = (0..stage::COUNT)
        .map(|s| match &probes.stages[s as usize] {
            Availability::Attached(how) => format!("{} ({how})", stage::NAMES[s as usize]),
            Availability::Unavailable(_) => format!("{} (unavailable)", stage::NAMES[s as usize]),
        })
        .collect();
    for (s, a) in probes.stages.iter().enumerate() {
        if let Availability::Unavailable(why) = a {
            output::warn(&format!("tcp: stage {} is not measured: {why}", stage::NAMES[s]));
        }
    }
    if let Availability::Unavailable(why) = &probes.losses {
        output::warn(&format!("tcp: losses are not counted: {why}"));
    }
    for note in &probes.partial {
        output::warn(&format!("tcp: {note}"));
    }
    output::say(&format!("tracing tcp: {}; Ctrl-C to end", attached.join(", ")));
    run.report_every(args.interval);
    let own_poll = (args.by == TcpBy::Pid).then_some(Duration::from_millis(500));
    if let Some(period) = metrics::poll_period(exporter.as_ref(), own_poll) {
        run.poll_every(period);
    }
    run.judge_budget_every(cost.as_ref().and_then(SelfCost::budget_window));
    run.activate()?;
    if let Some(log) = hdr_log.as_mut() {
        log.begin(&format!("tcp: {}", attached.join(", ")));
    }
    let mut last_report = Instant::now();
    let mut previous = Snapshot::empty();
    let end = loop {
        match run.next(Some(&mut ring)).await? {
            Step::Ended(end) => break end,
            Step::Budget => {
                if let Some(end) = run.over_budget(cost.as_mut(), &probes.ebpf) {
                    break end;
                }
            }
            Step::Records => {
                ring.drain(BATCH, |e| printer.print(&e))?;
            }
            Step::Poll => {
                source.remember_comms()?;
                if let Some(exporter) = exporter.as_ref() {
                    publish(exporter, &source.snapshot()?, &probes, cost.as_ref());
                }
            }
            Step::Interval => {
                let now = Instant::now();
                source.remember_comms()?;
                let snapshot = source.snapshot()?;
                if let Some(exporter) = exporter.as_ref() {
                    publish(exporter, &snapshot, &probes, cost.as_ref());
                }
                let delta = snapshot.since(&previous)?;
                let period = Period { name: "interval", elapsed: now - last_report, unprinted: 0 };
                output::report(render(&delta, &source, &probes, &period, args.format));
                if let Some(log) = hdr_log.as_mut() {
                    log.interval(&delta.series(&probes));
                }
                if let Some(cost) = cost.as_mut() {
                    output::report(cost.since_last(&probes.ebpf).render("interval", args.format));
                }
                previous = snapshot;
                last_report = now;
            }
        }
    };

    run.end(&end);
    let final_cost = cost.as_ref().map(|c| c.whole_run(&probes.ebpf));
    // Drained and written before the programs are unloaded: detaching a
    // dozen fentry and fexit programs can take longer than the drain may
    // (trampolines are rewritten one by one), and what they send meanwhile is
    // bounded by the drain's deadline.
    let discarded = ring.drain_until(run.drain_deadline(), |e| printer.print(&e))?;
    let unprinted = discarded + output::settle_records(run.drain_deadline() + SETTLE_TIME);
    tcp_probes::unload_all(&mut probes.ebpf);
    let period = Period { name: "final", elapsed: run.elapsed(), unprinted };
    source.remember_comms()?;
    let snapshot = source.snapshot()?;
    if let Some(exporter) = exporter.as_ref() {
        exporter.publish(&snapshot.metrics(&probes), &snapshot.counters(&probes), final_cost.as_ref());
    }
    output::report(render(&snapshot, &source, &probes, &period, args.format));
    if let Some(cost) = final_cost {
        output::report(cost.render("final", args.format));
    }
    let last = snapshot.since(&previous)?.series(&probes);
    hdr_log.map_or(Ok(()), |log| log.end(&last))
}

/// Makes `snapshot` (cumulative since the start) what `--listen` serves.
fn publish(exporter: &Exporter, snapshot: &Snapshot, probes: &Probes, cost: Option<&SelfCost>) {
    let cost = cost.map(|c| c.whole_run(&probes.ebpf));
    exporter.publish(&snapshot.metrics(probes), &snapshot.counters(probes), cost.as_ref());
}

impl<'a> LossJson<'a> {
    fn of(period: &'a str, key: &'a str, c: &[u64; loss::COUNT as usize]) -> Self {
        LossJson {
            kind: "tcp_losses",
            period,
            key,
            syn_retransmits: c[loss::SYN_RETRANS as usize],
            synack_retransmits: c[loss::SYNACK_RETRANS as usize],
            retransmits: c[loss::RETRANS as usize],
            resets_sent: c[loss::RESET_SENT as usize],
            resets_received: c[loss::RESET_RECEIVED as usize],
            listen_overflows: c[loss::LISTEN_OVERFLOW as usize],
            collapsed_skbs: c[loss::COLLAPSED as usize],
            drops: c[loss::DROPPED as usize],
        }
    }
}

#[derive(Serialize)]
struct LossJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    period: &'a str,
    key: &'a str,
    syn_retransmits: u64,
    synack_retransmits: u64,
    retransmits: u64,
    resets_sent: u64,
    resets_received: u64,
    listen_overflows: u64,
    /// Segments merged away by collapses (the kernel's TCPRcvCollapsed).
    collapsed_skbs: u64,
    /// Packets of the key's connections the kernel dropped, any reason.
    drops: u64,
}

#[derive(Serialize)]
struct DropsJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    period: &'a str,
    /// Drop reason (the kernel's name, without SKB_DROP_REASON_) → packets,
    /// of every protocol.
    reasons: std::collections::BTreeMap<&'a str, u64>,
}

/// The drop reasons that dropped packets, busiest first, by name.
fn drops_by_reason<'a>(drops: &[u64], probes: &'a Probes) -> Vec<(&'a str, u64)> {
    let mut named: Vec<(&str, u64)> = probes
        .drop_reasons
        .iter()
        .filter_map(|(value, name)| {
            let n = drops.get(*value as usize).copied().unwrap_or(0);
            (n > 0).then_some((name.as_str(), n))
        })
        .collect();
    named.sort_by_key(|(name, n)| (std::cmp::Reverse(*n), *name));
    named
}

#[derive(Serialize)]
struct SummaryJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    period: &'a str,
    seconds: f64,
    /// Stage → how it is measured, or why it is not.
    stages: Vec<StageJson<'a>>,
    /// What this kernel does not let latprobe see of a measured stage.
    partial: &'a [String],
    untimed_sockets: u64,
    /// Prunes not timed: too many sockets were being pruned at once.
    untimed_prunes: u64,
    events_lost: u64,
    events_unprinted: u64,
}

#[derive(Serialize)]
struct StageJson<'a> {
    stage: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    attach: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<&'a str>,
}

/// One report: a line per stage and key that saw a wait, the losses per
/// key, and what could not be measured.
fn render(snapshot: &Snapshot, source: &Source, probes: &Probes, period: &Period, format: Format) -> String {
    let mut rows: Vec<&StageRow> =
        snapshot.stages.iter().filter(|r| r.latencies.count() > 0 || r.key == Key::All).collect();
    // By stage, then busiest key first.
    rows.sort_by_key(|r| (r.stage, std::cmp::Reverse(r.latencies.count())));
    let losses: Vec<&LossRow> = snapshot.losses.iter().filter(|r| r.counts.iter().any(|&c| c > 0)).collect();
    match format {
        Format::Json => render_json(&rows, &losses, snapshot, source, probes, period),
        Format::Text => render_text(&rows, &losses, snapshot, source, probes, period),
    }
}

fn render_json(
    rows: &[&StageRow],
    losses: &[&LossRow],
    snapshot: &Snapshot,
    source: &Source,
    probes: &Probes,
    period: &Period,
) -> String {
    let mut out = String::new();
    for row in rows {
        let name = format!("tcp:{}", stage::NAMES[row.stage as usize]);
        let Availability::Attached(attach) = &probes.stages[row.stage as usize] else { continue };
        let key = row.key.label();
        let report = FunctionReport {
            function: &name,
            key: Some(&key),
            comm: source.comm_of(&row.key),
            noun: "waits",
            attach,
            period: period.name,
            seconds: period.elapsed.as_secs_f64(),
            latencies: &row.latencies,
            missed: 0,
            outliers_lost: 0,
            outliers_unprinted: 0,
            over_budget: false,
        };
        out += &report.to_json();
        out.push('\n');
    }
    for row in losses {
        let key = row.key.label();
        out += &serde_json::to_string(&LossJson::of(period.name, &key, &row.counts)).expect("losses serialize");
        out.push('\n');
    }
    let reasons = drops_by_reason(&snapshot.drops, probes);
    if !reasons.is_empty() {
        let json = DropsJson { kind: "tcp_drops", period: period.name, reasons: reasons.into_iter().collect() };
        out += &serde_json::to_string(&json).expect("drops serialize");
        out.push('\n');
    }
    let stages = probes
        .stages
        .iter()
        .enumerate()
        .map(|(s, a)| StageJson {
            stage: stage::NAMES[s],
            attach: match a {
                Availability::Attached(how) => Some(how),
                Availability::Unavailable(_) => None,
            },
            unavailable: match a {
                Availability::Attached(_) => None,
                Availability::Unavailable(why) => Some(why),
            },
        })
        .collect();
    let summary = SummaryJson {
        kind: "tcp_summary",
        period: period.name,
        seconds: (period.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        stages,
        partial: &probes.partial,
        untimed_sockets: snapshot.lost.sock_table_full,
        untimed_prunes: snapshot.lost.collapse_table_full,
        events_lost: snapshot.lost.events,
        events_unprinted: period.unprinted,
    };
    out += &serde_json::to_string(&summary).expect("summary serializes");
    out.push('\n');
    out
}

fn render_text(
    rows: &[&StageRow],
    losses: &[&LossRow],
    snapshot: &Snapshot,
    source: &Source,
    probes: &Probes,
    period: &Period,
) -> String {
    let mut out = format!("tcp {} {:.1}s\n", period.name, period.elapsed.as_secs_f64());
    let _ = writeln!(
        out,
        "  {:<9} {:<24} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "stage", "key", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for s in 0..stage::COUNT {
        let name = stage::NAMES[s as usize];
        if let Availability::Unavailable(why) = &probes.stages[s as usize] {
            let _ = writeln!(out, "  {name:<9} unavailable: {why}");
            continue;
        }
        let mut any = false;
        for row in rows.iter().filter(|r| r.stage == s) {
            any = true;
            let l = &row.latencies;
            let mut key = row.key.label();
            if let Some(comm) = source.comm_of(&row.key) {
                key += &format!(" ({comm})");
            }
            let q = |i: usize| if l.count() == 0 { "-".into() } else { format_ns(l.quantile_ns(QUANTILES[i].0)) };
            let max = if l.count() == 0 { "-".into() } else { format_ns(l.max_ns()) };
            let _ = writeln!(
                out,
                "  {name:<9} {key:<24} {:>8} {:>9} {:>9} {:>9} {:>9} {max:>9}",
                l.count(),
                q(0),
                q(1),
                q(2),
                q(3)
            );
        }
        if !any {
            let _ = writeln!(out, "  {name:<9} {:<24} {:>8}", "-", 0);
        }
    }
    if !losses.is_empty() {
        let _ = writeln!(
            out,
            "  {:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "losses", "syn_rtx", "synack_rtx", "rtx", "rst_sent", "rst_recv", "overflows", "drops", "collapsed"
        );
        for row in losses {
            let c = &row.counts;
            let _ = writeln!(
                out,
                "  {:<24} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                row.key.label(),
                c[loss::SYN_RETRANS as usize],
                c[loss::SYNACK_RETRANS as usize],
                c[loss::RETRANS as usize],
                c[loss::RESET_SENT as usize],
                c[loss::RESET_RECEIVED as usize],
                c[loss::LISTEN_OVERFLOW as usize],
                c[loss::DROPPED as usize],
                c[loss::COLLAPSED as usize]
            );
        }
    }
    let reasons = drops_by_reason(&snapshot.drops, probes);
    if !reasons.is_empty() {
        let shown: Vec<String> = reasons.iter().take(8).map(|(name, n)| format!("{n} {name}")).collect();
        let more = if reasons.len() > 8 { format!(", and {} more reasons", reasons.len() - 8) } else { String::new() };
        let _ = writeln!(out, "  drops (all protocols): {}{more}", shown.join(", "));
    }
    if snapshot.lost.sock_table_full > 0 {
        let _ = writeln!(
            out,
            "  LOST: {} handshakes or accepts untimed ({SOCK_ENTRIES} sockets were already waiting)",
            snapshot.lost.sock_table_full
        );
    }
    if snapshot.lost.collapse_table_full > 0 {
        let _ = writeln!(
            out,
            "  LOST: {} prunes untimed ({COLLAPSE_ENTRIES} sockets were already being pruned)",
            snapshot.lost.collapse_table_full
        );
    }
    if snapshot.lost.events > 0 || period.unprinted > 0 {
        let _ = writeln!(
            out,
            "  events: {} lost (ring buffer full), {} not printed (stdout too slow, or still queued at the end)",
            snapshot.lost.events, period.unprinted
        );
    }
    out.push('\n');
    out
}

/// Prints slow waits and losses from the ring buffer.
struct EventPrinter {
    clock: WallClock,
    format: Format,
    /// The kernel's drop reasons by value, to name a drop's.
    reasons: Vec<(u32, String)>,
}

#[derive(Serialize)]
struct EventJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    stage: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a str>,
    cpu: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<String>,
    /// A pruned socket's receive buffer (`sk_rcvbuf`), bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    rcvbuf: Option<u32>,
    /// A dropped packet's drop reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// `include/net/tcp_states.h`.
const STATES: [&str; 13] = [
    "?",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// An endpoint as `addr:port`, `[addr]:port` for IPv6.
fn endpoint(family: u16, addr: &[u8; 16], port: u16) -> Option<String> {
    match family {
        2 => Some(format!("{}:{port}", Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))),
        10 => Some(format!("[{}]:{port}", Ipv6Addr::from(*addr))),
        _ => None,
    }
}

impl EventPrinter {
    fn print(&self, e: &TcpEvent) -> Result<()> {
        output::record(|| {
            let time = self.clock.format(e.ts_ns);
            let slow = e.kind == event::SLOW;
            let what = if slow { stage::NAMES.get(e.detail as usize) } else { loss::NAMES.get(e.detail as usize) };
            let what = what.copied().unwrap_or("?");
            let json = EventJson {
                kind: if slow { "tcp_slow" } else { "tcp_loss" },
                time: &time,
                stage: slow.then_some(what),
                loss: (!slow).then_some(what),
                duration_ns: slow.then_some(e.duration_ns),
                local: endpoint(e.family, &e.local_addr, e.local_port),
                // A listener has no remote end.
                remote: (e.remote_port != 0).then(|| endpoint(e.family, &e.remote_addr, e.remote_port)).flatten(),
                // A packet no socket took has no state.
                state: (e.family != 0 && e.state != 0).then(|| STATES.get(e.state as usize).copied().unwrap_or("?")),
                cpu: e.cpu,
                pid: (e.tgid != 0).then_some(e.tgid),
                comm: (e.tgid != 0).then(|| text::comm(&e.comm)),
                rcvbuf: (slow && e.detail == stage::COLLAPSE).then_some(e.rcvbuf),
                reason: (!slow && e.detail == loss::DROPPED)
                    .then(|| self.reasons.iter().find(|(v, _)| *v == e.reason).map_or("?", |(_, name)| name.as_str())),
            };
            match self.format {
                Format::Json => format!("{}\n", serde_json::to_string(&json).expect("event serializes")),
                Format::Text => {
                    let mut line = format!("{time} {} {what}", json.kind);
                    if let Some(d) = json.duration_ns {
                        line += &format!(" {}", format_ns(d));
                    }
                    match (&json.local, &json.remote) {
                        (Some(l), Some(r)) => line += &format!(" {l} <-> {r}"),
                        (Some(l), None) => line += &format!(" {l}"),
                        _ => {}
                    }
                    if let Some(s) = json.state {
                        line += &format!(" state={s}");
                    }
                    if let Some(bytes) = json.rcvbuf {
                        line += &format!(" rcvbuf={bytes}");
                    }
                    if let Some(reason) = json.reason {
                        line += &format!(" reason={reason}");
                    }
                    line += &format!(" cpu={}", e.cpu);
                    if let (Some(pid), Some(comm)) = (json.pid, &json.comm) {
                        line += &format!(" pid={pid} comm={comm}");
                    }
                    line + "\n"
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_names_are_the_json_fields() {
        let counts: [u64; loss::COUNT as usize] = std::array::from_fn(|i| i as u64 + 1);
        let json: serde_json::Value = serde_json::to_value(LossJson::of("final", "port=80", &counts)).unwrap();
        for (i, name) in loss::NAMES.iter().enumerate() {
            assert_eq!(json[name], i as u64 + 1, "{name} in {json}");
        }
    }
}
