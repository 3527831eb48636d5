//! Configuration, in two stages: [`Cli`] is what the operator typed (flags and
//! environment variables, parsed by clap), [`Config`] is what the gateway runs
//! with (validated, with enums instead of options). Nothing else reads the
//! environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::live::LiveSettings;

/// Every setting is a flag and an environment variable; `--help` lists them.
#[derive(Debug, Clone, Parser)]
#[command(name = "analytics-gateway", version, about)]
pub struct Cli {
    /// Address the gateway listens on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: String,

    /// `redis://` or `rediss://` URL of the shared cache; unset (with the two
    /// below) means embedded single-instance mode (in-process cache and coalescing).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// Comma-separated `redis://`/`rediss://` seed nodes of a Redis Cluster;
    /// set instead of `REDIS_URL`.
    #[arg(long, env = "REDIS_CLUSTER_NODES")]
    pub redis_cluster_nodes: Option<String>,

    /// Comma-separated `redis://` addresses of Redis Sentinels; with
    /// `REDIS_SENTINEL_MASTER`, set instead of `REDIS_URL`.
    #[arg(long, env = "REDIS_SENTINEL_NODES")]
    pub redis_sentinel_nodes: Option<String>,

    /// The Sentinel service name of the primary.
    #[arg(long, env = "REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// Base URL of a Cube-compatible REST API, ending in `/v1`; unset means the
    /// built-in simulated BI.
    #[arg(long, env = "BI_URL")]
    pub bi_url: Option<String>,

    /// Sent verbatim as the `Authorization` header on every BI request.
    #[arg(long, env = "BI_TOKEN", hide_env_values = true)]
    pub bi_token: Option<String>,

    /// The BI dimension that the `customer` argument filters on.
    #[arg(long, env = "BI_CUSTOMER_MEMBER", default_value = "Sales.customerId")]
    pub bi_customer_member: String,

    /// The BI time dimension that `dateRange` and `granularity` apply to.
    #[arg(long, env = "BI_TIME_DIMENSION", default_value = "Sales.date")]
    pub bi_time_dimension: String,

    /// JSON or TOML file mapping each cube to its time dimension and customer
    /// member; unset: BI_TIME_DIMENSION and BI_CUSTOMER_MEMBER apply to every cube.
    #[arg(long, env = "BI_CUBES_FILE")]
    pub bi_cubes_file: Option<String>,

    /// Cube's API secret: the gateway mints a short-lived, customer-scoped
    /// Cube JWT per customer instead of sending BI_TOKEN.
    #[arg(long, env = "BI_API_SECRET", hide_env_values = true)]
    pub bi_api_secret: Option<String>,

    /// The claim of a minted token's security context that names the customer.
    #[arg(long, env = "BI_SECURITY_CONTEXT_CLAIM", default_value = "customerId")]
    pub bi_security_context_claim: String,

    /// Lifetime of a minted token; it is reused until max(a fifth of it,
    /// BI_TIMEOUT_SECS) before it expires.
    #[arg(long, env = "BI_TOKEN_TTL_SECS", default_value_t = 900)]
    pub bi_token_ttl_secs: u64,

    /// Deadline of one BI call, Continue-wait rounds and 429 waits included.
    #[arg(long, env = "BI_TIMEOUT_SECS", default_value_t = 30)]
    pub bi_timeout_secs: u64,

    /// Row limit set on every BI query (real Cube cuts silently at 10,000 without one; at most 50,000).
    #[arg(long, env = "BI_ROW_LIMIT", default_value_t = 10_000)]
    pub bi_row_limit: u32,

    /// Most queries sent in one multi-query BI request.
    #[arg(long, env = "BI_MAX_BATCH_SIZE", default_value_t = 50)]
    pub bi_max_batch_size: usize,

    /// Pooled BI connections idle longer than this are closed (Cube closes them after 5 s).
    #[arg(long, env = "BI_POOL_IDLE_TIMEOUT_MS", default_value_t = 4_000)]
    pub bi_pool_idle_timeout_ms: u64,

    /// Pause before re-sending a request the BI answered with "Continue wait".
    #[arg(long, env = "BI_CONTINUE_WAIT_DELAY_MS", default_value_t = 100)]
    pub bi_continue_wait_delay_ms: u64,

    /// Latency of the built-in simulated BI (used only when `BI_URL` is unset).
    #[arg(long, env = "BI_SIM_LATENCY_MS", default_value_t = 2_000)]
    pub bi_sim_latency_ms: u64,

    /// How long a BI result stays fresh in the cache.
    #[arg(long, env = "CACHE_TTL_SECS", default_value_t = 300)]
    pub cache_ttl_secs: u64,

    /// After an entry's fresh time ends, how long it may still be served
    /// (flagged stale) while one refresh runs; 0 turns this off.
    #[arg(long, env = "CACHE_STALE_SECS", default_value_t = 60)]
    pub cache_stale_secs: u64,

    /// Reads of an entry during its fresh time (in one instance) that make it
    /// hot: refreshed a little before it turns stale.
    #[arg(long, env = "REFRESH_AHEAD_MIN_HITS", default_value_t = 2)]
    pub refresh_ahead_min_hits: u32,

    /// Most refreshes ahead of time one instance starts per minute; past it,
    /// keys are left to stale-while-revalidate.
    #[arg(long, env = "REFRESH_MAX_PER_MINUTE", default_value_t = 600)]
    pub refresh_max_per_minute: u32,

    /// The shortest refresh interval of a live panel (`aggregateLive`'s
    /// `everySeconds`, and what applies without it).
    #[arg(long, env = "LIVE_MIN_INTERVAL_SECS", default_value_t = 10)]
    pub live_min_interval_secs: u64,

    /// Most live subscriptions open on one instance; past it, a subscribe
    /// is refused (`TOO_MANY_SUBSCRIPTIONS`).
    #[arg(long, env = "LIVE_MAX_SUBSCRIPTIONS", default_value_t = 50_000)]
    pub live_max_subscriptions: usize,

