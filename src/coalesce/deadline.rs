//! A deadline that later arrivals can push back.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How long a flight may keep waiting for another producer: the latest
/// deadline among the requests that wait on it. A request that joins late
/// extends it, so it is never cut short by an earlier request's deadline.
#[derive(Debug, Clone)]
pub struct Deadline {
    /// Microseconds since [`epoch`].
    micros: Arc<AtomicU64>,
}

/// The process's reference point for deadlines stored as integers.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn to_micros(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_micros() as u64
}

impl Deadline {
    pub fn new(at: Instant) -> Deadline {
        Deadline {
            micros: Arc::new(AtomicU64::new(to_micros(at))),
        }
    }

    /// Moves the deadline to `at` if that is later.
    pub fn extend_to(&self, at: Instant) {
        self.micros.fetch_max(to_micros(at), Ordering::Relaxed);
    }

    pub fn get(&self) -> Instant {
        epoch() + Duration::from_micros(self.micros.load(Ordering::Relaxed))
    }

    pub fn has_passed(&self) -> bool {
        Instant::now() >= self.get()
    }

    /// The earlier of `bound` from now and the deadline (as it stands now):
    /// how long one bounded wait may sleep.
    pub fn or_sooner(&self, bound: Duration) -> Instant {
        (Instant::now() + bound).min(self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_later_deadline_wins_an_earlier_one_does_not() {
        let now = Instant::now();
        let deadline = Deadline::new(now + Duration::from_millis(40));
        deadline.extend_to(now + Duration::from_millis(10));
        assert!(deadline.get() + Duration::from_micros(1) >= now + Duration::from_millis(40));
        deadline.extend_to(now + Duration::from_secs(30));
        assert!(deadline.get() + Duration::from_micros(1) >= now + Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!deadline.has_passed(), "extended past the first deadline");
        assert!(deadline.or_sooner(Duration::from_millis(5)) < deadline.get());
        let short = Deadline::new(Instant::now() + Duration::from_millis(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(short.has_passed());
    }
}
