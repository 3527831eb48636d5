//! The validated query and its canonical key.
//!
//! GraphQL input becomes an [`AggregateQuery`] exactly once, in
//! [`AggregateQuery::parse`]; everything downstream (the dataloader, the cache,
//! the BI client) accepts only validated, normalised values. A [`Planner`] then
//! turns it into the BI query and the [`CacheKey`] that names its answer.
//!
//! - `filter`: user filters and `order`, and the canonical spelling of values;
//! - `timezone`: IANA names, canonically spelt.

mod filter;
mod timezone;

use std::fmt;
use std::sync::Arc;

use chrono::NaiveDate;
use sha2::{Digest, Sha256};

use crate::bi::TokenScope;
use crate::bi::protocol::{CubeQuery, Filter, OrderMember, TimeDimension};
use crate::catalog::Catalog;
use crate::config::{PlannerSettings, QueryLimits};

pub use filter::{
    FilterOperator, MAX_FILTER_VALUE_CHARS, MemberType, OrderBy, OrderDirection, RawFilter,
    RawOrder, UserFilter, canonical_number,
};
pub use timezone::Timezone;

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
    #[error("`dateRange` spans {days} days; at most {max} are allowed{hint}")]
    RangeTooLong {
        days: i64,
        max: u32,
        hint: &'static str,
    },
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
         (HOUR, DAY, WEEK, MONTH, QUARTER or YEAR) to group by time within `dateRange`"
    )]
    TimeDimension { value: String },
    #[error("cube `{cube}` is not one the gateway may ask (BI_CUBES_FILE does not list it)")]
    UnmappedCube { cube: String },
    #[error(
        "the measures' cubes ({cubes}) have no time dimension for `dateRange` \
         (`timeDimension` in BI_CUBES_FILE)"
    )]
    NoTimeDimension { cubes: String },
    #[error(
        "the measures come from cubes with different time dimensions ({dimensions}): \
         ask them in separate panels"
    )]
    ConflictingTimeDimensions { dimensions: String },
    #[error("`filters` has {count} filters; at most {max} are allowed")]
    TooManyFilters { count: usize, max: usize },
    #[error("the filter on `{member}` has {count} values; at most {max} are allowed")]
    TooManyValues {
        member: String,
        count: usize,
        max: usize,
    },
    #[error(
        "`{member}` is the customer member: the gateway filters it on `customer` \
         itself, and no filter may change that"
    )]
    FilterOnCustomer { member: String },
    #[error("`{member}` is a time dimension: filter time with `dateRange`")]
    FilterOnTimeDimension { member: String },
    #[error("`{operator}` on `{member}` takes {takes}")]
    FilterArity {
        member: String,
        operator: &'static str,
        takes: &'static str,
    },
    #[error("`{operator}` is not for a {kind} member like `{member}`")]
    OperatorNotForType {
        member: String,
        operator: &'static str,
        kind: &'static str,
    },
    #[error("`{value}` is not a valid value for `{member}`: expected {expected}")]
    FilterValue {
        member: String,
        value: String,
        expected: &'static str,
    },
    #[error(
        "`order` names `{member}`, which is not among the query's measures and dimensions{hint}"
    )]
    OrderNotInQuery { member: String, hint: &'static str },
    #[error("`order` names `{member}` twice")]
    OrderTwice { member: String },
    #[error("`limit` is {value}; it must be between 1 and {max}")]
    LimitOutOfRange { value: i64, max: u32 },
    #[error("`offset` is {value}; it must not be negative")]
    NegativeOffset { value: i64 },
    #[error("`timezone` `{value}` is not an IANA timezone name like Europe/Paris or UTC")]
    UnknownTimezone { value: String },
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

    /// The cube it belongs to: the part before the dot.
    pub fn cube(&self) -> &str {
        self.0.split_once('.').map_or(&self.0, |(cube, _)| cube)
    }
}

/// Time buckets, as GraphQL spells them; lower-case on the BI's wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    Hour,
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

