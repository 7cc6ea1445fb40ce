//! `latprobe merge FILE…`: one host per file, one table per function (or
//! stage): each host's count and percentiles, the sick hosts first (by
//! p99.9), and the merged distribution of all of them. Merging adds bucket
//! counts, so the merged percentiles are those of every call on every host,
//! never an average of percentiles.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::{
    cli::MergeArgs,
    duration::format_ns,
    hdr_codec,
    histogram::{Latencies, QUANTILES},
    merge_input::{self, HostFile},
    output,
    report::{Format, SummaryJson},
};

/// Most files one merge reads.
pub const MAX_FILES: usize = 4096;
/// Most (series, host) rows one merge holds.
const MAX_ROWS: usize = 16_384;

/// One series across hosts.
struct Series {
    hosts: Vec<(String, Latencies)>,
    merged: Latencies,
}

pub async fn run(args: MergeArgs) -> Result<()> {
    ensure!(
        args.files.len() <= MAX_FILES,
        "at most {MAX_FILES} files can be merged at once ({} given)",
        args.files.len()
    );
    // Counted as the files are read: each histogram held costs tens of KiB,
    // so the bound must stop the reading, not follow it.
    let (mut files, mut rows) = (Vec::new(), 0usize);
    for path in &args.files {
        let file = merge_input::read(path)?;
        rows += file.series.len();
        ensure!(
            rows <= MAX_ROWS,
            "over {MAX_ROWS} histograms across the files: at most that many can be merged at once"
        );
        files.push(file);
    }
    name_hosts_uniquely(&mut files, &args.files);
    let mut out = String::new();
    for (name, series) in by_series(files)? {
        out += &match args.format {
            Format::Text => to_text(&name, &series),
            Format::Json => to_json(&name, &series),
        };
    }
    output::report(out);
    Ok(())
}

/// Two files of the same name in different directories stay two hosts:
/// they are then named by their whole path.
fn name_hosts_uniquely(files: &mut [HostFile], paths: &[std::path::PathBuf]) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for f in files.iter() {
        *seen.entry(f.host.clone()).or_default() += 1;
    }
    for (f, path) in files.iter_mut().zip(paths) {
        if seen[&f.host] > 1 {
            f.host = crate::output::text::printable(&path.display().to_string()).into_owned();
        }
    }
}

/// Regroups host files by series, hosts sorted by p99.9 (then count), worst first.
fn by_series(files: Vec<HostFile>) -> Result<BTreeMap<String, Series>> {
    let mut all: BTreeMap<String, Series> = BTreeMap::new();
    for file in files {
        for (name, latencies) in file.series {
            let series = all.entry(name).or_insert_with(|| Series { hosts: Vec::new(), merged: Latencies::new() });
            let exact = latencies.exact_totals();
            series.merged.merge(latencies.hdr(), exact)?;
            series.hosts.push((file.host.clone(), latencies));
        }
    }
    let p999 = QUANTILES[3].0;
    for series in all.values_mut() {
        series.hosts.sort_by(|(a_host, a), (b_host, b)| {
            (b.quantile_ns(p999), b.count()).cmp(&(a.quantile_ns(p999), a.count())).then_with(|| a_host.cmp(b_host))
        });
    }
    Ok(all)
}

/// The quantiles a merge table shows: p50, p99, p99.9.
const SHOWN: [usize; 3] = [0, 2, 3];

fn to_text(name: &str, series: &Series) -> String {
    let width = series.hosts.iter().map(|(h, _)| h.chars().count()).max().unwrap_or(4).clamp(6, 40);
    let hosts = series.hosts.len();
    let mut out =
        format!("{name}: {hosts} host{}, {} in all\n", if hosts == 1 { "" } else { "s" }, series.merged.count());
    out += &format!("  {:<width$} {:>12} {:>9} {:>9} {:>9} {:>9}\n", "host", "count", "p50", "p99", "p99.9", "max");
    let row = |host: &str, l: &Latencies| {
        let q = SHOWN.map(|i| format_ns(l.quantile_ns(QUANTILES[i].0)));
        format!("  {host:<width$} {:>12} {:>9} {:>9} {:>9} {:>9}\n", l.count(), q[0], q[1], q[2], format_ns(l.max_ns()))
    };
    for (host, l) in &series.hosts {
        out += &row(host, l);
    }
    out += &row("merged", &series.merged);
    out.push('\n');
    out
}

#[derive(Serialize)]
struct MergeJson<'a> {
    /// `host` for each host's row, `histogram` for the merged one.
    #[serde(rename = "type")]
    kind: &'static str,
    function: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    period: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hosts: Option<usize>,
    #[serde(flatten)]
    summary: SummaryJson,
    /// The merged histogram, so merges can be merged again (regions, then the world).
    #[serde(skip_serializing_if = "Option::is_none")]
    hdr: Option<String>,
}

fn json_line(function: &str, host: Option<&str>, hosts: Option<usize>, l: &Latencies) -> String {
    let merged = host.is_none();
    let json = MergeJson {
        kind: if merged { "histogram" } else { "host" },
        function,
        host,
        period: merged.then_some("merged"),
        hosts,
        summary: SummaryJson::of(l),
        hdr: merged.then(|| hdr_codec::encode(l.hdr())),
    };
    serde_json::to_string(&json).expect("merge row serializes") + "\n"
}

fn to_json(name: &str, series: &Series) -> String {
    let mut out = String::new();
    for (host, l) in &series.hosts {
        out += &json_line(name, Some(host), None, l);
    }
    out + &json_line(name, None, Some(series.hosts.len()), &series.merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, values: &[u64]) -> HostFile {
        HostFile { host: name.into(), series: [("net_rx_action".to_string(), Latencies::of(values))].into() }
    }

    /// The sick host first, and the merged row holds every call of both.
    #[test]
    fn hosts_sorted_by_p999_and_merged_exactly() {
        let mut slow = vec![1_000_000u64; 990];
        slow.extend([30_000_000; 10]);
        let files = vec![host("web-01", &[1_000_000; 3000]), host("web-02", &slow)];
        let all = by_series(files).unwrap();
        let s = &all["net_rx_action"];
        assert_eq!(s.hosts[0].0, "web-02", "the host with the worse p99.9 is on top");
        assert_eq!(s.merged.count(), 4000);
        assert_eq!(s.merged.max_ns(), 30_000_000);
        // 10 slow calls of 4000: p99.9 is slow (the 3996th value), p99 is not.
        assert_eq!(s.merged.quantile_ns(0.999), 30_000_000);
        assert!(s.merged.quantile_ns(0.99) < 1_010_000);
        let text = to_text("net_rx_action", s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "net_rx_action: 2 hosts, 4000 in all");
        assert!(lines[2].starts_with("  web-02 ") && lines[2].contains(" 30.0ms"), "{text}");
        assert!(lines[4].starts_with("  merged ") && lines[4].contains(" 4000 "), "{text}");
        let json: Vec<serde_json::Value> =
            to_json("net_rx_action", s).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(json[2]["type"], "histogram");
        assert_eq!(json[2]["period"], "merged");
        assert_eq!(json[2]["hosts"], 2);
        assert_eq!(json[2]["count"], 4000);
        assert_eq!(hdr_codec::decode(json[2]["hdr"].as_str().unwrap()).unwrap().len(), 4000);
    }
}
