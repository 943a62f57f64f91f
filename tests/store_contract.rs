//! The store contract: one suite of checks (`check_*`, each taking `&dyn Store`) that both
//! backends must pass, run on both in every `cargo test`: SQLite in a temporary file, and
//! PostgreSQL in a fresh database created on `TEST_DATABASE_URL` (default: the local
//! server, user postgres) and dropped afterwards, even when a check fails. An unreachable
//! PostgreSQL fails the run; it never skips.

mod common;

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use chrono::{DateTime, TimeZone, Utc};
use common::database::{
    locking, locking_in, side_connection, wait_for_lock_waiter, wait_for_no_lock_waiters,
    FreshDatabase,
};
use futures::FutureExt;
use switchboard::store::postgres::PostgresStore;
use switchboard::store::sqlite::SqliteStore;
use switchboard::store::{
    AuditQuery, AuditRecord, Migration, PageCursor, RateLimit, SharedStore, Store, StoreError,
    TenantChanges, TenantRecord, UpstreamTransport, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS,
};
use tokio_postgres::NoTls;
use uuid::Uuid;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

// ---------------------------------------------------------------- harness

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_contract() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("contract.db");
    let path = path.to_str().context("the temp path is not UTF-8")?;
    let mut racers: Vec<SharedStore> = Vec::new();
    for _ in 0..3 {
        racers.push(Arc::new(SqliteStore::open(path).await?));
    }
    check_concurrent_migrate(racers, SQLITE_MIGRATIONS).await?;
    let store = SqliteStore::open(path).await?;
    run_suite(&store).await
}

#[tokio::test]
async fn sqlite_in_memory_opens_and_migrates() -> Result<()> {
    let store = SqliteStore::open(":memory:").await?;
    ensure!(store.migrate().await? == versions(SQLITE_MIGRATIONS));
    store.ping().await?;
    ensure!(store.count_tenants().await? == 0);
    Ok(())
}

