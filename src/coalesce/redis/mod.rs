//! The distributed coordinator: a cache shared through Redis, and per key one
//! leader across all instances.
//!
//! - [`keys`]: the key layout. [`store`]: how answers are encoded.
//! - [`scripts`]: the lock protocol (try-lead, settle, renew, release).
//! - [`health`]: Redis is down only after a lock lifetime without one
//!   successful command; until then failed commands are retried.
//! - [`subscriptions`]: the one pub/sub connection and its waiters.
//! - [`following`]: the in-process copies, and followers of a key's answers.
//!
//! This file puts them together: a try for the lead of several keys (their
//! lookup too) is one pipeline of one script per key, plus the BI's
//! cool-down; a wait subscribes, looks again, and sleeps at most as long as
//! the holder's lock has left, so a lost notification costs time, never
//! correctness.

mod connection;
mod following;
mod health;
mod keys;
mod scripts;
mod store;
mod subscriptions;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

use self::connection::Commands;
use self::following::{Copies, RedisFollowing};
use self::health::{Backoff, Health, Link, PingerSettings, Trouble};
use self::keys::KeyLayout;
use self::scripts::{AbortOnDrop, SettleReply, Settling, TryReply};
use self::subscriptions::Subscriptions;
use super::invalidation::ScopeGenerations;
use super::{
    Announcements, Coordinator, CoordinatorStatus, Counters, Deadline, Decision, DocumentStore,
    Following, InvalidationMode, InvalidationScope, Invalidations, Invalidator, Lease, LeaseKind,
    LocalCounters, StoreHealth, StoreUnavailable, Waited, Want,
};
use crate::cache::{AnswerError, Cached, Entry, MemoryCache, NegativeEntry};
use crate::config::RedisDeployment;
use crate::query::CacheKey;
use crate::telemetry::names;

/// Everything the Redis coordinator is configured with.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub deployment: RedisDeployment,
    pub namespace: String,
    pub lock_ttl: Duration,
    pub command_timeout: Duration,
    /// Redis is down after this long without one successful command.
    /// `None`: one lock TTL, or a cluster's failover time (see `REDIS_DOWN_AFTER_MS`).
    pub down_after: Option<Duration>,
    /// Whether the gateway may `CONFIG SET notify-keyspace-events`.
    pub configure_notifications: bool,
    /// Whether hits may be served from process memory while Redis is up.
    pub local_cache: bool,
    pub memory_max_bytes: u64,
    pub negative_ttl: Duration,
    /// How long an entry lives: given to a value found without expiry.
    pub value_ttl: Duration,
    /// Written into lock tokens, so an operator can see who holds a lock.
    pub instance_id: String,
}

/// Why Redis could not be set up at all (a bad URL; an unreachable server is
/// not an error, it is degraded mode).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedisSetupError(String);

/// Slack added to a lock's remaining time before a waiter looks again
/// unprompted: the holder's renewal or fill is then surely visible.
const WAIT_MARGIN: Duration = Duration::from_millis(20);

