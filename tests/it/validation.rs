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

fn range(from: &str, to: &str) -> Value {
    json!({"from": from, "to": to})
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
    let too_far = range_end_one_day_too_far(limits.max_range_days);
    let long_customer = "c".repeat(limits.max_customer_len + 1);

    // (rule, field of the input, its value: `null` removes the field)
    #[rustfmt::skip]
    let cases: Vec<(&str, &str, Value)> = vec![
        ("malformed date", "dateRange", range("2025-1-01", "2025-01-31")),
        ("impossible date", "dateRange", range("2025-02-30", "2025-03-01")),
        ("from after to", "dateRange", range("2025-02-01", "2025-01-31")),
        ("range too long", "dateRange", range("2020-01-01", &too_far)),
        ("empty measures", "measures", json!([])),
        ("too many measures", "measures", members(limits.max_measures + 1)),
        ("too many dimensions", "dimensions", members(limits.max_dimensions + 1)),
        ("member without cube", "measures", json!(["revenue"])),
        ("member without name", "measures", json!(["Sales."])),
        ("unknown measure", "measures", json!(["Sales.profit"])),
        ("unknown dimension", "dimensions", json!(["Sales.city"])),
        ("a dimension as measure", "measures", json!(["Sales.region"])),
        ("empty customer", "customer", json!("")),
        ("blank customer", "customer", json!("   ")),
        ("too-long customer", "customer", json!(long_customer)),
        ("control character in customer", "customer", json!("acme\u{0}globex")),
        ("granularity MINUTE", "granularity", json!("MINUTE")),
        ("lower-case granularity", "granularity", json!("day")),
        ("missing measures", "measures", Value::Null),
        ("missing customer", "customer", Value::Null),
    ];
    for (rule, field, value) in cases {
        let answer = env.gateway().graphql(&panel_body(with(field, value))).await;
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

/// `dimensions: ["Sales.date"]` (the time dimension) is `BAD_USER_INPUT`
/// saying to use `granularity`, with no BI query, both right after start
/// (`BI_TIME_DIMENSION` is known before the catalog is) and once the catalog
/// is loaded; the catalog lists it under `timeDimensions`, not `dimensions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_dimension_in_dimensions_is_bad_user_input_at_no_bi_cost() {
    let env = TestEnv::start(TestOptions::default()).await;
    let body = panel_body(with("dimensions", json!(["Sales.region", "Sales.date"])));
    let check = |answer: &Value| {
        assert_eq!(error_code(answer), Some("BAD_USER_INPUT"), "{answer}");
        let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("Sales.date") && message.contains("granularity"),
            "{message}"
        );
    };
    check(&env.gateway().graphql(&body).await);
    env.wait_for_catalog().await;
    check(&env.gateway().graphql(&body).await);
    assert_eq!(env.sim.stats().queries, 0);

    let catalog = env
        .gateway()
        .graphql(&json!({"query": "{ catalog { cubes { dimensions { name } timeDimensions { name type } } } }"}))
        .await;
    let cube = &catalog["data"]["catalog"]["cubes"][0];
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .map(|l| {
                l.iter()
                    .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(names(&cube["timeDimensions"]), ["Sales.date"], "{catalog}");
    assert_eq!(cube["timeDimensions"][0]["type"], "time", "{catalog}");
    assert!(
        !names(&cube["dimensions"]).contains(&"Sales.date".to_owned()),
        "{catalog}"
    );
    assert!(names(&cube["dimensions"]).contains(&"Sales.region".to_owned()));
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

    // Introspection nests as deep as one likes: deeper than its own limit here.
    let depth = analytics_gateway::graphql::limits::MAX_INTROSPECTION_DEPTH;
    let nested = format!(
        "{{ __schema {{ types {}name{} }} }}",
        "{ ofType ".repeat(depth),
        " }".repeat(depth)
    );
    let answer = gateway.graphql(&json!({"query": nested})).await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::QueryTooComplex.as_str()),
        "{answer}"
    );
    assert!(answer.get("data").is_none_or(Value::is_null), "{answer}");

    // Only the head is sent: a server that refuses a body unread may close
    // the connection under a client still writing it, which would make the
    // status unobservable by chance rather than by a bug.
    let status = gateway
        .status_of_announced_post("/graphql", config.graphql.max_body_bytes + 1)
        .await;
    assert_eq!(status, 413);

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
