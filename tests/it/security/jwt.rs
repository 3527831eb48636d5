//! JWT bearer tokens over HTTP: only a valid, current, correctly signed
//! token gets in; the schema stays hidden from everyone else.

use base64::Engine as _;
use serde_json::{Value, json};

use super::{
    JWT_SECRET, assert_refused, bearer, client, codes, get, graphql_as, now, sign, token_for,
};
use crate::common::{TestEnv, TestOptions, expected_rows, panel};

const FROM: &str = "2025-04-01";
const TO: &str = "2025-04-07";
const MEASURES: &[&str] = &["Sales.revenue"];

fn body(customer: &str) -> Value {
    panel(customer, FROM, TO, MEASURES, &[], Some("DAY"))
}

/// base64url without padding, as JWT segments are written.
fn segment(value: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A token whose header says `alg: none`: claims that would be valid, and no
/// signature (or a made-up one).
fn unsigned(signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        segment(&json!({"alg": "none", "typ": "JWT"})),
        segment(&json!({"sub": "mallory", "exp": now() + 600, "customers": "*"}))
    )
}

/// Tokens that are refused, and the one thing wrong with each.
fn refused_tokens() -> Vec<(&'static str, String)> {
    let claims = |extra: Value| {
        let mut claims = json!({"sub": "u", "exp": now() + 600, "customers": "*"});
        for (k, v) in extra.as_object().expect("an object") {
            claims[k] = v.clone();
        }
        claims
    };
    vec![
        (
            "expired two minutes ago",
            sign(&claims(json!({"exp": now() - 120})), JWT_SECRET),
        ),
        (
            "not valid for five more minutes (nbf)",
            sign(&claims(json!({"nbf": now() + 300})), JWT_SECRET),
        ),
        (
            "signed with another secret",
            sign(&claims(json!({})), "another-secret-another-secret-0123"),
        ),
        ("alg none, no signature", unsigned("")),
        ("alg none, a made-up signature", unsigned("c2lnbmF0dXJl")),
        (
            "HS512 with the right secret (not the configured algorithm)",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
                &claims(json!({})),
                &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
            )
            .expect("encodes"),
        ),
        (
            "no exp claim",
            sign(&json!({"sub": "u", "customers": "*"}), JWT_SECRET),
        ),
        (
            "no customers claim",
            sign(&json!({"sub": "u", "exp": now() + 600}), JWT_SECRET),
        ),
        (
            "customers claim of the wrong type",
            sign(&claims(json!({"customers": 42})), JWT_SECRET),
        ),
        ("not a JWT at all", "not.a.jwt".to_owned()),
    ]
}

/// Expired, not-yet-valid, wrongly signed, `alg: none`, wrong-algorithm and
/// malformed tokens, and no credential at all, are `UNAUTHENTICATED` without a
/// word of the token in the answer and with 0 BI queries; a valid token for
/// `*` then gets the BI's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_valid_current_token_gets_in() {
    let env = TestEnv::start(TestOptions::default().env("AUTH_JWT_SECRET", JWT_SECRET)).await;
    let gateway = env.gateway();
    let http = client();

    for (what, token) in refused_tokens() {
        let answer = graphql_as(&http, gateway, &[bearer(&token)], &body("acme")).await;
        assert_refused(&answer, "UNAUTHENTICATED", what);
        if token.len() > 8 {
            assert!(
                !answer.to_string().contains(&token),
                "{what}: the answer repeats the token: {answer}"
            );
        }
    }
    let anonymous = graphql_as(&http, gateway, &[], &body("acme")).await;
    assert_refused(&anonymous, "UNAUTHENTICATED", "no credential");
    let stats = env.sim.stats();
    assert_eq!((stats.http_requests, stats.queries), (0, 0), "{stats:?}");

    let valid = token_for("alice", json!("*"));
    let answer = graphql_as(&http, gateway, &[bearer(&valid)], &body("acme")).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    assert_eq!(
        answer["data"]["aggregate"]["rows"],
        expected_rows("acme", FROM, TO, MEASURES, &[], Some("DAY"))
    );
    assert_eq!(answer["data"]["aggregate"]["cache"]["status"], "MISS");
    assert_eq!(env.sim.stats().queries, 1);
}

/// An introspection answer that reveals nothing: an error, or the
/// introspection fields answered `null` (async-graphql's way of having
/// introspection off).
fn assert_introspection_refused(answer: &Value) {
    let revealed = answer["data"]
        .as_object()
        .is_some_and(|data| data.values().any(|v| !v.is_null()));
    assert!(
        !revealed,
        "introspection answered an unauthenticated caller: {answer}"
    );
}

