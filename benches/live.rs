//! Live panels: many idle subscriptions on running gateways, their memory,
//! the fan-out latency of a change, and BI queries per interval.
//!
//! `cargo bench --bench live -- --urls http://127.0.0.1:4000 --sim http://127.0.0.1:4100 \
//!   --pid 1234 --subscriptions 10000 --keys 50 --rounds 5 --interval 10`
//! (`scripts/bench`'s `live` section runs it with the right set-ups.)
//!
//! Subscriptions are spread over the gateways and over `--keys` panels
//! (customers `bench-live-0` ...), `--per-connection` on each WebSocket.
//! Once every subscription had its first event, it prints the gateway's RSS
//! per subscription (`--pid`: the first gateway's process, alone in front of
//! all subscriptions), then moves bi-sim's data `--rounds` times and prints,
//! per change, the latency from each entry's `producedAt` (its rows in the
//! producer's hands, just before the cache write) to each subscriber's
//! receipt, and the BI queries bi-sim received per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const LIVE_QUERY: &str = "subscription LivePanel($input: AggregateInput!, $everySeconds: Int) { aggregateLive(input: $input, everySeconds: $everySeconds) { rows cache { status producedAt } } }";

struct Args {
    urls: Vec<String>,
    sim: String,
    pid: Option<u32>,
    subscriptions: usize,
    keys: usize,
    per_connection: usize,
    rounds: usize,
    interval: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        urls: vec!["http://127.0.0.1:4000".into()],
        sim: "http://127.0.0.1:4100".into(),
        pid: None,
        subscriptions: 10_000,
        keys: 50,
        per_connection: 100,
        rounds: 5,
        interval: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match flag.as_str() {
            "--urls" => args.urls = value().split(',').map(str::to_owned).collect(),
            "--sim" => args.sim = value(),
            "--pid" => args.pid = value().parse().ok(),
            "--subscriptions" => args.subscriptions = value().parse().unwrap_or(10_000),
            "--keys" => args.keys = value().parse().unwrap_or(50),
            "--per-connection" => args.per_connection = value().parse().unwrap_or(100),
            "--rounds" => args.rounds = value().parse().unwrap_or(5),
            "--interval" => args.interval = value().parse().unwrap_or(10),
            // `cargo bench` passes `--bench`; ignore what we do not know.
            _ => {}
        }
    }
    args
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// A small panel (totals by region: three rows), so that the figures show
/// the fan-out rather than serialising big answers.
fn panel(key: usize) -> Value {
    json!({
        "customer": format!("bench-live-{key}"),
        "dateRange": {"from": "2025-01-01", "to": "2025-01-31"},
        "measures": ["Sales.revenue", "Sales.orders"],
        "dimensions": ["Sales.region"],
    })
}

/// One event as received: the subscription, its `producedAt` (ms) and when
/// it arrived (ms).
type Event = (String, i64, i64);

async fn open(
    url: &str,
    subscriptions: &[(String, Value)],
    interval: u64,
    events: Arc<Mutex<Vec<Event>>>,
) {
    let ws_url = url.replacen("http://", "ws://", 1) + "/graphql";
    let mut request = ws_url.into_client_request().expect("a WebSocket request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().expect("a header value"),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the WebSocket upgrade");
    let (mut sink, mut stream) = socket.split();
    sink.send(Message::text(
        json!({"type": "connection_init", "payload": {}}).to_string(),
    ))
    .await
    .expect("connection_init is sent");
    for (id, input) in subscriptions {
        let message = json!({
            "id": id,
            "type": "subscribe",
            "payload": {"query": LIVE_QUERY, "variables": {"input": input, "everySeconds": interval}},
        });
        sink.send(Message::text(message.to_string()))
            .await
            .expect("subscribe is sent");
    }
    tokio::spawn(async move {
        let _sink = sink;
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let at = unix_millis();
            let Ok(message) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if message["type"] != "next" {
                continue;
            }
            let produced = message["payload"]["data"]["aggregateLive"]["cache"]["producedAt"]
                .as_str()
                .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
                .map(|at| at.timestamp_millis())
                .unwrap_or(0);
            let id = message["id"].as_str().unwrap_or_default().to_owned();
            events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, produced, at));
        }
    });
}

