//! Who calls the BI for a key, and how everyone else gets the answer.
//!
//! Two layers, both keyed by [`CacheKey`]:
//! - [`Flights`]: inside one process, identical misses share one flight; the
//!   first request leads it, the rest follow. Always on.
//! - a [`Coordinator`]: the store behind the flights and, across processes,
//!   who produces each key. [`LocalCoordinator`] is the embedded mode (the
//!   process is the whole world); [`RedisCoordinator`] spans instances.
//!
//! The producing task of a flight (in `aggregate.rs`) runs the protocol:
//! **try, then call, then wait**. It looks up and tries the lock of every key
//! once ([`Coordinator::try_lead`], one round trip), calls the BI at once for
//! the keys it won, and waits for each key it lost on its own
//! ([`Coordinator::wait`]); a key whose holder goes away is tried again in a
//! follow-up round.
//!
//! # Invariants
//!
//! Each one is shown by tests that fire concurrent requests at several real
//! instances and count BI calls (`ARCHITECTURE.md` names them).
//!
//! 1. **One BI call per key per cache lifetime.** Inside a process a key has
//!    at most one flight; across processes at most one holder of its lock.
//! 2. **At most one extra BI call per key per single fault**: a dead leader,
//!    a lost lock, a Redis pause, restart or dropped connection.
//! 3. **No lock is held while waiting.** A producing task holds only the
//!    locks of keys whose BI call it is making; it never waits for another
//!    holder while holding one.
//! 4. **Every wait has a deadline**: the latest deadline of the requests
//!    waiting on the flight ([`Deadline`]), and for a Redis wait also the
//!    lock's remaining time, after which the key is tried again.
//! 5. **Only the owner renews or releases a lock**, by its token; one token
//!    per decision, so a retried command that had landed counts as a win.
//!    The fill writes when the lock is its own or gone (a paid answer is
//!    never thrown away) and skips only when another token holds it.
//! 6. **An error is never cached as a success**, and never overwrites a
//!    success another leader stored.

mod deadline;
mod flights;
pub mod invalidation;
mod local;
pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

pub use deadline::Deadline;
pub use flights::{FlightLead, FlightWatch, Flights, Joined, Origin, Resolved};
pub use invalidation::{InvalidationMode, InvalidationScope, Invalidations, Verdict};
pub use local::LocalCoordinator;
pub use redis::{RedisCoordinator, RedisSettings};

use crate::cache::{AnswerError, Cached, Entry};
use crate::query::CacheKey;

/// The right to produce one key's answer: whoever holds a lease calls the BI
/// and then either [`Coordinator::fill`]s or [`Coordinator::fail`]s it.
pub struct Lease {
    pub key: CacheKey,
    pub kind: LeaseKind,
    /// The entry (its id) this lease was taken to replace: a refresh.
    pub replaces: Option<String>,
    /// The invalidation generation the answer is produced under (taken
    /// before the BI is asked: an invalidation during the call reaches it).
    pub generation: u64,
    /// Dropped with the lease: stops whatever keeps the lease alive.
    pub keep_alive: Option<Box<dyn Send + Sync>>,
}

/// One key a producing task wants an answer for.
#[derive(Debug, Clone)]
pub struct Want {
    pub key: CacheKey,
    /// The id of the entry to replace (a refresh of a stale or invalidated
    /// entry); `None` for a miss. The store's entry counts as the answer
    /// unless it is this one.
    pub replaces: Option<String>,
}

/// What a lease stands on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseKind {
    /// The process is the whole world (embedded mode).
    InProcess,
    /// A distributed lock held with this owner token.
    Locked { token: String },
    /// No lock could be taken (the shared store is down): other instances
    /// may produce the same key. Answers produced so say they are degraded.
    Uncoordinated,
}

impl Lease {
    pub fn is_degraded(&self) -> bool {
        self.kind == LeaseKind::Uncoordinated
    }
}

/// What one try for a key's lead came to.
pub enum Decision {
    /// This process produces the answer.
    Lead(Lease),
    /// The answer (another entry than the one to replace, perhaps stale
    /// itself) or a remembered error is there, or the key may not be
    /// produced now (the BI's cool-down).
    Settled(Cached),
    /// Another producer holds the key's lock: wait with [`Coordinator::wait`].
    Busy,
    /// The store could not be asked before the deadline.
    Failed(AnswerError),
}

/// How a wait for another producer ended.
pub enum Waited {
    Settled(Cached),
    /// The lock is gone without an answer (its holder died, or lost it):
    /// try to lead the key again.
    HolderGone,
    /// The deadline passed.
    Failed(AnswerError),
}

