//! Past one Redis: gateways on a real Redis Cluster (3 primaries, 3
//! replicas) and on a Sentinel-managed primary keep the promise of one BI
//! query per key, through a primary's death, a slot's move and a failover.
//!
//! The happy-path tests share the test command's cluster
//! (`TEST_REDIS_CLUSTER_NODES`; random namespaces keep them apart); a test
//! that kills or reshards nodes starts its own.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::common::{
    PATIENT_REDIS_TIMEOUT_MS, RedisCluster, RedisSentinels, Statuses, TestEnv, TestOptions,
    dashboard, expected_rows_for, input, panel_and_rows, statuses, wait_until,
};

const MEASURES: &[&str] = &["Sales.revenue", "Sales.orders"];
const DIMENSIONS: &[&str] = &["Sales.region"];

fn question(customer: &str) -> (Value, Value) {
    panel_and_rows(
        customer,
        "2025-04-01",
        "2025-04-30",
        MEASURES,
        DIMENSIONS,
        Some("DAY"),
    )
}

/// Three gateways on `cluster`, a BI of `latency_ms`.
async fn cluster_env(cluster: &RedisCluster, latency_ms: u64) -> TestEnv {
    TestEnv::start(
        TestOptions::default()
            .redis_cluster(cluster)
            .instances(3)
            .latency_ms(latency_ms)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await
}

/// The `cache.key` of a panel answer: the hash tag of its Redis keys.
fn cache_key(answer: &Value) -> String {
    answer["data"]["aggregate"]["cache"]["key"]
        .as_str()
        .unwrap_or_else(|| panic!("an answer with a cache key: {answer}"))
        .to_owned()
}

/// `/readyz` names the cluster mode and every node, none unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_names_the_cluster_and_its_nodes() {
    let cluster = RedisCluster::shared().await;
    let env = TestEnv::start(TestOptions::default().redis_cluster(&cluster)).await;

    let (status, ready) = env.gateway().readyz().await;

    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["redis"], "up", "{ready}");
    assert_eq!(ready["redisMode"], "cluster", "{ready}");
    assert_eq!(ready["notifications"], "sharded", "{ready}");
    let nodes = ready["redisNodes"].as_array().expect("redisNodes");
    assert_eq!(nodes.len(), 6, "{ready}");
    assert_eq!(ready["redisUnreachable"], serde_json::json!([]), "{ready}");
}

/// 300 identical requests over three instances on the cluster: one BI query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_on_a_cluster_makes_one_bi_query() {
    let cluster = RedisCluster::shared().await;
    let env = cluster_env(&cluster, 2_000).await;
    env.warm_up(100).await;
    let (body, expected) = question("cluster-stampede");

    let answers = env.fire(300, &body).await;

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
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
    assert!(
        answers
            .iter()
            .all(|a| a["extensions"]["degraded"].is_null()),
        "an answer was degraded"
    );
}

/// 20 questions × 15 requests, shuffled over three instances: exactly 20 BI
/// queries, and the questions' keys live on every one of the three shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distinct_keys_on_every_shard_make_one_bi_query_each() {
    const KEYS: usize = 20;
    const PER_KEY: usize = 15;
    let cluster = RedisCluster::shared().await;
    let env = cluster_env(&cluster, 1_000).await;
    let questions: Vec<(Value, Value)> = (0..KEYS)
        .map(|k| question(&format!("cluster-distinct-{k}")))
        .collect();
    let mut rng = fastrand::Rng::with_seed(20_261_201);
    let mut order: Vec<usize> = (0..KEYS * PER_KEY).map(|i| i % KEYS).collect();
    rng.shuffle(&mut order);
    let requests: Vec<(usize, Value)> = order
        .iter()
        .map(|&k| (rng.usize(..env.gateways.len()), questions[k].0.clone()))
        .collect();

    let answers = env.fire_on(&requests).await;

    let mut keys = BTreeMap::new();
    for (k, (_, expected)) in questions.iter().enumerate() {
        let of_key: Vec<Value> = order
            .iter()
            .zip(&answers)
            .filter(|(key, _)| **key == k)
            .map(|(_, answer)| answer.clone())
            .collect();
        assert_eq!(
            statuses(&of_key, expected).miss,
            1,
            "question {k}\n{}",
            env.logs()
        );
        keys.insert(k, cache_key(&of_key[0]));
    }
    let stats = env.sim.stats();
    assert_eq!(stats.queries, KEYS as u64, "{stats:?}");
    assert!(stats.by_query.values().all(|&n| n == 1), "{stats:?}");
    let mut shards = BTreeSet::new();
    for key in keys.values() {
        shards.insert(cluster.primary_of_slot(cluster.slot_of(key).await).await);
    }
    assert_eq!(shards.len(), 3, "the keys must span the three shards");
}

