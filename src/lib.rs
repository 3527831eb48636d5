//! analytics-gateway: a GraphQL API for dashboard aggregates that makes each
//! distinct question reach the BI platform once per cache lifetime.
//!
//! # Layout
//! - [`config`]: flags and environment, resolved once.
//! - [`query`]: the validated query, its BI form and its cache key.
//! - [`cubes`]: each cube's time dimension and customer member (`BI_CUBES_FILE`).
//! - [`graphql`]: schema, resolvers, the per-request dataloader, error codes.
//! - [`aggregate`]: lookups, in-process flights, BI batches: the request flow.
//! - [`live`]: live panels (`aggregateLive`): one refresh per key per interval.
//! - [`coalesce`]: who produces each key (in-process flights, coordinators).
//! - [`cache`]: entries, remembered errors, the in-memory store.
//! - [`bi`]: the Cube protocol and its HTTP client.
//! - [`catalog`]: the BI's cubes and members, for validation and discovery.
//! - [`sim`]: the simulated BI, shared by `bi-sim` and the embedded mode.
//! - [`http`]: routes and middleware. [`readiness`]: what `/readyz` says.
//! - [`telemetry`]: logs, traces, and the table of metrics.
//!
//! `ARCHITECTURE.md` has the bird's-eye view and the invariants.

pub mod aggregate;
pub mod auth;
pub mod bi;
pub mod cache;
pub mod catalog;
pub mod coalesce;
pub mod config;
pub mod cubes;
pub mod graphql;
pub mod http;
pub mod live;
pub mod query;
pub mod readiness;
pub mod sim;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::aggregate::{Aggregator, AggregatorSettings, RefreshSettings};
use crate::auth::Authenticator;
use crate::bi::{BiClient, BiError, BiSettings};
use crate::cache::Lifetime;
use crate::catalog::CatalogStore;
use crate::coalesce::{Backend, LocalCoordinator, RedisCoordinator, RedisSettings};
use crate::config::{BiTarget, Config, Coordination};
use crate::graphql::SchemaContext;
use crate::query::Planner;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not start the built-in BI simulator: {0}")]
    Simulator(std::io::Error),
    #[error("BI client: {0}")]
    Bi(#[from] BiError),
    #[error("REDIS_URL: {0}")]
    Redis(String),
    #[error("{0}")]
    Auth(String),
    #[error("the cube mapping does not fit the BI's catalog: {0}")]
    Cubes(String),
    #[error("serving HTTP failed: {0}")]
    Serve(std::io::Error),
}

