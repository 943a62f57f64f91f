//! Who is calling: turns the credentials of a request into an [`AuthContext`] or a refusal.
//!
//! Admin: `ADMIN_API_KEY` (constant-time compare) or an admin JWT. Tenant: a tenant JWT
//! and/or the tenant API key, per `TENANT_AUTH`. A credential's tenant is compared with
//! the path's tenant before anything else touches that tenant; refusals never say which
//! check failed. This module knows nothing of HTTP: `http::extract` feeds it headers.
//! Tenant lookups go through the [`cache::CredentialCache`], so tenant calls go on while
//! the database is down.

pub mod cache;
pub mod jwt;
pub mod keys;

use std::time::Duration;

use crate::config::{Config, Secret, TenantAuthMode};
use crate::store::{SharedStore, StoreError, TenantRecord};
use crate::tenants::ChangeFeed;
use cache::{CacheKey, CredentialCache, Freshness};
use jwt::{JwtKeys, Role};

/// How long a credential lookup waits for the store. A database that stops answering
/// without refusing (a host gone from the network, a lock on `tenants`) would otherwise
/// hold every uncached tenant request to `REQUEST_TIMEOUT_MS`, and answer it as an upstream
/// timeout; past this, the store is unavailable, and a stale cached entry answers.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// After a lookup the store left unanswered, how long a stale cached entry answers at once,
/// without asking the store again: else, for as long as the database hangs, every request
/// of a tenant whose entry is stale would wait [`LOOKUP_TIMEOUT`] first.
const UNANSWERED_FOR: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No credential, or one that does not verify: 401, and the body never says which.
    #[error("unauthorized")]
    Unauthorized,
    /// A valid credential of another tenant: 403.
    #[error("forbidden")]
    Forbidden,
    #[error("tenant disabled")]
    TenantDisabled,
    /// The store could not be asked: 503.
    #[error("credential store unavailable")]
    Unavailable,
}

/// How a tenant call proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ApiKey,
    Jwt,
    Both,
}

/// The authenticated tenant of a request (a request extension on tenant routes).
#[derive(Debug, Clone)]
pub struct AuthContext {
    pub tenant_id: String,
    pub via: CredentialKind,
    pub tenant: TenantRecord,
}

/// The credentials a tenant request carried, as raw header values. `Debug` shows which
/// were sent, never their values.
#[derive(Default, Clone, Copy)]
pub struct TenantCredentials<'a> {
    /// `Authorization: Bearer` value: a tenant JWT (or, where allowed, an API key).
    pub bearer: Option<&'a str>,
    /// `x-api-key` value.
    pub api_key: Option<&'a str>,
    /// API keys are looked up in the credential cache only, never in the store: set for
    /// an address past its refusal budget (`AuthLimiter::blocked`), so that guessed keys
    /// cost no database read. A key the cache does not hold is refused.
    pub cached_only: bool,
}

impl std::fmt::Debug for TenantCredentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sent = |value: Option<&str>| value.map(|_| "(sent)");
        f.debug_struct("TenantCredentials")
            .field("bearer", &sent(self.bearer))
            .field("api_key", &sent(self.api_key))
            .field("cached_only", &self.cached_only)
            .finish()
    }
}

