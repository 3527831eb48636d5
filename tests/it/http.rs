//! The HTTP surface: probes, metrics, GraphiQL, GET queries, cache sharing
//! across member order, and graceful shutdown.

use std::time::Duration;

use analytics_gateway::telemetry::names;
use serde_json::Value;

use crate::common::{TestEnv, TestOptions, expected_rows, metric, panel, wait_until, within};

/// `/healthz` answers 200, and `/readyz` 200 with the BI reported up (once
/// its first background probe is in).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_readiness() {
    let env = TestEnv::start(TestOptions::default()).await;

    let health = env.gateway().get("/healthz").await;
    assert_eq!(health.status().as_u16(), 200);

    wait_until(
        Duration::from_secs(20),
        "the BI probe to say up",
        || async {
            let (status, body) = env.gateway().readyz().await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["status"], "ready", "{body}");
            body["bi"] == "up"
        },
    )
    .await;
}

/// `/metrics` is Prometheus text that accounts for a stampede exactly: one
/// BI query, one miss and N-1 coalesced lookups.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_account_for_a_stampede() {
    const N: usize = 20;
    let env = TestEnv::start(TestOptions::default().latency_ms(500)).await;
    let body = panel(
        "acme",
        "2025-01-01",
        "2025-01-07",
        &["Sales.orders"],
        &[],
        Some("DAY"),
    );

    let answers = env.fire(N, &body).await;
    for answer in &answers {
        assert!(answer.get("errors").is_none(), "{answer}");
    }

    let response = env.gateway().get("/metrics").await;
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.expect("a text body");
    assert!(
        text.contains(&format!("# TYPE {} counter", names::CACHE_LOOKUPS)),
        "{text}"
    );
    let value = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels).unwrap_or(0.0);
    assert_eq!(
        value(names::BI_QUERIES, &[("outcome", "ok")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(names::CACHE_LOOKUPS, &[("status", "miss")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(names::CACHE_LOOKUPS, &[("status", "coalesced")]),
        (N - 1) as f64,
        "{text}"
    );
    assert_eq!(env.sim.stats().queries, 1);
}

/// Answers served from the cache count as hits in `/metrics`, like every
/// other answer: a panel asked three times is one miss and two hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_cache_hits() {
    let env = TestEnv::start(TestOptions::default()).await;
    let body = panel(
        "acme",
        "2025-01-01",
        "2025-01-07",
        &["Sales.orders"],
        &[],
        Some("DAY"),
    );

    let mut statuses = Vec::new();
    for _ in 0..3 {
        let answer = env.gateway().graphql(&body).await;
        statuses.push(answer["data"]["aggregate"]["cache"]["status"].clone());
    }
    assert_eq!(statuses, ["MISS", "HIT", "HIT"]);

    let text = env
        .gateway()
        .get("/metrics")
        .await
        .text()
        .await
        .expect("a text body");
    let value =
        |status: &str| metric(&text, names::CACHE_LOOKUPS, &[("status", status)]).unwrap_or(0.0);
    assert_eq!((value("miss"), value("hit")), (1.0, 2.0), "{text}");
}

/// The `operation` label of `/metrics` is the operation the document names
/// (`query Panel { ... }` is `Panel`) when the body has no `operationName`,
/// and the body's `operationName` when it has one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operation_label_is_named_by_the_document() {
    let env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    let body = panel(
        "acme",
        "2025-01-01",
        "2025-01-07",
        &["Sales.orders"],
        &[],
        Some("DAY"),
    );
    assert!(body.get("operationName").is_none(), "{body}");
    let answer = env.gateway().graphql(&body).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    let named = serde_json::json!({
        "query": "query A { __typename } query B { __typename }",
        "operationName": "B",
    });
    let answer = env.gateway().graphql(&named).await;
    assert!(answer.get("errors").is_none(), "{answer}");

    let text = env
        .gateway()
        .get("/metrics")
        .await
        .text()
        .await
        .expect("a text body");
    let count = format!("{}_count", names::GRAPHQL_DURATION);
    let calls = |operation: &str| metric(&text, &count, &[("operation", operation)]);
    assert_eq!(calls("Panel"), Some(1.0), "{text}");
    assert_eq!(calls("B"), Some(1.0), "{text}");
    assert_eq!(calls("anonymous"), None, "{text}");
}

/// A `BI_URL` without the `/v1` of Cube's REST API is warned about at start
/// (naming the variable), not refused: behind a path-rewriting proxy it may
/// be right, and bi-sim, like such a proxy, answers under any prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bi_url_without_v1_is_warned_about_at_start() {
    let sim = crate::common::Sim::start(Duration::from_millis(10)).await;
    let without_v1 = sim.base_url().trim_end_matches("/v1").to_owned();
    let env = TestEnv::start(TestOptions::default().env("BI_URL", &without_v1)).await;
    let output = env.gateway().output();
    assert!(
        output
            .lines()
            .any(|line| line.contains("WARN") && line.contains("BI_URL") && line.contains("/v1")),
        "{output}"
    );
    let answer = env
        .gateway()
        .graphql(&panel(
            "acme",
            "2025-01-01",
            "2025-01-02",
            &["Sales.orders"],
            &[],
            None,
        ))
        .await;
    assert!(answer.get("errors").is_none(), "{answer}");
    assert_eq!(sim.stats().queries, 1);

    let quiet = TestEnv::start(TestOptions::default()).await;
    assert!(!quiet.gateway().output().contains("does not end in /v1"));
}

