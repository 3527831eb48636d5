//! The HTTP surface: GraphQL (POST, and GET with GraphiQL for browsers),
//! health, readiness and metrics.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::dataloader::DataLoader;
use async_graphql::http::GraphiQLSource;
use async_graphql::parser::types::ExecutableDocument;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, Version, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;

use crate::aggregate::Aggregator;
use crate::auth::{Authenticator, Identity};
use crate::coalesce::{Counters, StoreHealth};
use crate::config::GraphqlLimits;
use crate::graphql::limits::{
    DocumentLimits, DocumentSummary, LimitError, check_document, check_tokens,
};
use crate::graphql::{
    AggregateLoader, DegradedMarker, ErrorCode, GatewaySchema, classify_request_errors,
};
use crate::readiness::{Phase, Readiness};
use crate::telemetry::{self, names};
use tracing::Instrument;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub schema: GatewaySchema,
    /// The same schema without field suggestions, for unauthenticated callers.
    pub schema_without_suggestions: GatewaySchema,
    /// `None` when authentication is off.
    pub authenticator: Option<Arc<Authenticator>>,
    pub limits: GraphqlLimits,
    pub aggregator: Arc<Aggregator>,
    /// Quota counters, handed to each request's dataloader.
    pub counters: Arc<dyn Counters>,
    /// How the shared store is doing, for `/readyz`.
    pub store_health: Arc<dyn StoreHealth>,
    pub metrics: PrometheusHandle,
    pub request_timeout: Duration,
    pub instance_id: Arc<str>,
    pub documents: DocumentCache,
    pub operations: OperationNames,
    /// The process's phase and the BI's last probe, for `/readyz`.
    pub readiness: Arc<Readiness>,
}

impl AppState {
    fn identify(&self, headers: &HeaderMap) -> Identity {
        match &self.authenticator {
            Some(authenticator) => authenticator.identify(headers),
            None => Identity::Open,
        }
    }
}

/// Operation names as metric labels, bounded: clients choose the names, so
/// past a fixed number of distinct ones the rest are counted as `other`.
#[derive(Clone, Default)]
pub struct OperationNames {
    seen: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl OperationNames {
    const MAX: usize = 200;

    fn label(&self, name: Option<&str>) -> String {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return "anonymous".to_owned();
        };
        let well_formed =
            name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !well_formed {
            return "other".to_owned();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(name) || (seen.len() < Self::MAX && seen.insert(name.to_owned())) {
            name.to_owned()
        } else {
            "other".to_owned()
        }
    }
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
        // are read and limited (413s timed and counted too) before any
        // handler runs. `limit_body` is the one limit: the extractors' own
        // default (2 MB) would refuse bodies that `MAX_BODY_BYTES` allows.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            BodyLimit {
                max_bytes: max_body_bytes,
                linger: Linger::DEFAULT,
            },
            limit_body,
        ))
        .layer(middleware::from_fn(record_http))
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

/// Most operations in one JSON batch, when batches are allowed: each
/// document is limited on its own, so the batch size bounds the total.
const MAX_BATCH_OPERATIONS: usize = 10;

async fn graphql_post(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let media = ResponseMedia::negotiate(&headers);
    media.label(post_answer(&state, &headers, media, body).await)
}

async fn post_answer(
    state: &AppState,
    headers: &HeaderMap,
    media: ResponseMedia,
    body: Bytes,
) -> Response {
    if let Some(refused) = csrf_check(state, headers) {
        return refused;
    }
    let identity = state.identify(headers);
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        if !state.limits.allow_batched_requests {
            return request_error(
                "batched operations (a JSON array) are not enabled; send one operation per request",
            );
        }
        let requests = match serde_json::from_slice::<Vec<async_graphql::Request>>(&body) {
            Ok(requests) if requests.len() <= MAX_BATCH_OPERATIONS => requests,
            Ok(_) => {
                return request_error(&format!(
                    "a batch may hold at most {MAX_BATCH_OPERATIONS} operations"
                ));
            }
            Err(err) => return request_error(&format!("the body is not a GraphQL batch: {err}")),
        };
        let responses = futures_util::future::join_all(
            requests
                .into_iter()
                .map(|request| execute(state, headers, identity.clone(), request)),
        )
        .await;
        // Batches are not part of GraphQL over HTTP: each answer as with
        // application/json, the whole with status 200.
        let degraded = responses.iter().any(is_degraded);
        return with_degraded_flag(degraded, Json(responses).into_response());
    }
    match serde_json::from_slice::<async_graphql::Request>(&body) {
        Ok(request) => {
            let response = execute(state, headers, identity, request).await;
            with_degraded_flag(is_degraded(&response), media.answer(response))
        }
        Err(err) => request_error(&format!(
            "the body is not a GraphQL request ({{\"query\", \"variables\", \"operationName\"}}): {err}"
        )),
    }
}

