//! The embedded backend: one SQLite file (WAL mode), the default so that `cargo run` works
//! on a fresh machine. rusqlite is synchronous and its `Connection` is not `Sync`, so the
//! one connection sits behind a mutex and every call runs on tokio's blocking pool once it
//! has the connection; SQLite serialises writers anyway, and the gateway's hot paths (key
//! lookups, audit batches) are short, so one connection is enough for an embedded
//! deployment.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row, ToSql, TransactionBehavior};

use super::columns::{
    apply_changes, micros, now_micros, AuditRow, TenantRow, AUDIT_COLUMNS, TENANT_COLUMNS,
};
use super::migrations::{pending, CREATE_SCHEMA_MIGRATIONS, SQLITE_MIGRATIONS};
use super::{
    AuditQuery, AuditRecord, PageCursor, Store, StoreError, StoreResult, TenantChanges,
    TenantRecord, PING_TIMEOUT, STORE_WAIT,
};

/// How long a statement waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The embedded store. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct SqliteStore {
    /// Waited for without a thread: a call takes a blocking-pool thread only once it has
    /// the connection. Were the wait inside the blocking task, a stalled connection (another
    /// process's write lock, for up to `BUSY_TIMEOUT`; a slow disk) would have every store
    /// call queued behind it hold a blocking thread, up to tokio's 512, and with them the
    /// pool's other work (reqwest resolves upstream names there); and a call whose caller
    /// gave up would still run when its turn came. A panicking call leaves at most an open
    /// transaction, which rusqlite rolls back when it is dropped.
    conn: Arc<tokio::sync::Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating it and its folder when missing) the database file at `path`, or an
    /// in-memory database for `:memory:`, in WAL mode with foreign keys on.
    pub async fn open(path: &str) -> anyhow::Result<Self> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || open_connection(&path)).await??;
        Ok(Self {
            conn: Arc::new(tokio::sync::Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool, once it has the connection: within
    /// [`STORE_WAIT`], or the store is unavailable (503), and `f` never runs. A statement
    /// that started runs to its end (its own wait for another process's lock bounded by
    /// `BUSY_TIMEOUT`): so a change answered unavailable was not applied.
    async fn with_conn<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let waited = tokio::time::timeout(STORE_WAIT, Arc::clone(&self.conn).lock_owned());
        let mut conn = waited.await.map_err(|_| {
            StoreError::Unavailable(format!(
                "the database's connection was busy for {} s",
                STORE_WAIT.as_secs()
            ))
        })?;
        tokio::task::spawn_blocking(move || f(&mut conn))
            .await
            .map_err(|_| StoreError::Backend("the sqlite task was cancelled or panicked".into()))?
    }
}

fn open_connection(path: &str) -> anyhow::Result<Connection> {
    if path != ":memory:" {
        if let Some(parent) = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)?;
        }
    }
    let conn = Connection::open(path)?;
    // The busy timeout first: switching to WAL needs a lock another process may hold.
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let _mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    // FULL: each commit is on disk before it is answered. With NORMAL a commit could roll
    // back at a power loss, after its 201 went out with an API key that is shown only
    // once. It costs an fsync per commit (0.2 ms here); audit events commit in batches.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn map_err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error() {
        Some(err) if err.code == ErrorCode::ConstraintViolation => {
            let unique = [
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE,
                rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY,
            ];
            if unique.contains(&err.extended_code) {
                StoreError::Duplicate
            } else {
                StoreError::Backend(e.to_string())
            }
        }
        // The file cannot be written or read now (busy, locked, its disk full or failing,
        // its volume read-only or out of reach): 503 with `Retry-After`, as for a
        // database server that is down, and an audit write is tried again.
        Some(err)
            if matches!(
                err.code,
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::CannotOpen
                    | ErrorCode::DiskFull
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::ReadOnly
                    | ErrorCode::PermissionDenied
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Backend(e.to_string()),
    }
}

