//! GraphiQL as a browser meets it: the page and its files come from the
//! gateway alone (types, cache headers, gzip), `GRAPHIQL=false` turns them
//! off, and headless Chromium, driven through WebDriver, runs the contract's
//! example query without a single request leaving 127.0.0.1.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::{Value, json};

use crate::common::{TestEnv, TestOptions, expected_rows, within};

/// The page's own files, as the page names them (relative to `/graphql`).
fn referenced_files(html: &str) -> Vec<String> {
    let mut files = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for (start, _) in html.match_indices(attribute) {
            let rest = &html[start + attribute.len()..];
            let target = &rest[..rest.find('"').expect("a closed attribute")];
            if !target.starts_with("data:") {
                files.push(target.to_owned());
            }
        }
    }
    files
}

async fn graphiql_html(env: &TestEnv) -> String {
    let page = env
        .gateway()
        .get_with("/graphql", &[("accept", "text/html")])
        .await;
    assert_eq!(page.status().as_u16(), 200);
    page.text().await.expect("an HTML body")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}

/// The page and each file it names are served by the gateway: HTML that the
/// browser may not fill from elsewhere (CSP), files with their type, cached
/// for a year under versioned paths, gzip-compressed when asked, whole otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graphiql_files_come_from_the_gateway() {
    let env = TestEnv::start(TestOptions::default()).await;
    let page = env
        .gateway()
        .get_with("/graphql", &[("accept", "text/html")])
        .await;
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&page, "cache-control"), "no-cache");
    let csp = header(&page, "content-security-policy").to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    let html = page.text().await.expect("an HTML body");
    assert!(
        html.contains("query Panel($input: AggregateInput!)"),
        "{html}"
    );

    let files = referenced_files(&html);
    assert_eq!(files.len(), 5, "{files:?}");
    for file in &files {
        assert!(
            file.starts_with("graphiql/"),
            "{file} is not the gateway's own"
        );
        let path = format!("/{file}");
        let expected_type = if file.ends_with(".css") {
            "text/css; charset=utf-8"
        } else {
            "text/javascript; charset=utf-8"
        };

        let plain = env
            .gateway()
            .get_with(&path, &[("accept-encoding", "identity")])
            .await;
        assert_eq!(plain.status().as_u16(), 200, "{path}");
        assert_eq!(header(&plain, "content-type"), expected_type, "{path}");
        assert_eq!(
            header(&plain, "cache-control"),
            "public, max-age=31536000, immutable",
            "{path}"
        );
        assert_eq!(header(&plain, "vary"), "accept-encoding", "{path}");
        assert_eq!(header(&plain, "content-encoding"), "", "{path}");
        let whole = plain.bytes().await.expect("a body");

        let gzipped = env
            .gateway()
            .get_with(&path, &[("accept-encoding", "gzip, deflate, br")])
            .await;
        assert_eq!(gzipped.status().as_u16(), 200, "{path}");
        assert_eq!(header(&gzipped, "content-type"), expected_type, "{path}");
        if file.ends_with("/init.js") {
            // Ours, a few hundred bytes: sent as it is.
            assert_eq!(header(&gzipped, "content-encoding"), "", "{path}");
            continue;
        }
        assert_eq!(header(&gzipped, "content-encoding"), "gzip", "{path}");
        let compressed = gzipped.bytes().await.expect("a body");
        assert_eq!(&compressed[..2], &[0x1f, 0x8b], "{path}: not gzip");
        // The stylesheet's fonts are base64 inside it: it shrinks least.
        assert!(
            compressed.len() < whole.len() * 7 / 10,
            "{path}: {} bytes compressed, {} whole",
            compressed.len(),
            whole.len()
        );
        // gzip's trailer ends with the uncompressed length.
        let tail: [u8; 4] = compressed[compressed.len() - 4..]
            .try_into()
            .expect("4 bytes");
        assert_eq!(u32::from_le_bytes(tail) as usize, whole.len(), "{path}");
    }

    // A path of another version (or none) is not served.
    let stale = env
        .gateway()
        .get("/graphiql/0000000000000000/graphiql.min.js")
        .await;
    assert_eq!(stale.status().as_u16(), 404);
}

