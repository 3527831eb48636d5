//! What the BI can answer: its cubes, measures and dimensions from `GET /meta`.
//!
//! The catalog is fetched in the background and kept fresh; until it is known,
//! queries are validated by shape only and the BI has the last word. Each
//! fetch also checks the cube mapping ([`CubeMap`]) against it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::bi::BiClient;
use crate::bi::protocol::MetaResponse;
use crate::cubes::CubeMap;
use crate::query::{InputError, Member, MemberType};

/// A snapshot of the BI's `/meta`.
#[derive(Debug, Clone)]
pub struct Catalog {
    meta: MetaResponse,
    measures: BTreeSet<String>,
    /// Dimensions that may be grouped by in `dimensions`.
    dimensions: BTreeSet<String>,
    /// Dimensions of type `time`, and the mapped time dimensions: they are
    /// bucketed with `granularity`, not grouped by in `dimensions`.
    time_dimensions: BTreeSet<String>,
    /// Every measure's and dimension's type, for filter values.
    types: BTreeMap<String, MemberType>,
    cubes: Arc<CubeMap>,
}

impl Catalog {
    /// The cubes' mapped time dimensions are time dimensions even when the
    /// BI's `/meta` gives them no type.
    pub fn new(meta: MetaResponse, cubes: Arc<CubeMap>) -> Catalog {
        let measures = meta
            .cubes
            .iter()
            .flat_map(|cube| cube.measures.iter().map(|m| m.name.clone()))
            .collect();
        let (time_dimensions, dimensions) = meta
            .cubes
            .iter()
            .flat_map(|cube| cube.dimensions.iter())
            .map(|d| d.name.clone())
            .partition(|name| is_time(&meta, name, &cubes));
        let types = meta
            .cubes
            .iter()
            .flat_map(|cube| cube.measures.iter().chain(&cube.dimensions))
            .map(|m| (m.name.clone(), MemberType::from_meta(m.kind.as_deref())))
            .collect();
        Catalog {
            meta,
            measures,
            dimensions,
            time_dimensions,
            types,
            cubes,
        }
    }

    /// The cube mapping the catalog was built with.
    pub fn cubes(&self) -> &CubeMap {
        &self.cubes
    }

    pub fn meta(&self) -> &MetaResponse {
        &self.meta
    }

    /// Whether `name` is a time dimension (listed in `timeDimensions`).
    pub fn is_time_dimension(&self, name: &str) -> bool {
        self.time_dimensions.contains(name)
    }

    pub fn check_measure(&self, member: &Member) -> Result<(), InputError> {
        check(member, "measures", "measure", &self.measures)
    }

    pub fn check_dimension(&self, member: &Member) -> Result<(), InputError> {
        if self.is_time_dimension(member.as_str()) {
            return Err(InputError::TimeDimension {
                value: member.as_str().to_owned(),
            });
        }
        check(member, "dimensions", "dimension", &self.dimensions)
    }

    /// The type of a filtered member (a measure or a dimension), for its values.
    pub fn filter_type(&self, member: &Member) -> Result<MemberType, InputError> {
        if self.is_time_dimension(member.as_str()) {
            return Ok(MemberType::Time);
        }
        match self.types.get(member.as_str()) {
            Some(kind) => Ok(*kind),
            None => {
                let known: BTreeSet<String> =
                    self.measures.union(&self.dimensions).cloned().collect();
                check(member, "filters", "measure or dimension", &known)
                    .map(|()| MemberType::Unknown)
            }
        }
    }
}

fn is_time(meta: &MetaResponse, name: &str, cubes: &CubeMap) -> bool {
    cubes.is_time_dimension(name)
        || meta
            .cubes
            .iter()
            .flat_map(|cube| cube.dimensions.iter())
            .any(|d| d.name == name && d.kind.as_deref() == Some("time"))
}

fn check(
    member: &Member,
    field: &'static str,
    kind: &'static str,
    known: &BTreeSet<String>,
) -> Result<(), InputError> {
    if known.contains(member.as_str()) {
        return Ok(());
    }
    // Point at the members of the same cube: the likeliest intended ones.
    let cube = member.as_str().split('.').next().unwrap_or_default();
    let same_cube: Vec<&str> = known
        .iter()
        .filter(|name| name.split('.').next() == Some(cube))
        .map(String::as_str)
        .take(12)
        .collect();
    let hint = if same_cube.is_empty() {
        "; the `catalog` query lists what the BI offers".to_owned()
    } else {
        format!("; {cube} has: {}", same_cube.join(", "))
    };
    Err(InputError::UnknownMember {
        field,
        value: member.as_str().to_owned(),
        kind,
        hint,
    })
}

