//! Live panels (`aggregateLive` over `graphql-transport-ws`): real gateway
//! processes sharing a real `redis-server`, bi-sim counting every query, and
//! a real WebSocket client.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::live::{LiveConnection, Received, rows};
use crate::common::{TestEnv, TestOptions, expected_rows_at, input, wait_until};
use crate::security::{JWT_SECRET, memory_kib, now, sign, token_for};
use analytics_gateway::config::Config;

/// The interval of these tests (`LIVE_MIN_INTERVAL_SECS` and `everySeconds`).
const INTERVAL: Duration = Duration::from_secs(1);

/// Five different panels (one customer each).
fn panels() -> Vec<Value> {
    (0..5)
        .map(|i| {
            input(
                &format!("live-{i}"),
                "2025-01-01",
                "2025-01-07",
                &["Sales.revenue", "Sales.orders"],
                &["Sales.region"],
                Some("DAY"),
            )
        })
        .collect()
}

fn live_env() -> TestOptions {
    TestOptions::default()
        .latency_ms(50)
        .redis()
        .env("LIVE_MIN_INTERVAL_SECS", INTERVAL.as_secs())
}

/// The BI queries bi-sim received for each of `inputs`, in order.
fn queries_per_panel(env: &TestEnv, inputs: &[Value]) -> Vec<u64> {
    let stats = env.sim.stats();
    let config = Config::embedded_defaults();
    inputs
        .iter()
        .map(|input| {
            let planned = crate::common::plan_with(&config, input);
            let key = analytics_gateway::sim::canonical_key(&planned.cube);
            stats.by_query.get(&key).copied().unwrap_or(0)
        })
        .collect()
}

/// 300 subscriptions to 5 panels over 3 instances: bi-sim counts one query
/// per panel per interval, whatever the number of subscribers or instances;
/// with unchanged data nobody gets a second event, and after bi-sim's data
/// changes every subscriber gets the new rows within one interval and a
/// margin.
#[tokio::test(flavor = "multi_thread")]
async fn three_hundred_subscribers_of_five_panels_cost_five_queries_per_interval() {
    let env = TestEnv::start(live_env().instances(3)).await;
    let panels = panels();
    // 3 instances x 5 connections x 20 subscriptions (4 of each panel).
    let subscribed = Instant::now();
    let mut connections = Vec::new();
    for gateway in &env.gateways {
        for _ in 0..5 {
            let mut connection = LiveConnection::connect(gateway, json!({}))
                .await
                .expect("an open gateway admits everyone");
            for s in 0..20 {
                let panel = &panels[s % panels.len()];
                connection.subscribe(&format!("s{s}"), panel, Some(1)).await;
            }
            connections.push(connection);
        }
    }
    let expected: Vec<Value> = panels
        .iter()
        .map(|p| expected_rows_at(&Config::embedded_defaults(), p, 0))
        .collect();
    for connection in &connections {
        for s in 0..20 {
            let first = connection
                .wait_for(&format!("s{s}"), 1, Duration::from_secs(20))
                .await;
            assert_eq!(rows(&first[0]), &expected[s % panels.len()]);
        }
    }
    // One query per panel for 300 first events, and one per interval since
    // (a loaded machine may take more than an interval to serve them all).
    let intervals = subscribed.elapsed().as_secs_f64() / INTERVAL.as_secs_f64();
    let first_queries = queries_per_panel(&env, &panels);
    assert!(
        first_queries
            .iter()
            .all(|n| *n >= 1 && (*n as f64) <= 1.0 + intervals.ceil()),
        "{first_queries:?} queries per panel in {intervals:.2} intervals"
    );

    // Unchanged data: refreshes every interval, one per panel, no event.
    let before = queries_per_panel(&env, &panels);
    let started = Instant::now();
    tokio::time::sleep(INTERVAL * 5).await;
    let after = queries_per_panel(&env, &panels);
    let elapsed = started.elapsed().as_secs_f64() / INTERVAL.as_secs_f64();
    let per_panel: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!("queries per panel over {elapsed:.2} intervals: {per_panel:?}");
    for count in &per_panel {
        // A refresh every interval; one more or less at the window's edges.
        assert!(
            (4..=6).contains(count),
            "one BI query per panel per interval for 3 instances, not {per_panel:?} over {elapsed:.2} intervals"
        );
    }
    for connection in &connections {
        for s in 0..20 {
            assert_eq!(
                connection.received(&format!("s{s}")).len(),
                1,
                "unchanged rows send no event"
            );
        }
    }

    // New numbers: every subscriber has them within an interval and a margin.
    env.sim.set_data_version(1).await;
    let changed = Instant::now();
    let expected: Vec<Value> = panels
        .iter()
        .map(|p| expected_rows_at(&Config::embedded_defaults(), p, 1))
        .collect();
    let mut latest = Duration::ZERO;
    for connection in &connections {
        for s in 0..20 {
            let received = connection
                .wait_for(&format!("s{s}"), 2, INTERVAL * 2 + Duration::from_secs(1))
                .await;
            assert_eq!(rows(&received[1]), &expected[s % panels.len()]);
            latest = latest.max(received[1].at.duration_since(changed));
        }
    }
    println!("the last subscriber had the new rows {latest:?} after the data changed");
    assert!(latest < INTERVAL + Duration::from_millis(1500));
}

