//! Logs, traces and metrics: set up once per process, named in one place.
//!
//! Span names: `graphql.request` (exported as `query <operation>`), `dataloader.batch`,
//! `aggregate.produce`, `coalesce.try_lead` (one lookup and try for the locks
//! of a batch of keys), `coalesce.wait` (one wait for another producer),
//! `cache.refresh` (a background refresh, a root span), `bi.call` (one per
//! HTTP request to the BI).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::KeyValue;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};

use crate::config::{LogFormat, OtlpExport, OtlpProtocol, TelemetrySettings, TraceSampling};

/// Metric names and the fixed values of their labels. Every gateway metric
/// starts with [`names::PREFIX`], so that none collides with another
/// exporter's (redis_exporter has a `redis_up` of its own). What each one
/// means, its type and its labels are its row in [`METRICS`]: add a metric
/// there and here, nowhere else.
pub mod names {
    pub const PREFIX: &str = "analytics_gateway_";

    pub const BI_HTTP_REQUESTS: &str = "analytics_gateway_bi_http_requests_total";
    pub const BI_HTTP_DURATION: &str = "analytics_gateway_bi_http_request_duration_seconds";
    pub const BI_QUERIES: &str = "analytics_gateway_bi_queries_total";
    pub const BI_UP: &str = "analytics_gateway_bi_up";
    pub const CACHE_LOOKUPS: &str = "analytics_gateway_cache_lookups_total";
    pub const NEGATIVE_CACHE_HITS: &str = "analytics_gateway_cache_negative_hits_total";
    pub const COALESCE_WAIT: &str = "analytics_gateway_coalesce_wait_duration_seconds";
    pub const HTTP_DURATION: &str = "analytics_gateway_http_server_request_duration_seconds";
    pub const GRAPHQL_DURATION: &str = "analytics_gateway_graphql_request_duration_seconds";
    pub const REDIS_UP: &str = "analytics_gateway_redis_up";
    pub const LOCK_ATTEMPTS: &str = "analytics_gateway_redis_lock_attempts_total";
    pub const LOCKS_LOST: &str = "analytics_gateway_redis_locks_lost_total";
    pub const TAKEOVERS: &str = "analytics_gateway_redis_lock_takeovers_total";
    pub const REDIS_WAIT: &str = "analytics_gateway_redis_wait_duration_seconds";
    pub const PUBSUB_CHANNELS: &str = "analytics_gateway_redis_pubsub_channels";
    pub const REDIS_NODES: &str = "analytics_gateway_redis_nodes";
    pub const REDIS_MODE: &str = "analytics_gateway_redis_mode";
    pub const REDIS_COMMAND_FAILURES: &str = "analytics_gateway_redis_command_failures_total";
    pub const WAKE_LATENCY: &str = "analytics_gateway_coalesce_wake_duration_seconds";
    pub const REFRESHES: &str = "analytics_gateway_cache_refreshes_total";
    pub const STALE_SERVES: &str = "analytics_gateway_cache_stale_serves_total";
    pub const INVALIDATIONS: &str = "analytics_gateway_cache_invalidations_total";
    pub const LIVE_KEYS: &str = "analytics_gateway_live_keys";
    pub const LIVE_SUBSCRIBERS: &str = "analytics_gateway_live_subscribers";
    pub const LIVE_REFRESHES: &str = "analytics_gateway_live_refreshes_total";
    pub const LIVE_EVENTS: &str = "analytics_gateway_live_events_total";
    pub const LIVE_REFUSALS: &str = "analytics_gateway_live_refusals_total";
    pub const LIVE_CLOSED: &str = "analytics_gateway_live_connections_closed_total";
    pub const RESPONSE_CACHE: &str = "analytics_gateway_response_cache_total";