/// With authentication on, an unauthenticated caller learns nothing of the
/// schema: introspection reveals nothing (POST and GET) and a misspelled field gets no
/// "Did you mean" hint; an authenticated caller gets both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_schema_is_hidden_from_unauthenticated_callers() {
    let env = TestEnv::start(TestOptions::default().env("AUTH_JWT_SECRET", JWT_SECRET)).await;
    let gateway = env.gateway();
    let http = client();
    let signed_in = [bearer(&token_for("alice", json!(["acme"])))];
    let introspections = [
        json!({"query": "{ __schema { types { name } } }"}),
        json!({"query": "{ __type(name: \"AggregateInput\") { inputFields { name } } }"}),
        json!({"query": "query { __schema { queryType { fields { name args { name } } } } }"}),
    ];

    for query in &introspections {
        let anonymous = graphql_as(&http, gateway, &[], query).await;
        assert_introspection_refused(&anonymous);
        let text = anonymous.to_string();
        assert!(
            !text.contains("AggregateInput\"") && !text.contains("\"customer\""),
            "{anonymous}"
        );
        for type_name in ["AggregateResult", "CacheInfo", "DateRangeInput"] {
            assert!(!text.contains(type_name), "{type_name} leaked: {anonymous}");
        }

        let authenticated = graphql_as(&http, gateway, &signed_in, query).await;
        assert!(
            authenticated.get("errors").is_none(),
            "an authenticated caller may introspect: {authenticated}"
        );
    }
    let names = graphql_as(&http, gateway, &signed_in, &introspections[0]).await;
    let types = names["data"]["__schema"]["types"]
        .as_array()
        .expect("a list of types");
    assert!(
        types.iter().any(|t| t["name"] == "AggregateInput"),
        "{names}"
    );

    // The same over GET.
    let over_get = get(
        &http,
        gateway,
        "/graphql?query=%7B%20__schema%20%7B%20types%20%7B%20name%20%7D%20%7D%20%7D",
        &[],
    )
    .await;
    let over_get = over_get.json();
    assert_introspection_refused(&over_get);
    assert!(
        !over_get.to_string().contains("AggregateInput"),
        "{over_get}"
    );

    // No hints for the anonymous; the authenticated get them (so the check
    // above would notice them).
    let misspelled = json!({"query": "{ catalgo { cubes { name } } }"});
    let anonymous = graphql_as(&http, gateway, &[], &misspelled).await;
    assert!(anonymous.get("errors").is_some(), "{anonymous}");
    let text = anonymous.to_string();
    assert!(
        !text.contains("Did you mean") && !text.contains("catalog"),
        "a hint for an unauthenticated caller: {anonymous}"
    );
    let authenticated = graphql_as(&http, gateway, &signed_in, &misspelled).await;
    assert!(
        authenticated.to_string().contains("Did you mean"),
        "{authenticated}"
    );
    let misspelled_argument = json!({"query": "{ aggregate(inptu: {}) { rows } }"});
    let anonymous = graphql_as(&http, gateway, &[], &misspelled_argument).await;
    assert!(
        !anonymous.to_string().contains("Did you mean"),
        "{anonymous}"
    );
    assert!(
        codes(&anonymous)
            .iter()
            .all(|c| c != "INTERNAL_SERVER_ERROR")
    );
    assert_eq!(env.sim.stats().queries, 0);
}

