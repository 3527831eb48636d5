//! The embedded coordinator: one process, an in-memory store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Coordinator, CoordinatorStatus, LeadOrWait, Lease, LocalCounters, Origin};
use crate::cache::{AnswerError, Cached, Entry, MemoryCache, NegativeEntry};
use crate::query::CacheKey;

/// With one process, the in-process flights already make each key's producer
/// unique, so `lead_or_wait` leads unless the answer has just arrived.
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

    async fn lookup(&self, keys: &[CacheKey]) -> Vec<Option<Cached>> {
        keys.iter().map(|key| self.memory.get(key)).collect()
    }

    async fn lead_or_wait(&self, key: &CacheKey, _deadline: Instant) -> LeadOrWait {
        // The previous flight for this key may have filled it between the
        // caller's lookup and its flight starting.
        if let Some(cached) = self.memory.get(key) {
            return LeadOrWait::Settled {
                cached,
                origin: Origin::Found,
            };
        }
        LeadOrWait::Lead(Lease {
            key: key.clone(),
            token: String::new(),
            keep_alive: None,
        })
    }

    async fn fill(&self, lease: Lease, entry: Arc<Entry>) {
        self.memory.insert(lease.key, Cached::Value(entry));
    }

    async fn fail(&self, lease: Lease, error: AnswerError) {
        let negative = NegativeEntry::new(error, self.negative_ttl);
        self.memory
            .insert(lease.key, Cached::Error(Arc::new(negative)));
    }

    async fn count(&self, name: &str, amount: u64, window: Duration) -> (u64, Duration) {
        self.counters.count(name, amount, window)
    }

    fn is_degraded(&self) -> bool {
        false
    }

    fn describe(&self) -> CoordinatorStatus {
        CoordinatorStatus {
            mode: "in-process",
            redis: "not_configured",
            notifications: "in-process",
        }
    }
}
