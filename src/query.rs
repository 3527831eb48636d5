//! The validated query and its canonical key.
//!
//! GraphQL input becomes an [`AggregateQuery`] exactly once, in
//! [`AggregateQuery::parse`]; everything downstream (the dataloader, the cache,
//! the BI client) accepts only validated, normalised values. A [`Planner`] then
//! turns it into the BI query and the [`CacheKey`] that names its answer.

use std::fmt;
use std::sync::Arc;

use chrono::NaiveDate;
use sha2::{Digest, Sha256};

use crate::bi::protocol::{CubeQuery, Filter, TimeDimension};
use crate::catalog::Catalog;
use crate::config::{PlannerSettings, QueryLimits};

/// Why an input was refused. Every variant is the user's to fix (`BAD_USER_INPUT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("`customer` must not be empty")]
    EmptyCustomer,
    #[error("`customer` is longer than {max} characters")]
    CustomerTooLong { max: usize },
    #[error("`customer` must not contain control characters")]
    CustomerControlChars,
    #[error("`dateRange.{field}` is `{value}`, not a date like 2025-01-31")]
    BadDate { field: &'static str, value: String },
    #[error("`dateRange.from` ({from}) is after `dateRange.to` ({to})")]
    RangeReversed { from: NaiveDate, to: NaiveDate },
    #[error("`dateRange` spans {days} days; at most {max} are allowed")]
    RangeTooLong { days: i64, max: u32 },
    #[error("`measures` must name at least one measure")]
    NoMeasures,
    #[error("`{field}` has {count} members; at most {max} are allowed")]
    TooManyMembers {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error("`{value}` in `{field}` is not a member name like Cube.member")]
    MalformedMember { field: &'static str, value: String },
    #[error("`{value}` in `{field}` is not a known {kind}{hint}")]
    UnknownMember {
        field: &'static str,
        value: String,
        kind: &'static str,
        hint: String,
    },
    #[error(
        "`{value}` is a time dimension, so it cannot be in `dimensions`: use `granularity` \
         (DAY, WEEK, MONTH, QUARTER or YEAR) to group by time within `dateRange`"
    )]
    TimeDimension { value: String },
}

/// A `Cube.member` name: two identifiers joined by one dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member(String);

impl Member {
    /// `None` when `value` is not `Cube.member` shaped.
    pub fn parse(value: &str) -> Option<Member> {
        fn identifier(part: &str) -> bool {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        match value.split_once('.') {
            Some((cube, name)) if value.len() <= 128 && identifier(cube) && identifier(name) => {
                Some(Member(value.to_owned()))
            }
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Time buckets, as GraphQL spells them; lower-case on the BI's wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, async_graphql::Enum)]
pub enum Granularity {
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

impl Granularity {
    pub fn as_cube(self) -> &'static str {
        match self {
            Granularity::Day => "day",
            Granularity::Week => "week",
            Granularity::Month => "month",
            Granularity::Quarter => "quarter",
            Granularity::Year => "year",
        }
    }
}

/// An inclusive range of days, `from <= to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DateRange {
    from: NaiveDate,
    to: NaiveDate,
}

impl DateRange {
    pub fn from(&self) -> NaiveDate {
        self.from
    }
    pub fn to(&self) -> NaiveDate {
        self.to
    }
}

/// The raw input, as the GraphQL layer received it.
#[derive(Debug, Clone)]
pub struct RawAggregate<'a> {
    pub customer: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub measures: &'a [String],
    pub dimensions: &'a [String],
    pub granularity: Option<Granularity>,
}

/// A query that passed validation, with member lists sorted and de-duplicated:
/// two inputs that ask the same question are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggregateQuery {
    customer: String,
    range: DateRange,
    measures: Vec<Member>,
    dimensions: Vec<Member>,
    granularity: Option<Granularity>,
}

impl AggregateQuery {
    /// Validates and normalises one input. `catalog`, when the BI's catalog is
    /// known, also rejects members the BI does not have.
    pub fn parse(
        raw: RawAggregate<'_>,
        limits: &QueryLimits,
        catalog: Option<&Catalog>,
    ) -> Result<AggregateQuery, InputError> {
        let customer = raw.customer;
        if customer.trim().is_empty() {
            return Err(InputError::EmptyCustomer);
        }
        if customer.chars().count() > limits.max_customer_len {
            return Err(InputError::CustomerTooLong {
                max: limits.max_customer_len,
            });
        }
        if customer.chars().any(char::is_control) {
            return Err(InputError::CustomerControlChars);
        }

        let from = parse_date("from", raw.from)?;
        let to = parse_date("to", raw.to)?;
        if from > to {
            return Err(InputError::RangeReversed { from, to });
        }
        let days = (to - from).num_days() + 1;
        if days > i64::from(limits.max_range_days) {
            return Err(InputError::RangeTooLong {
                days,
                max: limits.max_range_days,
            });
        }

        if raw.measures.is_empty() {
            return Err(InputError::NoMeasures);
        }
        let measures = parse_members("measures", raw.measures, limits.max_measures)?;
        let dimensions = parse_members("dimensions", raw.dimensions, limits.max_dimensions)?;
        // Known before the catalog is: the BI would refuse it after a paid call.
        if let Some(time) = dimensions
            .iter()
            .find(|member| member.as_str() == limits.time_dimension)
        {
            return Err(InputError::TimeDimension {
                value: time.as_str().to_owned(),
            });
        }
        if let Some(catalog) = catalog {
            for member in &measures {
                catalog.check_measure(member)?;
            }
            for member in &dimensions {
                catalog.check_dimension(member)?;
            }
        }

        Ok(AggregateQuery {
            customer: customer.to_owned(),
            range: DateRange { from, to },
            measures,
            dimensions,
            granularity: raw.granularity,
        })
    }