/// The current catalog, shared by all requests and refreshed by one task.
#[derive(Debug)]
pub struct CatalogStore {
    current: RwLock<Option<Arc<Catalog>>>,
    cubes: Arc<CubeMap>,
}

impl CatalogStore {
    pub fn new(cubes: Arc<CubeMap>) -> CatalogStore {
        CatalogStore {
            current: RwLock::new(None),
            cubes,
        }
    }

    pub fn get(&self) -> Option<Arc<Catalog>> {
        self.current.read().ok().and_then(|guard| guard.clone())
    }

    /// The catalog, fetched now if the background refresh has not succeeded yet.
    pub async fn get_or_fetch(&self, bi: &BiClient) -> Result<Arc<Catalog>, crate::bi::BiError> {
        if let Some(catalog) = self.get() {
            return Ok(catalog);
        }
        Ok(self.set(bi.meta().await?))
    }

    /// Keeps `meta` as the current catalog. A mapping that no longer fits
    /// it (a cube or member renamed in the BI since start-up) is logged as an
    /// error: queries still carry every customer filter, and the BI refuses
    /// the members it lacks, so nothing is served unscoped meanwhile.
    pub fn set(&self, meta: MetaResponse) -> Arc<Catalog> {
        for problem in self.cubes.problems(&meta) {
            tracing::error!(problem = %problem, "the cube mapping does not fit the BI's catalog");
        }
        let catalog = Arc::new(Catalog::new(meta, Arc::clone(&self.cubes)));
        if let Ok(mut guard) = self.current.write() {
            *guard = Some(Arc::clone(&catalog));
        }
        catalog
    }

    /// Fetches `/meta` now (unless the catalog is known already) and then
    /// every `every`; after a failure, again soon.
    pub async fn refresh_forever(self: Arc<Self>, bi: BiClient, every: Duration) {
        const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
        if self.get().is_some() {
            tokio::time::sleep(every).await;
        }
        loop {
            let pause = match bi.meta().await {
                Ok(meta) => {
                    self.set(meta);
                    every
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not fetch the BI catalog; members are checked by shape only");
                    RETRY_AFTER_FAILURE.min(every)
                }
            };
            tokio::time::sleep(pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bi::protocol::{MetaCube, MetaMember};

    fn uniform() -> Arc<CubeMap> {
        let member = |name| Member::parse(name).expect("a member");
        Arc::new(CubeMap::uniform(
            member("Sales.date"),
            member("Sales.customerId"),
        ))
    }

    fn member(name: &str) -> MetaMember {
        MetaMember {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn known_members_pass_and_unknown_ones_name_the_alternatives() {
        let catalog = Catalog::new(
            MetaResponse {
                cubes: vec![MetaCube {
                    name: "Sales".into(),
                    title: None,
                    measures: vec![member("Sales.revenue")],
                    dimensions: vec![member("Sales.region")],
                }],
            },
            uniform(),
        );
        let parse = |s| Member::parse(s).expect("well-formed");
        assert!(catalog.check_measure(&parse("Sales.revenue")).is_ok());
        assert!(catalog.check_dimension(&parse("Sales.region")).is_ok());
        let err = catalog
            .check_measure(&parse("Sales.region"))
            .expect_err("a dimension is not a measure");
        assert!(
            err.to_string().contains("Sales has: Sales.revenue"),
            "{err}"
        );
        assert!(catalog.check_dimension(&parse("Other.x")).is_err());
    }

    #[test]
    fn time_dimensions_are_refused_in_dimensions_with_a_pointer_to_granularity() {
        let time = |name: &str| MetaMember {
            kind: Some("time".into()),
            ..member(name)
        };
        // `Sales.date` is BI_TIME_DIMENSION even where `/meta` gives no type.
        let catalog = Catalog::new(
            MetaResponse {
                cubes: vec![MetaCube {
                    name: "Sales".into(),
                    title: None,
                    measures: vec![member("Sales.revenue")],
                    dimensions: vec![
                        member("Sales.region"),
                        member("Sales.date"),
                        time("Sales.shippedAt"),
                    ],
                }],
            },
            uniform(),
        );
        let parse = |s| Member::parse(s).expect("well-formed");
        assert!(catalog.check_dimension(&parse("Sales.region")).is_ok());
        for name in ["Sales.date", "Sales.shippedAt"] {
            assert!(catalog.is_time_dimension(name));
            let err = catalog
                .check_dimension(&parse(name))
                .expect_err("a time dimension");
            assert!(err.to_string().contains("granularity"), "{err}");
        }
        assert!(!catalog.is_time_dimension("Sales.region"));
    }
}
