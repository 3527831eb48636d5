//! Cold-cache stampede: fires N identical `aggregate` requests at once, spread
//! over the given gateways, and prints how long everyone waited beyond the BI's
//! own latency and how soon each follower was answered after the leader's
//! cache write (client receive time minus the entry's `producedAt`).
//!
//! `cargo bench --bench stampede -- --urls http://127.0.0.1:4000 --n 200 --bi-latency-ms 2000`
//! (`scripts/bench` runs it with the right set-ups.)
//!
//! With `--dashboards 30`, it sends that many dashboards instead: documents
//! of 5 to 8 `aggregate` fields drawn from the same 8 panels in different
//! orders, and prints how long each dashboard took beyond the BI latency.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

struct Args {
    urls: Vec<String>,
    n: usize,
    bi_latency_ms: f64,
    customer: String,
    /// Ask for totals (one row) instead of the contract's 93-row panel, so
    /// that the figures show the wake-up rather than serialising 14 KB answers.
    small: bool,
    /// Send this many dashboards sharing 8 panels instead of one panel.
    dashboards: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        urls: vec!["http://127.0.0.1:4000".into()],
        n: 200,
        bi_latency_ms: 2000.0,
        customer: format!("bench-{}", unix_micros()),
        small: false,
        dashboards: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match flag.as_str() {
            "--urls" => args.urls = value().split(',').map(str::to_owned).collect(),
            "--n" => args.n = value().parse().unwrap_or(args.n),
            "--bi-latency-ms" => args.bi_latency_ms = value().parse().unwrap_or(2000.0),
            "--customer" => args.customer = value(),
            "--small" => args.small = true,
            "--dashboards" => args.dashboards = value().parse().unwrap_or(30),
            // `cargo bench` passes `--bench`; ignore what we do not know.
            _ => {}
        }
    }
    args
}

fn unix_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; test runners that list or run every
    // target (`cargo test --all-targets`, nextest) do not, and get nothing.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let args = parse_args();
    if args.dashboards > 0 {
        return dashboards(&args).await;
    }
    let input = if args.small {
        json!({"customer": args.customer,
               "dateRange": {"from": "2025-01-01", "to": "2025-01-31"},
               "measures": ["Sales.revenue"]})
    } else {
        json!({"customer": args.customer,
               "dateRange": {"from": "2025-01-01", "to": "2025-01-31"},
               "measures": ["Sales.revenue", "Sales.orders"],
               "dimensions": ["Sales.region"],
               "granularity": "DAY"})
    };
    let body = json!({
        "query": "query Panel($input: AggregateInput!) { aggregate(input: $input) { rows cache { status producedAt } } }",
        "variables": {"input": input}
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.n)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("an HTTP client");

    // Open the connections first, so the stampede measures the gateway, not TCP set-up.
    let warm: Vec<_> = (0..args.n)
        .map(|i| {
            let client = client.clone();
            let url = format!("{}/healthz", args.urls[i % args.urls.len()]);
            tokio::spawn(async move { client.get(url).send().await.map(|_| ()) })
        })
        .collect();
    for task in warm {
        let _ = task.await;
    }

    let started = Instant::now();
    let tasks: Vec<_> = (0..args.n)
        .map(|i| {
            let client = client.clone();
            let url = format!("{}/graphql", args.urls[i % args.urls.len()]);
            let body = body.clone();
            tokio::spawn(async move {
                let response = client.post(url).json(&body).send().await?;
                let value: Value = response.json().await?;
                Ok::<_, reqwest::Error>((value, unix_micros()))
            })
        })
        .collect();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut wake_ms = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok((value, received_us))) => {
                let cache = &value["data"]["aggregate"]["cache"];
                let status = cache["status"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| {
                        value["errors"][0]["extensions"]["code"]
                            .as_str()
                            .map(|c| format!("error {c}"))
                    })
                    .unwrap_or_else(|| "unreadable".into());
                if status == "COALESCED"
                    && let Some(produced) = cache["producedAt"]
                        .as_str()
                        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
                {
                    let produced_us = produced.timestamp_micros() as f64;
                    wake_ms.push((received_us as f64 - produced_us) / 1000.0);
                }
                *statuses.entry(status).or_default() += 1;
            }
            _ => *statuses.entry("transport error".into()).or_default() += 1,
        }
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    wake_ms.sort_by(f64::total_cmp);
    println!(
        "stampede: {} requests over {} instance(s), {} answers: {statuses:?}",
        args.n,
        args.urls.len(),
        if args.small {
            "1-row"
        } else {
            "93-row (14 KB)"
        }
    );
    println!(
        "stampede: all answered in {wall_ms:.0} ms; minus the BI's {:.0} ms: {:.0} ms",
        args.bi_latency_ms,
        wall_ms - args.bi_latency_ms
    );
    println!(
        "stampede: follower wake latency (answer received - leader's entry produced), ms: p50 {:.2} p99 {:.2} max {:.2} (producedAt has 1 ms resolution)",
        percentile(&wake_ms, 50.0),
        percentile(&wake_ms, 99.0),
        wake_ms.last().copied().unwrap_or(f64::NAN)
    );
}

