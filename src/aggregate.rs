//! The heart of the gateway: from planned queries to answers, with as few BI
//! calls as possible.
//!
//! For one dataloader batch, [`Aggregator::resolve`]:
//! 1. joins the in-process flight of every key, or starts it (no store access);
//! 2. hands the flights it started to a task that no request owns, which runs
//!    the coalescing protocol ([`Aggregator::produce`]): look every key up and
//!    try its lock at once (a key in the store is a hit), call the BI at once
//!    for the keys won (batched by Cube's blending rules), wait for each key
//!    lost on its own, and try again the keys whose holder went away;
//! 3. waits for every flight, each until the request's deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, join_all};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::bi::protocol::CubeQuery;
use crate::bi::{BiAnswer, BiClient, BiError};
use crate::cache::{AnswerError, AnswerErrorKind, Cached, Entry, unix_micros};
use crate::coalesce::{
    Coordinator, Decision, FlightLead, Flights, Joined, Lease, Origin, Resolved, Waited,
};
use crate::query::{CacheKey, Granularity, PlannedQuery};
use crate::telemetry::names;

/// How an answer was obtained, as `cache { status }` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, async_graphql::Enum)]
pub enum CacheStatus {
    /// Served from the cache.
    Hit,
    /// This request's own BI call produced it.
    Miss,
    /// Waited for a BI call that another request made, here or on another instance.
    Coalesced,
}

impl CacheStatus {
    fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
        }
    }
}

/// One `aggregate` field's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub entry: Arc<Entry>,
    pub status: CacheStatus,
    /// Its entry was produced without cross-instance coordination (Redis
    /// unreachable): the response says it is degraded.
    pub degraded: bool,
}

pub type AnswerResult = Result<Answer, AnswerError>;

/// Settings the aggregator needs beyond its collaborators.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub max_batch_size: usize,
    pub instance_id: String,
    pub row_limit: u32,
}

pub struct Aggregator {
    coordinator: Arc<dyn Coordinator>,
    flights: Arc<Flights>,
    bi: BiClient,
    settings: AggregatorSettings,
    /// Until when this process calls the BI no more (its last 429): checked
    /// before every call, so a flight that was already deciding when the
    /// rate limit came does not call anyway.
    cooldown: Mutex<Option<Instant>>,
}

/// A key this process leads: the flight to complete and the lease to settle.
struct Production {
    query: PlannedQuery,
    flight: FlightLead,
    lease: Lease,
}

/// A key the producing task has yet to settle.
struct Pending {
    query: PlannedQuery,
    flight: FlightLead,
    /// Tried before and lost to a holder that went away since.
    takeover: bool,
}

/// Holders of several keys (one batch of theirs) go away together: waits
/// that end within this window are tried again in one follow-up round.
const FOLLOW_UP_WINDOW: Duration = Duration::from_millis(5);

impl Aggregator {
    pub fn new(
        coordinator: Arc<dyn Coordinator>,
        bi: BiClient,
        settings: AggregatorSettings,
    ) -> Arc<Aggregator> {
        Arc::new(Aggregator {
            coordinator,
            flights: Arc::new(Flights::default()),
            bi,
            settings,
            cooldown: Mutex::new(None),
        })
    }

    /// The answer for `query` if process memory has it: no I/O, no waiting.
    pub fn peek(&self, query: &PlannedQuery) -> Option<AnswerResult> {
        let answer = answer_from_cache(self.coordinator.peek(&query.key)?);
        count_answer(&answer);
        Some(answer)
    }

