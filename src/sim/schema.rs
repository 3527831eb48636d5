//! The simulated `Sales` cube: its members, the granularities it knows, and
//! the `GET /meta` answer that describes them.
//!
//! Everything that names a member lives here, so the query evaluator in
//! [`super::data`] works with enums and never compares member strings itself.

use crate::bi::protocol::{MetaCube, MetaMember, MetaResponse};

/// The only cube the simulator serves.
pub const CUBE: &str = "Sales";

/// The time dimension that `timeDimensions` entries must name.
pub const TIME_DIMENSION: &str = "Sales.date";

/// A measure of the `Sales` cube.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Revenue,
    Orders,
    AvgOrderValue,
}

impl Measure {
    pub const ALL: [Measure; 3] = [Measure::Revenue, Measure::Orders, Measure::AvgOrderValue];

    /// The member name, which is also the row key.
    pub fn name(self) -> &'static str {
        match self {
            Measure::Revenue => "Sales.revenue",
            Measure::Orders => "Sales.orders",
            Measure::AvgOrderValue => "Sales.avgOrderValue",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Measure::Revenue => "Sales Revenue",
            Measure::Orders => "Sales Orders",
            Measure::AvgOrderValue => "Sales Avg Order Value",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A (non-time) dimension of the `Sales` cube.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Region,
    Product,
    CustomerId,
}

impl Dimension {
    pub const ALL: [Dimension; 3] = [Dimension::Region, Dimension::Product, Dimension::CustomerId];

    /// The member name, which is also the row key.
    pub fn name(self) -> &'static str {
        match self {
            Dimension::Region => "Sales.region",
            Dimension::Product => "Sales.product",
            Dimension::CustomerId => "Sales.customerId",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Dimension::Region => "Sales Region",
            Dimension::Product => "Sales Product",
            Dimension::CustomerId => "Sales Customer Id",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }
}

/// A time bucket size, spelled lower-case on the wire as Cube does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Day,
    Week,
    Month,
    Quarter,
    Year,
}

impl Granularity {
    pub const ALL: [Granularity; 5] = [
        Granularity::Day,
        Granularity::Week,
        Granularity::Month,
        Granularity::Quarter,
        Granularity::Year,
    ];

    pub fn name(self) -> &'static str {
        match self {
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
/// member of the cube after all: the message a user needs to fix the query.
pub fn misuse_message(name: &str, wanted: &str) -> String {
    let actual = if Measure::from_name(name).is_some() {
        Some("a measure")
    } else if Dimension::from_name(name).is_some() {
        Some("a dimension")
    } else if name == TIME_DIMENSION {
        Some("a time dimension")
    } else {
        None
    };
    match actual {
        Some(actual) => format!("'{name}' is {actual}, not {wanted}"),
        None => format!(
            "'{name}' is not a member of cube '{CUBE}' (members: {})",
            member_list()
        ),
    }
}

fn member_list() -> String {
    let measures = Measure::ALL.iter().map(|m| m.name());
    let dimensions = Dimension::ALL.iter().map(|d| d.name());
    measures
        .chain(dimensions)
        .chain([TIME_DIMENSION])
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
    let measures = Measure::ALL
        .iter()
        .map(|m| member(m.name(), m.title(), "number"))
        .collect();
    let dimensions = Dimension::ALL
        .iter()
        .map(|d| member(d.name(), d.title(), "string"))
        .chain([member(TIME_DIMENSION, "Sales Date", "time")])
        .collect();
    MetaResponse {
        cubes: vec![MetaCube {
            name: CUBE.to_owned(),
            title: Some(CUBE.to_owned()),
            measures,
            dimensions,
        }],
    }
}