    /// `outcome` of one HTTP request to the BI: `ok`, or why it was not
    /// (`continue_wait` is Cube's "still computing"; the rest are `BiError` kinds).
    pub const BI_HTTP_OUTCOMES: &[&str] = &[
        "ok",
        "continue_wait",
        "rate_limited",
        "unreachable",
        "timeout",
        "rejected",
        "server_error",
        "unavailable",
        "bad_response",
    ];
    /// `outcome` of a query sent to the BI, once its retries are over.
    pub const BI_QUERY_OUTCOMES: &[&str] = &["ok", "error"];
    /// `status` of one `aggregate` answer: the three `cache.status` values,
    /// and `error` for a field answered with an error (a BI failure, a
    /// remembered one, a timeout, a spent quota).
    pub const CACHE_STATUSES: &[&str] = &["hit", "miss", "coalesced", "error"];
    /// `outcome` of a wait for another request's flight in this process.
    pub const WAIT_OUTCOMES: &[&str] = &["answer", "error", "timeout"];
    /// `result` of one attempt at a key's Redis lock.
    pub const LOCK_RESULTS: &[&str] = &["won", "lost"];
    /// `via` of a waiter's wake-up: another instance's BI call seen through
    /// Redis, or this process's own.
    pub const WAKE_VIA: &[&str] = &["redis", "process"];
    /// `trigger` of a refresh: a read found the entry past its fresh time
    /// (`stale`) or invalidated (`invalidation`), or a hot entry was nearly
    /// stale (`ahead`).
    pub const REFRESH_TRIGGERS: &[&str] = &["stale", "ahead", "invalidation", "live"];
    /// `outcome` of a refresh: `ok` (its BI call), `error` (its BI call
    /// failed), `elsewhere` (another instance refreshed it, or is),
    /// `remembered_error` (a recent failure is remembered), `over_budget`
    /// (past `REFRESH_MAX_PER_MINUTE`, left to stale-while-revalidate).
    pub const REFRESH_OUTCOMES: &[&str] = &[
        "ok",
        "error",
        "elsewhere",
        "remembered_error",
        "over_budget",
    ];
    /// `state` of the Redis nodes counted.
    pub const NODE_STATES: &[&str] = &["known", "unreachable"];
    /// `mode` of the Redis deployment.
    pub const REDIS_MODES: &[&str] = &["single", "cluster", "sentinel"];
    /// `mode` of an invalidation.
    pub const INVALIDATION_MODES: &[&str] = &["stale", "evict"];
    /// `reason` a live subscription was refused: past
    /// `LIVE_MAX_SUBSCRIPTIONS_PER_CONNECTION` or `LIVE_MAX_SUBSCRIPTIONS`.
    pub const LIVE_REFUSAL_REASONS: &[&str] = &["connection", "instance"];
    /// `reason` the gateway closed a live connection: its credential
    /// expired, or its sends stayed blocked (a client that does not read).
    pub const LIVE_CLOSE_REASONS: &[&str] =
        &["expired", "slow_consumer", "unresponsive", "init_timeout"];
    /// `outcome` of a look in the cache of whole responses: `served` (the
    /// stored response went out), `outdated` (an entry behind it changed or
    /// is no longer fresh: executed again), `stored` (a response kept).
    pub const RESPONSE_CACHE_OUTCOMES: &[&str] = &["served", "outdated", "stored"];
}

/// How Prometheus reads a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    /// Always in seconds.
    Histogram,
}

impl MetricKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// One row of the metrics table.
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    pub name: &'static str,
    pub kind: MetricKind,
    /// The `# HELP` text, also the README's description.
    pub help: &'static str,
    /// Labels whose values are known in advance: their only values. Counters
    /// start at 0 for each combination, so that `rate()` sees their first increase.
    pub labels: &'static [(&'static str, &'static [&'static str])],
    /// Labels whose values come from traffic (routes, operation names, ...).
    pub open_labels: &'static [&'static str],
}

const fn metric(name: &'static str, kind: MetricKind, help: &'static str) -> MetricInfo {
    MetricInfo {
        name,
        kind,
        help,
        labels: &[],
        open_labels: &[],
    }
}

impl MetricInfo {
    const fn labels(mut self, labels: &'static [(&'static str, &'static [&'static str])]) -> Self {
        self.labels = labels;
        self
    }

    const fn open_labels(mut self, labels: &'static [&'static str]) -> Self {
        self.open_labels = labels;
        self
    }

    /// Every combination of the fixed label values (one empty set when there are none).
    pub fn label_sets(&self) -> Vec<Vec<(&'static str, &'static str)>> {
        let mut sets = vec![Vec::new()];
        for (label, values) in self.labels {
            sets = sets
                .into_iter()
                .flat_map(|set| {
                    values.iter().map(move |value| {
                        let mut set = set.clone();
                        set.push((*label, *value));
                        set
                    })
                })
                .collect();
        }
        sets
    }
}

