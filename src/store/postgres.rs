//! The production backend: PostgreSQL through a deadpool-postgres pool, shared by any
//! number of replicas. Connecting and waiting for a pooled connection are bounded by
//! timeouts so that a database that is down turns into `StoreError::Unavailable` (503)
//! within seconds instead of a hang. The connection string may hold a password, so no
//! error or log line here ever repeats it or the URL.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{
    Client, ClientWrapper, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod,
    Runtime,
};
use futures::future::BoxFuture;
use tokio::sync::{Notify, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{CancelToken, Row};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::change_feed::{self, Sinks};
use super::columns::{
    apply_changes, micros, now_micros, AuditRow, TenantRow, AUDIT_COLUMNS, TENANT_COLUMNS,
};
use super::migrations::{pending, CREATE_SCHEMA_MIGRATIONS, POSTGRES_MIGRATIONS};
use super::{
    AuditQuery, AuditRecord, PageCursor, Store, StoreError, StoreResult, TenantChanges,
    TenantRecord, PING_TIMEOUT,
};
use crate::tenants::ChangeFeed;

/// How long a caller waits for a free pooled connection, and how long opening a new one
/// may take, before the store reports `Unavailable`.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The key of the session advisory lock held around `migrate`, so that replicas starting
/// at once apply each migration exactly once. Any fixed value works; this is "swbd-mig".
const MIGRATION_LOCK_KEY: i64 = 0x7377_6264_2d6d_6967;
/// How often a replica waiting for the migration lock asks for it again. It asks rather
/// than waits in `pg_advisory_lock`: a statement waiting there holds a snapshot, which
/// `CREATE INDEX CONCURRENTLY` in the holder's migration would wait for in turn.
const MIGRATION_LOCK_RETRY: Duration = Duration::from_millis(100);

type Param<'a> = &'a (dyn ToSql + Sync);

/// How long the cancel request for an abandoned checkout's statement may take (a connection
/// of its own, TLS as the pool's): it is best effort, and should the server not answer in
/// time, its backend is no worse off than without it.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(3);

/// A pooled connection that goes back to the pool only when [`Checkout::release`]d, once its
/// work has ended (with or without an error). Dropped before that, because the future using
/// it was dropped (a timeout gave up on it), it closes instead: a statement it had sent would
/// still be queued on it (dropping a tokio-postgres future does not cancel the statement),
/// and the pool's next user would wait behind it, a lock wait for instance. Closing alone
/// does not end that statement either: the server's backend waiting for a lock does not
/// notice its client left (unless `client_connection_check_interval` is set), and
/// tokio-postgres keeps the socket open until its answers came. So an abandoned checkout
/// also asks the server to cancel the statement; otherwise, with a table locked for a while,
/// every attempt given up on, and tried again on a new connection, would leave one more
/// backend waiting, until `max_connections` ran out for every client of the server.
pub(super) struct Checkout {
    client: Option<Client>,
    /// Taken with the connection: the backend's id and secret, for its cancel request.
    cancel: CancelToken,
    /// The pool's TLS: a cancel request goes to the same server, and verifies it alike.
    tls: MakeRustlsConnect,
}

impl Checkout {
    /// The work is done: the connection goes back to the pool.
    pub(super) fn release(mut self) {
        drop(self.client.take());
    }
}

impl std::ops::Deref for Checkout {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client
            .as_ref()
            .expect("a checkout holds its connection until released")
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("a checkout holds its connection until released")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let Some(abandoned) = self.client.take() else {
            return;
        };
        // Drop cannot wait for the cancel: a task sends it. Outside a runtime (only as the
        // process ends) there is nothing to send it from; the backend then waits as before.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (cancel, tls) = (self.cancel.clone(), self.tls.clone());
            runtime.spawn(async move {
                let sent = tokio::time::timeout(CANCEL_TIMEOUT, cancel.cancel_query(tls)).await;
                let failure = match sent {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => describe(&e),
                    Err(_) => format!("no answer within {} s", CANCEL_TIMEOUT.as_secs()),
                };
                tracing::warn!(
                    error = %failure,
                    "could not cancel an abandoned PostgreSQL statement; its backend may wait for a lock"
                );
            });
        }
        drop(Object::take(abandoned));
    }
}