    /// Most live subscriptions on one WebSocket connection; past it, a
    /// subscribe is refused (`TOO_MANY_SUBSCRIPTIONS`).
    #[arg(
        long,
        env = "LIVE_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub live_max_subscriptions_per_connection: usize,

    /// How long a send to a live connection may stay blocked (a client that
    /// does not read) before the connection is closed.
    #[arg(long, env = "LIVE_SEND_TIMEOUT_SECS", default_value_t = 10)]
    pub live_send_timeout_secs: u64,

    /// Bearer token of the `/admin/*` routes (cache invalidation); unset
    /// means those routes answer 404.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Most documents of automatic persisted queries kept in process memory
    /// (with Redis, they are shared there too, for a day).
    #[arg(long, env = "PERSISTED_QUERIES_MAX", default_value_t = 10_000)]
    pub persisted_queries_max: u64,

    /// How long a failed BI answer is remembered, so waiters share it and the BI is not hammered.
    #[arg(long, env = "NEGATIVE_CACHE_SECS", default_value_t = 5)]
    pub negative_cache_secs: u64,

    /// Size bound of the in-process cache, in MiB of row JSON.
    #[arg(long, env = "MEMORY_CACHE_MAX_MB", default_value_t = 256)]
    pub memory_cache_max_mb: u64,

    /// Size bound of the cache of whole answers to repeated identical
    /// requests (served while every entry behind them is still fresh and
    /// what process memory holds), in MiB of response JSON; 0 turns it off.
    #[arg(long, env = "RESPONSE_CACHE_MAX_MB", default_value_t = 64)]
    pub response_cache_max_mb: u64,

    /// Prefix of every cache key; tests use a random one to share one Redis.
    #[arg(long, env = "CACHE_NAMESPACE", default_value = "ag")]
    pub cache_namespace: String,

    /// Lifetime of a Redis leader lock; the leader renews it while its BI call runs,
    /// so this is how soon a dead leader is noticed.
    #[arg(long, env = "REDIS_LOCK_TTL_MS", default_value_t = 3_000)]
    pub redis_lock_ttl_ms: u64,

    /// Timeout of one Redis command; a command that fails or times out is
    /// retried (within the request's deadline) until Redis is down.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 1_000)]
    pub redis_timeout_ms: u64,

    /// Redis counts as down (degraded mode: in-process coalescing only) when
    /// no command has succeeded, or coordination commands have been refused,
    /// for this long. Unset means one lock TTL, except that a Redis Cluster
    /// may refuse (`CLUSTERDOWN`) for as long as it takes to fail a primary
    /// over (twice its `cluster-node-timeout`, plus one second): a failover
    /// is waited out rather than paid for with one BI call per instance.
    #[arg(long, env = "REDIS_DOWN_AFTER_MS")]
    pub redis_down_after_ms: Option<u64>,

    /// Whether the gateway may turn on keyspace notifications with CONFIG SET
    /// (managed Redis often forbids it; then waiters poll).
    #[arg(long, env = "REDIS_CONFIGURE_NOTIFICATIONS", default_value_t = true, action = clap::ArgAction::Set)]
    pub redis_configure_notifications: bool,

    /// Whether Redis-backed hits may be served from a bounded copy in process
    /// memory (each kept no longer than its entry's own expiry).
    #[arg(long, env = "REDIS_LOCAL_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub redis_local_cache: bool,

    /// How long one GraphQL request may wait for its answers before it gets `BI_UNAVAILABLE`.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = 40)]
    pub request_timeout_secs: u64,

    /// Longest `dateRange` accepted, in days (both ends included).
    #[arg(long, env = "MAX_DATE_RANGE_DAYS", default_value_t = 731)]
    pub max_date_range_days: u32,

    /// Longest `dateRange` accepted with granularity HOUR, in days.
    #[arg(long, env = "MAX_HOURLY_RANGE_DAYS", default_value_t = 31)]
    pub max_hourly_range_days: u32,

    /// Most filters in one `aggregate`.
    #[arg(long, env = "MAX_FILTERS", default_value_t = 20)]
    pub max_filters: usize,

    /// Most values in one filter.
    #[arg(long, env = "MAX_FILTER_VALUES", default_value_t = 100)]
    pub max_filter_values: usize,

    /// Most measures in one `aggregate`.
    #[arg(long, env = "MAX_MEASURES", default_value_t = 20)]
    pub max_measures: usize,

    /// Most dimensions in one `aggregate`.
    #[arg(long, env = "MAX_DIMENSIONS", default_value_t = 10)]
    pub max_dimensions: usize,

    /// Longest `customer` accepted, in characters.
    #[arg(long, env = "MAX_CUSTOMER_LEN", default_value_t = 128)]
    pub max_customer_len: usize,

    /// Deepest GraphQL document accepted.
    #[arg(long, env = "GRAPHQL_MAX_DEPTH", default_value_t = 12)]
    pub graphql_max_depth: usize,

    /// Highest GraphQL complexity accepted (each field counts 1).
    #[arg(long, env = "GRAPHQL_MAX_COMPLEXITY", default_value_t = 1_000)]
    pub graphql_max_complexity: usize,

    /// Largest request body accepted, in bytes; larger ones get HTTP 413.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Most `aggregate` fields in one document: each may be a paid BI query.
    #[arg(long, env = "MAX_AGGREGATES_PER_REQUEST", default_value_t = 50)]
    pub max_aggregates_per_request: usize,

    /// Most aliased fields in one document.
    #[arg(long, env = "MAX_ALIASES", default_value_t = 60)]
    pub max_aliases: usize,

    /// Most directives on one field.
    #[arg(long, env = "MAX_DIRECTIVES_PER_FIELD", default_value_t = 4)]
    pub max_directives_per_field: usize,

