//! The fault-injection proxy of the fixture, proved fault by fault against a
//! private `redis-server`, with RESP written by hand so that no client
//! library's timeouts or reconnects blur what the proxy did.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{
    FaultProxy, RedisServer, TestEnv, TestOptions, expected_rows, panel, wait_until, within,
};

/// Longer than any PING through an unfaulted proxy on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(10);

/// A private `redis-server` and a proxy in front of it.
async fn proxied() -> (RedisServer, FaultProxy) {
    let redis = RedisServer::start(&[]).await;
    let proxy = FaultProxy::start(redis.url().trim_start_matches("redis://")).await;
    (redis, proxy)
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    within(PATIENCE, "a connection to the proxy", async {
        TcpStream::connect(proxy.address()).await
    })
    .await
    .expect("the proxy accepts connections")
}

/// Sends one `PING` and reads its `+PONG`: the error when the connection
/// fails, ends or answers something else.
async fn ping(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
    let mut answer = [0_u8; 7];
    stream.read_exact(&mut answer).await?;
    if &answer == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("not a PONG: {answer:?}")))
    }
}

/// Waits until `proxy` counts `n` open connections.
async fn wait_for_connections(proxy: &FaultProxy, n: usize) {
    wait_until(PATIENCE, &format!("{n} proxied connections"), || async {
        proxy.connection_count() == n
    })
    .await;
}

/// A PING goes through the proxy and back; the proxy counts the connection
/// while it is open and forgets it once the client closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ping_goes_through_and_the_connection_is_counted() {
    let (_redis, proxy) = proxied().await;
    let mut stream = connect(&proxy).await;
    within(PATIENCE, "a PING", ping(&mut stream))
        .await
        .expect("PONG through the proxy");
    assert_eq!(proxy.connection_count(), 1);
    drop(stream);
    wait_for_connections(&proxy, 0).await;
}

/// During `pause` a PING does not complete, on an open connection or a new
/// one; after `resume` both complete, and nothing sent meanwhile is lost:
/// three PINGs sent while paused get three PONGs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_holds_every_byte_until_resume() {
    let (_redis, proxy) = proxied().await;
    let mut open = connect(&proxy).await;
    ping(&mut open).await.expect("PONG before the pause");

    proxy.pause();
    let held = tokio::spawn(async move {
        for _ in 0..3 {
            ping(&mut open).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut new = connect(&proxy).await;
    let held_new = tokio::spawn(async move { ping(&mut new).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "a PING completed during the pause");
    assert!(!held_new.is_finished(), "a new connection's PING completed");
    assert_eq!(proxy.connection_count(), 2, "paused connections stay open");

    proxy.resume();
    within(PATIENCE, "the held PINGs", held)
        .await
        .expect("no panic")
        .expect("three PONGs after resume");
    within(PATIENCE, "the new connection's PING", held_new)
        .await
        .expect("no panic")
        .expect("PONG after resume");
}

/// `set_delay(200 ms)` delays each way: a PING and its PONG take at least
/// 400 ms; `Duration::ZERO` takes the delay away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delay_slows_every_chunk_both_ways() {
    const DELAY: Duration = Duration::from_millis(200);
    let (_redis, proxy) = proxied().await;
    let mut stream = connect(&proxy).await;
    ping(&mut stream).await.expect("PONG before the delay");

    proxy.set_delay(DELAY);
    let started = std::time::Instant::now();
    within(PATIENCE, "a delayed PING", ping(&mut stream))
        .await
        .expect("PONG with a delay");
    let took = started.elapsed();
    assert!(took >= 2 * DELAY, "a delayed PING took {took:?}");

    proxy.set_delay(Duration::ZERO);
    let started = std::time::Instant::now();
    ping(&mut stream).await.expect("PONG without the delay");
    let took = started.elapsed();
    assert!(took < 2 * DELAY, "without the delay, a PING took {took:?}");
}

/// After `drop_connections`, the old connection reads a clean end (a FIN,
/// not a reset) and the proxy counts none; a new connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_connections_end_cleanly_and_new_ones_work() {
    let (_redis, proxy) = proxied().await;
    let mut old = connect(&proxy).await;
    ping(&mut old).await.expect("PONG before the drop");

    proxy.drop_connections();
    let mut rest = Vec::new();
    let read = within(
        PATIENCE,
        "the end of a dropped connection",
        old.read_to_end(&mut rest),
    )
    .await;
    assert!(
        matches!(read, Ok(0)),
        "a dropped connection ends with a FIN: {read:?}"
    );
    wait_for_connections(&proxy, 0).await;

    let mut new = connect(&proxy).await;
    within(PATIENCE, "a PING on a new connection", ping(&mut new))
        .await
        .expect("PONG on a new connection");
}

/// After `reset_connections`, the old connection fails with a reset; a new
/// connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_connections_abort_and_new_ones_work() {
    let (_redis, proxy) = proxied().await;
    let mut old = connect(&proxy).await;
    ping(&mut old).await.expect("PONG before the reset");

    proxy.reset_connections();
    let mut rest = Vec::new();
    let read = within(
        PATIENCE,
        "the end of a reset connection",
        old.read_to_end(&mut rest),
    )
    .await;
    assert_eq!(
        read.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionReset),
        "a reset connection fails with a reset: {read:?}"
    );
    wait_for_connections(&proxy, 0).await;

    let mut new = connect(&proxy).await;
    within(PATIENCE, "a PING on a new connection", ping(&mut new))
        .await
        .expect("PONG on a new connection");
}