pub struct RedisCoordinator {
    link: Link,
    layout: KeyLayout,
    subscriptions: Arc<Subscriptions>,
    /// The in-process copies (L1) of entries and remembered failures.
    copies: Copies,
    /// Counters while Redis is down: per instance, better than none.
    counters: LocalCounters,
    invalidations: Arc<Invalidations>,
    settings: RedisSettings,
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
        let (commands, subscriber, db) =
            connection::open(&settings.deployment, settings.command_timeout)?;
        // A cluster refuses everything while it fails a primary over:
        // waited out, unless the operator chose otherwise.
        let (down_after, refuse_after) = match settings.down_after {
            Some(down_after) => (down_after, down_after),
            None => (
                settings.lock_ttl,
                connection::failover_time(&settings.deployment)
                    .await
                    .map_or(settings.lock_ttl, |failover| {
                        failover.max(settings.lock_ttl)
                    }),
            ),
        };
        let health = Arc::new(Health::new(down_after, refuse_after));
        for mode in names::REDIS_MODES {
            let on = *mode == settings.deployment.mode();
            metrics::gauge!(names::REDIS_MODE, "mode" => *mode).set(if on { 1.0 } else { 0.0 });
        }
        let link = Link::new(commands, Arc::clone(&health));
        if let Commands::Sentinel(primary) = &link.commands
            && let Err(err) = primary.follow().await
        {
            tracing::warn!(error = %err, "the Sentinels did not name a primary yet");
        }
        let pinger = PingerSettings {
            configure_notifications: settings.configure_notifications,
            command_timeout: settings.command_timeout,
        };
        let run_id = health::first_check(&link, pinger).await;
        let layout = KeyLayout::new(&settings.namespace, db, link.commands.is_cluster());
        let invalidated = Arc::new(tokio::sync::Notify::new());
        let (subscriptions, subscriber_task) = Subscriptions::start(
            subscriber,
            health,
            settings.command_timeout,
            vec![(layout.invalidated_channel(), Arc::clone(&invalidated))],
        );
        let pinger_task = tokio::spawn(health::watch_health(
            link.clone(),
            pinger,
            run_id,
            layout.probe(&settings.instance_id),
            Arc::clone(&subscriptions),
        ));
        let invalidations = Arc::new(Invalidations::default());
        follow_invalidations_once(&link, &layout, &invalidations).await;
        let invalidations_task = tokio::spawn(follow_invalidations(
            link.clone(),
            layout.clone(),
            Arc::clone(&invalidations),
            invalidated,
        ));
        Ok(RedisCoordinator {
            link,
            layout,
            subscriptions,
            copies: Copies {
                memory: MemoryCache::new(settings.memory_max_bytes),
                errors: MemoryCache::new(settings.memory_max_bytes / 16 + 1),
                value_ttl: settings.value_ttl,
                negative_ttl: settings.negative_ttl,
            },
            counters: LocalCounters::default(),
            invalidations,
            tasks: vec![subscriber_task, pinger_task, invalidations_task],
            settings,
        })
    }

    fn health(&self) -> &Health {
        &self.link.health
    }

    /// One owner token per decision: every retry of the same try sends it
    /// again, so a first attempt that landed late is recognised as ours.
    fn new_token(&self) -> String {
        format!(
            "{}:{}",
            self.settings.instance_id,
            uuid::Uuid::new_v4().simple()
        )
    }

    fn found_value(&self, key: &CacheKey, payload: &[u8], pttl: i64) -> Option<Cached> {
        self.copies.found_value(key, payload, pttl)
    }

    fn found_error(&self, key: &CacheKey, payload: &[u8], pttl: i64) -> Option<Cached> {
        self.copies.found_error(key, payload, pttl)
    }

    /// Reads a settle's `done` message (what it stored, for how long).
    fn settled(
        &self,
        key: &CacheKey,
        message: &[u8],
        replaced: impl Fn(&[u8]) -> bool,
    ) -> Option<Cached> {
        let settled = scripts::parse_settled(message)?;
        match settled.settling {
            Settling::Value if replaced(settled.payload) => None,
            Settling::Value => self.found_value(key, settled.payload, settled.pttl),
            Settling::Error => self.found_error(key, settled.payload, settled.pttl),
        }
    }

    /// Writes a producer's answer or error with the settle script, retried
    /// until Redis answers or is down. Returns `None` when Redis never answered.
    async fn settle(
        &self,
        lease: &Lease,
        payload: &[u8],
        ttl: Duration,
        settling: Settling,
    ) -> Option<SettleReply> {
        let token = match &lease.kind {
            LeaseKind::Locked { token } => token.clone(),
            // Produced while Redis was down: share it if Redis is back,
            // unless someone holds the key by now.
            LeaseKind::Uncoordinated if self.health().is_up() => self.new_token(),
            LeaseKind::Uncoordinated | LeaseKind::InProcess => return None,
        };
        let command = scripts::settle(
            &self.layout,
            &lease.key,
            &token,
            payload,
            ttl,
            settling,
            lease.replaces.as_deref(),
        );
        let deadline = Instant::now() + self.health().patience() + self.settings.command_timeout;
        self.link
            .persist("fill", deadline, || self.link.coordinate::<i64>(&command))
            .await
            .ok()
            .map(scripts::parse_settle_reply)
    }

    /// Stores `cached` for `lease`: Redis first, then the in-process copy, so
    /// this process never serves what Redis refused (another leader's key).
    async fn store(&self, mut lease: Lease, cached: Cached, payload: Vec<u8>) {
        let settling = match cached {
            Cached::Value(_) => Settling::Value,
            Cached::Error(_) => Settling::Error,
        };
        // Stop renewing first: a renewal racing the fill would find the lock
        // gone and report it lost.
        drop(lease.keep_alive.take());
        let ttl = cached
            .expires_at()
            .saturating_duration_since(Instant::now());
        let reply = self.settle(&lease, &payload, ttl, settling).await;
        let short = lease.key.short();
        match reply {
            // Stored now, or by an earlier attempt of this same fill whose
            // reply was lost.
            Some(SettleReply::Stored | SettleReply::AlreadyStored) => {}
            Some(SettleReply::StoredWithoutLock) => {
                if matches!(lease.kind, LeaseKind::Locked { .. }) {
                    tracing::info!(
                        key = short,
                        "the lock was gone when the answer came (expired, or Redis restarted); stored it anyway"
                    );
                    metrics::counter!(names::LOCKS_LOST).increment(1);
                }
            }
            Some(SettleReply::Skipped) => {
                tracing::warn!(
                    key = short,
                    "another leader holds or already filled the key; answering this instance's waiters only"
                );
                if matches!(lease.kind, LeaseKind::Locked { .. }) {
                    metrics::counter!(names::LOCKS_LOST).increment(1);
                }
                return;
            }
            None if matches!(lease.kind, LeaseKind::Locked { .. }) => {
                tracing::warn!(key = short, "could not store the answer: Redis is down");
            }
            None => {}
        }
        match settling {
            Settling::Value => {
                self.copies.errors.remove(&lease.key);
                self.copies.memory.insert(lease.key, cached);
            }
            Settling::Error => self.copies.errors.insert(lease.key, cached),
        }
    }

    /// The shared cool-down's time left, from its `PTTL` reply.
    fn cooldown_left(pttl: &Value) -> Option<Duration> {
        let pttl = redis::from_redis_value_ref::<i64>(pttl).ok()?;
        (pttl > 0).then(|| Duration::from_millis(pttl as u64))
    }

    fn cooling_down(left: Duration) -> Cached {
        Cached::Error(Arc::new(NegativeEntry::from_stored(
            AnswerError::cooling_down(left),
            left,
        )))
    }

    fn uncoordinated(&self, want: &Want) -> Decision {
        Decision::Lead(Lease {
            key: want.key.clone(),
            kind: LeaseKind::Uncoordinated,
            replaces: want.replaces.clone(),
            generation: self.invalidations.current(),
            keep_alive: None,
        })
    }

    /// The lead or wait of one key, from its try-lead reply.
    fn decide(
        &self,
        want: &Want,
        token: String,
        reply: Option<TryReply>,
        cooldown: Option<Duration>,
    ) -> Decision {
        let key = &want.key;
        match reply {
            Some(TryReply::Failed { payload, pttl }) => match self.found_error(key, &payload, pttl)
            {
                Some(cached) => Decision::Settled(cached),
                None => Decision::Failed(AnswerError::internal(
                    "an unreadable remembered error is in Redis",
                )),
            },
            Some(TryReply::Found { payload, pttl }) => {
                match self.found_value(key, &payload, pttl) {
                    Some(cached) => Decision::Settled(cached),
                    None => {
                        // An unreadable value would be found again and again:
                        // remove it (unless it changed meanwhile), and let the
                        // next round lead.
                        let link = self.link.clone();
                        let discard = scripts::discard_value(&self.layout, key, &payload);
                        tokio::spawn(async move {
                            let _ = link.coordinate::<i64>(&discard).await;
                        });
                        Decision::Busy
                    }
                }
            }
            Some(TryReply::Won) => {
                metrics::counter!(names::LOCK_ATTEMPTS, "result" => "won").increment(1);
                if let Some(left) = cooldown {
                    // The BI asked everyone to back off: no call, and the
                    // lock goes back at once.
                    let link = self.link.clone();
                    let release = scripts::release(&self.layout, key, &token);
                    tokio::spawn(async move {
                        let _ = link.coordinate::<i64>(&release).await;
                    });
                    return Decision::Settled(Self::cooling_down(left));
                }
                let renewal = scripts::spawn_renewal(
                    self.link.clone(),
                    &self.layout,
                    key,
                    &token,
                    self.settings.lock_ttl,
                );
                Decision::Lead(Lease {
                    key: key.clone(),
                    kind: LeaseKind::Locked { token },
                    replaces: want.replaces.clone(),
                    generation: self.invalidations.current(),
                    keep_alive: Some(Box::new(AbortOnDrop(renewal))),
                })
            }
            Some(TryReply::Busy) => {
                // Waiting costs no BI call, cool-down or not.
                metrics::counter!(names::LOCK_ATTEMPTS, "result" => "lost").increment(1);
                Decision::Busy
            }
            None => Decision::Failed(AnswerError::internal(
                "Redis gave an unexpected answer to the lock script",
            )),
        }
    }
}

