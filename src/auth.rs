//! Who is asking, and which customers they may see.
//!
//! Authentication is off unless configured. When on, a request identifies
//! itself with a JWT bearer token (`Authorization: Bearer ...`, HS256 secret
//! or RS256/ES256 public key; `exp` required, `nbf` checked) or with an API key
//! in the `x-api-key` header (never a cookie or the query string). Keys are
//! stored only as SHA-256 hashes. Both name the customers the caller may query
//! and may carry a quota of BI queries per minute.
//!
//! Architecture invariant: identity and permission are decided before the
//! cache is looked at or a wait is joined, so a forbidden request can never
//! be answered `HIT` or `COALESCED`.

use std::collections::{BTreeSet, HashMap};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{AuthSettings, JwtKey, JwtSettings};

/// The header API keys are read from.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The customers a caller may query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Customers {
    All,
    Only(BTreeSet<String>),
}

impl Customers {
    pub fn allows(&self, customer: &str) -> bool {
        match self {
            Customers::All => true,
            Customers::Only(allowed) => allowed.contains(customer),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Stable name for quotas and logs: `key:<name>` or `jwt:<subject>`.
    pub id: String,
    pub customers: Customers,
    pub quota_per_minute: Option<u64>,
    /// When the credential stops being valid (a JWT's `exp`, in seconds
    /// since the Unix epoch); `None` for API keys, which do not expire. A
    /// long-lived connection (a live panel's WebSocket) is closed then.
    pub expires_at: Option<u64>,
}

/// What one request's credentials came to.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Authentication is off: everyone may query every customer.
    Open,
    Authenticated(Caller),
    /// Authentication is on, and the request has no valid credential.
    Unauthenticated(AuthError),
}

impl Identity {
    pub fn is_authenticated(&self) -> bool {
        !matches!(self, Identity::Unauthenticated(_))
    }

    /// Whether this identity may query `customer`.
    pub fn may_query(&self, customer: &str) -> Result<(), AccessError> {
        match self {
            Identity::Open => Ok(()),
            Identity::Authenticated(caller) if caller.customers.allows(customer) => Ok(()),
            Identity::Authenticated(_) => Err(AccessError::Forbidden),
            Identity::Unauthenticated(err) => Err(AccessError::Unauthenticated(err.clone())),
        }
    }

    /// What this identity may see, as a string: equal for identities that
    /// see the same answers (for `ETag`s, so no answer leaks to a caller
    /// allowed other customers through a shared cache).
    pub fn scope_fingerprint(&self) -> String {
        match self {
            Identity::Open => "open".to_owned(),
            Identity::Authenticated(caller) => match &caller.customers {
                Customers::All => "customers:*".to_owned(),
                Customers::Only(allowed) => {
                    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
                    format!("customers:{}", sha256_hex(&allowed.join("\n")))
                }
            },
            Identity::Unauthenticated(_) => "unauthenticated".to_owned(),
        }
    }

    /// When this identity's credential expires (seconds since the Unix
    /// epoch), if it does.
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            Identity::Authenticated(caller) => caller.expires_at,
            _ => None,
        }
    }

    /// The quota of this identity, with the name it is counted under.
    pub fn quota(&self) -> Option<(&str, u64)> {
        match self {
            Identity::Authenticated(caller) => caller
                .quota_per_minute
                .map(|quota| (caller.id.as_str(), quota)),
            _ => None,
        }
    }
}

/// Why a credential was refused (`UNAUTHENTICATED`). The messages never
/// repeat the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("credentials required: send `Authorization: Bearer <JWT>` or an `x-api-key` header")]
    Missing,
    #[error("the bearer token is not valid ({0})")]
    InvalidToken(String),
    #[error("the API key is not valid")]
    UnknownKey,
}

/// Why a request may not have an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Unauthenticated(AuthError),
    #[error("these credentials may not query this customer")]
    Forbidden,
}

/// Checks credentials against the configured JWT key and API keys.
pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    api_keys: HashMap<String, Caller>,
}

struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    customers_claim: String,
    quota_per_minute: Option<u64>,
}

/// The API keys file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeysFile {
    keys: Vec<ApiKeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApiKeyEntry {
    /// A name for logs and quotas, never the key.
    name: String,
    /// Hex SHA-256 of the key.
    sha256: String,
    /// A list of customers, or `"*"`.
    customers: serde_json::Value,
    #[serde(default)]
    quota_per_minute: Option<u64>,
}

/// Why authentication could not be set up (reported at start, naming the variable).
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct AuthSetupError {
    pub variable: &'static str,
    pub problem: String,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> Result<Authenticator, AuthSetupError> {
        let jwt = settings.jwt.as_ref().map(JwtVerifier::new).transpose()?;
        let api_keys = match &settings.api_keys_file {
            Some(path) => load_api_keys(path)?,
            None => HashMap::new(),
        };
        Ok(Authenticator { jwt, api_keys })
    }

    /// The identity behind a request's headers.
    pub fn identify(&self, headers: &http::HeaderMap) -> Identity {
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim);
        if let Some(token) = bearer {
            return match &self.jwt {
                Some(verifier) => match verifier.verify(token) {
                    Ok(caller) => Identity::Authenticated(caller),
                    Err(err) => Identity::Unauthenticated(err),
                },
                None => Identity::Unauthenticated(AuthError::InvalidToken(
                    "this gateway accepts no bearer tokens".into(),
                )),
            };
        }
        if let Some(key) = headers
            .get(API_KEY_HEADER)
            .and_then(|value| value.to_str().ok())
        {
            return match self.api_keys.get(&sha256_hex(key.trim())) {
                Some(caller) => Identity::Authenticated(caller.clone()),
                None => Identity::Unauthenticated(AuthError::UnknownKey),
            };
        }
        Identity::Unauthenticated(AuthError::Missing)
    }
}

impl JwtVerifier {
    fn new(settings: &JwtSettings) -> Result<JwtVerifier, AuthSetupError> {
        let (key, algorithm) = match &settings.key {
            JwtKey::Hs256Secret(secret) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            JwtKey::PublicKeyPem(pem) => {
                if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                    (key, Algorithm::RS256)
                } else {
                    let key =
                        DecodingKey::from_ec_pem(pem.as_bytes()).map_err(|err| AuthSetupError {
                            variable: "AUTH_JWT_PUBLIC_KEY_FILE",
                            problem: format!("not an RSA or EC public key in PEM: {err}"),
                        })?;
                    (key, Algorithm::ES256)
                }
            }
        };
        // One algorithm, fixed by the key: a token cannot choose `none` or
        // switch an RSA key into an HMAC secret.
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp"]);
        // Identity providers put `aud` in every token: check it when
        // configured, ignore it otherwise (rather than refusing every token).
        match &settings.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
        }
        Ok(JwtVerifier {
            key,
            validation,
            customers_claim: settings.customers_claim.clone(),
            quota_per_minute: settings.quota_per_minute,
        })
    }

    fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|err| AuthError::InvalidToken(describe_jwt_error(&err)))?
        .claims;
        let customers = claims
            .get(&self.customers_claim)
            .and_then(parse_customers)
            .ok_or_else(|| {
                AuthError::InvalidToken(format!(
                    "claim `{}` must list customers or be \"*\"",
                    self.customers_claim
                ))
            })?;
        let subject = claims
            .get("sub")
            .and_then(|sub| sub.as_str())
            .unwrap_or("unknown");
        Ok(Caller {
            id: format!("jwt:{subject}"),
            customers,
            quota_per_minute: self.quota_per_minute,
            // Required and checked above: a number.
            expires_at: claims.get("exp").and_then(serde_json::Value::as_u64),
        })
    }
}

/// Says what is wrong with a token without echoing it.
fn describe_jwt_error(err: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match err.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not valid yet".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidAlgorithm => "algorithm not accepted".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("no `{claim}` claim"),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        _ => "malformed".into(),
    }
}

