//! HTTP caching of GraphQL answers: a browser or a CDN may keep a `GET`
//! answer as long as every entry in it stays fresh, and revalidate it with
//! `If-None-Match` for a `304` that costs neither the BI nor serialisation
//! on the way back. `POST` answers are never stored.

use axum::http::{HeaderMap, HeaderValue, header};
use sha2::{Digest, Sha256};

use crate::graphql::AnswerFacts;

/// `Cache-Control` of a `GET` answer: `private, max-age=N` with N the
/// shortest fresh time left of its entries, or `no-store` when any field
/// errored, any entry is stale, or nothing in it came from the cache.
pub(super) fn cache_control(facts: &AnswerFacts, errored: bool) -> HeaderValue {
    let fresh_for = facts.fresh_for().filter(|_| !errored && !facts.stale());
    match fresh_for.map(|left| left.as_secs()) {
        Some(secs) if secs > 0 => HeaderValue::from_str(&format!("private, max-age={secs}"))
            .unwrap_or_else(|_| HeaderValue::from_static("no-store")),
        _ => HeaderValue::from_static("no-store"),
    }
}

/// A strong `ETag` of `body` as `scope` may see it: with authentication on,
/// two callers allowed different customers never share a tag.
pub(super) fn etag(scope: &str, body: &[u8]) -> HeaderValue {
    let mut hasher = Sha256::new();
    hasher.update(scope.as_bytes());
    hasher.update(b"\n");
    hasher.update(body);
    let digest: String = hasher.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    HeaderValue::from_str(&format!("\"{digest}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// Whether `If-None-Match` names `etag` (or `*`).
pub(super) fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag == etag || tag.strip_prefix("W/") == Some(etag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_names_the_tag_among_others() {
        let tag = etag("open", b"{}");
        let mut headers = HeaderMap::new();
        assert!(!not_modified(&headers, &tag));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"other\", {}", tag.to_str().expect("ascii")))
                .expect("a header value"),
        );
        assert!(not_modified(&headers, &tag));
        assert_ne!(
            etag("only:acme", b"{}"),
            tag,
            "the scope is part of the tag"
        );
    }
}