    /// Deepest nesting of lists and objects in a document or its variables.
    #[arg(long, env = "MAX_RECURSIVE_DEPTH", default_value_t = 32)]
    pub max_recursive_depth: usize,

    /// Most lexical tokens in a document; longer ones are refused before parsing.
    #[arg(long, env = "MAX_TOKENS", default_value_t = 5_000)]
    pub max_tokens: usize,

    /// Accept a JSON array of operations in one POST.
    #[arg(long, env = "ALLOW_BATCHED_REQUESTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_batched_requests: bool,

    /// Refuse POSTs a browser could send cross-site without a preflight (no
    /// content type, or text/plain and form encodings) unless they carry one
    /// of CSRF_REQUIRED_HEADERS.
    #[arg(long, env = "CSRF_PREVENTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub csrf_prevention: bool,

    /// Headers that make a simple request acceptable (comma-separated).
    #[arg(
        long,
        env = "CSRF_REQUIRED_HEADERS",
        default_value = "x-apollo-operation-name,apollo-require-preflight"
    )]
    pub csrf_required_headers: String,

    /// Whether `GET /graphql` serves GraphiQL to browsers (`Accept: text/html`);
    /// false: they get what other GET clients get, and `/graphiql/*` is 404.
    #[arg(long, env = "GRAPHIQL", default_value_t = true, action = clap::ArgAction::Set)]
    pub graphiql: bool,

    /// HS256 secret for JWT bearer tokens; turns authentication on.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub auth_jwt_secret: Option<String>,

    /// PEM file with an RS256 or ES256 public key for JWT bearer tokens; turns authentication on.
    #[arg(long, env = "AUTH_JWT_PUBLIC_KEY_FILE")]
    pub auth_jwt_public_key_file: Option<String>,

    /// The JWT claim listing the customers a token may query (a list, or "*").
    #[arg(long, env = "AUTH_JWT_CUSTOMERS_CLAIM", default_value = "customers")]
    pub auth_jwt_customers_claim: String,

    /// Required `aud` of JWTs (unset: `aud` is not checked).
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,

    /// Required `iss` of JWTs (unset: `iss` is not checked).
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,

    /// BI queries per minute allowed to each JWT subject (unset: no quota).
    #[arg(long, env = "AUTH_JWT_QUOTA_PER_MINUTE")]
    pub auth_jwt_quota_per_minute: Option<u64>,

    /// JSON file of API keys (stored as SHA-256 hashes) with their customers
    /// and quotas; turns authentication on. Keys are read from `x-api-key`.
    #[arg(long, env = "AUTH_API_KEYS_FILE")]
    pub auth_api_keys_file: Option<String>,

    /// How often the BI's catalog (`/meta`) is fetched again.
    #[arg(long, env = "CATALOG_REFRESH_SECS", default_value_t = 300)]
    pub catalog_refresh_secs: u64,

    /// After SIGTERM or Ctrl-C, how long `/readyz` answers 503 while
    /// everything else is still served, so that load balancers stop sending
    /// before the listener closes; 0 closes it at once.
    #[arg(long, env = "SHUTDOWN_DRAIN_SECS", default_value_t = 0)]
    pub shutdown_drain_secs: u64,

    /// Name of this instance in cache entries, logs and traces; defaults to a random id.
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// OTLP endpoint for trace export; unset means no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// OTLP protocol: `grpc` or `http/protobuf`; unset means `http/protobuf`
    /// when the endpoint's port is 4318 or its path ends in `/v1/traces`, else `grpc`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL")]
    pub otel_exporter_otlp_protocol: Option<String>,

    /// Which requests answered from the cache are traced (OpenTelemetry's
    /// standard variable): `always_on`, `always_off`, `traceidratio`, and
    /// the `parentbased_` form of each (a caller's `traceparent` decides
    /// when there is one). BI calls, and requests that waited on one, are
    /// always traced.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub otel_traces_sampler: String,

    /// The ratio of the `traceidratio` samplers, from 0 to 1 (default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub otel_traces_sampler_arg: Option<String>,

    /// Put customer ids in span attributes (they can be personal data).
    #[arg(long, env = "TRACE_CUSTOMER_IDS", default_value_t = false, action = clap::ArgAction::Set)]
    pub trace_customer_ids: bool,

    /// Service name in exported traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "analytics-gateway")]
    pub otel_service_name: String,

    /// Log filter, in `tracing` EnvFilter syntax.
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub rust_log: String,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// For tests only: shifts this process's wall clock by this many
    /// milliseconds (negative: behind), so instances whose clocks disagree
    /// can be tried without touching the machine's clock.
    #[arg(
        long,
        env = "GATEWAY_CLOCK_OFFSET_MS",
        default_value_t = 0,
        allow_hyphen_values = true,
        hide = true
    )]
    pub clock_offset_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A setting that cannot be used, named by its environment variable.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

fn bad(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        variable,
        problem: problem.into(),
    }
}

/// The resolved configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub bi: BiTarget,
    pub bi_client: BiClientSettings,
    pub coordination: Coordination,
    pub query: QueryLimits,
    pub planner: PlannerSettings,
    pub cache: CacheSettings,
    pub graphql: GraphqlLimits,
    pub auth: Option<AuthSettings>,
    pub request_timeout: Duration,
    pub catalog_refresh: Duration,
    /// `SHUTDOWN_DRAIN_SECS`.
    pub shutdown_drain: Duration,
    pub instance_id: String,
    pub telemetry: TelemetrySettings,
    /// The bearer token of `/admin/*`; `None`: those routes answer 404.
    pub admin_token: Option<AdminToken>,
    /// `GRAPHIQL`: whether browsers get GraphiQL at `GET /graphql`.
    pub graphiql: bool,
    /// Added to the wall clock (tests only; see `Cli::clock_offset_ms`).
    pub clock_offset_ms: i64,
    /// Live panels (`LIVE_*`).
    pub live: LiveSettings,
}

