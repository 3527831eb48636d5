//! The HTTP client for a Cube-compatible REST API.
//!
//! One [`BiClient::load`] is one logical BI call: it sends one `POST /load`
//! (a single query, or a data-blending batch), re-sends it while the BI answers
//! "Continue wait", waits out a 429's `Retry-After` when the deadline allows,
//! and gives back one row list per query, in order. Each HTTP request is its
//! own `bi.call` span.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Serialize;
use tokio::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

use super::protocol::{CONTINUE_WAIT, CubeQuery, LoadResponse, MetaResponse, Row};
use super::tokens::{MintSettings, TokenMinter, TokenScope};
use crate::telemetry::names;

/// How the client talks to the BI.
#[derive(Debug, Clone)]
pub struct BiSettings {
    /// Base URL without a trailing slash, like `http://cube:4000/cubejs-api/v1`.
    pub base_url: String,
    pub token: Option<String>,
    /// Set with `BI_API_SECRET`: tokens are minted per customer, and
    /// `token` is not used.
    pub minting: Option<MintSettings>,
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub continue_wait_delay: Duration,
}

/// Why a BI call produced no rows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BiError {
    /// The BI refused the query: its own words, safe to show (a 4xx, or an
    /// `error` body that is not "Continue wait").
    #[error("the BI rejected the query (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    /// The BI failed on its side (a 5xx other than those of `Unavailable`).
    /// Its body can hold SQL or secrets, so it is never part of the error.
    #[error("the BI failed with HTTP {status}")]
    Failed { status: u16 },
    /// The BI, or a proxy or load balancer in front of it, cannot serve now
    /// (502, 503, 504). Nothing is wrong with the queries; as for `Failed`, the
    /// body is never part of the error.
    #[error("the BI is unavailable (HTTP {status})")]
    Unavailable { status: u16 },
    /// The BI answered, but not in a shape this gateway understands.
    #[error("the BI sent an answer the gateway cannot read: {0}")]
    BadResponse(String),
    /// 429, and waiting for `Retry-After` would pass the deadline.
    #[error("the BI is rate limiting the gateway")]
    RateLimited { retry_after: Option<Duration> },
    /// No HTTP answer at all. The reason names the kind of failure only
    /// ("connection refused", "timed out"), never the BI's address: clients
    /// read it, and the BI's URL is internal. The full error is logged.
    #[error("the BI could not be reached: {0}")]
    Unreachable(String),
    /// No data before the deadline (slow answers or Continue-wait rounds).
    #[error("the BI did not answer within {0:?}")]
    Timeout(Duration),
}

impl BiError {
    /// Whether a failed batch is worth re-sending as single queries: only
    /// when the BI judged the queries (one bad panel fails a whole batch), not
    /// when it is down, slow or rate limiting, where N retries would only make
    /// things worse (a batch of 50 to a BI that is down would become 51
    /// requests). Exhaustive, so that a new kind of failure is decided here.
    pub fn is_about_the_queries(&self) -> bool {
        match self {
            // 401 and 403 refuse the request's credentials (a token that is
            // expired, or signed with another secret): asking again with the
            // same token, query by query, would be refused as many times.
            BiError::Rejected {
                status: 401 | 403, ..
            } => false,
            BiError::Rejected { .. } | BiError::Failed { .. } | BiError::BadResponse(_) => true,
            BiError::Unavailable { .. }
            | BiError::RateLimited { .. }
            | BiError::Unreachable(_)
            | BiError::Timeout(_) => false,
        }
    }

    /// A stable, low-cardinality name for metrics and spans.
    pub fn kind(&self) -> &'static str {
        match self {
            BiError::Rejected { .. } => "rejected",
            BiError::Failed { .. } => "server_error",
            BiError::Unavailable { .. } => "unavailable",
            BiError::BadResponse(_) => "bad_response",
            BiError::RateLimited { .. } => "rate_limited",
            BiError::Unreachable(_) => "unreachable",
            BiError::Timeout(_) => "timeout",
        }
    }
}

