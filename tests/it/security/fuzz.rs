//! Fuzzing what clients control: property tests over input normalisation
//! and cache-key derivation, and random bodies against a live gateway.
//!
//! The CI run is short; `scripts/fuzz` runs the same tests for longer
//! (`PROPTEST_CASES`, `FUZZ_ITERATIONS`, `FUZZ_SEED`).

use analytics_gateway::config::{Config, PlannerSettings, QueryLimits};
use analytics_gateway::graphql::limits::{DocumentLimits, check_document, check_tokens};
use std::sync::Arc;

use analytics_gateway::cubes::CubeMap;
use analytics_gateway::query::{
    AggregateQuery, Granularity, Member, PlannedQuery, Planner, RawAggregate,
};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::{assert_alive, client};
use crate::common::{PANEL_QUERY, TestEnv, TestOptions, input, panel};

fn limits() -> QueryLimits {
    limits_with("Sales.customerId")
}

/// The limits of a gateway whose `BI_CUSTOMER_MEMBER` is `customer_member`.
fn limits_with(customer_member: &str) -> QueryLimits {
    let mut limits = Config::embedded_defaults().query;
    let member = |name: &str| Member::parse(name).expect("a member");
    limits.cubes = Arc::new(CubeMap::uniform(
        member("Sales.date"),
        member(customer_member),
    ));
    limits
}

fn planner() -> Planner {
    let settings: PlannerSettings = Config::embedded_defaults().planner;
    Planner::new(settings, "http://bi.test/cubejs-api/v1")
}

fn parse(
    customer: &str,
    from: &str,
    to: &str,
    measures: &[String],
    dimensions: &[String],
    granularity: Option<Granularity>,
) -> Result<AggregateQuery, analytics_gateway::query::InputError> {
    AggregateQuery::parse(
        RawAggregate {
            customer,
            from,
            to,
            measures,
            dimensions,
            granularity,
        },
        &limits(),
        None,
    )
}

/// The planned BI query filters on exactly the query's customer, and on
/// nothing else: what the cache key names is that customer's data only.
fn assert_scoped(query: &AggregateQuery, planned: &PlannedQuery) -> Result<(), TestCaseError> {
    prop_assert_eq!(planned.cube.filters.len(), 1);
    let filter = &planned.cube.filters[0];
    prop_assert_eq!(filter.member.as_str(), "Sales.customerId");
    prop_assert_eq!(filter.operator.as_str(), "equals");
    prop_assert_eq!(&filter.values, &vec![query.customer().to_owned()]);
    prop_assert_eq!(planned.key.as_str().len(), 64);
    Ok(())
}

fn granularity() -> impl Strategy<Value = Option<Granularity>> {
    prop_oneof![
        Just(None),
        Just(Some(Granularity::Day)),
        Just(Some(Granularity::Week)),
        Just(Some(Granularity::Month)),
        Just(Some(Granularity::Quarter)),
        Just(Some(Granularity::Year)),
    ]
}

/// Strings that are often almost valid: dates, members and customers of the
/// right shape, with arbitrary text mixed in.
fn date_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{4}-[0-9]{2}-[0-9]{2}",
        "20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
        "[0-9 -]{0,12}",
        any::<String>(),
    ]
}

fn member_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z_][A-Za-z0-9_]{0,6}\\.[A-Za-z_][A-Za-z0-9_]{0,6}",
        "Sales\\.(revenue|orders|avgOrderValue|region|product|customerId)",
        "[A-Za-z.]{0,10}",
        any::<String>(),
    ]
}

fn valid_member() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,6}\\.[A-Za-z_][A-Za-z0-9_]{0,6}"
}

/// A customer the gateway accepts: not blank, no control characters, at most
/// 128 characters.
fn valid_customer() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{1,40}".prop_filter("not blank", |c| !c.trim().is_empty())
}

/// `items` in another order, some of them twice.
fn shuffled_with_duplicates(items: &[String], seed: u64) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = items.to_vec();
    for item in items {
        if rng.bool() {
            out.push(item.clone());
        }
    }
    rng.shuffle(&mut out);
    out
}

/// A valid date range within the default 731 days, both ends included.
fn valid_range() -> impl Strategy<Value = (String, String)> {
    (0_i64..3_000, 0_i64..731).prop_map(|(start, length)| {
        let first = chrono::NaiveDate::from_ymd_opt(2020, 1, 1).expect("a date");
        let from = first + chrono::Duration::days(start);
        let to = from + chrono::Duration::days(length);
        (from.to_string(), to.to_string())
    })
}

