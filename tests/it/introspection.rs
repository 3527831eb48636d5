//! Introspection as GraphiQL, code generators and Postman send it: the
//! standard query is answered under the default limits with a schema complete
//! enough to build a client schema from; with authentication on, a caller
//! without a credential is told why there are no docs.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::common::{TestEnv, TestOptions};
use crate::security::{JWT_SECRET, bearer, client, codes, graphql_as, token_for};

/// graphql-js's `getIntrospectionQuery()` (16.x and 17.x give the same text),
/// verbatim: 15 fields deep, past the default `GRAPHQL_MAX_DEPTH` of 12.
pub const INTROSPECTION_QUERY: &str = include_str!("../fixtures/introspection-query.graphql");

fn introspection_body() -> Value {
    json!({"query": INTROSPECTION_QUERY, "operationName": "IntrospectionQuery"})
}

/// With the default configuration, graphql-js's full introspection query is
/// answered without errors, and its answer is a complete schema: the root
/// type and every type any field, argument, input field, interface or
/// possible type refers to (through all its `ofType` wrappers) is listed, every
/// type of `schema.graphql` is there, and the standard directives too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_introspection_query_gives_a_complete_schema() {
    let env = TestEnv::start(TestOptions::default()).await;
    let answer = env.gateway().graphql(&introspection_body()).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    let schema = &answer["data"]["__schema"];
    let problems = schema_problems(schema);
    assert!(problems.is_empty(), "{}\n{schema}", problems.join("\n"));

    let listed = type_names(schema);
    let sdl = analytics_gateway::graphql::schema_sdl();
    for line in sdl.lines() {
        let mut words = line.split_whitespace();
        if let (Some("type" | "input" | "enum" | "scalar" | "interface" | "union"), Some(name)) =
            (words.next(), words.next())
        {
            assert!(
                listed.contains(name),
                "`{name}` of the SDL is not introspected"
            );
        }
    }
    assert_eq!(env.sim.stats().queries, 0);
}

/// With authentication on, introspection without a credential is refused
/// with `UNAUTHENTICATED` and a message that says what to send (GraphiQL's
/// Headers tab), not answered `null`; with a valid token it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_without_a_credential_is_unauthenticated() {
    let env = TestEnv::start(TestOptions::default().env("AUTH_JWT_SECRET", JWT_SECRET)).await;
    let http = client();
    for body in [
        introspection_body(),
        json!({"query": "{ __type(name: \"AggregateInput\") { name } }"}),
    ] {
        let anonymous = graphql_as(&http, env.gateway(), &[], &body).await;
        assert_eq!(codes(&anonymous), ["UNAUTHENTICATED"], "{anonymous}");
        assert!(anonymous["data"].is_null(), "{anonymous}");
        let message = anonymous["errors"][0]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains("introspection") && message.contains("Headers tab"),
            "{message}"
        );
    }
    // `__typename` reveals nothing and stays open (clients add it everywhere).
    let typename = graphql_as(
        &http,
        env.gateway(),
        &[],
        &json!({"query": "{ __typename }"}),
    )
    .await;
    assert!(typename.get("errors").is_none(), "{typename}");

    let token = [bearer(&token_for("alice", json!(["acme"])))];
    let signed_in = graphql_as(&http, env.gateway(), &token, &introspection_body()).await;
    assert!(signed_in.get("errors").is_none(), "{signed_in}");
    assert!(schema_problems(&signed_in["data"]["__schema"]).is_empty());
}