/// A key pair made by `openssl` in `dir`: (private PEM, public PEM), or
/// `None` when no `openssl` binary is installed.
fn key_pair(dir: &std::path::Path, algorithm: &[&str]) -> Option<(String, String)> {
    let private = dir.join(format!("{}-private.pem", algorithm.join("-")));
    let public = dir.join(format!("{}-public.pem", algorithm.join("-")));
    let generated = std::process::Command::new("openssl")
        .arg("genpkey")
        .args(algorithm)
        .arg("-out")
        .arg(&private)
        .output()
        .ok()?;
    assert!(
        generated.status.success(),
        "openssl genpkey: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let exported = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .output()
        .expect("openssl runs");
    assert!(
        exported.status.success(),
        "openssl pkey: {}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let read = |path: &std::path::Path| std::fs::read_to_string(path).expect("a PEM file");
    Some((read(&private), read(&public)))
}

/// With `AUTH_JWT_PUBLIC_KEY_FILE` (an RSA key, then an EC P-256 key made by
/// `openssl`, when it is installed): a token signed with the private key
/// gets in; an HS256 token whose HMAC secret is the public key (algorithm
/// confusion), an `alg: none` token, a token of another key pair and a token
/// of the other algorithm family are `UNAUTHENTICATED`, with 0 BI queries
/// for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn public_key_gateways_refuse_algorithm_confusion() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    let dir = std::env::temp_dir().join(format!("ag-keys-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let rsa = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
    let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let Some((rsa_private, rsa_public)) = key_pair(&dir, &rsa) else {
        println!("no openssl binary: RS256/ES256 are covered by src/auth.rs's unit tests only");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).expect("a temp dir");
    let (other_rsa_private, _) = key_pair(&other_dir, &rsa).expect("openssl works");
    let (ec_private, ec_public) = key_pair(&dir, &ec).expect("openssl works");
    let (other_ec_private, _) = key_pair(&other_dir, &ec).expect("openssl works");
    let claims = json!({"sub": "svc", "exp": now() + 600, "customers": ["acme"]});
    let rs256 = |pem: &str| {
        encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(pem.as_bytes()).expect("an RSA private key"),
        )
        .expect("encodes")
    };
    let es256 = |pem: &str| {
        encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(pem.as_bytes()).expect("an EC private key"),
        )
        .expect("encodes")
    };
    let http = client();

    let gateways = [
        (
            "RS256",
            rsa_public,
            rs256(&rsa_private),
            rs256(&other_rsa_private),
            es256(&ec_private),
        ),
        (
            "ES256",
            ec_public,
            es256(&ec_private),
            es256(&other_ec_private),
            rs256(&rsa_private),
        ),
    ];
    for (name, public, valid, other_key, other_family) in gateways {
        let public_file = super::TempFile::new("public.pem", &public);
        let env = TestEnv::start(
            TestOptions::default()
                .latency_ms(50)
                .env("AUTH_JWT_PUBLIC_KEY_FILE", public_file.path_str()),
        )
        .await;
        let gateway = env.gateway();
        let confused = sign(&claims, &public);
        for (what, token) in [
            ("HS256 with the public key as its secret", confused),
            ("alg none", unsigned("")),
            ("another key pair", other_key),
            ("the other algorithm family", other_family),
        ] {
            let answer = graphql_as(&http, gateway, &[bearer(&token)], &body("acme")).await;
            assert_refused(&answer, "UNAUTHENTICATED", &format!("{name}: {what}"));
        }
        assert_eq!(env.sim.stats().queries, 0, "{name}");
        let answer = graphql_as(&http, gateway, &[bearer(&valid)], &body("acme")).await;
        assert!(answer.get("errors").is_none(), "{name}: {answer}");
        let forbidden = graphql_as(&http, gateway, &[bearer(&valid)], &body("globex")).await;
        assert_refused(&forbidden, "FORBIDDEN", name);
        assert_eq!(env.sim.stats().queries, 1, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `AUTH_JWT_QUOTA_PER_MINUTE=2` limits each token subject to two BI-query
/// worths a minute: alice's third new question is `RATE_LIMITED` with
/// `retryAfter` and no BI query, whatever token of hers she sends, while bob
/// is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_subjects_quota_is_enforced() {
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .env("AUTH_JWT_SECRET", JWT_SECRET)
            .env("AUTH_JWT_QUOTA_PER_MINUTE", 2),
    )
    .await;
    let gateway = env.gateway();
    let http = client();
    super::api_keys::within_one_quota_window(std::time::Duration::from_secs(15)).await;
    let day = |customer: &str, day: u32| {
        let date = format!("2025-09-{day:02}");
        panel(customer, &date, &date, MEASURES, &[], None)
    };
    let alice = [bearer(&token_for("alice", json!("*")))];
    for d in [1, 2] {
        let answer = graphql_as(&http, gateway, &alice, &day("acme", d)).await;
        assert!(answer.get("errors").is_none(), "{answer}");
    }
    // A new token of the same subject shares the quota.
    let alice_again = [bearer(&sign(
        &json!({"sub": "alice", "exp": now() + 300, "customers": ["acme"]}),
        JWT_SECRET,
    ))];
    for headers in [&alice, &alice_again] {
        let answer = graphql_as(&http, gateway, headers, &day("acme", 3)).await;
        assert_refused(&answer, "RATE_LIMITED", "alice past her quota");
        let retry_after = answer["errors"][0]["extensions"]["retryAfter"].as_u64();
        assert!(
            retry_after.is_some_and(|s| (1..=60).contains(&s)),
            "{answer}"
        );
    }
    assert_eq!(env.sim.stats().queries, 2);
    let bob = [bearer(&token_for("bob", json!("*")))];
    let answer = graphql_as(&http, gateway, &bob, &day("acme", 3)).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    assert_eq!(env.sim.stats().queries, 3);
}
