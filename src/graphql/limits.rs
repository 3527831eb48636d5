//! Cost limits that async-graphql does not check itself: every `aggregate`
//! field is potentially a paid BI query, so a document is refused before
//! execution when it asks for too many of them, uses too many aliases, or is
//! too long to be worth parsing.

use std::collections::HashMap;

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, OperationType, Selection, SelectionSet,
};

/// Why a document was refused (`QUERY_TOO_COMPLEX`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("the document has more than {max} tokens")]
    TooManyTokens { max: usize },
    #[error("the document asks for {count} `aggregate` fields; at most {max} are allowed")]
    TooManyAggregates { count: usize, max: usize },
    #[error("the document uses {count} aliases; at most {max} are allowed")]
    TooManyAliases { count: usize, max: usize },
    #[error("fragments are nested more than {max} deep")]
    FragmentsTooDeep { max: usize },
    #[error("a fragment spreads itself")]
    FragmentCycle,
    #[error(
        "the document is too complex: it selects more than {max} fields once its fragments are expanded"
    )]
    TooManyFields { max: usize },
    #[error("the query is nested too deep: fields nest more than {max} levels (GRAPHQL_MAX_DEPTH)")]
    TooDeep { max: usize },
    #[error(
        "the introspection is nested too deep: more than {max} levels under `__schema` or `__type`"
    )]
    IntrospectionTooDeep { max: usize },
    #[error(
        "the introspection is nested too deep: `fields`, `inputFields`, `interfaces` and `possibleTypes` nest more than {max} levels"
    )]
    IntrospectionListsTooDeep { max: usize },
}

/// Counts GraphQL tokens (punctuators, names, numbers, strings), stopping as
/// soon as there are more than `max`: cheap enough to run before the parser.
pub fn check_tokens(query: &str, max: usize) -> Result<(), LimitError> {
    let bytes = query.as_bytes();
    let mut i = 0;
    let mut count = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => {
                i += 1;
                continue;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' => {
                if bytes[i..].starts_with(b"\"\"\"") {
                    i += 3;
                    while i < bytes.len() && !bytes[i..].starts_with(b"\"\"\"") {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 3;
                } else {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                        i += if bytes[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
            }
            b'.' if bytes[i..].starts_with(b"...") => i += 3,
            // Names: [_A-Za-z][_0-9A-Za-z]*
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
            }
            // Numbers: -?digits(.digits)?([eE][+-]?digits)?, as GraphQL lexes
            // them: `-1-1` is two tokens, not one.
            c if c.is_ascii_digit() || c == b'-' => {
                i += 1;
                let digits = |i: &mut usize| {
                    while *i < bytes.len() && bytes[*i].is_ascii_digit() {
                        *i += 1;
                    }
                };
                digits(&mut i);
                if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
                    i += 1;
                    digits(&mut i);
                }
                if i < bytes.len() && matches!(bytes[i], b'e' | b'E') {
                    i += 1;
                    if i < bytes.len() && matches!(bytes[i], b'+' | b'-') {
                        i += 1;
                    }
                    digits(&mut i);
                }
            }
            _ => i += 1,
        }
        count += 1;
        if count > max {
            return Err(LimitError::TooManyTokens { max });
        }
    }
    Ok(())
}

/// Limits on what a parsed document may ask for.
#[derive(Debug, Clone, Copy)]
pub struct DocumentLimits {
    pub max_aggregates: usize,
    pub max_aliases: usize,
    /// Fields after every fragment spread is expanded: what execution would visit.
    pub max_fields: usize,
    /// Nesting of fields, an introspection field (`__schema`, `__type`)
    /// counting as one: introspection has limits of its own.
    pub max_depth: usize,
}

/// Fragment spreads are followed at most this deep.
const MAX_FRAGMENT_DEPTH: usize = 16;