    /// Answers every query of one batch; each gets its own answer or error.
    pub async fn resolve(
        self: &Arc<Self>,
        queries: &[PlannedQuery],
        deadline: Instant,
    ) -> HashMap<CacheKey, AnswerResult> {
        let mut to_lead = Vec::new();
        let mut waits = Vec::with_capacity(queries.len());
        // In-process first: identical requests share one flight before the
        // store (Redis) is touched at all, the lookup included.
        for query in queries {
            match self.flights.join(&query.key, deadline) {
                Joined::Lead(lead, watch) => {
                    to_lead.push((query.clone(), lead));
                    waits.push((query.key.clone(), watch, true));
                }
                Joined::Follow(watch) => waits.push((query.key.clone(), watch, false)),
            }
        }
        if !to_lead.is_empty() {
            // Spawned, so that no request owns the lookup or the BI call: a
            // client that goes away does not cancel them for the others, and
            // a call already paid for still fills the cache.
            let this = Arc::clone(self);
            let span = tracing::info_span!("aggregate.produce", keys = to_lead.len() as i64);
            tokio::spawn(async move { this.produce(to_lead).await }.instrument(span));
        }

        let waited = join_all(waits.into_iter().map(|(key, watch, led)| async move {
            let started = std::time::Instant::now();
            let (outcome, ended) = match tokio::time::timeout_at(deadline, watch.outcome()).await {
                Ok(Ok(resolved)) => (Ok(resolved), "answer"),
                Ok(Err(error)) => (Err(error), "error"),
                Err(_) => (
                    Err(AnswerError::unavailable(
                        "no answer from the BI before the request's deadline",
                    )),
                    "timeout",
                ),
            };
            if !led {
                metrics::histogram!(names::COALESCE_WAIT, "outcome" => ended)
                    .record(started.elapsed().as_secs_f64());
            }
            let answer = outcome.map(|resolved| {
                let status = match (led, resolved.origin) {
                    (_, Origin::Found) => CacheStatus::Hit,
                    (true, Origin::Produced) => CacheStatus::Miss,
                    _ => CacheStatus::Coalesced,
                };
                if status == CacheStatus::Coalesced {
                    record_wake(&resolved);
                }
                Answer {
                    degraded: resolved.entry.uncoordinated,
                    entry: resolved.entry,
                    status,
                }
            });
            (key, answer)
        }))
        .await;
        let answers: HashMap<CacheKey, AnswerResult> = waited.into_iter().collect();
        answers.values().for_each(count_answer);
        answers
    }

    /// The coalescing protocol for the flights this process leads: **try,
    /// then call, then wait.** Every key is looked up and its lock tried at
    /// once (one round trip: a key already in the store is a hit); the BI is
    /// called at once for the keys won; each key lost is waited on by
    /// itself, and when its holder goes away without an answer it is tried
    /// again in a follow-up round. No lock is held while waiting for
    /// anything but its own BI call.
    async fn produce(self: Arc<Self>, leads: Vec<(PlannedQuery, FlightLead)>) {
        let mut pending: Vec<Pending> = leads
            .into_iter()
            .map(|(query, flight)| Pending {
                query,
                flight,
                takeover: false,
            })
            .collect();
        // Three kinds of work, all under way at once: tries for the lead
        // (one round trip each), BI batches (spawned: no request owns them),
        // and waits for other holders, one per key.
        let mut tries: FuturesUnordered<BoxFuture<'_, Vec<(Pending, Decision)>>> =
            FuturesUnordered::new();
        let mut calls: FuturesUnordered<JoinHandle<()>> = FuturesUnordered::new();
        let mut waits: FuturesUnordered<BoxFuture<'_, Option<Pending>>> = FuturesUnordered::new();
        loop {
            if !pending.is_empty() {
                tries.push(self.try_round(std::mem::take(&mut pending)).boxed());
            }
            if tries.is_empty() && calls.is_empty() && waits.is_empty() {
                return;
            }
            tokio::select! {
                Some(decided) = tries.next(), if !tries.is_empty() => {
                    let mut won = Vec::new();
                    for (key, decision) in decided {
                        match decision {
                            Decision::Lead(lease) => {
                                if key.takeover {
                                    tracing::info!(
                                        key = key.query.key.short(),
                                        "took over a key whose holder went away"
                                    );
                                    metrics::counter!(names::TAKEOVERS).increment(1);
                                }
                                won.push(Production {
                                    query: key.query,
                                    flight: key.flight,
                                    lease,
                                });
                            }
                            Decision::Settled(cached) => {
                                let origin = if key.takeover {
                                    Origin::Waited
                                } else {
                                    Origin::Found
                                };
                                key.flight.complete(resolved(cached, origin));
                            }
                            Decision::Busy => waits.push(self.wait_for(key).boxed()),
                            Decision::Failed(error) => key.flight.complete(Err(error)),
                        }
                    }
                    for batch in into_batches(won, self.settings.max_batch_size) {
                        let this = Arc::clone(&self);
                        calls.push(tokio::spawn(this.produce_batch(batch).in_current_span()));
                    }
                }
                Some(_) = calls.next(), if !calls.is_empty() => {}
                Some(gone) = waits.next(), if !waits.is_empty() => {
                    pending.extend(gone);
                    if !pending.is_empty() {
                        // Holders of several keys (one batch of theirs) go
                        // away together: one follow-up round for them all.
                        let gather = tokio::time::sleep(FOLLOW_UP_WINDOW);
                        tokio::pin!(gather);
                        loop {
                            tokio::select! {
                                () = &mut gather => break,
                                Some(gone) = waits.next(), if !waits.is_empty() => pending.extend(gone),
                            }
                        }
                    }
                }
            }
        }
    }

