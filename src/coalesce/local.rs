//! The embedded coordinator: one process, an in-memory store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::{
    Announcements, Coordinator, CoordinatorStatus, Counters, Deadline, Decision, DocumentStore,
    Following, InvalidationMode, InvalidationScope, Invalidations, Invalidator, Lease, LeaseKind,
    LocalCounters, StoreHealth, StoreUnavailable, Waited, Want,
};
use crate::cache::{AnswerError, Cached, Entry, MemoryCache, NegativeEntry};
use crate::query::CacheKey;

/// One process, one store: a key's lease is a slot in a map (a request's
/// flight and a background refresh of the same key are two flights, and
/// must not both call the BI).
pub struct LocalCoordinator {
    /// Keys being produced, and how their waiters learn that they are done.
    producing: Arc<Mutex<HashMap<CacheKey, Arc<Notify>>>>,
    /// Entries, fresh or stale, until their stale time ends.
    values: MemoryCache,
    /// Remembered failures, beside a stale entry a failed refresh left.
    errors: MemoryCache,
    negative_ttl: Duration,
    counters: LocalCounters,
    invalidations: Arc<Invalidations>,
    /// The last invalidation generation handed out.
    generation: std::sync::atomic::AtomicU64,
    /// The followed keys, each with the last answer stored for it.
    followers: Followers,
}

/// Followed keys: the last answer stored for each (a watch keeps only the
/// latest, so a slow follower costs no memory).
type Followers = Arc<Mutex<HashMap<CacheKey, watch::Sender<Option<Cached>>>>>;

impl LocalCoordinator {
    pub fn new(max_bytes: u64, negative_ttl: Duration) -> LocalCoordinator {
        LocalCoordinator {
            producing: Arc::default(),
            values: MemoryCache::new(max_bytes),
            errors: MemoryCache::new(max_bytes / 16 + 1),
            negative_ttl,
            counters: LocalCounters::default(),
            invalidations: Arc::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
            followers: Followers::default(),
        }
    }

    /// Tells the followers of `key` (if any) what was just stored for it.
    fn announce(&self, key: &CacheKey, cached: Cached) {
        let followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(followers) = followers.get(key) {
            followers.send_replace(Some(cached));
        }
    }
}

#[async_trait]
impl Coordinator for LocalCoordinator {
    fn peek(&self, key: &CacheKey) -> Option<Cached> {
        self.values.get(key).or_else(|| self.errors.get(key))
    }

    fn invalidations(&self) -> &Arc<Invalidations> {
        &self.invalidations
    }

    async fn try_lead(&self, wants: &[Want], _deadline: Instant) -> Vec<Decision> {
        wants
            .iter()
            .map(|want| {
                // The previous flight for this key may have filled it between
                // the caller's look and its flight starting.
                let value = self.values.get(&want.key).filter(|cached| match cached {
                    Cached::Value(entry) => want.replaces.as_deref() != Some(entry.id.as_str()),
                    Cached::Error(_) => false,
                });
                if let Some(cached) = value.or_else(|| self.errors.get(&want.key)) {
                    return Decision::Settled(cached);
                }
                let mut producing = self.producing.lock().unwrap_or_else(|p| p.into_inner());
                if producing.contains_key(&want.key) {
                    return Decision::Busy;
                }
                producing.insert(want.key.clone(), Arc::new(Notify::new()));
                Decision::Lead(Lease {
                    key: want.key.clone(),
                    kind: LeaseKind::InProcess,
                    replaces: want.replaces.clone(),
                    generation: self.invalidations.current(),
                    keep_alive: Some(Box::new(Producing {
                        key: want.key.clone(),
                        producing: Arc::clone(&self.producing),
                    })),
                })
            })
            .collect()
    }

