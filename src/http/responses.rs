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

use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::body::Bytes;
use metrics::counter;

use crate::aggregate::{Aggregator, ServedEntry};
use crate::auth::Identity;
use crate::cache::Entry;
use crate::catalog::{Catalog, CatalogStore};
use crate::query::PlannedQuery;
use crate::telemetry::names;

/// The cache of whole responses; off when its size is 0.
#[derive(Clone)]
pub struct ResponseCache {
    stored: Option<moka::sync::Cache<Box<[u8]>, Arc<StoredResponse>>>,
    /// The BI's catalog, which `aggregate` inputs are validated against: a
    /// kept answer is outdated once the catalog it was validated with is not
    /// the current one.
    catalog: Arc<CatalogStore>,
}

/// One response kept for its request.
pub(super) struct StoredResponse {
    /// The JSON body sent (status 200, `application/json` or GraphQL over
    /// HTTP's media type: the body is the same).
    pub(super) body: Bytes,
    /// The entries the answers were made of, with their questions. Held
    /// weakly: a kept answer never keeps an entry alive past process
    /// memory's own copy (whose size is bounded by `MEMORY_CACHE_MAX_MB`).
    served: Box<[(PlannedQuery, Weak<Entry>)]>,
    /// The catalog its inputs were validated with.
    catalog: Option<Weak<Catalog>>,
    /// How long its entries all stay fresh from when it was kept: no longer
    /// servable after that, so it is dropped then.
    fresh_for: Duration,
    /// Its operation's metric label.
    pub(super) operation: String,
}

/// What looking a request up found.
pub(super) enum Lookup {
    /// The stored response, still valid (counted as served).
    Served(Arc<StoredResponse>),
    /// Nothing valid: execute, and offer the answer for keeping.
    Execute(Pending),
    /// This request is never served from here.
    Ineligible,
}

/// A request looked up and not found: its key, and the catalog that was
/// current before it was executed.
pub(super) struct Pending {
    key: Box<[u8]>,
    catalog: Option<Arc<Catalog>>,
}

/// Bodies longer than this are executed each time rather than kept.
const MAX_BODY_LEN: usize = 32 * 1024;
/// What a kept response costs beyond its key and body, per entry behind it
/// (the question's parts, the pointers): a rough bound for the weigher.
const PER_ENTRY_BYTES: usize = 256;

/// What a kept response costs, for the cache's size bound.
#[allow(clippy::borrowed_box)] // moka's weigher takes `&K`, and the key is a box
fn weigh(key: &Box<[u8]>, stored: &Arc<StoredResponse>) -> u32 {
    let bytes = key.len() + stored.body.len() + stored.served.len() * PER_ENTRY_BYTES;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// A kept response lives as long as its entries all stay fresh.
struct WhileFresh;

impl moka::Expiry<Box<[u8]>, Arc<StoredResponse>> for WhileFresh {
    fn expire_after_create(
        &self,
        _key: &Box<[u8]>,
        stored: &Arc<StoredResponse>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(stored.fresh_for)
    }
}

fn same_catalog(kept: &Option<Weak<Catalog>>, now: &Option<Arc<Catalog>>) -> bool {
    match (kept, now) {
        (None, None) => true,
        (Some(kept), Some(now)) => std::ptr::eq(kept.as_ptr(), Arc::as_ptr(now)),
        _ => false,
    }
}

impl ResponseCache {
    pub fn new(max_bytes: u64, catalog: Arc<CatalogStore>) -> ResponseCache {
        let stored = (max_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(weigh)
                .expire_after(WhileFresh)
                .build()
        });
        ResponseCache { stored, catalog }
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
        let catalog = self.catalog.get();
        if let Some(found) = stored.get(&key) {
            if same_catalog(&found.catalog, &catalog) && aggregator.serves_again(&found.served) {
                counter!(names::RESPONSE_CACHE, "outcome" => "served").increment(1);
                return Lookup::Served(found);
            }
            counter!(names::RESPONSE_CACHE, "outcome" => "outdated").increment(1);
            stored.invalidate(&key);
        }
        Lookup::Execute(Pending { key, catalog })
    }

    /// Keeps an answer for requests identical to the pending one; `served`:
    /// its entries, every one a fresh hit.
    pub(super) fn store(
        &self,
        pending: Pending,
        body: Bytes,
        served: Vec<ServedEntry>,
        operation: String,
    ) {
        let Some(stored) = &self.stored else {
            return;
        };
        let fresh_for = served
            .iter()
            .map(|(_, entry)| entry.fresh_left())
            .min()
            .unwrap_or_default();
        if fresh_for.is_zero() {
            return;
        }
        counter!(names::RESPONSE_CACHE, "outcome" => "stored").increment(1);
        stored.insert(
            pending.key,
            Arc::new(StoredResponse {
                body,
                served: served
                    .iter()
                    .map(|(query, entry)| (query.clone(), Arc::downgrade(entry)))
                    .collect(),
                catalog: pending.catalog.as_ref().map(Arc::downgrade),
                fresh_for,
                operation,
            }),
        );
    }

    /// The entries behind a kept response that process memory still holds.
    pub(super) fn entries(stored: &StoredResponse) -> impl Iterator<Item = Arc<Entry>> + '_ {
        stored
            .served
            .iter()
            .filter_map(|(_, entry)| entry.upgrade())
    }
}
