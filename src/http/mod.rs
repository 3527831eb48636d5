//! The HTTP surface: GraphQL (POST, and GET with GraphiQL for browsers),
//! health, readiness and metrics.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::dataloader::DataLoader;
use async_graphql::parser::types::ExecutableDocument;
use axum::body::Bytes;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;

use crate::aggregate::Aggregator;
use crate::auth::{Authenticator, Identity};
use crate::coalesce::{Counters, Invalidator, StoreHealth};
use crate::config::{AdminToken, GraphqlLimits};
use crate::graphql::limits::{
    DocumentLimits, DocumentSummary, LimitError, check_document, check_tokens,
};
use crate::graphql::{
    AggregateLoader, AnswerFacts, ErrorCode, GatewaySchema, classify_request_errors,
};
use crate::readiness::{Phase, Readiness};
use crate::telemetry::{self, RequestTrace, names};
use tracing::Instrument;

mod admin;
mod body_limit;
mod caching;
mod graphiql;
mod live;
mod media;
mod persisted;
mod responses;

use self::body_limit::{BodyLimit, Linger, limit_body};
pub use self::graphiql::{CredentialHint, GraphiqlPage};
pub use self::media::ResponseMedia;
pub use self::persisted::PersistedQueries;
pub use self::responses::ResponseCache;
use self::responses::{Lookup, StoredResponse};

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
    /// Where `POST /admin/invalidate` goes.
    pub invalidator: Arc<dyn Invalidator>,
    /// `None`: the admin routes answer 404.
    pub admin_token: Option<AdminToken>,
    pub persisted_queries: PersistedQueries,
    pub metrics: PrometheusHandle,
    pub request_timeout: Duration,
    pub instance_id: Arc<str>,
    pub documents: DocumentCache,
    pub operations: OperationNames,
    /// The process's phase and the BI's last probe, for `/readyz`.
    pub readiness: Arc<Readiness>,
    /// Live panels (the WebSocket transport reads its settings).
    pub live: Arc<crate::live::Live>,
    /// `None` (`GRAPHIQL=false`): browsers get what other GET clients get,
    /// and the page's files are not served.
    pub graphiql: Option<Arc<GraphiqlPage>>,
    /// Whole answers to repeated identical POSTs (`RESPONSE_CACHE_MAX_MB`).
    pub responses: ResponseCache,
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
    let graphiql_files = match state.graphiql {
        Some(_) => graphiql::routes(),
        None => Router::new(),
    };
    Router::new()
        .route("/graphql", get(graphql_get).post(graphql_post))
        .merge(graphiql_files)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/admin/invalidate", post(admin::invalidate))
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
        // Shared behind one `Arc`: axum clones the state for every request.
        .with_state(Arc::new(state))
}

/// Most operations in one JSON batch, when batches are allowed: each
/// document is limited on its own, so the batch size bounds the total.
const MAX_BATCH_OPERATIONS: usize = 10;

async fn graphql_post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
        let executed = futures_util::future::join_all(
            requests
                .into_iter()
                .map(|request| execute(state, headers, identity.clone(), request)),
        )
        .await;
        let degraded = executed.iter().any(|executed| executed.facts.degraded());
        let responses: Vec<async_graphql::Response> = executed
            .into_iter()
            .map(|executed| executed.response)
            .collect();
        // Batches are not part of GraphQL over HTTP: each answer as with
        // application/json, the whole with status 200.
        return no_store(with_degraded_flag(
            degraded,
            Json(responses).into_response(),
        ));
    }
    let started = std::time::Instant::now();
    let reuse = match state.responses.lookup(&state.aggregator, &identity, &body) {
        Lookup::Served(stored) => {
            account_served_again(headers, &stored, started);
            return no_store(media::json_response(StatusCode::OK, stored.body.clone()));
        }
        Lookup::Execute(pending) => Some(pending),
        Lookup::Ineligible => None,
    };
    match serde_json::from_slice::<async_graphql::Request>(&body) {
        Ok(request) => {
            let executed = execute(state, headers, identity, request).await;
            let served = executed
                .facts
                .hits()
                .filter(|_| executed.repeatable && executed.response.is_ok())
                .filter(|_| executed.response.extensions.is_empty());
            if let (Some(key), Some(served)) = (reuse, served) {
                // An answer without errors: 200, the same body in either media type.
                let (_, body) = media.encode(&executed.response);
                let body = Bytes::from(body);
                state
                    .responses
                    .store(key, body.clone(), served, executed.operation);
                return no_store(media::json_response(StatusCode::OK, body));
            }
            no_store(with_degraded_flag(
                executed.facts.degraded(),
                media.answer(executed.response),
            ))
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
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    // A GraphQL WebSocket (live panels) on the same path.
    if let Ok(upgrade) = upgrade {
        return live::upgrade(state, &headers, upgrade);
    }
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html && let Some(page) = &state.graphiql {
        return page.response();
    }
    let media = ResponseMedia::negotiate(&headers);
    media.label(
        match async_graphql::http::parse_query_string(query.as_deref().unwrap_or_default()) {
            Ok(request) => {
                let identity = state.identify(&headers);
                let scope = identity.scope_fingerprint();
                let executed = execute(&state, &headers, identity, request).await;
                with_degraded_flag(
                    executed.facts.degraded(),
                    cacheable_answer(&headers, media, &executed.response, &executed.facts, &scope),
                )
            }
            Err(err) => request_error(&format!("the query string is not a GraphQL request: {err}")),
        },
    )
}

/// A `GET` answer with its `ETag` and `Cache-Control`; `304` without a body
/// when the client has it already (`If-None-Match`).
fn cacheable_answer(
    headers: &HeaderMap,
    media: ResponseMedia,
    response: &async_graphql::Response,
    facts: &AnswerFacts,
    scope: &str,
) -> Response {
    let (status, body) = media.encode(response);
    let cache_control = caching::cache_control(facts, !response.errors.is_empty());
    let etag = caching::etag(scope, &body);
    if status == StatusCode::OK && caching::not_modified(headers, &etag) {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache_control)],
        )
            .into_response();
    }
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache_control),
        ],
        body,
    )
        .into_response()
}

