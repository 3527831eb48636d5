//! An entry's life cycle: fresh, then stale (served while one refresh runs),
//! then gone; hot keys refreshed ahead; invalidation; HTTP caching of GET
//! answers; automatic persisted queries. With Redis on three instances, and
//! in embedded mode.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{
    Gateway, TestEnv, TestOptions, error_code, expected_rows_for, input, panel_body, wait_until,
};
use crate::security::{JWT_SECRET, bearer, percent, token_for};

const ADMIN_TOKEN: &str = "admin-token-for-tests";

/// One panel of `customer` (totals: one row, so failures print short).
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

/// The contract's panel query, with the freshness fields.
fn fresh_body(input: &Value) -> Value {
    json!({
        "query": "query Panel($input: AggregateInput!) { aggregate(input: $input) { rows cache { status stale producedAt freshUntil staleUntil } } }",
        "variables": {"input": input},
    })
}

/// The `cache` object of a `Panel` answer, after checking that the answer
/// has the BI's rows for `input`.
fn cache_of<'a>(answer: &'a Value, input: &Value) -> &'a Value {
    assert!(answer.get("errors").is_none(), "{answer}");
    assert_eq!(
        answer["data"]["aggregate"]["rows"],
        expected_rows_for(input),
        "{answer}"
    );
    &answer["data"]["aggregate"]["cache"]
}

/// Reads `input` on every gateway of `env`, each every 100 ms, for `long`:
/// every answer's `(status, stale, producedAt)`.
async fn read_continuously(
    env: &TestEnv,
    input: &Value,
    long: Duration,
) -> Vec<(String, bool, String)> {
    let until = tokio::time::Instant::now() + long;
    let readers = env.gateways.iter().map(|gateway| {
        let client = gateway.client();
        let body = fresh_body(input);
        let input = input.clone();
        async move {
            let mut seen = Vec::new();
            while tokio::time::Instant::now() < until {
                let reply = client.graphql(&body).await.expect("answered");
                let cache = cache_of(&reply.body, &input);
                seen.push((
                    cache["status"].as_str().unwrap_or("?").to_owned(),
                    cache["stale"] == true,
                    cache["producedAt"].as_str().unwrap_or("?").to_owned(),
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        }
    });
    join_all(readers).await.into_iter().flatten().collect()
}

/// A hot key read continuously on every instance of `env` across three
/// fresh lifetimes, after its first fill: every answer is a `HIT` (no
/// request waits for the BI), and each entry is refreshed once: every BI
/// query made an entry that was served, and no two entries were made within
/// two BI latencies of each other (two instances refreshing the same entry
/// would be). Refreshes ahead of time may come early (XFetch), never more
/// than once per entry. Returns how many answers were stale.
async fn hot_key_across_lifetimes(env: &TestEnv, fresh: Duration, latency: Duration) -> usize {
    let input = panel("hot");
    let first = env.gateway().graphql(&fresh_body(&input)).await;
    assert_eq!(cache_of(&first, &input)["status"], "MISS");

    let mut seen = read_continuously(env, &input, fresh * 3 + Duration::from_millis(500)).await;
    // A refresh the last reads started may still be under way (on a loaded
    // machine XFetch starts them earlier: the BI call takes longer): it lands
    // unread. Let it land, count the BI queries, then read once more, so its
    // entry is served (nothing reads meanwhile, so nothing starts another).
    tokio::time::sleep(latency * 3).await;
    let queries = env.sim.stats().queries;
    for gateway in &env.gateways {
        let reply = gateway.graphql(&fresh_body(&input)).await;
        let cache = cache_of(&reply, &input);
        seen.push((
            cache["status"].as_str().unwrap_or("?").to_owned(),
            cache["stale"] == true,
            cache["producedAt"].as_str().unwrap_or("?").to_owned(),
        ));
    }

    assert!(
        seen.iter().all(|(status, _, _)| status == "HIT"),
        "a request waited for the BI: {seen:?}\n{}",
        env.logs()
    );
    let mut produced: Vec<chrono::DateTime<chrono::FixedOffset>> = seen
        .iter()
        .map(|(_, _, at)| chrono::DateTime::parse_from_rfc3339(at).expect("producedAt"))
        .collect();
    produced.sort();
    produced.dedup();
    assert!(queries >= 3, "no refresh in three lifetimes: {queries}");
    assert_eq!(
        queries as usize,
        produced.len(),
        "a BI query made an entry nobody was served (a second refresh of one entry?): {produced:?}"
    );
    for pair in produced.windows(2) {
        let gap = (pair[1] - pair[0]).to_std().unwrap_or_default();
        assert!(
            gap >= latency * 2,
            "two entries {gap:?} apart: {produced:?}"
        );
    }
    let stale = seen.iter().filter(|(_, stale, _)| *stale).count();
    println!(
        "{} reads, {stale} stale, {} BI queries",
        seen.len(),
        queries
    );
    stale
}

/// With Redis, three instances: a hot key read continuously across three
/// lifetimes (3 s fresh, 3 s stale, a 300 ms BI) never makes a request wait,
/// and costs at most one BI query per lifetime (refreshed ahead, or while
/// stale, once for all instances).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_on_three_instances_never_waits_for_the_bi() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(300)
            .env("CACHE_TTL_SECS", 3)
            .env("CACHE_STALE_SECS", 3),
    )
    .await;
    hot_key_across_lifetimes(&env, Duration::from_secs(3), Duration::from_millis(300)).await;
}

/// The same with refreshes ahead of time turned off: stale-while-revalidate
/// alone keeps every answer a `HIT` (some of them stale, while the one
/// refresh per lifetime runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_alone_never_makes_a_hot_key_wait() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(300)
            .env("CACHE_TTL_SECS", 3)
            .env("CACHE_STALE_SECS", 3)
            .env("REFRESH_AHEAD_MIN_HITS", 1_000_000),
    )
    .await;
    let stale =
        hot_key_across_lifetimes(&env, Duration::from_secs(3), Duration::from_millis(300)).await;
    assert!(
        stale > 0,
        "no answer was stale: were refreshes ahead of time off?"
    );
}

