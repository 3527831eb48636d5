//! The HTTP surface: GraphQL (POST, and GET with GraphiQL for browsers),
//! health, readiness and metrics.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::dataloader::DataLoader;
use async_graphql::http::GraphiQLSource;
use async_graphql::parser::types::ExecutableDocument;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;

use crate::aggregate::Aggregator;
use crate::bi::BiClient;
use crate::graphql::{AggregateLoader, GatewaySchema, classify_request_errors};
use crate::telemetry::names;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub schema: GatewaySchema,
    pub aggregator: Arc<Aggregator>,
    pub bi: BiClient,
    pub metrics: PrometheusHandle,
    pub request_timeout: Duration,
    pub instance_id: Arc<str>,
    pub documents: DocumentCache,
}

/// Parsed GraphQL documents by their text. Dashboards send the same few
/// documents over and over; parsing is a large share of a cached hit's cost,
/// and a parsed document is immutable. Validation still runs every time.
#[derive(Clone)]
pub struct DocumentCache {
    parsed: moka::sync::Cache<String, ExecutableDocument>,
}

impl Default for DocumentCache {
    fn default() -> DocumentCache {
        DocumentCache {
            parsed: moka::sync::Cache::new(1_000),
        }
    }
}

impl DocumentCache {
    /// Longer documents are parsed each time rather than kept.
    const MAX_QUERY_LEN: usize = 16 * 1024;

    fn prepare(&self, request: &mut async_graphql::Request) {
        if request.query.len() > Self::MAX_QUERY_LEN {
            return;
        }
        if let Some(document) = self.parsed.get(request.query.as_str()) {
            request.set_parsed_query(document);
        } else if let Ok(document) = request.parsed_query() {
            // Only documents that parse are kept; a parse error is reported
            // by execution as usual.
            let document = document.clone();
            self.parsed.insert(request.query.clone(), document);
        }
    }
}

/// The whole HTTP application; tests drive this same router.
pub fn app(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        // Layers run outside-in in reverse order of these calls: a panic is
        // caught outermost (so it is timed and counted as a 500), and bodies
        // are limited before any handler reads them.
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(RequestBodyLimitLayer::new(max_body_bytes))
        .layer(middleware::from_fn(record_http))
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

async fn graphql_post(State(state): State<AppState>, body: Bytes) -> Response {
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return request_error(
            "batched operations (a JSON array) are not supported; send one operation per request",
        );
    }
    match serde_json::from_slice::<async_graphql::Request>(&body) {
        Ok(request) => execute(&state, request).await,
        Err(err) => request_error(&format!(
            "the body is not a GraphQL request ({{\"query\", \"variables\", \"operationName\"}}): {err}"
        )),
    }
}

async fn graphql_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        return Html(
            GraphiQLSource::build()
                .endpoint("/graphql")
                .title("analytics-gateway")
                .finish(),
        )
        .into_response();
    }
    match async_graphql::http::parse_query_string(query.as_deref().unwrap_or_default()) {
        Ok(request) => execute(&state, request).await,
        Err(err) => request_error(&format!("the query string is not a GraphQL request: {err}")),
    }
}

async fn execute(state: &AppState, mut request: async_graphql::Request) -> Response {
    let started = std::time::Instant::now();
    state.documents.prepare(&mut request);
    let deadline = Instant::now() + state.request_timeout;
    let loader = DataLoader::new(
        AggregateLoader::new(Arc::clone(&state.aggregator), deadline),
        tokio::spawn,
    );
    let mut response = state.schema.execute(request.data(loader)).await;
    classify_request_errors(&mut response);
    metrics::histogram!(names::GRAPHQL_DURATION).record(started.elapsed().as_secs_f64());

    // While Redis is down, answers come from in-process coalescing and direct
    // BI calls: correct, but not shared across instances. Say so.
    let degraded = state.aggregator.coordinator().describe().redis == "down";
    if degraded {
        response.extensions.insert(
            "degraded".to_owned(),
            async_graphql::Value::from("redis-unavailable"),
        );
    }
    let mut http_response = Json(response).into_response();
    if degraded {
        http_response.headers_mut().insert(
            DEGRADED_HEADER,
            header::HeaderValue::from_static("redis-unavailable"),
        );
    }
    http_response
}

/// Set on GraphQL responses served while Redis is unavailable.
pub const DEGRADED_HEADER: &str = "x-gateway-degraded";

/// A request that is not GraphQL at all: HTTP 400 with a GraphQL-shaped body.
fn request_error(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"errors": [{"message": message, "extensions": {"code": "BAD_REQUEST"}}]})),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

/// 200 while the BI answers; the body says how each dependency is doing.
async fn readyz(State(state): State<AppState>) -> Response {
    let bi_up = state.bi.is_reachable(Duration::from_secs(2)).await;
    let coordinator = state.aggregator.coordinator().describe();
    let status = if bi_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if bi_up { "ready" } else { "not_ready" },
        "instance": &*state.instance_id,
        "bi": if bi_up { "up" } else { "down" },
        "redis": coordinator.redis,
        "coordination": coordinator.mode,
        "notifications": coordinator.notifications,
    });
    (status, Json(body)).into_response()
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn record_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| match path.as_str() {
            "/graphql" => "/graphql",
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            _ => "other",
        });
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics::histogram!(
        names::HTTP_DURATION,
        "route" => route,
        "method" => method,
        "status" => response.status().as_u16().to_string(),
    )
    .record(started.elapsed().as_secs_f64());
    response
}
