//! Faults of Redis shorter than a lock lifetime, and what they leave behind:
//! a pause, a restart during a leader's BI call, a lock command that lands
//! after it timed out, a fast restart that drops the notification settings,
//! and instances whose clocks disagree. Each costs no extra BI call, and no
//! answer is wrong or marked degraded.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::common::{
    FaultProxy, RedisServer, TestEnv, TestOptions, dashboard, error_code, expected_rows_for, input,
    panel_body, query, redis_connection, wait_until, within,
};

/// Ten different panels of one customer, all of one granularity.
fn panel_inputs(customer: &str) -> Vec<Value> {
    (0..10)
        .map(|day| {
            let from = format!("2025-05-{:02}", day + 1);
            input(
                customer,
                &from,
                "2025-05-31",
                &["Sales.revenue"],
                &["Sales.region"],
                Some("DAY"),
            )
        })
        .collect()
}

/// `count` panels of one customer and one granularity: one BI batch.
fn day_panels(customer: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|day| {
            input(
                customer,
                &format!("2025-06-{:02}", day + 1),
                "2025-06-30",
                &["Sales.revenue"],
                &["Sales.region"],
                Some("DAY"),
            )
        })
        .collect()
}

/// Makes `redis` refuse every write (`-NOREPLICAS`) while it still answers
/// PING, GET, PTTL and INFO: what a primary with lagging replicas does, and
/// close to a demoted primary after a failover (`-READONLY`) or a full one
/// with `noeviction` (`-OOM`).
async fn refuse_writes(redis: &RedisServer) {
    let mut conn = redis.connection().await;
    let () = query(
        &mut conn,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("min-replicas-to-write")
            .arg(1),
    )
    .await;
}

/// `CONFIG GET notify-keyspace-events` on `redis`.
async fn notification_flags(redis: &RedisServer) -> String {
    let mut conn = redis.connection().await;
    let flags: Vec<String> = query(
        &mut conn,
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events"),
    )
    .await;
    flags.get(1).cloned().unwrap_or_default()
}

/// 100 requests for 10 panels (single panels and three-panel dashboards)
/// spread over 3 instances and 2.5 s, with Redis paused for 1.5 s
/// (`CLIENT PAUSE 1500 ALL`) 300 ms in, under the default lock TTL and
/// command timeout: every lock stays valid, so each panel reaches the BI
/// exactly once; every request gets the right rows, and none is marked
/// degraded (Redis was never down for a lock lifetime).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_pause_shorter_than_a_lock_costs_no_extra_bi_call() {
    let redis = RedisServer::start(&[]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .instances(3)
            .latency_ms(1_000),
    )
    .await;
    env.warm_up(10).await;
    let panels = panel_inputs("paused");
    let expected: Vec<Value> = panels.iter().map(expected_rows_for).collect();
    let mut pauser = redis.connection().await;

    let sends = (0..100_usize).map(|i| {
        let client = env.gateways[i % 3].client();
        // Every other request is a dashboard of three panels.
        let fields: Vec<usize> = if i % 2 == 0 {
            vec![i % 10]
        } else {
            vec![i % 10, (i + 3) % 10, (i + 7) % 10]
        };
        let body = if fields.len() == 1 {
            panel_body(panels[fields[0]].clone())
        } else {
            dashboard(
                &fields
                    .iter()
                    .map(|&p| panels[p].clone())
                    .collect::<Vec<_>>(),
            )
        };
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(25 * i as u64)).await;
            (fields, client.graphql(&body).await)
        })
    });
    let sends: Vec<_> = sends.collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let () = query(
        &mut pauser,
        redis::cmd("CLIENT").arg("PAUSE").arg(1_500).arg("ALL"),
    )
    .await;
    let replies = within(
        Duration::from_secs(30),
        "every request around the pause",
        join_all(sends),
    )
    .await;

    for reply in replies {
        let (fields, reply) = reply.expect("no panic");
        let reply = reply.unwrap_or_else(|err| panic!("{err}\n{}", env.logs()));
        let answer = &reply.body;
        assert!(answer.get("errors").is_none(), "{answer}\n{}", env.logs());
        assert_eq!(reply.degraded, None, "{answer}");
        assert!(answer["extensions"]["degraded"].is_null(), "{answer}");
        for (n, &panel) in fields.iter().enumerate() {
            let field = if fields.len() == 1 {
                "aggregate".to_owned()
            } else {
                format!("p{n}")
            };
            assert_eq!(answer["data"][&field]["rows"], expected[panel], "{answer}");
        }
    }
    let stats = env.sim.stats();
    assert_eq!(stats.queries, 10, "{stats:?}\n{}", env.logs());
    assert!(stats.by_query.values().all(|&n| n == 1), "{stats:?}");
}