/// `sqlite://` with no path (an unset variable in `sqlite://${DB_PATH}`) would be SQLite's
/// temporary database, deleted at exit: refused, saying so.
#[tokio::test]
async fn a_sqlite_url_without_a_path_is_refused() -> Result<()> {
    let Err(refused) = switchboard::store::open(Some("sqlite://"), 1).await else {
        bail!("sqlite:// with no path opened");
    };
    ensure!(
        format!("{refused:#}").contains("names no file"),
        "{refused:#}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_contract() -> Result<()> {
    let admin_url =
        std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
    let connecting = tokio_postgres::connect(&admin_url, NoTls);
    let (admin, connection) = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .context("timed out connecting to PostgreSQL (TEST_DATABASE_URL)")?
        .context("PostgreSQL (TEST_DATABASE_URL, default 127.0.0.1:5432) is unreachable")?;
    let connection = tokio::spawn(connection);
    let db = format!("switchboard_test_{}", Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;

    let outcome = match database_url(&admin_url, &db) {
        Ok(url) => AssertUnwindSafe(run_postgres(&url)).catch_unwind().await,
        Err(e) => Ok(Err(e)),
    };
    let dropped = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await;
    drop(admin);
    connection.abort();

    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(result) => result?,
    }
    dropped.context("dropping the test database")?;
    Ok(())
}

#[tokio::test]
async fn postgres_down_is_unavailable_fast_and_quiet() -> Result<()> {
    // A loopback port nobody listens on, and no other test is given.
    let port = switchboard::config::refusing_loopback().port();
    let url = format!("postgres://switchboard:s3cret-pw@127.0.0.1:{port}/nothing");
    let store = PostgresStore::connect(&url, 2)?;
    let started = Instant::now();
    let Err(err) = store.ping().await else {
        bail!("ping succeeded on a closed port");
    };
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    ensure!(matches!(err, StoreError::Unavailable(_)), "got {err:?}");
    ensure!(!format!("{err} {err:?}").contains("s3cret-pw"));

    let Err(bad) = PostgresStore::connect("postgres://u:s3cret-pw@host:no-port/x", 1) else {
        bail!("an invalid URL was accepted");
    };
    ensure!(!format!("{bad:#} {bad:?}").contains("s3cret-pw"));
    Ok(())
}

/// A database in another encoding than UTF-8 is refused at the migration, with what to do,
/// before anything is made in it: in `LATIN1`, the first tenant name or audit detail with a
/// character it has no byte for would fail its write (an audit batch again at every retry).
#[tokio::test]
async fn postgres_refuses_a_database_not_in_utf8() -> Result<()> {
    let db = FreshDatabase::create_with(
        "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .await?;
    let store = PostgresStore::connect(&db.url, 1)?;
    let refused = store.migrate().await;
    let Err(StoreError::Backend(why)) = &refused else {
        bail!("a LATIN1 database was migrated: {refused:?}");
    };
    ensure!(
        why.contains("LATIN1") && why.contains("ENCODING 'UTF8'"),
        "the refusal does not say what to do: {why}"
    );
    let made: bool = side_connection(&db.url)
        .await?
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    ensure!(!made, "the refused database was changed");
    Ok(())
}

/// Audit writes given up on (under a timeout, as the audit writer and the tenant actors
/// bound every attempt) while a lock holds them must not leave their statements waiting on
/// the server: the server does not notice a client that went away from a statement waiting
/// for a lock, and each attempt after one given up on takes a new connection, so with a
/// table locked for a while every retry would keep one more backend, until
/// `max_connections` ran out. The store cancels an abandoned statement: within seconds, no
/// backend is left waiting, while the lock is still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_abandoned_statements_leave_no_backend_waiting() -> Result<()> {
    const ABANDONED: usize = 4;
    let db = FreshDatabase::create().await?;
    let store = PostgresStore::connect(&db.url, 2)?;
    store.migrate().await?;
    let locker = locking(&db.url, "audit_events").await?;
    let holder: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    for _ in 0..ABANDONED {
        abandon_an_audit_write(&store, "tenant-gone").await?;
    }
    // Not the locker: a transaction reads `pg_stat_activity` once, then keeps that copy.
    let watcher = side_connection(&db.url).await?;
    let left = wait_for_no_lock_waiters(&watcher, holder, Duration::from_secs(3)).await;
    locker.batch_execute("COMMIT").await?;
    left?;
    // The pool serves again once the lock is gone.
    let event = audit(
        Uuid::now_v7().to_string(),
        "tenant-back",
        "tool.call",
        now()?,
    );
    tokio::time::timeout(
        Duration::from_secs(5),
        store.append_audit(std::slice::from_ref(&event)),
    )
    .await
    .context("the write after the lock went did not end")??;
    Ok(())
}

async fn run_postgres(url: &str) -> Result<()> {
    let mut racers: Vec<SharedStore> = Vec::new();
    for _ in 0..3 {
        racers.push(Arc::new(PostgresStore::connect(url, 2)?));
    }
    check_concurrent_migrate(racers, POSTGRES_MIGRATIONS).await?;
    let store = PostgresStore::connect(url, 4)?;
    check_concurrent_index_migration_runs_again(&store, url).await?;
    check_migration_outlasts_the_urls_time_limits(url).await?;
    check_abandoned_work_leaves_no_connection_waiting(url).await?;
    run_suite(&store).await?;
    // Last: it leaves the database refusing writes.
    check_a_server_that_only_reads_is_unavailable(url).await
}

/// A server that refuses writes (a standby after a failover, until the URL points at the
/// new primary) is unavailable for now (503, audit writes retried), not broken (500).
async fn check_a_server_that_only_reads_is_unavailable(url: &str) -> Result<()> {
    let admin = side_connection(url).await?;
    let db: String = admin
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET default_transaction_read_only = on"
        ))
        .await?;
    drop(admin);
    let store = PostgresStore::connect(url, 1)?;
    let event = audit(
        Uuid::now_v7().to_string(),
        "tenant-read-only",
        "tool.call",
        now()?,
    );
    let refused = store.append_audit(std::slice::from_ref(&event)).await;
    ensure!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "a write on a read-only server: {refused:?}"
    );
    ensure!(store.get_tenant("tenant-read-only").await?.is_none());
    Ok(())
}

/// Starts an audit write for `tenant` that the audit table's lock, held elsewhere, keeps
/// waiting, and gives up on it after 300 ms.
async fn abandon_an_audit_write(store: &PostgresStore, tenant: &str) -> Result<()> {
    let event = audit(Uuid::now_v7().to_string(), tenant, "tool.call", now()?);
    let write = store.append_audit(std::slice::from_ref(&event));
    ensure!(
        tokio::time::timeout(Duration::from_millis(300), write)
            .await
            .is_err(),
        "the audit write went through a held lock"
    );
    Ok(())
}

