//! The instance's one pub/sub connection: who waits on which key, and the
//! wake-ups Redis sends for them.
//!
//! The set of keys with waiters is the truth; the connection follows it. The
//! connection is our own (a RESP3 connection with a push channel), not one
//! that re-subscribes by itself: after any failure (a subscribe or
//! unsubscribe that errs or times out, a dropped connection, a missed ping)
//! it is dropped, and the next one subscribes to exactly the channels still
//! waited on. So a channel whose `UNSUBSCRIBE` failed during an outage is not
//! carried into the next connection, and every reconnection wakes all waiters
//! (messages may have been lost) and asks for keyspace notifications to be
//! checked again (Redis may have restarted without them).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{PushInfo, PushKind};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::connection::Subscriber;
use super::health::{Backoff, Health};
use super::keys::hash_of_channel;
use crate::query::CacheKey;
use crate::telemetry::names;

/// How often an idle subscriber connection proves it is alive.
const PING_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Subscriptions {
    by_key: Mutex<HashMap<String, Watched>>,
    ops: mpsc::UnboundedSender<Op>,
    /// Whether a subscriber connection is up: without one, waiters poll.
    connected: AtomicBool,
    /// Channels subscribed on every connection, whoever waits, and who is
    /// told of their messages.
    permanent: Vec<(String, Arc<Notify>)>,
}

/// What wakes the waiters of one key: a count of wake-ups, and the last
/// `done` message (the settled answer itself).
#[derive(Default)]
struct Wake {
    count: u64,
    done: Option<Arc<Vec<u8>>>,
}

struct Watched {
    wake: watch::Sender<Wake>,
    waiters: usize,
    channels: Vec<String>,
}

enum Op {
    /// Subscribe, then confirm (also on failure: the waiter then polls).
    Subscribe(Vec<String>, oneshot::Sender<()>),
    /// Drop the connection and open another (the primary moved).
    Reconnect,
    /// Unsubscribe from a key's channels, unless it is waited on again.
    Unsubscribe { hash: String, channels: Vec<String> },
}

/// One waiter's registration; unsubscribes when the last waiter of a key leaves.
pub(super) struct KeyWatch {
    hash: String,
    wake: watch::Receiver<Wake>,
    /// The key's last `done` when this watch began: not an answer to it.
    done_before: Option<Arc<Vec<u8>>>,
    subscriptions: Arc<Subscriptions>,
}

impl Subscriptions {
    /// Starts the connection task on `client` (which must speak RESP3);
    /// `permanent` channels are always subscribed, and each message on one
    /// (and each reconnection, when messages may have been lost) notifies
    /// its `Notify`.
    pub(super) fn start(
        subscriber: Subscriber,
        health: Arc<Health>,
        timeout: Duration,
        permanent: Vec<(String, Arc<Notify>)>,
    ) -> (Arc<Subscriptions>, JoinHandle<()>) {
        let (ops, op_rx) = mpsc::unbounded_channel();
        let subscriptions = Arc::new(Subscriptions {
            by_key: Mutex::new(HashMap::new()),
            ops,
            connected: AtomicBool::new(false),
            permanent,
        });
        let task = tokio::spawn(Arc::clone(&subscriptions).run(subscriber, op_rx, health, timeout));
        (subscriptions, task)
    }

    /// Moves to a new connection (behind Sentinels, to the new primary).
    pub(super) fn reconnect(&self) {
        let _ = self.ops.send(Op::Reconnect);
    }

    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Registers a waiter for `key` and, for the first one, subscribes to
    /// `channels` and waits for Redis to confirm (bound it by a deadline).
    pub(super) async fn watch(self: &Arc<Self>, key: &CacheKey, channels: Vec<String>) -> KeyWatch {
        let (watch, confirm) = self.register(key, channels);
        if let Some(confirm) = confirm {
            let _ = confirm.await;
        }
        watch
    }