    /// One try for the lead of every key in `round` (a lookup too).
    async fn try_round(&self, round: Vec<Pending>) -> Vec<(Pending, Decision)> {
        let keys: Vec<CacheKey> = round.iter().map(|p| p.query.key.clone()).collect();
        let deadline = round
            .iter()
            .map(|p| p.flight.deadline().get())
            .max()
            .unwrap_or_else(Instant::now);
        let decisions = self.coordinator.try_lead(&keys, deadline).await;
        round.into_iter().zip(decisions).collect()
    }

    /// Waits for the holder of `key`'s lock; gives the key back when the
    /// holder went away without an answer.
    async fn wait_for(&self, key: Pending) -> Option<Pending> {
        match self
            .coordinator
            .wait(&key.query.key, key.flight.deadline())
            .await
        {
            Waited::Settled(cached) => {
                key.flight.complete(resolved(cached, Origin::Waited));
                None
            }
            Waited::HolderGone => Some(Pending {
                takeover: true,
                ..key
            }),
            Waited::Failed(error) => {
                key.flight.complete(Err(error));
                None
            }
        }
    }

    /// One BI call for a batch; when the BI rejects a batch of several, each
    /// query is asked again alone, so one bad panel does not fail the others.
    async fn produce_batch(self: Arc<Self>, batch: Vec<Production>) {
        if let Some(left) = self.cooldown_left() {
            // This process saw the 429 after these leads were taken: no
            // call, nothing stored (the store has the cool-down already),
            // the locks go back.
            let error = AnswerError::cooling_down(left);
            join_all(batch.into_iter().map(|production| async {
                self.coordinator.abandon(production.lease).await;
                production.flight.complete(Err(error.clone()));
            }))
            .await;
            return;
        }
        match self.call_bi(&batch).await {
            Ok(answer) => self.settle_rows(batch, answer).await,
            Err(err) if batch.len() > 1 && err.is_about_the_queries() => {
                tracing::info!(error = %err, queries = batch.len(), "BI rejected a batch; asking its queries one by one");
                join_all(batch.into_iter().map(|production| async {
                    let single = vec![production];
                    match self.call_bi(&single).await {
                        Ok(answer) => self.settle_rows(single, answer).await,
                        Err(err) => self.settle_bi_error(single, &err).await,
                    }
                }))
                .await;
            }
            Err(err) => self.settle_bi_error(batch, &err).await,
        }
    }

    async fn call_bi(&self, batch: &[Production]) -> Result<BiAnswer, BiError> {
        let queries: Vec<&CubeQuery> = batch.iter().map(|p| &*p.query.cube).collect();
        self.bi.load(&queries).await
    }

    fn cooldown_left(&self) -> Option<Duration> {
        let until = *self.cooldown.lock().unwrap_or_else(|p| p.into_inner());
        until
            .map(|until| until.saturating_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
    }

    async fn settle_rows(&self, batch: Vec<Production>, answer: BiAnswer) {
        let call = answer.call;
        let stores = batch
            .into_iter()
            .zip(answer.rows)
            .map(|(production, rows)| {
                let entry = Arc::new(
                    Entry::new(
                        rows,
                        self.settings.ttl,
                        &self.settings.instance_id,
                        self.settings.row_limit,
                    )
                    .produced_by_call(call.as_ref())
                    .uncoordinated(production.lease.is_degraded()),
                );
                let resolved = Resolved {
                    entry: Arc::clone(&entry),
                    origin: Origin::Produced,
                };
                // Store first, then wake: a request that arrives after the flight
                // ends (or a client that asks another instance next) must find the
                // answer in the store. The keys of a batch are stored side by side.
                async move {
                    self.coordinator.fill(production.lease, entry).await;
                    production.flight.complete(Ok(resolved));
                }
            });
        join_all(stores.collect::<Vec<_>>()).await;
    }

    async fn settle_bi_error(&self, batch: Vec<Production>, err: &BiError) {
        tracing::warn!(error = %err, kind = err.kind(), queries = batch.len(), "BI call failed");
        let error = answer_error(err);
        if error.kind == AnswerErrorKind::RateLimited {
            // Nobody calls the BI before it said it would take calls again:
            // not this process, and not any instance sharing the store.
            let period = error.remember_for(self.settings.negative_ttl);
            *self.cooldown.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + period);
            self.coordinator.cool_down(period).await;
        }
        self.settle_error(batch, error).await;
    }

