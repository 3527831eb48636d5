//! Live panels: `aggregateLive` subscriptions, refreshed once per key per
//! interval for the whole cluster and pushed only when the rows change.
//!
//! [`Live`] is this instance's registry of live keys. Each key has one
//! [`tokio::sync::watch`] channel holding its latest event (a subscriber that
//! cannot keep up sees only the latest one: older unsent events are dropped
//! by construction), the intervals its local subscribers want (the shortest
//! wins), and one task that:
//!
//! - follows the key's announcements ([`Announcements`]: the settle script's
//!   `done` messages on the instance's one pub/sub connection, the channel
//!   the waits use), so it learns of an entry whichever instance stored it;
//! - when the entry it has is due (the start of its BI call plus the
//!   interval), asks for a refresh through the existing refresh protocol
//!   ([`Aggregator::refresh_live`], replacing exactly that entry): only the
//!   holder of the key's lock calls the BI, every other instance finds the
//!   lock taken (or the new entry) and receives the announcement;
//! - publishes an event only when the digest of the rows changed.
//!
//! No shared state says which interval a key has: every instance with
//! subscribers asks at its own shortest interval, and an entry that is
//! already newer than an instance's interval is not refreshed by it. So the
//! key is refreshed at the shortest interval any instance wants, and when
//! the last subscriber anywhere goes away its refreshing stops at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use futures_util::future::{BoxFuture, FutureExt};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::aggregate::{Aggregator, Answer, AnswerResult, CacheStatus};
use crate::cache::{AnswerError, Cached, Entry, unix_micros};
use crate::coalesce::{Announcements, Counters, Resolved};
use crate::query::{CacheKey, PlannedQuery};
use crate::telemetry::names;

/// Live panels' settings (`LIVE_*`).
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// The shortest interval a subscription gets (`LIVE_MIN_INTERVAL_SECS`).
    pub min_interval: Duration,
    /// Most subscriptions open on this instance (`LIVE_MAX_SUBSCRIPTIONS`).
    pub max_subscriptions: usize,
    /// Most subscriptions on one connection
    /// (`LIVE_MAX_SUBSCRIPTIONS_PER_CONNECTION`).
    pub max_per_connection: usize,
    /// How long a send to a client may stay blocked before its connection is
    /// closed (`LIVE_SEND_TIMEOUT_SECS`).
    pub send_timeout: Duration,
    /// How long the first answer may take (the request timeout).
    pub first_answer_timeout: Duration,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LiveRefusal {
    #[error(
        "this connection has {0} live subscriptions already (LIVE_MAX_SUBSCRIPTIONS_PER_CONNECTION)"
    )]
    Connection(usize),
    #[error("this gateway instance has {0} live subscriptions already (LIVE_MAX_SUBSCRIPTIONS)")]
    Instance(usize),
}

impl LiveRefusal {
    fn label(self) -> &'static str {
        match self {
            LiveRefusal::Connection(_) => "connection",
            LiveRefusal::Instance(_) => "instance",
        }
    }
}

/// One event of a live key: an answer, and the digest of what it shows.
#[derive(Debug)]
pub struct LiveEvent {
    pub answer: AnswerResult,
    digest: [u8; 32],
}

type Latest = Option<Arc<LiveEvent>>;

/// This instance's live keys.
pub struct Live {
    aggregator: Arc<Aggregator>,
    announcements: Arc<dyn Announcements>,
    /// Where quotas are counted: a subscription to a key new to this
    /// instance may cost a BI query, counted as one.
    counters: Arc<dyn Counters>,
    instance_id: String,
    settings: LiveSettings,
    keys: Mutex<HashMap<CacheKey, Arc<LiveKey>>>,
    subscriptions: AtomicUsize,
}

