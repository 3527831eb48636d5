//! API keys for server-to-server callers: only the `x-api-key` header counts,
//! only hashes are stored, and a key's BI-query quota holds across instances.

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{TempFile, assert_refused, client, codes, get, graphql_as, percent, post};
use crate::common::{TestEnv, TestOptions, expected_rows, input, panel, statuses};

const MEASURES: &[&str] = &["Sales.revenue"];

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Three keys: `svc` may query `acme` (quota 3 BI queries a minute),
/// `other` may query `globex` and `peer` may query `acme` (no quotas). The
/// file holds only their hashes.
struct Keys {
    svc: String,
    other: String,
    peer: String,
    file: TempFile,
}

impl Keys {
    fn new() -> Keys {
        let svc = format!("svc-key-{}", uuid::Uuid::new_v4().simple());
        let other = format!("other-key-{}", uuid::Uuid::new_v4().simple());
        let peer = format!("peer-key-{}", uuid::Uuid::new_v4().simple());
        let file = TempFile::new(
            "keys.json",
            &json!({"keys": [
                {"name": "svc", "sha256": sha256_hex(&svc), "customers": ["acme"], "quotaPerMinute": 3},
                {"name": "other", "sha256": sha256_hex(&other).to_uppercase(), "customers": ["globex"]},
                {"name": "peer", "sha256": sha256_hex(&peer), "customers": ["acme"]},
            ]})
            .to_string(),
        );
        assert!(
            !std::fs::read_to_string(&file.path)
                .unwrap_or_default()
                .contains(&svc),
            "the keys file holds no key"
        );
        Keys {
            svc,
            other,
            peer,
            file,
        }
    }
}

fn key_header(key: &str) -> [(String, String); 1] {
    [("x-api-key".to_owned(), key.to_owned())]
}

/// The day `day` (1-28) of March 2025, as a one-day panel of `customer`.
fn day_panel(customer: &str, day: u32) -> (Value, Value) {
    let date = format!("2025-03-{day:02}");
    (
        panel(customer, &date, &date, MEASURES, &[], None),
        expected_rows(customer, &date, &date, MEASURES, &[], None),
    )
}

/// A valid key in `x-api-key` gets its customer's rows and is `FORBIDDEN`
/// for another customer; an unknown key is `UNAUTHENTICATED`; the valid key
/// sent anywhere but that header (query string of a POST or a GET, a cookie,
/// a bearer token, another header name) is `UNAUTHENTICATED` too, and none
/// of the refusals costs a BI query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_count_only_in_their_header() {
    let keys = Keys::new();
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .env("AUTH_API_KEYS_FILE", keys.file.path_str()),
    )
    .await;
    let gateway = env.gateway();
    let http = client();
    let (acme, acme_rows) = day_panel("acme", 1);

    let answer = graphql_as(&http, gateway, &key_header(&keys.svc), &acme).await;
    assert_eq!(
        statuses(std::slice::from_ref(&answer), &acme_rows).miss,
        1,
        "{answer}"
    );
    // The stored hash is case-insensitive hex; the key itself is exact.
    let (globex, globex_rows) = day_panel("globex", 1);
    let answer = graphql_as(&http, gateway, &key_header(&keys.other), &globex).await;
    assert_eq!(
        statuses(std::slice::from_ref(&answer), &globex_rows).miss,
        1,
        "{answer}"
    );
    let queries = env.sim.stats().queries;
    assert_eq!(queries, 2);

    let (acme_again, _) = day_panel("acme", 2);
    let forbidden = graphql_as(&http, gateway, &key_header(&keys.svc), &globex).await;
    assert_refused(&forbidden, "FORBIDDEN", "svc asking for globex");
    for (what, key) in [
        (
            "an unknown key",
            format!("svc-key-{}", uuid::Uuid::new_v4().simple()),
        ),
        ("the key's hash", sha256_hex(&keys.svc)),
        ("the key in upper case", keys.svc.to_uppercase()),
        ("the key's name", "svc".to_owned()),
        ("an empty key", String::new()),
    ] {
        let answer = graphql_as(&http, gateway, &key_header(&key), &acme_again).await;
        assert_refused(&answer, "UNAUTHENTICATED", what);
    }

    let encoded = keys.svc.clone();
    for path in [
        format!("/graphql?x-api-key={encoded}"),
        format!("/graphql?api_key={encoded}"),
        format!("/graphql?apiKey={encoded}"),
    ] {
        let answer = post(
            &http,
            gateway,
            &path,
            Some("application/json"),
            &[],
            acme_again.to_string(),
        )
        .await;
        assert_refused(&answer.json(), "UNAUTHENTICATED", &path);
    }
    let get_query = format!(
        "/graphql?query={}&variables={}&x-api-key={encoded}",
        percent(crate::common::PANEL_QUERY),
        percent(&json!({"input": acme_again["variables"]["input"]}).to_string())
    );
    let answer = get(&http, gateway, &get_query, &[]).await;
    assert_refused(
        &answer.json(),
        "UNAUTHENTICATED",
        "a GET with the key in its query string",
    );
    for (what, header) in [
        (
            "a cookie",
            ("cookie".to_owned(), format!("x-api-key={}", keys.svc)),
        ),
        (
            "a bearer token",
            ("authorization".to_owned(), format!("Bearer {}", keys.svc)),
        ),
        ("another header", ("api-key".to_owned(), keys.svc.clone())),
        (
            "a bare authorization header",
            ("authorization".to_owned(), keys.svc.clone()),
        ),
    ] {
        let answer = graphql_as(&http, gateway, &[header], &acme_again).await;
        assert_refused(&answer, "UNAUTHENTICATED", what);
    }
    assert_eq!(env.sim.stats().queries, queries, "{:?}", env.sim.stats());
}