/// When the last subscriber of a panel goes away, bi-sim sees no more
/// queries for it after one interval, while another panel's go on.
#[tokio::test(flavor = "multi_thread")]
async fn refreshing_stops_with_the_last_subscriber() {
    let env = TestEnv::start(live_env().instances(2)).await;
    let panels = panels();
    let (gone, kept) = (&panels[0], &panels[1]);
    let mut a = LiveConnection::connect(&env.gateways[0], json!({}))
        .await
        .expect("an open gateway admits everyone");
    let mut b = LiveConnection::connect(&env.gateways[1], json!({}))
        .await
        .expect("an open gateway admits everyone");
    a.subscribe("gone", gone, Some(1)).await;
    b.subscribe("gone", gone, Some(1)).await;
    b.subscribe("kept", kept, Some(1)).await;
    a.wait_for("gone", 1, Duration::from_secs(10)).await;
    b.wait_for("gone", 1, Duration::from_secs(10)).await;
    b.wait_for("kept", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(INTERVAL * 2).await;
    a.unsubscribe("gone").await;
    b.unsubscribe("gone").await;
    // One refresh may be under way as they leave.
    tokio::time::sleep(INTERVAL + Duration::from_millis(500)).await;
    let stopped = queries_per_panel(&env, &[gone.clone(), kept.clone()]);
    tokio::time::sleep(INTERVAL * 3).await;
    let later = queries_per_panel(&env, &[gone.clone(), kept.clone()]);
    assert_eq!(later[0], stopped[0], "no query for a panel nobody watches");
    assert!(
        later[1] >= stopped[1] + 2,
        "the watched panel is still refreshed: {stopped:?} -> {later:?}"
    );
}

/// The instance holding a panel's refresh (its lock, its BI call under way)
/// is killed: once the lock's lifetime is over another instance refreshes
/// the panel, and the subscribers on the survivors get the new rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_refresher_is_taken_over_and_survivors_keep_their_events() {
    let lock_ttl = Duration::from_millis(1000);
    let mut env = TestEnv::start(
        live_env()
            .latency_ms(800)
            .instances(3)
            .env("REDIS_LOCK_TTL_MS", lock_ttl.as_millis()),
    )
    .await;
    let panel = &panels()[0];
    let mut connections = Vec::new();
    for gateway in &env.gateways {
        let mut connection = LiveConnection::connect(gateway, json!({}))
            .await
            .expect("an open gateway admits everyone");
        connection.subscribe("p", panel, Some(1)).await;
        connections.push(connection);
    }
    for connection in &connections {
        connection.wait_for("p", 1, Duration::from_secs(10)).await;
    }
    // Catch a refresh in the act: its lock is held and its BI call made.
    let calls = env.sim.stats().http_requests;
    let owner = env.wait_for_lock_owner(Duration::from_secs(10)).await;
    wait_until(
        Duration::from_secs(5),
        "the refresher's BI call",
        || async { env.sim.stats().http_requests > calls },
    )
    .await;
    let refresher = env.gateway_index(&owner);
    env.gateways[refresher].kill();
    let killed = Instant::now();
    env.sim.set_data_version(1).await;
    let expected = expected_rows_at(&Config::embedded_defaults(), panel, 1);
    for (i, connection) in connections.iter().enumerate() {
        if i == refresher {
            continue;
        }
        // The lock expires, then the next interval's refresh (and its BI
        // latency) brings the new rows.
        let received = connection
            .wait_for("p", 2, lock_ttl + INTERVAL * 2 + Duration::from_secs(3))
            .await;
        assert_eq!(rows(&received[1]), &expected);
        println!(
            "instance {i} had the new rows {:?} after the refresher was killed",
            received[1].at.duration_since(killed)
        );
    }
}

