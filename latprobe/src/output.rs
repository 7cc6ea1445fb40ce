//! Writing results to stdout so that latprobe pipes well: line-buffered
//! records, and a closed pipe (`latprobe … | head`) ends the run quietly.

use std::io::{self, Write};

/// The reader of stdout went away; main exits 0 on it, as `cat` would.
#[derive(Debug)]
pub struct BrokenPipe;

impl std::fmt::Display for BrokenPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}

impl std::error::Error for BrokenPipe {}

/// Writes `text` to stdout and flushes, so each record reaches a pipe at once.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    let result = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(BrokenPipe.into()),
        other => Ok(other?),
    }
}