/// The store of answers and, across processes, the election of one producer
/// per key. Apart from `peek`, it is called by the producing task of a
/// flight, once per key at a time per process.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// What process memory holds for `key` (an entry, fresh or not, before
    /// a remembered error), without I/O or waiting.
    fn peek(&self, key: &CacheKey) -> Option<Cached>;

    /// The invalidations this process knows of (kept in step with the store).
    fn invalidations(&self) -> &Arc<Invalidations>;

    /// Looks each key up and, where there is no answer (or only the entry to
    /// replace), tries once to become its producer: one round trip where the
    /// store allows. Only the store's own failures are retried, until
    /// `deadline`.
    async fn try_lead(&self, wants: &[Want], deadline: Instant) -> Vec<Decision>;

    /// Waits for the producer that holds `key` to settle it or go away.
    /// The entry `replaces` (what the producer was asked to replace: a
    /// refresh's, an evicted one) is not an answer.
    async fn wait(&self, key: &CacheKey, replaces: Option<&str>, deadline: &Deadline) -> Waited;

    /// Stores the producer's answer and gives up the lease, in one step.
    async fn fill(&self, lease: Lease, entry: Arc<Entry>);

    /// Remembers the producer's failure for the negative-cache time (or the
    /// BI's `Retry-After`) and gives up the lease.
    async fn fail(&self, lease: Lease, error: AnswerError);

    /// Gives up the lease without storing anything (the BI was not asked).
    async fn abandon(&self, lease: Lease);

    /// The BI asked to be left alone for `period` (a 429): no producer that
    /// shares this store takes a lead before it has passed.
    async fn cool_down(&self, period: Duration);
}

/// Answers as they are stored for a key, by this process or, with a shared
/// store, by any instance: how a live panel learns of a refresh another
/// instance made without asking the store again.
#[async_trait]
pub trait Announcements: Send + Sync + 'static {
    /// Starts following `key`: [`Following::next`] gives each answer stored
    /// for it from now on, until the [`Following`] is dropped.
    async fn follow(&self, key: &CacheKey) -> Box<dyn Following>;
}

/// The answers stored for one followed key.
#[async_trait]
pub trait Following: Send {
    /// The next answer stored for the key (an entry, or a remembered
    /// failure); waits for it. Where announcements may have been missed (a
    /// reconnection to the store), it is what the store holds then. An
    /// answer may come more than once: callers compare entry ids.
    async fn next(&mut self) -> Cached;
}

/// The store is unreachable for an operation that needs it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the shared store is unavailable")]
pub struct StoreUnavailable;

/// Records invalidations, shared by all instances when the store is shared.
#[async_trait]
pub trait Invalidator: Send + Sync + 'static {
    /// Makes every entry of `scope` produced before now stale (or gone), on
    /// every instance within a second. Returns the invalidation's generation.
    async fn invalidate(
        &self,
        scope: &InvalidationScope,
        mode: InvalidationMode,
    ) -> Result<u64, StoreUnavailable>;
}

/// Documents of automatic persisted queries, by SHA-256, shared by all
/// instances when the store is shared (the caller keeps a bounded copy).
#[async_trait]
pub trait DocumentStore: Send + Sync + 'static {
    async fn load_document(&self, hash: &str) -> Option<String>;
    async fn save_document(&self, hash: &str, document: &str);
}

/// Fixed-window counters for quotas, shared by all instances when the store
/// is shared.
#[async_trait]
pub trait Counters: Send + Sync + 'static {
    /// Adds `amount` to the counter `name` in the current fixed window of
    /// length `window`. Returns the window's total so far and the time left
    /// in the window.
    async fn count(&self, name: &str, amount: u64, window: Duration) -> (u64, Duration);
}

/// How the shared store is doing, for readiness reports.
pub trait StoreHealth: Send + Sync + 'static {
    fn describe(&self) -> CoordinatorStatus;
}

/// The capabilities of one backend, handed out separately: the aggregator
/// gets the coordinator, the dataloader the counters, the HTTP layer the
/// health, the invalidator and the persisted documents, live panels the
/// announcements.
pub struct Backend {
    pub coordinator: Arc<dyn Coordinator>,
    pub counters: Arc<dyn Counters>,
    pub health: Arc<dyn StoreHealth>,
    pub invalidator: Arc<dyn Invalidator>,
    pub documents: Arc<dyn DocumentStore>,
    pub announcements: Arc<dyn Announcements>,
}

impl Backend {
    pub fn of<T>(backend: T) -> Backend
    where
        T: Coordinator + Counters + StoreHealth + Invalidator + DocumentStore + Announcements,
    {
        let backend = Arc::new(backend);
        Backend {
            coordinator: Arc::clone(&backend) as Arc<dyn Coordinator>,
            counters: Arc::clone(&backend) as Arc<dyn Counters>,
            health: Arc::clone(&backend) as Arc<dyn StoreHealth>,
            invalidator: Arc::clone(&backend) as Arc<dyn Invalidator>,
            documents: Arc::clone(&backend) as Arc<dyn DocumentStore>,
            announcements: backend,
        }
    }
}

/// Fixed-window counters in process memory: the embedded store of
/// [`Counters`], and the fallback of shared ones.
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
    /// The Redis deployment: `single`, `cluster`, `sentinel`; `none` embedded.
    pub redis_mode: &'static str,
    /// The Redis nodes known (a cluster's nodes, a Sentinel-managed primary).
    pub redis_nodes: Vec<String>,
    /// Those of them unreachable (or that the cluster marks failing).
    pub redis_unreachable: Vec<String>,
    /// How waiters learn of answers: `keyspace` notifications, `sharded`
    /// channels (a cluster), `polling`, or `in-process`.
    pub notifications: &'static str,
}
