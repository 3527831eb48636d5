//! `/metrics` as Prometheus reads it: every family well formed and named by
//! the conventions (`_total` counters, base units, HELP and TYPE for each),
//! checked by `promtool check metrics` when it is installed and always by the
//! parser below. (The counts of a single-instance stampede are
//! `http::metrics_account_for_a_stampede`; the multi-instance sums are here.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use analytics_gateway::telemetry::{METRICS, names};

use crate::common::{Statuses, TestEnv, TestOptions, expected_rows, metric, panel, statuses};

/// Families that a stampede on instances sharing Redis must have produced on
/// at least one instance: without them the format check would prove little.
const EXPECTED_FAMILIES: &[&str] = &[
    names::BI_QUERIES,
    names::BI_HTTP_REQUESTS,
    names::BI_HTTP_DURATION,
    names::CACHE_LOOKUPS,
    names::COALESCE_WAIT,
    names::HTTP_DURATION,
    names::GRAPHQL_DURATION,
    names::REDIS_UP,
    names::LOCK_ATTEMPTS,
];

/// After a stampede of N identical requests over two instances sharing
/// Redis, the instances' `/metrics` add up to 1 BI query, 1 MISS and N-1
/// COALESCED, and every metric family of every instance passes the
/// exposition-format check (promtool when on PATH, the parser always).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_family_is_well_formed_after_a_stampede() {
    const N: usize = 30;
    let env = TestEnv::start(
        TestOptions::default()
            .redis()
            .instances(2)
            .latency_ms(1_000),
    )
    .await;
    let args = (
        "metrics-format",
        "2025-04-01",
        "2025-04-30",
        &["Sales.revenue"][..],
        &["Sales.product"][..],
        Some("WEEK"),
    );
    let body = panel(args.0, args.1, args.2, args.3, args.4, args.5);
    let expected = expected_rows(args.0, args.1, args.2, args.3, args.4, args.5);

    let answers = env.fire(N, &body).await;
    assert_eq!(
        statuses(&answers, &expected),
        Statuses {
            miss: 1,
            coalesced: N - 1,
            hit: 0
        }
    );
    // A hit on each instance, so that hit-path metrics exist too.
    for gateway in &env.gateways {
        let again = gateway.graphql(&body).await;
        assert_eq!(statuses(std::slice::from_ref(&again), &expected).hit, 1);
    }

    let mut texts = Vec::new();
    for gateway in &env.gateways {
        let response = gateway.get("/metrics").await;
        assert_eq!(response.status().as_u16(), 200);
        texts.push((
            gateway.instance_id().to_owned(),
            response.text().await.expect("a text body"),
        ));
    }

    let sum = |name: &str, labels: &[(&str, &str)]| -> f64 {
        texts
            .iter()
            .map(|(_, text)| metric(text, name, labels).unwrap_or(0.0))
            .sum()
    };
    let all = || {
        texts
            .iter()
            .map(|(id, text)| format!("--- {id}\n{text}"))
            .collect::<String>()
    };
    assert_eq!(
        sum(names::BI_QUERIES, &[("outcome", "ok")]),
        1.0,
        "{}",
        all()
    );
    assert_eq!(
        sum(names::CACHE_LOOKUPS, &[("status", "miss")]),
        1.0,
        "{}",
        all()
    );
    assert_eq!(
        sum(names::CACHE_LOOKUPS, &[("status", "coalesced")]),
        (N - 1) as f64,
        "{}",
        all()
    );
    assert_eq!(
        sum(names::CACHE_LOOKUPS, &[("status", "hit")]),
        env.gateways.len() as f64,
        "{}",
        all()
    );

    let mut families = BTreeSet::new();
    for (instance, text) in &texts {
        let problems = exposition_problems(text);
        assert!(
            problems.is_empty(),
            "{instance}'s /metrics breaks the exposition format or naming conventions:\n  {}\n{text}",
            problems.join("\n  ")
        );
        promtool_check(instance, text);
        let undocumented = undocumented_label_values(text);
        assert!(
            undocumented.is_empty(),
            "{instance}'s /metrics has label values the metrics table does not list: {undocumented:?}"
        );
        families.extend(declared_families(text));
    }
    for family in EXPECTED_FAMILIES {
        assert!(
            families.contains(*family),
            "no instance exposes {family}:\n{}",
            all()
        );
    }
}

