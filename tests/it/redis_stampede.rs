//! Several gateway instances sharing one Redis: each distinct question reaches
//! the BI once across all of them, every answer is right, and what they leave
//! in Redis follows the documented key layout.

use serde_json::Value;

use serde_json::json;

use crate::common::{
    LAYOUT, PATIENT_REDIS_TIMEOUT_MS, Statuses, TestEnv, TestOptions, expected_rows_for,
    panel_and_rows, panel_body, query, respelt, statuses,
};

const MEASURES: &[&str] = &["Sales.revenue", "Sales.orders"];
const DIMENSIONS: &[&str] = &["Sales.region"];
const FROM: &str = "2025-03-01";
const TO: &str = "2025-03-31";

/// The contract's panel for `customer`, and the rows the BI has for it.
fn question(customer: &str) -> (Value, Value) {
    panel_and_rows(customer, FROM, TO, MEASURES, DIMENSIONS, Some("DAY"))
}

/// 300 concurrent identical requests spread over three instances make exactly
/// one BI query: one answer is the MISS that made it, the other 299 (on every
/// instance) COALESCED onto it, all with the BI's rows. Five such stampedes on
/// fresh keys never cost any key a second query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_over_three_instances_makes_one_bi_query() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(2_000)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    // Connection set-up is not what this test is about: with the connections
    // open, the 300 requests reach the gateways well within the BI's latency.
    env.warm_up(100).await;

    for round in 0..5_u64 {
        let (body, expected) = question(&format!("stampede-{round}"));
        assert!(expected.as_array().is_some_and(|rows| !rows.is_empty()));

        let answers = env.fire(300, &body).await;

        assert_eq!(
            statuses(&answers, &expected),
            Statuses {
                miss: 1,
                coalesced: 299,
                hit: 0
            },
            "round {round}\n{}",
            env.logs()
        );
        let stats = env.sim.stats();
        assert_eq!(stats.queries, round + 1, "round {round}: {stats:?}");
        assert!(
            stats.by_query.values().all(|&count| count == 1),
            "round {round}: a key was asked twice: {stats:?}"
        );
    }
}

/// The same stampede with filters, an order, a limit and a timezone set,
/// each request spelling the question its own way (filters and values in
/// other orders, the timezone in lower case): one BI query, one MISS, 299
/// COALESCED, every answer bi-sim's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refined_stampede_over_three_instances_makes_one_bi_query() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(2_000)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    env.warm_up(100).await;
    let input = json!({
        "customer": "refined-stampede",
        "dateRange": {"from": FROM, "to": TO},
        "measures": MEASURES,
        "dimensions": DIMENSIONS,
        "granularity": "DAY",
        "filters": [
            {"member": "Sales.region", "operator": "NOT_EQUALS", "values": ["APAC", "NA"]},
            {"member": "Sales.orders", "operator": "GTE", "values": ["10"]},
        ],
        "order": [{"member": "Sales.revenue", "direction": "DESC"}],
        "limit": 20,
        "timezone": "Europe/Berlin",
    });
    let expected = expected_rows_for(&input);
    assert!(expected.as_array().is_some_and(|rows| !rows.is_empty()));
    let bodies: Vec<Value> = (0..300).map(|i| panel_body(respelt(&input, i))).collect();

    let answers = env.fire_all(&bodies).await;

    assert_eq!(
        statuses(&answers, &expected),
        Statuses {
            miss: 1,
            coalesced: 299,
            hit: 0
        },
        "{}",
        env.logs()
    );
    let stats = env.sim.stats();
    assert_eq!(stats.queries, 1, "{stats:?}");
}

/// 20 different questions asked 15 times each, all at once and shuffled over
/// three instances, make exactly 20 BI queries (one per question, so one MISS
/// each), and every request gets its own question's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_keys_make_one_bi_query_each() {
    const KEYS: usize = 20;
    const PER_KEY: usize = 15;
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(1_000)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let questions: Vec<(Value, Value)> = (0..KEYS)
        .map(|k| question(&format!("distinct-{k}")))
        .collect();
    // A fixed seed: a failure can be replayed with the same interleaving.
    let mut rng = fastrand::Rng::with_seed(20_250_301);
    let mut order: Vec<usize> = (0..KEYS * PER_KEY).map(|i| i % KEYS).collect();
    rng.shuffle(&mut order);
    let requests: Vec<(usize, Value)> = order
        .iter()
        .map(|&k| (rng.usize(..env.gateways.len()), questions[k].0.clone()))
        .collect();

    let answers = env.fire_on(&requests).await;

    for (k, (_, expected)) in questions.iter().enumerate() {
        let of_key: Vec<Value> = order
            .iter()
            .zip(&answers)
            .filter(|(key, _)| **key == k)
            .map(|(_, answer)| answer.clone())
            .collect();
        // A request that a loaded machine delivers after its key was filled
        // is rightly a HIT; the one BI call is the one MISS.
        let counted = statuses(&of_key, expected);
        assert_eq!(counted.miss, 1, "question {k}: {counted:?}\n{}", env.logs());
    }
    let stats = env.sim.stats();
    assert_eq!(stats.queries, KEYS as u64, "{stats:?}");
    assert_eq!(stats.by_query.len(), KEYS, "{stats:?}");
    assert!(
        stats.by_query.values().all(|&count| count == 1),
        "{stats:?}"
    );
}