/// A batch's replies, one per key, or its trouble for every key.
fn per_key(replies: Result<Vec<Value>, Trouble>, keys: usize) -> Vec<Result<Value, Trouble>> {
    match replies {
        Ok(replies) => replies.into_iter().map(Ok).collect(),
        Err(trouble) => (0..keys).map(|_| Err(trouble)).collect(),
    }
}

#[async_trait]
impl Coordinator for RedisCoordinator {
    fn peek(&self, key: &CacheKey) -> Option<Cached> {
        if !self.health().is_up() {
            return self
                .copies
                .memory
                .get(key)
                .or_else(|| self.copies.errors.get(key));
        }
        // While Redis is up, a remembered error is read from Redis: a paid
        // answer may have replaced it there (a leader whose lock had gone).
        if self.settings.local_cache {
            self.copies.memory.get(key)
        } else {
            None
        }
    }

    fn invalidations(&self) -> &Arc<Invalidations> {
        &self.invalidations
    }

    async fn try_lead(&self, wants: &[Want], deadline: Instant) -> Vec<Decision> {
        if !self.health().is_up() {
            return wants.iter().map(|want| self.uncoordinated(want)).collect();
        }
        let span = tracing::info_span!(
            "coalesce.try_lead",
            keys = wants.len() as i64,
            won = Empty,
            lost = Empty,
            found = Empty
        );
        let tokens: Vec<String> = wants.iter().map(|_| self.new_token()).collect();
        let scripts: Vec<redis::Cmd> = wants
            .iter()
            .zip(&tokens)
            .map(|(want, token)| {
                scripts::try_lead(
                    &self.layout,
                    &want.key,
                    token,
                    self.settings.lock_ttl,
                    want.replaces.as_deref(),
                )
            })
            .collect();
        let cooldown_pttl = redis::cmd("PTTL").arg(self.layout.cooldown()).to_owned();
        // What each key's script answered, or why it did not. The scripts go
        // as one batch retried whole until the deadline: a retry re-runs the
        // scripts of keys already won (re-entrant: it renews their locks), so
        // no won lock ages while another key's shard is failing over.
        let (cooldown, replies): (Option<Duration>, Vec<Result<Value, Trouble>>) =
            if self.link.commands.is_cluster() {
                // Side by side, each to its slot's node; the cool-down (one
                // more slot) is read at best, never retried in their way.
                let cooldown = async {
                    let reply = tokio::time::timeout(
                        self.settings.command_timeout,
                        self.link.query::<Value>(&cooldown_pttl),
                    );
                    match reply.await {
                        Ok(Ok(pttl)) => Self::cooldown_left(&pttl),
                        _ => None,
                    }
                };
                let scripts = self
                    .link
                    .persist("lock", deadline, || self.link.coordinate_each(&scripts));
                let (cooldown, replies) = futures_util::future::join(cooldown, scripts)
                    .instrument(span.clone())
                    .await;
                (cooldown, per_key(replies, wants.len()))
            } else {
                // One server: the cool-down and every script in one pipeline.
                let mut commands = vec![cooldown_pttl];
                commands.extend(scripts);
                let replies = self
                    .link
                    .persist("lock", deadline, || self.link.coordinate_each(&commands))
                    .instrument(span.clone())
                    .await;
                match replies {
                    Ok(mut replies) => {
                        let cooldown = replies.first().and_then(Self::cooldown_left);
                        let scripts = replies.split_off(1.min(replies.len()));
                        (cooldown, per_key(Ok(scripts), wants.len()))
                    }
                    Err(trouble) => (None, per_key(Err(trouble), wants.len())),
                }
            };
        let deadline_error =
            AnswerError::unavailable("Redis did not answer before the request's deadline");
        let decisions: Vec<Decision> = wants
            .iter()
            .zip(tokens)
            .enumerate()
            .map(|(i, (want, token))| match replies.get(i) {
                Some(Ok(reply)) => {
                    self.decide(want, token, scripts::parse_try_reply(reply), cooldown)
                }
                Some(Err(Trouble::Down)) => self.uncoordinated(want),
                Some(Err(Trouble::Deadline)) | None => Decision::Failed(deadline_error.clone()),
            })
            .collect();
        let count = |f: fn(&Decision) -> bool| decisions.iter().filter(|d| f(d)).count() as i64;
        span.record("won", count(|d| matches!(d, Decision::Lead(_))));
        span.record("lost", count(|d| matches!(d, Decision::Busy)));
        span.record("found", count(|d| matches!(d, Decision::Settled(_))));
        decisions
    }

