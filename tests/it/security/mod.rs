//! Attack tests: who may get in (JWTs, API keys, tenants), what a hostile
//! document or body can cost (limits, CSRF, quotas), what never leaks
//! (secrets), and fuzzing of everything a client controls.
//!
//! Every refusal is checked the same way: its code, and bi-sim's counters
//! proving that nothing reached the BI.

// Each area uses its own part of these helpers; the others look unused to it.
#![allow(dead_code)]

mod api_keys;
mod csrf;
mod fuzz;
mod jwt;
mod limits;
mod secrets;
mod tenants;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::common::{Gateway, REQUEST_TIMEOUT, within};

/// The HS256 secret the tests' gateways verify tokens with (`AUTH_JWT_SECRET`).
pub const JWT_SECRET: &str = "jwt-secret-for-tests-0123456789abcdef";

/// Seconds since the Unix epoch, as JWT claims count time.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// An HS256 token with `claims`, signed with `secret`.
pub fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("claims encode")
}

/// A valid token (for ten minutes) of subject `sub` that may query `customers`
/// (a list, or `"*"`).
pub fn token_for(sub: &str, customers: Value) -> String {
    sign(
        &json!({"sub": sub, "exp": now() + 600, "customers": customers}),
        JWT_SECRET,
    )
}

/// `Authorization: Bearer <token>`.
pub fn bearer(token: &str) -> (String, String) {
    ("authorization".to_owned(), format!("Bearer {token}"))
}

/// One HTTP exchange's outcome: the status and the body as text (JSON or not).
#[derive(Debug, Clone)]
pub struct Exchange {
    pub status: u16,
    pub text: String,
}

impl Exchange {
    /// The body as JSON; a non-JSON body fails the test.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|err| {
            panic!(
                "HTTP {} answered non-JSON ({err}): {}",
                self.status, self.text
            )
        })
    }
}

/// A client for requests the fixture's helpers cannot shape: own headers,
/// other content types, query strings.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP client")
}

/// `POST {gateway}{path}` with `body`, labelled `content_type` (none when
/// `None`), and `headers`.
pub async fn post(
    http: &reqwest::Client,
    gateway: &Gateway,
    path: &str,
    content_type: Option<&str>,
    headers: &[(String, String)],
    body: impl Into<reqwest::Body>,
) -> Exchange {
    let mut request = http.post(format!("{}{path}", gateway.url())).body(body);
    if let Some(content_type) = content_type {
        request = request.header(reqwest::header::CONTENT_TYPE, content_type);
    }
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    exchange(gateway, path, request).await
}

/// `GET {gateway}{path_and_query}` with `headers`.
pub async fn get(
    http: &reqwest::Client,
    gateway: &Gateway,
    path_and_query: &str,
    headers: &[(String, String)],
) -> Exchange {
    let mut request = http.get(format!("{}{path_and_query}", gateway.url()));
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    exchange(gateway, path_and_query, request).await
}

async fn exchange(gateway: &Gateway, what: &str, request: reqwest::RequestBuilder) -> Exchange {
    let attempt = async {
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok::<_, reqwest::Error>(Exchange {
            status,
            text: response.text().await?,
        })
    };
    within(REQUEST_TIMEOUT, what, attempt)
        .await
        .unwrap_or_else(|err| panic!("{what}: {err}; gateway output:\n{}", gateway.output()))
}

/// `POST /graphql` of a JSON `body` with `headers`: the JSON answer.
pub async fn graphql_as(
    http: &reqwest::Client,
    gateway: &Gateway,
    headers: &[(String, String)],
    body: &Value,
) -> Value {
    post(
        http,
        gateway,
        "/graphql",
        Some("application/json"),
        headers,
        body.to_string(),
    )
    .await
    .json()
}

/// Every `extensions.code` of an answer's errors, in order.
pub fn codes(answer: &Value) -> Vec<String> {
    answer["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| {
                    e["extensions"]["code"]
                        .as_str()
                        .unwrap_or("<none>")
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Fails the test unless `answer` is refused with exactly `code` and carries
/// no `aggregate` data (so no `cache.status` either).
pub fn assert_refused(answer: &Value, code: &str, what: &str) {
    assert_eq!(codes(answer), [code], "{what}: {answer}");
    assert!(
        answer["data"].is_null() || answer["data"]["aggregate"].is_null(),
        "{what}: a refused request carries data: {answer}"
    );
    assert!(
        !answer.to_string().contains("\"status\""),
        "{what}: a refused request carries a cache status: {answer}"
    );
}

/// Fails the test unless the gateway still answers `/healthz` with 200.
pub async fn assert_alive(gateway: &Gateway, after: &str) {
    let health = gateway.get("/healthz").await;
    assert_eq!(
        health.status().as_u16(),
        200,
        "after {after}; gateway output:\n{}",
        gateway.output()
    );
}

/// The `VmRSS` and `VmHWM` (peak) lines of `/proc/<pid>/status`, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|err| panic!("cannot read /proc/{pid}/status: {err}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A temporary file that is removed when dropped.
pub struct TempFile {
    pub path: std::path::PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("ag-{}-{name}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, contents)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
        TempFile { path }
    }

    pub fn path_str(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