/// Where the BI is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BiTarget {
    /// The built-in simulator, started inside the process on a loopback port.
    Embedded { latency: Duration },
    /// A Cube-compatible REST API; the URL has no trailing slash.
    Remote { base_url: String },
}

impl BiTarget {
    /// What the start-up log should warn about. A Cube REST API's base URL
    /// ends in `/v1` (`https://cube.example.com/cubejs-api/v1`): the gateway
    /// appends `/load` and `/meta` to `BI_URL` as given, so a URL without it
    /// most likely reaches nothing. This warns rather than refuses: a reverse
    /// proxy in front of Cube may rewrite paths, and a working set-up must not
    /// be refused for its spelling.
    pub fn warning(&self) -> Option<String> {
        let BiTarget::Remote { base_url } = self else {
            return None;
        };
        let path = reqwest::Url::parse(base_url)
            .map(|url| url.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        (!path.ends_with("/v1")).then(|| {
            format!(
                "BI_URL `{base_url}` does not end in /v1: Cube's REST API is at a URL like \
                 https://cube.example.com/cubejs-api/v1, and the gateway will ask \
                 `{base_url}/load`; fix BI_URL unless a proxy rewrites the path"
            )
        })
    }
}

/// How the BI client behaves, whatever the target.
#[derive(Debug, Clone)]
pub struct BiClientSettings {
    pub token: Option<String>,
    /// `BI_API_SECRET` and its companions: tokens minted per customer.
    pub minting: Option<crate::bi::MintSettings>,
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub continue_wait_delay: Duration,
    pub max_batch_size: usize,
}

/// Who coordinates BI calls between requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coordination {
    /// One process: an in-process cache and in-process single-flight.
    InProcess,
    /// Many processes sharing a Redis.
    Redis(RedisOptions),
}

/// Which Redis, and how it is deployed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisDeployment {
    /// One server (`REDIS_URL`).
    Single { url: String },
    /// A Redis Cluster, found through any of these seed nodes.
    Cluster { nodes: Vec<String> },
    /// A primary found through these Sentinels, by its service name.
    Sentinel { nodes: Vec<String>, master: String },
}

impl RedisDeployment {
    /// Its name in `/readyz` and metrics.
    pub fn mode(&self) -> &'static str {
        match self {
            RedisDeployment::Single { .. } => "single",
            RedisDeployment::Cluster { .. } => "cluster",
            RedisDeployment::Sentinel { .. } => "sentinel",
        }
    }
}

/// How the gateway uses Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    pub deployment: RedisDeployment,
    pub lock_ttl: Duration,
    pub command_timeout: Duration,
    /// `REDIS_DOWN_AFTER_MS`; `None`: the default of the deployment.
    pub down_after: Option<Duration>,
    pub configure_notifications: bool,
    pub local_cache: bool,
}

/// Limits applied when a GraphQL input becomes an [`crate::query::AggregateQuery`].
#[derive(Debug, Clone)]
pub struct QueryLimits {
    pub max_range_days: u32,
    /// The longest range with granularity HOUR.
    pub max_hourly_range_days: u32,
    pub max_measures: usize,
    pub max_dimensions: usize,
    pub max_customer_len: usize,
    pub max_filters: usize,
    pub max_filter_values: usize,
    /// `BI_ROW_LIMIT`: the largest `limit`, and the one set when a query has none.
    pub row_limit: u32,
    /// Each cube's time dimension and customer member (`BI_CUBES_FILE`, or
    /// `BI_TIME_DIMENSION` and `BI_CUSTOMER_MEMBER` for every cube). Time
    /// dimensions are refused in `dimensions` and customer members in
    /// `filters` even before the BI's catalog is known.
    pub cubes: std::sync::Arc<crate::cubes::CubeMap>,
}

/// What turns a validated query into a BI query; all of it is part of the cache key.
#[derive(Debug, Clone)]
pub struct PlannerSettings {
    /// Whether each customer's queries carry a token of their own
    /// (`BI_API_SECRET`): a token scope per customer.
    pub customer_tokens: bool,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub ttl: Duration,
    /// How long an entry may be served stale after its fresh time (0: never).
    pub stale: Duration,
    pub negative_ttl: Duration,
    pub refresh_ahead_min_hits: u32,
    pub refresh_max_per_minute: u32,
    pub persisted_queries_max: u64,
    pub memory_max_bytes: u64,
    /// `RESPONSE_CACHE_MAX_MB` in bytes; 0: off (also when process memory
    /// keeps no entries: `REDIS_LOCAL_CACHE=false`, `MEMORY_CACHE_MAX_MB=0`).
    pub response_max_bytes: u64,
    pub namespace: String,
}

#[derive(Debug, Clone)]
pub struct GraphqlLimits {
    pub max_depth: usize,
    pub max_complexity: usize,
    pub max_body_bytes: usize,
    pub max_aggregates: usize,
    pub max_aliases: usize,
    pub max_directives_per_field: usize,
    pub max_recursive_depth: usize,
    pub max_tokens: usize,
    pub allow_batched_requests: bool,
    /// Lower-case header names; `None` turns CSRF prevention off.
    pub csrf_required_headers: Option<Vec<String>>,
}

/// The bearer token of the admin routes; it never reaches a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Who may ask; `None` in [`Config::auth`] means everyone (with a warning at start).
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub jwt: Option<JwtSettings>,
    pub api_keys_file: Option<String>,
}