    async fn wait(&self, key: &CacheKey, replaces: Option<&str>, deadline: &Deadline) -> Waited {
        // The entry being replaced is still there until its producer's
        // settle: it is no answer (an evicted entry must never be served).
        let replaced = |payload: &[u8]| replaces.is_some_and(|id| store::is_entry(payload, id));
        let span = tracing::info_span!("coalesce.wait", cache.key = key.short(), outcome = Empty);
        let waited = async {
            let timed_out = || {
                Waited::Failed(AnswerError::unavailable(
                    "waited for another instance's BI call until the request's deadline",
                ))
            };
            let keyspace = self.health().keyspace_notifications();
            let channels = self.layout.channels(key, keyspace);
            let Ok(mut watch) =
                tokio::time::timeout_at(deadline.get(), self.subscriptions.watch(key, channels))
                    .await
            else {
                return timed_out();
            };
            let (value, error) = (self.layout.value(key), self.layout.error(key));
            let mut look = redis::pipe();
            look.get(&value)
                .pttl(&value)
                .get(&error)
                .pttl(&error)
                .pttl(self.layout.lock(key));
            let mut poll = Backoff::new();
            loop {
                if deadline.has_passed() {
                    return timed_out();
                }
                // The settle's own message carries the answer: no look needed.
                if let Some(cached) = watch
                    .settled()
                    .and_then(|message| self.settled(key, &message, replaced))
                {
                    return Waited::Settled(cached);
                }
                // Forget wake-ups so far, then look: one that comes after
                // the look is not missed.
                watch.mark_seen();
                type Look = (Option<Vec<u8>>, i64, Option<Vec<u8>>, i64, i64);
                let lock_left = match self
                    .link
                    .persist("wait", deadline.get(), || self.link.pipe::<Look>(&look))
                    .await
                {
                    Ok((Some(payload), pttl, _, _, _)) if !replaced(&payload) => {
                        if let Some(cached) = self.found_value(key, &payload, pttl) {
                            return Waited::Settled(cached);
                        }
                        return Waited::HolderGone;
                    }
                    Ok((_, _, Some(payload), pttl, _)) => {
                        if let Some(cached) = self.found_error(key, &payload, pttl) {
                            return Waited::Settled(cached);
                        }
                        return Waited::HolderGone;
                    }
                    Ok((_, _, None, _, lock_pttl)) => {
                        match scripts::time_left(lock_pttl, self.settings.lock_ttl) {
                            None => return Waited::HolderGone,
                            Some(left) => left,
                        }
                    }
                    // Redis is down: the next round leads without a lock.
                    Err(Trouble::Down) => return Waited::HolderGone,
                    // The top of the loop decides (the deadline may have moved).
                    Err(Trouble::Deadline) => continue,
                };
                // Bounded by the lock's own time: if its holder died, the
                // lock expires and the next look finds it gone.
                let mut bound = lock_left + WAIT_MARGIN;
                // Told of everything but a dead holder, whose lock's expiry
                // is the bound: keyspace notifications, or a cluster's
                // sharded `done` channel (which a release also uses). Else
                // poll.
                let told = keyspace || self.layout.sharded();
                if !told || !self.subscriptions.is_connected() {
                    bound = bound.min(poll.next());
                }
                let started = std::time::Instant::now();
                let _ = tokio::time::timeout_at(deadline.or_sooner(bound), watch.changed()).await;
                metrics::histogram!(names::REDIS_WAIT).record(started.elapsed().as_secs_f64());
            }
        }
        .instrument(span.clone())
        .await;
        span.record(
            "outcome",
            match &waited {
                Waited::Settled(_) => "value",
                Waited::HolderGone => "holder_gone",
                Waited::Failed(_) => "timeout",
            },
        );
        waited
    }

