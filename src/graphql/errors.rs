//! Every error a client can see, mapped to `extensions.code` in one place.

use async_graphql::ErrorExtensions;

use crate::auth::AccessError;
use crate::cache::{AnswerError, AnswerErrorKind};
use crate::live::LiveRefusal;
use crate::query::InputError;

/// The codes of the contract, plus those for documents refused before execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadUserInput,
    BiError,
    BiUnavailable,
    RateLimited,
    InternalServerError,
    GraphqlParseFailed,
    GraphqlValidationFailed,
    Unauthenticated,
    Forbidden,
    QueryTooComplex,
    PersistedQueryNotFound,
    /// The request is not one this gateway can run (not GraphQL, a bad
    /// persisted-query extension, ...).
    BadRequest,
    /// A live subscription past `LIVE_MAX_SUBSCRIPTIONS_PER_CONNECTION` or
    /// `LIVE_MAX_SUBSCRIPTIONS`.
    TooManySubscriptions,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadUserInput => "BAD_USER_INPUT",
            ErrorCode::BiError => "BI_ERROR",
            ErrorCode::BiUnavailable => "BI_UNAVAILABLE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::InternalServerError => "INTERNAL_SERVER_ERROR",
            ErrorCode::GraphqlParseFailed => "GRAPHQL_PARSE_FAILED",
            ErrorCode::GraphqlValidationFailed => "GRAPHQL_VALIDATION_FAILED",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::QueryTooComplex => "QUERY_TOO_COMPLEX",
            ErrorCode::PersistedQueryNotFound => "PERSISTED_QUERY_NOT_FOUND",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
        }
    }
}

/// Errors of the `aggregate` and `catalog` resolvers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolverError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Answer(#[from] AnswerError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Live(#[from] LiveRefusal),
}

impl ErrorExtensions for ResolverError {
    fn extend(&self) -> async_graphql::Error {
        let (code, message, retry_after) = match self {
            ResolverError::Input(input) => (ErrorCode::BadUserInput, input.to_string(), None),
            ResolverError::Access(AccessError::Unauthenticated(err)) => {
                (ErrorCode::Unauthenticated, err.to_string(), None)
            }
            ResolverError::Access(AccessError::Forbidden) => (
                ErrorCode::Forbidden,
                AccessError::Forbidden.to_string(),
                None,
            ),
            ResolverError::Live(refusal) => {
                (ErrorCode::TooManySubscriptions, refusal.to_string(), None)
            }
            ResolverError::Answer(answer) => {
                let code = match answer.kind {
                    AnswerErrorKind::BiError => ErrorCode::BiError,
                    AnswerErrorKind::BiUnavailable => ErrorCode::BiUnavailable,
                    AnswerErrorKind::RateLimited => ErrorCode::RateLimited,
                    AnswerErrorKind::Internal => ErrorCode::InternalServerError,
                };
                let message = match answer.kind {
                    // Details of our own failures are for the log, not the client.
                    AnswerErrorKind::Internal => {
                        tracing::error!(error = %answer.message, "internal error");
                        "internal error; see the gateway's log".to_owned()
                    }
                    _ => answer.message.clone(),
                };
                (code, message, answer.retry_after_secs)
            }
        };
        async_graphql::Error::new(message).extend_with(|_, extensions| {
            extensions.set("code", code.as_str());
            if let Some(secs) = retry_after {
                extensions.set("retryAfter", secs);
            }
        })
    }
}

/// Gives a code to the errors async-graphql produces itself (parsing,
/// validation, coercion of arguments and variables), which have none.
pub fn classify_request_errors(response: &mut async_graphql::Response) {
    for error in &mut response.errors {
        let has_code = error
            .extensions
            .as_ref()
            .is_some_and(|extensions| extensions.get("code").is_some());
        if has_code {
            continue;
        }
        let message = error.message.as_str();
        // Only the coercion of argument and variable *values* is the
        // user's input; other document errors are validation failures.
        let code = if message.starts_with("Failed to parse")
            || message.starts_with("Invalid value for argument")
            || message.starts_with("Invalid value for variable")
            || (message.starts_with("Variable \"") && message.contains("value"))
        {
            ErrorCode::BadUserInput
        } else if message.contains("nested too deep")
            || message.contains("too complex")
            || message.contains("number of directives")
            || message.contains("recursion depth")
            || message.contains("recursion limit")
        {
            ErrorCode::QueryTooComplex
        } else if message.contains(" --> ") || message.starts_with("Parse error") {
            ErrorCode::GraphqlParseFailed
        } else {
            ErrorCode::GraphqlValidationFailed
        };
        error
            .extensions
            .get_or_insert_with(Default::default)
            .set("code", code.as_str());
    }
}