/// How deep fields may nest under `__schema` or `__type`, that field
/// included. graphql-js's standard introspection query (`getIntrospectionQuery()`,
/// which GraphiQL, code generators and Postman send) is 15 deep: nine nested
/// `ofType`s to unwrap types like `[[Int!]!]!`. Each `ofType` is one object,
/// so depth alone costs little; the lists below are what multiply.
pub const MAX_INTROSPECTION_DEPTH: usize = 20;

/// How many of the introspection fields that lead back to lists of types
/// (`fields`, `inputFields`, `interfaces`, `possibleTypes`) may nest in one
/// another. graphql-js's `MaxIntrospectionDepthRule` allows 2, and its
/// standard query uses 1: each level multiplies the answer by the schema's size.
pub const MAX_INTROSPECTION_LISTS: usize = 2;

/// What a document that passed the limits asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocumentSummary {
    /// Whether it introspects the schema (`__schema` or `__type`; `__typename` does not count).
    pub introspects: bool,
    /// The name of its only operation, when it has exactly one named operation.
    pub operation_name: Option<String>,
    /// Whether its whole answer may be served again to an identical request
    /// while the entries behind it are unchanged: queries only, no
    /// introspection, and none of the fields whose value moves with the
    /// clock or with the BI's catalog ([`NOT_REPEATABLE`]).
    pub repeatable: bool,
}

/// Fields whose answer is not a function of the entries behind it.
const NOT_REPEATABLE: &[&str] = &["ageSeconds", "expiresInSeconds", "catalog"];

/// Counts `aggregate` fields, aliases, fields and depth over every
/// operation, each fragment counted as often as it is spread (that is what
/// execution would cost). Each fragment is counted once per context and its
/// counts reused, with saturating arithmetic, so a "fragment bomb" (fragments
/// spreading the next one many times over) costs time linear in the document,
/// not in its expansion.
pub fn check_document(
    document: &ExecutableDocument,
    limits: DocumentLimits,
) -> Result<DocumentSummary, LimitError> {
    let mut walker = Walker {
        document,
        fragments: HashMap::new(),
        in_progress: Vec::new(),
    };
    let mut total = Counts::default();
    let mut operation_name = None;
    let mut queries_only = true;
    match &document.operations {
        DocumentOperations::Single(operation) => {
            queries_only &= operation.node.ty == OperationType::Query;
            total.merge(walker.count(&operation.node.selection_set.node, 0, Place::Query)?);
        }
        DocumentOperations::Multiple(operations) => {
            for operation in operations.values() {
                queries_only &= operation.node.ty == OperationType::Query;
                total.merge(walker.count(&operation.node.selection_set.node, 0, Place::Query)?);
            }
            if operations.len() == 1 {
                operation_name = operations.keys().next().map(|name| name.to_string());
            }
        }
    }
    if total.aggregates > limits.max_aggregates {
        return Err(LimitError::TooManyAggregates {
            count: total.aggregates,
            max: limits.max_aggregates,
        });
    }
    if total.aliases > limits.max_aliases {
        return Err(LimitError::TooManyAliases {
            count: total.aliases,
            max: limits.max_aliases,
        });
    }
    if total.fields > limits.max_fields {
        return Err(LimitError::TooManyFields {
            max: limits.max_fields,
        });
    }
    if total.depth > limits.max_depth {
        return Err(LimitError::TooDeep {
            max: limits.max_depth,
        });
    }
    if total.introspection_depth > MAX_INTROSPECTION_DEPTH {
        return Err(LimitError::IntrospectionTooDeep {
            max: MAX_INTROSPECTION_DEPTH,
        });
    }
    if total.introspection_lists > MAX_INTROSPECTION_LISTS {
        return Err(LimitError::IntrospectionListsTooDeep {
            max: MAX_INTROSPECTION_LISTS,
        });
    }
    Ok(DocumentSummary {
        introspects: total.introspects,
        operation_name,
        repeatable: queries_only && !total.introspects && !total.not_repeatable,
    })
}

/// Where a selection set is: in the query proper, or under an introspection field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Place {
    Query,
    Introspection,
}

