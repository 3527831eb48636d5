//! Traces as an operator reads them in Jaeger: exported over OTLP (gRPC and
//! HTTP/protobuf) to a receiver inside the test, one `bi.call` per BI
//! request joined to the BI by `traceparent`, and every request that did not
//! pay for its rows linked to the `bi.call` that did.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::common::{
    Gateway, Statuses, TestEnv, TestOptions, closed_port, error_code, expected_rows, input,
    statuses, within,
};
use crate::otlp::{OtlpReceiver, ReceivedSpan, SilentCollector};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// A customer id that must not leak into spans: distinctive, so that any
/// occurrence in any exported text is found.
const CUSTOMER: &str = "cust-7f3a91";
const MEASURES: &[&str] = &["Sales.revenue", "Sales.orders"];
const DIMENSIONS: &[&str] = &["Sales.region"];
const FROM: &str = "2025-02-01";
const TO: &str = "2025-02-28";

/// The contract's `Panel` document, also asking which instance and trace
/// produced the rows.
const TRACED_PANEL: &str = "query Panel($input: AggregateInput!) { aggregate(input: $input) { rows cache { status key producedBy traceId } } }";

/// Longest a gateway may take to flush its spans and exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest spans may take to reach the receiver once the gateways are gone
/// (they are flushed before exit, so this is slack, not a schedule).
const SPANS_TIMEOUT: Duration = Duration::from_secs(10);

/// The panel request of this test module for `customer`, and its rows.
fn question(customer: &str) -> (Value, Value) {
    let body = json!({
        "query": TRACED_PANEL,
        "operationName": "Panel",
        "variables": {"input": input(customer, FROM, TO, MEASURES, DIMENSIONS, Some("DAY"))},
    });
    let rows = expected_rows(customer, FROM, TO, MEASURES, DIMENSIONS, Some("DAY"));
    assert!(rows.as_array().is_some_and(|rows| !rows.is_empty()));
    (body, rows)
}

/// Gateways exporting spans to `receiver` over `protocol`.
fn exporting_to(options: TestOptions, receiver: &OtlpReceiver, protocol: &str) -> TestOptions {
    options
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
}

/// SIGTERM to every gateway, then waits until each has exited with status 0:
/// a graceful stop, which flushes the spans still queued.
async fn stop_gracefully(gateways: &mut [Gateway]) {
    for gateway in gateways.iter() {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &gateway.pid().to_string()])
            .status()
            .expect("`kill` runs");
        assert!(status.success(), "kill -TERM {}", gateway.pid());
    }
    for gateway in gateways.iter_mut() {
        let exit = gateway.wait_for_exit(EXIT_TIMEOUT).await;
        assert!(
            exit.success(),
            "exit status {exit:?}; output:\n{}",
            gateway.output()
        );
    }
}

/// The server spans of GraphQL requests: one per request. (Exported under
/// the operation's name, like `query Panel`, so they are found by kind
/// and operation attribute rather than by name.)
fn request_spans(spans: &[ReceivedSpan]) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.kind() == SpanKind::Server && s.attribute("graphql.operation.name").is_some())
        .collect()
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.name() == name).collect()
}

/// Every span, one per line, for failure messages.
fn dump(spans: &[ReceivedSpan]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for span in spans {
        *counts.entry(span.name()).or_default() += 1;
    }
    let mut text = format!("{} spans received, by name: {counts:?}\n", spans.len());
    for span in spans.iter().take(200) {
        text.push_str(&span.describe());
        text.push('\n');
    }
    text
}

/// `(trace id, span id)` of a W3C `traceparent` (`00-<trace>-<span>-<flags>`).
fn parse_traceparent(header: &str) -> (String, String) {
    let parts: Vec<&str> = header.split('-').collect();
    match parts.as_slice() {
        ["00", trace, span, flags] if trace.len() == 32 && span.len() == 16 && flags.len() == 2 => {
            ((*trace).to_owned(), (*span).to_owned())
        }
        _ => panic!("not a W3C traceparent: {header:?}"),
    }
}

