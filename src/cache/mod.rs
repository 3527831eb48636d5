//! What the cache holds: answers ([`Entry`]), remembered failures
//! ([`NegativeEntry`]), and the bounded in-process store ([`MemoryCache`]).
//!
//! Architecture invariant: an error is never stored as a success. A
//! [`Cached::Error`] lives for the negative-cache time only. Expiry is decided
//! on each process's monotonic clock from lifetimes, never by comparing the
//! wall clocks of two instances.

mod entry;
mod memory;

pub use entry::{
    AnswerError, AnswerErrorKind, Cached, ENTRY_ID_LEN, Entry, Lifetime, NegativeEntry,
    StoredEntry, set_clock_offset, unix_micros, unix_millis,
};
pub use memory::MemoryCache;