/// The PostgreSQL store: a pool, cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// For the fleet's LISTEN connection, which lives outside the pool.
    listen_config: tokio_postgres::Config,
    /// How connections (the pool's and the listener's) talk TLS, if they do.
    tls: MakeRustlsConnect,
    /// Woken by the listener when a replica joins or leaves; the heartbeat recounts.
    replicas_changed: Arc<Notify>,
    /// Names this process in tool-change notifications, so its listener skips its own.
    origin: Arc<str>,
    /// Audit writes (and the retention prune) in flight at once: half the pool. Every tenant
    /// actor writes its own batches, and while `audit_events` is locked (a `VACUUM FULL`, an
    /// `ALTER` queued behind a long read) each write holds its connection for its whole
    /// attempt: without a bound, twenty tenants would take every connection, and with them
    /// `/ready`, key lookups and admin reads, on every replica at once.
    audit_writes: Arc<Semaphore>,
}

impl PostgresStore {
    /// Builds the pool for `url` (`postgres://` or `postgresql://`; TLS as its `sslmode`
    /// says, see [`super::postgres_tls`]). Connections open lazily, so this succeeds while
    /// the database is down; `ping` tells.
    pub fn connect(url: &str, pool_size: usize) -> anyhow::Result<Self> {
        let (url, root_cert) = super::postgres_tls::split_url(url)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|_| {
            // The parser's message could quote part of the URL, password included.
            anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL connection string")
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("switchboard");
        }
        let tls = super::postgres_tls::connector(&mut config, root_cert.as_deref())?;
        let listen_config = listening_config(&config);
        let manager = Manager::from_config(
            config,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            // The timeouts below only work with a runtime to time them.
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .context("building the PostgreSQL connection pool")?;
        Ok(Self {
            pool,
            listen_config,
            tls,
            replicas_changed: Arc::new(Notify::new()),
            origin: uuid::Uuid::new_v4().to_string().into(),
            audit_writes: Arc::new(Semaphore::new((pool_size / 2).max(1))),
        })
    }

    /// The pool itself, for pool metrics and for a LISTEN connection.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn client(&self) -> StoreResult<Client> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Runs `work` on a pooled connection through a [`Checkout`]: back to the pool once
    /// `work` has ended, closed if the caller gave up halfway (a timeout, a client that
    /// hung up), so that no statement is left queued on a pooled connection.
    async fn with_client<T>(
        &self,
        work: impl AsyncFnOnce(&mut Client) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut client = self.checkout().await?;
        let done = work(&mut *client).await;
        client.release();
        done
    }

    /// A pooled connection for work that its caller may give up on halfway (under a
    /// timeout): see [`Checkout`]. For the fleet tasks of this module's siblings too.
    pub(super) async fn checkout(&self) -> StoreResult<Checkout> {
        let client = self.client().await?;
        Ok(Checkout {
            cancel: client.cancel_token(),
            tls: self.tls.clone(),
            client: Some(client),
        })
    }

    /// One of the [`Self::audit_writes`] permits, held for as long as the write's connection.
    async fn audit_write_permit(&self) -> StoreResult<tokio::sync::SemaphorePermit<'_>> {
        self.audit_writes
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("the store is closing".into()))
    }

    /// The first tenant a query returning `TENANT_COLUMNS` yields. Through a [`Checkout`]:
    /// the registry reads a tenant under a timeout.
    async fn query_tenant(
        &self,
        sql: &str,
        params: &[Param<'_>],
    ) -> StoreResult<Option<TenantRow>> {
        let client = self.checkout().await?;
        let row = async {
            let stmt = client.prepare_cached(sql).await.map_err(db_err)?;
            client.query_opt(&stmt, params).await.map_err(db_err)
        }
        .await;
        client.release();
        row?.as_ref().map(tenant_row).transpose()
    }

    /// Writes audit rows in one transaction, the inserts pipelined on the one connection.
    async fn insert_audit_rows(client: &mut Client, rows: &[AuditRow]) -> StoreResult<()> {
        let tx = client.transaction().await.map_err(db_err)?;
        let sql = format!(
            "INSERT INTO audit_events ({AUDIT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (id) DO NOTHING"
        );
        let stmt = tx.prepare_cached(&sql).await.map_err(db_err)?;
        let (tx_ref, stmt_ref) = (&tx, &stmt);
        let inserts = rows.iter().map(|e| async move {
            let params: [Param<'_>; 12] = [
                &e.id,
                &e.at,
                &e.tenant_id,
                &e.action,
                &e.actor,
                &e.outcome,
                &e.request_id,
                &e.tool,
                &e.latency_ms,
                &e.request_bytes,
                &e.response_bytes,
                &e.detail,
            ];
            tx_ref.execute(stmt_ref, &params).await
        });
        futures::future::try_join_all(inserts)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    /// Sends one fleet announcement (`notify`, a `pg_notify` statement) about `subject`,
    /// signed with this replica's origin so that its own listener skips it.
    async fn announce(&self, notify: &str, subject: &str) -> StoreResult<()> {
        let payload = change_feed::origin_payload(&self.origin, subject);
        self.with_client(async |client: &mut Client| {
            client.execute(notify, &[&payload]).await.map_err(db_err)?;
            Ok(())
        })
        .await
    }
}

fn pool_err(e: PoolError) -> StoreError {
    let reason = match e {
        PoolError::Timeout(_) => "timed out waiting for a PostgreSQL connection".to_owned(),
        PoolError::Backend(e) => format!("cannot connect to PostgreSQL: {}", describe(&e)),
        PoolError::Closed => "the PostgreSQL pool is closed".to_owned(),
        PoolError::NoRuntimeSpecified => "the PostgreSQL pool has no runtime".to_owned(),
        PoolError::PostCreateHook(_) => "a new PostgreSQL connection failed its setup".to_owned(),
    };
    StoreError::Unavailable(reason)
}

/// A message that names what went wrong without the statement's values (the server's
/// DETAIL line can quote them) or the connection string.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        // With its cause, when the message leaves it out (a TLS handshake's: which
        // certificate check failed).
        None => match std::error::Error::source(e) {
            Some(cause) if !e.to_string().contains(&cause.to_string()) => format!("{e}: {cause}"),
            _ => e.to_string(),
        },
    }
}

