//! Customer-scoped Cube tokens, minted from Cube's API secret.
//!
//! With `BI_API_SECRET` set, no query reaches the BI with a token that could
//! read another customer's rows: each customer's queries carry a short-lived
//! HS256 JWT whose payload (Cube's security context) names that customer, and
//! that customer only. A Cube whose `queryRewrite` adds the tenant filter from
//! the security context then enforces the tenant a second time, whatever the
//! gateway sends. Tokens are kept and reused until shortly before they expire,
//! so minting costs one HMAC per customer per token lifetime.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use reqwest::header::HeaderValue;

/// Which credentials one BI request carries. All queries of one request
/// share it: a batch never mixes customers' tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenScope {
    /// The gateway's own credentials: `BI_TOKEN` as given (or none), or,
    /// when tokens are minted, a token with an empty security context
    /// (used for `GET /meta` only).
    Shared,
    /// A minted token whose security context names this customer only.
    Customer(Arc<str>),
}

/// How tokens are minted.
#[derive(Clone)]
pub struct MintSettings {
    /// Cube's API secret (`CUBEJS_API_SECRET`).
    pub secret: String,
    /// The security-context claim that carries the customer.
    pub claim: String,
    /// `exp - iat` of every token.
    pub ttl: Duration,
    /// How long a token is reused: less than `ttl` by more than one BI call's
    /// deadline, so a token never expires during a call that carries it.
    pub reuse_for: Duration,
}

impl std::fmt::Debug for MintSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log line.
        f.debug_struct("MintSettings")
            .field("claim", &self.claim)
            .field("ttl", &self.ttl)
            .field("reuse_for", &self.reuse_for)
            .finish_non_exhaustive()
    }
}

/// Mints and keeps one token per customer (and one for the gateway itself).
pub struct TokenMinter {
    key: EncodingKey,
    claim: String,
    ttl: Duration,
    /// By customer (`None`: the gateway's own token), each for `reuse_for`.
    tokens: moka::sync::Cache<Option<Arc<str>>, HeaderValue>,
}

/// A token could not be signed: nothing a retry or the BI could fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("could not sign a token for the BI")]
pub struct MintError;

impl TokenMinter {
    /// Checks the settings by minting one token.
    pub fn new(settings: &MintSettings) -> Result<TokenMinter, MintError> {
        let minter = TokenMinter {
            key: EncodingKey::from_secret(settings.secret.as_bytes()),
            claim: settings.claim.clone(),
            ttl: settings.ttl,
            tokens: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.reuse_for.max(Duration::from_millis(1)))
                .build(),
        };
        minter.mint(None)?;
        Ok(minter)
    }

    /// The `Authorization` value for `scope`: the kept token while it has
    /// more than a BI call's deadline left, else a new one.
    pub fn header(&self, scope: &TokenScope) -> Result<HeaderValue, MintError> {
        let customer = match scope {
            TokenScope::Shared => None,
            TokenScope::Customer(customer) => Some(Arc::clone(customer)),
        };
        self.tokens
            .try_get_with(customer.clone(), || self.mint(customer.as_deref()))
            .map_err(|_| MintError)
    }

    fn mint(&self, customer: Option<&str>) -> Result<HeaderValue, MintError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| MintError)?
            .as_secs();
        let mut claims = serde_json::Map::new();
        if let Some(customer) = customer {
            claims.insert(self.claim.clone(), customer.into());
        }
        claims.insert("iat".into(), now.into());
        claims.insert("exp".into(), (now + self.ttl.as_secs().max(1)).into());
        let token =
            jsonwebtoken::encode(&Header::default(), &claims, &self.key).map_err(|err| {
                tracing::error!(error = %err, "signing a BI token failed");
                MintError
            })?;
        // Cube reads the token as the whole header value (`Bearer ` is optional).
        let mut value = HeaderValue::from_str(&token).map_err(|_| MintError)?;
        value.set_sensitive(true);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn minter(reuse_for: Duration) -> TokenMinter {
        TokenMinter::new(&MintSettings {
            secret: "s".repeat(32),
            claim: "tenant".into(),
            ttl: Duration::from_secs(600),
            reuse_for,
        })
        .expect("valid settings")
    }

    fn claims(value: &HeaderValue) -> serde_json::Value {
        let token = value.to_str().expect("ASCII");
        jsonwebtoken::decode::<serde_json::Value>(
            token,
            &DecodingKey::from_secret("s".repeat(32).as_bytes()),
            &Validation::default(),
        )
        .expect("a valid HS256 token")
        .claims
    }

    /// A customer's token names that customer in the claim, and nothing
    /// else; it lives `ttl`; the gateway's own token has no customer.
    #[test]
    fn tokens_name_their_customer_only() {
        let minter = minter(Duration::from_secs(60));
        let acme = claims(
            &minter
                .header(&TokenScope::Customer("acme".into()))
                .expect("minted"),
        );
        let object = acme.as_object().expect("an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["exp", "iat", "tenant"]);
        assert_eq!(acme["tenant"], "acme");
        assert_eq!(
            acme["exp"].as_u64().unwrap_or(0) - acme["iat"].as_u64().unwrap_or(0),
            600
        );
        let shared = claims(&minter.header(&TokenScope::Shared).expect("minted"));
        assert!(shared.get("tenant").is_none(), "{shared}");
    }

    /// Tokens are reused within `reuse_for` and minted anew after it.
    #[test]
    fn tokens_are_reused_until_their_reuse_time_ends() {
        let minter = minter(Duration::from_millis(300));
        let acme = TokenScope::Customer("acme".into());
        let first = minter.header(&acme).expect("minted");
        assert_eq!(minter.header(&acme).expect("kept"), first);
        assert_ne!(
            minter
                .header(&TokenScope::Customer("globex".into()))
                .expect("minted"),
            first
        );
        // `iat` has a resolution of one second: wait past it, so the new
        // token differs in its bytes too.
        std::thread::sleep(Duration::from_millis(1_100));
        assert_ne!(minter.header(&acme).expect("minted again"), first);
    }
}
