//! Filters, order, limit, offset, timezone and hourly buckets: each reaches
//! the BI as Cube spells it, answers bi-sim's own rows, is refused before
//! any BI call when it is wrong, and is part of the question (so of the
//! cache key) exactly as far as it changes the answer.

use serde_json::{Value, json};

use crate::common::{
    TestEnv, TestOptions, dashboard, error_code, expected_rows_for, input, panel_body,
};

const FROM: &str = "2025-02-01";
const TO: &str = "2025-02-07";

/// A DAY panel of orders and revenue by region over a week: 21 rows.
fn base() -> Value {
    input(
        "acme",
        FROM,
        TO,
        &["Sales.orders", "Sales.revenue"],
        &["Sales.region"],
        Some("DAY"),
    )
}

/// `input` with `fields` set (a `null` removes the field).
fn with(mut input: Value, fields: Value) -> Value {
    let object = input.as_object_mut().expect("an object");
    for (field, value) in fields.as_object().expect("an object of fields") {
        if value.is_null() {
            object.remove(field);
        } else {
            object.insert(field.clone(), value.clone());
        }
    }
    input
}

fn filter(member: &str, operator: &str, values: &[&str]) -> Value {
    json!({"member": member, "operator": operator, "values": values})
}

/// The rows of alias `p{i}`, checked to be the panel's rows asked alone.
fn assert_panel(answer: &Value, i: usize, panel: &Value) -> Value {
    let rows = answer["data"][format!("p{i}")]["rows"].clone();
    assert_eq!(rows, expected_rows_for(panel), "p{i} ({panel}) of {answer}");
    rows
}

/// The values of `key` in `rows`, in order.
fn column(rows: &Value, key: &str) -> Vec<String> {
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|row| row[key].as_str().expect("a string value").to_owned())
        .collect()
}

/// Every operator on a string member (`Sales.region`) and on a number
/// member (the measure `Sales.orders`) answers exactly bi-sim's rows for
/// the same query, all of them in one BI request (one dashboard of DAY
/// panels), and each keeps what it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_operator_on_a_string_and_a_number_member_answers_bi_sims_rows() {
    let env = TestEnv::start(TestOptions::default()).await;
    env.wait_for_catalog().await;
    let all = expected_rows_for(&base());
    let mut orders: Vec<u64> = column(&all, "Sales.orders")
        .iter()
        .map(|o| o.parse().expect("a count"))
        .collect();
    orders.sort_unstable();
    let pivot = orders[orders.len() / 2].to_string();
    let pivot = pivot.as_str();

    let string_ops: Vec<(&str, Vec<&str>)> = vec![
        ("EQUALS", vec!["EU", "NA"]),
        ("NOT_EQUALS", vec!["EU"]),
        ("CONTAINS", vec!["a"]),
        ("NOT_CONTAINS", vec!["A"]),
        ("STARTS_WITH", vec!["AP"]),
        ("ENDS_WITH", vec!["U"]),
        ("SET", vec![]),
        ("NOT_SET", vec![]),
    ];
    let number_ops: Vec<(&str, Vec<&str>)> = vec![
        ("EQUALS", vec![pivot]),
        ("NOT_EQUALS", vec![pivot]),
        ("GT", vec![pivot]),
        ("GTE", vec![pivot]),
        ("LT", vec![pivot]),
        ("LTE", vec![pivot]),
        ("SET", vec![]),
        ("NOT_SET", vec![]),
    ];
    let mut panels = Vec::new();
    for (operator, values) in &string_ops {
        panels.push(with(
            base(),
            json!({"filters": [filter("Sales.region", operator, values)]}),
        ));
    }
    for (operator, values) in &number_ops {
        panels.push(with(
            base(),
            json!({"filters": [filter("Sales.orders", operator, values)]}),
        ));
    }

    let answer = env.gateway().graphql(&dashboard(&panels)).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    let rows: Vec<Value> = panels
        .iter()
        .enumerate()
        .map(|(i, panel)| assert_panel(&answer, i, panel))
        .collect();

    let regions = |rows: &Value| {
        let mut regions = column(rows, "Sales.region");
        regions.sort();
        regions.dedup();
        regions
    };
    let expected_regions: [&[&str]; 8] = [
        &["EU", "NA"],
        &["APAC", "NA"],
        &["APAC", "NA"],
        &["EU"],
        &["APAC"],
        &["EU"],
        &["APAC", "EU", "NA"],
        &[],
    ];
    for (i, expected) in expected_regions.iter().enumerate() {
        assert_eq!(regions(&rows[i]), *expected, "{}", string_ops[i].0);
    }
    let count = |rows: &Value| rows.as_array().map_or(0, Vec::len);
    let counted = |test: &dyn Fn(u64) -> bool| orders.iter().filter(|o| test(**o)).count();
    let p: u64 = pivot.parse().expect("a count");
    let expected_counts = [
        counted(&|o| o == p),
        counted(&|o| o != p),
        counted(&|o| o > p),
        counted(&|o| o >= p),
        counted(&|o| o < p),
        counted(&|o| o <= p),
        orders.len(),
        0,
    ];
    for (i, expected) in expected_counts.iter().enumerate() {
        assert_eq!(count(&rows[8 + i]), *expected, "{}", number_ops[i].0);
    }

    let stats = env.sim.stats();
    assert_eq!(
        (stats.http_requests, stats.queries),
        (1, panels.len() as u64),
        "{stats:?}"
    );
}

