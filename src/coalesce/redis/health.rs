//! Whether Redis is usable, decided by time, and the one connection every
//! command goes through.
//!
//! Redis is **down** when no command has succeeded for `down_after` (one
//! lock TTL by default), or when it has refused our commands (error replies:
//! `READONLY` after a failover, `OOM`, `NOREPLICAS`, `MISCONF`, a cluster's
//! `CLUSTERDOWN`...) for `refuse_after` (the same, except on a cluster,
//! where it covers a failover); then it stays down until a probe write
//! succeeds. Before that, a slow
//! or failed command is retried within the caller's deadline: a loaded
//! machine, a Redis pause or a dropped connection shorter than a lock
//! lifetime never turns into degraded mode, whose leads take no lock. A
//! pinger keeps the verdict fresh while nothing else is asked (at a quarter
//! of `down_after`, so an idle instance never looks down), and checks
//! keyspace notifications again whenever Redis may have lost its
//! configuration (a new `run_id`, a reconnected subscriber).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::{Cmd, FromRedisValue, Pipeline, RedisResult};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connection::Commands;
use crate::telemetry::names;

/// How often the pinger asks Redis whether it is there, at most.
const PING_EVERY: Duration = Duration::from_millis(500);
/// How often the pinger reads Redis's `run_id` (to notice restarts).
const RUN_ID_EVERY: Duration = Duration::from_secs(2);

pub(super) struct Health {
    epoch: std::time::Instant,
    /// Milliseconds after `epoch` of the last command that succeeded, plus
    /// one; 0 means none ever did.
    last_success: AtomicU64,
    down_after: Duration,
    /// How long coordination commands may be refused before Redis is down.
    refuse_after: Duration,
    keyspace_notifications: AtomicBool,
    /// Milliseconds after `epoch`, plus one, of the first error reply to a
    /// coordination command (a script, a write) since the last one that
    /// succeeded; 0 when there is none. Reads that succeed meanwhile do not
    /// clear it: they prove Redis is there, not that it is usable.
    refused_since: AtomicU64,
    /// Redis refused coordination commands for `refuse_after`: down until the
    /// pinger's probe (a script that writes) succeeds.
    refusing: AtomicBool,
    /// The state last logged and exported, to report changes once.
    reported_up: AtomicBool,
    /// The nodes of a cluster, as it last described itself.
    nodes: std::sync::RwLock<NodesView>,
    /// Asks the pinger to check keyspace notifications now.
    recheck: Notify,
}

impl Health {
    pub(super) fn new(down_after: Duration, refuse_after: Duration) -> Health {
        Health {
            epoch: std::time::Instant::now(),
            last_success: AtomicU64::new(0),
            down_after,
            refuse_after,
            keyspace_notifications: AtomicBool::new(false),
            refused_since: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            reported_up: AtomicBool::new(false),
            nodes: std::sync::RwLock::default(),
            recheck: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    pub(super) fn succeeded(&self) {
        self.last_success
            .fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// A coordination command got an error reply (`READONLY`, `OOM`, ...).
    fn refused(&self) {
        let _ = self.refused_since.compare_exchange(
            0,
            self.now_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A coordination command went through: Redis is usable.
    fn accepted(&self) {
        self.refused_since.store(0, Ordering::Relaxed);
    }

    pub(super) fn is_up(&self) -> bool {
        if self.refusing.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.now_ms();
        let down_after = self.down_after.as_millis() as u64;
        let refused_since = self.refused_since.load(Ordering::Relaxed);
        if refused_since != 0
            && now.saturating_sub(refused_since) >= self.refuse_after.as_millis() as u64
        {
            if !self.refusing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    refuse_after_ms = self.refuse_after.as_millis() as u64,
                    "Redis has refused the commands coordination needs for too long: degraded until it accepts a write again"
                );
            }
            return false;
        }
        match self.last_success.load(Ordering::Relaxed) {
            0 => false,
            at => now.saturating_sub(at) <= down_after,
        }
    }

    pub(super) fn keyspace_notifications(&self) -> bool {
        self.keyspace_notifications.load(Ordering::Relaxed)
    }

    /// Asks the pinger to check keyspace notifications again soon (the
    /// subscriber reconnected: Redis may have restarted without them). Until
    /// it has, waiters poll and `/readyz` does not claim them.
    pub(super) fn recheck_notifications(&self) {
        self.keyspace_notifications.store(false, Ordering::Relaxed);
        self.recheck.notify_one();
    }

    /// The longest failures may last before Redis counts as down.
    pub(super) fn patience(&self) -> Duration {
        self.down_after.max(self.refuse_after)
    }

    pub(super) fn nodes(&self) -> NodesView {
        self.nodes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_nodes(&self, view: NodesView) {
        metrics::gauge!(names::REDIS_NODES, "state" => "known").set(view.known.len() as f64);
        metrics::gauge!(names::REDIS_NODES, "state" => "unreachable")
            .set(view.unreachable.len() as f64);
        *self.nodes.write().unwrap_or_else(|p| p.into_inner()) = view;
    }

    /// How often the pinger must prove Redis alive for an idle instance never
    /// to look down.
    fn ping_every(&self) -> Duration {
        (self.down_after / 4).clamp(Duration::from_millis(50), PING_EVERY)
    }

    /// Logs and exports a change of verdict.
    fn report(&self) {
        let up = self.is_up();
        if self.reported_up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("Redis is reachable: coordinating through Redis");
            } else if self.refusing.load(Ordering::Relaxed) {
                tracing::warn!("Redis refuses writes: degraded to in-process coalescing");
            } else {
                tracing::warn!(
                    down_after_ms = self.down_after.as_millis() as u64,
                    "no Redis command has succeeded for a lock lifetime: degraded to in-process coalescing"
                );
            }
        }
        metrics::gauge!(names::REDIS_UP).set(if up { 1.0 } else { 0.0 });
    }
}

/// The Redis nodes this instance knows of, and those it cannot reach (or
/// that the cluster marks failing).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodesView {
    pub known: Vec<String>,
    pub unreachable: Vec<String>,
}

/// Why [`Link::persist`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trouble {
    /// No command has succeeded for `down_after`.
    Down,
    /// The caller's deadline passed first.
    Deadline,
}