/// The listener's connection sits idle for hours, only receiving: if the server's host
/// vanishes, or a NAT or balancer in between forgets the connection, nothing would ever
/// fail on it, and notifications would be missed until a restart. TCP keepalives keep such
/// state alive in between, and end a dead connection within about 25 s, so the listener
/// reconnects and reloads. Kept unless the URL sets them.
fn listening_config(config: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut listen = config.clone();
    listen.keepalives(true);
    if config.get_keepalives_idle() >= Duration::from_secs(2 * 60 * 60) {
        listen.keepalives_idle(Duration::from_secs(10));
    }
    if config.get_keepalives_interval().is_none() {
        listen.keepalives_interval(Duration::from_secs(5));
    }
    if config.get_keepalives_retries().is_none() {
        listen.keepalives_retries(3);
    }
    listen
}

/// Whether `key` can be in a text column at all: PostgreSQL refuses NUL in text (as a
/// parameter too, with an error). A key with one matches no row, as on SQLite.
fn storable_key(key: &str) -> bool {
    !key.contains('\0')
}

/// Whether an error with SQLSTATE `code` says the database cannot serve us now but may
/// later, so that the request is answered 503 with `Retry-After` (and an audit write is
/// tried again) rather than 500: class 08 (connection exception), 53 (insufficient
/// resources: disk full, out of memory, too many connections), 57P0x (shutdown, cannot
/// connect now), 57014 (cancelled: a statement timeout), 55P03 (a lock not granted within
/// `lock_timeout`: a table locked for a while), 40001 and 40P01 (a serialization
/// failure, a deadlock: the transaction may be run again), 25006 (a read-only transaction:
/// a server in recovery, or a standby after a failover until the URL points at the new
/// primary).
fn passes(code: &str) -> bool {
    ["08", "53", "57P"]
        .iter()
        .any(|class| code.starts_with(class))
        || ["57014", "55P03", "40001", "40P01", "25006"].contains(&code)
}

pub(super) fn db_err(e: tokio_postgres::Error) -> StoreError {
    if let Some(code) = e.code() {
        if *code == SqlState::UNIQUE_VIOLATION {
            return StoreError::Duplicate;
        }
        if passes(code.code()) {
            return StoreError::Unavailable(describe(&e));
        }
        return StoreError::Backend(describe(&e));
    }
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        StoreError::Unavailable(describe(&e))
    } else {
        StoreError::Backend(describe(&e))
    }
}