fn config() -> ProptestConfig {
    // Cases come from PROPTEST_CASES (256 unless set); a failure prints its
    // minimal input instead of writing files into the source tree.
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary strings in every field never panic the parser or planner;
    /// whatever parses is planned into a BI query scoped to exactly its
    /// customer, and parsing the normalised query again gives the same query
    /// and key.
    #[test]
    fn arbitrary_input_never_panics_and_what_parses_is_stable(
        customer in prop_oneof![any::<String>(), valid_customer()],
        from in date_like(),
        to in date_like(),
        measures in prop::collection::vec(member_like(), 0..25),
        dimensions in prop::collection::vec(member_like(), 0..12),
        granularity in granularity(),
    ) {
        let Ok(query) = parse(&customer, &from, &to, &measures, &dimensions, granularity) else {
            return Ok(());
        };
        let planned = planner().plan(&query);
        assert_scoped(&query, &planned)?;
        let names = |members: &[analytics_gateway::query::Member]| -> Vec<String> {
            members.iter().map(|m| m.as_str().to_owned()).collect()
        };
        let again = parse(
            query.customer(),
            &query.range().from().to_string(),
            &query.range().to().to_string(),
            &names(query.measures()),
            &names(query.dimensions()),
            query.granularity(),
        );
        prop_assert_eq!(again.as_ref(), Ok(&query));
        prop_assert_eq!(planner().plan(&query).key, planned.key);
    }

    /// Measures and dimensions shuffled and duplicated ask the same
    /// question: the same query, the same BI query, the same key.
    #[test]
    fn member_order_and_duplicates_do_not_change_the_key(
        customer in valid_customer(),
        (from, to) in valid_range(),
        measures in prop::collection::btree_set(valid_member(), 1..6),
        dimensions in prop::collection::btree_set(valid_member(), 0..5),
        granularity in granularity(),
        seed in any::<u64>(),
    ) {
        let measures: Vec<String> = measures.into_iter().collect();
        let dimensions: Vec<String> = dimensions.into_iter().collect();
        let query = parse(&customer, &from, &to, &measures, &dimensions, granularity);
        prop_assert!(query.is_ok(), "a valid query: {:?}", query);
        let query = query.expect("checked");
        let reordered = parse(
            &customer,
            &from,
            &to,
            &shuffled_with_duplicates(&measures, seed),
            &shuffled_with_duplicates(&dimensions, seed.rotate_left(17)),
            granularity,
        )
        .expect("the same members, reordered, are valid");
        prop_assert_eq!(&reordered, &query);
        let (a, b) = (planner().plan(&query), planner().plan(&reordered));
        prop_assert_eq!(&a.key, &b.key);
        prop_assert_eq!(&a.cube, &b.cube);
    }

    /// Two different customers never share a key, however alike their names
    /// (case, whitespace, invisible characters, arbitrary text), and a key is
    /// never shared between two gateways that filter customers on different
    /// members.
    #[test]
    fn customers_and_configurations_never_share_a_key(
        first in valid_customer(),
        twist in prop_oneof![
            Just(0_u8), Just(1), Just(2), Just(3), Just(4), Just(5)
        ],
        other in valid_customer(),
        (from, to) in valid_range(),
        measures in prop::collection::vec(valid_member(), 1..4),
        granularity in granularity(),
    ) {
        let second = match twist {
            0 => first.to_uppercase(),
            1 => format!("{first} "),
            2 => format!("{first}\u{200b}"),
            3 => format!("\"{first}\""),
            4 => format!("{first}\",\"{other}"),
            _ => other,
        };
        let a = parse(&first, &from, &to, &measures, &[], granularity);
        let b = parse(&second, &from, &to, &measures, &[], granularity);
        let (Ok(a), Ok(b)) = (a, b) else {
            return Ok(());
        };
        let (planned_a, planned_b) = (planner().plan(&a), planner().plan(&b));
        assert_scoped(&a, &planned_a)?;
        assert_scoped(&b, &planned_b)?;
        if a.customer() != b.customer() {
            prop_assert_ne!(&planned_a.key, &planned_b.key);
        } else {
            prop_assert_eq!(&planned_a.key, &planned_b.key);
        }
        let by_region = AggregateQuery::parse(
            RawAggregate {
                customer: &first,
                from: &from,
                to: &to,
                measures: &measures,
                dimensions: &[],
                granularity,
            },
            &limits_with("Sales.region"),
            None,
        );
        let Ok(by_region) = by_region else {
            return Ok(());
        };
        let by_region = planner().plan(&by_region);
        prop_assert_ne!(&by_region.key, &planned_a.key);
    }
}

