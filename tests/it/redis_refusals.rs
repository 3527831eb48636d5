//! A Redis that refuses what coordination needs, and answers produced
//! without coordination: Redis is down until it runs a script that writes,
//! notifications are checked again when it comes back, a paid answer
//! replaces a remembered error, and a degraded answer stays marked.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    FaultProxy, RedisServer, TestEnv, TestOptions, closed_port, error_code, expected_rows_for,
    input, panel_body, query, wait_until, within,
};

fn panel(customer: &str, day: usize) -> Value {
    input(
        customer,
        &format!("2025-07-{:02}", day + 1),
        "2025-07-31",
        &["Sales.revenue"],
        &["Sales.region"],
        Some("DAY"),
    )
}

async fn min_replicas_to_write(redis: &RedisServer, n: u32) {
    let mut conn = redis.connection().await;
    let () = query(
        &mut conn,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("min-replicas-to-write")
            .arg(n),
    )
    .await;
}

async fn wait_for_ready_field(env: &TestEnv, field: &str, value: &str, limit: Duration) {
    let gateway = env.gateway();
    within(limit, &format!("/readyz to say {field} {value}"), async {
        loop {
            let (_, ready) = gateway.readyz().await;
            if ready[field] == value {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// Redis refuses writes for longer than a lock lifetime (the gateway goes
/// down and forgets whether notifications are on), then accepts them again:
/// the probe that ends the refusal is followed by a check of the
/// notifications, so `/readyz` says `keyspace` again within seconds and
/// waiters are woken by notifications, not by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_are_checked_again_after_redis_refused_writes() {
    let redis = RedisServer::start(&[]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .latency_ms(200)
            .env("REQUEST_TIMEOUT_SECS", 8),
    )
    .await;
    wait_for_ready_field(&env, "notifications", "keyspace", Duration::from_secs(10)).await;

    min_replicas_to_write(&redis, 1).await;
    let reply = env
        .gateway()
        .reply(&panel_body(panel("refused-then-back", 0)))
        .await;
    assert_eq!(
        reply.degraded.as_deref(),
        Some("redis-unavailable"),
        "{}",
        reply.body
    );
    wait_for_ready_field(&env, "redis", "down", Duration::from_secs(10)).await;
    // Long enough for the pinger to see the refusal (its probe fails).
    tokio::time::sleep(Duration::from_secs(2)).await;
    min_replicas_to_write(&redis, 0).await;
    wait_for_ready_field(&env, "redis", "up", Duration::from_secs(10)).await;
    // Redis never restarted and never lost its configuration: the gateway
    // set `notify-keyspace-events` at start and it is still set.
    let mut conn = redis.connection().await;
    let flags: Vec<String> = query(
        &mut conn,
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events"),
    )
    .await;
    assert!(flags[1].contains('K'), "{flags:?}");
    // Several run_id checks (every 2 s) later, still "polling".
    let mut seen = String::new();
    let checked = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            let (_, ready) = env.gateway().readyz().await;
            seen = ready.to_string();
            if ready["notifications"] == "keyspace" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        checked.is_ok(),
        "8 s after Redis accepted writes again, /readyz still says {seen}\n{}",
        env.logs()
    );
}

/// A Redis that refuses only scripts (`ACL SETUSER default -eval`; a
/// hardened `rename-command EVAL ""` alike) cannot be coordinated through:
/// once it has refused the locks for a lock lifetime it stays down, because
/// the pinger's probe is a script that writes, so `/readyz` says `down` and
/// the next miss is answered degraded at once, not after another lock
/// lifetime of refused retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_refuses_scripts_stays_down() {
    let redis = RedisServer::start(&[]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .latency_ms(200)
            .env("REQUEST_TIMEOUT_SECS", 10),
    )
    .await;
    wait_for_ready_field(&env, "redis", "up", Duration::from_secs(10)).await;
    let mut conn = redis.connection().await;
    let () = query(
        &mut conn,
        redis::cmd("ACL").arg("SETUSER").arg("default").arg("-eval"),
    )
    .await;

    let first = env
        .gateway()
        .reply(&panel_body(panel("no-scripts", 0)))
        .await;
    assert_eq!(
        first.degraded.as_deref(),
        Some("redis-unavailable"),
        "{}",
        first.body
    );
    // Give the pinger a few periods.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, ready) = env.gateway().readyz().await;

    let started = std::time::Instant::now();
    let second = env
        .gateway()
        .reply(&panel_body(panel("no-scripts", 1)))
        .await;
    let took = started.elapsed();
    assert_eq!(
        second.degraded.as_deref(),
        Some("redis-unavailable"),
        "{}",
        second.body
    );
    assert!(
        ready["redis"] == "down" && took < Duration::from_millis(1_500),
        "EVAL is refused, yet 2 s after the first degraded answer /readyz said {ready} \
         and the next miss took {took:?} (BI latency 200 ms)"
    );
}

/// A paid answer is never thrown away for a remembered error: gw-0 leads a
/// panel; its Redis link pauses and its lock expires; gw-1 takes the key
/// over and its BI call fails (500), so gw-1 stores the error. gw-0's call
/// succeeds; its fill finds the lock gone and an error (not another
/// leader's success) there, and stores the rows, which every instance,
/// gw-1 included, answers from then on, with no third BI call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paid_answer_replaces_an_error_stored_without_the_lock() {
    let redis = RedisServer::start(&["--notify-keyspace-events", "KA"]).await;
    let proxy = FaultProxy::start(&redis.url()["redis://".len()..]).await;
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(redis.url())
            .instances(2)
            .latency_ms(2_500)
            .env("REDIS_LOCK_TTL_MS", 600)
            .env("REQUEST_TIMEOUT_SECS", 20)
            .instance_env(0, "REDIS_URL", proxy.redis_url())
            .instance_env(0, "REDIS_DOWN_AFTER_MS", 20_000),
    )
    .await;
    let input = panel("error-then-paid", 0);
    let expected = expected_rows_for(&input);
    let body = panel_body(input);

    let leader = tokio::spawn({
        let client = env.gateways[0].client();
        let body = body.clone();
        async move { client.graphql(&body).await }
    });
    wait_until(Duration::from_secs(10), "gw-0's BI call", || async {
        env.sim.stats().http_requests >= 1
    })
    .await;
    // The next BI call (gw-1's takeover) fails.
    env.sim
        .faults(json!({"failNext": {"count": 1, "status": 500}}))
        .await;
    let waiter = tokio::spawn({
        let client = env.gateways[1].client();
        let body = body.clone();
        async move { client.graphql(&body).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.pause();
    let waited = within(Duration::from_secs(15), "gw-1's takeover", waiter)
        .await
        .expect("no panic")
        .expect("answered")
        .body;
    assert_eq!(
        error_code(&waited),
        Some("BI_ERROR"),
        "{waited}\n{}",
        env.logs()
    );
    proxy.resume();
    let led = within(Duration::from_secs(15), "gw-0's paid answer", leader)
        .await
        .expect("no panic")
        .expect("answered")
        .body;
    assert_eq!(led["data"]["aggregate"]["rows"], expected, "{led}");
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());

    // The BI was paid for these rows: they are the answer now.
    let after = env.gateways[1].graphql(&body).await;
    assert!(
        after.get("errors").is_none(),
        "gw-0's paid rows were thrown away; gw-1 answers {after}\n{}",
        env.logs()
    );
    assert_eq!(after["data"]["aggregate"]["rows"], expected, "{after}");
}

/// An answer produced without coordination (Redis unreachable) says so every
/// time it is served: the first request is a degraded MISS, the identical
/// second one a HIT from process memory, degraded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uncoordinated_answer_served_again_still_says_degraded() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis_at(format!("redis://127.0.0.1:{}", closed_port()))
            .latency_ms(200),
    )
    .await;
    let body = panel_body(panel("degraded-twice", 0));
    let first = env.gateway().reply(&body).await;
    assert_eq!(
        first.degraded.as_deref(),
        Some("redis-unavailable"),
        "{}",
        first.body
    );
    assert_eq!(first.body["data"]["aggregate"]["cache"]["status"], "MISS");
    let second = env.gateway().reply(&body).await;
    assert_eq!(second.body["data"]["aggregate"]["cache"]["status"], "HIT");
    assert_eq!(
        second.degraded.as_deref(),
        Some("redis-unavailable"),
        "the same uncoordinated answer, served again: {}",
        second.body
    );
}