/// With authentication on: no credential in `connection_init` is refused
/// with 4403; another tenant's customer is FORBIDDEN on subscribe; a JWT
/// that expires closes its connection when it does.
#[tokio::test(flavor = "multi_thread")]
async fn who_may_watch_is_decided_at_connection_init_and_on_every_subscribe() {
    let env = TestEnv::start(live_env().env("AUTH_JWT_SECRET", JWT_SECRET)).await;
    let gateway = env.gateway();
    let refused = LiveConnection::connect(gateway, json!({}))
        .await
        .err()
        .expect("no credential, no connection");
    assert_eq!(refused.code, 4403, "{refused:?}");
    let refused = LiveConnection::connect(gateway, json!({"Authorization": "Bearer nope"}))
        .await
        .err()
        .expect("a bad token, no connection");
    assert_eq!(refused.code, 4403, "{refused:?}");

    let panel = &panels()[0];
    let mut acme = LiveConnection::connect(
        gateway,
        json!({"Authorization": format!("Bearer {}", token_for("u1", json!(["acme"])))}),
    )
    .await
    .expect("a valid token is admitted");
    acme.subscribe("other", panel, None).await;
    let received = acme.wait_for("other", 1, Duration::from_secs(10)).await;
    assert_eq!(
        received[0].payload["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{:?}",
        received[0].payload
    );
    let own = input(
        "acme",
        "2025-01-01",
        "2025-01-03",
        &["Sales.orders"],
        &[],
        None,
    );
    acme.subscribe("own", &own, None).await;
    let received = acme.wait_for("own", 1, Duration::from_secs(10)).await;
    assert!(received[0].payload["data"]["aggregateLive"]["rows"].is_array());
    assert_eq!(
        env.sim.stats().queries,
        1,
        "the forbidden panel cost nothing"
    );

    let expiring = sign(
        &json!({"sub": "u2", "exp": now() + 3, "customers": ["acme"]}),
        JWT_SECRET,
    );
    let mut short = LiveConnection::connect(
        gateway,
        json!({"authorization": format!("Bearer {expiring}")}),
    )
    .await
    .expect("a token valid for 3 s is admitted");
    let opened = Instant::now();
    short.subscribe("own", &own, None).await;
    short.wait_for("own", 1, Duration::from_secs(5)).await;
    let (code, reason) = short.wait_closed(Duration::from_secs(8)).await;
    assert_eq!(code, 4403, "{reason}");
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "closed at expiry, not before"
    );
    assert!(acme.closed().is_none(), "the other connection stays open");
}

/// Limits: past LIVE_MAX_SUBSCRIPTIONS_PER_CONNECTION, and past
/// LIVE_MAX_SUBSCRIPTIONS on the instance, a subscribe is refused with
/// TOO_MANY_SUBSCRIPTIONS; a subscription ended frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_past_the_limits_are_refused() {
    let env = TestEnv::start(
        live_env()
            .env("LIVE_MAX_SUBSCRIPTIONS_PER_CONNECTION", 2)
            .env("LIVE_MAX_SUBSCRIPTIONS", 3),
    )
    .await;
    let panel = &panels()[0];
    let code =
        |received: &[Received]| received[0].payload["errors"][0]["extensions"]["code"].clone();
    let mut one = LiveConnection::connect(env.gateway(), json!({}))
        .await
        .expect("an open gateway admits everyone");
    for id in ["a", "b", "c"] {
        one.subscribe(id, panel, None).await;
    }
    // A connection's subscribes run concurrently: any one of the three is
    // the one past the limit.
    let mut refused = Vec::new();
    for id in ["a", "b", "c"] {
        let received = one.wait_for(id, 1, Duration::from_secs(10)).await;
        if !rows(&received[0]).is_array() {
            assert_eq!(code(&received), "TOO_MANY_SUBSCRIPTIONS", "{received:?}");
            refused.push(id);
        }
    }
    assert_eq!(
        refused.len(),
        1,
        "two subscriptions per connection: {refused:?}"
    );
    let kept = if refused[0] == "a" { "b" } else { "a" };
    let mut two = LiveConnection::connect(env.gateway(), json!({}))
        .await
        .expect("an open gateway admits everyone");
    two.subscribe("a", panel, None).await;
    two.subscribe("b", panel, None).await;
    assert!(rows(&two.wait_for("a", 1, Duration::from_secs(10)).await[0]).is_array());
    assert_eq!(
        code(&two.wait_for("b", 1, Duration::from_secs(10)).await),
        "TOO_MANY_SUBSCRIPTIONS"
    );
    one.unsubscribe(kept).await;
    wait_until(Duration::from_secs(5), "a freed place", || async {
        let text = env
            .gateway()
            .get("/metrics")
            .await
            .text()
            .await
            .expect("the metrics text");
        crate::common::metric(&text, "analytics_gateway_live_subscribers", &[]) == Some(2.0)
    })
    .await;
    two.subscribe("c", panel, None).await;
    assert!(rows(&two.wait_for("c", 1, Duration::from_secs(10)).await[0]).is_array());
}

