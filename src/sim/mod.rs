//! bi-sim: a simulated Cube-compatible BI platform with deterministic data.
//!
//! It serves the `bi` protocol (`POST /load`, single and data-blending
//! queries, and `GET /meta`) under any path prefix, for a `Sales` and a
//! `Returns` cube, after a configurable latency, and counts every call it
//! receives so tests can prove what the gateway did (or did not) send.
//! Control routes under `/_sim/` read the counters, reset them, inject
//! faults and move the data to another version (new numbers, as if orders
//! came in). With a secret, it checks the security context of every token as a
//! tenant-enforcing Cube would.
//!
//! The same simulator runs as the `bi-sim` binary and embedded in the gateway
//! on a loopback port; either way it is reached over real HTTP, so the
//! gateway's BI client is exercised exactly as against real Cube.
//!
//! Layout:
//! - `schema`: the cubes' members and the `/meta` answer;
//! - `data`: the deterministic facts and query evaluation (filters, order,
//!   limit and offset, timezones, hours), blending rules included;
//! - `security`: the check of minted tokens' security contexts;
//! - `faults`: fault injection state;
//! - `server`: the HTTP routes.
//!
//! Architecture invariant: the simulator knows nothing of the gateway (GraphQL,
//! caching, coalescing); it shares only the wire types of [`crate::bi::protocol`].

mod data;
mod faults;
mod schema;
mod security;
mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::bi::protocol::CubeQuery;
pub use data::{answer, answer_at};
use faults::{Fault, Faults, FaultsUpdate};
/// The simulator's `GET /meta` answer: its cubes and their typed members.
pub use schema::meta;
pub use security::SimSecurity;

/// How the simulator behaves before any fault is injected.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// How long every `/load` answer takes: the slowness the gateway's cache
    /// and coalescing exist to hide.
    pub latency: Duration,
    /// Set: every `/load` must carry a token signed with this secret whose
    /// security context names the customer every query is filtered on.
    pub security: Option<SimSecurity>,
}

/// Shared state: counters + fault injection. Cheap to clone (Arc inside).
#[derive(Debug, Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: SimConfig,
    // A std mutex: it is held for a few field updates and never across an
    // `.await`, so an async one would only add overhead.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    stats: SimStats,
    faults: Faults,
    /// (customer, SHA-256 of the token) of every token that passed the check.
    tokens: BTreeSet<(String, String)>,
}

/// The body of `POST /_sim/data-version`, and its answer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DataVersion {
    pub version: u64,
}

/// What the simulator has received since it started or was last reset.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SimStats {
    /// `POST /load` requests received, whatever their outcome (faults,
    /// `Continue wait`, 429 and rejected queries included).
    pub http_requests: u64,
    /// Queries received in those requests: a batch of 8 counts 8.
    pub queries: u64,
    /// Times each query was received, keyed by [`canonical_key`].
    pub by_query: BTreeMap<String, u64>,
    /// `GET /meta` requests received.
    pub meta_requests: u64,
    /// The `Authorization` header of the last `/load` (`None` if it had none).
    pub last_authorization: Option<String>,
    /// The `traceparent` header of the last `/load` (`None` if it had none).
    pub last_traceparent: Option<String>,
    /// The largest number of queries seen in one request.
    pub max_batch_size: u64,
    /// The version of the data `/load` answers from (0 at start and after a
    /// reset): each version has its own deterministic numbers.
    pub data_version: u64,
    /// In the security-context mode: how many different tokens each
    /// customer's requests carried.
    #[serde(default)]
    pub tokens_by_customer: BTreeMap<String, u64>,
    /// In the security-context mode: the claims of the last accepted token.
    #[serde(default)]
    pub last_security_context: Option<serde_json::Value>,
    /// In the security-context mode: requests refused for their token.
    #[serde(default)]
    pub security_rejections: u64,
}

