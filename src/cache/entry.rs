use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bi::BiError;
use crate::bi::protocol::Row;

/// Milliseconds since the Unix epoch: entries travel between instances, so
/// their times are wall-clock times.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// One BI answer, as cached. It never changes before it expires.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub rows: Vec<Row>,
    pub produced_at_ms: u64,
    pub expires_at_ms: u64,
    /// The instance whose BI call produced the rows.
    pub producer: String,
    /// The trace and span of the `bi.call` that produced the rows, when
    /// traces are exported: answers served from this entry link to it.
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub span_id: Option<String>,
    /// The row limit the query was sent with: as many rows as this means
    /// the BI may have cut the answer.
    pub row_limit: u32,
    /// The rows as the serving layer renders them, built on first use and
    /// shared by every answer served from this entry (an entry never
    /// changes, so neither does its rendering). Type-erased: the cache knows
    /// nothing of GraphQL.
    #[serde(skip)]
    pub rendered: RenderMemo,
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

impl PartialEq for Entry {
    /// Equal content; the memoised rendering is derived and does not count.
    fn eq(&self, other: &Entry) -> bool {
        self.rows == other.rows
            && self.produced_at_ms == other.produced_at_ms
            && self.expires_at_ms == other.expires_at_ms
            && self.producer == other.producer
            && self.trace_id == other.trace_id
            && self.span_id == other.span_id
            && self.row_limit == other.row_limit
    }
}

impl Entry {
    pub fn new(rows: Vec<Row>, ttl: Duration, producer: &str, row_limit: u32) -> Entry {
        let now = unix_millis();
        Entry {
            rows,
            produced_at_ms: now,
            expires_at_ms: now.saturating_add(ttl.as_millis() as u64),
            producer: producer.to_owned(),
            trace_id: None,
            span_id: None,
            row_limit,
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

    /// How long this failure is remembered: the negative-cache time, or the
    /// BI's own `Retry-After` when that is longer.
    pub fn remember_for(&self, negative_ttl: Duration) -> Duration {
        let retry_after = Duration::from_secs(self.retry_after_secs.unwrap_or(0));
        negative_ttl.max(retry_after)
    }
}

impl From<&BiError> for AnswerError {
    fn from(err: &BiError) -> AnswerError {
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
}

/// A remembered failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NegativeEntry {
    pub error: AnswerError,
    pub expires_at_ms: u64,
}

impl NegativeEntry {
    pub fn new(error: AnswerError, negative_ttl: Duration) -> NegativeEntry {
        let remember = error.remember_for(negative_ttl);
        NegativeEntry {
            error,
            expires_at_ms: unix_millis().saturating_add(remember.as_millis() as u64),
        }
    }
}

/// What a cache lookup can find.
#[derive(Debug, Clone)]
pub enum Cached {
    Value(Arc<Entry>),
    Error(Arc<NegativeEntry>),
}

impl Cached {
    pub fn expires_at_ms(&self) -> u64 {
        match self {
            Cached::Value(entry) => entry.expires_at_ms,
            Cached::Error(negative) => negative.expires_at_ms,
        }
    }
}
