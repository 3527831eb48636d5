//! Cost and size limits: a document just over a limit is refused with its
//! code before anything reaches the BI, one just under it is answered; huge
//! or deeply nested bodies are refused without taking the process (or its
//! memory) with them; JSON batches only when enabled, and bounded.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{Value, json};

use super::{Exchange, assert_alive, client, codes, memory_kib, post};
use crate::common::{Gateway, REQUEST_TIMEOUT, TestEnv, TestOptions, input, within};

fn panel_input(customer: &str) -> Value {
    input(
        customer,
        "2025-06-01",
        "2025-06-03",
        &["Sales.revenue"],
        &[],
        Some("DAY"),
    )
}

/// A document with one `aggregate` (for a real customer, so that a missing
/// check would cost a BI query) and `extra` beside it.
fn with_aggregate(selection: &str, extra: &str) -> Value {
    json!({
        "query": format!("query Limits($input: AggregateInput!) {{ aggregate(input: $input) {selection} {extra} }}"),
        "variables": {"input": panel_input("acme")},
    })
}

/// `n` aliased `aggregate` fields, each its own question.
fn aggregates(n: usize) -> Value {
    let inputs: Vec<Value> = (0..n)
        .map(|i| panel_input(&format!("tenant-{i}")))
        .collect();
    crate::common::dashboard(&inputs)
}

/// `__schema { types { fields { type { ofType { ... { name } } } } } }` with
/// `of_types` levels of `ofType`: `4 + of_types + 1` fields deep.
fn type_chain(of_types: usize) -> String {
    format!(
        "__schema {{ types {{ fields {{ type {}{{ name }}{} }} }} }}",
        "{ ofType ".repeat(of_types),
        " }".repeat(of_types)
    )
}

/// One limit: the setting that lowers it, a document just under it (answered)
/// and one just over it (refused with `QUERY_TOO_COMPLEX`).
struct Limit {
    name: &'static str,
    env: &'static [(&'static str, &'static str)],
    under: Value,
    over: Value,
    /// A word of the refusal's message, to show which limit refused it.
    says: &'static str,
}

fn limits() -> Vec<Limit> {
    // `query Limits($input: AggregateInput!) { aggregate(input: $input) { rows } }`
    // is 21 tokens; each `__typename` adds one.
    let tokens = |n: usize| with_aggregate("{ rows }", &"__typename ".repeat(n - 21));
    // `aggregate { rows cache { status key } }` costs 5; `rowCount` one more.
    vec![
        Limit {
            name: "aggregate fields per document",
            env: &[("MAX_AGGREGATES_PER_REQUEST", "3"), ("MAX_ALIASES", "10")],
            under: aggregates(3),
            over: aggregates(4),
            says: "aggregate",
        },
        Limit {
            name: "aliases",
            env: &[("MAX_ALIASES", "3")],
            under: with_aggregate("{ rows }", "b: __typename c: __typename d: __typename"),
            over: with_aggregate(
                "{ rows }",
                "b: __typename c: __typename d: __typename e: __typename",
            ),
            says: "aliases",
        },
        Limit {
            name: "tokens",
            env: &[("MAX_TOKENS", "200")],
            under: tokens(200),
            over: tokens(201),
            says: "tokens",
        },
        Limit {
            name: "depth",
            env: &[("GRAPHQL_MAX_DEPTH", "3")],
            // catalog(1) cubes(2) measures(3) name(4); introspection's own
            // nesting is not counted (the limits below are its own).
            under: with_aggregate(
                "{ rows }",
                &format!("catalog {{ cubes {{ name }} }} {}", type_chain(1)),
            ),
            over: with_aggregate("{ rows }", "catalog { cubes { measures { name } } }"),
            says: "nested too deep",
        },
        Limit {
            name: "introspection depth",
            env: &[],
            // 4 + 15 + 1 = 20 fields under and including `__schema`.
            under: with_aggregate("{ rows }", &type_chain(15)),
            over: with_aggregate("{ rows }", &type_chain(16)),
            says: "introspection is nested too deep",
        },
        Limit {
            name: "introspection lists",
            env: &[],
            // `fields` in `fields` is allowed, a third level is not.
            under: with_aggregate(
                "{ rows }",
                "__type(name: \"QueryRoot\") { fields { type { fields { name } } } }",
            ),
            over: with_aggregate(
                "{ rows }",
                "__type(name: \"QueryRoot\") { fields { type { fields { type { fields { name } } } } } }",
            ),
            says: "introspection is nested too deep",
        },
        Limit {
            name: "complexity",
            env: &[("GRAPHQL_MAX_COMPLEXITY", "5")],
            under: with_aggregate("{ rows cache { status key } }", ""),
            over: with_aggregate("{ rows cache { status key } rowCount }", ""),
            says: "too complex",
        },
        Limit {
            name: "directives per field",
            env: &[("MAX_DIRECTIVES_PER_FIELD", "2")],
            under: with_aggregate("@include(if: true) @skip(if: false) { rows }", ""),
            over: with_aggregate(
                "@include(if: true) @skip(if: false) @include(if: true) { rows }",
                "",
            ),
            says: "directives",
        },
        Limit {
            name: "recursive depth",
            env: &[("MAX_RECURSIVE_DEPTH", "2")],
            // Selection sets nest: aggregate's (1), cache's (2), then one more.
            under: with_aggregate("{ rows cache { status } }", ""),
            over: with_aggregate(
                "{ rows cache { status } }",
                "catalog { cubes { measures { name } } }",
            ),
            says: "recursion depth",
        },
    ]
}