#[derive(Clone)]
pub struct JwtSettings {
    pub key: JwtKey,
    pub customers_claim: String,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub quota_per_minute: Option<u64>,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log line.
        f.debug_struct("JwtSettings")
            .field("customers_claim", &self.customers_claim)
            .field("quota_per_minute", &self.quota_per_minute)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub enum JwtKey {
    Hs256Secret(String),
    /// PEM text of an RSA or EC public key.
    PublicKeyPem(String),
}

#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub log_filter: String,
    pub log_format: LogFormat,
    pub otlp: Option<OtlpExport>,
    pub sampling: TraceSampling,
    /// Why `OTEL_TRACES_SAMPLER` was not used as given, for the start-up log.
    pub sampling_warning: Option<String>,
    pub service_name: String,
    pub trace_customer_ids: bool,
}

/// Which requests answered from the cache are traced
/// (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampling {
    /// A caller's `traceparent`, when there is one, decides by its sampled flag.
    pub parent_based: bool,
    /// The share of the other requests traced: 1 for `always_on`, 0 for
    /// `always_off`, the argument for `traceidratio`.
    pub ratio: f64,
}

impl Default for TraceSampling {
    fn default() -> TraceSampling {
        TraceSampling {
            parent_based: true,
            ratio: 1.0,
        }
    }
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpExport {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Cube drops rows past this limit whatever the query asks.
const CUBE_MAX_ROW_LIMIT: u32 = 50_000;

impl Config {
    /// Parses the process's flags and environment. On a bad setting this prints
    /// one line naming the variable and exits with status 2.
    pub fn from_env_or_exit() -> Config {
        let cli = match Cli::try_parse() {
            Ok(cli) => cli,
            Err(err) => match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    err.exit()
                }
                _ => {
                    let text = err.to_string();
                    eprintln!("{}", text.lines().next().unwrap_or("invalid configuration"));
                    std::process::exit(2);
                }
            },
        };
        match Config::from_cli(cli) {
            Ok(config) => config,
            Err(err) => {
                eprintln!("error: {err}");
                std::process::exit(2);
            }
        }
    }