/// The commands connection, noting every success in [`Health`].
#[derive(Clone)]
pub(super) struct Link {
    pub(super) commands: Commands,
    pub(super) health: Arc<Health>,
}

impl Link {
    pub(super) fn new(commands: Commands, health: Arc<Health>) -> Link {
        Link { commands, health }
    }

    /// A command that reads, or that coordination can do without.
    pub(super) async fn query<T: FromRedisValue>(&self, command: &Cmd) -> RedisResult<T> {
        let reply = self.commands.query(command).await;
        self.note(&reply, false);
        reply
    }

    /// A command coordination needs (a lock script, a fill, a write): its
    /// error replies count towards Redis refusing, its success ends that.
    /// One `PING` (to one node of a cluster): the pinger's sign of life.
    pub(super) async fn ping(&self) -> RedisResult<()> {
        let reply = self.commands.ping_one().await;
        self.note(&reply, false);
        reply
    }

    pub(super) async fn coordinate<T: FromRedisValue>(&self, command: &Cmd) -> RedisResult<T> {
        let reply = self.commands.query(command).await;
        self.note(&reply, true);
        reply
    }

    /// A pipeline of reads, on the keys of one slot.
    pub(super) async fn pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> RedisResult<T> {
        let reply = self.commands.pipe(pipe).await;
        self.note(&reply, false);
        reply
    }

    /// A pipeline coordination needs (see [`Link::coordinate`]), on the keys
    /// of one slot.
    pub(super) async fn coordinate_pipe<T: FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> RedisResult<T> {
        let reply = self.commands.pipe(pipe).await;
        self.note(&reply, true);
        reply
    }

    /// Commands coordination needs on keys of any slots, in one round trip
    /// (see [`Commands::each`]).
    pub(super) async fn coordinate_each(&self, commands: &[Cmd]) -> RedisResult<Vec<redis::Value>> {
        let reply = self.commands.each(commands).await;
        self.note(&reply, true);
        reply
    }

    fn note<T>(&self, reply: &RedisResult<T>, coordination: bool) {
        // Only a real answer counts as Redis being there; an error reply to a
        // command coordination needs counts towards refusing.
        match reply {
            Ok(_) => {
                self.health.succeeded();
                if coordination {
                    self.health.accepted();
                }
            }
            Err(err) => {
                metrics::counter!(names::REDIS_COMMAND_FAILURES).increment(1);
                if coordination
                    && matches!(
                        err.kind(),
                        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                    )
                {
                    self.health.refused();
                }
            }
        }
    }

    /// Runs `attempt` until it succeeds, Redis is down, or `deadline` passes,
    /// with short growing pauses between attempts. Each attempt is bounded by
    /// the connection's command timeout, so a command that lands late is one
    /// the next attempt must be able to repeat safely.
    pub(super) async fn persist<T, F, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        mut attempt: F,
    ) -> Result<T, Trouble>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut pause = Backoff::new();
        let mut failed = false;
        loop {
            if Instant::now() >= deadline {
                return Err(Trouble::Deadline);
            }
            match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Ok(value)) => {
                    if failed {
                        tracing::debug!(what, "Redis command succeeded after retries");
                    }
                    return Ok(value);
                }
                Ok(Err(err)) => {
                    if !failed {
                        tracing::info!(what, error = %err, "Redis command failed; retrying");
                    }
                    failed = true;
                }
                Err(_) => return Err(Trouble::Deadline),
            }
            if !self.health.is_up() {
                self.health.report();
                tracing::warn!(what, "Redis is down; giving up on the command");
                return Err(Trouble::Down);
            }
            tokio::time::sleep_until(deadline.min(Instant::now() + pause.next())).await;
        }
    }
}

