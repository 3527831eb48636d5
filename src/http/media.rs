//! GraphQL over HTTP's media types: which one an answer is sent as.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

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
    pub(super) fn answer(self, response: async_graphql::Response) -> Response {
        let (status, body) = self.encode(&response);
        json_response(status, body.into())
    }

    /// The status and JSON body of one GraphQL answer in this media type.
    pub(super) fn encode(self, response: &async_graphql::Response) -> (StatusCode, Vec<u8>) {
        match self {
            ResponseMedia::Json => (
                StatusCode::OK,
                serde_json::to_vec(response).unwrap_or_default(),
            ),
            ResponseMedia::GraphqlResponse => {
                // Execution gives every field error a path; errors with none
                // and no data mean the request never reached execution.
                let request_error = response.data == async_graphql::Value::Null
                    && !response.errors.is_empty()
                    && response.errors.iter().all(|error| error.path.is_empty());
                if !request_error {
                    return (
                        StatusCode::OK,
                        serde_json::to_vec(response).unwrap_or_default(),
                    );
                }
                let mut body = serde_json::to_value(response).unwrap_or_default();
                if let Some(body) = body.as_object_mut() {
                    body.remove("data");
                }
                (
                    StatusCode::BAD_REQUEST,
                    serde_json::to_vec(&body).unwrap_or_default(),
                )
            }
        }
    }

    /// Labels a JSON answer (GraphQL, or a 400 for a body that is not
    /// GraphQL) with this media type; `application/json` ones stay as they are.
    pub(super) fn label(self, mut response: Response) -> Response {
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

/// A JSON body with `status`, typed `application/json` (relabelled by
/// [`ResponseMedia::label`] for GraphQL over HTTP's media type).
pub(super) fn json_response(status: StatusCode, body: axum::body::Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

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
