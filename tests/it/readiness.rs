//! `/readyz` keeps the fleet serving: it stays 200 while the process can
//! serve anything (the BI gone, or Redis gone, included), says how the BI and
//! Redis are doing in its body and in `/metrics`, and answers 503 only once
//! shutdown has begun.

use std::time::Duration;

use analytics_gateway::telemetry::names;

use crate::common::{
    TestEnv, TestOptions, closed_port, error_code, metric, panel_and_rows, wait_until, within,
};

/// Waits until `/readyz` reports the BI `bi` ("up" or "down"), checking that
/// every answer on the way is 200 "ready".
async fn wait_for_bi(env: &TestEnv, bi: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("/readyz to say the BI is {bi}"),
        || async {
            let (status, body) = env.gateway().readyz().await;
            assert_eq!((status, &body["status"]), (200, &"ready".into()), "{body}");
            body["bi"] == bi
        },
    )
    .await;
}

/// The BI goes away after a panel was answered: `/readyz` stays 200 and
/// says `"bi": "down"`, `analytics_gateway_bi_up` drops to 0, the cached
/// panel is still answered (HIT, same rows), and only a new question fails
/// (`BI_UNAVAILABLE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bi_down_the_gateway_stays_ready_and_serves_cached_panels() {
    let mut env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    wait_for_bi(&env, "up").await;
    let (body, rows) = panel_and_rows(
        "acme",
        "2025-03-01",
        "2025-03-07",
        &["Sales.revenue"],
        &["Sales.region"],
        Some("DAY"),
    );
    let first = env.gateway().graphql(&body).await;
    assert_eq!(
        first["data"]["aggregate"]["cache"]["status"], "MISS",
        "{first}"
    );

    env.sim.stop().await;
    wait_for_bi(&env, "down").await;
    let text = env
        .gateway()
        .get("/metrics")
        .await
        .text()
        .await
        .expect("text");
    assert_eq!(metric(&text, names::BI_UP, &[]), Some(0.0), "{text}");

    let again = env.gateway().graphql(&body).await;
    assert!(again.get("errors").is_none(), "{again}");
    assert_eq!(
        again["data"]["aggregate"]["cache"]["status"], "HIT",
        "{again}"
    );
    assert_eq!(again["data"]["aggregate"]["rows"], rows);

    let (other, _) = panel_and_rows(
        "acme",
        "2025-03-08",
        "2025-03-14",
        &["Sales.revenue"],
        &[],
        Some("DAY"),
    );
    let refused = env.gateway().graphql(&other).await;
    assert_eq!(error_code(&refused), Some("BI_UNAVAILABLE"), "{refused}");
    let (status, ready) = env.gateway().readyz().await;
    assert_eq!((status, &ready["bi"]), (200, &"down".into()), "{ready}");
}

/// A `BI_URL` nobody listens on from the start: the gateway starts, and
/// `/readyz` is 200 with `"bi": "down"` (and Redis `not_configured`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bi_nobody_listens_on_is_reported_down_and_the_gateway_is_ready() {
    let url = format!("http://127.0.0.1:{}/cubejs-api/v1", closed_port());
    let env = TestEnv::start(TestOptions::default().env("BI_URL", url)).await;
    wait_for_bi(&env, "down").await;
    let (_, body) = env.gateway().readyz().await;
    assert_eq!(body["redis"], "not_configured", "{body}");
    let text = env
        .gateway()
        .get("/metrics")
        .await
        .text()
        .await
        .expect("text");
    assert_eq!(metric(&text, names::BI_UP, &[]), Some(0.0), "{text}");
}

/// SIGTERM with `SHUTDOWN_DRAIN_SECS`: `/readyz` answers 503
/// `"shutting_down"` at once while GraphQL is still answered, and the process
/// then exits with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_503_while_it_drains() {
    let mut env = TestEnv::start(
        TestOptions::default()
            .latency_ms(10)
            .env("SHUTDOWN_DRAIN_SECS", 3),
    )
    .await;
    let (status, _) = env.gateway().readyz().await;
    assert_eq!(status, 200);

    let pid = env.gateway().pid().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("`kill` runs");
    assert!(sent.success());
    wait_until(Duration::from_secs(10), "/readyz to answer 503", || async {
        let (status, body) = env.gateway().readyz().await;
        if status == 503 {
            assert_eq!(body["status"], "shutting_down", "{body}");
        }
        status == 503
    })
    .await;
    let (body, rows) = panel_and_rows(
        "acme",
        "2025-03-01",
        "2025-03-02",
        &["Sales.orders"],
        &[],
        None,
    );
    let answer = within(
        Duration::from_secs(10),
        "an answer while draining",
        env.gateway().graphql(&body),
    )
    .await;
    assert_eq!(answer["data"]["aggregate"]["rows"], rows, "{answer}");

    let gateway = &mut env.gateways[0];
    let exit = gateway.wait_for_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "{exit:?}; output:\n{}", gateway.output());
}
