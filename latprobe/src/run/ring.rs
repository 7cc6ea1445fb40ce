//! Reading records of one type from a BPF ring buffer, a bounded number at a
//! time: a producer faster than the reader (an outlier flood) must never keep
//! the run from seeing its deadline or a signal.

use std::{marker::PhantomData, time::Instant};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{MapData, RingBuf},
    Ebpf, Pod,
};
use tokio::io::unix::AsyncFd;

/// Records handled per wake-up before the run looks at its clock and signals.
pub const BATCH: usize = 1024;

/// A ring buffer of `T` records written by latprobe's programs.
pub struct Ring<T> {
    fd: AsyncFd<RingBuf<MapData>>,
    /// The last drain stopped at its limit: records are waiting.
    backlog: bool,
    _record: PhantomData<T>,
}

impl<T> Ring<T> {
    /// Resolves when records are waiting. Cancel-safe.
    pub async fn ready(&mut self) -> Result<()> {
        if self.backlog {
            // Let the runtime poll its drivers first: a task that is never
            // pending starves the timer and signal drivers, and the
            // deadline or Ctrl-C would never be seen.
            tokio::task::yield_now().await;
            return Ok(());
        }
        let mut guard = self.fd.readable_mut().await.context("waiting on a ring buffer")?;
        // Cleared before draining: a record that lands during the drain
        // raises readiness again instead of being missed.
        guard.clear_ready();
        Ok(())
    }
}

impl<T: Pod> Ring<T> {
    /// Takes map `name` out of `ebpf`.
    pub fn take(ebpf: &mut Ebpf, name: &str) -> Result<Self> {
        let map = ebpf.take_map(name).with_context(|| format!("map {name} is missing from the embedded object"))?;
        let ring = RingBuf::try_from(map).with_context(|| format!("map {name}"))?;
        // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd
        // until both drop together.
        let fd = unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow!("polling ring buffer {name}: {e}"))?;
        Ok(Self { fd, backlog: false, _record: PhantomData })
    }

    /// Hands at most `limit` records to `each`; returns how many.
    pub fn drain(&mut self, limit: usize, mut each: impl FnMut(T) -> Result<()>) -> Result<usize> {
        let mut n = 0;
        while n < limit {
            let Some(record) = self.next() else {
                self.backlog = false;
                return Ok(n);
            };
            each(record)?;
            n += 1;
        }
        self.backlog = true;
        Ok(n)
    }

    /// After detaching: hands records to `each` until `deadline`, then
    /// discards the rest. Returns how many were discarded.
    pub fn drain_until(&mut self, deadline: Instant, mut each: impl FnMut(T) -> Result<()>) -> Result<u64> {
        while Instant::now() < deadline {
            if self.drain(BATCH, &mut each)? < BATCH {
                return Ok(0);
            }
        }
        let mut discarded = 0;
        while self.next().is_some() {
            discarded += 1;
        }
        Ok(discarded)
    }

    fn next(&mut self) -> Option<T> {
        loop {
            let item = self.fd.get_mut().next()?;
            if item.len() < size_of::<T>() {
                // Never written by our programs: skip rather than misread.
                continue;
            }
            // SAFETY: `T` is Pod (any bytes are a valid value) and the record
            // holds at least size_of::<T>() bytes; read unaligned since the
            // ring buffer aligns records to 8 bytes only.
            return Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) });
        }
    }
}