    async fn fill(&self, lease: Lease, entry: Arc<Entry>) {
        let payload = store::encode_value(&entry);
        self.store(lease, Cached::Value(entry), payload).await;
    }

    async fn fail(&self, lease: Lease, error: AnswerError) {
        let negative = NegativeEntry::new(error, self.settings.negative_ttl);
        let payload = store::encode_error(&negative.error);
        self.store(lease, Cached::Error(Arc::new(negative)), payload)
            .await;
    }

    async fn abandon(&self, mut lease: Lease) {
        drop(lease.keep_alive.take());
        if let LeaseKind::Locked { token } = &lease.kind {
            let release = scripts::release(&self.layout, &lease.key, token);
            let deadline = Instant::now() + self.settings.command_timeout * 2;
            let _ = self
                .link
                .persist("lock release", deadline, || {
                    self.link.coordinate::<i64>(&release)
                })
                .await;
        }
    }

    async fn cool_down(&self, period: Duration) {
        if !self.health().is_up() {
            return;
        }
        let command = redis::cmd("SET")
            .arg(self.layout.cooldown())
            .arg(1)
            .arg("PX")
            .arg(period.as_millis().max(1) as u64)
            .to_owned();
        let deadline = Instant::now() + self.settings.command_timeout * 2;
        let _ = self
            .link
            .persist("cool-down", deadline, || {
                self.link.coordinate::<()>(&command)
            })
            .await;
    }
}