    /// Registers a waiter for `key` (the first one subscribes to `channels`);
    /// the receiver, for the first one, says when Redis confirmed.
    pub(super) fn register(
        self: &Arc<Self>,
        key: &CacheKey,
        channels: Vec<String>,
    ) -> (KeyWatch, Option<oneshot::Receiver<()>>) {
        let hash = key.as_str().to_owned();
        let (wake, confirm) = {
            let mut by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
            match by_key.get_mut(&hash) {
                Some(watched) => {
                    watched.waiters += 1;
                    (watched.wake.subscribe(), None)
                }
                None => {
                    let (tx, rx) = watch::channel(Wake::default());
                    let (done_tx, done_rx) = oneshot::channel();
                    let _ = self.ops.send(Op::Subscribe(channels.clone(), done_tx));
                    by_key.insert(
                        hash.clone(),
                        Watched {
                            wake: tx,
                            waiters: 1,
                            channels,
                        },
                    );
                    (rx, Some(done_rx))
                }
            }
        };
        // Built before the confirmation is awaited: a caller that gives up
        // waiting (its deadline) still unregisters through `Drop`.
        // A `done` from before this watch (the key watched all along, by a
        // live panel's follower) says nothing of the holder now waited on.
        let done_before = wake.borrow().done.clone();
        let watch = KeyWatch {
            hash,
            wake,
            done_before,
            subscriptions: Arc::clone(self),
        };
        (watch, confirm)
    }

    /// The channels `hash` is waited on through now (none: not waited on).
    fn channels_of(&self, hash: &str) -> Vec<String> {
        self.by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .map(|watched| watched.channels.clone())
            .unwrap_or_default()
    }

    fn wanted_channels(&self) -> Vec<String> {
        let by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        by_key
            .values()
            .flat_map(|w| w.channels.clone())
            .chain(self.permanent.iter().map(|(channel, _)| channel.clone()))
            .collect()
    }

    fn wake(&self, hash: &str, done: Option<Arc<Vec<u8>>>) {
        let by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(watched) = by_key.get(hash) {
            watched.wake.send_modify(|wake| {
                wake.count = wake.count.wrapping_add(1);
                if done.is_some() {
                    wake.done = done;
                }
            });
        }
    }

    /// Messages may have been lost: every waiter looks again.
    fn wake_all(&self) {
        let by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        for watched in by_key.values() {
            watched
                .wake
                .send_modify(|wake| wake.count = wake.count.wrapping_add(1));
        }
        for (_, notify) in &self.permanent {
            notify.notify_one();
        }
    }

    /// Connects, follows the wanted channels, dispatches messages;
    /// reconnects after any failure.
    async fn run(
        self: Arc<Self>,
        subscriber: Subscriber,
        mut ops: mpsc::UnboundedReceiver<Op>,
        health: Arc<Health>,
        timeout: Duration,
    ) {
        let mut backoff = Backoff::new();
        let mut first = true;
        loop {
            let (push_tx, mut pushes) = mpsc::unbounded_channel::<PushInfo>();
            let connected =
                tokio::time::timeout(timeout * 2, subscriber.connect(push_tx, timeout)).await;
            let Ok(Ok(mut conn)) = connected else {
                if !away(&mut ops, backoff.next()).await {
                    return;
                }
                continue;
            };
            let mut subscribed: HashSet<String> = self.wanted_channels().into_iter().collect();
            if !subscribed.is_empty() {
                let channels: Vec<&String> = subscribed.iter().collect();
                let reply = tokio::time::timeout(timeout, conn.subscribe(&channels)).await;
                if !matches!(reply, Ok(Ok(()))) {
                    drop(conn);
                    if !away(&mut ops, backoff.next()).await {
                        return;
                    }
                    continue;
                }
            }
            self.connected.store(true, Ordering::Relaxed);
            if !first {
                tracing::info!("Redis subscriber connection re-established");
                health.recheck_notifications();
            }
            first = false;
            backoff = Backoff::new();
            self.wake_all();
            metrics::gauge!(names::PUBSUB_CHANNELS).set(subscribed.len() as f64);

            let mut ping = tokio::time::interval(PING_EVERY);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let why = loop {
                tokio::select! {
                    op = ops.recv() => match op {
                        None => return,
                        Some(Op::Reconnect) => break "the primary moved",
                        Some(Op::Subscribe(channels, done)) => {
                            let reply = tokio::time::timeout(timeout, conn.subscribe(&channels)).await;
                            let _ = done.send(());
                            if !matches!(reply, Ok(Ok(()))) {
                                break "a subscribe failed";
                            }
                            subscribed.extend(channels);
                        }
                        Some(Op::Unsubscribe { hash, channels }) => {
                            // The key may be waited on again meanwhile,
                            // perhaps through fewer channels.
                            let still = self.channels_of(&hash);
                            let channels: Vec<String> =
                                channels.into_iter().filter(|c| !still.contains(c)).collect();
                            if channels.is_empty() {
                                continue;
                            }
                            let reply = tokio::time::timeout(timeout, conn.unsubscribe(&channels)).await;
                            if !matches!(reply, Ok(Ok(()))) {
                                break "an unsubscribe failed";
                            }
                            for channel in &channels {
                                subscribed.remove(channel);
                            }
                        }
                    },
                    push = pushes.recv() => match push {
                        None => break "the connection ended",
                        Some(push) if push.kind == PushKind::Disconnection => break "the connection dropped",
                        Some(push) => self.dispatch(&push),
                    },
                    _ = ping.tick() => {
                        let reply = tokio::time::timeout(timeout, conn.ping()).await;
                        if !matches!(reply, Ok(Ok(_))) {
                            break "a ping failed";
                        }
                    }
                }
                metrics::gauge!(names::PUBSUB_CHANNELS).set(subscribed.len() as f64);
            };
            tracing::warn!(
                reason = why,
                "Redis subscriber connection lost; reconnecting"
            );
            self.connected.store(false, Ordering::Relaxed);
            metrics::gauge!(names::PUBSUB_CHANNELS).set(0.0);
            drop(conn);
            self.wake_all();
        }
    }

