//! The BI platform: the Cube REST protocol types and the HTTP client that speaks it.
//!
//! Architecture invariant: this module knows nothing of GraphQL, caching or Redis.
//! It turns Cube queries into rows, or into a [`BiError`].

pub mod client;
pub mod protocol;
pub mod tokens;

pub use client::{BiAnswer, BiClient, BiError, BiSettings, CallRef};
pub use tokens::{MintSettings, TokenScope};