/// Waits, if need be, until at least `needed` is left in the current
/// one-minute quota window (windows are aligned to the Unix epoch), so that a
/// short sequence of requests is counted in one window.
pub async fn within_one_quota_window(needed: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    let into = Duration::from_millis((now.as_millis() % 60_000) as u64);
    let left = Duration::from_secs(60) - into;
    if left < needed {
        tokio::time::sleep(left + Duration::from_millis(200)).await;
    }
}

/// With Redis and three instances, the `svc` key (quota 3 BI queries a
/// minute) asks three different questions, one per instance: answered. Past
/// its quota, a new question is `RATE_LIMITED` with `extensions.retryAfter`
/// (1-60 s) on every instance, and bi-sim counts no more queries; the
/// `other` key (another tenant) is still answered everywhere, and so is the
/// `peer` key asking the very questions `svc` was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keys_quota_holds_on_every_instance() {
    let keys = Keys::new();
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(100)
            .env("AUTH_API_KEYS_FILE", keys.file.path_str()),
    )
    .await;
    let http = client();
    let svc = key_header(&keys.svc);
    within_one_quota_window(Duration::from_secs(25)).await;

    for (i, gateway) in env.gateways.iter().enumerate() {
        let (body, rows) = day_panel("acme", 1 + i as u32);
        let answer = graphql_as(&http, gateway, &svc, &body).await;
        assert_eq!(
            statuses(std::slice::from_ref(&answer), &rows).miss,
            1,
            "question {i}: {answer}"
        );
    }
    assert_eq!(env.sim.stats().queries, 3);

    for (i, gateway) in env.gateways.iter().enumerate() {
        for day in [10, 11] {
            let (body, _) = day_panel("acme", day + 2 * i as u32);
            let answer = graphql_as(&http, gateway, &svc, &body).await;
            assert_refused(&answer, "RATE_LIMITED", &format!("instance {i}, day {day}"));
            let retry_after = answer["errors"][0]["extensions"]["retryAfter"]
                .as_u64()
                .unwrap_or_else(|| panic!("no retryAfter: {answer}"));
            assert!((1..=60).contains(&retry_after), "{answer}");
        }
        // A dashboard of two new questions is refused as a whole.
        let dashboard = crate::common::dashboard(&[
            input("acme", "2025-04-01", "2025-04-02", MEASURES, &[], None),
            input("acme", "2025-04-03", "2025-04-04", MEASURES, &[], None),
        ]);
        let answer = graphql_as(&http, gateway, &svc, &dashboard).await;
        assert!(
            codes(&answer).iter().all(|c| c == "RATE_LIMITED") && !codes(&answer).is_empty(),
            "{answer}"
        );
    }
    assert_eq!(env.sim.stats().queries, 3, "{:?}", env.sim.stats());

    let other = key_header(&keys.other);
    for (i, gateway) in env.gateways.iter().enumerate() {
        let (body, rows) = day_panel("globex", 20 + i as u32);
        let answer = graphql_as(&http, gateway, &other, &body).await;
        assert_eq!(
            statuses(std::slice::from_ref(&answer), &rows).miss,
            1,
            "the other tenant on instance {i}: {answer}"
        );
    }
    assert_eq!(env.sim.stats().queries, 6);

    // svc's refusals were its own: `peer` asking the very questions svc was
    // refused gets them answered, from the BI.
    let peer = key_header(&keys.peer);
    for (i, gateway) in env.gateways.iter().enumerate() {
        let (body, rows) = day_panel("acme", 10 + 2 * i as u32);
        let answer = graphql_as(&http, gateway, &peer, &body).await;
        assert_eq!(
            statuses(std::slice::from_ref(&answer), &rows).miss,
            1,
            "peer on instance {i}: {answer}"
        );
    }
    assert_eq!(env.sim.stats().queries, 9);
}