/// Each wrong refinement is `BAD_USER_INPUT`, and none costs a BI query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_refinements_are_bad_user_input_and_cost_no_bi_query() {
    let env = TestEnv::start(TestOptions::default()).await;
    env.wait_for_catalog().await;
    let many_filters: Vec<Value> = (0..21)
        .map(|i| filter("Sales.product", "NOT_EQUALS", &[&format!("p{i}")]))
        .collect();
    let many_values: Vec<String> = (0..101).map(|i| format!("r{i}")).collect();
    #[rustfmt::skip]
    let cases: Vec<(&str, Value)> = vec![
        ("unknown member", json!({"filters": [filter("Sales.city", "EQUALS", &["Paris"])]})),
        ("malformed member", json!({"filters": [filter("city", "EQUALS", &["Paris"])]})),
        ("a word for a number", json!({"filters": [filter("Sales.orders", "GT", &["many"])]})),
        ("a word for a number, EQUALS", json!({"filters": [filter("Sales.revenue", "EQUALS", &["1,5"])]})),
        ("GT on a string", json!({"filters": [filter("Sales.region", "GT", &["EU"])]})),
        ("CONTAINS on a number", json!({"filters": [filter("Sales.orders", "CONTAINS", &["1"])]})),
        ("the customer member", json!({"filters": [filter("Sales.customerId", "EQUALS", &["globex"])]})),
        ("the customer member, widened", json!({"filters": [filter("Sales.customerId", "SET", &[])]})),
        ("the customer member, negated", json!({"filters": [filter("Sales.customerId", "NOT_EQUALS", &["acme"])]})),
        ("the time dimension", json!({"filters": [filter("Sales.date", "EQUALS", &["2025-02-01"])]})),
        ("SET with values", json!({"filters": [filter("Sales.region", "SET", &["EU"])]})),
        ("EQUALS without values", json!({"filters": [filter("Sales.region", "EQUALS", &[])]})),
        ("GT with two values", json!({"filters": [filter("Sales.orders", "GT", &["1", "2"])]})),
        ("too many filters", json!({"filters": many_filters})),
        ("too many values", json!({"filters": [{"member": "Sales.region", "operator": "EQUALS", "values": many_values}]})),
        ("unknown operator", json!({"filters": [filter("Sales.region", "LIKE", &["E%"])]})),
        ("order on a member not in the query", json!({"order": [{"member": "Sales.product"}]})),
        ("order on an unknown member", json!({"order": [{"member": "Sales.city", "direction": "DESC"}]})),
        ("order on a member twice", json!({"order": [{"member": "Sales.orders"}, {"member": "Sales.orders", "direction": "DESC"}]})),
        ("order direction in lower case", json!({"order": [{"member": "Sales.orders", "direction": "desc"}]})),
        ("limit 0", json!({"limit": 0})),
        ("limit over BI_ROW_LIMIT", json!({"limit": 10_001})),
        ("negative offset", json!({"offset": -1})),
        ("unknown timezone", json!({"timezone": "Mars/Olympus"})),
        ("an offset for a timezone", json!({"timezone": "+05:00"})),
        ("HOUR over 32 days", json!({"granularity": "HOUR", "dateRange": {"from": "2025-01-01", "to": "2025-02-01"}})),
    ];
    for (rule, fields) in cases {
        let answer = env
            .gateway()
            .graphql(&panel_body(with(base(), fields)))
            .await;
        assert_eq!(
            error_code(&answer),
            Some("BAD_USER_INPUT"),
            "{rule}: {answer}"
        );
    }
    // The edges that are allowed.
    for fields in [
        json!({"limit": 10_000}),
        json!({"granularity": "HOUR", "dateRange": {"from": "2025-01-01", "to": "2025-01-31"}}),
    ] {
        let answer = env
            .gateway()
            .graphql(&panel_body(with(base(), fields.clone())))
            .await;
        assert!(answer.get("errors").is_none(), "{fields}: {answer}");
    }
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());
}

