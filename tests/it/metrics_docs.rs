//! The metrics table of `src/telemetry.rs` is what `/metrics` serves from the
//! start, what the README documents and what the Grafana dashboard reads.

use std::collections::BTreeSet;
use std::path::Path;

use analytics_gateway::telemetry::{METRICS, MetricKind, metrics_markdown, names};
use serde_json::Value;

use crate::common::{TestEnv, TestOptions, metric};

/// Right after start, before any GraphQL request, `/metrics` has every
/// counter of the table at 0 for every one of its documented label values,
/// with its `# HELP` and `# TYPE`: a dashboard's `rate()` sees the first increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_counter_is_at_zero_before_any_request() {
    let env = TestEnv::start(TestOptions::default()).await;
    let text = env
        .gateway()
        .get("/metrics")
        .await
        .text()
        .await
        .expect("a text body");
    for info in METRICS.iter().filter(|m| m.kind == MetricKind::Counter) {
        assert!(
            text.contains(&format!("# TYPE {} counter", info.name))
                && text.contains(&format!("# HELP {} {}", info.name, info.help)),
            "{} is not described:\n{text}",
            info.name
        );
        for labels in info.label_sets() {
            assert_eq!(
                metric(&text, info.name, &labels),
                Some(0.0),
                "{} {labels:?} is not at 0:\n{text}",
                info.name
            );
        }
    }
    assert_eq!(env.sim.stats().queries, 0);
}

/// The README's metrics table is the one generated from the code's table.
/// `UPDATE_README=1` rewrites it instead of failing.
#[test]
fn the_readme_lists_the_metrics_table() {
    const BEGIN: &str = "<!-- metrics:begin -->\n";
    const END: &str = "<!-- metrics:end -->";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md is readable");
    let start = readme
        .find(BEGIN)
        .expect("README.md has a metrics:begin marker")
        + BEGIN.len();
    let end = readme
        .find(END)
        .expect("README.md has a metrics:end marker");
    let generated = metrics_markdown();
    if readme[start..end] == generated {
        return;
    }
    if std::env::var("UPDATE_README").is_ok_and(|v| v == "1") {
        let updated = format!("{}{generated}{}", &readme[..start], &readme[end..]);
        std::fs::write(&path, updated).expect("README.md is writable");
        eprintln!("note: rewrote the metrics table of {}", path.display());
        return;
    }
    panic!(
        "README.md's metrics table differs from src/telemetry.rs's; refresh it with\n\
         \n    UPDATE_README=1 cargo nextest run --test it metrics_docs\n"
    );
}

/// The Grafana dashboard reads only metrics of the table (with the
/// `_bucket`/`_sum`/`_count` series of its histograms), under their
/// prefixed names, and shows the BI's and Redis's state.
#[test]
fn the_dashboard_reads_documented_metrics_only() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("observability/grafana/dashboards/analytics-gateway.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard is readable"))
            .expect("the dashboard is JSON");
    let mut expressions = Vec::new();
    collect_expressions(&dashboard, &mut expressions);
    assert!(!expressions.is_empty(), "no `expr` in the dashboard");

    let mut read = BTreeSet::new();
    for expr in &expressions {
        for name in metric_names(expr) {
            let known = METRICS.iter().find(|m| {
                m.name == name
                    || (m.kind == MetricKind::Histogram
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suffix| name == format!("{}{suffix}", m.name)))
            });
            let Some(known) = known else {
                panic!("the dashboard reads `{name}`, which is not in the metrics table: {expr}");
            };
            read.insert(known.name);
        }
    }
    for wanted in [
        names::BI_HTTP_REQUESTS,
        names::CACHE_LOOKUPS,
        names::REDIS_UP,
        names::BI_UP,
    ] {
        assert!(
            read.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
}

/// Every `expr` string of a Grafana dashboard.
fn collect_expressions(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => found.push(expr.clone()),
                    _ => collect_expressions(value, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_expressions(v, found)),
        _ => {}
    }
}

/// The metric names a PromQL expression reads: identifiers that are not
/// functions (followed by `(`), keywords, label names in `{...}` or
/// `by (...)`, or durations in `[...]`.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
    ];
    // Aggregation operators, which may put `by (...)` before their `(`.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    let mut names = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    // Depth inside `{}` and `[]`, where identifiers are labels and durations.
    let mut inside = 0usize;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' | '[' => inside += 1,
            '}' | ']' => inside = inside.saturating_sub(1),
            '"' => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if KEYWORDS.contains(&word.as_str()) {
                    // `by (a, b)`, `ignoring(a)`: label names, up to the `)`.
                    if next == Some(&'(') {
                        while i < chars.len() && chars[i] != ')' {
                            i += 1;
                        }
                    }
                } else if inside == 0
                    && next != Some(&'(')
                    && !AGGREGATIONS.contains(&word.as_str())
                {
                    names.push(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// The PromQL reader finds metric names and nothing else.
#[test]
fn the_promql_reader_finds_metric_names() {
    assert_eq!(
        metric_names(
            "sum by (status) (rate(a_total{status!=\"x\"}[5m])) / ignoring(status) group_left sum(rate(a_total[5m]))"
        ),
        ["a_total", "a_total"]
    );
    assert_eq!(
        metric_names("histogram_quantile(0.99, sum by (le) (rate(h_seconds_bucket[5m])))"),
        ["h_seconds_bucket"]
    );
    assert_eq!(metric_names("up_gauge"), ["up_gauge"]);
}
