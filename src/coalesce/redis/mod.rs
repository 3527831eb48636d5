//! The distributed coordinator: a cache shared through Redis, and per key one
//! leader across all instances.
//!
//! - Leadership is `SET lock token NX PX ttl`, renewed while the BI call runs
//!   (only while the token still owns it).
//! - The leader stores its answer and releases the lock in one Lua script that
//!   writes only while it still owns the lock, and publishes on the key's
//!   `done` channel.
//! - Losers subscribe (one pub/sub connection per instance) to the value's and
//!   the lock's keyspace channels and the `done` channel, look again, then
//!   wait; every wait is bounded by the lock's remaining TTL, so a lost
//!   notification costs time, never correctness.
//! - When Redis fails, the coordinator degrades to in-process behaviour: it
//!   leads without a lock and serves from process memory, until Redis is back.
//!
//! Key layout (`ARCHITECTURE.md` has the full table):
//! `{ns}:v1:{<hash>}:value`, `{ns}:v1:{<hash>}:lock`, channel `{ns}:v1:{<hash>}:done`,
//! `{ns}:v1:bi-cooldown`. The hash tag keeps a key's value and lock in one
//! cluster slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

mod subscriptions;

use self::subscriptions::{KeyWatch, Subscriptions};
use super::{Coordinator, CoordinatorStatus, LeadOrWait, Lease, Origin};
use crate::cache::{
    AnswerError, AnswerErrorKind, Cached, Entry, MemoryCache, NegativeEntry, unix_millis,
};
use crate::query::CacheKey;
use crate::telemetry::names;

/// Everything the Redis coordinator is configured with.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub namespace: String,
    pub lock_ttl: Duration,
    pub command_timeout: Duration,
    /// Whether the gateway may `CONFIG SET notify-keyspace-events`.
    pub configure_notifications: bool,
    /// Whether hits may be served from process memory while Redis is up.
    pub local_cache: bool,
    pub memory_max_bytes: u64,
    pub negative_ttl: Duration,
    /// Written into lock tokens, so an operator can see who holds a lock.
    pub instance_id: String,
}

/// Why Redis could not be set up at all (a bad URL; an unreachable server is
/// not an error, it is degraded mode).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedisSetupError(String);

/// What the value key holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum Stored {
    Value(Entry),
    Error(NegativeEntry),
}

/// Stores `ARGV[2]` at `KEYS[2]` for `ARGV[3]` ms and deletes the lock
/// `KEYS[1]`, only while the lock still holds the owner token `ARGV[1]`; then
/// publishes on `ARGV[4]`. Returns 1 when it wrote, 0 when the lock was lost.
const FILL_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3])
  redis.call('del', KEYS[1])
  redis.call('publish', ARGV[4], 'done')
  return 1
end
return 0
";

/// What `settle` makes of a fill that succeeded on its second attempt.
const RETRIED: i64 = -1;

/// Extends the lock `KEYS[1]` to `ARGV[2]` ms while it holds token `ARGV[1]`.
const RENEW_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes the lock `KEYS[1]` only while it holds token `ARGV[1]`.
const RELEASE_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
";

/// Names of everything this coordinator keeps in Redis.
#[derive(Debug, Clone)]
struct KeyLayout {
    prefix: String,
    db: i64,
}

impl KeyLayout {
    fn value(&self, key: &CacheKey) -> String {
        format!("{}:{{{}}}:value", self.prefix, key.as_str())
    }
    fn lock(&self, key: &CacheKey) -> String {
        format!("{}:{{{}}}:lock", self.prefix, key.as_str())
    }
    fn done_channel(&self, key: &CacheKey) -> String {
        format!("{}:{{{}}}:done", self.prefix, key.as_str())
    }
    fn cooldown(&self) -> String {
        format!("{}:bi-cooldown", self.prefix)
    }
    fn counter(&self, name: &str, window_index: u64) -> String {
        format!("{}:count:{name}:{window_index}", self.prefix)
    }
    fn keyspace_channel(&self, redis_key: &str) -> String {
        format!("__keyspace@{}__:{redis_key}", self.db)
    }
    /// The channels whose messages wake the waiters of `key`.
    fn channels(&self, key: &CacheKey, keyspace: bool) -> Vec<String> {
        let mut channels = vec![self.done_channel(key)];
        if keyspace {
            channels.push(self.keyspace_channel(&self.value(key)));
            channels.push(self.keyspace_channel(&self.lock(key)));
        }
        channels
    }
}