/// The rows of a successful BI call, one list per query, and which call it was.
#[derive(Debug, Clone)]
pub struct BiAnswer {
    pub rows: Vec<Vec<Row>>,
    /// The `bi.call` span that got the answer, when spans are exported.
    pub call: Option<CallRef>,
}

/// Hex ids of one exported `bi.call` span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRef {
    pub trace_id: String,
    pub span_id: String,
}

/// A cheap handle on one pooled HTTP client.
#[derive(Clone)]
pub struct BiClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    load_url: String,
    meta_url: String,
    token: Option<HeaderValue>,
    minter: Option<TokenMinter>,
    /// Host and port of the BI, for the semantic-convention span attributes.
    server_address: String,
    server_port: i64,
    timeout: Duration,
    continue_wait_delay: Duration,
}

/// What one HTTP request to `/load` came to.
enum Attempt {
    Answered(LoadResponse),
    ContinueWait,
    RateLimited(Option<Duration>),
    ConnectFailed(String),
    Failed(BiError),
}

/// Connection failures (nothing was sent) are retried this often, quickly:
/// they are usually a restarting BI or a connection closed under us.
const CONNECT_RETRIES: u32 = 2;
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Longest BI error text passed on to users.
const MAX_MESSAGE_CHARS: usize = 500;

#[derive(Serialize)]
struct SingleBody<'a> {
    query: &'a CubeQuery,
}

#[derive(Serialize)]
struct MultiBody<'a> {
    #[serde(rename = "queryType")]
    query_type: &'static str,
    query: Vec<&'a CubeQuery>,
}