fn tenant_row(row: &Row) -> StoreResult<TenantRow> {
    let r = || -> Result<TenantRow, tokio_postgres::Error> {
        Ok(TenantRow {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            integration_key: row.try_get(2)?,
            sealed_token: row.try_get(3)?,
            api_key_hash: row.try_get(4)?,
            upstream_url: row.try_get(5)?,
            upstream_transport: row.try_get(6)?,
            enabled: row.try_get(7)?,
            rate_rps: row.try_get(8)?,
            rate_burst: row.try_get(9)?,
            created_at: row.try_get(10)?,
            updated_at: row.try_get(11)?,
            version: row.try_get(12)?,
        })
    };
    r().map_err(db_err)
}

fn audit_row(row: &Row) -> StoreResult<AuditRow> {
    let r = || -> Result<AuditRow, tokio_postgres::Error> {
        Ok(AuditRow {
            id: row.try_get(0)?,
            at: row.try_get(1)?,
            tenant_id: row.try_get(2)?,
            action: row.try_get(3)?,
            actor: row.try_get(4)?,
            outcome: row.try_get(5)?,
            request_id: row.try_get(6)?,
            tool: row.try_get(7)?,
            latency_ms: row.try_get(8)?,
            request_bytes: row.try_get(9)?,
            response_bytes: row.try_get(10)?,
            detail: row.try_get(11)?,
        })
    };
    r().map_err(db_err)
}

/// Refuses a database whose encoding is not UTF-8, before anything is created in it.
/// Every text column holds UTF-8 from the outside (tenant names, tool names, an upstream's
/// error text): a `LATIN1` database would refuse the first character it has no byte for,
/// and an audit event refused so fails its whole batch, again at every retry.
async fn refuse_other_encodings(client: &ClientWrapper) -> StoreResult<()> {
    let encoding: String = client
        .query_one("SHOW server_encoding", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(db_err)?;
    if encoding.eq_ignore_ascii_case("UTF8") {
        return Ok(());
    }
    Err(StoreError::Backend(format!(
        "the database's encoding is {encoding}, and switchboard stores UTF-8 text: \
         create its database with ENCODING 'UTF8'"
    )))
}

/// Creates `schema_migrations` and applies each pending migration in a transaction with
/// its record row; one marked `in_transaction: false` statement by statement, then its
/// row. The caller holds the migration lock.
async fn apply_migrations(client: &mut ClientWrapper) -> StoreResult<Vec<i64>> {
    client
        .batch_execute(CREATE_SCHEMA_MIGRATIONS)
        .await
        .map_err(db_err)?;
    let done = client
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| r.try_get::<_, i64>(0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    let mut applied_now = Vec::new();
    const RECORD: &str =
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)";
    for migration in pending(POSTGRES_MIGRATIONS, &done) {
        let record: [Param; 3] = [&migration.version, &migration.name, &now_micros()];
        if migration.in_transaction {
            let tx = client.transaction().await.map_err(db_err)?;
            tx.batch_execute(migration.sql).await.map_err(db_err)?;
            tx.execute(RECORD, &record).await.map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
        } else {
            // One statement per request: several in one would run as one transaction block.
            for statement in migration.statements() {
                client.batch_execute(statement).await.map_err(db_err)?;
            }
            client.execute(RECORD, &record).await.map_err(db_err)?;
        }
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied a postgres migration"
        );
        applied_now.push(migration.version);
    }
    Ok(applied_now)
}

/// Announces a tenant change to the fleet; part of the changing transaction.
const NOTIFY_TENANT: &str = "SELECT pg_notify('switchboard_tenants', $1)";

/// A tenant's upstream tool list changed; the payload is `<origin>/<tenant id>`.
const NOTIFY_TOOLS: &str = "SELECT pg_notify('switchboard_tool_changes', $1)";

/// A client ended an MCP session; the payload is `<origin>/<session id digest>`.
const NOTIFY_SESSION_END: &str = "SELECT pg_notify('switchboard_sessions_ended', $1)";

/// An ended session is recorded once; ending it again keeps the first time.
const RECORD_ENDED_SESSION: &str = "INSERT INTO ended_sessions (digest, ended_at) \
    VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING";

