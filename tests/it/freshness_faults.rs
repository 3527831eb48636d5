//! Freshness under faults and races (found by a review of the freshness
//! change, each a failing test first):
//!
//! - an evicted entry is never served to the requests that wait for its new
//!   answer on other instances;
//! - an invalidation after Redis restarted empty is not ignored (its
//!   generation stays above every instance's known one);
//! - an instance's own invalidation does not hide another instance's
//!   earlier one;
//! - in embedded mode a request that misses while the key's background
//!   refresh runs waits for it instead of calling the BI again;
//! - the refresh-ahead budget is spent on refreshes only.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    FaultProxy, Gateway, RedisServer, TestEnv, TestOptions, expected_rows_for, input,
    redis_connection, wait_until,
};

const ADMIN_TOKEN: &str = "admin-token-for-review-r3";

/// One totals panel of `customer` (one row: failures print short).
fn panel(customer: &str) -> Value {
    input(
        customer,
        "2025-08-01",
        "2025-08-31",
        &["Sales.revenue", "Sales.orders"],
        &[],
        None,
    )
}

fn fresh_body(input: &Value) -> Value {
    json!({
        "query": "query Panel($input: AggregateInput!) { aggregate(input: $input) { rows cache { status stale producedAt } } }",
        "variables": {"input": input},
    })
}

/// `(status, stale, producedAt)` of an answer, after checking its rows.
fn cache_of(answer: &Value, input: &Value) -> (String, bool, String) {
    assert!(
        answer.get("errors").is_none(),
        "errors: {}",
        answer["errors"]
    );
    assert!(
        answer["data"]["aggregate"]["rows"] == expected_rows_for(input),
        "wrong rows"
    );
    let cache = &answer["data"]["aggregate"]["cache"];
    (
        cache["status"].as_str().unwrap_or("?").to_owned(),
        cache["stale"] == true,
        cache["producedAt"].as_str().unwrap_or("?").to_owned(),
    )
}

async fn invalidate(gateway: &Gateway, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/admin/invalidate", gateway.url()))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .json(&body)
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `"mode": "evict"` drops the entries: no answer after it may be the evicted
/// one. 30 concurrent reads over three instances: one instance wins the
/// key's lock and calls the BI; the others wait for it, and their wait's
/// first look (`RedisCoordinator::wait`, `look.get(&value)`) finds the
/// evicted value, still in Redis, and serves it as `COALESCED`, not stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_evicted_entry_is_never_served_to_waiters_on_other_instances() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(500)
            .env("CACHE_TTL_SECS", 300)
            .env("ADMIN_TOKEN", ADMIN_TOKEN),
    )
    .await;
    let input = panel("evict-waiters");
    let body = fresh_body(&input);
    let first = env.gateway().graphql(&body).await;
    let (_, _, evicted_at) = cache_of(&first, &input);
    for gateway in &env.gateways {
        gateway.graphql(&body).await;
    }
    let (status, _) = invalidate(
        env.gateway(),
        json!({"customer": "evict-waiters", "mode": "evict"}),
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let answers = env.fire(30, &body).await;
    let served_evicted: Vec<String> = answers
        .iter()
        .map(|answer| cache_of(answer, &input))
        .filter(|(_, _, at)| *at == evicted_at)
        .map(|(status, stale, _)| format!("{status}/stale={stale}"))
        .collect();
    assert!(
        served_evicted.is_empty(),
        "{} of 30 answers after the eviction were the evicted entry: {:?}",
        served_evicted.len(),
        &served_evicted[..served_evicted.len().min(3)]
    );
}

