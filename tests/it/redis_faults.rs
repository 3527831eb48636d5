//! Several gateway instances sharing one Redis when things go wrong: a leader
//! dies, the BI is slower than the lock, keyspace notifications are off, the
//! BI fails or rate limits, Redis dies and comes back, or is never there.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::common::{
    InFlight, PATIENT_REDIS_TIMEOUT_MS, RedisServer, Reply, Statuses, TestEnv, TestOptions,
    closed_port, error_code, panel_and_rows, query, statuses, wait_until, within,
};

const MEASURES: &[&str] = &["Sales.revenue", "Sales.orders"];
const DIMENSIONS: &[&str] = &["Sales.product"];
const FROM: &str = "2025-04-01";
const TO: &str = "2025-04-30";

/// The contract's panel for `customer`, and the rows the BI has for it.
fn question(customer: &str) -> (Value, Value) {
    panel_and_rows(customer, FROM, TO, MEASURES, DIMENSIONS, Some("DAY"))
}

/// Waits until every gateway of `env` reports Redis as `redis` ("up" or
/// "down") in `/readyz`, and returns their last `/readyz` bodies.
async fn wait_for_redis(env: &TestEnv, redis: &str, limit: Duration) -> Vec<Value> {
    let mut bodies = vec![Value::Null; env.gateways.len()];
    for (i, gateway) in env.gateways.iter().enumerate() {
        let body = &mut bodies[i];
        within(
            limit,
            &format!("gw-{i}'s /readyz to say redis {redis}"),
            async {
                loop {
                    let (_, ready) = gateway.readyz().await;
                    if ready["redis"] == redis {
                        *body = ready;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        )
        .await;
    }
    bodies
}

/// Separates spawned requests into those sent to gateway `instance` and the rest.
fn split_by_instance(in_flight: Vec<InFlight>, instance: usize) -> (Vec<InFlight>, Vec<InFlight>) {
    in_flight.into_iter().partition(|r| r.instance == instance)
}

/// The leader of a stampede is SIGKILLed in the middle of its BI call: once
/// its lock expires, one survivor takes the key over, so every request sent to
/// the two survivors gets the right rows within 2 × (lock TTL + BI latency) +
/// 3 s of the kill (exactly one MISS among them), the requests sent to the
/// dead one fail at transport level, and the BI is asked exactly twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_leaders_key_is_taken_over_by_a_survivor() {
    const LOCK_TTL: Duration = Duration::from_millis(1_000);
    const LATENCY: Duration = Duration::from_millis(2_000);
    let mut env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(LATENCY.as_millis() as u64)
            .env("REDIS_LOCK_TTL_MS", LOCK_TTL.as_millis())
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let (body, expected) = question("takeover");

    let in_flight = env.spawn_fire(60, &body);
    let leader_id = env.wait_for_lock_owner(Duration::from_secs(20)).await;
    let leader = env.gateway_index(&leader_id);
    // The leader's BI call must have reached the BI: the kill then costs a
    // paid call, and the count below is exact.
    wait_until(Duration::from_secs(20), "the leader's BI call", || async {
        env.sim.stats().http_requests >= 1
    })
    .await;
    env.gateways[leader].kill();

    let (to_dead, to_survivors) = split_by_instance(in_flight, leader);
    let bound = 2 * (LOCK_TTL + LATENCY) + Duration::from_secs(3);
    let replies = within(
        bound,
        "the survivors' answers after the leader's death",
        join_all(to_survivors.into_iter().map(InFlight::outcome)),
    )
    .await;
    let answers: Vec<Value> = replies
        .into_iter()
        .map(|reply| reply.expect("a survivor answers").body)
        .collect();
    assert_eq!(
        statuses(&answers, &expected),
        Statuses {
            miss: 1,
            coalesced: 39,
            hit: 0
        },
        "{}",
        env.logs()
    );
    let dead = within(
        Duration::from_secs(30),
        "the dead gateway's requests to fail",
        join_all(to_dead.into_iter().map(InFlight::outcome)),
    )
    .await;
    for outcome in &dead {
        assert!(
            outcome.is_err(),
            "a request to the killed gateway was answered: {outcome:?}"
        );
    }
    let stats = env.sim.stats();
    assert_eq!(stats.queries, 2, "{stats:?}");
}

/// A BI call that takes three times the lock's TTL keeps its lock, because the
/// leader renews it: a stampede over three instances still makes one query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bi_call_longer_than_the_lock_ttl_keeps_its_lock() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(1_500)
            .env("REDIS_LOCK_TTL_MS", 500)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let (body, expected) = question("slow-bi");

    let answers = env.fire(90, &body).await;

    assert_eq!(
        statuses(&answers, &expected),
        Statuses {
            miss: 1,
            coalesced: 89,
            hit: 0
        },
        "{}",
        env.logs()
    );
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
}

/// Three instances on `redis` (with `extra_env`) say `"notifications":
/// "polling"` in `/readyz`, and a 60-request stampede still makes one BI query
/// with the right rows for everyone.
async fn polling_stampede(redis: &RedisServer, extra_env: &[(&str, &str)], customer: &str) {
    let mut options = TestOptions::default()
        .redis_at(redis.url())
        .instances(3)
        .latency_ms(1_000)
        .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS);
    for (name, value) in extra_env {
        options = options.env(name, value);
    }
    let env = TestEnv::start(options).await;

    for ready in wait_for_redis(&env, "up", Duration::from_secs(20)).await {
        assert_eq!(ready["notifications"], "polling", "{ready}");
    }
    let (body, expected) = question(customer);
    let answers = env.fire(60, &body).await;

    assert_eq!(
        statuses(&answers, &expected),
        Statuses {
            miss: 1,
            coalesced: 59,
            hit: 0
        },
        "{}",
        env.logs()
    );
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
}

