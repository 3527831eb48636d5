//! The per-request dataloader: every `aggregate` field of one document is
//! collected into one batch (duplicates removed) and resolved together.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use async_graphql::dataloader::Loader;
use tokio::time::Instant;

use crate::aggregate::{Aggregator, AnswerResult};
use crate::cache::AnswerError;
use crate::query::PlannedQuery;

/// One per GraphQL request, so that a batch never waits for another
/// request's slow BI call; identical queries of concurrent requests meet in
/// the aggregator's in-process flights instead.
pub struct AggregateLoader {
    aggregator: Arc<Aggregator>,
    deadline: Instant,
}

impl AggregateLoader {
    pub fn new(aggregator: Arc<Aggregator>, deadline: Instant) -> AggregateLoader {
        AggregateLoader {
            aggregator,
            deadline,
        }
    }
}

impl Loader<PlannedQuery> for AggregateLoader {
    type Value = AnswerResult;
    type Error = Infallible;

    async fn load(
        &self,
        keys: &[PlannedQuery],
    ) -> Result<HashMap<PlannedQuery, AnswerResult>, Infallible> {
        let mut answers = self.aggregator.resolve(keys, self.deadline).await;
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
