//! Logs, traces and metrics: set up once per process, named in one place.
//!
//! Span names: `graphql.request` (exported as `query <operation>`), `dataloader.batch`,
//! `cache.lookup`, `aggregate.produce`, `redis.lock` (one try for the locks of
//! a batch of keys), `coalesce.wait` (one wait for another producer),
//! `bi.call` (one per HTTP request to the BI).

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

use crate::config::{LogFormat, OtlpExport, OtlpProtocol, TelemetrySettings};

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
    /// Time a request waited for another request's flight in this process, by
    /// `outcome` (answer, error, timeout).
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
    /// Redis commands that failed or timed out (each is retried while Redis
    /// is up, within the request's deadline).
    pub const REDIS_COMMAND_FAILURES: &str = "redis_command_failures_total";
    /// Time from a producer getting its rows to a waiting request having
    /// them, by `via` (redis: another instance's call; process: this one's).
    pub const WAKE_LATENCY: &str = "coalesce_wake_duration_seconds";
    /// GraphQL operations executed, by `operation` name.
    pub const GRAPHQL_DURATION: &str = "graphql_request_duration_seconds";
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
    Ok(SdkTracerProvider::builder()
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

/// Makes `span` a child of the trace named by incoming `traceparent` headers.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
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
    describe_counter!(
        names::REDIS_COMMAND_FAILURES,
        "Redis commands that failed or timed out"
    );
    describe_histogram!(
        names::WAKE_LATENCY,
        Unit::Seconds,
        "Time from a producer's rows to a waiting request's answer"
    );
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