/// Redis restarts, empty, while the leader's BI call runs: the lock is gone
/// when the answer comes, and the leader stores it anyway (it paid for it),
/// so the same question on another instance is a `HIT` with no second call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_paid_for_during_a_redis_restart_is_kept() {
    let mut redis = RedisServer::start(&[]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .instances(2)
            .latency_ms(1_500),
    )
    .await;
    let body = panel_body(panel_inputs("restarted")[0].clone());
    let expected = expected_rows_for(&panel_inputs("restarted")[0]);

    let leader = env.gateways[0].client();
    let led = tokio::spawn({
        let body = body.clone();
        async move { leader.graphql(&body).await }
    });
    env.wait_for_lock_owner(Duration::from_secs(20)).await;
    wait_until(Duration::from_secs(20), "the leader's BI call", || async {
        env.sim.stats().http_requests >= 1
    })
    .await;
    redis.restart().await;

    let answer = led.await.expect("no panic").expect("answered").body;
    assert_eq!(
        answer["data"]["aggregate"]["cache"]["status"], "MISS",
        "{answer}"
    );
    assert_eq!(answer["data"]["aggregate"]["rows"], expected, "{answer}");
    wait_until(Duration::from_secs(10), "the answer in Redis", || async {
        env.redis_keys("value").await.len() == 1
    })
    .await;
    assert!(env.redis_keys("lock").await.is_empty());

    let again = env.gateways[1].graphql(&body).await;
    assert_eq!(
        again["data"]["aggregate"]["cache"]["status"], "HIT",
        "{again}"
    );
    assert_eq!(again["data"]["aggregate"]["rows"], expected, "{again}");
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
}

/// A lock command that times out but lands later is not an orphaned lock to
/// wait on: with Redis refusing writes for 1 s (`CLIENT PAUSE 1000 WRITE`,
/// longer than the 300 ms command timeout), the try for the lock times out
/// and is retried with the same owner token; once Redis resumes, the first
/// attempt takes the lock and the retry finds its own token and wins. The
/// request is answered about one pause plus one BI latency after it was
/// sent, far sooner than the 10 s lock lifetime a fresh token would wait,
/// with one BI call and no lock left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_lock_command_is_recognised_as_ours() {
    const LOCK_TTL: Duration = Duration::from_secs(10);
    const PAUSE: Duration = Duration::from_millis(1_000);
    const LATENCY: Duration = Duration::from_millis(500);
    let redis = RedisServer::start(&[]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .latency_ms(LATENCY.as_millis() as u64)
            .env("REDIS_TIMEOUT_MS", 300)
            .env("REDIS_LOCK_TTL_MS", LOCK_TTL.as_millis()),
    )
    .await;
    let body = panel_body(panel_inputs("late-lock")[0].clone());
    let mut pauser = redis.connection().await;

    let () = query(
        &mut pauser,
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(PAUSE.as_millis() as u64)
            .arg("WRITE"),
    )
    .await;
    let started = std::time::Instant::now();
    let answer = env.gateway().graphql(&body).await;
    let took = started.elapsed();

    assert_eq!(
        answer["data"]["aggregate"]["cache"]["status"], "MISS",
        "{answer}"
    );
    assert!(
        took < PAUSE + LATENCY + Duration::from_secs(3),
        "took {took:?}: the retry waited for its own first attempt's lock\n{}",
        env.logs()
    );
    assert_eq!(env.sim.stats().queries, 1);
    assert!(env.redis_keys("lock").await.is_empty());
}