/// An audit write given up on (a timeout, as the audit writer bounds every attempt) while a
/// lock holds it must not leave its statement queued on a pooled connection: with one
/// connection in the pool, the next read would wait behind it for as long as the lock.
async fn check_abandoned_work_leaves_no_connection_waiting(url: &str) -> Result<()> {
    let store = PostgresStore::connect(url, 1)?;
    let locker = locking(url, "audit_events").await?;
    abandon_an_audit_write(&store, "tenant-abandoned").await?;
    let read =
        tokio::time::timeout(Duration::from_secs(3), store.get_tenant("tenant-abandoned")).await;
    locker.batch_execute("COMMIT").await?;
    ensure!(
        matches!(read, Ok(Ok(None))),
        "a read queued behind the abandoned write: {read:?}"
    );
    Ok(())
}

/// Migration 4 builds its index CONCURRENTLY, outside a transaction, so a failure can leave
/// it half done: run again from the start (here, with its record gone), it must succeed and
/// leave a valid index.
async fn check_concurrent_index_migration_runs_again(
    store: &PostgresStore,
    url: &str,
) -> Result<()> {
    let db = side_connection(url).await?;
    let valid = || action_index_valid(&db);
    ensure!(
        valid().await? == Some(true),
        "migration 4 left no valid index"
    );
    db.batch_execute("DELETE FROM schema_migrations WHERE version = 4")
        .await?;
    let applied = store.migrate().await?;
    ensure!(applied == vec![4], "applied again: {applied:?}");
    ensure!(
        valid().await? == Some(true),
        "the second run left no valid index"
    );
    Ok(())
}

/// Whether migration 4's index is valid; `None` when there is none.
async fn action_index_valid(db: &tokio_postgres::Client) -> Result<Option<bool>> {
    let row = db
        .query_opt(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname = 'audit_events_tenant_action_idx'",
            &[],
        )
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// A URL (or role) may set `statement_timeout` and `lock_timeout` for the pool's work; a
/// migration must not be held to them. Migration 4's `CREATE INDEX CONCURRENTLY` takes as
/// long as the audit trail is large and the transactions in flight keep it waiting; here a
/// transaction holding the table's lock makes it wait well past the URL's limits (as a
/// large table would make it build), and the migration must still end, with a valid index.
async fn check_migration_outlasts_the_urls_time_limits(url: &str) -> Result<()> {
    let db = side_connection(url).await?;
    db.batch_execute(
        "DROP INDEX audit_events_tenant_action_idx; \
         DELETE FROM schema_migrations WHERE version = 4",
    )
    .await?;
    // The lock CREATE INDEX CONCURRENTLY takes, and waits for here.
    let locker = locking_in(url, "audit_events", "SHARE UPDATE EXCLUSIVE").await?;
    // `tokio_postgres` decodes `%XX` in the URL's parameters, not `+`.
    let limited = format!("{url}?options=-c%20statement_timeout%3D100%20-c%20lock_timeout%3D100");
    let store = PostgresStore::connect(&limited, 1)?;
    let migrating = tokio::spawn(async move { store.migrate().await });
    wait_for_lock_waiter(&db, "audit_events").await?;
    // Well past both limits before the lock goes.
    tokio::time::sleep(Duration::from_millis(600)).await;
    locker.batch_execute("COMMIT").await?;
    let applied = tokio::time::timeout(Duration::from_secs(20), migrating)
        .await
        .context("the migration did not end")??;
    let valid = action_index_valid(&db).await?;
    ensure!(
        matches!(&applied, Ok(versions) if *versions == vec![4]),
        "a migration under the URL's time limits: {applied:?}"
    );
    ensure!(valid == Some(true), "the index is not valid: {valid:?}");
    Ok(())
}

/// `admin_url` with its database replaced by `db`.
fn database_url(admin_url: &str, db: &str) -> Result<String> {
    let mut url = url::Url::parse(admin_url).context("TEST_DATABASE_URL must be a URL")?;
    url.set_path(db);
    Ok(url.into())
}

async fn run_suite(store: &dyn Store) -> Result<()> {
    let b = store.backend();
    check_migrate_is_idempotent(store)
        .await
        .context(format!("{b}: migrate again"))?;
    store.ping().await.context(format!("{b}: ping"))?;
    check_create_and_get(store)
        .await
        .context(format!("{b}: create/get"))?;
    check_timestamps_round_trip(store)
        .await
        .context(format!("{b}: timestamps"))?;
    check_list_pagination(store)
        .await
        .context(format!("{b}: list pagination"))?;
    check_count(store).await.context(format!("{b}: count"))?;
    check_update(store).await.context(format!("{b}: update"))?;
    check_rotate_api_key(store)
        .await
        .context(format!("{b}: rotate"))?;
    check_delete_keeps_audit(store)
        .await
        .context(format!("{b}: delete"))?;
    check_audit_append_and_list(store)
        .await
        .context(format!("{b}: audit"))?;
    check_audit_text_with_nul(store)
        .await
        .context(format!("{b}: audit text with NUL"))?;
    check_keys_with_nul_match_nothing(store)
        .await
        .context(format!("{b}: keys with NUL"))?;
    check_prune_audit(store)
        .await
        .context(format!("{b}: prune"))?;
    check_ended_sessions(store)
        .await
        .context(format!("{b}: ended sessions"))?;
    Ok(())
}

// ---------------------------------------------------------------- helpers

fn versions(list: &[Migration]) -> Vec<i64> {
    list.iter().map(|m| m.version).collect()
}

/// A short random tag, so checks sharing one database never collide.
fn tag() -> String {
    Uuid::new_v4().simple().to_string()[..10].to_owned()
}

fn at_micros(us: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us).context("timestamp out of range")
}

