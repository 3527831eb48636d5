//! `schema.graphql` at the repo root is the served schema's SDL.

use std::path::Path;

/// The committed `schema.graphql` equals the SDL the gateway serves.
/// `UPDATE_SCHEMA=1` rewrites the file instead of failing.
#[test]
fn schema_graphql_is_the_served_sdl() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
    let served = analytics_gateway::graphql::schema_sdl();
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed == served {
        return;
    }
    if std::env::var("UPDATE_SCHEMA").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &served).expect("schema.graphql is writable");
        eprintln!("note: rewrote {} from the served schema", path.display());
        return;
    }
    panic!(
        "{} differs from the served schema; review the change and refresh it with\n\
         \n    UPDATE_SCHEMA=1 cargo test --test it schema\n",
        path.display()
    );
}