/// The same life cycle in embedded mode (no Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_key_in_embedded_mode_never_waits_for_the_bi() {
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(300)
            .env("CACHE_TTL_SECS", 3)
            .env("CACHE_STALE_SECS", 3),
    )
    .await;
    hot_key_across_lifetimes(&env, Duration::from_secs(3), Duration::from_millis(300)).await;
}

/// A key read once is never refreshed: through its fresh time, its stale
/// time and past it, the BI is asked once; the next read, after the entry is
/// gone, is a miss again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_read_once_is_never_refreshed() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .latency_ms(100)
            .env("CACHE_TTL_SECS", 1)
            .env("CACHE_STALE_SECS", 1),
    )
    .await;
    let input = panel("read-once");
    let first = env.gateway().graphql(&fresh_body(&input)).await;
    assert_eq!(cache_of(&first, &input)["status"], "MISS");
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    assert_eq!(env.sim.stats().queries, 1, "{:?}", env.sim.stats());
    let again = env.gateways[1].graphql(&fresh_body(&input)).await;
    assert_eq!(cache_of(&again, &input)["status"], "MISS", "{again}");
    assert_eq!(env.sim.stats().queries, 2);
}

/// A refresh that fails (a BI 500) leaves the stale entry servable: every
/// read on both instances is a stale `HIT` with the old rows until the stale
/// time ends, with one BI query for the failed refresh; after it, the
/// remembered error is shared as today (`BI_ERROR`, no new BI query).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_refresh_keeps_the_stale_entry_then_shares_the_error() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .latency_ms(100)
            .env("CACHE_TTL_SECS", 1)
            .env("CACHE_STALE_SECS", 3)
            .env("NEGATIVE_CACHE_SECS", 30),
    )
    .await;
    let input = panel("failed-refresh");
    let body = fresh_body(&input);
    let first = env.gateway().graphql(&body).await;
    assert_eq!(cache_of(&first, &input)["status"], "MISS");
    let stale_until = tokio::time::Instant::now() + Duration::from_secs(4);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    env.sim
        .faults(json!({"failNext": {"count": 10, "status": 500}}))
        .await;

    let stale = env.gateways[1].graphql(&body).await;
    let cache = cache_of(&stale, &input);
    assert_eq!(
        (&cache["status"], &cache["stale"]),
        (&json!("HIT"), &json!(true))
    );
    wait_until(Duration::from_secs(5), "the refresh's BI call", || async {
        env.sim.stats().queries == 2
    })
    .await;
    while tokio::time::Instant::now() + Duration::from_millis(400) < stale_until {
        for gateway in &env.gateways {
            let answer = gateway.graphql(&body).await;
            let cache = cache_of(&answer, &input);
            assert_eq!(
                (&cache["status"], &cache["stale"]),
                (&json!("HIT"), &json!(true))
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(env.sim.stats().queries, 2, "the failure is remembered");

    tokio::time::sleep_until(stale_until + Duration::from_millis(300)).await;
    for gateway in &env.gateways {
        let answer = gateway.graphql(&body).await;
        assert_eq!(error_code(&answer), Some("BI_ERROR"), "{answer}");
    }
    assert_eq!(env.sim.stats().queries, 2, "{:?}", env.sim.stats());
}

/// `POST /admin/invalidate` on `gateway` with `token`: its status and body.
async fn invalidate(gateway: &Gateway, token: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/admin/invalidate", gateway.url()))
        .header("authorization", format!("Bearer {token}"))
        .json(&body)
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Invalidation by customer reaches every instance within a second: the
/// next read of that customer's key on each instance is stale (or, where
/// another instance's refresh already landed, a newer entry), 50 concurrent
/// reads of it over the three instances cost one BI query, and another
/// customer's entry stays fresh. `"mode": "evict"` drops the entries: the
/// next reads bring a new `producedAt`. A wrong token is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidation_by_customer_reaches_every_instance() {
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(300)
            .env("CACHE_TTL_SECS", 300)
            .env("ADMIN_TOKEN", ADMIN_TOKEN),
    )
    .await;
    let (acme, globex) = (panel("acme-inv"), panel("globex-inv"));
    let mut produced = Vec::new();
    for input in [&acme, &globex] {
        let first = env.gateway().graphql(&fresh_body(input)).await;
        produced.push(cache_of(&first, input)["producedAt"].clone());
        // Every instance holds its own copy in process memory.
        for gateway in &env.gateways {
            let answer = gateway.graphql(&fresh_body(input)).await;
            assert_eq!(cache_of(&answer, input)["status"], "HIT");
        }
    }
    let before = env.sim.stats().queries;

    let (status, _) = invalidate(env.gateway(), "wrong", json!({"customer": "acme-inv"})).await;
    assert_eq!(status, 401);
    let (status, answer) =
        invalidate(env.gateway(), ADMIN_TOKEN, json!({"customer": "acme-inv"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["mode"], "stale", "{answer}");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let acme_body = fresh_body(&acme);
    let reads = join_all(
        env.gateways
            .iter()
            .map(|gateway| gateway.graphql(&acme_body)),
    )
    .await;
    for answer in &reads {
        let cache = cache_of(answer, &acme);
        assert_eq!(cache["status"], "HIT", "{answer}");
        assert!(
            cache["stale"] == true || cache["producedAt"] != produced[0],
            "an invalidated entry was served as fresh: {answer}"
        );
    }
    let stampede = env.fire(50, &fresh_body(&acme)).await;
    for answer in &stampede {
        cache_of(answer, &acme);
    }
    wait_until(Duration::from_secs(5), "the refresh", || async {
        env.sim.stats().queries == before + 1
    })
    .await;
    for gateway in &env.gateways {
        let answer = gateway.graphql(&fresh_body(&globex)).await;
        let cache = cache_of(&answer, &globex);
        assert_eq!(
            (&cache["stale"], &cache["producedAt"]),
            (&json!(false), &produced[1])
        );
    }
    assert_eq!(env.sim.stats().queries, before + 1, "{:?}", env.sim.stats());

    let (status, answer) = invalidate(
        env.gateway(),
        ADMIN_TOKEN,
        json!({"customer": "acme-inv", "mode": "evict"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let evicted = env.fire(30, &fresh_body(&acme)).await;
    for answer in &evicted {
        let cache = cache_of(answer, &acme);
        assert_ne!(cache["producedAt"], produced[0], "{answer}");
        assert_eq!(cache["stale"], false, "{answer}");
    }
    assert_eq!(env.sim.stats().queries, before + 2, "{:?}", env.sim.stats());
}

/// Without `ADMIN_TOKEN` the admin route does not exist (404); bad requests
/// are 400; in embedded mode an invalidation by cube works as with Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_route_is_404_without_a_token_and_works_embedded() {
    let closed = TestEnv::start(TestOptions::default()).await;
    let (status, _) = invalidate(closed.gateway(), ADMIN_TOKEN, json!({"all": true})).await;
    assert_eq!(status, 404);

    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(100)
            .env("ADMIN_TOKEN", ADMIN_TOKEN),
    )
    .await;
    let input = panel("embedded-inv");
    let first = env.gateway().graphql(&fresh_body(&input)).await;
    assert_eq!(cache_of(&first, &input)["status"], "MISS");
    for bad in [
        json!({}),
        json!({"all": true, "cube": "Sales"}),
        json!({"customer": ""}),
        json!({"cube": "Sales", "mode": "later"}),
    ] {
        let (status, answer) = invalidate(env.gateway(), ADMIN_TOKEN, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    let (status, _) = invalidate(env.gateway(), ADMIN_TOKEN, json!({"cube": "Sales"})).await;
    assert_eq!(status, 200);
    let stale = env.gateway().graphql(&fresh_body(&input)).await;
    assert_eq!(cache_of(&stale, &input)["stale"], true, "{stale}");
    wait_until(Duration::from_secs(5), "the refreshed entry", || async {
        let answer = env.gateway().graphql(&fresh_body(&input)).await;
        cache_of(&answer, &input)["stale"] == false
    })
    .await;
    assert_eq!(env.sim.stats().queries, 2);
}

/// `GET /graphql` of the contract's query, as `token` sees it: status,
/// `ETag`, `Cache-Control`, body.
async fn get_panel(
    gateway: &Gateway,
    input: &Value,
    token: &str,
    if_none_match: Option<&str>,
) -> (u16, String, String, String) {
    let query = "query Panel($input: AggregateInput!) { aggregate(input: $input) { rows cache { status } } }";
    let url = format!(
        "{}/graphql?query={}&variables={}",
        gateway.url(),
        percent(query),
        percent(&json!({"input": input}).to_string())
    );
    let (name, value) = bearer(token);
    let mut request = reqwest::Client::new().get(url).header(name, value);
    if let Some(tag) = if_none_match {
        request = request.header("if-none-match", tag);
    }
    let response = request.send().await.expect("an answer");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (etag, cache_control) = (header("etag"), header("cache-control"));
    let status = response.status().as_u16();
    (
        status,
        etag,
        cache_control,
        response.text().await.unwrap_or_default(),
    )
}

/// A GET answer carries a strong `ETag` and `Cache-Control: private,
/// max-age=N` (N at most the entry's fresh time); the same GET with
/// `If-None-Match` of that tag is a `304` without a body and without a BI
/// query. Another tenant allowed other customers, asking the same question,
/// gets another tag, and its `If-None-Match` of the first tenant's tag is not
/// honoured. POST answers are `no-store`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_answers_are_cacheable_per_tenant() {
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(100)
            .env("AUTH_JWT_SECRET", JWT_SECRET)
            .env("CACHE_TTL_SECS", 120),
    )
    .await;
    let gateway = env.gateway();
    let input = panel("acme");
    let first_tenant = token_for("first", json!(["acme"]));
    let second_tenant = token_for("second", json!(["acme", "globex"]));

    // The first answer is the MISS; the ones after are the same HIT.
    let (status, _, _, body) = get_panel(gateway, &input, &first_tenant, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, etag, cache_control, body) = get_panel(gateway, &input, &first_tenant, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(etag.starts_with('"') && etag.len() > 10, "{etag}");
    let max_age: u64 = cache_control
        .strip_prefix("private, max-age=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("Cache-Control: {cache_control}"));
    assert!((100..=120).contains(&max_age), "{cache_control}");
    let queries = env.sim.stats().queries;

    let (status, again, _, body) = get_panel(gateway, &input, &first_tenant, Some(&etag)).await;
    assert_eq!((status, body.as_str()), (304, ""));
    assert_eq!(again, etag);
    assert_eq!(env.sim.stats().queries, queries);

    let (status, other, _, _) = get_panel(gateway, &input, &second_tenant, None).await;
    assert_eq!(status, 200);
    assert_ne!(other, etag, "two tenants share an ETag");
    let (status, _, _, body) = get_panel(gateway, &input, &second_tenant, Some(&etag)).await;
    assert_eq!(status, 200, "{body}");

    let (name, value) = bearer(&first_tenant);
    let response = reqwest::Client::new()
        .post(format!("{}/graphql", gateway.url()))
        .header(name, value)
        .json(&panel_body(input))
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.headers()["cache-control"], "no-store");
}

/// Apollo's automatic persisted queries: the hash alone of an unknown
/// document is `PERSISTED_QUERY_NOT_FOUND`; the hash with the document is
/// answered and stored; the hash alone is then answered, on the other
/// instance too (through Redis), by GET as well; a document that does not
/// match its hash is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn persisted_queries_are_shared_by_hash() {
    let env = TestEnv::start(TestOptions::default().redis().instances(2).latency_ms(100)).await;
    let document = "query Persisted($input: AggregateInput!) { aggregate(input: $input) { rows cache { status } } }";
    let hash: String = Sha256::digest(document.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let input = panel("persisted");
    let extensions = json!({"persistedQuery": {"version": 1, "sha256Hash": hash}});
    let hash_only = json!({"variables": {"input": input}, "extensions": extensions});

    let unknown = env.gateways[0].graphql(&hash_only).await;
    assert_eq!(
        error_code(&unknown),
        Some("PERSISTED_QUERY_NOT_FOUND"),
        "{unknown}"
    );

    let with_document =
        json!({"query": document, "variables": {"input": input}, "extensions": extensions});
    let answer = env.gateways[0].graphql(&with_document).await;
    assert_eq!(
        answer["data"]["aggregate"]["rows"],
        expected_rows_for(&input),
        "{answer}"
    );

    for gateway in &env.gateways {
        let answer = gateway.graphql(&hash_only).await;
        assert_eq!(
            answer["data"]["aggregate"]["cache"]["status"], "HIT",
            "{answer}"
        );
    }
    let url = format!(
        "{}/graphql?variables={}&extensions={}",
        env.gateways[1].url(),
        percent(&json!({"input": input}).to_string()),
        percent(&extensions.to_string())
    );
    let answer: Value = reqwest::get(url)
        .await
        .expect("an answer")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        answer["data"]["aggregate"]["cache"]["status"], "HIT",
        "{answer}"
    );

    let mismatched = json!({"query": "{ __typename }", "extensions": extensions});
    let refused = env.gateways[1].graphql(&mismatched).await;
    assert_eq!(error_code(&refused), Some("BAD_REQUEST"), "{refused}");
    assert_eq!(env.sim.stats().queries, 1);
}