/// The names from `span` up to its trace's root, following parent ids:
/// the chain an operator expands in Jaeger.
fn ancestry<'a>(span: &'a ReceivedSpan, spans: &'a [ReceivedSpan]) -> Vec<&'a ReceivedSpan> {
    let by_id: HashMap<(String, String), &ReceivedSpan> = spans
        .iter()
        .map(|s| ((s.trace_id(), s.span_id()), s))
        .collect();
    let mut chain = vec![span];
    let mut current = span;
    while !current.parent_span_id().is_empty() && chain.len() < 64 {
        match by_id.get(&(current.trace_id(), current.parent_span_id())) {
            Some(parent) => {
                chain.push(parent);
                current = parent;
            }
            None => break,
        }
    }
    chain
}

/// No exported text (names, attributes, events, links, resources) holds the
/// customer id: by default it is personal data that stays out of traces.
fn assert_no_customer_ids(spans: &[ReceivedSpan]) {
    for span in spans {
        assert!(
            !span.all_text().iter().any(|text| text.contains(CUSTOMER)),
            "a span carries the customer id {CUSTOMER:?} without TRACE_CUSTOMER_IDS: {}",
            span.describe()
        );
    }
}

/// The one `bi.call` span, with the attributes of an HTTP client span and of
/// the BI query (`bi.query_count`, `bi.members`, `bi.date_ranges`).
fn assert_one_bi_call<'a>(spans: &'a [ReceivedSpan], sim_base_url: &str) -> &'a ReceivedSpan {
    let calls = named(spans, "bi.call");
    assert_eq!(
        calls.len(),
        1,
        "one BI request, one bi.call:\n{}",
        dump(spans)
    );
    let call = calls[0];
    let context = call.describe();
    assert_eq!(call.kind(), SpanKind::Client, "{context}");
    assert_eq!(
        call.text("http.request.method").as_deref(),
        Some("POST"),
        "{context}"
    );
    assert_eq!(
        call.text("url.full"),
        Some(format!("{sim_base_url}/load")),
        "{context}"
    );
    // Compared as text here; their types are the business of
    // `bi_call_attributes_have_their_semantic_convention_types`.
    assert_eq!(
        call.text("http.response.status_code").as_deref(),
        Some("200"),
        "{context}"
    );
    assert_eq!(
        call.text("bi.query_count").as_deref(),
        Some("1"),
        "{context}"
    );
    let members = call.text("bi.members").unwrap_or_default();
    for member in MEASURES.iter().chain(DIMENSIONS) {
        assert!(
            members.contains(member),
            "bi.members lacks {member}: {context}"
        );
    }
    let ranges = call.text("bi.date_ranges").unwrap_or_default();
    assert!(
        ranges.contains(FROM) && ranges.contains(TO),
        "bi.date_ranges names {FROM}..{TO}: {context}"
    );
    assert!(call.attribute("error.type").is_none(), "{context}");
    call
}

/// The producing `bi.call`'s trace id and span id equal the `traceparent`
/// that the BI received: the BI's own trace joins the gateway's.
fn assert_bi_received(call: &ReceivedSpan, traceparent: Option<&str>) {
    let traceparent = traceparent.expect("the BI received a traceparent header");
    let (trace_id, span_id) = parse_traceparent(traceparent);
    assert_eq!(
        (trace_id, span_id),
        (call.trace_id(), call.span_id()),
        "the traceparent the BI received ({traceparent}) names the bi.call span: {}",
        call.describe()
    );
}

