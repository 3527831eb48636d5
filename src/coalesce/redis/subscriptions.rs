//! The instance's one pub/sub connection: who waits on which key, and the
//! wake-ups Redis sends for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::query::CacheKey;
use crate::telemetry::names;

/// The hash inside a channel name's `{...}` hash tag.
fn hash_of_channel(channel: &str) -> Option<&str> {
    let start = channel.find('{')? + 1;
    let end = start + channel[start..].find('}')?;
    Some(&channel[start..end])
}

/// The instance's one pub/sub connection and who waits on which key.
pub(super) struct Subscriptions {
    by_key: Mutex<HashMap<String, Watched>>,
    ops: mpsc::UnboundedSender<SubscriptionOp>,
}

struct Watched {
    wake: watch::Sender<u64>,
    waiters: usize,
    channels: Vec<String>,
}

enum SubscriptionOp {
    Subscribe(Vec<String>, oneshot::Sender<()>),
    Unsubscribe(Vec<String>),
}

/// One waiter's registration; unsubscribes when the last waiter of a key leaves.
pub(super) struct KeyWatch {
    hash: String,
    wake: watch::Receiver<u64>,
    subscriptions: Arc<Subscriptions>,
}

static SUBSCRIBED_CHANNELS: AtomicU64 = AtomicU64::new(0);

impl Subscriptions {
    pub(super) fn start(
        conn: ConnectionManager,
        mut pushes: mpsc::UnboundedReceiver<PushInfo>,
        timeout: Duration,
    ) -> (Arc<Subscriptions>, Vec<JoinHandle<()>>) {
        let (ops, mut op_rx) = mpsc::unbounded_channel();
        let subscriptions = Arc::new(Subscriptions {
            by_key: Mutex::new(HashMap::new()),
            ops,
        });
        // Subscribe and unsubscribe in the order asked, on one task, so an
        // unsubscribe never overtakes the subscribe that follows it.
        let mut op_conn = conn;
        let op_task = tokio::spawn(async move {
            while let Some(op) = op_rx.recv().await {
                match op {
                    SubscriptionOp::Subscribe(channels, done) => {
                        let n = channels.len() as u64;
                        match tokio::time::timeout(timeout, op_conn.subscribe(&channels)).await {
                            Ok(Ok(())) => {
                                SUBSCRIBED_CHANNELS.fetch_add(n, Ordering::Relaxed);
                            }
                            Ok(Err(err)) => {
                                tracing::warn!(error = %err, "subscribe failed; waiters fall back to polling the lock")
                            }
                            Err(_) => tracing::warn!(
                                "subscribe timed out; waiters fall back to polling the lock"
                            ),
                        }
                        let _ = done.send(());
                    }
                    SubscriptionOp::Unsubscribe(channels) => {
                        let n = channels.len() as u64;
                        if let Ok(Ok(())) =
                            tokio::time::timeout(timeout, op_conn.unsubscribe(&channels)).await
                        {
                            let _ = SUBSCRIBED_CHANNELS.fetch_update(
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                                |c| Some(c.saturating_sub(n)),
                            );
                        }
                    }
                }
                metrics::gauge!(names::PUBSUB_CHANNELS)
                    .set(SUBSCRIBED_CHANNELS.load(Ordering::Relaxed) as f64);
            }
        });
        let dispatcher = Arc::clone(&subscriptions);
        let dispatch_task = tokio::spawn(async move {
            while let Some(push) = pushes.recv().await {
                dispatcher.dispatch(push);
            }
        });
        (subscriptions, vec![op_task, dispatch_task])
    }

    fn dispatch(&self, push: PushInfo) {
        let by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        match push.kind {
            PushKind::Message => {
                let channel = push
                    .data
                    .first()
                    .and_then(|value| redis::from_redis_value_ref::<String>(value).ok());
                if let Some(watched) = channel
                    .as_deref()
                    .and_then(hash_of_channel)
                    .and_then(|hash| by_key.get(hash))
                {
                    watched.wake.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            // Messages may have been lost: every waiter looks again.
            PushKind::Disconnection => {
                for watched in by_key.values() {
                    watched.wake.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            _ => {}
        }
    }

    /// Registers a waiter for `key` and, for the first one, subscribes to
    /// `channels` and waits for Redis to confirm.
    pub(super) async fn watch(self: &Arc<Self>, key: &CacheKey, channels: Vec<String>) -> KeyWatch {
        let hash = key.as_str().to_owned();
        let (wake, confirm) = {
            let mut by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
            match by_key.get_mut(&hash) {
                Some(watched) => {
                    watched.waiters += 1;
                    (watched.wake.subscribe(), None)
                }
                None => {
                    let (tx, rx) = watch::channel(0);
                    let (done_tx, done_rx) = oneshot::channel();
                    let _ = self
                        .ops
                        .send(SubscriptionOp::Subscribe(channels.clone(), done_tx));
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
        if let Some(confirm) = confirm {
            let _ = confirm.await;
        }
        KeyWatch {
            hash,
            wake,
            subscriptions: Arc::clone(self),
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
            let _ = self
                .subscriptions
                .ops
                .send(SubscriptionOp::Unsubscribe(watched.channels));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_lead_back_to_their_key() {
        assert_eq!(
            hash_of_channel("__keyspace@0__:ag:v1:{abc123}:lock"),
            Some("abc123")
        );
        assert_eq!(hash_of_channel("ag:v1:{abc123}:done"), Some("abc123"));
        assert_eq!(hash_of_channel("nothing here"), None);
    }
}