/// `POST` answers are never stored by browsers or shared caches.
fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// Accounts for an answer served again from the response cache as for one
/// executed: its operation's duration and, when traced, its request span
/// with links to the BI calls that paid for its entries.
fn account_served_again(headers: &HeaderMap, stored: &StoredResponse, started: std::time::Instant) {
    if let Some(span) = telemetry::sampled_span(headers, &stored.operation) {
        for entry in ResponseCache::entries(stored) {
            telemetry::link_to_producer(&span, &entry);
        }
    }
    metrics::histogram!(names::GRAPHQL_DURATION, "operation" => stored.operation.clone())
        .record(started.elapsed().as_secs_f64());
}

/// One GraphQL request executed, and what the HTTP layer needs to know of it.
struct Executed {
    response: async_graphql::Response,
    /// What its answers were like.
    facts: AnswerFacts,
    /// Its operation's metric label.
    operation: String,
    /// Its document passed the limits and its answer is a function of its
    /// entries alone (`DocumentSummary::repeatable`).
    repeatable: bool,
}

/// Runs one GraphQL request; also says what its answers were like.
async fn execute(
    state: &AppState,
    headers: &HeaderMap,
    identity: Identity,
    mut request: async_graphql::Request,
) -> Executed {
    let started = std::time::Instant::now();
    let facts = AnswerFacts::default();
    // A persisted query's answer is not kept: serving it again would skip
    // the persisted document's lookup (it may be gone: PERSISTED_QUERY_NOT_FOUND)
    // and registration.
    let persisted = request.extensions.contains_key("persistedQuery");
    // A persisted query's document, from its hash, before any limit looks
    // at the request (its document is what the limits check).
    let to_persist = match state.persisted_queries.resolve(&mut request).await {
        Ok(to_persist) => to_persist,
        Err(refused) => {
            let error = coded_error(refused.message.to_owned(), refused.code);
            return Executed {
                response: async_graphql::Response::from_errors(vec![error]),
                facts,
                operation: state.operations.label(None),
                repeatable: false,
            };
        }
    };
    // The limits parse the document first, and the document names the
    // operation when the body does not (`query Panel { ... }` is `Panel`).
    let checked = check_limits(state, &mut request)
        .and_then(|summary| refuse_introspection(&identity, summary));
    if let Some(hash) = to_persist
        && checked.is_ok()
        && request.parsed_query().is_ok()
    {
        // Only documents that parse and pass the limits are kept.
        state.persisted_queries.store(hash, &request.query).await;
    }
    let document_name = checked
        .as_ref()
        .ok()
        .and_then(|summary| summary.operation_name.clone());
    let repeatable = !persisted && checked.as_ref().is_ok_and(|summary| summary.repeatable);
    let operation = state.operations.label(
        request
            .operation_name
            .as_deref()
            .or(document_name.as_deref()),
    );
    // Requests answered from process memory are traced as the sampler says;
    // the others from the moment they need more (the dataloader's batch).
    let trace = RequestTrace::decide(headers, &operation);
    let span = trace.span();
    if let Some((trace_id, _)) = telemetry::span_ids(&span) {
        // Log lines inside this request carry it, so logs lead to the trace.
        span.record("trace_id", trace_id);
    }

    let mut response = match checked {
        Err(refused) => async_graphql::Response::from_errors(vec![refused]),
        Ok(_) => {
            let deadline = Instant::now() + state.request_timeout;
            let loader = DataLoader::new(
                AggregateLoader::new(
                    Arc::clone(&state.aggregator),
                    Arc::clone(&state.counters),
                    deadline,
                    trace,
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
                .execute(request.data(loader).data(identity).data(facts.clone()))
                .instrument(span)
                .await
        }
    };
    classify_request_errors(&mut response);
    metrics::histogram!(names::GRAPHQL_DURATION, "operation" => operation.clone())
        .record(started.elapsed().as_secs_f64());
    // Decided by how the answers were produced, not by how Redis is doing
    // now: a degraded answer always says so, and only those do.
    if facts.degraded() {
        response.extensions.insert(
            DEGRADED_EXTENSION.to_owned(),
            async_graphql::Value::from(DEGRADED_VALUE),
        );
    }
    Executed {
        response,
        facts,
        operation,
        repeatable,
    }
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
pub(super) fn request_error(message: &str) -> Response {
    request_refused(StatusCode::BAD_REQUEST, message)
}

/// A request refused before GraphQL sees it: `status` with a GraphQL-shaped body.
pub(super) fn request_refused(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"errors": [{"message": message, "extensions": {"code": ErrorCode::BadRequest.as_str()}}]})),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

/// 200 while the process can serve anything (cached answers need neither
/// the BI nor Redis), 503 while it starts and once shutdown has begun; the
/// body says how each dependency is doing.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
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
        "redisMode": coordinator.redis_mode,
        "redisNodes": coordinator.redis_nodes,
        "redisUnreachable": coordinator.redis_unreachable,
        "coordination": coordinator.mode,
        "notifications": coordinator.notifications,
    });
    (status, Json(body)).into_response()
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
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
            graphiql::ASSET_ROUTE => "/graphiql",
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