/// Redis restarts empty (a single fault the gateway is meant to survive).
/// Its invalidation sequence starts over at 1, while every instance already
/// knows generation g and makes entries under it: a next invalidation of a
/// sequence started over (1) would reach none of them. `Invalidations::verdict`'s fast
/// path says "untouched", and `follow_invalidations_once` ignores a sequence
/// that is not above what it knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_after_a_redis_restart_is_not_ignored() {
    let mut redis = RedisServer::start(&["--notify-keyspace-events", "KA"]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .instances(2)
            .latency_ms(100)
            .env("CACHE_TTL_SECS", 300)
            .env("ADMIN_TOKEN", ADMIN_TOKEN),
    )
    .await;
    // Some earlier invalidation: every instance knows its generation.
    let (status, answer) = invalidate(env.gateway(), json!({"customer": "someone-else"})).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["generation"].as_u64().is_some(), "{answer}");
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    redis.restart().await;
    let url = redis.url();
    wait_until(Duration::from_secs(10), "Redis back", || async {
        let mut conn = redis_connection(&url).await;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // An entry made after the restart, held by both instances.
    let input = panel("after-restart");
    let body = fresh_body(&input);
    let first = env.gateway().graphql(&body).await;
    let (_, _, produced_at) = cache_of(&first, &input);
    for gateway in &env.gateways {
        gateway.graphql(&body).await;
    }

    let (status, answer) = invalidate(env.gateway(), json!({"customer": "after-restart"})).await;
    assert_eq!(status, 200, "{answer}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for (i, gateway) in env.gateways.iter().enumerate() {
        let (status, stale, at) = cache_of(&gateway.graphql(&body).await, &input);
        assert!(
            stale || at != produced_at,
            "instance {i} serves the invalidated entry as fresh ({status}); generation {}",
            answer["generation"]
        );
    }
}

/// Instance 0 records its own invalidation (generation g + 1) before it has
/// heard of instance 1's, made a moment earlier (generation g): its Redis
/// link is slow for a moment (held by a proxy for 200 ms). From then on
/// every look at the sequence finds 2, "not past what I know", and the
/// scopes are never read again: instance 0 serves instance 1's invalidated
/// customer as fresh for the entry's whole life.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instances_own_invalidation_does_not_hide_an_earlier_one() {
    let redis = RedisServer::start(&["--notify-keyspace-events", "KA"]).await;
    let proxy = FaultProxy::start(redis.url().trim_start_matches("redis://")).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .instance_env(0, "REDIS_URL", proxy.redis_url())
            .instance_env(0, "REDIS_TIMEOUT_MS", 3_000)
            .instances(2)
            .latency_ms(100)
            .env("CACHE_TTL_SECS", 300)
            .env("ADMIN_TOKEN", ADMIN_TOKEN),
    )
    .await;
    let globex = panel("globex-r3");
    let body = fresh_body(&globex);
    let first = env.gateways[1].graphql(&body).await;
    let (_, _, produced_at) = cache_of(&first, &globex);
    // Instance 0 holds its own copy in process memory.
    let (status, _, _) = cache_of(&env.gateways[0].graphql(&body).await, &globex);
    assert_eq!(status, "HIT");

    proxy.pause();
    let (status, answer) = invalidate(&env.gateways[1], json!({"customer": "globex-r3"})).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["generation"].as_u64().is_some(), "{answer}");
    let own = {
        let url = env.gateways[0].url();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/admin/invalidate"))
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .json(&json!({"customer": "acme-r3"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.resume();
    assert_eq!(own.await.expect("no panic").expect("answered"), 200);
    // Two polls, and the announcement, have had their chance.
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let (_, stale, _) = cache_of(&env.gateways[1].graphql(&body).await, &globex);
    assert!(stale, "instance 1 itself sees its invalidation");
    let (status, stale, at) = cache_of(&env.gateways[0].graphql(&body).await, &globex);
    assert!(
        stale || at != produced_at,
        "instance 0 missed instance 1's invalidation: {status}, fresh, same producedAt"
    );
}

/// Embedded mode: a stale read starts the key's refresh (600 ms BI); the
/// entry's stale time ends while it runs, and the next read is a miss that
/// makes a BI call of its own beside the refresh's: two flights of one key
/// in one process (`Aggregator::refreshes` and `Aggregator::flights` are
/// separate; `LocalCoordinator::try_lead` leads whenever nothing is stored).
/// With Redis the miss waits for the refresh's lock instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_during_a_refresh_does_not_call_the_bi_again_embedded() {
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(600)
            .env("CACHE_TTL_SECS", 1)
            .env("CACHE_STALE_SECS", 1)
            .env("REFRESH_AHEAD_MIN_HITS", 1_000_000),
    )
    .await;
    let input = panel("refresh-and-miss");
    let body = fresh_body(&input);
    let first = env.gateway().graphql(&body).await;
    let filled = tokio::time::Instant::now();
    assert_eq!(cache_of(&first, &input).0, "MISS");

    tokio::time::sleep_until(filled + Duration::from_millis(1_700)).await;
    let (status, stale, _) = cache_of(&env.gateway().graphql(&body).await, &input);
    assert_eq!((status.as_str(), stale), ("HIT", true));
    // The entry's stale time ends (2 s after the fill); its refresh runs
    // until about 2.3 s.
    tokio::time::sleep_until(filled + Duration::from_millis(2_100)).await;
    let (status, _, _) = cache_of(&env.gateway().graphql(&body).await, &input);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        env.sim.stats().queries,
        2,
        "the fill and one refresh; the miss ({status}) paid for a second call"
    );
}

