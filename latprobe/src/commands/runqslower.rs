//! `latprobe runqslower THRESHOLD`: every wait for a CPU longer than
//! THRESHOLD, with the task that held that CPU just before (the culprit), and
//! at the end the delays summed per culprit.
//!
//! The `rq_` programs (see `sched_probes`) measure every wait in the kernel;
//! only waits over the threshold reach this process, through the ring buffer.

use std::collections::HashMap;

use anyhow::Result;
use latprobe_common::sched::{hist, maps, RunqEvent, EVENTS_RING_BYTES};
use serde::Serialize;

use crate::{
    cli::RunqslowerArgs,
    clock::WallClock,
    cost::{self, SelfCost},
    duration::format_ns,
    kallsyms::{self, SymbolsLater},
    output::{self, text},
    report::{frames_json, Format},
    run::{Ring, Run, Step, BATCH, SETTLE_TIME},
    sched_probes::{self, Config},
};

/// Culprit rows the text summary shows; JSON gets them all.
const TEXT_CULPRITS: usize = 20;
/// Culprits tallied one by one; later ones are summed in one row, so a run
/// on a box with a million short-lived tasks holds bounded memory.
const MAX_CULPRITS: usize = 4096;

pub async fn run(args: RunqslowerArgs) -> Result<()> {
    if let Some(comm) = &args.comm {
        sched_probes::comm_prefix(comm)?;
    }
    let mut run = Run::prepare(&args.run, args.cpu, args.tid)?;
    let config = Config {
        tgid: run.tgid(),
        tid: args.tid.unwrap_or(0),
        cpu: args.cpu,
        comm: args.comm.clone(),
        threshold_ns: Some(args.threshold),
        stacks: args.stacks,
        hist: hist::NONE,
        pid_slots: 0,
        ring_bytes: EVENTS_RING_BYTES,
        mode: args.attach,
    };
    let mut cost = cost::start(args.run.max_overhead)?;
    let mut probes = sched_probes::start(&config)?;
    // Kernel symbols are only needed to print stacks; they take megabytes.
    let symbols = args.stacks.then(|| SymbolsLater::start(false));
    let mut ring: Ring<RunqEvent> = Ring::take(&mut probes.ebpf, maps::EVENTS)?;
    let mut printer = Printer {
        symbols: symbols.as_ref(),
        clock: WallClock::new(),
        format: args.format,
        culprits: Culprits::default(),
        events: 0,
    };

    output::say(&format!(
        "tracing run-queue waits over {} ({}); Ctrl-C to end",
        format_ns(args.threshold),
        probes.mechanism
    ));
    if args.format == Format::Text {
        output::report(format!("{HEADER}\n"));
    }
    run.judge_budget_every(cost.as_ref().and_then(SelfCost::budget_window));
    run.activate()?;
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
            Step::Interval | Step::Poll => {}
        }
    };

    run.end(&end);
    let final_cost = cost.as_ref().map(|c| c.whole_run(&probes.ebpf));
    // Detach, then print whatever is left in the ring. Waits still under
    // way are not over the threshold yet, or not known to be.
    probes.stop();
    let discarded = ring.drain_until(run.drain_deadline(), |e| printer.print(&e))?;
    let lost = probes.lost()?;
    let summary = Summary {
        threshold_ns: args.threshold,
        attach: probes.mechanism.to_string(),
        store: probes.store.to_string(),
        seconds: run.elapsed().as_secs_f64(),
        events: printer.events + discarded,
        lost_no_start: lost.no_start,
        lost_events: lost.events,
        unprinted: discarded + output::settle_records(run.drain_deadline() + SETTLE_TIME),
    };
    let rows = printer.culprits.rows();
    let mut out = match args.format {
        Format::Text => summary_text(&summary, &rows),
        Format::Json => {
            let mut out = String::new();
            for r in &rows {
                out += &r.to_json();
                out.push('\n');
            }
            out += &summary.to_json();
            out.push('\n');
            out
        }
    };
    if let Some(cost) = final_cost {
        out += &cost.render("final", args.format);
    }
    output::report(out);
    Ok(())
}