/// Single GraphQL tokens that a space always separates.
const SIMPLE_TOKENS: &[&str] = &[
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ":",
    "$",
    "!",
    "@",
    "=",
    "|",
    "&",
    "...",
    "query",
    "aggregate",
    "input",
    "rows",
    "__typename",
    "on",
    "fragment",
    "true",
    "null",
    "0",
    "-1",
    "42",
    "1.5",
    "-2.5e-3",
    "1E+9",
    "\"text\"",
    "\"\"",
    "\"\"\"block\"\"\"",
    "_x",
    "A_1",
];

proptest! {
    #![proptest_config(config())]

    /// The token counter never panics on arbitrary text, and a larger
    /// maximum never refuses what a smaller one accepts.
    #[test]
    fn the_token_counter_never_panics_and_is_monotonic(
        text in prop_oneof![any::<String>(), "[{}()\\[\\]\"#.a-z0-9 \n\\\\-]{0,200}"],
        max in 0_usize..300,
    ) {
        let at_max = check_tokens(&text, max).is_ok();
        let above = check_tokens(&text, max + 1).is_ok();
        prop_assert!(!at_max || above);
        prop_assert!(check_tokens(&text, usize::MAX).is_ok());
    }

    /// Space-separated GraphQL tokens are counted exactly: `n` tokens pass a
    /// maximum of `n` and are refused by `n - 1`.
    #[test]
    fn space_separated_tokens_are_counted_exactly(
        tokens in prop::collection::vec(prop::sample::select(SIMPLE_TOKENS), 1..120),
        separator in prop::sample::select(&[" ", ",", "\n", "\t", " , "][..]),
    ) {
        let text = tokens.join(separator);
        prop_assert!(check_tokens(&text, tokens.len()).is_ok(), "{}", text);
        prop_assert!(check_tokens(&text, tokens.len() - 1).is_err(), "{}", text);
    }

    /// Whatever token soup parses as a GraphQL document, the document limits
    /// check it without panicking.
    #[test]
    fn document_limits_never_panic_on_parsed_documents(
        tokens in prop::collection::vec(prop::sample::select(SIMPLE_TOKENS), 1..80),
    ) {
        if let Ok(document) = async_graphql::parser::parse_query(tokens.join(" ")) {
            let _ = check_document(
                &document,
                DocumentLimits {
                    max_aggregates: 3,
                    max_aliases: 3,
                    max_fields: usize::MAX,
                    max_depth: usize::MAX,
                },
            );
        }
    }

    /// Random selection trees, with fragments that spread each other (cycles
    /// and undefined ones included), never panic the document limits; without
    /// fragments, `aggregate` fields and aliases are counted exactly.
    #[test]
    fn document_limits_count_exactly_and_never_panic(
        operation in selections(),
        fragments in prop::collection::vec(selections(), 0..4),
    ) {
        let mut text = format!("query {{ {} }}", operation.text);
        for (i, fragment) in fragments.iter().enumerate() {
            text.push_str(&format!(" fragment F{i} on QueryRoot {{ {} }}", fragment.text));
        }
        let document = async_graphql::parser::parse_query(&text);
        prop_assert!(document.is_ok(), "{}: {:?}", text, document.err());
        let document = document.expect("checked");
        let limits = |max_aggregates, max_aliases| DocumentLimits {
            max_aggregates,
            max_aliases,
            max_fields: usize::MAX,
            max_depth: usize::MAX,
        };
        let unbounded = check_document(&document, limits(usize::MAX, usize::MAX));
        if !operation.spreads && fragments.is_empty() {
            prop_assert!(unbounded.is_ok(), "{}", text);
            let exact = check_document(&document, limits(operation.aggregates, operation.aliases));
            prop_assert!(exact.is_ok(), "{}: {:?}", text, exact);
            if operation.aggregates > 0 {
                let fewer = limits(operation.aggregates - 1, usize::MAX);
                prop_assert!(check_document(&document, fewer).is_err(), "{}", text);
            }
            if operation.aliases > 0 {
                let fewer = limits(usize::MAX, operation.aliases - 1);
                prop_assert!(check_document(&document, fewer).is_err(), "{}", text);
            }
        }
    }
}