/// Introspection fields whose answers are lists of types or fields, which
/// lead back to more such lists.
const INTROSPECTION_LISTS: &[&str] = &["fields", "inputFields", "interfaces", "possibleTypes"];

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    aggregates: usize,
    aliases: usize,
    fields: usize,
    /// Field nesting of this selection set in its place.
    depth: usize,
    /// Nesting of [`INTROSPECTION_LISTS`] fields, under an introspection field.
    lists: usize,
    /// The deepest introspection field found below (the field included).
    introspection_depth: usize,
    /// The most nested lists under an introspection field found below.
    introspection_lists: usize,
    introspects: bool,
    /// A [`NOT_REPEATABLE`] field is selected below.
    not_repeatable: bool,
}

impl Counts {
    /// `other` beside these counts in one selection set: sums and maxima.
    fn merge(&mut self, other: Counts) {
        self.aggregates = self.aggregates.saturating_add(other.aggregates);
        self.aliases = self.aliases.saturating_add(other.aliases);
        self.fields = self.fields.saturating_add(other.fields);
        self.depth = self.depth.max(other.depth);
        self.lists = self.lists.max(other.lists);
        self.introspection_depth = self.introspection_depth.max(other.introspection_depth);
        self.introspection_lists = self.introspection_lists.max(other.introspection_lists);
        self.introspects |= other.introspects;
        self.not_repeatable |= other.not_repeatable;
    }
}

struct Walker<'a> {
    document: &'a ExecutableDocument,
    /// Counts of fragments already walked, by name and place.
    fragments: HashMap<(&'a str, Place), Counts>,
    /// Fragments being walked: spreading one of them again is a cycle.
    in_progress: Vec<&'a str>,
}

impl<'a> Walker<'a> {
    fn count(
        &mut self,
        set: &'a SelectionSet,
        fragment_depth: usize,
        place: Place,
    ) -> Result<Counts, LimitError> {
        if fragment_depth > MAX_FRAGMENT_DEPTH {
            return Err(LimitError::FragmentsTooDeep {
                max: MAX_FRAGMENT_DEPTH,
            });
        }
        let mut counts = Counts::default();
        for item in &set.items {
            match &item.node {
                Selection::Field(field) => {
                    let field = &field.node;
                    let name = field.name.node.as_str();
                    let introspection_root =
                        place == Place::Query && matches!(name, "__schema" | "__type");
                    let inner = if introspection_root {
                        Place::Introspection
                    } else {
                        place
                    };
                    let below = self.count(&field.selection_set.node, fragment_depth, inner)?;
                    let mut this = Counts {
                        aggregates: usize::from(name == "aggregate")
                            .saturating_add(below.aggregates),
                        aliases: usize::from(field.alias.is_some()).saturating_add(below.aliases),
                        fields: below.fields.saturating_add(1),
                        introspection_depth: below.introspection_depth,
                        introspection_lists: below.introspection_lists,
                        introspects: below.introspects || introspection_root,
                        not_repeatable: below.not_repeatable || NOT_REPEATABLE.contains(&name),
                        ..Counts::default()
                    };
                    if introspection_root {
                        // Its own nesting is measured against the introspection limits.
                        this.depth = 1;
                        this.introspection_depth = below.depth.saturating_add(1);
                        this.introspection_lists = below.lists;
                    } else {
                        this.depth = below.depth.saturating_add(1);
                        if place == Place::Introspection {
                            this.lists = below
                                .lists
                                .saturating_add(usize::from(INTROSPECTION_LISTS.contains(&name)));
                        }
                    }
                    counts.merge(this);
                }
                Selection::InlineFragment(fragment) => {
                    counts.merge(self.count(
                        &fragment.node.selection_set.node,
                        fragment_depth + 1,
                        place,
                    )?);
                }
                Selection::FragmentSpread(spread) => {
                    let name = spread.node.fragment_name.node.as_str();
                    counts.merge(self.fragment(name, fragment_depth + 1, place)?);
                }
            }
        }
        Ok(counts)
    }

