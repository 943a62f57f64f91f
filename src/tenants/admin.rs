//! Creating, changing, rotating and deleting tenants: the operator's actions. Secrets are
//! handled here and nowhere else: the new API key is returned once and stored as a hash,
//! and the upstream token is sealed before it reaches the store. Every action is audited
//! and announced on the change feed.

use chrono::{SubsecRound, Utc};
use tokio_util::task::TaskTracker;

use super::ChangeFeed;
use crate::audit::AuditWriter;
use crate::auth::keys;
use crate::cipher::TokenCipher;
use crate::config::Secret;
use crate::store::{
    answered_within, RateLimit, SharedStore, StoreError, StoreResult, TenantChanges, TenantRecord,
    UpstreamTransport, STORE_WAIT,
};

/// A validated request to create a tenant.
pub struct NewTenant {
    pub name: Option<String>,
    pub integration_key: String,
    pub integration_app_token: Secret,
    pub upstream_url: Option<String>,
    pub upstream_transport: UpstreamTransport,
    pub rate_limit: Option<RateLimit>,
}

/// A validated change; `None` leaves a field as it is.
#[derive(Default)]
pub struct TenantUpdate {
    pub name: Option<Option<String>>,
    pub integration_key: Option<String>,
    pub integration_app_token: Option<Secret>,
    pub upstream_url: Option<Option<String>>,
    pub upstream_transport: Option<UpstreamTransport>,
    pub enabled: Option<bool>,
    pub rate_limit: Option<Option<RateLimit>>,
}

/// Who asked, for the audit trail.
#[derive(Clone)]
pub struct Actor {
    pub name: &'static str,
    pub request_id: Option<String>,
}

#[derive(Clone)]
pub struct TenantAdmin {
    store: SharedStore,
    audit: AuditWriter,
    cipher: TokenCipher,
    changes: ChangeFeed,
    /// The changes running (each in a task of its own, see [`Self::run_to_the_end`]).
    running: TaskTracker,
}

impl TenantAdmin {
    pub fn new(
        store: SharedStore,
        audit: AuditWriter,
        cipher: TokenCipher,
        changes: ChangeFeed,
    ) -> Self {
        Self {
            store,
            audit,
            cipher,
            changes,
            running: TaskTracker::new(),
        }
    }

    /// At shutdown, once no request is in flight: waits (within `within`) for the changes
    /// whose callers went away, which audit through the writer before it closes.
    pub async fn finish(&self, within: std::time::Duration) {
        self.running.close();
        let _ = tokio::time::timeout(within, self.running.wait()).await;
    }

    pub fn cipher(&self) -> &TokenCipher {
        &self.cipher
    }

    /// Creates the tenant and returns it with its API key (shown once).
    pub async fn create(
        &self,
        new: NewTenant,
        actor: &Actor,
    ) -> StoreResult<(TenantRecord, Secret)> {
        let (me, actor) = (self.clone(), actor.clone());
        self.run_to_the_end(async move { me.creating(new, &actor).await })
            .await
    }

    /// Applies `update`; with `if_match`, only if the tenant is still at that version.
    pub async fn update(
        &self,
        id: &str,
        update: TenantUpdate,
        if_match: Option<i64>,
        actor: &Actor,
    ) -> StoreResult<TenantRecord> {
        let (me, id, actor) = (self.clone(), id.to_owned(), actor.clone());
        self.run_to_the_end(async move { me.updating(&id, update, if_match, &actor).await })
            .await
    }

    /// Replaces the API key: the old one stops working at once; the new one is shown once.
    pub async fn rotate_key(&self, id: &str, actor: &Actor) -> StoreResult<(TenantRecord, Secret)> {
        let (me, id, actor) = (self.clone(), id.to_owned(), actor.clone());
        self.run_to_the_end(async move { me.rotating_key(&id, &actor).await })
            .await
    }

    pub async fn delete(&self, id: &str, actor: &Actor) -> StoreResult<()> {
        let (me, id, actor) = (self.clone(), id.to_owned(), actor.clone());
        self.run_to_the_end(async move { me.deleting(&id, &actor).await })
            .await
    }