/// A subscriber that never reads: however many events its panels have, the
/// gateway's memory stays bounded (each subscription keeps only its latest
/// event; the socket's buffers are all that waits for the client), and its
/// connection is closed once a send stayed blocked for
/// LIVE_SEND_TIMEOUT_SECS, while a subscriber that reads is served on.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_never_reads_holds_no_memory() {
    let env = TestEnv::start(live_env().latency_ms(10).env("LIVE_SEND_TIMEOUT_SECS", 3)).await;
    let gateway = env.gateway();
    // A big panel: a year of days by region and product.
    let big = input(
        "reader",
        "2024-01-01",
        "2024-12-31",
        &["Sales.revenue", "Sales.orders"],
        &["Sales.region", "Sales.product"],
        Some("DAY"),
    );
    let mut reader = LiveConnection::connect(gateway, json!({}))
        .await
        .expect("an open gateway admits everyone");
    reader.subscribe("big", &big, Some(1)).await;
    reader.wait_for("big", 1, Duration::from_secs(20)).await;
    // A raw client that subscribes to the same panel 50 times and never
    // reads a byte.
    let stalled = stalled_subscriber(gateway, &big, 50).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_before, _) = memory_kib(gateway.pid());
    for version in 1..=8 {
        env.sim.set_data_version(version).await;
        reader
            .wait_for("big", 1 + version as usize, Duration::from_secs(5))
            .await;
    }
    let (rss_after, _) = memory_kib(gateway.pid());
    println!(
        "gateway VmRSS {rss_before} -> {rss_after} KiB over 8 changes of 50 unread subscriptions"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    wait_until(
        Duration::from_secs(10),
        "the stalled connection closed",
        || async {
            let text = gateway
                .get("/metrics")
                .await
                .text()
                .await
                .expect("the metrics text");
            crate::common::metric(
                &text,
                "analytics_gateway_live_connections_closed_total",
                &[("reason", "slow_consumer")],
            ) == Some(1.0)
        },
    )
    .await;
    assert!(
        reader.closed().is_none(),
        "the reading subscriber is served on"
    );
    drop(stalled);
}

/// Opens a WebSocket, subscribes `n` times to `input`, and never reads.
async fn stalled_subscriber(
    gateway: &crate::common::Gateway,
    input: &Value,
    n: usize,
) -> tokio::net::TcpStream {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = gateway.url().replacen("http://", "ws://", 1) + "/graphql";
    let mut request = url.into_client_request().expect("a WebSocket request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().expect("a header value"),
    );
    let tcp = tokio::net::TcpStream::connect(gateway.url().trim_start_matches("http://"))
        .await
        .expect("the gateway accepts TCP");
    let (mut socket, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("the WebSocket upgrade");
    socket
        .send(Message::text(
            json!({"type": "connection_init", "payload": {}}).to_string(),
        ))
        .await
        .expect("connection_init is sent");
    for i in 0..n {
        let message = json!({
            "id": format!("x{i}"),
            "type": "subscribe",
            "payload": {
                "query": crate::common::live::LIVE_QUERY,
                "variables": {"input": input, "everySeconds": 1},
            },
        });
        socket
            .send(Message::text(message.to_string()))
            .await
            .expect("subscribe is sent");
    }
    // Never polled again: the gateway's sends pile up in the socket only.
    socket.into_inner()
}

/// Without Redis (one instance, the embedded coordinator) a live panel works
/// the same way: the first event, nothing while the rows stay the same, then
/// the changed rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_panel_without_redis_gets_its_changes() {
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(20)
            .env("LIVE_MIN_INTERVAL_SECS", INTERVAL.as_secs()),
    )
    .await;
    let panel = &panels()[0];
    let mut connection = LiveConnection::connect(env.gateway(), json!({}))
        .await
        .expect("an open gateway admits everyone");
    connection.subscribe("p", panel, None).await;
    let first = connection.wait_for("p", 1, Duration::from_secs(10)).await;
    assert_eq!(
        rows(&first[0]),
        &expected_rows_at(&Config::embedded_defaults(), panel, 0)
    );
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(connection.received("p").len(), 1, "no change, no event");
    assert!(
        (3..=5).contains(&env.sim.stats().queries),
        "refreshed every interval: {} queries",
        env.sim.stats().queries
    );
    env.sim.set_data_version(1).await;
    let received = connection
        .wait_for("p", 2, INTERVAL + Duration::from_secs(1))
        .await;
    assert_eq!(
        rows(&received[1]),
        &expected_rows_at(&Config::embedded_defaults(), panel, 1)
    );
    assert_eq!(
        received[1].payload["data"]["aggregateLive"]["cache"]["status"],
        "MISS"
    );
}

