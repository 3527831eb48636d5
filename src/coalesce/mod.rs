//! Who calls the BI for a key, and how everyone else gets the answer.
//!
//! Two layers, both keyed by [`CacheKey`]:
//! - [`Flights`]: inside one process, identical misses share one flight; the
//!   first request leads it, the rest follow. Always on.
//! - a [`Coordinator`]: the store behind the flights and, across processes,
//!   who produces each key. [`LocalCoordinator`] is the embedded mode (the
//!   process is the whole world); a Redis coordinator spans instances.
//!
//! Architecture invariant: every wait has a deadline, and every lead is
//! either completed or dropped, which wakes its followers with an error.

mod flights;
mod local;
pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

pub use flights::{FlightLead, FlightWatch, Flights, Joined, Origin, Resolved};
pub use local::LocalCoordinator;
pub use redis::{RedisCoordinator, RedisSettings};

use crate::cache::{AnswerError, Cached, Entry};
use crate::query::CacheKey;

/// The right to produce one key's answer: whoever holds a lease calls the BI
/// and then either [`Coordinator::fill`]s or [`Coordinator::fail`]s it.
pub struct Lease {
    pub key: CacheKey,
    /// The owner token of a distributed lock; empty in-process.
    pub token: String,
    /// Dropped with the lease: stops whatever keeps the lease alive.
    pub keep_alive: Option<Box<dyn Send + Sync>>,
}

/// The outcome of [`Coordinator::lead_or_wait`].
pub enum LeadOrWait {
    /// This process produces the answer.
    Lead(Lease),
    /// Somebody else's answer (or error) is there.
    Settled { cached: Cached, origin: Origin },
    /// Neither: the wait for another producer passed the deadline.
    Failed(AnswerError),
}

/// The interface between request handling and the store of answers.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// What process memory holds for `key`, without I/O or waiting.
    fn peek(&self, key: &CacheKey) -> Option<Cached>;

    /// Looks `keys` up in the store, in one round trip; `None` is a miss.
    async fn lookup(&self, keys: &[CacheKey]) -> Vec<Option<Cached>>;

    /// Becomes the producer of `key`, or waits (until `deadline`) for the
    /// one that is. Called once per key at a time per process.
    async fn lead_or_wait(&self, key: &CacheKey, deadline: Instant) -> LeadOrWait;

    /// Stores the producer's answer and gives up the lease, in one step.
    async fn fill(&self, lease: Lease, entry: Arc<Entry>);

    /// Remembers the producer's failure for the negative-cache time and
    /// gives up the lease.
    async fn fail(&self, lease: Lease, error: AnswerError);

    /// Adds `amount` to the counter `name` in the current fixed window of
    /// length `window` (shared by all instances when the store is shared).
    /// Returns the window's total so far and the time left in the window.
    async fn count(&self, name: &str, amount: u64, window: Duration) -> (u64, Duration);

    /// How the coordinator is doing, for readiness reports.
    fn describe(&self) -> CoordinatorStatus;

    /// Whether answers are coming from this process alone because the shared
    /// store is unreachable.
    fn is_degraded(&self) -> bool;
}

/// Fixed-window counters in process memory: the embedded store of
/// [`Coordinator::count`], and the fallback of shared ones.
#[derive(Default)]
pub struct LocalCounters {
    windows: Mutex<HashMap<String, (u64, u64)>>,
}

impl LocalCounters {
    pub fn count(&self, name: &str, amount: u64, window: Duration) -> (u64, Duration) {
        let (index, left) = window_position(window);
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        // Forget past windows now and then, so the map stays small.
        if windows.len() > 10_000 {
            windows.retain(|_, (at, _)| *at == index);
        }
        let slot = windows.entry(name.to_owned()).or_insert((index, 0));
        if slot.0 != index {
            *slot = (index, 0);
        }
        slot.1 += amount;
        (slot.1, left)
    }
}

/// The index of the current window of length `window`, and the time left in it.
pub fn window_position(window: Duration) -> (u64, Duration) {
    let window_ms = (window.as_millis() as u64).max(1);
    let now = crate::cache::unix_millis();
    (
        now / window_ms,
        Duration::from_millis(window_ms - now % window_ms),
    )
}

/// How a coordinator is doing, for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CoordinatorStatus {
    pub mode: &'static str,
    /// `up`, `down` or `not_configured`.
    pub redis: &'static str,
    /// How waiters learn of answers: `keyspace` notifications, `polling`, or `in-process`.
    pub notifications: &'static str,
}