/// On a Redis without keyspace notifications that refuses `CONFIG` (as managed
/// Redis services do), waiters poll: still one BI query for a stampede.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_config_and_notifications_waiters_poll() {
    let redis = RedisServer::start(&[
        "--notify-keyspace-events",
        "",
        "--rename-command",
        "CONFIG",
        "",
    ])
    .await;
    polling_stampede(&redis, &[], "polling").await;
}

/// With `REDIS_CONFIGURE_NOTIFICATIONS=false`, a Redis whose keyspace
/// notifications are off is left as it is (`notify-keyspace-events` still
/// empty afterwards), and waiters poll: still one BI query for a stampede.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_are_left_alone_when_configuring_them_is_not_allowed() {
    let redis = RedisServer::start(&["--notify-keyspace-events", ""]).await;
    polling_stampede(
        &redis,
        &[("REDIS_CONFIGURE_NOTIFICATIONS", "false")],
        "not-configured",
    )
    .await;
    let mut conn = redis.connection().await;
    let flags: Vec<String> = query(
        &mut conn,
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events"),
    )
    .await;
    assert_eq!(flags, ["notify-keyspace-events", ""]);
}

/// A BI 500 under a 50-request stampede over three instances is one BI query,
/// and its error is shared: every request, on every instance, gets `BI_ERROR`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bi_error_is_shared_across_instances() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(1_000)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    env.sim
        .faults(json!({"failNext": {"count": 1, "status": 500}}))
        .await;
    let (body, _) = question("bi-error");

    let answers = env.fire(50, &body).await;

    for answer in &answers {
        assert_eq!(error_code(answer), Some("BI_ERROR"), "{answer}");
    }
    let stats = env.sim.stats();
    assert_eq!((stats.http_requests, stats.queries), (1, 1), "{stats:?}");
}

/// A 429 whose `Retry-After` (30 s) is past the BI deadline is `RATE_LIMITED`,
/// and the cool-down is shared: a different question asked on another instance
/// right after is `RATE_LIMITED` too, without any new BI request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_cool_down_is_shared_across_instances() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .env("BI_TIMEOUT_SECS", 1)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    env.sim
        .faults(json!({"rateLimit": {"count": 1, "retryAfterSecs": 30}}))
        .await;
    let (first, _) = question("rate-limited");
    let (other, _) = question("rate-limited-too");

    let answer = env.gateways[0].graphql(&first).await;
    assert_eq!(error_code(&answer), Some("RATE_LIMITED"), "{answer}");
    assert_eq!(env.sim.stats().http_requests, 1);

    let answer = env.gateways[1].graphql(&other).await;
    assert_eq!(error_code(&answer), Some("RATE_LIMITED"), "{answer}");
    let retry_after = answer["errors"][0]["extensions"]["retryAfter"]
        .as_u64()
        .unwrap_or_else(|| panic!("RATE_LIMITED says when to come back: {answer}"));
    assert!((1..=30).contains(&retry_after), "{answer}");
    assert_eq!(env.sim.stats().http_requests, 1, "{:?}", env.sim.stats());
}

