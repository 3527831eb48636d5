//! What `/readyz` reports: the process's phase, and how the BI is doing.
//!
//! Readiness is about this process: it is ready while it can serve
//! anything, cached panels included, so a BI or Redis outage never takes the
//! whole fleet out of a load balancer at once. Only starting and shutting
//! down make it unready. The BI's state is reported beside it, from a
//! background probe (`GET /meta`), so that probes cost the BI nothing.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use crate::bi::BiClient;
use crate::telemetry::names;

/// How often the BI is probed, and how long one probe may take.
const BI_PROBE_EVERY: Duration = Duration::from_secs(5);
const BI_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Wiring its parts; not serving yet.
    Starting = 0,
    Serving = 1,
    /// Shutdown has begun: requests are still answered, new traffic should go elsewhere.
    Draining = 2,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "ready",
            Phase::Draining => "shutting_down",
        }
    }
}

/// The BI as the last probe found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BiState {
    /// No probe has finished yet.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

impl BiState {
    pub fn as_str(self) -> &'static str {
        match self {
            BiState::Unknown => "unknown",
            BiState::Up => "up",
            BiState::Down => "down",
        }
    }
}

/// Shared by `/readyz`, the BI probe and the shutdown sequence.
#[derive(Debug)]
pub struct Readiness {
    phase: AtomicU8,
    bi: AtomicU8,
}

impl Default for Readiness {
    fn default() -> Readiness {
        Readiness {
            phase: AtomicU8::new(Phase::Starting as u8),
            bi: AtomicU8::new(BiState::Unknown as u8),
        }
    }
}

impl Readiness {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }

    /// Ready: called when the server starts accepting.
    pub fn serving(&self) {
        // Never back from draining.
        let _ = self.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Serving as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Unready for good: called when shutdown begins.
    pub fn draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::Relaxed);
    }

    pub fn bi(&self) -> BiState {
        match self.bi.load(Ordering::Relaxed) {
            1 => BiState::Up,
            2 => BiState::Down,
            _ => BiState::Unknown,
        }
    }

    fn set_bi(&self, up: bool) {
        let now = if up { BiState::Up } else { BiState::Down };
        let was = self.bi.swap(now as u8, Ordering::Relaxed);
        if was != now as u8 {
            if up {
                tracing::info!("the BI answers its probe (GET /meta)");
            } else {
                tracing::warn!(
                    "the BI does not answer its probe (GET /meta): cached answers are still served"
                );
            }
        }
        metrics::gauge!(names::BI_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Probes the BI now and then every few seconds, for ever.
    pub async fn probe_bi_forever(self: std::sync::Arc<Self>, bi: BiClient) {
        loop {
            self.set_bi(bi.is_reachable(BI_PROBE_TIMEOUT).await);
            tokio::time::sleep(BI_PROBE_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_goes_forward_only() {
        let readiness = Readiness::default();
        assert_eq!(readiness.phase(), Phase::Starting);
        readiness.serving();
        assert_eq!(readiness.phase(), Phase::Serving);
        readiness.draining();
        readiness.serving();
        assert_eq!(readiness.phase(), Phase::Draining);
        assert_eq!(readiness.bi(), BiState::Unknown);
        readiness.set_bi(false);
        assert_eq!(readiness.bi(), BiState::Down);
    }
}