/// Each limit, with only it lowered: the document just over it is refused as
/// `QUERY_TOO_COMPLEX` (its message naming the limit) with 0 BI queries, and
/// the document just under it is answered with the BI's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_limit_refuses_just_over_and_answers_just_under() {
    for limit in limits() {
        let mut options = TestOptions::default().latency_ms(50);
        for (name, value) in limit.env {
            options = options.env(name, value);
        }
        let env = TestEnv::start(options).await;
        let gateway = env.gateway();

        let refused = gateway.graphql(&limit.over).await;
        assert_eq!(
            codes(&refused),
            ["QUERY_TOO_COMPLEX"],
            "{}: {refused}",
            limit.name
        );
        assert!(refused["data"].is_null(), "{}: {refused}", limit.name);
        let message = refused["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(limit.says),
            "{}: the refusal should say `{}`: {message}",
            limit.name,
            limit.says
        );
        assert_eq!(env.sim.stats().queries, 0, "{}", limit.name);

        let answered = gateway.graphql(&limit.under).await;
        assert!(
            answered.get("errors").is_none(),
            "{}: just under the limit is answered: {answered}",
            limit.name
        );
        assert!(
            env.sim.stats().queries >= 1,
            "{}: the answer came from the BI",
            limit.name
        );
    }
}

/// The head of a `POST /graphql` announcing a JSON body of `size` bytes, by
/// `Content-Length` or chunked, with `extra` header lines (each ending in
/// `\r\n`).
fn post_head(address: &str, size: usize, chunked: bool, extra: &str) -> String {
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {size}")
    };
    format!(
        "POST /graphql HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         {framing}\r\n{extra}Connection: close\r\n\r\n"
    )
}

/// Writes a body of `size` bytes, a JSON string that never ends (only its
/// size matters), in 64 KiB pieces, chunk-framed when `chunked`.
fn write_huge_body(writer: &mut impl Write, size: usize, chunked: bool) -> std::io::Result<()> {
    let mut piece = vec![b'x'; 64 * 1024];
    piece[..10].copy_from_slice(b"{\"query\":\"");
    let mut sent = 0;
    while sent < size {
        let n = piece.len().min(size - sent);
        if chunked {
            writer.write_all(format!("{n:x}\r\n").as_bytes())?;
            writer.write_all(&piece[..n])?;
            writer.write_all(b"\r\n")?;
        } else {
            writer.write_all(&piece[..n])?;
        }
        piece[..10].fill(b'x');
        sent += n;
    }
    if chunked {
        writer.write_all(b"0\r\n\r\n")?;
    }
    Ok(())
}

/// `host:port` of the gateway.
fn address_of(gateway: &Gateway) -> String {
    gateway
        .url()
        .strip_prefix("http://")
        .expect("an http URL")
        .to_owned()
}

