//! Every cube with its own members (`BI_CUBES_FILE`): each cube's panels
//! use its own time dimension and customer member, a query that touches
//! several cubes carries every one's customer filter, the catalog says which
//! is which, and a mapping the BI does not have stops the start.

use std::time::Duration;

use analytics_gateway::bi::protocol::CubeQuery;
use analytics_gateway::config::{Cli, Config};
use clap::Parser;
use serde_json::{Value, json};

use crate::common::{
    Sim, TestEnv, TestOptions, dashboard, error_code, expected_rows_with, input, panel_body,
    run_to_exit,
};
use crate::security::TempFile;

const TWO_CUBES: &str = r#"
[cubes.Sales]
timeDimension = "Sales.date"
customerMember = "Sales.customerId"

[cubes.Returns]
timeDimension = "Returns.returnedAt"
customerMember = "Returns.tenantId"
"#;

/// The configuration the gateways of a test run with (for expected rows).
fn config_with(file: &TempFile) -> Config {
    Config::from_cli(Cli::parse_from([
        "analytics-gateway",
        "--bi-cubes-file",
        &file.path_str(),
    ]))
    .expect("a valid configuration")
}

/// The queries bi-sim received, as the gateway sent them.
fn received(env: &TestEnv) -> Vec<CubeQuery> {
    env.sim
        .stats()
        .by_query
        .keys()
        .map(|key| serde_json::from_str(key).expect("a Cube query"))
        .collect()
}

fn customer_filters(query: &CubeQuery) -> Vec<String> {
    query
        .filters
        .iter()
        .filter(|f| f.operator == "equals" && f.values == ["acme"])
        .map(|f| f.member.clone())
        .collect()
}

/// One document with a Sales panel, a Returns panel and two panels that
/// join both cubes: the Returns panel is bucketed on `Returns.returnedAt`
/// and filtered on `Returns.tenantId`; each joining query carries both
/// customer filters; every panel answers bi-sim's rows; one BI request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_cubes_with_their_own_members_in_one_document() {
    let file = TempFile::new("cubes.toml", TWO_CUBES);
    let env = TestEnv::start(TestOptions::default().env("BI_CUBES_FILE", file.path_str())).await;
    env.wait_for_catalog().await;
    let config = config_with(&file);
    let (from, to) = ("2025-04-01", "2025-04-10");
    let panels = vec![
        input(
            "acme",
            from,
            to,
            &["Sales.revenue"],
            &["Sales.region"],
            Some("DAY"),
        ),
        input(
            "acme",
            from,
            to,
            &["Returns.count", "Returns.refund"],
            &["Returns.product"],
            Some("DAY"),
        ),
        input(
            "acme",
            from,
            to,
            &["Sales.orders"],
            &["Returns.product"],
            Some("DAY"),
        ),
        json!({
            "customer": "acme",
            "dateRange": {"from": from, "to": to},
            "measures": ["Returns.count"],
            "granularity": "DAY",
            "filters": [{"member": "Sales.region", "operator": "EQUALS", "values": ["EU"]}],
        }),
    ];

    let answer = env.gateway().graphql(&dashboard(&panels)).await;

    assert!(answer.get("errors").is_none(), "{answer}");
    for (i, panel) in panels.iter().enumerate() {
        let rows = &answer["data"][format!("p{i}")]["rows"];
        assert_eq!(*rows, expected_rows_with(&config, panel), "p{i}: {answer}");
        assert!(rows.as_array().is_some_and(|r| !r.is_empty()), "p{i}");
    }
    assert!(
        answer["data"]["p1"]["rows"][0]
            .get("Returns.returnedAt.day")
            .is_some(),
        "{answer}"
    );

    let queries = received(&env);
    assert_eq!(queries.len(), 4, "{queries:?}");
    let mut by_shape: Vec<(String, Vec<String>)> = queries
        .iter()
        .map(|q| (q.time_dimensions[0].dimension.clone(), customer_filters(q)))
        .collect();
    by_shape.sort();
    assert_eq!(
        by_shape,
        [
            (
                "Returns.returnedAt".to_owned(),
                vec!["Returns.tenantId".to_owned()]
            ),
            (
                "Returns.returnedAt".to_owned(),
                vec!["Returns.tenantId".to_owned(), "Sales.customerId".to_owned()]
            ),
            (
                "Sales.date".to_owned(),
                vec!["Returns.tenantId".to_owned(), "Sales.customerId".to_owned()]
            ),
            ("Sales.date".to_owned(), vec!["Sales.customerId".to_owned()]),
        ]
    );
    assert_eq!(env.sim.stats().http_requests, 1);
}