const FORGET_ENDED_SESSIONS: &str = "DELETE FROM ended_sessions WHERE ended_at < $1";

/// The statement notifies in the same transaction as the delete.
const DELETE_TENANT: &str =
    "DELETE FROM tenants WHERE id = $1 RETURNING pg_notify('switchboard_tenants', id)";

const UPDATE_TENANT: &str = "UPDATE tenants SET name = $3, integration_key = $4, \
    sealed_token = $5, upstream_url = $6, upstream_transport = $7, enabled = $8, \
    rate_rps = $9, rate_burst = $10, updated_at = $11, version = $12 \
    WHERE id = $1 AND version = $2";

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn stops_abandoned_statements(&self) -> bool {
        true
    }

    fn pool_status(&self) -> Option<(usize, usize)> {
        let status = self.pool.status();
        Some((status.size, status.available))
    }

    async fn migrate(&self) -> StoreResult<Vec<i64>> {
        // A connection taken out of the pool: the session lock lives as long as the
        // connection, and a detached connection closes when dropped, so even a migrate
        // cancelled halfway cannot hand a pooled connection back still holding the lock.
        let mut client = Object::take(self.client().await?);
        // No time limit from the role, the database or the URL (`options=-c
        // statement_timeout=...`) applies here: a migration takes as long as the table it
        // changes (an index built CONCURRENTLY on a large audit trail, which also waits for
        // the transactions in flight), and one cancelled halfway would fail, and be tried
        // again and cancelled again, at every start. Session settings, on a connection that
        // leaves the pool for good (above), so no pooled work ever runs without its limits.
        client
            .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
            .await
            .map_err(db_err)?;
        refuse_other_encodings(&client).await?;
        loop {
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(db_err)?;
            if locked {
                break;
            }
            tokio::time::sleep(MIGRATION_LOCK_RETRY).await;
        }
        let result = apply_migrations(&mut client).await;
        // Best effort: closing the connection (on drop) releases the lock anyway.
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
            .await;
        result
    }

    fn listen_changes(
        &self,
        feed: ChangeFeed,
        shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        let sinks = Sinks {
            feed,
            replicas_changed: self.replicas_changed.clone(),
            origin: self.origin.clone(),
        };
        let config = self.listen_config.clone();
        Some(Box::pin(change_feed::listen(
            config,
            self.tls.clone(),
            sinks,
            shutdown,
        )))
    }

    async fn announce_tool_change(&self, tenant_id: &str) -> StoreResult<()> {
        self.announce(NOTIFY_TOOLS, tenant_id).await
    }

    async fn end_session(
        &self,
        digest: &str,
        at: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()> {
        let payload = change_feed::origin_payload(&self.origin, digest);
        self.with_client(async |client: &mut Client| {
            let tx = client.transaction().await.map_err(db_err)?;
            tx.execute(FORGET_ENDED_SESSIONS, &[&micros(forget_before)])
                .await
                .map_err(db_err)?;
            tx.execute(RECORD_ENDED_SESSION, &[&digest, &micros(at)])
                .await
                .map_err(db_err)?;
            tx.execute(NOTIFY_SESSION_END, &[&payload])
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        })
        .await
    }

    async fn ended_sessions(&self, digests: &[String]) -> StoreResult<Vec<String>> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        self.with_client(async |client: &mut Client| {
            let stmt = client
                .prepare_cached("SELECT digest FROM ended_sessions WHERE digest = ANY($1)")
                .await
                .map_err(db_err)?;
            let rows = client.query(&stmt, &[&digests]).await.map_err(db_err)?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
        .await
    }

    fn replica_heartbeat(
        &self,
        replicas: Arc<AtomicU32>,
        shutdown: CancellationToken,
    ) -> Option<BoxFuture<'static, ()>> {
        let replica_id = uuid::Uuid::new_v4().to_string();
        Some(Box::pin(super::replicas::heartbeat(
            self.clone(),
            replica_id,
            replicas,
            self.replicas_changed.clone(),
            shutdown,
        )))
    }

    async fn ping(&self) -> StoreResult<()> {
        let round_trip = async {
            let client = self.checkout().await?;
            let answered = client.simple_query("SELECT 1").await.map_err(db_err);
            client.release();
            answered.map(drop)
        };
        tokio::time::timeout(PING_TIMEOUT, round_trip)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "PostgreSQL did not answer the ping in time".into(),
                ))
            })
    }

    async fn create_tenant(&self, tenant: &TenantRecord) -> StoreResult<()> {
        let t = TenantRow::from_record(tenant)?;
        self.with_client(async |client: &mut Client| {
            let sql = format!(
                "INSERT INTO tenants ({TENANT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            );
            let stmt = client.prepare_cached(&sql).await.map_err(db_err)?;
            let params: [Param<'_>; 13] = [
                &t.id,
                &t.name,
                &t.integration_key,
                &t.sealed_token,
                &t.api_key_hash,
                &t.upstream_url,
                &t.upstream_transport,
                &t.enabled,
                &t.rate_rps,
                &t.rate_burst,
                &t.created_at,
                &t.updated_at,
                &t.version,
            ];
            client.execute(&stmt, &params).await.map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn get_tenant(&self, id: &str) -> StoreResult<Option<TenantRecord>> {
        if !storable_key(id) {
            return Ok(None);
        }
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1");
        let row = self.query_tenant(&sql, &[&id]).await?;
        row.map(TenantRow::into_record).transpose()
    }

    async fn tenant_by_key_hash(&self, hash: &[u8]) -> StoreResult<Option<TenantRecord>> {
        let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE api_key_hash = $1");
        let row = self.query_tenant(&sql, &[&hash]).await?;
        row.map(TenantRow::into_record).transpose()
    }

    async fn list_tenants(
        &self,
        limit: u32,
        after: Option<&PageCursor>,
    ) -> StoreResult<Vec<TenantRecord>> {
        let limit = i64::from(limit);
        self.with_client(async |client: &mut Client| {
            // Two statements rather than `$1 IS NULL OR ...`, so each page is an index range.
            let rows = match after {
                None => {
                    let sql = format!(
                        "SELECT {TENANT_COLUMNS} FROM tenants \
                         ORDER BY created_at DESC, id DESC LIMIT $1"
                    );
                    let stmt = client.prepare_cached(&sql).await.map_err(db_err)?;
                    client.query(&stmt, &[&limit]).await
                }
                Some(cursor) => {
                    let sql = format!(
                        "SELECT {TENANT_COLUMNS} FROM tenants WHERE (created_at, id) < ($1, $2) \
                         ORDER BY created_at DESC, id DESC LIMIT $3"
                    );
                    let stmt = client.prepare_cached(&sql).await.map_err(db_err)?;
                    let at = micros(cursor.created_at);
                    client.query(&stmt, &[&at, &cursor.id, &limit]).await
                }
            }
            .map_err(db_err)?;
            rows.iter().map(|r| tenant_row(r)?.into_record()).collect()
        })
        .await
    }

    async fn count_tenants(&self) -> StoreResult<u64> {
        self.with_client(async |client: &mut Client| {
            let stmt = client
                .prepare_cached("SELECT COUNT(*) FROM tenants")
                .await
                .map_err(db_err)?;
            let row = client.query_one(&stmt, &[]).await.map_err(db_err)?;
            let n: i64 = row.try_get(0).map_err(db_err)?;
            u64::try_from(n).map_err(|_| StoreError::Backend("negative tenant count".into()))
        })
        .await
    }

    async fn update_tenant(
        &self,
        id: &str,
        expected_version: i64,
        changes: &TenantChanges,
    ) -> StoreResult<TenantRecord> {
        if !storable_key(id) {
            return Err(StoreError::NotFound);
        }
        self.with_client(async |client: &mut Client| {
            let tx = client.transaction().await.map_err(db_err)?;
            let select = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1 FOR UPDATE");
            let stmt = tx.prepare_cached(&select).await.map_err(db_err)?;
            let current = tx.query_opt(&stmt, &[&id]).await.map_err(db_err)?;
            let current = tenant_row(&current.ok_or(StoreError::NotFound)?)?;
            if current.version != expected_version {
                return Err(StoreError::Conflict);
            }
            let r = apply_changes(current, changes, now_micros())?;
            let stmt = tx.prepare_cached(UPDATE_TENANT).await.map_err(db_err)?;
            let params: [Param<'_>; 12] = [
                &r.id,
                &expected_version,
                &r.name,
                &r.integration_key,
                &r.sealed_token,
                &r.upstream_url,
                &r.upstream_transport,
                &r.enabled,
                &r.rate_rps,
                &r.rate_burst,
                &r.updated_at,
                &r.version,
            ];
            if tx.execute(&stmt, &params).await.map_err(db_err)? != 1 {
                return Err(StoreError::Conflict);
            }
            // Delivered to every replica's listener when (and only if) the change commits.
            tx.execute(NOTIFY_TENANT, &[&r.id]).await.map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            r.into_record()
        })
        .await
    }

    async fn rotate_api_key(&self, id: &str, new_hash: &[u8]) -> StoreResult<TenantRecord> {
        if !storable_key(id) {
            return Err(StoreError::NotFound);
        }
        let sql = format!(
            "UPDATE tenants SET api_key_hash = $2, version = version + 1, updated_at = $3 \
             WHERE id = $1 RETURNING {TENANT_COLUMNS}, pg_notify('{TENANTS}', id)",
            TENANTS = change_feed::TENANTS_CHANNEL
        );
        let row = self
            .query_tenant(&sql, &[&id, &new_hash, &now_micros()])
            .await?;
        row.ok_or(StoreError::NotFound)?.into_record()
    }

    async fn delete_tenant(&self, id: &str) -> StoreResult<()> {
        if !storable_key(id) {
            return Err(StoreError::NotFound);
        }
        self.with_client(async |client: &mut Client| {
            let stmt = client.prepare_cached(DELETE_TENANT).await.map_err(db_err)?;
            match client.execute(&stmt, &[&id]).await.map_err(db_err)? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            }
        })
        .await
    }

    async fn append_audit(&self, events: &[AuditRecord]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let rows = events
            .iter()
            .map(AuditRow::from_record)
            .collect::<StoreResult<Vec<_>>>()?;
        // Through a checkout: the audit writer bounds each attempt with a timeout.
        let _permit = self.audit_write_permit().await?;
        let mut client = self.checkout().await?;
        let written = Self::insert_audit_rows(&mut client, &rows).await;
        client.release();
        written
    }

    async fn list_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        let keys = [
            Some(&query.tenant_id),
            query.action.as_ref(),
            query.before_id.as_ref(),
        ];
        if !keys.into_iter().flatten().all(|k| storable_key(k)) {
            return Ok(Vec::new());
        }
        let limit = i64::from(query.limit);
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE tenant_id = $1");
        let mut params: Vec<Param<'_>> = vec![&query.tenant_id];
        if let Some(action) = &query.action {
            params.push(action);
            sql.push_str(&format!(" AND action = ${}", params.len()));
        }
        if let Some(before) = &query.before_id {
            params.push(before);
            sql.push_str(&format!(" AND id < ${}", params.len()));
        }
        params.push(&limit);
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));
        self.with_client(async |client: &mut Client| {
            let stmt = client.prepare_cached(&sql).await.map_err(db_err)?;
            let rows = client.query(&stmt, &params).await.map_err(db_err)?;
            rows.iter().map(|r| audit_row(r)?.into_record()).collect()
        })
        .await
    }

    async fn prune_audit(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let _permit = self.audit_write_permit().await?;
        self.with_client(async |client: &mut Client| {
            let stmt = client
                .prepare_cached(
                    "DELETE FROM audit_events WHERE id IN \
                     (SELECT id FROM audit_events WHERE at < $1 ORDER BY at LIMIT $2)",
                )
                .await
                .map_err(db_err)?;
            client
                .execute(&stmt, &[&micros(before), &i64::from(limit)])
                .await
                .map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_cannot_serve_now_is_unavailable_not_an_internal_error() {
        for code in [
            "08006", "53100", "53300", "57P01", "57014", "55P03", "40001", "40P01", "25006",
        ] {
            assert!(passes(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02", "XX000"] {
            assert!(!passes(code), "{code}");
        }
    }

    #[test]
    fn the_listener_finds_out_about_a_dead_connection_in_seconds() {
        let store = PostgresStore::connect("postgres://sb@127.0.0.1:5432/sb", 2).expect("store");
        let listen = &store.listen_config;
        assert!(listen.get_keepalives());
        let idle = listen.get_keepalives_idle();
        let interval = listen.get_keepalives_interval().expect("interval");
        let retries = listen.get_keepalives_retries().expect("retries");
        assert!(idle + interval * retries <= Duration::from_secs(30));
    }
}