/// While `refuse_new(true)`, a new connection is closed at once (its PING
/// fails) and an open one keeps working; after `refuse_new(false)`, new
/// connections work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuse_new_closes_new_connections_only() {
    let (_redis, proxy) = proxied().await;
    let mut open = connect(&proxy).await;
    ping(&mut open).await.expect("PONG before refusing");

    proxy.refuse_new(true);
    let mut refused = connect(&proxy).await;
    let attempt = within(
        PATIENCE,
        "a PING on a refused connection",
        ping(&mut refused),
    )
    .await;
    assert!(attempt.is_err(), "a refused connection answered a PING");
    ping(&mut open)
        .await
        .expect("the open connection still works");
    assert_eq!(proxy.connection_count(), 1);

    proxy.refuse_new(false);
    let mut new = connect(&proxy).await;
    within(PATIENCE, "a PING once accepted again", ping(&mut new))
        .await
        .expect("PONG on a new connection");
}

/// Dropping the proxy closes its connections and its listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_proxy_closes_everything() {
    let (_redis, proxy) = proxied().await;
    let address = proxy.address();
    let mut open = connect(&proxy).await;
    ping(&mut open).await.expect("PONG before the drop");

    drop(proxy);
    let mut rest = Vec::new();
    let read = within(
        PATIENCE,
        "the end of the connection",
        open.read_to_end(&mut rest),
    )
    .await;
    assert!(
        matches!(read, Ok(0)),
        "the connection ends cleanly: {read:?}"
    );
    wait_until(PATIENCE, "the listener to close", || async {
        TcpStream::connect(&address).await.is_err()
    })
    .await;
}

/// A gateway whose `REDIS_URL` is the proxy's answers a panel (`MISS`, then
/// `HIT`), and the answer is in the Redis behind the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_works_through_the_proxy() {
    let (_redis, proxy) = proxied().await;
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .redis_at(proxy.redis_url()),
    )
    .await;
    let body = panel(
        "acme",
        "2025-04-01",
        "2025-04-03",
        &["Sales.revenue"],
        &[],
        Some("DAY"),
    );
    let rows = expected_rows(
        "acme",
        "2025-04-01",
        "2025-04-03",
        &["Sales.revenue"],
        &[],
        Some("DAY"),
    );
    for status in ["MISS", "HIT"] {
        let answer = env.gateway().graphql(&body).await;
        assert_eq!(answer["data"]["aggregate"]["rows"], rows, "{answer}");
        assert_eq!(
            answer["data"]["aggregate"]["cache"]["status"], status,
            "{answer}"
        );
    }
    assert_eq!(env.redis_keys("value").await.len(), 1);
    assert!(
        proxy.connection_count() >= 1,
        "the gateway's Redis connections go through it"
    );
}