/// A stampede of 60 identical requests over three instances sharing Redis,
/// exported over OTLP/gRPC, shows in the traces as exactly one `bi.call`
/// (HTTP client attributes, query count, members, date ranges) whose trace
/// and span ids are the `traceparent` bi-sim received; it descends from the
/// MISS request's span; every COALESCED request's span links to it; each
/// span names its service and instance; and no span carries the customer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stampede_over_three_instances_exports_one_bi_call_that_every_request_links_to() {
    const N: usize = 60;
    let receiver = OtlpReceiver::grpc().await;
    let mut env = TestEnv::start(exporting_to(
        TestOptions::default()
            .redis()
            .instances(3)
            .latency_ms(1_000),
        &receiver,
        "grpc",
    ))
    .await;
    let (body, expected) = question(CUSTOMER);

    let answers = env.fire(N, &body).await;

    assert_eq!(
        statuses(&answers, &expected),
        Statuses {
            miss: 1,
            coalesced: N - 1,
            hit: 0
        }
    );
    let stats = env.sim.stats();
    assert_eq!((stats.http_requests, stats.queries), (1, 1), "{stats:?}");
    let sim_base_url = env.sim.base_url();
    stop_gracefully(&mut env.gateways).await;
    let spans = receiver
        .spans_when(SPANS_TIMEOUT, |spans| {
            !named(spans, "bi.call").is_empty() && request_spans(spans).len() >= N
        })
        .await;
    assert!(receiver.problems().is_empty(), "{:?}", receiver.problems());

    let call = assert_one_bi_call(&spans, &sim_base_url);
    assert_bi_received(call, stats.last_traceparent.as_deref());

    // Every answer names the trace of the call that produced it, and the
    // instance whose call it was.
    for answer in &answers {
        let cache = &answer["data"]["aggregate"]["cache"];
        assert_eq!(cache["traceId"], call.trace_id(), "{answer}");
        assert_eq!(
            cache["producedBy"].as_str(),
            call.resource.get("service.instance.id").map(String::as_str),
            "{answer}"
        );
    }

    // One server span per request, 20 on each instance (round-robin).
    let requests = request_spans(&spans);
    assert_eq!(requests.len(), N, "{}", dump(&spans));
    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    for span in &spans {
        assert_eq!(
            span.resource.get("service.name").map(String::as_str),
            Some("analytics-gateway"),
            "{}",
            span.describe()
        );
        let instance = span
            .resource
            .get("service.instance.id")
            .unwrap_or_else(|| panic!("no service.instance.id: {}", span.describe()));
        assert!(
            env.gateways.iter().any(|g| g.instance_id() == instance),
            "{instance} is none of this test's instances: {}",
            span.describe()
        );
    }
    for span in &requests {
        *per_instance
            .entry(span.resource["service.instance.id"].clone())
            .or_default() += 1;
    }
    let even: BTreeMap<String, usize> = env
        .gateways
        .iter()
        .map(|g| (g.instance_id().to_owned(), N / env.gateways.len()))
        .collect();
    assert_eq!(per_instance, even, "request spans by instance");

    // The MISS is the one request in the bi.call's trace, and the bi.call
    // descends from it; every other request links to the bi.call.
    let (miss, others): (Vec<&ReceivedSpan>, Vec<&ReceivedSpan>) = requests
        .iter()
        .partition(|span| span.trace_id() == call.trace_id());
    assert_eq!(miss.len(), 1, "{}", dump(&spans));
    let chain = ancestry(call, &spans);
    let root = chain.last().expect("a chain has its start");
    assert_eq!(
        (root.trace_id(), root.span_id()),
        (miss[0].trace_id(), miss[0].span_id()),
        "bi.call descends from the MISS request's span; the chain: {:?}\n{}",
        chain.iter().map(|s| s.name()).collect::<Vec<_>>(),
        dump(&spans)
    );
    assert_eq!(
        call.resource.get("service.instance.id"),
        miss[0].resource.get("service.instance.id"),
        "the bi.call runs on the MISS request's instance"
    );
    let wanted = (call.trace_id(), call.span_id());
    for span in &others {
        assert!(
            span.links().contains(&wanted),
            "a COALESCED request's span links to the bi.call {wanted:?}: {}",
            span.describe()
        );
    }

    assert_no_customer_ids(&spans);
}