/// A dashboard of 8 DAY panels that differ in filters, orders, limits,
/// offsets and timezones is one BI request of 8 queries, and every panel
/// gets exactly the rows it gets when asked alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dashboard_of_eight_refined_day_panels_is_one_bi_request() {
    let env = TestEnv::start(TestOptions::default()).await;
    env.wait_for_catalog().await;
    let by_product = input(
        "acme",
        FROM,
        TO,
        &["Sales.revenue"],
        &["Sales.product"],
        Some("DAY"),
    );
    let panels = vec![
        with(
            base(),
            json!({"filters": [filter("Sales.region", "EQUALS", &["EU"])]}),
        ),
        with(
            base(),
            json!({"filters": [filter("Sales.region", "NOT_EQUALS", &["EU"]), filter("Sales.orders", "GT", &["30"])]}),
        ),
        with(
            base(),
            json!({"order": [{"member": "Sales.revenue", "direction": "DESC"}], "limit": 5}),
        ),
        with(base(), json!({"timezone": "America/New_York"})),
        with(
            base(),
            json!({"timezone": "Asia/Tokyo", "order": [{"member": "Sales.date", "direction": "DESC"}]}),
        ),
        with(
            by_product.clone(),
            json!({"order": [{"member": "Sales.product"}, {"member": "Sales.revenue", "direction": "DESC"}], "offset": 3, "limit": 4}),
        ),
        with(
            by_product.clone(),
            json!({"filters": [filter("Sales.product", "STARTS_WITH", &["g"])], "timezone": "Europe/Paris"}),
        ),
        with(
            by_product,
            json!({"filters": [filter("Sales.revenue", "LTE", &["2000"])], "limit": 7, "timezone": "Australia/Adelaide"}),
        ),
    ];

    let answer = env.gateway().graphql(&dashboard(&panels)).await;

    assert!(answer.get("errors").is_none(), "{answer}");
    let rows: Vec<Value> = panels
        .iter()
        .enumerate()
        .map(|(i, panel)| assert_panel(&answer, i, panel))
        .collect();
    assert_eq!(rows[2].as_array().map(Vec::len), Some(5));
    assert_ne!(
        rows[3],
        expected_rows_for(&base()),
        "New York's days are not UTC's"
    );
    let stats = env.sim.stats();
    assert_eq!(
        (stats.http_requests, stats.queries, stats.max_batch_size),
        (1, 8, 8),
        "{stats:?}"
    );
}

fn key_and_status(answer: &Value) -> (String, String) {
    assert!(answer.get("errors").is_none(), "{answer}");
    let cache = &answer["data"]["aggregate"]["cache"];
    (
        cache["key"].as_str().expect("a key").to_owned(),
        cache["status"].as_str().expect("a status").to_owned(),
    )
}

