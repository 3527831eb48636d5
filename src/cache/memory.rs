use std::time::{Duration, Instant};

use moka::sync::Cache;

use super::entry::{Cached, unix_millis};
use crate::query::CacheKey;

/// A bounded in-process cache in which every item lives exactly until its
/// own `expires_at` (answers and remembered errors expire differently).
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
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            value.expires_at_ms().saturating_sub(unix_millis()),
        ))
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        value: &Cached,
        updated_at: Instant,
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
        self.items
            .get(key)
            .filter(|item| item.expires_at_ms() > unix_millis())
    }

    pub fn insert(&self, key: CacheKey, item: Cached) {
        if item.expires_at_ms() > unix_millis() {
            self.items.insert(key, item);
        }
    }

    pub fn remove(&self, key: &CacheKey) {
        self.items.invalidate(key);
    }
}