/// The checker finds each kind of problem it exists for: it is not vacuous.
#[test]
fn the_exposition_checker_catches_what_it_checks() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n\n\
                # HELP h_seconds H.\n# TYPE h_seconds histogram\n\
                h_seconds_bucket{le=\"0.5\"} 1\nh_seconds_bucket{le=\"+Inf\"} 2\n\
                h_seconds_sum 0.7\nh_seconds_count 2\n\
                # HELP g G.\n# TYPE g gauge\ng -1.5e3\n";
    assert_eq!(exposition_problems(good), Vec::<String>::new());

    let bad: &[(&str, &str)] = &[
        ("# HELP a A.\n# TYPE a counter\na 1\n", "_total"),
        ("# TYPE a_total counter\na_total 1\n", "HELP"),
        ("# HELP a_total A.\na_total 1\n", "TYPE"),
        (
            "# HELP a_total A.\n# TYPE a_total counter\na_total one\n",
            "value",
        ),
        ("# HELP 1a A.\n# TYPE 1a gauge\n1a 1\n", "name"),
        (
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1} 1\n",
            "sample",
        ),
        (
            "# HELP d_ms D.\n# TYPE d_ms histogram\nd_ms_bucket{le=\"+Inf\"} 1\nd_ms_sum 1\nd_ms_count 1\n",
            "base unit",
        ),
        (
            "# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 1\nh_seconds_sum 1\nh_seconds_count 1\n",
            "+Inf",
        ),
        (
            "# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"+Inf\"} 1\nh_seconds_count 1\n",
            "_sum",
        ),
        (
            "# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"+Inf\"} 1\nh_seconds_sum 1\n",
            "_count",
        ),
        (
            "# HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 2\nh_seconds_bucket{le=\"+Inf\"} 1\nh_seconds_sum 1\nh_seconds_count 1\n",
            "cumulative",
        ),
        (
            "# HELP request_latency L.\n# TYPE request_latency gauge\nrequest_latency 1\n",
            "_seconds",
        ),
        (
            "# HELP a_total A.\n# TYPE a_total counter\na_total 1\na_total 2\n",
            "twice",
        ),
    ];
    for (text, wanted) in bad {
        let problems = exposition_problems(text);
        assert!(
            problems.iter().any(|p| p.contains(wanted)),
            "expected a problem mentioning {wanted:?} for:\n{text}\ngot {problems:?}"
        );
    }
}

/// `promtool check metrics` on `text`, when promtool is on PATH: its errors
/// (exit status 1: the text does not parse) fail the test; its lint findings
/// (exit status 3) are printed, since the parser check is the one enforcing
/// the naming conventions.
fn promtool_check(instance: &str, text: &str) {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("promtool is not on PATH: the parser check stands alone");
            return;
        }
        Err(err) => panic!("cannot run promtool: {err}"),
    };
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("promtool reads the metrics");
    // Bounded: a promtool that hangs fails the test instead of stalling it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        match child.try_wait().expect("promtool can be waited for") {
            Some(status) => break status,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("promtool check metrics did not finish within 30 s");
            }
        }
    };
    let output = child.wait_with_output().expect("promtool's output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    match status.code() {
        Some(0) => {}
        Some(3) => eprintln!("promtool lint findings for {instance}'s /metrics:\n{said}"),
        _ => panic!("promtool check metrics rejects {instance}'s /metrics ({status}):\n{said}"),
    }
}

/// Samples of the table's metrics whose fixed labels (like a counter's
/// `outcome`) carry a value the table does not list: the code records what
/// the documentation does not say.
fn undocumented_label_values(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some(sample) = parse_sample(line) else {
            continue;
        };
        let name = sample.name.trim_end_matches("_bucket");
        let name = name.trim_end_matches("_sum").trim_end_matches("_count");
        let Some(info) = METRICS
            .iter()
            .find(|m| m.name == sample.name || m.name == name)
        else {
            continue;
        };
        for (label, value) in &sample.labels {
            let documented = info
                .labels
                .iter()
                .find(|(documented, _)| documented == label)
                .is_none_or(|(_, values)| values.contains(&value.as_str()));
            if !documented {
                found.push(format!("{}{{{label}={value:?}}}", sample.name));
            }
        }
    }
    found
}