/// Runs one raw exchange with the gateway on a blocking thread, bounded by
/// the fixture's request timeout; an I/O error fails the test with `what`.
async fn raw_exchange(
    gateway: &Gateway,
    what: &str,
    exchange: impl FnOnce(std::net::TcpStream) -> std::io::Result<String> + Send + 'static,
) -> String {
    let address = address_of(gateway);
    let exchange = tokio::task::spawn_blocking(move || {
        let stream = std::net::TcpStream::connect(&address)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        exchange(stream)
    });
    within(REQUEST_TIMEOUT, what, exchange)
        .await
        .expect("the exchange does not panic")
        .unwrap_or_else(|err| panic!("{what}: {err}; gateway output:\n{}", gateway.output()))
}

/// The status code of a raw HTTP answer.
fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// Sends a `POST /graphql` with a body of `size` bytes over a raw socket,
/// announced by `Content-Length` or sent chunked, and returns the status the
/// gateway answers with. Writing and reading run side by side: this client
/// sees the answer however early it comes, even if the gateway closes the
/// connection before the body is all sent.
async fn post_huge_body(gateway: &Gateway, size: usize, chunked: bool) -> u16 {
    let head = post_head(&address_of(gateway), size, chunked, "");
    let answer = raw_exchange(gateway, "a huge body's answer", move |mut stream| {
        let mut writer = stream.try_clone()?;
        let sender = std::thread::spawn(move || {
            // The gateway may close the connection mid-body: that is an
            // answer too, read by the other side.
            let _ = writer
                .write_all(head.as_bytes())
                .and_then(|()| write_huge_body(&mut writer, size, chunked));
        });
        let mut answer = Vec::new();
        let mut buffer = [0_u8; 1024];
        // Until the status line is in, or the connection ends.
        while !answer.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
                Err(err) if answer.is_empty() => return Err(err),
                Err(_) => break,
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = sender.join();
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })
    .await;
    status_of(&answer)
}

/// Like most HTTP clients, writes the whole head and body of a `POST
/// /graphql` of `size` bytes before it reads anything, then reads the answer
/// to the end of the connection. A write error (the gateway reset the
/// connection under it) or a reset while reading fails the test.
async fn post_then_read(gateway: &Gateway, size: usize, chunked: bool) -> String {
    let head = post_head(&address_of(gateway), size, chunked, "");
    raw_exchange(
        gateway,
        "a huge body, then its answer",
        move |mut stream| {
            stream.write_all(head.as_bytes())?;
            write_huge_body(&mut stream, size, chunked)?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer)?;
            Ok(String::from_utf8_lossy(&answer).into_owned())
        },
    )
    .await
}

/// Checks a raw answer is a 413 that closes the connection, with the
/// GraphQL-shaped JSON error body of the gateway's other refusals.
fn assert_readable_413(answer: &str, what: &str) {
    assert_eq!(status_of(answer), 413, "{what}: {answer:.500}");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no end of head: {answer:.500}"));
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{what}: the 413 says the connection closes: {head}"
    );
    let body: Value = serde_json::from_str(body)
        .unwrap_or_else(|err| panic!("{what}: not JSON ({err}): {body:.500}"));
    assert_eq!(codes(&body), ["BAD_REQUEST"], "{what}: {body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("MAX_BODY_BYTES"), "{what}: {message}");
}

/// 10 MB bodies, with `Content-Length` and chunked, four of each at once and
/// twice over, from a client that writes the whole body before it reads (as
/// most do): every one reads a whole 413 with its JSON body and `Connection:
/// close`. The gateway drains the rest of a refused body before answering;
/// without that, closing on unread bytes resets the connection under the
/// client, which then sees "connection reset" or "broken pipe", not the 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_megabyte_bodies_written_before_reading_get_a_readable_413() {
    const SIZE: usize = 10 * 1024 * 1024;
    let env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    let gateway = env.gateway();
    for round in 0..2 {
        let exchanges = [false, true].into_iter().flat_map(|chunked| {
            (0..4).map(move |i| async move {
                let what = format!("round {round}, chunked: {chunked}, client {i}");
                (what, post_then_read(gateway, SIZE, chunked).await)
            })
        });
        for (what, answer) in futures_util::future::join_all(exchanges).await {
            assert_readable_413(&answer, &what);
        }
    }
    assert_eq!(env.sim.stats().queries, 0);
    assert_alive(gateway, "10 MB bodies written before reading").await;
}