    /// Runs an admin change in a task of its own, so that it ends (committed, then
    /// announced and audited) even when its caller goes away: a client that hangs up, or
    /// the request timeout, must not leave a committed change unannounced, with the
    /// tenant's old credentials working until the credential cache expires. Shutdown waits
    /// for these tasks ([`Self::finish`]).
    async fn run_to_the_end<T: Send + 'static>(
        &self,
        change: impl std::future::Future<Output = StoreResult<T>> + Send + 'static,
    ) -> StoreResult<T> {
        self.running.spawn(change).await.unwrap_or_else(|failed| {
            Err(StoreError::Backend(format!(
                "admin change failed: {failed}"
            )))
        })
    }

    async fn creating(&self, new: NewTenant, actor: &Actor) -> StoreResult<(TenantRecord, Secret)> {
        // An id or key collision is astronomically unlikely; retry a few times regardless.
        for _ in 0..3 {
            let id = keys::new_tenant_id();
            let api_key = keys::new_api_key();
            let sealed_token = self
                .cipher
                .seal(&id, &new.integration_app_token)
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let now = Utc::now().trunc_subsecs(6);
            let record = TenantRecord {
                id,
                name: new.name.clone(),
                integration_key: new.integration_key.clone(),
                sealed_token,
                api_key_hash: keys::hash_api_key(api_key.expose()),
                upstream_url: new.upstream_url.clone(),
                upstream_transport: new.upstream_transport,
                enabled: true,
                rate_limit: new.rate_limit,
                created_at: now,
                updated_at: now,
                version: 1,
            };
            match self.committing(self.store.create_tenant(&record)).await {
                Ok(()) => {
                    self.audit(&record.id, "tenant.create", actor).await;
                    return Ok((record, api_key));
                }
                Err(StoreError::Duplicate) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Backend(
            "could not find a free tenant id".into(),
        ))
    }

    async fn updating(
        &self,
        id: &str,
        update: TenantUpdate,
        if_match: Option<i64>,
        actor: &Actor,
    ) -> StoreResult<TenantRecord> {
        let current = answered_within(STORE_WAIT, self.store.get_tenant(id))
            .await?
            .ok_or(StoreError::NotFound)?;
        let expected = if_match.unwrap_or(current.version);
        let sealed_token = match &update.integration_app_token {
            Some(token) => Some(
                self.cipher
                    .seal(id, token)
                    .map_err(|e| StoreError::Backend(e.to_string()))?,
            ),
            None => None,
        };
        let changes = TenantChanges {
            name: update.name,
            integration_key: update.integration_key,
            sealed_token,
            upstream_url: update.upstream_url,
            upstream_transport: update.upstream_transport,
            enabled: update.enabled,
            rate_limit: update.rate_limit,
        };
        let updated = self.store.update_tenant(id, expected, &changes);
        let record = self.committing(updated).await?;
        self.changes.publish(id);
        self.audit(id, "tenant.update", actor).await;
        Ok(record)
    }

    async fn rotating_key(&self, id: &str, actor: &Actor) -> StoreResult<(TenantRecord, Secret)> {
        let api_key = keys::new_api_key();
        let hash = keys::hash_api_key(api_key.expose());
        let record = self
            .committing(self.store.rotate_api_key(id, &hash))
            .await?;
        self.changes.publish(id);
        self.audit(id, "tenant.key_rotate", actor).await;
        Ok((record, api_key))
    }

    async fn deleting(&self, id: &str, actor: &Actor) -> StoreResult<()> {
        self.committing(self.store.delete_tenant(id)).await?;
        self.changes.publish(id);
        self.audit(id, "tenant.delete", actor).await;
        Ok(())
    }

    /// A change's statement: within [`STORE_WAIT`] on a store that stops one given up on
    /// (a 503 then means not applied, but for a commit that lands as the wait runs out, or
    /// one a synchronous standby holds up: see README, Operations), else to its end
    /// (SQLite, whose busy timeout bounds it): a change must not be applied, unannounced
    /// and unaudited, after its caller was told it failed.
    async fn committing<T>(
        &self,
        change: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        if self.store.stops_abandoned_statements() {
            answered_within(STORE_WAIT, change).await
        } else {
            change.await
        }
    }

    /// Admin actions are rare: written at once, before the answer, so none is lost.
    async fn audit(&self, tenant_id: &str, action: &str, actor: &Actor) {
        let event = crate::audit::event(
            Some(tenant_id),
            action,
            actor.name,
            "ok",
            actor.request_id.as_deref(),
        );
        self.audit.write(event).await;
    }
}