/// Now, truncated to what the store keeps (microseconds).
fn now() -> Result<DateTime<Utc>> {
    at_micros(Utc::now().timestamp_micros())
}

fn key_hash(seed: &str) -> Vec<u8> {
    format!("api-key-hash:{seed}").into_bytes()
}

fn tenant(id: &str, created_at: DateTime<Utc>) -> TenantRecord {
    TenantRecord {
        id: id.to_owned(),
        name: Some(format!("name of {id}")),
        integration_key: "hubspot".to_owned(),
        sealed_token: vec![0, 1, 2, 254, 255],
        api_key_hash: key_hash(id),
        upstream_url: None,
        upstream_transport: UpstreamTransport::StreamableHttp,
        enabled: true,
        rate_limit: None,
        created_at,
        updated_at: created_at,
        version: 1,
    }
}

fn audit(id: String, tenant_id: &str, action: &str, at: DateTime<Utc>) -> AuditRecord {
    let tool_call = action == "tool.call";
    AuditRecord {
        id,
        at,
        tenant_id: Some(tenant_id.to_owned()),
        action: action.to_owned(),
        actor: format!("tenant:{tenant_id}"),
        outcome: "ok".to_owned(),
        request_id: Some(format!("req-{}", tag())),
        tool: tool_call.then(|| "search".to_owned()),
        latency_ms: tool_call.then_some(42),
        request_bytes: tool_call.then_some(120),
        response_bytes: tool_call.then_some(4096),
        detail: tool_call.then(|| serde_json::json!({"args": {"q": "x"}, "n": 1.5})),
    }
}

/// `n` UUIDv7 ids, oldest first.
fn v7_ids(n: usize) -> Vec<String> {
    let mut ids: Vec<String> = (0..n).map(|_| Uuid::now_v7().to_string()).collect();
    ids.sort();
    ids
}

fn audit_query(tenant_id: &str, limit: u32) -> AuditQuery {
    AuditQuery {
        tenant_id: tenant_id.to_owned(),
        action: None,
        before_id: None,
        limit,
    }
}

fn is<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    want: fn(&StoreError) -> bool,
) -> Result<()> {
    match result {
        Err(e) if want(&e) => Ok(()),
        other => bail!("unexpected result: {other:?}"),
    }
}

// ---------------------------------------------------------------- checks

/// A client can put NUL in what is audited (a tool name it asks for, in JSON as `\u0000`).
/// PostgreSQL's `TEXT` refuses it; the event must still be written, in both backends alike,
/// and the batch around it too.
async fn check_audit_text_with_nul(store: &dyn Store) -> Result<()> {
    let tenant_id = format!("nul-{}", tag());
    let ids = v7_ids(2);
    let mut odd = audit(ids[0].clone(), &tenant_id, "tool.call", now()?);
    odd.tool = Some("a\0b".to_owned());
    let plain = audit(ids[1].clone(), &tenant_id, "tool.call", now()?);
    store.append_audit(&[odd, plain]).await?;
    let trail = store.list_audit(&audit_query(&tenant_id, 10)).await?;
    ensure!(trail.len() == 2, "{} of 2 events written", trail.len());
    let tools: Vec<_> = trail.iter().map(|e| e.tool.as_deref()).collect();
    ensure!(
        tools == [Some("search"), Some("a\u{FFFD}b")],
        "tools read back: {tools:?}"
    );
    Ok(())
}

