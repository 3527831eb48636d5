//! The wire types of the BI protocol: the subset of Cube's REST API that the
//! gateway speaks (`POST /load`, single and multi queries, and `GET /meta`).
//!
//! Both sides use these types: the client in [`crate::bi::client`] and the
//! simulator in [`crate::sim`], so the two can never drift apart.

use serde::{Deserialize, Serialize};

/// One row of an answer, keyed by member name, exactly as the BI returns it.
pub type Row = serde_json::Map<String, serde_json::Value>;

/// One Cube query. Field order and the `skip_serializing_if`s are part of the
/// cache key: the canonical JSON of this struct is what gets hashed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CubeQuery {
    #[serde(default)]
    pub measures: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub time_dimensions: Vec<TimeDimension>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<Filter>,
    /// Cube's array form, `[["Sales.revenue", "desc"], ...]`, which keeps
    /// the priority of its entries; Cube's object form is read too.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "order_entries"
    )]
    pub order: Vec<OrderMember>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u32>,
    /// An IANA name; absent means UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

impl CubeQuery {
    /// The granularity of the first time dimension: what Cube's blending rules look at.
    pub fn granularity(&self) -> Option<&str> {
        self.time_dimensions
            .first()
            .and_then(|td| td.granularity.as_deref())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeDimension {
    pub dimension: String,
    /// `[from, to]`, inclusive, as `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_range: Option<[String; 2]>,
    /// Lower-case: `hour`, `day`, `week`, `month`, `quarter`, `year`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity: Option<String>,
}

/// One filter; filters of a query are ANDed. `operator` is Cube's
/// lower-camel name (`equals`, `notContains`, `gte`, `set`, ...); `set` and
/// `notSet` carry no values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Filter {
    pub member: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// One entry of `order`: a member and `asc` or `desc`, sent as a pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "(String, String)", into = "(String, String)")]
pub struct OrderMember {
    pub member: String,
    pub direction: String,
}

impl From<(String, String)> for OrderMember {
    fn from((member, direction): (String, String)) -> OrderMember {
        OrderMember { member, direction }
    }
}

impl From<OrderMember> for (String, String) {
    fn from(order: OrderMember) -> (String, String) {
        (order.member, order.direction)
    }
}

/// Reads `order` in either of Cube's forms: an array of `[member, direction]`
/// pairs, or an object `{member: direction}` (in its written order).
fn order_entries<'de, D>(deserializer: D) -> Result<Vec<OrderMember>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<OrderMember>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of [member, direction] pairs or an object of member: direction")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = seq.next_element::<OrderMember>()? {
                entries.push(entry);
            }
            Ok(entries)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some((member, direction)) = map.next_entry::<String, String>()? {
                entries.push(OrderMember { member, direction });
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_any(Entries)
}

/// The body of `POST /load`: one query, or a data-blending batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoadRequest {
    Multi {
        #[serde(rename = "queryType")]
        query_type: MultiQueryType,
        query: Vec<CubeQuery>,
    },
    Single {
        query: CubeQuery,
    },
}

/// The only `queryType` the gateway sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MultiQueryType {
    #[serde(rename = "multi")]
    Multi,
}

/// Every shape a `POST /load` answer can take, read leniently: a single
/// answer has `data`, a batch has `results`, and both may instead carry
/// `error` (`"Continue wait"` or a real error). Unknown fields are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<Row>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<QueryResult>>,
}

/// One entry of a batch answer's `results`, matched to its query by position.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryResult {
    #[serde(default)]
    pub data: Vec<Row>,
}

/// The `error` text with which Cube says "still computing, ask again".
pub const CONTINUE_WAIT: &str = "Continue wait";

/// `GET /meta`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetaResponse {
    #[serde(default)]
    pub cubes: Vec<MetaCube>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetaCube {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default)]
    pub measures: Vec<MetaMember>,
    #[serde(default)]
    pub dimensions: Vec<MetaMember>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetaMember {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}
