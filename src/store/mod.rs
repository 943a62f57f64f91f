//! Persistence behind one interface, [`Store`], with two backends: PostgreSQL
//! (deadpool-postgres, for production and fleets) and an embedded SQLite file (the
//! default, so a fresh clone runs with nothing else installed).
//!
//! The store holds only what must survive a restart or be shared by a fleet: tenants (with
//! the upstream token already sealed by [`crate::cipher`] and the API key already hashed),
//! the audit trail, the digests of MCP sessions their clients ended, and the replicas of a
//! fleet with when each was last seen ([`replicas`]; only PostgreSQL fills it). It knows
//! nothing of HTTP, actors or credentials in the clear.

pub mod change_feed;
mod columns;
mod migrations;
pub mod postgres;
mod postgres_tls;
pub mod replicas;
pub mod sqlite;

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::tenants::ChangeFeed;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use migrations::{Migration, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

/// How a tenant reaches its upstream MCP server (API.md "How a tenant reaches its upstream").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTransport {
    #[default]
    StreamableHttp,
    Sse,
    Auto,
}

impl UpstreamTransport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StreamableHttp => "streamable-http",
            Self::Sse => "sse",
            Self::Auto => "auto",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "streamable-http" => Some(Self::StreamableHttp),
            "sse" => Some(Self::Sse),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

/// A per-tenant override of the default rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: u32,
    pub burst: u32,
}

/// A tenant row as stored. Secrets appear only in sealed or hashed form.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRecord {
    /// `tenant-` plus a random part.
    pub id: String,
    pub name: Option<String>,
    pub integration_key: String,
    /// The upstream token sealed by [`crate::cipher::TokenCipher`] (nonce followed by ciphertext).
    pub sealed_token: Vec<u8>,
    /// SHA-256 of the tenant API key (32 bytes). The key itself is never stored.
    pub api_key_hash: Vec<u8>,
    pub upstream_url: Option<String>,
    pub upstream_transport: UpstreamTransport,
    pub enabled: bool,
    pub rate_limit: Option<RateLimit>,
    /// Microsecond precision; both backends round-trip it exactly.
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Bumped by every change; updates compare it to detect a race (409 `conflict`).
    pub version: i64,
}

#[cfg(test)]
impl TenantRecord {
    /// A tenant record for unit tests: id `id`, an API key hash of 32 bytes of `hash`.
    pub(crate) fn for_tests(id: &str, hash: u8) -> Self {
        let now = Utc::now();
        Self {
            id: id.into(),
            name: None,
            integration_key: "ik".into(),
            sealed_token: vec![],
            api_key_hash: vec![hash; 32],
            upstream_url: None,
            upstream_transport: UpstreamTransport::default(),
            enabled: true,
            rate_limit: None,
            created_at: now,
            updated_at: now,
            version: 1,
        }
    }
}

/// The changes of one `PATCH /api/tenants/{id}`; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantChanges {
    pub name: Option<Option<String>>,
    pub integration_key: Option<String>,
    pub sealed_token: Option<Vec<u8>>,
    pub upstream_url: Option<Option<String>>,
    pub upstream_transport: Option<UpstreamTransport>,
    pub enabled: Option<bool>,
    pub rate_limit: Option<Option<RateLimit>>,
}

/// Where the next page of a newest-first listing starts: the last item of the page before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

/// One audit event. Tool-call fields are `None` for other actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// A UUIDv7 made when the event happened, so ids sort by time across replicas.
    pub id: String,
    pub at: DateTime<Utc>,
    pub tenant_id: Option<String>,
    pub action: String,
    pub actor: String,
    pub outcome: String,
    pub request_id: Option<String>,
    pub tool: Option<String>,
    pub latency_ms: Option<i64>,
    pub request_bytes: Option<i64>,
    pub response_bytes: Option<i64>,
    /// Extra fields (tool arguments when `AUDIT_ARGUMENTS=true`, a refusal reason, ...).
    pub detail: Option<serde_json::Value>,
}