pub struct Authenticator {
    jwt: JwtKeys,
    admin_key: Secret,
    store: SharedStore,
    mode: TenantAuthMode,
    cache: CredentialCache,
    /// Whether the cache hears every change now ([`ChangeFeed::hearing`]).
    changes: ChangeFeed,
    /// Until when the store counts as not answering: set by a lookup that timed out,
    /// cleared by one that was answered.
    unanswered_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Authenticator {
    /// `changes` invalidates the credential cache: every tenant change, local or from
    /// another replica, is applied before the next lookup.
    pub fn new(config: &Config, store: SharedStore, changes: &ChangeFeed) -> Self {
        Self {
            jwt: JwtKeys::new(config),
            admin_key: config.admin_api_key.clone(),
            store,
            mode: config.tenant_auth,
            cache: CredentialCache::new(
                config.credential_cache_size,
                config.credential_cache_ttl,
                changes,
            ),
            changes: changes.clone(),
            unanswered_until: std::sync::Mutex::new(None),
        }
    }

    /// Whether a lookup timed out within [`UNANSWERED_FOR`] and none was answered since.
    fn store_unanswered(&self) -> bool {
        let until = *self
            .unanswered_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.is_some_and(|until| std::time::Instant::now() < until)
    }

    fn note_store_answered(&self, answered: bool) {
        let mut until = self
            .unanswered_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *until = (!answered).then(|| std::time::Instant::now() + UNANSWERED_FOR);
    }

    pub fn jwt(&self) -> &JwtKeys {
        &self.jwt
    }

    /// Whether `key` is the admin API key.
    pub fn is_admin_key(&self, key: &str) -> bool {
        keys::secrets_equal(key, self.admin_key.expose())
    }

    /// Admin routes: the bearer value is the admin key or an admin JWT.
    pub fn admin(&self, bearer: Option<&str>) -> Result<(), AuthError> {
        let token = bearer.ok_or(AuthError::Unauthorized)?;
        if self.is_admin_key(token) || self.jwt.verify(token, Role::Admin).is_ok() {
            Ok(())
        } else {
            Err(AuthError::Unauthorized)
        }
    }

    /// The tenant an API key belongs to, for `POST /api/auth/tenant-token`.
    pub async fn tenant_for_key(&self, key: &str) -> Result<TenantRecord, AuthError> {
        let tenant = self.lookup_key(key, false).await?;
        if tenant.enabled {
            Ok(tenant)
        } else {
            Err(AuthError::TenantDisabled)
        }
    }

    /// Tenant routes: checks the credentials against the path's tenant.
    /// `bearer_may_be_key` lets the bearer value be an API key (the `/mcp` endpoint).
    pub async fn tenant(
        &self,
        path_tenant: &str,
        creds: TenantCredentials<'_>,
        bearer_may_be_key: bool,
    ) -> Result<AuthContext, AuthError> {
        let (mut jwt_token, mut api_key) = (creds.bearer, creds.api_key);
        // A bearer API key beside an `x-api-key`: both are checked, and must name the same
        // tenant (API.md: when both are sent, both must be valid).
        let mut bearer_key = None;
        if bearer_may_be_key {
            if let Some(b) = jwt_token.filter(|b| keys::looks_like_api_key(b)) {
                jwt_token = None;
                match api_key {
                    None => api_key = Some(b),
                    Some(_) => bearer_key = Some(b),
                }
            }
        }
        let via = match (jwt_token.is_some(), api_key.is_some()) {
            (true, true) => CredentialKind::Both,
            (true, false) => CredentialKind::Jwt,
            (false, true) => CredentialKind::ApiKey,
            (false, false) => return Err(AuthError::Unauthorized),
        };
        if self.mode == TenantAuthMode::Both && via != CredentialKind::Both {
            return Err(AuthError::Unauthorized);
        }
        // The JWT names its tenant without a lookup: compare before touching the store.
        let claims = match jwt_token {
            Some(token) => {
                let claims = self
                    .jwt
                    .verify(token, Role::Tenant)
                    .map_err(|_| AuthError::Unauthorized)?;
                if claims.tid.as_deref() != Some(path_tenant) {
                    return Err(self.refusal_elsewhere(&claims).await);
                }
                Some(claims)
            }
            None => None,
        };
        let tenant = match api_key {
            Some(key) => {
                let tenant = self.lookup_key(key, creds.cached_only).await?;
                if tenant.id != path_tenant {
                    return Err(AuthError::Forbidden);
                }
                tenant
            }
            None => self.lookup(CacheKey::TenantId(path_tenant)).await?,
        };
        if let Some(key) = bearer_key.filter(|&b| Some(b) != api_key) {
            if self.lookup_key(key, creds.cached_only).await?.id != path_tenant {
                return Err(AuthError::Forbidden);
            }
        }
        // A JWT issued under a rotated key is retired with it.
        if let Some(claims) = &claims {
            if !issued_under(claims, &tenant) {
                return Err(AuthError::Unauthorized);
            }
        }
        if !tenant.enabled {
            return Err(AuthError::TenantDisabled);
        }
        Ok(AuthContext {
            tenant_id: tenant.id.clone(),
            via,
            tenant,
        })
    }

    /// The refusal of a tenant JWT sent for another tenant's path: 403 while it is a valid
    /// credential of its own tenant, 401 once that tenant's key was rotated or the tenant
    /// deleted (a retired credential is no credential, whichever path it is sent to).
    async fn refusal_elsewhere(&self, claims: &jwt::Claims) -> AuthError {
        let Some(own) = claims.tid.as_deref() else {
            return AuthError::Unauthorized;
        };
        match self.lookup(CacheKey::TenantId(own)).await {
            Ok(tenant) if issued_under(claims, &tenant) => AuthError::Forbidden,
            Ok(_) => AuthError::Unauthorized,
            Err(refused) => refused,
        }
    }

    async fn lookup_key(&self, key: &str, cached_only: bool) -> Result<TenantRecord, AuthError> {
        if !keys::looks_like_api_key(key) {
            return Err(AuthError::Unauthorized);
        }
        let hash = keys::hash_api_key(key);
        let key = CacheKey::KeyHash(&hash);
        if cached_only {
            // Only while every change is heard, as in `lookup`.
            if !self.changes.hearing() {
                return Err(AuthError::Unauthorized);
            }
            return self
                .cache
                .get(key, Freshness::Fresh)
                .ok_or(AuthError::Unauthorized);
        }
        self.lookup(key).await
    }

    /// The tenant under `key`: from the cache while fresh, else from the store (filling
    /// the cache, bounded by [`LOOKUP_TIMEOUT`]); when the store is unavailable, a stale
    /// cached entry answers.
    async fn lookup(&self, key: CacheKey<'_>) -> Result<TenantRecord, AuthError> {
        // A fresh entry stands only while every change is heard: with the fleet listener
        // down, a key rotated through another replica would go on working here.
        if self.changes.hearing() {
            if let Some(tenant) = self.cache.get(key, Freshness::Fresh) {
                return Ok(tenant);
            }
        }
        if self.store_unanswered() {
            if let Some(tenant) = self.cache.get(key, Freshness::Stale) {
                return Ok(tenant);
            }
        }
        let generation = self.cache.generation();
        let found = match key {
            CacheKey::KeyHash(hash) => {
                tokio::time::timeout(LOOKUP_TIMEOUT, self.store.tenant_by_key_hash(hash)).await
            }
            CacheKey::TenantId(id) => {
                tokio::time::timeout(LOOKUP_TIMEOUT, self.store.get_tenant(id)).await
            }
        };
        self.note_store_answered(found.is_ok());
        let found = found.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {} s",
                LOOKUP_TIMEOUT.as_secs()
            )))
        });
        match found {
            Ok(Some(tenant)) => {
                self.cache.fill(&tenant, generation);
                Ok(tenant)
            }
            Ok(None) => Err(AuthError::Unauthorized),
            Err(StoreError::Unavailable(reason)) => match self.cache.get(key, Freshness::Stale) {
                Some(tenant) => {
                    tracing::debug!(%reason, tenant_id = %tenant.id, "database unavailable: credential from the cache");
                    Ok(tenant)
                }
                None => Err(store_refusal(StoreError::Unavailable(reason))),
            },
            Err(err) => Err(store_refusal(err)),
        }
    }
}