/// "One slow reply on a loaded machine is not an outage" (ARCHITECTURE,
/// degraded mode): a Redis stall timed so that exactly one of the pinger's
/// PINGs outlives `REDIS_TIMEOUT_MS=500`, while nothing else is asked of
/// Redis, leaves the instance coordinating through Redis: `/readyz` never says
/// `"redis": "down"` during the stall or the second after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_slow_redis_reply_is_not_an_outage() {
    let redis = RedisServer::start(&["--enable-debug-command", "yes"]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .env("REDIS_TIMEOUT_MS", 500),
    )
    .await;
    wait_for_redis(&env, "up", Duration::from_secs(20)).await;

    // The pinger sends a PING every 500 ms (then one on its subscriber
    // connection). Seen one go by, stall Redis from 100 ms later for 1 s: the
    // next PING waits 600+ ms (one timeout), the one after is answered.
    let mut conn = redis.connection().await;
    let pings = |info: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix("cmdstat_ping:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    };
    let info: String = query(&mut conn, redis::cmd("INFO").arg("commandstats")).await;
    let before = pings(&info);
    within(Duration::from_secs(10), "the pinger's PING", async {
        loop {
            let info: String = query(&mut conn, redis::cmd("INFO").arg("commandstats")).await;
            if pings(&info) > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stall = tokio::spawn(async move {
        let () = query(&mut conn, redis::cmd("DEBUG").arg("SLEEP").arg("1.0")).await;
    });

    let watched_until = tokio::time::Instant::now() + Duration::from_millis(2_100);
    let mut seen = Vec::new();
    while tokio::time::Instant::now() < watched_until {
        let (_, ready) = env.gateway().readyz().await;
        seen.push(ready["redis"].as_str().unwrap_or("?").to_owned());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    within(Duration::from_secs(10), "the stall to end", stall)
        .await
        .expect("the stall task does not panic");
    assert!(
        seen.iter().all(|redis| redis == "up"),
        "/readyz said {seen:?}\n{}",
        env.logs()
    );
}

/// Redis SIGKILLed in the middle of a 90-request stampede over three
/// instances: every request still ends (the rows or an error with a code)
/// within its 8 s deadline plus a margin, and no gateway dies. Once Redis is
/// restarted (empty, on the same port), every instance reports it up again,
/// with keyspace notifications turned back on, and coordination resumes: the
/// next stampede makes one BI query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_stampede_then_restarted() {
    const REQUEST_DEADLINE: Duration = Duration::from_secs(8);
    let mut redis = RedisServer::start(&[]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .instances(3)
            .latency_ms(1_500)
            .env("REQUEST_TIMEOUT_SECS", REQUEST_DEADLINE.as_secs())
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    wait_for_redis(&env, "up", Duration::from_secs(20)).await;
    let (body, expected) = question("outage");

    let in_flight = env.spawn_fire(90, &body);
    env.wait_for_lock_owner(Duration::from_secs(20)).await;
    wait_until(Duration::from_secs(20), "the leader's BI call", || async {
        env.sim.stats().http_requests >= 1
    })
    .await;
    redis.kill();

    let replies: Vec<Reply> = within(
        REQUEST_DEADLINE + Duration::from_secs(6),
        "every request to end after Redis died",
        join_all(in_flight.into_iter().map(InFlight::outcome)),
    )
    .await
    .into_iter()
    .map(|reply| reply.expect("the gateways stay up and answer"))
    .collect();
    for reply in &replies {
        let answer = &reply.body;
        if answer.get("errors").is_none() {
            assert_eq!(answer["data"]["aggregate"]["rows"], expected, "{answer}");
        } else {
            assert!(
                error_code(answer).is_some(),
                "an error without a code: {answer}"
            );
        }
        if let Some(degraded) = &reply.degraded {
            assert_eq!(degraded, "redis-unavailable", "{answer}");
        }
    }
    for gateway in &env.gateways {
        assert_eq!(gateway.get("/healthz").await.status().as_u16(), 200);
    }

    redis.restart().await;
    wait_for_redis(&env, "up", Duration::from_secs(30)).await;
    for gateway in &env.gateways {
        wait_until(
            Duration::from_secs(10),
            "notifications checked again",
            || async { gateway.readyz().await.1["notifications"] == "keyspace" },
        )
        .await;
    }
    let mut conn = redis.connection().await;
    let flags: Vec<String> = query(
        &mut conn,
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events"),
    )
    .await;
    assert!(flags[1].contains('K'), "{flags:?}");

    let before = env.sim.stats().queries;
    let (body, expected) = question("after-outage");
    let answers = env.fire(60, &body).await;
    assert_eq!(
        statuses(&answers, &expected),
        Statuses {
            miss: 1,
            coalesced: 59,
            hit: 0
        },
        "{}",
        env.logs()
    );
    for answer in &answers {
        assert!(
            answer["extensions"]["degraded"].is_null(),
            "still degraded: {answer}"
        );
    }
    assert_eq!(env.sim.stats().queries, before + 1, "{:?}", env.sim.stats());
}

/// A gateway whose Redis is not there at start still answers with the right
/// rows, marked `x-gateway-degraded: redis-unavailable`, and `/readyz` is 200
/// with `"redis": "down"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_at_start_the_gateway_serves_degraded() {
    let port = closed_port();
    let env =
        TestEnv::start(TestOptions::default().redis_at(format!("redis://127.0.0.1:{port}"))).await;
    let (body, expected) = question("no-redis");

    let reply = env.gateway().reply(&body).await;

    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(
        reply.degraded.as_deref(),
        Some("redis-unavailable"),
        "{:?}",
        reply.body
    );
    assert_eq!(
        statuses(std::slice::from_ref(&reply.body), &expected).miss,
        1
    );
    assert_eq!(reply.body["extensions"]["degraded"], "redis-unavailable");
    let (status, ready) = env.gateway().readyz().await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(
        (&ready["redis"], &ready["bi"]),
        (&json!("down"), &json!("up"))
    );
    assert_eq!(env.sim.stats().queries, 1);
}