/// A connection that never sends `connection_init` is closed with
/// graphql-transport-ws's 4408 once the first answer's time is over; one
/// whose client stops answering pings (a peer gone without a close: power,
/// a NAT mapping) is closed after three send timeouts, though nothing was
/// written to it: its subscriptions do not live on.
#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_are_closed() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .env("REQUEST_TIMEOUT_SECS", 2)
            .env("LIVE_SEND_TIMEOUT_SECS", 1)
            .env("LIVE_MIN_INTERVAL_SECS", 1),
    )
    .await;
    let gateway = env.gateway();
    let url = gateway.url().replacen("http://", "ws://", 1) + "/graphql";
    let mut request = url.into_client_request().expect("a WebSocket request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().expect("a header value"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the WebSocket upgrade");
    let started = std::time::Instant::now();
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => break u16::from(frame.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close within 10 s: {other:?}"),
        }
    };
    assert_eq!(code, 4408);
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "{:?}",
        started.elapsed()
    );

    // A subscriber whose socket is never read again answers no ping.
    let before = env.sim.stats().queries;
    let tcp = stalled_subscriber(gateway, &panels()[0], 1).await;
    let metrics = || async {
        let text = gateway
            .get("/metrics")
            .await
            .text()
            .await
            .unwrap_or_default();
        crate::common::metric(
            &text,
            "analytics_gateway_live_connections_closed_total",
            &[("reason", "unresponsive")],
        )
        .unwrap_or(0.0)
            + crate::common::metric(
                &text,
                "analytics_gateway_live_connections_closed_total",
                &[("reason", "slow_consumer")],
            )
            .unwrap_or(0.0)
    };
    crate::common::wait_until(
        Duration::from_secs(10),
        "the silent connection to be closed",
        || async { metrics().await >= 1.0 },
    )
    .await;
    // Its key is not refreshed any more (one interval of slack).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let settled = env.sim.stats().queries;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        env.sim.stats().queries,
        settled,
        "refreshed after its connection closed"
    );
    assert!(settled > before);
    drop(tcp);
}

/// A subscription to a key new to the instance may cost a BI query: it is
/// counted against the caller's quota like one (`AUTH_JWT_QUOTA_PER_MINUTE`),
/// so subscribing and ending over and over cannot buy unlimited BI calls;
/// past the quota, `RATE_LIMITED` and no BI query.
#[tokio::test(flavor = "multi_thread")]
async fn live_subscriptions_spend_the_callers_quota() {
    let env = TestEnv::start(
        live_env()
            .env("AUTH_JWT_SECRET", JWT_SECRET)
            .env("AUTH_JWT_QUOTA_PER_MINUTE", 2),
    )
    .await;
    let mut connection = LiveConnection::connect(
        env.gateway(),
        json!({"Authorization": format!("Bearer {}", token_for("quota", json!(["acme"])))}),
    )
    .await
    .expect("admitted");
    let panel = |day: u32| {
        input(
            "acme",
            "2025-03-01",
            &format!("2025-03-{day:02}"),
            &["Sales.orders"],
            &[],
            None,
        )
    };
    for (id, day) in [("a", 2), ("b", 3)] {
        connection.subscribe(id, &panel(day), None).await;
        let received = connection.wait_for(id, 1, Duration::from_secs(10)).await;
        assert!(
            received[0].payload["data"]["aggregateLive"]["rows"].is_array(),
            "{:?}",
            received[0].payload
        );
    }
    connection.subscribe("c", &panel(4), None).await;
    let received = connection.wait_for("c", 1, Duration::from_secs(10)).await;
    assert_eq!(
        received[0].payload["errors"][0]["extensions"]["code"], "RATE_LIMITED",
        "{:?}",
        received[0].payload
    );
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());
}