/// A selection set's text and what it holds outside fragments.
#[derive(Debug, Clone, Default)]
struct Selections {
    text: String,
    aggregates: usize,
    aliases: usize,
    /// Whether it spreads a named fragment.
    spreads: bool,
}

/// Random selection sets: fields (some aliased, some named `aggregate`),
/// nested selections, inline fragments, and spreads of `F0`..`F4`.
fn selections() -> impl Strategy<Value = Selections> {
    let leaf = prop_oneof![
        (
            prop::sample::select(&["aggregate", "rows", "catalog", "x"][..]),
            any::<bool>()
        )
            .prop_map(|(name, aliased)| Selections {
                text: if aliased {
                    format!("a: {name}")
                } else {
                    name.to_owned()
                },
                aggregates: usize::from(name == "aggregate"),
                aliases: usize::from(aliased),
                spreads: false,
            }),
        (0_usize..5).prop_map(|i| Selections {
            text: format!("...F{i}"),
            spreads: true,
            ..Selections::default()
        }),
    ];
    leaf.prop_recursive(4, 40, 5, |inner| {
        (
            prop::collection::vec(inner, 1..5),
            prop::sample::select(
                &[
                    "aggregate",
                    "cubes",
                    "b: aggregate",
                    "b: x",
                    "... on QueryRoot",
                ][..],
            ),
        )
            .prop_map(|(children, head)| {
                let mut out = Selections {
                    text: format!("{head} {{"),
                    aggregates: usize::from(head.ends_with("aggregate")),
                    aliases: usize::from(head.starts_with("b:")),
                    spreads: false,
                };
                for child in children {
                    out.text.push(' ');
                    out.text.push_str(&child.text);
                    out.aggregates += child.aggregates;
                    out.aliases += child.aliases;
                    out.spreads |= child.spreads;
                }
                out.text.push_str(" }");
                out
            })
    })
}

/// How many random bodies the HTTP fuzz run sends (`FUZZ_ITERATIONS`).
fn iterations() -> usize {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(500)
}

/// The run's seed (`FUZZ_SEED`, else a random one that failures print).
fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

/// One random request: method, path and query, content type, extra
/// headers, body.
#[derive(Debug, Clone)]
struct Attempt {
    family: &'static str,
    get_query: Option<String>,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
}

const WORDS: &[&str] = &[
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ":",
    "$",
    "!",
    "@",
    "...",
    "=",
    "|",
    "&",
    "query",
    "mutation",
    "subscription",
    "fragment",
    "on",
    "aggregate",
    "catalog",
    "cubes",
    "input",
    "rows",
    "cache",
    "status",
    "key",
    "__schema",
    "__type",
    "__typename",
    "types",
    "fields",
    "ofType",
    "name",
    "@include",
    "@skip",
    "@defer",
    "if",
    "true",
    "false",
    "null",
    "AggregateInput",
    "AggregateInput!",
    "\"acme\"",
    "\"2025-01-01\"",
    "\"Sales.revenue\"",
    "DAY",
    "1e309",
    "-0",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "#",
    "\"\"\"",
    "\n",
    "99999999999999999999",
];

const STRINGS: &[&str] = &[
    "acme",
    "",
    " ",
    "Sales.revenue",
    "Sales.region",
    "Sales.nope",
    "Sales",
    "2025-01-01",
    "2025-02-30",
    "2025-1-1",
    "99999-01-01",
    "DAY",
    "day",
    "\u{0000}",
    "\u{202e}acme",
    "'; DROP TABLE sales; --",
    "{\"$ne\": null}",
    "../../etc/passwd",
    "${jndi:ldap://x}",
    "🦀🦀🦀",
];