/// The per-instance budget of refreshes ahead (`REFRESH_MAX_PER_MINUTE`) is
/// spent by reads that start no refresh: `consider_refreshing_ahead` takes a
/// unit before `refresh`, which returns at once while the key's refresh is
/// under way (or its failure remembered). Two hot keys and a budget of 2:
/// the first key's reads during its own refresh spent the second's unit,
/// and the second key turned stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_refresh_ahead_budget_is_spent_on_refreshes_only() {
    // Not across a minute's end: the budget starts again there.
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        % 60;
    if second > 52 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(400)
            .env("CACHE_TTL_SECS", 2)
            .env("CACHE_STALE_SECS", 5)
            .env("REFRESH_MAX_PER_MINUTE", 2),
    )
    .await;
    let (first, second) = (panel("budget-first"), panel("budget-second"));
    let started = tokio::time::Instant::now();
    env.gateway().graphql(&fresh_body(&first)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    env.gateway().graphql(&fresh_body(&second)).await;
    // Each key is read until its first refresh has landed (a new
    // `producedAt`): one refresh ahead each is what the budget of two must
    // buy. (Reading on would make hot keys need a second one, past the
    // budget, which is stale-while-revalidate's to serve.) The second key
    // turns stale at about 3.4 s unless refreshed.
    let until = started + Duration::from_millis(4_500);
    let read = |input: Value| {
        let client = env.gateway().client();
        async move {
            let body = fresh_body(&input);
            let mut stale = 0;
            let mut first_produced = None;
            while tokio::time::Instant::now() < until {
                let reply = client.graphql(&body).await.expect("answered");
                let (_, was_stale, produced) = cache_of(&reply.body, &input);
                if was_stale {
                    stale += 1;
                }
                if *first_produced.get_or_insert_with(|| produced.clone()) != produced {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stale
        }
    };
    let (stale_first, stale_second) = tokio::join!(read(first), read(second));
    let queries = env.sim.stats().queries;
    let metrics = env
        .gateway()
        .get("/metrics")
        .await
        .text()
        .await
        .unwrap_or_default();
    let refreshes = |outcome: &str| {
        crate::common::metric(
            &metrics,
            "analytics_gateway_cache_refreshes_total",
            &[("trigger", "ahead"), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (stale_first, stale_second),
        (0, 0),
        "stale reads of two hot keys within a budget of two refreshes ({queries} BI queries, \
         {} refreshes ahead, {} reads over budget)",
        refreshes("ok"),
        refreshes("over_budget")
    );
}
