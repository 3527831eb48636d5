//! In-process single-flight: one BI call per key at a time per process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

use super::Deadline;
use crate::cache::{AnswerError, Entry};
use crate::query::CacheKey;

/// Where a flight's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This flight's own BI call.
    Produced,
    /// Another instance's BI call, waited for.
    Waited,
    /// Already in the store when the flight looked again.
    Found,
}

/// A flight's successful answer.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub entry: Arc<Entry>,
    pub origin: Origin,
    /// The entry was past its fresh time, or invalidated, when found: it is
    /// served while its refresh runs.
    pub stale: bool,
}

impl Resolved {
    pub fn new(entry: Arc<Entry>, origin: Origin) -> Resolved {
        Resolved {
            entry,
            origin,
            stale: false,
        }
    }
}

type Outcome = Result<Resolved, AnswerError>;

/// One flight: where its outcome goes, and how long it may wait.
#[derive(Clone)]
struct Slot {
    outcome: watch::Sender<Option<Outcome>>,
    deadline: Deadline,
}

/// The flights in progress, by key.
#[derive(Default)]
pub struct Flights {
    in_progress: Mutex<HashMap<CacheKey, Slot>>,
}

/// What [`Flights::join`] made of the caller.
pub enum Joined {
    /// The caller started the flight and must complete it (or drop it).
    Lead(FlightLead, FlightWatch),
    /// A flight for this key was already on its way.
    Follow(FlightWatch),
}

/// The duty to complete one flight. Dropping it uncompleted (a panic, a
/// cancelled task) ends the flight: followers get an error, not a hang.
pub struct FlightLead {
    key: CacheKey,
    slot: Slot,
    flights: Arc<Flights>,
}

/// A ticket to one flight's outcome.
pub struct FlightWatch(watch::Receiver<Option<Outcome>>);

impl Flights {
    /// Follows the flight for `key`, or starts it. Either way the flight may
    /// wait for other producers until at least `deadline`.
    pub fn join(self: &Arc<Self>, key: &CacheKey, deadline: Instant) -> Joined {
        let mut in_progress = self
            .in_progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(slot) = in_progress.get(key) {
            slot.deadline.extend_to(deadline);
            return Joined::Follow(FlightWatch(slot.outcome.subscribe()));
        }
        let (outcome, watch) = watch::channel(None);
        let slot = Slot {
            outcome,
            deadline: Deadline::new(deadline),
        };
        in_progress.insert(key.clone(), slot.clone());
        Joined::Lead(
            FlightLead {
                key: key.clone(),
                slot,
                flights: Arc::clone(self),
            },
            FlightWatch(watch),
        )
    }

    /// The flight for `key`, if one is on its way (extended to `deadline`);
    /// never starts one.
    pub fn follow(&self, key: &CacheKey, deadline: Instant) -> Option<FlightWatch> {
        let in_progress = self
            .in_progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        in_progress.get(key).map(|slot| {
            slot.deadline.extend_to(deadline);
            FlightWatch(slot.outcome.subscribe())
        })
    }

    /// Number of flights in progress.
    pub fn len(&self) -> usize {
        self.in_progress.lock().map(|m| m.len()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FlightLead {
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// The latest deadline of the requests waiting on this flight.
    pub fn deadline(&self) -> &Deadline {
        &self.slot.deadline
    }

    /// Hands the outcome to every follower and ends the flight. Call it after
    /// the outcome is in the store, so a request that arrives after the flight
    /// ended finds it there.
    pub fn complete(self, outcome: Outcome) {
        self.slot.outcome.send_replace(Some(outcome));
        // Drop removes the flight.
    }
}

impl Drop for FlightLead {
    /// Ends the flight; followers of a flight that was never answered (a
    /// panic, a cancelled task) get an error rather than a hang.
    fn drop(&mut self) {
        let mut in_progress = self
            .flights
            .in_progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if in_progress
            .get(&self.key)
            .is_some_and(|slot| slot.outcome.same_channel(&self.slot.outcome))
        {
            in_progress.remove(&self.key);
        }
    }
}

impl FlightWatch {
    /// Waits for the flight's outcome. A flight whose lead vanished without an
    /// outcome is an internal error, reported at once.
    pub async fn outcome(mut self) -> Outcome {
        match self.0.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or_else(|| {
                Err(AnswerError::internal("the flight ended without an answer"))
            }),
            Err(_) => Err(AnswerError::internal(
                "the BI call for this answer stopped unexpectedly",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(name: &str) -> CacheKey {
        let planner =
            crate::query::Planner::new(crate::config::Config::embedded_defaults().planner, name);
        let query = crate::query::AggregateQuery::parse(
            crate::query::RawAggregate {
                customer: "acme",
                from: "2025-01-01",
                to: "2025-01-02",
                measures: &["Sales.revenue".to_owned()],
                dimensions: &[],
                granularity: None,
            },
            &crate::config::Config::embedded_defaults().query,
            None,
        )
        .expect("valid");
        planner.plan(&query).key
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn entry() -> Arc<Entry> {
        let lifetime = crate::cache::Lifetime {
            fresh: Duration::from_secs(1),
            stale: Duration::ZERO,
        };
        Arc::new(Entry::new(Vec::new(), lifetime, "test", 10))
    }

    #[tokio::test]
    async fn followers_share_the_leaders_outcome_and_the_flight_ends() {
        let flights = Arc::new(Flights::default());
        let k = key("a");
        let Joined::Lead(lead, lead_watch) = flights.join(&k, later()) else {
            panic!("first join must lead");
        };
        let Joined::Follow(follow_watch) = flights.join(&k, later()) else {
            panic!("second join must follow");
        };
        lead.complete(Ok(Resolved::new(entry(), Origin::Produced)));
        assert!(flights.is_empty());
        for watch in [lead_watch, follow_watch] {
            let resolved = watch.outcome().await.expect("an answer");
            assert_eq!(resolved.origin, Origin::Produced);
        }
        assert!(matches!(flights.join(&k, later()), Joined::Lead(..)));
    }

    #[tokio::test]
    async fn a_dropped_lead_wakes_followers_with_an_error() {
        let flights = Arc::new(Flights::default());
        let k = key("b");
        let Joined::Lead(lead, _) = flights.join(&k, later()) else {
            panic!("first join must lead");
        };
        let Joined::Follow(watch) = flights.join(&k, later()) else {
            panic!("second join must follow");
        };
        let waiter = tokio::spawn(watch.outcome());
        drop(lead);
        let outcome = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken at once")
            .expect("no panic");
        assert!(outcome.is_err());
        assert!(flights.is_empty());
    }
}
