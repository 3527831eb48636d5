//! The GraphQL API: the schema, its resolvers, the per-request dataloader, and
//! the one place where errors become `extensions.code`.
//!
//! Architecture invariant: resolvers parse input into an `AggregateQuery` and
//! hand it to the dataloader; they never talk to Redis or the BI themselves.

pub mod errors;
pub mod limits;
mod loader;
mod schema;

pub use errors::{ErrorCode, classify_request_errors};
pub use loader::AggregateLoader;
pub use schema::{
    AggregateInput, AnswerFacts, GatewaySchema, SchemaContext, build_schema, schema_sdl,
};
