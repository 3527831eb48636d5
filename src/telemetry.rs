//! Logs, traces and metrics: set up once per process, named in one place.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetrySettings};

/// Metric names, following Prometheus conventions (`_total` counters, base units).
pub mod names {
    /// HTTP requests sent to the BI, by `outcome` (ok, continue_wait, rate_limited, ...).
    pub const BI_HTTP_REQUESTS: &str = "bi_http_requests_total";
    /// Duration of one HTTP request to the BI, by `outcome`.
    pub const BI_HTTP_DURATION: &str = "bi_http_request_duration_seconds";
    /// Queries sent to the BI (a batch of 8 counts 8), by final `outcome` (ok, error).
    pub const BI_QUERIES: &str = "bi_queries_total";
    /// Answers given to `aggregate` fields, by cache `status` (hit, miss, coalesced, error).
    pub const CACHE_LOOKUPS: &str = "cache_lookups_total";
    /// Answers served from a remembered BI error.
    pub const NEGATIVE_CACHE_HITS: &str = "cache_negative_hits_total";
    /// Time a request waited for a BI call that another request made.
    pub const COALESCE_WAIT: &str = "coalesce_wait_duration_seconds";
    /// HTTP requests served, by `route`, `method` and `status`.
    pub const HTTP_DURATION: &str = "http_server_request_duration_seconds";
    /// 1 while Redis answers, 0 while the gateway runs degraded.
    pub const REDIS_UP: &str = "redis_up";
    /// Lock attempts by `result` (won, lost).
    pub const LOCK_ATTEMPTS: &str = "redis_lock_attempts_total";
    /// Leaders that found their lock taken before they could store their answer.
    pub const LOCKS_LOST: &str = "redis_locks_lost_total";
    /// Waiters that became leader after the previous leader went away.
    pub const TAKEOVERS: &str = "redis_lock_takeovers_total";
    /// One bounded wait of a waiter for another instance's answer.
    pub const REDIS_WAIT: &str = "redis_wait_duration_seconds";
    /// Pub/sub channels this instance is subscribed to.
    pub const PUBSUB_CHANNELS: &str = "redis_pubsub_channels";
    /// GraphQL operations executed, by `operation` name.
    pub const GRAPHQL_DURATION: &str = "graphql_request_duration_seconds";
}

/// Buckets from 0.5 ms to 60 s: cache hits and multi-second BI calls on one scale.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs the log subscriber. Safe to call more than once (later calls are ignored).
pub fn init_logging(settings: &TelemetrySettings) {
    let filter =
        EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let registry = tracing_subscriber::registry();
    let result = match settings.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_filter(filter),
            )
            .try_init(),
    };
    drop(result);
}

/// The process-wide Prometheus recorder. The `metrics` facade has one global
/// recorder, so every gateway in a process shares it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder.set_buckets(DURATION_BUCKETS) {
                Ok(builder) => builder,
                Err(_) => PrometheusBuilder::new(),
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe_metrics();
            // Histograms grow until upkeep drains them; a thread keeps that off the request path.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok();
            handle
        })
        .clone()
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        names::BI_HTTP_REQUESTS,
        "HTTP requests sent to the BI, by outcome"
    );
    describe_histogram!(
        names::BI_HTTP_DURATION,
        Unit::Seconds,
        "Duration of one HTTP request to the BI"
    );
    describe_counter!(names::BI_QUERIES, "Queries sent to the BI, by outcome");
    describe_counter!(names::CACHE_LOOKUPS, "Aggregate answers, by cache status");
    describe_counter!(
        names::NEGATIVE_CACHE_HITS,
        "Answers served from a remembered BI error"
    );
    describe_histogram!(
        names::COALESCE_WAIT,
        Unit::Seconds,
        "Time a request waited for another request's BI call"
    );
    describe_gauge!(names::REDIS_UP, "1 while Redis answers, 0 while degraded");
    describe_counter!(names::LOCK_ATTEMPTS, "Redis lock attempts, by result");
    describe_counter!(
        names::LOCKS_LOST,
        "Leaders that lost their lock before storing"
    );
    describe_counter!(
        names::TAKEOVERS,
        "Waiters that took over from a vanished leader"
    );
    describe_histogram!(
        names::REDIS_WAIT,
        Unit::Seconds,
        "One bounded wait for another instance's answer"
    );
    describe_gauge!(names::PUBSUB_CHANNELS, "Pub/sub channels subscribed to");
    describe_histogram!(
        names::HTTP_DURATION,
        Unit::Seconds,
        "HTTP requests served by the gateway"
    );
    describe_histogram!(
        names::GRAPHQL_DURATION,
        Unit::Seconds,
        "GraphQL operations executed, by operation name"
    );
}
