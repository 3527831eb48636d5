//! Validation cost per panel: the time from a panel's raw input to its
//! validated `AggregateQuery`, its Cube query and its cache key
//! (`AggregateQuery::parse_with` against a known catalog, then
//! `Planner::plan`), which every request pays, cached hits included.
//! Prints figures; asserts nothing.
//!
//! `cargo bench --bench validation` (`scripts/bench` runs it too).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use analytics_gateway::catalog::Catalog;
use analytics_gateway::config::Config;
use analytics_gateway::graphql::AggregateInput;
use analytics_gateway::query::{
    AggregateQuery, FilterOperator, Granularity, OrderDirection, Planner, RawAggregate, RawFilter,
    RawOptions, RawOrder,
};

fn main() {
    // `cargo bench` passes `--bench`; test runners that list or run every
    // target do not, and get nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let config = Config::embedded_defaults();
    let catalog = Catalog::new(
        analytics_gateway::sim::meta(),
        Arc::clone(&config.query.cubes),
    );
    let planner = Planner::new(config.planner.clone(), "bench");
    let measures = vec!["Sales.revenue".to_owned(), "Sales.orders".to_owned()];
    let dimensions = vec!["Sales.region".to_owned()];
    let raw = || RawAggregate {
        customer: "bench-hit",
        from: "2025-01-01",
        to: "2025-01-31",
        measures: &measures,
        dimensions: &dimensions,
        granularity: Some(Granularity::Day),
    };
    let regions = vec!["EU".to_owned(), "NA".to_owned()];
    let threshold = vec!["10".to_owned()];
    let refined = || RawOptions {
        filters: vec![
            RawFilter {
                member: "Sales.region",
                operator: FilterOperator::Equals,
                values: &regions,
            },
            RawFilter {
                member: "Sales.orders",
                operator: FilterOperator::Gte,
                values: &threshold,
            },
        ],
        order: vec![RawOrder {
            member: "Sales.revenue",
            direction: OrderDirection::Desc,
        }],
        timezone: Some("America/New_York"),
        ..RawOptions::default()
    };

    let contract = || RawOptions::default();
    measure(
        "the contract's panel",
        &config,
        &catalog,
        &planner,
        &raw,
        &contract,
    );
    measure(
        "two filters, an order and a timezone",
        &config,
        &catalog,
        &planner,
        &raw,
        &refined,
    );

    // What comes before: the variables' JSON coerced into the GraphQL input
    // type, as async-graphql does for every request.
    let contract = r#"{"customer":"bench-hit","dateRange":{"from":"2025-01-01","to":"2025-01-31"},"measures":["Sales.revenue","Sales.orders"],"dimensions":["Sales.region"],"granularity":"DAY"}"#;
    let refined = r#"{"customer":"bench-hit","dateRange":{"from":"2025-01-01","to":"2025-01-31"},"measures":["Sales.revenue","Sales.orders"],"dimensions":["Sales.region"],"granularity":"DAY","filters":[{"member":"Sales.region","operator":"EQUALS","values":["EU","NA"]},{"member":"Sales.orders","operator":"GTE","values":["10"]}],"order":[{"member":"Sales.revenue","direction":"DESC"}],"timezone":"America/New_York"}"#;
    for (label, json) in [
        ("the contract's panel", contract),
        ("two filters, an order and a timezone", refined),
    ] {
        let run = |n: u32| {
            let started = Instant::now();
            for _ in 0..n {
                let value: serde_json::Value = serde_json::from_str(json).expect("JSON");
                let value = async_graphql::Value::from_json(value).expect("a GraphQL value");
                let input =
                    <AggregateInput as async_graphql::InputType>::parse(Some(black_box(value)))
                        .expect("a valid input");
                black_box(input);
            }
            started.elapsed()
        };
        run(2_000);
        let n = 20_000;
        let best = (0..5).map(|_| run(n)).min().unwrap_or(Duration::ZERO);
        println!(
            "validation: {label}: {:.2} µs per panel to read its JSON variables into the GraphQL input (best of 5 x {n})",
            best.as_secs_f64() * 1e6 / f64::from(n)
        );
    }
}

/// Prints the best of five rounds per panel: the machine is shared, the
/// minimum is the cost.
fn measure<'a>(
    label: &str,
    config: &Config,
    catalog: &Catalog,
    planner: &Planner,
    raw: &dyn Fn() -> RawAggregate<'a>,
    options: &dyn Fn() -> RawOptions<'a>,
) {
    let run = |n: u32| {
        let started = Instant::now();
        for _ in 0..n {
            let query = AggregateQuery::parse_with(raw(), options(), &config.query, Some(catalog))
                .expect("a valid panel");
            black_box(planner.plan(black_box(&query)));
        }
        started.elapsed()
    };
    run(2_000);
    let n = 20_000;
    let best = (0..5).map(|_| run(n)).min().unwrap_or(Duration::ZERO);
    println!(
        "validation: {label}: {:.2} µs per panel (parse + plan + key, best of 5 x {n})",
        best.as_secs_f64() * 1e6 / f64::from(n)
    );
}
