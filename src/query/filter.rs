//! User filters and `order`, validated and put in canonical form: two inputs
//! that differ only in the order of their filters, of a filter's values, or
//! in the spelling of a number or a boolean, become equal values.

use super::{InputError, Member, truncate_for_message};

/// Cube's filter operators, as GraphQL spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterOperator {
    Equals,
    NotEquals,
    Contains,
    NotContains,
    StartsWith,
    EndsWith,
    Gt,
    Gte,
    Lt,
    Lte,
    Set,
    NotSet,
}

/// How many values an operator takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    /// One or more, ORed (`equals`, `contains`, ...) or all excluded
    /// (`notEquals`, `notContains`): a set, so their order does not matter.
    Many,
    /// Exactly one number.
    OneNumber,
    None,
}

impl FilterOperator {
    /// Cube's lower-camel name.
    pub fn as_cube(self) -> &'static str {
        match self {
            FilterOperator::Equals => "equals",
            FilterOperator::NotEquals => "notEquals",
            FilterOperator::Contains => "contains",
            FilterOperator::NotContains => "notContains",
            FilterOperator::StartsWith => "startsWith",
            FilterOperator::EndsWith => "endsWith",
            FilterOperator::Gt => "gt",
            FilterOperator::Gte => "gte",
            FilterOperator::Lt => "lt",
            FilterOperator::Lte => "lte",
            FilterOperator::Set => "set",
            FilterOperator::NotSet => "notSet",
        }
    }

    /// The GraphQL spelling, for messages.
    pub fn graphql_name(self) -> &'static str {
        match self {
            FilterOperator::Equals => "EQUALS",
            FilterOperator::NotEquals => "NOT_EQUALS",
            FilterOperator::Contains => "CONTAINS",
            FilterOperator::NotContains => "NOT_CONTAINS",
            FilterOperator::StartsWith => "STARTS_WITH",
            FilterOperator::EndsWith => "ENDS_WITH",
            FilterOperator::Gt => "GT",
            FilterOperator::Gte => "GTE",
            FilterOperator::Lt => "LT",
            FilterOperator::Lte => "LTE",
            FilterOperator::Set => "SET",
            FilterOperator::NotSet => "NOT_SET",
        }
    }

    fn arity(self) -> Arity {
        match self {
            FilterOperator::Gt | FilterOperator::Gte | FilterOperator::Lt | FilterOperator::Lte => {
                Arity::OneNumber
            }
            FilterOperator::Set | FilterOperator::NotSet => Arity::None,
            _ => Arity::Many,
        }
    }

    /// Whether the operator means something on a member of type `kind`.
    fn applies_to(self, kind: MemberType) -> bool {
        use FilterOperator::*;
        match kind {
            MemberType::Unknown => true,
            MemberType::Number => !matches!(self, Contains | NotContains | StartsWith | EndsWith),
            MemberType::String => !matches!(self, Gt | Gte | Lt | Lte),
            MemberType::Boolean => matches!(self, Equals | NotEquals | Set | NotSet),
            MemberType::Time => false,
        }
    }
}

/// `ASC` or `DESC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OrderDirection {
    #[default]
    Asc,
    Desc,
}

impl OrderDirection {
    pub fn as_cube(self) -> &'static str {
        match self {
            OrderDirection::Asc => "asc",
            OrderDirection::Desc => "desc",
        }
    }
}

/// A member's type, as the BI's `/meta` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberType {
    Number,
    String,
    Boolean,
    Time,
    /// No catalog yet, or `/meta` gave no (or another) type: values pass as
    /// given and the BI has the last word.
    Unknown,
}

impl MemberType {
    /// From `/meta`'s `type`.
    pub fn from_meta(kind: Option<&str>) -> MemberType {
        match kind {
            Some("number") => MemberType::Number,
            Some("string") => MemberType::String,
            Some("boolean") => MemberType::Boolean,
            Some("time") => MemberType::Time,
            _ => MemberType::Unknown,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MemberType::Number => "number",
            MemberType::String => "string",
            MemberType::Boolean => "boolean",
            MemberType::Time => "time",
            MemberType::Unknown => "unknown",
        }
    }
}