/// A key with a NUL (say, `%00` in a path) names no tenant and no trail, on both backends:
/// PostgreSQL refuses NUL in text, so its store must not pass one on as an error.
async fn check_keys_with_nul_match_nothing(store: &dyn Store) -> Result<()> {
    let id = "tenant-a\0b";
    ensure!(store.get_tenant(id).await?.is_none(), "get");
    let changes = TenantChanges {
        enabled: Some(false),
        ..TenantChanges::default()
    };
    let updated = store.update_tenant(id, 1, &changes).await;
    ensure!(
        matches!(updated, Err(StoreError::NotFound)),
        "update: {updated:?}"
    );
    let rotated = store.rotate_api_key(id, &[7; 32]).await;
    ensure!(
        matches!(rotated, Err(StoreError::NotFound)),
        "rotate: {rotated:?}"
    );
    let deleted = store.delete_tenant(id).await;
    ensure!(
        matches!(deleted, Err(StoreError::NotFound)),
        "delete: {deleted:?}"
    );
    let trail = store.list_audit(&audit_query(id, 10)).await?;
    ensure!(trail.is_empty(), "audit trail: {trail:?}");
    Ok(())
}

/// Several stores migrate one fresh database at once: exactly one applies everything.
async fn check_concurrent_migrate(stores: Vec<SharedStore>, list: &[Migration]) -> Result<()> {
    let tasks: Vec<_> = stores
        .into_iter()
        .map(|s| tokio::spawn(async move { s.migrate().await }))
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await?.context("a concurrent migrate failed")?);
    }
    let appliers: Vec<_> = results.iter().filter(|r| !r.is_empty()).collect();
    ensure!(appliers.len() == 1, "expected one applier, got {results:?}");
    ensure!(*appliers[0] == versions(list), "applied {:?}", appliers[0]);
    Ok(())
}

async fn check_migrate_is_idempotent(store: &dyn Store) -> Result<()> {
    ensure!(
        store.migrate().await?.is_empty(),
        "a second migrate applied something"
    );
    ensure!(store.migrate().await?.is_empty());
    Ok(())
}

async fn check_create_and_get(store: &dyn Store) -> Result<()> {
    let t = format!("tenant-{}", tag());
    let mut rec = tenant(&t, now()?);
    rec.upstream_url = Some("https://mcp.example.test/mcp".to_owned());
    rec.upstream_transport = UpstreamTransport::Auto;
    rec.rate_limit = Some(RateLimit {
        requests_per_second: 7,
        burst: 21,
    });
    store.create_tenant(&rec).await?;

    ensure!(
        store.get_tenant(&t).await?.as_ref() == Some(&rec),
        "get differs"
    );
    let by_hash = store.tenant_by_key_hash(&rec.api_key_hash).await?;
    ensure!(by_hash.as_ref() == Some(&rec), "by key hash differs");
    ensure!(store.get_tenant("tenant-missing").await?.is_none());
    ensure!(store.tenant_by_key_hash(b"no such hash").await?.is_none());

    let mut same_id = tenant(&t, now()?);
    same_id.api_key_hash = key_hash("another");
    is(store.create_tenant(&same_id).await, |e| {
        matches!(e, StoreError::Duplicate)
    })
    .context("same id")?;
    let mut same_hash = tenant(&format!("{t}-2"), now()?);
    same_hash.api_key_hash = rec.api_key_hash.clone();
    is(store.create_tenant(&same_hash).await, |e| {
        matches!(e, StoreError::Duplicate)
    })
    .context("same key hash")?;
    ensure!(store.get_tenant(&same_hash.id).await?.is_none());
    Ok(())
}

