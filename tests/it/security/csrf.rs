//! CSRF prevention in the manner of Apollo Router: a POST a browser could
//! send cross-site without a preflight is refused before any work, unless it
//! carries a header such a page cannot add.

use serde_json::Value;

use super::{client, percent, post};
use crate::common::{TestEnv, TestOptions, panel};

fn body(customer: &str) -> Value {
    panel(
        customer,
        "2025-07-01",
        "2025-07-03",
        &["Sales.orders"],
        &[],
        Some("DAY"),
    )
}

/// A valid aggregate query POSTed as `text/plain`, form-encoded, multipart
/// or with no content type at all is refused with HTTP 400 and 0 BI queries
/// (whatever the parameters or case of the type); the same `text/plain` POST
/// with `apollo-require-preflight: true` or `x-apollo-operation-name` is
/// answered, and so is `application/json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simple_requests_without_a_preflight_header_are_refused() {
    let env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    let gateway = env.gateway();
    let http = client();
    let text = body("acme").to_string();
    let form = format!(
        "query={}",
        percent(body("acme")["query"].as_str().unwrap_or_default())
    );

    let refused: [(Option<&str>, &String); 6] = [
        (Some("text/plain"), &text),
        (Some("text/plain;charset=UTF-8"), &text),
        (Some("Text/Plain"), &text),
        (Some("application/x-www-form-urlencoded"), &form),
        (Some("multipart/form-data; boundary=x"), &text),
        (None, &text),
    ];
    for (content_type, payload) in refused {
        let answer = post(
            &http,
            gateway,
            "/graphql",
            content_type,
            &[],
            payload.clone(),
        )
        .await;
        assert_eq!(answer.status, 400, "{content_type:?}: {}", answer.text);
        assert_eq!(
            answer.json()["errors"][0]["extensions"]["code"],
            "BAD_REQUEST",
            "{content_type:?}: {}",
            answer.text
        );
    }
    let stats = env.sim.stats();
    assert_eq!((stats.http_requests, stats.queries), (0, 0), "{stats:?}");

    let preflighted = [
        ("text/plain", "apollo-require-preflight", "true", "acme"),
        ("text/plain", "x-apollo-operation-name", "Panel", "globex"),
    ];
    for (content_type, header, value, customer) in preflighted {
        let answer = post(
            &http,
            gateway,
            "/graphql",
            Some(content_type),
            &[(header.to_owned(), value.to_owned())],
            body(customer).to_string(),
        )
        .await;
        assert_eq!(answer.status, 200, "{header}: {}", answer.text);
        let answer = answer.json();
        assert!(answer.get("errors").is_none(), "{header}: {answer}");
        assert!(answer["data"]["aggregate"]["rows"].is_array(), "{answer}");
    }
    let json = post(
        &http,
        gateway,
        "/graphql",
        Some("application/json"),
        &[],
        body("initech").to_string(),
    )
    .await;
    assert_eq!(json.status, 200, "{}", json.text);
    assert!(json.json().get("errors").is_none(), "{}", json.text);
    assert_eq!(env.sim.stats().queries, 3);
}

/// `CSRF_PREVENTION=false` turns the rule off; `CSRF_REQUIRED_HEADERS` names
/// the headers that lift it (and the defaults then no longer do).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rule_and_its_headers_are_configurable() {
    let http = client();
    let text = body("acme").to_string();

    let off = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .env("CSRF_PREVENTION", "false"),
    )
    .await;
    let answer = post(
        &http,
        off.gateway(),
        "/graphql",
        Some("text/plain"),
        &[],
        text.clone(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    let custom = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .env("CSRF_REQUIRED_HEADERS", "X-Our-Client"),
    )
    .await;
    let default_header = [("apollo-require-preflight".to_owned(), "true".to_owned())];
    let answer = post(
        &http,
        custom.gateway(),
        "/graphql",
        Some("text/plain"),
        &default_header,
        text.clone(),
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(custom.sim.stats().queries, 0);
    let ours = [("x-our-client".to_owned(), "1".to_owned())];
    let answer = post(
        &http,
        custom.gateway(),
        "/graphql",
        Some("text/plain"),
        &ours,
        text,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(custom.sim.stats().queries, 1);
}
