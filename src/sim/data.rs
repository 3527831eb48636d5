//! The simulator's data: deterministic order lines, and the evaluation of
//! Cube queries (single and data-blending batches) over them.
//!
//! Every fact is derived from its coordinates (customer, day, region, product)
//! and the data version by a small stable hash, so every `bi-sim` process, and
//! the simulator embedded in every gateway instance, returns the same rows for
//! the same query and version, forever. Version 0 is the data a simulator
//! starts with; a test moves to another (`POST /_sim/data-version`) to make
//! the numbers change, as new orders would. Money is kept in integer cents, so sums are exact and a
//! total always equals the sum of its buckets.
//!
//! One line (a customer's orders of one product in one region on one UTC
//! day) has 1 to 20 orders at one price, and some of them are returned. Each
//! order has its own minute of the day, also derived by the hash, so that
//! hours and other timezones' days are well defined: a query in UTC by day
//! or coarser adds up whole lines, any other one adds up the orders that fall
//! into its local buckets (the same totals, where the buckets are the same).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use chrono::{Datelike, Days, NaiveDate, NaiveDateTime, TimeZone, Timelike};
use chrono_tz::Tz;
use serde_json::Value;

use super::schema::{self, Coordinate, Dimension, Granularity, Measure, TimeDimension};
use crate::bi::protocol::{CubeQuery, Filter, Row};

/// Rows returned when a query sets no `limit`: Cube's default.
pub const DEFAULT_LIMIT: u32 = 10_000;
/// The largest `limit` honoured; larger ones are clamped, as Cube does.
pub const MAX_LIMIT: u32 = 50_000;
/// The longest `dateRange` accepted, in days (a little over ten years).
pub const MAX_RANGE_DAYS: i64 = 3_700;
/// How many lines one query may scan. It bounds the work a single request can
/// cause (a filter can name any number of customers), well above what a
/// ten-year range over the default customers needs (166,500). Queries that
/// look at single orders (by hour, or in another timezone than UTC) cost
/// about ten times more per line, and may scan a tenth of it.
const MAX_SCANNED_FACTS: u64 = 2_000_000;

