//! What users see when the BI is slow, failing, unreachable or rate limiting.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    TestEnv, TestOptions, dashboard, error_code, expected_rows, expected_rows_for, input, panel,
};

const MEASURES: &[&str] = &["Sales.revenue"];

fn body() -> Value {
    panel(
        "acme",
        "2025-02-01",
        "2025-02-14",
        MEASURES,
        &["Sales.region"],
        Some("DAY"),
    )
}

fn rows() -> Value {
    expected_rows(
        "acme",
        "2025-02-01",
        "2025-02-14",
        MEASURES,
        &["Sales.region"],
        Some("DAY"),
    )
}

/// "Continue wait" is a retry state, not an error: after three of them the
/// fourth BI request brings the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continue_wait_is_retried_until_data_comes() {
    let env = TestEnv::start(TestOptions::default().latency_ms(200)).await;
    env.sim.faults(json!({"continueWait": 3})).await;

    let answer = env.gateway().graphql(&body()).await;

    assert!(answer.get("errors").is_none(), "{answer}");
    assert_eq!(answer["data"]["aggregate"]["rows"], rows());
    assert_eq!(answer["data"]["aggregate"]["cache"]["status"], "MISS");
    let stats = env.sim.stats();
    assert_eq!((stats.http_requests, stats.queries), (4, 4), "{stats:?}");
}

/// A BI 500 under 20 concurrent identical requests is one BI query whose
/// error every request shares as `BI_ERROR`, without the BI's body (which can
/// hold SQL or secrets); once the negative-cache time has passed, the same
/// question is asked again and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bi_500_is_shared_hidden_and_forgotten() {
    const SECRET: &str = "SELECT password_hash FROM internal_users";
    let env = TestEnv::start(TestOptions::default().env("NEGATIVE_CACHE_SECS", 1)).await;
    let fault_body = json!({"error": SECRET}).to_string();
    env.sim
        .faults(json!({"failNext": {"count": 1, "status": 500, "body": fault_body}}))
        .await;

    let answers = env.fire(20, &body()).await;

    for answer in &answers {
        assert_eq!(error_code(answer), Some("BI_ERROR"), "{answer}");
        assert!(
            !answer.to_string().contains("password_hash"),
            "the 500 body leaked: {answer}"
        );
    }
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let answer = env.gateway().graphql(&body()).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    assert_eq!(answer["data"]["aggregate"]["rows"], rows());
    assert_eq!(env.sim.stats().queries, 2);
}

/// When the BI fails a batch, each of its panels is asked again alone, so all
/// three panels still get their rows: one batch request, then three singles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_batch_is_retried_panel_by_panel() {
    let env = TestEnv::start(TestOptions::default()).await;
    env.sim.faults(json!({"failNext": {"count": 1}})).await;
    let panels: Vec<Value> = ["acme", "globex", "initech"]
        .iter()
        .map(|customer| {
            input(
                customer,
                "2025-02-01",
                "2025-02-07",
                MEASURES,
                &[],
                Some("DAY"),
            )
        })
        .collect();

    let answer = env.gateway().graphql(&dashboard(&panels)).await;

    assert!(answer.get("errors").is_none(), "{answer}");
    for (i, panel) in panels.iter().enumerate() {
        assert_eq!(
            answer["data"][format!("p{i}")]["rows"],
            expected_rows_for(panel),
            "p{i}"
        );
    }
    let stats = env.sim.stats();
    assert_eq!(
        (stats.http_requests, stats.queries, stats.max_batch_size),
        (4, 6, 3),
        "{stats:?}"
    );
}

/// Three panels of one granularity in one document, a batch, for `customer`.
fn three_panels(customer: &str) -> Vec<Value> {
    ["2025-03-01", "2025-03-08", "2025-03-15"]
        .iter()
        .map(|from| input(customer, from, "2025-03-21", MEASURES, &[], Some("DAY")))
        .collect()
}

