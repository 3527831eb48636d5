//! The lock protocol's Lua scripts, their typed replies, and lock renewal.
//!
//! Every script touches the keys of one cache key only (one hash tag, so one
//! cluster slot). Scripts are sent with `EVAL`: Redis caches them by body,
//! and a restarted Redis needs nothing loaded first, even inside a pipeline.

use std::time::Duration;

use redis::{Cmd, Value};
use tokio::task::JoinHandle;

use super::health::Link;
use super::keys::KeyLayout;
use crate::query::CacheKey;
use crate::telemetry::names;

/// The value if there is one (with its `PTTL`); else the lock, taken with
/// token `ARGV[1]` for `ARGV[2]` ms, or already held with that same token (a
/// retried attempt whose first try landed); else busy.
///
/// Replies `{1, value, pttl}`, `{2}` (won) or `{3}` (another holder).
const TRY_LEAD: &str = r"
local value = redis.call('get', KEYS[2])
if value then
  return {1, value, redis.call('pttl', KEYS[2])}
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2}
end
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return {2}
end
return {3}
";

/// Stores `ARGV[2]` at the value `KEYS[2]` for `ARGV[3]` ms and publishes on
/// `ARGV[4]`, unless another token holds the lock `KEYS[1]`: a paid answer is
/// kept even when its lock expired or vanished with a restarted Redis. Without
/// its lock, it never replaces a success that is already there (another
/// leader's, which keeps its own lifetime; `ARGV[5]` is how every stored
/// success begins), but it does replace a remembered error; and it
/// recognises its own payload, stored by an earlier attempt whose reply was
/// lost. Deletes the lock when it was ours.
///
/// Replies 1 (stored, the lock was ours), 2 (stored, the lock was gone),
/// 3 (already stored by an earlier attempt) or 0 (skipped: another holder,
/// or another leader's answer).
const SETTLE: &str = r"
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
if not holder then
  local existing = redis.call('get', KEYS[2])
  if existing == ARGV[2] then
    return 3
  end
  if existing and string.sub(existing, 1, string.len(ARGV[5])) == ARGV[5] then
    return 0
  end
end
redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('publish', ARGV[4], 'done')
if holder then
  redis.call('del', KEYS[1])
  return 1
end
return 2
";

/// Extends the lock `KEYS[1]` to `ARGV[2]` ms while it holds token `ARGV[1]`.
const RENEW: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes `KEYS[1]` only while it holds `ARGV[1]`: a lock while it holds
/// our token, a value while it is the one we read.
const DELETE_IF: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
";

fn eval(script: &str, keys: &[&str], args: &[&[u8]]) -> Cmd {
    let mut command = redis::cmd("EVAL");
    command.arg(script).arg(keys.len()).arg(keys);
    for arg in args {
        command.arg(*arg);
    }
    command
}

/// A remaining lifetime as `PTTL` reports it: `None` for a missing key.
/// A key without expiry (set by hand) is given `no_expiry`.
pub(super) fn time_left(pttl: i64, no_expiry: Duration) -> Option<Duration> {
    match pttl {
        -2 => None,
        -1 => Some(no_expiry),
        ms => Some(Duration::from_millis(ms.max(0) as u64)),
    }
}

/// What one try for a key's lead found.
#[derive(Debug)]
pub(super) enum TryReply {
    /// The key's value, with its `PTTL`.
    Found {
        payload: Vec<u8>,
        pttl: i64,
    },
    Won,
    Busy,
}

pub(super) fn try_lead(layout: &KeyLayout, key: &CacheKey, token: &str, ttl: Duration) -> Cmd {
    eval(
        TRY_LEAD,
        &[&layout.lock(key), &layout.value(key)],
        &[token.as_bytes(), ttl.as_millis().to_string().as_bytes()],
    )
}

pub(super) fn parse_try_reply(reply: &Value) -> Option<TryReply> {
    let Value::Array(items) = reply else {
        return None;
    };
    let int = |i: usize| redis::from_redis_value_ref::<i64>(items.get(i)?).ok();
    match int(0)? {
        1 => Some(TryReply::Found {
            payload: redis::from_redis_value_ref::<Vec<u8>>(items.get(1)?).ok()?,
            pttl: int(2)?,
        }),
        2 => Some(TryReply::Won),
        3 => Some(TryReply::Busy),
        _ => None,
    }
}

/// How a fill or fail ended in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SettleReply {
    /// Stored, and the lock (ours) released.
    Stored,
    /// Stored, though the lock had expired or vanished.
    StoredWithoutLock,
    /// An earlier attempt of this fill had stored it.
    AlreadyStored,
    /// Another holder has the lock, or another leader's answer is there.
    Skipped,
}

pub(super) fn settle(
    layout: &KeyLayout,
    key: &CacheKey,
    token: &str,
    payload: &[u8],
    ttl: Duration,
) -> Cmd {
    eval(
        SETTLE,
        &[&layout.lock(key), &layout.value(key)],
        &[
            token.as_bytes(),
            payload,
            ttl.as_millis().max(1).to_string().as_bytes(),
            layout.done_channel(key).as_bytes(),
            super::store::VALUE_PREFIX,
        ],
    )
}

pub(super) fn parse_settle_reply(reply: i64) -> SettleReply {
    match reply {
        1 => SettleReply::Stored,
        2 => SettleReply::StoredWithoutLock,
        3 => SettleReply::AlreadyStored,
        _ => SettleReply::Skipped,
    }
}

pub(super) fn release(layout: &KeyLayout, key: &CacheKey, token: &str) -> Cmd {
    eval(DELETE_IF, &[&layout.lock(key)], &[token.as_bytes()])
}

/// Writes `probe_key` for a second: whether Redis runs the scripts and
/// writes that coordination needs.
pub(super) fn probe(probe_key: &str) -> Cmd {
    eval(
        "return redis.call('set', KEYS[1], '1', 'PX', 1000)",
        &[probe_key],
        &[],
    )
}

/// Deletes the value of `key` if it still is `payload` (an unreadable one).
pub(super) fn discard_value(layout: &KeyLayout, key: &CacheKey, payload: &[u8]) -> Cmd {
    eval(DELETE_IF, &[&layout.value(key)], &[payload])
}

/// Keeps a lock alive while its BI call runs: renews it every third of its
/// lifetime, retrying failed renewals, until dropped or until the lock turns
/// out to belong to someone else.
pub(super) fn spawn_renewal(
    link: Link,
    layout: &KeyLayout,
    key: &CacheKey,
    token: &str,
    ttl: Duration,
) -> JoinHandle<()> {
    let lock = layout.lock(key);
    let token = token.to_owned();
    let short = key.short().to_owned();
    tokio::spawn(async move {
        let command = eval(
            RENEW,
            &[&lock],
            &[token.as_bytes(), ttl.as_millis().to_string().as_bytes()],
        );
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + ttl / 3, ttl / 3);
        loop {
            every.tick().await;
            match link.coordinate::<i64>(&command).await {
                Ok(1) => {}
                Ok(_) => {
                    tracing::warn!(key = %short, "lost the lock during the BI call; another instance may call the BI too");
                    metrics::counter!(names::LOCKS_LOST).increment(1);
                    return;
                }
                Err(err) => {
                    tracing::info!(key = %short, error = %err, "could not renew the lock; retrying");
                }
            }
        }
    })
}

/// Aborts a task when dropped (renewals die with their lease).
pub(super) struct AbortOnDrop(pub(super) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