impl BiClient {
    pub fn new(settings: BiSettings) -> Result<BiClient, BiError> {
        let token = settings
            .token
            .as_deref()
            .map(|token| {
                let mut value = HeaderValue::from_str(token).map_err(|_| {
                    BiError::BadResponse("BI_TOKEN is not a valid header value".into())
                })?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let minter = settings
            .minting
            .as_ref()
            .map(TokenMinter::new)
            .transpose()
            .map_err(|err| BiError::Unreachable(err.to_string()))?;
        let http = reqwest::Client::builder()
            // Cube closes idle keep-alive connections after 5 s; closing ours
            // first avoids sending a request down a connection being closed.
            .pool_idle_timeout(settings.pool_idle_timeout)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|err| BiError::Unreachable(err.to_string()))?;
        let url = reqwest::Url::parse(&settings.base_url)
            .map_err(|err| BiError::Unreachable(format!("BI_URL is not a URL: {err}")))?;
        Ok(BiClient {
            inner: Arc::new(Inner {
                http,
                server_address: url.host_str().unwrap_or_default().to_owned(),
                server_port: url.port_or_known_default().map_or(0, i64::from),
                load_url: format!("{}/load", settings.base_url),
                meta_url: format!("{}/meta", settings.base_url),
                token,
                minter,
                timeout: settings.timeout,
                continue_wait_delay: settings.continue_wait_delay,
            }),
        })
    }

    /// Sends `queries` as one BI call (a batch when there are several; the
    /// caller keeps a batch within Cube's blending rules, and of one token
    /// `scope`) and returns their rows in order. Batched rows lose the
    /// `time.<granularity>` key that Cube adds only to batches, so rows never
    /// depend on how they were fetched.
    pub async fn load(
        &self,
        scope: &TokenScope,
        queries: &[&CubeQuery],
    ) -> Result<BiAnswer, BiError> {
        let result = self.load_inner(scope, queries).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(names::BI_QUERIES, "outcome" => outcome).increment(queries.len() as u64);
        result
    }

    async fn load_inner(
        &self,
        scope: &TokenScope,
        queries: &[&CubeQuery],
    ) -> Result<BiAnswer, BiError> {
        let body = match queries {
            [] => {
                return Ok(BiAnswer {
                    rows: Vec::new(),
                    call: None,
                });
            }
            [single] => serde_json::to_vec(&SingleBody { query: single }),
            many => serde_json::to_vec(&MultiBody {
                query_type: "multi",
                query: many.to_vec(),
            }),
        }
        .map_err(|err| BiError::BadResponse(err.to_string()))?;
        let body = bytes::Bytes::from(body);
        // Once per call: a kept token has more than one call's deadline left.
        let authorization = self.authorization(scope)?;
        let deadline = Instant::now() + self.inner.timeout;
        let members = describe_members(queries);
        let date_ranges = describe_date_ranges(queries);

        let mut connect_failures = 0;
        for round in 1.. {
            let span = tracing::info_span!(
                "bi.call",
                otel.kind = "client",
                http.request.method = "POST",
                url.full = %self.inner.load_url,
                http.response.status_code = Empty,
                bi.query_count = queries.len() as i64,
                server.address = %self.inner.server_address,
                server.port = self.inner.server_port,
                bi.members = %members,
                bi.date_ranges = %date_ranges,
                bi.round = round,
                bi.response_bytes = Empty,
                error.type = Empty,
                otel.status_code = Empty,
            );
            let attempt = self
                .send_load(body.clone(), authorization.as_ref(), deadline)
                .instrument(span.clone())
                .await;
            match attempt {
                Attempt::Answered(response) => {
                    return Ok(BiAnswer {
                        rows: split_answer(response, queries)?,
                        call: crate::telemetry::span_ids(&span)
                            .map(|(trace_id, span_id)| CallRef { trace_id, span_id }),
                    });
                }
                Attempt::ContinueWait => {
                    if Instant::now() + self.inner.continue_wait_delay >= deadline {
                        return Err(BiError::Timeout(self.inner.timeout));
                    }
                    tokio::time::sleep(self.inner.continue_wait_delay).await;
                }
                Attempt::RateLimited(retry_after) => {
                    let pause = retry_after.unwrap_or(Duration::from_secs(1));
                    if Instant::now() + pause >= deadline {
                        return Err(BiError::RateLimited { retry_after });
                    }
                    tokio::time::sleep(pause).await;
                }
                Attempt::ConnectFailed(reason) => {
                    connect_failures += 1;
                    if connect_failures > CONNECT_RETRIES
                        || Instant::now() + CONNECT_RETRY_PAUSE >= deadline
                    {
                        return Err(BiError::Unreachable(reason));
                    }
                    tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                }
                Attempt::Failed(err) => return Err(err),
            }
        }
        unreachable!("the round counter never ends")
    }

    /// One HTTP request to `/load`, recorded on the current `bi.call` span.
    async fn send_load(
        &self,
        body: bytes::Bytes,
        authorization: Option<&HeaderValue>,
        deadline: Instant,
    ) -> Attempt {
        let started = std::time::Instant::now();
        let attempt = self.send_load_untimed(body, authorization, deadline).await;
        let outcome = match &attempt {
            Attempt::Answered(_) => "ok",
            Attempt::ContinueWait => "continue_wait",
            Attempt::RateLimited(_) => "rate_limited",
            Attempt::ConnectFailed(_) => "unreachable",
            Attempt::Failed(err) => err.kind(),
        };
        if outcome != "ok" && outcome != "continue_wait" {
            let span = tracing::Span::current();
            span.record("error.type", outcome);
            span.record("otel.status_code", "error");
        }
        metrics::counter!(names::BI_HTTP_REQUESTS, "outcome" => outcome).increment(1);
        metrics::histogram!(names::BI_HTTP_DURATION, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        attempt
    }

    async fn send_load_untimed(
        &self,
        body: bytes::Bytes,
        authorization: Option<&HeaderValue>,
        deadline: Instant,
    ) -> Attempt {
        let span = tracing::Span::current();
        let mut headers = reqwest::header::HeaderMap::new();
        // A BI that traces joins this trace: its work appears under `bi.call`.
        crate::telemetry::inject_trace(&mut headers);
        if let Some(authorization) = authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        let request = self
            .inner
            .http
            .post(&self.inner.load_url)
            .headers(headers)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let timed_out = || Attempt::Failed(BiError::Timeout(self.inner.timeout));
        let response = match tokio::time::timeout_at(deadline, request.send()).await {
            Err(_) => return timed_out(),
            Ok(Err(err)) if err.is_connect() => return Attempt::ConnectFailed(failure(&err)),
            Ok(Err(err)) => return Attempt::Failed(BiError::Unreachable(failure(&err))),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        span.record("http.response.status_code", i64::from(status.as_u16()));
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = match tokio::time::timeout_at(deadline, response.bytes()).await {
            Err(_) => return timed_out(),
            Ok(Err(err)) => return Attempt::Failed(BiError::Unreachable(failure(&err))),
            Ok(Ok(bytes)) => bytes,
        };
        span.record("bi.response_bytes", bytes.len() as i64);

        if status == StatusCode::TOO_MANY_REQUESTS {
            return Attempt::RateLimited(retry_after);
        }
        if status.is_server_error() {
            // Never the body itself, anywhere: 5xx bodies can carry SQL and credentials.
            tracing::warn!(
                status = status.as_u16(),
                body_bytes = bytes.len(),
                "the BI failed on its side; see the BI's own logs for why"
            );
            return Attempt::Failed(server_error(status));
        }
        let parsed: Result<LoadResponse, _> = serde_json::from_slice(&bytes);
        match parsed {
            Ok(LoadResponse {
                error: Some(error), ..
            }) => {
                if status.is_success() && error == CONTINUE_WAIT {
                    Attempt::ContinueWait
                } else {
                    Attempt::Failed(BiError::Rejected {
                        status: status.as_u16(),
                        message: truncate(&error),
                    })
                }
            }
            Ok(_) if !status.is_success() => Attempt::Failed(BiError::Rejected {
                status: status.as_u16(),
                message: format!("HTTP {status}"),
            }),
            Ok(response) => Attempt::Answered(response),
            Err(_) if !status.is_success() => Attempt::Failed(BiError::Rejected {
                status: status.as_u16(),
                message: truncate(&String::from_utf8_lossy(&bytes)),
            }),
            Err(err) => Attempt::Failed(BiError::BadResponse(err.to_string())),
        }
    }

    /// `GET /meta`: the BI's cubes and members.
    pub async fn meta(&self) -> Result<MetaResponse, BiError> {
        self.meta_within(self.inner.timeout).await
    }

    /// `GET /meta`, given up after `within`.
    pub async fn meta_within(&self, within: Duration) -> Result<MetaResponse, BiError> {
        let response = self
            .authorized(self.inner.http.get(&self.inner.meta_url))?
            .timeout(within)
            .send()
            .await
            .map_err(|err| BiError::Unreachable(failure(&err)))?;
        let status = response.status();
        if is_unavailability(status) {
            return Err(BiError::Unavailable {
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(BiError::Rejected {
                status: status.as_u16(),
                message: format!("GET /meta answered HTTP {status}"),
            });
        }
        response
            .json()
            .await
            .map_err(|err| BiError::BadResponse(describe(&err.without_url())))
    }

    /// Whether the BI answers `GET /meta` within `within`: the readiness probe.
    pub async fn is_reachable(&self, within: Duration) -> bool {
        let Ok(request) =
            self.authorized(self.inner.http.get(&self.inner.meta_url).timeout(within))
        else {
            return false;
        };
        matches!(request.send().await, Ok(response) if response.status().is_success())
    }

    /// The gateway's own credentials on a request that is no customer's.
    fn authorized(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, BiError> {
        Ok(match self.authorization(&TokenScope::Shared)? {
            Some(value) => request.header(AUTHORIZATION, value),
            None => request,
        })
    }

    /// The `Authorization` value for `scope`: a minted token when
    /// `BI_API_SECRET` is set, else `BI_TOKEN` verbatim (or none).
    fn authorization(&self, scope: &TokenScope) -> Result<Option<HeaderValue>, BiError> {
        match &self.inner.minter {
            Some(minter) => minter
                .header(scope)
                .map(Some)
                .map_err(|err| BiError::Unreachable(err.to_string())),
            None => Ok(self.inner.token.clone()),
        }
    }
}

/// Matches a BI answer to its queries, by position.
fn split_answer(response: LoadResponse, queries: &[&CubeQuery]) -> Result<Vec<Vec<Row>>, BiError> {
    if queries.len() == 1 {
        return response
            .data
            .map(|rows| vec![rows])
            .ok_or_else(|| BiError::BadResponse("no `data` in the answer".into()));
    }
    let results = response
        .results
        .ok_or_else(|| BiError::BadResponse("no `results` in a batch answer".into()))?;
    if results.len() != queries.len() {
        return Err(BiError::BadResponse(format!(
            "{} results for {} queries",
            results.len(),
            queries.len()
        )));
    }
    Ok(results
        .into_iter()
        .zip(queries)
        .map(|(result, query)| {
            let mut rows = result.data;
            if let Some(granularity) = query.granularity() {
                let blending_key = format!("time.{granularity}");
                for row in &mut rows {
                    row.remove(&blending_key);
                }
            }
            rows
        })
        .collect())
}

/// 502, 503 and 504 say the BI (or what stands in front of it) cannot serve
/// now, whatever was asked.
fn is_unavailability(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// The error of a 5xx answer: unavailability, or a failure of the BI's own.
fn server_error(status: StatusCode) -> BiError {
    let status_code = status.as_u16();
    if is_unavailability(status) {
        BiError::Unavailable {
            status: status_code,
        }
    } else {
        BiError::Failed {
            status: status_code,
        }
    }
}

/// Why a request got no HTTP answer, in words a client may read. reqwest's
/// own text names the BI's URL, an internal address: that full text goes to
/// the log, and the error keeps only the kind of failure.
fn failure(err: &reqwest::Error) -> String {
    tracing::warn!(error = %describe(err), "a request to the BI got no answer");
    reason(err).to_owned()
}

/// The kind of a transport failure, as a fixed phrase: nothing of the error's
/// own text (addresses, host names) can pass through.
fn reason(err: &reqwest::Error) -> &'static str {
    use std::io::ErrorKind;
    if err.is_timeout() {
        return "timed out";
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => return "connection refused",
                ErrorKind::ConnectionReset => return "connection reset",
                ErrorKind::ConnectionAborted => return "connection aborted",
                ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => {
                    return "connection closed by the BI";
                }
                ErrorKind::TimedOut => return "timed out",
                ErrorKind::HostUnreachable => return "host unreachable",
                ErrorKind::NetworkUnreachable => return "network unreachable",
                _ => {}
            }
        }
        // hyper-util's and hyper's messages for these are fixed texts.
        let text = cause.to_string();
        if text == "dns error" {
            return "the BI's host name could not be resolved";
        }
        if text.contains("connection closed before message completed") {
            return "connection closed by the BI before it answered";
        }
        source = cause.source();
    }
    if err.is_connect() {
        "could not connect"
    } else if err.is_body() || err.is_decode() {
        "the answer could not be read"
    } else {
        "the request failed"
    }
}

/// The whole error chain, for the log.
fn describe(err: &reqwest::Error) -> String {
    // reqwest's Display omits the cause ("error sending request"); the chain says why.
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    truncate(&text)
}

fn truncate(text: &str) -> String {
    let mut cut: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

fn describe_members(queries: &[&CubeQuery]) -> String {
    let mut members: Vec<&str> = queries
        .iter()
        .flat_map(|q| q.measures.iter().chain(&q.dimensions).map(String::as_str))
        .collect();
    members.sort_unstable();
    members.dedup();
    members.join(",")
}

fn describe_date_ranges(queries: &[&CubeQuery]) -> String {
    let mut ranges: Vec<String> = queries
        .iter()
        .flat_map(|q| &q.time_dimensions)
        .filter_map(|td| td.date_range.as_ref())
        .map(|[from, to]| format!("{from}..{to}"))
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    ranges.join(",")
}