async fn check_timestamps_round_trip(store: &dyn Store) -> Result<()> {
    let t = tag();
    let stamps = [
        at_micros(1_700_000_000_123_457)?,
        at_micros(-1_234_567)?, // before 1970
        Utc.with_ymd_and_hms(2999, 12, 31, 23, 59, 59)
            .single()
            .context("date")?
            + chrono::Duration::microseconds(999_999),
    ];
    for (i, at) in stamps.into_iter().enumerate() {
        let mut rec = tenant(&format!("tenant-ts-{t}-{i}"), at);
        rec.updated_at = at + chrono::Duration::microseconds(1);
        store.create_tenant(&rec).await?;
        let back = store.get_tenant(&rec.id).await?.context("missing")?;
        ensure!(
            back.created_at == rec.created_at,
            "{} != {}",
            back.created_at,
            rec.created_at
        );
        ensure!(back.updated_at == rec.updated_at);
        store.delete_tenant(&rec.id).await?;
    }
    Ok(())
}

/// Seven tenants (some sharing a `created_at`) read back three at a time: every tenant
/// once, newest first by (created_at, id), across at least three pages.
async fn check_list_pagination(store: &dyn Store) -> Result<()> {
    let t = tag();
    let base = now()?;
    let offsets = [0, 0, 1, 1, 1, 2, 3];
    let mut mine = Vec::new();
    for (i, s) in offsets.iter().enumerate() {
        let rec = tenant(
            &format!("tenant-page-{t}-{i}"),
            base + chrono::Duration::seconds(*s),
        );
        store.create_tenant(&rec).await?;
        mine.push(rec);
    }
    mine.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));

    let (mut seen, mut pages, mut cursor) = (Vec::new(), 0, None::<PageCursor>);
    loop {
        let page = store.list_tenants(3, cursor.as_ref()).await?;
        ensure!(page.len() <= 3);
        if page.is_empty() {
            break;
        }
        pages += 1;
        let last = &page[page.len() - 1];
        cursor = Some(PageCursor {
            created_at: last.created_at,
            id: last.id.clone(),
        });
        seen.extend(page);
        ensure!(pages < 10_000, "pagination does not end");
    }
    ensure!(pages >= 3, "only {pages} pages");
    let ids: HashSet<_> = seen.iter().map(|r| r.id.clone()).collect();
    ensure!(ids.len() == seen.len(), "a tenant appeared twice");
    ensure!(
        seen.len() as u64 == store.count_tenants().await?,
        "a tenant was omitted"
    );
    ensure!(
        seen.windows(2)
            .all(|w| (w[0].created_at, &w[0].id) > (w[1].created_at, &w[1].id)),
        "not newest first"
    );
    let mine_seen: Vec<_> = seen.into_iter().filter(|r| r.id.contains(&t)).collect();
    ensure!(
        mine_seen == mine,
        "the listed tenants differ from the created ones"
    );
    ensure!(store.list_tenants(0, None).await?.is_empty());
    Ok(())
}

async fn check_count(store: &dyn Store) -> Result<()> {
    let t = tag();
    let before = store.count_tenants().await?;
    for i in 0..2 {
        store
            .create_tenant(&tenant(&format!("tenant-count-{t}-{i}"), now()?))
            .await?;
    }
    ensure!(store.count_tenants().await? == before + 2);
    store.delete_tenant(&format!("tenant-count-{t}-0")).await?;
    ensure!(store.count_tenants().await? == before + 1);
    Ok(())
}