#[async_trait]
impl Announcements for RedisCoordinator {
    async fn follow(&self, key: &CacheKey) -> Box<dyn Following> {
        // The channels a wait of the key uses: a waiter that comes while the
        // key is followed shares them, keyspace notifications included.
        let channels = self
            .layout
            .channels(key, self.health().keyspace_notifications());
        // Redis's confirmation is waited for a lock lifetime at most: while
        // Redis is unreachable the subscription is made when it is back (and
        // the follower woken then), and the live key must not wait for it.
        let (watch, confirm) = self.subscriptions.register(key, channels);
        if let Some(confirm) = confirm {
            let _ = tokio::time::timeout(self.settings.lock_ttl, confirm).await;
        }
        Box::new(RedisFollowing {
            key: key.clone(),
            watch,
            link: self.link.clone(),
            layout: self.layout.clone(),
            copies: self.copies.clone(),
            last_done: None,
            last_id: None,
        })
    }
}

#[async_trait]
impl Counters for RedisCoordinator {
    async fn count(&self, name: &str, amount: u64, window: Duration) -> (u64, Duration) {
        let (index, left) = super::window_position(window);
        if self.health().is_up() {
            let key = self.layout.counter(name, index);
            let mut pipe = redis::pipe();
            pipe.atomic()
                .incr(&key, amount)
                .pexpire(&key, (window.as_millis() as i64) * 2);
            if let Ok((total, _)) = self.link.coordinate_pipe::<(u64, i64)>(&pipe).await {
                return (total, left);
            }
        }
        self.counters.count(name, amount, window)
    }
}

#[async_trait]
impl Invalidator for RedisCoordinator {
    async fn invalidate(
        &self,
        scope: &InvalidationScope,
        mode: InvalidationMode,
    ) -> Result<u64, StoreUnavailable> {
        if !self.health().is_up() {
            return Err(StoreUnavailable);
        }
        let field = scope.field();
        let command = scripts::invalidate(&self.layout, &field, mode == InvalidationMode::Evict);
        let deadline = Instant::now() + self.settings.command_timeout * 2;
        let generation = self
            .link
            .persist("invalidate", deadline, || {
                self.link.coordinate::<u64>(&command)
            })
            .await
            .map_err(|_| StoreUnavailable)?;
        self.invalidations.record(&field, mode, generation);
        Ok(generation)
    }
}