    pub fn customer(&self) -> &str {
        &self.customer
    }
    pub fn range(&self) -> DateRange {
        self.range
    }
    pub fn measures(&self) -> &[Member] {
        &self.measures
    }
    pub fn dimensions(&self) -> &[Member] {
        &self.dimensions
    }
    pub fn granularity(&self) -> Option<Granularity> {
        self.granularity
    }
}

fn parse_date(field: &'static str, value: &str) -> Result<NaiveDate, InputError> {
    // Exactly `YYYY-MM-DD`: chrono alone would also take `2025-1-5`.
    let well_formed = value.len() == 10
        && value.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    well_formed
        .then(|| NaiveDate::parse_from_str(value, "%Y-%m-%d").ok())
        .flatten()
        .ok_or_else(|| InputError::BadDate {
            field,
            value: truncate_for_message(value),
        })
}

fn parse_members(
    field: &'static str,
    values: &[String],
    max: usize,
) -> Result<Vec<Member>, InputError> {
    let mut members = values
        .iter()
        .map(|value| {
            Member::parse(value).ok_or_else(|| InputError::MalformedMember {
                field,
                value: truncate_for_message(value),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    members.sort();
    members.dedup();
    if members.len() > max {
        return Err(InputError::TooManyMembers {
            field,
            count: members.len(),
            max,
        });
    }
    Ok(members)
}

/// Echoing user input in an error is helpful; echoing a megabyte of it is not.
fn truncate_for_message(value: &str) -> String {
    const MAX: usize = 64;
    let mut cut: String = value.chars().take(MAX).collect();
    if cut.len() < value.len() {
        cut.push('…');
    }
    cut.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The name of one answer in every cache: a SHA-256 over the canonical BI
/// query (customer filter included) and the settings that change the answer.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(Arc<str>);

impl CacheKey {
    /// A key with the given text, for unit tests of code that only names keys.
    #[cfg(test)]
    pub fn for_tests(text: &str) -> CacheKey {
        CacheKey(format!("{text:0>64}").into())
    }

    /// The full hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The first 12 hex digits: enough to tell entries apart in logs and in GraphiQL.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.short())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated query together with the BI query that answers it and its key.
/// Equality and hashing go by the key alone.
#[derive(Debug, Clone)]
pub struct PlannedQuery {
    pub key: CacheKey,
    pub cube: Arc<CubeQuery>,
    pub granularity: Option<Granularity>,
    /// Whose data and which cubes the answer is made of: what an
    /// invalidation by customer or by cube reaches.
    pub scope: Arc<AnswerScope>,
}

/// The customer and the cubes (sorted, once each) one answer is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerScope {
    pub customer: String,
    pub cubes: Vec<String>,
}

impl PartialEq for PlannedQuery {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for PlannedQuery {}
impl std::hash::Hash for PlannedQuery {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

/// Turns validated queries into BI queries and cache keys.
#[derive(Debug, Clone)]
pub struct Planner {
    settings: PlannerSettings,
    /// Hashed into every key: what makes the same query mean something else.
    fingerprint: String,
}

impl Planner {
    /// `bi_identity` names the BI (its URL), so gateways pointed at different
    /// BIs never share entries even when they share a Redis.
    pub fn new(settings: PlannerSettings, bi_identity: &str) -> Planner {
        let fingerprint = format!("v1\n{bi_identity}\n");
        Planner {
            settings,
            fingerprint,
        }
    }

    pub fn row_limit(&self) -> u32 {
        self.settings.row_limit
    }

    pub fn plan(&self, query: &AggregateQuery) -> PlannedQuery {
        let range = query.range();
        let cube = CubeQuery {
            measures: query.measures.iter().map(|m| m.0.clone()).collect(),
            dimensions: query.dimensions.iter().map(|m| m.0.clone()).collect(),
            time_dimensions: vec![TimeDimension {
                dimension: self.settings.time_dimension.clone(),
                date_range: Some([range.from.to_string(), range.to.to_string()]),
                granularity: query.granularity.map(|g| g.as_cube().to_owned()),
            }],
            filters: vec![Filter {
                member: self.settings.customer_member.clone(),
                operator: "equals".to_owned(),
                values: vec![query.customer.clone()],
            }],
            limit: Some(self.settings.row_limit),
        };
        // Serialising a struct with sorted member lists is canonical: field
        // order is fixed by the type, so equal questions hash equally.
        let canonical = serde_json::to_vec(&cube).unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(self.fingerprint.as_bytes());
        hasher.update(&canonical);
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let mut cubes: Vec<String> = cube
            .measures
            .iter()
            .chain(&cube.dimensions)
            .chain(std::iter::once(&self.settings.time_dimension))
            .filter_map(|member| member.split_once('.').map(|(cube, _)| cube.to_owned()))
            .collect();
        cubes.sort_unstable();
        cubes.dedup();
        PlannedQuery {
            key: CacheKey(hex.into()),
            cube: Arc::new(cube),
            granularity: query.granularity,
            scope: Arc::new(AnswerScope {
                customer: query.customer.clone(),
                cubes,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> QueryLimits {
        QueryLimits {
            max_range_days: 366,
            max_measures: 3,
            max_dimensions: 2,
            max_customer_len: 16,
            time_dimension: "Sales.date".into(),
        }
    }

    fn planner() -> Planner {
        Planner::new(
            PlannerSettings {
                customer_member: "Sales.customerId".into(),
                time_dimension: "Sales.date".into(),
                row_limit: 10_000,
            },
            "http://bi/v1",
        )
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| s.to_string()).collect()
    }

    fn parse(
        customer: &str,
        from: &str,
        to: &str,
        measures: &[&str],
        dimensions: &[&str],
    ) -> Result<AggregateQuery, InputError> {
        let measures = strings(measures);
        let dimensions = strings(dimensions);
        AggregateQuery::parse(
            RawAggregate {
                customer,
                from,
                to,
                measures: &measures,
                dimensions: &dimensions,
                granularity: Some(Granularity::Day),
            },
            &limits(),
            None,
        )
    }

    #[test]
    fn each_rule_rejects_with_its_own_error() {
        let ok = ["Sales.revenue"];
        let cases: Vec<(Result<AggregateQuery, InputError>, &str)> = vec![
            (parse("", "2025-01-01", "2025-01-02", &ok, &[]), "empty"),
            (
                parse("a\nb", "2025-01-01", "2025-01-02", &ok, &[]),
                "control",
            ),
            (
                parse(&"x".repeat(17), "2025-01-01", "2025-01-02", &ok, &[]),
                "longer",
            ),
            (
                parse("acme", "2025-1-01", "2025-01-02", &ok, &[]),
                "not a date",
            ),
            (
                parse("acme", "2025-02-30", "2025-03-02", &ok, &[]),
                "not a date",
            ),
            (parse("acme", "2025-01-03", "2025-01-02", &ok, &[]), "after"),
            (parse("acme", "2024-01-01", "2025-01-02", &ok, &[]), "spans"),
            (
                parse("acme", "2025-01-01", "2025-01-02", &[], &[]),
                "at least one",
            ),
            (
                parse("acme", "2025-01-01", "2025-01-02", &["revenue"], &[]),
                "not a member",
            ),
            (
                parse("acme", "2025-01-01", "2025-01-02", &["Sales.a b"], &[]),
                "not a member",
            ),
            (
                parse(
                    "acme",
                    "2025-01-01",
                    "2025-01-02",
                    &["A.a", "A.b", "A.c", "A.d"],
                    &[],
                ),
                "at most 3",
            ),
            (
                parse(
                    "acme",
                    "2025-01-01",
                    "2025-01-02",
                    &ok,
                    &["A.a", "A.b", "A.c"],
                ),
                "at most 2",
            ),
            (
                parse("acme", "2025-01-01", "2025-01-02", &ok, &["Sales.date"]),
                "use `granularity`",
            ),
        ];
        for (result, expected) in cases {
            let err = result.expect_err(expected);
            assert!(err.to_string().contains(expected), "{err} !~ {expected}");
        }
    }

    #[test]
    fn member_order_and_duplicates_do_not_change_the_key() {
        let a = parse(
            "acme",
            "2025-01-01",
            "2025-01-31",
            &["Sales.revenue", "Sales.orders"],
            &["Sales.region", "Sales.product"],
        )
        .expect("valid");
        let b = parse(
            "acme",
            "2025-01-01",
            "2025-01-31",
            &["Sales.orders", "Sales.revenue", "Sales.orders"],
            &["Sales.product", "Sales.region"],
        )
        .expect("valid");
        assert_eq!(planner().plan(&a).key, planner().plan(&b).key);
    }

    #[test]
    fn customer_range_granularity_and_bi_change_the_key() {
        let base = parse("acme", "2025-01-01", "2025-01-31", &["Sales.revenue"], &[]).expect("ok");
        let key = planner().plan(&base).key;
        let other_customer = parse(
            "globex",
            "2025-01-01",
            "2025-01-31",
            &["Sales.revenue"],
            &[],
        )
        .expect("ok");
        let other_range =
            parse("acme", "2025-01-01", "2025-01-30", &["Sales.revenue"], &[]).expect("ok");
        let mut totals = base.clone();
        totals.granularity = None;
        let other_bi = Planner::new(planner().settings.clone(), "http://elsewhere/v1");
        assert_ne!(key, planner().plan(&other_customer).key);
        assert_ne!(key, planner().plan(&other_range).key);
        assert_ne!(key, planner().plan(&totals).key);
        assert_ne!(key, other_bi.plan(&base).key);
    }

    #[test]
    fn plan_sends_the_customer_filter_limit_and_lower_case_granularity() {
        let query = parse("acme", "2025-01-01", "2025-01-31", &["Sales.revenue"], &[]).expect("ok");
        let cube = planner().plan(&query).cube;
        let json = serde_json::to_value(&*cube).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({
                "measures": ["Sales.revenue"],
                "timeDimensions": [{"dimension": "Sales.date",
                                    "dateRange": ["2025-01-01", "2025-01-31"],
                                    "granularity": "day"}],
                "filters": [{"member": "Sales.customerId", "operator": "equals", "values": ["acme"]}],
                "limit": 10000
            })
        );
    }
}