/// One live key on this instance.
struct LiveKey {
    latest: watch::Sender<Latest>,
    /// The intervals its subscribers want, with how many want each.
    intervals: Mutex<BTreeMap<Duration, usize>>,
    /// Wakes the key's task when the shortest interval changes.
    intervals_changed: Notify,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl LiveKey {
    fn interval(&self) -> Option<Duration> {
        self.intervals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .next()
            .copied()
    }
}

/// Counts one connection's live subscriptions, for its limit.
#[derive(Clone, Default)]
pub struct ConnectionSubscriptions(Arc<AtomicUsize>);

/// One subscriber: its events, and its place in the registry (given back
/// when dropped).
pub struct Subscription {
    latest: watch::Receiver<Latest>,
    _guard: SubscriberGuard,
}

struct SubscriberGuard {
    live: Arc<Live>,
    key: CacheKey,
    interval: Duration,
    connection: ConnectionSubscriptions,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.connection.0.fetch_sub(1, Ordering::Relaxed);
        self.live.subscriptions.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(names::LIVE_SUBSCRIBERS).decrement(1.0);
        let mut keys = self.live.keys.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = keys.get(&self.key).cloned() else {
            return;
        };
        let mut intervals = state.intervals.lock().unwrap_or_else(|p| p.into_inner());
        let shortest = intervals.keys().next().copied();
        if let Some(count) = intervals.get_mut(&self.interval) {
            *count -= 1;
            if *count == 0 {
                intervals.remove(&self.interval);
            }
        }
        if intervals.is_empty() {
            drop(intervals);
            keys.remove(&self.key);
            if let Some(task) = state.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
                task.abort();
            }
            metrics::gauge!(names::LIVE_KEYS).decrement(1.0);
        } else if intervals.keys().next().copied() != shortest {
            state.intervals_changed.notify_one();
        }
    }
}

impl Live {
    pub fn new(
        aggregator: Arc<Aggregator>,
        announcements: Arc<dyn Announcements>,
        counters: Arc<dyn Counters>,
        instance_id: String,
        settings: LiveSettings,
    ) -> Arc<Live> {
        Arc::new(Live {
            aggregator,
            announcements,
            counters,
            instance_id,
            settings,
            keys: Mutex::default(),
            subscriptions: AtomicUsize::new(0),
        })
    }

    pub fn settings(&self) -> &LiveSettings {
        &self.settings
    }

    /// Where quotas are counted.
    pub fn counters(&self) -> &Arc<dyn Counters> {
        &self.counters
    }

