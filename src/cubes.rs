//! Which members scope each cube's questions: the time dimension that
//! `dateRange` and `granularity` apply to, and the customer member that the
//! gateway's tenant filter is on.
//!
//! Without `BI_CUBES_FILE`, `BI_TIME_DIMENSION` and `BI_CUSTOMER_MEMBER`
//! apply to every cube ([`CubeMap::Uniform`]). With it, each listed cube has
//! its own, and a cube the file does not list cannot be asked at all
//! ([`CubeMap::PerCube`]): a cube nobody mapped is never queried unscoped.
//!
//! The file is JSON or TOML:
//!
//! ```toml
//! [cubes.Sales]
//! timeDimension = "Sales.date"
//! customerMember = "Sales.customerId"
//!
//! [cubes.Regions]        # reference data that belongs to no customer
//! tenantScoped = false
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::bi::protocol::MetaResponse;
use crate::query::Member;

/// The members of one cube.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CubeMembers {
    /// What `dateRange` and `granularity` apply to when the cube's measures
    /// are asked; `None`: its measures cannot be asked (a cube of reference
    /// data, used through its dimensions).
    pub time_dimension: Option<Member>,
    /// What the gateway's customer filter is on; `None`: the cube holds no
    /// customer's data (`tenantScoped = false`).
    pub customer_member: Option<Member>,
}

/// Every cube's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CubeMap {
    /// No `BI_CUBES_FILE`: one time dimension and one customer member for
    /// every cube.
    Uniform {
        time_dimension: Member,
        customer_member: Member,
    },
    /// `BI_CUBES_FILE`: only the listed cubes may be asked.
    PerCube(BTreeMap<String, CubeMembers>),
}

/// The file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CubesFile {
    cubes: BTreeMap<String, CubeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CubeEntry {
    #[serde(default)]
    time_dimension: Option<String>,
    #[serde(default)]
    customer_member: Option<String>,
    #[serde(default = "yes")]
    tenant_scoped: bool,
}

fn yes() -> bool {
    true
}

impl CubeMap {
    /// The mapping of a gateway started without `BI_CUBES_FILE`.
    pub fn uniform(time_dimension: Member, customer_member: Member) -> CubeMap {
        CubeMap::Uniform {
            time_dimension,
            customer_member,
        }
    }

    /// Reads `BI_CUBES_FILE`: `.toml` is TOML, `.json` JSON, anything else
    /// is tried as JSON, then as TOML. The error says what is wrong, in
    /// words an operator can act on.
    pub fn from_file(path: &str) -> Result<CubeMap, String> {
        let text =
            std::fs::read_to_string(path).map_err(|err| format!("cannot read `{path}`: {err}"))?;
        let lower = path.to_ascii_lowercase();
        let file: CubesFile = if lower.ends_with(".toml") {
            toml::from_str(&text).map_err(|err| format!("`{path}` is not valid TOML: {err}"))?
        } else if lower.ends_with(".json") {
            serde_json::from_str(&text)
                .map_err(|err| format!("`{path}` is not valid JSON: {err}"))?
        } else {
            match serde_json::from_str(&text) {
                Ok(file) => file,
                Err(json) => toml::from_str(&text).map_err(|toml| {
                    format!("`{path}` is neither JSON ({json}) nor TOML ({toml})")
                })?,
            }
        };
        CubeMap::from_entries(file.cubes)
    }

    fn from_entries(entries: BTreeMap<String, CubeEntry>) -> Result<CubeMap, String> {
        if entries.is_empty() {
            return Err("lists no cube".to_owned());
        }
        let member = |cube: &str, field: &str, value: &str| {
            Member::parse(value).ok_or_else(|| {
                format!("cube `{cube}`: {field} `{value}` is not a member like Sales.date")
            })
        };
        let mut cubes = BTreeMap::new();
        for (cube, entry) in entries {
            if Member::parse(&format!("{cube}.x")).is_none() {
                return Err(format!("`{cube}` is not a cube name"));
            }
            let time_dimension = entry
                .time_dimension
                .as_deref()
                .map(|value| member(&cube, "timeDimension", value))
                .transpose()?;
            let customer_member = match (entry.customer_member.as_deref(), entry.tenant_scoped) {
                (Some(value), true) => Some(member(&cube, "customerMember", value)?),
                (None, false) => None,
                (None, true) => {
                    return Err(format!(
                        "cube `{cube}` has no customerMember: name the member its customer \
                         filter is on, or set tenantScoped = false for a cube that holds no \
                         customer's data"
                    ));
                }
                (Some(_), false) => {
                    return Err(format!(
                        "cube `{cube}` has a customerMember but tenantScoped = false"
                    ));
                }
            };
            cubes.insert(
                cube,
                CubeMembers {
                    time_dimension,
                    customer_member,
                },
            );
        }
        Ok(CubeMap::PerCube(cubes))
    }