/// Jittered, growing pauses: between retries, and between polls when
/// notifications cannot be trusted.
pub(super) struct Backoff {
    next_ms: f64,
}

impl Backoff {
    const FIRST_MS: f64 = 20.0;
    const MAX_MS: f64 = 250.0;

    pub(super) fn new() -> Backoff {
        Backoff {
            next_ms: Self::FIRST_MS,
        }
    }

    pub(super) fn next(&mut self) -> Duration {
        let jittered = self.next_ms * (0.5 + fastrand::f64());
        self.next_ms = (self.next_ms * 1.6).min(Self::MAX_MS);
        Duration::from_micros((jittered * 1000.0) as u64)
    }
}

/// Whether notifications may be configured, and how long one command may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct PingerSettings {
    pub(super) configure_notifications: bool,
    pub(super) command_timeout: Duration,
}

/// The first look at Redis, before serving: so that the first requests know
/// where they stand. Returns Redis's `run_id` when it answered.
pub(super) async fn first_check(link: &Link, settings: PingerSettings) -> Option<String> {
    if link.commands.is_cluster() {
        // Keyspace notifications are node-local: a cluster's waiters learn
        // of answers through sharded channels, and poll for expired locks.
        let _ = tokio::time::timeout(settings.command_timeout, link.ping()).await;
        learn_cluster_nodes(link, settings.command_timeout).await;
        link.health.report();
        return None;
    }
    let run_id = run_id(link, settings.command_timeout).await;
    if run_id.is_some() {
        let keyspace = ensure_notifications(link, settings.configure_notifications).await;
        link.health
            .keyspace_notifications
            .store(keyspace, Ordering::Relaxed);
    }
    link.health.report();
    run_id
}

/// Keeps the verdict fresh while nothing else is asked of Redis, and checks
/// notifications again when Redis restarted (a new `run_id`) or the
/// subscriber reconnected. While Redis refuses commands, each ping is a
/// probe write to `probe_key` instead: its success ends the refusal.
pub(super) async fn watch_health(
    link: Link,
    settings: PingerSettings,
    mut known: Option<String>,
    probe_key: String,
    subscriptions: Arc<super::subscriptions::Subscriptions>,
) {
    let cluster = link.commands.is_cluster();
    let every = link.health.ping_every();
    let run_id_every = (RUN_ID_EVERY.as_millis() / every.as_millis().max(1)).max(1) as u32;
    let mut tick = 0_u32;
    let mut was_up = link.health.is_up();
    // A check asked for (or owed after an outage) waits until Redis can
    // answer it; it is never dropped.
    let mut recheck_owed = false;
    let probe = super::scripts::probe(&probe_key);
    loop {
        let asked = tokio::select! {
            () = tokio::time::sleep(every) => false,
            () = link.health.recheck.notified() => true,
        };
        recheck_owed |= asked;
        tick = tick.wrapping_add(1);
        // Behind Sentinels, ask who the primary is: a failover is followed
        // here, and the subscriber moves to the new primary with it.
        if let Commands::Sentinel(primary) = &link.commands
            && tick.is_multiple_of(run_id_every.div_ceil(2))
        {
            match primary.follow().await {
                Ok(true) => {
                    subscriptions.reconnect();
                    recheck_owed = true;
                }
                Ok(false) => {}
                Err(err) => tracing::debug!(error = %err, "the Sentinels did not answer"),
            }
        }
        if link.health.refusing.load(Ordering::Relaxed) {
            // The kind of command coordination needs: a script that writes.
            let wrote =
                tokio::time::timeout(settings.command_timeout, link.coordinate::<()>(&probe));
            if matches!(wrote.await, Ok(Ok(()))) {
                tracing::info!("Redis accepts writes again");
                link.health.refusing.store(false, Ordering::Relaxed);
                recheck_owed = true;
            }
        } else if cluster {
            // No notifications to check (see `first_check`): a ping, and
            // now and then the nodes, for `/readyz`.
            let _ = tokio::time::timeout(settings.command_timeout, link.ping()).await;
            if recheck_owed || tick.is_multiple_of(run_id_every) {
                recheck_owed = false;
                learn_cluster_nodes(&link, settings.command_timeout).await;
            }
        } else if recheck_owed || !was_up || tick.is_multiple_of(run_id_every) || known.is_none() {
            if let Some(id) = run_id(&link, settings.command_timeout).await {
                let restarted = known.as_deref() != Some(id.as_str());
                // Back after an outage, or a new server: its configuration
                // may not be the one checked before.
                if recheck_owed || restarted || !was_up {
                    recheck_owed = false;
                    if restarted && known.is_some() {
                        tracing::info!(
                            "Redis restarted (new run_id): checking keyspace notifications"
                        );
                    }
                    let keyspace =
                        ensure_notifications(&link, settings.configure_notifications).await;
                    link.health
                        .keyspace_notifications
                        .store(keyspace, Ordering::Relaxed);
                }
                known = Some(id);
            }
        } else {
            let _ = tokio::time::timeout(settings.command_timeout, link.ping()).await;
        }
        was_up = link.health.is_up();
        if !was_up {
            // Unknown until checked again, once Redis is back.
            link.health
                .keyspace_notifications
                .store(false, Ordering::Relaxed);
        }
        link.health.report();
    }
}

