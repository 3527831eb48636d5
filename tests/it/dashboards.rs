//! Dashboards that share panels, sent at once to several instances with a
//! cold cache: each distinct panel reaches the BI once, and no dashboard
//! waits for another instance's BI call after its own (no lock is held
//! while waiting).

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    PATIENT_REDIS_TIMEOUT_MS, TestEnv, TestOptions, dashboard, expected_rows_for, input,
    panel_body, respelt,
};

const CUSTOMER: &str = "dashboards";

/// Eight panels of one customer: several granularities (so several BI
/// batches per dashboard) and totals (each a BI call of its own).
fn panels() -> Vec<Value> {
    let day = Some("DAY");
    let week = Some("WEEK");
    let month = Some("MONTH");
    vec![
        input(
            CUSTOMER,
            "2025-01-01",
            "2025-01-31",
            &["Sales.revenue", "Sales.orders"],
            &["Sales.region"],
            day,
        ),
        input(
            CUSTOMER,
            "2025-01-01",
            "2025-01-31",
            &["Sales.revenue"],
            &["Sales.product"],
            day,
        ),
        input(
            CUSTOMER,
            "2025-02-01",
            "2025-02-28",
            &["Sales.orders"],
            &[],
            day,
        ),
        input(
            CUSTOMER,
            "2025-01-01",
            "2025-03-31",
            &["Sales.avgOrderValue"],
            &["Sales.region"],
            week,
        ),
        input(
            CUSTOMER,
            "2025-01-01",
            "2025-03-31",
            &["Sales.revenue"],
            &[],
            week,
        ),
        input(
            CUSTOMER,
            "2025-01-01",
            "2025-12-31",
            &["Sales.revenue", "Sales.orders"],
            &[],
            month,
        ),
        input(
            CUSTOMER,
            "2025-01-01",
            "2025-01-31",
            &["Sales.orders"],
            &["Sales.region"],
            None,
        ),
        input(
            CUSTOMER,
            "2025-01-01",
            "2025-12-31",
            &["Sales.revenue"],
            &[],
            None,
        ),
    ]
}

/// `count` dashboards of 5 to 8 of `panels`, each in its own order, with a
/// fixed seed so that a failure replays the same documents. Returns, per
/// dashboard, the indexes of its panels.
fn dashboards(count: usize, panels: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| {
            let mut order: Vec<usize> = (0..panels).collect();
            rng.shuffle(&mut order);
            order.truncate(rng.usize(5..=panels.min(8)));
            order
        })
        .collect()
}

/// Checks that every dashboard answer has, for each of its panels, exactly
/// the rows the BI has for that panel asked alone.
fn assert_dashboards_are_right(
    layouts: &[Vec<usize>],
    answers: &[(Value, Duration)],
    panels: &[Value],
    logs: impl Fn() -> String,
) {
    let expected: Vec<Value> = panels.iter().map(expected_rows_for).collect();
    for (d, ((answer, _), layout)) in answers.iter().zip(layouts).enumerate() {
        assert!(
            answer.get("errors").is_none(),
            "dashboard {d}: {answer}\n{}",
            logs()
        );
        for (field, &panel) in layout.iter().enumerate() {
            assert_eq!(
                answer["data"][format!("p{field}")]["rows"],
                expected[panel],
                "dashboard {d}, field p{field} (panel {panel})"
            );
        }
    }
}

/// The slowest dashboard's time.
fn slowest(answers: &[(Value, Duration)]) -> Duration {
    answers
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default()
}

