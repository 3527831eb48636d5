//! The heart of the gateway: from planned queries to answers, with as few BI
//! calls as possible, and an entry's life cycle: fresh, then stale (served
//! while one refresh runs), then gone.
//!
//! For one dataloader batch, [`Aggregator::resolve`]:
//! 1. joins the in-process flight of every key, or starts it (no store access);
//! 2. hands the flights it started to a task that no request owns, which runs
//!    the coalescing protocol ([`Aggregator::produce`]): look every key up and
//!    try its lock at once (a key in the store is a hit), call the BI at once
//!    for the keys won (batched by Cube's blending rules), wait for each key
//!    lost on its own, and try again the keys whose holder went away;
//! 3. waits for every flight, each until the request's deadline.
//!
//! An entry found stale (its fresh time over, or an invalidation after it)
//! is served at once, flagged stale, and causes one background refresh of
//! its key ([`Aggregator::refresh`]): the same protocol, in flights of their
//! own that no request waits on, replacing exactly that entry. A hot entry
//! (read more than once in its fresh time) is refreshed a little before it
//! turns stale, earlier the longer its BI call took (XFetch, Vattani et al.,
//! VLDB 2015), within a per-instance budget.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, join_all};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::bi::protocol::CubeQuery;
use crate::bi::{BiAnswer, BiClient, BiError, TokenScope};
use crate::cache::{AnswerError, AnswerErrorKind, Cached, Entry, Lifetime, unix_micros};
use crate::coalesce::{
    Coordinator, Decision, FlightLead, FlightWatch, Flights, Invalidations, Joined, Lease, Origin,
    Resolved, Verdict, Waited, Want,
};
use crate::query::{AnswerScope, CacheKey, Granularity, PlannedQuery};
use crate::telemetry::{self, names};

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
    /// Served past its fresh time (or after an invalidation) while one
    /// refresh runs.
    pub stale: bool,
    /// Its entry was produced without cross-instance coordination (Redis
    /// unreachable): the response says it is degraded.
    pub degraded: bool,
}

pub type AnswerResult = Result<Answer, AnswerError>;

/// One `aggregate` answer given from the cache: the question and the entry
/// that answered it.
pub type ServedEntry = (PlannedQuery, Arc<Entry>);

/// Settings the aggregator needs beyond its collaborators.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    pub lifetime: Lifetime,
    pub negative_ttl: Duration,
    pub max_batch_size: usize,
    pub instance_id: String,
    pub row_limit: u32,
    pub refresh: RefreshSettings,
}

/// When entries are refreshed before anyone needs them.
#[derive(Debug, Clone)]
pub struct RefreshSettings {
    /// Reads of an entry's in-process copy, during its fresh time, that make
    /// it hot (refreshed ahead of its fresh time's end).
    pub ahead_min_reads: u32,
    /// Refreshes ahead of time this instance starts per minute, at most;
    /// past it, keys are left to stale-while-revalidate.
    pub ahead_per_minute: u32,
    /// How long a refresh may keep trying Redis (it belongs to no request).
    pub timeout: Duration,
}

/// What made a refresh start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshTrigger {
    /// A read found the entry past its fresh time.
    Stale,
    /// A hot entry's fresh time is nearly over.
    Ahead,
    /// A read found the entry invalidated.
    Invalidation,
    /// A live panel's interval is over.
    Live,
}

impl RefreshTrigger {
    pub fn label(self) -> &'static str {
        match self {
            RefreshTrigger::Stale => "stale",
            RefreshTrigger::Ahead => "ahead",
            RefreshTrigger::Invalidation => "invalidation",
            RefreshTrigger::Live => "live",
        }
    }
}

/// How an entry may be served now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    Fresh,
    /// Servable, flagged stale, while a refresh runs.
    Stale(RefreshTrigger),
    /// Not servable: evicted by an invalidation.
    Gone,
}

pub struct Aggregator {
    coordinator: Arc<dyn Coordinator>,
    invalidations: Arc<Invalidations>,
    flights: Arc<Flights>,
    /// Refreshes under way, by key: no request waits on them.
    refreshes: Arc<Flights>,
    /// Keys whose last refresh failed: not tried again while the failure is
    /// remembered (the stale entry is served meanwhile).
    refresh_failed: moka::sync::Cache<CacheKey, ()>,
    /// Refreshes ahead of time started in the current minute.
    ahead_budget: Mutex<(u64, u32)>,
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
    /// What made it a refresh, when it is one.
    refresh: Option<RefreshTrigger>,
}