/// A filter and page for [`Store::list_audit`]; newest first, `before_id` exclusive.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub tenant_id: String,
    pub action: Option<String>,
    pub before_id: Option<String>,
    pub limit: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("the row changed since it was read")]
    Conflict,
    #[error("a row with that key exists")]
    Duplicate,
    /// The database could not be reached or refused the connection: a 503, and retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The one storage interface; both backends pass `tests/store_contract.rs`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"postgres"` or `"sqlite"`, for logs and `/health`.
    fn backend(&self) -> &'static str;

    /// Connections in the pool and how many of them are idle, for metrics; `None` when
    /// the backend has no pool.
    fn pool_status(&self) -> Option<(usize, usize)> {
        None
    }

    /// Whether a statement whose caller gave up (dropped its future) stops: PostgreSQL
    /// cancels it as its connection closes. SQLite's runs to its end on its own thread
    /// (bounded by its busy timeout), so a change given up on could still be applied.
    fn stops_abandoned_statements(&self) -> bool {
        false
    }

    /// Applies the migrations of `sql/` that have not run yet, each once, and returns the
    /// versions it applied now (empty when the schema is current).
    async fn migrate(&self) -> StoreResult<Vec<i64>>;

    /// The task that brings other replicas' tenant changes into `feed` (PostgreSQL
    /// LISTEN/NOTIFY), to be spawned on the lifecycle's tracker; it ends on `shutdown`.
    /// `None` for a store no other process shares (SQLite).
    fn listen_changes(
        &self,
        _feed: ChangeFeed,
        _shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        None
    }

    /// Tells the other replicas that `tenant_id`'s upstream tool list changed, so their open
    /// MCP sessions of that tenant hear it too (PostgreSQL NOTIFY). Nothing to do for a
    /// store no other process shares (SQLite).
    async fn announce_tool_change(&self, _tenant_id: &str) -> StoreResult<()> {
        Ok(())
    }

    /// Records that a client ended, at `at`, the MCP session whose id has `digest`, so that
    /// no replica rebuilds it from its id: not this one after a restart, not one that missed
    /// the announcement. On PostgreSQL the same transaction tells the other replicas
    /// (NOTIFY), which end their copies. Records of sessions ended before `forget_before`
    /// are removed (their ids no longer open anyway).
    async fn end_session(
        &self,
        digest: &str,
        at: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Those of `digests` whose sessions a client ended (and that are still recorded).
    async fn ended_sessions(&self, digests: &[String]) -> StoreResult<Vec<String>>;

    /// The task that keeps `replicas` equal to the number of live replicas on this
    /// database (for fleet-wide rate limits); it ends on `shutdown`. `None` alone.
    fn replica_heartbeat(
        &self,
        _replicas: Arc<AtomicU32>,
        _shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        None
    }

    /// Cheap round trip, for `/health` and `/ready`.
    async fn ping(&self) -> StoreResult<()>;

    /// Inserts a new tenant; `Duplicate` when the id or key hash is taken.
    async fn create_tenant(&self, tenant: &TenantRecord) -> StoreResult<()>;

    async fn get_tenant(&self, id: &str) -> StoreResult<Option<TenantRecord>>;

    /// The tenant whose API key hashes to `hash`, by an indexed equality lookup.
    async fn tenant_by_key_hash(&self, hash: &[u8]) -> StoreResult<Option<TenantRecord>>;

    /// Newest first (`created_at` desc, then `id` desc), starting after `after`.
    async fn list_tenants(
        &self,
        limit: u32,
        after: Option<&PageCursor>,
    ) -> StoreResult<Vec<TenantRecord>>;

    async fn count_tenants(&self) -> StoreResult<u64>;

    /// Applies `changes` if the row's version is still `expected_version`; bumps the
    /// version and `updated_at`. `NotFound` or `Conflict` otherwise.
    async fn update_tenant(
        &self,
        id: &str,
        expected_version: i64,
        changes: &TenantChanges,
    ) -> StoreResult<TenantRecord>;

    /// Replaces the API key hash (the old key stops matching at once); bumps the version.
    async fn rotate_api_key(&self, id: &str, new_hash: &[u8]) -> StoreResult<TenantRecord>;

    /// Removes the tenant; its audit rows stay. `NotFound` when there was none.
    async fn delete_tenant(&self, id: &str) -> StoreResult<()>;

    /// Writes a batch of audit events in one transaction; ids already present are skipped,
    /// so a retried batch never writes an event twice.
    async fn append_audit(&self, events: &[AuditRecord]) -> StoreResult<()>;

    async fn list_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>>;

    /// Deletes at most `limit` audit events older than `before`, oldest first; returns how
    /// many. A bounded statement: a backlog goes in several, so no one of them holds the
    /// database (or SQLite's one connection) for long.
    async fn prune_audit(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64>;
}

pub type SharedStore = Arc<dyn Store>;

/// `ping` (behind `/health` and `/ready`) answers within this on either backend, even when
/// the pool waits, a connect hangs or the embedded store's one connection is busy: a probe
/// must say "down" quickly, not after the store's own timeouts.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long one announcement to the other replicas may take.
const ANNOUNCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an API request (a tenant change, a listing, an audit page) waits for each store
/// operation it makes (see [`answered_within`]).
pub const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `op`, or [`StoreError::Unavailable`] (503) when the store has not answered within
/// `limit`: a database that stops answering without refusing (a host gone from the network,
/// a lock held on a table) then holds a request for `limit`, not until `REQUEST_TIMEOUT_MS`,
/// which would answer it as an upstream timeout. On PostgreSQL the abandoned statement is
/// cancelled on the server (`postgres::Checkout`), so that a change the caller was told
/// failed does not go through once the lock is released.
pub async fn answered_within<T>(
    limit: std::time::Duration,
    op: impl std::future::Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    tokio::time::timeout(limit, op).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "no answer within {limit:?}"
        )))
    })
}

