//! The simulator's data: a deterministic daily fact table, and the evaluation
//! of Cube queries (single and data-blending batches) over it.
//!
//! Every fact is derived from its coordinates (customer, day, region, product)
//! and the data version by a small stable hash, so every `bi-sim` process, and
//! the simulator embedded in every gateway instance, returns the same rows for
//! the same query and version, forever. Version 0 is the data a simulator
//! starts with; a test moves to another (`POST /_sim/data-version`) to make
//! the numbers change, as new orders would. Money is kept in integer cents, so
//! sums are exact and a total always equals the sum of its buckets.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Datelike, Days, NaiveDate};
use serde_json::Value;

use super::schema::{self, Dimension, Granularity, Measure, TIME_DIMENSION};
use crate::bi::protocol::{CubeQuery, Filter, Row};

/// Rows returned when a query sets no `limit`: Cube's default.
pub const DEFAULT_LIMIT: u32 = 10_000;
/// The largest `limit` honoured; larger ones are clamped, as Cube does.
pub const MAX_LIMIT: u32 = 50_000;
/// The longest `dateRange` accepted, in days (a little over ten years).
pub const MAX_RANGE_DAYS: i64 = 3_700;
/// How many facts one query may scan. It bounds the work a single request can
/// cause (a filter can name any number of customers), well above what a
/// ten-year range over the default customers needs (166,500).
const MAX_SCANNED_FACTS: u64 = 2_000_000;

pub const REGIONS: [&str; 3] = ["EU", "NA", "APAC"];
pub const PRODUCTS: [&str; 3] = ["widget", "gadget", "gizmo"];
/// The customers a query covers when it does not filter on `Sales.customerId`.
pub const CUSTOMERS: [&str; 5] = ["acme", "globex", "initech", "umbrella", "hooli"];

/// Real Cube's error texts for batches that break its blending rules.
pub const BLEND_WITHOUT_GRANULARITY: &str =
    "Data blending query without granularity is not supported";
pub const BLEND_GRANULARITIES_MISMATCH: &str = "Data blending query granularities must match";

/// The rows `/load` returns for `query` asked alone at data version 0 (the
/// data a simulator starts with), or why it is rejected.
pub fn answer(query: &CubeQuery) -> Result<Vec<Row>, String> {
    answer_at(query, 0)
}

/// The rows `/load` returns for `query` asked alone at data `version`.
pub fn answer_at(query: &CubeQuery, version: u64) -> Result<Vec<Row>, String> {
    Plan::parse(query).map(|plan| plan.run(version))
}

/// The rows of every query of a data-blending batch, by position, or the one
/// error that fails the whole batch.
///
/// Blending rules are checked before any query is evaluated, as Cube does, and
/// every row carries the extra `time.<granularity>` key that Cube adds to
/// batched answers.
pub fn answer_batch(queries: &[CubeQuery], version: u64) -> Result<Vec<Vec<Row>>, String> {
    let granularity = blending_granularity(queries)?;
    let time_key = format!("time.{granularity}");
    let bucket_key = format!("{TIME_DIMENSION}.{granularity}");
    queries
        .iter()
        .map(|query| {
            let mut rows = answer_at(query, version)?;
            for row in &mut rows {
                if let Some(bucket) = row.get(&bucket_key).cloned() {
                    row.insert(time_key.clone(), bucket);
                }
            }
            Ok(rows)
        })
        .collect()
}

/// The granularity shared by every query of a batch, or the error with which
/// Cube refuses to blend them.
pub fn blending_granularity(queries: &[CubeQuery]) -> Result<&str, String> {
    if queries.iter().all(|q| q.granularity().is_none()) {
        return Err(BLEND_WITHOUT_GRANULARITY.to_owned());
    }
    match queries.first().and_then(CubeQuery::granularity) {
        Some(first) if queries.iter().all(|q| q.granularity() == Some(first)) => Ok(first),
        // A totals query beside bucketed ones counts as a mismatch, as in Cube.
        _ => Err(BLEND_GRANULARITIES_MISMATCH.to_owned()),
    }
}

