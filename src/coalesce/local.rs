//! The embedded coordinator: one process, an in-memory store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    Coordinator, CoordinatorStatus, Counters, Deadline, Decision, Lease, LeaseKind, LocalCounters,
    StoreHealth, Waited,
};
use crate::cache::{AnswerError, Cached, Entry, MemoryCache, NegativeEntry};
use crate::query::CacheKey;

/// With one process, the in-process flights already make each key's producer
/// unique, so `try_lead` leads unless the answer has just arrived.
pub struct LocalCoordinator {
    memory: MemoryCache,
    negative_ttl: Duration,
    counters: LocalCounters,
}

impl LocalCoordinator {
    pub fn new(max_bytes: u64, negative_ttl: Duration) -> LocalCoordinator {
        LocalCoordinator {
            memory: MemoryCache::new(max_bytes),
            negative_ttl,
            counters: LocalCounters::default(),
        }
    }
}

#[async_trait]
impl Coordinator for LocalCoordinator {
    fn peek(&self, key: &CacheKey) -> Option<Cached> {
        self.memory.get(key)
    }

    async fn try_lead(&self, keys: &[CacheKey], _deadline: Instant) -> Vec<Decision> {
        keys.iter()
            .map(|key| match self.memory.get(key) {
                // The previous flight for this key may have filled it between
                // the caller's lookup and its flight starting.
                Some(cached) => Decision::Settled(cached),
                None => Decision::Lead(Lease {
                    key: key.clone(),
                    kind: LeaseKind::InProcess,
                    keep_alive: None,
                }),
            })
            .collect()
    }

    async fn wait(&self, _key: &CacheKey, _deadline: &Deadline) -> Waited {
        // Nobody else holds keys here; never reached through `try_lead`.
        Waited::HolderGone
    }

    async fn fill(&self, lease: Lease, entry: Arc<Entry>) {
        self.memory.insert(lease.key, Cached::Value(entry));
    }

    async fn fail(&self, lease: Lease, error: AnswerError) {
        let negative = NegativeEntry::new(error, self.negative_ttl);
        self.memory
            .insert(lease.key, Cached::Error(Arc::new(negative)));
    }

    async fn abandon(&self, _lease: Lease) {}

    async fn cool_down(&self, _period: Duration) {
        // The aggregator's own cool-down is the whole world's here.
    }
}

#[async_trait]
impl Counters for LocalCoordinator {
    async fn count(&self, name: &str, amount: u64, window: Duration) -> (u64, Duration) {
        self.counters.count(name, amount, window)
    }
}

impl StoreHealth for LocalCoordinator {
    fn describe(&self) -> CoordinatorStatus {
        CoordinatorStatus {
            mode: "in-process",
            redis: "not_configured",
            notifications: "in-process",
        }
    }
}
