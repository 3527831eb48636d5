//! The simulator's HTTP surface: the Cube API (`/load`, `/meta`) under any
//! path prefix, and the `/_sim/` control routes.
//!
//! The Cube API is served by a fallback that looks only at the last path
//! segment, so `/cubejs-api/v1/load`, `/v1/load` and `/load` all work: tests
//! and deployments can point `BI_URL` at the simulator with whatever prefix
//! they use for real Cube.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::json;

use super::faults::{Fault, FaultsUpdate};
use super::{DataVersion, Simulator, data, schema};
use crate::bi::protocol::{CONTINUE_WAIT, CubeQuery, LoadRequest, Row};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

pub fn router(sim: Simulator) -> Router {
    Router::new()
        .route("/_sim/stats", get(stats))
        .route("/_sim/reset", post(reset))
        .route("/_sim/faults", get(faults).post(set_faults))
        .route("/_sim/data-version", post(set_data_version))
        .fallback(cube_api)
        .with_state(sim)
}

/// Every error the simulator answers, as Cube shapes them: a status and
/// `{"error": "..."}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

async fn stats(State(sim): State<Simulator>) -> impl IntoResponse {
    Json(sim.stats())
}

async fn reset(State(sim): State<Simulator>) -> StatusCode {
    sim.reset();
    StatusCode::NO_CONTENT
}

async fn faults(State(sim): State<Simulator>) -> impl IntoResponse {
    Json(sim.faults())
}

/// Merges the body into the current faults and answers with the result.
async fn set_faults(State(sim): State<Simulator>, body: Bytes) -> Result<Response, ApiError> {
    let update: FaultsUpdate = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid faults body: {e}")))?;
    let faults = sim.update_faults(update).map_err(ApiError::bad_request)?;
    Ok(Json(faults).into_response())
}

/// Moves the data to another version: `/load` answers from it from the next
/// request on (a request already waiting out its latency keeps its version).
async fn set_data_version(State(sim): State<Simulator>, body: Bytes) -> Result<Response, ApiError> {
    let update: DataVersion = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid data-version body (want {{\"version\": N}}): {e}"
        ))
    })?;
    sim.set_data_version(update.version);
    Ok(Json(update).into_response())
}

/// Dispatches the Cube API on the path's last segment, whatever its prefix.
async fn cube_api(
    State(sim): State<Simulator>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let endpoint = uri.path().trim_end_matches('/').rsplit('/').next();
    match (endpoint, method) {
        (Some("load"), Method::POST) => load(&sim, &headers, &body).await,
        (Some("meta"), Method::GET) => {
            sim.record_meta();
            Json(schema::meta()).into_response()
        }
        (Some(endpoint @ ("load" | "meta")), method) => ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{method} is not supported on /{endpoint}"),
        }
        .into_response(),
        _ => ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no route for {}", uri.path()),
        }
        .into_response(),
    }
}

/// `POST /load`: counts the request, applies any fault, waits the latency,
/// then answers one query or a data-blending batch.
async fn load(sim: &Simulator, headers: &HeaderMap, body: &[u8]) -> Response {
    let header_text = |name: &HeaderName| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let request = serde_json::from_slice::<LoadRequest>(body);
    let queries = match &request {
        Ok(LoadRequest::Single { query }) => std::slice::from_ref(query),
        Ok(LoadRequest::Multi { query, .. }) => query.as_slice(),
        Err(_) => &[],
    };
    let authorization = header_text(&header::AUTHORIZATION);
    let version = sim.record_load(queries, authorization.clone(), header_text(&TRACEPARENT));
    // As Cube's auth middleware: before any work, and never echoing the token.
    let checked = match &request {
        Ok(_) => sim.check_security(authorization.as_deref(), queries),
        Err(_) => Ok(()),
    };
    // An unreadable body is refused at once and consumes no fault: faults are
    // aimed at the gateway's real queries.
    let request = match request {
        Ok(request) => request,
        Err(e) => return ApiError::bad_request(format!("invalid /load body: {e}")).into_response(),
    };
    if let Err(refusal) = checked {
        return ApiError {
            status: StatusCode::FORBIDDEN,
            message: refusal,
        }
        .into_response();
    }

    let (fault, latency) = sim.next_fault();
    match fault {
        // A rate limiter refuses before any work is done, so without delay.
        Some(Fault::RateLimited { retry_after_secs }) => rate_limited(retry_after_secs),
        Some(Fault::Fail { status, body }) => {
            tokio::time::sleep(latency).await;
            failure(status, body)
        }
        Some(Fault::ContinueWait) => {
            tokio::time::sleep(latency).await;
            Json(json!({ "error": CONTINUE_WAIT })).into_response()
        }
        None => {
            tokio::time::sleep(latency).await;
            evaluate(request, version).await.unwrap_or_else(|error| {
                tracing::debug!(error = %error.message, "bi-sim rejected a /load request");
                error.into_response()
            })
        }
    }
}