/// Every metric the gateway exports: the one place for its name, type, help
/// text and labels. `/metrics` describes them from here, counters are
/// created at 0 from here, and the README's metrics table is generated from
/// here ([`metrics_markdown`]).
pub const METRICS: &[MetricInfo] = {
    use MetricKind::{Counter, Gauge, Histogram};
    use names::*;
    &[
        metric(
            BI_HTTP_REQUESTS,
            Counter,
            "HTTP requests sent to the BI, by outcome",
        )
        .labels(&[("outcome", BI_HTTP_OUTCOMES)]),
        metric(
            BI_HTTP_DURATION,
            Histogram,
            "Duration of one HTTP request to the BI, by outcome",
        )
        .labels(&[("outcome", BI_HTTP_OUTCOMES)]),
        metric(
            BI_QUERIES,
            Counter,
            "Queries sent to the BI (a batch of 8 counts 8), by final outcome",
        )
        .labels(&[("outcome", BI_QUERY_OUTCOMES)]),
        metric(
            BI_UP,
            Gauge,
            "1 while the BI answers the gateway's periodic GET /meta, 0 while it does not",
        ),
        metric(
            CACHE_LOOKUPS,
            Counter,
            "Answers given to aggregate fields, by cache status",
        )
        .labels(&[("status", CACHE_STATUSES)]),
        metric(
            NEGATIVE_CACHE_HITS,
            Counter,
            "Answers served from a remembered BI error",
        ),
        metric(
            COALESCE_WAIT,
            Histogram,
            "Time a request waited for another request's BI call in this process, by outcome",
        )
        .labels(&[("outcome", WAIT_OUTCOMES)]),
        metric(
            HTTP_DURATION,
            Histogram,
            "HTTP requests served by the gateway",
        )
        .open_labels(&["route", "method", "status"]),
        metric(
            GRAPHQL_DURATION,
            Histogram,
            "GraphQL operations executed, by operation name (at most 200 names, then other)",
        )
        .open_labels(&["operation"]),
        metric(
            REDIS_UP,
            Gauge,
            "1 while Redis answers, 0 while the gateway runs degraded",
        ),
        metric(LOCK_ATTEMPTS, Counter, "Redis lock attempts, by result")
            .labels(&[("result", LOCK_RESULTS)]),
        metric(
            LOCKS_LOST,
            Counter,
            "Leaders that found their lock taken before they could store their answer",
        ),
        metric(
            TAKEOVERS,
            Counter,
            "Waiters that became leader after the previous leader went away",
        ),
        metric(
            REDIS_WAIT,
            Histogram,
            "One bounded wait of a waiter for another instance's answer",
        ),
        metric(
            PUBSUB_CHANNELS,
            Gauge,
            "Pub/sub channels this instance is subscribed to",
        ),
        metric(
            REDIS_NODES,
            Gauge,
            "Redis nodes this instance knows of, and those unreachable (a cluster's failing nodes)",
        )
        .labels(&[("state", NODE_STATES)]),
        metric(
            REDIS_MODE,
            Gauge,
            "1 for the Redis deployment in use (single, cluster or sentinel)",
        )
        .labels(&[("mode", REDIS_MODES)]),
        metric(
            REDIS_COMMAND_FAILURES,
            Counter,
            "Redis commands that failed or timed out (retried within the request's deadline while Redis is up)",
        ),
        metric(
            WAKE_LATENCY,
            Histogram,
            "Time from a producer getting its rows to a waiting request having them, by how the waiter learned of them",
        )
        .labels(&[("via", WAKE_VIA)]),
        metric(
            REFRESHES,
            Counter,
            "Background refreshes of cache entries, by trigger and outcome",
        )
        .labels(&[("trigger", REFRESH_TRIGGERS), ("outcome", REFRESH_OUTCOMES)]),
        metric(
            STALE_SERVES,
            Counter,
            "Answers served from a stale entry while its refresh runs",
        ),
        metric(
            INVALIDATIONS,
            Counter,
            "Invalidations received on POST /admin/invalidate, by mode",
        )
        .labels(&[("mode", INVALIDATION_MODES)]),
        metric(
            LIVE_KEYS,
            Gauge,
            "Cache keys with live subscribers on this instance",
        ),
        metric(
            LIVE_SUBSCRIBERS,
            Gauge,
            "Live subscriptions (aggregateLive) open on this instance",
        ),
        metric(
            LIVE_REFRESHES,
            Counter,
            "Refreshes of live keys this instance triggered when they were due (the BI is called by whichever instance wins the key's lock)",
        ),
        metric(
            LIVE_EVENTS,
            Counter,
            "Live events sent to subscribers (rows that changed)",
        ),
        metric(
            LIVE_REFUSALS,
            Counter,
            "Live subscriptions refused past a limit, by reason",
        )
        .labels(&[("reason", LIVE_REFUSAL_REASONS)]),
        metric(
            LIVE_CLOSED,
            Counter,
            "Live connections the gateway closed, by reason",
        )
        .labels(&[("reason", LIVE_CLOSE_REASONS)]),
        metric(
            RESPONSE_CACHE,
            Counter,
            "Whole responses to repeated identical POSTs served from, kept in, or found outdated in the response cache",
        )
        .labels(&[("outcome", RESPONSE_CACHE_OUTCOMES)]),
    ]
};