/// Family names declared by `# TYPE` lines.
fn declared_families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[derive(Default)]
struct Family {
    kind: Option<String>,
    help: bool,
    samples: usize,
}

/// One parsed sample line.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Problems of a Prometheus text exposition (format 0.0.4) and of its
/// names by Prometheus conventions; empty when all is well.
fn exposition_problems(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut samples: Vec<(usize, Sample)> = Vec::new();
    // Family of each sample, to check a family's samples are not split up.
    let mut last_family: Option<String> = None;
    let mut finished: BTreeSet<String> = BTreeSet::new();

    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), _) => {
                    check_name(name, number, &mut problems);
                    let family = families.entry(name.to_owned()).or_default();
                    if family.help {
                        problems.push(format!("line {number}: HELP for {name} twice"));
                    }
                    family.help = true;
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    check_name(name, number, &mut problems);
                    let kind = kind.trim();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        problems.push(format!("line {number}: unknown TYPE {kind}"));
                    }
                    let family = families.entry(name.to_owned()).or_default();
                    if family.kind.is_some() {
                        problems.push(format!("line {number}: TYPE for {name} twice"));
                    }
                    if family.samples > 0 {
                        problems.push(format!("line {number}: TYPE for {name} after its samples"));
                    }
                    family.kind = Some(kind.to_owned());
                }
                _ => {}
            }
            continue;
        }
        let Some(sample) = parse_sample(line) else {
            problems.push(format!(
                "line {number}: not a sample line (`name{{labels}} value`): {line:?}"
            ));
            continue;
        };
        check_name(&sample.name, number, &mut problems);
        let family = family_of(&sample.name, &families);
        if last_family.as_deref() != Some(family.as_str()) {
            if let Some(previous) = last_family.take() {
                finished.insert(previous);
            }
            if finished.contains(&family) {
                problems.push(format!(
                    "line {number}: the samples of {family} are not grouped together"
                ));
            }
            last_family = Some(family.clone());
        }
        families.entry(family).or_default().samples += 1;
        samples.push((number, sample));
    }

    // Every series once.
    let mut seen = BTreeSet::new();
    for (number, sample) in &samples {
        let mut labels = sample.labels.clone();
        labels.sort();
        if !seen.insert((sample.name.clone(), labels)) {
            problems.push(format!(
                "line {number}: the series {} {:?} appears twice",
                sample.name, sample.labels
            ));
        }
    }

    for (name, family) in &families {
        if !family.help {
            problems.push(format!("{name}: no # HELP"));
        }
        let Some(kind) = &family.kind else {
            problems.push(format!("{name}: no # TYPE"));
            continue;
        };
        match kind.as_str() {
            "counter" if !name.ends_with("_total") => {
                problems.push(format!("{name}: a counter's name ends in _total"));
            }
            "gauge" | "histogram" | "summary" if name.ends_with("_total") => {
                problems.push(format!("{name}: only counters end in _total"));
            }
            _ => {}
        }
        problems.extend(unit_problems(name));
        if kind == "histogram" {
            let of_family: Vec<&Sample> = samples
                .iter()
                .map(|(_, s)| s)
                .filter(|s| family_of(&s.name, &families) == *name)
                .collect();
            problems.extend(histogram_problems(name, &of_family));
        }
    }
    problems
}

/// Names follow `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn check_name(name: &str, number: usize, problems: &mut Vec<String>) {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        problems.push(format!("line {number}: bad metric name {name:?}"));
    }
}