/// A client that announces a body over the limit with `Expect: 100-continue`
/// gets the 413 at once, without a `100 Continue`: it never sends the body.
/// One that announces a body under the limit gets its `100 Continue`, sends
/// the body and gets its answer. A chunked body under the limit is answered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_are_refused_or_taken_whole_with_or_without_expect_continue() {
    let env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    let gateway = env.gateway();
    let address = address_of(gateway);

    let head = post_head(
        &address,
        10 * 1024 * 1024,
        false,
        "Expect: 100-continue\r\n",
    );
    let answer = raw_exchange(gateway, "an announced 10 MB body", move |mut stream| {
        stream.write_all(head.as_bytes())?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })
    .await;
    assert_readable_413(&answer, "Expect: 100-continue over the limit");

    let body = json!({"query": "{ __typename }"}).to_string();
    let head = post_head(&address, body.len(), false, "Expect: 100-continue\r\n");
    let answer = raw_exchange(
        gateway,
        "a small body after 100 Continue",
        move |mut stream| {
            stream.write_all(head.as_bytes())?;
            let mut interim = [0_u8; 25];
            stream.read_exact(&mut interim)?;
            let interim = String::from_utf8_lossy(&interim).into_owned();
            stream.write_all(body.as_bytes())?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer)?;
            Ok(format!("{interim}{}", String::from_utf8_lossy(&answer)))
        },
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "),
        "{answer}"
    );
    assert!(answer.contains("\"__typename\":\"QueryRoot\""), "{answer}");

    let (first, second) = ("{\"query\": \"{ __type", "name }\"}");
    let head = post_head(&address, 0, true, "");
    let answer = raw_exchange(gateway, "a chunked small body", move |mut stream| {
        stream.write_all(head.as_bytes())?;
        for piece in [first, second] {
            write!(stream, "{:x}\r\n{piece}\r\n", piece.len())?;
        }
        stream.write_all(b"0\r\n\r\n")?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains("\"__typename\":\"QueryRoot\""), "{answer}");
}

/// A client that announces 10 MB and then sends nothing is not waited for
/// long: its 413 comes once it has been silent for the drain's idle bound (a
/// few seconds), and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_never_comes_is_refused_after_a_bounded_wait() {
    const BOUND: Duration = Duration::from_secs(10);
    let env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    let gateway = env.gateway();
    let head = post_head(&address_of(gateway), 10 * 1024 * 1024, false, "");
    let started = std::time::Instant::now();
    let answer = raw_exchange(
        gateway,
        "an announced body never sent",
        move |mut stream| {
            stream.write_all(head.as_bytes())?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer)?;
            Ok(String::from_utf8_lossy(&answer).into_owned())
        },
    )
    .await;
    assert_readable_413(&answer, "a body that never comes");
    assert!(started.elapsed() < BOUND, "took {:?}", started.elapsed());
}

/// The cause of the flaky `hostile_documents_are_refused_and_the_process_stays_up`:
/// a pooling client (reqwest, as the tests use) sending bodies over the limit.
/// When the gateway answered before reading such a body and closed the
/// connection with the rest unread, about one exchange in twenty failed with
/// "error sending request" (a broken pipe while writing the body); and a
/// request sent right after could go down the connection the gateway was
/// closing, which its 413 had not announced. Now 40 rounds of a 1 MB body then
/// a small query on the same client all succeed: 413, then 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pooled_client_reads_every_413_and_its_next_request_works() {
    let env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    let gateway = env.gateway();
    let http = client();
    let big = format!("{{\"query\": \"{}\"}}", "x".repeat(1024 * 1024));
    let small = json!({"query": "{ __typename }"}).to_string();
    for round in 0..40 {
        let refused = post(
            &http,
            gateway,
            "/graphql",
            Some("application/json"),
            &[],
            big.clone(),
        )
        .await;
        assert_eq!(refused.status, 413, "round {round}: {}", refused.text);
        assert_eq!(codes(&refused.json()), ["BAD_REQUEST"], "round {round}");
        let answered = post(
            &http,
            gateway,
            "/graphql",
            Some("application/json"),
            &[],
            small.clone(),
        )
        .await;
        assert_eq!(answered.status, 200, "round {round}: {}", answered.text);
    }
}