    pub fn from_cli(cli: Cli) -> Result<Config, ConfigError> {
        let listen: SocketAddr = cli.listen.parse().map_err(|_| {
            bad(
                "GATEWAY_LISTEN",
                format!("`{}` is not an address like 127.0.0.1:4000", cli.listen),
            )
        })?;
        let bi = match cli.bi_url.as_deref().map(str::trim) {
            None | Some("") => BiTarget::Embedded {
                latency: Duration::from_millis(cli.bi_sim_latency_ms),
            },
            Some(url) => BiTarget::Remote {
                base_url: parse_bi_url(url)?,
            },
        };
        let coordination = match redis_deployment(&cli)? {
            None => Coordination::InProcess,
            Some(deployment) => Coordination::Redis(RedisOptions {
                deployment,
                lock_ttl: Duration::from_millis(cli.redis_lock_ttl_ms),
                command_timeout: Duration::from_millis(cli.redis_timeout_ms),
                down_after: cli.redis_down_after_ms.map(Duration::from_millis),
                configure_notifications: cli.redis_configure_notifications,
                local_cache: cli.redis_local_cache,
            }),
        };
        let entries_in_memory = cli.memory_cache_max_mb > 0
            && match &coordination {
                Coordination::InProcess => true,
                Coordination::Redis(options) => options.local_cache,
            };
        let member = |variable, member: &str| {
            crate::query::Member::parse(member).ok_or_else(|| {
                bad(
                    variable,
                    format!("`{member}` is not a Cube member like Sales.customerId"),
                )
            })
        };
        let customer_member = member("BI_CUSTOMER_MEMBER", &cli.bi_customer_member)?;
        let time_dimension = member("BI_TIME_DIMENSION", &cli.bi_time_dimension)?;
        let cubes = match cli.bi_cubes_file.as_deref().map(str::trim) {
            None | Some("") => crate::cubes::CubeMap::uniform(time_dimension, customer_member),
            Some(path) => {
                crate::cubes::CubeMap::from_file(path).map_err(|err| bad("BI_CUBES_FILE", err))?
            }
        };
        positive("BI_TIMEOUT_SECS", cli.bi_timeout_secs)?;
        let bi_token = cli.bi_token.filter(|t| !t.is_empty());
        let minting = match cli.bi_api_secret.as_deref() {
            None | Some("") => None,
            Some(_) if bi_token.is_some() => {
                return Err(bad(
                    "BI_API_SECRET",
                    "set either BI_API_SECRET (tokens minted per customer) or BI_TOKEN, not both",
                ));
            }
            Some(secret) => {
                let claim = cli.bi_security_context_claim.trim();
                if claim.is_empty() || ["iat", "exp", "nbf"].contains(&claim) {
                    return Err(bad(
                        "BI_SECURITY_CONTEXT_CLAIM",
                        "must be a claim name other than iat, exp and nbf",
                    ));
                }
                let ttl = Duration::from_secs(cli.bi_token_ttl_secs);
                let call = Duration::from_secs(cli.bi_timeout_secs);
                if ttl < call * 2 {
                    return Err(bad(
                        "BI_TOKEN_TTL_SECS",
                        "must be at least twice BI_TIMEOUT_SECS: a token must outlive every BI call that carries it",
                    ));
                }
                Some(crate::bi::MintSettings {
                    secret: secret.to_owned(),
                    claim: claim.to_owned(),
                    ttl,
                    reuse_for: ttl - (ttl / 5).max(call),
                })
            }
        };
        positive("CACHE_TTL_SECS", cli.cache_ttl_secs)?;
        if cli.redis_lock_ttl_ms < 100 {
            return Err(bad("REDIS_LOCK_TTL_MS", "must be at least 100"));
        }
        positive("REDIS_TIMEOUT_MS", cli.redis_timeout_ms)?;
        if let Some(down_after) = cli.redis_down_after_ms {
            positive("REDIS_DOWN_AFTER_MS", down_after)?;
        }
        positive("REQUEST_TIMEOUT_SECS", cli.request_timeout_secs)?;
        positive("LIVE_MIN_INTERVAL_SECS", cli.live_min_interval_secs)?;
        positive("LIVE_SEND_TIMEOUT_SECS", cli.live_send_timeout_secs)?;
        positive("MAX_DATE_RANGE_DAYS", u64::from(cli.max_date_range_days))?;
        positive("MAX_MEASURES", cli.max_measures as u64)?;
        positive(
            "MAX_HOURLY_RANGE_DAYS",
            u64::from(cli.max_hourly_range_days),
        )?;
        positive("MAX_FILTER_VALUES", cli.max_filter_values as u64)?;
        positive("BI_MAX_BATCH_SIZE", cli.bi_max_batch_size as u64)?;
        positive("MEMORY_CACHE_MAX_MB", cli.memory_cache_max_mb)?;
        positive("MAX_CUSTOMER_LEN", cli.max_customer_len as u64)?;
        positive("MAX_BODY_BYTES", cli.max_body_bytes as u64)?;
        positive("CATALOG_REFRESH_SECS", cli.catalog_refresh_secs)?;
        if !(1..=CUBE_MAX_ROW_LIMIT).contains(&cli.bi_row_limit) {
            return Err(bad(
                "BI_ROW_LIMIT",
                format!("must be between 1 and {CUBE_MAX_ROW_LIMIT} (Cube's own maximum)"),
            ));
        }
        let namespace = cli.cache_namespace.trim();
        if namespace.is_empty()
            || !namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                "CACHE_NAMESPACE",
                "must be non-empty ASCII letters, digits, '-', '_' or '.'",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&cli.rust_log)
            .map_err(|err| bad("RUST_LOG", err.to_string()))?;
        let jwt_key = match (
            cli.auth_jwt_secret.as_deref(),
            cli.auth_jwt_public_key_file.as_deref(),
        ) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "AUTH_JWT_SECRET",
                    "set either AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY_FILE, not both",
                ));
            }
            (Some(secret), None) if secret.len() < 32 => {
                return Err(bad("AUTH_JWT_SECRET", "must be at least 32 bytes"));
            }
            (Some(secret), None) => Some(JwtKey::Hs256Secret(secret.to_owned())),
            (None, Some(path)) => Some(JwtKey::PublicKeyPem(
                std::fs::read_to_string(path).map_err(|err| {
                    bad(
                        "AUTH_JWT_PUBLIC_KEY_FILE",
                        format!("cannot read `{path}`: {err}"),
                    )
                })?,
            )),
            (None, None) => None,
        };
        let api_keys_file = cli.auth_api_keys_file.filter(|p| !p.trim().is_empty());
        let auth = (jwt_key.is_some() || api_keys_file.is_some()).then(|| AuthSettings {
            jwt: jwt_key.map(|key| JwtSettings {
                key,
                customers_claim: cli.auth_jwt_customers_claim.clone(),
                audience: cli.auth_jwt_audience.clone().filter(|a| !a.is_empty()),
                issuer: cli.auth_jwt_issuer.clone().filter(|i| !i.is_empty()),
                quota_per_minute: cli.auth_jwt_quota_per_minute,
            }),
            api_keys_file,
        });
        let otlp = match cli.otel_exporter_otlp_endpoint.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(endpoint) => Some(parse_otlp(
                endpoint,
                cli.otel_exporter_otlp_protocol.as_deref(),
            )?),
        };
        // OpenTelemetry's rule for these variables: a value that cannot be
        // used is logged and the default taken, never a refusal to start.
        let (sampling, sampling_warning) = match parse_sampling(
            &cli.otel_traces_sampler,
            cli.otel_traces_sampler_arg.as_deref(),
        ) {
            Ok(sampling) => (sampling, None),
            Err(err) => (
                TraceSampling::default(),
                Some(format!("{err}; using parentbased_always_on")),
            ),
        };

        let minting_on = minting.is_some();
        Ok(Config {
            listen,
            bi,
            bi_client: BiClientSettings {
                token: bi_token,
                minting,
                timeout: Duration::from_secs(cli.bi_timeout_secs),
                pool_idle_timeout: Duration::from_millis(cli.bi_pool_idle_timeout_ms),
                continue_wait_delay: Duration::from_millis(cli.bi_continue_wait_delay_ms),
                max_batch_size: cli.bi_max_batch_size,
            },
            coordination,
            planner: PlannerSettings {
                customer_tokens: minting_on,
            },
            query: QueryLimits {
                max_range_days: cli.max_date_range_days,
                max_hourly_range_days: cli.max_hourly_range_days,
                max_measures: cli.max_measures,
                max_dimensions: cli.max_dimensions,
                max_customer_len: cli.max_customer_len,
                max_filters: cli.max_filters,
                max_filter_values: cli.max_filter_values,
                row_limit: cli.bi_row_limit,
                cubes: std::sync::Arc::new(cubes),
            },
            cache: CacheSettings {
                ttl: Duration::from_secs(cli.cache_ttl_secs),
                stale: Duration::from_secs(cli.cache_stale_secs),
                refresh_ahead_min_hits: cli.refresh_ahead_min_hits.max(1),
                refresh_max_per_minute: cli.refresh_max_per_minute,
                persisted_queries_max: cli.persisted_queries_max.max(1),
                negative_ttl: Duration::from_secs(cli.negative_cache_secs),
                memory_max_bytes: cli.memory_cache_max_mb.saturating_mul(1024 * 1024),
                // A response is served again only while process memory
                // holds its entries: without that copy, nothing to keep.
                response_max_bytes: if entries_in_memory {
                    cli.response_cache_max_mb.saturating_mul(1024 * 1024)
                } else {
                    0
                },
                namespace: namespace.to_owned(),
            },
            graphql: GraphqlLimits {
                max_depth: cli.graphql_max_depth,
                max_complexity: cli.graphql_max_complexity,
                max_body_bytes: cli.max_body_bytes,
                max_aggregates: cli.max_aggregates_per_request,
                max_aliases: cli.max_aliases,
                max_directives_per_field: cli.max_directives_per_field,
                max_recursive_depth: cli.max_recursive_depth,
                max_tokens: cli.max_tokens,
                allow_batched_requests: cli.allow_batched_requests,
                csrf_required_headers: cli.csrf_prevention.then(|| {
                    cli.csrf_required_headers
                        .split(',')
                        .map(|h| h.trim().to_ascii_lowercase())
                        .filter(|h| !h.is_empty())
                        .collect()
                }),
            },
            auth,
            request_timeout: Duration::from_secs(cli.request_timeout_secs),
            catalog_refresh: Duration::from_secs(cli.catalog_refresh_secs),
            shutdown_drain: Duration::from_secs(cli.shutdown_drain_secs),
            instance_id: cli
                .instance_id
                .filter(|id| !id.trim().is_empty())
                .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()),
            telemetry: TelemetrySettings {
                log_filter: cli.rust_log,
                log_format: cli.log_format,
                otlp,
                sampling,
                sampling_warning,
                service_name: cli.otel_service_name,
                trace_customer_ids: cli.trace_customer_ids,
            },
            admin_token: cli
                .admin_token
                .filter(|t| !t.trim().is_empty())
                .map(AdminToken),
            graphiql: cli.graphiql,
            clock_offset_ms: cli.clock_offset_ms,
            live: LiveSettings {
                min_interval: Duration::from_secs(cli.live_min_interval_secs),
                max_subscriptions: cli.live_max_subscriptions,
                max_per_connection: cli.live_max_subscriptions_per_connection,
                send_timeout: Duration::from_secs(cli.live_send_timeout_secs),
                first_answer_timeout: Duration::from_secs(cli.request_timeout_secs),
            },
        })
    }

    /// The configuration of `cargo run` with no environment: what tests start from.
    pub fn embedded_defaults() -> Config {
        Config::from_cli(Cli::parse_from(["analytics-gateway"]))
            .expect("the built-in defaults are valid")
    }
}