/// The README's metrics table, generated from [`METRICS`].
pub fn metrics_markdown() -> String {
    let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
    for metric in METRICS {
        let mut labels: Vec<String> = metric
            .labels
            .iter()
            .map(|(label, values)| format!("`{label}`: {}", values.join(", ")))
            .collect();
        labels.extend(metric.open_labels.iter().map(|label| format!("`{label}`")));
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            metric.name,
            metric.kind.as_str(),
            labels.join("; "),
            metric.help
        ));
    }
    out
}

/// Buckets from 0.5 ms to 60 s: cache hits and multi-second BI calls on one scale.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Whether spans are exported. Request spans exist only then: building one
/// costs a few microseconds of formatting on every cached hit, for nothing
/// when no trace is kept.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Which requests answered from the cache are traced; set by [`init`].
static SAMPLING: OnceLock<TraceSampling> = OnceLock::new();

/// Whether a request is traced from its start: decided before it runs, from
/// its headers and `OTEL_TRACES_SAMPLER`. A request that is not may still
/// be, from the moment it needs the BI or Redis ([`RequestTrace::Deferred`]):
/// the sampler only ever drops requests answered from process memory.
pub fn samples(headers: &http::HeaderMap) -> bool {
    exporting() && sampling_of(headers).0
}

/// The root span of a request traced from its start, in the caller's trace
/// when it sent one; `None` when it is not (see [`samples`]).
pub fn sampled_span(headers: &http::HeaderMap, operation: &str) -> Option<tracing::Span> {
    if !exporting() {
        return None;
    }
    let (sampled, caller) = sampling_of(headers);
    sampled.then(|| {
        let span = request_span(operation);
        if let Some(caller) = caller {
            let _ = span.set_parent(caller);
        }
        span
    })
}

/// The sampler's decision for a request, and the caller's trace context
/// when it sent a valid one (read once: `traceparent` is parsed here only).
fn sampling_of(headers: &http::HeaderMap) -> (bool, Option<opentelemetry::Context>) {
    let caller = headers
        .contains_key(TRACEPARENT)
        .then(|| extract(headers))
        .filter(|context| context.span().span_context().is_valid());
    let sampling = SAMPLING.get().copied().unwrap_or_default();
    let sampled = match &caller {
        Some(context) if sampling.parent_based => context.span().span_context().is_sampled(),
        _ => sampling.ratio >= 1.0 || (sampling.ratio > 0.0 && fastrand::f64() < sampling.ratio),
    };
    (sampled, caller)
}

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The trace context W3C headers carry.
fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(headers))
    })
}

/// The root span of one GraphQL request, exported as `query <operation>`.
pub fn request_span(operation: &str) -> tracing::Span {
    tracing::info_span!(
        "graphql.request",
        otel.kind = "server",
        otel.name = %format!("query {operation}"),
        graphql.operation.name = %operation,
        trace_id = tracing::field::Empty,
        customer = tracing::field::Empty,
    )
}

