//! Reading what `latprobe merge` adds up: one file per host, either JSON
//! reports (`--format json` of `fn`, `runqlat`, `tcp`, or `merge` itself) or
//! an HdrHistogram interval log (`--hdr-log`, or any HdrHistogram tool's).
//!
//! These files come from other machines: every size is bounded (the file,
//! each line, each encoded histogram, the number of series), only regular
//! files are read (a FIFO or a device would hang or never end), and every
//! name read is made printable before it is shown.

use std::{collections::BTreeMap, fs::File, io::Read, os::unix::fs::OpenOptionsExt, path::Path};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use serde::Deserialize;

use crate::{hdr_codec, histogram::Latencies, output::hdr_log::series_tag, output::text};

/// Largest file read: a day of 1 s intervals for 8 functions fits.
pub const MAX_FILE_BYTES: u64 = 256 << 20;
/// Longest line: an encoded histogram and the fields around it.
const MAX_LINE_BYTES: usize = hdr_codec::MAX_ENCODED_BYTES + 4096;
/// Most series one file may hold.
pub const MAX_SERIES_PER_FILE: usize = 4096;

/// One host's histograms, by series name (`net_rx_action`, `runqlat[cpu=3]`).
pub struct HostFile {
    pub host: String,
    pub series: BTreeMap<String, Latencies>,
}

/// The host a file stands for: its name without the extension
/// (`web-07.json` → `web-07`).
pub fn host_name(path: &Path) -> String {
    let stem = path.file_stem().unwrap_or(path.as_os_str()).to_string_lossy();
    text::printable(&stem).into_owned()
}

/// Reads one host's file, whichever of the two kinds it is.
pub fn read(path: &Path) -> Result<HostFile> {
    let shown = text::printable(&path.display().to_string()).into_owned();
    let bytes = read_bounded(path).with_context(|| shown.clone())?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let series = match first {
        None => bail!("{shown}: empty"),
        Some(b'{') => from_json(&bytes),
        Some(_) => from_hdr_log(&bytes),
    }
    .with_context(|| shown.clone())?;
    ensure!(!series.is_empty(), "{shown}: no histograms (JSON needs `type: histogram` reports of period final)");
    Ok(HostFile { host: host_name(path), series })
}

/// The whole of a regular file, up to [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    // Non-blocking open: opening a FIFO with no writer must not hang.
    let file =
        File::options().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path).context("cannot open")?;
    let meta = file.metadata().context("cannot stat")?;
    ensure!(meta.is_file(), "not a regular file");
    ensure!(meta.len() <= MAX_FILE_BYTES, "{} MiB is over the limit of {} MiB", meta.len() >> 20, MAX_FILE_BYTES >> 20);
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).context("cannot read")?;
    ensure!(bytes.len() as u64 <= MAX_FILE_BYTES, "grew past the limit of {} MiB while read", MAX_FILE_BYTES >> 20);
    Ok(bytes)
}

/// Lines of at most [`MAX_LINE_BYTES`], numbered from 1.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, Result<&[u8]>)> {
    bytes.split(|&b| b == b'\n').enumerate().map(|(i, line)| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let checked = if line.len() > MAX_LINE_BYTES {
            Err(anyhow::anyhow!("line {}: longer than {MAX_LINE_BYTES} bytes", i + 1))
        } else {
            Ok(line)
        };
        (i + 1, checked)
    })
}

/// Adds `latencies` to `series[name]`, within [`MAX_SERIES_PER_FILE`].
fn add_series(
    series: &mut BTreeMap<String, Latencies>,
    name: String,
    decoded: &hdrhistogram::Histogram<u64>,
    exact: Option<(u64, u64, u64)>,
) -> Result<()> {
    if !series.contains_key(&name) {
        ensure!(series.len() < MAX_SERIES_PER_FILE, "more than {MAX_SERIES_PER_FILE} histograms");
    }
    series.entry(name).or_insert_with(Latencies::new).merge(decoded, exact)
}

/// The fields of a JSON report line that merging needs; other lines
/// (outliers, cost, losses) have none of them and are skipped.
#[derive(Deserialize, Default)]
#[serde(default)]
struct ReportLine {
    #[serde(rename = "type")]
    kind: String,
    period: String,
    function: String,
    key: Option<String>,
    count: u64,
    sum_ns: Option<u64>,
    min_ns: u64,
    max_ns: u64,
    hdr: Option<String>,
}

