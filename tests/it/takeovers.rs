//! What a key whose leader died comes to: a survivor takes it over once its
//! lock expires, but never during the BI's cool-down, and for as long as the
//! latest request waiting on it allows.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    PATIENT_REDIS_TIMEOUT_MS, TestEnv, TestOptions, error_code, expected_rows_for, input,
    panel_body, wait_until,
};

fn panel(customer: &str) -> Value {
    input(
        customer,
        "2025-06-01",
        "2025-06-30",
        &["Sales.orders"],
        &["Sales.region"],
        Some("DAY"),
    )
}

/// The BI rate-limits one instance (a 429 whose `Retry-After` is past the
/// BI deadline) while another instance waits for a key whose leader died:
/// when the dead leader's lock expires, the waiter would take the key over,
/// but the shared cool-down is read with the lock, so it answers
/// `RATE_LIMITED` without calling the BI.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_during_the_bis_cool_down_does_not_call_the_bi() {
    let mut env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(1_000)
            .env("BI_TIMEOUT_SECS", 1)
            .env("REDIS_LOCK_TTL_MS", 1_500)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS)
            .env("REDIS_DOWN_AFTER_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let held = panel_body(panel("cool-down-held"));
    env.kill_a_leader(2, &held).await;
    let waiter = tokio::spawn({
        let client = env.gateways[1].client();
        let held = held.clone();
        async move { client.graphql(&held).await }
    });
    env.sim
        .faults(json!({"rateLimit": {"count": 1, "retryAfterSecs": 30}}))
        .await;
    let limited = env.gateways[0]
        .graphql(&panel_body(panel("cool-down-other")))
        .await;
    assert_eq!(error_code(&limited), Some("RATE_LIMITED"), "{limited}");
    let calls = env.sim.stats().http_requests;

    let answer = waiter.await.expect("no panic").expect("answered").body;

    assert_eq!(
        error_code(&answer),
        Some("RATE_LIMITED"),
        "{answer}\n{}",
        env.logs()
    );
    assert_eq!(
        env.sim.stats().http_requests,
        calls,
        "{:?}",
        env.sim.stats()
    );
}

/// A request that joins a flight late is given its own deadline, not the
/// deadline of the request that started the flight: the first request waits
/// for a dead leader's lock (6 s) longer than its 4 s deadline and gives up;
/// a second one, joining the same flight 3.5 s in, is answered with the rows
/// once the lock expires and the key is taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_request_keeps_the_flight_going_until_its_own_deadline() {
    let mut env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .latency_ms(300)
            .env("REQUEST_TIMEOUT_SECS", 4)
            .env("REDIS_LOCK_TTL_MS", 6_000)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let body = panel_body(panel("late-joiner"));
    env.kill_a_leader(1, &body).await;

    let first = tokio::spawn({
        let client = env.gateways[0].client();
        let body = body.clone();
        async move { client.graphql(&body).await }
    });
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let second = env.gateways[0].graphql(&body).await;

    assert!(second.get("errors").is_none(), "{second}\n{}", env.logs());
    assert_eq!(
        second["data"]["aggregate"]["rows"],
        expected_rows_for(&panel("late-joiner"))
    );
    let _ = first.await;
    assert_eq!(
        env.sim.stats().queries,
        2,
        "the dead leader's and the takeover's"
    );
}

/// The shared 429 cool-down stops BI calls, not waits: gw-0 is in the
/// middle of the BI call for panel A when the BI rate limits another panel
/// (B, `Retry-After: 30`); gw-1, asked for A right then, waits for gw-0's
/// call and is answered `COALESCED` with A's rows, at no extra BI call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cool_down_does_not_refuse_a_wait_for_a_call_already_made() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .latency_ms(2_000)
            .env("BI_TIMEOUT_SECS", 5),
    )
    .await;
    let (a, b) = (panel("cool-down-wait"), panel("cool-down-limited"));
    let expected_a = expected_rows_for(&a);

    let leader = env.gateways[0].client();
    let led = tokio::spawn({
        let body = panel_body(a.clone());
        async move { leader.graphql(&body).await }
    });
    wait_until(Duration::from_secs(20), "A's BI call", || async {
        env.sim.stats().http_requests >= 1
    })
    .await;
    env.sim
        .faults(json!({"rateLimit": {"count": 1, "retryAfterSecs": 30}}))
        .await;
    let limited = env.gateways[0].graphql(&panel_body(b)).await;
    assert_eq!(
        limited["errors"][0]["extensions"]["code"], "RATE_LIMITED",
        "{limited}"
    );

    let waited = env.gateways[1].graphql(&panel_body(a.clone())).await;
    let led = led.await.expect("no panic").expect("answered").body;
    assert_eq!(led["data"]["aggregate"]["rows"], expected_a, "{led}");
    assert!(
        waited.get("errors").is_none(),
        "gw-1 refused to wait for gw-0's call: {waited}"
    );
    assert_eq!(waited["data"]["aggregate"]["rows"], expected_a);
    assert_eq!(waited["data"]["aggregate"]["cache"]["status"], "COALESCED");
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());
}
