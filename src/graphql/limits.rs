//! Cost limits that async-graphql does not check itself: every `aggregate`
//! field is potentially a paid BI query, so a document is refused before
//! execution when it asks for too many of them, uses too many aliases, or is
//! too long to be worth parsing.

use std::collections::HashMap;

use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, Selection, SelectionSet,
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
}

/// Fragment spreads are followed at most this deep.
const MAX_FRAGMENT_DEPTH: usize = 16;

/// Counts `aggregate` fields, aliases and fields over every operation, each
/// fragment counted as often as it is spread (that is what execution would
/// cost). Each fragment is counted once and its counts reused, with
/// saturating arithmetic, so a "fragment bomb" (fragments spreading the next
/// one many times over) costs time linear in the document, not in its expansion.
pub fn check_document(
    document: &ExecutableDocument,
    limits: DocumentLimits,
) -> Result<(), LimitError> {
    let mut walker = Walker {
        document,
        fragments: HashMap::new(),
        in_progress: Vec::new(),
    };
    let mut total = Counts::default();
    match &document.operations {
        DocumentOperations::Single(operation) => {
            total.add(walker.count(&operation.node.selection_set.node, 0)?, 1);
        }
        DocumentOperations::Multiple(operations) => {
            for operation in operations.values() {
                total.add(walker.count(&operation.node.selection_set.node, 0)?, 1);
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
    Ok(())
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    aggregates: usize,
    aliases: usize,
    fields: usize,
}

impl Counts {
    fn add(&mut self, other: Counts, times: usize) {
        self.aggregates = self
            .aggregates
            .saturating_add(other.aggregates.saturating_mul(times));
        self.aliases = self
            .aliases
            .saturating_add(other.aliases.saturating_mul(times));
        self.fields = self
            .fields
            .saturating_add(other.fields.saturating_mul(times));
    }
}

struct Walker<'a> {
    document: &'a ExecutableDocument,
    /// Counts of fragments already walked, by name.
    fragments: HashMap<&'a str, Counts>,
    /// Fragments being walked: spreading one of them again is a cycle.
    in_progress: Vec<&'a str>,
}

impl<'a> Walker<'a> {
    fn count(&mut self, set: &'a SelectionSet, depth: usize) -> Result<Counts, LimitError> {
        if depth > MAX_FRAGMENT_DEPTH {
            return Err(LimitError::FragmentsTooDeep {
                max: MAX_FRAGMENT_DEPTH,
            });
        }
        let mut counts = Counts::default();
        for item in &set.items {
            match &item.node {
                Selection::Field(field) => {
                    let field = &field.node;
                    counts.add(
                        Counts {
                            aggregates: usize::from(field.name.node.as_str() == "aggregate"),
                            aliases: usize::from(field.alias.is_some()),
                            fields: 1,
                        },
                        1,
                    );
                    counts.add(self.count(&field.selection_set.node, depth)?, 1);
                }
                Selection::InlineFragment(fragment) => {
                    counts.add(self.count(&fragment.node.selection_set.node, depth + 1)?, 1);
                }
                Selection::FragmentSpread(spread) => {
                    let name = spread.node.fragment_name.node.as_str();
                    counts.add(self.fragment(name, depth + 1)?, 1);
                }
            }
        }
        Ok(counts)
    }

    fn fragment(&mut self, name: &'a str, depth: usize) -> Result<Counts, LimitError> {
        if let Some(counts) = self.fragments.get(name) {
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
        let counts = self.count(&fragment.node.selection_set.node, depth);
        self.in_progress.pop();
        let counts = counts?;
        self.fragments.insert(name, counts);
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
            },
        )
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