impl Granularity {
    pub fn as_cube(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
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

/// The raw input, as the GraphQL layer received it: the contract's first
/// fields here, the richer ones in [`RawOptions`].
#[derive(Debug, Clone, Default)]
pub struct RawAggregate<'a> {
    pub customer: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub measures: &'a [String],
    pub dimensions: &'a [String],
    pub granularity: Option<Granularity>,
}

/// The optional refinements of a raw input (filters, order, limit, offset,
/// timezone); `Default` has none of them.
#[derive(Debug, Clone, Default)]
pub struct RawOptions<'a> {
    pub filters: Vec<RawFilter<'a>>,
    pub order: Vec<RawOrder<'a>>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
    pub timezone: Option<&'a str>,
}

/// A query that passed validation, in canonical form (members sorted and
/// de-duplicated, filters and their values too, numbers and timezone names
/// spelt one way): two inputs that ask the same question are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggregateQuery {
    customer: String,
    range: DateRange,
    measures: Vec<Member>,
    dimensions: Vec<Member>,
    granularity: Option<Granularity>,
    filters: Vec<UserFilter>,
    order: Vec<OrderBy>,
    /// The query's `limit`, or `BI_ROW_LIMIT`.
    limit: u32,
    offset: u32,
    timezone: Timezone,
    /// The time dimension `dateRange` and `granularity` apply to: that of
    /// the measures' cube.
    time_dimension: Member,
    /// The customer member of every tenant-scoped cube the query touches,
    /// sorted: each gets the customer filter.
    customer_members: Vec<Member>,
}

impl AggregateQuery {
    /// Validates and normalises one input without refinements.
    pub fn parse(
        raw: RawAggregate<'_>,
        limits: &QueryLimits,
        catalog: Option<&Catalog>,
    ) -> Result<AggregateQuery, InputError> {
        AggregateQuery::parse_with(raw, RawOptions::default(), limits, catalog)
    }

