//! Authentication and authorization: JWTs (HS256) and what their claims allow.
//!
//! Owns verifying a token (signature, `exp`, required `sub`) with `jsonwebtoken` and the
//! [`Grant`] it yields: the patterns its holder may subscribe to and publish on. With no
//! secret configured every connection gets [`Grant::everything`]. It does not know where a
//! token came from (query, header, first message) nor what is done on refusal.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::topic::Pattern;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where one is required.
    #[error("a token is required")]
    Missing,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// Bad signature, bad format, wrong algorithm, missing claim.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// What a verified token (or the absence of auth) allows.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The `sub` claim; `None` with auth off.
    pub sub: Option<String>,
    /// The `info` claim: what presence shows about the holder (any JSON).
    pub info: Option<Box<serde_json::value::RawValue>>,
    /// The `admin` claim: may watch the dashboard and its stats stream.
    pub admin: bool,
    /// Patterns the holder may read.
    pub subscribe: Vec<Pattern>,
    /// Patterns the holder may publish on.
    pub publish: Vec<Pattern>,
    /// A connect proxy's `expire_at` (Unix seconds): the connection closes with 4001 then
    /// unless it authenticates again.
    pub expire_at: Option<u64>,
}

impl Grant {
    /// Everything, for when auth is off.
    pub fn everything() -> Self {
        Self {
            sub: None,
            info: None,
            admin: true,
            subscribe: vec![Pattern::everything()],
            publish: vec![Pattern::everything()],
            expire_at: None,
        }
    }

    /// What a connect proxy's answer allows: its `user`, `info`, `subscribe`, `publish`
    /// and `expire_at` mean what a token's `sub`, `info`, `subscribe`, `publish` and `exp`
    /// do (never `admin`: operators' routes need a token).
    pub fn from_connect_answer(answer: serde_json::Map<String, serde_json::Value>) -> Result<Self, AuthError> {
        let answer: ConnectAnswer = serde_json::from_value(serde_json::Value::Object(answer))
            .map_err(|e| AuthError::Invalid(format!("connect answer: {e}")))?;
        Ok(Self {
            sub: answer.user.filter(|u| !u.is_empty()),
            info: answer.info.map(|i| i.to_string()).and_then(|i| serde_json::value::RawValue::from_string(i).ok()),
            admin: false,
            subscribe: patterns(&answer.subscribe)?,
            publish: patterns(&answer.publish)?,
            expire_at: answer.expire_at,
        })
    }

    /// Whether every topic `pattern` matches may be read.
    pub fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.subscribe.iter().any(|allowed| pattern.is_covered_by(allowed))
    }

    /// Whether `topic` may be published on.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|allowed| allowed.matches(topic))
    }
}

#[derive(Deserialize)]
struct ConnectAnswer {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    info: Option<serde_json::Value>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    expire_at: Option<u64>,
}

/// Grant patterns from claim strings.
fn patterns(list: &[String]) -> Result<Vec<Pattern>, AuthError> {
    list.iter()
        .map(|p| Pattern::parse(p).map_err(|e| AuthError::Invalid(format!("claim pattern {p:?}: {e}"))))
        .collect()
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    info: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    admin: bool,
}

/// The verifier; `None` inside means auth is off.
pub struct Auth {
    key: Option<(DecodingKey, Validation)>,
}

impl Auth {
    /// Auth with HS256 `secret`; an empty secret turns it off.
    pub fn new(secret: &str) -> Self {
        if secret.is_empty() {
            return Self { key: None };
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        Self { key: Some((DecodingKey::from_secret(secret.as_bytes()), validation)) }
    }

    /// Whether tokens are checked.
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Verifies `token` (if any) into a grant.
    pub fn verify(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        let Some((key, validation)) = &self.key else { return Ok(Grant::everything()) };
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        Ok(Grant {
            sub: Some(data.claims.sub),
            subscribe: patterns(&data.claims.subscribe)?,
            publish: patterns(&data.claims.publish)?,
            info: data.claims.info,
            admin: data.claims.admin,
            expire_at: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
            .unwrap()
    }

    fn in_an_hour() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600
    }

    #[test]
    fn off_allows_everything() {
        let grant = Auth::new("").verify(None).unwrap();
        assert!(grant.may_publish("a.b") && grant.may_subscribe(&Pattern::parse(">").unwrap()));
    }

    #[test]
    fn verifies_signature_expiry_and_claims() {
        let auth = Auth::new("s3cret");
        let good = token(
            "s3cret",
            json!({"sub": "u1", "exp": in_an_hour(), "subscribe": ["chat.*"], "publish": ["chat.room1"]}),
        );
        let grant = auth.verify(Some(&good)).unwrap();
        assert_eq!(grant.sub.as_deref(), Some("u1"));
        assert!(grant.may_subscribe(&Pattern::parse("chat.room2").unwrap()));
        assert!(!grant.may_subscribe(&Pattern::parse("chat.>").unwrap()));
        assert!(grant.may_publish("chat.room1") && !grant.may_publish("chat.room2"));
        assert_eq!(auth.verify(None).unwrap_err(), AuthError::Missing);
        let forged = token("other", json!({"sub": "u1", "exp": in_an_hour()}));
        assert!(matches!(auth.verify(Some(&forged)), Err(AuthError::Invalid(_))));
        let expired = token("s3cret", json!({"sub": "u1", "exp": 1_000_000}));
        assert_eq!(auth.verify(Some(&expired)).unwrap_err(), AuthError::Expired);
        let no_sub = token("s3cret", json!({"exp": in_an_hour()}));
        assert!(matches!(auth.verify(Some(&no_sub)), Err(AuthError::Invalid(_))));
        assert!(matches!(auth.verify(Some("not.a.jwt")), Err(AuthError::Invalid(_))));
    }
}