/// Eight panels of one granularity whose keys live on different shards are
/// one BI request from one dashboard; thirty copies over three instances
/// still ask each panel once, and every panel is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dashboard_across_shards_is_one_bi_request() {
    let cluster = RedisCluster::shared().await;
    let env = cluster_env(&cluster, 1_000).await;
    let inputs: Vec<Value> = (0..8)
        .map(|i| {
            input(
                "cluster-dashboard",
                &format!("2025-0{}-01", 1 + i % 8),
                &format!("2025-0{}-28", 1 + i % 8),
                if i % 2 == 0 {
                    &["Sales.revenue"]
                } else {
                    &["Sales.orders"]
                },
                &["Sales.region"],
                Some("DAY"),
            )
        })
        .collect();
    let body = dashboard(&inputs);

    let first = env
        .gateway()
        .client()
        .graphql(&body)
        .await
        .expect("an answer");
    assert!(first.body.get("errors").is_none(), "{}", first.body);
    let stats = env.sim.stats();
    assert_eq!(
        (stats.http_requests, stats.queries),
        (1, 8),
        "one request of eight queries: {stats:?}"
    );
    let mut shards = BTreeSet::new();
    for (i, input) in inputs.iter().enumerate() {
        let panel = &first.body["data"][format!("p{i}")];
        assert_eq!(panel["rows"], expected_rows_for(input), "panel {i}");
        let key = panel["cache"]["key"].as_str().expect("a cache key");
        shards.insert(cluster.primary_of_slot(cluster.slot_of(key).await).await);
    }
    assert!(shards.len() >= 2, "the panels must span shards: {shards:?}");

    // The same panels again, for a cold namespace: a second env, 30 copies.
    let env = cluster_env(&cluster, 1_000).await;
    let answers = env.fire(30, &body).await;
    for answer in &answers {
        assert!(answer.get("errors").is_none(), "{answer}");
        for (i, input) in inputs.iter().enumerate() {
            assert_eq!(
                answer["data"][format!("p{i}")]["rows"],
                expected_rows_for(input),
                "panel {i}"
            );
        }
    }
    let stats = env.sim.stats();
    assert_eq!(stats.queries, 8, "{stats:?}");
    assert!(stats.by_query.values().all(|&n| n == 1), "{stats:?}");
}

/// SIGKILL of a primary in the middle of a 20-key stampede that goes on
/// through the failover (a wave of requests every 400 ms for 5.6 s): its
/// replica is promoted; every request is answered correctly, no key costs
/// more than 2 BI queries, and a stampede after the failover is back to 1
/// per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_during_a_stampede_costs_at_most_one_extra_query_per_key() {
    const KEYS: usize = 20;
    const WAVES: usize = 14;
    // A failover longer than a lock TTL: waited out, not paid for.
    let mut cluster = RedisCluster::start(Duration::from_secs(3)).await;
    let env = cluster_env(&cluster, 2_000).await;
    env.warm_up(30).await;
    // The primary of slot 0 dies; the keys say afterwards which were its.
    let victim = cluster.primary_of_slot(0).await;
    let victim_slots: Vec<(u16, u16)> = cluster
        .nodes()
        .await
        .into_iter()
        .find(|(_, port, _, _)| *port == victim)
        .map(|(_, _, _, slots)| slots)
        .expect("the victim");
    let stampede = |round: &str| -> (Vec<(usize, Value)>, Vec<Value>) {
        let questions: Vec<(Value, Value)> = (0..KEYS)
            .map(|k| question(&format!("failover-{round}-{k}")))
            .collect();
        let requests = (0..KEYS * 3)
            .map(|i| (i % 3, questions[i % KEYS].0.clone()))
            .collect();
        (
            requests,
            questions.into_iter().map(|(_, rows)| rows).collect(),
        )
    };
    let per_key = |stats: &analytics_gateway::sim::SimStats| -> Vec<u64> {
        stats.by_query.values().copied().collect()
    };

    let (requests, expected) = stampede("during");
    let waves = futures_util::future::join_all((0..WAVES).map(|wave| {
        let (env, requests) = (&env, &requests);
        async move {
            tokio::time::sleep(Duration::from_millis(400 * wave as u64)).await;
            env.fire_on(requests).await
        }
    }));
    let (answers, failover) = tokio::join!(waves, async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        cluster.kill(victim);
        let killed = std::time::Instant::now();
        cluster.wait_for_failover(victim).await;
        killed.elapsed()
    });
    eprintln!("the cluster was failed over {failover:?} after the kill");

    for (wave, answers) in answers.iter().enumerate() {
        for (i, answer) in answers.iter().enumerate() {
            assert!(
                answer.get("errors").is_none(),
                "wave {wave}, request {i}: {answer}\n{}",
                env.logs()
            );
            assert_eq!(
                answer["data"]["aggregate"]["rows"],
                expected[i % KEYS],
                "wave {wave}, request {i}"
            );
        }
    }
    let mut on_victim = 0;
    for answer in answers[0].iter().take(KEYS) {
        let slot = cluster.slot_of(&cache_key(answer)).await;
        if victim_slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)) {
            on_victim += 1;
        }
    }
    assert!(on_victim > 0, "no key lived on the killed primary");
    let stats = env.sim.stats();
    let degraded = answers
        .iter()
        .flatten()
        .filter(|a| !a["extensions"]["degraded"].is_null())
        .count();
    eprintln!(
        "BI queries per key: {:?}; {on_victim} keys on the killed primary; {degraded} answers degraded",
        per_key(&stats)
    );
    assert!(
        stats.by_query.len() == KEYS && stats.by_query.values().all(|&n| n <= 2),
        "at most two queries per key, not {:?}\n{}",
        per_key(&stats),
        env.logs()
    );

    let before = stats.queries;
    let (requests, expected) = stampede("after");
    let answers = env.fire_on(&requests).await;
    for (i, answer) in answers.iter().enumerate() {
        assert!(
            answer.get("errors").is_none(),
            "request {i}: {answer}\n{}",
            env.logs()
        );
        assert_eq!(
            answer["data"]["aggregate"]["rows"],
            expected[i % KEYS],
            "request {i}"
        );
    }
    let stats = env.sim.stats();
    assert_eq!(
        stats.queries,
        before + KEYS as u64,
        "{:?}\n{}",
        per_key(&stats),
        env.logs()
    );
    for gateway in &env.gateways {
        wait_until(
            Duration::from_secs(20),
            "the dead node reported unreachable",
            || async {
                let (_, ready) = gateway.readyz().await;
                ready["redisUnreachable"]
                    .as_array()
                    .is_some_and(|nodes| nodes.iter().any(|n| *n == format!("127.0.0.1:{victim}")))
            },
        )
        .await;
    }
}