/// How long a persisted query's document is kept in Redis after its last store.
const PERSISTED_QUERY_TTL: Duration = Duration::from_secs(24 * 60 * 60);

#[async_trait]
impl DocumentStore for RedisCoordinator {
    async fn load_document(&self, hash: &str) -> Option<String> {
        if !self.health().is_up() {
            return None;
        }
        let command = redis::cmd("GET")
            .arg(self.layout.persisted_query(hash))
            .to_owned();
        self.link
            .query::<Option<String>>(&command)
            .await
            .ok()
            .flatten()
    }

    async fn save_document(&self, hash: &str, document: &str) {
        if !self.health().is_up() {
            return;
        }
        let command = redis::cmd("SET")
            .arg(self.layout.persisted_query(hash))
            .arg(document)
            .arg("PX")
            .arg(PERSISTED_QUERY_TTL.as_millis() as u64)
            .to_owned();
        let _ = self.link.coordinate::<()>(&command).await;
    }
}

impl StoreHealth for RedisCoordinator {
    fn describe(&self) -> CoordinatorStatus {
        let up = self.health().is_up();
        let (nodes, mut unreachable) = match (&self.settings.deployment, &self.link.commands) {
            (RedisDeployment::Cluster { .. }, _) => {
                let view = self.health().nodes();
                (view.known, view.unreachable)
            }
            (_, Commands::Sentinel(primary)) => {
                (primary.primary_address().into_iter().collect(), Vec::new())
            }
            (RedisDeployment::Single { url }, _) => (vec![redact(url)], Vec::new()),
            _ => (Vec::new(), Vec::new()),
        };
        if !up && unreachable.is_empty() {
            unreachable.clone_from(&nodes);
        }
        let notifications = if self.link.commands.is_cluster() {
            if self.subscriptions.is_connected() {
                "sharded"
            } else {
                "polling"
            }
        } else if self.health().keyspace_notifications() {
            "keyspace"
        } else {
            "polling"
        };
        CoordinatorStatus {
            mode: "redis",
            redis: if up { "up" } else { "down" },
            redis_mode: self.settings.deployment.mode(),
            redis_nodes: nodes,
            redis_unreachable: unreachable,
            notifications,
        }
    }
}

/// `host:port` of a Redis URL, without credentials.
fn redact(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|url| {
            Some(format!(
                "{}:{}",
                url.host_str()?,
                url.port().unwrap_or(6379)
            ))
        })
        .unwrap_or_else(|| "redis".to_owned())
}

/// Keeps this process's view of the invalidations in step with Redis: at
/// every announcement (and every reconnection), and at least every second.
async fn follow_invalidations(
    link: Link,
    layout: KeyLayout,
    invalidations: Arc<Invalidations>,
    announced: Arc<tokio::sync::Notify>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = announced.notified() => {}
        }
        follow_invalidations_once(&link, &layout, &invalidations).await;
    }
}

/// Reads the invalidation sequence and, when it has moved, every scope's
/// generations (written together by one script, so none is missed).
async fn follow_invalidations_once(link: &Link, layout: &KeyLayout, invalidations: &Invalidations) {
    let sequence = redis::cmd("GET")
        .arg(layout.invalidation_sequence())
        .to_owned();
    let Ok(Some(latest)) = link.query::<Option<u64>>(&sequence).await else {
        return;
    };
    if !invalidations.needs_sync(latest) {
        return;
    }
    let all = redis::cmd("HGETALL").arg(layout.invalidations()).to_owned();
    let Ok(fields) = link
        .query::<std::collections::HashMap<String, u64>>(&all)
        .await
    else {
        return;
    };
    let mut scopes: std::collections::HashMap<String, ScopeGenerations> =
        std::collections::HashMap::new();
    let mut newest = latest;
    for (field, generation) in fields {
        newest = newest.max(generation);
        match field.split_once('|') {
            Some(("stale", scope)) => {
                scopes.entry(scope.to_owned()).or_default().stale = generation
            }
            Some(("evict", scope)) => {
                scopes.entry(scope.to_owned()).or_default().evict = generation
            }
            _ => {}
        }
    }
    invalidations.merge(scopes, newest, latest);
}
