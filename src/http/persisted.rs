//! Apollo's automatic persisted queries: a client sends the SHA-256 of its
//! document instead of the document, and the document itself only the first
//! time (after a `PERSISTED_QUERY_NOT_FOUND`). Dashboards send the same few
//! documents over and over; GET URLs stay short enough for CDNs.
//!
//! Written here rather than with async-graphql's APQ extension, which fills
//! the document in during execution, after this gateway's cost limits and
//! parsed-document cache have looked at the request: a hash-only request
//! would then skip them. The protocol is three rules; the store is a bounded
//! copy in process memory over the shared [`DocumentStore`].

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::coalesce::DocumentStore;
use crate::graphql::ErrorCode;

/// The persisted-query protocol and its documents.
#[derive(Clone)]
pub struct PersistedQueries {
    local: moka::sync::Cache<String, Arc<str>>,
    shared: Arc<dyn DocumentStore>,
}

/// Why a persisted query could not be used: `code` goes to `extensions.code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedQueryError {
    pub code: ErrorCode,
    pub message: &'static str,
}

impl PersistedQueries {
    pub fn new(max_documents: u64, shared: Arc<dyn DocumentStore>) -> PersistedQueries {
        PersistedQueries {
            local: moka::sync::Cache::new(max_documents),
            shared,
        }
    }

    /// Applies the protocol to `request`: a hash without a document gets the
    /// stored document (or `PERSISTED_QUERY_NOT_FOUND`); a hash with a
    /// document is checked against it, and comes back to be stored (with
    /// [`PersistedQueries::store`]) once the document passes the limits.
    /// Requests without the extension pass untouched.
    pub async fn resolve(
        &self,
        request: &mut async_graphql::Request,
    ) -> Result<Option<String>, PersistedQueryError> {
        let Some(persisted) = request.extensions.get("persistedQuery") else {
            return Ok(None);
        };
        let async_graphql::Value::Object(persisted) = persisted else {
            return Err(bad("extensions.persistedQuery must be an object"));
        };
        match persisted.get("version") {
            Some(async_graphql::Value::Number(version)) if version.as_u64() == Some(1) => {}
            _ => return Err(bad("only version 1 of persisted queries is supported")),
        }
        let hash = match persisted.get("sha256Hash") {
            Some(async_graphql::Value::String(hash))
                if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                hash.to_ascii_lowercase()
            }
            _ => {
                return Err(bad(
                    "extensions.persistedQuery.sha256Hash must be 64 hex digits",
                ));
            }
        };
        if request.query.trim().is_empty() {
            let document = match self.local.get(&hash) {
                Some(document) => document,
                None => {
                    let document: Arc<str> = self
                        .shared
                        .load_document(&hash)
                        .await
                        .ok_or(PersistedQueryError {
                            code: ErrorCode::PersistedQueryNotFound,
                            message: "PersistedQueryNotFound",
                        })?
                        .into();
                    self.local.insert(hash, Arc::clone(&document));
                    document
                }
            };
            request.query = document.to_string();
            return Ok(None);
        }
        let digest: String = Sha256::digest(request.query.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if digest != hash {
            return Err(bad("provided sha does not match query"));
        }
        Ok((!self.local.contains_key(&hash)).then_some(hash))
    }

    /// Keeps `document` under `hash`, here and in the shared store.
    pub async fn store(&self, hash: String, document: &str) {
        self.shared.save_document(&hash, document).await;
        self.local.insert(hash, document.into());
    }
}

fn bad(message: &'static str) -> PersistedQueryError {
    PersistedQueryError {
        code: ErrorCode::BadRequest,
        message,
    }
}