/// Over OTLP/HTTP (protobuf to `<endpoint>/v1/traces`), a single instance
/// without Redis exports a MISS whose trace holds the `bi.call`, and a HIT
/// whose span, in a trace of its own, links to that `bi.call`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_otlp_http_a_hit_links_to_the_bi_call_that_produced_it() {
    let receiver = OtlpReceiver::http().await;
    let mut env = TestEnv::start(exporting_to(
        TestOptions::default().instances(1),
        &receiver,
        "http/protobuf",
    ))
    .await;
    let (body, expected) = question(CUSTOMER);

    let miss = env.gateway().graphql(&body).await;
    let hit = env.gateway().graphql(&body).await;
    let (miss_counted, hit_counted) = (
        statuses(std::slice::from_ref(&miss), &expected),
        statuses(std::slice::from_ref(&hit), &expected),
    );
    assert_eq!(
        (miss_counted.miss, hit_counted.hit),
        (1, 1),
        "{miss}\n{hit}"
    );
    let stats = env.sim.stats();
    assert_eq!(stats.http_requests, 1, "{stats:?}");
    let sim_base_url = env.sim.base_url();
    stop_gracefully(&mut env.gateways).await;
    let spans = receiver
        .spans_when(SPANS_TIMEOUT, |spans| {
            !named(spans, "bi.call").is_empty() && request_spans(spans).len() >= 2
        })
        .await;
    assert!(receiver.problems().is_empty(), "{:?}", receiver.problems());

    let call = assert_one_bi_call(&spans, &sim_base_url);
    assert_bi_received(call, stats.last_traceparent.as_deref());
    assert_eq!(
        hit["data"]["aggregate"]["cache"]["traceId"],
        call.trace_id()
    );
    let requests = request_spans(&spans);
    assert_eq!(requests.len(), 2, "{}", dump(&spans));
    let (in_call_trace, elsewhere): (Vec<&ReceivedSpan>, Vec<&ReceivedSpan>) = requests
        .iter()
        .partition(|span| span.trace_id() == call.trace_id());
    assert_eq!(
        (in_call_trace.len(), elsewhere.len()),
        (1, 1),
        "{}",
        dump(&spans)
    );
    assert!(
        elsewhere[0]
            .links()
            .contains(&(call.trace_id(), call.span_id())),
        "the HIT's span links to the bi.call: {}\n{}",
        elsewhere[0].describe(),
        call.describe()
    );
    for span in &spans {
        assert_eq!(
            span.resource.get("service.name").map(String::as_str),
            Some("analytics-gateway"),
            "{}",
            span.describe()
        );
        assert_eq!(
            span.resource.get("service.instance.id").map(String::as_str),
            Some(env.gateway().instance_id()),
            "{}",
            span.describe()
        );
    }
    assert_no_customer_ids(&spans);
}