/// Apollo Router's CSRF rule for POSTs: a request a browser could send
/// cross-site without a preflight (no content type, or `text/plain`,
/// `application/x-www-form-urlencoded`, `multipart/form-data`) must carry one
/// of the configured headers, which a cross-site page cannot add. GET queries
/// are left open: they carry no ambient credentials (this gateway reads none
/// from cookies) and are bounded by the same limits and quotas.
fn csrf_check(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let required = state.limits.csrf_required_headers.as_ref()?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    let simple = match content_type.as_deref() {
        None | Some("") => true,
        Some(essence) => matches!(
            essence,
            "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
        ),
    };
    if !simple
        || required
            .iter()
            .any(|name| headers.contains_key(name.as_str()))
    {
        return None;
    }
    Some(request_error(&format!(
        "this request has been blocked as a potential cross-site request forgery: send it with \
         `content-type: application/json`, or with one of these headers: {}",
        required.join(", ")
    )))
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
    let media = ResponseMedia::negotiate(&headers);
    media.label(
        match async_graphql::http::parse_query_string(query.as_deref().unwrap_or_default()) {
            Ok(request) => {
                let identity = state.identify(&headers);
                let response = execute(&state, &headers, identity, request).await;
                with_degraded_flag(is_degraded(&response), media.answer(response))
            }
            Err(err) => request_error(&format!("the query string is not a GraphQL request: {err}")),
        },
    )
}

/// The media type of a GraphQL answer, chosen from the request's `Accept`
/// as GraphQL over HTTP says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseMedia {
    /// `application/json`: every GraphQL answer is 200, request errors
    /// included (with `data: null`). Also for `*/*` and no `Accept` at all.
    Json,
    /// `application/graphql-response+json`: a request that fails before
    /// execution (it does not parse or validate, its variables do not
    /// coerce, a limit or a missing credential refuses it) is 400 without a
    /// `data` entry; an executed one is 200.
    GraphqlResponse,
}

impl ResponseMedia {
    pub const GRAPHQL_RESPONSE_JSON: &'static str = "application/graphql-response+json";

    /// The acceptable media type with the highest `q`; on a tie, the one the
    /// client listed first. Neither acceptable (or no `Accept`): JSON.
    pub fn negotiate(headers: &HeaderMap) -> ResponseMedia {
        let mut best: Option<(f32, ResponseMedia)> = None;
        let ranges = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','));
        for range in ranges {
            let mut parts = range.split(';');
            let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|param| param.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, value)| value.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let media = match essence.as_str() {
                Self::GRAPHQL_RESPONSE_JSON => ResponseMedia::GraphqlResponse,
                "application/json" | "application/*" | "*/*" => ResponseMedia::Json,
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(best_q, _)| q > best_q) {
                best = Some((q, media));
            }
        }
        best.map_or(ResponseMedia::Json, |(_, media)| media)
    }

    /// One GraphQL answer in this media type.
    fn answer(self, response: async_graphql::Response) -> Response {
        match self {
            ResponseMedia::Json => Json(response).into_response(),
            ResponseMedia::GraphqlResponse => {
                // Execution gives every field error a path; errors with none
                // and no data mean the request never reached execution.
                let request_error = response.data == async_graphql::Value::Null
                    && !response.errors.is_empty()
                    && response.errors.iter().all(|error| error.path.is_empty());
                let mut body = serde_json::to_value(&response).unwrap_or_default();
                let status = if request_error {
                    if let Some(body) = body.as_object_mut() {
                        body.remove("data");
                    }
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::OK
                };
                (status, Json(body)).into_response()
            }
        }
    }

    /// Labels a JSON answer (GraphQL, or a 400 for a body that is not
    /// GraphQL) with this media type; `application/json` ones stay as they are.
    fn label(self, mut response: Response) -> Response {
        let is_json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
        if self == ResponseMedia::GraphqlResponse && is_json {
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/graphql-response+json; charset=utf-8",
                ),
            );
        }
        response
    }
}

