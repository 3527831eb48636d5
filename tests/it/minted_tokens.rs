//! Tenant-scoped BI tokens (`BI_API_SECRET`): each customer's queries reach
//! the BI with a short-lived token whose security context names that
//! customer only (bi-sim checks it against the queries' customer filters, as
//! a tenant-enforcing Cube would), tokens are reused until shortly before
//! they expire, and a BI that refuses a token is a `BI_ERROR` that never
//! shows the token.

use std::time::Duration;

use analytics_gateway::config::{Cli, Config};
use clap::Parser;

use crate::common::{
    TestEnv, TestOptions, dashboard, error_code, expected_rows_with, input, panel_body,
};
use crate::security::TempFile;

const SECRET: &str = "cube-api-secret-for-the-tests-0123456789";

fn config_with(file: &TempFile) -> Config {
    Config::from_cli(Cli::parse_from([
        "analytics-gateway",
        "--bi-cubes-file",
        &file.path_str(),
        "--bi-api-secret",
        SECRET,
    ]))
    .expect("a valid configuration")
}

/// A dashboard of two customers' panels is one BI request per customer,
/// each with a token naming that customer and no other (a query joining
/// two tenant cubes included); a new question of the same customer reuses
/// its token; after the reuse time (TTL 4 s, BI timeout 2 s: 2 s) a new
/// token is minted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_customers_queries_carry_a_token_of_their_own_reused_until_near_expiry() {
    let file = TempFile::new(
        "cubes.toml",
        "[cubes.Sales]\ntimeDimension = \"Sales.date\"\ncustomerMember = \"Sales.customerId\"\n\n\
         [cubes.Returns]\ntimeDimension = \"Returns.returnedAt\"\ncustomerMember = \"Returns.tenantId\"\n",
    );
    let env = TestEnv::start(
        TestOptions::default()
            .sim_secret(SECRET)
            .env("BI_API_SECRET", SECRET)
            .env("BI_TOKEN_TTL_SECS", 4)
            .env("BI_TIMEOUT_SECS", 2)
            .env("BI_CUBES_FILE", file.path_str()),
    )
    .await;
    let config = config_with(&file);
    let panel = |customer: &str, measures: &[&str], dimensions: &[&str]| {
        input(
            customer,
            "2025-05-01",
            "2025-05-07",
            measures,
            dimensions,
            Some("DAY"),
        )
    };
    let panels = vec![
        panel("acme", &["Sales.revenue"], &["Sales.region"]),
        panel("globex", &["Sales.revenue"], &["Sales.region"]),
        panel("acme", &["Sales.orders"], &["Returns.product"]),
        panel("globex", &["Returns.count"], &[]),
    ];

    let answer = env.gateway().graphql(&dashboard(&panels)).await;

    assert!(answer.get("errors").is_none(), "{answer}");
    for (i, panel) in panels.iter().enumerate() {
        assert_eq!(
            answer["data"][format!("p{i}")]["rows"],
            expected_rows_with(&config, panel),
            "p{i}"
        );
    }
    let stats = env.sim.stats();
    assert_eq!(stats.security_rejections, 0, "{stats:?}");
    assert_eq!(
        (stats.http_requests, stats.queries),
        (2, 4),
        "one request per customer: {stats:?}"
    );
    assert_eq!(
        stats.tokens_by_customer,
        [("acme".to_owned(), 1), ("globex".to_owned(), 1)].into()
    );
    let context = stats.last_security_context.expect("a checked token");
    let mut claims: Vec<&str> = context
        .as_object()
        .expect("claims")
        .keys()
        .map(String::as_str)
        .collect();
    claims.sort_unstable();
    assert_eq!(claims, ["customerId", "exp", "iat"], "{context}");
    assert!(["acme", "globex"].contains(&context["customerId"].as_str().unwrap_or_default()));
    let lifetime = context["exp"].as_i64().unwrap_or(0) - context["iat"].as_i64().unwrap_or(0);
    assert_eq!(lifetime, 4, "{context}");

    // A new question of acme's: the same token.
    let again = env
        .gateway()
        .graphql(&panel_body(panel("acme", &["Sales.orders"], &[])))
        .await;
    assert!(again.get("errors").is_none(), "{again}");
    assert_eq!(env.sim.stats().tokens_by_customer["acme"], 1);

    // Past the reuse time: a new one.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let later = env
        .gateway()
        .graphql(&panel_body(panel("acme", &["Sales.avgOrderValue"], &[])))
        .await;
    assert!(later.get("errors").is_none(), "{later}");
    let stats = env.sim.stats();
    assert_eq!(stats.tokens_by_customer["acme"], 2, "{stats:?}");
    assert_eq!(stats.tokens_by_customer["globex"], 1, "{stats:?}");
    assert_eq!(stats.security_rejections, 0);
}