/// Whether a tenant JWT was issued under `tenant`'s current API key (its `kid`).
fn issued_under(claims: &jwt::Claims, tenant: &TenantRecord) -> bool {
    claims.kid.as_deref() == Some(keys::key_generation(&tenant.api_key_hash).as_str())
}

fn store_refusal(err: StoreError) -> AuthError {
    tracing::warn!(error = %err, "credential lookup failed");
    AuthError::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use std::sync::Arc;

    /// An address past its refusal budget is answered from the credential cache alone, and
    /// only while the cache hears every change: with the change feed's listener down, a key
    /// rotated or a tenant disabled through another replica would still pass here.
    #[tokio::test]
    async fn a_blocked_address_is_refused_while_changes_are_not_heard() {
        let store: SharedStore = Arc::new(SqliteStore::open(":memory:").await.expect("opened"));
        store.migrate().await.expect("migrated");
        let key = keys::new_api_key();
        let mut tenant = TenantRecord::for_tests(&keys::new_tenant_id(), 0);
        tenant.api_key_hash = keys::hash_api_key(key.expose());
        store.create_tenant(&tenant).await.expect("created");
        let changes = ChangeFeed::new(16);
        let auth = Authenticator::new(&Config::for_tests(), store, &changes);
        let sent = |cached_only| TenantCredentials {
            api_key: Some(key.expose()),
            cached_only,
            ..Default::default()
        };
        let blocked = || auth.tenant(&tenant.id, sent(true), false);

        assert!(
            matches!(blocked().await, Err(AuthError::Unauthorized)),
            "a key the cache does not hold"
        );
        auth.tenant(&tenant.id, sent(false), false)
            .await
            .expect("looked up in the store, and cached");
        assert_eq!(
            blocked().await.expect("from the cache").tenant_id,
            tenant.id
        );

        changes.set_hearing(false);
        assert!(
            matches!(blocked().await, Err(AuthError::Unauthorized)),
            "a cached key while changes are not heard"
        );
        changes.set_hearing(true);
        assert_eq!(blocked().await.expect("heard again").tenant_id, tenant.id);
    }
}