/// The final (or merged) histograms of a JSON report, summed per series: a
/// file holding several runs adds them up.
fn from_json(bytes: &[u8]) -> Result<BTreeMap<String, Latencies>> {
    let mut series = BTreeMap::new();
    for (n, line) in lines(bytes) {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let r: ReportLine = serde_json::from_slice(line).with_context(|| format!("line {n}: not a JSON report"))?;
        if r.kind != "histogram" || !matches!(r.period.as_str(), "final" | "merged") {
            continue;
        }
        let Some(encoded) = r.hdr else {
            bail!(
                "line {n}: a histogram without its `hdr` field (written by an older latprobe): rerun it with this one"
            );
        };
        let decoded = hdr_codec::decode(&encoded).with_context(|| format!("line {n}"))?;
        ensure!(
            decoded.len() == r.count,
            "line {n}: the histogram holds {} values but the report says {}",
            decoded.len(),
            r.count
        );
        let exact = r.sum_ns.filter(|_| r.count > 0 && r.min_ns <= r.max_ns).map(|sum| (sum, r.min_ns, r.max_ns));
        add_series(&mut series, series_tag(&r.function, r.key.as_deref()), &decoded, exact)?;
    }
    Ok(series)
}

/// Every interval of an HdrHistogram log, summed per tag: the intervals
/// follow each other, so their sum is the whole run.
fn from_hdr_log(bytes: &[u8]) -> Result<BTreeMap<String, Latencies>> {
    let mut series = BTreeMap::new();
    let mut line_buf = Vec::new();
    for (n, line) in lines(bytes) {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        // One line at a time: the parser's searches then never run past it.
        line_buf.clear();
        line_buf.extend_from_slice(line);
        line_buf.push(b'\n');
        let entry = match IntervalLogIterator::new(&line_buf).next() {
            None => continue,
            Some(Ok(entry)) => entry,
            Some(Err(_)) => {
                bail!("line {n}: neither a JSON report nor an HdrHistogram interval log line")
            }
        };
        let LogEntry::Interval(interval) = entry else { continue };
        let decoded = hdr_codec::decode(interval.encoded_histogram()).with_context(|| format!("line {n}"))?;
        let name = interval.tag().map_or("untagged".to_string(), |t| series_tag(t.as_str(), None));
        add_series(&mut series, name, &decoded, None)?;
    }
    Ok(series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::hdr_log::HdrLog;

    fn scratch(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("latprobe-merge-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn report_line(function: &str, values: &[u64]) -> String {
        let l = Latencies::of(values);
        crate::report::FunctionReport::final_of(function, &l).to_json()
    }

    #[test]
    fn json_reports_round_trip_with_exact_counts_and_extremes() {
        let dir = scratch("json");
        let path = dir.join("web-07.json");
        let text = format!(
            "{}\n{{\"type\":\"outlier\",\"function\":\"x\"}}\n{}\n",
            report_line("net_rx_action", &[1_000, 2_000, 3_000]),
            report_line("net_rx_action", &[40_000_000])
        );
        std::fs::write(&path, text).unwrap();
        let host = read(&path).unwrap();
        assert_eq!(host.host, "web-07");
        let l = &host.series["net_rx_action"];
        assert_eq!(l.count(), 4, "two runs in one file add up");
        assert_eq!((l.min_ns(), l.max_ns()), (1_000, 40_000_000));
        assert_eq!(l.sum_ns(), 40_006_000);
    }

    #[test]
    fn hdr_logs_round_trip_with_exact_counts() {
        let dir = scratch("hlog");
        let path = dir.join("db-1.hlog");
        let mut log = HdrLog::create(&path).unwrap();
        log.begin("test");
        log.interval(&[("runqlat[cpu=0]".into(), Latencies::of(&[5_000; 7]))]);
        log.end(&[("runqlat[cpu=0]".into(), Latencies::of(&[9_000_000; 3]))]).unwrap();
        let host = read(&path).unwrap();
        assert_eq!(host.host, "db-1");
        let l = &host.series["runqlat[cpu=0]"];
        assert_eq!(l.count(), 10);
        assert!((9_000_000..=9_070_000).contains(&l.max_ns()), "max within its bucket: {}", l.max_ns());
    }

    #[test]
    fn bad_input_fails_with_one_line() {
        let dir = scratch("bad");
        let check = |name: &str, body: &[u8], expect: &str| {
            let path = dir.join(name);
            std::fs::write(&path, body).unwrap();
            let e = format!("{:#}", read(&path).err().unwrap_or_else(|| panic!("{name} was accepted")));
            assert!(e.contains(expect), "{name}: {e}");
        };
        check("empty.json", b"", "empty");
        check("text.json", b"net_rx_action [fentry] final 1.0s: 3 calls\n", "neither a JSON report");
        check("nohdr.json", br#"{"type":"histogram","period":"final","function":"f","count":1}"#, "older latprobe");
        check("lies.json", report_line("f", &[1, 2]).replace("\"count\":2", "\"count\":5").as_bytes(), "says 5");
        check("noreports.json", br#"{"type":"outlier"}"#, "no histograms");
        check("long.hlog", &vec![b'x'; MAX_LINE_BYTES + 1], "longer than");
        let e = format!("{:#}", read(Path::new("/dev/null")).err().unwrap());
        assert!(e.contains("not a regular file"), "{e}");
        let e = format!("{:#}", read(&dir).err().unwrap());
        assert!(e.contains("not a regular file"), "{e}");
    }
}