/// A Redis restarted fast (no ping of the gateway sees it down) comes back
/// with its own configuration, here keyspace notifications off: the gateway
/// notices (its subscriber reconnects, and Redis has a new `run_id`) and
/// turns them back on, and `/readyz` says `keyspace` only once they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_are_turned_back_on_after_a_fast_restart() {
    let mut redis = RedisServer::start(&["--notify-keyspace-events", ""]).await;
    let env = TestEnv::start(TestOptions::default().redis_at(redis.url())).await;
    wait_until(
        Duration::from_secs(10),
        "notifications on at start",
        || async { notification_flags(&redis).await.contains('K') },
    )
    .await;

    redis.restart().await;
    assert!(!notification_flags(&redis).await.contains('K'));
    wait_until(Duration::from_secs(10), "notifications back on", || async {
        notification_flags(&redis).await.contains('K')
    })
    .await;
    let (_, ready) = env.gateway().readyz().await;
    assert_eq!(ready["notifications"], "keyspace", "{ready}");

    // And coordination works: a waiter on the restarted Redis is woken.
    let body = panel_body(panel_inputs("fast-restart")[0].clone());
    let answers = env.fire(5, &body).await;
    for answer in &answers {
        assert!(answer.get("errors").is_none(), "{answer}");
    }
    assert_eq!(env.sim.stats().queries, 1);
}

/// Two instances whose wall clocks disagree by 20 s (one 10 s behind, one
/// 10 s ahead, through `GATEWAY_CLOCK_OFFSET_MS`) share values and errors
/// as if they agreed: an entry stored by one is a `HIT` on the other with
/// its full lifetime left, a BI error stored by either is shared by the
/// other for the negative-cache time (no BI call) and forgotten by both
/// after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_whose_clocks_disagree_share_values_and_errors() {
    const TTL_SECS: u64 = 8;
    const NEGATIVE_SECS: u64 = 2;
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .latency_ms(100)
            .env("CACHE_TTL_SECS", TTL_SECS)
            .env("NEGATIVE_CACHE_SECS", NEGATIVE_SECS)
            .instance_env(0, "GATEWAY_CLOCK_OFFSET_MS", -10_000)
            .instance_env(1, "GATEWAY_CLOCK_OFFSET_MS", 10_000),
    )
    .await;
    let (behind, ahead) = (&env.gateways[0], &env.gateways[1]);
    let panels = panel_inputs("clocks");

    // A value stored by the instance behind is fresh for the one ahead.
    let body = panel_body(panels[0].clone());
    let first = behind.graphql(&body).await;
    assert_eq!(
        first["data"]["aggregate"]["cache"]["status"], "MISS",
        "{first}"
    );
    let body_with_expiry = json!({
        "query": "query Panel($input: AggregateInput!) { aggregate(input: $input) { rows cache { status expiresInSeconds } } }",
        "variables": {"input": panels[0]},
    });
    let seen = ahead.graphql(&body_with_expiry).await;
    assert_eq!(
        seen["data"]["aggregate"]["cache"]["status"], "HIT",
        "{seen}"
    );
    let expires_in = seen["data"]["aggregate"]["cache"]["expiresInSeconds"]
        .as_f64()
        .expect("expiresInSeconds");
    assert!(
        (TTL_SECS as f64 - 3.0..=TTL_SECS as f64).contains(&expires_in),
        "{seen}"
    );
    // And the other way round.
    let body = panel_body(panels[1].clone());
    assert_eq!(
        ahead.graphql(&body).await["data"]["aggregate"]["cache"]["status"],
        "MISS"
    );
    assert_eq!(
        behind.graphql(&body).await["data"]["aggregate"]["cache"]["status"],
        "HIT"
    );
    assert_eq!(env.sim.stats().queries, 2);

    // Errors: stored by one instance, shared by the other, in both directions.
    for (n, (producer, reader)) in [(behind, ahead), (ahead, behind)].into_iter().enumerate() {
        let body = panel_body(panels[2 + n].clone());
        let before = env.sim.stats().queries;
        env.sim
            .faults(json!({"failNext": {"count": 1, "status": 500}}))
            .await;
        assert_eq!(error_code(&producer.graphql(&body).await), Some("BI_ERROR"));
        assert_eq!(error_code(&reader.graphql(&body).await), Some("BI_ERROR"));
        assert_eq!(
            env.sim.stats().queries,
            before + 1,
            "the error was not shared"
        );
        tokio::time::sleep(Duration::from_secs(NEGATIVE_SECS) + Duration::from_millis(500)).await;
        let answer = reader.graphql(&body).await;
        assert!(
            answer.get("errors").is_none(),
            "the error outlived its time: {answer}"
        );
        assert_eq!(env.sim.stats().queries, before + 2);
    }
}