    fn dispatch(&self, push: &PushInfo) {
        if !matches!(push.kind, PushKind::Message | PushKind::SMessage) {
            return;
        }
        let Some(channel) = push
            .data
            .first()
            .and_then(|value| redis::from_redis_value_ref::<String>(value).ok())
        else {
            return;
        };
        if let Some((_, notify)) = self.permanent.iter().find(|(c, _)| *c == channel) {
            notify.notify_one();
            return;
        }
        if let Some(hash) = hash_of_channel(&channel) {
            // A settle's own message carries what it stored.
            let done = channel
                .ends_with(":done")
                .then(|| push.data.get(1))
                .flatten()
                .and_then(|value| redis::from_redis_value_ref::<Vec<u8>>(value).ok())
                .map(Arc::new);
            self.wake(hash, done);
        }
    }
}

impl KeyWatch {
    /// Forgets wake-ups so far: call before looking at Redis, so that a
    /// wake-up that comes after the look is not missed.
    pub(super) fn mark_seen(&mut self) {
        self.wake.borrow_and_update();
    }

    pub(super) async fn changed(&mut self) {
        if self.wake.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The last `done` message of the key (what its settle stored), if one
    /// came since the watch began.
    pub(super) fn settled(&self) -> Option<Arc<Vec<u8>>> {
        let done = self.wake.borrow().done.clone()?;
        match &self.done_before {
            Some(before) if Arc::ptr_eq(before, &done) => None,
            _ => Some(done),
        }
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        let mut by_key = self
            .subscriptions
            .by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let last = match by_key.get_mut(&self.hash) {
            Some(watched) => {
                watched.waiters -= 1;
                watched.waiters == 0
            }
            None => false,
        };
        if last && let Some(watched) = by_key.remove(&self.hash) {
            let _ = self.subscriptions.ops.send(Op::Unsubscribe {
                hash: self.hash.clone(),
                channels: watched.channels,
            });
        }
    }
}

/// Waits out `pause` without a connection, confirming subscriptions at once
/// (their waiters poll instead of waiting for messages that cannot come).
/// `false` when the coordinator is gone.
async fn away(ops: &mut mpsc::UnboundedReceiver<Op>, pause: Duration) -> bool {
    let pause = tokio::time::sleep(pause.max(Duration::from_millis(100)));
    tokio::pin!(pause);
    loop {
        tokio::select! {
            () = &mut pause => return true,
            op = ops.recv() => match op {
                None => return false,
                Some(Op::Subscribe(_, done)) => { let _ = done.send(()); }
                Some(Op::Unsubscribe { .. } | Op::Reconnect) => {}
            },
        }
    }
}