/// A request carrying `traceparent: 00-<trace>-<span>-01` is served in that
/// trace: its server span has that trace id and that parent span id, and the
/// BI receives a `traceparent` of the same trace, naming the `bi.call` span.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incoming_traceparent_is_continued_down_to_the_bi() {
    let receiver = OtlpReceiver::grpc().await;
    let mut env = TestEnv::start(exporting_to(TestOptions::default(), &receiver, "grpc")).await;
    let (body, expected) = question("traceparent");
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let parent_id = format!("{:016x}", fastrand::u64(1..));
    let traceparent = format!("00-{trace_id}-{parent_id}-01");

    let request = reqwest::Client::new()
        .post(format!("{}/graphql", env.gateway().url()))
        .header("traceparent", &traceparent)
        .json(&body)
        .send();
    let answer: Value = within(Duration::from_secs(60), "POST /graphql", async {
        request
            .await
            .expect("the gateway answers")
            .json()
            .await
            .expect("a JSON answer")
    })
    .await;
    assert_eq!(
        statuses(std::slice::from_ref(&answer), &expected).miss,
        1,
        "{answer}"
    );
    assert_eq!(answer["data"]["aggregate"]["cache"]["traceId"], trace_id);

    let received = env.sim.stats().last_traceparent;
    let (bi_trace_id, bi_span_id) = parse_traceparent(
        received
            .as_deref()
            .expect("the BI received a traceparent header"),
    );
    assert_eq!(bi_trace_id, trace_id, "{received:?}");
    assert_ne!(bi_span_id, parent_id, "the BI's parent is the bi.call span");

    stop_gracefully(&mut env.gateways).await;
    let spans = receiver
        .spans_when(SPANS_TIMEOUT, |spans| {
            !named(spans, "bi.call").is_empty() && !request_spans(spans).is_empty()
        })
        .await;
    let requests = request_spans(&spans);
    assert_eq!(requests.len(), 1, "{}", dump(&spans));
    assert_eq!(
        (requests[0].trace_id(), requests[0].parent_span_id()),
        (trace_id.clone(), parent_id.clone()),
        "the request's span continues the incoming trace: {}",
        requests[0].describe()
    );
    let call = assert_one_bi_call(&spans, &env.sim.base_url());
    assert_eq!(
        (call.trace_id(), call.span_id()),
        (bi_trace_id, bi_span_id),
        "{}",
        call.describe()
    );
}

/// The `bi.call` span is an HTTP client span by the OpenTelemetry semantic
/// conventions: `http.response.status_code` is an integer, and the required
/// `server.address` and `server.port` (an integer) name the BI; the BI's own
/// counts (`bi.query_count`, `bi.response_bytes`) are integers as well, so
/// trace queries compare them as numbers, not as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bi_call_attributes_have_their_semantic_convention_types() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Attribute;

    let receiver = OtlpReceiver::grpc().await;
    let mut env = TestEnv::start(exporting_to(TestOptions::default(), &receiver, "grpc")).await;
    let (body, expected) = question("semconv");

    let answer = env.gateway().graphql(&body).await;
    assert_eq!(
        statuses(std::slice::from_ref(&answer), &expected).miss,
        1,
        "{answer}"
    );
    let sim_url = reqwest::Url::parse(&env.sim.base_url()).expect("bi-sim's URL parses");
    stop_gracefully(&mut env.gateways).await;
    let spans = receiver
        .spans_when(SPANS_TIMEOUT, |spans| !named(spans, "bi.call").is_empty())
        .await;
    let call = assert_one_bi_call(&spans, &env.sim.base_url());

    let port = i64::from(sim_url.port().expect("bi-sim's URL has a port"));
    let host = sim_url
        .host_str()
        .expect("bi-sim's URL has a host")
        .to_owned();
    let exact = [
        ("http.response.status_code", Attribute::IntValue(200)),
        ("server.address", Attribute::StringValue(host)),
        ("server.port", Attribute::IntValue(port)),
        ("bi.query_count", Attribute::IntValue(1)),
    ];
    let mut problems: Vec<String> = exact
        .iter()
        .filter_map(|(key, wanted)| match call.attribute(key) {
            Some(value) if value == wanted => None,
            Some(value) => Some(format!("{key} is {value:?}, not {wanted:?}")),
            None => Some(format!("{key} is missing (wanted {wanted:?})")),
        })
        .collect();
    match call.attribute("bi.response_bytes") {
        Some(Attribute::IntValue(bytes)) if *bytes > 0 => {}
        other => problems.push(format!(
            "bi.response_bytes is {other:?}, not Some(IntValue(> 0))"
        )),
    }
    assert!(
        problems.is_empty(),
        "bi.call attributes:\n  {}\n{}",
        problems.join("\n  "),
        call.describe()
    );
}