async fn check_update(store: &dyn Store) -> Result<()> {
    let id = format!("tenant-upd-{}", tag());
    let rec = tenant(&id, at_micros(1_600_000_000_000_001)?);
    store.create_tenant(&rec).await?;

    let changes = TenantChanges {
        name: Some(Some("renamed".to_owned())),
        sealed_token: Some(vec![9, 9, 9]),
        upstream_url: Some(Some("https://other.example.test/mcp".to_owned())),
        upstream_transport: Some(UpstreamTransport::Sse),
        enabled: Some(false),
        rate_limit: Some(Some(RateLimit {
            requests_per_second: 3,
            burst: 5,
        })),
        ..TenantChanges::default()
    };
    let updated = store.update_tenant(&id, 1, &changes).await?;
    let mut want = rec.clone();
    want.name = Some("renamed".to_owned());
    want.sealed_token = vec![9, 9, 9];
    want.upstream_url = Some("https://other.example.test/mcp".to_owned());
    want.upstream_transport = UpstreamTransport::Sse;
    want.enabled = false;
    want.rate_limit = Some(RateLimit {
        requests_per_second: 3,
        burst: 5,
    });
    want.version = 2;
    want.updated_at = updated.updated_at;
    ensure!(updated == want, "update result {updated:?}");
    ensure!(
        updated.updated_at > rec.updated_at,
        "updated_at did not move"
    );
    ensure!(
        store.get_tenant(&id).await?.as_ref() == Some(&updated),
        "get after update"
    );

    is(store.update_tenant(&id, 1, &changes).await, |e| {
        matches!(e, StoreError::Conflict)
    })
    .context("stale version")?;
    let missing = store.update_tenant("tenant-missing", 1, &changes).await;
    is(missing, |e| matches!(e, StoreError::NotFound)).context("missing tenant")?;

    let clear = TenantChanges {
        name: Some(None),
        upstream_url: Some(None),
        rate_limit: Some(None),
        ..TenantChanges::default()
    };
    let cleared = store.update_tenant(&id, 2, &clear).await?;
    ensure!(cleared.version == 3 && cleared.name.is_none());
    ensure!(cleared.upstream_url.is_none() && cleared.rate_limit.is_none());
    ensure!(cleared.upstream_transport == UpstreamTransport::Sse && !cleared.enabled);
    ensure!(cleared.integration_key == rec.integration_key);
    ensure!(store.get_tenant(&id).await?.as_ref() == Some(&cleared));
    Ok(())
}

async fn check_rotate_api_key(store: &dyn Store) -> Result<()> {
    let id = format!("tenant-rot-{}", tag());
    let rec = tenant(&id, now()?);
    store.create_tenant(&rec).await?;
    let new_hash = key_hash(&format!("{id}-rotated"));
    let rotated = store.rotate_api_key(&id, &new_hash).await?;
    ensure!(rotated.version == rec.version + 1);
    ensure!(rotated.api_key_hash == new_hash);
    ensure!(
        store.tenant_by_key_hash(&rec.api_key_hash).await?.is_none(),
        "old key works"
    );
    let found = store
        .tenant_by_key_hash(&new_hash)
        .await?
        .context("new key not found")?;
    ensure!(found == rotated);

    let missing = store.rotate_api_key("tenant-missing", b"x").await;
    is(missing, |e| matches!(e, StoreError::NotFound))?;
    let other = tenant(&format!("{id}-other"), now()?);
    store.create_tenant(&other).await?;
    let clash = store.rotate_api_key(&other.id, &new_hash).await;
    is(clash, |e| matches!(e, StoreError::Duplicate)).context("hash taken")?;
    Ok(())
}

async fn check_delete_keeps_audit(store: &dyn Store) -> Result<()> {
    let id = format!("tenant-del-{}", tag());
    let rec = tenant(&id, now()?);
    store.create_tenant(&rec).await?;
    let event = audit(Uuid::now_v7().to_string(), &id, "tenant.create", now()?);
    store.append_audit(std::slice::from_ref(&event)).await?;

    store.delete_tenant(&id).await?;
    ensure!(store.get_tenant(&id).await?.is_none());
    ensure!(store.tenant_by_key_hash(&rec.api_key_hash).await?.is_none());
    is(store.delete_tenant(&id).await, |e| {
        matches!(e, StoreError::NotFound)
    })?;
    let trail = store.list_audit(&audit_query(&id, 10)).await?;
    ensure!(
        trail == vec![event],
        "the audit trail did not survive the delete"
    );
    Ok(())
}