const HEADER: &str = "TIME                        CPU COMM             TID      DELAY    PREV COMM        PREV TID";

/// Decodes events from the ring buffer, prints them and tallies culprits.
struct Printer<'a> {
    symbols: Option<&'a SymbolsLater>,
    clock: WallClock,
    format: Format,
    culprits: Culprits,
    events: u64,
}

impl Printer<'_> {
    fn print(&mut self, e: &RunqEvent) -> Result<()> {
        let stack = &e.stack[..(e.stack_len as usize).min(e.stack.len())];
        let wait = SlowWait {
            time: self.clock.format(e.ts_ns),
            cpu: e.cpu,
            comm: text::comm(&e.comm),
            pid: e.tgid,
            tid: e.tid,
            delay_ns: e.delay_ns,
            prev_comm: text::comm(&e.prev_comm),
            prev_pid: e.prev_tgid,
            prev_tid: e.prev_tid,
            stack: kallsyms::symbolize_stack(stack, self.symbols.and_then(SymbolsLater::text)),
        };
        self.events += 1;
        self.culprits.add(&wait);
        output::record(|| match self.format {
            Format::Text => wait.to_text(),
            Format::Json => format!("{}\n", wait.to_json()),
        });
        Ok(())
    }
}

/// One wait over the threshold.
pub struct SlowWait {
    pub time: String,
    pub cpu: u32,
    pub comm: String,
    pub pid: u32,
    pub tid: u32,
    pub delay_ns: u64,
    pub prev_comm: String,
    pub prev_pid: u32,
    pub prev_tid: u32,
    /// The culprit's kernel stack at switch-out, innermost first.
    pub stack: Vec<(u64, Option<String>)>,
}

#[derive(Serialize)]
struct SlowWaitJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: &'a str,
    cpu: u32,
    comm: &'a str,
    pid: u32,
    tid: u32,
    delay_ns: u64,
    prev_comm: &'a str,
    prev_pid: u32,
    prev_tid: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    prev_stack: Vec<crate::report::FrameJson>,
}

impl SlowWait {
    pub fn to_json(&self) -> String {
        serde_json::to_string(&SlowWaitJson {
            kind: "runq_wait",
            time: &self.time,
            cpu: self.cpu,
            comm: &self.comm,
            pid: self.pid,
            tid: self.tid,
            delay_ns: self.delay_ns,
            prev_comm: &self.prev_comm,
            prev_pid: self.prev_pid,
            prev_tid: self.prev_tid,
            prev_stack: frames_json(&self.stack),
        })
        .expect("wait serializes")
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{:<27} {:>3} {:<16} {:<8} {:>7}  {:<16} {}\n",
            self.time,
            self.cpu,
            self.comm,
            self.tid,
            format_ns(self.delay_ns),
            self.prev_comm,
            self.prev_tid
        );
        for (addr, symbol) in &self.stack {
            match symbol {
                Some(s) => out += &format!("    {s}\n"),
                None => out += &format!("    {addr:#x}\n"),
            }
        }
        out
    }
}

/// The row of culprits beyond `MAX_CULPRITS`.
const OTHER_CULPRITS: &str = "[other tasks]";

/// Delays summed per culprit (the task that ran before the waiter).
#[derive(Default)]
pub struct Culprits {
    by_task: HashMap<(u32, String), CulpritRow>,
}

/// One culprit's share of the slow waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CulpritRow {
    pub comm: String,
    pub pid: u32,
    pub tid: u32,
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// The CPU of the longest wait.
    pub max_cpu: u32,
}

#[derive(Serialize)]
struct CulpritJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    prev_comm: &'a str,
    prev_pid: u32,
    prev_tid: u32,
    count: u64,
    total_ns: u64,
    max_ns: u64,
    max_cpu: u32,
}

impl CulpritRow {
    pub fn to_json(&self) -> String {
        serde_json::to_string(&CulpritJson {
            kind: "culprit",
            prev_comm: &self.comm,
            prev_pid: self.pid,
            prev_tid: self.tid,
            count: self.count,
            total_ns: self.total_ns,
            max_ns: self.max_ns,
            max_cpu: self.max_cpu,
        })
        .expect("culprit serializes")
    }
}