/// Every HTTP request to the BI is a `bi.call` of its own: two "Continue
/// wait" answers and the data make three sibling spans (`bi.round` 1, 2, 3),
/// and a later HIT links to the round that brought the data; a BI that
/// fails with HTTP 500 leaves a `bi.call` with that status code, an
/// `error.type` and the span status Error, as HTTP client spans report
/// failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continue_wait_rounds_and_failures_are_bi_calls_of_their_own() {
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

    let receiver = OtlpReceiver::grpc().await;
    let mut env = TestEnv::start(exporting_to(
        TestOptions::default().latency_ms(100),
        &receiver,
        "grpc",
    ))
    .await;
    let (waited, waited_rows) = question("continue-wait");
    let (failed, _) = question("bi-failure");

    env.sim.faults(json!({"continueWait": 2})).await;
    let answer = env.gateway().graphql(&waited).await;
    assert_eq!(
        statuses(std::slice::from_ref(&answer), &waited_rows).miss,
        1,
        "{answer}"
    );
    let hit = env.gateway().graphql(&waited).await;
    assert_eq!(
        statuses(std::slice::from_ref(&hit), &waited_rows).hit,
        1,
        "{hit}"
    );
    env.sim
        .faults(json!({"failNext": {"count": 1, "status": 500}}))
        .await;
    let failure = env.gateway().graphql(&failed).await;
    assert_eq!(error_code(&failure), Some("BI_ERROR"), "{failure}");
    assert_eq!(env.sim.stats().http_requests, 4, "{:?}", env.sim.stats());

    stop_gracefully(&mut env.gateways).await;
    let spans = receiver
        .spans_when(SPANS_TIMEOUT, |spans| {
            named(spans, "bi.call").len() >= 4 && request_spans(spans).len() >= 3
        })
        .await;
    let calls = named(&spans, "bi.call");
    assert_eq!(calls.len(), 4, "{}", dump(&spans));

    let waited_trace = answer["data"]["aggregate"]["cache"]["traceId"]
        .as_str()
        .unwrap_or_else(|| panic!("the answer names its trace: {answer}"))
        .to_owned();
    let mut rounds: Vec<&ReceivedSpan> = calls
        .iter()
        .copied()
        .filter(|call| call.trace_id() == waited_trace)
        .collect();
    rounds.sort_by_key(|call| call.text("bi.round"));
    let described: Vec<String> = rounds.iter().map(|call| call.describe()).collect();
    let round_numbers: Vec<Option<String>> =
        rounds.iter().map(|call| call.text("bi.round")).collect();
    assert_eq!(
        round_numbers,
        [Some("1".into()), Some("2".into()), Some("3".into())],
        "{described:#?}"
    );
    assert!(
        rounds
            .iter()
            .all(|call| call.parent_span_id() == rounds[0].parent_span_id()
                && call.text("http.response.status_code").as_deref() == Some("200")
                && call.attribute("error.type").is_none()),
        "Continue-wait rounds are sibling, successful HTTP requests: {described:#?}"
    );
    let hit_span = request_spans(&spans)
        .into_iter()
        .find(|span| !span.links().is_empty() && span.trace_id() != waited_trace)
        .unwrap_or_else(|| panic!("the HIT's span links somewhere:\n{}", dump(&spans)));
    assert_eq!(
        hit_span.links(),
        [(waited_trace.clone(), rounds[2].span_id())],
        "the HIT links to the round that brought the data: {}",
        hit_span.describe()
    );

    let failed_call = calls
        .iter()
        .find(|call| call.trace_id() != waited_trace)
        .expect("the failed BI request's span");
    let context = failed_call.describe();
    assert_eq!(
        failed_call.text("http.response.status_code").as_deref(),
        Some("500"),
        "{context}"
    );
    assert!(failed_call.attribute("error.type").is_some(), "{context}");
    assert_eq!(
        failed_call.status(),
        StatusCode::Error,
        "a client span whose HTTP request failed has the status Error: {context}"
    );
}

