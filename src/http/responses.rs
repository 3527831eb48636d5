//! Whole answers to repeated identical POSTs, served again without parsing,
//! validating, executing or rendering anything while every entry behind
//! them is unchanged.
//!
//! A dashboard sends the same few bodies over and over, and a hit's cost is
//! mostly GraphQL's (parse, validate, coerce variables, resolve, render
//! JSON), not the cache's. A stored answer is keyed by the caller's scope
//! (what it may see, decided from its credential before anything is looked
//! up) and the exact request body, and holds the entries it was made of. It
//! is served again only when [`Aggregator::serves_again`] says that each of
//! them is still the very entry process memory would answer with, and fresh:
//! a refresh, an invalidation, an expiry or an eviction from process memory
//! makes it outdated, and the request is executed as any other. Only answers
//! that are a function of their entries alone are kept: every field a fresh
//! hit, no error, no degraded answer, and a document with no field that
//! moves with the clock or the catalog (`DocumentSummary::repeatable`).

use std::sync::Arc;

use axum::body::Bytes;
use metrics::counter;

use crate::aggregate::{Aggregator, ServedEntry};
use crate::auth::Identity;
use crate::telemetry::names;

/// The cache of whole responses; off when its size is 0.
#[derive(Clone)]
pub struct ResponseCache {
    stored: Option<moka::sync::Cache<Box<[u8]>, Arc<StoredResponse>>>,
}

/// One response kept for its request.
pub(super) struct StoredResponse {
    /// The JSON body sent (status 200, `application/json` or GraphQL over
    /// HTTP's media type: the body is the same).
    pub(super) body: Bytes,
    /// The entries the answers were made of, with their questions.
    pub(super) served: Box<[ServedEntry]>,
    /// Its operation's metric label.
    pub(super) operation: String,
}

/// What looking a request up found.
pub(super) enum Lookup {
    /// The stored response, still valid (counted as served).
    Served(Arc<StoredResponse>),
    /// Nothing valid: execute, and offer the answer under this key.
    Execute(Box<[u8]>),
    /// This request is never served from here.
    Ineligible,
}

/// Bodies longer than this are executed each time rather than kept.
const MAX_BODY_LEN: usize = 32 * 1024;
/// What a kept response costs beyond its key and body, per entry behind it
/// (the question's parts, the `Arc`s): a rough bound for the weigher.
const PER_ENTRY_BYTES: usize = 256;

/// What a kept response costs, for the cache's size bound.
#[allow(clippy::borrowed_box)] // moka's weigher takes `&K`, and the key is a box
fn weigh(key: &Box<[u8]>, stored: &Arc<StoredResponse>) -> u32 {
    let bytes = key.len() + stored.body.len() + stored.served.len() * PER_ENTRY_BYTES;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl ResponseCache {
    pub fn new(max_bytes: u64) -> ResponseCache {
        let stored = (max_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(weigh)
                .build()
        });
        ResponseCache { stored }
    }

    /// Looks up the response to `body` from `identity`. Callers without a
    /// valid credential are never served from here: their answers are errors.
    pub(super) fn lookup(
        &self,
        aggregator: &Arc<Aggregator>,
        identity: &Identity,
        body: &[u8],
    ) -> Lookup {
        let Some(stored) = &self.stored else {
            return Lookup::Ineligible;
        };
        if matches!(identity, Identity::Unauthenticated(_)) || body.len() > MAX_BODY_LEN {
            return Lookup::Ineligible;
        }
        let scope = identity.scope_fingerprint();
        let mut key = Vec::with_capacity(scope.len() + 1 + body.len());
        key.extend_from_slice(scope.as_bytes());
        // Scopes never hold a NUL: the boundary cannot be forged by a body.
        key.push(0);
        key.extend_from_slice(body);
        let key = key.into_boxed_slice();
        if let Some(found) = stored.get(&key) {
            if aggregator.serves_again(&found.served) {
                counter!(names::RESPONSE_CACHE, "outcome" => "served").increment(1);
                return Lookup::Served(found);
            }
            counter!(names::RESPONSE_CACHE, "outcome" => "outdated").increment(1);
            stored.invalidate(&key);
        }
        Lookup::Execute(key)
    }

    /// Keeps an answer for requests identical to the one that `key` names;
    /// `served`: its entries, every one a fresh hit.
    pub(super) fn store(
        &self,
        key: Box<[u8]>,
        body: Bytes,
        served: Vec<ServedEntry>,
        operation: String,
    ) {
        let Some(stored) = &self.stored else {
            return;
        };
        counter!(names::RESPONSE_CACHE, "outcome" => "stored").increment(1);
        stored.insert(
            key,
            Arc::new(StoredResponse {
                body,
                served: served.into_boxed_slice(),
                operation,
            }),
        );
    }
}