    /// Validates and normalises one input. `catalog`, when the BI's catalog is
    /// known, also rejects members the BI does not have and filter values
    /// that do not fit their member's type.
    pub fn parse_with(
        raw: RawAggregate<'_>,
        options: RawOptions<'_>,
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
        let (max_days, hint) = if raw.granularity == Some(Granularity::Hour) {
            (
                limits.max_range_days.min(limits.max_hourly_range_days),
                " with granularity HOUR",
            )
        } else {
            (limits.max_range_days, "")
        };
        if days > i64::from(max_days) {
            return Err(InputError::RangeTooLong {
                days,
                max: max_days,
                hint,
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
            .find(|member| limits.cubes.is_time_dimension(member.as_str()))
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

        let filters = parse_filters(&options.filters, limits, catalog)?;
        let time_dimension = time_dimension_of(&measures, limits)?;
        let order = parse_order(
            &options.order,
            &measures,
            &dimensions,
            raw.granularity,
            &time_dimension,
        )?;
        let limit = match options.limit {
            None => limits.row_limit,
            Some(value) => u32::try_from(value)
                .ok()
                .filter(|limit| (1..=limits.row_limit).contains(limit))
                .ok_or(InputError::LimitOutOfRange {
                    value,
                    max: limits.row_limit,
                })?,
        };
        let offset = match options.offset {
            None => 0,
            Some(value) => {
                u32::try_from(value).map_err(|_| InputError::NegativeOffset { value })?
            }
        };
        let timezone = options
            .timezone
            .map(Timezone::parse)
            .transpose()?
            .unwrap_or_default();

        // Every cube the BI query touches gets its customer filter, so no
        // join can reach another tenant's rows.
        let mut cubes: Vec<&str> = measures
            .iter()
            .chain(&dimensions)
            .chain(filters.iter().map(|f| &f.member))
            .chain(std::iter::once(&time_dimension))
            .map(Member::cube)
            .collect();
        cubes.sort_unstable();
        cubes.dedup();
        let mut customer_members = Vec::new();
        for cube in cubes {
            let members = limits
                .cubes
                .get(cube)
                .ok_or_else(|| InputError::UnmappedCube {
                    cube: cube.to_owned(),
                })?;
            customer_members.extend(members.customer_member);
        }
        customer_members.sort();
        customer_members.dedup();

        Ok(AggregateQuery {
            customer: customer.to_owned(),
            range: DateRange { from, to },
            measures,
            dimensions,
            granularity: raw.granularity,
            filters,
            order,
            limit,
            offset,
            timezone,
            time_dimension,
            customer_members,
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
    pub fn filters(&self) -> &[UserFilter] {
        &self.filters
    }
    pub fn order(&self) -> &[OrderBy] {
        &self.order
    }
    /// The most rows the answer has: the query's `limit`, or `BI_ROW_LIMIT`.
    pub fn limit(&self) -> u32 {
        self.limit
    }
    pub fn offset(&self) -> u32 {
        self.offset
    }
    pub fn timezone(&self) -> Timezone {
        self.timezone
    }
    pub fn time_dimension(&self) -> &Member {
        &self.time_dimension
    }
    pub fn customer_members(&self) -> &[Member] {
        &self.customer_members
    }
}

/// The time dimension of the measures' cubes: exactly one, or the query is
/// ambiguous (or has none to apply `dateRange` to).
fn time_dimension_of(measures: &[Member], limits: &QueryLimits) -> Result<Member, InputError> {
    let mut cubes: Vec<&str> = measures.iter().map(Member::cube).collect();
    cubes.dedup();
    let mut found: Vec<Member> = Vec::new();
    for cube in &cubes {
        let members = limits
            .cubes
            .get(cube)
            .ok_or_else(|| InputError::UnmappedCube {
                cube: (*cube).to_owned(),
            })?;
        if let Some(time) = members.time_dimension
            && !found.contains(&time)
        {
            found.push(time);
        }
    }
    match found.len() {
        0 => Err(InputError::NoTimeDimension {
            cubes: cubes.join(", "),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(InputError::ConflictingTimeDimensions {
            dimensions: found
                .iter()
                .map(Member::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn parse_filters(
    raw: &[RawFilter<'_>],
    limits: &QueryLimits,
    catalog: Option<&Catalog>,
) -> Result<Vec<UserFilter>, InputError> {
    if raw.len() > limits.max_filters {
        return Err(InputError::TooManyFilters {
            count: raw.len(),
            max: limits.max_filters,
        });
    }
    let mut filters = raw
        .iter()
        .map(|raw| {
            let member = Member::parse(raw.member).ok_or_else(|| InputError::MalformedMember {
                field: "filters",
                value: truncate_for_message(raw.member),
            })?;
            // Known before the catalog is: these two are refused whatever the BI says.
            if limits.cubes.is_customer_member(member.as_str()) {
                return Err(InputError::FilterOnCustomer {
                    member: member.as_str().to_owned(),
                });
            }
            if limits.cubes.is_time_dimension(member.as_str()) {
                return Err(InputError::FilterOnTimeDimension {
                    member: member.as_str().to_owned(),
                });
            }
            let kind = match catalog {
                Some(catalog) => catalog.filter_type(&member)?,
                None => MemberType::Unknown,
            };
            if kind == MemberType::Time {
                return Err(InputError::FilterOnTimeDimension {
                    member: member.as_str().to_owned(),
                });
            }
            filter::canonical_filter(
                member,
                raw.operator,
                raw.values,
                kind,
                limits.max_filter_values,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    // ANDed: their order does not matter, and a repeated one adds nothing.
    filters.sort();
    filters.dedup();
    Ok(filters)
}

fn parse_order(
    raw: &[RawOrder<'_>],
    measures: &[Member],
    dimensions: &[Member],
    granularity: Option<Granularity>,
    time_dimension: &Member,
) -> Result<Vec<OrderBy>, InputError> {
    let mut order: Vec<OrderBy> = Vec::with_capacity(raw.len());
    for entry in raw {
        let member = Member::parse(entry.member).ok_or_else(|| InputError::MalformedMember {
            field: "order",
            value: truncate_for_message(entry.member),
        })?;
        let in_query = measures.contains(&member)
            || dimensions.contains(&member)
            || (granularity.is_some() && &member == time_dimension);
        if !in_query {
            let hint = if &member == time_dimension {
                " (the time dimension can be ordered by with a `granularity`)"
            } else {
                ""
            };
            return Err(InputError::OrderNotInQuery {
                member: member.as_str().to_owned(),
                hint,
            });
        }
        if order.iter().any(|o| o.member == member) {
            return Err(InputError::OrderTwice {
                member: member.as_str().to_owned(),
            });
        }
        order.push(OrderBy {
            member,
            direction: entry.direction,
        });
    }
    Ok(order)
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
    /// The credentials its BI request carries: a BI request holds queries
    /// of one token scope only.
    pub token_scope: TokenScope,
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
    /// `bi_identity` names the BI (its URL) and the gateway's credentials,
    /// so gateways pointed at different BIs, or with other tokens, never
    /// share entries even when they share a Redis.
    pub fn new(settings: PlannerSettings, bi_identity: &str) -> Planner {
        let fingerprint = format!("v1\n{bi_identity}\n");
        Planner {
            settings,
            fingerprint,
        }
    }

    pub fn plan(&self, query: &AggregateQuery) -> PlannedQuery {
        let range = query.range();
        let mut filters: Vec<Filter> = query
            .customer_members
            .iter()
            .map(|member| Filter {
                member: member.0.clone(),
                operator: "equals".to_owned(),
                values: vec![query.customer.clone()],
            })
            .chain(query.filters.iter().map(|filter| Filter {
                member: filter.member.0.clone(),
                operator: filter.operator.as_cube().to_owned(),
                values: filter.values.clone(),
            }))
            .collect();
        filters.sort();
        let cube = CubeQuery {
            measures: query.measures.iter().map(|m| m.0.clone()).collect(),
            dimensions: query.dimensions.iter().map(|m| m.0.clone()).collect(),
            time_dimensions: vec![TimeDimension {
                dimension: query.time_dimension.0.clone(),
                date_range: Some([range.from.to_string(), range.to.to_string()]),
                granularity: query.granularity.map(|g| g.as_cube().to_owned()),
            }],
            filters,
            order: query
                .order
                .iter()
                .map(|o| OrderMember {
                    member: o.member.0.clone(),
                    direction: o.direction.as_cube().to_owned(),
                })
                .collect(),
            limit: Some(query.limit),
            offset: (query.offset > 0).then_some(query.offset),
            timezone: query.timezone.as_cube().map(str::to_owned),
        };
        let token_scope = if self.settings.customer_tokens {
            TokenScope::Customer(query.customer.as_str().into())
        } else {
            TokenScope::Shared
        };
        // Serialising a struct with sorted member lists is canonical: field
        // order is fixed by the type, so equal questions hash equally.
        let canonical = serde_json::to_vec(&cube).unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(self.fingerprint.as_bytes());
        if let TokenScope::Customer(customer) = &token_scope {
            // The token's security context changes what the BI answers.
            // Customers have no control characters, so lines stay apart.
            hasher.update(format!("token-scope customer:{customer}\n").as_bytes());
        }
        hasher.update(&canonical);
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        // Every cube the BI query names, its filters' included.
        let mut cubes: Vec<String> = cube
            .measures
            .iter()
            .chain(&cube.dimensions)
            .chain(cube.time_dimensions.iter().map(|td| &td.dimension))
            .chain(cube.filters.iter().map(|f| &f.member))
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
            token_scope,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cubes::CubeMap;

    fn member(name: &str) -> Member {
        Member::parse(name).expect("a member")
    }

    fn limits() -> QueryLimits {
        QueryLimits {
            max_range_days: 366,
            max_hourly_range_days: 7,
            max_measures: 3,
            max_dimensions: 2,
            max_customer_len: 16,
            max_filters: 3,
            max_filter_values: 4,
            row_limit: 10_000,
            cubes: Arc::new(CubeMap::uniform(
                member("Sales.date"),
                member("Sales.customerId"),
            )),
        }
    }

    /// Sales and Returns with members of their own, and a Regions cube of
    /// reference data.
    fn two_cubes() -> QueryLimits {
        let path =
            std::env::temp_dir().join(format!("cubes-{}.json", uuid::Uuid::new_v4().simple()));
        std::fs::write(
            &path,
            r#"{"cubes": {"Sales": {"timeDimension": "Sales.date", "customerMember": "Sales.customerId"},
                          "Returns": {"timeDimension": "Returns.returnedAt", "customerMember": "Returns.tenantId"},
                          "Regions": {"tenantScoped": false}}}"#,
        )
        .expect("a temp file");
        let cubes = CubeMap::from_file(&path.to_string_lossy()).expect("a valid file");
        QueryLimits {
            cubes: Arc::new(cubes),
            ..limits()
        }
    }

    fn planner() -> Planner {
        Planner::new(
            PlannerSettings {
                customer_tokens: false,
            },
            "http://bi/v1",
        )
    }

    fn catalog(limits: &QueryLimits) -> Catalog {
        Catalog::new(crate::sim::meta(), Arc::clone(&limits.cubes))
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

    /// One panel's refinements, written compactly: `(member, operator,
    /// values)` filters and `(member, direction)` orders.
    #[derive(Default, Clone)]
    struct Refined {
        dimensions: Vec<&'static str>,
        granularity: Option<Granularity>,
        filters: Vec<(&'static str, FilterOperator, Vec<&'static str>)>,
        order: Vec<(&'static str, OrderDirection)>,
        limit: Option<i64>,
        offset: Option<i64>,
        timezone: Option<&'static str>,
    }

    fn refined(
        limits: &QueryLimits,
        measures: &[&str],
        with: &Refined,
    ) -> Result<AggregateQuery, InputError> {
        let measures = strings(measures);
        let dimensions = strings(&with.dimensions);
        let values: Vec<Vec<String>> = with.filters.iter().map(|f| strings(&f.2)).collect();
        let catalog = catalog(limits);
        AggregateQuery::parse_with(
            RawAggregate {
                customer: "acme",
                from: "2025-01-01",
                to: "2025-01-07",
                measures: &measures,
                dimensions: &dimensions,
                granularity: with.granularity,
            },
            RawOptions {
                filters: with
                    .filters
                    .iter()
                    .zip(&values)
                    .map(|((member, operator, _), values)| RawFilter {
                        member,
                        operator: *operator,
                        values,
                    })
                    .collect(),
                order: with
                    .order
                    .iter()
                    .map(|(member, direction)| RawOrder {
                        member,
                        direction: *direction,
                    })
                    .collect(),
                limit: with.limit,
                offset: with.offset,
                timezone: with.timezone,
            },
            limits,
            Some(&catalog),
        )
    }

    fn key_of(with: &Refined) -> CacheKey {
        let query = refined(&limits(), &["Sales.revenue", "Sales.orders"], with).expect("valid");
        planner().plan(&query).key
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
                    &["Sales.a", "Sales.b", "Sales.c", "Sales.d"],
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

    /// Each rule of the refinements answers with its own error.
    #[test]
    fn each_refinement_rule_rejects_with_its_own_error() {
        use FilterOperator::*;
        let filter = |member, operator, values: &[&'static str]| Refined {
            filters: vec![(member, operator, values.to_vec())],
            ..Refined::default()
        };
        let cases: Vec<(Refined, &str)> = vec![
            (
                filter("Sales.customerId", Equals, &["globex"]),
                "customer member",
            ),
            (filter("Sales.customerId", NotSet, &[]), "customer member"),
            (filter("Sales.date", Equals, &["2025-01-01"]), "dateRange"),
            (filter("Sales.city", Equals, &["Paris"]), "not a known"),
            (filter("Sales.region", Gt, &["1"]), "not for a string"),
            (filter("Sales.orders", Equals, &["many"]), "a number"),
            (filter("Sales.orders", Contains, &["1"]), "not for a number"),
            (filter("Sales.region", Set, &["EU"]), "no values"),
            (filter("region", Equals, &["EU"]), "not a member name"),
            (
                filter("Sales.region", Equals, &["a", "b", "c", "d", "e"]),
                "at most 4",
            ),
            (
                Refined {
                    filters: vec![
                        ("Sales.region", Equals, vec!["EU"]),
                        ("Sales.product", Equals, vec!["widget"]),
                        ("Sales.orders", Gt, vec!["1"]),
                        ("Sales.revenue", Gt, vec!["1"]),
                    ],
                    ..Refined::default()
                },
                "at most 3",
            ),
            (
                Refined {
                    order: vec![("Sales.region", OrderDirection::Asc)],
                    ..Refined::default()
                },
                "not among the query's",
            ),
            (
                Refined {
                    order: vec![("Sales.date", OrderDirection::Asc)],
                    ..Refined::default()
                },
                "with a `granularity`",
            ),
            (
                Refined {
                    order: vec![
                        ("Sales.orders", OrderDirection::Asc),
                        ("Sales.orders", OrderDirection::Desc),
                    ],
                    ..Refined::default()
                },
                "twice",
            ),
            (
                Refined {
                    limit: Some(0),
                    ..Refined::default()
                },
                "between 1 and 10000",
            ),
            (
                Refined {
                    limit: Some(10_001),
                    ..Refined::default()
                },
                "between 1 and 10000",
            ),
            (
                Refined {
                    offset: Some(-1),
                    ..Refined::default()
                },
                "not be negative",
            ),
            (
                Refined {
                    timezone: Some("Mars/Olympus"),
                    ..Refined::default()
                },
                "IANA",
            ),
        ];
        for (with, expected) in cases {
            let err =
                refined(&limits(), &["Sales.revenue", "Sales.orders"], &with).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err} !~ {expected}");
        }
        // HOUR has a range of its own.
        let hourly = |to: &str| {
            let measures = strings(&["Sales.orders"]);
            AggregateQuery::parse(
                RawAggregate {
                    customer: "acme",
                    from: "2025-01-01",
                    to,
                    measures: &measures,
                    dimensions: &[],
                    granularity: Some(Granularity::Hour),
                },
                &limits(),
                None,
            )
        };
        assert!(hourly("2025-01-07").is_ok());
        let err = hourly("2025-01-08").expect_err("eight days by the hour");
        assert!(err.to_string().contains("at most 7"), "{err}");
        assert!(err.to_string().contains("HOUR"), "{err}");
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

    /// Filters in another order, values in another order, and equivalent
    /// spellings (numbers, timezone names, the default limit, offset and
    /// timezone spelt out) ask the same question.
    #[test]
    fn equivalent_refinements_share_a_key() {
        use FilterOperator::*;
        let base = Refined {
            dimensions: vec!["Sales.region"],
            filters: vec![
                ("Sales.region", Equals, vec!["EU", "NA"]),
                ("Sales.orders", Gte, vec!["100"]),
            ],
            order: vec![("Sales.revenue", OrderDirection::Desc)],
            timezone: Some("America/New_York"),
            ..Refined::default()
        };
        let same = [
            Refined {
                filters: vec![
                    ("Sales.orders", Gte, vec!["100"]),
                    ("Sales.region", Equals, vec!["NA", "EU", "NA"]),
                ],
                ..base.clone()
            },
            Refined {
                filters: vec![
                    ("Sales.region", Equals, vec!["EU", "NA"]),
                    ("Sales.orders", Gte, vec!["1.00e2"]),
                    ("Sales.orders", Gte, vec!["+100.0"]),
                ],
                ..base.clone()
            },
            Refined {
                timezone: Some("america/new_york"),
                limit: Some(10_000),
                offset: Some(0),
                ..base.clone()
            },
        ];
        let key = key_of(&base);
        for (i, with) in same.iter().enumerate() {
            assert_eq!(key_of(with), key, "spelling {i}");
        }
        let utc = Refined::default();
        for spelt in ["UTC", "Etc/UTC", "utc", "Zulu"] {
            let with = Refined {
                timezone: Some(spelt),
                ..utc.clone()
            };
            assert_eq!(key_of(&with), key_of(&utc), "{spelt}");
        }
        // ... and without refinements, the key is that of `parse`.
        let plain = refined(&limits(), &["Sales.revenue", "Sales.orders"], &utc).expect("valid");
        assert_eq!(plain, {
            let measures = strings(&["Sales.revenue", "Sales.orders"]);
            AggregateQuery::parse(
                RawAggregate {
                    customer: "acme",
                    from: "2025-01-01",
                    to: "2025-01-07",
                    measures: &measures,
                    dimensions: &[],
                    granularity: None,
                },
                &limits(),
                None,
            )
            .expect("valid")
        });
    }

    /// Different filters, orders, limits, offsets and timezones never share.
    #[test]
    fn different_refinements_never_share_a_key() {
        use FilterOperator::*;
        let base = Refined {
            dimensions: vec!["Sales.region"],
            filters: vec![("Sales.region", Equals, vec!["EU"])],
            ..Refined::default()
        };
        let others = [
            Refined {
                filters: vec![("Sales.region", NotEquals, vec!["EU"])],
                ..base.clone()
            },
            Refined {
                filters: vec![("Sales.region", Equals, vec!["eu"])],
                ..base.clone()
            },
            Refined {
                filters: vec![("Sales.region", Equals, vec!["EU", "NA"])],
                ..base.clone()
            },
            Refined {
                filters: vec![],
                ..base.clone()
            },
            Refined {
                order: vec![("Sales.revenue", OrderDirection::Asc)],
                ..base.clone()
            },
            Refined {
                order: vec![("Sales.revenue", OrderDirection::Desc)],
                ..base.clone()
            },
            Refined {
                order: vec![
                    ("Sales.revenue", OrderDirection::Asc),
                    ("Sales.region", OrderDirection::Asc),
                ],
                ..base.clone()
            },
            Refined {
                order: vec![
                    ("Sales.region", OrderDirection::Asc),
                    ("Sales.revenue", OrderDirection::Asc),
                ],
                ..base.clone()
            },
            Refined {
                limit: Some(5),
                ..base.clone()
            },
            Refined {
                offset: Some(5),
                ..base.clone()
            },
            Refined {
                timezone: Some("Europe/Paris"),
                ..base.clone()
            },
            Refined {
                timezone: Some("Europe/Berlin"),
                ..base.clone()
            },
            Refined {
                granularity: Some(Granularity::Hour),
                ..base.clone()
            },
        ];
        let mut keys = vec![key_of(&base)];
        for with in &others {
            let key = key_of(with);
            assert!(!keys.contains(&key), "{key:?} repeats");
            keys.push(key);
        }
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

    /// With minted tokens, each query's token scope is its customer, and
    /// the scope is part of the key.
    #[test]
    fn minted_tokens_scope_each_query_to_its_customer() {
        let minting = Planner::new(
            PlannerSettings {
                customer_tokens: true,
            },
            "http://bi/v1",
        );
        let query = parse("acme", "2025-01-01", "2025-01-31", &["Sales.revenue"], &[]).expect("ok");
        let minted = minting.plan(&query);
        assert_eq!(minted.token_scope, TokenScope::Customer("acme".into()));
        assert_eq!(planner().plan(&query).token_scope, TokenScope::Shared);
        assert_ne!(minted.key, planner().plan(&query).key);
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

    /// The refinements map one to one onto Cube's query: lower-camel
    /// operators, `order` as pairs, `limit`, `offset`, `timezone`.
    #[test]
    fn plan_sends_filters_order_limit_offset_and_timezone() {
        use FilterOperator::*;
        let query = refined(
            &limits(),
            &["Sales.revenue"],
            &Refined {
                dimensions: vec!["Sales.product"],
                granularity: Some(Granularity::Hour),
                filters: vec![
                    ("Sales.product", StartsWith, vec!["g"]),
                    ("Sales.revenue", Lt, vec!["2.50"]),
                    ("Sales.region", NotSet, vec![]),
                ],
                order: vec![
                    ("Sales.date", OrderDirection::Desc),
                    ("Sales.revenue", OrderDirection::Asc),
                ],
                limit: Some(20),
                offset: Some(40),
                timezone: Some("asia/kolkata"),
            },
        )
        .expect("valid");
        let json = serde_json::to_value(&*planner().plan(&query).cube).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({
                "measures": ["Sales.revenue"],
                "dimensions": ["Sales.product"],
                "timeDimensions": [{"dimension": "Sales.date",
                                    "dateRange": ["2025-01-01", "2025-01-07"],
                                    "granularity": "hour"}],
                "filters": [
                    {"member": "Sales.customerId", "operator": "equals", "values": ["acme"]},
                    {"member": "Sales.product", "operator": "startsWith", "values": ["g"]},
                    {"member": "Sales.region", "operator": "notSet"},
                    {"member": "Sales.revenue", "operator": "lt", "values": ["2.5"]},
                ],
                "order": [["Sales.date", "desc"], ["Sales.revenue", "asc"]],
                "limit": 20,
                "offset": 40,
                "timezone": "Asia/Kolkata"
            })
        );
    }

    /// With a cubes file, each cube has its own time dimension and customer
    /// member; a query over two tenant cubes carries both customer filters;
    /// a cube of reference data adds none; unlisted cubes and measures of
    /// cubes with different time dimensions are refused.
    #[test]
    fn every_cube_gets_its_own_members_and_every_customer_filter() {
        let limits = two_cubes();
        let plan = |measures: &[&str], with: &Refined| {
            let query = refined(&limits, measures, with).expect("valid");
            planner().plan(&query)
        };
        let filters = |planned: &PlannedQuery| -> Vec<String> {
            planned
                .cube
                .filters
                .iter()
                .map(|f| format!("{} {} {:?}", f.member, f.operator, f.values))
                .collect()
        };

        let returns = plan(&["Returns.count"], &Refined::default());
        assert_eq!(
            returns.cube.time_dimensions[0].dimension,
            "Returns.returnedAt"
        );
        assert_eq!(filters(&returns), ["Returns.tenantId equals [\"acme\"]"]);
        assert_eq!(returns.scope.cubes, ["Returns"]);

        let joined = plan(
            &["Sales.revenue"],
            &Refined {
                dimensions: vec!["Returns.product"],
                ..Refined::default()
            },
        );
        assert_eq!(joined.cube.time_dimensions[0].dimension, "Sales.date");
        assert_eq!(
            filters(&joined),
            [
                "Returns.tenantId equals [\"acme\"]",
                "Sales.customerId equals [\"acme\"]"
            ]
        );
        assert_eq!(joined.scope.cubes, ["Returns", "Sales"]);

        // A filter's cube is touched too.
        let filtered = plan(
            &["Sales.revenue"],
            &Refined {
                filters: vec![("Returns.product", FilterOperator::Equals, vec!["widget"])],
                ..Refined::default()
            },
        );
        assert_eq!(filters(&filtered).len(), 3, "{:?}", filters(&filtered));
        assert_eq!(filtered.scope.cubes, ["Returns", "Sales"]);

        let measures = strings(&["Sales.revenue", "Returns.count"]);
        let err = AggregateQuery::parse(
            RawAggregate {
                customer: "acme",
                from: "2025-01-01",
                to: "2025-01-02",
                measures: &measures,
                ..RawAggregate::default()
            },
            &limits,
            None,
        )
        .expect_err("two time dimensions");
        assert!(
            err.to_string().contains("different time dimensions"),
            "{err}"
        );
        for (measures, expected) in [
            (vec!["Other.count"], "not one the gateway may ask"),
            (vec!["Regions.count"], "no time dimension"),
        ] {
            let measures = strings(&measures);
            let err = AggregateQuery::parse(
                RawAggregate {
                    customer: "acme",
                    from: "2025-01-01",
                    to: "2025-01-02",
                    measures: &measures,
                    ..RawAggregate::default()
                },
                &limits,
                None,
            )
            .expect_err(expected);
            assert!(err.to_string().contains(expected), "{err}");
        }
        // Either cube's customer member is refused in filters, and either
        // time dimension in dimensions.
        for (field, member) in [
            ("filters", "Returns.tenantId"),
            ("dimensions", "Returns.returnedAt"),
        ] {
            let with = if field == "filters" {
                Refined {
                    filters: vec![(member, FilterOperator::Equals, vec!["globex"])],
                    ..Refined::default()
                }
            } else {
                Refined {
                    dimensions: vec![member],
                    ..Refined::default()
                }
            };
            assert!(
                refined(&limits, &["Sales.revenue"], &with).is_err(),
                "{member}"
            );
        }
    }
}