/// Sends one announcement to the other replicas (`send`, one of the store's `announce_*`).
/// One bounded statement, not a loop: it ends within [`ANNOUNCE_TIMEOUT`] whatever the
/// database does. A lost announcement is logged with `what` it was about and not retried;
/// each caller says what losing one costs.
pub async fn announce(what: &str, send: impl std::future::Future<Output = StoreResult<()>> + Send) {
    if !matches!(
        tokio::time::timeout(ANNOUNCE_TIMEOUT, send).await,
        Ok(Ok(()))
    ) {
        tracing::warn!("could not announce {what} to the fleet");
    }
}

/// Opens the store a `DATABASE_URL` names: `postgres://` / `postgresql://` for PostgreSQL,
/// `sqlite://PATH` (or nothing: `./switchboard.db`) for the embedded file.
pub async fn open(database_url: Option<&str>, pool_size: usize) -> anyhow::Result<SharedStore> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(postgres::PostgresStore::connect(url, pool_size)?))
        }
        Some(url) => {
            let path = url.strip_prefix("sqlite://").ok_or_else(|| {
                anyhow::anyhow!(
                    "DATABASE_URL must start with postgres://, postgresql:// or sqlite://"
                )
            })?;
            // SQLite takes an empty name for a temporary database, deleted at exit: every
            // tenant and audit event gone at the next start, with nothing said.
            anyhow::ensure!(
                !path.is_empty(),
                "DATABASE_URL sqlite:// names no file: give its path, as sqlite://switchboard.db"
            );
            Ok(Arc::new(sqlite::SqliteStore::open(path).await?))
        }
        None => Ok(Arc::new(sqlite::SqliteStore::open("switchboard.db").await?)),
    }
}