/// Non-base units in a name, and durations or sizes named without their
/// base unit (`_seconds`, `_bytes`).
fn unit_problems(name: &str) -> Vec<String> {
    const NOT_BASE: &[&str] = &[
        "ms",
        "millis",
        "milliseconds",
        "us",
        "microseconds",
        "ns",
        "nanoseconds",
        "minutes",
        "hours",
        "days",
        "kb",
        "kilobytes",
        "mb",
        "megabytes",
        "gb",
        "gigabytes",
        "bits",
    ];
    let words: Vec<&str> = name.split('_').collect();
    let mut problems = Vec::new();
    if let Some(word) = words.iter().find(|w| NOT_BASE.contains(w)) {
        problems.push(format!(
            "{name}: `{word}` is not a base unit (use _seconds or _bytes)"
        ));
    }
    let base = name.strip_suffix("_total").unwrap_or(name);
    let is_time = words
        .iter()
        .any(|w| ["duration", "latency", "time", "age", "wait"].contains(w));
    if is_time && !base.ends_with("_seconds") && !base.ends_with("_timestamp_seconds") {
        problems.push(format!("{name}: a duration is named with _seconds"));
    }
    let is_size = words.iter().any(|w| ["size", "bytes"].contains(w));
    if is_size && !base.ends_with("_bytes") {
        problems.push(format!("{name}: a size is named with _bytes"));
    }
    problems
}

/// `name` without a histogram or summary suffix when that names a family of
/// such a type; the sample's own name otherwise.
fn family_of(name: &str, families: &BTreeMap<String, Family>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && families
                .get(base)
                .and_then(|f| f.kind.as_deref())
                .is_some_and(|kind| kind == "histogram" || kind == "summary")
        {
            return base.to_owned();
        }
    }
    name.to_owned()
}

/// Each series of a histogram has cumulative `_bucket`s with `le` labels
/// ending in `+Inf`, a `_sum`, and a `_count` equal to the `+Inf` bucket.
fn histogram_problems(name: &str, samples: &[&Sample]) -> Vec<String> {
    let mut problems = Vec::new();
    // Per series (labels without `le`): buckets, sum, count.
    type Series = (Vec<(f64, f64)>, Option<f64>, Option<f64>);
    let mut series: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
    for sample in samples {
        let mut labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        labels.sort();
        let entry = series.entry(labels).or_default();
        let suffix = &sample.name[name.len()..];
        match suffix {
            "_bucket" => {
                let le = sample
                    .labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .map(|(_, v)| parse_value(v));
                match le {
                    Some(Some(le)) => entry.0.push((le, sample.value)),
                    _ => problems.push(format!("{name}: a _bucket without a numeric le label")),
                }
            }
            "_sum" => entry.1 = Some(sample.value),
            "_count" => entry.2 = Some(sample.value),
            _ => problems.push(format!(
                "{name}: sample {} is none of _bucket, _sum, _count",
                sample.name
            )),
        }
    }
    if series.is_empty() {
        problems.push(format!("{name}: a histogram without samples"));
    }
    for (labels, (buckets, sum, count)) in &series {
        let what = format!("{name}{labels:?}");
        if sum.is_none() {
            problems.push(format!("{what}: no _sum"));
        }
        let Some(count) = count else {
            problems.push(format!("{what}: no _count"));
            continue;
        };
        match buckets.last() {
            Some((le, top)) if le.is_infinite() && le.is_sign_positive() => {
                if top != count {
                    problems.push(format!(
                        "{what}: _count {count} differs from the +Inf bucket {top}"
                    ));
                }
            }
            _ => problems.push(format!("{what}: the last bucket is not le=\"+Inf\"")),
        }
        for pair in buckets.windows(2) {
            if pair[1].0 <= pair[0].0 || pair[1].1 < pair[0].1 {
                problems.push(format!(
                    "{what}: buckets are not cumulative in increasing le: {pair:?}"
                ));
            }
        }
    }
    problems
}

/// `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next()?)?;
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().ok()?;
    }
    if fields.next().is_some() || name.is_empty() {
        return None;
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Labels up to the closing `}`, and what follows it.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start();
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = text.find('=')?;
        let key = text[..eq].trim();
        let mut chars = key.chars();
        let key_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !key.starts_with("__");
        if !key_ok {
            return None;
        }
        let mut value = String::new();
        let quoted = text[eq + 1..].trim_start().strip_prefix('"')?;
        let mut chars = quoted.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    _ => return None,
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        text = &quoted[end + 1..];
        text = text.trim_start();
        if let Some(after) = text.strip_prefix(',') {
            text = after;
        } else if !text.starts_with('}') {
            return None;
        }
    }
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if text
            .chars()
            .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
        {
            text.parse().ok()
        }
        _ => None,
    }
}