/// One filter as the GraphQL layer received it.
#[derive(Debug, Clone, Copy)]
pub struct RawFilter<'a> {
    pub member: &'a str,
    pub operator: FilterOperator,
    pub values: &'a [String],
}

/// One `order` entry as the GraphQL layer received it.
#[derive(Debug, Clone, Copy)]
pub struct RawOrder<'a> {
    pub member: &'a str,
    pub direction: OrderDirection,
}

/// A validated filter in canonical form: values canonically spelt, and
/// sorted and de-duplicated where they form a set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserFilter {
    pub member: Member,
    pub operator: FilterOperator,
    pub values: Vec<String>,
}

/// A validated `order` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderBy {
    pub member: Member,
    pub direction: OrderDirection,
}

/// The longest filter value accepted, in characters.
pub const MAX_FILTER_VALUE_CHARS: usize = 256;

/// Checks one filter's operator and values against its member's type and
/// puts its values in canonical form.
pub(super) fn canonical_filter(
    member: Member,
    operator: FilterOperator,
    values: &[String],
    kind: MemberType,
    max_values: usize,
) -> Result<UserFilter, InputError> {
    let op = operator.graphql_name();
    if !operator.applies_to(kind) {
        return Err(InputError::OperatorNotForType {
            member: member.as_str().to_owned(),
            operator: op,
            kind: kind.name(),
        });
    }
    if values.len() > max_values {
        return Err(InputError::TooManyValues {
            member: member.as_str().to_owned(),
            count: values.len(),
            max: max_values,
        });
    }
    match (operator.arity(), values.len()) {
        (Arity::None, 0) | (Arity::OneNumber, 1) => {}
        (Arity::Many, n) if n > 0 => {}
        (arity, _) => {
            return Err(InputError::FilterArity {
                member: member.as_str().to_owned(),
                operator: op,
                takes: match arity {
                    Arity::None => "no values",
                    Arity::OneNumber => "exactly one value",
                    Arity::Many => "at least one value",
                },
            });
        }
    }
    let wants_number = kind == MemberType::Number || operator.arity() == Arity::OneNumber;
    let mut canonical = values
        .iter()
        .map(|value| {
            if value.chars().count() > MAX_FILTER_VALUE_CHARS || value.chars().any(char::is_control)
            {
                return Err(InputError::FilterValue {
                    member: member.as_str().to_owned(),
                    value: truncate_for_message(value),
                    expected: "a value of at most 256 characters, without control characters",
                });
            }
            let wrong = |expected| InputError::FilterValue {
                member: member.as_str().to_owned(),
                value: truncate_for_message(value),
                expected,
            };
            if wants_number {
                canonical_number(value).ok_or_else(|| wrong("a number like 42 or -1.5"))
            } else if kind == MemberType::Boolean {
                match value.to_ascii_lowercase().as_str() {
                    "true" => Ok("true".to_owned()),
                    "false" => Ok("false".to_owned()),
                    _ => Err(wrong("true or false")),
                }
            } else {
                Ok(value.clone())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    canonical.sort();
    canonical.dedup();
    Ok(UserFilter {
        member,
        operator,
        values: canonical,
    })
}

/// The one spelling of a decimal number: no sign for zero or positives, no
/// leading zeros, no trailing fraction zeros, no exponent (`+1.50e2` is
/// `150`). Exact, unlike a round trip through `f64`. `None` for anything
/// that is not a finite decimal number of reasonable size.
pub fn canonical_number(text: &str) -> Option<String> {
    /// Digits kept either side of the point: larger values are refused
    /// rather than spelt out at length.
    const MAX_DIGITS: i64 = 40;
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => {
            let exponent = &unsigned[at + 1..];
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            (&unsigned[..at], exponent.parse::<i64>().ok()?)
        }
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // value = digits × 10^scale
    let digits = format!("{whole}{fraction}");
    let mut scale = exponent - fraction.len() as i64;
    let digits = digits.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    scale += (digits.len() - trimmed.len()) as i64;
    if trimmed.is_empty() {
        return Some("0".to_owned());
    }
    let length = trimmed.len() as i64;
    if length + scale > MAX_DIGITS || -scale > MAX_DIGITS {
        return None;
    }
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if scale >= 0 {
        out.push_str(trimmed);
        out.extend(std::iter::repeat_n('0', scale as usize));
    } else if length > -scale {
        let point = (length + scale) as usize;
        out.push_str(&trimmed[..point]);
        out.push('.');
        out.push_str(&trimmed[point..]);
    } else {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-scale - length) as usize));
        out.push_str(trimmed);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_have_one_spelling() {
        for (given, canonical) in [
            ("100", "100"),
            ("100.0", "100"),
            ("1e2", "100"),
            ("+100", "100"),
            ("0100", "100"),
            ("1.00E+2", "100"),
            ("-0", "0"),
            ("0.000", "0"),
            ("0.10", "0.1"),
            (".5", "0.5"),
            ("5.", "5"),
            ("-1.5e-3", "-0.0015"),
            ("12345678901234567890", "12345678901234567890"),
            ("1234.5", "1234.5"),
        ] {
            assert_eq!(
                canonical_number(given).as_deref(),
                Some(canonical),
                "{given}"
            );
        }
        for bad in [
            "", "-", "+", ".", "abc", "1e", "1e+", "--1", "1.2.3", "NaN", "inf", "1 ", " 1",
            "0x10", "1e99999", "1e60",
        ] {
            assert_eq!(canonical_number(bad), None, "{bad:?}");
        }
    }

    fn filter(
        operator: FilterOperator,
        values: &[&str],
        kind: MemberType,
    ) -> Result<UserFilter, InputError> {
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        canonical_filter(
            Member::parse("Sales.x").expect("a member"),
            operator,
            &values,
            kind,
            3,
        )
    }

    #[test]
    fn values_are_a_canonical_set() {
        let a = filter(FilterOperator::Equals, &["b", "a", "b"], MemberType::String);
        let b = filter(FilterOperator::Equals, &["a", "b"], MemberType::String);
        assert_eq!(a, b);
        let n = filter(
            FilterOperator::Equals,
            &["1.0", "1", "2e0"],
            MemberType::Number,
        )
        .expect("numbers");
        assert_eq!(n.values, ["1", "2"]);
        let t = filter(FilterOperator::NotEquals, &["TRUE"], MemberType::Boolean).expect("bool");
        assert_eq!(t.values, ["true"]);
    }

    #[test]
    fn operators_values_and_types_must_fit() {
        use FilterOperator::*;
        let cases: [(FilterOperator, &[&str], MemberType, &str); 11] = [
            (Gt, &["abc"], MemberType::Unknown, "a number"),
            (Gt, &["1", "2"], MemberType::Number, "exactly one value"),
            (Gt, &["1"], MemberType::String, "not for a string"),
            (Contains, &["1"], MemberType::Number, "not for a number"),
            (Equals, &["x"], MemberType::Number, "a number"),
            (Equals, &[], MemberType::String, "at least one value"),
            (Set, &["x"], MemberType::String, "no values"),
            (
                Equals,
                &["a", "b", "c", "d"],
                MemberType::String,
                "at most 3",
            ),
            (Equals, &["maybe"], MemberType::Boolean, "true or false"),
            (Equals, &["a\u{7}"], MemberType::String, "control"),
            (Equals, &["x"], MemberType::Time, "not for a time"),
        ];
        for (operator, values, kind, expected) in cases {
            let err = filter(operator, values, kind).expect_err(expected);
            assert!(err.to_string().contains(expected), "{err} !~ {expected}");
        }
        assert!(filter(Gte, &["1.5"], MemberType::Unknown).is_ok());
        assert!(filter(NotSet, &[], MemberType::Number).is_ok());
        assert!(filter(StartsWith, &["a"], MemberType::Unknown).is_ok());
    }
}
