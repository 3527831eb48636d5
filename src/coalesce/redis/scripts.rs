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

/// One try for a key (`KEYS`: lock, value, error). The value, with its
/// `PTTL`, unless it is the very entry the caller wants replaced (`ARGV[3]`,
/// its id; empty for a miss); else a remembered error, with its `PTTL` (no
/// lead while a failure is remembered); else the lock, taken with token
/// `ARGV[1]` for `ARGV[2]` ms, or already held with that same token (a
/// retried attempt whose first try landed); else busy.
///
/// Replies `{1, value, pttl}`, `{2}` (won), `{3}` (busy) or `{4, error, pttl}`.
const TRY_LEAD: &str = r"
local value = redis.call('get', KEYS[2])
if value and (ARGV[3] == '' or string.sub(value, 1, 32) ~= ARGV[3]) then
  return {1, value, redis.call('pttl', KEYS[2])}
end
local err = redis.call('get', KEYS[3])
if err then
  return {4, err, redis.call('pttl', KEYS[3])}
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

/// Stores a producer's answer (`ARGV[5]` = `value`: at `KEYS[2]`, clearing a
/// remembered error `KEYS[3]`) or failure (`error`: at `KEYS[3]`, leaving a
/// stale value in place) for `ARGV[3]` ms, and publishes it on `ARGV[4]`,
/// unless another token holds the lock `KEYS[1]`: a paid answer is kept even
/// when its lock expired or vanished with a restarted Redis. Without its
/// lock, it never replaces an answer that is already there and is not the
/// one it was produced to replace (`ARGV[6]`, an entry id, empty for a
/// miss): another leader's, which keeps its own lifetime. It recognises its
/// own payload, stored by an earlier attempt whose reply was lost. Deletes
/// the lock when it was ours.
///
/// The message is `<kind> <pttl> <payload>`, published with `ARGV[7]`
/// (`publish`, or `spublish` in a cluster): waiters take the answer from it
/// without another round trip.
///
/// Replies 1 (stored, the lock was ours), 2 (stored, the lock was gone),
/// 3 (already stored by an earlier attempt) or 0 (skipped).
const SETTLE: &str = r"
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
local target = KEYS[2]
if ARGV[5] == 'error' then
  target = KEYS[3]
end
if not holder then
  if redis.call('get', target) == ARGV[2] then
    return 3
  end
  local value = redis.call('get', KEYS[2])
  if value and string.sub(value, 1, 32) ~= ARGV[6] then
    return 0
  end
end
redis.call('set', target, ARGV[2], 'PX', ARGV[3])
if ARGV[5] == 'value' then
  redis.call('del', KEYS[3])
end
redis.call(ARGV[7], ARGV[4], ARGV[5] .. ' ' .. ARGV[3] .. ' ' .. ARGV[2])
if holder then
  redis.call('del', KEYS[1])
  return 1
end
return 2
";

/// Records one invalidation: the next generation of the sequence `KEYS[1]`,
/// for the scope field `ARGV[1]` (`stale|<scope>`) and, for an eviction,
/// `ARGV[2]` (`evict|<scope>`) in the hash `KEYS[2]`; announces it on
/// `ARGV[3]` with `ARGV[4]` (`publish` or `spublish`). Atomic, so that
/// whoever reads the sequence and then the hash finds every generation up to
/// the one read. A generation is never below Redis's clock in milliseconds:
/// after Redis lost the sequence (a restart, a flush) the next one is still
/// above every generation the instances know.
const INVALIDATE: &str = r"
local time = redis.call('time')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local generation = redis.call('incr', KEYS[1])
if generation < now then
  generation = now
  redis.call('set', KEYS[1], string.format('%d', generation))
end
local text = string.format('%d', generation)
redis.call('hset', KEYS[2], ARGV[1], text)
if ARGV[2] ~= '' then
  redis.call('hset', KEYS[2], ARGV[2], text)
