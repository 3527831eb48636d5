//! Many identical questions at once reach the BI once.

use crate::common::{TestEnv, TestOptions, expected_rows, panel};

const MEASURES: &[&str] = &["Sales.revenue", "Sales.orders"];
const DIMENSIONS: &[&str] = &["Sales.region"];

/// 200 concurrent identical requests on a cold cache make exactly one BI
/// query: one answer is the MISS that made it, the other 199 COALESCED onto
/// it, all with the BI's rows; the next request is a HIT without a BI call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_identical_requests_make_one_bi_query() {
    // The BI must stay busy while 200 requests arrive on two shared cores:
    // a request arriving after the fill is rightly a HIT, not a COALESCED.
    let env = TestEnv::start(TestOptions::default().latency_ms(1_500)).await;
    let body = panel(
        "acme",
        "2025-01-01",
        "2025-01-31",
        MEASURES,
        DIMENSIONS,
        Some("DAY"),
    );
    let expected = expected_rows(
        "acme",
        "2025-01-01",
        "2025-01-31",
        MEASURES,
        DIMENSIONS,
        Some("DAY"),
    );
    assert!(expected.as_array().is_some_and(|rows| !rows.is_empty()));

    env.warm_up(200).await;
    let answers = env.fire(200, &body).await;

    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
    let mut statuses = Vec::new();
    for answer in &answers {
        assert!(answer.get("errors").is_none(), "{answer}");
        assert_eq!(answer["data"]["aggregate"]["rows"], expected);
        statuses.push(
            answer["data"]["aggregate"]["cache"]["status"]
                .as_str()
                .unwrap_or("none"),
        );
    }
    let count = |status: &str| statuses.iter().filter(|s| **s == status).count();
    assert_eq!(
        (count("MISS"), count("COALESCED")),
        (1, 199),
        "{statuses:?}"
    );

    let again = env.gateway().graphql(&body).await;
    assert_eq!(
        again["data"]["aggregate"]["cache"]["status"], "HIT",
        "{again}"
    );
    assert_eq!(again["data"]["aggregate"]["rows"], expected);
    assert_eq!(env.sim.stats().queries, 1);
}