/// `GET /graphql` serves GraphiQL to browsers and executes queries otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_graphql_serves_graphiql_and_queries() {
    let env = TestEnv::start(TestOptions::default()).await;

    let page = env
        .gateway()
        .get_with("/graphql", &[("accept", "text/html")])
        .await;
    assert_eq!(page.status().as_u16(), 200);
    let content_type = page
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let html = page.text().await.expect("an HTML body");
    assert!(html.to_lowercase().contains("graphiql"), "{html}");

    let mut url = reqwest::Url::parse("http://gateway/graphql").expect("a URL");
    url.query_pairs_mut()
        .append_pair("query", "{catalog{cubes{name}}}");
    let path = format!("/graphql?{}", url.query().unwrap_or_default());
    let response = env.gateway().get(&path).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.expect("a JSON answer");
    assert_eq!(
        answer["data"]["catalog"]["cubes"][0]["name"], "Sales",
        "{answer}"
    );
}

/// Requests that differ only in member order ask the same question: they
/// share one cache entry (same key, the second is a HIT, one BI query).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_order_shares_one_cache_entry() {
    let env = TestEnv::start(TestOptions::default()).await;
    let first = panel(
        "acme",
        "2025-01-01",
        "2025-01-31",
        &["Sales.revenue", "Sales.orders"],
        &["Sales.region", "Sales.product"],
        Some("MONTH"),
    );
    let second = panel(
        "acme",
        "2025-01-01",
        "2025-01-31",
        &["Sales.orders", "Sales.revenue"],
        &["Sales.product", "Sales.region"],
        Some("MONTH"),
    );

    let a = env.gateway().graphql(&first).await;
    let b = env.gateway().graphql(&second).await;

    assert_eq!(a["data"]["aggregate"]["cache"]["status"], "MISS", "{a}");
    assert_eq!(b["data"]["aggregate"]["cache"]["status"], "HIT", "{b}");
    assert_eq!(
        a["data"]["aggregate"]["cache"]["key"],
        b["data"]["aggregate"]["cache"]["key"]
    );
    let sorted = |answer: &Value| {
        let mut rows: Vec<String> = answer["data"]["aggregate"]["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(Value::to_string)
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(sorted(&a), sorted(&b));
    let expected = expected_rows(
        "acme",
        "2025-01-01",
        "2025-01-31",
        &["Sales.orders", "Sales.revenue"],
        &["Sales.product", "Sales.region"],
        Some("MONTH"),
    );
    assert_eq!(a["data"]["aggregate"]["rows"], expected);
    assert_eq!(env.sim.stats().queries, 1);
}

/// SIGTERM lets a request in flight finish with its rows, then the process
/// exits with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_requests_in_flight() {
    let mut env = TestEnv::start(TestOptions::default().latency_ms(1_000)).await;
    let body = panel(
        "acme",
        "2025-01-01",
        "2025-01-31",
        &["Sales.revenue"],
        &[],
        Some("DAY"),
    );
    let expected = expected_rows(
        "acme",
        "2025-01-01",
        "2025-01-31",
        &["Sales.revenue"],
        &[],
        Some("DAY"),
    );

    let in_flight = {
        let url = format!("{}/graphql", env.gateway().url());
        let body = body.clone();
        tokio::spawn(async move {
            let response = reqwest::Client::new().post(url).json(&body).send().await?;
            response.json::<Value>().await
        })
    };
    wait_until(
        Duration::from_secs(20),
        "the request to reach the BI",
        || async { env.sim.stats().http_requests >= 1 },
    )
    .await;
    let pid = env.gateway().pid().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("`kill` runs");
    assert!(status.success());

    let answer = within(Duration::from_secs(30), "the in-flight answer", in_flight)
        .await
        .expect("the request task does not panic")
        .expect("the in-flight request is answered");
    assert!(answer.get("errors").is_none(), "{answer}");
    assert_eq!(answer["data"]["aggregate"]["rows"], expected);

    let gateway = &mut env.gateways[0];
    let exit = gateway.wait_for_exit(Duration::from_secs(20)).await;
    assert!(
        exit.success(),
        "exit status {exit:?}; output:\n{}",
        gateway.output()
    );
}