/// How long the start waits for the BI's catalog to check the cube mapping.
const START_CATALOG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Background tasks that must not outlive the gateway.
struct TaskGuard(Vec<JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves, then finishes
/// the requests in flight and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    // The recorder first: whatever is recorded before it is installed is lost.
    let metrics = telemetry::metrics_handle();
    let mut tasks = TaskGuard(Vec::new());
    if config.clock_offset_ms != 0 {
        cache::set_clock_offset(
            std::time::Duration::from_millis(config.clock_offset_ms.unsigned_abs()),
            config.clock_offset_ms > 0,
        );
        tracing::warn!(
            offset_ms = config.clock_offset_ms,
            "GATEWAY_CLOCK_OFFSET_MS is set: this process's wall clock is shifted (for tests only)"
        );
    }

    if let Some(warning) = config.bi.warning() {
        tracing::warn!("{warning}");
    }
    if let Some(warning) = &config.telemetry.sampling_warning {
        tracing::warn!("{warning}");
    }
    let base_url = match &config.bi {
        BiTarget::Remote { base_url } => base_url.clone(),
        BiTarget::Embedded { latency } => {
            let sim_listener = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(StartError::Simulator)?;
            let address = sim_listener.local_addr().map_err(StartError::Simulator)?;
            // Minted tokens are checked by the built-in BI as Cube would.
            let security = config
                .bi_client
                .minting
                .as_ref()
                .map(|minting| sim::SimSecurity {
                    secret: minting.secret.clone(),
                    claim: minting.claim.clone(),
                });
            let simulator = sim::Simulator::new(sim::SimConfig {
                latency: *latency,
                security,
            });
            tasks.0.push(tokio::spawn(async move {
                if let Err(err) = sim::serve(sim_listener, simulator, std::future::pending()).await
                {
                    tracing::error!(error = %err, "the built-in BI simulator stopped");
                }
            }));
            tracing::info!(
                latency_ms = latency.as_millis() as u64,
                "using the built-in simulated BI (set BI_URL for a real one)"
            );
            format!("http://{address}/cubejs-api/v1")
        }
    };
    let bi = BiClient::new(BiSettings {
        base_url: base_url.clone(),
        token: config.bi_client.token.clone(),
        minting: config.bi_client.minting.clone(),
        timeout: config.bi_client.timeout,
        pool_idle_timeout: config.bi_client.pool_idle_timeout,
        continue_wait_delay: config.bi_client.continue_wait_delay,
    })?;

    let readiness = Arc::new(readiness::Readiness::default());
    tasks.0.push(tokio::spawn(
        Arc::clone(&readiness).probe_bi_forever(bi.clone()),
    ));

    let backend = match &config.coordination {
        Coordination::InProcess => Backend::of(LocalCoordinator::new(
            config.cache.memory_max_bytes,
            config.cache.negative_ttl,
        )),
        Coordination::Redis(options) => Backend::of(
            RedisCoordinator::start(RedisSettings {
                deployment: options.deployment.clone(),
                namespace: config.cache.namespace.clone(),
                lock_ttl: options.lock_ttl,
                command_timeout: options.command_timeout,
                down_after: options.down_after,
                configure_notifications: options.configure_notifications,
                local_cache: options.local_cache,
                memory_max_bytes: config.cache.memory_max_bytes,
                negative_ttl: config.cache.negative_ttl,
                value_ttl: config.cache.ttl + config.cache.stale,
                instance_id: config.instance_id.clone(),
            })
            .await
            .map_err(|err| StartError::Redis(err.to_string()))?,
        ),
    };

    let aggregator = Aggregator::new(
        backend.coordinator,
        bi.clone(),
        AggregatorSettings {
            lifetime: Lifetime {
                fresh: config.cache.ttl,
                stale: config.cache.stale,
            },
            negative_ttl: config.cache.negative_ttl,
            max_batch_size: config.bi_client.max_batch_size,
            instance_id: config.instance_id.clone(),
            row_limit: config.query.row_limit,
            refresh: RefreshSettings {
                ahead_min_reads: config.cache.refresh_ahead_min_hits,
                ahead_per_minute: config.cache.refresh_max_per_minute,
                timeout: config.request_timeout,
            },
        },
    );

    // The cube mapping is checked against the BI's catalog before anything
    // is served: a member the BI lacks stops the start, naming it. A BI that
    // cannot be reached now does not (the fleet must start while it is
    // away); the mapping is checked whenever the catalog arrives.
    let live = live::Live::new(
        Arc::clone(&aggregator),
        backend.announcements,
        Arc::clone(&backend.counters),
        config.instance_id.clone(),
        config.live.clone(),
    );

    let catalog = Arc::new(CatalogStore::new(Arc::clone(&config.query.cubes)));
    match bi
        .meta_within(START_CATALOG_TIMEOUT.min(config.bi_client.timeout))
        .await
    {
        Ok(meta) => {
            let problems = config.query.cubes.problems(&meta);
            if !problems.is_empty() {
                return Err(StartError::Cubes(problems.join("; ")));
            }
            catalog.set(meta);
        }
        Err(err) => tracing::warn!(
            error = %err,
            "could not fetch the BI catalog at start; the cube mapping is checked when it arrives"
        ),
    }
    tasks.0.push(tokio::spawn(
        Arc::clone(&catalog).refresh_forever(bi.clone(), config.catalog_refresh),
    ));

    let authenticator = match &config.auth {
        Some(settings) => Some(Arc::new(
            Authenticator::new(settings).map_err(|err| StartError::Auth(err.to_string()))?,
        )),
        None => {
            tracing::warn!(
                "authentication is off: every caller may query every customer (set AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY_FILE or AUTH_API_KEYS_FILE)"
            );
            None
        }
    };

    // What makes the same question mean something else: which BI answers it,
    // and with which credentials (a Cube token carries a security context).
    // The embedded simulator is one BI whatever its port, so instances
    // without BI_URL still share entries through Redis.
    let bi_identity = match &config.bi {
        BiTarget::Remote { base_url } => base_url.as_str(),
        BiTarget::Embedded { .. } => "embedded-simulator",
    };
    // Minted tokens: the secret (hashed) and the claim say what the tokens
    // carry; each key adds its own token scope (see `Planner::plan`).
    let token_fingerprint = match &config.bi_client.minting {
        Some(minting) => format!(
            "minted:{}:{}",
            auth::sha256_hex(&minting.secret),
            minting.claim
        ),
        None => config
            .bi_client
            .token
            .as_deref()
            .map(auth::sha256_hex)
            .unwrap_or_default(),
    };
    let planner = Planner::new(
        config.planner.clone(),
        &format!("{bi_identity}\n{token_fingerprint}"),
    );
    let context = SchemaContext {
        aggregator: Arc::clone(&aggregator),
        planner,
        limits: config.query.clone(),
        catalog,
        bi: bi.clone(),
        trace_customer_ids: config.telemetry.trace_customer_ids,
        live: Arc::clone(&live),
    };
    let schema = graphql::build_schema(context.clone(), &config.graphql, true);
    let schema_without_suggestions = graphql::build_schema(context.clone(), &config.graphql, false);
    let state = http::AppState {
        schema,
        schema_without_suggestions,
        authenticator,
        limits: config.graphql.clone(),
        aggregator,
        counters: backend.counters,
        store_health: backend.health,
        invalidator: backend.invalidator,
        admin_token: config.admin_token.clone(),
        persisted_queries: http::PersistedQueries::new(
            config.cache.persisted_queries_max,
            backend.documents,
        ),
        metrics,
        request_timeout: config.request_timeout,
        instance_id: config.instance_id.as_str().into(),
        documents: http::DocumentCache::default(),
        operations: http::OperationNames::default(),
        readiness: Arc::clone(&readiness),
        live,
        graphiql: config.graphiql.then(|| {
            Arc::new(http::GraphiqlPage::new(match &config.auth {
                None => http::CredentialHint::None,
                Some(auth) if auth.jwt.is_some() => http::CredentialHint::Bearer,
                Some(_) => http::CredentialHint::ApiKey,
            }))
        }),
        responses: http::ResponseCache::new(
            config.cache.response_max_bytes,
            Arc::clone(&context.catalog),
        ),
    };
    let app = http::app(state, config.graphql.max_body_bytes);

    if let Ok(address) = listener.local_addr() {
        tracing::info!(instance = %config.instance_id, "analytics-gateway listening on http://{address}/graphql");
    }
    // Shutdown first makes `/readyz` answer 503, then (for
    // SHUTDOWN_DRAIN_SECS) keeps serving so that load balancers notice, then
    // stops accepting and finishes the requests in flight.
    let drain = config.shutdown_drain;
    let draining = Arc::clone(&readiness);
    let shutdown = async move {
        shutdown.await;
        draining.draining();
        if !drain.is_zero() {
            tracing::info!(
                drain_secs = drain.as_secs(),
                "draining: /readyz answers 503 while requests are still served"
            );
            tokio::time::sleep(drain).await;
        }
    };
    readiness.serving();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(StartError::Serve)?;
    drop(tasks);
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