/// A random JSON value, `depth` levels at most.
fn random_json(rng: &mut fastrand::Rng, depth: usize) -> Value {
    let pick = if depth == 0 { rng.u8(..5) } else { rng.u8(..7) };
    match pick {
        0 => Value::Null,
        1 => json!(rng.bool()),
        2 => match rng.u8(..4) {
            0 => json!(rng.i64(..)),
            1 => json!(rng.f64() * 1e300),
            2 => json!(u64::MAX),
            _ => json!(rng.i32(-3..3)),
        },
        3 => json!(STRINGS[rng.usize(..STRINGS.len())]),
        4 => json!(
            (0..rng.usize(..40))
                .map(|_| rng.char(..))
                .collect::<String>()
        ),
        5 => Value::Array(
            (0..rng.usize(..5))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "customer",
                "dateRange",
                "from",
                "to",
                "measures",
                "dimensions",
                "granularity",
                "input",
                "__proto__",
                "x",
            ];
            Value::Object(
                (0..rng.usize(..6))
                    .map(|_| {
                        (
                            keys[rng.usize(..keys.len())].to_owned(),
                            random_json(rng, depth - 1),
                        )
                    })
                    .collect(),
            )
        }
    }
}

/// A valid panel input of a fuzz tenant, to start mutations from.
fn seed_input(rng: &mut fastrand::Rng) -> Value {
    input(
        &format!("fuzz-{}", rng.u32(..1_000)),
        "2025-01-01",
        "2025-01-03",
        &["Sales.revenue"],
        &[],
        Some("DAY"),
    )
}