fn parse_customers(value: &serde_json::Value) -> Option<Customers> {
    match value {
        serde_json::Value::String(star) if star == "*" => Some(Customers::All),
        serde_json::Value::Array(items) => {
            let mut customers = BTreeSet::new();
            for item in items {
                match item.as_str() {
                    Some("*") => return Some(Customers::All),
                    Some(customer) => customers.insert(customer.to_owned()),
                    None => return None,
                };
            }
            Some(Customers::Only(customers))
        }
        _ => None,
    }
}

fn load_api_keys(path: &str) -> Result<HashMap<String, Caller>, AuthSetupError> {
    let bad = |problem: String| AuthSetupError {
        variable: "AUTH_API_KEYS_FILE",
        problem,
    };
    let text =
        std::fs::read_to_string(path).map_err(|err| bad(format!("cannot read `{path}`: {err}")))?;
    let file: ApiKeysFile = serde_json::from_str(&text).map_err(|err| {
        bad(format!(
            "`{path}` is not {{\"keys\": [{{\"name\", \"sha256\", \"customers\", \"quotaPerMinute\"?}}]}}: {err}"
        ))
    })?;
    let mut keys = HashMap::new();
    for entry in file.keys {
        let hash = entry.sha256.trim().to_ascii_lowercase();
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(format!(
                "key `{}`: sha256 must be 64 hex digits",
                entry.name
            )));
        }
        let customers = parse_customers(&entry.customers).ok_or_else(|| {
            bad(format!(
                "key `{}`: customers must be a list or \"*\"",
                entry.name
            ))
        })?;
        keys.insert(
            hash,
            Caller {
                id: format!("key:{}", entry.name),
                customers,
                quota_per_minute: entry.quota_per_minute,
                expires_at: None,
            },
        );
    }
    Ok(keys)
}

/// Hex SHA-256, as API keys are stored.
pub fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn authenticator() -> Authenticator {
        Authenticator::new(&AuthSettings {
            jwt: Some(JwtSettings {
                key: JwtKey::Hs256Secret(SECRET.into()),
                customers_claim: "customers".into(),
                audience: None,
                issuer: None,
                quota_per_minute: None,
            }),
            api_keys_file: None,
        })
        .expect("valid settings")
    }

    fn now() -> i64 {
        crate::cache::unix_millis() as i64 / 1000
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encodes")
    }

    fn identify(token: &str) -> Identity {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        authenticator().identify(&headers)
    }

    #[test]
    fn a_valid_token_names_its_customers() {
        let exp = now() + 60;
        let identity = identify(&token(
            serde_json::json!({"sub": "u1", "exp": exp, "customers": ["acme"]}),
            SECRET,
        ));
        assert!(identity.may_query("acme").is_ok());
        assert_eq!(identity.may_query("globex"), Err(AccessError::Forbidden));
        assert_eq!(identity.expires_at(), Some(exp as u64));
    }

    #[test]
    fn expired_early_forged_and_unsigned_tokens_are_refused() {
        let expired = token(
            serde_json::json!({"exp": now() - 120, "customers": "*"}),
            SECRET,
        );
        let early = token(
            serde_json::json!({"exp": now() + 600, "nbf": now() + 300, "customers": "*"}),
            SECRET,
        );
        let forged = token(
            serde_json::json!({"exp": now() + 60, "customers": "*"}),
            "another-secret-another-secret-xx",
        );
        // {"alg":"none"} with no signature.
        let unsigned =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJleHAiOjQxMDI0NDQ4MDAsImN1c3RvbWVycyI6IioifQ.";
        for bad in [expired.as_str(), early.as_str(), forged.as_str(), unsigned] {
            assert!(
                matches!(identify(bad), Identity::Unauthenticated(_)),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn no_credential_is_unauthenticated() {
        let identity = authenticator().identify(&http::HeaderMap::new());
        assert!(matches!(
            identity.may_query("acme"),
            Err(AccessError::Unauthenticated(AuthError::Missing))
        ));
    }
}