fn type_names(schema: &Value) -> BTreeSet<&str> {
    schema["types"]
        .as_array()
        .map(|types| types.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default()
}

/// What keeps an introspection answer from being built into a client schema
/// (graphql-js's `buildClientSchema` needs all of this); empty when complete.
fn schema_problems(schema: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(types) = schema["types"].as_array() else {
        return vec!["no `types`".to_owned()];
    };
    let names = type_names(schema);
    match schema["queryType"]["name"].as_str() {
        Some(root) if names.contains(root) => {}
        other => problems.push(format!("queryType {other:?} is not a listed type")),
    }
    for root in ["mutationType", "subscriptionType"] {
        if let Some(name) = schema[root]["name"].as_str()
            && !names.contains(name)
        {
            problems.push(format!("{root} `{name}` is not a listed type"));
        }
    }
    // Follows a type reference through its LIST / NON_NULL wrappers to a listed named type.
    let resolve = |reference: &Value, at: &str, problems: &mut Vec<String>| {
        let mut current = reference;
        loop {
            match current["kind"].as_str() {
                Some("LIST" | "NON_NULL") => current = &current["ofType"],
                Some(_) => match current["name"].as_str() {
                    Some(name) if names.contains(name) => return,
                    name => {
                        problems.push(format!("{at}: refers to {name:?}, not a listed type"));
                        return;
                    }
                },
                None => {
                    problems.push(format!("{at}: a type reference ends without a named type"));
                    return;
                }
            }
        }
    };
    let list = |value: &Value| value.as_array().cloned().unwrap_or_default();
    for ty in types {
        let name = ty["name"].as_str().unwrap_or("<unnamed>");
        match ty["kind"].as_str() {
            Some("OBJECT" | "INTERFACE") => {
                let fields = list(&ty["fields"]);
                if fields.is_empty() {
                    problems.push(format!("{name} has no fields"));
                }
                for field in &fields {
                    let at = format!("{name}.{}", field["name"].as_str().unwrap_or("?"));
                    resolve(&field["type"], &at, &mut problems);
                    for arg in list(&field["args"]) {
                        resolve(
                            &arg["type"],
                            &format!("{at}({})", arg["name"]),
                            &mut problems,
                        );
                    }
                }
                for interface in list(&ty["interfaces"]) {
                    resolve(&interface, &format!("{name} implements"), &mut problems);
                }
            }
            Some("INPUT_OBJECT") => {
                let fields = list(&ty["inputFields"]);
                if fields.is_empty() {
                    problems.push(format!("{name} has no input fields"));
                }
                for field in &fields {
                    resolve(
                        &field["type"],
                        &format!("{name}.{}", field["name"]),
                        &mut problems,
                    );
                }
            }
            Some("ENUM") if list(&ty["enumValues"]).is_empty() => {
                problems.push(format!("{name} has no values"));
            }
            Some("UNION") => {
                for member in list(&ty["possibleTypes"]) {
                    resolve(&member, &format!("{name} member"), &mut problems);
                }
            }
            Some("ENUM" | "SCALAR") => {}
            other => problems.push(format!("{name} has kind {other:?}")),
        }
    }
    let directives = list(&schema["directives"]);
    for wanted in ["include", "skip", "deprecated"] {
        if !directives.iter().any(|d| d["name"] == wanted) {
            problems.push(format!("no @{wanted} directive"));
        }
    }
    for directive in &directives {
        for arg in list(&directive["args"]) {
            let at = format!("@{}({})", directive["name"], arg["name"]);
            resolve(&arg["type"], &at, &mut problems);
        }
    }
    problems
}

/// The completeness check finds what it exists for: a reference to a type
/// that is not listed, and a wrapper chain cut short (too few `ofType`s).
#[test]
fn the_completeness_check_is_not_vacuous() {
    let schema = |field_type: Value| {
        json!({
            "queryType": {"name": "Query"},
            "types": [{"kind": "OBJECT", "name": "Query", "fields": [
                {"name": "f", "args": [], "type": field_type}
            ], "interfaces": []}],
            "directives": [{"name": "include", "args": []}, {"name": "skip", "args": []},
                           {"name": "deprecated", "args": []}],
        })
    };
    let named = json!({"kind": "NON_NULL", "ofType": {"kind": "OBJECT", "name": "Query"}});
    assert_eq!(schema_problems(&schema(named)), Vec::<String>::new());
    let dangling = json!({"kind": "OBJECT", "name": "Missing"});
    assert_eq!(schema_problems(&schema(dangling)).len(), 1);
    let cut = json!({"kind": "NON_NULL", "ofType": {"kind": "LIST", "ofType": null}});
    assert_eq!(schema_problems(&schema(cut)).len(), 1);
}
