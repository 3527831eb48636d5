//! Integration tests: real gateway processes in front of an in-process
//! bi-sim, driven over HTTP as clients and operators would. One binary, one
//! module per area, one fixture in `common`.

mod common;

mod batching;
mod bi_errors;
mod http;
mod schema;
mod stampede;
mod tenancy;
mod validation;