/// The dashboard stampede: `args.dashboards` documents of 5 to 8 fields
/// drawn from 8 panels, all sent at once, round-robin over the instances.
async fn dashboards(args: &Args) {
    let customer = &args.customer;
    let panel = |from: &str,
                 to: &str,
                 measures: &[&str],
                 dimensions: &[&str],
                 granularity: Option<&str>| {
        let mut input = json!({"customer": customer, "dateRange": {"from": from, "to": to},
                               "measures": measures, "dimensions": dimensions});
        if let Some(granularity) = granularity {
            input["granularity"] = json!(granularity);
        }
        input
    };
    let panels = [
        panel(
            "2025-01-01",
            "2025-01-31",
            &["Sales.revenue", "Sales.orders"],
            &["Sales.region"],
            Some("DAY"),
        ),
        panel(
            "2025-01-01",
            "2025-01-31",
            &["Sales.revenue"],
            &["Sales.product"],
            Some("DAY"),
        ),
        panel(
            "2025-02-01",
            "2025-02-28",
            &["Sales.orders"],
            &[],
            Some("DAY"),
        ),
        panel(
            "2025-01-01",
            "2025-03-31",
            &["Sales.avgOrderValue"],
            &["Sales.region"],
            Some("WEEK"),
        ),
        panel(
            "2025-01-01",
            "2025-03-31",
            &["Sales.revenue"],
            &[],
            Some("WEEK"),
        ),
        panel(
            "2025-01-01",
            "2025-12-31",
            &["Sales.revenue", "Sales.orders"],
            &[],
            Some("MONTH"),
        ),
        panel(
            "2025-01-01",
            "2025-01-31",
            &["Sales.orders"],
            &["Sales.region"],
            None,
        ),
        panel("2025-01-01", "2025-12-31", &["Sales.revenue"], &[], None),
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    let bodies: Vec<Value> = (0..args.dashboards)
        .map(|_| {
            let mut order: Vec<usize> = (0..panels.len()).collect();
            rng.shuffle(&mut order);
            order.truncate(rng.usize(5..=8));
            let params: Vec<String> = (0..order.len()).map(|i| format!("$p{i}: AggregateInput!")).collect();
            let fields: Vec<String> = (0..order.len())
                .map(|i| format!("p{i}: aggregate(input: $p{i}) {{ rows cache {{ status }} }}"))
                .collect();
            let variables: serde_json::Map<String, Value> = order
                .iter()
                .enumerate()
                .map(|(i, &p)| (format!("p{i}"), panels[p].clone()))
                .collect();
            json!({"query": format!("query Dashboard({}) {{ {} }}", params.join(", "), fields.join(" ")),
                   "variables": variables})
        })
        .collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(bodies.len())
        .timeout(Duration::from_secs(120))
        .build()
        .expect("an HTTP client");
    let warm: Vec<_> = (0..bodies.len())
        .map(|i| {
            let client = client.clone();
            let url = format!("{}/healthz", args.urls[i % args.urls.len()]);
            tokio::spawn(async move { client.get(url).send().await.map(|_| ()) })
        })
        .collect();
    for task in warm {
        let _ = task.await;
    }
    let tasks: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let client = client.clone();
            let url = format!("{}/graphql", args.urls[i % args.urls.len()]);
            tokio::spawn(async move {
                let started = Instant::now();
                let value: Value = client.post(url).json(&body).send().await?.json().await?;
                Ok::<_, reqwest::Error>((value, started.elapsed()))
            })
        })
        .collect();
    let mut beyond_ms = Vec::new();
    let mut failed = 0;
    for task in tasks {
        match task.await {
            Ok(Ok((value, took))) if value.get("errors").is_none() => {
                beyond_ms.push(took.as_secs_f64() * 1000.0 - args.bi_latency_ms);
            }
            _ => failed += 1,
        }
    }
    beyond_ms.sort_by(f64::total_cmp);
    println!(
        "stampede: {} dashboards of 5-8 panels (8 distinct) over {} instance(s), {failed} failed; \
         dashboard latency minus the BI's {:.0} ms: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        args.dashboards,
        args.urls.len(),
        args.bi_latency_ms,
        percentile(&beyond_ms, 50.0),
        percentile(&beyond_ms, 99.0),
        beyond_ms.last().copied().unwrap_or(f64::NAN),
    );
}