/// 10 MB bodies, with `Content-Length` and chunked, five of each at once:
/// all 413, 0 BI queries, and the gateway's resident memory (and its peak)
/// grows by less than one such body.
///
/// The gateway's allocator, mimalloc, asks for transparent huge pages on its
/// arenas, so with them its RSS moves in 2 MiB steps as buffers land on
/// untouched huge pages: it measures the arenas' layout more than what the
/// gateway keeps (under parallel load the same run grew by 0 to 8 MiB). This
/// gateway runs without them (`MIMALLOC_ALLOW_THP=0`), so RSS counts 4 KiB
/// pages, and the bound stays tight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_megabyte_bodies_get_413_and_memory_stays_flat() {
    const SIZE: usize = 10 * 1024 * 1024;
    const MAX_GROWTH_KIB: u64 = 8 * 1024;
    let env = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .env("MIMALLOC_ALLOW_THP", "0"),
    )
    .await;
    let gateway = env.gateway();
    // Warm up with the same pattern and 2 MB bodies: the first connections
    // allocate buffers and allocator arenas that later ones reuse. The
    // gateway reads (and throws away) what it refuses, so its connections'
    // read buffers grow to their bound only after a few hundred KB; 2 MB
    // bodies get there. A gateway that kept the bodies it refuses would still
    // grow by far more than the bound below with the 10 MB ones.
    let answer = gateway.graphql(&json!({"query": "{ __typename }"})).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    let five_at_once = |size: usize, chunked: bool| {
        futures_util::future::join_all((0..5).map(move |_| post_huge_body(gateway, size, chunked)))
    };
    for _ in 0..3 {
        for chunked in [false, true] {
            for status in five_at_once(2 * 1024 * 1024, chunked).await {
                assert_eq!(status, 413, "chunked: {chunked}");
            }
        }
    }
    let (rss_before, peak_before) = memory_kib(gateway.pid());

    for chunked in [false, true] {
        for status in five_at_once(SIZE, chunked).await {
            assert_eq!(status, 413, "chunked: {chunked}");
        }
    }

    let (rss_after, peak_after) = memory_kib(gateway.pid());
    println!("VmRSS {rss_before} -> {rss_after} KiB, VmHWM {peak_before} -> {peak_after} KiB");
    assert!(
        rss_after.saturating_sub(rss_before) < MAX_GROWTH_KIB,
        "VmRSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(
        peak_after.saturating_sub(peak_before) < MAX_GROWTH_KIB,
        "VmHWM grew from {peak_before} KiB to {peak_after} KiB"
    );
    assert_eq!(env.sim.stats().queries, 0);
    assert_alive(gateway, "10 MB bodies").await;
}

/// Hostile shapes, each as a raw body.
fn hostile_bodies() -> Vec<(&'static str, String)> {
    let deep_list = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let panel_query = "query Panel($input: AggregateInput!) { aggregate(input: $input) { rows } }";
    let schema_chain = format!("{{ {} }}", type_chain(46));
    let type_chain = format!(
        "{{ __type(name: \"QueryRoot\") {}{{ name }}{} }}",
        "{ fields { type ".repeat(25),
        " } }".repeat(25)
    );
    let directives = format!(
        "query Panel($input: AggregateInput!) {{ aggregate(input: $input) {} {{ rows }} }}",
        "@include(if: true) ".repeat(50_000)
    );
    let deep_literal = format!(
        "{{ aggregate(input: {{customer: \"acme\", dateRange: {{from: \"2025-01-01\", to: \"2025-01-02\"}}, measures: {}\"Sales.revenue\"{}}}) {{ rows }} }}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let deep_selection = format!(
        "{{ {} __typename {} }}",
        "catalog { cubes { ".repeat(2_000),
        "} } ".repeat(2_000)
    );
    let fragment_cycle =
        "query { ...A } fragment A on QueryRoot { ...B } fragment B on QueryRoot { ...A }";
    let body = |query: &str, variables: Value| json!({"query": query, "variables": variables});
    vec![
        (
            "10,000-deep nested lists in variables",
            format!(
                "{{\"query\": {}, \"variables\": {{\"input\": {deep_list}}}}}",
                json!(panel_query)
            ),
        ),
        (
            "10,000-deep nested lists inside the input variable",
            format!(
                "{{\"query\": {}, \"variables\": {{\"input\": {{\"customer\": \"acme\", \"dateRange\": {{\"from\": \"2025-01-01\", \"to\": \"2025-01-02\"}}, \"measures\": {deep_list}}}}}}}",
                json!(panel_query)
            ),
        ),
        (
            "a 10,000-deep nested list literal",
            body(&deep_literal, json!({})).to_string(),
        ),
        (
            "a 50-level __schema introspection chain",
            body(&schema_chain, json!({})).to_string(),
        ),
        (
            "a 50-level __type introspection chain",
            body(&type_chain, json!({})).to_string(),
        ),
        (
            "50,000 directives on one field",
            body(&directives, json!({"input": panel_input("acme")})).to_string(),
        ),
        (
            "4,000 nested selection sets",
            body(&deep_selection, json!({})).to_string(),
        ),
        (
            "a fragment cycle",
            body(fragment_cycle, json!({})).to_string(),
        ),
    ]
}