/// The Redis deployment the variables name: exactly one of `REDIS_URL`,
/// `REDIS_CLUSTER_NODES`, or `REDIS_SENTINEL_NODES` with
/// `REDIS_SENTINEL_MASTER`; none means embedded mode.
fn redis_deployment(cli: &Cli) -> Result<Option<RedisDeployment>, ConfigError> {
    let set = |value: &Option<String>| {
        value
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let url = set(&cli.redis_url);
    let cluster = set(&cli.redis_cluster_nodes);
    let sentinels = set(&cli.redis_sentinel_nodes);
    let master = set(&cli.redis_sentinel_master);
    let chosen: Vec<&str> = [
        url.as_ref().map(|_| "REDIS_URL"),
        cluster.as_ref().map(|_| "REDIS_CLUSTER_NODES"),
        sentinels.as_ref().map(|_| "REDIS_SENTINEL_NODES"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if chosen.len() > 1 {
        return Err(bad(
            chosen[0],
            format!(
                "set only one Redis deployment: {} are both set",
                chosen.join(" and ")
            ),
        ));
    }
    let urls = |variable: &'static str, list: &str| -> Result<Vec<String>, ConfigError> {
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty()
            || !urls
                .iter()
                .all(|u| u.starts_with("redis://") || u.starts_with("rediss://"))
        {
            return Err(bad(
                variable,
                "must be comma-separated redis:// or rediss:// URLs",
            ));
        }
        Ok(urls)
    };
    Ok(match (url, cluster, sentinels, master) {
        (Some(url), _, _, _) => {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(bad("REDIS_URL", "must start with redis:// or rediss://"));
            }
            Some(RedisDeployment::Single { url })
        }
        (_, Some(nodes), _, _) => Some(RedisDeployment::Cluster {
            nodes: urls("REDIS_CLUSTER_NODES", &nodes)?,
        }),
        (_, _, Some(nodes), Some(master)) => Some(RedisDeployment::Sentinel {
            nodes: urls("REDIS_SENTINEL_NODES", &nodes)?,
            master,
        }),
        (_, _, Some(_), None) => {
            return Err(bad(
                "REDIS_SENTINEL_MASTER",
                "must name the primary's service when REDIS_SENTINEL_NODES is set",
            ));
        }
        (_, _, None, Some(_)) => {
            return Err(bad(
                "REDIS_SENTINEL_NODES",
                "must list the Sentinels when REDIS_SENTINEL_MASTER is set",
            ));
        }
        (None, None, None, None) => None,
    })
}

fn positive(variable: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(bad(variable, "must be greater than 0"))
    } else {
        Ok(())
    }
}

/// OpenTelemetry's samplers that decide alone (no remote sampling service).
fn parse_sampling(sampler: &str, arg: Option<&str>) -> Result<TraceSampling, ConfigError> {
    let sampler = sampler.trim();
    let (parent_based, root) = match sampler.strip_prefix("parentbased_") {
        Some(root) => (true, root),
        None => (false, sampler),
    };
    let ratio = match root {
        "always_on" => 1.0,
        "always_off" => 0.0,
        "traceidratio" => match arg.map(str::trim).filter(|a| !a.is_empty()) {
            None => 1.0,
            Some(arg) => match arg.parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => ratio,
                _ => {
                    return Err(bad(
                        "OTEL_TRACES_SAMPLER_ARG",
                        format!("`{arg}` is not a ratio from 0 to 1"),
                    ));
                }
            },
        },
        _ => {
            return Err(bad(
                "OTEL_TRACES_SAMPLER",
                format!(
                    "`{sampler}` is not supported; use always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ),
            ));
        }
    };
    Ok(TraceSampling {
        parent_based,
        ratio,
    })
}