/// Shared health flags, written by commands and by the pinger.
#[derive(Default)]
struct Health {
    up: AtomicBool,
    keyspace_notifications: AtomicBool,
    /// Failed commands since the last successful ping.
    failures: std::sync::atomic::AtomicU32,
}

/// A loaded process can miss one command's timeout without Redis being down:
/// degrade only after this many failures between two successful pings.
const FAILURES_BEFORE_DEGRADING: u32 = 3;

impl Health {
    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                tracing::info!("Redis is reachable: coordinating through Redis");
            } else {
                tracing::warn!("Redis is unreachable: degraded to in-process coalescing");
            }
        }
        metrics::gauge!(names::REDIS_UP).set(if up { 1.0 } else { 0.0 });
    }
    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
    fn command_failed(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= FAILURES_BEFORE_DEGRADING {
            self.set_up(false);
        }
    }
    fn ping_answered(&self, up: bool) {
        if up {
            self.failures.store(0, Ordering::Relaxed);
            self.set_up(true);
        } else {
            // A missed ping is one more failure, not an outage by itself.
            self.command_failed();
        }
    }
}

pub struct RedisCoordinator {
    commands: ConnectionManager,
    layout: KeyLayout,
    subscriptions: Arc<Subscriptions>,
    health: Arc<Health>,
    memory: MemoryCache,
    /// Counters while Redis is down: per instance, better than none.
    counters: super::LocalCounters,
    settings: RedisSettings,
    fill: Script,
    renew: Script,
    release: Script,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RedisCoordinator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RedisCoordinator {
    /// Sets up the connections without waiting for Redis: an unreachable
    /// Redis at start means degraded mode until it comes up.
    pub async fn start(settings: RedisSettings) -> Result<RedisCoordinator, RedisSetupError> {
        let info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|err| RedisSetupError(format!("not a usable Redis URL: {err}")))?;
        let db = info.redis_settings().db();
        let commands_client =
            redis::Client::open(info.clone()).map_err(|err| RedisSetupError(err.to_string()))?;
        let commands = ConnectionManager::new_lazy_with_config(
            commands_client,
            ConnectionManagerConfig::new()
                .set_response_timeout(Some(settings.command_timeout))
                .set_connection_timeout(Some(settings.command_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500)),
        )
        .map_err(|err| RedisSetupError(err.to_string()))?;

        // Subscriptions ride a RESP3 connection manager: it reconnects and
        // re-subscribes by itself, and delivers messages to `pushes`.
        let (push_tx, pushes) = mpsc::unbounded_channel::<PushInfo>();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let subscriber_client = redis::Client::open(info.set_redis_settings(resp3))
            .map_err(|err| RedisSetupError(err.to_string()))?;
        let subscriber = ConnectionManager::new_lazy_with_config(
            subscriber_client,
            ConnectionManagerConfig::new()
                .set_response_timeout(Some(settings.command_timeout))
                .set_connection_timeout(Some(settings.command_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500))
                .set_push_sender(push_tx)
                .set_automatic_resubscription(),
        )
        .map_err(|err| RedisSetupError(err.to_string()))?;

        let health = Arc::new(Health::default());
        let layout = KeyLayout {
            prefix: format!("{}:v1", settings.namespace),
            db,
        };
        let (subscriptions, subscription_tasks) =
            Subscriptions::start(subscriber.clone(), pushes, settings.command_timeout);
        let mut coordinator = RedisCoordinator {
            commands,
            layout,
            subscriptions,
            health: Arc::clone(&health),
            memory: MemoryCache::new(settings.memory_max_bytes),
            counters: super::LocalCounters::default(),
            settings,
            fill: Script::new(FILL_SCRIPT),
            renew: Script::new(RENEW_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            tasks: subscription_tasks,
        };
        coordinator.check_connection().await;
        coordinator.tasks.push(tokio::spawn(watch_health(
            coordinator.commands.clone(),
            subscriber,
            health,
            coordinator.settings.clone(),
        )));
        Ok(coordinator)
    }

    /// One PING at start, so that the first requests know where they stand.
    async fn check_connection(&self) {
        let up = ping(&mut self.commands.clone(), self.settings.command_timeout).await;
        self.health.ping_answered(up);
        if up {
            let keyspace = ensure_notifications(&mut self.commands.clone(), &self.settings).await;
            self.health
                .keyspace_notifications
                .store(keyspace, Ordering::Relaxed);
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.commands.clone()
    }

    /// Notes a failed Redis command: the next requests go straight to
    /// degraded mode until the pinger sees Redis again.
    fn redis_failed(&self, what: &str, err: &redis::RedisError) {
        tracing::warn!(error = %err, "Redis {what} failed");
        self.health.command_failed();
    }

    fn degraded_lease(&self, key: &CacheKey) -> Lease {
        Lease {
            key: key.clone(),
            token: String::new(),
            keep_alive: None,
        }
    }

    async fn try_lock(&self, key: &CacheKey) -> Result<Option<String>, redis::RedisError> {
        let token = format!(
            "{}:{}",
            self.settings.instance_id,
            uuid::Uuid::new_v4().simple()
        );
        let span = tracing::info_span!("redis.lock", lock.result = Empty);
        let reply: Option<String> = redis::cmd("SET")
            .arg(self.layout.lock(key))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(self.settings.lock_ttl.as_millis() as u64)
            .query_async(&mut self.conn())
            .instrument(span.clone())
            .await?;
        let won = reply.is_some();
        span.record("lock.result", if won { "won" } else { "lost" });
        metrics::counter!(names::LOCK_ATTEMPTS, "result" => if won { "won" } else { "lost" })
            .increment(1);
        Ok(won.then_some(token))
    }

    /// The value of `key` (if any) and the lock's remaining time (`None`: no lock).
    async fn value_and_lock(
        &self,
        key: &CacheKey,
    ) -> Result<(Option<Cached>, Option<Duration>), redis::RedisError> {
        let (value, pttl): (Option<Vec<u8>>, i64) = redis::pipe()
            .get(self.layout.value(key))
            .pttl(self.layout.lock(key))
            .query_async(&mut self.conn())
            .await?;
        let cached = value.and_then(|bytes| self.decode(key, &bytes));
        let lock = match pttl {
            -2 => None,
            // A lock without expiry is not ours to wait on forever.
            -1 => Some(self.settings.lock_ttl),
            ms => Some(Duration::from_millis(ms.max(0) as u64)),
        };
        Ok((cached, lock))
    }

    async fn get_value(&self, key: &CacheKey) -> Result<Option<Cached>, redis::RedisError> {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.layout.value(key))
            .query_async(&mut self.conn())
            .await?;
        Ok(value.and_then(|bytes| self.decode(key, &bytes)))
    }

    fn decode(&self, key: &CacheKey, bytes: &[u8]) -> Option<Cached> {
        let cached = match serde_json::from_slice::<Stored>(bytes) {
            Ok(Stored::Value(entry)) => Cached::Value(Arc::new(entry)),
            Ok(Stored::Error(negative)) => Cached::Error(Arc::new(negative)),
            Err(err) => {
                tracing::warn!(key = key.short(), error = %err, "unreadable cache entry ignored");
                return None;
            }
        };
        if cached.expires_at_ms() <= unix_millis() {
            return None;
        }
        self.memory.insert(key.clone(), cached.clone());
        Some(cached)
    }

    /// Keeps the lock alive while the BI call runs; stops when dropped or
    /// when the lock turns out to belong to someone else.
    fn spawn_renewal(&self, key: &CacheKey, token: &str) -> JoinHandle<()> {
        let mut conn = self.conn();
        let renew = self.renew.clone();
        let lock = self.layout.lock(key);
        let token = token.to_owned();
        let ttl = self.settings.lock_ttl;
        let short = key.short().to_owned();
        tokio::spawn(async move {
            let every = ttl / 3;
            loop {
                tokio::time::sleep(every).await;
                let renewed: Result<i64, _> = renew
                    .key(&lock)
                    .arg(&token)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async(&mut conn)
                    .await;
                match renewed {
                    Ok(1) => {}
                    Ok(_) => {
                        tracing::warn!(key = %short, "lost the lock during the BI call; another instance may call the BI too");
                        metrics::counter!(names::LOCKS_LOST).increment(1);
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(key = %short, error = %err, "could not renew the lock; retrying")
                    }
                }
            }
        })
    }

    /// Writes `stored` and releases the lease's lock, if it still owns it.
    async fn settle(&self, mut lease: Lease, stored: &Stored, ttl_ms: u64) {
        // Stop renewing first: a renewal racing the fill would find the lock
        // gone and report it lost.
        drop(lease.keep_alive.take());
        // Tried even while Redis is flagged down: we hold a lock, and the
        // script writes only if we still do; releasing it spares the others a
        // lock TTL of waiting.
        if lease.token.is_empty() {
            return;
        }
        let payload = match serde_json::to_vec(stored) {
            Ok(payload) => payload,
            Err(err) => {
                tracing::error!(error = %err, "could not encode a cache entry");
                return;
            }
        };
        let mut written = self.run_fill(&lease, &payload, ttl_ms).await;
        if let Err(err) = &written
            && self.health.is_up()
        {
            // Once more: the fill is conditional on the token, so a first
            // attempt that did land makes the second a harmless no-op.
            tracing::info!(error = %err, key = lease.key.short(), "storing the answer failed; trying once more");
            written = self
                .run_fill(&lease, &payload, ttl_ms)
                .await
                .map(|_| RETRIED);
        }
        match written {
            Ok(1) => {}
            // After a retry, either it stored the answer or the first attempt
            // had (and released the lock): a lost lock cannot be told apart.
            Ok(RETRIED) => {}
            Ok(_) => {
                tracing::warn!(
                    key = lease.key.short(),
                    "the lock was lost before the answer was stored; answering this instance's waiters only"
                );
                metrics::counter!(names::LOCKS_LOST).increment(1);
            }
            Err(err) => self.redis_failed("fill", &err),
        }
    }

    async fn run_fill(
        &self,
        lease: &Lease,
        payload: &[u8],
        ttl_ms: u64,
    ) -> redis::RedisResult<i64> {
        self.fill
            .key(self.layout.lock(&lease.key))
            .key(self.layout.value(&lease.key))
            .arg(&lease.token)
            .arg(payload)
            .arg(ttl_ms.max(1))
            .arg(self.layout.done_channel(&lease.key))
            .invoke_async(&mut self.conn())
            .await
    }

    async fn release(&self, key: &CacheKey, token: &str) {
        let released: Result<i64, _> = self
            .release
            .key(self.layout.lock(key))
            .arg(token)
            .invoke_async(&mut self.conn())
            .await;
        if let Err(err) = released {
            self.redis_failed("lock release", &err);
        }
    }

    /// Waits until the key's channels fire, `bound` passes, or `deadline` comes.
    async fn wait(&self, watch: &mut KeyWatch, bound: Duration, deadline: Instant) {
        let until = (Instant::now() + bound).min(deadline);
        let _ = tokio::time::timeout_at(until, watch.changed()).await;
    }

    /// The loop behind [`Coordinator::lead_or_wait`]: race for the lock; on
    /// losing, register for wake-ups, look again, and wait at most as long
    /// as the lock has left; on Redis trouble, retry briefly, then degrade.
    async fn decide(&self, key: &CacheKey, deadline: Instant) -> LeadOrWait {
        let mut watch: Option<KeyWatch> = None;
        let mut lost_race = false;
        let mut failing_since: Option<Instant> = None;
        let mut poll = Backoff::new();
        // Known down before anything was tried: degrade at once. Once racing
        // or watching a lock, only this waiter's own failing commands (for
        // longer than a lock TTL) make it give up: another request's timeout
        // must not make it abandon a lock that is still alive.
        if !self.health.is_up() {
            return LeadOrWait::Lead(self.degraded_lease(key));
        }
        loop {
            if Instant::now() >= deadline {
                return LeadOrWait::Failed(AnswerError::unavailable(
                    "waited for another instance's BI call until the request's deadline",
                ));
            }
            // After losing a race: look at the value and the lock, then wait.
            if let Some(watch) = watch.as_mut() {
                watch.mark_seen();
                match self.value_and_lock(key).await {
                    Ok((Some(cached), _)) => {
                        return LeadOrWait::Settled {
                            cached,
                            origin: Origin::Waited,
                        };
                    }
                    Ok((None, Some(lock_left))) => {
                        failing_since = None;
                        // Bounded by the lock's own time: if its holder died,
                        // the lock expires and the next round takes over.
                        let margin = Duration::from_millis(20);
                        let bound = if self.health.keyspace_notifications.load(Ordering::Relaxed) {
                            lock_left + margin
                        } else {
                            (lock_left + margin).min(poll.next())
                        };
                        let started = std::time::Instant::now();
                        self.wait(watch, bound, deadline).await;
                        metrics::histogram!(names::REDIS_WAIT)
                            .record(started.elapsed().as_secs_f64());
                        continue;
                    }
                    Ok((None, None)) => {} // No lock and no value: race for it.
                    Err(err) => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > self.settings.lock_ttl {
                            self.redis_failed("wait", &err);
                            return LeadOrWait::Lead(self.degraded_lease(key));
                        }
                        tokio::time::sleep(poll.next()).await;
                        continue;
                    }
                }
            }

            match self.try_lock(key).await {
                Ok(Some(token)) => {
                    // Another leader may have filled the key just before we won.
                    match self.get_value(key).await {
                        Ok(Some(cached)) => {
                            self.release(key, &token).await;
                            let origin = if lost_race {
                                Origin::Waited
                            } else {
                                Origin::Found
                            };
                            return LeadOrWait::Settled { cached, origin };
                        }
                        Ok(None) | Err(_) => {
                            if lost_race {
                                tracing::Span::current().record("takeover", true);
                                metrics::counter!(names::TAKEOVERS).increment(1);
                                tracing::info!(
                                    key = key.short(),
                                    "took over a key whose leader went away"
                                );
                            }
                            let renewal = self.spawn_renewal(key, &token);
                            return LeadOrWait::Lead(Lease {
                                key: key.clone(),
                                token,
                                keep_alive: Some(Box::new(AbortOnDrop(renewal))),
                            });
                        }
                    }
                }
                Ok(None) => {
                    lost_race = true;
                    if watch.is_none() {
                        let keyspace = self.health.keyspace_notifications.load(Ordering::Relaxed);
                        watch = Some(
                            self.subscriptions
                                .watch(key, self.layout.channels(key, keyspace))
                                .await,
                        );
                    }
                }
                Err(err) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.settings.lock_ttl {
                        self.redis_failed("lock", &err);
                        return LeadOrWait::Lead(self.degraded_lease(key));
                    }
                    tokio::time::sleep(poll.next()).await;
                }
            }
        }
    }
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    fn peek(&self, key: &CacheKey) -> Option<Cached> {
        if self.settings.local_cache || !self.health.is_up() {
            self.memory.get(key)
        } else {
            None
        }
    }

    async fn lookup(&self, keys: &[CacheKey]) -> Vec<Option<Cached>> {
        let mut found: Vec<Option<Cached>> = keys.iter().map(|key| self.peek(key)).collect();
        if !self.health.is_up() || found.iter().all(Option::is_some) {
            return found;
        }
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        let mut command = redis::cmd("MGET");
        for &i in &missing {
            command.arg(self.layout.value(&keys[i]));
        }
        command.arg(self.layout.cooldown());
        let values: Vec<Option<Vec<u8>>> = match command.query_async(&mut self.conn()).await {
            Ok(values) => values,
            Err(err) => {
                self.redis_failed("lookup", &err);
                return found;
            }
        };
        let cooldown_until = values
            .last()
            .cloned()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.parse::<u64>().ok())
            .filter(|&until| until > unix_millis());
        for (&i, value) in missing.iter().zip(values) {
            found[i] = value.and_then(|bytes| self.decode(&keys[i], &bytes));
            if found[i].is_none()
                && let Some(until) = cooldown_until
            {
                // The BI asked every instance to back off: no call before it ends.
                let retry_after_secs = (until - unix_millis()).div_ceil(1000);
                found[i] = Some(Cached::Error(Arc::new(NegativeEntry {
                    error: AnswerError {
                        kind: AnswerErrorKind::RateLimited,
                        message: "the BI is rate limiting; no BI calls until its cool-down ends"
                            .into(),
                        retry_after_secs: Some(retry_after_secs),
                    },
                    expires_at_ms: until,
                })));
            }
        }
        found
    }

    async fn lead_or_wait(&self, key: &CacheKey, deadline: Instant) -> LeadOrWait {
        let span = tracing::info_span!(
            "coalesce.lead_or_wait",
            cache.key = key.short(),
            outcome = Empty,
            takeover = Empty,
        );
        let decision = self.decide(key, deadline).instrument(span.clone()).await;
        span.record(
            "outcome",
            match &decision {
                LeadOrWait::Lead(lease) if lease.token.is_empty() => "degraded",
                LeadOrWait::Lead(_) => "lead",
                LeadOrWait::Settled {
                    origin: Origin::Found,
                    ..
                } => "found",
                LeadOrWait::Settled { .. } => "value",
                LeadOrWait::Failed(_) => "timeout",
            },
        );
        decision
    }

    async fn fill(&self, lease: Lease, entry: Arc<Entry>) {
        self.memory
            .insert(lease.key.clone(), Cached::Value(Arc::clone(&entry)));
        let ttl_ms = entry.expires_at_ms.saturating_sub(unix_millis());
        self.settle(lease, &Stored::Value((*entry).clone()), ttl_ms)
            .await;
    }

    async fn fail(&self, lease: Lease, error: AnswerError) {
        let negative = NegativeEntry::new(error, self.settings.negative_ttl);
        self.memory
            .insert(lease.key.clone(), Cached::Error(Arc::new(negative.clone())));
        if negative.error.kind == AnswerErrorKind::RateLimited && self.health.is_up() {
            let set: Result<(), _> = redis::cmd("SET")
                .arg(self.layout.cooldown())
                .arg(negative.expires_at_ms)
                .arg("PX")
                .arg(negative.expires_at_ms.saturating_sub(unix_millis()).max(1))
                .query_async(&mut self.conn())
                .await;
            if let Err(err) = set {
                self.redis_failed("cool-down", &err);
            }
        }
        let ttl_ms = negative.expires_at_ms.saturating_sub(unix_millis());
        self.settle(lease, &Stored::Error(negative), ttl_ms).await;
    }

    async fn count(&self, name: &str, amount: u64, window: Duration) -> (u64, Duration) {
        let (index, left) = super::window_position(window);
        if self.health.is_up() {
            let key = self.layout.counter(name, index);
            let counted: Result<(u64, i64), _> = redis::pipe()
                .atomic()
                .incr(&key, amount)
                .pexpire(&key, (window.as_millis() as i64) * 2)
                .query_async(&mut self.conn())
                .await;
            match counted {
                Ok((total, _)) => return (total, left),
                Err(err) => self.redis_failed("counter", &err),
            }
        }
        self.counters.count(name, amount, window)
    }

    fn is_degraded(&self) -> bool {
        !self.health.is_up()
    }

    fn describe(&self) -> CoordinatorStatus {
        CoordinatorStatus {
            mode: "redis",
            redis: if self.health.is_up() { "up" } else { "down" },
            notifications: if self.health.keyspace_notifications.load(Ordering::Relaxed) {
                "keyspace"
            } else {
                "polling"
            },
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Jittered, growing poll intervals for when notifications cannot be trusted.
struct Backoff {
    next_ms: f64,
}

impl Backoff {
    const FIRST_MS: f64 = 20.0;
    const MAX_MS: f64 = 250.0;

    fn new() -> Backoff {
        Backoff {
            next_ms: Self::FIRST_MS,
        }
    }

    fn next(&mut self) -> Duration {
        let jittered = self.next_ms * (0.5 + fastrand::f64());
        self.next_ms = (self.next_ms * 1.6).min(Self::MAX_MS);
        Duration::from_micros((jittered * 1000.0) as u64)
    }
}

async fn ping(conn: &mut ConnectionManager, timeout: Duration) -> bool {
    let reply = tokio::time::timeout(timeout, redis::cmd("PING").query_async::<String>(conn)).await;
    matches!(reply, Ok(Ok(_)))
}

/// Makes sure keyspace notifications for set, del and expired are on, if
/// allowed; returns whether they are. Without them, waiters poll.
async fn ensure_notifications(conn: &mut ConnectionManager, settings: &RedisSettings) -> bool {
    let current: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await;
    let flags = match current {
        Ok(reply) => reply.get(1).cloned().unwrap_or_default(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read notify-keyspace-events; waiters will poll");
            return false;
        }
    };
    let has = |c: char| flags.contains(c);
    let enough = has('K') && (has('A') || (has('g') && has('$') && has('x')));
    if enough {
        return true;
    }
    if !settings.configure_notifications {
        tracing::warn!(flags = %flags, "keyspace notifications are off and REDIS_CONFIGURE_NOTIFICATIONS=false; waiters will poll");
        return false;
    }
    let mut wanted = flags.clone();
    for c in ['K', 'g', '$', 'x'] {
        if !wanted.contains(c) {
            wanted.push(c);
        }
    }
    let set: Result<(), _> = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(&wanted)
        .query_async(conn)
        .await;
    match set {
        Ok(()) => {
            tracing::info!(flags = %wanted, "enabled Redis keyspace notifications");
            true
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot enable keyspace notifications; waiters will poll");
            false
        }
    }
}

/// Pings both connections every second: keeps the health flag true, makes a
/// dropped connection reconnect (and re-subscribe), and re-checks
/// notifications after Redis comes back (it may have restarted without them).
async fn watch_health(
    mut commands: ConnectionManager,
    mut subscriber: ConnectionManager,
    health: Arc<Health>,
    settings: RedisSettings,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let was_up = health.is_up();
        let up = ping(&mut commands, settings.command_timeout).await;
        if up && !was_up {
            let keyspace = ensure_notifications(&mut commands, &settings).await;
            health
                .keyspace_notifications
                .store(keyspace, Ordering::Relaxed);
        }
        health.ping_answered(up);
        let _ = ping(&mut subscriber, settings.command_timeout).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_bounded() {
        let mut backoff = Backoff::new();
        let waits: Vec<Duration> = (0..20).map(|_| backoff.next()).collect();
        assert!(waits[0] <= Duration::from_millis(30));
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(375)));
        assert!(waits[19] >= Duration::from_millis(125));
    }
}
