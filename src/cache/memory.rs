use std::time::Duration;

use moka::sync::Cache;

use super::entry::Cached;
use crate::query::CacheKey;

/// A bounded in-process cache in which every item lives exactly until its
/// own `expires_at` (answers and remembered errors expire differently), on
/// this process's monotonic clock.
#[derive(Clone)]
pub struct MemoryCache {
    items: Cache<CacheKey, Cached>,
}

struct UntilExpiry;

impl moka::Expiry<CacheKey, Cached> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Cached,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(
            value
                .expires_at()
                .saturating_duration_since(tokio::time::Instant::now()),
        )
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        value: &Cached,
        updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

impl MemoryCache {
    pub fn new(max_bytes: u64) -> MemoryCache {
        let items = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, value: &Cached| match value {
                Cached::Value(entry) => {
                    u32::try_from(entry.approximate_bytes()).unwrap_or(u32::MAX)
                }
                Cached::Error(_) => 256,
            })
            .expire_after(UntilExpiry)
            .build();
        MemoryCache { items }
    }

    /// The item for `key` unless it has expired. moka evicts lazily, so the
    /// expiry is checked here too: an entry is never served past its time.
    pub fn get(&self, key: &CacheKey) -> Option<Cached> {
        self.items.get(key).filter(Cached::is_live)
    }

    pub fn insert(&self, key: CacheKey, item: Cached) {
        if item.is_live() {
            self.items.insert(key, item);
        }
    }

    pub fn remove(&self, key: &CacheKey) {
        self.items.invalidate(key);
    }
}
