//! `FreshDatabase`: a PostgreSQL database made for one test run on the local server
//! (`TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`) and dropped
//! afterwards. An unreachable server fails the test: it never skips.

use std::time::Duration;

use anyhow::Context;

pub struct FreshDatabase {
    pub url: String,
    pub name: String,
    admin_url: String,
}

pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

async fn admin_client(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("PostgreSQL for tests is not reachable (TEST_DATABASE_URL)")?;
    tokio::spawn(conn);
    Ok(client)
}

impl FreshDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        Self::create_with("").await
    }

    /// A fresh database made with these `CREATE DATABASE` options (`ENCODING ...`).
    pub async fn create_with(options: &str) -> anyhow::Result<Self> {
        let admin_url = admin_url();
        let name = format!(
            "switchboard_test_{}",
            hex::encode(rand::random::<[u8; 6]>())
        );
        admin_client(&admin_url)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await?;
        let mut url = url::Url::parse(&admin_url)?;
        url.set_path(&name);
        Ok(Self {
            url: url.to_string(),
            name,
            admin_url,
        })
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside or outside a runtime: do the async work on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                admin_client(&admin_url)
                    .await?
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// A client of the test's own on `url`, beside the gateway's or store's pool, for what the
/// test does to the database meanwhile. Its connection ends when the client is dropped.
pub async fn side_connection(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// A connection holding `table` locked in `mode` (in a transaction it leaves open) until it
/// commits or is dropped: with ACCESS EXCLUSIVE, a database that stops answering for that
/// table, as far as the gateway sees.
pub async fn locking_in(
    url: &str,
    table: &str,
    mode: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let locker = side_connection(url).await?;
    locker
        .batch_execute(&format!("BEGIN; LOCK TABLE {table} IN {mode} MODE"))
        .await?;
    Ok(locker)
}

/// [`locking_in`] ACCESS EXCLUSIVE mode: no other statement reads or writes `table`.
pub async fn locking(url: &str, table: &str) -> anyhow::Result<tokio_postgres::Client> {
    locking_in(url, table, "ACCESS EXCLUSIVE").await
}

/// Waits (up to 10 s) until some statement on `db`'s database waits for a lock on `table`
/// (one that a test's transaction holds).
pub async fn wait_for_lock_waiter(db: &tokio_postgres::Client, table: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = $1 AND NOT l.granted",
                &[&table],
            )
            .await?
            .get(0);
        if waiting > 0 {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nothing waited for the lock on {table}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The backends on `db`'s database, other than `db`'s own and `holder`'s (the transaction
/// holding the lock), whose statement waits for a lock, with what each waits in: a client
/// that gave up on such a statement leaves it here unless it has it cancelled.
pub async fn lock_waiters(
    db: &tokio_postgres::Client,
    holder: i32,
) -> anyhow::Result<Vec<(i32, String)>> {
    let rows = db
        .query(
            "SELECT pid, query FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock' \
             AND pid <> pg_backend_pid() AND pid <> $1",
            &[&holder],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// Waits (bounded by `within`) until no backend on `db`'s database but `holder` waits for a
/// lock ([`lock_waiters`]); those still waiting then are the error.
pub async fn wait_for_no_lock_waiters(
    db: &tokio_postgres::Client,
    holder: i32,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let waiting = lock_waiters(db, holder).await?;
        if waiting.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} backends still wait for a lock after {within:?}: {waiting:?}",
            waiting.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded by `within`) until at least `replicas` gateways' fleet listeners hold
/// their LISTEN session on the database at `url`; the listeners' backend pids.
pub async fn wait_for_listeners(
    url: &str,
    replicas: usize,
    within: Duration,
) -> anyhow::Result<Vec<i32>> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    let deadline = tokio::time::Instant::now() + within;
    let pids = loop {
        let rows = client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
                 AND datname = current_database() AND query LIKE 'LISTEN %'",
                &[],
            )
            .await?;
        if rows.len() >= replicas {
            break rows.iter().map(|row| row.get(0)).collect();
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {replicas} fleet listeners connected",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(client);
    let _ = conn.await;
    Ok(pids)
}

/// Ends the fleet listeners' connections to the database at `url` once `replicas` of them
/// are connected, and waits until those connections are gone, so that what is announced
/// next is lost to them. The listeners reconnect on their own after their back-off (125 ms
/// at the least).
pub async fn drop_listeners(url: &str, replicas: usize) -> anyhow::Result<()> {
    let pids = wait_for_listeners(url, replicas, std::time::Duration::from_secs(10)).await?;
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid",
            &[&pids],
        )
        .await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the listeners' connections did not end"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(client);
    let _ = conn.await;
    Ok(())
}
