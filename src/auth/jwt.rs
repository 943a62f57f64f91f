//! Admin and tenant JWTs: HS256 under `JWT_SECRET`, the algorithm pinned on decode, with
//! `iss`, `aud`, `exp`, `role` and (tenant tokens) `tid` checked. Decode failures are all
//! one `Invalid`: the caller answers 401 and never says which check failed.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::keys::{hash_api_key, key_generation};
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Tenant,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<String>,
    /// Names the tenant API key generation the token was issued under (see `keys::key_generation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
    pub aud: String,
    pub jti: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("invalid token")]
    Invalid,
    #[error("token could not be signed")]
    Signing,
}

/// Signs and verifies the service's JWTs.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl_secs: u64,
    /// The `kid` of admin tokens: a generation of `ADMIN_API_KEY`, so that a new admin key
    /// also retires every admin JWT issued under the old one (as a rotated tenant key does).
    /// Taken with `JWT_SECRET`: the key is the operator's choice, not 256 random bits like a
    /// tenant key, and a token's readable `kid` must not let its holder test guesses of it.
    admin_kid: String,
}

/// A signed token and its lifetime in seconds (`expiresIn`).
pub struct IssuedToken {
    pub token: String,
    pub expires_in: u64,
}

impl JwtKeys {
    pub fn new(config: &Config) -> Self {
        let secret = config.jwt_secret.expose().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[&config.jwt_audience]);
        validation.set_issuer(&[&config.jwt_issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            ttl_secs: config.jwt_ttl.as_secs(),
            admin_kid: key_generation(&hash_api_key(&format!(
                "{}\n{}",
                config.jwt_secret.expose(),
                config.admin_api_key.expose()
            ))),
        }
    }

    pub fn issue_admin(&self) -> Result<IssuedToken, JwtError> {
        self.issue(
            "admin".into(),
            Role::Admin,
            None,
            Some(self.admin_kid.clone()),
        )
    }

    pub fn issue_tenant(&self, tenant_id: &str, kid: String) -> Result<IssuedToken, JwtError> {
        self.issue(
            tenant_id.to_owned(),
            Role::Tenant,
            Some(tenant_id.to_owned()),
            Some(kid),
        )
    }

    fn issue(
        &self,
        sub: String,
        role: Role,
        tid: Option<String>,
        kid: Option<String>,
    ) -> Result<IssuedToken, JwtError> {
        let iat = now_secs();
        let claims = Claims {
            sub,
            role,
            tid,
            kid,
            iat,
            exp: iat + self.ttl_secs,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| JwtError::Signing)?;
        Ok(IssuedToken {
            token,
            expires_in: self.ttl_secs,
        })
    }

    /// Verifies signature, algorithm, `exp`, `iss`, `aud` and that `role` is `role`; an admin
    /// token must also be of the current `ADMIN_API_KEY`.
    pub fn verify(&self, token: &str, role: Role) -> Result<Claims, JwtError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| JwtError::Invalid)?;
        let claims = data.claims;
        let shape_ok = match role {
            Role::Admin => {
                claims.role == Role::Admin && claims.kid.as_deref() == Some(self.admin_kid.as_str())
            }
            Role::Tenant => {
                claims.role == Role::Tenant && claims.tid.as_deref() == Some(claims.sub.as_str())
            }
        };
        if shape_ok {
            Ok(claims)
        } else {
            Err(JwtError::Invalid)
        }
    }
}

/// Whether `value` has the three-part shape of a JWT (cheap; says nothing of validity).
pub fn looks_like_jwt(value: &str) -> bool {
    value.split('.').count() == 3 && value.starts_with("eyJ")
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn keys() -> JwtKeys {
        JwtKeys::new(&Config::for_tests())
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn issued_tokens_verify_for_their_role_only() {
        let k = keys();
        let admin = k.issue_admin().unwrap().token;
        assert_eq!(k.verify(&admin, Role::Admin).unwrap().role, Role::Admin);
        assert_eq!(k.verify(&admin, Role::Tenant), Err(JwtError::Invalid));
        let tenant = k.issue_tenant("tenant-1", "ab".into()).unwrap().token;
        let claims = k.verify(&tenant, Role::Tenant).unwrap();
        assert_eq!(claims.tid.as_deref(), Some("tenant-1"));
        assert_eq!(k.verify(&tenant, Role::Admin), Err(JwtError::Invalid));
    }

    #[test]
    fn alg_none_and_other_secrets_are_refused() {
        let k = keys();
        let claims = serde_json::json!({"sub":"admin","role":"admin","iat":now_secs(),
            "exp":now_secs()+60,"iss":"switchboard","aud":"switchboard","jti":"x"});
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg":"none","typ":"JWT"})),
            b64(&claims)
        );
        assert_eq!(k.verify(&none, Role::Admin), Err(JwtError::Invalid));
        let mut other = Config::for_tests();
        other.jwt_secret = crate::config::Secret::new("another-secret-another-secret-another");
        let foreign = JwtKeys::new(&other).issue_admin().unwrap().token;
        assert_eq!(k.verify(&foreign, Role::Admin), Err(JwtError::Invalid));
    }

    #[test]
    fn admin_tokens_end_with_the_admin_key_they_were_issued_under() {
        let k = keys();
        let token = k.issue_admin().unwrap().token;
        let claims = k.verify(&token, Role::Admin).unwrap();
        let bare = key_generation(&hash_api_key(Config::for_tests().admin_api_key.expose()));
        assert_ne!(
            claims.kid.as_deref(),
            Some(bare.as_str()),
            "the readable kid must not be a bare hash of the admin key"
        );
        let mut rotated = Config::for_tests();
        rotated.admin_api_key = crate::config::Secret::new("a-new-admin-key-0123456789abcdef");
        let after = JwtKeys::new(&rotated);
        assert_eq!(after.verify(&token, Role::Admin), Err(JwtError::Invalid));
        assert!(after
            .verify(&after.issue_admin().unwrap().token, Role::Admin)
            .is_ok());
    }

    #[test]
    fn expired_and_wrong_audience_are_refused() {
        let k = keys();
        let mut cfg = Config::for_tests();
        cfg.jwt_audience = "someone-else".into();
        let wrong_aud = JwtKeys::new(&cfg).issue_admin().unwrap().token;
        assert_eq!(k.verify(&wrong_aud, Role::Admin), Err(JwtError::Invalid));
        let past = now_secs() - 3600;
        let claims = Claims {
            sub: "admin".into(),
            role: Role::Admin,
            tid: None,
            kid: Some(k.admin_kid.clone()),
            iat: past,
            exp: past + 60,
            iss: "switchboard".into(),
            aud: "switchboard".into(),
            jti: "j".into(),
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(Config::for_tests().jwt_secret.expose().as_bytes()),
        )
        .unwrap();
        assert_eq!(k.verify(&expired, Role::Admin), Err(JwtError::Invalid));
    }
}