    fn fragment(
        &mut self,
        name: &'a str,
        fragment_depth: usize,
        place: Place,
    ) -> Result<Counts, LimitError> {
        if let Some(counts) = self.fragments.get(&(name, place)) {
            return Ok(*counts);
        }
        if self.in_progress.contains(&name) {
            return Err(LimitError::FragmentCycle);
        }
        let Some((_, fragment)) = self
            .document
            .fragments
            .iter()
            .find(|(fragment_name, _)| fragment_name.as_str() == name)
        else {
            // Unknown fragments are validation's to report.
            return Ok(Counts::default());
        };
        self.in_progress.push(name);
        let counts = self.count(&fragment.node.selection_set.node, fragment_depth, place);
        self.in_progress.pop();
        let counts = counts?;
        self.fragments.insert((name, place), counts);
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(query: &str, max_aggregates: usize) -> Result<(), LimitError> {
        let document = async_graphql::parser::parse_query(query).expect("parses");
        check_document(
            &document,
            DocumentLimits {
                max_aggregates,
                max_aliases: 3,
                max_fields: 1_000,
                max_depth: 12,
            },
        )
        .map(|_| ())
    }

    #[test]
    fn aggregates_count_through_fragments_as_often_as_they_are_spread() {
        let query = "query { ...F ...F a: aggregate(input: $i) { rows } }
                     fragment F on Query { aggregate(input: $i) { rows } }";
        assert!(check(query, 3).is_ok());
        assert_eq!(
            check(query, 2),
            Err(LimitError::TooManyAggregates { count: 3, max: 2 })
        );
    }

    #[test]
    fn aliases_and_cycles_are_bounded() {
        let aliases = "{ a: catalog { cubes { name } } b: catalog { cubes { name } } c: catalog { cubes { name } } d: catalog { cubes { name } } }";
        assert!(matches!(
            check(aliases, 10),
            Err(LimitError::TooManyAliases { .. })
        ));
        let cycle = "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }";
        assert!(matches!(check(cycle, 10), Err(LimitError::FragmentCycle)));
    }

    #[test]
    fn fragment_bombs_are_counted_without_expanding_them() {
        // Eight levels, each spreading the next ten times: 10^8 fields.
        let mut query = String::from("query { ...F0 }");
        for level in 0..8 {
            let spreads = format!("...F{} ", level + 1).repeat(10);
            query.push_str(&format!(" fragment F{level} on Query {{ {spreads} }}"));
        }
        query.push_str(" fragment F8 on Query { __typename }");
        assert!(matches!(
            check(&query, 10),
            Err(LimitError::TooManyFields { .. })
        ));
    }

    fn summary(query: &str, max_depth: usize) -> Result<DocumentSummary, LimitError> {
        let document = async_graphql::parser::parse_query(query).expect("parses");
        check_document(
            &document,
            DocumentLimits {
                max_aggregates: 10,
                max_aliases: 10,
                max_fields: 1_000,
                max_depth,
            },
        )
    }

    /// graphql-js's `getIntrospectionQuery()`, as GraphiQL sends it.
    const INTROSPECTION: &str = include_str!("../../tests/fixtures/introspection-query.graphql");

    #[test]
    fn the_standard_introspection_query_passes_the_default_depth() {
        let summary = summary(INTROSPECTION, 12).expect("within the limits");
        assert!(summary.introspects);
        assert_eq!(
            summary.operation_name.as_deref(),
            Some("IntrospectionQuery")
        );
        // Even a depth of 1 admits it: introspection is measured on its own.
        assert!(summary_ok(INTROSPECTION, 1));
    }

    fn summary_ok(query: &str, max_depth: usize) -> bool {
        summary(query, max_depth).is_ok()
    }

    #[test]
    fn depth_counts_fields_outside_introspection() {
        let three = "{ catalog { cubes { name } } }";
        assert!(summary_ok(three, 3));
        assert_eq!(summary(three, 2), Err(LimitError::TooDeep { max: 2 }));
        // Through fragments too, and `__typename` is an ordinary leaf.
        let fragment = "{ ...F } fragment F on Query { catalog { cubes { __typename } } }";
        assert_eq!(summary(fragment, 2), Err(LimitError::TooDeep { max: 2 }));
        assert!(!summary(fragment, 3).expect("ok").introspects);
    }

    #[test]
    fn hostile_introspection_is_refused() {
        let of_types = |n: usize| {
            format!(
                "{{ __schema {{ types {{ fields {{ type {}{{ name }}{} }} }} }} }}",
                "{ ofType ".repeat(n),
                " }".repeat(n)
            )
        };
        // __schema types fields type, n ofTypes, name: 5 + n deep.
        assert!(summary_ok(&of_types(MAX_INTROSPECTION_DEPTH - 5), 12));
        assert_eq!(
            summary(&of_types(MAX_INTROSPECTION_DEPTH - 4), 12),
            Err(LimitError::IntrospectionTooDeep {
                max: MAX_INTROSPECTION_DEPTH
            })
        );
        let lists = |n: usize| {
            format!(
                "{{ __type(name: \"Query\") {}{{ name }}{} }}",
                "{ fields { type ".repeat(n),
                " } }".repeat(n)
            )
        };
        assert!(summary_ok(&lists(MAX_INTROSPECTION_LISTS), 12));
        assert_eq!(
            summary(&lists(MAX_INTROSPECTION_LISTS + 1), 12),
            Err(LimitError::IntrospectionListsTooDeep {
                max: MAX_INTROSPECTION_LISTS
            })
        );
        // A fragment spread under `__schema` counts there, not in the query.
        let spread = "{ __schema { types { ...T } } } fragment T on __Type { fields { type { fields { type { inputFields { name } } } } } }";
        assert!(matches!(
            summary(spread, 12),
            Err(LimitError::IntrospectionListsTooDeep { .. })
        ));
    }

    #[test]
    fn only_answers_that_depend_on_their_entries_alone_are_repeatable() {
        let repeatable = |query: &str| summary(query, 12).expect("ok").repeatable;
        let panel = "query Panel($i: AggregateInput!) { aggregate(input: $i) { rows cache { status producedAt } } }";
        assert!(repeatable(panel));
        assert!(repeatable(
            "query A($i: AggregateInput!) { a: aggregate(input: $i) { ...R } __typename } fragment R on AggregateResult { rows }"
        ));
        // The clock, the catalog, the schema, and anything but a query.
        assert!(!repeatable(
            "query($i: AggregateInput!) { aggregate(input: $i) { cache { ageSeconds } } }"
        ));
        assert!(!repeatable(
            "query($i: AggregateInput!) { aggregate(input: $i) { ...C } } fragment C on AggregateResult { cache { expiresInSeconds } }"
        ));
        assert!(!repeatable("{ catalog { cubes { name } } }"));
        assert!(!repeatable("{ __schema { queryType { name } } }"));
        assert!(!repeatable(
            "query A { __typename } mutation B { __typename }"
        ));
        assert!(!repeatable("subscription S { __typename }"));
    }

    #[test]
    fn the_operation_name_is_that_of_the_only_named_operation() {
        let name = |query: &str| summary(query, 12).expect("ok").operation_name;
        assert_eq!(
            name("query Panel { catalog { cubes { name } } }").as_deref(),
            Some("Panel")
        );
        assert_eq!(name("{ catalog { cubes { name } } }"), None);
        assert_eq!(name("query A { __typename } query B { __typename }"), None);
    }

    #[test]
    fn tokens_are_counted_without_parsing() {
        assert!(check_tokens("{ catalog { cubes { name } } }", 9).is_ok());
        assert!(check_tokens("{ catalog { cubes { name } } }", 8).is_err());
        assert!(check_tokens("# only a comment\n", 0).is_ok());
        assert!(check_tokens("\"\"\"block \\\"\"\" string\"\"\" x", 2).is_ok());
        assert!(check_tokens("-1-1-1", 2).is_err());
        assert!(check_tokens("1.5e-3 name_2", 2).is_ok());
    }
}