/// Bytes of `bytes` flipped, deleted, duplicated or cut, at random.
fn mutate(rng: &mut fastrand::Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.usize(1..6) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.usize(..bytes.len());
        match rng.u8(..6) {
            0 => bytes[at] = rng.u8(..),
            1 => {
                const SPECIAL: &[u8] = b"{}[]\",:\\ 0a$!@";
                bytes[at] = SPECIAL[rng.usize(..SPECIAL.len())];
            }
            2 => {
                let end = (at + rng.usize(..20)).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let end = (at + rng.usize(..40)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            4 => bytes.truncate(at),
            _ => bytes.insert(at, rng.u8(..)),
        }
    }
    bytes
}

fn random_attempt(rng: &mut fastrand::Rng) -> Attempt {
    let mut attempt = Attempt {
        family: "",
        get_query: None,
        content_type: Some("application/json"),
        headers: Vec::new(),
        body: Vec::new(),
    };
    match rng.u8(..6) {
        0 => {
            attempt.family = "random bytes";
            attempt.body = (0..rng.usize(..1_500)).map(|_| rng.u8(..)).collect();
        }
        1 => {
            attempt.family = "mutated valid JSON";
            let body = crate::common::panel_body(seed_input(rng));
            attempt.body = mutate(rng, body.to_string().into_bytes());
        }
        2 => {
            attempt.family = "GraphQL-ish text";
            let text: Vec<&str> = (0..rng.usize(1..60))
                .map(|_| WORDS[rng.usize(..WORDS.len())])
                .collect();
            let mut body = json!({"query": text.join(" ")});
            if rng.bool() {
                body["variables"] = json!({"input": random_json(rng, 4)});
            }
            attempt.body = body.to_string().into_bytes();
        }
        3 => {
            attempt.family = "random variables";
            let mut input = seed_input(rng);
            let fields = [
                "customer",
                "dateRange",
                "measures",
                "dimensions",
                "granularity",
            ];
            let field = fields[rng.usize(..fields.len())];
            input[field] = random_json(rng, 5);
            let mut body = json!({"query": PANEL_QUERY, "variables": {"input": input}});
            if rng.bool() {
                body["operationName"] = random_json(rng, 1);
            }
            if rng.u8(..4) == 0 {
                body["extensions"] = random_json(rng, 3);
            }
            attempt.body = body.to_string().into_bytes();
        }
        4 => {
            attempt.family = "random JSON shapes";
            attempt.body = random_json(rng, 6).to_string().into_bytes();
        }
        _ => {
            attempt.family = "random GET query strings";
            let pairs: Vec<String> = (0..rng.usize(..5))
                .map(|_| {
                    let key =
                        ["query", "variables", "operationName", "extensions", "x"][rng.usize(..5)];
                    let value = random_json(rng, 3).to_string().into_bytes();
                    let value = mutate(rng, value);
                    format!("{key}={}", super::percent(&String::from_utf8_lossy(&value)))
                })
                .collect();
            attempt.get_query = Some(pairs.join("&"));
        }
    }
    // The HTTP framing varies too: other content types, preflight headers.
    match rng.u8(..10) {
        0 => attempt.content_type = None,
        1 => {
            attempt.content_type = Some("text/plain");
            attempt.headers.push(("apollo-require-preflight", "true"));
        }
        2 => attempt.content_type = Some("application/graphql-response+json; charset=utf-16"),
        3 => attempt.content_type = Some("multipart/form-data"),
        _ => {}
    }
    attempt
}

/// `FUZZ_ITERATIONS` random requests (500 unless set) against one live
/// gateway: random bytes, mutated and truncated valid JSON, GraphQL-ish
/// token soup, random variables and JSON shapes, random GET query strings,
/// under random content types. No answer is a 5xx or a dropped connection,
/// no panic is logged, the process stays up, and bi-sim counts no more
/// queries than there were answers that passed validation (in particular 0
/// when none did).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_bodies_never_crash_5xx_or_reach_the_bi() {
    let seed = seed();
    let iterations = iterations();
    println!("FUZZ_SEED={seed} FUZZ_ITERATIONS={iterations}");
    let env = TestEnv::start(TestOptions::default().latency_ms(20)).await;
    env.wait_for_catalog().await;
    let gateway = env.gateway();
    let http = client();
    let mut rng = fastrand::Rng::with_seed(seed);
    let attempts: Vec<Attempt> = (0..iterations).map(|_| random_attempt(&mut rng)).collect();
    let mut reached_bi = 0_u64;
    let mut families = std::collections::BTreeMap::<&str, usize>::new();

    for chunk in attempts.chunks(8) {
        let sends = chunk.iter().map(|attempt| {
            let url = match &attempt.get_query {
                Some(query) => format!("{}/graphql?{query}", gateway.url()),
                None => format!("{}/graphql", gateway.url()),
            };
            let mut request = if attempt.get_query.is_some() {
                http.get(url)
            } else {
                http.post(url).body(attempt.body.clone())
            };
            if let Some(content_type) = attempt.content_type {
                request = request.header("content-type", content_type);
            }
            for (name, value) in &attempt.headers {
                request = request.header(*name, *value);
            }
            async move {
                let response = request.send().await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let text = response.text().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((status, text))
            }
        });
        let outcomes = crate::common::within(
            crate::common::REQUEST_TIMEOUT,
            "a chunk of fuzz answers",
            futures_util::future::join_all(sends),
        )
        .await;
        for (attempt, outcome) in chunk.iter().zip(outcomes) {
            *families.entry(attempt.family).or_default() += 1;
            let replay = || {
                format!(
                    "FUZZ_SEED={seed}: {} ({:?}, {:?}): {:?}",
                    attempt.family,
                    attempt.content_type,
                    attempt.get_query,
                    String::from_utf8_lossy(&attempt.body)
                )
            };
            let (status, text) = outcome.unwrap_or_else(|err| {
                panic!(
                    "{}: no answer: {err}; output:\n{}",
                    replay(),
                    gateway.output()
                )
            });
            assert!(status < 500, "{}: HTTP {status}: {text}", replay());
            if status == 200 {
                let answer: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|err| panic!("{}: not JSON ({err}): {text}", replay()));
                reached_bi += passed_validation(&answer);
            }
        }
    }

    println!("fuzz families: {families:?}; answers that passed validation: {reached_bi}");
    assert_alive(gateway, "the fuzz run").await;
    let output = gateway.output();
    assert!(
        !output.contains("panicked"),
        "FUZZ_SEED={seed}: a panic:\n{output}"
    );
    let stats = env.sim.stats();
    assert!(
        stats.queries <= reached_bi,
        "FUZZ_SEED={seed}: {} BI queries for {reached_bi} valid answers: {stats:?}",
        stats.queries
    );
    // The gateway still answers a real question after all that.
    let answer = gateway
        .graphql(&panel(
            "after-fuzz",
            "2025-01-01",
            "2025-01-02",
            &["Sales.orders"],
            &[],
            None,
        ))
        .await;
    assert!(answer.get("errors").is_none(), "{answer}");
}

/// How many `aggregate` answers of `answer` got past validation: rows, or an
/// error that only a BI call (or its quota) can produce.
fn passed_validation(answer: &Value) -> u64 {
    let with_rows = answer["data"].as_object().map_or(0, |data| {
        data.values().filter(|v| v["rows"].is_array()).count()
    });
    let from_bi = super::codes(answer)
        .iter()
        .filter(|code| {
            matches!(
                code.as_str(),
                "BI_ERROR" | "BI_UNAVAILABLE" | "RATE_LIMITED"
            )
        })
        .count();
    (with_rows + from_bi) as u64
}