/// Filters in another order, a filter's values in another order, and other
/// spellings of the same numbers and timezone are one entry (`HIT`); a
/// different timezone, order, limit or offset is another entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reordered_and_respelt_refinements_hit_and_different_ones_do_not() {
    let env = TestEnv::start(TestOptions::default()).await;
    env.wait_for_catalog().await;
    let first = with(
        base(),
        json!({
            "filters": [filter("Sales.region", "EQUALS", &["EU", "NA"]), filter("Sales.orders", "GTE", &["15"])],
            "order": [{"member": "Sales.revenue", "direction": "DESC"}],
            "timezone": "America/New_York",
        }),
    );
    let (key, status) = key_and_status(&env.gateway().graphql(&panel_body(first.clone())).await);
    assert_eq!(status, "MISS");

    let respelt = with(
        base(),
        json!({
            "filters": [filter("Sales.orders", "GTE", &["15.0"]), filter("Sales.region", "EQUALS", &["NA", "EU"])],
            "order": [{"member": "Sales.revenue", "direction": "DESC"}],
            "timezone": "america/new_york",
            "limit": 10_000,
            "offset": 0,
        }),
    );
    let answer = env.gateway().graphql(&panel_body(respelt)).await;
    assert_eq!(key_and_status(&answer), (key.clone(), "HIT".to_owned()));
    assert_eq!(
        answer["data"]["aggregate"]["rows"],
        expected_rows_for(&first)
    );
    assert_eq!(env.sim.stats().queries, 1);

    let different = [
        json!({"timezone": "America/Chicago"}),
        json!({"timezone": null}),
        json!({"order": [{"member": "Sales.revenue", "direction": "ASC"}]}),
        json!({"limit": 3}),
        json!({"offset": 2}),
        json!({"filters": [filter("Sales.region", "EQUALS", &["EU"]), filter("Sales.orders", "GTE", &["15"])]}),
    ];
    let mut keys = vec![key];
    for (i, fields) in different.iter().enumerate() {
        let panel = with(first.clone(), fields.clone());
        let answer = env.gateway().graphql(&panel_body(panel.clone())).await;
        let (key, status) = key_and_status(&answer);
        assert_eq!(status, "MISS", "{fields}");
        assert!(!keys.contains(&key), "{fields} shares an entry");
        assert_eq!(
            answer["data"]["aggregate"]["rows"],
            expected_rows_for(&panel)
        );
        keys.push(key);
        assert_eq!(env.sim.stats().queries, 2 + i as u64);
    }
}

/// HOUR panels and timezones answer bi-sim's rows: a New York day is not a
/// UTC day, and its hours are New York's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hourly_panels_and_timezones_answer_bi_sims_rows() {
    let env = TestEnv::start(TestOptions::default()).await;
    env.wait_for_catalog().await;
    let hourly = input(
        "acme",
        "2025-03-08",
        "2025-03-09",
        &["Sales.orders"],
        &[],
        Some("HOUR"),
    );
    let panels = vec![
        hourly.clone(),
        with(hourly.clone(), json!({"timezone": "America/New_York"})),
        with(hourly.clone(), json!({"timezone": "Asia/Kolkata"})),
    ];
    let answer = env.gateway().graphql(&dashboard(&panels)).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    let rows: Vec<Value> = panels
        .iter()
        .enumerate()
        .map(|(i, panel)| assert_panel(&answer, i, panel))
        .collect();
    let hours = column(&rows[0], "Sales.date.hour");
    assert_eq!(
        hours.first().map(String::as_str),
        Some("2025-03-08T00:00:00.000")
    );
    assert_ne!(rows[0], rows[1]);
    // 2025-03-09 is New York's switch to summer time: 23 local hours at most.
    let new_york = column(&rows[1], "Sales.date.hour");
    assert!(
        !new_york.iter().any(|h| h.starts_with("2025-03-09T02")),
        "{new_york:?}"
    );
    assert_eq!(env.sim.stats().http_requests, 1);
}

/// `mayBeTruncated` is true exactly when the answer has as many rows as
/// the query's own limit, offset or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn may_be_truncated_tells_the_truth_with_limit_and_offset() {
    let env = TestEnv::start(TestOptions::default()).await;
    let document = "query Panel($input: AggregateInput!) { aggregate(input: $input) { rowCount mayBeTruncated } }";
    for (fields, rows, truncated) in [
        (json!({}), 21, false),
        (json!({"limit": 5}), 5, true),
        (json!({"limit": 21}), 21, true),
        (json!({"limit": 22}), 21, false),
        (json!({"limit": 5, "offset": 18}), 3, false),
        (json!({"limit": 5, "offset": 15}), 5, true),
    ] {
        let body = json!({"query": document, "variables": {"input": with(base(), fields.clone())}});
        let answer = env.gateway().graphql(&body).await;
        assert!(answer.get("errors").is_none(), "{answer}");
        let aggregate = &answer["data"]["aggregate"];
        assert_eq!(aggregate["rowCount"], rows, "{fields}: {answer}");
        assert_eq!(aggregate["mayBeTruncated"], truncated, "{fields}: {answer}");
    }
}