/// A cached key whose slot moves to another primary is still a `HIT` on
/// every instance (no L1 copy to hide behind), and nothing degrades.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resharded_key_is_still_a_hit() {
    let cluster = RedisCluster::start(Duration::from_millis(1_500)).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_cluster(&cluster)
            .instances(2)
            .latency_ms(200)
            .env("REDIS_LOCAL_CACHE", "false")
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let (body, expected) = question("resharded");
    let first = env
        .gateway()
        .client()
        .graphql(&body)
        .await
        .expect("an answer");
    assert_eq!(
        statuses(std::slice::from_ref(&first.body), &expected).miss,
        1
    );
    let key = cache_key(&first.body);
    let slot = cluster.slot_of(&key).await;
    let from = cluster.primary_of_slot(slot).await;
    let to = cluster
        .nodes()
        .await
        .into_iter()
        .find(|(_, port, primary, _)| *primary && *port != from)
        .map(|(_, port, _, _)| port)
        .expect("another primary");

    cluster.move_slot(slot, to).await;

    assert_eq!(cluster.primary_of_slot(slot).await, to);
    for gateway in &env.gateways {
        for _ in 0..3 {
            let reply = gateway.client().graphql(&body).await.expect("an answer");
            assert_eq!(reply.degraded, None, "{}", reply.body);
            assert_eq!(
                statuses(std::slice::from_ref(&reply.body), &expected).hit,
                1,
                "{}\n{}",
                reply.body,
                env.logs()
            );
        }
        let (_, ready) = gateway.readyz().await;
        assert_eq!(ready["redis"], "up", "{ready}");
    }
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
}

/// Behind Sentinels: a stampede is one query; the primary is killed, the
/// Sentinels promote the replica, the gateways follow without a restart,
/// and the next stampede is one query again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinels_fail_over_and_the_gateways_follow() {
    let mut sentinels = RedisSentinels::start().await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_sentinel(&sentinels)
            .instances(3)
            .latency_ms(1_000)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let primary = format!("127.0.0.1:{}", sentinels.primary);
    for gateway in &env.gateways {
        let (status, ready) = gateway.readyz().await;
        assert_eq!(status, 200, "{ready}");
        assert_eq!(ready["redisMode"], "sentinel", "{ready}");
        assert_eq!(ready["redisNodes"], serde_json::json!([primary]), "{ready}");
        assert_eq!(ready["notifications"], "keyspace", "{ready}");
    }
    let (body, expected) = question("sentinel-before");
    let answers = env.fire(90, &body).await;
    assert_eq!(statuses(&answers, &expected).miss, 1, "{}", env.logs());
    assert_eq!(env.sim.stats().queries, 1);

    sentinels.kill_primary();
    sentinels.wait_for_primary(sentinels.replica).await;
    let promoted = format!("127.0.0.1:{}", sentinels.replica);
    for gateway in &env.gateways {
        wait_until(
            Duration::from_secs(20),
            "the gateway to follow the failover",
            || async {
                let (_, ready) = gateway.readyz().await;
                ready["redisNodes"] == serde_json::json!([promoted]) && ready["redis"] == "up"
            },
        )
        .await;
    }

    let (body, expected) = question("sentinel-after");
    let answers = env.fire(90, &body).await;
    assert_eq!(statuses(&answers, &expected).miss, 1, "{}", env.logs());
    assert!(
        answers
            .iter()
            .all(|a| a["extensions"]["degraded"].is_null()),
        "an answer was degraded"
    );
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());
}
