//! `--listen ADDR:PORT`: serves `/metrics` while a run goes, in the
//! OpenMetrics text format Prometheus scrapes.
//!
//! The measuring loop never waits on a scrape: it publishes an immutable
//! [`Exposition`] (bucket counts, not whole HDR histograms) at each
//! interval and every [`REFRESH`], and the server, on a thread and runtime
//! of its own, encodes whichever one is current when a request comes. Every
//! exposition holds cumulative values since tracing started, as Prometheus
//! counters and histograms must.

mod address;
mod exposition;
mod server;

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use tokio::sync::watch;

pub use address::ListenAddr;
pub use exposition::{Counter, Exposition, Series};

use crate::{cost::Cost, output};

/// How often a command publishes its histograms while listening: what a
/// scrape sees is at most this old.
pub const REFRESH: Duration = Duration::from_millis(500);

/// The period of a command's poll: `REFRESH` when listening, else the
/// command's own, if any.
pub fn poll_period(exporter: Option<&Exporter>, own: Option<Duration>) -> Option<Duration> {
    match (exporter, own) {
        (Some(_), Some(own)) => Some(own.min(REFRESH)),
        (Some(_), None) => Some(REFRESH),
        (None, own) => own,
    }
}

/// The running `/metrics` endpoint; what it serves is what was last published.
pub struct Exporter {
    current: watch::Sender<Arc<Exposition>>,
}

impl Exporter {
    /// Binds `addr` (call before attaching anything: a port in use fails at
    /// once) and starts serving an empty exposition.
    pub fn start(addr: &ListenAddr) -> Result<Exporter> {
        let listener = addr.bind()?;
        let (current, latest) = watch::channel(Arc::new(Exposition::default()));
        let bound = server::spawn(listener, latest)?;
        output::say(&format!("serving metrics on http://{bound}/metrics"));
        Ok(Exporter { current })
    }

    /// Makes `series` and `counters` (cumulative since the start) and the
    /// programs' cost so far what the next scrape sees.
    pub fn publish(&self, series: &[Series], counters: &[Counter], cost: Option<&Cost>) {
        self.current.send_replace(Arc::new(Exposition::of(series, counters, cost)));
    }
}
