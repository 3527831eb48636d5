//! What the cache holds: answers ([`Entry`]), remembered failures
//! ([`NegativeEntry`]), and the bounded in-process store ([`MemoryCache`]).
//!
//! Architecture invariant: an error is never stored as a success. A
//! [`Cached::Error`] lives for the negative-cache time only.

mod entry;
mod memory;

pub use entry::{AnswerError, AnswerErrorKind, Cached, Entry, NegativeEntry, unix_millis};
pub use memory::MemoryCache;
