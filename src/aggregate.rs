//! The heart of the gateway: from planned queries to answers, with as few BI
//! calls as possible.
//!
//! For one dataloader batch, [`Aggregator::resolve`]:
//! 1. joins the in-process flight of every key that has one (no store access);
//! 2. looks the other keys up in the store in one step (hits answer at once),
//!    and joins or starts the in-process flight of each miss;
//! 3. hands the flights it started to a task that no request owns, which asks
//!    the coordinator for leadership, groups the keys it leads into BI batches
//!    by Cube's blending rules, calls the BI, and fills or fails each key;
//! 4. waits for every flight, each until the request's deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

use crate::bi::protocol::CubeQuery;
use crate::bi::{BiAnswer, BiClient};
use crate::cache::{AnswerError, Cached, Entry};
use crate::coalesce::{
    Coordinator, FlightLead, Flights, Joined, LeadOrWait, Lease, Origin, Resolved,
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
}

pub type AnswerResult = Result<Answer, AnswerError>;

/// Settings the aggregator needs beyond its collaborators.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    pub ttl: Duration,
    pub max_batch_size: usize,
    /// How long the producing task may wait for another instance's leader.
    pub produce_timeout: Duration,
    pub instance_id: String,
    pub row_limit: u32,
}

pub struct Aggregator {
    coordinator: Arc<dyn Coordinator>,
    flights: Arc<Flights>,
    bi: BiClient,
    settings: AggregatorSettings,
}

/// A key this process leads: the flight to complete and the lease to settle.
struct Production {
    query: PlannedQuery,
    flight: FlightLead,
    lease: Lease,
}

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
        })
    }

    pub fn coordinator(&self) -> &Arc<dyn Coordinator> {
        &self.coordinator
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
        let mut answers = HashMap::with_capacity(queries.len());
        let mut to_lead = Vec::new();
        let mut waits = Vec::new();

        // In-process first: a key whose flight is already on its way joins it
        // before the store (Redis) is touched at all.
        let mut to_look_up = Vec::with_capacity(queries.len());
        for query in queries {
            match self.flights.follow(&query.key) {
                Some(watch) => waits.push((query.key.clone(), watch, false)),
                None => to_look_up.push(query),
            }
        }

        let keys: Vec<CacheKey> = to_look_up.iter().map(|q| q.key.clone()).collect();
        let found = if keys.is_empty() {
            Vec::new()
        } else {
            let lookup_span =
                tracing::info_span!("cache.lookup", keys = keys.len() as i64, found = Empty);
            let found = self
                .coordinator
                .lookup(&keys)
                .instrument(lookup_span.clone())
                .await;
            lookup_span.record("found", found.iter().filter(|f| f.is_some()).count() as i64);
            found
        };
        for (query, found) in to_look_up.into_iter().zip(found) {
            if let Some(cached) = found {
                answers.insert(query.key.clone(), answer_from_cache(cached));
                continue;
            }
            match self.flights.join(&query.key) {
                Joined::Lead(lead, watch) => {
                    to_lead.push((query.clone(), lead));
                    waits.push((query.key.clone(), watch, true));
                }
                Joined::Follow(watch) => waits.push((query.key.clone(), watch, false)),
            }
        }
        if !to_lead.is_empty() {
            // Spawned, so that no request owns the BI call: a client that goes
            // away does not cancel it for the others, and a call already paid
            // for still fills the cache.
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
                Answer {
                    entry: resolved.entry,
                    status,
                }
            });
            (key, answer)
        }))
        .await;
        answers.extend(waited);

        answers.values().for_each(count_answer);
        answers
    }

    /// Produces the answers of the flights this process leads.
    async fn produce(self: Arc<Self>, leads: Vec<(PlannedQuery, FlightLead)>) {
        let deadline = Instant::now() + self.settings.produce_timeout;
        let decided = join_all(leads.into_iter().map(|(query, flight)| async {
            let decision = self.coordinator.lead_or_wait(&query.key, deadline).await;
            (query, flight, decision)
        }))
        .await;

        let mut productions = Vec::new();
        for (query, flight, decision) in decided {
            match decision {
                LeadOrWait::Lead(lease) => productions.push(Production {
                    query,
                    flight,
                    lease,
                }),
                LeadOrWait::Failed(error) => flight.complete(Err(error)),
                LeadOrWait::Settled { cached, origin } => {
                    flight.complete(match cached {
                        Cached::Value(entry) => Ok(Resolved { entry, origin }),
                        Cached::Error(negative) => Err(negative.error.clone()),
                    });
                }
            }
        }

        let batches = into_batches(productions, self.settings.max_batch_size);
        join_all(batches.into_iter().map(|batch| self.produce_batch(batch))).await;
    }

    /// One BI call for a batch; when the BI rejects a batch of several, each
    /// query is asked again alone, so one bad panel does not fail the others.
    async fn produce_batch(&self, batch: Vec<Production>) {
        match self.call_bi(&batch).await {
            Ok(answer) => self.settle_rows(batch, answer).await,
            Err(err) if batch.len() > 1 && err.is_about_the_queries() => {
                tracing::info!(error = %err, queries = batch.len(), "BI rejected a batch; asking its queries one by one");
                join_all(batch.into_iter().map(|production| async move {
                    let single = vec![production];
                    match self.call_bi(&single).await {
                        Ok(answer) => self.settle_rows(single, answer).await,
                        Err(err) => self.settle_error(single, &err).await,
                    }
                }))
                .await;
            }
            Err(err) => self.settle_error(batch, &err).await,
        }
    }

    async fn call_bi(&self, batch: &[Production]) -> Result<BiAnswer, crate::bi::BiError> {
        let queries: Vec<&CubeQuery> = batch.iter().map(|p| &*p.query.cube).collect();
        self.bi.load(&queries).await
    }

    async fn settle_rows(&self, batch: Vec<Production>, answer: BiAnswer) {
        let call = answer.call;
        for (production, rows) in batch.into_iter().zip(answer.rows) {
            let entry = Arc::new(
                Entry::new(
                    rows,
                    self.settings.ttl,
                    &self.settings.instance_id,
                    self.settings.row_limit,
                )
                .produced_by_call(call.as_ref()),
            );
            // Store first, then wake: a request arriving after the flight
            // ends must find the answer in the store.
            self.coordinator
                .fill(production.lease, Arc::clone(&entry))
                .await;
            production.flight.complete(Ok(Resolved {
                entry,
                origin: Origin::Produced,
            }));
        }
    }

    async fn settle_error(&self, batch: Vec<Production>, err: &crate::bi::BiError) {
        tracing::warn!(error = %err, kind = err.kind(), queries = batch.len(), "BI call failed");
        let error = AnswerError::from(err);
        for production in batch {
            self.coordinator.fail(production.lease, error.clone()).await;
            production.flight.complete(Err(error.clone()));
        }
    }
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