    async fn settle_error(&self, batch: Vec<Production>, error: AnswerError) {
        let stores = batch.into_iter().map(|production| {
            let error = error.clone();
            async move {
                self.coordinator.fail(production.lease, error.clone()).await;
                production.flight.complete(Err(error));
            }
        });
        join_all(stores.collect::<Vec<_>>()).await;
    }
}

/// The answer a BI failure gives every request that waited for the call.
pub fn answer_error(err: &BiError) -> AnswerError {
    let kind = match err {
        BiError::Rejected { .. } | BiError::Failed { .. } | BiError::BadResponse(_) => {
            AnswerErrorKind::BiError
        }
        BiError::Unavailable { .. } | BiError::Unreachable(_) | BiError::Timeout(_) => {
            AnswerErrorKind::BiUnavailable
        }
        BiError::RateLimited { .. } => AnswerErrorKind::RateLimited,
    };
    let retry_after_secs = match err {
        BiError::RateLimited { retry_after } => retry_after.map(|d| d.as_secs().max(1)),
        _ => None,
    };
    AnswerError {
        kind,
        message: err.to_string(),
        retry_after_secs,
    }
}

fn resolved(cached: Cached, origin: Origin) -> Result<Resolved, AnswerError> {
    match cached {
        Cached::Value(entry) => Ok(Resolved { entry, origin }),
        Cached::Error(negative) => Err(negative.error.clone()),
    }
}

/// How soon after the producer got its rows a waiter was answered:
/// the follower wake-up latency (value written, waiter woken, answer ready).
fn record_wake(resolved: &Resolved) {
    let micros = unix_micros().saturating_sub(resolved.entry.produced_at_us);
    let via = if resolved.origin == Origin::Waited {
        "redis"
    } else {
        "process"
    };
    metrics::histogram!(names::WAKE_LATENCY, "via" => via).record(micros as f64 / 1e6);
    tracing::debug!(target: "analytics_gateway::wake", wake_us = micros, via, "follower answered");
}

fn count_answer(answer: &AnswerResult) {
    let label = match answer {
        Ok(answer) => answer.status.label(),
        Err(_) => "error",
    };
    metrics::counter!(names::CACHE_LOOKUPS, "status" => label).increment(1);
}

fn answer_from_cache(cached: Cached) -> AnswerResult {
    match cached {
        Cached::Value(entry) => Ok(Answer {
            degraded: entry.uncoordinated,
            entry,
            status: CacheStatus::Hit,
        }),
        Cached::Error(negative) => {
            metrics::counter!(names::NEGATIVE_CACHE_HITS).increment(1);
            Err(negative.error.clone())
        }
    }
}

/// Splits productions into BI calls as Cube's blending rules allow: queries
/// of one granularity together (at most `max_batch_size` a call), and each
/// totals query (no granularity) on its own.
fn into_batches(productions: Vec<Production>, max_batch_size: usize) -> Vec<Vec<Production>> {
    let mut by_granularity: BTreeMap<Granularity, Vec<Production>> = BTreeMap::new();
    let mut batches = Vec::new();
    for production in productions {
        match production.query.granularity {
            Some(granularity) => by_granularity
                .entry(granularity)
                .or_default()
                .push(production),
            None => batches.push(vec![production]),
        }
    }
    for group in by_granularity.into_values() {
        let mut group = group.into_iter().peekable();
        while group.peek().is_some() {
            batches.push(group.by_ref().take(max_batch_size.max(1)).collect());
        }
    }
    batches
}
