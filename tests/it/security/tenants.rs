//! Tenant isolation with authentication on and Redis shared by several
//! instances: each caller sees only the customers its credential names, and
//! no cache entry, flight or configuration is ever shared across that line.

use std::time::Duration;

use analytics_gateway::config::Config;
use analytics_gateway::cubes::CubeMap;
use analytics_gateway::query::{AggregateQuery, Granularity, Member, Planner, RawAggregate};
use analytics_gateway::sim;
use futures_util::future::join_all;
use serde_json::{Value, json};

use super::{JWT_SECRET, assert_refused, bearer, client, graphql_as, token_for};
use crate::common::{
    Gateway, REQUEST_TIMEOUT, Statuses, TestEnv, TestOptions, panel, panel_and_rows, statuses,
    wait_until, within,
};

const MEASURES: &[&str] = &["Sales.revenue", "Sales.orders"];
const DIMENSIONS: &[&str] = &["Sales.product"];
const FROM: &str = "2025-05-01";
const TO: &str = "2025-05-21";

fn question(customer: &str) -> (Value, Value) {
    panel_and_rows(customer, FROM, TO, MEASURES, DIMENSIONS, Some("WEEK"))
}

fn authenticated(options: TestOptions) -> TestOptions {
    options.env("AUTH_JWT_SECRET", JWT_SECRET)
}

/// 1,000 concurrent requests alternating between `acme` and `globex` (same
/// measures and range), each with a token for its own customer only, spread
/// over three instances sharing Redis: every answer is that customer's own
/// rows, from exactly one BI query per customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_interleaved_requests_each_get_their_own_customers_rows() {
    const N: usize = 1_000;
    let env = TestEnv::start(authenticated(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(1_000),
    ))
    .await;
    let customers = ["acme", "globex"];
    let questions: Vec<(Value, Value)> = customers.iter().map(|c| question(c)).collect();
    assert_ne!(
        questions[0].1, questions[1].1,
        "the data must tell the customers apart"
    );
    let tokens: Vec<[(String, String); 1]> = customers
        .iter()
        .map(|c| [bearer(&token_for(&format!("user-of-{c}"), json!([c])))])
        .collect();
    let http = client();

    // Request i is customer i % 2 on gateway i % 3: every instance serves both.
    let requests = (0..N).map(|i| {
        graphql_as(
            &http,
            &env.gateways[i % 3],
            &tokens[i % 2],
            &questions[i % 2].0,
        )
    });
    let answers = within(REQUEST_TIMEOUT, "1,000 answers", join_all(requests)).await;

    for (c, (_, expected)) in questions.iter().enumerate() {
        let of_customer: Vec<Value> = answers.iter().skip(c).step_by(2).cloned().collect();
        assert_eq!(of_customer.len(), N / 2);
        let counted = statuses(&of_customer, expected);
        assert_eq!(counted.miss, 1, "{}: {counted:?}", customers[c]);
    }
    let stats = env.sim.stats();
    assert_eq!(stats.queries, 2, "{stats:?}");
    assert!(stats.by_query.values().all(|&n| n == 1), "{stats:?}");
}

/// A token for `globex` asking for `acme` is `FORBIDDEN` while `acme`'s
/// answer is being produced (its leader's BI call in flight, with other
/// `acme` requests coalescing onto it) and while it is cached, on every
/// instance: never `COALESCED`, never `HIT`, and never a BI query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tenants_token_is_forbidden_while_in_flight_and_cached() {
    let env = TestEnv::start(authenticated(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(1_500),
    ))
    .await;
    let (acme_body, acme_rows) = question("acme");
    let acme = [bearer(&token_for("alice", json!(["acme"])))];
    let globex = [bearer(&token_for("bob", json!(["globex", "initech"])))];
    let http = client();

    // acme's leader: its BI call takes 1.5 s.
    let leader = {
        let (http, url, body, headers) = (
            http.clone(),
            env.gateways[0].url(),
            acme_body.clone(),
            acme.clone(),
        );
        tokio::spawn(async move {
            let mut request = http.post(format!("{url}/graphql")).json(&body);
            for (name, value) in &headers {
                request = request.header(name, value);
            }
            let response = request.send().await.expect("the leader's request");
            response.json::<Value>().await.expect("a JSON answer")
        })
    };
    wait_until(
        Duration::from_secs(20),
        "acme's BI call to start",
        || async { env.sim.stats().queries == 1 },
    )
    .await;

    // While it is in flight: bob, on every instance, several times.
    let forbidden = (0..9).map(|i| graphql_as(&http, &env.gateways[i % 3], &globex, &acme_body));
    let forbidden = within(REQUEST_TIMEOUT, "bob's answers", join_all(forbidden)).await;
    for (i, answer) in forbidden.iter().enumerate() {
        assert_refused(answer, "FORBIDDEN", &format!("bob in flight #{i}"));
    }
    // The flight was still on after bob's answers: alice, asking now on
    // another instance, joins it.
    let joined = graphql_as(&http, &env.gateways[1], &acme, &acme_body).await;
    assert_eq!(
        statuses(std::slice::from_ref(&joined), &acme_rows),
        Statuses {
            miss: 0,
            coalesced: 1,
            hit: 0
        },
        "acme's flight ended before bob's answers came back (a very slow machine?): {joined}"
    );
    let led = within(REQUEST_TIMEOUT, "acme's leader", leader)
        .await
        .expect("the leader task does not panic");
    assert_eq!(
        statuses(std::slice::from_ref(&led), &acme_rows).miss,
        1,
        "{led}"
    );

    // While it is cached: bob is still forbidden everywhere; alice hits.
    for gateway in &env.gateways {
        for _ in 0..3 {
            let answer = graphql_as(&http, gateway, &globex, &acme_body).await;
            assert_refused(&answer, "FORBIDDEN", "bob while cached");
        }
        let hit = graphql_as(&http, gateway, &acme, &acme_body).await;
        assert_eq!(
            statuses(std::slice::from_ref(&hit), &acme_rows).hit,
            1,
            "{hit}"
        );
    }
    // In a dashboard beside his own panel, too: his panel is answered, acme's
    // is refused on its own.
    let (globex_body, globex_rows) = question("globex");
    let mixed = json!({
        "query": "query($a: AggregateInput!, $g: AggregateInput!) { a: aggregate(input: $a) { rows cache { status } } g: aggregate(input: $g) { rows cache { status } } }",
        "variables": {"a": acme_body["variables"]["input"], "g": globex_body["variables"]["input"]},
    });
    let answer = graphql_as(&http, &env.gateways[2], &globex, &mixed).await;
    assert!(answer["data"]["a"].is_null(), "{answer}");
    assert_eq!(answer["data"]["g"]["rows"], globex_rows, "{answer}");
    assert_eq!(
        super::codes(&answer),
        ["FORBIDDEN"],
        "only acme's panel is refused: {answer}"
    );

    let stats = env.sim.stats();
    assert_eq!(stats.queries, 2, "only acme's and globex's own: {stats:?}");
}