fn tenant_row(row: &Row<'_>) -> rusqlite::Result<TenantRow> {
    Ok(TenantRow {
        id: row.get(0)?,
        name: row.get(1)?,
        integration_key: row.get(2)?,
        sealed_token: row.get(3)?,
        api_key_hash: row.get(4)?,
        upstream_url: row.get(5)?,
        upstream_transport: row.get(6)?,
        enabled: row.get(7)?,
        rate_rps: row.get(8)?,
        rate_burst: row.get(9)?,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        version: row.get(12)?,
    })
}

fn audit_row(row: &Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        id: row.get(0)?,
        at: row.get(1)?,
        tenant_id: row.get(2)?,
        action: row.get(3)?,
        actor: row.get(4)?,
        outcome: row.get(5)?,
        request_id: row.get(6)?,
        tool: row.get(7)?,
        latency_ms: row.get(8)?,
        request_bytes: row.get(9)?,
        response_bytes: row.get(10)?,
        detail: row.get(11)?,
    })
}

/// One tenant by a single-parameter `WHERE` clause.
fn tenant_where<P: ToSql>(
    conn: &Connection,
    clause: &str,
    param: P,
) -> StoreResult<Option<TenantRow>> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE {clause}");
    let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
    stmt.query_row([param], tenant_row)
        .optional()
        .map_err(map_err)
}

fn applied_versions(conn: &Connection) -> StoreResult<Vec<i64>> {
    let mut stmt = conn
        .prepare("SELECT version FROM schema_migrations")
        .map_err(map_err)?;
    let rows = stmt.query_map([], |r| r.get(0)).map_err(map_err)?;
    rows.collect::<Result<_, _>>().map_err(map_err)
}

/// Applies the pending migrations in one `BEGIN IMMEDIATE` transaction, reading what is
/// applied under the write lock, so that of several processes sharing the file exactly one
/// applies them, all or none (SQLite's DDL is transactional).
fn migrate(conn: &mut Connection) -> StoreResult<Vec<i64>> {
    conn.execute_batch(CREATE_SCHEMA_MIGRATIONS)
        .map_err(map_err)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_err)?;
    let done = applied_versions(&tx)?;
    let mut applied_now = Vec::new();
    for migration in pending(SQLITE_MIGRATIONS, &done) {
        tx.execute_batch(migration.sql).map_err(map_err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            params![migration.version, migration.name, now_micros()],
        )
        .map_err(map_err)?;
        applied_now.push(migration);
    }
    tx.commit().map_err(map_err)?;
    for migration in &applied_now {
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied a sqlite migration"
        );
    }
    Ok(applied_now.iter().map(|m| m.version).collect())
}

fn insert_tenant(conn: &Connection, t: &TenantRow) -> StoreResult<()> {
    let sql = format!(
        "INSERT INTO tenants ({TENANT_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
    );
    conn.prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.execute(params![
                t.id,
                t.name,
                t.integration_key,
                t.sealed_token,
                t.api_key_hash,
                t.upstream_url,
                t.upstream_transport,
                t.enabled,
                t.rate_rps,
                t.rate_burst,
                t.created_at,
                t.updated_at,
                t.version
            ])
        })
        .map_err(map_err)?;
    Ok(())
}

