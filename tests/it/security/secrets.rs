//! Secret hygiene: the BI's token, JWT secrets, API keys, bearer tokens and
//! the bodies of the BI's server errors never reach a response, a log line or
//! an exported span, whatever the log level.

use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{TempFile, bearer, client, codes, graphql_as, sign};
use crate::common::{Gateway, TestEnv, TestOptions, expected_rows, panel};
use crate::otlp::OtlpReceiver;

const MEASURES: &[&str] = &["Sales.revenue"];

fn day(customer: &str, day: u32) -> (Value, Value) {
    let date = format!("2025-08-{day:02}");
    (
        panel(customer, &date, &date, MEASURES, &[], None),
        expected_rows(customer, &date, &date, MEASURES, &[], None),
    )
}

/// Every secret of one run, distinct per run so that nothing else can
/// produce the same text.
struct Secrets {
    bi_token: String,
    jwt_secret: String,
    api_key: String,
    unknown_key: String,
    /// What the BI's failing answers carry.
    sql: String,
    password: String,
}

impl Secrets {
    fn new() -> Secrets {
        let id = || uuid::Uuid::new_v4().simple().to_string();
        Secrets {
            bi_token: format!("Bearer bi-token-{}", id()),
            jwt_secret: format!("jwt-secret-{}", id()),
            api_key: format!("api-key-{}", id()),
            unknown_key: format!("api-key-typo-{}", id()),
            sql: format!(
                "SELECT card_number FROM vault_{} WHERE tenant = 'acme'",
                id()
            ),
            password: format!("sk_live_{}", id()),
        }
    }