async fn execute(
    state: &AppState,
    headers: &HeaderMap,
    identity: Identity,
    mut request: async_graphql::Request,
) -> async_graphql::Response {
    let started = std::time::Instant::now();
    // The limits parse the document first, and the document names the
    // operation when the body does not (`query Panel { ... }` is `Panel`).
    let checked = check_limits(state, &mut request)
        .and_then(|summary| refuse_introspection(&identity, summary));
    let document_name = checked
        .as_ref()
        .ok()
        .and_then(|summary| summary.operation_name.clone());
    let operation = state.operations.label(
        request
            .operation_name
            .as_deref()
            .or(document_name.as_deref()),
    );
    let span = if telemetry::exporting() {
        tracing::info_span!(
            "graphql.request",
            otel.kind = "server",
            otel.name = %format!("query {operation}"),
            graphql.operation.name = %operation,
            trace_id = tracing::field::Empty,
            customer = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    telemetry::continue_trace(&span, headers);
    if let Some((trace_id, _)) = telemetry::span_ids(&span) {
        // Log lines inside this request carry it, so logs lead to the trace.
        span.record("trace_id", trace_id);
    }

    let degraded = DegradedMarker::default();
    let mut response = match checked {
        Err(refused) => async_graphql::Response::from_errors(vec![refused]),
        Ok(_) => {
            let deadline = Instant::now() + state.request_timeout;
            let loader = DataLoader::new(
                AggregateLoader::new(
                    Arc::clone(&state.aggregator),
                    Arc::clone(&state.counters),
                    deadline,
                    span.clone(),
                    identity.clone(),
                ),
                tokio::spawn,
            );
            // Unauthenticated callers learn nothing of the schema: their
            // introspection was refused above (this is a second lock), and
            // errors carry no "did you mean" suggestions.
            let schema = if identity.is_authenticated() {
                &state.schema
            } else {
                request = request.disable_introspection();
                &state.schema_without_suggestions
            };
            schema
                .execute(request.data(loader).data(identity).data(degraded.clone()))
                .instrument(span)
                .await
        }
    };
    classify_request_errors(&mut response);
    metrics::histogram!(names::GRAPHQL_DURATION, "operation" => operation)
        .record(started.elapsed().as_secs_f64());
    // Decided by how the answers were produced, not by how Redis is doing
    // now: a degraded answer always says so, and only those do.
    if degraded.is_marked() {
        response.extensions.insert(
            DEGRADED_EXTENSION.to_owned(),
            async_graphql::Value::from(DEGRADED_VALUE),
        );
    }
    response
}

fn is_degraded(response: &async_graphql::Response) -> bool {
    response.extensions.contains_key(DEGRADED_EXTENSION)
}

/// The cost limits async-graphql does not check: tokens before parsing, then
/// `aggregate` fields, aliases, fields and depth in the parsed (cached)
/// document. A document that does not parse passes, for execution to report.
fn check_limits(
    state: &AppState,
    request: &mut async_graphql::Request,
) -> Result<DocumentSummary, async_graphql::ServerError> {
    let refuse = |err: LimitError| coded_error(err.to_string(), ErrorCode::QueryTooComplex);
    check_tokens(&request.query, state.limits.max_tokens).map_err(refuse)?;
    state.documents.prepare(request);
    match request.parsed_query() {
        Ok(document) => check_document(
            document,
            DocumentLimits {
                max_aggregates: state.limits.max_aggregates,
                max_aliases: state.limits.max_aliases,
                // Each field counts 1 in async-graphql's complexity too.
                max_fields: state.limits.max_complexity,
                max_depth: state.limits.max_depth,
            },
        )
        .map_err(refuse),
        Err(_) => Ok(DocumentSummary::default()),
    }
}

/// With authentication on, introspection needs a credential. Refused with
/// `UNAUTHENTICATED` rather than answered `null`, so that a GraphiQL user
/// learns why the docs are empty and what to send.
fn refuse_introspection(
    identity: &Identity,
    summary: DocumentSummary,
) -> Result<DocumentSummary, async_graphql::ServerError> {
    match identity {
        Identity::Unauthenticated(why) if summary.introspects => Err(coded_error(
            format!(
                "introspection needs a credential: {why} (in GraphiQL, put \
                 {{\"Authorization\": \"Bearer <JWT>\"}} in the Headers tab)"
            ),
            ErrorCode::Unauthenticated,
        )),
        _ => Ok(summary),
    }
}

fn coded_error(message: String, code: ErrorCode) -> async_graphql::ServerError {
    let mut error = async_graphql::ServerError::new(message, None);
    error
        .extensions
        .get_or_insert_with(Default::default)
        .set("code", code.as_str());
    error
}

/// While Redis is down, answers come from in-process coalescing and direct
/// BI calls: correct, but not shared across instances. Say so.
fn with_degraded_flag(degraded: bool, mut response: Response) -> Response {
    if degraded {
        response.headers_mut().insert(
            DEGRADED_HEADER,
            header::HeaderValue::from_static(DEGRADED_VALUE),
        );
    }
    response
}

/// Set on GraphQL responses with an answer produced while Redis was unavailable.
pub const DEGRADED_HEADER: &str = "x-gateway-degraded";
/// The response extension saying the same.
const DEGRADED_EXTENSION: &str = "degraded";
const DEGRADED_VALUE: &str = "redis-unavailable";

/// A request that is not GraphQL at all: HTTP 400 with a GraphQL-shaped body.
fn request_error(message: &str) -> Response {
    request_refused(StatusCode::BAD_REQUEST, message)
}

/// A request refused before GraphQL sees it: `status` with a GraphQL-shaped body.
fn request_refused(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"errors": [{"message": message, "extensions": {"code": "BAD_REQUEST"}}]})),
    )
        .into_response()
}

