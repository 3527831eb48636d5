//! Several `aggregate` fields of one document go to the BI together, within
//! Cube's blending rules, and each panel still gets the rows it would get alone.

use serde_json::Value;

use crate::common::{TestEnv, TestOptions, dashboard, expected_rows_for, input};

/// The answer of alias `p{i}`, checked to be the panel's rows asked alone,
/// with no `time.*` key left over from blending.
fn assert_panel(answer: &Value, i: usize, panel: &Value) {
    let field = &answer["data"][format!("p{i}")];
    let rows = &field["rows"];
    assert_eq!(*rows, expected_rows_for(panel), "p{i} of {answer}");
    for row in rows.as_array().expect("rows are a list") {
        let row = row.as_object().expect("a row is an object");
        assert!(
            row.keys().all(|key| !key.starts_with("time.")),
            "p{i} kept a blending key: {row:?}"
        );
    }
}

/// Ten aliased DAY panels (eight distinct) cost one BI request carrying the
/// eight distinct queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_aliases_make_one_bi_request_of_eight_queries() {
    let env = TestEnv::start(TestOptions::default()).await;
    let customers = ["acme", "globex", "initech", "umbrella"];
    let measures: [&[&str]; 2] = [&["Sales.revenue"], &["Sales.orders", "Sales.avgOrderValue"]];
    let mut panels: Vec<Value> = customers
        .iter()
        .flat_map(|customer| {
            measures.iter().map(move |measures| {
                input(
                    customer,
                    "2025-03-01",
                    "2025-03-10",
                    measures,
                    &["Sales.region"],
                    Some("DAY"),
                )
            })
        })
        .collect();
    assert_eq!(panels.len(), 8);
    panels.push(panels[0].clone());
    panels.push(panels[5].clone());

    let answer = env.gateway().graphql(&dashboard(&panels)).await;

    assert!(answer.get("errors").is_none(), "{answer}");
    for (i, panel) in panels.iter().enumerate() {
        assert_panel(&answer, i, panel);
    }
    let stats = env.sim.stats();
    assert_eq!(
        (stats.http_requests, stats.queries, stats.max_batch_size),
        (1, 8, 8),
        "{stats:?}"
    );
}

/// A dashboard of DAY, MONTH and YEAR panels (two distinct each) and one
/// totals panel costs one BI request per granularity plus one for the totals,
/// and every panel gets exactly its rows asked alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_granularities_make_one_bi_request_each_and_totals_alone() {
    let env = TestEnv::start(TestOptions::default()).await;
    let mut panels = Vec::new();
    for granularity in ["DAY", "MONTH", "YEAR"] {
        panels.push(input(
            "acme",
            "2024-11-20",
            "2025-02-10",
            &["Sales.revenue"],
            &[],
            Some(granularity),
        ));
        panels.push(input(
            "acme",
            "2024-11-20",
            "2025-02-10",
            &["Sales.orders"],
            &["Sales.product"],
            Some(granularity),
        ));
    }
    panels.push(input(
        "acme",
        "2024-11-20",
        "2025-02-10",
        &["Sales.revenue", "Sales.orders"],
        &["Sales.region"],
        None,
    ));

    let answer = env.gateway().graphql(&dashboard(&panels)).await;

    assert!(answer.get("errors").is_none(), "{answer}");
    for (i, panel) in panels.iter().enumerate() {
        assert_panel(&answer, i, panel);
    }
    let stats = env.sim.stats();
    assert_eq!(
        (stats.http_requests, stats.queries, stats.max_batch_size),
        (4, 7, 2),
        "{stats:?}"
    );
}