    /// Whether `key` is live on this instance already (a subscription to it
    /// costs no BI query of its own).
    pub fn is_live(&self, key: &CacheKey) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(key)
    }

    /// The interval a subscription asking for `every_seconds` gets: at least
    /// the minimum (also what applies without it).
    pub fn interval(&self, every_seconds: Option<i32>) -> Duration {
        let asked = every_seconds
            .and_then(|secs| u64::try_from(secs).ok())
            .map(Duration::from_secs)
            .unwrap_or_default();
        asked.max(self.settings.min_interval)
    }

    /// Subscribes to `query`'s key, refreshed at least every `interval`.
    pub fn subscribe(
        self: &Arc<Self>,
        query: PlannedQuery,
        interval: Duration,
        connection: &ConnectionSubscriptions,
    ) -> Result<Subscription, LiveRefusal> {
        let refused = |refusal: LiveRefusal| {
            metrics::counter!(names::LIVE_REFUSALS, "reason" => refusal.label()).increment(1);
            refusal
        };
        let on_connection = connection.0.fetch_add(1, Ordering::Relaxed);
        if on_connection >= self.settings.max_per_connection {
            connection.0.fetch_sub(1, Ordering::Relaxed);
            return Err(refused(LiveRefusal::Connection(on_connection)));
        }
        let on_instance = self.subscriptions.fetch_add(1, Ordering::Relaxed);
        if on_instance >= self.settings.max_subscriptions {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
            connection.0.fetch_sub(1, Ordering::Relaxed);
            return Err(refused(LiveRefusal::Instance(on_instance)));
        }
        metrics::gauge!(names::LIVE_SUBSCRIBERS).increment(1.0);
        let guard = SubscriberGuard {
            live: Arc::clone(self),
            key: query.key.clone(),
            interval,
            connection: connection.clone(),
        };
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let state = match keys.get(&query.key) {
            Some(state) => {
                let mut intervals = state.intervals.lock().unwrap_or_else(|p| p.into_inner());
                let shortest = intervals.keys().next().copied();
                *intervals.entry(interval).or_default() += 1;
                if shortest.is_none_or(|shortest| interval < shortest) {
                    state.intervals_changed.notify_one();
                }
                Arc::clone(state)
            }
            None => {
                let state = Arc::new(LiveKey {
                    latest: watch::channel(None).0,
                    intervals: Mutex::new(BTreeMap::from([(interval, 1)])),
                    intervals_changed: Notify::new(),
                    task: Mutex::new(None),
                });
                let span =
                    tracing::info_span!(parent: None, "live.key", cache.key = query.key.short());
                let task = tokio::spawn(
                    Arc::clone(self)
                        .follow_key(Arc::clone(&state), query.clone())
                        .instrument(span),
                );
                *state.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
                keys.insert(query.key.clone(), Arc::clone(&state));
                metrics::gauge!(names::LIVE_KEYS).increment(1.0);
                state
            }
        };
        Ok(Subscription {
            latest: state.latest.subscribe(),
            _guard: guard,
        })
    }

    /// A live key's task (see the module's documentation); aborted with the
    /// key's last subscriber.
    async fn follow_key(self: Arc<Self>, state: Arc<LiveKey>, query: PlannedQuery) {
        // Following first: an entry stored while the first answer is looked
        // up is not missed.
        let mut following = self.announcements.follow(&query.key).await;
        let first = match self.aggregator.peek(&query) {
            Some(answer) => answer,
            None => {
                let deadline = Instant::now() + self.settings.first_answer_timeout;
                self.aggregator
                    .resolve(std::slice::from_ref(&query), deadline)
                    .await
                    .remove(&query.key)
                    .unwrap_or_else(|| Err(AnswerError::internal("the first answer was lost")))
            }
        };
        let mut current: Option<Arc<Entry>> = first.as_ref().ok().map(|a| Arc::clone(&a.entry));
        publish(&state, first);
        // When this instance last asked for a refresh: none is asked for
        // again before the (current) interval has passed since (a refresh
        // that brought nothing: refused, failed, or made elsewhere without
        // an announcement reaching us yet).
        let mut last_asked: Option<Instant> = None;
        // An entry the store holds that is older than `current` (one stored
        // before an outage, while this instance's refreshes stayed in
        // process): the next refresh must replace that one, or it would find
        // it and stop there, interval after interval.
        let mut stored_older: Option<String> = None;
        // The refresh this instance started last, if it is still under way:
        // its outcome brings the entry even where no announcement does (Redis
        // unreachable, degraded mode).
        let mut refreshing: Option<BoxFuture<'static, Result<Resolved, AnswerError>>> = None;
        loop {
            let interval = state.interval().unwrap_or(self.settings.min_interval);
            let not_before = last_asked.map_or_else(Instant::now, |at| at + interval);
            let due = current
                .as_deref()
                .map_or(not_before, |entry| due_at(entry, interval))
                .max(not_before);
            let refreshed = async {
                match refreshing.as_mut() {
                    Some(outcome) => outcome.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                outcome = refreshed => {
                    refreshing = None;
                    if let Ok(resolved) = outcome {
                        self.take_entry(&state, &mut current, &mut stored_older, resolved.entry);
                    }
                }
                cached = following.next() => match cached {
                    Cached::Value(entry) => {
                        self.take_entry(&state, &mut current, &mut stored_older, entry);
                    }
                    // A failed refresh leaves the entry the subscribers have:
                    // they keep it. Without one, they learn of the failure.
                    Cached::Error(negative) if current.is_none() => {
                        publish(&state, Err(negative.error.clone()));
                    }
                    Cached::Error(_) => {}
                },
                () = tokio::time::sleep_until(due) => {
                    metrics::counter!(names::LIVE_REFRESHES).increment(1);
                    let replaces = stored_older
                        .as_deref()
                        .or(current.as_deref().map(|entry| entry.id.as_str()));
                    if let Some(watch) = self.aggregator.refresh_live(&query, replaces) {
                        refreshing = Some(watch.outcome().boxed());
                    }
                    last_asked = Some(Instant::now());
                }
                () = state.intervals_changed.notified() => {}
            }
        }
    }
}