async fn sim_queries(http: &reqwest::Client, sim: &str) -> u64 {
    http.get(format!("{sim}/_sim/stats"))
        .send()
        .await
        .expect("bi-sim answers")
        .json::<Value>()
        .await
        .expect("stats are JSON")["queries"]
        .as_u64()
        .unwrap_or(0)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let http = reqwest::Client::new();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let rss_before = args.pid.map(rss_kib);
    let started = Instant::now();
    let connections = args.subscriptions.div_ceil(args.per_connection.max(1));
    for c in 0..connections {
        let url = &args.urls[c % args.urls.len()];
        let subscriptions: Vec<(String, Value)> = (0..args.per_connection)
            .map(|s| c * args.per_connection + s)
            .take_while(|n| *n < args.subscriptions)
            .map(|n| (format!("s{n}"), panel(n % args.keys)))
            .collect();
        open(url, &subscriptions, args.interval, Arc::clone(&events)).await;
    }
    let count_first = || {
        let events = events.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids: HashMap<&str, ()> = HashMap::new();
        for (id, _, _) in events.iter() {
            ids.insert(id.as_str(), ());
        }
        ids.len()
    };
    while count_first() < args.subscriptions {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of {} subscriptions had their first event within 120 s",
            count_first(),
            args.subscriptions
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "live: {} subscriptions over {} keys on {} connections and {} instance(s): all first events in {:.2} s",
        args.subscriptions,
        args.keys,
        connections,
        args.urls.len(),
        started.elapsed().as_secs_f64()
    );
    if let (Some(pid), Some(before)) = (args.pid, rss_before) {
        // Let allocations settle before reading the RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid);
        println!(
            "live: gateway RSS {:.1} MB before, {:.1} MB with the subscriptions: {:.1} KB per subscription",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            (after.saturating_sub(before)) as f64 * 1.024 / args.subscriptions as f64
        );
    }

    let mut all = Vec::new();
    let mut per_interval = Vec::new();
    for round in 1..=args.rounds {
        let queries_before = sim_queries(&http, &args.sim).await;
        let mark = events.lock().unwrap_or_else(|p| p.into_inner()).len();
        http.post(format!("{}/_sim/data-version", args.sim))
            .json(&json!({"version": 1_000 + round as u64}))
            .send()
            .await
            .expect("bi-sim takes the data version");
        let changed = Instant::now();
        // Every subscription gets the change within an interval and a margin.
        let window = Duration::from_secs(args.interval) + Duration::from_secs(3);
        loop {
            let got = events.lock().unwrap_or_else(|p| p.into_inner()).len() - mark;
            if got >= args.subscriptions || changed.elapsed() > window {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // One whole interval after the change, counted from the first refresh.
        tokio::time::sleep(Duration::from_secs(args.interval).saturating_sub(changed.elapsed()))
            .await;
        let queries = sim_queries(&http, &args.sim).await - queries_before;
        per_interval.push(queries);
        let events = events.lock().unwrap_or_else(|p| p.into_inner());
        let mut latencies: Vec<i64> = events[mark..].iter().map(|(_, p, at)| at - p).collect();
        latencies.sort_unstable();
        println!(
            "live: change {round}: {} of {} subscribers got it; producedAt to receipt p50 {} ms, p99 {} ms, last {} ms; BI queries in the interval: {queries}",
            latencies.len(),
            args.subscriptions,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or(0),
        );
        all.extend(latencies);
    }
    all.sort_unstable();
    println!(
        "live: over {} changes: p50 {} ms, p99 {} ms, max {} ms; BI queries per interval: {per_interval:?} (keys: {})",
        args.rounds,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(0),
        args.keys
    );
}
