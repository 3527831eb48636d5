//! The cache is per customer: it never answers one tenant with another's rows.

use serde_json::Value;

use crate::common::{TestEnv, TestOptions, expected_rows, panel};

const MEASURES: &[&str] = &["Sales.revenue", "Sales.orders"];

/// Interleaved concurrent requests of `acme` and `globex` for the same
/// measures and range each get their own customer's rows, under two different
/// cache keys, from exactly two BI queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn customers_never_share_cached_rows() {
    let env = TestEnv::start(TestOptions::default()).await;
    let customers = ["acme", "globex"];
    let expected: Vec<Value> = customers
        .iter()
        .map(|c| {
            expected_rows(
                c,
                "2025-01-01",
                "2025-01-31",
                MEASURES,
                &["Sales.region"],
                Some("WEEK"),
            )
        })
        .collect();
    assert_ne!(
        expected[0], expected[1],
        "the data must tell the customers apart"
    );
    let bodies: Vec<Value> = (0..40)
        .map(|i| {
            panel(
                customers[i % 2],
                "2025-01-01",
                "2025-01-31",
                MEASURES,
                &["Sales.region"],
                Some("WEEK"),
            )
        })
        .collect();

    let answers = env.fire_all(&bodies).await;

    let mut keys: [Vec<String>; 2] = Default::default();
    for (i, answer) in answers.iter().enumerate() {
        assert!(answer.get("errors").is_none(), "{answer}");
        let aggregate = &answer["data"]["aggregate"];
        assert_eq!(
            aggregate["rows"],
            expected[i % 2],
            "request {i} ({})",
            customers[i % 2]
        );
        keys[i % 2].push(
            aggregate["cache"]["key"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    for customer_keys in &keys {
        assert!(
            customer_keys
                .iter()
                .all(|k| !k.is_empty() && *k == customer_keys[0]),
            "{keys:?}"
        );
    }
    assert_ne!(keys[0][0], keys[1][0]);
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());

    // The cached entries keep them apart too.
    for (customer, rows) in customers.iter().zip(&expected) {
        let body = panel(
            customer,
            "2025-01-01",
            "2025-01-31",
            MEASURES,
            &["Sales.region"],
            Some("WEEK"),
        );
        let answer = env.gateway().graphql(&body).await;
        assert_eq!(
            answer["data"]["aggregate"]["cache"]["status"], "HIT",
            "{answer}"
        );
        assert_eq!(answer["data"]["aggregate"]["rows"], *rows, "{customer}");
    }
    assert_eq!(env.sim.stats().queries, 2);
}
