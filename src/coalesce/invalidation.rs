//! Invalidation: an operator says the data behind some answers changed.
//!
//! Every invalidation gets the next number of one sequence (its generation)
//! and is recorded for its scope (everything, a customer, a cube, or a
//! customer's data in one cube). An entry carries the generation it was
//! produced under; it is untouched while no invalidation of one of its
//! scopes came later. So an invalidation costs O(1), whatever the number of
//! entries, and a check on the hot path is one comparison in the common
//! case (no invalidation since the entry was made).
//!
//! [`Invalidations`] is this process's view: the embedded coordinator is
//! its only writer, the Redis one keeps it in step with Redis (a message on
//! every invalidation, and a poll of the sequence every second).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::query::AnswerScope;

/// What an invalidation does to the entries it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidationMode {
    /// They stop being fresh: served as stale while one refresh runs.
    Stale,
    /// They are gone: the next request waits for a new answer.
    Evict,
}

/// Which entries an invalidation reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidationScope {
    All,
    Customer(String),
    Cube(String),
    CustomerCube { customer: String, cube: String },
}

impl InvalidationScope {
    /// Its name in the shared record.
    pub fn field(&self) -> String {
        match self {
            InvalidationScope::All => "all".to_owned(),
            InvalidationScope::Customer(customer) => format!("customer:{customer}"),
            InvalidationScope::Cube(cube) => format!("cube:{cube}"),
            InvalidationScope::CustomerCube { customer, cube } => {
                format!("customer:{customer}|cube:{cube}")
            }
        }
    }
}

/// How an entry stands against the invalidations so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Untouched,
    Stale,
    Evicted,
}

/// The latest generation of one scope, by mode (0: never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeGenerations {
    pub stale: u64,
    pub evict: u64,
}

/// This process's view of every invalidation so far.
#[derive(Default)]
pub struct Invalidations {
    /// The latest generation known: entries produced under it, or later, are
    /// untouched (the fast path of [`Invalidations::verdict`]).
    latest: AtomicU64,
    scopes: RwLock<HashMap<String, ScopeGenerations>>,
    /// The shared sequence as of the last [`Invalidations::merge`] (0:
    /// never). Kept apart from `latest`, which this process's own
    /// invalidations raise too: one of those must not make an earlier one of
    /// another instance look merged.
    synced: AtomicU64,
}

impl Invalidations {
    /// The generation an entry produced now is produced under.
    pub fn current(&self) -> u64 {
        self.latest.load(Ordering::Acquire)
    }

    /// How an entry of `scope` produced under `generation` stands.
    pub fn verdict(&self, generation: u64, scope: &AnswerScope) -> Verdict {
        if generation >= self.current() {
            return Verdict::Untouched;
        }
        let scopes = self.scopes.read().unwrap_or_else(|p| p.into_inner());
        let mut verdict = Verdict::Untouched;
        let mut consider = |field: &str| {
            if let Some(seen) = scopes.get(field) {
                if seen.evict > generation {
                    verdict = Verdict::Evicted;
                } else if seen.stale > generation && verdict == Verdict::Untouched {
                    verdict = Verdict::Stale;
                }
            }
        };
        consider("all");
        consider(&format!("customer:{}", scope.customer));
        for cube in &scope.cubes {
            consider(&format!("cube:{cube}"));
            consider(&format!("customer:{}|cube:{cube}", scope.customer));
        }
        verdict
    }

    /// Applies one invalidation.
    pub fn record(&self, field: &str, mode: InvalidationMode, generation: u64) {
        {
            let mut scopes = self.scopes.write().unwrap_or_else(|p| p.into_inner());
            let seen = scopes.entry(field.to_owned()).or_default();
            match mode {
                InvalidationMode::Stale => seen.stale = seen.stale.max(generation),
                // An eviction makes entries stale too (and more).
                InvalidationMode::Evict => {
                    seen.evict = seen.evict.max(generation);
                    seen.stale = seen.stale.max(generation);
                }
            }
        }
        self.latest.fetch_max(generation, Ordering::AcqRel);
    }

    /// Whether the shared record moved since the last merge (the sequence
    /// `shared`, which may also have started over: Redis lost it).
    pub fn needs_sync(&self, shared: u64) -> bool {
        shared != self.synced.load(Ordering::Acquire)
    }

    /// Takes in the shared record read at sequence `shared` (after a sync
    /// with Redis): generations only ever grow, so what this process
    /// recorded meanwhile stays.
    pub fn merge(&self, scopes: HashMap<String, ScopeGenerations>, latest: u64, shared: u64) {
        {
            let mut known = self.scopes.write().unwrap_or_else(|p| p.into_inner());
            for (field, seen) in scopes {
                let mine = known.entry(field).or_default();
                mine.stale = mine.stale.max(seen.stale);
                mine.evict = mine.evict.max(seen.evict);
            }
        }
        self.latest.fetch_max(latest, Ordering::AcqRel);
        self.synced.store(shared, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(customer: &str, cubes: &[&str]) -> AnswerScope {
        AnswerScope {
            customer: customer.to_owned(),
            cubes: cubes.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn an_invalidation_reaches_the_entries_of_its_scope_made_before_it() {
        let invalidations = Invalidations::default();
        let acme = scope("acme", &["Sales"]);
        let globex = scope("globex", &["Sales"]);
        assert_eq!(invalidations.verdict(0, &acme), Verdict::Untouched);

        invalidations.record("customer:acme", InvalidationMode::Stale, 1);
        assert_eq!(invalidations.verdict(0, &acme), Verdict::Stale);
        assert_eq!(invalidations.verdict(0, &globex), Verdict::Untouched);
        assert_eq!(
            invalidations.verdict(1, &acme),
            Verdict::Untouched,
            "made after it"
        );

        invalidations.record("cube:Sales", InvalidationMode::Evict, 2);
        assert_eq!(invalidations.verdict(1, &globex), Verdict::Evicted);
        assert_eq!(invalidations.verdict(2, &globex), Verdict::Untouched);

        invalidations.record("customer:globex|cube:Orders", InvalidationMode::Stale, 3);
        assert_eq!(invalidations.verdict(2, &globex), Verdict::Untouched);
        assert_eq!(
            invalidations.verdict(2, &scope("globex", &["Orders", "Sales"])),
            Verdict::Stale
        );

        invalidations.record("all", InvalidationMode::Stale, 4);
        assert_eq!(invalidations.verdict(3, &acme), Verdict::Stale);
        assert_eq!(invalidations.current(), 4);
    }
}