/// 50,000 directives, 10,000-deep nested lists (in variables and in the
/// document), 50-level introspection chains, deep selections and a fragment
/// cycle are refused (an error code, or HTTP 400/413), with 0 BI
/// queries, and the process stays up; both with the default limits and with
/// body and token limits raised so that the parser and validator see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_documents_are_refused_and_the_process_stays_up() {
    let settings: [&[(&str, &str)]; 2] = [
        &[],
        &[("MAX_BODY_BYTES", "16000000"), ("MAX_TOKENS", "10000000")],
    ];
    let http = client();
    for setting in settings {
        let mut options = TestOptions::default().latency_ms(50);
        for (name, value) in setting {
            options = options.env(name, value);
        }
        let env = TestEnv::start(options).await;
        let gateway = env.gateway();
        for (what, body) in hostile_bodies() {
            let what = format!("{what} with {setting:?}");
            let Exchange { status, text } = post(
                &http,
                gateway,
                "/graphql",
                Some("application/json"),
                &[],
                body,
            )
            .await;
            assert!(
                matches!(status, 200 | 400 | 413),
                "{what}: HTTP {status}: {text:.300}"
            );
            if status == 200 {
                let answer: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|err| panic!("{what}: not JSON ({err}): {text:.300}"));
                let codes = codes(&answer);
                assert!(!codes.is_empty(), "{what}: answered: {text:.300}");
                assert!(
                    codes.iter().all(|c| c != "INTERNAL_SERVER_ERROR"),
                    "{what}: {text:.300}"
                );
                assert!(answer["data"].is_null(), "{what}: {text:.300}");
            }
            assert_alive(gateway, &what).await;
        }
        assert_eq!(env.sim.stats().queries, 0, "{setting:?}");
    }
}

/// JSON batches are refused (HTTP 400, 0 BI queries) unless
/// `ALLOW_BATCHED_REQUESTS=true`; then a batch of two is answered, one answer
/// per operation, and a batch of eleven is refused without a BI query.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_only_when_enabled_and_at_most_ten() {
    let batch = |n: usize| -> String {
        let operations: Vec<Value> = (0..n)
            .map(|i| crate::common::panel_body(panel_input(&format!("batch-{i}"))))
            .collect();
        Value::from(operations).to_string()
    };
    let http = client();

    let closed = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    for n in [1, 2] {
        let answer = post(
            &http,
            closed.gateway(),
            "/graphql",
            Some("application/json"),
            &[],
            format!("  \n{}", batch(n)),
        )
        .await;
        assert_eq!(answer.status, 400, "a batch of {n}: {}", answer.text);
    }
    assert_eq!(closed.sim.stats().queries, 0);

    let open = TestEnv::start(
        TestOptions::default()
            .latency_ms(50)
            .env("ALLOW_BATCHED_REQUESTS", "true"),
    )
    .await;
    let two = post(
        &http,
        open.gateway(),
        "/graphql",
        Some("application/json"),
        &[],
        batch(2),
    )
    .await;
    assert_eq!(two.status, 200, "{}", two.text);
    let answers = two.json();
    let answers = answers.as_array().expect("one answer per operation");
    assert_eq!(answers.len(), 2);
    for answer in answers {
        assert!(answer.get("errors").is_none(), "{answer}");
        assert!(answer["data"]["aggregate"]["rows"].is_array(), "{answer}");
    }
    let before = open.sim.stats().queries;
    assert_eq!(before, 2);
    let eleven = post(
        &http,
        open.gateway(),
        "/graphql",
        Some("application/json"),
        &[],
        batch(11),
    )
    .await;
    assert_eq!(eleven.status, 400, "{}", eleven.text);
    assert_eq!(open.sim.stats().queries, before);
}