end
redis.call(ARGV[4], ARGV[3], text)
return generation
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
/// Releases the lock `KEYS[1]` while it holds token `ARGV[1]`, and says so
/// on the key's `done` channel `ARGV[2]` (with `ARGV[3]`, `publish` or
/// `spublish`): its waiters look again at once instead of at the lock's
/// expiry (where no keyspace notification tells them, as in a cluster).
const RELEASE: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call(ARGV[3], ARGV[2], 'released')
  return 1
end
return 0
";

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
    /// The key's value (its id and entry), with its `PTTL`.
    Found {
        payload: Vec<u8>,
        pttl: i64,
    },
    /// A remembered failure, with its `PTTL`.
    Failed {
        payload: Vec<u8>,
        pttl: i64,
    },
    Won,
    Busy,
}

/// One try for `key`; `replaces` is the id of the entry the caller wants
/// replaced (a refresh), `None` for a miss.
pub(super) fn try_lead(
    layout: &KeyLayout,
    key: &CacheKey,
    token: &str,
    ttl: Duration,
    replaces: Option<&str>,
) -> Cmd {
    eval(
        TRY_LEAD,
        &[&layout.lock(key), &layout.value(key), &layout.error(key)],
        &[
            token.as_bytes(),
            ttl.as_millis().to_string().as_bytes(),
            replaces.unwrap_or_default().as_bytes(),
        ],
    )
}

pub(super) fn parse_try_reply(reply: &Value) -> Option<TryReply> {
    let Value::Array(items) = reply else {
        return None;
    };
    let int = |i: usize| redis::from_redis_value_ref::<i64>(items.get(i)?).ok();
    let bytes = |i: usize| redis::from_redis_value_ref::<Vec<u8>>(items.get(i)?).ok();
    match int(0)? {
        1 => Some(TryReply::Found {
            payload: bytes(1)?,
            pttl: int(2)?,
        }),
        2 => Some(TryReply::Won),
        3 => Some(TryReply::Busy),
        4 => Some(TryReply::Failed {
            payload: bytes(1)?,
            pttl: int(2)?,
        }),
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

/// What a settle stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settling {
    Value,
    Error,
}

impl Settling {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Settling::Value => "value",
            Settling::Error => "error",
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn settle(
    layout: &KeyLayout,
    key: &CacheKey,
    token: &str,
    payload: &[u8],
    ttl: Duration,
    settling: Settling,
    replaces: Option<&str>,
) -> Cmd {
    eval(
        SETTLE,
        &[&layout.lock(key), &layout.value(key), &layout.error(key)],
        &[
            token.as_bytes(),
            payload,
            ttl.as_millis().max(1).to_string().as_bytes(),
            layout.done_channel(key).as_bytes(),
            settling.as_str().as_bytes(),
            replaces.unwrap_or_default().as_bytes(),
            layout.publish_command().as_bytes(),
        ],
    )
}

/// A settle's message on the `done` channel: what was stored, for how long.
pub(super) struct Settled<'a> {
    pub(super) settling: Settling,
    pub(super) pttl: i64,
    pub(super) payload: &'a [u8],
}

/// Reads a `done` message (`<kind> <pttl> <payload>`).
pub(super) fn parse_settled(message: &[u8]) -> Option<Settled<'_>> {
    let mut parts = message.splitn(3, |&b| b == b' ');
    let settling = match parts.next()? {
        b"value" => Settling::Value,
        b"error" => Settling::Error,
        _ => return None,
    };
    let pttl = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    Some(Settled {
        settling,
        pttl,
        payload: parts.next()?,
    })
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
    eval(
        RELEASE,
        &[&layout.lock(key)],
        &[
            token.as_bytes(),
            layout.done_channel(key).as_bytes(),
            layout.publish_command().as_bytes(),
        ],
    )
}

pub(super) fn invalidate(layout: &KeyLayout, scope_field: &str, evict: bool) -> Cmd {
    let stale = format!("stale|{scope_field}");
    let evicted = if evict {
        format!("evict|{scope_field}")
    } else {
        String::new()
    };
    eval(
        INVALIDATE,
        &[&layout.invalidation_sequence(), &layout.invalidations()],
        &[
            stale.as_bytes(),
            evicted.as_bytes(),
            layout.invalidated_channel().as_bytes(),
            layout.publish_command().as_bytes(),
        ],
    )
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
