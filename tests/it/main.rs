//! Integration tests: real gateway processes in front of an in-process
//! bi-sim, driven over HTTP as clients and operators would. One binary, one
//! module per area, one fixture in `common`.

mod common;
mod otlp;

mod batching;
mod bi_errors;
mod cubes;
mod dashboards;
mod docker_compose;
mod fault_proxy;
mod freshness;
mod freshness_faults;
mod graphiql;
mod graphql_http;
mod http;
mod introspection;
mod live;
mod metrics_docs;
mod metrics_format;
mod minted_tokens;
mod readiness;
mod redis_cluster;
mod redis_faults;
mod redis_recovery;
mod redis_refusals;
mod redis_stampede;
mod response_cache;
mod richer_queries;
mod schema;
mod security;
mod stampede;
mod takeovers;
mod tenancy;
mod traces;
mod validation;
