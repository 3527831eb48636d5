//! Fault injection: what the next `/load` requests should suffer instead of
//! (or before) an answer, set through `POST /_sim/faults`.
//!
//! Tests use this to drive the gateway through Cube's failure modes: server
//! errors, rate limiting, `Continue wait`, and slowness.

use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// The body of `POST /_sim/faults`. Every field is optional; those present
/// replace the corresponding fault, the others are left as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultsUpdate {
    #[serde(default)]
    fail_next: Option<FailNext>,
    #[serde(default)]
    continue_wait: Option<u64>,
    #[serde(default)]
    rate_limit: Option<RateLimit>,
    #[serde(default)]
    latency_ms: Option<u64>,
}

/// Answer the next `count` requests with `status` and `body`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailNext {
    #[serde(default = "one")]
    count: u64,
    #[serde(default = "internal_server_error")]
    status: u16,
    /// Sent verbatim; `None` means [`DEFAULT_FAILURE_BODY`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

/// Answer the next `count` requests with 429 and `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default = "one")]
    count: u64,
    #[serde(default = "one")]
    retry_after_secs: u64,
}

fn one() -> u64 {
    1
}

fn internal_server_error() -> u16 {
    500
}

/// The body of a `failNext` answer that does not set its own.
pub const DEFAULT_FAILURE_BODY: &str = r#"{"error":"Simulated failure"}"#;

/// What one `/load` request suffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 429 at once, with `Retry-After`.
    RateLimited { retry_after_secs: u64 },
    /// `status` with `body`, after the latency.
    Fail { status: u16, body: String },
    /// HTTP 200 `{"error": "Continue wait"}`, after the latency.
    ContinueWait,
}

/// The faults still to come, and the latency of every answer. Serialized, it
/// is what `/_sim/faults` reports, in the shape it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Faults {
    fail_next: Option<FailNext>,
    continue_wait: u64,
    rate_limit: Option<RateLimit>,
    #[serde(rename = "latencyMs", serialize_with = "as_millis")]
    latency: Duration,
}

fn as_millis<S: Serializer>(latency: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u128(latency.as_millis())
}

impl Faults {
    /// No faults, answering after `latency`.
    pub fn new(latency: Duration) -> Self {
        Faults {
            fail_next: None,
            continue_wait: 0,
            rate_limit: None,
            latency,
        }
    }

    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// Merges `update` in. It is checked first, so a bad update changes nothing.
    pub fn apply(&mut self, update: FaultsUpdate) -> Result<(), String> {
        if let Some(fail) = &update.fail_next {
            // Informational statuses are not final answers, and HTTP has no
            // status above 599: neither could be sent as a response.
            if !(200..=599).contains(&fail.status) {
                return Err(format!(
                    "failNext.status {} is not a final HTTP status (200-599)",
                    fail.status
                ));
            }
        }
        // A count of zero clears the fault, so every fault can be switched off
        // on its own without a full reset.
        if let Some(fail) = update.fail_next {
            self.fail_next = (fail.count > 0).then_some(fail);
        }
        if let Some(limit) = update.rate_limit {
            self.rate_limit = (limit.count > 0).then_some(limit);
        }
        if let Some(count) = update.continue_wait {
            self.continue_wait = count;
        }
        if let Some(ms) = update.latency_ms {
            self.latency = Duration::from_millis(ms);
        }
        Ok(())
    }

    /// Consumes the fault the next request suffers, if any, checking rate
    /// limiting first, then failures, then `Continue wait`: the order in which
    /// a real deployment's layers (proxy, server, query queue) would refuse it.
    pub fn take(&mut self) -> Option<Fault> {
        if let Some(limit) = &mut self.rate_limit {
            let fault = Fault::RateLimited {
                retry_after_secs: limit.retry_after_secs,
            };
            limit.count -= 1;
            if limit.count == 0 {
                self.rate_limit = None;
            }
            return Some(fault);
        }
        if let Some(fail) = &mut self.fail_next {
            let fault = Fault::Fail {
                status: fail.status,
                body: fail
                    .body
                    .clone()
                    .unwrap_or_else(|| DEFAULT_FAILURE_BODY.to_owned()),
            };
            fail.count -= 1;
            if fail.count == 0 {
                self.fail_next = None;
            }
            return Some(fault);
        }
        if self.continue_wait > 0 {
            self.continue_wait -= 1;
            return Some(Fault::ContinueWait);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: &str) -> FaultsUpdate {
        serde_json::from_str(json).expect("a valid faults body")
    }

    /// Each fault is consumed once per request, in the documented order.
    #[test]
    fn faults_are_consumed_in_order() {
        let mut faults = Faults::new(Duration::ZERO);
        faults
            .apply(update(
                r#"{"continueWait": 1, "failNext": {"count": 2, "status": 503, "body": "down"},
                    "rateLimit": {"retryAfterSecs": 7}}"#,
            ))
            .expect("a valid update");
        let fail = Fault::Fail {
            status: 503,
            body: "down".to_owned(),
        };
        assert_eq!(
            faults.take(),
            Some(Fault::RateLimited {
                retry_after_secs: 7
            })
        );
        assert_eq!(faults.take(), Some(fail.clone()));
        assert_eq!(faults.take(), Some(fail));
        assert_eq!(faults.take(), Some(Fault::ContinueWait));
        assert_eq!(faults.take(), None);
    }

    #[test]
    fn updates_merge_and_bad_ones_change_nothing() {
        let mut faults = Faults::new(Duration::from_millis(5));
        faults
            .apply(update(r#"{"failNext": {}}"#))
            .expect("defaults apply");
        faults
            .apply(update(r#"{"latencyMs": 9}"#))
            .expect("a valid update");
        assert_eq!(faults.latency(), Duration::from_millis(9));
        let before = faults.clone();
        assert!(
            faults
                .apply(update(r#"{"failNext": {"status": 99}, "latencyMs": 1}"#))
                .is_err()
        );
        assert_eq!(faults, before);
        assert_eq!(
            faults.take(),
            Some(Fault::Fail {
                status: 500,
                body: DEFAULT_FAILURE_BODY.to_owned()
            })
        );
        assert_eq!(faults.take(), None);
    }
}
