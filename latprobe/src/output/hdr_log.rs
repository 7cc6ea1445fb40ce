//! `--hdr-log FILE`: the standard HdrHistogram V2 interval log, one tagged
//! entry per function (or stage, or key) per interval, written by the
//! `hdrhistogram` crate's own log writer so HdrHistogram's tools read it.
//!
//! Values are nanoseconds (so the `Interval_Max` column is too). Entries
//! cover consecutive, non-overlapping intervals from the moment tracing
//! started (the log's `BaseTime`): summed, they are the whole run, which is
//! what `latprobe merge` does with them.
//!
//! The file is opened before any probe is attached (a bad path fails at
//! once), written as the run goes, and named only when the run ends (see
//! `files`). A write that fails stops the log, not the run: the reports
//! still print, and the run then fails naming the log.

use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use hdrhistogram::serialization::{
    interval_log::{IntervalLogWriterBuilder, Tag},
    V2DeflateSerializer,
};

use super::{files::OutputFile, text};
use crate::histogram::Latencies;

/// The column names HdrHistogram's own tools write after the header.
const LEGEND: &str = "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n";

/// An interval log being written.
pub struct HdrLog {
    file: OutputFile,
    serializer: V2DeflateSerializer,
    /// When tracing started, once it has.
    started: Option<Instant>,
    /// Where the previous interval ended, counted from `started`.
    written_to: Duration,
    /// Why the log stopped, when a write failed.
    failure: Option<String>,
}

/// The name of a series in logs and in `merge`: the function (or stage),
/// with its key in brackets when it has one (`runqlat[cpu=3]`). Tags cannot
/// hold commas, spaces or line breaks; those, and anything unprintable,
/// become `_`.
pub fn series_tag(function: &str, key: Option<&str>) -> String {
    let name = match key {
        Some(key) => format!("{function}[{key}]"),
        None => function.to_string(),
    };
    text::printable(&name).chars().map(|c| if matches!(c, ',' | ' ' | '\r' | '\n') { '_' } else { c }).collect()
}

impl HdrLog {
    /// Opens the log's file; call before attaching anything.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OutputFile::create(path).context("--hdr-log")?;
        Ok(Self {
            file,
            serializer: V2DeflateSerializer::new(),
            started: None,
            written_to: Duration::ZERO,
            failure: None,
        })
    }

    /// Writes the header, as tracing starts: what ran, and when.
    pub fn begin(&mut self, what: &str) {
        self.started = Some(Instant::now());
        let now = SystemTime::now();
        let result = IntervalLogWriterBuilder::new()
            .add_comment(&format!("latprobe {}: {}", env!("CARGO_PKG_VERSION"), text::printable(what)))
            .add_comment("values in nanoseconds")
            .with_start_time(now)
            .with_base_time(now)
            .begin_log_with(&mut self.file, &mut self.serializer)
            .map(drop)
            .and_then(|()| self.file.write_all(LEGEND.as_bytes()));
        if let Err(e) = result {
            self.fail(e.to_string());
        }
    }

    /// Adds one entry per series for the time since the previous call (or
    /// since `begin`): each series' counts over exactly that interval.
    pub fn interval(&mut self, series: &[(String, Latencies)]) {
        let Some(started) = self.started else { return };
        let now = started.elapsed();
        let (start, length) = (self.written_to, now.saturating_sub(self.written_to));
        self.written_to = now;
        for (tag, latencies) in series {
            if self.failure.is_some() {
                return;
            }
            let result = IntervalLogWriterBuilder::new()
                .begin_log_with(&mut self.file, &mut self.serializer)
                .map_err(|e| e.to_string())
                .and_then(|mut log| {
                    log.write_histogram(latencies.hdr(), start, length, Tag::new(tag)).map_err(|e| e.to_string())
                });
            if let Err(e) = result {
                self.fail(e);
            }
        }
    }

    fn fail(&mut self, why: String) {
        super::warn(&format!(
            "--hdr-log {}: {why}; the log stops here (the reports are not affected)",
            text::printable(&self.file.path().display().to_string())
        ));
        self.failure = Some(why);
    }

    /// Adds the last interval's entries (up to the end of tracing) and names
    /// the finished log; call after the final reports: fails if the log is
    /// not whole.
    pub fn end(mut self, last: &[(String, Latencies)]) -> Result<()> {
        self.interval(last);
        self.finish()
    }

    fn finish(self) -> Result<()> {
        let path = self.file.path().display().to_string();
        if let Some(why) = self.failure {
            bail!("--hdr-log {}: not written ({why})", text::printable(&path));
        }
        self.file.commit(b"").with_context(|| format!("--hdr-log {}", text::printable(&path)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    #[test]
    fn tags_are_valid_and_keep_their_key() {
        assert_eq!(series_tag("net_rx_action", None), "net_rx_action");
        assert_eq!(series_tag("runqlat", Some("cpu=3")), "runqlat[cpu=3]");
        assert_eq!(series_tag("/opt/my app,1:main", None), "/opt/my_app_1:main");
        assert!(Tag::new(&series_tag("a\nb\r c,d", Some("x y"))).is_some());
    }

    #[test]
    fn the_crate_reads_back_what_was_written() {
        let dir = std::env::temp_dir().join(format!("latprobe-hdrlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.hlog");
        let mut log = HdrLog::create(&path).unwrap();
        log.begin("fn do_nanosleep");
        let first = Latencies::of(&[5_000_000, 5_000_000]);
        let second = Latencies::of(&[1_000]);
        log.interval(&[("do_nanosleep".to_string(), first), ("runqlat[cpu=0]".to_string(), second.clone())]);
        log.end(&[("do_nanosleep".to_string(), second)]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("#latprobe "), "{text}");
        assert!(text.contains(LEGEND), "{text}");
        let mut intervals = Vec::new();
        let mut times = 0;
        for entry in IntervalLogIterator::new(&bytes) {
            match entry.unwrap() {
                LogEntry::Interval(h) => intervals.push((
                    h.tag().map(|t| t.as_str().to_string()),
                    crate::hdr_codec::decode(h.encoded_histogram()).unwrap().len(),
                    h.start_timestamp(),
                )),
                LogEntry::StartTime(_) | LogEntry::BaseTime(_) => times += 1,
            }
        }
        assert_eq!(times, 2);
        let summary: Vec<_> = intervals.iter().map(|(t, n, _)| (t.clone().unwrap(), *n)).collect();
        assert_eq!(summary, [("do_nanosleep".into(), 2), ("runqlat[cpu=0]".into(), 1), ("do_nanosleep".into(), 1)]);
        assert!(intervals[2].2 >= intervals[0].2, "intervals follow each other");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
