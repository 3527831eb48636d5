//! The names of everything the gateway keeps in Redis, built in one place.
//!
//! `{ns}:v3:{<hash>}:value`, `{ns}:v3:{<hash>}:error`, `{ns}:v3:{<hash>}:lock`, channel
//! `{ns}:v3:{<hash>}:done`, `{ns}:v3:bi-cooldown`,
//! `{ns}:v3:count:<name>:<window>`, `{ns}:v3:probe:<instance>`. The hash tag keeps a key's value, lock
//! and channel in one cluster slot. The version changes whenever what a key
//! holds does, so gateways of two versions never read each other's entries.

use crate::query::CacheKey;

/// The layout version: bumped when an entry's encoding or the lock protocol changes.
const VERSION: &str = "v3";

#[derive(Debug, Clone)]
pub(super) struct KeyLayout {
    prefix: String,
    /// The database number, for keyspace channel names.
    db: i64,
    /// A Redis Cluster: channels are sharded (`SPUBLISH`/`SSUBSCRIBE`, which
    /// reach their slot's subscribers wherever they are connected), and
    /// keyspace notifications, node-local, are not used.
    sharded: bool,
}

impl KeyLayout {
    pub(super) fn new(namespace: &str, db: i64, sharded: bool) -> KeyLayout {
        KeyLayout {
            prefix: format!("{namespace}:{VERSION}"),
            db,
            sharded,
        }
    }

    /// A Redis Cluster's layout (sharded channels, no keyspace notifications).
    pub(super) fn sharded(&self) -> bool {
        self.sharded
    }

    /// The command that publishes on this layout's channels.
    pub(super) fn publish_command(&self) -> &'static str {
        if self.sharded { "spublish" } else { "publish" }
    }

    pub(super) fn value(&self, key: &CacheKey) -> String {
        format!("{}:{{{}}}:value", self.prefix, key.as_str())
    }

    pub(super) fn lock(&self, key: &CacheKey) -> String {
        format!("{}:{{{}}}:lock", self.prefix, key.as_str())
    }

    /// A remembered failure of `key`, beside its (perhaps stale) value.
    pub(super) fn error(&self, key: &CacheKey) -> String {
        format!("{}:{{{}}}:error", self.prefix, key.as_str())
    }

    pub(super) fn done_channel(&self, key: &CacheKey) -> String {
        format!("{}:{{{}}}:done", self.prefix, key.as_str())
    }

    /// Set while the BI asks every instance to back off (a 429); its `PTTL`
    /// is the time left.
    pub(super) fn cooldown(&self) -> String {
        format!("{}:bi-cooldown", self.prefix)
    }

    /// Written by an instance to learn whether Redis accepts writes again.
    pub(super) fn probe(&self, instance: &str) -> String {
        format!("{}:probe:{instance}", self.prefix)
    }

    pub(super) fn counter(&self, name: &str, window_index: u64) -> String {
        format!("{}:count:{name}:{window_index}", self.prefix)
    }

    fn keyspace_channel(&self, redis_key: &str) -> String {
        format!("__keyspace@{}__:{redis_key}", self.db)
    }

    /// The channels whose messages wake the waiters of `key`: the settle's
    /// own `done` message (which carries the answer) and, with keyspace
    /// notifications, any change to the value or the lock (a delete or an
    /// expiry of the lock means its holder is gone).
    pub(super) fn channels(&self, key: &CacheKey, keyspace: bool) -> Vec<String> {
        let mut channels = vec![self.done_channel(key)];
        if keyspace && !self.sharded {
            channels.push(self.keyspace_channel(&self.value(key)));
            channels.push(self.keyspace_channel(&self.lock(key)));
        }
        channels
    }

    /// Announces every invalidation (its generation); in the slot of the
    /// invalidation keys, so a cluster shards it with them.
    pub(super) fn invalidated_channel(&self) -> String {
        format!("{}:{{invalidations}}:announce", self.prefix)
    }

    /// The sequence of invalidation generations (one hash tag with
    /// [`KeyLayout::invalidations`]: both are written by one script).
    pub(super) fn invalidation_sequence(&self) -> String {
        format!("{}:{{invalidations}}:seq", self.prefix)
    }

    /// The latest generation of every invalidated scope, by mode
    /// (`stale|<scope>`, `evict|<scope>`).
    pub(super) fn invalidations(&self) -> String {
        format!("{}:{{invalidations}}:scopes", self.prefix)
    }

    /// An automatic persisted query's document, by its SHA-256.
    pub(super) fn persisted_query(&self, hash: &str) -> String {
        format!("{}:apq:{hash}", self.prefix)
    }
}

/// The hash inside a channel name's `{...}` hash tag: which key it is about.
pub(super) fn hash_of_channel(channel: &str) -> Option<&str> {
    let start = channel.find('{')? + 1;
    let end = start + channel[start..].find('}')?;
    Some(&channel[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_lead_back_to_their_key() {
        assert_eq!(
            hash_of_channel("__keyspace@0__:ag:v3:{abc123}:lock"),
            Some("abc123")
        );
        assert_eq!(hash_of_channel("ag:v3:{abc123}:done"), Some("abc123"));
        assert_eq!(hash_of_channel("nothing here"), None);
        let sharded = KeyLayout::new("ag", 0, true);
        let key = crate::query::CacheKey::for_tests("abc");
        assert_eq!(
            sharded.channels(&key, true).len(),
            1,
            "no keyspace channels in a cluster"
        );
    }
}
