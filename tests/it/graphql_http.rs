//! GraphQL over HTTP, by the spec: graphql-http's server audit (Node, its
//! packages pinned in `tests/graphql-http-audit/package-lock.json`) against a
//! real gateway process, and the media-type rules one by one.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{PANEL_QUERY, TestEnv, TestOptions, input, within};

/// Longest the audit may take (it sends about 60 requests).
const AUDIT_TIMEOUT: Duration = Duration::from_secs(120);

const GRAPHQL_RESPONSE: &str = "application/graphql-response+json";

/// graphql-http's `auditServer` against a gateway with the default
/// configuration reports 0 errors (MUST) and 0 warnings (SHOULD), and the
/// schema graphql-js builds from the gateway's introspection validates the
/// contract's Panel query. The audit's report is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graphql_over_http_audit_has_no_errors_and_no_warnings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/graphql-http-audit");
    assert!(
        dir.join("node_modules/graphql-http/package.json").exists(),
        "the audit's npm packages are not installed: run `npm ci` in {} \
         (scripts/test does it before the tests)",
        dir.display()
    );
    let env = TestEnv::start(TestOptions::default().latency_ms(10)).await;
    let url = format!("{}/graphql", env.gateway().url());
    let run = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("audit.mjs")
            .arg(url)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
    });
    let output = within(AUDIT_TIMEOUT, "the graphql-http audit", run)
        .await
        .expect("the audit's thread does not panic")
        .unwrap_or_else(|err| panic!("cannot run `node` (Node 18+ is needed): {err}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    let summary: Value = report
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("the audit printed no summary:\n{report}"));
    assert_eq!(summary["errors"], 0, "{report}");
    assert_eq!(summary["warnings"], 0, "{report}");
    assert_eq!(summary["clientSchemaProblems"], 0, "{report}");
    assert!(summary["ok"].as_u64().unwrap_or(0) >= 40, "{report}");
    assert!(output.status.success(), "{report}");
    assert_eq!(env.sim.stats().queries, 0, "the audit asks no aggregate");
}

/// One `POST /graphql` with `accept`: status, content type, JSON body.
async fn post(env: &TestEnv, accept: Option<&str>, body: &Value) -> (u16, String, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/graphql", env.gateway().url()))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = within(
        crate::common::REQUEST_TIMEOUT,
        "POST /graphql",
        request.send(),
    )
    .await
    .expect("the gateway answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {text}"));
    (status, content_type, body)
}

/// With `Accept: application/graphql-response+json`, requests that fail
/// before execution (parse, validation, variable coercion, a limit) are 400
/// without `data`; executed ones, field errors included, are 200 with `data`;
/// every answer is labelled with that media type. With `application/json`
/// (or `*/*`, or no `Accept`, or JSON preferred by `q`), the same failures
/// stay 200 with `data: null`, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accepted_media_type_decides_status_and_data() {
    let env = TestEnv::start(TestOptions::default().latency_ms(10)).await;
    let coercion = json!({"query": "query Q($id: ID!) { __typename }", "variables": {"id": null}});
    let too_complex = json!({"query": format!("{{ {} }}", "__typename ".repeat(1_001))});
    let request_errors = [
        ("parse", json!({"query": "{"})),
        ("validation", json!({"query": "{ noSuchField }"})),
        ("variable coercion", coercion),
        ("a limit", too_complex),
    ];
    for (what, body) in &request_errors {
        let (status, content_type, answer) = post(&env, Some(GRAPHQL_RESPONSE), body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert!(
            content_type.starts_with(GRAPHQL_RESPONSE),
            "{what}: {content_type}"
        );
        assert!(answer.get("data").is_none(), "{what}: {answer}");
        assert!(
            answer["errors"][0]["message"].is_string(),
            "{what}: {answer}"
        );

        for accept in [
            Some("application/json"),
            Some("*/*"),
            None,
            Some("application/graphql-response+json;q=0.5, application/json"),
        ] {
            let (status, content_type, answer) = post(&env, accept, body).await;
            assert_eq!(status, 200, "{what} with {accept:?}: {answer}");
            assert!(
                content_type.starts_with("application/json"),
                "{content_type}"
            );
            assert!(
                answer["data"].is_null() && answer.get("data").is_some(),
                "{answer}"
            );
        }
    }

    // Executed: a field error (our validation, inside the resolver) keeps
    // `data` and is 200, as is a success.
    let field_error = json!({
        "query": PANEL_QUERY,
        "variables": {"input": input("", "2025-01-01", "2025-01-02", &["Sales.orders"], &[], None)},
    });
    let accept = "application/graphql-response+json, application/json;q=0.9";
    let (status, content_type, answer) = post(&env, Some(accept), &field_error).await;
    assert_eq!(status, 200, "{answer}");
    assert!(content_type.starts_with(GRAPHQL_RESPONSE), "{content_type}");
    assert!(answer.get("data").is_some(), "{answer}");
    assert_eq!(answer["errors"][0]["path"][0], "aggregate", "{answer}");
    let (status, _, answer) = post(&env, Some(accept), &json!({"query": "{ __typename }"})).await;
    assert_eq!(
        (status, answer["data"]["__typename"].is_string()),
        (200, true),
        "{answer}"
    );

    // A body that is not GraphQL at all is 400 in both, labelled as asked.
    let response = reqwest::Client::new()
        .post(format!("{}/graphql", env.gateway().url()))
        .header("content-type", "application/json")
        .header("accept", GRAPHQL_RESPONSE)
        .body("{ \"not JSON")
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status().as_u16(), 400);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap_or_default();
    assert!(content_type.starts_with(GRAPHQL_RESPONSE), "{content_type}");
    assert_eq!(env.sim.stats().queries, 0);
}
