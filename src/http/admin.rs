//! `/admin/*`: operators' routes, behind `ADMIN_TOKEN` (unset: 404).
//!
//! `POST /admin/invalidate` with `{"customer": "acme"}`, `{"cube": "Sales"}`,
//! both, or `{"all": true}`, and optionally `"mode": "stale"` (the default)
//! or `"evict"`: entries of that scope produced before the call stop being
//! fresh (or are dropped) on every instance within a second.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, request_refused};
use crate::coalesce::{InvalidationMode, InvalidationScope};
use crate::telemetry::names;

/// The body of `POST /admin/invalidate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    customer: Option<String>,
    cube: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default = "stale")]
    mode: InvalidationMode,
}

fn stale() -> InvalidationMode {
    InvalidationMode::Stale
}

impl InvalidateRequest {
    fn scope(self) -> Result<(InvalidationScope, InvalidationMode), &'static str> {
        let scope = match (self.all, self.customer, self.cube) {
            (true, None, None) => InvalidationScope::All,
            (true, _, _) => return Err("`all` cannot be combined with `customer` or `cube`"),
            (false, Some(customer), Some(cube)) => {
                InvalidationScope::CustomerCube { customer, cube }
            }
            (false, Some(customer), None) => InvalidationScope::Customer(customer),
            (false, None, Some(cube)) => InvalidationScope::Cube(cube),
            (false, None, None) => {
                return Err("say what to invalidate: `customer`, `cube`, both, or `\"all\": true`");
            }
        };
        let empty = match &scope {
            InvalidationScope::Customer(name) | InvalidationScope::Cube(name) => name.is_empty(),
            InvalidationScope::CustomerCube { customer, cube } => {
                customer.is_empty() || cube.is_empty()
            }
            InvalidationScope::All => false,
        };
        if empty {
            return Err("`customer` and `cube` must not be empty");
        }
        Ok((scope, self.mode))
    }
}

/// Whether `headers` carry `Authorization: Bearer <ADMIN_TOKEN>`, compared in
/// time that does not depend on where the token differs.
fn authorised(state: &AppState, headers: &HeaderMap) -> Option<bool> {
    let expected = state.admin_token.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    let (a, b) = (
        crate::auth::sha256_hex(given),
        crate::auth::sha256_hex(&expected.0),
    );
    Some(
        a.bytes()
            .zip(b.bytes())
            .fold(0_u8, |diff, (x, y)| diff | (x ^ y))
            == 0,
    )
}

pub(super) async fn invalidate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match authorised(&state, &headers) {
        None => return StatusCode::NOT_FOUND.into_response(),
        Some(false) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({"error": "a valid `Authorization: Bearer <ADMIN_TOKEN>` is required"})),
            )
                .into_response();
        }
        Some(true) => {}
    }
    let request = match serde_json::from_slice::<InvalidateRequest>(&body) {
        Ok(request) => request,
        Err(err) => {
            return request_refused(
                StatusCode::BAD_REQUEST,
                &format!("not an invalidation request: {err}"),
            );
        }
    };
    let (scope, mode) = match request.scope() {
        Ok(scope) => scope,
        Err(why) => return request_refused(StatusCode::BAD_REQUEST, why),
    };
    match state.invalidator.invalidate(&scope, mode).await {
        Ok(generation) => {
            let mode_label = match mode {
                InvalidationMode::Stale => "stale",
                InvalidationMode::Evict => "evict",
            };
            metrics::counter!(names::INVALIDATIONS, "mode" => mode_label).increment(1);
            tracing::info!(scope = %scope.field(), mode = mode_label, generation, "invalidated");
            let scope_json = match &scope {
                InvalidationScope::All => json!({"all": true}),
                InvalidationScope::Customer(customer) => json!({"customer": customer}),
                InvalidationScope::Cube(cube) => json!({"cube": cube}),
                InvalidationScope::CustomerCube { customer, cube } => {
                    json!({"customer": customer, "cube": cube})
                }
            };
            Json(json!({
                "invalidated": scope_json,
                "mode": mode_label,
                "generation": generation,
                // Every instance applies it within this long.
                "withinSeconds": 1,
            }))
            .into_response()
        }
        Err(_) => request_refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis is unavailable: the invalidation could not be shared with every instance; try again",
        ),
    }
}
