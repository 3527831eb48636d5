//! The cache of whole responses (`RESPONSE_CACHE_MAX_MB`): a repeated
//! identical POST is answered with the bytes of the last one while every
//! entry behind it is unchanged and fresh, with the same statuses, metrics
//! and access checks as an executed one, and never once anything changed.

use std::time::Duration;

use analytics_gateway::telemetry::names;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{
    Gateway, TestEnv, TestOptions, dashboard, error_code, input, metric, panel, panel_body,
    wait_until,
};
use crate::security::{JWT_SECRET, bearer, client, graphql_as, post, sign, token_for};

const ADMIN_TOKEN: &str = "admin-token-for-response-tests";

fn acme_panel(to: &str) -> Value {
    panel(
        "acme",
        "2025-02-01",
        to,
        &["Sales.revenue", "Sales.orders"],
        &["Sales.region"],
        Some("DAY"),
    )
}

/// The raw body of one POST, as bytes went over the wire.
async fn raw(gateway: &Gateway, body: &Value) -> String {
    let response = gateway.post_raw("/graphql", body.to_string()).await;
    assert_eq!(response.status().as_u16(), 200);
    response.text().await.expect("a body")
}

/// The gateway's `/metrics` text.
async fn metrics(gateway: &Gateway) -> String {
    gateway
        .get("/metrics")
        .await
        .text()
        .await
        .expect("a text body")
}

fn outcome(text: &str, outcome: &str) -> f64 {
    metric(text, names::RESPONSE_CACHE, &[("outcome", outcome)]).unwrap_or(0.0)
}

fn lookups(text: &str, status: &str) -> f64 {
    metric(text, names::CACHE_LOOKUPS, &[("status", status)]).unwrap_or(0.0)
}

/// A panel and an 8-panel dashboard asked four times each: MISS, then HIT
/// executed (and kept), then HIT served again, byte for byte the same answer,
/// with one `hit` lookup counted per field exactly as when executed, and the
/// BI asked once per distinct question. A document that asks for
/// `ageSeconds` is never kept (its answer moves with the clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_posts_are_served_again_with_exact_statuses_and_counts() {
    let env = TestEnv::start(TestOptions::default().latency_ms(20)).await;
    let gateway = env.gateway();

    let body = acme_panel("2025-02-10");
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(raw(gateway, &body).await);
    }
    let statuses: Vec<Value> = answers
        .iter()
        .map(|text| {
            let answer: Value = serde_json::from_str(text).expect("JSON");
            answer["data"]["aggregate"]["cache"]["status"].clone()
        })
        .collect();
    assert_eq!(statuses, ["MISS", "HIT", "HIT", "HIT"]);
    assert_eq!(answers[2], answers[1]);
    assert_eq!(answers[3], answers[1]);
    let text = metrics(gateway).await;
    assert_eq!(
        (outcome(&text, "stored"), outcome(&text, "served")),
        (1.0, 2.0),
        "{text}"
    );
    assert_eq!((lookups(&text, "miss"), lookups(&text, "hit")), (1.0, 3.0));

    // A dashboard: each of its 8 fields counts one hit when served again.
    let inputs: Vec<Value> = (1..=8)
        .map(|day| {
            input(
                "acme",
                "2025-03-01",
                &format!("2025-03-{:02}", day + 1),
                &["Sales.orders"],
                &[],
                Some("DAY"),
            )
        })
        .collect();
    let board = dashboard(&inputs);
    let first = raw(gateway, &board).await;
    assert!(!first.contains("\"errors\""), "{first}");
    let executed = raw(gateway, &board).await;
    let served = raw(gateway, &board).await;
    assert_eq!(served, executed);
    assert_eq!(executed.matches("\"HIT\"").count(), 8, "{executed}");
    let text = metrics(gateway).await;
    assert_eq!(
        (outcome(&text, "stored"), outcome(&text, "served")),
        (2.0, 3.0)
    );
    assert_eq!((lookups(&text, "miss"), lookups(&text, "hit")), (9.0, 19.0));
    assert_eq!(env.sim.stats().queries, 9, "{:?}", env.sim.stats());

    // The clock in the document: executed every time.
    let aged = json!({
        "query": "query Aged($input: AggregateInput!) { aggregate(input: $input) { rows cache { status ageSeconds } } }",
        "variables": {"input": body["variables"]["input"]},
    });
    let mut ages = Vec::new();
    for _ in 0..3 {
        let answer = gateway.graphql(&aged).await;
        assert_eq!(answer["data"]["aggregate"]["cache"]["status"], "HIT");
        ages.push(answer["data"]["aggregate"]["cache"]["ageSeconds"].as_f64());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ages[2] > ages[0], "{ages:?}");
    let text = metrics(gateway).await;
    assert_eq!(outcome(&text, "stored"), 2.0, "{text}");

    // A persisted query is executed every time: its document may be gone
    // from the persisted store (PERSISTED_QUERY_NOT_FOUND), which only
    // execution asks.
    let document = "query Kept($input: AggregateInput!) { aggregate(input: $input) { rows cache { status } } }";
    let hash: String = Sha256::digest(document.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let extensions = json!({"persistedQuery": {"version": 1, "sha256Hash": hash}});
    let registering =
        json!({"query": document, "variables": body["variables"], "extensions": extensions});
    let hash_only = json!({"variables": body["variables"], "extensions": extensions});
    for request in [
        &registering,
        &registering,
        &hash_only,
        &hash_only,
        &hash_only,
    ] {
        let answer = gateway.graphql(request).await;
        assert_eq!(
            answer["data"]["aggregate"]["cache"]["status"], "HIT",
            "{answer}"
        );
    }
    let text = metrics(gateway).await;
    assert_eq!(
        (outcome(&text, "stored"), outcome(&text, "served")),
        (2.0, 3.0),
        "{text}"
    );
}

