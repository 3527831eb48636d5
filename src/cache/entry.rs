use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::bi::protocol::Row;

/// Added to the system clock by [`unix_micros`]: tests give instances clocks
/// that disagree (`GATEWAY_CLOCK_OFFSET_MS`) without touching the machine's.
static CLOCK_OFFSET_MICROS: AtomicI64 = AtomicI64::new(0);

/// Shifts this process's wall clock; see [`CLOCK_OFFSET_MICROS`].
pub fn set_clock_offset(offset: Duration, ahead: bool) {
    let micros = i64::try_from(offset.as_micros()).unwrap_or(i64::MAX);
    CLOCK_OFFSET_MICROS.store(if ahead { micros } else { -micros }, Ordering::Relaxed);
}

/// Microseconds since the Unix epoch on this process's wall clock. Wall
/// clocks of instances disagree, so they are used for display and
/// measurement only: no expiry is ever decided by comparing them.
pub fn unix_micros() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default();
    now.saturating_add(CLOCK_OFFSET_MICROS.load(Ordering::Relaxed))
        .max(0) as u64
}

/// Milliseconds since the Unix epoch; see [`unix_micros`].
pub fn unix_millis() -> u64 {
    unix_micros() / 1000
}

/// How long an entry is fresh, and then how much longer it may be served,
/// flagged stale, while one refresh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub fresh: Duration,
    pub stale: Duration,
}

/// One BI answer, as held in process memory. Its rows never change; an
/// entry only ages (fresh, then stale, then gone) or is replaced by a newer
/// one with another `id`.
#[derive(Debug)]
pub struct Entry {
    /// Names this production of the answer (32 hex digits): a refresh
    /// replaces exactly the entry it saw, never a newer one.
    pub id: String,
    pub rows: Vec<Row>,
    /// When the producer got the rows, on its wall clock (for display and for
    /// measuring how soon waiters were answered).
    pub produced_at_us: u64,
    /// The instance whose BI call produced the rows.
    pub producer: String,
    /// The trace and span of the `bi.call` that produced the rows, when
    /// traces are exported: answers served from this entry link to it.
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    /// The row limit the query was sent with: as many rows as this means
    /// the BI may have cut the answer.
    pub row_limit: u32,
    /// Produced without cross-instance coordination (Redis was down): other
    /// instances may have paid for the same answer, and every answer served
    /// from it says it is degraded.
    pub uncoordinated: bool,
    /// How long the BI took to produce the rows: how early a hot entry is
    /// refreshed ahead of its fresh time's end.
    pub compute: Duration,
    /// The invalidation generation the entry was produced under: an
    /// invalidation with a later generation makes it stale (or gone).
    pub generation: u64,
    /// When this copy stops being fresh, then stops being served, on this
    /// process's monotonic clock: a copy read from Redis gets the key's
    /// remaining lifetime (`PTTL`), so instances whose clocks disagree still
    /// agree on when an entry turns stale and ends.
    pub fresh_until: Instant,
    pub expires_at: Instant,
    /// Reads of this copy during its fresh time, in this process: only keys
    /// read more than once are refreshed ahead of time.
    pub reads: AtomicU32,
    /// The rows as the serving layer renders them, built on first use and
    /// shared by every answer served from this entry (an entry never
    /// changes, so neither does its rendering). Type-erased: the cache knows
    /// nothing of GraphQL.
    pub rendered: RenderMemo,
}

/// What travels between instances (the Redis value, after its id): everything
/// but the expiry, which is the key's own `PTTL`; the stale window is given
/// so that a reader can tell the fresh part of what is left.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEntry {
    pub rows: Vec<Row>,
    pub produced_at_us: u64,
    pub producer: String,
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub span_id: Option<String>,
    pub row_limit: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uncoordinated: bool,
    #[serde(default)]
    pub stale_ms: u64,
    #[serde(default)]
    pub compute_ms: u64,
    #[serde(default)]
    pub generation: u64,
}

/// A once-built rendering of an entry's rows (see [`Entry::rendered`]).
#[derive(Clone, Default)]
pub struct RenderMemo(std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>);

impl RenderMemo {
    /// The memoised value of type `T`, built by `build` on first use.
    pub fn get_or_init<T: Send + Sync + 'static>(&self, build: impl FnOnce() -> T) -> Option<&T> {
        self.0.get_or_init(|| Arc::new(build())).downcast_ref::<T>()
    }
}

impl std::fmt::Debug for RenderMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "RenderMemo(built)"
        } else {
            "RenderMemo(empty)"
        })
    }
}

/// The length of an entry id.
pub const ENTRY_ID_LEN: usize = 32;

impl Entry {
    pub fn new(rows: Vec<Row>, lifetime: Lifetime, producer: &str, row_limit: u32) -> Entry {
        let now = Instant::now();
        Entry {
            id: uuid::Uuid::new_v4().simple().to_string(),
            rows,
            produced_at_us: unix_micros(),
            producer: producer.to_owned(),
            trace_id: None,
            span_id: None,
            row_limit,
            uncoordinated: false,
            compute: Duration::ZERO,
            generation: 0,
            fresh_until: now + lifetime.fresh,
            expires_at: now + lifetime.fresh + lifetime.stale,
            reads: AtomicU32::new(0),
            rendered: RenderMemo::default(),
        }
    }

    /// Records which `bi.call` produced the rows.
    pub fn produced_by_call(mut self, call: Option<&crate::bi::CallRef>) -> Entry {
        if let Some(call) = call {
            self.trace_id = Some(call.trace_id.clone());
            self.span_id = Some(call.span_id.clone());
        }
        self
    }