/// A key the producing task has yet to settle.
struct Pending {
    query: PlannedQuery,
    flight: FlightLead,
    /// The entry to replace (a refresh, or an evicted entry found).
    replaces: Option<String>,
    /// Tried before and lost to a holder that went away since.
    takeover: bool,
    /// A background refresh: never waits for another holder, and is not
    /// answered to any request.
    refresh: Option<RefreshTrigger>,
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
            invalidations: Arc::clone(coordinator.invalidations()),
            coordinator,
            flights: Arc::new(Flights::default()),
            refreshes: Arc::new(Flights::default()),
            refresh_failed: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.negative_ttl.max(Duration::from_millis(1)))
                .build(),
            ahead_budget: Mutex::new((0, 0)),
            bi,
            settings,
            cooldown: Mutex::new(None),
        })
    }

    /// The answer for `query` if process memory has it: no I/O, no waiting.
    /// A stale entry is answered (and its refresh started); an evicted one
    /// is not an answer.
    pub fn peek(self: &Arc<Self>, query: &PlannedQuery) -> Option<AnswerResult> {
        let answer = match self.coordinator.peek(&query.key)? {
            Cached::Value(entry) => {
                let stale = match self.freshness(&entry, &query.scope) {
                    Freshness::Gone => return None,
                    Freshness::Fresh => {
                        self.consider_refreshing_ahead(query, &entry);
                        false
                    }
                    Freshness::Stale(trigger) => {
                        self.refresh(query, &entry, trigger);
                        true
                    }
                };
                Ok(hit(entry, stale))
            }
            Cached::Error(negative) => {
                metrics::counter!(names::NEGATIVE_CACHE_HITS).increment(1);
                Err(negative.error.clone())
            }
        };
        count_answer(&answer);
        Some(answer)
    }

    /// Whether entries served moments ago are what [`Aggregator::peek`]
    /// would serve now: the very same entries (held weakly by whoever asks,
    /// so that they never outlive process memory's copy), still fresh. When
    /// they are, they are counted as served again (hits, reads that make a
    /// key hot for refresh-ahead), exactly as `peek` counts.
    pub fn serves_again(self: &Arc<Self>, served: &[(PlannedQuery, Weak<Entry>)]) -> bool {
        let mut entries = Vec::with_capacity(served.len());
        for (query, kept) in served {
            match self.coordinator.peek(&query.key) {
                Some(Cached::Value(now))
                    if std::ptr::eq(Arc::as_ptr(&now), kept.as_ptr())
                        && self.freshness(&now, &query.scope) == Freshness::Fresh =>
                {
                    entries.push(now);
                }
                _ => return false,
            }
        }
        for ((query, _), entry) in served.iter().zip(&entries) {
            self.consider_refreshing_ahead(query, entry);
            metrics::counter!(names::CACHE_LOOKUPS, "status" => CacheStatus::Hit.label())
                .increment(1);
        }
        true
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
                    to_lead.push(Pending {
                        query: query.clone(),
                        flight: lead,
                        replaces: None,
                        takeover: false,
                        refresh: None,
                    });
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
                if resolved.stale {
                    metrics::counter!(names::STALE_SERVES).increment(1);
                }
                Answer {
                    degraded: resolved.entry.uncoordinated,
                    stale: resolved.stale,
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

    /// How `entry` may be served now.
    fn freshness(&self, entry: &Entry, scope: &AnswerScope) -> Freshness {
        let stale_allowed = !self.settings.lifetime.stale.is_zero();
        match self.invalidations.verdict(entry.generation, scope) {
            Verdict::Evicted => Freshness::Gone,
            Verdict::Stale if stale_allowed => Freshness::Stale(RefreshTrigger::Invalidation),
            Verdict::Stale => Freshness::Gone,
            Verdict::Untouched if entry.is_fresh() => Freshness::Fresh,
            Verdict::Untouched if stale_allowed => Freshness::Stale(RefreshTrigger::Stale),
            Verdict::Untouched => Freshness::Gone,
        }
    }

    /// Counts a read of a fresh entry and, if it is hot and its fresh time
    /// nearly over, refreshes it ahead: with XFetch's probability, which
    /// spreads the instances' refreshes out (the first one wins, the others
    /// find its entry), within the budget.
    fn consider_refreshing_ahead(self: &Arc<Self>, query: &PlannedQuery, entry: &Entry) {
        let reads = entry.reads.fetch_add(1, Ordering::Relaxed) + 1;
        if reads < self.settings.refresh.ahead_min_reads {
            return;
        }
        let left = entry.fresh_left();
        let delta = entry.compute.max(Duration::from_millis(1));
        // -ln(U) is past 20 with a probability of 2e-9: nothing to draw.
        if left > delta * 20 {
            return;
        }
        let early = delta.mul_f64(-fastrand::f64().max(f64::MIN_POSITIVE).ln());
        if early >= left {
            self.refresh(query, entry, RefreshTrigger::Ahead);
        }
    }

    /// Whether a unit of this minute's refresh budget is left (not spent).
    fn has_ahead_budget(&self) -> bool {
        let minute = crate::cache::unix_millis() / 60_000;
        let budget = self.ahead_budget.lock().unwrap_or_else(|p| p.into_inner());
        budget.0 != minute || budget.1 < self.settings.refresh.ahead_per_minute
    }

    fn take_ahead_budget(&self, trigger: RefreshTrigger) -> bool {
        let minute = crate::cache::unix_millis() / 60_000;
        let mut budget = self.ahead_budget.lock().unwrap_or_else(|p| p.into_inner());
        if budget.0 != minute {
            *budget = (minute, 0);
        }
        if budget.1 >= self.settings.refresh.ahead_per_minute {
            metrics::counter!(names::REFRESHES, "trigger" => trigger.label(), "outcome" => "over_budget")
                .increment(1);
            return false;
        }
        budget.1 += 1;
        true
    }

    /// Refreshes `query`'s key for a live panel whose interval is over:
    /// replacing the entry `replaces` (the one its subscribers have), or
    /// producing it when there is none. The same protocol as every refresh,
    /// so across instances only the holder of the key's lock calls the BI;
    /// the others learn of its entry when it is stored.
    ///
    /// Returns the refresh's flight when this call started one: what it
    /// stored (or found stored), or an error when it did not produce (another
    /// instance holds the lock, the budget is spent, the BI failed).
    pub fn refresh_live(
        self: &Arc<Self>,
        query: &PlannedQuery,
        replaces: Option<&str>,
    ) -> Option<FlightWatch> {
        self.start_refresh(query, replaces, RefreshTrigger::Live)
    }

    /// Starts one background refresh of `query`'s key, replacing `entry`,
    /// unless one is under way in this process or the last one failed
    /// moments ago. Across instances, the store's lock makes it one.
    fn refresh(self: &Arc<Self>, query: &PlannedQuery, entry: &Entry, trigger: RefreshTrigger) {
        self.start_refresh(query, Some(&entry.id), trigger);
    }

    fn start_refresh(
        self: &Arc<Self>,
        query: &PlannedQuery,
        replaces: Option<&str>,
        trigger: RefreshTrigger,
    ) -> Option<FlightWatch> {
        if self.refresh_failed.contains_key(&query.key) {
            return None;
        }
        let deadline = Instant::now() + self.settings.refresh.timeout;
        let Joined::Lead(lead, watch) = self.refreshes.join(&query.key, deadline) else {
            return None;
        };
        // Only a refresh that starts spends the budget (not the reads of a
        // key whose refresh is already under way). A live panel's refresh is
        // one ahead of any reader's need: it spends the same budget, but only
        // on the instance that wins the key's lock (every instance with
        // subscribers asks; one calls the BI).
        if trigger == RefreshTrigger::Ahead && !self.take_ahead_budget(trigger) {
            return None;
        }
        // An instance past its budget does not ask at all: winning the lock
        // and giving it back would leave the key to nobody.
        if trigger == RefreshTrigger::Live && !self.has_ahead_budget() {
            count_refreshed(Some(trigger), "over_budget");
            return None;
        }
        // Its own trace, linked from the request that caused it: a refresh
        // belongs to no request.
        let span = tracing::info_span!(
            parent: None,
            "cache.refresh",
            cache.key = query.key.short(),
            trigger = trigger.label(),
        );
        if let Some((trace_id, span_id)) = telemetry::span_ids(&span) {
            telemetry::link_to(&tracing::Span::current(), &trace_id, &span_id);
        }
        let pending = vec![Pending {
            query: query.clone(),
            flight: lead,
            replaces: replaces.map(str::to_owned),
            takeover: false,
            refresh: Some(trigger),
        }];
        let this = Arc::clone(self);
        tokio::spawn(async move { this.produce(pending).await }.instrument(span));
        Some(watch)
    }

    /// The coalescing protocol for the flights this process leads: **try,
    /// then call, then wait.** Every key is looked up and its lock tried at
    /// once (one round trip: a key already in the store is a hit); the BI is
    /// called at once for the keys won; each key lost is waited on by
    /// itself, and when its holder goes away without an answer it is tried
    /// again in a follow-up round. No lock is held while waiting for
    /// anything but its own BI call.
    async fn produce(self: Arc<Self>, leads: Vec<Pending>) {
        let mut pending = leads;
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
                            Decision::Lead(lease)
                                if key.refresh == Some(RefreshTrigger::Live)
                                    && !self.take_ahead_budget(RefreshTrigger::Live) =>
                            {
                                // Past the budget: the lock given back at
                                // once, the subscribers keep their rows.
                                let coordinator = Arc::clone(&self.coordinator);
                                tokio::spawn(async move { coordinator.abandon(lease).await });
                            }
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
                                    refresh: key.refresh,
                                });
                            }
                            Decision::Settled(cached) => {
                                let origin = if key.takeover {
                                    Origin::Waited
                                } else {
                                    Origin::Found
                                };
                                if let Some(again) = self.settle_found(key, cached, origin) {
                                    pending.push(again);
                                }
                            }
                            Decision::Busy if key.refresh.is_some() => {
                                // Another instance is refreshing it.
                                count_refresh(&key, "elsewhere");
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
        let wants: Vec<Want> = round
            .iter()
            .map(|p| Want {
                key: p.query.key.clone(),
                replaces: p.replaces.clone(),
            })
            .collect();
        let deadline = round
            .iter()
            .map(|p| p.flight.deadline().get())
            .max()
            .unwrap_or_else(Instant::now);
        let decisions = self.coordinator.try_lead(&wants, deadline).await;
        round.into_iter().zip(decisions).collect()
    }

    /// Completes `key`'s flight with what the store had (or what the holder
    /// it waited for stored); gives the key back when that is an evicted
    /// entry (it must be produced again).
    fn settle_found(
        self: &Arc<Self>,
        key: Pending,
        cached: Cached,
        origin: Origin,
    ) -> Option<Pending> {
        let entry = match cached {
            Cached::Error(negative) => {
                if key.refresh.is_some() {
                    // The last try failed moments ago: the stale entry
                    // stays served while the failure is remembered.
                    self.refresh_failed.insert(key.query.key.clone(), ());
                    count_refresh(&key, "remembered_error");
                }
                key.flight.complete(Err(negative.error.clone()));
                return None;
            }
            Cached::Value(entry) => entry,
        };
        if key.refresh.is_some() {
            // Somebody else refreshed it already.
            count_refresh(&key, "elsewhere");
            key.flight.complete(Ok(Resolved::new(entry, origin)));
            return None;
        }
        match self.freshness(&entry, &key.query.scope) {
            Freshness::Fresh => {
                key.flight.complete(Ok(Resolved::new(entry, origin)));
                None
            }
            Freshness::Stale(trigger) => {
                self.refresh(&key.query, &entry, trigger);
                key.flight.complete(Ok(Resolved {
                    stale: true,
                    ..Resolved::new(entry, origin)
                }));
                None
            }
            Freshness::Gone => Some(Pending {
                replaces: Some(entry.id.clone()),
                ..key
            }),
        }
    }

    /// Waits for the holder of `key`'s lock; gives the key back when the
    /// holder went away without an answer, or when its answer is no longer
    /// servable (an invalidation came after its BI call began).
    async fn wait_for(self: &Arc<Self>, key: Pending) -> Option<Pending> {
        match self
            .coordinator
            .wait(
                &key.query.key,
                key.replaces.as_deref(),
                key.flight.deadline(),
            )
            .await
        {
            Waited::Settled(cached) => self.settle_found(key, cached, Origin::Waited),
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
        let started = Instant::now();
        match self.call_bi(&batch).await {
            Ok(answer) => self.settle_rows(batch, answer, started.elapsed()).await,
            Err(err) if batch.len() > 1 && err.is_about_the_queries() => {
                tracing::info!(error = %err, queries = batch.len(), "BI rejected a batch; asking its queries one by one");
                join_all(batch.into_iter().map(|production| async {
                    let single = vec![production];
                    let started = Instant::now();
                    match self.call_bi(&single).await {
                        Ok(answer) => self.settle_rows(single, answer, started.elapsed()).await,
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
        // `into_batches` keeps one token scope per batch.
        let scope = batch
            .first()
            .map_or(TokenScope::Shared, |p| p.query.token_scope.clone());
        self.bi.load(&scope, &queries).await
    }

    fn cooldown_left(&self) -> Option<Duration> {
        let until = *self.cooldown.lock().unwrap_or_else(|p| p.into_inner());
        until
            .map(|until| until.saturating_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
    }

    async fn settle_rows(&self, batch: Vec<Production>, answer: BiAnswer, took: Duration) {
        let call = answer.call;
        let stores = batch
            .into_iter()
            .zip(answer.rows)
            .map(|(production, rows)| {
                let entry = Arc::new(
                    Entry::new(
                        rows,
                        self.settings.lifetime,
                        &self.settings.instance_id,
                        self.settings.row_limit,
                    )
                    .produced_by_call(call.as_ref())
                    .uncoordinated(production.lease.is_degraded())
                    .made(took, production.lease.generation),
                );
                let resolved = Resolved::new(Arc::clone(&entry), Origin::Produced);
                count_refreshed(production.refresh, "ok");
                // Store first, then wake: a request that arrives after the
                // flight ends (or a client that asks another instance next)
                // must find the answer in the store. The keys of a batch are
                // stored side by side.
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
        for production in &batch {
            if production.refresh.is_some() {
                // The stale entry stays served while the failure is remembered.
                self.refresh_failed.insert(production.query.key.clone(), ());
                count_refreshed(production.refresh, "error");
            }
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

fn hit(entry: Arc<Entry>, stale: bool) -> Answer {
    if stale {
        metrics::counter!(names::STALE_SERVES).increment(1);
    }
    Answer {
        degraded: entry.uncoordinated,
        entry,
        status: CacheStatus::Hit,
        stale,
    }
}

fn count_refresh(key: &Pending, outcome: &'static str) {
    count_refreshed(key.refresh, outcome);
}

/// Counts how a refresh ended: `ok` (its BI call), `error` (its BI call
/// failed), `elsewhere` (another instance refreshed, or is refreshing),
/// `remembered_error` (a failure is remembered), `over_budget`.
fn count_refreshed(refresh: Option<RefreshTrigger>, outcome: &'static str) {
    if let Some(trigger) = refresh {
        metrics::counter!(names::REFRESHES, "trigger" => trigger.label(), "outcome" => outcome)
            .increment(1);
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

/// Splits productions into BI calls as Cube's blending rules allow: queries
/// of one granularity together (at most `max_batch_size` a call), and each
/// totals query (no granularity) on its own. One HTTP request carries one
/// token, so a batch also holds queries of one token scope only (one
/// customer, when tokens are minted per customer). Timezones, filters,
/// orders and limits may differ within a batch: Cube honours each
/// sub-query's own.
fn into_batches(productions: Vec<Production>, max_batch_size: usize) -> Vec<Vec<Production>> {
    let mut by_granularity: BTreeMap<(Granularity, TokenScope), Vec<Production>> = BTreeMap::new();
    let mut batches = Vec::new();
    for production in productions {
        match production.query.granularity {
            Some(granularity) => by_granularity
                .entry((granularity, production.query.token_scope.clone()))
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