/// A kept answer is never served once an entry behind it changed: an
/// invalidation makes the next answer stale (executed: `outdated`), the
/// refresh's entry is what follows (a new `producedAt`), on every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_entry_makes_the_kept_answer_outdated() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .latency_ms(100)
            .env("CACHE_TTL_SECS", 300)
            .env("ADMIN_TOKEN", ADMIN_TOKEN),
    )
    .await;
    let query = "query Fresh($input: AggregateInput!) { aggregate(input: $input) { rows cache { status stale producedAt } } }";
    let body = json!({"query": query, "variables": acme_panel("2025-02-12")["variables"]});
    let cache = |answer: &Value| answer["data"]["aggregate"]["cache"].clone();
    let mut produced = None;
    // The first instance's first answer is its BI call's (MISS), the second
    // instance's is Redis's (a HIT, kept at once).
    for (gateway, served) in env.gateways.iter().zip([1.0, 2.0]) {
        for _ in 0..3 {
            let answer = gateway.graphql(&body).await;
            assert!(answer.get("errors").is_none(), "{answer}");
            produced.get_or_insert(cache(&answer)["producedAt"].clone());
            assert_eq!(
                cache(&answer)["producedAt"],
                *produced.as_ref().expect("set")
            );
        }
        let text = metrics(gateway).await;
        assert_eq!(outcome(&text, "served"), served, "{text}");
    }
    let produced = produced.expect("answers");

    let response = reqwest::Client::new()
        .post(format!("{}/admin/invalidate", env.gateway().url()))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .json(&json!({"customer": "acme"}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status().as_u16(), 200);

    for gateway in &env.gateways {
        // Within a second every instance knows; from then on, never the kept answer.
        wait_until(
            Duration::from_secs(5),
            "the invalidation to arrive",
            || async {
                let answer = gateway.graphql(&body).await;
                cache(&answer)["stale"] == true || cache(&answer)["producedAt"] != produced
            },
        )
        .await;
    }
    wait_until(Duration::from_secs(5), "the refresh to land", || async {
        let answer = env.gateways[1].graphql(&body).await;
        cache(&answer)["producedAt"] != produced && cache(&answer)["stale"] == false
    })
    .await;
    for gateway in &env.gateways {
        for _ in 0..3 {
            let answer = gateway.graphql(&body).await;
            assert_ne!(cache(&answer)["producedAt"], produced, "{answer}");
        }
        let text = metrics(gateway).await;
        assert!(outcome(&text, "outdated") >= 1.0, "{text}");
    }
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());
}