impl Culprits {
    pub fn add(&mut self, w: &SlowWait) {
        let mut key = (w.prev_tid, w.prev_comm.clone());
        if self.by_task.len() >= MAX_CULPRITS && !self.by_task.contains_key(&key) {
            key = (0, OTHER_CULPRITS.into());
        }
        let row = self.by_task.entry(key).or_insert_with_key(|(tid, comm)| CulpritRow {
            comm: comm.clone(),
            pid: if *tid == 0 { 0 } else { w.prev_pid },
            tid: *tid,
            count: 0,
            total_ns: 0,
            max_ns: 0,
            max_cpu: w.cpu,
        });
        row.count += 1;
        row.total_ns += w.delay_ns;
        if w.delay_ns > row.max_ns {
            row.max_ns = w.delay_ns;
            row.max_cpu = w.cpu;
        }
    }

    /// Rows by total delay, largest first (ties by tid, for stable output).
    pub fn rows(&self) -> Vec<CulpritRow> {
        let mut rows: Vec<CulpritRow> = self.by_task.values().cloned().collect();
        rows.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.tid.cmp(&b.tid)));
        rows
    }
}

/// The totals of one run.
pub struct Summary {
    pub threshold_ns: u64,
    pub attach: String,
    pub store: String,
    pub seconds: f64,
    pub events: u64,
    pub lost_no_start: u64,
    pub lost_events: u64,
    /// Waits measured but not printed (stdout too slow, or queued at the end).
    pub unprinted: u64,
}

#[derive(Serialize)]
struct SummaryJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    command: &'static str,
    attach: &'a str,
    store: &'a str,
    threshold_ns: u64,
    seconds: f64,
    waits: u64,
    lost: u64,
    lost_untimed: u64,
    lost_undelivered: u64,
    unprinted: u64,
}

impl Summary {
    pub fn lost(&self) -> u64 {
        self.lost_no_start + self.lost_events
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&SummaryJson {
            kind: "summary",
            command: "runqslower",
            attach: &self.attach,
            store: &self.store,
            threshold_ns: self.threshold_ns,
            seconds: (self.seconds * 1000.0).round() / 1000.0,
            waits: self.events,
            lost: self.lost(),
            lost_untimed: self.lost_no_start,
            lost_undelivered: self.lost_events,
            unprinted: self.unprinted,
        })
        .expect("summary serializes")
    }
}