fn list_tenants(
    conn: &Connection,
    limit: u32,
    after: Option<(i64, String)>,
) -> StoreResult<Vec<TenantRow>> {
    // Two statements rather than `?1 IS NULL OR ...`, so each page is an index range.
    let rows = match after {
        None => {
            let sql = format!(
                "SELECT {TENANT_COLUMNS} FROM tenants ORDER BY created_at DESC, id DESC LIMIT ?1"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            let rows = stmt
                .query_map(params![limit], tenant_row)
                .map_err(map_err)?;
            rows.collect::<Result<_, _>>()
        }
        Some((at, id)) => {
            let sql = format!(
                "SELECT {TENANT_COLUMNS} FROM tenants WHERE (created_at, id) < (?1, ?2) \
                 ORDER BY created_at DESC, id DESC LIMIT ?3"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
            let rows = stmt
                .query_map(params![at, id, limit], tenant_row)
                .map_err(map_err)?;
            rows.collect::<Result<_, _>>()
        }
    };
    rows.map_err(map_err)
}

/// The optimistic update: read, check the version, write guarded by the same version.
fn update_tenant(
    conn: &mut Connection,
    id: &str,
    expected: i64,
    changes: &TenantChanges,
) -> StoreResult<TenantRow> {
    // IMMEDIATE: take the write lock before reading, so the read and the write see the
    // same snapshot (a deferred one could fail with SQLITE_BUSY_SNAPSHOT instead).
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_err)?;
    let current = tenant_where(&tx, "id = ?1", id)?.ok_or(StoreError::NotFound)?;
    if current.version != expected {
        return Err(StoreError::Conflict);
    }
    let row = apply_changes(current, changes, now_micros())?;
    let changed = tx
        .prepare_cached(
            "UPDATE tenants SET name = ?3, integration_key = ?4, sealed_token = ?5, \
             upstream_url = ?6, upstream_transport = ?7, enabled = ?8, rate_rps = ?9, \
             rate_burst = ?10, updated_at = ?11, version = ?12 \
             WHERE id = ?1 AND version = ?2",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                row.id,
                expected,
                row.name,
                row.integration_key,
                row.sealed_token,
                row.upstream_url,
                row.upstream_transport,
                row.enabled,
                row.rate_rps,
                row.rate_burst,
                row.updated_at,
                row.version
            ])
        })
        .map_err(map_err)?;
    if changed != 1 {
        return Err(StoreError::Conflict);
    }
    tx.commit().map_err(map_err)?;
    Ok(row)
}

fn append_audit(conn: &mut Connection, rows: &[AuditRow]) -> StoreResult<()> {
    let tx = conn.transaction().map_err(map_err)?;
    {
        let sql = format!(
            "INSERT OR IGNORE INTO audit_events ({AUDIT_COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
        );
        let mut stmt = tx.prepare_cached(&sql).map_err(map_err)?;
        for e in rows {
            stmt.execute(params![
                e.id,
                e.at,
                e.tenant_id,
                e.action,
                e.actor,
                e.outcome,
                e.request_id,
                e.tool,
                e.latency_ms,
                e.request_bytes,
                e.response_bytes,
                e.detail
            ])
            .map_err(map_err)?;
        }
    }
    tx.commit().map_err(map_err)
}

fn list_audit(conn: &Connection, q: &AuditQuery) -> StoreResult<Vec<AuditRow>> {
    let mut args: Vec<&dyn ToSql> = vec![&q.tenant_id];
    args.extend(q.action.as_ref().map(|a| a as &dyn ToSql));
    args.extend(q.before_id.as_ref().map(|b| b as &dyn ToSql));
    args.push(&q.limit);
    let sql = list_audit_sql(q.action.is_some(), q.before_id.is_some());
    let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
    let rows = stmt
        .query_map(args.as_slice(), audit_row)
        .map_err(map_err)?;
    rows.collect::<Result<_, _>>().map_err(map_err)
}