/// A 502, 503 or 504 on a batch of 3 panels says the BI is unavailable, not
/// that a query is bad: exactly one BI request (no panel is asked again
/// alone), and all 3 panels answer `BI_UNAVAILABLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unavailable_bi_fails_a_batch_once_without_asking_each_panel() {
    let env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    for status in [503, 502, 504] {
        env.sim.reset().await;
        env.sim
            .faults(json!({"failNext": {"count": 1, "status": status}}))
            .await;
        // Another customer per status: no answer or error is cached yet.
        let panels = three_panels(&format!("unavailable-{status}"));

        let answer = env.gateway().graphql(&dashboard(&panels)).await;

        let codes: Vec<&str> = answer["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|e| e["extensions"]["code"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(codes, ["BI_UNAVAILABLE"; 3], "HTTP {status}: {answer}");
        let stats = env.sim.stats();
        assert_eq!(
            (stats.http_requests, stats.queries, stats.max_batch_size),
            (1, 3, 3),
            "HTTP {status}: one batch request, no single retries: {stats:?}"
        );
    }
}

/// The words of `answer`'s error messages, each checked against what must
/// never reach a client: the BI's URL, its address, its `/load` path.
fn assert_no_bi_address(answer: &Value, address: &str, what: &str) {
    let errors = answer["errors"].as_array().cloned().unwrap_or_default();
    assert!(!errors.is_empty(), "{what}: {answer}");
    let port = address.rsplit(':').next().unwrap_or(address);
    for error in &errors {
        let message = error["message"].as_str().unwrap_or_default();
        for forbidden in [address, "http://", "/load", "/meta", "cubejs-api", port] {
            assert!(
                !message.contains(forbidden),
                "{what}: a client reads `{forbidden}` in {message:?}"
            );
        }
    }
    assert!(
        !answer.to_string().contains(address),
        "{what}: the BI's address is in the answer: {answer}"
    );
}

/// With `BI_URL` on a closed port, `aggregate` and `catalog` errors name the
/// failure ("connection refused") but never the BI's URL, host:port or
/// `/load`; the gateway's log has the full detail, URL included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bi_unavailable_messages_never_show_the_bi_address() {
    let address = format!("127.0.0.1:{}", crate::common::closed_port());
    let env = TestEnv::start(
        TestOptions::default().env("BI_URL", format!("http://{address}/cubejs-api/v1")),
    )
    .await;

    let aggregate = env.gateway().graphql(&body()).await;
    let catalog = env
        .gateway()
        .graphql(&json!({"query": "{ catalog { cubes { name } } }"}))
        .await;

    for (what, answer) in [("aggregate", &aggregate), ("catalog", &catalog)] {
        assert_eq!(
            error_code(answer),
            Some("BI_UNAVAILABLE"),
            "{what}: {answer}"
        );
        assert_no_bi_address(answer, &address, what);
        let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("connection refused"),
            "{what}: the message names the failure: {message:?}"
        );
    }
    let logs = env.gateway().output();
    assert!(
        logs.contains(&format!("http://{address}/cubejs-api/v1/load")),
        "operators find the URL in the log:\n{logs}"
    );
}

/// A BI nobody listens on is `BI_UNAVAILABLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_bi_is_bi_unavailable() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("an address")
    };
    let env = TestEnv::start(
        TestOptions::default().env("BI_URL", format!("http://{closed}/cubejs-api/v1")),
    )
    .await;

    let answer = env.gateway().graphql(&body()).await;

    assert_eq!(error_code(&answer), Some("BI_UNAVAILABLE"), "{answer}");
    assert_eq!(answer["data"], Value::Null, "{answer}");
}

/// A 429 whose Retry-After is past the gateway's deadline is `RATE_LIMITED`,
/// and tells the client when to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_rate_limit_is_rate_limited_with_retry_after() {
    let env = TestEnv::start(TestOptions::default().env("BI_TIMEOUT_SECS", 1)).await;
    env.sim
        .faults(json!({"rateLimit": {"count": 1, "retryAfterSecs": 30}}))
        .await;

    let answer = env.gateway().graphql(&body()).await;

    assert_eq!(error_code(&answer), Some("RATE_LIMITED"), "{answer}");
    assert_eq!(
        answer["errors"][0]["extensions"]["retryAfter"], 30,
        "{answer}"
    );
    assert_eq!(env.sim.stats().http_requests, 1);
}