/// The pub/sub channels of waiters (the `done` and keyspace channels of
/// keys) of `namespace` that anyone is subscribed to on the Redis at `url`;
/// not the instances' permanent one (invalidations).
async fn subscribed_channels(url: &str, namespace: &str) -> Vec<String> {
    let mut conn = redis_connection(url).await;
    let channels: Vec<String> = query(&mut conn, redis::cmd("PUBSUB").arg("CHANNELS")).await;
    channels
        .into_iter()
        // A key's channels (`{<hash>}`), not the permanent invalidation one.
        .filter(|c| c.contains(namespace) && c.contains('{') && !c.contains("{invalidations}"))
        .collect()
}

/// Waiters subscribe to a key's channels only while they wait: after a
/// stampede over three instances (two of which wait on Redis), no channel
/// of the namespace is left subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_channel_stays_subscribed_after_the_waits() {
    let env = TestEnv::start(TestOptions::default().redis().instances(3).latency_ms(800)).await;
    let panels = panel_inputs("unsubscribed");
    // Request i goes to instance i % 3: every instance asks every panel.
    let bodies: Vec<Value> = (0..60)
        .map(|i| panel_body(panels[(i / 3) % 3].clone()))
        .collect();

    let in_flight = tokio::spawn({
        let clients: Vec<_> = env.gateways.iter().map(|g| g.client()).collect();
        async move {
            join_all(bodies.iter().enumerate().map(|(i, body)| {
                let client = clients[i % clients.len()].clone();
                async move { client.graphql(body).await }
            }))
            .await
        }
    });
    wait_until(Duration::from_secs(10), "waiters subscribed", || async {
        !subscribed_channels(env.redis_url.as_deref().unwrap_or_default(), &env.namespace)
            .await
            .is_empty()
    })
    .await;
    for reply in in_flight.await.expect("no panic") {
        let answer = reply.expect("answered").body;
        assert!(answer.get("errors").is_none(), "{answer}");
    }
    wait_until(
        Duration::from_secs(5),
        "every channel unsubscribed",
        || async {
            subscribed_channels(env.redis_url.as_deref().unwrap_or_default(), &env.namespace)
                .await
                .is_empty()
        },
    )
    .await;
    assert_eq!(env.sim.stats().queries, 3);
}

/// A Redis that answers reads but refuses writes (`-NOREPLICAS` here; a
/// demoted primary's `-READONLY` or a full one's `-OOM` alike) is not one to
/// coordinate through: once it has refused the lock for a lock lifetime, it
/// is down, and a miss is answered with the BI's rows, marked degraded, well
/// before the request's deadline, with one BI call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_refuses_writes_is_down_and_misses_are_answered() {
    let redis = RedisServer::start(&[]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .latency_ms(200)
            .env("REQUEST_TIMEOUT_SECS", 8),
    )
    .await;
    refuse_writes(&redis).await;
    let panel = day_panels("refused", 1).remove(0);
    let expected = expected_rows_for(&panel);

    let started = std::time::Instant::now();
    let reply = env.gateway().reply(&panel_body(panel)).await;
    let took = started.elapsed();
    let answer = reply.body;
    assert_eq!(
        reply.degraded.as_deref(),
        Some("redis-unavailable"),
        "{answer}"
    );

    assert!(
        answer.get("errors").is_none(),
        "after {took:?}: {answer}\nBI: {:?}\n{}",
        env.sim.stats(),
        env.logs()
    );
    assert_eq!(answer["data"]["aggregate"]["rows"], expected, "{answer}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
}