/// A request's trace, as its dataloader needs it.
#[derive(Clone)]
pub enum RequestTrace {
    /// Nothing is exported.
    Off,
    /// Traced from its start.
    Started(tracing::Span),
    /// Not sampled: its span is started only if it needs the BI or Redis
    /// (a miss, a wait, a lookup in Redis): in the caller's trace when the
    /// caller keeps it, else as a new trace linked to the caller's.
    Deferred {
        operation: String,
        /// The caller's `traceparent` and `tracestate`.
        caller: Option<(http::HeaderValue, Option<http::HeaderValue>)>,
    },
}

impl RequestTrace {
    /// The trace of a request with these headers and operation label.
    pub fn decide(headers: &http::HeaderMap, operation: &str) -> RequestTrace {
        if !exporting() {
            RequestTrace::Off
        } else if let Some(span) = sampled_span(headers, operation) {
            RequestTrace::Started(span)
        } else {
            RequestTrace::Deferred {
                operation: operation.to_owned(),
                caller: headers
                    .get(TRACEPARENT)
                    .map(|parent| (parent.clone(), headers.get(TRACESTATE).cloned())),
            }
        }
    }

    /// The span the request runs in from its start: `Span::none()` unless
    /// it is [`RequestTrace::Started`].
    pub fn span(&self) -> tracing::Span {
        match self {
            RequestTrace::Started(span) => span.clone(),
            _ => tracing::Span::none(),
        }
    }

    /// The span of the request's work past process memory: its own span, or
    /// one started now for a [`RequestTrace::Deferred`] one.
    pub fn start(&self) -> tracing::Span {
        match self {
            RequestTrace::Off => tracing::Span::none(),
            RequestTrace::Started(span) => span.clone(),
            RequestTrace::Deferred { operation, caller } => {
                let span = request_span(operation);
                if let Some((parent, state)) = caller {
                    let mut headers = http::HeaderMap::new();
                    headers.insert(TRACEPARENT, parent.clone());
                    if let Some(state) = state {
                        headers.insert(TRACESTATE, state.clone());
                    }
                    let context = extract(&headers);
                    let remote = context.span().span_context().clone();
                    if remote.is_sampled() {
                        let _ = span.set_parent(context);
                    } else if remote.is_valid() {
                        // The caller does not keep its trace: the BI call
                        // is kept in one of its own, which names the caller's.
                        span.add_link(remote);
                    }
                }
                if let Some((trace_id, _)) = span_ids(&span) {
                    span.record("trace_id", trace_id);
                }
                span
            }
        }
    }
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs logs and, when an OTLP endpoint is configured, span export.
/// Call once, inside the tokio runtime (the gRPC exporter needs it).
pub fn init(settings: &TelemetrySettings, instance_id: &str) -> Telemetry {
    // W3C `traceparent`, in and out; without a global propagator nothing is injected.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let provider = settings.otlp.as_ref().and_then(|otlp| {
        match tracer_provider(otlp, &settings.service_name, instance_id) {
            Ok(provider) => Some(provider),
            Err(err) => {
                eprintln!(
                    "OTEL_EXPORTER_OTLP_ENDPOINT: cannot export spans ({err}); continuing without"
                );
                None
            }
        }
    });

    let log_filter =
        EnvFilter::try_new(&settings.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();
    layers.push(match settings.log_format {
        LogFormat::Text => fmt::layer().with_ansi(ansi).with_filter(log_filter).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_filter(log_filter)
            .boxed(),
    });
    if let Some(provider) = &provider {
        let _ = SAMPLING.set(settings.sampling);
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
        // Its own filter: the log level must not decide which spans are exported.
        let spans = Targets::new().with_target("analytics_gateway", tracing::Level::INFO);
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("analytics-gateway"))
                .with_filter(spans)
                .boxed(),
        );
    }
    // A second call (tests starting several gateways in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Telemetry { provider }
}

impl Telemetry {
    /// Exports what is still queued. The SDK blocks while it flushes, so it
    /// runs on the blocking pool rather than stalling a runtime thread.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(err)) = flushed {
                eprintln!("could not flush the last spans: {err}");
            }
        }
    }
}