    async fn wait(&self, key: &CacheKey, replaces: Option<&str>, deadline: &Deadline) -> Waited {
        let done = self
            .producing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        if let Some(done) = done {
            let notified = done.notified();
            tokio::pin!(notified);
            // Registered before looking again: a lease given back in
            // between still wakes this waiter.
            notified.as_mut().enable();
            let still = self
                .producing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(key)
                .is_some_and(|current| Arc::ptr_eq(current, &done));
            if still
                && tokio::time::timeout_at(deadline.get(), notified)
                    .await
                    .is_err()
            {
                return Waited::Failed(AnswerError::unavailable(
                    "waited for the key's producer until the request's deadline",
                ));
            }
        }
        let value = self.values.get(key).filter(|cached| match cached {
            Cached::Value(entry) => replaces != Some(entry.id.as_str()),
            Cached::Error(_) => false,
        });
        match value.or_else(|| self.errors.get(key)) {
            Some(cached) => Waited::Settled(cached),
            None => Waited::HolderGone,
        }
    }

    async fn fill(&self, lease: Lease, entry: Arc<Entry>) {
        self.errors.remove(&lease.key);
        self.values
            .insert(lease.key.clone(), Cached::Value(Arc::clone(&entry)));
        self.announce(&lease.key, Cached::Value(entry));
    }

    async fn fail(&self, lease: Lease, error: AnswerError) {
        // A stale entry a failed refresh leaves stays servable beside it.
        let negative = Cached::Error(Arc::new(NegativeEntry::new(error, self.negative_ttl)));
        self.errors.insert(lease.key.clone(), negative.clone());
        self.announce(&lease.key, negative);
    }

    async fn abandon(&self, _lease: Lease) {}

    async fn cool_down(&self, _period: Duration) {
        // The aggregator's own cool-down is the whole world's here.
    }
}

/// A key's lease, given back when dropped (after its fill or failure is
/// stored, or with a producer that went away): its waiters look again.
struct Producing {
    key: CacheKey,
    producing: Arc<Mutex<HashMap<CacheKey, Arc<Notify>>>>,
}

impl Drop for Producing {
    fn drop(&mut self) {
        let done = self
            .producing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        if let Some(done) = done {
            done.notify_waiters();
        }
    }
}

#[async_trait]
impl Announcements for LocalCoordinator {
    async fn follow(&self, key: &CacheKey) -> Box<dyn Following> {
        let mut followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let stored = followers
            .entry(key.clone())
            .or_insert_with(|| watch::channel(None).0);
        Box::new(LocalFollowing {
            key: key.clone(),
            stored: stored.subscribe(),
            followers: Arc::clone(&self.followers),
        })
    }
}

/// One follower of a key in this process; the key is forgotten with its
/// last follower.
struct LocalFollowing {
    key: CacheKey,
    stored: watch::Receiver<Option<Cached>>,
    followers: Followers,
}

#[async_trait]
impl Following for LocalFollowing {
    async fn next(&mut self) -> Cached {
        loop {
            if self.stored.changed().await.is_err() {
                // The sender lives as long as a follower does: unreachable.
                std::future::pending::<()>().await;
            }
            if let Some(cached) = self.stored.borrow_and_update().clone() {
                return cached;
            }
        }
    }
}

impl Drop for LocalFollowing {
    fn drop(&mut self) {
        let mut followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        // This receiver is still counted: it is the last when it is alone.
        if followers
            .get(&self.key)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            followers.remove(&self.key);
        }
    }
}

#[async_trait]
impl Counters for LocalCoordinator {
    async fn count(&self, name: &str, amount: u64, window: Duration) -> (u64, Duration) {
        self.counters.count(name, amount, window)
    }
}

#[async_trait]
impl Invalidator for LocalCoordinator {
    async fn invalidate(
        &self,
        scope: &InvalidationScope,
        mode: InvalidationMode,
    ) -> Result<u64, StoreUnavailable> {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1;
        self.invalidations.record(&scope.field(), mode, generation);
        Ok(generation)
    }
}

#[async_trait]
impl DocumentStore for LocalCoordinator {
    // The caller's own bounded copy is the whole store here.
    async fn load_document(&self, _hash: &str) -> Option<String> {
        None
    }

    async fn save_document(&self, _hash: &str, _document: &str) {}
}

impl StoreHealth for LocalCoordinator {
    fn describe(&self) -> CoordinatorStatus {
        CoordinatorStatus {
            mode: "in-process",
            redis: "not_configured",
            redis_mode: "none",
            redis_nodes: Vec::new(),
            redis_unreachable: Vec::new(),
            notifications: "in-process",
        }
    }
}
