//! Following a key's answers as any instance stores them: the settle
//! script's `done` message carries each one, and the in-process copies are
//! kept in step with it.
//!
//! A follower is a waiter that never leaves: it holds a [`KeyWatch`] on the
//! key's channels (shared with the waits of that key) for as long as it
//! lives, so the subscriber connection keeps them subscribed, re-subscribes
//! them after a reconnection, and wakes the follower then; a wake-up that
//! brings no `done` message (a keyspace notification, a reconnection, when
//! messages may have been lost) makes it look at the value itself.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::health::Link;
use super::keys::KeyLayout;
use super::scripts::{self, Settling};
use super::store;
use super::subscriptions::KeyWatch;
use crate::cache::{Cached, ENTRY_ID_LEN, MemoryCache};
use crate::coalesce::Following;
use crate::query::CacheKey;

/// The in-process copies of what Redis holds (entries, remembered failures),
/// and the lifetimes given to stored ones that have no expiry.
#[derive(Clone)]
pub(super) struct Copies {
    /// Entries: hits while Redis is up (when allowed), and everything this
    /// process knows while Redis is down.
    pub(super) memory: MemoryCache,
    /// Failures remembered in process, served only while Redis is down
    /// (while it is up, Redis is asked: a paid answer may replace them).
    pub(super) errors: MemoryCache,
    pub(super) value_ttl: Duration,
    pub(super) negative_ttl: Duration,
}

impl Copies {
    /// Reads an entry found in Redis (and keeps the in-process copy);
    /// `None` for an unreadable one.
    pub(super) fn found_value(&self, key: &CacheKey, payload: &[u8], pttl: i64) -> Option<Cached> {
        let time_left = scripts::time_left(pttl, self.value_ttl)?;
        match store::decode_value(payload, time_left) {
            Ok(cached) => {
                self.memory.insert(key.clone(), cached.clone());
                Some(cached)
            }
            Err(err) => {
                tracing::warn!(key = key.short(), error = %err, "unreadable cache entry ignored");
                None
            }
        }
    }

    /// Reads a failure remembered in Redis; `None` for an unreadable one.
    pub(super) fn found_error(&self, key: &CacheKey, payload: &[u8], pttl: i64) -> Option<Cached> {
        let time_left = scripts::time_left(pttl, self.negative_ttl)?;
        match store::decode_error(payload, time_left) {
            Ok(cached) => {
                self.errors.insert(key.clone(), cached.clone());
                Some(cached)
            }
            Err(err) => {
                tracing::warn!(key = key.short(), error = %err, "unreadable remembered error ignored");
                None
            }
        }
    }

    /// Reads a settle's `done` message (what it stored, for how long).
    pub(super) fn settled(&self, key: &CacheKey, message: &[u8]) -> Option<Cached> {
        let settled = scripts::parse_settled(message)?;
        match settled.settling {
            Settling::Value => self.found_value(key, settled.payload, settled.pttl),
            Settling::Error => self.found_error(key, settled.payload, settled.pttl),
        }
    }
}

/// One follower of a key (see the module's documentation).
pub(super) struct RedisFollowing {
    pub(super) key: CacheKey,
    pub(super) watch: KeyWatch,
    pub(super) link: Link,
    pub(super) layout: KeyLayout,
    pub(super) copies: Copies,
    /// The last `done` message handed out (the watch keeps the latest one).
    pub(super) last_done: Option<Arc<Vec<u8>>>,
    /// The id of the last entry handed out, so that one found by a look is
    /// not handed out again when its own `done` message follows.
    pub(super) last_id: Option<String>,
}

impl RedisFollowing {
    /// A `done` message not handed out yet, if the watch has one.
    fn new_done(&self) -> Option<Arc<Vec<u8>>> {
        self.watch.settled().filter(|done| {
            !self
                .last_done
                .as_ref()
                .is_some_and(|last| Arc::ptr_eq(last, done))
        })
    }

    /// `cached` unless it is the entry handed out last.
    fn unless_seen(&mut self, cached: Cached) -> Option<Cached> {
        if let Cached::Value(entry) = &cached {
            if self.last_id.as_deref() == Some(entry.id.as_str()) {
                return None;
            }
            self.last_id = Some(entry.id.clone());
        }
        Some(cached)
    }

    /// What Redis holds for the key now, unless it is what was handed out
    /// last (or Redis cannot be asked: the next wake-up looks again).
    async fn look(&mut self) -> Option<Cached> {
        let value = self.layout.value(&self.key);
        let mut look = redis::pipe();
        look.get(&value).pttl(&value);
        let (payload, pttl) = self.link.pipe::<(Option<Vec<u8>>, i64)>(&look).await.ok()?;
        let payload = payload?;
        // The id leads the value: an entry seen already is not decoded again.
        let id = payload.get(..ENTRY_ID_LEN)?;
        if self.last_id.as_deref().map(str::as_bytes) == Some(id) {
            return None;
        }
        let found = self.copies.found_value(&self.key, &payload, pttl)?;
        self.unless_seen(found)
    }
}

#[async_trait]
impl Following for RedisFollowing {
    async fn next(&mut self) -> Cached {
        loop {
            if let Some(done) = self.new_done() {
                self.last_done = Some(Arc::clone(&done));
                if let Some(cached) = self.copies.settled(&self.key, &done)
                    && let Some(cached) = self.unless_seen(cached)
                {
                    return cached;
                }
                continue;
            }
            // Forget wake-ups so far, then check once more: a message that
            // came in between is not missed.
            self.watch.mark_seen();
            if self.new_done().is_some() {
                continue;
            }
            self.watch.changed().await;
            if self.new_done().is_none()
                && let Some(cached) = self.look().await
            {
                return cached;
            }
        }
    }
}