/// The embedded simulator checks minted tokens too: a gateway started with
/// only `BI_API_SECRET` answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_bi_checks_minted_tokens_too() {
    let env = TestEnv::start(
        TestOptions::default()
            .env("BI_URL", "")
            .env("BI_SIM_LATENCY_MS", 0)
            .env("BI_API_SECRET", SECRET),
    )
    .await;
    let answer = env
        .gateway()
        .graphql(&panel_body(input(
            "acme",
            "2025-05-01",
            "2025-05-02",
            &["Sales.orders"],
            &[],
            None,
        )))
        .await;
    assert!(answer.get("errors").is_none(), "{answer}");
    assert!(
        answer["data"]["aggregate"]["rows"][0]["Sales.orders"].is_string(),
        "{answer}"
    );
}

/// A BI that refuses the token (signed with another secret) is `BI_ERROR`
/// for the panel; neither the answer nor the gateway's log shows the token
/// or the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bi_that_rejects_the_token_gives_bi_error_without_leaking_it() {
    let gateway_secret = format!("another-secret-{}", uuid::Uuid::new_v4().simple());
    let env = TestEnv::start(
        TestOptions::default()
            .sim_secret(SECRET)
            .env("BI_API_SECRET", &gateway_secret)
            .env("RUST_LOG", "debug"),
    )
    .await;
    let answer = env
        .gateway()
        .graphql(&panel_body(input(
            "acme",
            "2025-05-01",
            "2025-05-02",
            &["Sales.orders"],
            &[],
            Some("DAY"),
        )))
        .await;
    assert_eq!(error_code(&answer), Some("BI_ERROR"), "{answer}");
    let stats = env.sim.stats();
    assert_eq!(stats.security_rejections, 1, "{stats:?}");
    // A refused token is not the queries' fault: a refused batch is not
    // asked again query by query.
    let panels: Vec<_> = ["Sales.revenue", "Sales.avgOrderValue", "Sales.orders"]
        .iter()
        .map(|m| input("acme", "2025-06-01", "2025-06-02", &[m], &[], Some("DAY")))
        .collect();
    let refused = env.gateway().graphql(&dashboard(&panels)).await;
    let codes: Vec<_> = refused["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["extensions"]["code"].clone())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(codes, ["BI_ERROR"; 3], "{refused}");
    let stats = env.sim.stats();
    assert_eq!(
        (stats.http_requests, stats.security_rejections),
        (2, 2),
        "{stats:?}"
    );
    let token = stats.last_authorization.expect("a token was sent");
    assert!(token.split('.').count() == 3, "a JWT: {token}");
    let text = answer.to_string();
    let logs = env.logs();
    for (what, secret) in [
        ("token", token.as_str()),
        ("secret", gateway_secret.as_str()),
    ] {
        assert!(
            !text.contains(secret),
            "the answer shows the {what}: {text}"
        );
        assert!(!logs.contains(secret), "the log shows the {what}");
    }
    // The token's signature alone never shows either.
    let signature = token.rsplit('.').next().unwrap_or_default();
    assert!(!text.contains(signature) && !logs.contains(signature));
}
