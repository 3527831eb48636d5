//! The simulated cubes: their members, the granularities they know, and the
//! `GET /meta` answer that describes them.
//!
//! Two cubes over one set of facts (order lines: a customer, a region, a
//! product, a time): `Sales` (the orders) and `Returns` (those of the orders
//! that were returned, dated at their order). Each has its own time
//! dimension and its own customer member, so a gateway must map them apart;
//! a query over both joins them line by line.
//!
//! Everything that names a member lives here, so the query evaluator in
//! [`super::data`] works with enums and never compares member strings itself.

use crate::bi::protocol::{MetaCube, MetaMember, MetaResponse};

/// The cubes the simulator serves, in `/meta` order.
pub const CUBES: [&str; 2] = ["Sales", "Returns"];

/// What one fact is about, whatever cube names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Coordinate {
    Customer,
    Region,
    Product,
}

/// A measure of either cube.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Revenue,
    Orders,
    AvgOrderValue,
    ReturnsCount,
    ReturnsRefund,
}

impl Measure {
    pub const ALL: [Measure; 5] = [
        Measure::Revenue,
        Measure::Orders,
        Measure::AvgOrderValue,
        Measure::ReturnsCount,
        Measure::ReturnsRefund,
    ];

    /// The member name, which is also the row key.
    pub fn name(self) -> &'static str {
        match self {
            Measure::Revenue => "Sales.revenue",
            Measure::Orders => "Sales.orders",
            Measure::AvgOrderValue => "Sales.avgOrderValue",
            Measure::ReturnsCount => "Returns.count",
            Measure::ReturnsRefund => "Returns.refund",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Measure::Revenue => "Sales Revenue",
            Measure::Orders => "Sales Orders",
            Measure::AvgOrderValue => "Sales Avg Order Value",
            Measure::ReturnsCount => "Returns Count",
            Measure::ReturnsRefund => "Returns Refund",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A (non-time) dimension of either cube.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Region,
    Product,
    CustomerId,
    ReturnsProduct,
    ReturnsTenantId,
}

impl Dimension {
    pub const ALL: [Dimension; 5] = [
        Dimension::Region,
        Dimension::Product,
        Dimension::CustomerId,
        Dimension::ReturnsProduct,
        Dimension::ReturnsTenantId,
    ];

    /// The member name, which is also the row key.
    pub fn name(self) -> &'static str {
        match self {
            Dimension::Region => "Sales.region",
            Dimension::Product => "Sales.product",
            Dimension::CustomerId => "Sales.customerId",
            Dimension::ReturnsProduct => "Returns.product",
            Dimension::ReturnsTenantId => "Returns.tenantId",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Dimension::Region => "Sales Region",
            Dimension::Product => "Sales Product",
            Dimension::CustomerId => "Sales Customer Id",
            Dimension::ReturnsProduct => "Returns Product",
            Dimension::ReturnsTenantId => "Returns Tenant Id",
        }
    }

    /// What the dimension's values are.
    pub fn coordinate(self) -> Coordinate {
        match self {
            Dimension::Region => Coordinate::Region,
            Dimension::Product | Dimension::ReturnsProduct => Coordinate::Product,
            Dimension::CustomerId | Dimension::ReturnsTenantId => Coordinate::Customer,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// A time dimension: both are the time of the order line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeDimension {
    SalesDate,
    ReturnedAt,
}

impl TimeDimension {
    pub const ALL: [TimeDimension; 2] = [TimeDimension::SalesDate, TimeDimension::ReturnedAt];

    pub fn name(self) -> &'static str {
        match self {
            TimeDimension::SalesDate => "Sales.date",
            TimeDimension::ReturnedAt => "Returns.returnedAt",
        }
    }

    fn title(self) -> &'static str {
        match self {
            TimeDimension::SalesDate => "Sales Date",
            TimeDimension::ReturnedAt => "Returns Returned At",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The member each cube's tenant is in: what a Cube `queryRewrite` would
/// filter on from the security context.
pub fn customer_member(cube: &str) -> Option<&'static str> {
    match cube {
        "Sales" => Some(Dimension::CustomerId.name()),
        "Returns" => Some(Dimension::ReturnsTenantId.name()),
        _ => None,
    }
}

/// A time bucket size, spelled lower-case on the wire as Cube does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

impl Granularity {
    pub const ALL: [Granularity; 6] = [
        Granularity::Hour,
        Granularity::Day,
        Granularity::Week,
        Granularity::Month,
        Granularity::Quarter,
        Granularity::Year,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Week => "week",
            Granularity::Month => "month",
            Granularity::Quarter => "quarter",
            Granularity::Year => "year",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.name() == name)
    }
}

/// Explains why `name` is not usable where a `wanted` member ("measure",
/// "dimension", ...) was expected, naming what it is instead when it is a
/// member of a cube after all: the message a user needs to fix the query.
pub fn misuse_message(name: &str, wanted: &str) -> String {
    let actual = if Measure::from_name(name).is_some() {
        Some("a measure")
    } else if Dimension::from_name(name).is_some() {
        Some("a dimension")
    } else if TimeDimension::from_name(name).is_some() {
        Some("a time dimension")
    } else {
        None
    };
    match actual {
        Some(actual) => format!("'{name}' is {actual}, not {wanted}"),
        None => format!(
            "'{name}' is not a member of the cubes {} (members: {})",
            CUBES.join(", "),
            member_list()
        ),
    }
}

fn member_list() -> String {
    let measures = Measure::ALL.iter().map(|m| m.name());
    let dimensions = Dimension::ALL.iter().map(|d| d.name());
    let times = TimeDimension::ALL.iter().map(|t| t.name());
    measures
        .chain(dimensions)
        .chain(times)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The answer to `GET /meta`.
pub fn meta() -> MetaResponse {
    let member = |name: &str, title: &str, kind: &str| MetaMember {
        name: name.to_owned(),
        title: Some(title.to_owned()),
        kind: Some(kind.to_owned()),
    };
    let in_cube = |cube: &str, name: &str| name.split('.').next() == Some(cube);
    let cubes = CUBES
        .iter()
        .map(|cube| MetaCube {
            name: (*cube).to_owned(),
            title: Some((*cube).to_owned()),
            measures: Measure::ALL
                .iter()
                .filter(|m| in_cube(cube, m.name()))
                .map(|m| member(m.name(), m.title(), "number"))
                .collect(),
            dimensions: Dimension::ALL
                .iter()
                .filter(|d| in_cube(cube, d.name()))
                .map(|d| member(d.name(), d.title(), "string"))
                .chain(
                    TimeDimension::ALL
                        .iter()
                        .filter(|t| in_cube(cube, t.name()))
                        .map(|t| member(t.name(), t.title(), "time")),
                )
                .collect(),
        })
        .collect();
    MetaResponse { cubes }
}