/// The key under which [`SimStats::by_query`] counts `query`: its JSON with
/// measures, dimensions, filters and their values sorted, so that queries
/// which differ only in those orders, and so ask the same question, count
/// together.
pub fn canonical_key(query: &CubeQuery) -> String {
    let mut query = query.clone();
    query.measures.sort_unstable();
    query.dimensions.sort_unstable();
    for filter in &mut query.filters {
        filter.values.sort_unstable();
    }
    query.filters.sort_unstable();
    // Serializing plain structs of strings cannot fail; should it ever, the
    // Debug form still tells queries apart.
    serde_json::to_string(&query).unwrap_or_else(|_| format!("{query:?}"))
}

impl Simulator {
    pub fn new(config: SimConfig) -> Self {
        let state = State {
            stats: SimStats::default(),
            faults: Faults::new(config.latency),
            tokens: BTreeSet::new(),
        };
        Simulator {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(state),
            }),
        }
    }

    /// Every route: the Cube API under any prefix, and `/_sim/` control routes.
    pub fn router(&self) -> axum::Router {
        server::router(self.clone())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.lock().stats.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, and every update leaves
        // the state consistent, so a poisoned lock is still safe to use.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves `/load` answers to data `version` from the next request on.
    pub fn set_data_version(&self, version: u64) {
        self.lock().stats.data_version = version;
    }

    /// Counts one `/load` request carrying `queries` (none if its body could
    /// not be read) and remembers its headers. Returns the data version the
    /// request is answered from.
    fn record_load(
        &self,
        queries: &[CubeQuery],
        authorization: Option<String>,
        traceparent: Option<String>,
    ) -> u64 {
        let mut state = self.lock();
        let stats = &mut state.stats;
        let batch = u64::try_from(queries.len()).unwrap_or(u64::MAX);
        stats.http_requests += 1;
        stats.queries += batch;
        stats.max_batch_size = stats.max_batch_size.max(batch);
        for query in queries {
            *stats.by_query.entry(canonical_key(query)).or_default() += 1;
        }
        stats.last_authorization = authorization;
        stats.last_traceparent = traceparent;
        stats.data_version
    }

    /// In the security-context mode, checks the request's token against its
    /// queries and records the outcome; `Err` is the refusal's message.
    fn check_security(
        &self,
        authorization: Option<&str>,
        queries: &[CubeQuery],
    ) -> Result<(), String> {
        let Some(security) = &self.shared.config.security else {
            return Ok(());
        };
        let checked = security.check(authorization, queries);
        let mut state = self.lock();
        match checked {
            Ok(context) => {
                let token = authorization.unwrap_or_default();
                let digest: String = sha2::Sha256::digest(token.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                if state.tokens.insert((context.customer.clone(), digest)) {
                    *state
                        .stats
                        .tokens_by_customer
                        .entry(context.customer)
                        .or_default() += 1;
                }
                state.stats.last_security_context = Some(context.claims);
                Ok(())
            }
            Err(refusal) => {
                state.stats.security_rejections += 1;
                Err(refusal)
            }
        }
    }

    fn record_meta(&self) {
        self.lock().stats.meta_requests += 1;
    }

    /// The fault the next `/load` request suffers, if any, and the latency
    /// it answers after.
    fn next_fault(&self) -> (Option<Fault>, Duration) {
        let mut state = self.lock();
        (state.faults.take(), state.faults.latency())
    }

    fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    fn update_faults(&self, update: FaultsUpdate) -> Result<Faults, String> {
        let mut state = self.lock();
        state.faults.apply(update)?;
        Ok(state.faults.clone())
    }

    /// Zeroes the counters, clears the faults, restores the configured
    /// latency and data version 0: back to the state right after
    /// [`Simulator::new`].
    fn reset(&self) {
        let mut state = self.lock();
        state.stats = SimStats::default();
        state.faults = Faults::new(self.shared.config.latency);
        state.tokens.clear();
    }
}

/// Binds nothing itself: serves on the given listener until `shutdown`
/// resolves, then finishes the requests in flight (graceful).
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Simulator,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, sim.router())
        .with_graceful_shutdown(shutdown)
        .await
}