/// 30 dashboards of 5–8 panels drawn from the same 8 panels, in different
/// orders, sent at once round-robin over 3 instances with a cold cache and a
/// 2 s BI: the BI sees each of the 8 panels exactly once, every panel of
/// every dashboard is right, and the slowest dashboard is answered within
/// the BI latency plus a margin (1.6 s here, generous for a loaded 2-core
/// machine; a dashboard that waited for another instance's BI call after
/// its own would take two BI latencies).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboards_sharing_panels_on_three_instances_wait_one_bi_latency() {
    const LATENCY: Duration = Duration::from_millis(2_000);
    const MARGIN: Duration = Duration::from_millis(1_600);
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(LATENCY.as_millis() as u64)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    env.warm_up(10).await;
    let panels = panels();
    let layouts = dashboards(30, panels.len(), 20_251_201);
    let requests: Vec<(usize, Value)> = layouts
        .iter()
        .enumerate()
        .map(|(d, layout)| {
            let inputs: Vec<Value> = layout.iter().map(|&p| panels[p].clone()).collect();
            (d % env.gateways.len(), dashboard(&inputs))
        })
        .collect();

    let answers = env.fire_on_timed(&requests).await;

    assert_dashboards_are_right(&layouts, &answers, &panels, || env.logs());
    let stats = env.sim.stats();
    assert_eq!(stats.queries, panels.len() as u64, "{stats:?}");
    assert!(stats.by_query.values().all(|&n| n == 1), "{stats:?}");
    let slowest = slowest(&answers);
    assert!(
        slowest <= LATENCY + MARGIN,
        "the slowest dashboard took {slowest:?}\n{}",
        env.logs()
    );
}

/// Eight panels with filters, orders, limits, offsets, timezones and an
/// hourly one.
fn refined_panels() -> Vec<Value> {
    let with = |mut panel: Value, fields: Value| {
        for (field, value) in fields.as_object().expect("fields") {
            panel[field] = value.clone();
        }
        panel
    };
    let filter = |member: &str, operator: &str, values: &[&str]| json!({"member": member, "operator": operator, "values": values});
    let base = panels();
    vec![
        with(
            base[0].clone(),
            json!({"filters": [filter("Sales.region", "EQUALS", &["EU", "NA"]), filter("Sales.orders", "GT", &["20"])]}),
        ),
        with(
            base[1].clone(),
            json!({"order": [{"member": "Sales.revenue", "direction": "DESC"}], "limit": 10, "timezone": "America/New_York"}),
        ),
        with(
            base[2].clone(),
            json!({"timezone": "Asia/Kolkata", "filters": [filter("Sales.orders", "LTE", &["60"])]}),
        ),
        with(
            base[3].clone(),
            json!({"filters": [filter("Sales.region", "STARTS_WITH", &["A", "E"])], "offset": 2}),
        ),
        with(
            base[4].clone(),
            json!({"order": [{"member": "Sales.date", "direction": "DESC"}], "timezone": "Europe/Paris"}),
        ),
        with(
            base[6].clone(),
            json!({"filters": [filter("Sales.region", "NOT_CONTAINS", &["a"])], "order": [{"member": "Sales.orders"}]}),
        ),
        with(base[7].clone(), json!({"timezone": "Pacific/Auckland"})),
        with(
            input(
                CUSTOMER,
                "2025-03-01",
                "2025-03-03",
                &["Sales.orders"],
                &["Sales.product"],
                Some("HOUR"),
            ),
            json!({"filters": [filter("Sales.product", "NOT_EQUALS", &["gizmo", "widget"])], "timezone": "America/Los_Angeles"}),
        ),
    ]
}

/// 30 dashboards drawn from 8 refined panels, each dashboard spelling its
/// panels its own way, sent at once over 3 instances with a cold cache:
/// the BI sees each refined panel exactly once, and every panel of every
/// dashboard has the rows it has asked alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refined_dashboards_sharing_panels_on_three_instances_ask_each_panel_once() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(2_000)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    env.warm_up(10).await;
    let panels = refined_panels();
    let layouts = dashboards(30, panels.len(), 20_261_201);
    let requests: Vec<(usize, Value)> = layouts
        .iter()
        .enumerate()
        .map(|(d, layout)| {
            let inputs: Vec<Value> = layout.iter().map(|&p| respelt(&panels[p], d)).collect();
            (d % env.gateways.len(), dashboard(&inputs))
        })
        .collect();

    let answers = env.fire_on_timed(&requests).await;

    assert_dashboards_are_right(&layouts, &answers, &panels, || env.logs());
    let stats = env.sim.stats();
    assert_eq!(stats.queries, panels.len() as u64, "{stats:?}");
    assert!(stats.by_query.values().all(|&n| n == 1), "{stats:?}");
}