/// The copy of `query` that `/load` echoes back: Cube fills in the row limit
/// it applied, so the sim does too.
pub fn normalise(query: &CubeQuery) -> CubeQuery {
    CubeQuery {
        limit: Some(effective_limit(query.limit)),
        ..query.clone()
    }
}

fn effective_limit(requested: Option<u32>) -> u32 {
    requested.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT)
}

/// One query, checked against the cube and resolved into what to scan and how
/// to group it: evaluation never has to reject anything.
#[derive(Debug)]
struct Plan {
    measures: Vec<Measure>,
    dimensions: Vec<Dimension>,
    window: Window,
    customers: BTreeSet<String>,
    regions: BTreeSet<String>,
    products: BTreeSet<String>,
    limit: usize,
}

/// The days a query covers, and how it buckets them.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: NaiveDate,
    /// At least 1, at most [`MAX_RANGE_DAYS`].
    days: usize,
    granularity: Option<Granularity>,
}

impl Plan {
    fn parse(query: &CubeQuery) -> Result<Self, String> {
        let measures = query
            .measures
            .iter()
            .map(|name| {
                Measure::from_name(name).ok_or_else(|| schema::misuse_message(name, "a measure"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let dimensions = query
            .dimensions
            .iter()
            .map(|name| {
                Dimension::from_name(name)
                    .ok_or_else(|| schema::misuse_message(name, "a dimension"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let window = Window::parse(query)?;
        if measures.is_empty() && dimensions.is_empty() && window.granularity.is_none() {
            // Cube's own wording for an empty query.
            return Err(
                "Query should contain either measures, dimensions or timeDimensions \
                 with granularities in order to be valid"
                    .to_owned(),
            );
        }

        for filter in &query.filters {
            check_filter(filter)?;
        }
        let customers = domain(Dimension::CustomerId, &query.filters);
        let regions = domain(Dimension::Region, &query.filters);
        let products = domain(Dimension::Product, &query.filters);

        // Every factor is far below u64::MAX; saturating keeps the arithmetic
        // free of overflow panics regardless.
        let scanned = [window.days, customers.len(), regions.len(), products.len()]
            .into_iter()
            .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
            .fold(1, u64::saturating_mul);
        if scanned > MAX_SCANNED_FACTS {
            return Err(format!(
                "query would scan {scanned} facts; bi-sim scans at most {MAX_SCANNED_FACTS} \
                 (narrow the dateRange or the customer filter)"
            ));
        }

        Ok(Plan {
            measures,
            dimensions,
            window,
            customers,
            regions,
            products,
            limit: usize::try_from(effective_limit(query.limit)).unwrap_or(usize::MAX),
        })
    }

    fn run(&self, version: u64) -> Vec<Row> {
        // Keyed by (bucket, dimension values in query order): the BTreeMap's
        // order is the row order, time first, then dimension values.
        let mut groups: BTreeMap<(Option<NaiveDate>, Vec<&str>), Totals> = BTreeMap::new();
        for (day, bucket) in self.window.days() {
            for customer in &self.customers {
                for region in &self.regions {
                    for product in &self.products {
                        let values = self
                            .dimensions
                            .iter()
                            .map(|d| match d {
                                Dimension::Region => region.as_str(),
                                Dimension::Product => product.as_str(),
                                Dimension::CustomerId => customer.as_str(),
                            })
                            .collect();
                        let fact = fact(customer, day, region, product, version);
                        groups.entry((bucket, values)).or_default().add(fact);
                    }
                }
            }
        }
        groups
            .into_iter()
            .take(self.limit)
            .map(|((bucket, values), totals)| self.row(bucket, &values, totals))
            .collect()
    }

    fn row(&self, bucket: Option<NaiveDate>, values: &[&str], totals: Totals) -> Row {
        let mut row = Row::new();
        if let (Some(granularity), Some(bucket)) = (self.window.granularity, bucket) {
            let timestamp = Value::String(bucket.format("%Y-%m-%dT00:00:00.000").to_string());
            row.insert(
                format!("{TIME_DIMENSION}.{}", granularity.name()),
                timestamp.clone(),
            );
            row.insert(TIME_DIMENSION.to_owned(), timestamp);
        }
        for (dimension, value) in self.dimensions.iter().zip(values) {
            row.insert(
                dimension.name().to_owned(),
                Value::String((*value).to_owned()),
            );
        }
        for measure in &self.measures {
            // Cube returns numbers as strings; so does the sim.
            let value = match measure {
                Measure::Revenue => format_cents(totals.revenue_cents),
                Measure::Orders => totals.orders.to_string(),
                Measure::AvgOrderValue => format_cents(totals.avg_order_value_cents()),
            };
            row.insert(measure.name().to_owned(), Value::String(value));
        }
        row
    }
}

impl Window {
    /// The simulator has no data outside an explicit range, so every query
    /// needs exactly one time dimension, on `Sales.date`, with a `dateRange`.
    fn parse(query: &CubeQuery) -> Result<Self, String> {
        let time = match query.time_dimensions.as_slice() {
            [time] => time,
            [] => {
                return Err(format!(
                    "bi-sim needs one timeDimensions entry on '{TIME_DIMENSION}' with a dateRange"
                ));
            }
            more => {
                return Err(format!(
                    "bi-sim supports one timeDimensions entry, got {}",
                    more.len()
                ));
            }
        };
        if time.dimension != TIME_DIMENSION {
            return Err(schema::misuse_message(&time.dimension, "a time dimension"));
        }
        let granularity = time
            .granularity
            .as_deref()
            .map(|name| {
                Granularity::from_name(name).ok_or_else(|| {
                    let known: Vec<_> = Granularity::ALL.iter().map(|g| g.name()).collect();
                    format!(
                        "unknown granularity '{name}' (supported: {})",
                        known.join(", ")
                    )
                })
            })
            .transpose()?;

        let [from, to] = time.date_range.as_ref().ok_or_else(|| {
            format!("dateRange is required on timeDimensions entry '{TIME_DIMENSION}'")
        })?;
        let (from, to) = (parse_date(from)?, parse_date(to)?);
        if from > to {
            return Err(format!("dateRange starts on {from}, after its end {to}"));
        }
        let days = to.signed_duration_since(from).num_days() + 1;
        if days > MAX_RANGE_DAYS {
            return Err(format!(
                "dateRange spans {days} days; bi-sim answers at most {MAX_RANGE_DAYS}"
            ));
        }
        Ok(Window {
            from,
            // Between 1 and MAX_RANGE_DAYS, so it always fits.
            days: usize::try_from(days).unwrap_or(usize::MAX),
            granularity,
        })
    }

    /// Every day of the window, with the start of its bucket (`None` when the
    /// query asks for totals).
    fn days(self) -> impl Iterator<Item = (NaiveDate, Option<NaiveDate>)> {
        self.from
            .iter_days()
            .take(self.days)
            .map(move |day| (day, self.granularity.map(|g| bucket_start(g, day))))
    }
}

/// Only `equals` and `notEquals` on the string dimensions: enough for the
/// gateway's customer scoping, and everything else is refused loudly rather
/// than silently ignored.
fn check_filter(filter: &Filter) -> Result<(), String> {
    if Dimension::from_name(&filter.member).is_none() {
        return Err(schema::misuse_message(
            &filter.member,
            "a dimension that can be filtered",
        ));
    }
    if filter.operator != "equals" && filter.operator != "notEquals" {
        return Err(format!(
            "filter operator '{}' on '{}' is not supported by bi-sim (supported: equals, notEquals)",
            filter.operator, filter.member
        ));
    }
    if filter.values.is_empty() {
        return Err(format!(
            "filter '{}' on '{}' needs at least one value",
            filter.operator, filter.member
        ));
    }
    Ok(())
}

/// The values of `dimension` a query covers. Regions and products are a fixed
/// set; customers are open-ended: an `equals` filter names exactly the
/// customers to cover (any string), otherwise the default five are used.
fn domain(dimension: Dimension, filters: &[Filter]) -> BTreeSet<String> {
    let fixed: &[&str] = match dimension {
        Dimension::Region => &REGIONS,
        Dimension::Product => &PRODUCTS,
        Dimension::CustomerId => &CUSTOMERS,
    };
    let on_member = || filters.iter().filter(|f| f.member == dimension.name());
    let mut equals = on_member().filter(|f| f.operator == "equals");
    let mut values: BTreeSet<String> = match equals.next() {
        Some(first) => first.values.iter().cloned().collect(),
        None => fixed.iter().map(|v| (*v).to_owned()).collect(),
    };
    // Several filters on one member are ANDed together, as in Cube.
    for filter in equals {
        values.retain(|v| filter.values.contains(v));
    }
    if dimension != Dimension::CustomerId {
        values.retain(|v| fixed.contains(&v.as_str()));
    }
    for filter in on_member().filter(|f| f.operator == "notEquals") {
        values.retain(|v| !filter.values.contains(v));
    }
    values
}

/// Strictly `YYYY-MM-DD`: the protocol's date format, and nothing looser.
fn parse_date(text: &str) -> Result<NaiveDate, String> {
    let shaped = text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    shaped
        .then(|| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
        .flatten()
        .ok_or_else(|| format!("invalid date '{text}' in dateRange: expected YYYY-MM-DD"))
}

/// The first day of the bucket of granularity `g` that contains `day`: weeks
/// start on Monday (ISO), quarters in January, April, July and October.
fn bucket_start(g: Granularity, day: NaiveDate) -> NaiveDate {
    const REASON: &str = "dates parsed from YYYY-MM-DD are far from chrono's limits";
    let first_of_month = |month: u32| {
        NaiveDate::from_ymd_opt(day.year(), month, 1).expect("the first of a month always exists")
    };
    match g {
        Granularity::Day => day,
        Granularity::Week => day
            .checked_sub_days(Days::new(u64::from(day.weekday().num_days_from_monday())))
            .expect(REASON),
        Granularity::Month => first_of_month(day.month()),
        Granularity::Quarter => first_of_month(day.month0() / 3 * 3 + 1),
        Granularity::Year => first_of_month(1),
    }
}

/// One day's sales of one product to one customer in one region.
#[derive(Debug, Clone, Copy)]
struct Fact {
    orders: u64,
    revenue_cents: u64,
}

fn fact(customer: &str, day: NaiveDate, region: &str, product: &str, version: u64) -> Fact {
    // The zero bytes separate the parts so that ("ab", "c") and ("a", "bc")
    // hash differently. Version 0 adds nothing, so its data is the data the
    // simulator always had.
    let version_bytes = version.to_le_bytes();
    let versioned: &[&[u8]] = if version == 0 {
        &[]
    } else {
        &[&[0], &version_bytes]
    };
    let coordinates: [&[u8]; 7] = [
        customer.as_bytes(),
        &[0],
        &day.num_days_from_ce().to_le_bytes(),
        &[0],
        region.as_bytes(),
        &[0],
        product.as_bytes(),
    ];
    let parts: Vec<&[u8]> = coordinates.iter().chain(versioned).copied().collect();
    let hash = fnv1a(&parts);
    let orders = 1 + hash % 20;
    // A unit price between 10.00 and 99.99, in cents.
    let price_cents = 1_000 + (hash >> 8) % 9_000;
    Fact {
        orders,
        revenue_cents: orders * price_cents,
    }
}

/// 64-bit FNV-1a: tiny, and unlike std's `DefaultHasher` guaranteed never to
/// change between Rust releases, which the data's stability depends on.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    parts
        .iter()
        .flat_map(|part| part.iter())
        .fold(OFFSET_BASIS, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    orders: u64,
    revenue_cents: u64,
}

impl Totals {
    fn add(&mut self, fact: Fact) {
        self.orders += fact.orders;
        self.revenue_cents += fact.revenue_cents;
    }

    /// Revenue per order, rounded half up to the cent.
    fn avg_order_value_cents(self) -> u64 {
        // Every group holds at least one fact, and every fact at least one
        // order; the fallback only keeps this total.
        (2 * self.revenue_cents + self.orders)
            .checked_div(2 * self.orders)
            .unwrap_or(0)
    }
}

/// Cents as a minimal decimal string: `123450` is `"1234.5"`, `123400` is
/// `"1234"`, `123405` is `"1234.05"`.
fn format_cents(cents: u64) -> String {
    let (whole, fraction) = (cents / 100, cents % 100);
    match fraction {
        0 => whole.to_string(),
        f if f % 10 == 0 => format!("{whole}.{}", f / 10),
        f => format!("{whole}.{f:02}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bi::protocol::TimeDimension;

    fn query(
        measures: &[&str],
        dimensions: &[&str],
        range: [&str; 2],
        granularity: Option<&str>,
    ) -> CubeQuery {
        CubeQuery {
            measures: measures.iter().map(|m| (*m).to_owned()).collect(),
            dimensions: dimensions.iter().map(|d| (*d).to_owned()).collect(),
            time_dimensions: vec![TimeDimension {
                dimension: TIME_DIMENSION.to_owned(),
                date_range: Some(range.map(str::to_owned)),
                granularity: granularity.map(str::to_owned),
            }],
            filters: Vec::new(),
            limit: None,
        }
    }

    fn with_filter(mut q: CubeQuery, member: &str, operator: &str, values: &[&str]) -> CubeQuery {
        q.filters.push(Filter {
            member: member.to_owned(),
            operator: operator.to_owned(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        });
        q
    }

    fn rows(q: &CubeQuery) -> Vec<Row> {
        answer(q).expect("the test query is valid")
    }

    fn text<'a>(row: &'a Row, key: &str) -> &'a str {
        row.get(key)
            .and_then(Value::as_str)
            .expect("the row has this string key")
    }

    fn buckets(q: &CubeQuery, granularity: &str) -> Vec<String> {
        let key = format!("Sales.date.{granularity}");
        rows(q).iter().map(|r| text(r, &key).to_owned()).collect()
    }

    /// Sums a measure over rows, in cents (or orders), exactly.
    fn sum(rows: &[Row], key: &str) -> u64 {
        rows.iter()
            .map(|r| {
                let value = text(r, key);
                let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
                let cents = format!("{fraction:0<2}");
                let whole: u64 = whole.parse().expect("a whole number");
                let cents: u64 = cents.parse().expect("two digits");
                if key == "Sales.orders" {
                    whole
                } else {
                    whole * 100 + cents
                }
            })
            .sum()
    }

    const MEASURES: [&str; 3] = ["Sales.revenue", "Sales.orders", "Sales.avgOrderValue"];

    /// The hash is the published FNV-1a, so the data cannot drift.
    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&[b"foo"]), 0xdcb2_7518_fed9_d577);
        assert_eq!(fnv1a(&[b"f", b"oo"]), fnv1a(&[b"foo"]));
    }

    /// The same query always gets the same rows, and facts do not depend on
    /// how a query groups them.
    #[test]
    fn answers_are_deterministic_and_consistent_across_groupings() {
        let by_region = query(
            &MEASURES,
            &["Sales.region"],
            ["2025-01-01", "2025-01-31"],
            Some("day"),
        );
        assert_eq!(rows(&by_region), rows(&by_region));
        assert_eq!(rows(&by_region).len(), 31 * 3);

        let by_everything = query(
            &MEASURES,
            &["Sales.customerId", "Sales.product", "Sales.region"],
            ["2025-01-01", "2025-01-31"],
            None,
        );
        let total = query(&MEASURES, &[], ["2025-01-01", "2025-01-31"], None);
        let fine = rows(&by_everything);
        assert_eq!(fine.len(), 5 * 3 * 3);
        for key in ["Sales.revenue", "Sales.orders"] {
            assert_eq!(sum(&fine, key), sum(&rows(&total), key));
            assert_eq!(sum(&rows(&by_region), key), sum(&rows(&total), key));
        }
    }

    /// Another data version changes the numbers, deterministically, and
    /// keeps the shape; version 0 is the data the simulator always served.
    #[test]
    fn data_versions_change_the_numbers_and_only_them() {
        let q = query(
            &MEASURES,
            &["Sales.region"],
            ["2025-01-01", "2025-01-07"],
            Some("day"),
        );
        let first = answer_at(&q, 0).expect("valid");
        assert_eq!(first, rows(&q));
        let second = answer_at(&q, 1).expect("valid");
        assert_ne!(first, second, "version 1 has other numbers");
        assert_eq!(
            second,
            answer_at(&q, 1).expect("valid"),
            "and always the same ones"
        );
        assert_ne!(second, answer_at(&q, 2).expect("valid"));
        let keys = |rows: &[Row]| -> Vec<Vec<String>> {
            rows.iter().map(|r| r.keys().cloned().collect()).collect()
        };
        assert_eq!(keys(&first), keys(&second), "the same rows and members");
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(a["Sales.region"], b["Sales.region"]);
            assert_eq!(a["Sales.date"], b["Sales.date"]);
        }
    }

    /// Rows carry exactly the requested keys, numbers as strings, and the
    /// average is revenue over orders rounded to the cent.
    #[test]
    fn rows_have_cube_shaped_keys_and_values() {
        let q = query(
            &MEASURES,
            &["Sales.region"],
            ["2025-01-01", "2025-01-01"],
            Some("day"),
        );
        let all = rows(&q);
        let first = all.first().expect("one row per region");
        let mut keys: Vec<_> = first.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "Sales.avgOrderValue",
                "Sales.date",
                "Sales.date.day",
                "Sales.orders",
                "Sales.region",
                "Sales.revenue"
            ]
        );
        assert_eq!(text(first, "Sales.date.day"), "2025-01-01T00:00:00.000");
        assert_eq!(text(first, "Sales.date"), "2025-01-01T00:00:00.000");
        // Ascending by dimension value within a bucket.
        let regions: Vec<_> = all.iter().map(|r| text(r, "Sales.region")).collect();
        assert_eq!(regions, ["APAC", "EU", "NA"]);
        for row in &all {
            let revenue = sum(std::slice::from_ref(row), "Sales.revenue");
            let orders = sum(std::slice::from_ref(row), "Sales.orders");
            let average = sum(std::slice::from_ref(row), "Sales.avgOrderValue");
            assert_eq!(average, (2 * revenue + orders) / (2 * orders));
        }

        let totals = rows(&query(
            &["Sales.orders"],
            &[],
            ["2025-01-01", "2025-01-31"],
            None,
        ));
        assert_eq!(totals.len(), 1);
        assert_eq!(totals[0].keys().collect::<Vec<_>>(), ["Sales.orders"]);
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2025-01-01 is a Wednesday: its week starts on Monday 2024-12-30.
        let q = query(
            &["Sales.orders"],
            &[],
            ["2025-01-01", "2025-01-13"],
            Some("week"),
        );
        assert_eq!(
            buckets(&q, "week"),
            [
                "2024-12-30T00:00:00.000",
                "2025-01-06T00:00:00.000",
                "2025-01-13T00:00:00.000"
            ]
        );
    }

    #[test]
    fn months_quarters_and_years_start_on_their_first_day() {
        let months = query(
            &["Sales.orders"],
            &[],
            ["2025-01-15", "2025-03-02"],
            Some("month"),
        );
        assert_eq!(
            buckets(&months, "month"),
            [
                "2025-01-01T00:00:00.000",
                "2025-02-01T00:00:00.000",
                "2025-03-01T00:00:00.000"
            ]
        );
        let quarters = query(
            &["Sales.orders"],
            &[],
            ["2025-03-31", "2025-10-01"],
            Some("quarter"),
        );
        assert_eq!(
            buckets(&quarters, "quarter"),
            [
                "2025-01-01T00:00:00.000",
                "2025-04-01T00:00:00.000",
                "2025-07-01T00:00:00.000",
                "2025-10-01T00:00:00.000"
            ]
        );
        let years = query(
            &["Sales.orders"],
            &[],
            ["2024-12-31", "2025-01-01"],
            Some("year"),
        );
        assert_eq!(
            buckets(&years, "year"),
            ["2024-01-01T00:00:00.000", "2025-01-01T00:00:00.000"]
        );
    }

    /// Whatever the granularity, buckets add up to the totals over the range.
    #[test]
    fn totals_equal_the_sum_of_buckets() {
        let range = ["2024-11-20", "2025-02-10"];
        let total = rows(&query(&MEASURES, &[], range, None));
        for granularity in ["day", "week", "month", "quarter", "year"] {
            let bucketed = rows(&query(
                &MEASURES,
                &["Sales.product"],
                range,
                Some(granularity),
            ));
            for key in ["Sales.revenue", "Sales.orders"] {
                assert_eq!(sum(&bucketed, key), sum(&total, key), "{granularity} {key}");
            }
        }
    }

    #[test]
    fn limit_truncates_silently_and_defaults_like_cube() {
        let mut q = query(
            &["Sales.orders"],
            &["Sales.region", "Sales.product"],
            ["2025-01-01", "2025-01-10"],
            Some("day"),
        );
        let all = rows(&q);
        assert_eq!(all.len(), 10 * 9);
        q.limit = Some(7);
        assert_eq!(rows(&q), all[..7]);

        let year = query(
            &["Sales.orders"],
            &["Sales.customerId", "Sales.region", "Sales.product"],
            ["2025-01-01", "2025-12-31"],
            Some("day"),
        );
        assert_eq!(rows(&year).len(), DEFAULT_LIMIT as usize);
        assert_eq!(normalise(&year).limit, Some(DEFAULT_LIMIT));
        let asks_too_much = CubeQuery {
            limit: Some(MAX_LIMIT + 1),
            ..year
        };
        assert_eq!(normalise(&asks_too_much).limit, Some(MAX_LIMIT));
    }

    #[test]
    fn filters_scope_customers_regions_and_products() {
        let base = query(
            &["Sales.orders"],
            &["Sales.customerId", "Sales.region"],
            ["2025-01-01", "2025-01-02"],
            None,
        );
        let tenant = rows(&with_filter(
            base.clone(),
            "Sales.customerId",
            "equals",
            &["tenant-42"],
        ));
        assert_eq!(tenant.len(), 3);
        assert!(
            tenant
                .iter()
                .all(|r| text(r, "Sales.customerId") == "tenant-42")
        );

        let not_eu = rows(&with_filter(
            base.clone(),
            "Sales.region",
            "notEquals",
            &["EU"],
        ));
        assert_eq!(not_eu.len(), 5 * 2);
        assert!(not_eu.iter().all(|r| text(r, "Sales.region") != "EU"));

        let nowhere = rows(&with_filter(base, "Sales.region", "equals", &["Mars"]));
        assert!(nowhere.is_empty());
    }

    #[test]
    fn batches_follow_cube_blending_rules() {
        let range = ["2025-01-01", "2025-01-03"];
        let daily = query(&["Sales.orders"], &[], range, Some("day"));
        let weekly = query(&["Sales.orders"], &[], range, Some("week"));
        let totals = query(&["Sales.orders"], &[], range, None);

        let err = |queries: &[CubeQuery]| {
            answer_batch(queries, 0).expect_err("the batch breaks a blending rule")
        };
        assert_eq!(
            err(&[totals.clone(), totals.clone()]),
            BLEND_WITHOUT_GRANULARITY
        );
        assert_eq!(err(&[]), BLEND_WITHOUT_GRANULARITY);
        assert_eq!(err(&[daily.clone(), weekly]), BLEND_GRANULARITIES_MISMATCH);
        assert_eq!(
            err(&[daily.clone(), totals.clone()]),
            BLEND_GRANULARITIES_MISMATCH
        );
        assert_eq!(err(&[totals, daily.clone()]), BLEND_GRANULARITIES_MISMATCH);

        // One bad query fails the whole batch.
        let unknown = query(&["Sales.nope"], &[], range, Some("day"));
        assert!(answer_batch(&[daily.clone(), unknown], 0).is_err());

        let by_region = query(&["Sales.revenue"], &["Sales.region"], range, Some("day"));
        let batch = answer_batch(&[daily.clone(), by_region.clone()], 0).expect("same granularity");
        assert_eq!(batch.len(), 2);
        for (batched, alone) in batch.iter().zip([&daily, &by_region]) {
            let mut stripped = batched.clone();
            for row in &mut stripped {
                let extra = row.remove("time.day").expect("batched rows carry time.day");
                assert_eq!(Some(&extra), row.get("Sales.date.day"));
            }
            assert_eq!(stripped, rows(alone));
        }
    }

    /// Each bad query is refused with a message that names the problem.
    #[test]
    fn invalid_queries_are_rejected_with_helpful_messages() {
        let range = ["2025-01-01", "2025-01-31"];
        let ok = query(&["Sales.orders"], &[], range, Some("day"));
        let no_range = CubeQuery {
            time_dimensions: vec![TimeDimension {
                date_range: None,
                ..ok.time_dimensions[0].clone()
            }],
            ..ok.clone()
        };
        let no_time = CubeQuery {
            time_dimensions: Vec::new(),
            ..ok.clone()
        };
        let cases = [
            (query(&["Sales.nope"], &[], range, None), "not a member"),
            (
                query(&["Sales.orders"], &["Sales.revenue"], range, None),
                "is a measure, not a dimension",
            ),
            (
                query(&["Sales.region"], &[], range, None),
                "is a dimension, not a measure",
            ),
            (
                query(&["Sales.orders"], &["Sales.date"], range, None),
                "is a time dimension",
            ),
            (
                query(&["Sales.orders"], &[], ["2025-02-30", "2025-03-01"], None),
                "invalid date '2025-02-30'",
            ),
            (
                query(&["Sales.orders"], &[], ["2025-1-01", "2025-03-01"], None),
                "invalid date",
            ),
            (
                query(&["Sales.orders"], &[], ["2025-03-01", "2025-01-01"], None),
                "after its end",
            ),
            (
                query(&["Sales.orders"], &[], ["2000-01-01", "2025-01-01"], None),
                "at most 3700",
            ),
            (
                query(&["Sales.orders"], &[], range, Some("hour")),
                "unknown granularity 'hour'",
            ),
            (
                query(&["Sales.orders"], &[], range, Some("DAY")),
                "unknown granularity 'DAY'",
            ),
            (query(&[], &[], range, None), "Query should contain"),
            (
                with_filter(ok.clone(), "Sales.region", "contains", &["E"]),
                "operator 'contains'",
            ),
            (
                with_filter(ok.clone(), "Sales.orders", "equals", &["1"]),
                "is a measure",
            ),
            (
                with_filter(ok.clone(), "Sales.region", "equals", &[]),
                "at least one value",
            ),
            (no_range, "dateRange is required"),
            (no_time, "timeDimensions"),
        ];
        for (q, expected) in cases {
            let message = answer(&q).expect_err("the query is invalid");
            assert!(
                message.contains(expected),
                "{message:?} should mention {expected:?}"
            );
        }
    }

    #[test]
    fn cents_are_formatted_minimally() {
        assert_eq!(format_cents(123_450), "1234.5");
        assert_eq!(format_cents(123_400), "1234");
        assert_eq!(format_cents(123_405), "1234.05");
        assert_eq!(format_cents(7), "0.07");
    }
}