    /// The members of `cube`; `None` when a cubes file does not list it.
    pub fn get(&self, cube: &str) -> Option<CubeMembers> {
        match self {
            CubeMap::Uniform {
                time_dimension,
                customer_member,
            } => Some(CubeMembers {
                time_dimension: Some(time_dimension.clone()),
                customer_member: Some(customer_member.clone()),
            }),
            CubeMap::PerCube(cubes) => cubes.get(cube).cloned(),
        }
    }

    /// Whether `cube` may be asked at all.
    pub fn knows(&self, cube: &str) -> bool {
        match self {
            CubeMap::Uniform { .. } => true,
            CubeMap::PerCube(cubes) => cubes.contains_key(cube),
        }
    }

    /// Whether `name` is some cube's customer member: a user filter on it
    /// could only try to reach another tenant, so it is refused.
    pub fn is_customer_member(&self, name: &str) -> bool {
        match self {
            CubeMap::Uniform {
                customer_member, ..
            } => customer_member.as_str() == name,
            CubeMap::PerCube(cubes) => cubes.values().any(|c| {
                c.customer_member
                    .as_ref()
                    .is_some_and(|m| m.as_str() == name)
            }),
        }
    }

    /// Whether `name` is some cube's time dimension (bucketed by
    /// `granularity`, never grouped by in `dimensions`).
    pub fn is_time_dimension(&self, name: &str) -> bool {
        match self {
            CubeMap::Uniform { time_dimension, .. } => time_dimension.as_str() == name,
            CubeMap::PerCube(cubes) => cubes.values().any(|c| {
                c.time_dimension
                    .as_ref()
                    .is_some_and(|m| m.as_str() == name)
            }),
        }
    }

