//! How answers are written into Redis values and read back.
//!
//! A value holds the entry without its expiry: the key's own `PTTL` is the
//! time left, so instances whose wall clocks disagree still agree on when an
//! entry or a remembered error ends.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cache::{AnswerError, Cached, Entry, NegativeEntry, StoredEntry};

/// What a value key holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum Stored {
    Value(StoredEntry),
    Error { error: AnswerError },
}

/// How every stored success begins (serde writes the tag first): the settle
/// script tells successes from errors by it.
pub(super) const VALUE_PREFIX: &[u8] = br#"{"kind":"value","#;

pub(super) fn encode_value(entry: &Entry) -> Vec<u8> {
    serde_json::to_vec(&Stored::Value(entry.to_stored())).unwrap_or_default()
}

pub(super) fn encode_error(error: &AnswerError) -> Vec<u8> {
    serde_json::to_vec(&Stored::Error {
        error: error.clone(),
    })
    .unwrap_or_default()
}

/// The cached answer in `bytes`, valid for `time_left`.
pub(super) fn decode(bytes: &[u8], time_left: Duration) -> Result<Cached, serde_json::Error> {
    Ok(match serde_json::from_slice::<Stored>(bytes)? {
        Stored::Value(stored) => Cached::Value(Arc::new(Entry::from_stored(stored, time_left))),
        Stored::Error { error } => {
            Cached::Error(Arc::new(NegativeEntry::from_stored(error, time_left)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::AnswerErrorKind;

    #[test]
    fn successes_and_only_successes_begin_with_the_value_prefix() {
        let entry = Entry::new(Vec::new(), Duration::from_secs(1), "gw", 10);
        assert!(encode_value(&entry).starts_with(VALUE_PREFIX));
        let error = AnswerError::unavailable("down");
        assert!(!encode_error(&error).starts_with(VALUE_PREFIX));
    }

    #[test]
    fn values_and_errors_come_back_with_the_lifetime_they_are_read_with() {
        let entry = Entry::new(Vec::new(), Duration::from_secs(300), "gw-1", 10);
        let back = decode(&encode_value(&entry), Duration::from_secs(7)).expect("decodes");
        let Cached::Value(back) = back else {
            panic!("a value comes back as a value");
        };
        assert_eq!(back.producer, "gw-1");
        assert_eq!(back.produced_at_us, entry.produced_at_us);
        assert!(back.time_left() <= Duration::from_secs(7));
        assert!(back.time_left() > Duration::from_secs(6));

        let error = AnswerError::unavailable("down");
        let back = decode(&encode_error(&error), Duration::from_secs(2)).expect("decodes");
        let Cached::Error(back) = back else {
            panic!("an error comes back as an error, never as a value");
        };
        assert_eq!(back.error.kind, AnswerErrorKind::BiUnavailable);
        assert!(back.time_left() <= Duration::from_secs(2));
    }
}