async fn check_audit_append_and_list(store: &dyn Store) -> Result<()> {
    let tenant_id = format!("tenant-aud-{}", tag());
    let base = now()?;
    let events: Vec<AuditRecord> = v7_ids(6)
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let action = if i % 2 == 0 {
                "tool.call"
            } else {
                "tools.list"
            };
            audit(
                id,
                &tenant_id,
                action,
                base + chrono::Duration::microseconds(i as i64 * 7),
            )
        })
        .collect();
    store.append_audit(&[]).await?;
    store.append_audit(&events[..4]).await?;
    store
        .append_audit(&events)
        .await
        .context("re-append with old ids")?;
    store.append_audit(&events).await.context("re-append all")?;
    let noise = audit(
        Uuid::now_v7().to_string(),
        "tenant-someone-else",
        "tool.call",
        base,
    );
    store.append_audit(&[noise]).await?;

    let newest_first: Vec<AuditRecord> = events.iter().rev().cloned().collect();
    let all = store.list_audit(&audit_query(&tenant_id, 100)).await?;
    ensure!(all == newest_first, "list_audit differs: {all:#?}");

    let page1 = store.list_audit(&audit_query(&tenant_id, 4)).await?;
    ensure!(page1[..] == newest_first[..4]);
    let mut q = audit_query(&tenant_id, 4);
    q.before_id = Some(page1[3].id.clone());
    let page2 = store.list_audit(&q).await?;
    ensure!(page2[..] == newest_first[4..]);
    q.before_id = Some(page2[1].id.clone());
    ensure!(store.list_audit(&q).await?.is_empty());

    let mut calls = audit_query(&tenant_id, 2);
    calls.action = Some("tool.call".to_owned());
    let want: Vec<_> = newest_first
        .iter()
        .filter(|e| e.action == "tool.call")
        .cloned()
        .collect();
    let first = store.list_audit(&calls).await?;
    ensure!(first[..] == want[..2], "action filter");
    calls.before_id = Some(first[1].id.clone());
    ensure!(
        store.list_audit(&calls).await?[..] == want[2..],
        "action filter, page 2"
    );
    Ok(())
}

async fn check_prune_audit(store: &dyn Store) -> Result<()> {
    let tenant_id = format!("tenant-prune-{}", tag());
    let old = Utc
        .with_ymd_and_hms(2001, 1, 1, 0, 0, 0)
        .single()
        .context("date")?;
    let cutoff = Utc
        .with_ymd_and_hms(2010, 1, 1, 0, 0, 0)
        .single()
        .context("date")?;
    let ids = v7_ids(5);
    // The three expired ones are older the later their id, so that the oldest first is
    // not the order of their ids.
    let events: Vec<AuditRecord> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let at = match i {
                0..3 => old + chrono::Duration::days(2 - i as i64),
                _ => now().unwrap_or(cutoff),
            };
            audit(id.clone(), &tenant_id, "token.issue", at)
        })
        .collect();
    store.append_audit(&events).await?;
    // Exactly at the cutoff is kept: the bound is exclusive.
    let edge = audit(
        Uuid::now_v7().to_string(),
        &tenant_id,
        "token.issue",
        cutoff,
    );
    store.append_audit(std::slice::from_ref(&edge)).await?;

    // In batches: at most the limit each time, the oldest first.
    ensure!(store.prune_audit(cutoff, 2).await? == 2, "the first batch");
    let left = store.list_audit(&audit_query(&tenant_id, 100)).await?;
    let left: HashSet<&str> = left.iter().map(|e| e.id.as_str()).collect();
    ensure!(
        left.contains(ids[0].as_str())
            && !left.contains(ids[1].as_str())
            && !left.contains(ids[2].as_str()),
        "the first batch was not the oldest two: {left:?}"
    );
    ensure!(store.prune_audit(cutoff, 2).await? == 1, "the rest");
    let left = store.list_audit(&audit_query(&tenant_id, 100)).await?;
    ensure!(
        left.len() == 3 && left.iter().all(|e| e.at >= cutoff),
        "{left:#?}"
    );
    ensure!(store.prune_audit(cutoff, 2).await? == 0);
    Ok(())
}

async fn check_ended_sessions(store: &dyn Store) -> Result<()> {
    let (ended, open, old) = (
        format!("ended-{}", tag()),
        format!("open-{}", tag()),
        format!("old-{}", tag()),
    );
    let now = now()?;
    let day_ago = now - chrono::Duration::hours(25);
    ensure!(store.ended_sessions(&[]).await?.is_empty());
    store.end_session(&ended, now, day_ago).await?;
    // Ending it again (a retried DELETE) is fine and changes nothing.
    store.end_session(&ended, now, day_ago).await?;
    let asked = [open.clone(), ended.clone()];
    ensure!(store.ended_sessions(&asked).await? == vec![ended.clone()]);
    // A record older than the cut is removed by the next end.
    store
        .end_session(&old, now - chrono::Duration::hours(30), day_ago)
        .await?;
    ensure!(store.ended_sessions(std::slice::from_ref(&old)).await? == vec![old.clone()]);
    store.end_session(&open, now, day_ago).await?;
    let mut left = store
        .ended_sessions(&[old.clone(), ended.clone(), open.clone()])
        .await?;
    left.sort();
    let mut want = vec![ended, open];
    want.sort();
    ensure!(left == want, "{left:?}");
    Ok(())
}