fn parse_otlp(endpoint: &str, protocol: Option<&str>) -> Result<OtlpExport, ConfigError> {
    let url = reqwest::Url::parse(endpoint).map_err(|err| {
        bad(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("`{endpoint}` is not a URL: {err}"),
        )
    })?;
    let protocol = match protocol.map(str::trim) {
        Some("grpc") => OtlpProtocol::Grpc,
        Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
        Some(other) if !other.is_empty() => {
            return Err(bad(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                format!("`{other}` is not supported; use grpc or http/protobuf"),
            ));
        }
        _ if url.port() == Some(4318) || url.path().ends_with("/v1/traces") => {
            OtlpProtocol::HttpProtobuf
        }
        _ => OtlpProtocol::Grpc,
    };
    Ok(OtlpExport {
        endpoint: endpoint.to_owned(),
        protocol,
    })
}

fn parse_bi_url(url: &str) -> Result<String, ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|err| bad("BI_URL", format!("`{url}` is not a URL: {err}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(bad(
            "BI_URL",
            "must be an http:// or https:// URL with a host",
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["analytics-gateway"];
        argv.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(argv).expect("flags parse"))
    }

    #[test]
    fn defaults_are_embedded_single_instance() {
        let config = Config::embedded_defaults();
        assert_eq!(config.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(config.coordination, Coordination::InProcess);
        assert!(matches!(config.bi, BiTarget::Embedded { .. }));
        assert_eq!(config.cache.ttl, Duration::from_secs(300));
        assert!(config.graphiql);
        assert!(!parse(&["--graphiql", "false"]).expect("valid").graphiql);
    }

    #[test]
    fn samplers_are_opentelemetrys() {
        let sampling = |args: &[&str]| parse(args).map(|config| config.telemetry.sampling);
        assert_eq!(sampling(&[]).expect("valid"), TraceSampling::default());
        assert_eq!(
            sampling(&[
                "--otel-traces-sampler",
                "parentbased_traceidratio",
                "--otel-traces-sampler-arg",
                "0.01"
            ])
            .expect("valid"),
            TraceSampling {
                parent_based: true,
                ratio: 0.01
            }
        );
        assert_eq!(
            sampling(&["--otel-traces-sampler", "always_off"]).expect("valid"),
            TraceSampling {
                parent_based: false,
                ratio: 0.0
            }
        );
        for (args, variable) in [
            (
                &["--otel-traces-sampler", "jaeger_remote"][..],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                &[
                    "--otel-traces-sampler",
                    "traceidratio",
                    "--otel-traces-sampler-arg",
                    "1.5",
                ][..],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
        ] {
            let config = parse(args).expect("starts anyway");
            assert_eq!(config.telemetry.sampling, TraceSampling::default());
            let warning = config.telemetry.sampling_warning.expect("a warning");
            assert!(warning.contains(variable), "{warning}");
        }
    }

    #[test]
    fn bad_settings_name_their_variable() {
        let cases: &[(&[&str], &str)] = &[
            (&["--listen", "nowhere"], "GATEWAY_LISTEN"),
            (&["--redis-url", "http://x"], "REDIS_URL"),
            (
                &[
                    "--redis-url",
                    "redis://a",
                    "--redis-cluster-nodes",
                    "redis://b",
                ],
                "REDIS_URL",
            ),
            (&["--redis-cluster-nodes", "b:1"], "REDIS_CLUSTER_NODES"),
            (
                &["--redis-sentinel-nodes", "redis://s:26379"],
                "REDIS_SENTINEL_MASTER",
            ),
            (&["--bi-url", "not a url"], "BI_URL"),
            (&["--bi-url", "ftp://cube/v1"], "BI_URL"),
            (&["--cache-ttl-secs", "0"], "CACHE_TTL_SECS"),
            (&["--bi-row-limit", "60000"], "BI_ROW_LIMIT"),
            (&["--bi-customer-member", "customer"], "BI_CUSTOMER_MEMBER"),
            (&["--cache-namespace", "a b"], "CACHE_NAMESPACE"),
            (
                &["--bi-cubes-file", "/nonexistent/cubes.toml"],
                "BI_CUBES_FILE",
            ),
            (
                &["--bi-api-secret", "s", "--bi-token", "t"],
                "BI_API_SECRET",
            ),
            (
                &["--bi-api-secret", "s", "--bi-token-ttl-secs", "59"],
                "BI_TOKEN_TTL_SECS",
            ),
            (
                &["--bi-api-secret", "s", "--bi-security-context-claim", "exp"],
                "BI_SECURITY_CONTEXT_CLAIM",
            ),
            (&["--max-hourly-range-days", "0"], "MAX_HOURLY_RANGE_DAYS"),
            (
                &["--otel-exporter-otlp-endpoint", "nope"],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                &[
                    "--otel-exporter-otlp-endpoint",
                    "http://c:4317",
                    "--otel-exporter-otlp-protocol",
                    "http/json",
                ],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
        ];
        for (args, variable) in cases {
            let err = parse(args).expect_err("must be rejected");
            assert_eq!(err.variable, *variable, "{args:?}");
        }
    }

    #[test]
    fn a_bi_url_without_v1_is_warned_about() {
        let warning = |url: &str| {
            parse(&["--bi-url", url])
                .expect("a valid BI_URL")
                .bi
                .warning()
        };
        assert_eq!(warning("http://cube:4000/cubejs-api/v1"), None);
        assert_eq!(warning("http://cube:4000/cubejs-api/v1/"), None);
        let warned = warning("http://cube:4000/cubejs-api").expect("a warning");
        assert!(warned.contains("/v1"), "{warned}");
        assert!(warning("http://cube:4000").is_some());
        assert_eq!(Config::embedded_defaults().bi.warning(), None);
    }

    #[test]
    fn bi_url_loses_its_trailing_slash() {
        let config = parse(&["--bi-url", "http://cube:4000/cubejs-api/v1/"]).expect("valid");
        assert_eq!(
            config.bi,
            BiTarget::Remote {
                base_url: "http://cube:4000/cubejs-api/v1".into()
            }
        );
    }
}