    /// What is wrong with the mapping against the BI's `/meta`: every member
    /// it names must be a dimension there (time dimensions of type `time`
    /// where `/meta` gives types), every listed cube must exist. Each problem
    /// names the setting and the member.
    pub fn problems(&self, meta: &MetaResponse) -> Vec<String> {
        let dimension_kind = |name: &str| -> Option<Option<&str>> {
            meta.cubes
                .iter()
                .flat_map(|cube| cube.dimensions.iter())
                .find(|d| d.name == name)
                .map(|d| d.kind.as_deref())
        };
        let check = |source: String, role: &str, member: &Member, time: bool| {
            let name = member.as_str();
            match dimension_kind(name) {
                None => Some(format!(
                    "{source}: the BI's /meta has no dimension `{name}` ({role})"
                )),
                Some(Some(kind)) if time && kind != "time" => Some(format!(
                    "{source}: `{name}` ({role}) is of type {kind}, not time"
                )),
                Some(_) => None,
            }
        };
        let mut problems = Vec::new();
        match self {
            CubeMap::Uniform {
                time_dimension,
                customer_member,
            } => {
                problems.extend(check(
                    "BI_TIME_DIMENSION".into(),
                    "the time dimension",
                    time_dimension,
                    true,
                ));
                problems.extend(check(
                    "BI_CUSTOMER_MEMBER".into(),
                    "the customer member",
                    customer_member,
                    false,
                ));
            }
            CubeMap::PerCube(cubes) => {
                for (cube, members) in cubes {
                    let source = format!("BI_CUBES_FILE, cube `{cube}`");
                    if !meta.cubes.iter().any(|c| &c.name == cube) {
                        problems.push(format!("{source}: the BI's /meta has no cube `{cube}`"));
                        continue;
                    }
                    if let Some(time) = &members.time_dimension {
                        problems.extend(check(source.clone(), "timeDimension", time, true));
                    }
                    if let Some(customer) = &members.customer_member {
                        problems.extend(check(source.clone(), "customerMember", customer, false));
                    }
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bi::protocol::{MetaCube, MetaMember};

    fn write(name: &str, text: &str) -> String {
        let path =
            std::env::temp_dir().join(format!("cubes-{}-{name}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, text).expect("a temp file");
        path.to_string_lossy().into_owned()
    }

    fn member(name: &str) -> Member {
        Member::parse(name).expect("a member")
    }

    /// JSON and TOML say the same; an extension-less file is either.
    #[test]
    fn json_and_toml_files_read_alike() {
        let toml = "[cubes.Sales]\ntimeDimension = \"Sales.date\"\ncustomerMember = \"Sales.customerId\"\n\n[cubes.Regions]\ntenantScoped = false\n";
        let json = r#"{"cubes": {"Sales": {"timeDimension": "Sales.date", "customerMember": "Sales.customerId"},
                                 "Regions": {"tenantScoped": false}}}"#;
        let from_toml = CubeMap::from_file(&write("a.toml", toml)).expect("valid TOML");
        let from_json = CubeMap::from_file(&write("a.json", json)).expect("valid JSON");
        assert_eq!(from_toml, from_json);
        assert_eq!(CubeMap::from_file(&write("a", toml)), Ok(from_json.clone()));
        assert_eq!(CubeMap::from_file(&write("b", json)), Ok(from_json.clone()));
        let regions = from_json.get("Regions").expect("listed");
        assert_eq!(regions.customer_member, None);
        assert!(from_json.get("Other").is_none());
        assert!(from_json.is_customer_member("Sales.customerId"));
        assert!(from_json.is_time_dimension("Sales.date"));
    }

    /// Each mistake in a file is refused with words that point at it.
    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let cases = [
            (r#"{"cubes": {}}"#, "no cube"),
            (
                r#"{"cubes": {"Sales": {"timeDimension": "Sales.date"}}}"#,
                "no customerMember",
            ),
            (
                r#"{"cubes": {"Sales": {"customerMember": "Sales.c", "tenantScoped": false}}}"#,
                "tenantScoped = false",
            ),
            (
                r#"{"cubes": {"Sales": {"customerMember": "customer"}}}"#,
                "not a member",
            ),
            (
                r#"{"cubes": {"Sales": {"customer": "Sales.c"}}}"#,
                "unknown field",
            ),
            ("not a cubes file", "neither JSON"),
        ];
        for (text, expected) in cases {
            let err = CubeMap::from_file(&write("c", text)).expect_err(expected);
            assert!(err.contains(expected), "{err} !~ {expected}");
        }
    }

    /// Members that `/meta` does not have are named, with the setting.
    #[test]
    fn the_mapping_is_checked_against_meta() {
        let dimension = |name: &str, kind: &str| MetaMember {
            name: name.into(),
            kind: Some(kind.into()),
            ..Default::default()
        };
        let meta = MetaResponse {
            cubes: vec![MetaCube {
                name: "Sales".into(),
                title: None,
                measures: vec![],
                dimensions: vec![
                    dimension("Sales.date", "time"),
                    dimension("Sales.customerId", "string"),
                ],
            }],
        };
        let uniform = CubeMap::uniform(member("Sales.date"), member("Sales.customerId"));
        assert!(uniform.problems(&meta).is_empty());
        let wrong = CubeMap::uniform(member("Sales.customerId"), member("Sales.tenant"));
        let problems = wrong.problems(&meta);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("BI_TIME_DIMENSION") && problems[0].contains("not time"));
        assert!(
            problems[1].starts_with("BI_CUSTOMER_MEMBER") && problems[1].contains("Sales.tenant")
        );

        let file = CubeMap::from_file(&write(
            "d.json",
            r#"{"cubes": {"Sales": {"timeDimension": "Sales.date", "customerMember": "Sales.tenantId"},
                          "Returns": {"tenantScoped": false}}}"#,
        ))
        .expect("valid");
        let problems = file.problems(&meta);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("no cube `Returns`")));
        assert!(problems.iter().any(|p| p.contains("`Sales.tenantId`")));
    }
}