/// The end-of-run text: culprits by total delay, then the totals.
pub fn summary_text(s: &Summary, rows: &[CulpritRow]) -> String {
    let mut out = String::new();
    if !rows.is_empty() {
        out += &format!(
            "\nWaits over {} by the task that held the CPU before (culprit), largest total first:\n",
            format_ns(s.threshold_ns)
        );
        out += &format!(
            "  {:<16} {:>8} {:>8} {:>6} {:>9} {:>9} {:>4}\n",
            "PREV COMM", "PREV PID", "PREV TID", "WAITS", "TOTAL", "MAX", "CPU"
        );
        for r in rows.iter().take(TEXT_CULPRITS) {
            out += &format!(
                "  {:<16} {:>8} {:>8} {:>6} {:>9} {:>9} {:>4}\n",
                r.comm,
                r.pid,
                r.tid,
                r.count,
                format_ns(r.total_ns),
                format_ns(r.max_ns),
                r.max_cpu
            );
        }
        if rows.len() > TEXT_CULPRITS {
            out += &format!("  … and {} more (--format json lists all)\n", rows.len() - TEXT_CULPRITS);
        }
    }
    out +=
        &format!("runqslower [{}] {:.1}s: {} waits over {}", s.attach, s.seconds, s.events, format_ns(s.threshold_ns));
    if s.lost() > 0 {
        out +=
            &format!(", LOST {} ({} wakeups untimed, {} waits undelivered)", s.lost(), s.lost_no_start, s.lost_events);
    }
    if s.unprinted > 0 {
        out += &format!(", {} waits not printed (stdout too slow, or still queued at the end)", s.unprinted);
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(cpu: u32, delay_ns: u64, prev: (&str, u32)) -> SlowWait {
        SlowWait {
            time: "2026-11-22T11:34:23.123456Z".into(),
            cpu,
            comm: "nginx".into(),
            pid: 100,
            tid: 101,
            delay_ns,
            prev_comm: prev.0.into(),
            prev_pid: prev.1,
            prev_tid: prev.1,
            stack: Vec::new(),
        }
    }

    #[test]
    fn culprits_beyond_the_cap_share_one_row() {
        let mut c = Culprits::default();
        for tid in 1..=(MAX_CULPRITS as u32 + 10) {
            c.add(&wait(0, 1_000_000, ("task", tid)));
        }
        let rows = c.rows();
        assert_eq!(rows.len(), MAX_CULPRITS + 1);
        let other = rows.iter().find(|r| r.comm == OTHER_CULPRITS).expect("an other row");
        assert_eq!(other.count, 10);
        assert_eq!(rows.iter().map(|r| r.count).sum::<u64>(), MAX_CULPRITS as u64 + 10, "no wait is dropped");
    }

    #[test]
    fn culprits_are_summed_and_sorted_by_total() {
        let mut c = Culprits::default();
        c.add(&wait(39, 91_000_000, ("telegraf", 7)));
        c.add(&wait(2, 60_000_000, ("gzip", 9)));
        c.add(&wait(2, 55_000_000, ("gzip", 9)));
        c.add(&wait(38, 52_000_000, ("telegraf", 7)));
        let rows = c.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].comm, "telegraf");
        assert_eq!(
            (rows[0].count, rows[0].total_ns, rows[0].max_ns, rows[0].max_cpu),
            (2, 143_000_000, 91_000_000, 39)
        );
        assert_eq!((rows[1].comm.as_str(), rows[1].total_ns), ("gzip", 115_000_000));
    }

    #[test]
    fn wait_text_and_json() {
        let mut w = wait(39, 91_000_000, ("telegraf", 7));
        w.stack = vec![(0xffffffff81a00410, Some("__schedule+0x10".into())), (0x1, None)];
        assert_eq!(
            w.to_text(),
            "2026-11-22T11:34:23.123456Z  39 nginx            101       91.0ms  telegraf         7\n    __schedule+0x10\n    0x1\n"
        );
        let v: serde_json::Value = serde_json::from_str(&w.to_json()).unwrap();
        assert_eq!(v["type"], "runq_wait");
        assert_eq!(v["delay_ns"], 91_000_000);
        assert_eq!(v["prev_tid"], 7);
        assert_eq!(v["prev_comm"], "telegraf");
        assert_eq!(v["prev_stack"][0]["symbol"], "__schedule+0x10");
        let v: serde_json::Value = serde_json::from_str(&wait(1, 1, ("a", 1)).to_json()).unwrap();
        assert!(v.get("prev_stack").is_none(), "no stack field without --stacks");
    }

    #[test]
    fn summary_names_the_culprit_and_the_losses() {
        let mut c = Culprits::default();
        c.add(&wait(39, 91_000_000, ("telegraf", 7)));
        let s = Summary {
            threshold_ns: 50_000_000,
            attach: "tp_btf".into(),
            store: "task-storage".into(),
            seconds: 10.0,
            events: 1,
            lost_no_start: 2,
            lost_events: 1,
            unprinted: 0,
        };
        let text = summary_text(&s, &c.rows());
        assert_eq!(
            text,
            "\nWaits over 50.0ms by the task that held the CPU before (culprit), largest total first:
  PREV COMM        PREV PID PREV TID  WAITS     TOTAL       MAX  CPU
  telegraf                7        7      1    91.0ms    91.0ms   39
runqslower [tp_btf] 10.0s: 1 waits over 50.0ms, LOST 3 (2 wakeups untimed, 1 waits undelivered)\n"
        );
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["lost"], 3);
        let v: serde_json::Value = serde_json::from_str(&c.rows()[0].to_json()).unwrap();
        assert_eq!(v["type"], "culprit");
        assert_eq!(v["total_ns"], 91_000_000);
    }
}