/// An answer kept for one caller is never given to another that may not see
/// it: the same body from a token for another customer is `FORBIDDEN`, from
/// an expired token `UNAUTHENTICATED`; a token for the same customers (its
/// scope) gets the kept answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_answers_stay_within_the_callers_scope() {
    let env = TestEnv::start(TestOptions::default().env("AUTH_JWT_SECRET", JWT_SECRET)).await;
    let gateway = env.gateway();
    let http = client();
    let body = acme_panel("2025-02-14");
    let alice = [bearer(&token_for("alice", json!(["acme"])))];
    let mut texts = Vec::new();
    for _ in 0..3 {
        let exchange = post(
            &http,
            gateway,
            "/graphql",
            Some("application/json"),
            &alice,
            body.to_string(),
        )
        .await;
        texts.push(exchange.text);
    }
    assert_eq!(texts[2], texts[1]);
    assert_eq!(outcome(&metrics(gateway).await, "served"), 1.0);

    let mallory = [bearer(&token_for("mallory", json!(["globex"])))];
    let refused = graphql_as(&http, gateway, &mallory, &body).await;
    assert_eq!(error_code(&refused), Some("FORBIDDEN"), "{refused}");
    assert!(refused["data"].is_null(), "{refused}");

    let expired = sign(
        &json!({"sub": "alice", "exp": crate::security::now() - 10, "customers": ["acme"]}),
        JWT_SECRET,
    );
    let refused = graphql_as(&http, gateway, &[bearer(&expired)], &body).await;
    assert_eq!(error_code(&refused), Some("UNAUTHENTICATED"), "{refused}");

    let bob = [bearer(&token_for("bob", json!(["acme"])))];
    let exchange = post(
        &http,
        gateway,
        "/graphql",
        Some("application/json"),
        &bob,
        body.to_string(),
    )
    .await;
    assert_eq!(exchange.text, texts[1]);
    let text = metrics(gateway).await;
    assert_eq!(outcome(&text, "served"), 2.0, "{text}");
    assert_eq!(env.sim.stats().queries, 1);
}

/// The end of an entry's fresh time ends its kept answers: the next answer
/// is the stale one (executed); a new catalog from the BI (which inputs are
/// validated against) makes them outdated; with `RESPONSE_CACHE_MAX_MB=0`
/// nothing is kept at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_answers_end_with_their_entries_fresh_time() {
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .env("CACHE_TTL_SECS", 1)
            .env("CACHE_STALE_SECS", 60)
            .env("REFRESH_AHEAD_MIN_HITS", 1_000_000),
    )
    .await;
    let gateway = env.gateway();
    let query = "query Fresh($input: AggregateInput!) { aggregate(input: $input) { rows cache { status stale producedAt } } }";
    let body = json!({"query": query, "variables": acme_panel("2025-02-16")["variables"]});
    for _ in 0..3 {
        gateway.graphql(&body).await;
    }
    assert_eq!(outcome(&metrics(gateway).await, "served"), 1.0);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let answer = gateway.graphql(&body).await;
    assert_eq!(
        answer["data"]["aggregate"]["cache"]["stale"], true,
        "{answer}"
    );
    let text = metrics(gateway).await;
    assert_eq!(outcome(&text, "served"), 1.0, "{text}");

    // The catalog fetched again (every second here) is a new one: what was
    // kept with the old one is executed again, then kept anew.
    let refetching = TestEnv::start(
        TestOptions::default()
            .latency_ms(20)
            .env("CATALOG_REFRESH_SECS", 1),
    )
    .await;
    let gateway = refetching.gateway();
    refetching.wait_for_catalog().await;
    for _ in 0..3 {
        gateway.graphql(&body).await;
    }
    // (A fetch may have landed among these: counted from here.)
    let text = metrics(gateway).await;
    let (outdated, served) = (outcome(&text, "outdated"), outcome(&text, "served"));
    let fetched = refetching.sim.stats().meta_requests;
    wait_until(
        Duration::from_secs(5),
        "the catalog to be fetched again",
        || async { refetching.sim.stats().meta_requests > fetched },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = gateway.graphql(&body).await;
    assert_eq!(
        answer["data"]["aggregate"]["cache"]["status"], "HIT",
        "{answer}"
    );
    let text = metrics(gateway).await;
    assert_eq!(
        (outcome(&text, "outdated"), outcome(&text, "served")),
        (outdated + 1.0, served),
        "{text}"
    );

    let off = TestEnv::start(TestOptions::default().env("RESPONSE_CACHE_MAX_MB", 0)).await;
    let body = panel_body(input(
        "acme",
        "2025-02-01",
        "2025-02-03",
        &["Sales.orders"],
        &[],
        None,
    ));
    for _ in 0..4 {
        off.gateway().graphql(&body).await;
    }
    let text = metrics(off.gateway()).await;
    assert_eq!(
        (outcome(&text, "stored"), outcome(&text, "served")),
        (0.0, 0.0)
    );
    assert_eq!(lookups(&text, "hit"), 3.0, "{text}");
}