pub const REGIONS: [&str; 3] = ["EU", "NA", "APAC"];
pub const PRODUCTS: [&str; 3] = ["widget", "gadget", "gizmo"];
/// The customers a query covers when it does not filter on a customer member.
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
    queries
        .iter()
        .map(|query| {
            let mut rows = answer_at(query, version)?;
            let bucket_key = query
                .time_dimensions
                .first()
                .map(|td| format!("{}.{granularity}", td.dimension))
                .unwrap_or_default();
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

/// One query, checked against the cubes and resolved into what to scan and
/// how to group, filter and order it: evaluation never has to reject anything.
#[derive(Debug)]
struct Plan {
    measures: Vec<Measure>,
    dimensions: Vec<Dimension>,
    time: TimeDimension,
    window: Window,
    customers: BTreeSet<String>,
    regions: BTreeSet<String>,
    products: BTreeSet<String>,
    /// Filters on measures: on the aggregated rows, as SQL's HAVING.
    having: Vec<MeasureFilter>,
    order: Vec<(OrderKey, bool)>,
    offset: usize,
    limit: usize,
}

/// The days a query covers (in its timezone), and how it buckets them.
#[derive(Debug, Clone, Copy)]
struct Window {
    from: NaiveDate,
    /// At least 1, at most [`MAX_RANGE_DAYS`].
    days: usize,
    granularity: Option<Granularity>,
    /// `None`: UTC.
    timezone: Option<Tz>,
}

impl Window {
    fn to(self) -> NaiveDate {
        self.from
            .checked_add_days(Days::new(self.days as u64 - 1))
            .unwrap_or(self.from)
    }

    /// Whether whole UTC lines answer the query: UTC, and no bucket finer
    /// than a day.
    fn by_lines(self) -> bool {
        self.timezone.is_none() && self.granularity != Some(Granularity::Hour)
    }
}

#[derive(Debug, Clone, Copy)]
enum OrderKey {
    Measure(Measure),
    Dimension(usize),
    Time,
}

#[derive(Debug, Clone)]
struct MeasureFilter {
    measure: Measure,
    operator: NumberOperator,
    values: Vec<f64>,
}

#[derive(Debug, Clone, Copy)]
enum NumberOperator {
    Equals,
    NotEquals,
    Gt,
    Gte,
    Lt,
    Lte,
    Set,
    NotSet,
}

/// What a group of facts adds up to.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    orders: u64,
    revenue_cents: u64,
    returns: u64,
    refund_cents: u64,
}

impl Totals {
    /// Revenue per order, rounded half up to the cent.
    fn avg_order_value_cents(self) -> u64 {
        // Every group holds at least one order; the fallback only keeps
        // this total.
        (2 * self.revenue_cents + self.orders)
            .checked_div(2 * self.orders)
            .unwrap_or(0)
    }

    /// The value of `measure`, as a number (money in units, not cents).
    fn number(self, measure: Measure) -> f64 {
        match measure {
            Measure::Revenue => self.revenue_cents as f64 / 100.0,
            Measure::Orders => self.orders as f64,
            Measure::AvgOrderValue => self.avg_order_value_cents() as f64 / 100.0,
            Measure::ReturnsCount => self.returns as f64,
            Measure::ReturnsRefund => self.refund_cents as f64 / 100.0,
        }
    }

    /// The value of `measure` as Cube sends it: a string.
    fn text(self, measure: Measure) -> String {
        match measure {
            Measure::Revenue => format_cents(self.revenue_cents),
            Measure::Orders => self.orders.to_string(),
            Measure::AvgOrderValue => format_cents(self.avg_order_value_cents()),
            Measure::ReturnsCount => self.returns.to_string(),
            Measure::ReturnsRefund => format_cents(self.refund_cents),
        }
    }
}

type GroupKey<'a> = (Option<NaiveDateTime>, Vec<&'a str>);

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
        let (time, window) = Window::parse(query)?;
        if measures.is_empty() && dimensions.is_empty() && window.granularity.is_none() {
            // Cube's own wording for an empty query.
            return Err(
                "Query should contain either measures, dimensions or timeDimensions \
                 with granularities in order to be valid"
                    .to_owned(),
            );
        }

        let mut having = Vec::new();
        let mut on_coordinates = Vec::new();
        for filter in &query.filters {
            if let Some(measure) = Measure::from_name(&filter.member) {
                having.push(MeasureFilter::parse(measure, filter)?);
            } else if let Some(dimension) = Dimension::from_name(&filter.member) {
                check_string_filter(filter)?;
                on_coordinates.push((dimension.coordinate(), filter));
            } else if TimeDimension::from_name(&filter.member).is_some() {
                return Err(format!(
                    "bi-sim filters time with dateRange only, not with a filter on '{}'",
                    filter.member
                ));
            } else {
                return Err(schema::misuse_message(
                    &filter.member,
                    "a member that can be filtered",
                ));
            }
        }
        let customers = domain(Coordinate::Customer, &on_coordinates);
        let regions = domain(Coordinate::Region, &on_coordinates);
        let products = domain(Coordinate::Product, &on_coordinates);

        let order = query
            .order
            .iter()
            .map(|entry| {
                let descending = match entry.direction.as_str() {
                    "asc" => false,
                    "desc" => true,
                    other => return Err(format!("order direction '{other}' is not asc or desc")),
                };
                let key = if let Some(m) =
                    Measure::from_name(&entry.member).filter(|m| measures.contains(m))
                {
                    OrderKey::Measure(m)
                } else if let Some(i) = dimensions.iter().position(|d| d.name() == entry.member) {
                    OrderKey::Dimension(i)
                } else if entry.member == time.name() && window.granularity.is_some() {
                    OrderKey::Time
                } else {
                    return Err(format!(
                        "order member '{}' is not in the query",
                        entry.member
                    ));
                };
                Ok((key, descending))
            })
            .collect::<Result<Vec<_>, _>>()?;

        // Every factor is far below u64::MAX; saturating keeps the arithmetic
        // free of overflow panics regardless.
        let scanned_days = if window.by_lines() {
            window.days
        } else {
            window.days + 2
        };
        let scanned = [scanned_days, customers.len(), regions.len(), products.len()]
            .into_iter()
            .map(|n| u64::try_from(n).unwrap_or(u64::MAX))
            .fold(1, u64::saturating_mul);
        let most = if window.by_lines() {
            MAX_SCANNED_FACTS
        } else {
            MAX_SCANNED_FACTS / 10
        };
        if scanned > most {
            return Err(format!(
                "query would scan {scanned} facts; bi-sim scans at most {most} \
                 (narrow the dateRange or the customer filter)"
            ));
        }

        Ok(Plan {
            measures,
            dimensions,
            time,
            window,
            customers,
            regions,
            products,
            having,
            order,
            offset: usize::try_from(query.offset.unwrap_or(0)).unwrap_or(usize::MAX),
            limit: usize::try_from(effective_limit(query.limit)).unwrap_or(usize::MAX),
        })
    }

    fn run(&self, version: u64) -> Vec<Row> {
        // Keyed by (bucket, dimension values in query order): the BTreeMap's
        // order is the default row order, time first, then dimension values.
        let mut groups: BTreeMap<GroupKey<'_>, Totals> = BTreeMap::new();
        let first_day = if self.window.by_lines() {
            self.window.from
        } else {
            self.window.from.pred_opt().unwrap_or(self.window.from)
        };
        let last_day = if self.window.by_lines() {
            self.window.to()
        } else {
            self.window.to().succ_opt().unwrap_or(self.window.to())
        };
        for day in first_day.iter_days().take_while(|d| *d <= last_day) {
            for customer in &self.customers {
                for region in &self.regions {
                    for product in &self.products {
                        let values = self
                            .dimensions
                            .iter()
                            .map(|d| match d.coordinate() {
                                Coordinate::Region => region.as_str(),
                                Coordinate::Product => product.as_str(),
                                Coordinate::Customer => customer.as_str(),
                            })
                            .collect::<Vec<_>>();
                        let line = Line::new(customer, day, region, product, version);
                        if self.window.by_lines() {
                            let bucket = self.window.granularity.map(|g| {
                                bucket_start(g, day.and_hms_opt(0, 0, 0).unwrap_or_default())
                            });
                            let totals = groups.entry((bucket, values)).or_default();
                            line.add_all(totals);
                        } else {
                            for (order, at) in line.orders(day) {
                                let local = self.local(at);
                                if local.date() < self.window.from
                                    || local.date() > self.window.to()
                                {
                                    continue;
                                }
                                let bucket =
                                    self.window.granularity.map(|g| bucket_start(g, local));
                                let totals = groups.entry((bucket, values.clone())).or_default();
                                line.add_one(order, totals);
                            }
                        }
                    }
                }
            }
        }
        let mut rows: Vec<(GroupKey<'_>, Totals)> = groups
            .into_iter()
            .filter(|(_, totals)| self.having.iter().all(|f| f.keeps(*totals)))
            .collect();
        if !self.order.is_empty() {
            // Stable: ties keep the default order.
            rows.sort_by(|a, b| self.compare(a, b));
        }
        rows.into_iter()
            .skip(self.offset)
            .take(self.limit)
            .map(|((bucket, values), totals)| self.row(bucket, &values, totals))
            .collect()
    }

    /// The local time of a UTC instant in the query's timezone.
    fn local(&self, at: NaiveDateTime) -> NaiveDateTime {
        match self.window.timezone {
            None => at,
            Some(tz) => tz.from_utc_datetime(&at).naive_local(),
        }
    }

    fn compare(&self, a: &(GroupKey<'_>, Totals), b: &(GroupKey<'_>, Totals)) -> Ordering {
        for (key, descending) in &self.order {
            let ordering = match key {
                OrderKey::Measure(m) => a.1.number(*m).total_cmp(&b.1.number(*m)),
                OrderKey::Dimension(i) => a.0.1[*i].cmp(b.0.1[*i]),
                OrderKey::Time => a.0.0.cmp(&b.0.0),
            };
            let ordering = if *descending {
                ordering.reverse()
            } else {
                ordering
            };
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        Ordering::Equal
    }

    fn row(&self, bucket: Option<NaiveDateTime>, values: &[&str], totals: Totals) -> Row {
        let mut row = Row::new();
        if let (Some(granularity), Some(bucket)) = (self.window.granularity, bucket) {
            // Cube answers local times without an offset.
            let timestamp = Value::String(bucket.format("%Y-%m-%dT%H:%M:%S.000").to_string());
            row.insert(
                format!("{}.{}", self.time.name(), granularity.name()),
                timestamp.clone(),
            );
            row.insert(self.time.name().to_owned(), timestamp);
        }
        for (dimension, value) in self.dimensions.iter().zip(values) {
            row.insert(
                dimension.name().to_owned(),
                Value::String((*value).to_owned()),
            );
        }
        for measure in &self.measures {
            // Cube returns numbers as strings; so does the sim.
            row.insert(
                measure.name().to_owned(),
                Value::String(totals.text(*measure)),
            );
        }
        row
    }
}

impl Window {
    /// The simulator has no data outside an explicit range, so every query
    /// needs exactly one time dimension, with a `dateRange`.
    fn parse(query: &CubeQuery) -> Result<(TimeDimension, Self), String> {
        let time = match query.time_dimensions.as_slice() {
            [time] => time,
            [] => {
                return Err("bi-sim needs one timeDimensions entry with a dateRange".to_owned());
            }
            more => {
                return Err(format!(
                    "bi-sim supports one timeDimensions entry, got {}",
                    more.len()
                ));
            }
        };
        let dimension = TimeDimension::from_name(&time.dimension)
            .ok_or_else(|| schema::misuse_message(&time.dimension, "a time dimension"))?;
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
        let timezone = match query.timezone.as_deref() {
            None | Some("UTC") => None,
            Some(name) => {
                Some(Tz::from_str(name).map_err(|_| format!("Unknown timezone '{name}'"))?)
            }
        };

        let [from, to] = time.date_range.as_ref().ok_or_else(|| {
            format!(
                "dateRange is required on timeDimensions entry '{}'",
                time.dimension
            )
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
        Ok((
            dimension,
            Window {
                from,
                // Between 1 and MAX_RANGE_DAYS, so it always fits.
                days: usize::try_from(days).unwrap_or(usize::MAX),
                granularity,
                timezone,
            },
        ))
    }
}

impl MeasureFilter {
    fn parse(measure: Measure, filter: &Filter) -> Result<Self, String> {
        let operator = match filter.operator.as_str() {
            "equals" => NumberOperator::Equals,
            "notEquals" => NumberOperator::NotEquals,
            "gt" => NumberOperator::Gt,
            "gte" => NumberOperator::Gte,
            "lt" => NumberOperator::Lt,
            "lte" => NumberOperator::Lte,
            "set" => NumberOperator::Set,
            "notSet" => NumberOperator::NotSet,
            other => {
                return Err(format!(
                    "filter operator '{other}' is not supported on the number '{}'",
                    filter.member
                ));
            }
        };
        let values = filter
            .values
            .iter()
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite())
                    .ok_or_else(|| format!("'{v}' is not a number (filter on '{}')", filter.member))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let needs = match operator {
            NumberOperator::Set | NumberOperator::NotSet => values.is_empty(),
            NumberOperator::Equals | NumberOperator::NotEquals => !values.is_empty(),
            _ => values.len() == 1,
        };
        if !needs {
            return Err(format!(
                "filter '{}' on '{}' has the wrong number of values",
                filter.operator, filter.member
            ));
        }
        Ok(MeasureFilter {
            measure,
            operator,
            values,
        })
    }

    fn keeps(&self, totals: Totals) -> bool {
        let value = totals.number(self.measure);
        let first = self.values.first().copied().unwrap_or(f64::NAN);
        match self.operator {
            NumberOperator::Equals => self.values.contains(&value),
            NumberOperator::NotEquals => !self.values.contains(&value),
            NumberOperator::Gt => value > first,
            NumberOperator::Gte => value >= first,
            NumberOperator::Lt => value < first,
            NumberOperator::Lte => value <= first,
            // Measures are never null.
            NumberOperator::Set => true,
            NumberOperator::NotSet => false,
        }
    }
}

/// String dimensions take every operator but the numeric comparisons.
fn check_string_filter(filter: &Filter) -> Result<(), String> {
    let needs_values = match filter.operator.as_str() {
        "equals" | "notEquals" | "contains" | "notContains" | "startsWith" | "endsWith" => true,
        "set" | "notSet" => false,
        other => {
            return Err(format!(
                "filter operator '{other}' is not supported on the string '{}'",
                filter.member
            ));
        }
    };
    if needs_values == filter.values.is_empty() {
        return Err(format!(
            "filter '{}' on '{}' needs {}",
            filter.operator,
            filter.member,
            if needs_values {
                "at least one value"
            } else {
                "no values"
            }
        ));
    }
    Ok(())
}

/// Whether `value` passes a (checked) string filter. `contains`,
/// `startsWith` and `endsWith` ignore case, as Cube's do (`ILIKE`).
fn passes(filter: &Filter, value: &str) -> bool {
    let lower = value.to_lowercase();
    let any = |test: &dyn Fn(&str) -> bool| filter.values.iter().any(|v| test(&v.to_lowercase()));
    match filter.operator.as_str() {
        "equals" => filter.values.iter().any(|v| v == value),
        "notEquals" => !filter.values.iter().any(|v| v == value),
        "contains" => any(&|v| lower.contains(v)),
        "notContains" => !any(&|v| lower.contains(v)),
        "startsWith" => any(&|v| lower.starts_with(v)),
        "endsWith" => any(&|v| lower.ends_with(v)),
        // Dimensions are never null.
        "set" => true,
        _ => false,
    }
}

/// The values of a coordinate a query covers. Regions and products are a
/// fixed set; customers are open-ended: `equals` filters name exactly the
/// customers to cover (any string), otherwise the default five are used.
/// Several filters on one coordinate are ANDed, as in Cube, whichever
/// cube's member they name.
fn domain(coordinate: Coordinate, filters: &[(Coordinate, &Filter)]) -> BTreeSet<String> {
    let fixed: &[&str] = match coordinate {
        Coordinate::Region => &REGIONS,
        Coordinate::Product => &PRODUCTS,
        Coordinate::Customer => &CUSTOMERS,
    };
    let on_coordinate = || {
        filters
            .iter()
            .filter(move |(c, _)| *c == coordinate)
            .map(|(_, f)| *f)
    };
    let mut equals = on_coordinate().filter(|f| f.operator == "equals");
    let mut values: BTreeSet<String> = match equals.next() {
        Some(first) => first.values.iter().cloned().collect(),
        None => fixed.iter().map(|v| (*v).to_owned()).collect(),
    };
    if coordinate != Coordinate::Customer {
        values.retain(|v| fixed.contains(&v.as_str()));
    }
    for filter in on_coordinate() {
        values.retain(|v| passes(filter, v));
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

/// The start of the bucket of granularity `g` that contains `at`: hours on
/// the hour, days at midnight, weeks on Monday (ISO), quarters in January,
/// April, July and October.
fn bucket_start(g: Granularity, at: NaiveDateTime) -> NaiveDateTime {
    const REASON: &str = "dates parsed from YYYY-MM-DD are far from chrono's limits";
    let day = at.date();
    let first_of_month = |month: u32| {
        NaiveDate::from_ymd_opt(day.year(), month, 1).expect("the first of a month always exists")
    };
    let date = match g {
        Granularity::Hour => {
            return at
                .date()
                .and_hms_opt(at.hour(), 0, 0)
                .expect("an hour of a valid time");
        }
        Granularity::Day => day,
        Granularity::Week => day
            .checked_sub_days(Days::new(u64::from(day.weekday().num_days_from_monday())))
            .expect(REASON),
        Granularity::Month => first_of_month(day.month()),
        Granularity::Quarter => first_of_month(day.month0() / 3 * 3 + 1),
        Granularity::Year => first_of_month(1),
    };
    date.and_hms_opt(0, 0, 0).expect("midnight exists")
}

/// One UTC day's orders of one product to one customer in one region: all at
/// one price, the first `returns` of them returned.
#[derive(Debug, Clone, Copy)]
struct Line<'a> {
    parts: [&'a [u8]; 3],
    day: i32,
    orders: u64,
    price_cents: u64,
    returns: u64,
}

impl<'a> Line<'a> {
    fn new(
        customer: &'a str,
        day: NaiveDate,
        region: &'a str,
        product: &'a str,
        version: u64,
    ) -> Line<'a> {
        let day = day.num_days_from_ce();
        let parts = [customer.as_bytes(), region.as_bytes(), product.as_bytes()];
        // The zero bytes separate the parts so that ("ab", "c") and ("a", "bc")
        // hash differently. Version 0 adds nothing, so its data is the data
        // the simulator always had.
        let day_bytes = day.to_le_bytes();
        let version_bytes = version.to_le_bytes();
        let coordinates: [&[u8]; 7] = [parts[0], &[0], &day_bytes, &[0], parts[1], &[0], parts[2]];
        let versioned: &[&[u8]] = if version == 0 {
            &[]
        } else {
            &[&[0], &version_bytes]
        };
        let all: Vec<&[u8]> = coordinates.iter().chain(versioned).copied().collect();
        let hash = fnv1a(&all);
        let orders = 1 + hash % 20;
        Line {
            parts,
            day,
            orders,
            // A unit price between 10.00 and 99.99, in cents.
            price_cents: 1_000 + (hash >> 8) % 9_000,
            returns: (hash >> 24) % (orders / 5 + 1),
        }
    }

    fn add_all(&self, totals: &mut Totals) {
        totals.orders += self.orders;
        totals.revenue_cents += self.orders * self.price_cents;
        totals.returns += self.returns;
        totals.refund_cents += self.returns * self.price_cents;
    }

    fn add_one(&self, order: u64, totals: &mut Totals) {
        totals.orders += 1;
        totals.revenue_cents += self.price_cents;
        if order < self.returns {
            totals.returns += 1;
            totals.refund_cents += self.price_cents;
        }
    }

    /// Each order and its UTC time: a minute of `day` drawn by the hash.
    fn orders(&self, day: NaiveDate) -> impl Iterator<Item = (u64, NaiveDateTime)> + '_ {
        let midnight = day.and_hms_opt(0, 0, 0).expect("midnight exists");
        (0..self.orders).map(move |order| {
            let minute = fnv1a(&[
                self.parts[0],
                &[0],
                &self.day.to_le_bytes(),
                &[0],
                self.parts[1],
                &[0],
                self.parts[2],
                &[1],
                &order.to_le_bytes(),
            ]) % 1_440;
            (order, midnight + chrono::Duration::minutes(minute as i64))
        })
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
    use crate::bi::protocol::{OrderMember, TimeDimension};

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
                dimension: "Sales.date".to_owned(),
                date_range: Some(range.map(str::to_owned)),
                granularity: granularity.map(str::to_owned),
            }],
            ..CubeQuery::default()
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
                if key == "Sales.orders" || key == "Returns.count" {
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
                query(&["Sales.orders"], &[], range, Some("minute")),
                "unknown granularity 'minute'",
            ),
            (
                query(&["Sales.orders"], &[], range, Some("DAY")),
                "unknown granularity 'DAY'",
            ),
            (query(&[], &[], range, None), "Query should contain"),
            (
                with_filter(ok.clone(), "Sales.region", "gt", &["E"]),
                "operator 'gt' is not supported on the string",
            ),
            (
                with_filter(ok.clone(), "Sales.orders", "contains", &["1"]),
                "operator 'contains' is not supported on the number",
            ),
            (
                with_filter(ok.clone(), "Sales.orders", "gt", &["many"]),
                "not a number",
            ),
            (
                with_filter(ok.clone(), "Sales.date", "equals", &["2025-01-01"]),
                "dateRange only",
            ),
            (
                with_filter(ok.clone(), "Sales.region", "set", &["EU"]),
                "needs no values",
            ),
            (
                CubeQuery {
                    timezone: Some("Mars/Olympus".into()),
                    ..ok.clone()
                },
                "Unknown timezone",
            ),
            (
                CubeQuery {
                    order: vec![OrderMember {
                        member: "Sales.region".into(),
                        direction: "asc".into(),
                    }],
                    ..ok.clone()
                },
                "not in the query",
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

    fn order(q: CubeQuery, entries: &[(&str, &str)]) -> CubeQuery {
        CubeQuery {
            order: entries
                .iter()
                .map(|(member, direction)| OrderMember {
                    member: (*member).to_owned(),
                    direction: (*direction).to_owned(),
                })
                .collect(),
            ..q
        }
    }

    fn in_timezone(q: CubeQuery, timezone: &str) -> CubeQuery {
        CubeQuery {
            timezone: Some(timezone.to_owned()),
            ..q
        }
    }

    fn column<'a>(rows: &'a [Row], key: &str) -> Vec<&'a str> {
        rows.iter().map(|r| text(r, key)).collect()
    }

    /// Every string operator keeps exactly the values it names (the
    /// substring ones without regard to case), as Cube's SQL would.
    #[test]
    fn string_filters_keep_what_their_operator_names() {
        let base = query(
            &["Sales.orders"],
            &["Sales.region"],
            ["2025-01-01", "2025-01-02"],
            None,
        );
        let regions = |operator: &str, values: &[&str]| {
            let rows = rows(&with_filter(base.clone(), "Sales.region", operator, values));
            column(&rows, "Sales.region")
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(regions("equals", &["EU", "NA"]), ["EU", "NA"]);
        assert_eq!(regions("notEquals", &["EU"]), ["APAC", "NA"]);
        assert_eq!(regions("contains", &["a"]), ["APAC", "NA"]);
        assert_eq!(regions("notContains", &["A"]), ["EU"]);
        assert_eq!(regions("startsWith", &["ap"]), ["APAC"]);
        assert_eq!(regions("endsWith", &["U", "c"]), ["APAC", "EU"]);
        assert_eq!(regions("set", &[]), ["APAC", "EU", "NA"]);
        assert!(regions("notSet", &[]).is_empty());
        // Both cubes' product dimensions are one coordinate: ANDed.
        let products = rows(&with_filter(
            with_filter(
                query(
                    &["Sales.orders"],
                    &["Sales.product"],
                    ["2025-01-01", "2025-01-02"],
                    None,
                ),
                "Sales.product",
                "startsWith",
                &["g"],
            ),
            "Returns.product",
            "notEquals",
            &["gizmo"],
        ));
        assert_eq!(column(&products, "Sales.product"), ["gadget"]);
    }

    /// Filters on measures apply to the aggregated rows (as HAVING does).
    #[test]
    fn number_filters_apply_to_the_aggregated_rows() {
        let base = query(
            &["Sales.orders"],
            &["Sales.region"],
            ["2025-01-01", "2025-01-03"],
            Some("day"),
        );
        let all = rows(&base);
        let orders: Vec<u64> = all
            .iter()
            .map(|r| text(r, "Sales.orders").parse().expect("a count"))
            .collect();
        let mut sorted = orders.clone();
        sorted.sort_unstable();
        let pivot = sorted[sorted.len() / 2];
        let kept = |operator: &str, values: &[String]| {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            rows(&with_filter(
                base.clone(),
                "Sales.orders",
                operator,
                &values,
            ))
            .len()
        };
        let count = |test: &dyn Fn(u64) -> bool| orders.iter().filter(|o| test(**o)).count();
        let one = [pivot.to_string()];
        assert_eq!(kept("equals", &one), count(&|o| o == pivot));
        assert_eq!(kept("notEquals", &one), count(&|o| o != pivot));
        assert_eq!(kept("gt", &one), count(&|o| o > pivot));
        assert_eq!(kept("gte", &one), count(&|o| o >= pivot));
        assert_eq!(kept("lt", &one), count(&|o| o < pivot));
        assert_eq!(kept("lte", &one), count(&|o| o <= pivot));
        assert_eq!(kept("set", &[]), all.len());
        assert_eq!(kept("notSet", &[]), 0);
        assert!(count(&|o| o > pivot) > 0 && count(&|o| o < pivot) > 0);
        // Money compares as the number it is, in the query or not.
        let with_revenue = rows(&query(
            &["Sales.revenue"],
            &["Sales.region"],
            ["2025-01-01", "2025-01-03"],
            Some("day"),
        ));
        let mut revenue: Vec<f64> = with_revenue
            .iter()
            .map(|r| text(r, "Sales.revenue").parse().expect("a number"))
            .collect();
        revenue.sort_by(f64::total_cmp);
        let median = revenue[revenue.len() / 2].to_string();
        let above = rows(&with_filter(
            base.clone(),
            "Sales.revenue",
            "gt",
            &[&median],
        ));
        assert_eq!(
            above.len(),
            revenue
                .iter()
                .filter(|r| **r > revenue[revenue.len() / 2])
                .count()
        );
        assert!(!above.is_empty() && above.len() < all.len());
    }

    /// `order` sorts by its entries in turn (ties keep the default order),
    /// then `offset` skips and `limit` cuts.
    #[test]
    fn order_offset_and_limit_shape_the_rows() {
        let base = query(
            &["Sales.revenue", "Sales.orders"],
            &["Sales.product", "Sales.region"],
            ["2025-01-01", "2025-01-05"],
            None,
        );
        let by_revenue = rows(&order(base.clone(), &[("Sales.revenue", "desc")]));
        let revenue: Vec<f64> = by_revenue
            .iter()
            .map(|r| text(r, "Sales.revenue").parse().expect("a number"))
            .collect();
        assert!(revenue.windows(2).all(|w| w[0] >= w[1]), "{revenue:?}");
        let by_region = rows(&order(
            base.clone(),
            &[("Sales.region", "asc"), ("Sales.orders", "asc")],
        ));
        assert_eq!(by_region.len(), 9);
        assert_eq!(column(&by_region[..3], "Sales.region"), ["APAC"; 3]);
        let page = rows(&CubeQuery {
            offset: Some(2),
            limit: Some(3),
            ..order(base.clone(), &[("Sales.revenue", "desc")])
        });
        assert_eq!(page, by_revenue[2..5]);
        let past_the_end = rows(&CubeQuery {
            offset: Some(100),
            ..base.clone()
        });
        assert!(past_the_end.is_empty());
        // The time dimension of the query orders by its buckets.
        let days = query(
            &["Sales.orders"],
            &[],
            ["2025-01-01", "2025-01-03"],
            Some("day"),
        );
        let latest_first = rows(&order(days, &[("Sales.date", "desc")]));
        assert_eq!(
            column(&latest_first, "Sales.date.day"),
            [
                "2025-01-03T00:00:00.000",
                "2025-01-02T00:00:00.000",
                "2025-01-01T00:00:00.000"
            ]
        );
    }

    /// Hours add up to their UTC days exactly, and in UTC the order-by-order
    /// path agrees with whole lines.
    #[test]
    fn hours_add_up_to_their_days() {
        let range = ["2025-01-01", "2025-01-02"];
        let hours = rows(&query(&MEASURES, &["Sales.region"], range, Some("hour")));
        let days = rows(&query(&MEASURES, &["Sales.region"], range, Some("day")));
        assert!(hours.len() > days.len() * 10, "{} hours", hours.len());
        assert_eq!(text(&hours[0], "Sales.date.hour").len(), 23);
        assert!(text(&hours[0], "Sales.date.hour").ends_with(":00:00.000"));
        for day in &days {
            let date = &text(day, "Sales.date.day")[..10];
            let region = text(day, "Sales.region");
            let of_day: Vec<Row> = hours
                .iter()
                .filter(|h| text(h, "Sales.date.hour").starts_with(date))
                .filter(|h| text(h, "Sales.region") == region)
                .cloned()
                .collect();
            for key in ["Sales.revenue", "Sales.orders"] {
                assert_eq!(sum(&of_day, key), sum(std::slice::from_ref(day), key));
            }
        }
        // Forced through single orders (an explicit UTC zone that is not
        // spelt "UTC"), whole days answer the same.
        let by_orders = rows(&in_timezone(
            query(&MEASURES, &["Sales.region"], range, Some("day")),
            "Etc/UTC",
        ));
        assert_eq!(by_orders, days);
    }

    /// A timezone moves the range and every day boundary: a New York day
    /// (UTC-5 in January) is the UTC hours from 05:00 to 04:59 next day.
    #[test]
    fn a_timezone_moves_day_boundaries() {
        let utc_hours = rows(&query(
            &["Sales.orders"],
            &[],
            ["2025-01-01", "2025-01-03"],
            Some("hour"),
        ));
        let new_york = rows(&in_timezone(
            query(
                &["Sales.orders"],
                &[],
                ["2025-01-02", "2025-01-02"],
                Some("day"),
            ),
            "America/New_York",
        ));
        assert_eq!(new_york.len(), 1);
        assert_eq!(
            text(&new_york[0], "Sales.date.day"),
            "2025-01-02T00:00:00.000"
        );
        let window: Vec<Row> = utc_hours
            .iter()
            .filter(|h| {
                let at = text(h, "Sales.date.hour");
                ("2025-01-02T05"..="2025-01-03T04:59").contains(&&at[..13])
            })
            .cloned()
            .collect();
        assert_eq!(sum(&window, "Sales.orders"), sum(&new_york, "Sales.orders"));
        let utc_day = rows(&query(
            &["Sales.orders"],
            &[],
            ["2025-01-02", "2025-01-02"],
            Some("day"),
        ));
        assert_ne!(
            sum(&utc_day, "Sales.orders"),
            sum(&new_york, "Sales.orders")
        );
        // Local hours are local times: a half-hour zone starts its hours at :00
        // of its own clock.
        let kolkata = rows(&in_timezone(
            query(
                &["Sales.orders"],
                &[],
                ["2025-01-02", "2025-01-02"],
                Some("hour"),
            ),
            "Asia/Kolkata",
        ));
        assert_eq!(
            text(&kolkata[0], "Sales.date.hour"),
            "2025-01-02T00:00:00.000"
        );
        assert!(kolkata.len() <= 24);
    }

    /// The Returns cube has its own time dimension and customer member; a
    /// query over both cubes joins them line by line, and a filter on
    /// either cube's customer member scopes the same customers.
    #[test]
    fn the_returns_cube_has_members_of_its_own_and_joins_sales() {
        let range = ["2025-01-01", "2025-01-31"];
        let mut returns = query(
            &["Returns.count", "Returns.refund"],
            &["Returns.product"],
            range,
            Some("month"),
        );
        returns.time_dimensions[0].dimension = "Returns.returnedAt".into();
        let returns = with_filter(returns, "Returns.tenantId", "equals", &["acme"]);
        let answered = rows(&returns);
        assert_eq!(answered.len(), 3);
        assert_eq!(
            text(&answered[0], "Returns.returnedAt.month"),
            "2025-01-01T00:00:00.000"
        );
        let returned = sum(&answered, "Returns.count");
        let orders = sum(
            &rows(&with_filter(
                query(&["Sales.orders"], &[], range, None),
                "Sales.customerId",
                "equals",
                &["acme"],
            )),
            "Sales.orders",
        );
        assert!(returned > 0 && returned < orders, "{returned} of {orders}");

        let joined = with_filter(
            with_filter(
                query(
                    &["Sales.orders", "Returns.count"],
                    &["Sales.product"],
                    range,
                    None,
                ),
                "Sales.customerId",
                "equals",
                &["acme"],
            ),
            "Returns.tenantId",
            "equals",
            &["acme"],
        );
        let joined = rows(&joined);
        assert_eq!(sum(&joined, "Returns.count"), returned);
        assert_eq!(sum(&joined, "Sales.orders"), orders);
        // Two different tenants in the two filters: nobody's rows.
        let crossed = with_filter(
            with_filter(
                query(&["Sales.orders"], &["Returns.product"], range, None),
                "Sales.customerId",
                "equals",
                &["acme"],
            ),
            "Returns.tenantId",
            "equals",
            &["globex"],
        );
        assert!(rows(&crossed).is_empty());
    }
}