fn tracer_provider(
    otlp: &OtlpExport,
    service_name: &str,
    instance_id: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    // A collector that is slow or down must never hold up requests: spans go
    // through the SDK's bounded batch queue (dropped when full), exported
    // from its own thread with this timeout.
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
    let exporter = match otlp.protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(otlp.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()?,
        OtlpProtocol::HttpProtobuf => {
            // An endpoint set in code is used as is: the signal path must be on it.
            let endpoint = if otlp.endpoint.ends_with("/v1/traces") {
                otlp.endpoint.clone()
            } else {
                format!("{}/v1/traces", otlp.endpoint.trim_end_matches('/'))
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .build()?
        }
    };
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .with_attributes([
            KeyValue::new("service.instance.id", instance_id.to_owned()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    // The gateway decides which requests are traced (`samples`); every span
    // it does create is exported. Set explicitly: the SDK would otherwise
    // read OTEL_TRACES_SAMPLER itself and drop BI calls' spans too.
    Ok(SdkTracerProvider::builder()
        .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The trace and span ids of `span` as hex, when it is being exported.
pub fn span_ids(span: &tracing::Span) -> Option<(String, String)> {
    let context = span.context();
    let span_ref = context.span();
    let ids = span_ref.span_context();
    ids.is_valid()
        .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
}

/// Links `span` to the `bi.call` that produced `entry`, when it was traced.
pub fn link_to_producer(span: &tracing::Span, entry: &crate::cache::Entry) {
    if let (Some(trace_id), Some(span_id)) = (&entry.trace_id, &entry.span_id) {
        link_to(span, trace_id, span_id);
    }
}

/// Links `span` to another span, by hex ids (as stored with cache entries).
pub fn link_to(span: &tracing::Span, trace_id: &str, span_id: &str) {
    let (Ok(trace_id), Ok(span_id)) = (TraceId::from_hex(trace_id), SpanId::from_hex(span_id))
    else {
        return;
    };
    span.add_link(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
}

/// Adds the current span's `traceparent` to outgoing headers.
pub fn inject_trace(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
    });
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

/// `# HELP` and `# TYPE` for every metric, and every counter at 0 for each
/// of its fixed label sets: a counter that appears only at its first event
/// gives `rate()` nothing to compare that event with.
fn describe_metrics() {
    for metric in METRICS {
        match metric.kind {
            MetricKind::Counter => {
                metrics::describe_counter!(metric.name, metric.help);
                for set in metric.label_sets() {
                    let labels: Vec<metrics::Label> = set
                        .iter()
                        .map(|(label, value)| metrics::Label::new(*label, *value))
                        .collect();
                    metrics::counter!(metric.name, labels).increment(0);
                }
            }
            MetricKind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            MetricKind::Histogram => {
                metrics::describe_histogram!(metric.name, metrics::Unit::Seconds, metric.help);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_prefixed_and_named_once() {
        let mut seen = std::collections::HashSet::new();
        for metric in METRICS {
            assert!(metric.name.starts_with(names::PREFIX), "{}", metric.name);
            assert!(
                seen.insert(metric.name),
                "{} is in the table twice",
                metric.name
            );
            if metric.kind == MetricKind::Counter {
                assert!(metric.name.ends_with("_total"), "{}", metric.name);
            }
        }
    }

    #[test]
    fn label_sets_are_every_combination() {
        const TWO: MetricInfo = metric("x_total", MetricKind::Counter, "x")
            .labels(&[("a", &["1", "2"]), ("b", &["x", "y", "z"])]);
        assert_eq!(TWO.label_sets().len(), 6);
        assert_eq!(
            metric("y_total", MetricKind::Counter, "y").label_sets(),
            vec![vec![]]
        );
    }

    /// Every kind of BI error is a documented `outcome` of a BI request.
    #[test]
    fn every_bi_error_kind_is_a_documented_outcome() {
        use crate::bi::BiError;
        let errors = [
            BiError::Rejected {
                status: 400,
                message: String::new(),
            },
            BiError::Failed { status: 500 },
            BiError::Unavailable { status: 503 },
            BiError::BadResponse(String::new()),
            BiError::RateLimited { retry_after: None },
            BiError::Unreachable(String::new()),
            BiError::Timeout(Duration::from_secs(1)),
        ];
        for error in errors {
            assert!(
                names::BI_HTTP_OUTCOMES.contains(&error.kind()),
                "{}",
                error.kind()
            );
        }
    }
}