/// Reads the cluster's nodes (`CLUSTER NODES`) into [`Health`]: which are
/// known, and which the cluster marks failing.
async fn learn_cluster_nodes(link: &Link, timeout: Duration) {
    let nodes = redis::cmd("CLUSTER").arg("NODES").to_owned();
    let Ok(Ok(text)) = tokio::time::timeout(timeout, link.query::<String>(&nodes)).await else {
        return;
    };
    let mut view = NodesView::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_id), Some(address), Some(flags)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let address = address.split('@').next().unwrap_or(address).to_owned();
        if flags.contains("fail") {
            view.unreachable.push(address.clone());
        }
        view.known.push(address);
    }
    view.known.sort();
    view.unreachable.sort();
    link.health.set_nodes(view);
}

async fn run_id(link: &Link, timeout: Duration) -> Option<String> {
    let info = tokio::time::timeout(
        timeout,
        link.query::<String>(redis::cmd("INFO").arg("server")),
    )
    .await;
    let Ok(Ok(info)) = info else { return None };
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
}

/// Makes sure keyspace notifications for set, del and expired are on, if
/// allowed; returns whether they are. Without them, waiters poll.
async fn ensure_notifications(link: &Link, configure: bool) -> bool {
    let current: RedisResult<Vec<String>> = link
        .query(
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("notify-keyspace-events"),
        )
        .await;
    let flags = match current {
        Ok(reply) => reply.get(1).cloned().unwrap_or_default(),
        Err(err) => {
            tracing::warn!(error = %err, "cannot read notify-keyspace-events; waiters will poll");
            return false;
        }
    };
    let has = |c: char| flags.contains(c);
    if has('K') && (has('A') || (has('g') && has('$') && has('x'))) {
        return true;
    }
    if !configure {
        tracing::warn!(flags = %flags, "keyspace notifications are off and REDIS_CONFIGURE_NOTIFICATIONS=false; waiters will poll");
        return false;
    }
    let mut wanted = flags.clone();
    for c in ['K', 'g', '$', 'x'] {
        if !wanted.contains(c) {
            wanted.push(c);
        }
    }
    let set: RedisResult<()> = link
        .query(
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg(&wanted),
        )
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

    #[test]
    fn an_idle_instance_is_pinged_well_within_the_window() {
        for down_after_ms in [100, 200, 1_000, 3_000, 60_000] {
            let health = Health::new(
                Duration::from_millis(down_after_ms),
                Duration::from_millis(down_after_ms),
            );
            assert!(health.ping_every() * 3 < health.down_after.max(Duration::from_millis(160)));
        }
    }

    #[test]
    fn down_means_no_success_for_the_whole_window() {
        let health = Health::new(Duration::from_millis(50), Duration::from_millis(50));
        assert!(!health.is_up(), "never succeeded: down");
        health.succeeded();
        assert!(health.is_up());
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            !health.is_up(),
            "nothing succeeded for longer than the window"
        );
        health.succeeded();
        assert!(health.is_up());
    }

    #[test]
    fn refusals_count_only_after_their_own_window() {
        // A cluster failing a primary over: reads succeed, coordination
        // commands are refused for longer than `down_after`.
        let health = Health::new(Duration::from_millis(30), Duration::from_millis(150));
        health.succeeded();
        health.refused();
        std::thread::sleep(Duration::from_millis(60));
        health.succeeded();
        assert!(health.is_up(), "refused for less than refuse_after: up");
        std::thread::sleep(Duration::from_millis(120));
        health.succeeded();
        assert!(
            !health.is_up(),
            "refused for longer than refuse_after: down"
        );
    }
}
