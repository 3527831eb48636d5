//! The security-context mode: bi-sim checks minted tokens as a Cube with a
//! tenant-enforcing `queryRewrite` would.
//!
//! Every `/load` must carry an HS256 JWT signed with the configured secret
//! (Cube's `CUBEJS_API_SECRET`), unexpired, whose claim names exactly one
//! customer (a string); and every query of the request must filter each
//! tenant-scoped cube it touches on that customer and only that customer.
//! Anything else is refused with 403, as Cube refuses a bad token, and the
//! refusal never echoes the token.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::schema;
use crate::bi::protocol::CubeQuery;

/// What the simulator checks tokens with.
#[derive(Clone)]
pub struct SimSecurity {
    /// The API secret tokens must be signed with.
    pub secret: String,
    /// The claim of the security context that names the customer.
    pub claim: String,
}

impl std::fmt::Debug for SimSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimSecurity")
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

/// A request's checked security context: the token's claims, and the
/// customer it names.
#[derive(Debug, Clone)]
pub struct Context {
    pub claims: Value,
    pub customer: String,
}

impl SimSecurity {
    /// Checks `authorization` (the token, with or without `Bearer `) and
    /// that every query is scoped to the token's customer.
    pub fn check(
        &self,
        authorization: Option<&str>,
        queries: &[CubeQuery],
    ) -> Result<Context, String> {
        let token = authorization
            .map(|value| value.strip_prefix("Bearer ").unwrap_or(value))
            .ok_or_else(|| "Authorization header isn't set".to_owned())?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        let claims = jsonwebtoken::decode::<Value>(
            token,
            &DecodingKey::from_secret(self.secret.as_bytes()),
            &validation,
        )
        .map_err(|_| "Invalid token".to_owned())?
        .claims;
        let customer = match claims.get(&self.claim) {
            Some(Value::String(customer)) if !customer.is_empty() => customer.clone(),
            _ => {
                return Err(format!(
                    "the security context has no customer in '{}' (one string)",
                    self.claim
                ));
            }
        };
        for query in queries {
            for cube in cubes_of(query) {
                let Some(member) = schema::customer_member(&cube) else {
                    continue;
                };
                let filters: Vec<_> = query
                    .filters
                    .iter()
                    .filter(|f| f.member == member)
                    .collect();
                let scoped = !filters.is_empty()
                    && filters.iter().all(|f| {
                        f.operator == "equals" && f.values.len() == 1 && f.values[0] == customer
                    });
                if !scoped {
                    return Err(format!(
                        "query on cube '{cube}' is not filtered on '{member}' equals the \
                         security context's customer"
                    ));
                }
            }
        }
        Ok(Context { claims, customer })
    }
}

/// The cubes a query's members belong to.
fn cubes_of(query: &CubeQuery) -> Vec<String> {
    let mut cubes: Vec<String> = query
        .measures
        .iter()
        .chain(&query.dimensions)
        .chain(query.time_dimensions.iter().map(|t| &t.dimension))
        .chain(query.filters.iter().map(|f| &f.member))
        .chain(query.order.iter().map(|o| &o.member))
        .filter_map(|member| member.split_once('.').map(|(cube, _)| cube.to_owned()))
        .collect();
    cubes.sort_unstable();
    cubes.dedup();
    cubes
}
