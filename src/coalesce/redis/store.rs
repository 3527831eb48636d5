//! How answers are written into Redis and read back.
//!
//! A value is the entry's id (32 hex digits) and its JSON, without an
//! expiry: the key's own `PTTL` is the time left, so instances whose wall
//! clocks disagree still agree on when an entry turns stale and ends. A
//! remembered failure is the error's JSON, under a key of its own, so that a
//! failed refresh leaves the stale value servable.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::{AnswerError, Cached, ENTRY_ID_LEN, Entry, NegativeEntry, StoredEntry};

pub(super) fn encode_value(entry: &Entry) -> Vec<u8> {
    let mut bytes = entry.id.as_bytes().to_vec();
    bytes.extend(serde_json::to_vec(&entry.to_stored()).unwrap_or_default());
    bytes
}

pub(super) fn encode_error(error: &AnswerError) -> Vec<u8> {
    serde_json::to_vec(error).unwrap_or_default()
}

/// Whether the value `bytes` is the entry with this `id`.
pub(super) fn is_entry(bytes: &[u8], id: &str) -> bool {
    bytes.get(..ENTRY_ID_LEN) == Some(id.as_bytes())
}

/// Why a stored answer could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum Unreadable {
    #[error("no entry id")]
    NoId,
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// The entry in `bytes`, valid for `time_left`.
pub(super) fn decode_value(bytes: &[u8], time_left: Duration) -> Result<Cached, Unreadable> {
    if bytes.len() < ENTRY_ID_LEN || !bytes[..ENTRY_ID_LEN].is_ascii() {
        return Err(Unreadable::NoId);
    }
    let (id, json) = bytes.split_at(ENTRY_ID_LEN);
    let stored: StoredEntry = serde_json::from_slice(json)?;
    let id = String::from_utf8_lossy(id).into_owned();
    Ok(Cached::Value(Arc::new(Entry::from_stored(
        id, stored, time_left,
    ))))
}

/// The failure in `bytes`, remembered for `time_left`.
pub(super) fn decode_error(bytes: &[u8], time_left: Duration) -> Result<Cached, Unreadable> {
    let error: AnswerError = serde_json::from_slice(bytes)?;
    Ok(Cached::Error(Arc::new(NegativeEntry::from_stored(
        error, time_left,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{AnswerErrorKind, Lifetime};

    #[test]
    fn values_come_back_with_their_id_and_the_lifetime_they_are_read_with() {
        let lifetime = Lifetime {
            fresh: Duration::from_secs(300),
            stale: Duration::from_secs(60),
        };
        let entry =
            Entry::new(Vec::new(), lifetime, "gw-1", 10).made(Duration::from_millis(1_500), 7);
        let back = decode_value(&encode_value(&entry), Duration::from_secs(70)).expect("decodes");
        let Cached::Value(back) = back else {
            panic!("a value comes back as a value");
        };
        assert_eq!(back.id, entry.id);
        assert_eq!(back.producer, "gw-1");
        assert_eq!(back.produced_at_us, entry.produced_at_us);
        assert_eq!(back.compute, Duration::from_millis(1_500));
        assert_eq!(back.generation, 7);
        // 70 s left of which the last 60 s are stale: fresh for 10 s more.
        assert!(back.fresh_left() <= Duration::from_secs(10));
        assert!(back.fresh_left() > Duration::from_secs(9));
        assert!(back.time_left() > Duration::from_secs(69));
    }

    #[test]
    fn errors_come_back_as_errors() {
        let error = AnswerError::unavailable("down");
        let back = decode_error(&encode_error(&error), Duration::from_secs(2)).expect("decodes");
        let Cached::Error(back) = back else {
            panic!("an error comes back as an error, never as a value");
        };
        assert_eq!(back.error.kind, AnswerErrorKind::BiUnavailable);
        assert!(back.time_left() <= Duration::from_secs(2));
        assert!(decode_value(&encode_error(&error), Duration::from_secs(2)).is_err());
    }
}