/// `GRAPHIQL=false`: a browser's `GET /graphql` is answered as any GET query
/// (here one without a query: a GraphQL error, in JSON), and the page's files
/// are 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graphiql_false_turns_the_page_off() {
    let on = TestEnv::start(TestOptions::default()).await;
    let files = referenced_files(&graphiql_html(&on).await);
    let off = TestEnv::start(TestOptions::default().env("GRAPHIQL", "false")).await;

    let page = off
        .gateway()
        .get_with("/graphql", &[("accept", "text/html")])
        .await;
    assert!(
        header(&page, "content-type").starts_with("application/json"),
        "{}",
        header(&page, "content-type")
    );
    let answer: Value = page.json().await.expect("a JSON answer");
    assert!(answer["errors"][0]["message"].is_string(), "{answer}");

    let mut url = reqwest::Url::parse("http://gateway/graphql").expect("a URL");
    url.query_pairs_mut()
        .append_pair("query", "{catalog{cubes{name}}}");
    let query = off
        .gateway()
        .get_with(
            &format!("/graphql?{}", url.query().unwrap_or_default()),
            &[("accept", "text/html, application/json;q=0.9")],
        )
        .await;
    assert_eq!(query.status().as_u16(), 200);
    let answer: Value = query.json().await.expect("a JSON answer");
    assert_eq!(
        answer["data"]["catalog"]["cubes"][0]["name"], "Sales",
        "{answer}"
    );

    for file in files {
        let response = off.gateway().get(&format!("/{file}")).await;
        assert_eq!(response.status().as_u16(), 404, "{file}");
    }
}

/// Chromium's flags: headless as root, and none of its own traffic (this
/// machine's network is closed). The resolver rule makes every host name but
/// the gateway's address unresolvable, so a page that reached for a CDN could
/// not send anything there; the performance log still shows that it tried.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,900",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
];

/// Where the test command's Debian packages put them.
fn program(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed, so the GraphiQL browser test cannot run. The test \
             command (scripts/test) installs Debian's `chromium` and `chromium-driver`; by \
             hand: apt-get install chromium chromium-driver"
        )
    })
}

/// A `chromedriver` on a free loopback port, killed when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl ChromeDriver {
    async fn start(scratch: &Path) -> ChromeDriver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port();
        let log = scratch.join("chromedriver.log");
        let child = Command::new(program("chromedriver"))
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("chromedriver does not start: {err}"));
        let mut driver = ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let status = format!("{}/status", driver.url);
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(exit)) = driver.child.try_wait() {
                panic!("chromedriver exited ({exit}); {}", driver.log_text());
            }
            let ready = match http.get(&status).send().await {
                Ok(response) => response
                    .json::<Value>()
                    .await
                    .is_ok_and(|body| body["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                return driver;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver was not ready on port {port} within 20 s; {}",
                driver.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("chromedriver's log ends:\n{}", tail.join("\n"))
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ChromeDriver's log endpoint (`goog:loggingPrefs`), which WebDriver itself lacks.
#[derive(Debug)]
struct GetLog(&'static str);

impl WebDriverCompatibleCommand for GetLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": self.0}).to_string()),
        )
    }
}

/// Where people look for the screenshot: `target/graphiql.png`.
fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("graphiql.png")
}

/// The response pane's whole text (CodeMirror 5 renders only the visible
/// lines, but keeps its instance on its wrapper element).
const RESPONSE_TEXT: &str = "const pane = document.querySelector('.graphiql-response .CodeMirror');
     return pane && pane.CodeMirror ? pane.CodeMirror.getValue() : '';";