impl Live {
    /// Makes `entry` the key's current one and tells the subscribers, unless
    /// it is the current one already or older. An older one is what the
    /// store holds: remembered in `stored_older`, for the next refresh to
    /// replace.
    fn take_entry(
        &self,
        state: &LiveKey,
        current: &mut Option<Arc<Entry>>,
        stored_older: &mut Option<String>,
        entry: Arc<Entry>,
    ) {
        let (newer, same) = match current.as_ref() {
            None => (true, false),
            Some(c) => (
                c.id != entry.id && entry.produced_at_us >= c.produced_at_us,
                c.id == entry.id,
            ),
        };
        if !newer {
            if !same {
                *stored_older = Some(entry.id.clone());
            }
            return;
        }
        *stored_older = None;
        *current = Some(Arc::clone(&entry));
        let status = if entry.producer == self.instance_id {
            CacheStatus::Miss
        } else {
            CacheStatus::Coalesced
        };
        publish(
            state,
            Ok(Answer {
                degraded: entry.uncoordinated,
                stale: false,
                entry,
                status,
            }),
        );
    }
}

/// When `entry` is due for a refresh: its BI call's start plus `interval`
/// (so that refreshes start `interval` apart, whatever the BI's latency).
fn due_at(entry: &Entry, interval: Duration) -> Instant {
    let started_us = entry
        .produced_at_us
        .saturating_sub(entry.compute.as_micros() as u64);
    let age = Duration::from_micros(unix_micros().saturating_sub(started_us));
    Instant::now() + interval.saturating_sub(age)
}

/// Sends `answer` to the key's subscribers unless it shows what they have.
/// It replaces the latest event either way, so that a subscriber who comes
/// later gets the newest `cache` facts (`producedAt`, `stale`) with the rows.
fn publish(state: &LiveKey, answer: AnswerResult) {
    let digest = digest(&answer);
    state.latest.send_if_modified(|latest| {
        let changed = latest.as_ref().is_none_or(|event| event.digest != digest);
        *latest = Some(Arc::new(LiveEvent { answer, digest }));
        changed
    });
}

/// What decides whether an event is sent: the rows, or the error.
fn digest(answer: &AnswerResult) -> [u8; 32] {
    let mut hasher = Sha256::new();
    match answer {
        Ok(answer) => {
            hasher.update(b"rows\0");
            hasher.update(serde_json::to_vec(&answer.entry.rows).unwrap_or_default());
        }
        Err(error) => {
            hasher.update(b"error\0");
            hasher.update(format!("{:?}", error.kind).as_bytes());
            hasher.update(error.message.as_bytes());
        }
    }
    hasher.finalize().into()
}

impl Subscription {
    /// The subscriber's events: the latest at once, then each change. A
    /// subscriber that is not polled misses intermediate events.
    pub fn events(self) -> impl Stream<Item = Arc<LiveEvent>> + Send + 'static {
        futures_util::stream::unfold((self, false), |(mut sub, started)| async move {
            if started {
                sub.latest.changed().await.ok()?;
            }
            loop {
                let latest = sub.latest.borrow_and_update().clone();
                if let Some(event) = latest {
                    metrics::counter!(names::LIVE_EVENTS).increment(1);
                    return Some((event, (sub, true)));
                }
                sub.latest.changed().await.ok()?;
            }
        })
    }
}