/// The request body limit and how a refused body is drained.
#[derive(Debug, Clone, Copy)]
struct BodyLimit {
    max_bytes: usize,
    linger: Linger,
}

/// How much of a refused body is read and thrown away, at most, before the
/// 413 is sent (see [`limit_body`]).
#[derive(Debug, Clone, Copy)]
struct Linger {
    /// Longest the whole drain may take.
    time: Duration,
    /// Longest the client may send nothing.
    idle: Duration,
    /// Most bytes read and thrown away.
    max_bytes: u64,
}

impl Linger {
    /// nginx lingers up to 30 s with 5 s pauses; a gateway's clients are on
    /// fast paths, and a few seconds bound what a slow one can hold. 64 MiB
    /// covers any body a GraphQL client sends by mistake; past that, draining
    /// would cost more than the answer is worth.
    const DEFAULT: Linger = Linger {
        time: Duration::from_secs(5),
        idle: Duration::from_secs(2),
        max_bytes: 64 * 1024 * 1024,
    };
}

/// Reads request bodies in full before any handler runs, up to the limit,
/// and refuses bigger ones with a 413 the client can read.
///
/// Most clients write a whole body before they read anything. A server that
/// answers early and closes the connection with unread bytes in its socket
/// makes the kernel send a reset, which destroys the answer on its way (the
/// client gets "connection reset" or "broken pipe", never the 413); and a
/// keep-alive client may send its next request down the dying connection.
/// So, like nginx's lingering close, the rest of a refused body is read and
/// thrown away (within [`Linger`]'s bounds: never kept, so memory stays flat),
/// then the 413 goes out with `Connection: close`, and the connection ends
/// with a clean close the client reads to the end. Two cases are refused at
/// once: a client waiting on `Expect: 100-continue` has sent none of the body
/// and never will, and a `Content-Length` too large to drain would be cut
/// anyway. HTTP/2 needs none of this: a refused stream is reset on its own,
/// the connection and its other streams go on.
async fn limit_body(State(limit): State<BodyLimit>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let size = body.size_hint();
    if size.upper() == Some(0) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let http1 = parts.version <= Version::HTTP_11;
    // The announced `Content-Length`, when there is one; 0 when chunked.
    let announced = size.lower();
    let mut chunks = body.into_data_stream();
    if announced > limit.max_bytes as u64 {
        let waits_for_continue = parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if http1 && !waits_for_continue && announced <= limit.linger.max_bytes {
            linger(chunks, limit.linger).await;
        }
        return too_large(limit.max_bytes, http1);
    }
    let mut buffered = bytes::BytesMut::with_capacity(announced as usize);
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(err) => {
                return request_error(&format!("the request body could not be read: {err}"));
            }
        };
        if buffered.len() + chunk.len() > limit.max_bytes {
            if http1 {
                linger(chunks, limit.linger).await;
            }
            return too_large(limit.max_bytes, http1);
        }
        buffered.extend_from_slice(&chunk);
    }
    next.run(Request::from_parts(parts, Body::from(buffered.freeze())))
        .await
}

/// HTTP 413; on HTTP/1, the connection closes after it.
fn too_large(max_bytes: usize, http1: bool) -> Response {
    let mut response = request_refused(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
            "the request body is larger than the {max_bytes} bytes this gateway accepts (MAX_BODY_BYTES)"
        ),
    );
    if http1 {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// How the drain of a refused body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lingered {
    /// The body ended: the connection can close cleanly.
    Drained,
    /// The client stopped sending for [`Linger::idle`].
    Stalled,
    /// [`Linger::time`] passed.
    TooLong,
    /// More than [`Linger::max_bytes`] came.
    TooBig,
    /// The body broke off (the client closed, or bad chunked framing).
    Broken,
}