/// Interleaved concurrent requests of two customers for the same measures,
/// spread over three instances, each get their own customer's rows (never
/// the other's, whichever instance produced them), from exactly two BI queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn customers_never_share_entries_across_instances() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(500)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let customers = ["acme", "globex"];
    let questions: Vec<(Value, Value)> = customers.iter().map(|c| question(c)).collect();
    assert_ne!(
        questions[0].1, questions[1].1,
        "the data must tell the customers apart"
    );
    // Customer i % 2 on gateway i % 3: each instance serves both customers.
    let requests: Vec<(usize, Value)> = (0..60)
        .map(|i| (i % 3, questions[i % 2].0.clone()))
        .collect();

    let answers = env.fire_on(&requests).await;

    for (c, (_, expected)) in questions.iter().enumerate() {
        let of_customer: Vec<Value> = answers.iter().skip(c).step_by(2).cloned().collect();
        // One BI call each: one MISS each (a request that a loaded machine
        // delivers after the fill is rightly a HIT).
        let counted = statuses(&of_customer, expected);
        assert_eq!(counted.miss, 1, "{}\n{}", customers[c], env.logs());
    }
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());

    // Their entries in Redis keep them apart too: asked again anywhere, each
    // customer gets its own rows without another BI query.
    for gateway in &env.gateways {
        for (body, expected) in &questions {
            let answer = gateway.graphql(body).await;
            let counted = statuses(std::slice::from_ref(&answer), expected);
            assert_eq!(counted.hit, 1, "{answer}");
        }
    }
    assert_eq!(env.sim.stats().queries, 2);
}

/// After a miss, Redis holds the answer as the architecture lays it out: one
/// `{ns}:v3:{<64 hex>}:value` key whose PTTL is about `CACHE_TTL_SECS` plus
/// `CACHE_STALE_SECS` (the entry's only expiry: instances never compare wall
/// clocks), holding the entry's id and JSON with the rows and the producing
/// instance, and no lock left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_leaves_a_value_entry_and_no_lock() {
    const FRESH_MS: i64 = 90_000;
    const STALE_MS: i64 = 30_000;
    const TTL_MS: i64 = FRESH_MS + STALE_MS;
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .env("CACHE_TTL_SECS", FRESH_MS / 1_000)
            .env("CACHE_STALE_SECS", STALE_MS / 1_000)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let (body, expected) = question("entries");

    let answer = env.gateways[1].graphql(&body).await;
    assert_eq!(
        statuses(std::slice::from_ref(&answer), &expected).miss,
        1,
        "{answer}"
    );

    let values = env.redis_keys("value").await;
    assert_eq!(values.len(), 1, "{values:?}");
    let value_key = &values[0];
    let hash = value_key
        .strip_prefix(&format!("{}:{LAYOUT}:{{", env.namespace))
        .and_then(|rest| rest.strip_suffix("}:value"))
        .unwrap_or_else(|| panic!("not `{{ns}}:{LAYOUT}:{{<hash>}}:value`: {value_key}"));
    assert!(
        hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "the hash is 64 hex digits: {hash}"
    );

    let mut conn = env.redis().await;
    let pttl: i64 = query(&mut conn, redis::cmd("PTTL").arg(value_key)).await;
    // Generous below (a slow machine), exact above: never longer than the TTL.
    assert!(
        (TTL_MS - 30_000..=TTL_MS).contains(&pttl),
        "PTTL {pttl} ms, CACHE_TTL_SECS + CACHE_STALE_SECS is {} s",
        TTL_MS / 1_000
    );
    let stored: String = query(&mut conn, redis::cmd("GET").arg(value_key)).await;
    // The entry's id (32 hex digits), then its JSON.
    let (id, json) = stored.split_at(32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{stored}");
    let stored: Value = serde_json::from_str(json).expect("the value is JSON");
    assert_eq!(stored["rows"], expected, "{stored}");
    assert_eq!(
        stored["producer"],
        env.gateways[1].instance_id(),
        "{stored}"
    );
    assert!(stored["producedAtUs"].as_u64().is_some(), "{stored}");
    assert_eq!(stored["staleMs"], STALE_MS, "{stored}");
    assert!(
        stored.get("expiresAtMs").is_none(),
        "no wall-clock expiry: {stored}"
    );

    let lock_key = format!("{}:{LAYOUT}:{{{hash}}}:lock", env.namespace);
    let lock_exists: i64 = query(&mut conn, redis::cmd("EXISTS").arg(&lock_key)).await;
    assert_eq!(lock_exists, 0, "{lock_key} is left behind");
    assert_eq!(env.redis_keys("lock").await, Vec::<String>::new());

    // The other instance answers from that entry, without a BI query.
    let again = env.gateways[0].graphql(&body).await;
    assert_eq!(
        statuses(std::slice::from_ref(&again), &expected).hit,
        1,
        "{again}"
    );
    assert_eq!(env.sim.stats().queries, 1);
}