/// The rows bi-sim returns for `customer` when the gateway filters on
/// `customer_member` (`BI_CUSTOMER_MEMBER`).
fn rows_filtered_on(customer_member: &str, customer: &str) -> Value {
    let mut config = Config::embedded_defaults();
    let member = |name: &str| Member::parse(name).expect("a member");
    config.query.cubes = std::sync::Arc::new(CubeMap::uniform(
        member("Sales.date"),
        member(customer_member),
    ));
    let measures: Vec<String> = MEASURES.iter().map(|m| (*m).to_owned()).collect();
    let query = AggregateQuery::parse(
        RawAggregate {
            customer,
            from: FROM,
            to: TO,
            measures: &measures,
            dimensions: &[],
            granularity: Some(Granularity::Day),
        },
        &config.query,
        None,
    )
    .expect("a valid query");
    let planned = Planner::new(config.planner, "expected-rows").plan(&query);
    serde_json::to_value(sim::answer(&planned.cube).expect("bi-sim answers")).expect("JSON rows")
}

/// Two gateways on one Redis and one namespace, in front of the same BI,
/// that differ in one setting that changes the answer: `BI_CUSTOMER_MEMBER`
/// (`Sales.customerId`, `Sales.region`: the same `customer: "EU"` is another
/// tenant), `BI_TOKEN` (a Cube token carries a security context) or
/// `BI_ROW_LIMIT`. The second gateway's answers are never served from the
/// first's entry (0 cross-configuration hits): each makes its own BI query
/// and gets its own rows, while a third gateway configured like the first
/// does hit the first's entry (so the Redis is really shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn differently_configured_gateways_never_share_entries() {
    let cases = [
        ("BI_CUSTOMER_MEMBER", "Sales.customerId", "Sales.region"),
        (
            "BI_TOKEN",
            "Bearer token-of-tenant-a",
            "Bearer token-of-tenant-b",
        ),
        ("BI_ROW_LIMIT", "10000", "9999"),
    ];
    let body = panel("EU", FROM, TO, MEASURES, &[], Some("DAY"));
    let customer_rows = rows_filtered_on("Sales.customerId", "EU");
    let region_rows = rows_filtered_on("Sales.region", "EU");
    assert_ne!(customer_rows, region_rows, "the filters must tell apart");

    for (variable, first_value, second_value) in cases {
        let env = TestEnv::start(
            TestOptions::default()
                .redis()
                .latency_ms(200)
                .env(variable, first_value),
        )
        .await;
        let start = |value: &str, id: &str| {
            let settings: Vec<(String, String)> = [
                ("GATEWAY_LISTEN", "127.0.0.1:0".to_owned()),
                ("BI_URL", env.sim.base_url()),
                ("CACHE_NAMESPACE", env.namespace.clone()),
                (
                    "REDIS_URL",
                    env.redis_url.clone().expect("the env has a Redis"),
                ),
                ("INSTANCE_ID", id.to_owned()),
                (variable, value.to_owned()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            async move { Gateway::start(&settings).await }
        };
        let second = start(second_value, "second").await;
        let like_the_first = start(first_value, "like-the-first").await;
        let second_rows = if variable == "BI_CUSTOMER_MEMBER" {
            &region_rows
        } else {
            &customer_rows
        };

        let first = env.gateway().graphql(&body).await;
        assert_eq!(
            statuses(std::slice::from_ref(&first), &customer_rows).miss,
            1,
            "{variable}: {first}"
        );
        for round in 0..3 {
            let answer = second.graphql(&body).await;
            let counted = statuses(std::slice::from_ref(&answer), second_rows);
            assert_eq!(
                counted.hit + counted.coalesced,
                usize::from(round > 0),
                "{variable}, round {round}: {answer}"
            );
        }
        let third = like_the_first.graphql(&body).await;
        assert_eq!(
            statuses(std::slice::from_ref(&third), &customer_rows).hit,
            1,
            "{variable}: a gateway configured like the first shares its entry: {third}"
        );

        let stats = env.sim.stats();
        assert_eq!(stats.queries, 2, "{variable}: {stats:?}");
        assert_eq!(env.redis_keys("value").await.len(), 2, "{variable}");
    }
}