    /// Marks the entry as produced without cross-instance coordination.
    pub fn uncoordinated(mut self, uncoordinated: bool) -> Entry {
        self.uncoordinated = uncoordinated;
        self
    }

    /// Records how long the BI call took and the invalidation generation
    /// it was made under.
    pub fn made(mut self, compute: Duration, generation: u64) -> Entry {
        self.compute = compute;
        self.generation = generation;
        self
    }

    /// The entry another instance stored, with `time_left` of its life.
    pub fn from_stored(id: String, stored: StoredEntry, time_left: Duration) -> Entry {
        let now = Instant::now();
        let stale = Duration::from_millis(stored.stale_ms);
        Entry {
            id,
            rows: stored.rows,
            produced_at_us: stored.produced_at_us,
            producer: stored.producer,
            trace_id: stored.trace_id,
            span_id: stored.span_id,
            row_limit: stored.row_limit,
            uncoordinated: stored.uncoordinated,
            compute: Duration::from_millis(stored.compute_ms),
            generation: stored.generation,
            fresh_until: now + time_left.saturating_sub(stale),
            expires_at: now + time_left,
            reads: AtomicU32::new(0),
            rendered: RenderMemo::default(),
        }
    }

    /// What to store for other instances.
    pub fn to_stored(&self) -> StoredEntry {
        StoredEntry {
            rows: self.rows.clone(),
            produced_at_us: self.produced_at_us,
            producer: self.producer.clone(),
            trace_id: self.trace_id.clone(),
            span_id: self.span_id.clone(),
            row_limit: self.row_limit,
            uncoordinated: self.uncoordinated,
            stale_ms: self
                .expires_at
                .saturating_duration_since(self.fresh_until)
                .as_millis() as u64,
            compute_ms: self.compute.as_millis() as u64,
            generation: self.generation,
        }
    }

    /// How long this copy may still be served (fresh or stale).
    pub fn time_left(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// How long this copy is still fresh.
    pub fn fresh_left(&self) -> Duration {
        self.fresh_until.saturating_duration_since(Instant::now())
    }

    pub fn is_fresh(&self) -> bool {
        Instant::now() < self.fresh_until
    }

    /// Whether the BI may have dropped rows past the limit.
    pub fn may_be_truncated(&self) -> bool {
        self.rows.len() >= self.row_limit as usize
    }

    /// A cheap estimate of the entry's size in memory, for the cache's bound.
    pub fn approximate_bytes(&self) -> u64 {
        let rows: usize = self
            .rows
            .iter()
            .flat_map(|row| row.iter())
            .map(|(key, value)| key.len() + value.as_str().map_or(16, str::len) + 48)
            .sum();
        (rows + 128) as u64
    }
}

/// The class of a failed answer; the GraphQL layer turns it into `extensions.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AnswerErrorKind {
    /// The BI answered with an error.
    BiError,
    /// The BI could not be reached, or not in time.
    BiUnavailable,
    /// The BI is rate limiting.
    RateLimited,
    /// The gateway itself failed; details are in the log.
    Internal,
}

/// Why an answer could not be given. Shared by every waiter of a BI call and
/// remembered for the negative-cache time, so it is plain, cloneable data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{message}")]
pub struct AnswerError {
    pub kind: AnswerErrorKind,
    /// Safe to show to users: never a 5xx body, never a credential.
    pub message: String,
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
}

impl AnswerError {
    pub fn internal(message: impl Into<String>) -> AnswerError {
        AnswerError {
            kind: AnswerErrorKind::Internal,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> AnswerError {
        AnswerError {
            kind: AnswerErrorKind::BiUnavailable,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// The BI asked everyone to back off for `left`.
    pub fn cooling_down(left: Duration) -> AnswerError {
        AnswerError {
            kind: AnswerErrorKind::RateLimited,
            message: "the BI is rate limiting; no BI calls until its cool-down ends".into(),
            retry_after_secs: Some(left.as_millis().div_ceil(1000).max(1) as u64),
        }
    }

    /// How long this failure is remembered: the BI's own `Retry-After` when
    /// it gave one (no longer than asked, no shorter), else the negative-cache
    /// time.
    pub fn remember_for(&self, negative_ttl: Duration) -> Duration {
        self.retry_after_secs
            .map_or(negative_ttl, Duration::from_secs)
    }
}

/// A remembered failure.
#[derive(Debug, Clone, PartialEq)]
pub struct NegativeEntry {
    pub error: AnswerError,
    /// On this process's monotonic clock, like [`Entry::expires_at`].
    pub expires_at: Instant,
}

impl NegativeEntry {
    pub fn new(error: AnswerError, negative_ttl: Duration) -> NegativeEntry {
        let remember = error.remember_for(negative_ttl);
        NegativeEntry {
            error,
            expires_at: Instant::now() + remember,
        }
    }

    /// The failure another instance stored, with `time_left` of its life.
    pub fn from_stored(error: AnswerError, time_left: Duration) -> NegativeEntry {
        NegativeEntry {
            error,
            expires_at: Instant::now() + time_left,
        }
    }

    pub fn time_left(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }
}

/// What a cache lookup can find.
#[derive(Debug, Clone)]
pub enum Cached {
    Value(Arc<Entry>),
    Error(Arc<NegativeEntry>),
}

impl Cached {
    pub fn expires_at(&self) -> Instant {
        match self {
            Cached::Value(entry) => entry.expires_at,
            Cached::Error(negative) => negative.expires_at,
        }
    }

    pub fn is_live(&self) -> bool {
        self.expires_at() > Instant::now()
    }
}