/// In headless Chromium, through WebDriver, against a real gateway: GraphiQL
/// appears with the contract's example, its run button answers the example
/// with the BI's rows, the docs panel lists the schema, every request the page made went to the gateway
/// (Chromium's performance log, which lists failed and refused requests
/// too), and the console has no error. Leaves `target/graphiql.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graphiql_runs_the_example_in_chromium() {
    let env = TestEnv::start(TestOptions::default()).await;
    let scratch = std::env::temp_dir().join(format!("graphiql-it-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&scratch).expect("a scratch directory");
    let driver = ChromeDriver::start(&scratch).await;

    let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
    // A fresh profile: no tabs kept from an earlier run, nothing cached.
    args.push(format!(
        "--user-data-dir={}",
        scratch.join("profile").display()
    ));
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": program("chromium"),
            "args": args,
        },
        "goog:loggingPrefs": {"performance": "ALL", "browser": "ALL"},
    });
    let capabilities = match capabilities {
        Value::Object(map) => map,
        _ => unreachable!("an object"),
    };
    let client = within(
        Duration::from_secs(60),
        "chromedriver to start Chromium",
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url),
    )
    .await
    .unwrap_or_else(|err| {
        panic!(
            "Chromium did not start under chromedriver: {err}; {}",
            driver.log_text()
        )
    });

    // The session ends (and Chromium with it) whatever the checks say.
    let outcome = std::panic::AssertUnwindSafe(drive(&client, &env))
        .catch_unwind()
        .await;
    let _ = client.close().await;
    drop(driver);
    let _ = std::fs::remove_dir_all(&scratch);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn drive(client: &Client, env: &TestEnv) {
    let gateway = env.gateway().url();
    let limit = Duration::from_secs(60);
    // Reading the log empties it: what the browser's own start page loaded
    // is left out of what the gateway's page is judged by.
    client
        .issue_cmd(GetLog("performance"))
        .await
        .expect("Chromium's performance log (goog:loggingPrefs)");
    within(
        limit,
        "the page to load",
        client.goto(&format!("{gateway}/graphql")),
    )
    .await
    .expect("Chromium opens the page");

    // GraphiQL appears, on the contract's example.
    let run = within(
        limit,
        "GraphiQL's run button",
        client
            .wait()
            .at_most(limit)
            .for_element(Locator::Css(".graphiql-execute-button")),
    )
    .await
    .expect("GraphiQL renders its run button");
    let body = client
        .find(Locator::Css("body"))
        .await
        .expect("a body")
        .text()
        .await
        .expect("its text");
    assert!(
        body.contains("query Panel($input: AggregateInput!)"),
        "{body}"
    );
    assert!(body.contains("\"customer\": \"acme\""), "{body}");
    assert!(body.contains("Headers"), "no Headers tab: {body}");

    // Run it as a user would.
    run.click().await.expect("the run button clicks");
    let started = tokio::time::Instant::now();
    let response = loop {
        let text = client
            .execute(RESPONSE_TEXT, vec![])
            .await
            .expect("the response pane is readable");
        let text = text.as_str().unwrap_or_default().to_owned();
        if text.contains("\"data\"") || text.contains("\"errors\"") {
            break text;
        }
        assert!(
            started.elapsed() < limit,
            "no answer in GraphiQL's response pane within {limit:?}: {text:?}; {}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let answer: Value = serde_json::from_str(&response)
        .unwrap_or_else(|err| panic!("the response pane is not JSON ({err}): {response}"));
    assert!(answer.get("errors").is_none(), "{answer}");
    let expected = expected_rows(
        "acme",
        "2025-01-01",
        "2025-01-31",
        &["Sales.revenue", "Sales.orders"],
        &["Sales.region"],
        Some("DAY"),
    );
    assert!(expected.as_array().is_some_and(|rows| !rows.is_empty()));
    assert_eq!(answer["data"]["aggregate"]["rows"], expected);
    assert_eq!(answer["data"]["aggregate"]["cache"]["status"], "MISS");
    assert_eq!(env.sim.stats().queries, 1);

    // The rows on screen, for people to look at.
    let visible = client
        .find(Locator::Css(".graphiql-response"))
        .await
        .expect("the response pane")
        .text()
        .await
        .expect("its text");
    assert!(visible.contains("Sales.revenue"), "{visible}");
    let png = client.screenshot().await.expect("a screenshot");
    let path = screenshot_path();
    std::fs::create_dir_all(path.parent().expect("target/")).expect("target/ exists");
    std::fs::write(&path, png).expect("the screenshot is written");
    eprintln!("GraphiQL screenshot: {}", path.display());

    // The docs panel: GraphiQL's own introspection query is answered (the
    // limits let graphql-js's standard one through), so the explorer lists
    // the root types and, one click on, the `aggregate` field.
    client
        .find(Locator::Css(
            "button[aria-label='Show Documentation Explorer']",
        ))
        .await
        .expect("GraphiQL's docs button")
        .click()
        .await
        .expect("the docs button clicks");
    let explorer = within(
        limit,
        "the documentation explorer's root types",
        client
            .wait()
            .at_most(limit)
            .for_element(Locator::Css(".graphiql-doc-explorer-root-type")),
    )
    .await
    .unwrap_or_else(|err| panic!("no root types in the docs panel ({err}); {}", env.logs()));
    let docs = client
        .find(Locator::Css(".graphiql-doc-explorer"))
        .await
        .expect("the documentation explorer")
        .text()
        .await
        .expect("its text");
    assert!(
        docs.contains("Root Types") && !docs.contains("Error"),
        "{docs}"
    );
    explorer
        .find(Locator::XPath("./following-sibling::a[1]"))
        .await
        .expect("the query type's link")
        .click()
        .await
        .expect("the query type opens");
    let fields = within(
        limit,
        "the query type's fields",
        client.wait().at_most(limit).for_element(Locator::XPath(
            "//*[contains(@class, 'graphiql-doc-explorer-field-name')][text()='aggregate']",
        )),
    )
    .await;
    assert!(fields.is_ok(), "the docs panel does not list `aggregate`");

    check_requests(client, &gateway).await;
    check_console(client).await;
}

/// Every request that could leave the machine (any http, https, ws or wss
/// address: sent, failed or refused, and WebSockets) was to the gateway; and
/// the page did make the ones it should, so an empty or broken log cannot
/// pass. Addresses with other schemes (`data:`, and `chrome:` of the
/// browser's own pages) never reach a network.
async fn check_requests(client: &Client, gateway: &str) {
    let entries = client
        .issue_cmd(GetLog("performance"))
        .await
        .expect("Chromium's performance log");
    let mut urls = BTreeSet::new();
    let mut failures = Vec::new();
    for entry in entries.as_array().expect("log entries") {
        let message: Value = serde_json::from_str(entry["message"].as_str().unwrap_or("{}"))
            .expect("a DevTools event");
        let event = &message["message"];
        let params = &event["params"];
        match event["method"].as_str().unwrap_or_default() {
            "Network.requestWillBeSent" => {
                urls.insert(
                    params["request"]["url"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            "Network.webSocketCreated" => {
                urls.insert(params["url"].as_str().unwrap_or_default().to_owned());
            }
            "Network.loadingFailed" => failures.push(params.to_string()),
            _ => {}
        }
    }
    let origin = gateway.trim_start_matches("http://");
    let elsewhere: Vec<&String> = urls
        .iter()
        .filter(|url| {
            let scheme = url
                .split(':')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let network =
                matches!(scheme.as_str(), "http" | "https" | "ws" | "wss") || url.starts_with("//");
            let own = url.starts_with(&format!("http://{origin}/"))
                || url.starts_with(&format!("ws://{origin}/"));
            network && !own
        })
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests that left {gateway}: {elsewhere:?}"
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    for expected in [
        "/graphql",
        "/react.production.min.js",
        "/react-dom.production.min.js",
        "/graphiql.min.js",
        "/graphiql.min.css",
        "/init.js",
    ] {
        assert!(
            urls.iter().any(|url| url.ends_with(expected)),
            "the performance log has no request for {expected}: {urls:#?}"
        );
    }
}

/// No errors in the console: a script that did not load, a CSP violation, a
/// crash of GraphiQL.
async fn check_console(client: &Client) {
    let entries = client
        .issue_cmd(GetLog("browser"))
        .await
        .expect("Chromium's console log");
    let errors: Vec<&Value> = entries
        .as_array()
        .expect("log entries")
        .iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}