/// A page of one tenant's trail, newest first: `?1` the tenant, then the action and the
/// id to start below when they are given, then the limit.
fn list_audit_sql(by_action: bool, before: bool) -> String {
    let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE tenant_id = ?1");
    let mut n = 1;
    if by_action {
        n += 1;
        sql.push_str(&format!(" AND action = ?{n}"));
    }
    if before {
        n += 1;
        sql.push_str(&format!(" AND id < ?{n}"));
    }
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", n + 1));
    sql
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> StoreResult<Vec<i64>> {
        self.with_conn(migrate).await
    }

    async fn ping(&self) -> StoreResult<()> {
        let round_trip = self.with_conn(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(drop)
                .map_err(map_err)
        });
        tokio::time::timeout(PING_TIMEOUT, round_trip)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the embedded store did not answer the ping in time".into(),
                ))
            })
    }

    async fn create_tenant(&self, tenant: &TenantRecord) -> StoreResult<()> {
        let row = TenantRow::from_record(tenant)?;
        self.with_conn(move |conn| insert_tenant(conn, &row)).await
    }

    async fn get_tenant(&self, id: &str) -> StoreResult<Option<TenantRecord>> {
        let id = id.to_owned();
        let row = self
            .with_conn(move |conn| tenant_where(conn, "id = ?1", id))
            .await?;
        row.map(TenantRow::into_record).transpose()
    }

    async fn tenant_by_key_hash(&self, hash: &[u8]) -> StoreResult<Option<TenantRecord>> {
        let hash = hash.to_vec();
        let row = self
            .with_conn(move |conn| tenant_where(conn, "api_key_hash = ?1", hash))
            .await?;
        row.map(TenantRow::into_record).transpose()
    }

    async fn list_tenants(
        &self,
        limit: u32,
        after: Option<&PageCursor>,
    ) -> StoreResult<Vec<TenantRecord>> {
        let after = after.map(|c| (micros(c.created_at), c.id.clone()));
        let rows = self
            .with_conn(move |conn| list_tenants(conn, limit, after))
            .await?;
        rows.into_iter().map(TenantRow::into_record).collect()
    }

    async fn count_tenants(&self) -> StoreResult<u64> {
        let n: i64 = self
            .with_conn(|conn| {
                conn.query_row("SELECT COUNT(*) FROM tenants", [], |r| r.get(0))
                    .map_err(map_err)
            })
            .await?;
        u64::try_from(n).map_err(|_| StoreError::Backend("negative tenant count".into()))
    }

    async fn update_tenant(
        &self,
        id: &str,
        expected_version: i64,
        changes: &TenantChanges,
    ) -> StoreResult<TenantRecord> {
        let (id, changes) = (id.to_owned(), changes.clone());
        self.with_conn(move |conn| update_tenant(conn, &id, expected_version, &changes))
            .await?
            .into_record()
    }

    async fn rotate_api_key(&self, id: &str, new_hash: &[u8]) -> StoreResult<TenantRecord> {
        let (id, hash) = (id.to_owned(), new_hash.to_vec());
        let row = self
            .with_conn(move |conn| {
                let sql = format!(
                    "UPDATE tenants SET api_key_hash = ?2, version = version + 1, updated_at = ?3 \
                     WHERE id = ?1 RETURNING {TENANT_COLUMNS}"
                );
                let mut stmt = conn.prepare_cached(&sql).map_err(map_err)?;
                // Stepped to its end: with RETURNING the row comes first and the commit
                // after, and a commit that fails is said only by that last step (`query_row`
                // would answer the row, and the failed rotation as done).
                stmt.query_one(params![id, hash, now_micros()], tenant_row)
                    .optional()
                    .map_err(map_err)
            })
            .await?;
        row.ok_or(StoreError::NotFound)?.into_record()
    }

    async fn delete_tenant(&self, id: &str) -> StoreResult<()> {
        let id = id.to_owned();
        let deleted = self
            .with_conn(move |conn| {
                conn.execute("DELETE FROM tenants WHERE id = ?1", [id])
                    .map_err(map_err)
            })
            .await?;
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn end_session(
        &self,
        digest: &str,
        at: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()> {
        let digest = digest.to_owned();
        let (at, forget_before) = (micros(at), micros(forget_before));
        self.with_conn(move |conn| {
            let tx = conn.transaction().map_err(map_err)?;
            tx.execute(
                "DELETE FROM ended_sessions WHERE ended_at < ?1",
                [forget_before],
            )
            .map_err(map_err)?;
            tx.execute(
                "INSERT INTO ended_sessions (digest, ended_at) VALUES (?1, ?2) \
                 ON CONFLICT (digest) DO NOTHING",
                params![digest, at],
            )
            .map_err(map_err)?;
            tx.commit().map_err(map_err)
        })
        .await
    }

    async fn ended_sessions(&self, digests: &[String]) -> StoreResult<Vec<String>> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        let digests = digests.to_vec();
        self.with_conn(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT 1 FROM ended_sessions WHERE digest = ?1")
                .map_err(map_err)?;
            let mut ended = Vec::new();
            for digest in digests {
                if stmt.exists([&digest]).map_err(map_err)? {
                    ended.push(digest);
                }
            }
            Ok(ended)
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
        self.with_conn(move |conn| append_audit(conn, &rows)).await
    }

    async fn list_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
        let query = query.clone();
        let rows = self.with_conn(move |conn| list_audit(conn, &query)).await?;
        rows.into_iter().map(AuditRow::into_record).collect()
    }

    async fn prune_audit(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let before = micros(before);
        let n = self
            .with_conn(move |conn| {
                conn.execute(
                    "DELETE FROM audit_events WHERE rowid IN \
                     (SELECT rowid FROM audit_events WHERE at < ?1 ORDER BY at LIMIT ?2)",
                    [before, i64::from(limit)],
                )
                .map_err(map_err)
            })
            .await?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call that waits for the connection past `STORE_WAIT` is unavailable, and never
    /// runs (an admin change answered so was not applied).
    #[tokio::test]
    async fn a_call_that_cannot_have_the_connection_in_time_is_unavailable_and_never_runs() {
        let store = SqliteStore::open(":memory:").await.expect("opened");
        store.migrate().await.expect("migrated");
        let busy = Arc::clone(&store.conn).lock_owned().await;
        let tenant = TenantRecord::for_tests("tenant-late", 1);
        let created = store.create_tenant(&tenant).await;
        assert!(
            matches!(created, Err(StoreError::Unavailable(_))),
            "{created:?}"
        );
        drop(busy);
        let kept = store.get_tenant(&tenant.id).await.expect("read");
        assert_eq!(kept, None, "created after all");
    }

    /// A rotation whose commit fails (here a deferred foreign key a trigger breaks; on a
    /// real file, a full disk or an I/O error) is an error, and the old key stays: it must
    /// not be answered as done with the new key, which would then not work.
    #[tokio::test]
    async fn a_rotation_whose_commit_fails_is_an_error() {
        let store = SqliteStore::open(":memory:").await.expect("opened");
        store.migrate().await.expect("migrated");
        let tenant = TenantRecord::for_tests("tenant-rotated", 1);
        store.create_tenant(&tenant).await.expect("created");
        store
            .with_conn(|conn| {
                conn.execute_batch(
                    "CREATE TABLE keys_seen (hash BLOB PRIMARY KEY);
                     CREATE TABLE guard (hash BLOB REFERENCES keys_seen (hash)
                         DEFERRABLE INITIALLY DEFERRED);
                     CREATE TRIGGER rotated AFTER UPDATE ON tenants
                         BEGIN INSERT INTO guard VALUES (NEW.api_key_hash); END;",
                )
                .map_err(map_err)
            })
            .await
            .expect("set up");
        let rotated = store.rotate_api_key(&tenant.id, &[2; 32]).await;
        assert!(rotated.is_err(), "{rotated:?}");
        let kept = store.get_tenant(&tenant.id).await.expect("read");
        assert_eq!(kept.map(|t| t.api_key_hash), Some(vec![1; 32]));
    }

    /// A file that cannot be written now (here: read-only) makes the store unavailable (503,
    /// retried), not broken (500).
    #[test]
    fn a_file_that_cannot_be_written_is_unavailable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("read-only.db");
        let conn = open_connection(path.to_str().expect("utf-8 path")).expect("opened");
        conn.execute_batch("CREATE TABLE t (a INTEGER); PRAGMA query_only = ON")
            .expect("set up");
        let refused = conn
            .execute("INSERT INTO t VALUES (1)", [])
            .expect_err("read-only");
        assert!(
            matches!(map_err(refused), StoreError::Unavailable(_)),
            "a read-only file is for now"
        );
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert!(matches!(map_err(full), StoreError::Unavailable(_)));
    }

    /// A call whose caller gave up while another held the connection (stalled here on
    /// another process's write lock) never runs: it waited for the connection without a
    /// blocking-pool thread, and went with its caller. Queued on the blocking pool, as it
    /// was, it ran when its turn came, and every call behind a stall held a thread.
    #[tokio::test]
    async fn a_call_given_up_while_the_connection_is_busy_never_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("busy.db");
        let path = path.to_str().expect("utf-8 path");
        let store = SqliteStore::open(path).await.expect("opened");
        store.migrate().await.expect("migrated");
        let other = Connection::open(path).expect("another process's connection");
        other
            .execute_batch("BEGIN IMMEDIATE")
            .expect("its write lock");
        let written = |request_id: &str| {
            let event = crate::audit::event(None, "test", "test", "ok", Some(request_id));
            let store = store.clone();
            async move { store.append_audit(&[event]).await }
        };
        // Takes the connection, and waits (BUSY_TIMEOUT) for the other's lock.
        let held = tokio::spawn(written("held"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let gave_up = tokio::time::timeout(Duration::from_millis(100), written("gave-up")).await;
        assert!(gave_up.is_err(), "waits for the connection: {gave_up:?}");
        other.execute_batch("COMMIT").expect("the lock let go");
        held.await
            .expect("joined")
            .expect("written once the lock is gone");
        // Time for a call still queued to have run.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let count = |request_id: &str| -> i64 {
            other
                .query_row(
                    "SELECT count(*) FROM audit_events WHERE request_id = ?1",
                    [request_id],
                    |row| row.get(0),
                )
                .expect("counted")
        };
        assert_eq!(count("held"), 1);
        assert_eq!(count("gave-up"), 0, "the call given up ran later");
    }

    /// A commit is on disk before it is answered (`synchronous=FULL`, 2), on the WAL file.
    #[test]
    fn commits_are_durable_before_they_are_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("durable.db");
        let conn = open_connection(path.to_str().expect("utf-8 path")).expect("opened");
        let level: i64 = conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .expect("pragma");
        assert_eq!(level, 2);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .expect("pragma");
        assert_eq!(mode, "wal");
    }

    /// Every form of the audit page query is served by an index in its order, without a
    /// sort and without reading other actions' events: a rare `?action=` stays cheap.
    #[test]
    fn every_audit_page_query_reads_an_index_in_order() {
        let mut conn = Connection::open_in_memory().expect("in-memory database");
        migrate(&mut conn).expect("migrations apply");
        for (by_action, before) in [(false, false), (true, false), (false, true), (true, true)] {
            let sql = format!("EXPLAIN QUERY PLAN {}", list_audit_sql(by_action, before));
            let mut stmt = conn.prepare(&sql).expect("the query prepares");
            let unbound = vec![rusqlite::types::Value::Null; stmt.parameter_count()];
            let steps: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(unbound), |row| {
                    row.get::<_, String>(3)
                })
                .expect("the plan")
                .collect::<Result<_, _>>()
                .expect("plan rows");
            let plan = steps.join("; ");
            let index = if by_action {
                "audit_events_tenant_action_idx"
            } else {
                "audit_events_tenant_id_idx"
            };
            assert!(plan.contains(index), "{by_action} {before}: {plan}");
            assert!(
                !plan.contains("TEMP B-TREE"),
                "{by_action} {before}: {plan}"
            );
        }
    }
}