/// Reads and throws away the rest of a refused body, within `bounds`.
async fn linger<S, E>(mut chunks: S, bounds: Linger) -> Lingered
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    let deadline = Instant::now() + bounds.time;
    let mut discarded: u64 = 0;
    let outcome = loop {
        let wait = deadline.min(Instant::now() + bounds.idle);
        match tokio::time::timeout_at(wait, chunks.next()).await {
            Ok(None) => break Lingered::Drained,
            Ok(Some(Err(_))) => break Lingered::Broken,
            Ok(Some(Ok(chunk))) => {
                discarded += chunk.len() as u64;
                if discarded > bounds.max_bytes {
                    break Lingered::TooBig;
                }
            }
            Err(_) if Instant::now() >= deadline => break Lingered::TooLong,
            Err(_) => break Lingered::Stalled,
        }
    };
    tracing::debug!(?outcome, discarded, "drained a request body over the limit");
    outcome
}

async fn healthz() -> &'static str {
    "ok"
}

/// 200 while the process can serve anything (cached answers need neither
/// the BI nor Redis), 503 while it starts and once shutdown has begun; the
/// body says how each dependency is doing.
async fn readyz(State(state): State<AppState>) -> Response {
    let phase = state.readiness.phase();
    let coordinator = state.store_health.describe();
    let status = if phase == Phase::Serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": phase.as_str(),
        "instance": &*state.instance_id,
        "bi": state.readiness.bi().as_str(),
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

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Linger = Linger {
        time: Duration::from_secs(10),
        idle: Duration::from_millis(50),
        max_bytes: 1024,
    };

    fn chunk(n: usize) -> Result<Bytes, std::io::Error> {
        Ok(Bytes::from(vec![b'x'; n]))
    }

    /// A body that ends within the bounds is read to its end.
    #[tokio::test]
    async fn a_body_that_ends_is_drained() {
        let body = futures_util::stream::iter((0..10).map(|_| chunk(100)));
        assert_eq!(linger(body, BOUNDS).await, Lingered::Drained);
    }

    /// More than `max_bytes` ends the drain, however fast they come.
    #[tokio::test]
    async fn an_endless_body_is_cut_after_max_bytes() {
        let body = futures_util::stream::repeat_with(|| chunk(100));
        assert_eq!(linger(body, BOUNDS).await, Lingered::TooBig);
    }

    /// A client silent for `idle` is not waited for any longer.
    #[tokio::test]
    async fn a_client_that_stops_sending_is_not_waited_for() {
        let body = futures_util::stream::iter([chunk(100)]).chain(futures_util::stream::pending());
        assert_eq!(linger(body, BOUNDS).await, Lingered::Stalled);
    }

    /// A client that keeps sending a byte now and then is cut after `time`.
    #[tokio::test]
    async fn a_slow_trickle_is_cut_after_the_linger_time() {
        let bounds = Linger {
            time: Duration::from_millis(200),
            idle: Duration::from_secs(10),
            max_bytes: u64::MAX,
        };
        let body = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some((chunk(1), ()))
        });
        assert_eq!(linger(Box::pin(body), bounds).await, Lingered::TooLong);
    }

    /// A body that breaks off ends the drain at once.
    #[tokio::test]
    async fn a_body_that_breaks_off_ends_the_drain() {
        let body = futures_util::stream::iter([
            chunk(100),
            Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        ]);
        assert_eq!(linger(body, BOUNDS).await, Lingered::Broken);
    }

    #[test]
    fn accept_chooses_by_q_then_by_order() {
        let media = |accept: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(accept) = accept {
                headers.insert(header::ACCEPT, accept.parse().expect("a header value"));
            }
            ResponseMedia::negotiate(&headers)
        };
        use ResponseMedia::{GraphqlResponse, Json};
        let cases = [
            (None, Json),
            (Some("*/*"), Json),
            (Some("text/html"), Json),
            (Some("application/json"), Json),
            (Some("application/graphql-response+json"), GraphqlResponse),
            (
                Some("Application/GraphQL-Response+JSON; charset=utf-8"),
                GraphqlResponse,
            ),
            (
                Some("application/graphql-response+json, application/json;q=0.9"),
                GraphqlResponse,
            ),
            (
                Some("application/json, application/graphql-response+json"),
                Json,
            ),
            (Some("application/graphql-response+json;q=0.5, */*"), Json),
            (
                Some("application/graphql-response+json;q=0, application/json;q=0.1"),
                Json,
            ),
        ];
        for (accept, expected) in cases {
            assert_eq!(media(accept), expected, "{accept:?}");
        }
    }
}