/// The same stampede while one panel's lock is held by a dead leader: a
/// fourth instance took it, reached the BI, and was SIGKILLed. Every
/// dashboard is answered correctly before its deadline — the other panels
/// at once, the dead one's after its lock expires — and that panel costs
/// exactly one extra BI query (the dead leader's paid call plus one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_leaders_panel_costs_one_extra_query_and_blocks_no_dashboard() {
    const LATENCY: Duration = Duration::from_millis(1_500);
    const LOCK_TTL: Duration = Duration::from_millis(1_000);
    const DEADLINE: Duration = Duration::from_secs(15);
    let mut env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(4)
            .latency_ms(LATENCY.as_millis() as u64)
            .env("REDIS_LOCK_TTL_MS", LOCK_TTL.as_millis())
            .env("REDIS_DOWN_AFTER_MS", PATIENT_REDIS_TIMEOUT_MS)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS)
            .env("REQUEST_TIMEOUT_SECS", DEADLINE.as_secs()),
    )
    .await;
    let panels = panels();
    let doomed = 3;
    env.kill_a_leader(doomed, &panel_body(panels[0].clone()))
        .await;

    let layouts = dashboards(30, panels.len(), 20_251_202);
    let requests: Vec<(usize, Value)> = layouts
        .iter()
        .enumerate()
        .map(|(d, layout)| {
            let inputs: Vec<Value> = layout.iter().map(|&p| panels[p].clone()).collect();
            (d % doomed, dashboard(&inputs))
        })
        .collect();
    let answers = env.fire_on_timed(&requests).await;

    assert_dashboards_are_right(&layouts, &answers, &panels, || env.logs());
    let stats = env.sim.stats();
    assert_eq!(stats.by_query.len(), panels.len(), "{stats:?}");
    assert_eq!(stats.queries, panels.len() as u64 + 1, "{stats:?}");
    assert_eq!(
        stats.by_query.values().filter(|&&n| n == 2).count(),
        1,
        "{stats:?}"
    );
    let slowest = slowest(&answers);
    assert!(
        slowest <= LOCK_TTL + LATENCY + Duration::from_millis(1_600),
        "the slowest dashboard took {slowest:?}\n{}",
        env.logs()
    );
}

/// No lock is held while waiting: gw-1 is on the BI call for panel B when
/// gw-0 is asked for a dashboard of panels A and B. gw-0 wins A and loses B;
/// it calls the BI for A at once and waits for B beside it, so the
/// dashboard is answered about one BI latency after it was sent, not after
/// B's call and then A's (two latencies).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dashboard_calls_the_bi_at_once_for_the_panels_it_won() {
    const LATENCY: Duration = Duration::from_millis(2_000);
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .latency_ms(LATENCY.as_millis() as u64)
            .env("REDIS_TIMEOUT_MS", PATIENT_REDIS_TIMEOUT_MS),
    )
    .await;
    let panels = panels();
    let (a, b) = (panels[0].clone(), panels[1].clone());
    let held = tokio::spawn({
        let client = env.gateways[1].client();
        let body = panel_body(b.clone());
        async move { client.graphql(&body).await }
    });
    assert_eq!(
        env.wait_for_lock_owner(Duration::from_secs(20)).await,
        "gw-1"
    );

    let answers = env
        .fire_on_timed(&[(0, dashboard(&[a.clone(), b.clone()]))])
        .await;

    assert_dashboards_are_right(&[vec![0, 1]], &answers, &panels, || env.logs());
    let (answer, took) = &answers[0];
    assert_eq!(answer["data"]["p0"]["cache"]["status"], "MISS", "{answer}");
    assert_eq!(
        answer["data"]["p1"]["cache"]["status"], "COALESCED",
        "{answer}"
    );
    assert!(
        *took < LATENCY + LATENCY / 2,
        "the dashboard took {took:?}: its own BI call waited for the other instance's\n{}",
        env.logs()
    );
    held.await.expect("no panic").expect("answered");
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());
}
