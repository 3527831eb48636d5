//! The per-request dataloader: every `aggregate` field of one document is
//! collected into one batch (duplicates removed) and resolved together.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_graphql::dataloader::Loader;
use tokio::time::Instant;

use tracing::Instrument;
use tracing::field::Empty;

use crate::aggregate::{Aggregator, AnswerResult, CacheStatus};
use crate::auth::Identity;
use crate::cache::{AnswerError, AnswerErrorKind};
use crate::coalesce::Counters;
use crate::query::PlannedQuery;
use crate::telemetry::{self, RequestTrace};

/// One per GraphQL request, so that a batch never waits for another
/// request's slow BI call; identical queries of concurrent requests meet in
/// the aggregator's in-process flights instead.
pub struct AggregateLoader {
    aggregator: Arc<Aggregator>,
    /// Where quotas are counted (shared by all instances with Redis).
    counters: Arc<dyn Counters>,
    deadline: Instant,
    /// The request's trace: the dataloader runs batches on a task of its
    /// own, which would otherwise start a trace of its own. A request not
    /// sampled gets its span here, when it first needs more than process
    /// memory: what waited on the BI or Redis is always traced.
    trace: RequestTrace,
    request_span: OnceLock<tracing::Span>,
    /// Whose quota the batch's BI queries count against.
    identity: Identity,
}

/// Quotas count BI queries per minute.
const QUOTA_WINDOW: Duration = Duration::from_secs(60);

impl AggregateLoader {
    pub fn new(
        aggregator: Arc<Aggregator>,
        counters: Arc<dyn Counters>,
        deadline: Instant,
        trace: RequestTrace,
        identity: Identity,
    ) -> AggregateLoader {
        AggregateLoader {
            aggregator,
            counters,
            deadline,
            trace,
            request_span: OnceLock::new(),
            identity,
        }
    }

    fn request_span(&self) -> &tracing::Span {
        self.request_span.get_or_init(|| self.trace.start())
    }

    /// Counts the batch against the caller's quota (every key not answered
    /// from process memory may cost a BI query); `Err` once it is spent.
    async fn spend_quota(&self, queries: usize) -> Result<(), AnswerError> {
        spend_quota(self.counters.as_ref(), &self.identity, queries).await
    }
}

/// Counts `queries` BI queries against `identity`'s quota (shared by all
/// instances with Redis); `Err` (`RATE_LIMITED`) once it is spent.
pub async fn spend_quota(
    counters: &dyn Counters,
    identity: &Identity,
    queries: usize,
) -> Result<(), AnswerError> {
    let Some((caller, quota)) = identity.quota() else {
        return Ok(());
    };
    let (spent, window_left) = counters
        .count(&format!("quota:{caller}"), queries as u64, QUOTA_WINDOW)
        .await;
    if spent <= quota {
        return Ok(());
    }
    Err(AnswerError {
        kind: AnswerErrorKind::RateLimited,
        message: format!("this credential's quota of {quota} BI queries per minute is spent"),
        retry_after_secs: Some(window_left.as_secs().max(1)),
    })
}

impl Loader<PlannedQuery> for AggregateLoader {
    type Value = AnswerResult;
    type Error = Infallible;

    async fn load(
        &self,
        keys: &[PlannedQuery],
    ) -> Result<HashMap<PlannedQuery, AnswerResult>, Infallible> {
        let span = tracing::info_span!(
            parent: self.request_span(),
            "dataloader.batch",
            keys = keys.len() as i64,
            hits = Empty,
            misses = Empty,
            coalesced = Empty,
            errors = Empty,
        );
        if let Err(spent) = self.spend_quota(keys.len()).await {
            return Ok(keys
                .iter()
                .map(|q| (q.clone(), Err(spent.clone())))
                .collect());
        }
        let mut answers = self
            .aggregator
            .resolve(keys, self.deadline)
            .instrument(span.clone())
            .await;
        // i64: tracing-opentelemetry exports unsigned integers as strings.
        let count = |wanted: Option<CacheStatus>| {
            answers
                .values()
                .filter(|a| a.as_ref().ok().map(|a| a.status) == wanted)
                .count() as i64
        };
        span.record("hits", count(Some(CacheStatus::Hit)));
        span.record("misses", count(Some(CacheStatus::Miss)));
        span.record("coalesced", count(Some(CacheStatus::Coalesced)));
        span.record("errors", count(None));
        if matches!(self.trace, RequestTrace::Deferred { .. }) {
            // A span started here: the resolvers' links (to the BI calls
            // that paid for these rows) went to no span.
            for answer in answers.values().flatten() {
                if answer.status != CacheStatus::Miss {
                    telemetry::link_to_producer(self.request_span(), &answer.entry);
                }
            }
        }
        Ok(keys
            .iter()
            .map(|query| {
                let answer = answers.remove(&query.key).unwrap_or_else(|| {
                    Err(AnswerError::internal("the batch gave no answer for a key"))
                });
                (query.clone(), answer)
            })
            .collect())
    }
}