/// The BI answers a batch of five panels in 1 s, then Redis starts refusing
/// writes: the request gets all five panels the BI was paid for, well before
/// its deadline: the keys of the batch are stored side by side (each fill
/// bounded by Redis being declared down), not one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paid_rows_reach_their_requests_while_redis_refuses_the_fill() {
    let redis = RedisServer::start(&[]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .latency_ms(1_000)
            .env("REQUEST_TIMEOUT_SECS", 10),
    )
    .await;
    let panels = day_panels("held-back", 5);
    let expected: Vec<Value> = panels.iter().map(expected_rows_for).collect();
    let body = dashboard(&panels);

    let client = env.gateway().client();
    let started = std::time::Instant::now();
    let reply = tokio::spawn(async move {
        let reply = client.graphql(&body).await;
        (reply, started.elapsed())
    });
    wait_until(Duration::from_secs(20), "the batch's BI call", || async {
        env.sim.stats().http_requests >= 1
    })
    .await;
    refuse_writes(&redis).await;

    let (reply, took) = within(Duration::from_secs(30), "the dashboard", reply)
        .await
        .expect("no panic");
    let answer = reply.expect("answered").body;
    assert_eq!(
        env.sim.stats().queries,
        5,
        "one batch of five: {:?}",
        env.sim.stats()
    );
    // Per panel: its cache status, or the code of its error.
    let outcomes: Vec<String> = (0..expected.len())
        .map(|n| {
            let field = format!("p{n}");
            match answer["data"][&field]["cache"]["status"].as_str() {
                Some(status) if answer["data"][&field]["rows"] == expected[n] => status.to_owned(),
                Some(status) => format!("{status} with wrong rows"),
                None => answer["errors"]
                    .as_array()
                    .and_then(|errors| errors.iter().find(|e| e["path"][0] == field.as_str()))
                    .and_then(|e| e["extensions"]["code"].as_str())
                    .unwrap_or("?")
                    .to_owned(),
            }
        })
        .collect();
    assert!(
        outcomes.iter().all(|o| o == "MISS"),
        "panels after {took:?}: {outcomes:?}\n{}",
        env.logs()
    );
    assert!(answer.get("errors").is_none(), "after {took:?}: {answer}");
    assert!(
        took < Duration::from_secs(6),
        "the rows came from the BI after about 1 s, the request after {took:?}"
    );
}

/// With a lock TTL as short as 200 ms (so `REDIS_DOWN_AFTER_MS` is too),
/// an instance nobody sends anything to is pinged often enough never to look
/// down: entries another instance stored are `HIT`s on it, never degraded
/// duplicate BI calls, and its `/readyz` says `up` all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_instance_with_a_short_lock_ttl_never_looks_down() {
    let redis = RedisServer::start(&["--notify-keyspace-events", "KA"]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .instances(2)
            .latency_ms(50)
            .env("REDIS_LOCK_TTL_MS", 200),
    )
    .await;
    let panels = day_panels("flapping", 10);
    let mut degraded = Vec::new();
    let mut statuses = Vec::new();
    for (i, panel) in panels.iter().enumerate() {
        let body = panel_body(panel.clone());
        let first = env.gateways[0].reply(&body).await;
        assert!(first.body.get("errors").is_none(), "{}", first.body);
        // Land at a different point of gw-1's 500 ms ping cycle each time.
        tokio::time::sleep(Duration::from_millis(50 * i as u64 + 10)).await;
        let second = env.gateways[1].reply(&body).await;
        assert!(second.body.get("errors").is_none(), "{}", second.body);
        statuses.push(
            second.body["data"]["aggregate"]["cache"]["status"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        );
        degraded.push(first.degraded.is_some() || second.degraded.is_some());
    }
    assert!(
        statuses.iter().all(|s| s == "HIT"),
        "gw-1 asked the BI again for keys gw-0 had stored: {statuses:?}, degraded {degraded:?}\n{}",
        env.logs()
    );
    assert!(degraded.iter().all(|d| !d), "degraded: {degraded:?}");
    assert_eq!(env.sim.stats().queries, 10, "{:?}", env.sim.stats());

    // And `/readyz` flaps on an instance nobody sends anything to.
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let (_, ready) = env.gateways[1].readyz().await;
        seen.push(ready["redis"].as_str().unwrap_or("?").to_owned());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(seen.iter().all(|r| r == "up"), "/readyz said {seen:?}");
}