/// With `TRACE_CUSTOMER_IDS=true` the request's span does carry the
/// customer id (the flag is what keeps it out by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn customer_ids_are_span_attributes_when_allowed() {
    let receiver = OtlpReceiver::grpc().await;
    let mut env = TestEnv::start(
        exporting_to(TestOptions::default(), &receiver, "grpc").env("TRACE_CUSTOMER_IDS", "true"),
    )
    .await;
    let (body, expected) = question(CUSTOMER);

    let answer = env.gateway().graphql(&body).await;
    assert_eq!(statuses(std::slice::from_ref(&answer), &expected).miss, 1);
    stop_gracefully(&mut env.gateways).await;
    let spans = receiver
        .spans_when(SPANS_TIMEOUT, |spans| !request_spans(spans).is_empty())
        .await;

    let requests = request_spans(&spans);
    assert_eq!(requests.len(), 1, "{}", dump(&spans));
    assert_eq!(
        requests[0].text("customer").as_deref(),
        Some(CUSTOMER),
        "{}",
        requests[0].describe()
    );
}

/// With the collector down (its port refuses connections) or silent (it
/// accepts connections and never answers), over either protocol, requests
/// still succeed with the right rows, 200 sequential cached requests finish
/// within a generous bound (a hang check, not a speed check), and SIGTERM
/// still ends the process in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_collector_that_is_down_or_silent_never_fails_or_stalls_requests() {
    let silent = SilentCollector::start().await;
    let refused = format!("http://127.0.0.1:{}", closed_port());
    let scenarios = [
        ("refused", refused.clone(), "grpc"),
        ("refused", refused, "http/protobuf"),
        ("silent", silent.endpoint(), "grpc"),
        ("silent", silent.endpoint(), "http/protobuf"),
    ];
    // Independent gateways: run at once, so the test takes as long as one.
    join_all(
        scenarios
            .iter()
            .enumerate()
            .map(|(i, (collector, endpoint, protocol))| async move {
                let what = format!("{collector} collector over {protocol}");
                let mut env = TestEnv::start(
                    TestOptions::default()
                        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
                        .env("OTEL_EXPORTER_OTLP_PROTOCOL", *protocol)
                        // Export every 100 ms (the SDK's standard variable), so
                        // that exports run, and hang, while requests are served.
                        .env("OTEL_BSP_SCHEDULE_DELAY", 100),
                )
                .await;
                let (body, expected) = question(&format!("collector-{i}"));
                requests_are_unaffected(&env, &body, &expected, &what).await;
                stop_gracefully(&mut env.gateways).await;
            }),
    )
    .await;
}

/// One MISS, then 200 sequential HITs within a generous bound, every one
/// with the BI's rows, from one BI query.
async fn requests_are_unaffected(env: &TestEnv, body: &Value, expected: &Value, what: &str) {
    const SEQUENTIAL: usize = 200;
    let first = env.gateway().graphql(body).await;
    assert_eq!(
        statuses(std::slice::from_ref(&first), expected).miss,
        1,
        "{what}: {first}"
    );
    let answers = within(
        Duration::from_secs(60),
        &format!("{SEQUENTIAL} sequential cached requests ({what})"),
        async {
            let mut answers = Vec::with_capacity(SEQUENTIAL);
            for _ in 0..SEQUENTIAL {
                answers.push(env.gateway().graphql(body).await);
            }
            answers
        },
    )
    .await;
    assert_eq!(
        statuses(&answers, expected),
        Statuses {
            miss: 0,
            coalesced: 0,
            hit: SEQUENTIAL
        },
        "{what}"
    );
    assert_eq!(env.sim.stats().queries, 1, "{what}");
}

