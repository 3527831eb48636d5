//! Bad input is refused with a code before it can reach the BI, and never
//! takes the process down.

use analytics_gateway::config::Config;
use analytics_gateway::graphql::ErrorCode;
use serde_json::{Value, json};

use crate::common::{TestEnv, TestOptions, error_code, input, panel_body};

/// A valid input with one field replaced (`null` removes it).
fn with(field: &str, value: Value) -> Value {
    let mut input = input(
        "acme",
        "2025-01-01",
        "2025-01-31",
        &["Sales.revenue"],
        &["Sales.region"],
        Some("DAY"),
    );
    let object = input.as_object_mut().expect("an object");
    if value.is_null() {
        object.remove(field);
    } else {
        object.insert(field.to_owned(), value);
    }
    input
}

fn members(count: usize) -> Value {
    json!(
        (0..count)
            .map(|i| format!("Sales.m{i}"))
            .collect::<Vec<_>>()
    )
}

/// Every validation rule answers `BAD_USER_INPUT`, and none of the refused
/// inputs costs a BI query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rule_is_bad_user_input_and_costs_no_bi_query() {
    let env = TestEnv::start(TestOptions::default()).await;
    env.wait_for_catalog().await;
    let limits = Config::embedded_defaults().query;
    let long_range_end = range_end_one_day_too_far(limits.max_range_days);

    let cases: Vec<(&str, Value)> = vec![
        (
            "malformed date",
            with(
                "dateRange",
                json!({"from": "2025-1-01", "to": "2025-01-31"}),
            ),
        ),
        (
            "impossible date",
            with(
                "dateRange",
                json!({"from": "2025-02-30", "to": "2025-03-01"}),
            ),
        ),
        (
            "from after to",
            with(
                "dateRange",
                json!({"from": "2025-02-01", "to": "2025-01-31"}),
            ),
        ),
        (
            "range too long",
            with(
                "dateRange",
                json!({"from": "2020-01-01", "to": long_range_end}),
            ),
        ),
        ("empty measures", with("measures", json!([]))),
        (
            "too many measures",
            with("measures", members(limits.max_measures + 1)),
        ),
        (
            "too many dimensions",
            with("dimensions", members(limits.max_dimensions + 1)),
        ),
        ("member without cube", with("measures", json!(["revenue"]))),
        ("member without name", with("measures", json!(["Sales."]))),
        ("unknown measure", with("measures", json!(["Sales.profit"]))),
        (
            "unknown dimension",
            with("dimensions", json!(["Sales.city"])),
        ),
        (
            "a dimension as measure",
            with("measures", json!(["Sales.region"])),
        ),
        ("empty customer", with("customer", json!(""))),
        ("blank customer", with("customer", json!("   "))),
        (
            "too-long customer",
            with("customer", json!("c".repeat(limits.max_customer_len + 1))),
        ),
        (
            "control character in customer",
            with("customer", json!("acme\u{0}globex")),
        ),
        ("granularity HOUR", with("granularity", json!("HOUR"))),
        ("lower-case granularity", with("granularity", json!("day"))),
        ("missing measures", with("measures", Value::Null)),
        ("missing customer", with("customer", Value::Null)),
    ];
    for (rule, input) in &cases {
        let answer = env.gateway().graphql(&panel_body(input.clone())).await;
        assert_eq!(
            error_code(&answer),
            Some("BAD_USER_INPUT"),
            "{rule}: {answer}"
        );
        assert_eq!(answer["data"]["aggregate"], Value::Null, "{rule}: {answer}");
    }
    let stats = env.sim.stats();
    assert_eq!((stats.http_requests, stats.queries), (0, 0), "{stats:?}");
}

/// `2020-01-01` plus `max_days` days: a range one day longer than allowed.
fn range_end_one_day_too_far(max_days: u32) -> String {
    use chrono::{Days, NaiveDate};
    let from = NaiveDate::from_ymd_opt(2020, 1, 1).expect("a date");
    (from + Days::new(u64::from(max_days))).to_string()
}

/// Documents too deep, bodies too large and bodies that are not JSON are
/// refused with a code or an HTTP status, and the process stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_documents_are_refused_and_the_process_stays_up() {
    let env = TestEnv::start(TestOptions::default()).await;
    let gateway = env.gateway();
    let config = Config::embedded_defaults();

    // Introspection nests as deep as one likes: deeper than the limit here.
    let depth = config.graphql.max_depth + 1;
    let nested = format!(
        "{{ __schema {{ types {}name{} }} }}",
        "{ ofType ".repeat(depth),
        " }".repeat(depth)
    );
    let answer = gateway.graphql(&json!({"query": nested})).await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::GraphqlValidationFailed.as_str()),
        "{answer}"
    );
    assert!(answer.get("data").is_none_or(Value::is_null), "{answer}");

    let oversized = format!(
        r#"{{"query": "{{ catalog {{ cubes {{ name }} }} }}", "padding": "{}"}}"#,
        "x".repeat(config.graphql.max_body_bytes)
    );
    let response = gateway.post_raw("/graphql", oversized).await;
    assert_eq!(response.status().as_u16(), 413);

    let response = gateway
        .post_raw("/graphql", "query { catalog { cubes { name } } }")
        .await;
    assert_eq!(response.status().as_u16(), 400);
    let response = gateway
        .post_raw("/graphql", vec![0xff_u8, 0xfe, 0x00])
        .await;
    assert_eq!(response.status().as_u16(), 400);

    let health = gateway.get("/healthz").await;
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(env.sim.stats().queries, 0);
}