fn rate_limited(retry_after_secs: u64) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, HeaderValue::from(retry_after_secs))],
        Json(json!({ "error": "Too many requests" })),
    )
        .into_response()
}

/// A `failNext` answer: the body verbatim, labelled JSON when it is JSON so
/// clients parse it as they would a real Cube error.
fn failure(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let content_type = if serde_json::from_str::<serde_json::Value>(&body).is_ok() {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// One answered query: Cube echoes its normalised copy of the query.
#[derive(Serialize)]
struct Answer {
    query: CubeQuery,
    data: Vec<Row>,
}

/// The answer to a data-blending batch.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BlendingAnswer {
    query_type: &'static str,
    results: Vec<Answer>,
    slow_query: bool,
}

/// Evaluates the request's queries off the async workers: a long range over
/// many customers is a few hundred milliseconds of CPU, which must not stall
/// other connections.
async fn evaluate(request: LoadRequest, version: u64) -> Result<Response, ApiError> {
    let work = tokio::task::spawn_blocking(move || -> Result<Response, String> {
        match request {
            LoadRequest::Single { query } => {
                let data = data::answer_at(&query, version)?;
                let query = data::normalise(&query);
                Ok(Json(Answer { query, data }).into_response())
            }
            LoadRequest::Multi { query: queries, .. } => {
                let rows = data::answer_batch(&queries, version)?;
                let results = queries
                    .iter()
                    .zip(rows)
                    .map(|(query, data)| Answer {
                        query: data::normalise(query),
                        data,
                    })
                    .collect();
                Ok(Json(BlendingAnswer {
                    query_type: "blendingQuery",
                    results,
                    slow_query: false,
                })
                .into_response())
            }
        }
    });
    match work.await {
        Ok(answer) => answer.map_err(ApiError::bad_request),
        Err(join_error) => {
            tracing::error!(error = %join_error, "bi-sim query evaluation failed");
            Err(ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: "internal error in bi-sim".to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::super::{SimConfig, SimSecurity, SimStats, canonical_key, data, serve};
    use super::*;

    /// A simulator without latency on a loopback port; it stops when the
    /// test's runtime does.
    async fn start() -> (String, Simulator) {
        start_with(None).await
    }

    async fn start_with(security: Option<SimSecurity>) -> (String, Simulator) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port");
        let address = listener.local_addr().expect("a bound address");
        let sim = Simulator::new(SimConfig {
            latency: Duration::ZERO,
            security,
        });
        tokio::spawn(serve(listener, sim.clone(), std::future::pending()));
        (format!("http://{address}"), sim)
    }

    fn query(granularity: Option<&str>) -> Value {
        let mut time =
            json!({"dimension": "Sales.date", "dateRange": ["2025-01-01", "2025-01-03"]});
        if let Some(granularity) = granularity {
            time["granularity"] = json!(granularity);
        }
        json!({"measures": ["Sales.orders", "Sales.revenue"], "dimensions": ["Sales.region"], "timeDimensions": [time]})
    }

    async fn post(url: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
        let response = reqwest::Client::new()
            .post(url)
            .header("authorization", "secret-token")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .json(body)
            .send()
            .await
            .expect("the simulator answers");
        let status = StatusCode::from_u16(response.status().as_u16()).expect("a valid status");
        let headers = response.headers().clone();
        let body = response.json().await.expect("a JSON body");
        (status, headers, body)
    }

    /// `/load` works under any prefix, answers exactly `answer()`, and every
    /// call is counted with its headers.
    #[tokio::test]
    async fn load_answers_under_any_prefix_and_is_counted() {
        let (base, sim) = start().await;
        let q = query(Some("day"));
        let expected = data::answer(&serde_json::from_value(q.clone()).expect("a CubeQuery"))
            .expect("a valid query");
        for prefix in ["/cubejs-api/v1", "/v1", ""] {
            let (status, _, body) =
                post(&format!("{base}{prefix}/load"), &json!({"query": q})).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["data"], json!(expected));
            assert_eq!(body["query"]["limit"], json!(data::DEFAULT_LIMIT));
        }
        let meta: Value = reqwest::get(format!("{base}/cubejs-api/v1/meta"))
            .await
            .and_then(|r| r.error_for_status())
            .expect("meta answers")
            .json()
            .await
            .expect("a JSON body");
        assert_eq!(meta["cubes"][0]["name"], "Sales");

        let key = canonical_key(&serde_json::from_value(q).expect("a CubeQuery"));
        let stats = sim.stats();
        assert_eq!(
            stats,
            SimStats {
                http_requests: 3,
                queries: 3,
                by_query: [(key, 3)].into(),
                meta_requests: 1,
                last_authorization: Some("secret-token".to_owned()),
                last_traceparent: Some(
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()
                ),
                max_batch_size: 1,
                ..SimStats::default()
            }
        );
        let served: SimStats = reqwest::get(format!("{base}/_sim/stats"))
            .await
            .expect("stats answer")
            .json()
            .await
            .expect("SimStats JSON");
        assert_eq!(served, stats);
    }

    /// Batches answer by position with the extra `time.<granularity>` key,
    /// and break Cube's blending rules with Cube's errors.
    #[tokio::test]
    async fn batches_follow_blending_rules_over_http() {
        let (base, sim) = start().await;
        let url = format!("{base}/cubejs-api/v1/load");
        let batch =
            json!({"queryType": "multi", "query": [query(Some("day")), query(Some("day"))]});
        let (status, _, body) = post(&url, &batch).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["queryType"], "blendingQuery");
        assert_eq!(body["slowQuery"], false);
        let first_row = &body["results"][1]["data"][0];
        assert_eq!(first_row["time.day"], first_row["Sales.date.day"]);

        let mixed = json!({"queryType": "multi", "query": [query(Some("day")), query(None)]});
        let (status, _, body) = post(&url, &mixed).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], data::BLEND_GRANULARITIES_MISMATCH);

        let totals = json!({"queryType": "multi", "query": [query(None)]});
        let (status, _, body) = post(&url, &totals).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], data::BLEND_WITHOUT_GRANULARITY);

        let stats = sim.stats();
        assert_eq!(
            (stats.http_requests, stats.queries, stats.max_batch_size),
            (3, 5, 2)
        );
    }

    /// Faults are consumed one per request in order (429, failure, Continue
    /// wait), are counted like any request, and reset clears them.
    #[tokio::test]
    async fn faults_are_served_in_order_and_reset() {
        let (base, sim) = start().await;
        let faults = json!({"continueWait": 1, "failNext": {"status": 502}, "rateLimit": {"retryAfterSecs": 4}});
        let (status, _, _) = post(&format!("{base}/_sim/faults"), &faults).await;
        assert_eq!(status, StatusCode::OK);

        let load = json!({"query": query(None)});
        let url = format!("{base}/load");
        let (status, headers, body) = post(&url, &load).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            headers.get("retry-after").map(HeaderValue::as_bytes),
            Some(&b"4"[..])
        );
        assert_eq!(body["error"], "Too many requests");
        let (status, _, body) = post(&url, &load).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::BAD_GATEWAY, &json!("Simulated failure"))
        );
        let (status, _, body) = post(&url, &load).await;
        assert_eq!(
            (status, &body["error"]),
            (StatusCode::OK, &json!(CONTINUE_WAIT))
        );
        let (status, _, body) = post(&url, &load).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body["data"].is_array());
        assert_eq!(sim.stats().http_requests, 4);

        post(&format!("{base}/_sim/faults"), &json!({"continueWait": 5})).await;
        let reset = reqwest::Client::new()
            .post(format!("{base}/_sim/reset"))
            .send()
            .await
            .expect("reset answers");
        assert!(reset.status().is_success());
        assert_eq!(sim.stats(), SimStats::default());
        let (status, _, body) = post(&url, &load).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body["data"].is_array());
    }

    /// `POST /_sim/data-version` moves `/load` to another version's numbers,
    /// `/_sim/stats` reports it, and a reset goes back to version 0.
    #[tokio::test]
    async fn the_data_version_changes_the_answers_until_a_reset() {
        let (base, sim) = start().await;
        let q = query(None);
        let cube: CubeQuery = serde_json::from_value(q.clone()).expect("a CubeQuery");
        let load = json!({"query": q});
        let url = format!("{base}/load");
        let (_, _, body) = post(&url, &load).await;
        assert_eq!(
            body["data"],
            json!(data::answer_at(&cube, 0).expect("valid"))
        );

        let (status, _, body) =
            post(&format!("{base}/_sim/data-version"), &json!({"version": 3})).await;
        assert_eq!((status, &body), (StatusCode::OK, &json!({"version": 3})));
        let (_, _, body) = post(&url, &load).await;
        let changed = json!(data::answer_at(&cube, 3).expect("valid"));
        assert_eq!(body["data"], changed);
        assert_ne!(changed, json!(data::answer_at(&cube, 0).expect("valid")));
        assert_eq!(sim.stats().data_version, 3);

        let (status, _, _) = post(&format!("{base}/_sim/data-version"), &json!({"v": 1})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        sim.reset();
        assert_eq!(sim.stats().data_version, 0);
    }

    /// Unreadable bodies and bad queries get 400 with a JSON error, and are
    /// still counted.
    #[tokio::test]
    async fn bad_requests_get_json_errors() {
        let (base, sim) = start().await;
        let response = reqwest::Client::new()
            .post(format!("{base}/load"))
            .body("{not json")
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status().as_u16(), 400);
        let body: Value = response.json().await.expect("a JSON error");
        assert!(body["error"].is_string());

        let unknown = json!({"query": {"measures": ["Sales.profit"], "timeDimensions": [{"dimension": "Sales.date", "dateRange": ["2025-01-01", "2025-01-01"]}]}});
        let (status, _, body) = post(&format!("{base}/load"), &unknown).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("Sales.profit"))
        );
        assert_eq!(sim.stats().http_requests, 2);
    }

    /// In the security-context mode, a request passes only with a token
    /// signed with the secret, unexpired, whose claim names the customer
    /// that every tenant cube of every query is filtered on; a refusal is
    /// 403 and never echoes the token.
    #[tokio::test]
    async fn the_security_context_mode_checks_tokens_against_the_queries() {
        let secret = "sim-secret";
        let (base, sim) = start_with(Some(SimSecurity {
            secret: secret.into(),
            claim: "tenant".into(),
        }))
        .await;
        let url = format!("{base}/load");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let sign = |claims: Value, key: &str| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
            )
            .expect("signed")
        };
        let scoped = |customers: &[(&str, &str)]| {
            let mut q = query(Some("day"));
            q["filters"] = json!(
                customers
                    .iter()
                    .map(|(member, customer)| json!({"member": member, "operator": "equals", "values": [customer]}))
                    .collect::<Vec<_>>()
            );
            q
        };
        let send = |token: Option<String>, query: Value| {
            let url = url.clone();
            async move {
                let mut request = reqwest::Client::new()
                    .post(&url)
                    .json(&json!({"query": query}));
                if let Some(token) = token {
                    request = request.header("authorization", token);
                }
                let response = request.send().await.expect("an answer");
                let status = response.status().as_u16();
                (status, response.text().await.expect("a body"))
            }
        };
        let acme = sign(
            json!({"tenant": "acme", "iat": now, "exp": now + 60}),
            secret,
        );
        let acme_q = scoped(&[("Sales.customerId", "acme")]);

        assert_eq!(send(Some(acme.clone()), acme_q.clone()).await.0, 200);
        assert_eq!(
            send(Some(format!("Bearer {acme}")), acme_q.clone()).await.0,
            200
        );
        // A query joining Returns must carry its tenant filter too.
        let mut joined = acme_q.clone();
        joined["dimensions"] = json!(["Returns.product"]);
        assert_eq!(send(Some(acme.clone()), joined.clone()).await.0, 403);
        let mut both = scoped(&[("Sales.customerId", "acme"), ("Returns.tenantId", "acme")]);
        both["dimensions"] = json!(["Returns.product"]);
        assert_eq!(send(Some(acme.clone()), both).await.0, 200);

        let refused = [
            (None, acme_q.clone()),
            (
                Some(sign(json!({"tenant": "acme", "exp": now + 60}), "other")),
                acme_q.clone(),
            ),
            (
                Some(sign(json!({"tenant": "acme", "exp": now - 120}), secret)),
                acme_q.clone(),
            ),
            (Some(sign(json!({"exp": now + 60}), secret)), acme_q.clone()),
            (
                Some(sign(
                    json!({"tenant": ["acme", "globex"], "exp": now + 60}),
                    secret,
                )),
                acme_q.clone(),
            ),
            (
                Some(acme.clone()),
                scoped(&[("Sales.customerId", "globex")]),
            ),
            (Some(acme.clone()), query(Some("day"))),
        ];
        for (i, (token, q)) in refused.into_iter().enumerate() {
            let (status, body) = send(token.clone(), q).await;
            assert_eq!(status, 403, "case {i}: {body}");
            if let Some(token) = token {
                assert!(!body.contains(&token), "case {i} echoes the token");
            }
        }
        let stats = sim.stats();
        assert_eq!(stats.security_rejections, 8);
        assert_eq!(stats.tokens_by_customer, [("acme".to_owned(), 2)].into());
    }
}