/// A document of a few hundred bytes whose fragments spread each other ten
/// times per level, `levels` deep, ending in `bottom`: expanded, it holds
/// 10^levels copies of `bottom`.
fn fragment_bomb(levels: usize, bottom: &str) -> String {
    let variables = if bottom.contains("$input") {
        "($input: AggregateInput!)"
    } else {
        ""
    };
    let mut document = format!("query Bomb{variables} {{ ...F0 }}");
    for level in 0..levels {
        let spreads = vec![format!("...F{}", level + 1); 10].join(" ");
        document.push_str(&format!(" fragment F{level} on QueryRoot {{ {spreads} }}"));
    }
    document.push_str(&format!(" fragment F{levels} on QueryRoot {{ {bottom} }}"));
    document
}

/// Fragment bombs (each level spreading the next ten times, eight levels: a
/// 10^8-field document in under 1 KB) are refused as `QUERY_TOO_COMPLEX`
/// before anything walks their expansion: all four at once are answered
/// within a hang bound that a walk of 10^8 fields would blow by minutes, with
/// 0 BI queries, and the process stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragment_bombs_are_refused_without_expanding_them() {
    const HANG_BOUND: Duration = Duration::from_secs(30);
    let env = TestEnv::start(TestOptions::default().latency_ms(50)).await;
    let gateway = env.gateway();
    let bottoms = [
        "__typename",
        "a: __typename",
        "catalog { cubes { name } }",
        "aggregate(input: $input) { rows }",
    ];
    let http = client();
    let bombs = bottoms.iter().map(|bottom| {
        let body = if bottom.contains("$input") {
            json!({"query": fragment_bomb(8, bottom), "variables": {"input": panel_input("acme")}})
        } else {
            json!({"query": fragment_bomb(8, bottom)})
        };
        let http = http.clone();
        let url = format!("{}/graphql", gateway.url());
        async move {
            let response = http.post(url).json(&body).send().await;
            let answer = match response {
                Ok(response) => response.json::<Value>().await.map_err(|e| e.to_string()),
                Err(err) => Err(err.to_string()),
            };
            (bottom, answer)
        }
    });
    let answers = within(
        HANG_BOUND,
        "fragment bombs to be refused (a walk of their 10^8-field expansion takes minutes)",
        futures_util::future::join_all(bombs),
    )
    .await;
    for (bottom, answer) in answers {
        let answer = answer.unwrap_or_else(|err| panic!("{bottom}: {err}"));
        assert_eq!(codes(&answer), ["QUERY_TOO_COMPLEX"], "{bottom}: {answer}");
    }
    assert_eq!(env.sim.stats().queries, 0);
    assert_alive(gateway, "fragment bombs").await;
}

/// `MAX_TOKENS` counts tokens as GraphQL lexes them: a list of 300 negative
/// numbers is 300 tokens whether they are written `-1 -1 -1` or `-1-1-1`
/// (the same tokens to any GraphQL lexer), so with `MAX_TOKENS=200` both
/// documents are refused as `QUERY_TOO_COMPLEX`, and neither costs the BI
/// query of the `aggregate` beside the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_token_limit_counts_numbers_however_they_are_spaced() {
    let env = TestEnv::start(TestOptions::default().latency_ms(50).env("MAX_TOKENS", 200)).await;
    for (what, separator) in [("spaced", " "), ("unspaced", "")] {
        let numbers = vec!["-1"; 300].join(separator);
        let document = with_aggregate("{ rows }", &format!("__typename(pad: [{numbers}])"));
        let answer = env.gateway().graphql(&document).await;
        assert_eq!(codes(&answer), ["QUERY_TOO_COMPLEX"], "{what}: {answer}");
        assert!(
            answer["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("tokens")),
            "{what}: {answer}"
        );
        assert_eq!(env.sim.stats().queries, 0, "{what}");
    }
}