/// A waiter's subscription ends with its wait even when the connection that
/// carried it is gone: gw-0 waits for a key gw-1 holds; every connection to
/// Redis is reset and new ones are refused for 3 s (a network outage shorter
/// than `REDIS_DOWN_AFTER_MS`), during which gw-0's request passes its 2 s
/// deadline and unsubscribes, in vain. Once the network is back, the
/// reconnected subscriber has only the channels still waited on: none of the
/// namespace stays subscribed, and gw-1's paid answer is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_channel_stays_subscribed_after_an_outage() {
    let redis = RedisServer::start(&[]).await;
    let proxy = FaultProxy::start(&redis.url()["redis://".len()..]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(proxy.redis_url())
            .instances(2)
            .latency_ms(4_000)
            .instance_env(0, "REQUEST_TIMEOUT_SECS", 2)
            .instance_env(1, "REQUEST_TIMEOUT_SECS", 20)
            .env("REDIS_TIMEOUT_MS", 300)
            .env("REDIS_DOWN_AFTER_MS", 20_000),
    )
    .await;
    let body = panel_body(panel_inputs("outage-unsubscribed")[0].clone());
    let holder = tokio::spawn({
        let client = env.gateways[1].client();
        let body = body.clone();
        async move { client.graphql(&body).await }
    });
    env.wait_for_lock_owner(Duration::from_secs(20)).await;
    let waiter = tokio::spawn({
        let client = env.gateways[0].client();
        let body = body.clone();
        async move { client.graphql(&body).await }
    });
    wait_until(Duration::from_secs(10), "gw-0 subscribed", || async {
        !subscribed_channels(&redis.url(), &env.namespace)
            .await
            .is_empty()
    })
    .await;

    proxy.refuse_new(true);
    proxy.reset_connections();
    let waited = waiter.await.expect("no panic").expect("answered").body;
    assert_eq!(error_code(&waited), Some("BI_UNAVAILABLE"), "{waited}");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    proxy.refuse_new(false);

    let held = holder.await.expect("no panic").expect("answered").body;
    assert!(held.get("errors").is_none(), "{held}\n{}", env.logs());
    wait_until(
        Duration::from_secs(10),
        "every channel unsubscribed",
        || async {
            subscribed_channels(&redis.url(), &env.namespace)
                .await
                .is_empty()
        },
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "the paid answer stored",
        || async { env.redis_keys("value").await.len() == 1 },
    )
    .await;
    assert_eq!(env.sim.stats().queries, 1);
}

/// Every connection between three instances and Redis is reset in the middle
/// of a 60-request stampede (the leader's BI call running, waiters
/// subscribed): the connections come back by themselves, the waiters are
/// woken, and the stampede still costs one BI call, with the right rows for
/// everyone and no degraded answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_connections_cost_no_extra_bi_call() {
    let redis = RedisServer::start(&[]).await;
    let proxy = FaultProxy::start(&redis.url()["redis://".len()..]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(proxy.redis_url())
            .instances(3)
            .latency_ms(1_500),
    )
    .await;
    let panel = panel_inputs("dropped")[0].clone();
    let expected = expected_rows_for(&panel);
    let body = panel_body(panel);

    let in_flight = env.spawn_fire(60, &body);
    env.wait_for_lock_owner(Duration::from_secs(20)).await;
    wait_until(Duration::from_secs(20), "the leader's BI call", || async {
        env.sim.stats().http_requests >= 1
    })
    .await;
    wait_until(Duration::from_secs(10), "waiters subscribed", || async {
        !subscribed_channels(&redis.url(), &env.namespace)
            .await
            .is_empty()
    })
    .await;
    proxy.reset_connections();

    let replies = within(
        Duration::from_secs(30),
        "the stampede",
        join_all(in_flight.into_iter().map(crate::common::InFlight::outcome)),
    )
    .await;
    for reply in replies {
        let reply = reply.expect("answered");
        assert!(
            reply.body.get("errors").is_none(),
            "{}\n{}",
            reply.body,
            env.logs()
        );
        assert_eq!(reply.body["data"]["aggregate"]["rows"], expected);
        assert_eq!(reply.degraded, None, "{}", reply.body);
    }
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
}