/// With `OTEL_TRACES_SAMPLER=parentbased_traceidratio` and a ratio of 0,
/// requests answered from the cache are not traced, unless the caller's
/// `traceparent` is sampled; every request that needed the BI (the miss and
/// the coalesced ones of a cold stampede) still is, each coalesced one
/// linked to the one `bi.call`, and so are repeated POSTs answered from the
/// response cache only when their caller samples them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sampler_drops_only_requests_answered_from_the_cache() {
    let receiver = OtlpReceiver::grpc().await;
    let mut env = TestEnv::start(
        exporting_to(TestOptions::default().latency_ms(500), &receiver, "grpc")
            .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
            .env("OTEL_TRACES_SAMPLER_ARG", "0"),
    )
    .await;
    let (body, expected) = question("sampled");
    // A miss whose caller does not keep its trace: traced in a trace of its
    // own, linked to the caller's span.
    let (other, _) = question("sampled-elsewhere");
    let caller_trace = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = format!("{:016x}", fastrand::u64(1..));
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/graphql", env.gateway().url()))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-00"))
        .json(&other)
        .send()
        .await
        .expect("an answer")
        .json()
        .await
        .expect("JSON");
    assert_eq!(answer["data"]["aggregate"]["cache"]["status"], "MISS");
    let cold = env.fire(12, &body).await;
    let counted = statuses(&cold, &expected);
    assert_eq!((counted.miss, counted.coalesced), (1, 11), "{cold:?}");

    let hits = env.fire(30, &body).await;
    assert_eq!(statuses(&hits, &expected).hit, 30);
    let post_with = |traceparent: String| {
        let request = reqwest::Client::new()
            .post(format!("{}/graphql", env.gateway().url()))
            .header("traceparent", traceparent)
            .json(&body)
            .send();
        async move {
            let answer: Value = request
                .await
                .expect("an answer")
                .json()
                .await
                .expect("JSON");
            assert_eq!(answer["data"]["aggregate"]["cache"]["status"], "HIT");
        }
    };
    let sampled_trace = uuid::Uuid::new_v4().simple().to_string();
    let unsampled_trace = uuid::Uuid::new_v4().simple().to_string();
    for _ in 0..2 {
        post_with(format!("00-{sampled_trace}-{:016x}-01", fastrand::u64(1..))).await;
        post_with(format!(
            "00-{unsampled_trace}-{:016x}-00",
            fastrand::u64(1..)
        ))
        .await;
    }

    stop_gracefully(&mut env.gateways).await;
    let spans = receiver
        .spans_when(SPANS_TIMEOUT, |spans| request_spans(spans).len() >= 15)
        .await;
    let mut requests = request_spans(&spans);
    let elsewhere = requests
        .iter()
        .position(|s| {
            s.links()
                .contains(&(caller_trace.clone(), caller_span.clone()))
        })
        .unwrap_or_else(|| panic!("no request span links to the caller's: {}", dump(&spans)));
    let elsewhere = requests.remove(elsewhere);
    assert_ne!(elsewhere.trace_id(), caller_trace);
    assert!(
        elsewhere.parent_span_id().is_empty(),
        "{}",
        elsewhere.describe()
    );
    let calls = named(&spans, "bi.call");
    assert_eq!(calls.len(), 2, "{}", dump(&spans));
    assert!(
        calls.iter().any(|c| c.trace_id() == elsewhere.trace_id()),
        "the miss's bi.call is in its trace: {}",
        dump(&spans)
    );
    let call = calls
        .iter()
        .find(|c| c.trace_id() != elsewhere.trace_id())
        .expect("the stampede's bi.call");
    let in_trace = |trace: &str| requests.iter().filter(|s| s.trace_id() == trace).count();
    assert_eq!(in_trace(&sampled_trace), 2, "{}", dump(&spans));
    assert_eq!(in_trace(&unsampled_trace), 0, "{}", dump(&spans));
    assert_eq!(requests.len(), 12 + 2, "{}", dump(&spans));
    let linked = requests
        .iter()
        .filter(|s| s.links().contains(&(call.trace_id(), call.span_id())))
        .count();
    assert_eq!(linked, 11 + 2, "{}", dump(&spans));
}