/// `catalog` says, per cube, which time dimension `dateRange` applies to
/// and whether it is tenant-scoped; with a cubes file it lists only the
/// cubes the file maps, and the others are refused before any BI call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_catalog_shows_each_cubes_time_dimension_and_tenancy() {
    let document = json!({"query": "{ catalog { cubes { name timeDimension tenantScoped timeDimensions { name } } } }"});
    let cubes = |answer: &Value| -> Vec<Value> {
        answer["data"]["catalog"]["cubes"]
            .as_array()
            .unwrap_or_else(|| panic!("cubes: {answer}"))
            .iter()
            .map(|cube| json!([cube["name"], cube["timeDimension"], cube["tenantScoped"]]))
            .collect()
    };

    let uniform = TestEnv::start(TestOptions::default()).await;
    let answer = uniform.gateway().graphql(&document).await;
    assert_eq!(
        cubes(&answer),
        [
            json!(["Sales", "Sales.date", true]),
            json!(["Returns", "Sales.date", true])
        ],
        "without a file, BI_TIME_DIMENSION and BI_CUSTOMER_MEMBER apply to every cube"
    );

    let file = TempFile::new(
        "cubes.json",
        r#"{"cubes": {"Sales": {"timeDimension": "Sales.date", "customerMember": "Sales.customerId"},
                      "Returns": {"timeDimension": "Returns.returnedAt", "tenantScoped": false}}}"#,
    );
    let mapped = TestEnv::start(TestOptions::default().env("BI_CUBES_FILE", file.path_str())).await;
    let answer = mapped.gateway().graphql(&document).await;
    assert_eq!(
        cubes(&answer),
        [
            json!(["Sales", "Sales.date", true]),
            json!(["Returns", "Returns.returnedAt", false])
        ],
        "{answer}"
    );
    let returns = &answer["data"]["catalog"]["cubes"][1]["timeDimensions"][0]["name"];
    assert_eq!(*returns, "Returns.returnedAt");

    let sales_only = TempFile::new(
        "sales.toml",
        "[cubes.Sales]\ntimeDimension = \"Sales.date\"\ncustomerMember = \"Sales.customerId\"\n",
    );
    let narrow =
        TestEnv::start(TestOptions::default().env("BI_CUBES_FILE", sales_only.path_str())).await;
    let answer = narrow.gateway().graphql(&document).await;
    assert_eq!(cubes(&answer), [json!(["Sales", "Sales.date", true])]);
    for panel in [
        input(
            "acme",
            "2025-04-01",
            "2025-04-02",
            &["Returns.count"],
            &[],
            None,
        ),
        input(
            "acme",
            "2025-04-01",
            "2025-04-02",
            &["Sales.orders"],
            &["Returns.product"],
            None,
        ),
    ] {
        let answer = narrow.gateway().graphql(&panel_body(panel)).await;
        assert_eq!(error_code(&answer), Some("BAD_USER_INPUT"), "{answer}");
        let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(message.contains("Returns"), "{message}");
    }
    assert_eq!(narrow.sim.stats().queries, 0);
}

/// A mapping whose members the BI's `/meta` does not have stops the start
/// with an error that names every one of them and the setting; JSON and
/// TOML alike; and so does a `BI_CUSTOMER_MEMBER` the BI lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mapping_the_bi_does_not_have_stops_the_start_naming_the_members() {
    let sim = Sim::start(Duration::ZERO).await;
    let toml = TempFile::new(
        "typo.toml",
        "[cubes.Sales]\ntimeDimension = \"Sales.when\"\ncustomerMember = \"Sales.customerId\"\n\n\
         [cubes.Returns]\ntimeDimension = \"Returns.returnedAt\"\ncustomerMember = \"Returns.tenantd\"\n",
    );
    let json = TempFile::new(
        "typo.json",
        r#"{"cubes": {"Refunds": {"timeDimension": "Refunds.at", "customerMember": "Refunds.tenant"}}}"#,
    );
    // (settings, what the error names)
    type Case<'a> = (Vec<(&'a str, String)>, Vec<&'a str>);
    let cases: Vec<Case<'_>> = vec![
        (
            vec![("BI_CUBES_FILE", toml.path_str())],
            vec!["BI_CUBES_FILE", "Sales.when", "Returns.tenantd"],
        ),
        (
            vec![("BI_CUBES_FILE", json.path_str())],
            vec!["BI_CUBES_FILE", "no cube `Refunds`"],
        ),
        (
            vec![("BI_CUSTOMER_MEMBER", "Sales.tenant".to_owned())],
            vec!["BI_CUSTOMER_MEMBER", "Sales.tenant"],
        ),
        (
            vec![("BI_TIME_DIMENSION", "Sales.region".to_owned())],
            vec!["BI_TIME_DIMENSION", "not time"],
        ),
    ];
    for (settings, named) in cases {
        let mut env = vec![
            ("GATEWAY_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("BI_URL".to_owned(), sim.base_url()),
        ];
        env.extend(settings.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let (status, output) = run_to_exit(&env).await;
        assert!(!status.success(), "{settings:?} started: {output}");
        for name in named {
            assert!(
                output.contains(name),
                "{settings:?}: `{name}` not in: {output}"
            );
        }
    }
}