    /// The BI's failing answers, one per request: JSON and plain text, with
    /// the SQL and a password in the message and in a stack trace.
    fn failures(&self) -> Vec<Value> {
        vec![
            json!({"status": 500, "body": json!({"error": format!("{} -- password={}", self.sql, self.password)}).to_string()}),
            json!({"status": 503, "body": format!("upstream failed: {}\npassword={}", self.sql, self.password)}),
            json!({"status": 500, "body": json!({"error": "Internal", "stack": format!("at query ({}) with {}", self.sql, self.password)}).to_string()}),
            json!({"status": 502, "body": format!("<html>{} {}</html>", self.password, self.sql)}),
        ]
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Fails the test if `text` (named `what`) holds any of `secrets`.
fn assert_clean(what: &str, text: &str, secrets: &[(&str, &str)]) {
    for (name, secret) in secrets {
        assert!(
            !text.contains(secret),
            "{what} holds the {name} `{secret}`:\n{text}"
        );
    }
}

/// For `RUST_LOG=info`, `debug` and `trace` (text logs) and `debug` (JSON
/// logs): a BI
/// that answers 500/502/503 with bodies holding SQL and a password, called
/// with a distinctive `BI_TOKEN`, by callers with a JWT, an API key, a bad
/// token and an unknown key. Clients get `BI_ERROR` (500) or `BI_UNAVAILABLE`
/// (502, 503) with a generic message;
/// the captured stdout/stderr says the BI failed (with its status) but holds
/// none of the body's SQL or password, nor the BI token, the JWT secret, the
/// tokens or the keys; neither do any of the exported spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_never_reach_responses_logs_or_spans() {
    for (level, format) in [
        ("info", "text"),
        ("debug", "text"),
        ("debug", "json"),
        ("trace", "text"),
    ] {
        let run = format!("RUST_LOG={level} LOG_FORMAT={format}");
        let secrets = Secrets::new();
        let keys = TempFile::new(
            "keys.json",
            &json!({"keys": [{"name": "svc", "sha256": sha256_hex(&secrets.api_key), "customers": "*"}]})
                .to_string(),
        );
        let receiver = OtlpReceiver::grpc().await;
        let mut env = TestEnv::start(
            TestOptions::default()
                .latency_ms(50)
                .env("NEGATIVE_CACHE_SECS", 1)
                .env("BI_TOKEN", &secrets.bi_token)
                .env("AUTH_JWT_SECRET", &secrets.jwt_secret)
                .env("AUTH_API_KEYS_FILE", keys.path_str())
                .env("RUST_LOG", level)
                .env("LOG_FORMAT", format)
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        )
        .await;
        let http = client();
        let jwt = sign(
            &json!({"sub": "alice", "exp": super::now() + 600, "customers": "*"}),
            &secrets.jwt_secret,
        );
        let bad_jwt = sign(
            &json!({"sub": "mallory", "exp": super::now() + 600, "customers": "*"}),
            "a-guessed-secret-a-guessed-secret",
        );
        let credentials = [
            vec![bearer(&jwt)],
            vec![("x-api-key".to_owned(), secrets.api_key.clone())],
        ];
        let mut responses = Vec::new();

        for (i, failure) in secrets.failures().into_iter().enumerate() {
            let code = match failure["status"].as_u64() {
                Some(502..=504) => "BI_UNAVAILABLE",
                _ => "BI_ERROR",
            };
            env.sim.faults(json!({"failNext": failure})).await;
            let (body, _) = day("acme", 1 + i as u32);
            let answer = graphql_as(&http, env.gateway(), &credentials[i % 2], &body).await;
            assert_eq!(codes(&answer), [code], "{run}: {answer}");
            responses.push(answer.to_string());
        }
        assert_eq!(env.sim.stats().queries, 4, "{run}");
        for (header, value) in [
            bearer(&bad_jwt),
            ("x-api-key".to_owned(), secrets.unknown_key.clone()),
        ] {
            let (body, _) = day("acme", 10);
            let answer = graphql_as(&http, env.gateway(), &[(header, value)], &body).await;
            assert_eq!(codes(&answer), ["UNAUTHENTICATED"], "{run}: {answer}");
            responses.push(answer.to_string());
        }
        // A good answer, so the token is known to have been sent.
        let (body, rows) = day("acme", 20);
        let answer = graphql_as(&http, env.gateway(), &credentials[0], &body).await;
        assert_eq!(answer["data"]["aggregate"]["rows"], rows, "{run}: {answer}");
        assert_eq!(
            env.sim.stats().last_authorization.as_deref(),
            Some(secrets.bi_token.as_str()),
            "{run}: the BI got the token"
        );

        stop_gracefully(&mut env.gateways[0]).await;
        let spans = receiver
            .spans_when(Duration::from_secs(20), |spans| {
                spans.iter().any(|s| s.name() == "bi.call")
            })
            .await;
        assert!(
            spans.iter().any(|s| s.name() == "bi.call"),
            "{run}: spans were exported"
        );

        let forbidden = [
            ("BI token", secrets.bi_token.as_str()),
            (
                "BI token's value",
                secrets.bi_token.trim_start_matches("Bearer "),
            ),
            ("JWT secret", secrets.jwt_secret.as_str()),
            ("JWT", jwt.as_str()),
            ("refused JWT", bad_jwt.as_str()),
            ("JWT signature", jwt.rsplit('.').next().unwrap_or_default()),
            ("API key", secrets.api_key.as_str()),
            ("unknown API key", secrets.unknown_key.as_str()),
            ("BI error's SQL", secrets.sql.as_str()),
            ("BI error's password", secrets.password.as_str()),
        ];
        for (i, response) in responses.iter().enumerate() {
            assert_clean(&format!("{run}: response {i}"), response, &forbidden);
        }
        let logs = env.gateway().output();
        assert_clean(&format!("{run}: the logs"), &logs, &forbidden);
        for status in ["500", "502", "503"] {
            assert!(
                logs.contains(status),
                "{run}: operators are told the BI answered {status}:\n{logs}"
            );
        }
        for span in &spans {
            let text = span.all_text().join("\n");
            assert_clean(
                &format!("{run}: span {}", span.describe()),
                &text,
                &forbidden,
            );
        }
    }
}

/// SIGTERM, then waits for a clean exit: a graceful stop flushes the spans
/// still queued and the last log lines.
async fn stop_gracefully(gateway: &mut Gateway) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &gateway.pid().to_string()])
        .status()
        .expect("`kill` runs");
    assert!(status.success(), "kill -TERM {}", gateway.pid());
    let exit = gateway.wait_for_exit(Duration::from_secs(30)).await;
    assert!(
        exit.success(),
        "exit status {exit:?}; output:\n{}",
        gateway.output()
    );
}
